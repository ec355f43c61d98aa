"""``Http2Transport``: gRPC calls over one plaintext HTTP/2 connection, in asyncio, without grpcio.

A call through grpcio's asyncio client costs 200-300 µs of CPU; most of it is
the hand-offs between grpc's C core, its polling thread and the event loop.
This transport speaks the same protocol (gRPC over HTTP/2, as the daemon's
relay does) from the event loop itself: a unary call is one write of HEADERS
and DATA and one read of the answer. It carries every call shape, deadlines
(``grpc-timeout`` plus a local timer), cancellation (RST_STREAM) and flow
control both ways. TLS callers use ``GrpcTransport``.

The connection opens on first use and again after it is lost; a call that
the server never started (a GOAWAY that excludes it, REFUSED_STREAM) is sent
again on a new connection, once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any
from urllib.parse import unquote

from micro._grpc_messages import Inbox, MessageError, frame_message
from micro._hpack import encode
from micro._http2 import CANCEL, REFUSED_STREAM, Connection, Stream, Wakeup, flush
from micro.errors import ConnectError, MicroError, ServiceUnavailable, TLSError, error_for_code
from micro.transport import Metadata, Transport, writer_error

__all__ = ["Http2Bidi", "Http2Transport"]

MAX_RECEIVE = 64 * 1024 * 1024  # as GrpcTransport's channel accepts
UNREAD_LIMIT = 1024 * 1024  # response bytes a caller may leave unread before the server waits
ERROR_KEY = b"micro-error"

# gRPC status code -> the HTTP code of the micro error a caller receives (as micro._grpc_errors).
_STATUS_TO_HTTP = {
    1: 499,
    2: 500,
    3: 400,
    4: 408,
    5: 404,
    6: 409,
    7: 403,
    8: 429,
    9: 400,
    10: 409,
    11: 400,
    12: 501,
    13: 500,
    14: 503,
    15: 500,
    16: 401,
}
_STATUS_NAMES = {
    1: "cancelled",
    2: "unknown",
    3: "invalid_argument",
    4: "deadline_exceeded",
    5: "not_found",
    6: "already_exists",
    7: "permission_denied",
    8: "resource_exhausted",
    9: "failed_precondition",
    10: "aborted",
    11: "out_of_range",
    12: "unimplemented",
    13: "internal",
    14: "unavailable",
    15: "data_loss",
    16: "unauthenticated",
}


class _Refused(Exception):
    """The server did not start the call: it may be sent again."""


class _Call:
    """One call's stream: response messages as they arrive, then its status."""

    __slots__ = ("arrived", "error", "finished", "headers_seen", "inbox", "listener", "started", "stream")

    def __init__(self, stream: Stream, loop: asyncio.AbstractEventLoop) -> None:
        self.stream = stream
        self.inbox = Inbox(stream, limit=UNREAD_LIMIT, max_message=MAX_RECEIVE)
        self.headers_seen = False
        self.started = False  # the server answered something: not to be sent again
        self.finished = False
        self.error: BaseException | None = None
        self.arrived = Wakeup(loop)  # set when a message, or the end, arrives
        self.listener: Callable[[], None] | None = None  # called instead, from the reading

    def on_headers(self, fields: list[tuple[bytes, bytes]], end: bool) -> None:
        self.started = True
        if not self.headers_seen:
            self.headers_seen = True
            status = dict(fields).get(b":status", b"200")
            if status != b"200":
                self._end(ServiceUnavailable(f"the server answered HTTP {status.decode()} to a gRPC call"))
                return
            if not end:
                return
        self._end(_status_error(fields))

    def on_data(self, payload: bytes, end: bool) -> None:
        self.started = True
        try:
            self.inbox.feed(payload)
        except MessageError as refused:
            if refused.too_large:
                self._end(error_for_code(413, f"a response message exceeds {MAX_RECEIVE} bytes"))
            else:
                self._end(error_for_code(501, "the server sent a compressed message"))
            return
        if end:
            self._end(ServiceUnavailable("the server ended the call without a status"))
        else:
            self._notify()

    def on_reset(self, code: int) -> None:
        if code == REFUSED_STREAM and not self.started:
            self._end(_Refused())
        elif code == CANCEL:
            self._end(error_for_code(499, "the server cancelled the call"))
        else:
            self._end(ServiceUnavailable(f"the server reset the call (HTTP/2 error {code})"))

    def lost_to(self, error: BaseException) -> None:
        """End the call with ``error`` unless it ended already."""
        self._end(error)

    def lost(self, reason: str) -> None:
        self._end(_Refused() if not self.started and reason == "refused" else ServiceUnavailable(reason))

    def _end(self, error: BaseException | None) -> None:
        if self.finished:
            return
        self.finished = True
        self.error = error
        self._notify()

    def _notify(self) -> None:
        if self.listener is not None:
            self.listener()
        else:
            self.arrived.set()

    async def next_message(self) -> bytes | None:
        """The next response message; ``None`` once the call ended well; raises its error."""
        while True:
            message = self.inbox.pop()
            if message is not None:
                return message
            if self.finished:
                if self.error is not None:
                    raise self.error
                return None
            await self.arrived.wait()


