from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from micro._binding import bind
from micro._dispatch import Dispatcher, LocalLane, LocalStream
from micro._grpc_errors import error_from_rpc
from micro.context import Context
from micro.errors import BadRequest
from micro.proto import events_pb2
from micro_daemon.events import service
from micro_daemon.events.backend import MAX_EVENT_BYTES, ConsumeSpec, Start
from micro_daemon.events.memory import MemoryEvents
from micro_daemon.events.service import EventsStoreHandler, StreamHandler, consume_spec
from micro_daemon.events.sqlite import SQLiteEvents

ALICE = Context(namespace="alice")
BOB = Context(namespace="bob")
TIMEOUT = 5.0


@pytest.fixture
async def backend() -> AsyncIterator[MemoryEvents]:
    backend = MemoryEvents()
    yield backend
    await backend.close()


class Requests:
    """A request stream the test feeds while the handler runs."""

    def __init__(self, *first: Any) -> None:
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        for request in first:
            self.queue.put_nowait(request)

    def __aiter__(self) -> Requests:
        return self

    async def __anext__(self) -> Any:
        request = await self.queue.get()
        if request is None:
            raise StopAsyncIteration
        return request


class QueueLane:
    """The ``Lane`` a relay gives ``publish_lane``, over a ``Requests`` queue the test feeds."""

    def __init__(self, requests: Requests) -> None:
        self.queue = requests.queue
        self.arrived: deque[Any] = deque()  # taken off the queue by ``wait``, not by ``take`` yet
        self.answers: asyncio.Queue[events_pb2.PublishResults] = asyncio.Queue()

    def take(self) -> bytes | None:
        if not self.arrived and not self.queue.empty():
            self.arrived.append(self.queue.get_nowait())
        if not self.arrived or self.arrived[0] is None:
            return None
        request = self.arrived.popleft()
        return request if isinstance(request, bytes) else bytes(request.SerializeToString())

    async def wait(self) -> bool:
        if not self.arrived:
            self.arrived.append(await self.queue.get())
        return self.arrived[0] is not None

    def send(self, response: bytes) -> None:
        self.answers.put_nowait(events_pb2.PublishResults.FromString(response))


async def lane_answers(
    handler: StreamHandler, requests: Requests, context: Context
) -> AsyncIterator[events_pb2.PublishResults]:
    """``PublishStream``'s answers as its lane gives them, until the lane returns (or raises)."""
    lane = QueueLane(requests)
    running = asyncio.ensure_future(handler.publish_lane(lane, context))
    while True:
        answer = asyncio.ensure_future(lane.answers.get())
        await asyncio.wait([answer, running], return_when=asyncio.FIRST_COMPLETED)
        if answer.done():
            yield answer.result()
            continue
        answer.cancel()
        while not lane.answers.empty():
            yield lane.answers.get_nowait()
        running.result()
        return


PublishStream = Callable[[StreamHandler, Requests, Context], AsyncIterator[events_pb2.PublishResults]]


def batch_sizes(backend: MemoryEvents, monkeypatch: Any) -> list[int]:
    """The number of events of each ``publish_many`` call to ``backend``, as the calls are made."""
    batches: list[int] = []
    publish_many = backend.publish_many

    async def counted(namespace: str, items: Any) -> list[tuple[str, int]]:
        batches.append(len(items))
        return await publish_many(namespace, items)

    monkeypatch.setattr(backend, "publish_many", counted)
    return batches


@pytest.fixture(params=["iterators", "lane"])
def publish_stream(request: pytest.FixtureRequest) -> PublishStream:
    """``PublishStream`` served as the gRPC server serves it (iterators) or as the relay does (lane)."""
    if request.param == "lane":
        return lane_answers
    return lambda handler, requests, context: handler.PublishStream(requests, context)


def options(**fields: Any) -> events_pb2.ConsumeRequest:
    return events_pb2.ConsumeRequest(options=events_pb2.ConsumeOptions(**fields))


