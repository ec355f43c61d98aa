"""The runtime in a real daemon, over gRPC: specs, errors, restore, and the restart policy."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from micro.client import Client
from micro.errors import BadRequest, Conflict, NotFound
from micro.home import Home
from micro.proto import runtime_pb2
from micro.registry import RegistryClient
from micro.runtime import RuntimeClient
from micro.store import StoreClient
from micro.transport import GrpcTransport
from micro_daemon.app import Daemon
from micro_daemon.runtime import deployment
from micro_daemon.runtime.logs import LogFile
from micro_daemon.runtime.process import Instance
from micro_daemon.settings import Settings

Status = runtime_pb2.Status

PROTO = """\
syntax = "proto3";
package echo;
service Echo {
  rpc Call(Msg) returns (Msg);
}
message Msg {
  string text = 1;
}
"""
SERVICE = """\
import echo_pb2  # written by the runtime's build
from micro import Service


class Echo:
    async def Call(self, request, context):
        return request


service = Service("svc")
service.handle(Echo(), proto=echo_pb2)
service.run()
"""
SLEEPER = "import time\n\nwhile True:\n    time.sleep(1)\n"
# Registers on its first run; a later start exits before registering, unless its number
# is listed in the file `succeed` next to it.
FLAKY = (
    """\
from pathlib import Path

here = Path(__file__).parent
runs = here / "runs"
run = int(runs.read_text()) + 1 if runs.exists() else 1
runs.write_text(str(run))
succeed = (here / "succeed").read_text().split() if (here / "succeed").exists() else []
if run > 1 and str(run) not in succeed:
    raise SystemExit(f"start {run} fails")

