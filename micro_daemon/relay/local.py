"""Calls the daemon answers itself, served in the relay: no hop to its gRPC server.

Most calls a daemon gets are for its building blocks (store reads and writes,
config, registry, event publishing and consuming). Relaying them to the
daemon's own ``grpc.aio`` server would cost a second hop and that server's
per-call work; instead the relay parses the request messages out of the DATA
frames, runs the block's method through the ``Dispatcher`` (the same auth
hooks, counters and error mapping as the gRPC path) and writes the responses
as DATA frames. A unary method that finishes without waiting (a cached read)
is answered within the callback that read its request (``Served``); one that
waits, and every streaming method (``ServedStream``), runs in a task. A
bidirectional method with a lane (``micro._dispatch.LocalLane``) is served
through it: it takes the request messages and sends its answers itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from micro._dispatch import LocalLane, LocalStream, LocalUnary
from micro._grpc_messages import PREFIX, Inbox, MessageError, frame_message
from micro._hpack import encode
from micro._http2 import Stream, Wakeup, flush
from micro.errors import BadRequest, MicroError, PayloadTooLarge
from micro.errors import NotImplemented as Unimplemented
from micro_daemon.relay.eager import Resumed
from micro_daemon.relay.relay import ERROR_ID, Call, Relay, end_with

__all__ = ["Serve", "grpc_timeout"]

MAX_REQUEST = 16 * 1024 * 1024  # as the daemon's gRPC server allows
REFUSAL_DELAY = 0.1  # seconds a refusal waits for the caller's first request message (see _run)
EAGER_TASKS = sys.version_info >= (3, 12)  # asyncio.Task(..., eager_start=True)
INBOX_LIMIT = 1024 * 1024  # request bytes a streaming method may leave unread before its caller waits

_RESPONSE_HEADERS = encode([(b":status", b"200"), (b"content-type", b"application/grpc")])
_OK_TRAILERS = encode([(b"grpc-status", b"0")])
_UNITS = {ord("H"): 3600.0, ord("M"): 60.0, ord("S"): 1.0, ord("m"): 1e-3, ord("u"): 1e-6, ord("n"): 1e-9}
_SKIPPED = frozenset({b"te", b"content-type", b"user-agent", b"grpc-timeout", b"grpc-encoding"})


class Serve:
    """A route's answer meaning "the daemon serves this call itself, with ``method``"."""

    __slots__ = ("method",)

    def __init__(self, method: LocalUnary | LocalStream | LocalLane) -> None:
        self.method = method

    def attach(self, call: Call, relay: Relay, headers: dict[bytes, bytes]) -> None:
        """Take over ``call``'s stream: collect its request, then answer it."""
        method = self.method
        served: Served | ServedStream
        if isinstance(method, LocalUnary):
            served = Served(call.down, method, headers, call.peer, relay)
        else:
            served = ServedStream(call.down, method, headers, call.peer)
        call.down.owner = served
        call.down.peer = None
        for payload, end in call.early or ():
            served.on_data(call.down, payload, end)
        if call.down.ended_in and not call.early:
            served.on_data(call.down, b"", True)