def ack(event_id: str, success: bool = True) -> events_pb2.ConsumeRequest:
    return events_pb2.ConsumeRequest(ack=events_pb2.Ack(id=event_id, success=success))


async def publish(handler: StreamHandler, topic: str, payload: bytes, context: Context = ALICE) -> int:
    response = await handler.Publish(events_pb2.PublishRequest(topic=topic, payload=payload), context)
    return response.sequence


def test_handlers_match_the_protos(backend: MemoryEvents) -> None:
    assert [
        m.name for m in bind(StreamHandler(backend), events_pb2.DESCRIPTOR.services_by_name["Stream"])
    ] == [
        "Publish",
        "PublishStream",
        "Consume",
        "PublishBatch",
        "ConsumeBatches",
        "Topics",
    ]
    assert [
        m.name for m in bind(EventsStoreHandler(backend), events_pb2.DESCRIPTOR.services_by_name["Store"])
    ] == ["Read"]


def test_consume_spec_applies_micro_defaults() -> None:
    assert consume_spec(events_pb2.ConsumeOptions(topic="t")) == ConsumeSpec()
    spec = consume_spec(
        events_pb2.ConsumeOptions(
            group="g", start=events_pb2.TIME, since=5, auto_ack=False, ack_wait=250, retry_limit=-1
        )
    )
    assert spec == ConsumeSpec(
        group="g", start=Start.TIME, since_ns=5, auto_ack=False, ack_wait=0.25, retry_limit=-1
    )
    with pytest.raises(BadRequest):
        consume_spec(events_pb2.ConsumeOptions(ack_wait=-1))
    with pytest.raises(BadRequest):
        consume_spec(events_pb2.ConsumeOptions(start=9))  # type: ignore[arg-type]


async def test_publish_read_and_topics_are_per_namespace(backend: MemoryEvents) -> None:
    stream, store = StreamHandler(backend), EventsStoreHandler(backend)
    assert [await publish(stream, "t", b"%d" % i) for i in range(3)] == [1, 2, 3]
    assert await publish(stream, "t", b"other", BOB) == 1
    read = await store.Read(events_pb2.ReadRequest(topic="t", limit=2, offset=1), ALICE)
    assert [e.payload for e in read.events] == [b"1", b"2"]
    assert len((await store.Read(events_pb2.ReadRequest(topic="t"), ALICE)).events) == 3
    topics = await stream.Topics(events_pb2.TopicsRequest(), BOB)
    assert [(t.name, t.count) for t in topics.topics] == [("t", 1)]


async def test_read_stops_before_a_too_large_response(backend: MemoryEvents, monkeypatch: Any) -> None:
    monkeypatch.setattr(service, "READ_RESPONSE_BYTES", 2500)
    stream, store = StreamHandler(backend), EventsStoreHandler(backend)
    for _ in range(5):
        await publish(stream, "t", b"x" * 1000)
    read = await store.Read(events_pb2.ReadRequest(topic="t"), ALICE)
    assert [e.sequence for e in read.events] == [1, 2]
    await publish(stream, "big", b"x" * (MAX_EVENT_BYTES - 100))
    assert len((await store.Read(events_pb2.ReadRequest(topic="big"), ALICE)).events) == 1


def message(*events: events_pb2.PublishRequest) -> events_pb2.PublishBatchRequest:
    return events_pb2.PublishBatchRequest(events=events)


