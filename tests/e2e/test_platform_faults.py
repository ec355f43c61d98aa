"""The platform profile when an engine or a service goes away, with real processes.

A daemon on the platform profile runs against a private PostgreSQL and a private NATS with
JetStream (``tests._engines``: the machine's shared servers serve other tests), which the tests
stop and start again under it. While an engine is down, calls fail at once with a 503 naming
it, the daemon stays up, and once the engine is back calls succeed again without restarting
the daemon, with nothing lost that was acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from micro.debug import DebugClient
from micro.errors import MicroError, ServiceUnavailable
from micro.events import EventsClient
from micro.proto import registry_pb2
from micro.registry import RegistryClient
from micro.store import StoreClient
from tests._engines import PrivateNats, PrivatePostgres
from tests.e2e._support import PLATFORM_TTL, Platform, PlatformDaemon, new_service, wait_until

pytestmark = pytest.mark.slow

FAIL_FAST = 3.0  # seconds a call may take to fail while an engine is down (a client's timeout is 30)
RECOVERY = 10.0  # seconds within which calls succeed again once the engine is back


class Engines:
    """The private PostgreSQL and NATS of this module, started again before each test if stopped."""

    def __init__(self, root: Path) -> None:
        self.postgres = PrivatePostgres()
        self.nats = PrivateNats(root)

    def ensure_running(self) -> None:
        if not self.postgres.running:
            self.postgres.start()
        if not self.nats.running:
            self.nats.start()

    def close(self) -> None:
        try:
            self.nats.close()
        finally:
            self.postgres.close()


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engines]:
    running = Engines(tmp_path_factory.mktemp("nats"))
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def platform(engines: Engines, home: Path, tmp_path: Path) -> Iterator[Platform]:
    """A platform on the private engines (each test its own schema and prefix); stopped at the end."""
    engines.ensure_running()
    running = Platform(tmp_path / "daemons", postgres=engines.postgres.url, nats=engines.nats.url)
    running.root.mkdir()
    try:
        yield running
    finally:
        running.close()


def session(daemon: PlatformDaemon, scenario: Callable[[Any], Awaitable[None]]) -> None:
    """Run ``scenario(client)`` with a client of ``daemon``; the daemon must have stayed up."""

    async def main() -> None:
        client = daemon.client(timeout=15)
        try:
            await scenario(client)
        finally:
            await client.close()

    asyncio.run(main())
    assert daemon.process.poll() is None, f"the daemon exited:\n{daemon.banner()}"


async def fails_fast(call: Callable[[], Awaitable[object]]) -> ServiceUnavailable:
    """The ``ServiceUnavailable`` that ``call`` raises within ``FAIL_FAST`` seconds."""
    began = time.monotonic()
    with pytest.raises(ServiceUnavailable) as caught:
        await call()
    took = time.monotonic() - began
    assert took < FAIL_FAST, f"failing took {took:.1f} s: {caught.value}"
    return caught.value


async def succeeds_again(call: Callable[[], Awaitable[object]]) -> float:
    """Retry ``call`` until it succeeds (``RECOVERY`` seconds at most); how long that took."""
    began = time.monotonic()
    while True:
        try:
            await call()
            return time.monotonic() - began
        except ServiceUnavailable:
            assert time.monotonic() - began < RECOVERY, "calls did not succeed again once the engine was back"
            await asyncio.sleep(0.1)


def test_a_postgresql_restart_fails_calls_clearly_and_loses_no_acknowledged_write(
    platform: Platform, engines: Engines
) -> None:
    daemon = platform.start("a", env=None)
    postgres = engines.postgres
    where = f"store engine postgres at 127.0.0.1:{postgres.port} is unavailable"

    async def scenario(client: Any) -> None:
        store = StoreClient(client)
        await store.write("before", b"written before")
        assert [r.value for r in await store.read("before")] == [b"written before"]

        # A writer keeps going through the restart: what it was told is written must stay written.
        acknowledged: dict[str, bytes] = {}
        refused: list[MicroError] = []
        stop = asyncio.Event()

        async def writer() -> None:
            for n in range(100_000):
                if stop.is_set():
                    return
                try:
                    await store.write(f"w{n}", b"%d" % n)
                    acknowledged[f"w{n}"] = b"%d" % n
                except ServiceUnavailable as exc:
                    refused.append(exc)
                await asyncio.sleep(0.005)

        writing = asyncio.create_task(writer())
        await asyncio.sleep(0.3)
        await asyncio.to_thread(postgres.stop)

        error = await fails_fast(lambda: store.read("before"))
        assert (error.code, error.id) == (503, "store")
        assert where in error.detail and "Connection refused" in error.detail, error.detail
        await fails_fast(lambda: store.write("during", b"lost"))
        cli = await asyncio.to_thread(daemon.micro, "store", "read", "before")
        assert cli.returncode == 5, cli.stderr
        assert cli.stderr.startswith("Error: ") and where in cli.stderr.lower(), cli.stderr
        assert "Traceback" not in cli.stderr

        await asyncio.sleep(0.5)
        await asyncio.to_thread(postgres.start)
        took = await succeeds_again(lambda: store.read("before"))
        assert took < 3, f"the store served again {took:.1f} s after PostgreSQL was back"
        await asyncio.sleep(0.3)
        stop.set()
        await writing

        assert refused, "no write failed while PostgreSQL was down"
        assert all(where in exc.detail or "store engine postgres" in exc.detail for exc in refused)
        assert len(acknowledged) > 20
        records = await store.read("w", prefix=True)
        stored = {r.key: r.value for r in records}
        lost = {key for key, value in acknowledged.items() if stored.get(key) != value}
        assert not lost, f"acknowledged writes lost: {sorted(lost)[:10]}"
        assert [r.value for r in await store.read("before")] == [b"written before"]

    session(daemon, scenario)


def test_a_nats_restart_fails_calls_clearly_then_events_and_registry_resume(
    platform: Platform, engines: Engines
) -> None:
    daemon = platform.start("a", env=None)
    nats = engines.nats

    def service(port: int) -> registry_pb2.Service:
        node = registry_pb2.Node(id=f"probe-{port}", address=f"127.0.0.1:{port}")
        return registry_pb2.Service(name="probe", version="1", nodes=[node])

    async def scenario(client: Any) -> None:
        events, registry = EventsClient(client), RegistryClient(client)
        await events.publish("orders", {"n": 0})
        consumer = events.consume("orders", group="workers", start="beginning")
        received = [json.loads((await anext(consumer)).payload)["n"]]
        await registry.register(service(1), ttl=60)
        assert [n.id for s in await registry.get_service("probe") for n in s.nodes] == ["probe-1"]

        await asyncio.to_thread(nats.stop)
        health = DebugClient(client, service="events").health
        on_nats = ("events", "broker", "registry")
        async with asyncio.timeout(RECOVERY):  # until the daemon has seen its connections drop
            while "ok" in [(await health()).checks[engine] for engine in on_nats]:
                await asyncio.sleep(0.02)
        checks = (await health()).checks
        assert checks["store"] == "ok", checks
        assert all(nats.url in checks[engine] for engine in on_nats), checks
        calls = {
            "events": lambda: events.publish("orders", {"n": -1}),
            "registry": lambda: registry.register(service(2), ttl=60),
        }
        for engine, call in calls.items():
            error = await fails_fast(call)
            assert (error.code, error.id) == (503, engine), error
            assert f"{engine} engine: " in error.detail and nats.url in error.detail, error.detail

        await asyncio.to_thread(nats.start)
        await succeeds_again(lambda: events.publish("orders", {"n": 1}))
        await events.publish("orders", {"n": 2})
        while received[-1] != 2:  # the consumer opened before the outage goes on
            received.append(json.loads((await asyncio.wait_for(anext(consumer), RECOVERY)).payload)["n"])
        assert received == [0, 1, 2], received
        await consumer.close()

        # JetStream kept what was written before the restart; the registry takes writes again.
        replay = [json.loads(e.payload)["n"] for e in await events.read("orders")]
        assert replay == [0, 1, 2], replay
        await succeeds_again(lambda: registry.register(service(3), ttl=60))
        nodes = {n.id for s in await registry.get_service("probe") for n in s.nodes}
        assert {"probe-1", "probe-3"} <= nodes, nodes
        async with asyncio.timeout(RECOVERY):  # each NATS connection comes back on its own
            while (recovered := await health()).status != "ok":
                await asyncio.sleep(0.05)
        assert set(recovered.checks) == {"store", *on_nats}

    session(daemon, scenario)


def test_a_stopped_service_leaves_the_registry_then_comes_back(platform: Platform, tmp_path: Path) -> None:
    daemon = platform.start("a", env=None)
    folder = new_service(tmp_path / "src")
    ran = daemon.micro("run", str(folder), "--no-watch", timeout=90)
    assert ran.returncode == 0, ran.stderr

    def call() -> tuple[int, str, float]:
        began = time.monotonic()
        done = daemon.micro("call", "helloworld", "Helloworld.Call", '{"name": "Ann"}', timeout=60)
        return done.returncode, done.stdout + done.stderr, time.monotonic() - began

    def nodes() -> list[dict[str, Any]]:
        found = daemon.micro("get", "service", "helloworld", "--output", "json")
        if found.returncode == 4:
            return []
        assert found.returncode == 0, found.stderr
        return [node for version in json.loads(found.stdout) for node in version["nodes"]]

    code, output, _ = call()
    assert code == 0 and "Hello Ann" in output, output
    [node] = nodes()
    pid = int(node["metadata"]["pid"])

    os.kill(pid, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        wait_until(lambda: not nodes(), timeout=PLATFORM_TTL + 10)
        assert time.monotonic() - stopped < PLATFORM_TTL + 5
        code, output, took = call()
        assert code == 4, output  # not found: the call is not sent to a process that cannot answer
        assert "helloworld" in output and took < 5, (output, took)
    finally:
        os.kill(pid, signal.SIGCONT)

    wait_until(lambda: call()[0] == 0, timeout=15)
    [node] = nodes()
    assert int(node["metadata"]["pid"]) == pid  # the same process registered again


def test_a_daemon_cut_off_past_the_ttl_comes_back_with_its_services(
    platform: Platform, tmp_path: Path
) -> None:
    """A network partition of one daemon: SIGSTOP it past the TTL, the other serves on, SIGCONT."""
    a = platform.start("a", env=None)
    b = platform.start("b", env=None)
    folder = new_service(tmp_path / "src")
    ran = a.micro("run", str(folder), "--no-watch", timeout=90)
    assert ran.returncode == 0, ran.stderr

    def answer() -> int:
        return b.micro("call", "helloworld", "Helloworld.Call", '{"name": "Ann"}', timeout=60).returncode

    def listed(service: str) -> bool:
        return b.micro("get", "service", service, "--output", "json").returncode == 0

    assert answer() == 0
    assert b.micro("store", "write", "k", "before").returncode == 0
    os.kill(a.process.pid, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        wait_until(lambda: not listed("helloworld"), timeout=PLATFORM_TTL + 15)  # its heartbeats went via a
        assert time.monotonic() - stopped < PLATFORM_TTL + 10
        assert answer() == 4  # not found through b, at once: no call waits on the stopped daemon
        written = b.micro("store", "write", "k", "during")
        assert written.returncode == 0, written.stderr  # b serves everything that does not live on a
    finally:
        os.kill(a.process.pid, signal.SIGCONT)

    wait_until(lambda: answer() == 0, timeout=30)  # a answers again, its service heartbeats again
    read = a.micro("store", "read", "k")
    assert read.returncode == 0 and read.stdout == "during\n", read.stderr
