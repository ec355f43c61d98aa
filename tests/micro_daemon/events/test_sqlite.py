from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from micro.errors import BadRequest, ServiceUnavailable, SetupError
from micro_daemon.events import sqlite as sqlite_events
from micro_daemon.events.backend import ConsumeSpec, PublishItem, Retention, Start
from micro_daemon.events.log import Append
from micro_daemon.events.sqlite import SQLiteEvents, open_sqlite

NS = "ns"


@pytest.fixture
async def events(tmp_path: Path) -> AsyncIterator[SQLiteEvents]:
    events = await SQLiteEvents(tmp_path / "events.db").open()
    yield events
    await events.close()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "new-dir" / "events.db"
    events = await SQLiteEvents(path).open()
    try:
        await events.publish(NS, "t", b"secret")
        assert _mode(path.parent) == 0o700
        for file in path.parent.iterdir():
            assert _mode(file) == 0o600, file
    finally:
        await events.close()


async def test_open_sqlite_picks_the_path(tmp_path: Path) -> None:
    default = await open_sqlite("sqlite", tmp_path)
    explicit = await open_sqlite(f"sqlite://{tmp_path}/other.db", tmp_path)
    try:
        assert default.path == tmp_path / "events.db"
        assert explicit.path == tmp_path / "other.db"
        assert await default.health() == "ok"
    finally:
        await default.close()
        await explicit.close()
    assert await default.health() != "ok"
    with pytest.raises(ServiceUnavailable):
        await default.publish(NS, "t", b"x")


async def _synchronous(events: SQLiteEvents) -> int:
    def read(conn: sqlite3.Connection) -> int:
        return int(conn.execute("PRAGMA synchronous").fetchone()[0])

    return await events.file.write(read)


@pytest.mark.parametrize(
    ("address", "level"),
    [("sqlite", 1), ("sqlite://?synchronous=full", 2), ("sqlite://?synchronous=NORMAL", 1)],
)
async def test_open_sqlite_takes_the_synchronous_mode(tmp_path: Path, address: str, level: int) -> None:
    events = await open_sqlite(address, tmp_path)
    try:
        assert events.path == tmp_path / "events.db"
        assert await _synchronous(events) == level  # 1: NORMAL, 2: FULL
    finally:
        await events.close()


@pytest.mark.parametrize("address", ["sqlite://?synchronous=off", "sqlite://?sync=full"])
async def test_open_sqlite_refuses_unknown_options(tmp_path: Path, address: str) -> None:
    with pytest.raises(SetupError, match="synchronous"):
        await open_sqlite(address, tmp_path)


async def test_with_fsyncs_concurrent_publishes_share_commits(tmp_path: Path) -> None:
    events = await SQLiteEvents(tmp_path / "events.db", synchronous="FULL").open()
    try:
        results = await asyncio.gather(*(events.publish(NS, "t", b"%d" % i) for i in range(200)))
        assert sorted(seq for _, seq in results) == list(range(1, 201))
        assert events.file.commits < 100
    finally:
        await events.close()


async def test_replay_reserves_growing_windows(events: SQLiteEvents) -> None:
    await events.publish_many(NS, [PublishItem("t", b"x") for _ in range(2000)])
    before = events.file.commits
    consumer = await events.consume(NS, "t", ConsumeSpec(group="g", start=Start.BEGINNING))
    seqs = [(await anext(consumer)).sequence for _ in range(2000)]
    await consumer.close()
    assert seqs == list(range(1, 2001))
    assert events.file.commits - before <= 16  # the reset, windows of 1, 2, 4 ... 500, the release


async def test_fetching_uses_the_primary_key(events: SQLiteEvents) -> None:
    conn = sqlite3.connect(events.path)
    try:
        sql = "SELECT seq, payload FROM events WHERE namespace = ? AND topic = ? AND seq > ? ORDER BY seq"
        plan = " ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", ("n", "t", 0)))
    finally:
        conn.close()
    assert "USING INDEX sqlite_autoindex_events_1 (namespace=? AND topic=? AND seq>?)" in plan
    assert "TEMP B-TREE" not in plan


async def test_retention_overrides_and_large_trims(tmp_path: Path) -> None:
    overrides = {"keep": Retention(max_age_s=None), "short": Retention(max_count=1)}
    events = await SQLiteEvents(tmp_path / "e.db", retention_overrides=overrides).open()
    try:
        for topic in ["keep", "short", "other"]:
            await events.publish_many(NS, [PublishItem(topic, b"x") for _ in range(3)])
        await events.publish_many(NS, [PublishItem("bulk", b"x") for _ in range(12_000)])
        assert await events.apply_retention() == 2
        assert await events.apply_retention(time.time_ns() + 8 * 86400 * 10**9) == 3 + 1 + 12_000
        counts = {t.name: t.count for t in await events.topics(NS)}
        assert counts == {"bulk": 0, "keep": 3, "other": 0, "short": 0}
    finally:
        await events.close()


