"""Messaging with real processes: a service's subscribers under the runtime, and a daemon killed mid-burst."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e._support import alive, daemons, micro, new_service, replace_in, state, wait_until

pytestmark = pytest.mark.slow

RECORDER = """
import json


@service.subscribe("pings")
async def on_ping(message: dict) -> None:
    await service.store().write(f"ping-{message['n']}", json.dumps(message).encode())


@service.consume("orders", start="beginning")
async def on_order(order: dict) -> None:
    await service.store().write(f"order-{order['id']}", json.dumps(order).encode())


@service.consume("poison", start="beginning", retry_limit=2)
async def on_poison(event: dict) -> None:
    raise RuntimeError(f"cannot handle {event}")

"""


def ok(*args: str, timeout: float = 30) -> str:
    done = micro(*args, timeout=timeout)
    assert done.returncode == 0, f"micro {' '.join(args)} exited {done.returncode}: {done.stderr}"
    return done.stdout


def stored(key: str) -> dict[str, Any] | None:
    found = micro("store", "read", key, "--table", "recorder", "--output", "json")
    return json.loads(json.loads(found.stdout)[0]["value"]) if found.returncode == 0 else None


def read(topic: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in ok("events", "read", topic, "--limit", "10000").splitlines()]


@pytest.fixture
def recorder(home: Path, tmp_path: Path) -> Path:
    """A service from ``micro new`` whose subscribers record what they receive in the store."""
    folder = new_service(tmp_path, "recorder")
    replace_in(folder / "main.py", '\nif __name__ == "__main__":', RECORDER + '\nif __name__ == "__main__":')
    ok("run", str(folder), "--no-watch", timeout=60)
    return folder


def test_a_service_receives_messages_and_events_published_from_the_cli(recorder: Path) -> None:
    ok("events", "publish", "orders", json.dumps({"id": 1, "item": "tea"}))
    ok("events", "publish", "orders", json.dumps({"id": 2, "item": "cake"}), "--metadata", "source=e2e")
    ok("events", "publish", "poison", json.dumps({"id": "bad"}))

    # A broker message reaches only subscribers already listening: publish until one arrives.
    sent: list[int] = []

    def ping_recorded() -> bool:
        sent.append(len(sent) + 1)
        ok("broker", "publish", "pings", json.dumps({"n": sent[-1]}))
        time.sleep(0.1)
        return any(stored(f"ping-{n}") == {"n": n} for n in sent[-2:])

    wait_until(ping_recorded, timeout=30)
    wait_until(lambda: stored("order-2") is not None, timeout=20)
    assert stored("order-1") == {"id": 1, "item": "tea"}
    assert stored("order-2") == {"id": 2, "item": "cake"}

    wait_until(lambda: bool(read("poison.dead")), timeout=20)
    [letter] = read("poison.dead")
    assert letter["payload"] == {"id": "bad"}
    assert letter["metadata"]["original-topic"] == "poison"
    assert letter["metadata"]["original-sequence"] == "1"
    logs = ok("logs", "recorder", "-n", "200")
    assert "cannot handle" in logs

    [entry] = json.loads(ok("get", "service", "recorder", "--output", "json"))
    subscribers = {e["metadata"]["topic"] for e in entry["endpoints"] if e["metadata"].get("subscriber")}
    assert subscribers == {"pings", "orders", "poison"}
    topics = {t["name"]: t for t in json.loads(ok("events", "topics", "--output", "json"))}
    assert topics["orders"]["groups"] == {"recorder": 0}


PUBLISHER = """
import asyncio, sys
from micro.client import Client
from micro.events import EventsClient
from micro.transport import GrpcTransport

async def publisher(events, counter):
    while True:
        n = next(counter)
        _, seq = await events.publish("burst", {"n": n})
        print(n, seq, flush=True)

async def main(address):
    import itertools
    client = Client(GrpcTransport(address), timeout=5)
    counter = itertools.count()
    try:
        await asyncio.gather(*(publisher(EventsClient(client), counter) for _ in range(8)))
    except Exception as exc:
        print("stopped:", type(exc).__name__, exc, file=sys.stderr, flush=True)

asyncio.run(main(sys.argv[1]))
"""

CONSUMER = """
import asyncio, sys
from micro.client import Client
from micro.events import EventsClient
from micro.transport import GrpcTransport

async def main(address, start, quiet):
    client = Client(GrpcTransport(address), timeout=5)
    consumer = EventsClient(client).consume("burst", group="audit", start=start)  # acked on delivery
    try:
        while True:
            event = await asyncio.wait_for(anext(consumer), quiet)
            print(event.sequence, event.attempt, flush=True)
    except Exception as exc:
        print("stopped:", type(exc).__name__, exc, file=sys.stderr, flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
"""


def spawn(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(process: subprocess.Popen[str]) -> tuple[str, str]:
    """The rest of its output once ``process`` exits (not ``communicate``: it would skip what
    ``readline`` buffered already)."""
    process.wait(timeout=20)
    assert process.stdout is not None and process.stderr is not None
    with process.stdout, process.stderr:
        return process.stdout.read(), process.stderr.read()


def test_a_daemon_killed_mid_burst_loses_no_acknowledged_publish(home: Path) -> None:
    ok("events", "topics")  # starts the daemon
    [daemon] = daemons(home)
    address = state(home)["address"]
    consumer = spawn(CONSUMER, address, "beginning", "60")
    publisher = spawn(PUBLISHER, address)
    published: list[tuple[int, int]] = []
    consumed: list[int] = []
    try:
        assert publisher.stdout is not None and consumer.stdout is not None
        while len(published) < 300:
            line = publisher.stdout.readline()
            assert line, f"the publisher stopped: {publisher.stderr.read() if publisher.stderr else ''}"
            n, seq = line.split()
            published.append((int(n), int(seq)))
        while len(consumed) < 50:
            line = consumer.stdout.readline()
            assert line, f"the consumer stopped: {consumer.stderr.read() if consumer.stderr else ''}"
            consumed.append(int(line.split()[0]))
        os.kill(daemon, signal.SIGKILL)
        wait_until(lambda: not alive(daemon), timeout=10)
        rest, errors = finish(publisher)
        published += [(int(n), int(seq)) for n, seq in (line.split() for line in rest.splitlines())]
        assert "stopped:" in errors
        more, errors = finish(consumer)
        consumed += [int(line.split()[0]) for line in more.splitlines()]
        assert "stopped:" in errors
    finally:
        for process in (publisher, consumer):
            if process.poll() is None:
                process.kill()
                process.communicate()

    events = read("burst")  # starts the daemon again
    assert [d for d in daemons(home) if d != daemon]
    by_sequence = {event["sequence"]: event["payload"]["n"] for event in events}
    missing = [(n, seq) for n, seq in published if by_sequence.get(seq) != n]
    assert not missing, f"{len(missing)} acknowledged publishes lost, e.g. {missing[:5]}"
    assert sorted(by_sequence) == list(range(1, len(by_sequence) + 1))
    assert len(set(consumed)) == len(consumed) and set(consumed) <= set(by_sequence)

    ok("events", "publish", "burst", json.dumps({"n": "after"}))
    again = spawn(CONSUMER, state(home)["address"], "group", "1.5")
    out, _ = again.communicate(timeout=30)
    redelivered = [int(line.split()[0]) for line in out.splitlines()]
    assert not set(redelivered) & set(consumed), "the auto-ack group got events it had acked again"
    assert redelivered and redelivered[-1] == len(by_sequence) + 1  # the group resumed and is live
