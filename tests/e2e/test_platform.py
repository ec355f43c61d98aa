"""The platform profile with real processes: two daemons (two machines) sharing PostgreSQL and NATS.

Each test has its own PostgreSQL schema and NATS prefix, dropped at the end. PostgreSQL
(127.0.0.1:5432) and NATS with JetStream (127.0.0.1:4222) must answer: the tests fail, never skip,
without them.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from micro.store import StoreClient
from tests.e2e._support import (
    PLATFORM_TTL,
    Platform,
    alive,
    drop_platform,
    micro,
    new_service,
    ok,
    require_platform_engines,
    wait_until,
)

pytestmark = pytest.mark.slow

TTL = PLATFORM_TTL  # seconds a node stays registered without a heartbeat, for the daemons and their services
PASSWORD = "s3cr3t-pw"  # trust authentication ignores it; the banner must not show it
BURST = 40  # events published at once to a consumer group of two members, one per daemon


@pytest.fixture
def platform(home: Path, tmp_path: Path) -> Iterator[Platform]:
    """A platform of this test's own (the CLI keeps its environments in the ``home`` fixture's MICRO_HOME)."""
    require_platform_engines()
    running = Platform(tmp_path / "daemons", password=PASSWORD)
    running.root.mkdir()
    try:
        yield running
    finally:
        try:
            running.close()
        finally:
            drop_platform(running.tag)


def nodes(env: str, name: str) -> list[dict[str, Any]]:
    """The nodes of service ``name`` as daemon ``env`` sees them in the registry (none if not found)."""
    found = micro("--env", env, "get", "service", name, "--output", "json")
    if found.returncode == 4:
        return []
    assert found.returncode == 0, found.stderr
    return [node for version in json.loads(found.stdout) for node in version["nodes"]]


def status(env: str) -> list[dict[str, Any]]:
    return list(json.loads(ok("--env", env, "status", "--output", "json")))


def run_helloworld(tmp_path: Path, env: str) -> None:
    """``micro --env ENV run ./helloworld`` (remote: the folder is uploaded), until it runs."""
    folder = new_service(tmp_path / "src")
    done = subprocess.run(
        [sys.executable, "-m", "micro_cli", "--env", env, "run", "./helloworld"],
        cwd=folder.parent,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr
    wait_until(lambda: [s["status"] for s in status(env)] == ["running"], timeout=60)


def call(env: str, who: str) -> subprocess.CompletedProcess[str]:
    return micro("--env", env, "call", "helloworld", "Helloworld.Call", json.dumps({"name": who}))


def test_two_daemons_share_services_store_config_and_events(platform: Platform, tmp_path: Path) -> None:
    a = platform.start("a")
    b = platform.start("b")

    # The banner names each engine, without the password.
    for daemon in (a, b):
        banner = daemon.banner()
        assert f"store postgres://postgres@127.0.0.1:5432/postgres?schema={platform.tag}" in banner
        for block in ("events", "broker", "registry"):
            assert f"{block} nats://127.0.0.1:4222?prefix={platform.tag}" in banner
        assert PASSWORD not in banner
        assert "MICRO_CONFIG_SECRET_KEY is not set" not in banner  # the key is shared

    # A service run through A is listed and callable through B; B does not run it.
    run_helloworld(tmp_path, "a")
    assert "helloworld" in ok("--env", "b", "services").split()
    assert json.loads(call("b", "Bob").stdout or "{}") == {"msg": "Hello Bob"}
    [node] = nodes("b", "helloworld")
    assert status("b") == []

    # A value written through A is read through B; config and secrets too (one key for both).
    ok("--env", "a", "store", "write", "greeting", "hello from a")
    assert ok("--env", "b", "store", "read", "greeting").strip() == "hello from a"

    # A token signed by A is valid on B: the platform has one signing key.
    async def read_through_b_as_a() -> bytes:
        client = a.client(address=b.address)
        try:
            [record] = await StoreClient(client).read("greeting")
            return bytes(record.value)
        finally:
            await client.close()

    assert asyncio.run(read_through_b_as_a()) == b"hello from a"
    ok("--env", "a", "config", "set", "app.colour", '"teal"')
    assert ok("--env", "b", "config", "get", "app.colour").strip() == "teal"
    ok("--env", "a", "config", "set", "db.password", "hunter2", "--secret")
    assert ok("--env", "b", "config", "get", "db.password", "--secret").strip() == "hunter2"

    # An event published through A is consumed through B.
    ok("--env", "a", "events", "publish", "orders", json.dumps({"id": 7}))
    [event] = [
        json.loads(line)
        for line in ok(
            "--env", "b", "events", "consume", "orders", "--from-beginning", "--limit", "1"
        ).splitlines()
    ]
    assert (event["topic"], event["payload"]) == ("orders", {"id": 7})

    # The runtime records share the store, but a restarted B brings back only its own services.
    b.process.send_signal(signal.SIGTERM)
    assert b.process.wait(timeout=15) == 0
    platform.start("b")
    assert status("b") == []
    assert [n["id"] for n in nodes("b", "helloworld")] == [node["id"]]
    assert [s["name"] for s in status("a")] == ["helloworld"]


def test_a_consumer_group_spread_over_both_daemons_shares_the_load(
    platform: Platform, tmp_path: Path
) -> None:
    a = platform.start("a")
    platform.start("b")
    topic, group = "jobs", "workers"
    published: list[int] = []

    async def publish(count: int) -> None:
        from micro.events import EventsClient

        client = a.client()  # daemon a's local owner
        try:
            for _ in range(count):
                published.append(len(published))
                await EventsClient(client).publish(topic, {"n": published[-1]})
        finally:
            await client.close()

    outputs = {env: tmp_path / f"consumer-{env}.jsonl" for env in ("a", "b")}
    consumers: dict[str, subprocess.Popen[bytes]] = {}

    def consume(env: str, *options: str) -> None:
        with outputs[env].open("wb") as out:
            consumers[env] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "micro_cli",
                    "--env",
                    env,
                    "events",
                    "consume",
                    topic,
                    "--group",
                    group,
                    *options,
                ],
                stdout=out,
                stderr=subprocess.PIPE,
            )

    def received(env: str) -> list[int]:
        lines = outputs[env].read_text().splitlines()
        return [json.loads(line)["payload"]["n"] for line in lines if line.endswith("}")]

    try:
        # The group starts at the beginning through A; then a member joins it through B.
        asyncio.run(publish(1))
        consume("a", "--from-beginning")
        wait_until(lambda: received("a") == [0], timeout=20)
        consume("b")

        def both_serve() -> bool:  # B's member takes part once it has joined: publish until it has
            asyncio.run(publish(1))
            time.sleep(0.1)
            return bool(received("b"))

        wait_until(both_serve, timeout=20)
        asyncio.run(publish(BURST))
        wait_until(lambda: len(received("a")) + len(received("b")) >= len(published), timeout=20)
        time.sleep(0.5)  # a duplicate would arrive now
    finally:
        for consumer in consumers.values():
            consumer.send_signal(signal.SIGINT)
        for consumer in consumers.values():
            _, err = consumer.communicate(timeout=15)
            assert consumer.returncode == 0, err.decode()

    got_a, got_b = received("a"), received("b")
    assert sorted(got_a + got_b) == published  # every event once, no duplicates
    burst = set(published[-BURST:])
    for got in (got_a, got_b):  # both members take a fair share (about half here) of the burst
        assert len(burst.intersection(got)) >= BURST // 5, (got_a, got_b)


def test_when_a_daemon_dies_the_other_serves_on_and_its_services_leave_the_registry(
    platform: Platform, tmp_path: Path
) -> None:
    a = platform.start("a")
    platform.start("b")
    run_helloworld(tmp_path, "a")
    ok("--env", "a", "store", "write", "before", "written through a")
    ok("--env", "a", "config", "set", "feature", '{"on": true}')
    ok("--env", "a", "events", "publish", "audit", json.dumps({"who": "a"}))
    [service] = nodes("b", "helloworld")
    assert len(nodes("b", "store")) == 2  # each daemon serves the building blocks
    helloworld_pid = int(service["metadata"]["pid"])

    a.process.kill()
    a.process.wait(timeout=10)
    killed = time.monotonic()

    # B serves on everything that did not live on A.
    assert ok("--env", "b", "store", "read", "before").strip() == "written through a"
    ok("--env", "b", "store", "write", "after", "written through b")
    assert ok("--env", "b", "store", "read", "after").strip() == "written through b"
    assert json.loads(ok("--env", "b", "config", "get", "feature")) == {"on": True}
    ok("--env", "b", "events", "publish", "audit", json.dumps({"who": "b"}))
    events = ok("--env", "b", "events", "consume", "audit", "--from-beginning", "--limit", "2").splitlines()
    assert [json.loads(line)["payload"] for line in events] == [{"who": "a"}, {"who": "b"}]

    # A's nodes (its service's and its building blocks') lapse within the TTL.
    wait_until(lambda: not nodes("b", "helloworld") and len(nodes("b", "store")) == 1, timeout=TTL + 10)
    assert time.monotonic() - killed < TTL + 5, "A's nodes outlived the TTL by more than the margin"
    assert "helloworld" not in ok("--env", "b", "services").split()
    gone = call("b", "Carol")
    assert gone.returncode == 4, gone.stderr
    wait_until(lambda: not alive(helloworld_pid), timeout=10)  # A's service stopped with A


def test_a_missing_engine_address_stops_start_up_naming_the_variable(platform: Platform) -> None:
    env = platform.environ(platform.root / "missing")
    del env["MICRO_STORE_ADDRESS"]
    done = subprocess.run(
        [sys.executable, "-m", "micro_cli", "server", "--profile", "platform"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 9, done.stderr
    assert "MICRO_STORE_ADDRESS" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("variable", "address", "engine"),
    [
        ("MICRO_STORE_ADDRESS", "postgres://postgres:{password}@127.0.0.1:1/postgres?schema={tag}", "store"),
        ("MICRO_EVENTS_ADDRESS", "nats://127.0.0.1:1?prefix={tag}", "events"),
        ("MICRO_BROKER_ADDRESS", "nats://127.0.0.1:1?prefix={tag}", "broker"),
        ("MICRO_REGISTRY_ADDRESS", "nats://user:{password}@127.0.0.1:1?prefix={tag}", "registry"),
    ],
)
def test_an_unreachable_engine_stops_start_up_naming_it_and_the_address(
    platform: Platform, variable: str, address: str, engine: str
) -> None:
    home = platform.root / "unreachable"
    tried = address.format(password=PASSWORD, tag=platform.tag)
    env = platform.environ(home, **{variable: tried})
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "micro_cli", "server", "--profile", "platform"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 9, done.stderr
    [message] = [line for line in done.stderr.splitlines() if line.startswith("Error: ")]
    assert engine in message.lower(), message
    assert "127.0.0.1:1" in message, message
    assert PASSWORD not in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - began < 30
    assert not (home / "state" / "server.json").exists()