class Served:
    """One unary call the relay answers itself."""

    __slots__ = ("chunks", "deadline", "headers", "method", "peer", "relay", "size", "stream", "task")

    def __init__(
        self, stream: Stream, method: LocalUnary, headers: dict[bytes, bytes], peer: str, relay: Relay
    ) -> None:
        self.stream = stream
        self.method = method
        self.headers = headers
        self.peer = peer
        self.relay = relay
        self.chunks: list[bytes] = []
        self.size = 0
        self.task: asyncio.Task[None] | None = None
        timeout = headers.get(b"grpc-timeout")
        self.deadline = None if timeout is None else grpc_timeout(timeout)

    def on_data(self, stream: Stream, payload: bytes, end: bool) -> None:
        if payload:
            self.size += len(payload)
            if self.size > MAX_REQUEST + 5:
                self._answer_error(PayloadTooLarge(f"the request exceeds {MAX_REQUEST} bytes", id=ERROR_ID))
                return
            self.chunks.append(payload)
            stream.conn.give_back(stream, len(payload))  # held here, not forwarded: the caller may go on
        if end:
            self._run()

    def on_reset(self, stream: Stream, code: int) -> None:
        stream.owner = None
        if self.task is not None:
            self.task.cancel()

    def _run(self) -> None:
        data = b"".join(self.chunks)
        self.chunks = []
        if len(data) < 5:
            self._answer_error(BadRequest("the call sent no request message", id=ERROR_ID))
            return
        compressed, length = PREFIX.unpack_from(data)
        if compressed:
            self._answer_error(Unimplemented("compressed requests are not supported", id=ERROR_ID))
            return
        if length != len(data) - 5:
            self._answer_error(BadRequest("a unary call must send exactly one request message", id=ERROR_ID))
            return
        metadata = _metadata(self.headers)
        deadline = None if self.deadline is None else time.monotonic() + self.deadline
        coro = self.method(data[5:], metadata, self.peer, deadline)
        context = contextvars.copy_context()  # the handler's Context is set in it, not in ours
        # The relay's loop: get_running_loop would make a getpid system call per call (Python 3.11).
        loop = self.relay.loop or asyncio.get_running_loop()
        if EAGER_TASKS:
            # A task whose first step runs now: a method that never waits is answered in this
            # callback, and one that does runs as a task from its start (asyncio.timeout works).
            self.task = asyncio.Task(self._finish(coro), loop=loop, context=context, eager_start=True)  # type: ignore[call-arg,unused-ignore]
            return
        # Python 3.11 has no eager tasks: the first step runs here, outside any task (so a method
        # must not use asyncio.timeout before it first waits; the blocks' methods do not).
        try:
            waiting_on = context.run(coro.send, None)
        except StopIteration as done:
            self._answer(done.value)
        except MicroError as error:
            self._answer_error(error)
        else:
            self.task = loop.create_task(self._finish(Resumed(coro, waiting_on)), context=context)

    async def _finish(self, rest: Any) -> None:
        try:
            response: bytes = await rest
        except MicroError as error:
            self._answer_error(error)
        except asyncio.CancelledError:
            pass  # the caller went away
        else:
            self._answer(response)
        finally:
            flush()

    def _answer(self, response: bytes) -> None:
        stream = self.stream
        if stream.owner is not self or stream.conn.closed:
            return
        stream.owner = None
        conn = stream.conn
        conn.send_headers(stream, _RESPONSE_HEADERS, False)
        conn.send_data(stream, frame_message(response), False)
        conn.send_headers(stream, _OK_TRAILERS, True)

    def _answer_error(self, error: MicroError) -> None:
        stream = self.stream
        if stream.owner is not self or stream.conn.closed:
            return
        stream.owner = None
        end_with(stream, error, headers_sent=False)


