"""Rules decide calls to user services, through the proxy (gRPC) and the gateway (HTTP) alike.

A real framework service (``tests/protos/greeter.proto``) in this process, registered with a real
daemon, verifying its callers' tokens offline with the daemon's public key (as the runtime sets
it up); it answers with the account it sees.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest

from micro import Service
from micro.auth import AuthClient
from micro.client import Client
from micro.context import Context
from micro.credentials import StaticToken
from micro.errors import Forbidden, Unauthorized
from micro.testing.pytest import session_auth_key
from micro.transport import GrpcTransport
from micro_daemon.app import Daemon
from micro_daemon.auth.keys import KeyPair

CALL = "/greeter.Greeter/Call"


@pytest.fixture
async def greeter(
    daemon: Daemon, greeter_pb2: ModuleType, micro_home: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Service]:
    pb = greeter_pb2

    class Greeter:
        async def Call(self, request: Any, context: Context) -> Any:
            who = context.account.id if context.account else "anonymous"
            return pb.Response(msg=f"Hello {request.name}, from {who}")

        async def Stream(self, request: Any, context: Context) -> AsyncIterator[Any]:
            yield pb.StreamResponse(count=1)

        async def Collect(self, requests: AsyncIterator[Any], context: Context) -> Any:
            return pb.Response()

        async def PingPong(self, requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            async for _ in requests:
                yield pb.Pong()

    monkeypatch.setenv("MICRO_PROXY", daemon.address)
    public_key = KeyPair.from_pem(session_auth_key(), "the test key").public_pem.decode()
    monkeypatch.setenv("MICRO_AUTH_PUBLIC_KEY", public_key)
    service = Service("greeter")
    service.handle(Greeter())
    await service.start()
    yield service
    await service.stop(grace=0)


@pytest.fixture
async def owner(daemon: Daemon) -> AsyncIterator[Client]:
    async with Client(GrpcTransport(daemon.address), timeout=10) as c:
        yield c


async def token(owner: Client, namespace: str, id: str, scopes: tuple[str, ...] = ()) -> str:
    auth = AuthClient(owner)
    await auth.generate(id, secret="s3cret-enough", scopes=scopes, namespace=namespace)
    return (await auth.token(id=id, secret="s3cret-enough", namespace=namespace)).access_token


async def hello(daemon: Daemon, pb: ModuleType, access: str | None, namespace: str = "micro") -> str:
    credentials = StaticToken(access) if access else None
    async with Client(GrpcTransport(daemon.address), namespace=namespace, credentials=credentials) as c:
        response = await c.call("greeter", CALL, pb.Request(name="x"), pb.Response)
        return str(response.msg)


async def lock_down(owner: Client) -> None:
    """Micro's example: only signed-in accounts of the namespace, and tokens stay public."""
    auth = AuthClient(owner)
    await auth.list_rules()  # writes the default rule, to be deleted
    await auth.create_rule("onlyloggedin", "*:*:*", scope="*")
    await auth.delete_rule("default")


async def test_the_default_rule_lets_anyone_call_and_the_service_sees_who(
    daemon: Daemon, greeter: Service, greeter_pb2: ModuleType, owner: Client
) -> None:
    alice = await token(owner, "micro", "alice")
    assert await hello(daemon, greeter_pb2, None) == "Hello x, from anonymous"
    assert await hello(daemon, greeter_pb2, alice) == "Hello x, from alice"


async def test_a_locked_down_namespace_refuses_anonymous_and_foreign_callers(
    daemon: Daemon, greeter: Service, greeter_pb2: ModuleType, owner: Client
) -> None:
    alice = await token(owner, "micro", "alice")
    bob = await token(owner, "b", "bob", scopes=("admin",))
    await lock_down(owner)
    with pytest.raises(Unauthorized):
        await hello(daemon, greeter_pb2, None)
    assert await hello(daemon, greeter_pb2, alice) == "Hello x, from alice"
    with pytest.raises(Forbidden):  # an admin of b is nobody in micro
        await hello(daemon, greeter_pb2, bob)


async def test_a_deny_rule_beats_a_lower_grant_and_a_scope_rule_beats_both(
    daemon: Daemon, greeter: Service, greeter_pb2: ModuleType, owner: Client
) -> None:
    alice = await token(owner, "micro", "alice")
    vip = await token(owner, "micro", "vip", scopes=("vip",))
    auth = AuthClient(owner)
    await auth.list_rules()
    await auth.create_rule(
        "no-calls", "service:greeter:Greeter.Call", scope="*", access="denied", priority=10
    )
    await auth.create_rule("vip-calls", "service:greeter:Greeter.Call", scope="vip", priority=20)
    with pytest.raises(Forbidden, match="no-calls"):
        await hello(daemon, greeter_pb2, alice)
    assert await hello(daemon, greeter_pb2, vip) == "Hello x, from vip"
    verdict = await auth.verify("service:greeter:Greeter.Call", account_id="alice")
    assert not verdict.granted and verdict.rule.id == "no-calls"


async def test_a_token_cannot_be_replayed_against_another_namespaces_services(
    daemon: Daemon, greeter: Service, greeter_pb2: ModuleType, owner: Client
) -> None:
    bob = await token(owner, "b", "bob", scopes=("admin",))
    with pytest.raises(Forbidden, match="may not call services of namespace 'micro'"):
        await hello(daemon, greeter_pb2, bob, namespace="micro")


async def test_the_gateway_applies_the_same_rules(daemon: Daemon, greeter: Service, owner: Client) -> None:
    alice = await token(owner, "micro", "alice")
    await lock_down(owner)
    url = f"http://{daemon.api_address}/greeter/call"
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json={"name": "web"}) as response:
            assert response.status == 401
            assert (await response.json())["detail"].startswith("no rule lets anonymous callers")
        headers = {"Authorization": f"Bearer {alice}"}
        async with http.post(url, json={"name": "web"}, headers=headers) as response:
            assert response.status == 200
            assert await response.json() == {"msg": "Hello web, from alice"}
        async with http.post(f"http://{daemon.api_address}/store/read", json={"key": "k"}) as response:
            assert response.status == 401  # the blocks want an account, whatever the rules say
