"""The developer loop with real processes: new, run, call, edit, reload, logs, kill."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e._support import daemons, micro, state, stop, wait_until

pytestmark = pytest.mark.slow


def call(name: str = "helloworld", who: str = "Alice") -> subprocess.CompletedProcess[str]:
    return micro("call", name, "Helloworld.Call", json.dumps({"name": who}))


@pytest.fixture
def service(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A new helloworld service, running under the runtime."""
    monkeypatch.chdir(tmp_path)
    created = micro("new", "helloworld")
    assert created.returncode == 0, created.stderr
    assert "micro run ." in created.stdout
    monkeypatch.chdir(tmp_path / "helloworld")
    ran = micro("run", ".", timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert "running" in ran.stdout
    return tmp_path / "helloworld"


def edit(folder: Path, old: str, new: str) -> None:
    handler = folder / "handler" / "helloworld.py"
    handler.write_text(handler.read_text().replace(old, new))


def test_new_run_call_edit_reload_logs_kill(service: Path) -> None:
    answer = call()
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout) == {"msg": "Hello Alice"}

    edit(service, 'f"Hello {request.name}"', 'f"Howdy {request.name}"')
    wait_until(lambda: json.loads(call().stdout or "{}") == {"msg": "Howdy Alice"}, timeout=20)

    logs = micro("logs", "helloworld", "-n", "50")
    assert "reloaded in" in logs.stdout
    assert micro("status", "--output", "json").stdout.count('"running"') == 1

    streamed = micro("stream", "helloworld", "Helloworld.Stream", '{"count": 3}')
    assert [m["count"] for m in _documents(streamed.stdout)] == ["0", "1", "2"]

    assert micro("kill", "helloworld").returncode == 0
    assert micro("status", "--output", "json").stdout.strip() == "[]"
    gone = call()
    assert gone.returncode == 4, gone.stderr


def test_a_reload_under_steady_calls_fails_none(service: Path, home: Path) -> None:
    address = state(home)["address"]
    failures, answers = asyncio.run(_calls_during_reloads(service, address, reloads=3))
    assert failures == []
    assert {"Hello", "Reload0", "Reload1", "Reload2"} <= answers


async def _calls_during_reloads(folder: Path, address: str, *, reloads: int) -> tuple[list[str], set[str]]:
    from micro.client import Client
    from micro.transport import GrpcTransport

    client = Client(GrpcTransport(address), timeout=10)
    failures: list[str] = []
    answers: set[str] = set()
    stop_calling = asyncio.Event()

    async def caller() -> None:
        while not stop_calling.is_set():
            try:
                reply = await client.call_json("helloworld", "Helloworld.Call", b'{"name": "x"}')
                answers.add(json.loads(reply)["msg"].split()[0])
            except Exception as exc:  # every failure counts, whatever its kind
                failures.append(repr(exc))

    callers = [asyncio.create_task(caller()) for _ in range(4)]
    previous = "Hello"
    for i in range(reloads):
        edit(folder, f'f"{previous} {{request.name}}"', f'f"Reload{i} {{request.name}}"')
        previous = f"Reload{i}"
        deadline = time.monotonic() + 20
        while previous not in answers and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    stop_calling.set()
    await asyncio.gather(*callers)
    await client.close()
    return failures, answers


def test_a_syntax_error_keeps_the_old_instance_and_fixing_recovers(service: Path) -> None:
    edit(service, "return pb.Response(", "return pb.Response(((")
    wait_until(lambda: "error" in micro("status", "--output", "json").stdout, timeout=20)
    status = json.loads(micro("status", "--output", "json").stdout)[0]
    assert status["status"] == "running"  # the old instance still serves
    assert "SyntaxError" in status["metadata"]["error"] or "never closed" in status["metadata"]["error"]
    assert json.loads(call().stdout) == {"msg": "Hello Alice"}

    edit(service, "return pb.Response(((", "return pb.Response(")
    wait_until(lambda: "error" not in json.loads(micro("status", "--output", "json").stdout)[0]["metadata"])


def test_a_crashed_service_is_restarted(service: Path) -> None:
    pid = _service_pid()
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: _service_pid() not in (None, pid), timeout=20)
    assert json.loads(call().stdout) == {"msg": "Hello Alice"}
    status = json.loads(micro("status", "--output", "json").stdout)[0]
    assert status["metadata"]["retries"] == "1"


def test_services_come_back_after_a_daemon_restart(service: Path, home: Path) -> None:
    [daemon] = daemons(home)
    stop(daemon)
    assert micro("status", "--output", "json").returncode == 0  # starts a new daemon
    wait_until(lambda: '"running"' in micro("status", "--output", "json").stdout, timeout=30)
    assert json.loads(call().stdout) == {"msg": "Hello Alice"}


def test_running_the_same_service_twice_says_so(service: Path) -> None:
    again = micro("run", ".")
    assert again.returncode == 7
    assert "micro update" in again.stderr and "--force" in again.stderr


def test_a_folder_without_a_service_is_refused(home: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = micro("run", str(empty))
    assert refused.returncode == 3
    assert "No main.py" in refused.stderr


def test_kill_of_an_unknown_service(home: Path) -> None:
    refused = micro("kill", "nothing")
    assert refused.returncode == 4
    assert "nothing" in refused.stderr


def _documents(text: str) -> list[dict[str, str]]:
    decoder, found, at = json.JSONDecoder(), [], 0
    while at < len(text.rstrip()):
        document, at = decoder.raw_decode(text, at)
        found.append(document)
        while at < len(text) and text[at].isspace():
            at += 1
    return found


def _service_pid() -> int | None:
    found = micro("get", "service", "helloworld", "--output", "json")
    if found.returncode != 0:
        return None
    nodes = [node for version in json.loads(found.stdout) for node in version["nodes"]]
    return int(nodes[0]["metadata"]["pid"]) if len(nodes) == 1 else None