class ServedStream:
    """One streaming call the relay answers itself: request messages in, response messages out.

    The method runs in a task of its own, in either form. A ``LocalStream``
    gets the request messages as an async iterator and yields its responses,
    each sent as it is yielded. A ``LocalLane`` gets this object as its
    ``Lane``: it takes the messages that have arrived, waits for more, and
    sends its responses itself, without the iterators' layers.

    Request messages are parsed out of DATA frames as they arrive and the
    caller's window is given back as the method reads them, so a method that
    reads slowly slows its caller. While the caller's window holds responses
    up, the method waits (before its next response, or in ``wait``), so a
    caller that reads slowly slows the method.
    """

    __slots__ = ("arrived", "deferred", "ended", "headers_sent", "inbox", "stream", "task", "waited")

    def __init__(
        self, stream: Stream, method: LocalStream | LocalLane, headers: dict[bytes, bytes], peer: str
    ) -> None:
        self.stream = stream
        self.inbox = Inbox(stream, limit=INBOX_LIMIT, max_message=MAX_REQUEST)
        self.ended = False
        self.headers_sent = False  # the response headers went out: an error goes as trailers
        self.arrived = Wakeup()  # set when a request message, or the end, arrives
        self.waited = False  # the method waited for a request since its last response
        self.deferred: tuple[MicroError, asyncio.TimerHandle] | None = None
        timeout = headers.get(b"grpc-timeout")
        seconds = None if timeout is None else grpc_timeout(timeout)
        deadline = None if seconds is None else time.monotonic() + seconds
        loop = asyncio.get_running_loop()
        # A context of its own: the method sets its Context as the current one in it.
        self.task = loop.create_task(
            self._run(method, _metadata(headers), peer, deadline), context=contextvars.copy_context()
        )

    def on_data(self, stream: Stream, payload: bytes, end: bool) -> None:
        if payload:
            try:
                self.inbox.feed(payload)
            except MessageError as refused:
                if refused.too_large:
                    self._fail(PayloadTooLarge(f"a request message exceeds {MAX_REQUEST} bytes", id=ERROR_ID))
                else:
                    self._fail(Unimplemented("compressed requests are not supported", id=ERROR_ID))
                return
        if end:
            self.ended = True
        self.arrived.set()
        if self.deferred is not None and (self.inbox.messages or self.ended):
            self._send_deferred()

    def on_reset(self, stream: Stream, code: int) -> None:
        stream.owner = None
        self.task.cancel()
        if self.deferred is not None:
            self.deferred[1].cancel()
            self.deferred = None

    # -- the Lane of a LocalLane -------------------------------------------------------------------

    def take(self) -> bytes | None:
        return self.inbox.pop()

    async def wait(self) -> bool:
        if self.stream.queue:  # the caller's window is full: wait until it reads
            await self.stream.drained.wait()
        while not self.inbox.messages:
            if self.ended:
                self._check_complete()
                return False
            await self.arrived.wait()
        return True

    def send(self, response: bytes) -> None:
        stream = self.stream
        conn = stream.conn
        if stream.owner is not self or conn.closed:
            return  # the caller went away: the task is cancelled
        if not self.headers_sent:
            conn.send_headers(stream, _RESPONSE_HEADERS, False)
            self.headers_sent = True
        conn.send_data(stream, frame_message(response), False)
        flush()

    # -- the iterators of a LocalStream ------------------------------------------------------------

    async def _requests(self) -> AsyncIterator[bytes]:
        while True:
            message = self.inbox.pop()
            if message is not None:
                yield message
            elif self.ended:
                self._check_complete()
                return
            else:
                self.waited = True
                await self.arrived.wait()

    async def _relay(self, responses: AsyncIterator[bytes]) -> None:
        """Send each response the method yields."""
        stream = self.stream
        try:
            async for response in responses:
                if stream.owner is not self or stream.conn.closed:
                    return
                self.send(response)
                if stream.queue:  # the caller's window is full: wait until it reads
                    await stream.drained.wait()
                elif not self.waited:
                    # As a gRPC server's write would: let others run before the method goes on
                    # (consumers of one group take turns only if each yields after a delivery).
                    # A method that waited for a request since its last answer has let them.
                    await asyncio.sleep(0)
                self.waited = False
        finally:
            await _close(responses)

    # -- either ------------------------------------------------------------------------------------

    def _check_complete(self) -> None:
        if self.inbox.buffer:
            raise BadRequest("the call ended inside a request message", id=ERROR_ID)

    def _fail(self, error: MicroError) -> None:
        self.task.cancel()
        self._send_error(error, headers_sent=self.headers_sent)

    async def _run(
        self,
        method: LocalStream | LocalLane,
        metadata: list[tuple[str, str]],
        peer: str,
        deadline: float | None,
    ) -> None:
        stream = self.stream
        conn = stream.conn
        try:
            if isinstance(method, LocalLane):
                await method(self, metadata, peer, deadline)
            else:
                await self._relay(method(self._requests(), metadata, peer, deadline))
        except MicroError as error:
            if not self.headers_sent and not self.inbox.messages and not self.ended and not conn.closed:
                # Refused before the caller wrote anything: answer once it does (or soon). A gRPC
                # client whose first write meets an ended call reports "Internal error from Core"
                # instead of the status it was sent.
                timer = asyncio.get_running_loop().call_later(REFUSAL_DELAY, self._send_deferred)
                self.deferred = (error, timer)
            else:
                self._send_error(error, headers_sent=self.headers_sent)
            return
        except asyncio.CancelledError:
            return
        finally:
            flush()
        if stream.owner is self and not conn.closed:
            stream.owner = None
            if not self.headers_sent:
                conn.send_headers(stream, _RESPONSE_HEADERS, False)
            # No RST_STREAM if the caller is still sending: a gRPC client whose write meets one
            # reports an internal error instead of the status; it ends its side itself.
            conn.send_headers(stream, _OK_TRAILERS, True)
            flush()

    def _send_deferred(self) -> None:
        if self.deferred is not None:
            error, timer = self.deferred
            self.deferred = None
            timer.cancel()
            self._send_error(error, headers_sent=False)

    def _send_error(self, error: MicroError, *, headers_sent: bool) -> None:
        stream = self.stream
        if stream.owner is not self or stream.conn.closed:
            return
        stream.owner = None
        # No reset: a gRPC client whose write meets one reports an internal error, not this one.
        end_with(stream, error, headers_sent=headers_sent, stop_caller=False)
        flush()


async def _close(responses: AsyncIterator[bytes]) -> None:
    close = getattr(responses, "aclose", None)
    if close is not None:
        with contextlib.suppress(BaseException):
            await close()


def _metadata(headers: dict[bytes, bytes]) -> list[tuple[str, str]]:
    """The call's metadata as the Dispatcher takes it: text keys only, no pseudo or transport headers."""
    return [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in headers.items()
        if name[:1] != b":" and name not in _SKIPPED and not name.endswith(b"-bin")
    ]


def grpc_timeout(value: bytes) -> float | None:
    """Seconds of a ``grpc-timeout`` header (``100m``, ``5S``...); ``None`` if it is not one."""
    unit = _UNITS.get(value[-1]) if value else None
    digits = value[:-1]
    if unit is None or not digits.isdigit() or len(digits) > 8:
        return None
    return int(digits) * unit