class _Connection(Connection):
    client = True

    def __init__(self, address: str) -> None:
        super().__init__()
        self.address = address
        self.loop = asyncio.get_running_loop()
        self.next_stream = 1
        self.usable = True

    def start(self, headers: bytes, end: bool) -> _Call:
        stream = Stream(self)
        call = _Call(stream, self.loop)
        stream.owner = call
        if self.closed:  # lost between connecting and this call: nothing would ever answer it
            call.lost_to(self._lost())
            return call
        self.send_headers(stream, headers, end)
        self.open(stream, self.next_stream)
        self.next_stream += 2
        if self.next_stream > 0x7FFFFFFF:
            self.usable = False
        return call

    def on_headers(self, stream_id: int, stream: Stream | None, block: bytes, end: bool) -> None:
        fields, _ = self.decoder.decode(block)  # decoded even if unwanted: it keeps the table in step
        if stream is not None and stream.owner is not None:
            stream.owner.on_headers(fields, end)

    def on_data(self, stream: Stream, payload: bytes, end: bool) -> None:
        if stream.owner is not None:
            stream.owner.on_data(payload, end)

    def on_reset(self, stream: Stream, code: int) -> None:
        if stream.owner is not None:
            stream.owner.on_reset(code)

    def on_goaway(self, last_stream: int) -> None:
        self.usable = False
        for stream_id in [i for i in self.streams if i > last_stream]:
            stream = self.streams[stream_id]
            if stream.owner is not None:
                stream.owner.lost("refused")
            self.forget(stream)

    def on_closed(self) -> None:
        self.usable = False
        for stream in list(self.streams.values()):
            if stream.owner is not None:
                stream.owner.lost_to(self._lost())

    def _lost(self) -> MicroError:
        if not self.heard:
            # A TLS server drops a plaintext client's first bytes without a word.
            return TLSError(
                f"{self.address} closed the connection before answering: if it serves TLS, connect "
                "with TLS (micro env add NAME ADDRESS --tls)",
                address=self.address,
            )
        return ServiceUnavailable("the connection to the server was lost during the call")