async def test_publish_stream_answers_each_event_in_order_and_goes_on_after_a_bad_one(
    backend: MemoryEvents, publish_stream: PublishStream
) -> None:
    requests = Requests(message(events_pb2.PublishRequest(topic="t", payload=b"0")))
    requests.queue.put_nowait(
        message(
            events_pb2.PublishRequest(topic="t", payload=b"1"),
            events_pb2.PublishRequest(topic="bad topic"),
            events_pb2.PublishRequest(topic="t", payload=b"x" * (MAX_EVENT_BYTES + 1)),
        )
    )
    requests.queue.put_nowait(message())
    requests.queue.put_nowait(message(events_pb2.PublishRequest(topic="t", payload=b"2")))
    requests.queue.put_nowait(None)
    answers = [list(r.results) async for r in publish_stream(StreamHandler(backend), requests, ALICE)]
    assert [[(r.sequence, r.error.code, r.error.id) for r in answer] for answer in answers] == [
        [(1, 0, "")],
        [(2, 0, ""), (0, 400, "events"), (0, 413, "events")],
        [],
        [(3, 0, "")],
    ]
    bad = answers[1][1]
    assert "bad topic" in bad.error.detail and bad.error.status == "Bad Request"
    assert all(r.id for answer in answers for r in answer if not r.HasField("error"))
    assert [e.payload for e in await backend.read("alice", "t")] == [b"0", b"1", b"2"]


async def test_publish_stream_batches_what_has_arrived(
    backend: MemoryEvents, monkeypatch: Any, publish_stream: PublishStream
) -> None:
    batches = batch_sizes(backend, monkeypatch)
    one = events_pb2.PublishRequest(topic="t", payload=b"x")
    requests = Requests(*(message(one, one) for _ in range(600)), None)
    answers = [list(r.results) async for r in publish_stream(StreamHandler(backend), requests, ALICE)]
    assert [len(answer) for answer in answers] == [2] * 600
    assert [r.sequence for answer in answers for r in answer] == list(range(1, 1201))
    assert max(batches) == service.PUBLISH_BATCH and len(batches) < 10


async def test_publish_stream_sends_a_waited_for_message_alone_and_batches_what_came_meanwhile(
    backend: MemoryEvents, monkeypatch: Any, publish_stream: PublishStream
) -> None:
    batches: list[list[bytes]] = []
    gates: list[asyncio.Event] = []
    publish_many = backend.publish_many

    async def held(namespace: str, items: Any) -> list[tuple[str, int]]:
        batches.append([item.payload for item in items])
        gates.append(asyncio.Event())
        await gates[-1].wait()
        return await publish_many(namespace, items)

    monkeypatch.setattr(backend, "publish_many", held)
    requests = Requests()
    got: list[int] = []

    async def collect() -> None:
        async for answer in publish_stream(StreamHandler(backend), requests, ALICE):
            got.extend(r.sequence for r in answer.results)

    def send(payload: bytes) -> None:
        requests.queue.put_nowait(message(events_pb2.PublishRequest(topic="t", payload=payload)))

    async def published(count: int) -> None:
        for _ in range(1000):
            if len(batches) == count:
                return
            await asyncio.sleep(0.001)
        raise AssertionError(f"{count} publishes expected: {batches}")

    collecting = asyncio.ensure_future(collect())
    await asyncio.sleep(0.01)  # the stream is idle, waiting for a message
    send(b"a")  # waited for: published alone, at once, though a2 came with it
    send(b"a2")
    await published(1)
    send(b"b")  # arrive during a's publish: they go with a2, which was there already
    send(b"c")
    gates[0].set()
    await published(2)
    send(b"d")  # arrive during that publish, while a read waits for them: they go together
    send(b"e")
    gates[1].set()
    await published(3)
    gates[2].set()
    requests.queue.put_nowait(None)
    await asyncio.wait_for(collecting, TIMEOUT)
    if publish_stream is lane_answers:
        # A lane takes what has arrived, without a read to start: a2 came with a, and goes with it.
        assert batches == [[b"a", b"a2"], [b"b", b"c"], [b"d", b"e"]]
    else:
        assert batches == [[b"a"], [b"a2", b"b", b"c"], [b"d", b"e"]]
    assert got == [1, 2, 3, 4, 5, 6]


async def test_publish_stream_answers_a_refused_batch_with_its_error(
    backend: MemoryEvents, publish_stream: PublishStream
) -> None:
    await backend.close()
    requests = Requests(message(events_pb2.PublishRequest(topic="t", payload=b"x")), None)
    [answer] = [r async for r in publish_stream(StreamHandler(backend), requests, ALICE)]
    [result] = answer.results
    assert result.error.code == 503 and not result.sequence


