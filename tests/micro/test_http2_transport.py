"""``Http2Transport`` against real grpc.aio servers: every call shape, errors, deadlines, flow control."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import random
import sys
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent import futures
from typing import Any

import grpc
import grpc.aio
import pytest

from micro.errors import (
    Conflict,
    ConnectError,
    MicroError,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    Timeout,
    TLSError,
)
from micro.errors import NotImplemented as Unimplemented
from micro.http2_transport import Http2Transport

SERVICE = "h2test.Echo"
ECHO = f"/{SERVICE}/Echo"
FAIL = f"/{SERVICE}/Fail"
HOLD = f"/{SERVICE}/Hold"
DOWNLOAD = f"/{SERVICE}/Download"
UPLOAD = f"/{SERVICE}/Upload"
CHAT = f"/{SERVICE}/Chat"
BIG = 64 << 20
OPTIONS = [("grpc.max_receive_message_length", BIG), ("grpc.max_send_message_length", BIG)]
TIMEOUT = 10.0  # every call's deadline unless the test is about deadlines: a hang fails
SOON = 3.0  # how long a server may take to hear of a cancellation


def payload(seed: int, size: int) -> bytes:
    """Bytes that differ from message to message, so a lost or reordered chunk shows."""
    return random.Random(seed).randbytes(size)


def sha256(chunks: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


class Server:
    """A grpc.aio server on 127.0.0.1 recording what its handlers saw and how they ended."""

    def __init__(self, port: int = 0, options: Sequence[tuple[str, Any]] = OPTIONS) -> None:
        self.server = grpc.aio.server(options=list(options))
        handlers = {
            "Echo": grpc.unary_unary_rpc_method_handler(self.echo),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
            "Hold": grpc.unary_unary_rpc_method_handler(self.hold),
            "Download": grpc.unary_stream_rpc_method_handler(self.download),
            "Upload": grpc.stream_unary_rpc_method_handler(self.upload),
            "Chat": grpc.stream_stream_rpc_method_handler(self.chat),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.address = f"127.0.0.1:{self.port}"
        self.metadata: list[dict[str, Any]] = []
        self.started: asyncio.Queue[str] = asyncio.Queue()
        self.finished: asyncio.Queue[str] = asyncio.Queue()  # "done" or "cancelled", as handlers end
        self.release = asyncio.Event()
        self.yielded = 0  # messages ``Download`` has produced

    async def echo(self, request: bytes, context: Any) -> bytes:
        self._begin("Echo", context)
        return request

    async def fail(self, request: bytes, context: Any) -> bytes:
        """Aborts as the JSON request says: ``code``, ``details``, ``trailers``."""
        spec = json.loads(request)
        trailers = tuple(tuple(pair) for pair in spec.get("trailers", ()))
        await context.abort(grpc.StatusCode[spec["code"]], spec["details"], trailing_metadata=trailers)
        raise AssertionError("abort returned")

    async def hold(self, request: bytes, context: Any) -> bytes:
        self._begin("Hold", context)
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.finished.put_nowait("cancelled")
            raise
        self.finished.put_nowait("done")
        return request

    async def download(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        """``count`` messages of ``size`` bytes (``payload(i, size)``), then waits for ``release``
        if ``hold``."""
        self._begin("Download", context)
        spec = json.loads(request)
        try:
            for i in range(spec["count"]):
                self.yielded += 1
                yield payload(i, spec["size"])
            if spec.get("hold"):
                await self.release.wait()
        except (asyncio.CancelledError, GeneratorExit):
            self.finished.put_nowait("cancelled")
            raise
        self.finished.put_nowait("done")

    async def upload(self, requests: AsyncIterator[bytes], context: Any) -> bytes:
        """The SHA-256 and count of the messages; returns early after ``x-stop-after`` of them."""
        metadata = self._begin("Upload", context)
        stop_after = int(metadata.get("x-stop-after", 0))
        digest, count = hashlib.sha256(), 0
        async for message in requests:
            digest.update(message)
            count += 1
            if count == stop_after:
                break
        return json.dumps({"sha256": digest.hexdigest(), "count": count}).encode()

    async def chat(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        """Each message back, reversed."""
        self._begin("Chat", context)
        try:
            async for message in requests:
                yield message[::-1]
        except (asyncio.CancelledError, GeneratorExit):
            self.finished.put_nowait("cancelled")
            raise
        self.finished.put_nowait("done")

    def _begin(self, method: str, context: Any) -> dict[str, Any]:
        metadata = dict(context.invocation_metadata())
        self.metadata.append(metadata)
        self.started.put_nowait(method)
        return metadata

    async def start(self) -> Server:
        await self.server.start()
        return self

    async def stop(self) -> None:
        self.release.set()
        await self.server.stop(None)


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    server = await Server().start()
    yield server
    await server.stop()


@pytest.fixture
async def transport(server: Server) -> AsyncIterator[Http2Transport]:
    """A transport to ``server``; when the test ends, it may track no stream."""
    transport = Http2Transport(server.address)
    yield transport
    await until(lambda: not tracked(transport))
    await transport.close()


def tracked(transport: Http2Transport) -> list[int]:
    conn = transport._conn
    return [] if conn is None else sorted(conn.streams)


async def until(condition: Callable[[], object], within: float = SOON) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.005)


async def outcome(server: Server) -> str:
    return await asyncio.wait_for(server.finished.get(), SOON)


async def aiter_of(items: Iterable[bytes], pause: float = 0) -> AsyncIterator[bytes]:
    for item in items:
        yield item
        if pause:
            await asyncio.sleep(pause)


async def failing_requests(sent: int) -> AsyncIterator[bytes]:
    for i in range(sent):
        yield b"ok %d" % i
    raise ValueError("line 3 is not JSON")


# -- the four shapes ---------------------------------------------------------------------------------


async def test_unary_with_metadata(server: Server, transport: Http2Transport) -> None:
    metadata = [("X-Trace", "t-1"), ("x-empty", ""), ("micro-namespace", "team-a")]
    assert await transport.unary(ECHO, b"hello", metadata=metadata, timeout=TIMEOUT) == b"hello"
    assert await transport.unary(ECHO, b"", metadata=(), timeout=None) == b""
    seen = server.metadata[0]
    assert (seen["x-trace"], seen["x-empty"], seen["micro-namespace"]) == ("t-1", "", "team-a")


async def test_server_stream(server: Server, transport: Http2Transport) -> None:
    spec = json.dumps({"count": 50, "size": 100}).encode()
    stream = transport.server_stream(DOWNLOAD, spec, metadata=[("x-a", "1")], timeout=TIMEOUT)
    assert [message async for message in stream] == [payload(i, 100) for i in range(50)]
    assert server.metadata[0]["x-a"] == "1"
    assert await outcome(server) == "done"


async def test_client_stream_from_a_list_and_an_async_iterator(
    server: Server, transport: Http2Transport
) -> None:
    messages = [payload(i, 1000) for i in range(100)]
    for requests in (messages, aiter_of(messages)):
        answer = await transport.client_stream(UPLOAD, requests, metadata=[("x-b", "2")], timeout=TIMEOUT)
        assert json.loads(answer) == {"sha256": sha256(messages), "count": 100}
    assert json.loads(await transport.client_stream(UPLOAD, [], metadata=(), timeout=TIMEOUT)) == {
        "sha256": sha256([]),
        "count": 0,
    }
    assert server.metadata[0]["x-b"] == "2"


async def test_bidi_stream_answers_as_requests_come(server: Server, transport: Http2Transport) -> None:
    sent: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[bytes]:
        while (message := await sent.get()) is not None:
            yield message

    stream = transport.bidi_stream(CHAT, requests(), metadata=[("x-c", "3")], timeout=TIMEOUT)
    for i in range(20):  # each answer arrives before the next request is written
        sent.put_nowait(b"ping %d" % i)
        assert await anext(stream) == (b"ping %d" % i)[::-1]
    sent.put_nowait(None)
    assert [message async for message in stream] == []
    assert server.metadata[0]["x-c"] == "3"
    assert await outcome(server) == "done"


async def test_an_open_bidi_hands_answers_to_a_listener_as_they_arrive(
    server: Server, transport: Http2Transport
) -> None:
    answers: list[bytes] = []
    ended: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
    arrived = asyncio.Event()

    def on_message(message: bytes) -> None:
        answers.append(message)
        arrived.set()

    call = await transport.open_bidi(CHAT, metadata=(), timeout=TIMEOUT)
    call.listen(on_message, ended.set_result)
    for i in range(10):
        arrived.clear()
        call.write(b"ping %d" % i)
        await asyncio.wait_for(arrived.wait(), SOON)
    assert answers == [(b"ping %d" % i)[::-1] for i in range(10)]
    call.done_writing()
    assert await asyncio.wait_for(ended, SOON) is None
    assert await outcome(server) == "done"


async def test_a_listener_hears_how_a_lost_call_ended(server: Server) -> None:
    transport = Http2Transport(server.address)
    ended: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
    call = await transport.open_bidi(CHAT, metadata=(), timeout=TIMEOUT)
    call.listen(lambda message: None, ended.set_result)
    call.write(b"ping")
    assert await asyncio.wait_for(server.started.get(), SOON) == "Chat"
    conn = transport._conn
    assert conn is not None and conn.transport is not None
    conn.transport.abort()
    assert isinstance(await asyncio.wait_for(ended, SOON), ServiceUnavailable)
    await transport.close()


# -- errors ----------------------------------------------------------------------------------------


async def test_a_micro_error_trailer_comes_back_as_that_class(transport: Http2Transport) -> None:
    error = Conflict("version 3 is stale: ünï 100%", id="h2test.store")
    spec = {"code": "ABORTED", "details": "ignored", "trailers": [["micro-error", error.to_json()]]}
    with pytest.raises(Conflict) as caught:
        await transport.unary(FAIL, json.dumps(spec).encode(), metadata=(), timeout=TIMEOUT)
    assert (caught.value.id, caught.value.code, caught.value.detail) == (
        "h2test.store",
        409,
        "version 3 is stale: ünï 100%",
    )


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("NOT_FOUND", NotFound),
        ("UNIMPLEMENTED", Unimplemented),
        ("UNAVAILABLE", ServiceUnavailable),
        ("ABORTED", Conflict),
    ],
)
async def test_a_plain_status_maps_to_its_class_with_its_details_decoded(
    transport: Http2Transport, code: str, expected: type[MicroError]
) -> None:
    details = "no such key: ünï 100% %41 \u65e5\u672c"
    spec = {"code": code, "details": details}
    with pytest.raises(expected) as caught:
        await transport.unary(FAIL, json.dumps(spec).encode(), metadata=(), timeout=TIMEOUT)
    assert type(caught.value) is expected
    assert caught.value.detail == details


async def test_a_malformed_micro_error_trailer_falls_back_to_the_status(transport: Http2Transport) -> None:
    spec = {"code": "NOT_FOUND", "details": "gone", "trailers": [["micro-error", "{not json"]]}
    with pytest.raises(NotFound, match="gone"):
        await transport.unary(FAIL, json.dumps(spec).encode(), metadata=(), timeout=TIMEOUT)


async def test_an_unknown_method_is_unimplemented(transport: Http2Transport) -> None:
    with pytest.raises(Unimplemented):
        await transport.unary(f"/{SERVICE}/Nope", b"", metadata=(), timeout=TIMEOUT)
    with pytest.raises(Unimplemented):
        async for _ in transport.server_stream("/nope.Nope/Nope", b"", metadata=(), timeout=TIMEOUT):
            pass


async def test_a_request_larger_than_the_server_accepts(transport: Http2Transport) -> None:
    small = await Server(options=()).start()  # grpc's default limit: 4 MiB
    try:
        small_transport = Http2Transport(small.address)
        with pytest.raises(PayloadTooLarge):
            await small_transport.unary(ECHO, payload(0, 5 << 20), metadata=(), timeout=TIMEOUT)
        assert await small_transport.unary(ECHO, b"next", metadata=(), timeout=TIMEOUT) == b"next"
        await until(lambda: not tracked(small_transport))
        await small_transport.close()
    finally:
        await small.stop()


# -- deadlines and cancellation --------------------------------------------------------------------


async def test_a_deadline_gives_timeout_and_cancels_the_server_call(
    server: Server, transport: Http2Transport
) -> None:
    started = time.monotonic()
    with pytest.raises(Timeout):
        await transport.unary(HOLD, b"", metadata=(), timeout=0.3)
    assert 0.25 < time.monotonic() - started < 2
    assert await outcome(server) == "cancelled"


async def test_a_deadline_ends_a_server_stream(server: Server, transport: Http2Transport) -> None:
    spec = json.dumps({"count": 2, "size": 10, "hold": True}).encode()
    received = []
    with pytest.raises(Timeout):
        async for message in transport.server_stream(DOWNLOAD, spec, metadata=(), timeout=0.3):
            received.append(message)
    assert received == [payload(0, 10), payload(1, 10)]
    assert await outcome(server) == "cancelled"


async def test_a_deadline_reached_while_the_consumer_works_is_a_timeout(
    server: Server, transport: Http2Transport
) -> None:
    # The deadline passes outside the generator (in the consumer's own await): the consumer must
    # still get ``Timeout`` from the stream, not a CancelledError out of its own code.
    spec = json.dumps({"count": 2, "size": 10, "hold": True}).encode()
    with pytest.raises(Timeout):
        async for _ in transport.server_stream(DOWNLOAD, spec, metadata=(), timeout=0.2):
            await asyncio.sleep(0.3)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    assert await outcome(server) == "cancelled"


async def test_a_deadline_ends_a_bidi_stream_whose_consumer_works(
    server: Server, transport: Http2Transport
) -> None:
    requests = aiter_of([b"a", b"b", b"c"], pause=10)
    with pytest.raises(Timeout):
        async for _ in transport.bidi_stream(CHAT, requests, metadata=(), timeout=0.2):
            await asyncio.sleep(0.3)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    # grpc.aio ends a cancelled call's request iterator as if the requests had ended.
    assert await outcome(server) in ("done", "cancelled")


async def test_cancelling_a_unary_call_cancels_the_server_call(
    server: Server, transport: Http2Transport
) -> None:
    task = asyncio.create_task(transport.unary(HOLD, b"", metadata=(), timeout=None))
    assert await asyncio.wait_for(server.started.get(), SOON) == "Hold"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await outcome(server) == "cancelled"


async def test_cancelling_a_server_stream_consumer_cancels_the_server_call(
    server: Server, transport: Http2Transport
) -> None:
    received: list[bytes] = []

    async def consume() -> None:
        spec = json.dumps({"count": 1, "size": 10, "hold": True}).encode()
        async for message in transport.server_stream(DOWNLOAD, spec, metadata=(), timeout=None):
            received.append(message)

    task = asyncio.create_task(consume())
    await until(lambda: received)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await outcome(server) == "cancelled"


async def test_leaving_a_server_stream_early_cancels_the_server_call(
    server: Server, transport: Http2Transport
) -> None:
    spec = json.dumps({"count": 1, "size": 10, "hold": True}).encode()
    stream = transport.server_stream(DOWNLOAD, spec, metadata=(), timeout=TIMEOUT)
    assert await anext(stream) == payload(0, 10)
    await stream.aclose()  # type: ignore[attr-defined]
    assert await outcome(server) == "cancelled"


# -- sizes and flow control ------------------------------------------------------------------------


async def test_messages_of_several_megabytes_both_ways(server: Server, transport: Http2Transport) -> None:
    big = payload(1, 6 << 20)  # six times the window, hundreds of frames
    assert await transport.unary(ECHO, big, metadata=(), timeout=TIMEOUT) == big

    spec = json.dumps({"count": 3, "size": 3 << 20}).encode()
    messages = [m async for m in transport.server_stream(DOWNLOAD, spec, metadata=(), timeout=TIMEOUT)]
    assert messages == [payload(i, 3 << 20) for i in range(3)]

    uploads = [payload(10 + i, 3 << 20) for i in range(3)]
    answer = await transport.client_stream(UPLOAD, uploads, metadata=(), timeout=TIMEOUT)
    assert json.loads(answer) == {"sha256": sha256(uploads), "count": 3}

    answers = [m async for m in transport.bidi_stream(CHAT, aiter_of(uploads), metadata=(), timeout=TIMEOUT)]
    assert answers == [m[::-1] for m in uploads]


async def test_a_slow_consumer_holds_the_server_back(server: Server, transport: Http2Transport) -> None:
    size, count = 64 * 1024, 400  # 25 MiB the server would push at once
    spec = json.dumps({"count": count, "size": size}).encode()
    stream = transport.server_stream(DOWNLOAD, spec, metadata=(), timeout=TIMEOUT)
    assert await anext(stream) == payload(0, size)
    previous = -1
    async with asyncio.timeout(SOON):  # the server pushes what the windows let it, then waits
        while server.yielded != previous:
            previous = server.yielded
            await asyncio.sleep(0.2)
    assert previous * size < 6 << 20, f"the server pushed {previous * size} bytes ahead"
    (call,) = [s.owner for s in transport._conn.streams.values()]  # type: ignore[union-attr]
    assert call.inbox.unread < 2 << 20
    rest = [message async for message in stream]
    assert rest == [payload(i, size) for i in range(1, count)]


async def test_a_server_that_reads_slowly_holds_the_writer_back(
    server: Server, transport: Http2Transport
) -> None:
    # The server's window fills: the writer waits for it instead of queueing everything.
    produced = 0

    async def requests() -> AsyncIterator[bytes]:
        nonlocal produced
        for i in range(200):
            produced += 1
            yield payload(i, 64 * 1024)

    stream = transport.bidi_stream(CHAT, requests(), metadata=(), timeout=TIMEOUT)
    first = await anext(stream)
    assert first == payload(0, 64 * 1024)[::-1]
    await asyncio.sleep(0.3)
    assert produced < 200, "every request was produced although nothing read the answers"
    rest = [message async for message in stream]
    assert rest == [payload(i, 64 * 1024)[::-1] for i in range(1, 200)]


async def test_hundreds_of_concurrent_calls_on_one_connection(
    server: Server, transport: Http2Transport
) -> None:
    calls = [transport.unary(ECHO, b"call %d" % i, metadata=(), timeout=TIMEOUT) for i in range(500)]
    assert await asyncio.gather(*calls) == [b"call %d" % i for i in range(500)]
    conn = transport._conn
    assert conn is not None and conn.next_stream == 1001  # one connection, 500 streams


# -- request iterators that fail ------------------------------------------------------------------


async def test_a_failing_request_iterator_is_what_a_bidi_caller_gets(
    server: Server, transport: Http2Transport
) -> None:
    received = []
    with pytest.raises(ValueError, match="line 3 is not JSON"):
        async for message in transport.bidi_stream(CHAT, failing_requests(2), metadata=(), timeout=TIMEOUT):
            received.append(message)
    assert received in ([], [b"0 ko"], [b"0 ko", b"1 ko"])


async def test_a_failing_request_iterator_is_what_a_client_stream_caller_gets(
    server: Server, transport: Http2Transport
) -> None:
    with pytest.raises(ValueError, match="line 3 is not JSON"):
        await transport.client_stream(UPLOAD, failing_requests(2), metadata=(), timeout=TIMEOUT)


async def test_a_server_answering_before_the_requests_end(server: Server, transport: Http2Transport) -> None:
    messages = [payload(i, 64 * 1024) for i in range(100)]
    answer = await transport.client_stream(
        UPLOAD, aiter_of(messages), metadata=[("x-stop-after", "2")], timeout=TIMEOUT
    )
    assert json.loads(answer) == {"sha256": sha256(messages[:2]), "count": 2}


# -- connections -----------------------------------------------------------------------------------


async def test_nothing_listening_is_a_connect_error() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    server.close()
    await server.wait_closed()
    transport = Http2Transport(address)
    with pytest.raises(ConnectError) as caught:
        await transport.unary(ECHO, b"", metadata=(), timeout=TIMEOUT)
    assert type(caught.value) is ConnectError
    assert caught.value.address == address
    with pytest.raises(ConnectError):
        async for _ in transport.server_stream(DOWNLOAD, b"", metadata=(), timeout=TIMEOUT):
            pass
    calls = [transport.unary(ECHO, b"", metadata=(), timeout=TIMEOUT) for _ in range(5)]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert all(type(error) is ConnectError for error in outcomes)


async def test_a_call_cancelled_while_connecting_leaves_the_transport_usable(server: Server) -> None:
    transport = Http2Transport(server.address)
    first = asyncio.create_task(transport.unary(ECHO, b"1", metadata=(), timeout=TIMEOUT))
    await asyncio.sleep(0)  # inside create_connection
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    call = transport.unary(ECHO, b"2", metadata=(), timeout=TIMEOUT)
    assert await asyncio.wait_for(call, SOON) == b"2"
    await transport.close()


async def test_a_restarted_server_is_reached_again(server: Server) -> None:
    transport = Http2Transport(server.address)
    assert await transport.unary(ECHO, b"before", metadata=(), timeout=TIMEOUT) == b"before"
    await server.stop()
    again = await Server(port=server.port).start()
    try:
        assert await transport.unary(ECHO, b"after", metadata=(), timeout=TIMEOUT) == b"after"
        stream = transport.server_stream(
            DOWNLOAD, json.dumps({"count": 2, "size": 5}).encode(), metadata=(), timeout=TIMEOUT
        )
        assert [m async for m in stream] == [payload(0, 5), payload(1, 5)]
    finally:
        await transport.close()
        await again.stop()


async def test_a_connection_lost_during_a_call(server: Server) -> None:
    transport = Http2Transport(server.address)
    task = asyncio.create_task(transport.unary(HOLD, b"", metadata=(), timeout=TIMEOUT))
    assert await asyncio.wait_for(server.started.get(), SOON) == "Hold"
    conn = transport._conn
    assert conn is not None and conn.transport is not None
    conn.transport.abort()
    with pytest.raises(ServiceUnavailable, match="lost during the call"):
        await asyncio.wait_for(task, SOON)
    assert await transport.unary(ECHO, b"again", metadata=(), timeout=TIMEOUT) == b"again"
    await transport.close()


async def _serve_raw(answer: bytes, *, close: bool) -> tuple[asyncio.Server, str]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answer)
        if not close:
            await reader.read()  # until the client hangs up
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_a_server_closing_before_any_frame_suggests_tls() -> None:
    server, address = await _serve_raw(b"", close=True)
    try:
        transport = Http2Transport(address)
        for _ in range(2):
            call = transport.unary(ECHO, b"", metadata=(), timeout=None)
            with pytest.raises(TLSError, match=r"if it serves TLS, connect with TLS") as caught:
                await asyncio.wait_for(call, SOON)
            assert caught.value.address == address
        calls = [transport.unary(ECHO, b"", metadata=(), timeout=None) for _ in range(20)]
        outcomes = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), SOON)
        assert all(type(error) is TLSError for error in outcomes)
        await transport.close()
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("close", [True, False], ids=["then-close", "then-wait"])
@pytest.mark.parametrize(
    "answer", [b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n", b"\x00" * 9 + b"\xff" * 64]
)
async def test_a_server_that_does_not_speak_http2(answer: bytes, close: bool) -> None:
    server, address = await _serve_raw(answer, close=close)
    try:
        transport = Http2Transport(address)
        with pytest.raises(MicroError):
            await asyncio.wait_for(transport.unary(ECHO, b"", metadata=(), timeout=None), SOON)
        stream = transport.server_stream(DOWNLOAD, b"", metadata=(), timeout=None)
        with pytest.raises(MicroError):
            await asyncio.wait_for(anext(stream), SOON)
        await transport.close()
    finally:
        server.close()
        await server.wait_closed()


def test_one_transport_on_two_event_loops_in_turn() -> None:
    # A sync server in threads of its own: it outlives both loops.
    def echo(request: bytes, context: Any) -> bytes:
        return request

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handlers = {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        transport = Http2Transport(f"127.0.0.1:{port}")

        async def call(body: bytes, *, close: bool) -> bytes:
            answer = await transport.unary(ECHO, body, metadata=(), timeout=TIMEOUT)
            assert await transport.unary(ECHO, body, metadata=(), timeout=TIMEOUT) == answer
            if close:
                await transport.close()
            return answer

        assert asyncio.run(call(b"one", close=True)) == b"one"
        # Left open, the first loop's connection is abandoned for a new one (its socket leaks:
        # a loop's connections must be closed before it ends).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            assert asyncio.run(call(b"two", close=False)) == b"two"
            assert asyncio.run(call(b"three", close=True)) == b"three"
            gc.collect()
    finally:
        server.stop(None)


async def test_event_loops_in_several_threads_never_mix_their_frames(server: Server) -> None:
    # Frames gathered on one loop must be sent by that loop's flush only: a daemon in a test's
    # thread and a CLI, or worker threads with loops of their own, share one process.
    def calls(seed: int) -> list[bool]:
        async def run() -> list[bool]:
            transport = Http2Transport(server.address)
            try:
                sizes = [random.Random(seed + i).randrange(1, 300_000) for i in range(40)]
                answers = await asyncio.gather(
                    *(
                        transport.unary(ECHO, payload(seed + i, size), metadata=(), timeout=30)
                        for i, size in enumerate(sizes)
                    )
                )
                return [
                    answer == payload(seed + i, size)
                    for i, (answer, size) in enumerate(zip(answers, sizes, strict=True))
                ]
            finally:
                await transport.close()

        return asyncio.run(run())

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns every few bytecodes: any shared state shows
    try:
        with futures.ThreadPoolExecutor(3) as pool:
            outcomes = await asyncio.gather(
                *(asyncio.get_running_loop().run_in_executor(pool, calls, seed * 1000) for seed in range(3))
            )
    finally:
        sys.setswitchinterval(interval)
    assert all(all(ok) for ok in outcomes)