class Http2Transport(Transport):
    """gRPC over one plaintext HTTP/2 connection to ``address`` (``host:port``), opened on first use."""

    def __init__(self, address: str) -> None:
        self.address = address
        host, _, port = address.rpartition(":")
        self._host = host.strip("[]")
        self._port = port
        self._authority = address.encode()
        self._conn: _Connection | None = None
        self._connecting: asyncio.Future[_Connection] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- the four shapes ---------------------------------------------------------------------------

    async def unary(self, path: str, request: bytes, *, metadata: Metadata, timeout: float | None) -> bytes:
        # The deadline ends the call itself (a timer per call), rather than cancelling this task
        # through asyncio.timeout, which costs three getpid system calls and a cancellation.
        loop = asyncio.get_running_loop()
        when = None if timeout is None else loop.time() + timeout
        for attempt in (1, 2):
            conn = self._open_connection(loop)
            if conn is None:
                async with _deadline(None, at=when):
                    conn = await self._connection()
            call = conn.start(self._headers(path, metadata, timeout), False)
            conn.send_data(call.stream, frame_message(request), True)
            flush()
            expiry = None if when is None else loop.call_at(when, _expire, call)
            try:
                response = await _single(call)
            except _Refused:
                if attempt == 2:
                    raise ServiceUnavailable("the server refused the call twice") from None
                continue
            except BaseException:
                _cancel(call)
                raise
            finally:
                if expiry is not None:
                    expiry.cancel()
            return response
        raise AssertionError("unreachable")  # the second attempt returns or raises

    async def server_stream(
        self, path: str, request: bytes, *, metadata: Metadata, timeout: float | None
    ) -> AsyncIterator[bytes]:
        when = _when(timeout)
        async with _deadline(None, at=when):
            conn = await self._connection()
        call = conn.start(self._headers(path, metadata, timeout), False)
        conn.send_data(call.stream, frame_message(request), True)
        flush()
        try:
            while (message := await _next(call, when)) is not None:
                yield message
        finally:
            _cancel(call)

    async def client_stream(
        self, path: str, requests: Any, *, metadata: Metadata, timeout: float | None
    ) -> bytes:
        async with _deadline(timeout):
            conn = await self._connection()
            call = conn.start(self._headers(path, metadata, timeout), False)
            writer = asyncio.create_task(_write_all(call, _aiter(requests)))
            try:
                response = await _single(call)
            except BaseException:
                _cancel(call)
                failed = writer_error(writer)
                if failed is not None:
                    raise failed from None
                raise
            finally:
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
            return response

    async def open_bidi(self, path: str, *, metadata: Metadata, timeout: float | None) -> Http2Bidi:
        """Open a bidirectional call to write to directly (no task between the writer and the wire)."""
        conn = await self._connection()
        call = conn.start(self._headers(path, metadata, timeout), False)
        flush()
        return Http2Bidi(call)

    async def bidi_stream(
        self, path: str, requests: AsyncIterable[bytes], *, metadata: Metadata, timeout: float | None
    ) -> AsyncIterator[bytes]:
        when = _when(timeout)
        async with _deadline(None, at=when):
            conn = await self._connection()
        call = conn.start(self._headers(path, metadata, timeout), False)
        flush()
        writer = asyncio.create_task(_write_all(call, requests))
        try:
            while (message := await _next(call, when)) is not None:
                yield message
        except (Exception, asyncio.CancelledError):
            # A request that failed to come (a malformed line, say) cancelled the call: raise
            # that reason, not the cancellation it caused.
            failed = writer_error(writer)
            if failed is not None:
                raise failed from None
            raise
        finally:
            _cancel(call)
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
        failed = writer_error(writer)
        if failed is not None:
            raise failed

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and conn.transport is not None:
            conn.transport.close()

    # -- the connection ----------------------------------------------------------------------------

    def _headers(self, path: str, metadata: Metadata, timeout: float | None) -> bytes:
        fields = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", self._authority),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ]
        if timeout is not None:
            fields.append((b"grpc-timeout", _grpc_timeout(timeout)))
        fields.extend((key.lower().encode(), value.encode()) for key, value in metadata)
        return encode(fields)

    def _open_connection(self, loop: asyncio.AbstractEventLoop) -> _Connection | None:
        """The connection calls on ``loop`` go on now, if it is open and takes new calls."""
        conn = self._conn
        if conn is not None and conn.usable and not conn.closed and self._loop is loop:
            return conn
        return None

    async def _connection(self) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = self._open_connection(loop)
        if conn is not None:
            return conn
        if self._connecting is None or self._loop is not loop:
            self._loop = loop
            # A task of its own: a caller cancelled meanwhile abandons its wait, not the connecting.
            self._connecting = loop.create_task(self._connect())
            self._connecting.add_done_callback(_retrieved)  # its waiters may all be gone
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> _Connection:
        try:
            _, protocol = await asyncio.get_running_loop().create_connection(
                lambda: _Connection(self.address), self._host, int(self._port)
            )
        except (OSError, ValueError) as exc:
            raise ConnectError(f"failed to connect to {self.address}", address=self.address) from exc
        finally:
            self._connecting = None
        assert isinstance(protocol, _Connection)
        self._conn = protocol
        return protocol


def _retrieved(task: asyncio.Task[_Connection]) -> None:
    if not task.cancelled():
        task.exception()


class Http2Bidi:
    """An open bidirectional call: ``write`` sends a message now, iterating yields the answers.

    What the server's window does not take yet waits in the connection, in order.
    Iteration raises the call's error (``MicroError``); ``cancel`` ends it.
    """

    def __init__(self, call: _Call) -> None:
        self._call = call

    def write(self, message: bytes) -> None:
        call = self._call
        if call.finished:
            return  # ended: the reader gets the reason
        stream = call.stream
        stream.conn.send_data(stream, frame_message(message), False)
        flush()

    def done_writing(self) -> None:
        call = self._call
        if not call.finished and not call.stream.ended_out:
            call.stream.conn.send_data(call.stream, b"", True)
            flush()

    def cancel(self) -> None:
        _cancel(self._call)

    def listen(
        self, on_message: Callable[[bytes], None], on_end: Callable[[BaseException | None], None]
    ) -> None:
        """Have each answer handed to ``on_message`` as it arrives, from the connection's reading
        (no task between), then the call's end to ``on_end`` (its error, or None); instead of
        iterating. The callbacks must not raise or wait."""
        call = self._call

        def deliver() -> None:
            while (message := call.inbox.pop()) is not None:
                on_message(message)
            if call.finished:
                call.listener = None
                on_end(None if call.error is None else _surfaced(call.error))

        call.listener = deliver
        deliver()

    def __aiter__(self) -> Http2Bidi:
        return self

    async def __anext__(self) -> bytes:
        message = await _next(self._call, None)
        if message is None:
            raise StopAsyncIteration
        return message


