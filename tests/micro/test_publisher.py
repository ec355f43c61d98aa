"""Single publishes over the client's long-lived PublishStream, and the fallback to unary calls."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from micro import _publisher
from micro._publisher import _event_field
from micro.client import Client
from micro.context import Context, _current
from micro.errors import BadRequest, PayloadTooLarge, ServiceUnavailable, Timeout
from micro.events import EventsClient
from micro.proto import events_pb2
from micro.transport import Metadata, MockTransport
from micro_daemon.app import Daemon
from micro_daemon.events.backend import MAX_EVENT_BYTES

WAIT = 5.0


async def test_publishes_share_one_stream_and_keep_order(client: Client) -> None:
    events = EventsClient(client)
    assert [seq for _, seq in [await events.publish("t", i) for i in range(3)]] == [1, 2, 3]
    stream = _publisher.publisher(client)._stream
    assert stream is not None
    results = await asyncio.gather(*(EventsClient(client).publish("t", i) for i in range(50)))
    assert sorted(seq for _, seq in results) == list(range(4, 54))
    assert _publisher.publisher(client)._stream is stream
    assert not stream.deadlines  # answered publishes keep nothing for the stream's timer
    stored = await events.read("t", limit=100)
    assert [e.sequence for e in stored] == list(range(1, 54))
    assert len({e.id for e in stored} | {event_id for event_id, _ in results}) == 53


async def test_a_refused_publish_fails_alone(client: Client) -> None:
    events = EventsClient(client)
    outcomes = await asyncio.gather(
        events.publish("t", "a"),
        events.publish("bad topic", "b"),
        events.publish("t", b"x" * (MAX_EVENT_BYTES + 1)),
        events.publish("t", "c"),
        return_exceptions=True,
    )
    assert isinstance(outcomes[1], BadRequest) and outcomes[1].id == "events"
    assert isinstance(outcomes[2], PayloadTooLarge)
    assert [seq for _, seq in (outcomes[0], outcomes[3])] == [1, 2]  # type: ignore[misc]
    assert (await events.publish("t", "d"))[1] == 3


async def test_an_idle_stream_closes_and_the_next_publish_opens_another(
    client: Client, monkeypatch: Any
) -> None:
    monkeypatch.setattr(_publisher, "IDLE", 0.05)
    events = EventsClient(client)
    await events.publish("t", 1)
    first = _publisher.publisher(client)._stream
    assert first is not None
    await asyncio.sleep(0.2)
    assert first.closing and first.reader.done()
    assert (await events.publish("t", 2))[1] == 2
    assert _publisher.publisher(client)._stream is not first


async def test_a_stopped_daemon_fails_the_waiting_publishes(daemon: Daemon, client: Client) -> None:
    events = EventsClient(client)
    await events.publish("t", 1)
    await daemon.stop(grace=0)
    with pytest.raises(ServiceUnavailable):
        await events.publish("t", 2)


async def test_without_a_stream_publish_calls_publish() -> None:
    calls: list[str] = []

    async def handler(path: str, request: bytes, metadata: Metadata) -> bytes:
        calls.append(path)
        return events_pb2.PublishResponse(id="e1", sequence=7).SerializeToString()

    client = Client(MockTransport(handler), credentials=None)
    assert await EventsClient(client).publish("t", {"a": 1}) == ("e1", 7)
    assert await EventsClient(client).publish("t", {"a": 2}) == ("e1", 7)
    assert calls == ["/micro.events.v1.Stream/Publish"] * 2
    assert not _publisher.publisher(client).supported


async def test_concurrent_publishes_share_messages(daemon: Daemon, client: Client, monkeypatch: Any) -> None:
    backend = daemon._events
    assert backend is not None
    calls = 0
    publish_many = backend.publish_many

    async def counted(namespace: str, items: Any) -> list[tuple[str, int]]:
        nonlocal calls
        calls += 1
        return await publish_many(namespace, items)

    monkeypatch.setattr(backend, "publish_many", counted)
    events = EventsClient(client)
    results = await asyncio.gather(*(events.publish("t", n) for n in range(200)))
    assert sorted(seq for _, seq in results) == list(range(1, 201))
    assert calls < 100


@pytest.mark.parametrize("size", [0, 100, 127, 128, 16_383, 16_384, 3_000_000])
def test_queued_requests_joined_are_the_batch_message(size: int) -> None:
    # The stream sends a batch as its requests' ``events`` entries joined, never building the
    # batch object: the bytes must be what the batch would serialize to, whatever the lengths.
    requests = [
        events_pb2.PublishRequest(topic="t", payload=b"x" * size, metadata={"k": "v"}, timestamp=7),
        events_pb2.PublishRequest(topic="u"),
    ]
    joined = b"".join(_event_field(request) for request in requests)
    assert joined == events_pb2.PublishBatchRequest(events=requests).SerializeToString()
    assert list(events_pb2.PublishBatchRequest.FromString(joined).events) == requests


def hold_publishes(daemon: Daemon, monkeypatch: Any, held: Callable[[bytes], bool]) -> asyncio.Event:
    """Hold the daemon's publishes whose first event's payload ``held`` picks until the event is set."""
    backend = daemon._events
    assert backend is not None
    release = asyncio.Event()
    publish_many = backend.publish_many

    async def holding(namespace: str, items: Any) -> list[tuple[str, int]]:
        if held(items[0].payload):
            await release.wait()
        return await publish_many(namespace, items)

    monkeypatch.setattr(backend, "publish_many", holding)
    return release


async def test_a_publish_left_unanswered_times_out_and_the_stream_goes_on(
    daemon: Daemon, client: Client, monkeypatch: Any
) -> None:
    release = hold_publishes(daemon, monkeypatch, lambda payload: payload == b'"stuck"')
    events = EventsClient(client)
    await events.publish("t", "first")  # the stream is open, its first publish made with 5 s
    client.timeout = 0.2
    started = asyncio.get_running_loop().time()
    with pytest.raises(Timeout):
        await events.publish("t", "stuck")
    assert 0.15 < asyncio.get_running_loop().time() - started < 2  # its own 0.2 s, not the 5 s
    release.set()
    client.timeout = WAIT
    assert (await events.publish("t", "after"))[1] == 3  # the late answer was dropped, in order


async def test_a_serving_calls_shorter_deadline_times_its_publish_out_first(
    daemon: Daemon, client: Client, monkeypatch: Any
) -> None:
    release = hold_publishes(daemon, monkeypatch, lambda payload: True)
    events = EventsClient(client)
    patient = asyncio.ensure_future(events.publish("t", "patient"))  # the client's 5 s
    await asyncio.sleep(0.05)

    async def serving() -> tuple[str, int]:
        _current.set(Context(deadline=time.monotonic() + 0.2))  # as a handler's outgoing call
        return await events.publish("t", "hurried")

    started = time.monotonic()
    with pytest.raises(Timeout):
        await asyncio.ensure_future(serving())
    assert time.monotonic() - started < 2
    assert not patient.done()
    release.set()
    assert (await asyncio.wait_for(patient, WAIT))[1] == 1
