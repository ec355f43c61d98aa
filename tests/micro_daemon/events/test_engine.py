from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

from micro.proto import events_pb2
from micro_daemon.events import backend as events_backend
from micro_daemon.events.backend import ConsumeSpec, new_ids
from micro_daemon.events.memory import MemoryEvents


def test_new_ids_are_distinct_uuid4s() -> None:
    ids = new_ids(5000) + new_ids(5000)
    assert len(set(ids)) == 10_000
    for value in ids[:50] + ids[-50:]:
        parsed = uuid.UUID(value)
        assert str(parsed) == value
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122
    assert new_ids(0) == []


def test_ids_made_one_at_a_time_count_up_from_one_base() -> None:
    ids = [new_ids(1)[0] for _ in range(3)]
    assert [int(value.rpartition("-")[2], 16) for value in ids] == [
        int(ids[0].rpartition("-")[2], 16) + i for i in range(3)
    ]
    assert {value[:24] for value in ids} == {ids[0][:24]}
    assert all(uuid.UUID(value).version == 4 for value in ids)


def test_a_forked_process_draws_ids_of_its_own() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, then out without the test runner's exit handlers
        os.write(write, " ".join(new_ids(3)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as pipe:
        theirs = pipe.read().split()
    ours = new_ids(3)
    assert len(theirs) == 3
    assert not set(theirs) & set(ours)
    assert {value[:24] for value in theirs}.isdisjoint(value[:24] for value in ours)  # another base


def test_ids_go_on_from_a_new_base_when_the_count_runs_out(monkeypatch: Any) -> None:
    monkeypatch.setattr(events_backend, "_next_id", events_backend._LOW48 - 1)
    ids = new_ids(4)
    assert len(set(ids)) == 4
    assert all(uuid.UUID(value).version == 4 for value in ids)
    assert events_backend._next_id < events_backend._LOW48 // 2 + 4


async def test_a_caught_up_group_gets_new_events_without_reading_the_log(monkeypatch: Any) -> None:
    events = MemoryEvents()
    reads = 0
    fetch = events.log.fetch

    async def counted(*args: Any) -> list[events_pb2.Event]:
        nonlocal reads
        reads += 1
        return await fetch(*args)

    monkeypatch.setattr(events.log, "fetch", counted)
    try:
        delivered: list[events_pb2.Event] = []
        first = await events.consume("ns", "t", ConsumeSpec(group="a"))
        second = await events.consume("ns", "t", ConsumeSpec(group="b", auto_ack=False))
        for n in range(3):
            await events.publish("ns", "t", b"%d" % n, {"k": "v"})
            got = [await asyncio.wait_for(anext(consumer), 5) for consumer in (first, second)]
            assert [(e.sequence, e.payload, dict(e.metadata), e.attempt) for e in got] == [
                (n + 1, b"%d" % n, {"k": "v"}, 1)
            ] * 2
            assert got[0] is not got[1]
            delivered.append(got[0])
            await second.ack(got[1].id)
        assert reads == 0
        stored = await events.read("ns", "t")
        assert [(e.id, e.timestamp) for e in delivered] == [(e.id, e.timestamp) for e in stored]
        await first.close()
        await second.close()
    finally:
        await events.close()
