"""Calls the relay answers itself (``Serve``): a real ``Relay`` and ``Dispatcher``, grpc.aio and
``Http2Transport`` callers, and a bare HTTP/2 client for what those never send."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import ServiceDescriptor

from micro._binding import bind
from micro._dispatch import Dispatcher, Lane
from micro.auth import Account
from micro.codec import decode_proto
from micro.context import Context
from micro.errors import Conflict, Forbidden, InternalServerError, MicroError, NotFound, PayloadTooLarge
from micro.http2_transport import Http2Transport
from micro_daemon.relay.local import INBOX_LIMIT, MAX_REQUEST, Serve, grpc_timeout
from micro_daemon.relay.relay import Relay, Route

from .conftest import OPTIONS, micro_error, payload, relay_address, settled, until
from .rawh2 import DATA, END_HEADERS, END_STREAM, HEADERS, RawClient, frame, grpc_message

SERVICE = "localtest.Blobs"
UNARY = f"/{SERVICE}/Unary"
DOWNLOAD = f"/{SERVICE}/Download"
UPLOAD = f"/{SERVICE}/Upload"
CHAT = f"/{SERVICE}/Chat"
TIMEOUT = 10.0
SOON = 3.0


def blobs_service() -> ServiceDescriptor:
    """``localtest.Blobs``: every call shape over one message with a bytes field, in a pool of its own."""
    proto = descriptor_pb2.FileDescriptorProto(name="localtest/blobs.proto", package="localtest")
    proto.syntax = "proto3"
    blob = proto.message_type.add(name="Blob")
    fields = [
        ("data", "TYPE_BYTES"),
        ("text", "TYPE_STRING"),
        ("count", "TYPE_INT64"),
        ("size", "TYPE_INT64"),
    ]
    for number, (name, kind) in enumerate(fields, 1):
        blob.field.add(
            name=name,
            number=number,
            type=descriptor_pb2.FieldDescriptorProto.Type.Value(kind),
            label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
        )
    service = proto.service.add(name="Blobs")
    for name, client_streaming, server_streaming in [
        ("Unary", False, False),
        ("Download", False, True),
        ("Upload", True, False),
        ("Chat", True, True),
    ]:
        service.method.add(
            name=name,
            input_type=".localtest.Blob",
            output_type=".localtest.Blob",
            client_streaming=client_streaming,
            server_streaming=server_streaming,
        )
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(proto.SerializeToString())
    return pool.FindServiceByName(SERVICE)


DESCRIPTOR = blobs_service()
Blob: Any = message_factory.GetMessageClass(DESCRIPTOR.file.message_types_by_name["Blob"])


def blob(**fields: Any) -> bytes:
    data: bytes = Blob(**fields).SerializeToString()
    return data


def parse(data: bytes) -> Any:
    return Blob.FromString(data)


def sha256(chunks: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


class Blobs:
    """The handler: what ``text`` asks for; records each call's context and how it ended."""

    def __init__(self) -> None:
        self.contexts: list[Context] = []
        self.started: asyncio.Queue[str] = asyncio.Queue()
        self.finished: asyncio.Queue[str] = asyncio.Queue()  # "done", "cancelled" or the exception's name
        self.release = asyncio.Event()
        self.yielded = 0

    async def Unary(self, request: Any, context: Context) -> Any:
        self._begin("Unary", context)
        if request.text == "fail":
            raise Conflict("version 3 is stale: ünï 100%", id="localtest.blobs")
        if request.text == "crash":
            raise RuntimeError("the handler has a bug")
        if request.text == "hold":
            async with self._outcome():
                await self.release.wait()
        if request.text == "deadline":
            return Blob(text=json.dumps(context.time_remaining()))
        if request.text == "whoami":
            account = context.account
            return Blob(text=account.id if account else "anonymous")
        if request.text == "timer":  # asyncio.timeout before the first wait: needs a current task
            async with asyncio.timeout(TIMEOUT):
                await asyncio.sleep(0)
        return Blob(data=request.data[::-1], text=request.text)

    async def Download(self, request: Any, context: Context) -> AsyncIterator[Any]:
        self._begin("Download", context)
        async with self._outcome():
            for i in range(request.count):
                self.yielded += 1
                yield Blob(data=payload(i, request.size), count=i)
            if request.text == "hold":
                await self.release.wait()
            if request.text == "fail":
                raise Conflict("failed midway", id="localtest.blobs")

    async def Upload(self, requests: AsyncIterator[Any], context: Context) -> Any:
        self._begin("Upload", context)
        digest, count = hashlib.sha256(), 0
        async for request in requests:
            digest.update(request.data)
            count += 1
        return Blob(text=digest.hexdigest(), count=count)

    async def Chat(self, requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        self._begin("Chat", context)
        async with self._outcome():
            async for request in requests:
                yield Blob(data=request.data[::-1], text=request.text, count=request.count)
                if request.text == "hold":
                    await self.release.wait()

    def _begin(self, method: str, context: Context) -> None:
        self.contexts.append(context)
        self.started.put_nowait(method)

    def _outcome(self) -> _Outcome:
        return _Outcome(self.finished)


class LaneBlobs(Blobs):
    """``Blobs`` whose ``Chat`` also has a lane, which the relay serves it with."""

    def __init__(self) -> None:
        super().__init__()
        self.lanes = {"Chat": self.chat_lane}

    async def Chat(self, requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        raise AssertionError("the relay serves Chat with its lane")
        yield  # an async generator, as a bidirectional method must be

    async def chat_lane(self, lane: Lane, context: Context) -> None:
        """What ``Blobs.Chat`` answers, through the lane."""
        self._begin("Chat", context)
        async with self._outcome():
            while await lane.wait():
                while (data := lane.take()) is not None:
                    request = decode_proto(data, Blob)
                    lane.send(blob(data=request.data[::-1], text=request.text, count=request.count))
                    if request.text == "hold":
                        await self.release.wait()


class _Outcome:
    def __init__(self, finished: asyncio.Queue[str]) -> None:
        self._finished = finished

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is None:
            self._finished.put_nowait("done")
        elif issubclass(kind, asyncio.CancelledError):
            self._finished.put_nowait("cancelled")
        else:
            self._finished.put_nowait(kind.__name__)


class LocalRouter:
    """Serves what ``dispatcher`` serves; anything else is not found."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    def route(self, headers: Mapping[bytes, bytes], peer: str) -> Route:
        path = headers.get(b":path", b"").decode()
        local = self.dispatcher.local(path, None)
        if local is None:
            raise NotFound(f"nothing serves {path}", id="localtest.router")
        return Serve(local)


class Hooks:
    """``authenticate`` and ``admit``: ``authorization: Bearer NAME`` is account NAME; ``x-deny`` refuses."""

    def __init__(self) -> None:
        self.authenticated: list[Mapping[str, str]] = []
        self.admitted: list[str] = []

    async def authenticate(self, metadata: Mapping[str, str]) -> tuple[Account | None, MicroError | None]:
        self.authenticated.append(metadata)
        token = metadata.get("authorization", "")
        return (Account(id=token.removeprefix("Bearer ")) if token else None), None

    def admit(self, context: Context) -> None:
        self.admitted.append(context.endpoint)
        if "x-deny" in context.metadata:
            raise Forbidden(f"{context.endpoint} is not for you", id="localtest.admit")


@pytest.fixture
def blobs(request: pytest.FixtureRequest) -> Blobs:
    """The handler; ``lane`` (indirect parametrization) serves ``Chat`` with a lane."""
    return LaneBlobs() if getattr(request, "param", None) == "lane" else Blobs()


# The bidirectional tests, with Chat served through its async iterators and through a lane.
both_forms = pytest.mark.parametrize("blobs", ["iterators", "lane"], indirect=True)


@pytest.fixture
def hooks() -> Hooks:
    return Hooks()


@pytest.fixture
async def local_relay(blobs: Blobs, hooks: Hooks) -> AsyncIterator[Relay]:
    dispatcher = Dispatcher(authenticate=hooks.authenticate, admit=hooks.admit)
    dispatcher.add("localtest", bind(blobs, DESCRIPTOR))
    relay = Relay(LocalRouter(dispatcher))
    await relay.listen("127.0.0.1", 0)
    yield relay
    blobs.release.set()
    await relay.close()
    await asyncio.sleep(0)


@pytest.fixture
async def channel(local_relay: Relay) -> AsyncIterator[grpc.aio.Channel]:
    """A grpc.aio caller; when the test ends, no stream may be left in the relay."""
    async with grpc.aio.insecure_channel(relay_address(local_relay), options=OPTIONS) as channel:
        yield channel
        await settled(local_relay)


@pytest.fixture
async def transport(local_relay: Relay) -> AsyncIterator[Http2Transport]:
    """An ``Http2Transport`` caller; when the test ends, no stream may be left on either side."""
    transport = Http2Transport(relay_address(local_relay))
    yield transport
    await settled(local_relay)
    conn = transport._conn
    assert conn is None or not conn.streams
    await transport.close()


@pytest.fixture
async def raw(local_relay: Relay) -> AsyncIterator[RawClient]:
    client = await RawClient.connect(relay_address(local_relay))
    yield client
    await client.close()


async def aiter_of(items: Iterable[bytes]) -> AsyncIterator[bytes]:
    for item in items:
        yield item


async def outcome(blobs: Blobs) -> str:
    return await asyncio.wait_for(blobs.finished.get(), SOON)


def queued(relay: Relay) -> int:
    """Bytes the relay holds in its streams' queues, waiting for callers' windows."""
    return sum(
        len(item[1])
        for conn in relay._downstreams
        for stream in conn.streams.values()
        for item in stream.queue
    )


def status_of(trailers: list[tuple[bytes, bytes]]) -> bytes:
    return dict(trailers)[b"grpc-status"]


# -- unary ------------------------------------------------------------------------------------------


async def test_unary_with_grpc(channel: grpc.aio.Channel, blobs: Blobs, hooks: Hooks) -> None:
    metadata = (("x-trace", "t-1"), ("authorization", "Bearer ada"))
    answer = await channel.unary_unary(UNARY)(
        blob(data=b"abc", text="hi"), metadata=metadata, timeout=TIMEOUT
    )
    assert parse(answer) == Blob(data=b"cba", text="hi")
    (context,) = blobs.contexts
    assert (context.service, context.endpoint) == ("localtest", "Blobs.Unary")
    assert context.metadata["x-trace"] == "t-1"
    assert context.account == Account(id="ada")
    assert hooks.admitted == ["Blobs.Unary"]
    assert not {"te", "content-type", "grpc-timeout", ":path"} & set(context.metadata)
    whoami = await channel.unary_unary(UNARY)(blob(text="whoami"), metadata=metadata, timeout=TIMEOUT)
    assert parse(whoami).text == "ada"


async def test_unary_with_http2_transport(transport: Http2Transport, blobs: Blobs) -> None:
    metadata = [("x-trace", "t-2")]
    answer = await transport.unary(UNARY, blob(data=b"xyz"), metadata=metadata, timeout=TIMEOUT)
    assert parse(answer) == Blob(data=b"zyx")
    assert blobs.contexts[0].metadata["x-trace"] == "t-2"
    calls = [transport.unary(UNARY, blob(data=b"%d" % i), metadata=(), timeout=TIMEOUT) for i in range(300)]
    assert [parse(a).data for a in await asyncio.gather(*calls)] == [(b"%d" % i)[::-1] for i in range(300)]


async def test_a_micro_error_comes_back_with_its_status_and_trailer(
    channel: grpc.aio.Channel, transport: Http2Transport
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(UNARY)(blob(text="fail"), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert caught.value.details() == "version 3 is stale: ünï 100%"
    assert micro_error(caught.value) == {
        "id": "localtest.blobs",
        "code": 409,
        "detail": "version 3 is stale: ünï 100%",
        "status": "Conflict",
    }
    with pytest.raises(Conflict) as raised:
        await transport.unary(UNARY, blob(text="fail"), metadata=(), timeout=TIMEOUT)
    assert (raised.value.id, raised.value.detail) == ("localtest.blobs", "version 3 is stale: ünï 100%")


async def test_an_unexpected_exception_is_a_logged_500(
    channel: grpc.aio.Channel, transport: Http2Transport, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="micro.server"):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary(UNARY)(blob(text="crash"), timeout=TIMEOUT)
        with pytest.raises(InternalServerError) as raised:
            await transport.unary(UNARY, blob(text="crash"), metadata=(), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert micro_error(caught.value)["code"] == 500
    assert "RuntimeError: the handler has a bug" in raised.value.detail
    assert raised.value.id == "localtest"
    logged = [r for r in caplog.records if r.name == "micro.server" and r.exc_info]
    assert len(logged) == 2


async def test_an_unknown_path_is_answered_by_the_router(
    channel: grpc.aio.Channel, transport: Http2Transport
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(f"/{SERVICE}/Nope")(b"", timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(NotFound):
        await transport.unary("/localtest.Other/Unary", b"", metadata=(), timeout=TIMEOUT)


async def test_a_request_over_the_limit_is_refused_without_hanging(
    local_relay: Relay, channel: grpc.aio.Channel, transport: Http2Transport, blobs: Blobs
) -> None:
    big = blob(data=b"\x01" * (MAX_REQUEST + 100))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(UNARY)(big, timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert micro_error(caught.value)["code"] == 413
    with pytest.raises(PayloadTooLarge):
        await transport.unary(UNARY, big, metadata=(), timeout=TIMEOUT)
    assert not blobs.contexts
    # The connections still serve.
    assert parse(await transport.unary(UNARY, blob(data=b"ok"), metadata=(), timeout=TIMEOUT)).data == b"ko"
    assert parse(await channel.unary_unary(UNARY)(blob(data=b"ok"), timeout=TIMEOUT)).data == b"ko"


async def test_a_request_of_several_megabytes(transport: Http2Transport, channel: grpc.aio.Channel) -> None:
    data = payload(1, 6 << 20)
    answer = await transport.unary(UNARY, blob(data=data), metadata=(), timeout=TIMEOUT)
    assert parse(answer).data == data[::-1]
    answer = await channel.unary_unary(UNARY)(blob(data=data), timeout=TIMEOUT)
    assert parse(answer).data == data[::-1]


@pytest.mark.parametrize(
    ("body", "code", "http"),
    [
        (b"", b"3", 400),  # no message: INVALID_ARGUMENT
        (grpc_message(blob(text="a")) + grpc_message(blob(text="b")), b"3", 400),  # two messages
        (grpc_message(blob(text="a"))[:-1], b"3", 400),  # a message cut short
        (b"\x01" + grpc_message(blob(text="a"))[1:], b"12", 501),  # the compressed flag: UNIMPLEMENTED
    ],
    ids=["none", "two", "cut-short", "compressed"],
)
async def test_a_malformed_unary_request(
    local_relay: Relay, raw: RawClient, blobs: Blobs, body: bytes, code: bytes, http: int
) -> None:
    if body:
        raw.send(frame(HEADERS, END_HEADERS, 1, raw.request(UNARY)), frame(DATA, END_STREAM, 1, body))
    else:
        raw.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, raw.request(UNARY)))
    response = await raw.response(1)
    fields = dict(response.headers)
    assert fields[b":status"] == b"200"
    assert fields[b"grpc-status"] == code
    error = json.loads(fields[b"micro-error"])
    assert (error["id"], error["code"]) == ("micro.proxy", http)
    assert not blobs.contexts
    await settled(local_relay)


async def test_grpc_compression_is_unimplemented(channel: grpc.aio.Channel) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(UNARY)(
            blob(data=b"a" * 10_000), timeout=TIMEOUT, compression=grpc.Compression.Gzip
        )
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_the_deadline_reaches_the_handler(
    channel: grpc.aio.Channel, transport: Http2Transport, blobs: Blobs
) -> None:
    answer = await channel.unary_unary(UNARY)(blob(text="deadline"), timeout=5)
    assert 4 < json.loads(parse(answer).text) < 5.1  # grpc rounds the timeout it sends up
    answer = await transport.unary(UNARY, blob(text="deadline"), metadata=(), timeout=3)
    assert 2 < json.loads(parse(answer).text) <= 3
    answer = await transport.unary(UNARY, blob(text="deadline"), metadata=(), timeout=None)
    assert json.loads(parse(answer).text) is None
    assert [c.deadline is None for c in blobs.contexts] == [False, False, True]


@pytest.mark.xfail(
    sys.version_info < (3, 12),
    strict=True,
    reason="on Python 3.11 (no eager tasks) Served runs a unary method's first step outside any task: "
    "asyncio.timeout before the first wait raises RuntimeError",
)
async def test_a_handler_using_a_timer_before_it_waits(transport: Http2Transport) -> None:
    answer = await transport.unary(UNARY, blob(text="timer"), metadata=(), timeout=TIMEOUT)
    assert parse(answer).text == "timer"


async def test_a_caller_cancelling_cancels_the_handler(
    channel: grpc.aio.Channel, transport: Http2Transport, blobs: Blobs
) -> None:
    call = channel.unary_unary(UNARY)(blob(text="hold"), timeout=TIMEOUT)
    assert await asyncio.wait_for(blobs.started.get(), SOON) == "Unary"
    call.cancel()
    assert await outcome(blobs) == "cancelled"

    task = asyncio.create_task(transport.unary(UNARY, blob(text="hold"), metadata=(), timeout=None))
    assert await asyncio.wait_for(blobs.started.get(), SOON) == "Unary"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await outcome(blobs) == "cancelled"

    with pytest.raises(MicroError):  # a deadline: the caller resets the call
        await transport.unary(UNARY, blob(text="hold"), metadata=(), timeout=0.2)
    assert await outcome(blobs) == "cancelled"


# -- the hooks --------------------------------------------------------------------------------------


async def test_admit_refuses_a_unary_call(
    channel: grpc.aio.Channel, transport: Http2Transport, blobs: Blobs, hooks: Hooks
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(UNARY)(blob(), metadata=(("x-deny", "1"),), timeout=TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert micro_error(caught.value) == {
        "id": "localtest.admit",
        "code": 403,
        "detail": "Blobs.Unary is not for you",
        "status": "Forbidden",
    }
    with pytest.raises(Forbidden, match=r"Blobs\.Unary is not for you"):
        await transport.unary(UNARY, blob(), metadata=[("x-deny", "1")], timeout=TIMEOUT)
    assert not blobs.contexts
    assert len(hooks.authenticated) == 2


@both_forms
async def test_admit_refuses_a_bidi_call_whose_caller_writes_at_once(
    channel: grpc.aio.Channel, transport: Http2Transport, blobs: Blobs, hooks: Hooks
) -> None:
    # One write: a grpc.aio client whose later writes meet the ended call reports "Internal error
    # from Core" instead of the status (as it does with a grpc server).
    for _ in range(5):
        call = channel.stream_stream(CHAT)(
            aiter_of([blob(text="a")]), metadata=(("x-deny", "1"),), timeout=TIMEOUT
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert micro_error(caught.value)["detail"] == "Blobs.Chat is not for you"

        call = channel.stream_stream(CHAT)(metadata=(("x-deny", "1"),), timeout=TIMEOUT)
        await call.write(blob(text="a"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED

        requests = aiter_of([blob(text=str(i)) for i in range(50)])
        with pytest.raises(Forbidden, match=r"Blobs\.Chat is not for you"):
            async for _ in transport.bidi_stream(CHAT, requests, metadata=[("x-deny", "1")], timeout=TIMEOUT):
                pass
    assert not blobs.contexts
    assert hooks.admitted == ["Blobs.Chat"] * 15


@both_forms
async def test_admit_refuses_a_bidi_call_whose_caller_waits(
    channel: grpc.aio.Channel, transport: Http2Transport
) -> None:
    # The caller writes nothing: the refusal goes out after REFUSAL_DELAY anyway.
    never: asyncio.Event = asyncio.Event()

    async def silent() -> AsyncIterator[bytes]:
        await never.wait()
        yield b""

    with pytest.raises(Forbidden):
        async for _ in transport.bidi_stream(CHAT, silent(), metadata=[("x-deny", "1")], timeout=TIMEOUT):
            pass
    call = channel.stream_stream(CHAT)(metadata=(("x-deny", "1"),), timeout=TIMEOUT)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


# -- streams ----------------------------------------------------------------------------------------


async def test_server_streaming(channel: grpc.aio.Channel, transport: Http2Transport, blobs: Blobs) -> None:
    request = blob(count=1000, size=100)
    received = [parse(m) async for m in channel.unary_stream(DOWNLOAD)(request, timeout=TIMEOUT)]
    assert [(m.count, m.data) for m in received] == [(i, payload(i, 100)) for i in range(1000)]
    stream = transport.server_stream(DOWNLOAD, request, metadata=(), timeout=TIMEOUT)
    assert [parse(m).data async for m in stream] == [payload(i, 100) for i in range(1000)]
    assert [await outcome(blobs), await outcome(blobs)] == ["done", "done"]


async def test_client_streaming(channel: grpc.aio.Channel, transport: Http2Transport) -> None:
    datas = [payload(i, 1000) for i in range(500)]
    answer = await channel.stream_unary(UPLOAD)(aiter_of([blob(data=d) for d in datas]), timeout=TIMEOUT)
    assert (parse(answer).text, parse(answer).count) == (sha256(datas), 500)
    answer = await transport.client_stream(
        UPLOAD, [blob(data=d) for d in datas], metadata=(), timeout=TIMEOUT
    )
    assert (parse(answer).text, parse(answer).count) == (sha256(datas), 500)
    empty = await transport.client_stream(UPLOAD, [], metadata=(), timeout=TIMEOUT)
    assert (parse(empty).text, parse(empty).count) == (sha256([]), 0)


@both_forms
async def test_bidi_streaming(channel: grpc.aio.Channel, transport: Http2Transport) -> None:
    requests = [blob(data=payload(i, 200), count=i) for i in range(500)]
    answers = [parse(m) async for m in channel.stream_stream(CHAT)(aiter_of(requests), timeout=TIMEOUT)]
    assert [(m.count, m.data) for m in answers] == [(i, payload(i, 200)[::-1]) for i in range(500)]
    stream = transport.bidi_stream(CHAT, aiter_of(requests), metadata=(), timeout=TIMEOUT)
    assert [parse(m).data async for m in stream] == [payload(i, 200)[::-1] for i in range(500)]

    call = channel.stream_stream(CHAT)(timeout=TIMEOUT)  # one message at a time
    for i in range(20):
        await call.write(blob(text="ping", count=i))
        assert parse(await call.read()).count == i
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF


@both_forms
async def test_messages_over_a_megabyte_both_ways(
    channel: grpc.aio.Channel, transport: Http2Transport
) -> None:
    datas = [payload(i, 3 << 20) for i in range(3)]  # each larger than the inbox limit and the window
    assert len(datas[0]) > INBOX_LIMIT
    requests = [blob(data=d) for d in datas]

    answer = await transport.client_stream(UPLOAD, requests, metadata=(), timeout=TIMEOUT)
    assert (parse(answer).text, parse(answer).count) == (sha256(datas), 3)
    answer = await channel.stream_unary(UPLOAD)(aiter_of(requests), timeout=TIMEOUT)
    assert (parse(answer).text, parse(answer).count) == (sha256(datas), 3)

    stream = transport.bidi_stream(CHAT, aiter_of(requests), metadata=(), timeout=TIMEOUT)
    assert [parse(m).data async for m in stream] == [d[::-1] for d in datas]
    answers = channel.stream_stream(CHAT)(aiter_of(requests), timeout=TIMEOUT)
    assert [parse(m).data async for m in answers] == [d[::-1] for d in datas]

    request = blob(count=3, size=3 << 20)
    stream = transport.server_stream(DOWNLOAD, request, metadata=(), timeout=TIMEOUT)
    assert [parse(m).data async for m in stream] == [payload(i, 3 << 20) for i in range(3)]


async def test_a_slow_reader_of_a_server_stream_holds_the_handler_back(
    local_relay: Relay, channel: grpc.aio.Channel, transport: Http2Transport, blobs: Blobs
) -> None:
    size, count = 256 * 1024, 100  # 25 MiB the handler would produce at once
    request = blob(count=count, size=size)

    async def held_back(first: Any) -> int:
        """How far ahead of its reader the handler got (bytes), and the most the relay held."""
        before = blobs.yielded
        assert parse(await first).data == payload(0, size)
        most = 0
        for _ in range(25):
            await asyncio.sleep(0.02)
            most = max(most, queued(local_relay))
        assert most < 1 << 20, f"the relay holds {most} bytes"
        return (blobs.yielded - before) * size

    stream = transport.server_stream(DOWNLOAD, request, metadata=(), timeout=TIMEOUT)
    ahead = await held_back(anext(stream))
    assert ahead < 4 << 20, f"the handler got {ahead} bytes ahead"  # the transport's 1 MiB unread + window
    assert [parse(m).data async for m in stream] == [payload(i, size) for i in range(1, count)]

    call = channel.unary_stream(DOWNLOAD)(request, timeout=TIMEOUT)
    ahead = await held_back(call.read())
    assert ahead < 16 << 20, f"the handler got {ahead} bytes ahead"  # grpc's window grows with its BDP
    received = [parse(await call.read()).data for _ in range(1, count)]
    assert received == [payload(i, size) for i in range(1, count)]
    assert await call.read() == grpc.aio.EOF


@pytest.mark.parametrize("blobs", ["lane"], indirect=True)
async def test_a_slow_reader_of_a_lane_holds_it_back(
    local_relay: Relay, transport: Http2Transport, blobs: Blobs
) -> None:
    size, count = 256 * 1024, 100  # 25 MiB of answers the lane could send at once
    requests = [blob(data=payload(i, size), count=i) for i in range(count)]
    stream = transport.bidi_stream(CHAT, aiter_of(requests), metadata=(), timeout=TIMEOUT)
    assert parse(await anext(stream)).count == 0
    most = 0
    for _ in range(25):
        await asyncio.sleep(0.02)
        most = max(most, queued(local_relay))
    assert most < 2 << 20, f"the relay holds {most} bytes of answers"  # a window's worth, and a batch
    assert [parse(m).count async for m in stream] == list(range(1, count))


async def test_a_handler_failing_midway_through_a_stream(
    channel: grpc.aio.Channel, transport: Http2Transport
) -> None:
    call = channel.unary_stream(DOWNLOAD)(blob(count=3, size=10, text="fail"), timeout=TIMEOUT)
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for message in call:
            received.append(parse(message).count)
    assert received == [0, 1, 2]
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert micro_error(caught.value)["detail"] == "failed midway"

    stream = transport.server_stream(
        DOWNLOAD, blob(count=3, size=10, text="fail"), metadata=(), timeout=TIMEOUT
    )
    with pytest.raises(Conflict, match="failed midway"):
        async for _ in stream:
            pass


@both_forms
async def test_cancelling_a_stream_cancels_the_handler(
    channel: grpc.aio.Channel, transport: Http2Transport, blobs: Blobs
) -> None:
    call = channel.stream_stream(CHAT)(timeout=TIMEOUT)
    await call.write(blob(text="hold"))
    assert parse(await call.read()).text == "hold"
    call.cancel()
    assert await outcome(blobs) == "cancelled"

    received: list[bytes] = []

    async def consume() -> None:
        request = blob(count=2, size=10, text="hold")
        async for message in transport.server_stream(DOWNLOAD, request, metadata=(), timeout=None):
            received.append(message)

    task = asyncio.create_task(consume())
    await until(lambda: len(received) == 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await outcome(blobs) == "cancelled"


async def test_a_stream_message_over_the_limit(local_relay: Relay, raw: RawClient) -> None:
    too_long = b"\x00" + (MAX_REQUEST + 1).to_bytes(4, "big") + b"\x00" * 100
    raw.send(frame(HEADERS, END_HEADERS, 1, raw.request(CHAT)), frame(DATA, 0, 1, too_long))
    response = await raw.response(1)
    assert status_of(response.headers) == b"8"  # RESOURCE_EXHAUSTED, trailers-only
    assert json.loads(dict(response.headers)[b"micro-error"])["code"] == 413
    raw.send(frame(DATA, END_STREAM, 1))
    await settled(local_relay)


@both_forms
async def test_a_bad_request_message_after_responses_began(
    local_relay: Relay, raw: RawClient, channel: grpc.aio.Channel
) -> None:
    # The status comes as trailers after the response headers: no pseudo-header among them.
    raw.send(
        frame(HEADERS, END_HEADERS, 1, raw.request(CHAT)), frame(DATA, 0, 1, grpc_message(blob(text="a")))
    )
    while not raw.responses.get(1) or not raw.responses[1].data:
        assert await raw.frame() is not None
    compressed = b"\x01" + grpc_message(blob(text="b"))[1:]
    raw.send(frame(DATA, 0, 1, compressed))
    response = await raw.response(1)
    assert response.headers[0] == (b":status", b"200")
    assert [k for k, _ in response.trailers if k.startswith(b":")] == []
    assert status_of(response.trailers) == b"12"
    raw.send(frame(DATA, END_STREAM, 1))  # as a gRPC client ends its side
    await settled(local_relay)

    call = channel.stream_stream(CHAT)(timeout=TIMEOUT)
    await call.write(blob(text="a"))
    assert parse(await call.read()).text == "a"
    await call.write(b"\x0f\xff")  # not a Blob (wire type 7): decoding fails, after the headers
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- grpc-timeout ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"100m", 0.1),
        (b"5S", 5.0),
        (b"2M", 120.0),
        (b"1H", 3600.0),
        (b"2500000u", 2.5),
        (b"7n", 7e-9),
        (b"99999999S", 99999999.0),
        (b"0m", 0.0),
    ],
)
def test_grpc_timeout(value: bytes, seconds: float) -> None:
    assert grpc_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [b"", b"S", b"5", b"5s", b"5x", b"-5S", b"1.5S", b"123456789S", b" 5S"])
def test_grpc_timeout_rejects_what_is_not_one(value: bytes) -> None:
    assert grpc_timeout(value) is None


async def test_a_timeout_of_an_http2_transport_parses_as_sent(
    transport: Http2Transport, blobs: Blobs
) -> None:
    for timeout in (0.5, 99.0, 250_000.0):
        answer = await transport.unary(UNARY, blob(text="deadline"), metadata=(), timeout=timeout)
        assert timeout - 1 < json.loads(parse(answer).text) <= timeout
    started = time.monotonic()
    assert blobs.contexts[-1].deadline is not None
    assert blobs.contexts[-1].deadline > started + 200_000
