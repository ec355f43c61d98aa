"""``micro run`` options and the runtime's read side: instances, env vars, update, logs, status, kill."""

from __future__ import annotations

import asyncio
import json
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.e2e._support import MICRO, micro, new_service, replace_in, state

pytestmark = pytest.mark.slow

GREETING = 'f"Hello {request.name}"'


def answer(name: str = "Alice") -> str:
    called = micro("call", "helloworld", "Helloworld.Call", json.dumps({"name": name}))
    assert called.returncode == 0, called.stderr
    return str(json.loads(called.stdout)["msg"])


def run(folder: Path, *flags: str) -> None:
    ran = micro("run", str(folder), *flags, timeout=60)
    assert ran.returncode == 0, ran.stderr


@pytest.fixture
def folder(home: Path, tmp_path: Path) -> Path:
    return new_service(tmp_path)


async def _answers(address: str, count: int) -> list[str]:
    from micro.client import Client
    from micro.transport import GrpcTransport

    client = Client(GrpcTransport(address), timeout=10)
    try:
        replies = [
            await client.call_json("helloworld", "Helloworld.Call", b'{"name": "x"}') for _ in range(count)
        ]
    finally:
        await client.close()
    return [json.loads(reply)["msg"] for reply in replies]


def test_instances_share_the_calls_and_see_the_env_vars(folder: Path, home: Path) -> None:
    handler = folder / "handler" / "helloworld.py"
    replace_in(handler, "import logging\n", "import logging\nimport os\n")
    replace_in(handler, GREETING, "f\"{os.environ['GREETING']} {request.name} {os.getpid()}\"")
    run(folder, "--instances", "3", "--env_vars", "GREETING=Hi", "--no-watch")

    found = micro("get", "service", "helloworld", "--output", "json")
    nodes = [node for version in json.loads(found.stdout) for node in version["nodes"]]
    assert len(nodes) == 3
    [status] = json.loads(micro("status", "--output", "json").stdout)
    assert status["metadata"]["instances"] == "3"

    answers = asyncio.run(_answers(state(home)["address"], 30))
    assert {a.rsplit(" ", 1)[0] for a in answers} == {"Hi x"}
    pids = {int(a.rsplit(" ", 1)[1]) for a in answers}
    assert len(pids) >= 2
    assert pids <= {int(node["metadata"]["pid"]) for node in nodes}


def test_update_rebuilds_a_service_that_does_not_watch(folder: Path) -> None:
    run(folder, "--no-watch")
    replace_in(folder / "handler" / "helloworld.py", GREETING, 'f"Howdy {request.name}"')
    time.sleep(1.0)  # a watcher (200 ms debounce) would have reloaded by now
    assert answer() == "Hello Alice"

    updated = micro("update", "helloworld", timeout=60)
    assert (updated.returncode, updated.stdout) == (0, "helloworld updated\n"), updated.stderr
    assert answer() == "Howdy Alice"
    assert "updated in" in micro("logs", "helloworld").stdout


def test_logs_status_and_kill(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run(folder)
    [started] = [line for line in _json_logs() if "started in" in line["message"]]

    follow = subprocess.Popen([*MICRO, "logs", "helloworld", "-f"], stdout=subprocess.PIPE, text=True)
    lines, reader = _lines(follow)
    try:
        _next_matching(lines, "started in")  # the tail comes first
        answer("Follower")
        assert "with name Follower" in _next_matching(lines, "Follower")
        followed = time.time()
    finally:
        follow.send_signal(signal.SIGINT)
        follow.wait(timeout=10)
        reader.join(timeout=10)
        assert follow.stdout is not None
        follow.stdout.close()
    assert follow.returncode == 0

    [status] = json.loads(micro("status", "helloworld", "--output", "json").stdout)
    assert set(status) == {"name", "version", "source", "status", "metadata"}
    assert (status["name"], status["version"], status["status"]) == ("helloworld", "latest", "running")
    assert status["source"] == str(folder)
    assert {"group", "instances", "build", "started", "source"} <= set(status["metadata"])
    assert (status["metadata"]["group"], status["metadata"]["instances"]) == ("micro", "1")

    records = _json_logs()
    assert all(set(r) == {"timestamp", "metadata", "message"} for r in records)
    assert all(isinstance(r["timestamp"], float) and isinstance(r["metadata"], dict) for r in records)
    assert {"source": "runtime"} in [r["metadata"] for r in records]
    assert {"stream": "stdout"} in [r["metadata"] for r in records]

    # --since 1s is whole seconds on the wire: anything over 2 s old is out of it.
    time.sleep(max(0.0, max(started["timestamp"], followed) + 2.2 - time.time()))
    answer("Recent")
    recent = [r["message"] for r in _json_logs("--since", "1s")]
    assert any("with name Recent" in m for m in recent), recent
    assert not any("started in" in m or "Follower" in m for m in recent), recent

    monkeypatch.chdir(folder)
    killed = micro("kill", ".")
    assert (killed.returncode, killed.stdout) == (0, "helloworld stopped\n"), killed.stderr
    assert micro("status", "--output", "json").stdout.strip() == "[]"
    assert micro("get", "service", "helloworld").returncode == 4


def _json_logs(*flags: str) -> list[dict[str, object]]:
    found = micro("logs", "helloworld", "-n", "100", "--output", "json", *flags)
    assert found.returncode == 0, found.stderr
    return [json.loads(line) for line in found.stdout.splitlines()]


def _lines(process: subprocess.Popen[str]) -> tuple[queue.Queue[str], threading.Thread]:
    """What ``process`` prints, line by line, read by a thread so a test can wait with a timeout."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return lines, reader


def _next_matching(lines: queue.Queue[str], text: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while True:
        line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        if text in line:
            return line