async def _single(call: _Call) -> bytes:
    response = await call.next_message()
    if response is None:
        raise error_for_code(500, "the server sent no response message")
    if await call.next_message() is not None:
        raise error_for_code(500, "the server sent more than one response message")
    return response


async def _next(call: _Call, when: float | None) -> bytes | None:
    # The deadline times each wait, not the stream's whole body: a timer running across a yield
    # would cancel the consumer's own code instead.
    try:
        if when is None:
            return await call.next_message()
        async with _deadline(None, at=when):
            return await call.next_message()
    except _Refused as refused:
        raise _surfaced(refused) from None


def _surfaced(error: BaseException) -> BaseException:
    """A call's error as its caller sees it: a refusal, retried no more, is unavailability."""
    return ServiceUnavailable("the server refused the call") if isinstance(error, _Refused) else error


def _when(timeout: float | None) -> float | None:
    return None if timeout is None else asyncio.get_running_loop().time() + timeout


async def _write_all(call: _Call, requests: AsyncIterable[bytes]) -> Exception | None:
    """Send ``requests`` on ``call``'s stream as the window allows; if producing one fails, reset
    the call and return why."""
    stream = call.stream
    conn = stream.conn
    try:
        async for request in requests:
            if call.finished:
                return None
            conn.send_data(stream, frame_message(request), False)
            flush()
            if stream.queue:  # the server's window is full: wait until it reads
                await stream.drained.wait()
        if not call.finished:
            conn.send_data(stream, b"", True)
            flush()
    except Exception as exc:
        _cancel(call)
        return exc
    return None


async def _aiter(requests: Any) -> AsyncIterator[bytes]:
    if hasattr(requests, "__aiter__"):
        async for request in requests:
            yield request
    else:
        for request in requests:
            yield request


def _expire(call: _Call) -> None:
    """``call``'s deadline passed: it ends with ``Timeout`` (408), and the server's side too."""
    _cancel(call, error_for_code(408, "request timed out"))


def _cancel(call: _Call, error: MicroError | None = None) -> None:
    """End ``call`` here (waking whoever waits on it) and tell the server to stop it if it has
    not ended both ways (RST_STREAM CANCEL)."""
    call.lost_to(error or error_for_code(499, "the call was cancelled"))
    stream = call.stream
    conn = stream.conn
    if not conn.closed and conn.streams.get(stream.id) is stream:
        conn.reset(stream, CANCEL)
        flush()


class _deadline:
    """``asyncio.timeout`` that raises micro's ``Timeout`` (408) instead of ``TimeoutError``."""

    def __init__(self, timeout: float | None, *, at: float | None = None) -> None:
        self._timeout = asyncio.timeout(timeout) if at is None else asyncio.timeout_at(at)

    async def __aenter__(self) -> None:
        await self._timeout.__aenter__()

    async def __aexit__(self, kind: Any, exc: Any, tb: Any) -> None:
        try:
            await self._timeout.__aexit__(kind, exc, tb)
        except TimeoutError:
            raise error_for_code(408, "request timed out") from None


def _status_error(fields: list[tuple[bytes, bytes]]) -> MicroError | None:
    """The error a call's trailers carry, ``None`` for OK (as ``micro._grpc_errors.error_from_rpc``)."""
    trailers = dict(fields)
    status = trailers.get(b"grpc-status")
    if status is None:
        return ServiceUnavailable("the server ended the call without a gRPC status")
    code = int(status) if status.isdigit() else 2
    if code == 0:
        return None
    payload = trailers.get(ERROR_KEY)
    if payload:
        try:
            return MicroError.from_dict(json.loads(payload))
        except (ValueError, TypeError):
            pass  # a malformed trailer falls back to the status below
    details = unquote(trailers.get(b"grpc-message", b"").decode("utf-8", "replace"))
    if code == 8 and "larger than max" in details:
        return error_for_code(413, f"the message is larger than the receiver accepts ({details})")
    if code == 4:
        return error_for_code(408, "request timed out")
    return error_for_code(_STATUS_TO_HTTP.get(code, 500), details or _STATUS_NAMES.get(code, "unknown"))


def _grpc_timeout(seconds: float) -> bytes:
    """``grpc-timeout``: at most 8 digits and a unit (milliseconds, or seconds when that is too long)."""
    micros = max(int(seconds * 1_000_000), 1)
    if micros < 100_000_000:
        return b"%du" % micros
    millis = micros // 1000
    if millis < 100_000_000:
        return b"%dm" % millis
    return b"%dS" % min(micros // 1_000_000, 99_999_999)
