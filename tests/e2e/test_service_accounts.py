"""Services run by the runtime act as their own account, renew its token, and lose it when killed.

A daemon with 4-second access tokens and a 6-second registry TTL: a service that did not renew
its token could neither heartbeat nor use the store after a few seconds.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from micro.auth import AuthClient
from micro.client import Client
from micro.transport import GrpcTransport
from tests.e2e._support import micro, new_service, replace_in, state

pytestmark = pytest.mark.slow

HANDLER = """        who = context.account.id if context.account else "anonymous"
        await current_service().store().write("last", request.name.encode())
        return pb.Response(msg=f"Hello {request.name} from {who}")"""


def call(name: str) -> str:
    called = micro("call", "helloworld", "Helloworld.Call", json.dumps({"name": name}))
    assert called.returncode == 0, called.stderr
    return str(json.loads(called.stdout)["msg"])


def accounts(home: Path) -> dict[str, str]:
    async def listed() -> dict[str, str]:
        async with Client(GrpcTransport(state(home)["address"])) as owner:
            return {a.id: a.type for a in await AuthClient(owner).list()}

    return asyncio.run(listed())


def test_a_service_acts_as_its_own_account_and_renews_it(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MICRO_AUTH_TOKEN_LIFETIME", "4")
    monkeypatch.setenv("MICRO_REGISTRY_TTL", "6")
    folder = new_service(tmp_path)
    handler = folder / "handler" / "helloworld.py"
    replace_in(handler, '        return pb.Response(msg=f"Hello {request.name}")', HANDLER)
    replace_in(
        handler, "from micro import Context, errors", "from micro import Context, current_service, errors"
    )
    ran = micro("run", str(folder), "--no-watch", timeout=90)
    assert ran.returncode == 0, ran.stderr

    assert call("Alice") == "Hello Alice from owner"  # the CLI acts as the local owner
    assert accounts(home)["service.helloworld"] == "service"

    time.sleep(10)  # two token lifetimes, more than the registry TTL
    assert call("Bob") == "Hello Bob from owner"
    read = micro("store", "read", "last", "--table", "helloworld")
    assert read.returncode == 0, read.stderr
    assert read.stdout == "Bob\n"  # written by the service, as itself, after its first token expired

    killed = micro("kill", "helloworld")
    assert killed.returncode == 0, killed.stderr
    assert "service.helloworld" not in accounts(home)
