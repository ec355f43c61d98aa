"""The local daemon's life cycle, with ``micro`` run as real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e._support import MICRO, alive, daemons, micro, state, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def foreground(home: Path) -> Iterator[list[subprocess.Popen[str]]]:
    """``micro server`` processes started by the test, killed if still running at the end."""
    processes: list[subprocess.Popen[str]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


def start_foreground(processes: list[subprocess.Popen[str]], home: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen([*MICRO, "server"], stderr=subprocess.PIPE, text=True)
    processes.append(process)
    state_file = home / "state" / "server.json"
    wait_until(
        lambda: process.poll() is not None or (state_file.exists() and state(home)["pid"] == process.pid)
    )
    assert process.poll() is None, process.communicate()[1]
    return process


def test_the_first_command_starts_the_daemon_and_the_next_reuses_it(home):
    assert micro("store", "write", "k", "v").returncode == 0
    first = state(home)
    assert alive(first["pid"])
    assert first["address"].startswith("127.0.0.1:") and not first["address"].endswith(":0")
    log = home / "logs" / "server.log"
    assert "listening on " + first["address"] in log.read_text()

    read = micro("store", "read", "k")
    assert (read.returncode, read.stdout) == (0, "v\n")
    assert {k: state(home)[k] for k in ("pid", "address")} == {k: first[k] for k in ("pid", "address")}
    assert log.read_text().count("listening on") == 1


def test_a_stale_state_file_is_replaced(home):
    assert micro("store", "write", "k", "v").returncode == 0
    killed = state(home)["pid"]
    os.kill(killed, signal.SIGKILL)
    wait_until(lambda: not alive(killed))
    assert state(home)["pid"] == killed  # the kill left the state file behind

    read = micro("store", "read", "k")
    assert (read.returncode, read.stdout, read.stderr) == (0, "v\n", "")
    assert state(home)["pid"] != killed
    assert alive(state(home)["pid"])


def test_commands_started_together_start_exactly_one_daemon(home):
    commands = [
        subprocess.Popen([*MICRO, "store", "write", f"k{n}", "v"], stderr=subprocess.PIPE) for n in range(4)
    ]
    errors = [c.communicate(timeout=30)[1] for c in commands]
    assert [c.returncode for c in commands] == [0, 0, 0, 0], errors
    assert daemons(home) == [state(home)["pid"]]
    log = (home / "logs" / "server.log").read_text()
    assert log.count("listening on") == 1, log
    assert "already running" not in log
    assert micro("store", "list").stdout.split() == ["k0", "k1", "k2", "k3"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_the_foreground_server_stops_cleanly_on_a_signal(home, foreground, sig):
    server = start_foreground(foreground, home)
    assert micro("store", "write", "k", "v").returncode == 0
    server.send_signal(sig)
    _, err = server.communicate(timeout=15)
    assert server.returncode == 0, err
    assert "Traceback" not in err
    assert "micro server stopped" in err
    assert not (home / "state" / "server.json").exists()


def test_a_signal_as_soon_as_the_state_file_is_out_stops_the_server_cleanly(home, foreground):
    # The state file comes out before the gateway has started: a caller may be done by then.
    server = start_foreground(foreground, home)
    server.send_signal(signal.SIGINT)
    _, err = server.communicate(timeout=15)
    assert server.returncode == 0, err
    assert "Traceback" not in err
    assert not (home / "state" / "server.json").exists()


def test_a_second_server_on_the_same_home_is_refused(home, foreground):
    first = start_foreground(foreground, home)
    second = micro("server")
    assert second.returncode == 9
    assert f"already running for {home / 'state'} (pid {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.poll() is None
    assert state(home)["pid"] == first.pid


def test_a_port_in_use_is_named_with_how_to_choose_another(home):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = micro("server", "--address", f"127.0.0.1:{port}")
    assert result.returncode == 9
    assert f"port {port} is in use" in result.stderr
    assert "--address 127.0.0.1:PORT" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (home / "state" / "server.json").exists()


@pytest.mark.parametrize("args", [["store", "read", "k"], ["server"], ["config", "get"]])
def test_a_micro_home_that_cannot_be_a_folder_is_reported(home, monkeypatch, args):
    blocker = home.parent / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MICRO_HOME", str(blocker / "sub"))
    result = micro(*args)
    assert result.returncode == 9
    assert f"Cannot write to {blocker / 'sub'}" in result.stderr
    assert "set MICRO_HOME to a writable folder" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_read_only_micro_home_is_reported(home):
    home.mkdir(mode=0o500)
    if os.access(home, os.W_OK):
        pytest.skip("this user can write to a 0500 folder (root)")
    try:
        result = micro("store", "read", "k")
    finally:
        home.chmod(0o700)
    assert result.returncode == 9
    assert "set MICRO_HOME to a writable folder" in result.stderr


WRITER = """
import asyncio, sys
from micro.client import Client
from micro.errors import MicroError
from micro.store import StoreClient
from micro.transport import GrpcTransport

async def write(store, lane):
    for n in range(1_000_000):
        key = f"{lane}-{n:07d}"
        await store.write(key, key.encode())
        print(key, flush=True)

async def main():
    client = Client(GrpcTransport(sys.argv[1]), timeout=5)
    try:
        async with asyncio.TaskGroup() as group:
            for lane in range(8):
                group.create_task(write(StoreClient(client), lane))
    except* MicroError:
        pass
    finally:
        await client.close()

asyncio.run(main())
"""


def test_every_acknowledged_write_survives_a_kill(home):
    assert micro("store", "list").returncode == 0
    daemon = state(home)
    with subprocess.Popen(
        [sys.executable, "-c", WRITER, daemon["address"]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as writer:
        assert writer.stdout is not None and writer.stderr is not None
        acknowledged = [writer.stdout.readline().strip() for _ in range(400)]
        os.kill(daemon["pid"], signal.SIGKILL)
        # The same buffered reader: communicate() would miss what readline() already buffered.
        rest, err = writer.stdout.read(), writer.stderr.read()
        acknowledged += rest.split()
        assert writer.wait(timeout=30) == 0, err  # it stopped on the connection error, not on a bug
    assert "" not in acknowledged, err

    listed = micro("store", "list", "--output", "json")
    assert listed.returncode == 0, listed.stderr
    assert state(home)["pid"] != daemon["pid"]
    missing = set(acknowledged) - set(json.loads(listed.stdout))
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {sorted(missing)[:5]}"
    values = json.loads(micro("store", "read", "0-", "--prefix", "--output", "json").stdout)
    assert all(r["key"] == r["value"] for r in values)