async def test_pending_events_removed_by_retention_are_skipped(tmp_path: Path) -> None:
    events = await SQLiteEvents(tmp_path / "e.db").open()
    consumer = await events.consume(NS, "t", ConsumeSpec(group="g", auto_ack=False, ack_wait=30))
    await events.publish_many(NS, [PublishItem("t", b"%d" % i) for i in range(2)])
    await anext(consumer)
    await anext(consumer)
    await events.close()
    events = await SQLiteEvents(tmp_path / "e.db").open()
    try:
        assert await events.apply_retention(time.time_ns() + 8 * 86400 * 10**9) == 2
        await events.publish(NS, "t", b"new")
        consumer = await events.consume(NS, "t", ConsumeSpec(group="g", auto_ack=False, ack_wait=30))
        event = await asyncio.wait_for(anext(consumer), 5)
        assert (event.sequence, event.payload) == (3, b"new")
        await consumer.ack(event.id)
        [topic] = await events.topics(NS)
        assert [(g.name, g.lag) for g in topic.groups] == [("g", 0)]
    finally:
        await events.close()


CHILD = """
import asyncio, pathlib, sys
from micro_daemon.events.backend import ConsumeSpec
from micro_daemon.events.sqlite import SQLiteEvents

async def publisher(events):
    while True:
        _, seq = await events.publish("ns", "t", b"x" * 100)
        sys.stdout.write(f"P {seq}\\n")
        sys.stdout.flush()
        await asyncio.sleep(0.001)  # a burst the consumer keeps up with, not millions of events

async def consumer(group):
    async with group:
        async for event in group:
            sys.stdout.write(f"C {event.sequence}\\n")
            sys.stdout.flush()
            await asyncio.sleep(0.001)

async def main():
    events = await SQLiteEvents(pathlib.Path(sys.argv[1])).open()
    group = await events.consume("ns", "t", ConsumeSpec(group="g"))
    await asyncio.gather(consumer(group), *(publisher(events) for _ in range(4)))

asyncio.run(main())
"""


def _kill_mid_burst(path: Path, published: int, consumed: int) -> tuple[set[int], list[int]]:
    """Run the child, SIGKILL it once enough was published and consumed; return what it printed."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    lines: list[str] = []
    counts = {"P": 0, "C": 0}
    while counts["P"] < published or counts["C"] < consumed:
        line = child.stdout.readline()
        assert line, child.communicate(timeout=30)[1]
        lines.append(line)
        counts[line[0]] += 1
    os.kill(child.pid, signal.SIGKILL)
    rest, err = child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL, err
    lines += rest.splitlines(keepends=True)
    complete = [line.split() for line in lines if line.endswith("\n")]
    return {int(n) for kind, n in complete if kind == "P"}, [int(n) for kind, n in complete if kind == "C"]


async def test_acknowledged_publishes_and_auto_acks_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    published, consumed = await asyncio.to_thread(_kill_mid_burst, path, 400, 100)
    assert consumed == list(range(1, len(consumed) + 1))
    events = await SQLiteEvents(path).open()
    try:
        stored: set[int] = set()
        while page := await events.read(NS, "t", limit=10_000, offset=len(stored)):
            stored |= {event.sequence for event in page}
        assert published <= stored
        consumer = await events.consume(NS, "t", ConsumeSpec(group="g"))
        redelivered: list[int] = []
        last = max(stored)
        while not redelivered or redelivered[-1] < last:
            redelivered.append((await asyncio.wait_for(anext(consumer), 5)).sequence)
        await consumer.close()
    finally:
        await events.close()
    assert not set(redelivered) & set(consumed)
    assert redelivered == sorted(redelivered) and redelivered[0] > consumed[-1]


@pytest.mark.slow
async def test_replay_throughput(tmp_path: Path) -> None:
    events = await SQLiteEvents(tmp_path / "events.db").open()
    try:
        started = time.perf_counter()
        for _ in range(100):
            await events.publish_many(NS, [PublishItem("t", b"x" * 100, {"k": "v"}) for _ in range(1000)])
        published = time.perf_counter() - started
        consumer = await events.consume(NS, "t", ConsumeSpec(group="g", start=Start.BEGINNING))
        started = time.perf_counter()
        count = 0
        async for _ in consumer:
            count += 1
            if count == 100_000:
                break
        replayed = time.perf_counter() - started
        await consumer.close()
    finally:
        await events.close()
    print(f"\npublish_many: {100_000 / published:,.0f} events/s; replay: {100_000 / replayed:,.0f} events/s")


async def test_a_rolled_back_append_leaves_no_gap(events: SQLiteEvents) -> None:
    assert (await events.publish(NS, "t", b"1"))[1] == 1
    log = events._sqlite_log

    def append_then_fail(conn: sqlite3.Connection) -> None:
        sqlite_events._commit(conn, NS, [Append("t", "x", b"2", {}, 0)], [], log._known)
        raise BadRequest("refused after the append", id="events")

    for write in (events.file.write, lambda apply: _now(events, apply)):
        with pytest.raises(BadRequest):
            await write(append_then_fail)
    assert [(await events.publish(NS, "t", b"3"))[1], (await events.publish(NS, "t", b"4"))[1]] == [2, 3]
    assert [e.sequence for e in await events.read(NS, "t")] == [1, 2, 3]


async def _now(events: SQLiteEvents, apply: Any) -> None:
    while events.file.write_now(apply) is None:  # the writer thread may not have let go yet
        await asyncio.sleep(0.001)