def test_a_server_that_parses_calls_itself_serves_publish_stream_with_its_lane(backend: MemoryEvents) -> None:
    dispatcher = Dispatcher()
    dispatcher.add("events", bind(StreamHandler(backend), events_pb2.DESCRIPTOR.services_by_name["Stream"]))
    assert isinstance(dispatcher.local("/micro.events.v1.Stream/PublishStream", None), LocalLane)
    assert isinstance(dispatcher.local("/micro.events.v1.Stream/Consume", None), LocalStream)


async def test_a_lane_answers_what_came_before_a_message_that_does_not_decode(backend: MemoryEvents) -> None:
    good = message(events_pb2.PublishRequest(topic="t", payload=b"ok"))
    requests = Requests(good, b"\x0f\xff", good)  # not a PublishBatchRequest (wire type 7)
    answers: list[list[int]] = []
    with pytest.raises(BadRequest, match=r"malformed micro\.events\.v1\.PublishBatchRequest"):
        async for answer in lane_answers(StreamHandler(backend), requests, ALICE):
            answers.append([r.sequence for r in answer.results])
    assert answers == [[1]]
    assert [e.payload for e in await backend.read("alice", "t")] == [b"ok"]


async def test_a_lane_keeps_a_message_over_the_batch_limit_for_the_next_batch(
    backend: MemoryEvents, monkeypatch: Any
) -> None:
    batches = batch_sizes(backend, monkeypatch)
    one = events_pb2.PublishRequest(topic="t", payload=b"x")
    limit = service.PUBLISH_BATCH
    requests = Requests(message(*[one] * (limit - 1)), message(one, one), message(*[one] * (limit + 1)), None)
    answers = [len(r.results) async for r in lane_answers(StreamHandler(backend), requests, ALICE)]
    assert answers == [limit - 1, 2, limit + 1]
    assert batches == [limit - 1, 2, limit + 1]  # a message alone may pass the limit: never split


async def test_consume_with_manual_acks(backend: MemoryEvents) -> None:
    stream = StreamHandler(backend)
    requests = Requests(options(topic="t", group="g", start=events_pb2.BEGINNING, auto_ack=False))
    events: Any = stream.Consume(requests, ALICE)
    await publish(stream, "t", b"a")
    await publish(stream, "t", b"b")
    first = await asyncio.wait_for(anext(events), TIMEOUT)
    second = await asyncio.wait_for(anext(events), TIMEOUT)
    requests.queue.put_nowait(ack(second.id))
    requests.queue.put_nowait(ack("unknown-or-late"))
    requests.queue.put_nowait(ack(first.id, success=False))
    again = await asyncio.wait_for(anext(events), TIMEOUT)
    assert (again.sequence, again.attempt) == (1, 2)
    requests.queue.put_nowait(ack(again.id))
    requests.queue.put_nowait(None)  # the client stops sending: events keep coming
    await publish(stream, "t", b"c")
    assert (await asyncio.wait_for(anext(events), TIMEOUT)).payload == b"c"
    await events.aclose()
    [topic] = (await stream.Topics(events_pb2.TopicsRequest(), ALICE)).topics
    assert [(g.name, g.lag) for g in topic.groups] == [("g", 1)]


async def test_consume_rejects_a_stream_without_options(backend: MemoryEvents) -> None:
    with pytest.raises(BadRequest, match="first request"):
        await anext(StreamHandler(backend).Consume(Requests(ack("x")), ALICE))
    with pytest.raises(BadRequest, match="first request"):
        await anext(StreamHandler(backend).Consume(Requests(None), ALICE))


async def test_consume_ends_with_the_error_of_a_bad_later_request(backend: MemoryEvents) -> None:
    requests = Requests(options(topic="t"), options(topic="t"))
    with pytest.raises(BadRequest, match="only acks"):
        async for _ in StreamHandler(backend).Consume(requests, ALICE):
            pass


