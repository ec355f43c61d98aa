"""PublishBatch and ConsumeBatches, over a real grpc.aio server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest

from micro._binding import bind
from micro._dispatch import Dispatcher
from micro._grpc_errors import error_from_rpc
from micro.errors import BadRequest
from micro.proto import events_pb2
from micro_daemon.events import service
from micro_daemon.events.memory import MemoryEvents
from micro_daemon.events.service import EventsStoreHandler, StreamHandler

TIMEOUT = 5.0
METADATA = (("micro-namespace", "alice"),)
STREAM = "/micro.events.v1.Stream/"


class Server:
    """A grpc.aio server of the events handlers, and typed calls to it."""

    def __init__(self, backend: MemoryEvents, channel: grpc.aio.Channel) -> None:
        self.backend = backend
        self.publish_batch = channel.unary_unary(
            STREAM + "PublishBatch",
            request_serializer=events_pb2.PublishBatchRequest.SerializeToString,
            response_deserializer=events_pb2.PublishBatchResponse.FromString,
        )
        self.consume_batches = channel.stream_stream(
            STREAM + "ConsumeBatches",
            request_serializer=events_pb2.ConsumeRequest.SerializeToString,
            response_deserializer=events_pb2.EventBatch.FromString,
        )

    async def publish(self, topic: str, *payloads: bytes) -> list[int]:
        request = events_pb2.PublishBatchRequest(
            events=[events_pb2.PublishRequest(topic=topic, payload=p) for p in payloads]
        )
        response = await self.publish_batch(request, metadata=METADATA)
        return [r.sequence for r in response.results]

    def consume(self, **options: Any) -> Any:
        call = self.consume_batches(metadata=METADATA)
        call.write_options = events_pb2.ConsumeRequest(options=events_pb2.ConsumeOptions(**options))
        return call


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    backend = MemoryEvents()
    dispatcher = Dispatcher()
    dispatcher.add(
        "events",
        bind(StreamHandler(backend), events_pb2.DESCRIPTOR.services_by_name["Stream"])
        + bind(EventsStoreHandler(backend), events_pb2.DESCRIPTOR.services_by_name["Store"]),
    )
    grpc_server = grpc.aio.server()
    grpc_server.add_generic_rpc_handlers((dispatcher,))
    address = f"127.0.0.1:{grpc_server.add_insecure_port('127.0.0.1:0')}"
    await grpc_server.start()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            yield Server(backend, channel)
    finally:
        await grpc_server.stop(None)
        await backend.close()


async def open_consumer(server: Server, **options: Any) -> Any:
    call = server.consume(**options)
    await call.write(call.write_options)
    return call


async def read_events(call: Any, count: int) -> tuple[list[events_pb2.Event], int]:
    """``count`` events and how many messages brought them."""
    events: list[events_pb2.Event] = []
    messages = 0
    while len(events) < count:
        batch = await asyncio.wait_for(call.read(), TIMEOUT)
        assert batch.events, "a batch is never empty"
        events += batch.events
        messages += 1
    assert len(events) == count
    return events, messages


def acks(*events: events_pb2.Event, success: bool = True) -> events_pb2.ConsumeRequest:
    return events_pb2.ConsumeRequest(
        ack_batch=events_pb2.AckBatch(acks=[events_pb2.Ack(id=e.id, success=success) for e in events])
    )


async def test_publish_batch_answers_in_order_with_sequences(server: Server) -> None:
    assert await server.publish("t", b"a", b"b", b"c") == [1, 2, 3]
    assert await server.publish("t", *(b"%d" % i for i in range(1000))) == list(range(4, 1004))
    assert await server.publish("t") == []
    stored = await server.backend.read("alice", "t", limit=5)
    assert [e.payload for e in stored] == [b"a", b"b", b"c", b"0", b"1"]


async def test_publish_batch_is_all_or_nothing(server: Server) -> None:
    await server.publish("t", b"first")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await server.publish_batch(
            events_pb2.PublishBatchRequest(
                events=[
                    events_pb2.PublishRequest(topic="t", payload=b"ok"),
                    events_pb2.PublishRequest(topic="bad topic", payload=b"no"),
                ]
            ),
            metadata=METADATA,
        )
    assert isinstance(error_from_rpc(caught.value), BadRequest)
    assert [e.payload for e in await server.backend.read("alice", "t")] == [b"first"]


async def test_consume_batches_sends_stored_events_in_few_messages(server: Server) -> None:
    await server.publish("t", *(b"%d" % i for i in range(2000)))
    call = await open_consumer(server, topic="t", group="g", start=events_pb2.BEGINNING)
    events, messages = await read_events(call, 2000)
    assert [e.sequence for e in events] == list(range(1, 2001))
    assert all(e.attempt == 1 for e in events)
    assert messages <= 20  # at most 500 per message, usually that many
    await server.publish("t", b"live")  # later events come as they are published
    [live] = (await asyncio.wait_for(call.read(), TIMEOUT)).events
    assert (live.payload, live.sequence) == (b"live", 2001)
    call.cancel()


async def test_consume_batches_respects_the_byte_limit(server: Server, monkeypatch: Any) -> None:
    monkeypatch.setattr(service, "CONSUME_BATCH_BYTES", 2500)
    await server.publish("t", *(b"x" * 1000 for _ in range(5)))
    call = await open_consumer(server, topic="t", start=events_pb2.BEGINNING)
    sizes = []
    for _ in range(3):
        sizes.append(len((await asyncio.wait_for(call.read(), TIMEOUT)).events))
    assert sizes == [2, 2, 1]  # none lost at a batch's limit
    call.cancel()


async def test_manual_acks_in_batches_and_redelivery(server: Server) -> None:
    await server.publish("t", *(b"%d" % i for i in range(10)))
    call = await open_consumer(
        server, topic="t", group="g", start=events_pb2.BEGINNING, auto_ack=False, ack_wait=200
    )
    events, _ = await read_events(call, 10)
    await call.write(acks(*events[:8]))  # many acks in one request
    await call.write(acks(events[8], success=False))  # a nack: again at once
    again, _ = await read_events(call, 1)
    assert (again[0].sequence, again[0].attempt) == (9, 2)
    await call.write(events_pb2.ConsumeRequest(ack=events_pb2.Ack(id=again[0].id, success=True)))
    # events[9] is never acked: redelivered after ack_wait
    late, _ = await read_events(call, 1)
    assert (late[0].sequence, late[0].attempt) == (10, 2)
    await call.write(acks(late[0], events[0]))  # an ack of an already acked event is ignored
    await asyncio.sleep(0.1)
    [topic] = await server.backend.topics("alice")
    assert [(g.name, g.lag) for g in topic.groups] == [("g", 0)]
    call.cancel()


async def test_unacked_events_of_a_closed_stream_go_to_another_consumer(server: Server) -> None:
    await server.publish("t", *(b"%d" % i for i in range(5)))
    first = await open_consumer(server, topic="t", group="g", start=events_pb2.BEGINNING, auto_ack=False)
    events, _ = await read_events(first, 5)
    await first.write(acks(*events[:2]))
    await asyncio.sleep(0.1)
    first.cancel()
    second = await open_consumer(server, topic="t", group="g", auto_ack=False)
    again, _ = await read_events(second, 3)
    assert [(e.sequence, e.attempt) for e in again] == [(3, 2), (4, 2), (5, 2)]
    second.cancel()


async def test_dead_letters_unchanged(server: Server) -> None:
    await server.publish("t", b"poison")
    call = await open_consumer(
        server, topic="t", group="g", start=events_pb2.BEGINNING, auto_ack=False, retry_limit=2
    )
    for attempt in (1, 2):
        [event], _ = await read_events(call, 1)
        assert event.attempt == attempt
        await call.write(acks(event, success=False))
    dead = await open_consumer(server, topic="t.dead", start=events_pb2.BEGINNING)
    [letter], _ = await read_events(dead, 1)
    assert letter.payload == b"poison"
    assert letter.metadata["original-topic"] == "t"
    call.cancel()
    dead.cancel()


async def test_consume_batches_rejects_bad_requests(server: Server) -> None:
    call = server.consume()
    await call.write(acks())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(call.read(), TIMEOUT)
    assert "first request of ConsumeBatches" in str(error_from_rpc(caught.value))
    call = await open_consumer(server, topic="t")
    await call.write(events_pb2.ConsumeRequest(options=events_pb2.ConsumeOptions(topic="t")))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(call.read(), TIMEOUT)
    assert isinstance(error_from_rpc(caught.value), BadRequest)