"""
    + SERVICE
)


@pytest.fixture
async def client(daemon: Daemon) -> AsyncIterator[Client]:
    client = Client(GrpcTransport(daemon.address))
    yield client
    await client.close()


@pytest.fixture
def runtime(client: Client) -> RuntimeClient:
    return RuntimeClient(client)


def source(tmp_path: Path, main: str, name: str = "svc") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "main.py").write_text(main)
    (folder / "echo.proto").write_text(PROTO)
    return folder


async def create(runtime: RuntimeClient, folder: Path, name: str = "svc", **options: object) -> None:
    service = runtime_pb2.Service(name=name, source=str(folder))
    await runtime.create(service, runtime_pb2.CreateOptions(**options))  # type: ignore[arg-type]


async def settled(runtime: RuntimeClient, name: str = "svc", timeout: float = 15) -> runtime_pb2.Service:
    """The service once it is running or in error."""
    deadline = time.monotonic() + timeout
    while True:
        [service] = await runtime.read(name)
        if service.status in (Status.RUNNING, Status.ERROR):
            return service
        assert time.monotonic() < deadline, f"{name} still {Status.Name(service.status)}"
        await asyncio.sleep(0.05)


async def pids(client: Client, name: str = "svc") -> set[int]:
    try:
        versions = await RegistryClient(client).get_service(name)
    except NotFound:
        return set()
    return {int(node.metadata["pid"]) for version in versions for node in version.nodes}


async def test_a_running_service_is_restored_after_a_daemon_restart(micro_home: Path, tmp_path: Path) -> None:
    folder = source(tmp_path, SERVICE)
    for attempt in range(2):
        daemon = Daemon(Settings.load(), Home.from_env())
        await daemon.start()
        client = Client(GrpcTransport(daemon.address))
        try:
            if attempt == 0:
                await create(RuntimeClient(client), folder)
            service = await settled(RuntimeClient(client))
            assert service.status == Status.RUNNING, service.metadata.get("error")
            assert len(await pids(client)) == 1
        finally:
            await client.close()
            await daemon.stop(grace=1)


async def test_a_service_killed_while_starting_stops_at_once_and_is_not_restored(
    micro_home: Path, tmp_path: Path
) -> None:
    folder = source(tmp_path, SLEEPER)
    for attempt in range(2):
        daemon = Daemon(Settings.load(), Home.from_env())
        await daemon.start()
        client = Client(GrpcTransport(daemon.address))
        try:
            if attempt == 0:
                await create(RuntimeClient(client), folder)
                began = time.monotonic()
                await RuntimeClient(client).delete("svc")  # while it waits to register
                assert time.monotonic() - began < 5
            assert await RuntimeClient(client).read() == []
        finally:
            await client.close()
            await daemon.stop(grace=1)


async def test_a_second_create_is_a_conflict_unless_forced(runtime: RuntimeClient, tmp_path: Path) -> None:
    folder = source(tmp_path, SLEEPER)
    await create(runtime, folder)
    with pytest.raises(Conflict, match="micro update svc"):
        await create(runtime, folder)
    await create(runtime, folder, force=True)
    assert len(await runtime.read()) == 1


async def test_a_service_in_error_is_replaced_without_force(runtime: RuntimeClient, tmp_path: Path) -> None:
    folder = source(tmp_path, "raise SystemExit(3)\n")
    await create(runtime, folder)
    failed = await settled(runtime)
    assert failed.status == Status.ERROR
    assert failed.metadata["error"] == "exited with code 3 and printed nothing on stderr"

    (folder / "main.py").write_text(SERVICE)
    await create(runtime, folder)
    assert (await settled(runtime)).status == Status.RUNNING


async def test_unknown_services_are_not_found(runtime: RuntimeClient) -> None:
    with pytest.raises(NotFound, match="'ghost' is not running in namespace 'micro'"):
        await runtime.read("ghost")
    with pytest.raises(NotFound, match="ghost"):
        await runtime.delete("ghost")
    with pytest.raises(NotFound, match="ghost"):
        await runtime.update("ghost")
    with pytest.raises(NotFound, match="ghost"):
        [_ async for _ in runtime.logs("ghost")]
    assert await runtime.read() == []


@pytest.mark.parametrize(
    ("name", "source_of", "error", "match"),
    [
        ("svc", lambda tmp: str(tmp), BadRequest, "no main.py in"),
        ("bad name!", lambda tmp: str(tmp), BadRequest, "invalid service name 'bad name!'"),
        ("svc", lambda tmp: "relative/folder", BadRequest, "must be an absolute folder"),
        ("svc", lambda tmp: str(tmp / "missing"), NotFound, "does not exist"),
        ("svc", lambda tmp: "upload://" + "0" * 32, NotFound, "no upload with id"),
    ],
)
async def test_bad_sources_are_refused(
    runtime: RuntimeClient, tmp_path: Path, name: str, source_of: object, error: type, match: str
) -> None:
    service = runtime_pb2.Service(name=name, source=source_of(tmp_path))  # type: ignore[operator]
    with pytest.raises(error, match=match):
        await runtime.create(service, runtime_pb2.CreateOptions())
    assert await runtime.read() == []


async def test_a_failed_restart_is_retried(runtime: RuntimeClient, client: Client, tmp_path: Path) -> None:
    folder = source(tmp_path, FLAKY)
    (folder / "succeed").write_text("3")
    await create(runtime, folder)
    assert (await settled(runtime)).status == Status.RUNNING
    [first] = await pids(client)

    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while (service := (await runtime.read("svc"))[0]).metadata.get("retries") != "2" or (
        service.status != Status.RUNNING  # the kill, then the start that failed, then one that works
    ):
        assert time.monotonic() < deadline, f"still {Status.Name(service.status)}: {service.metadata}"
        await asyncio.sleep(0.05)
    assert (await pids(client)) - {first}
    assert "error" not in service.metadata
    assert (folder / "runs").read_text() == "3"


async def test_restarts_that_keep_failing_give_up(
    runtime: RuntimeClient, client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(deployment, "MAX_CRASHES", 3)
    folder = source(tmp_path, FLAKY)
    await create(runtime, folder)
    assert (await settled(runtime)).status == Status.RUNNING
    [first] = await pids(client)

    began = time.monotonic()
    os.kill(first, signal.SIGKILL)
    deadline = began + 15
    while (service := (await runtime.read("svc"))[0]).status != Status.ERROR:
        assert time.monotonic() < deadline, "still retrying"
        await asyncio.sleep(0.05)
    assert service.metadata["error"] == "crashed 3 times in 60 s: start 3 fails"
    assert service.metadata["retries"] == "3"
    assert (folder / "runs").read_text() == "3"
    assert time.monotonic() - began < 0.25 + 0.5 + 5  # two backoffs, two short-lived starts


async def test_processes_start_cleanly_while_the_daemon_serves_calls(client: Client, tmp_path: Path) -> None:
    # A fork() (rather than vfork()) ran grpc's fork handlers in the child: about one start
    # in six then died of SIGABRT or SIGSEGV before it could exec.
    log = LogFile(tmp_path / "svc.log")
    busy = asyncio.Event()

    async def load() -> None:
        while not busy.is_set():
            await StoreClient(client).write("k", b"v")

    loads = [asyncio.create_task(load()) for _ in range(4)]
    try:
        codes = []
        for _ in range(10):
            batch = [Instance("svc", [sys.executable, "-c", "pass"], tmp_path, {}, log) for _ in range(3)]
            for instance in batch:
                await instance.start()
            codes += [await instance.wait() for instance in batch]
    finally:
        busy.set()
        await asyncio.gather(*loads)
        log.close()
    assert codes == [0] * 30, [line.message for line in log.tail(10)]