async def test_acks_on_an_auto_ack_stream_end_it(backend: MemoryEvents) -> None:
    stream = StreamHandler(backend)
    requests = Requests(options(topic="t", start=events_pb2.BEGINNING))
    await publish(stream, "t", b"x")
    events: Any = stream.Consume(requests, ALICE)
    event = await asyncio.wait_for(anext(events), TIMEOUT)
    requests.queue.put_nowait(ack(event.id))
    with pytest.raises(BadRequest, match="automatically"):
        await asyncio.wait_for(anext(events), TIMEOUT)


async def test_consume_over_grpc(backend: MemoryEvents) -> None:
    dispatcher = Dispatcher()
    dispatcher.add(
        "events",
        bind(StreamHandler(backend), events_pb2.DESCRIPTOR.services_by_name["Stream"])
        + bind(EventsStoreHandler(backend), events_pb2.DESCRIPTOR.services_by_name["Store"]),
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((dispatcher,))
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            await _consume_and_ack(channel)
    finally:
        await server.stop(None)


async def _consume_and_ack(channel: grpc.aio.Channel) -> None:
    metadata = (("micro-namespace", "alice"),)
    consume = channel.stream_stream(
        "/micro.events.v1.Stream/Consume",
        request_serializer=events_pb2.ConsumeRequest.SerializeToString,
        response_deserializer=events_pb2.Event.FromString,
    )
    publish = channel.unary_unary(
        "/micro.events.v1.Stream/Publish",
        request_serializer=events_pb2.PublishRequest.SerializeToString,
        response_deserializer=events_pb2.PublishResponse.FromString,
    )
    call = consume(metadata=metadata)
    await call.write(options(topic="t", group="g", start=events_pb2.BEGINNING, auto_ack=False))
    await publish(events_pb2.PublishRequest(topic="t", payload=b"hello"), metadata=metadata)
    event = await asyncio.wait_for(call.read(), TIMEOUT)
    assert (event.payload, event.sequence, event.attempt) == (b"hello", 1, 1)
    await call.write(ack(event.id))
    await call.write(options(topic="t"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(call.read(), TIMEOUT)
    assert isinstance(error_from_rpc(caught.value), BadRequest)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await publish(events_pb2.PublishRequest(topic="bad topic"), metadata=metadata)
    assert isinstance(error_from_rpc(caught.value), BadRequest)


async def test_publish_stream_batches_what_arrived_while_a_publish_waited(tmp_path: Path) -> None:
    events = await SQLiteEvents(tmp_path / "events.db").open()
    batches: list[int] = []
    publish_many = events.publish_many

    async def counted(namespace: str, items: Any) -> Any:
        batches.append(len(items))
        return await publish_many(namespace, items)

    events.publish_many = counted  # type: ignore[method-assign]
    try:
        requests = Requests()
        answers = StreamHandler(events).PublishStream(requests, ALICE)
        for n in range(1, 4):  # one at a time: each is its own batch
            requests.queue.put_nowait(message(events_pb2.PublishRequest(topic="t", payload=b"x")))
            assert (await asyncio.wait_for(anext(answers), TIMEOUT)).results[0].sequence == n
        for _ in range(3):  # arrived together: published together, each answered in turn
            requests.queue.put_nowait(message(events_pb2.PublishRequest(topic="t", payload=b"y")))
        answered = [await asyncio.wait_for(anext(answers), TIMEOUT) for _ in range(3)]
        assert [a.results[0].sequence for a in answered] == [4, 5, 6]
        assert batches == [1, 1, 1, 3]
        tasks = len(asyncio.all_tasks())
        requests.queue.put_nowait(message(events_pb2.PublishRequest(topic="t", payload=b"z")))
        assert (await asyncio.wait_for(anext(answers), TIMEOUT)).results[0].sequence == 7
        assert len(asyncio.all_tasks()) == tasks  # no task reads ahead
        requests.queue.put_nowait(None)
        assert [r async for r in answers] == []
    finally:
        await events.close()
