"""The events client over the batched RPCs: publish_many, and a Consumer fed by ConsumeBatches."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from micro import events as events_module
from micro.client import Client
from micro.errors import BadRequest
from micro.events import EventsClient
from micro.proto import events_pb2
from micro.transport import GrpcTransport
from micro_daemon.app import Daemon

WAIT = 5.0


@pytest.fixture
async def events(daemon: Daemon) -> AsyncIterator[EventsClient]:
    client = Client(GrpcTransport(daemon.address), timeout=WAIT)
    yield EventsClient(client)
    await client.close()


async def take(consumer: Any, count: int) -> list[events_pb2.Event]:
    got: list[events_pb2.Event] = []
    while len(got) < count:
        got.append(await asyncio.wait_for(anext(consumer), WAIT))
    return got


async def lag(events: EventsClient, topic: str, group: str) -> int:
    for t in await events.topics():
        if t.name == topic:
            return next(g.lag for g in t.groups if g.name == group)
    raise AssertionError(f"no topic {topic}")


async def test_publish_many_in_batches_keeps_order(events: EventsClient, monkeypatch: Any) -> None:
    monkeypatch.setattr(events_module, "_PUBLISH_BATCH", 7)  # many calls, one in flight while building
    results = await events.publish_many("orders", (f"o{i}" for i in range(50)))
    assert [seq for _, seq in results] == list(range(1, 51))
    assert len({event_id for event_id, _ in results}) == 50
    stored = await events.read("orders", limit=100)
    assert [e.sequence for e in stored] == list(range(1, 51))
    assert await events.publish_many("orders", []) == []


async def test_publish_many_stops_at_a_bad_batch(events: EventsClient) -> None:
    with pytest.raises(BadRequest):
        await events.publish_many("bad topic", ["x"])


async def test_consumer_yields_one_event_at_a_time(events: EventsClient) -> None:
    await events.publish_many("t", range(1200))
    consumer = events.consume("t", group="g", start="beginning")
    try:
        got = await take(consumer, 1200)
        assert [e.sequence for e in got] == list(range(1, 1201))
    finally:
        await consumer.close()


async def test_manual_acks_go_in_batches_and_nacks_redeliver(events: EventsClient) -> None:
    await events.publish_many("t", range(20))
    consumer = events.consume("t", group="g", start="beginning", auto_ack=False)
    sent: list[Any] = []
    take_acks = consumer._take_acks

    def recording() -> list[events_pb2.ConsumeRequest]:  # the ack requests the consumer sends
        requests = take_acks()
        sent.extend(requests)
        return requests

    consumer._take_acks = recording  # type: ignore[method-assign]
    try:
        got = await take(consumer, 20)
        for event in got[:19]:
            await consumer.ack(event)
        await consumer.nack(got[19])
        [again] = await take(consumer, 1)
        assert (again.sequence, again.attempt) == (20, 2)
        await consumer.ack(again)
        assert sent[0].WhichOneof("request") == "ack_batch"
        assert len(sent[0].ack_batch.acks) == 20  # the acks of one turn of the loop, in one request
    finally:
        await consumer.close()
    assert await lag(events, "t", "g") == 0


async def test_close_sends_pending_acks_and_gives_back_the_rest(events: EventsClient) -> None:
    await events.publish_many("t", range(10))
    consumer = events.consume("t", group="g", start="beginning", auto_ack=False)
    got = await take(consumer, 4)  # the whole batch arrived; only these are acked
    for event in got:
        await consumer.ack(event)
    await consumer.close()
    assert await lag(events, "t", "g") == 6
    again = events.consume("t", group="g", auto_ack=False)
    try:
        rest = await take(again, 6)
        assert [e.sequence for e in rest] == list(range(5, 11))
    finally:
        await again.close()
