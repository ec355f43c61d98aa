"""HTTP/2 (RFC 9113) connections: frames in, frames out, flow control, nothing of gRPC.

Shared by the daemon's relay (``micro_daemon.relay``) and micro's client transport
(``micro.http2_transport``). A ``Connection`` parses what its peer sends, answers SETTINGS and PING
itself, and hands streams' HEADERS, DATA and RST_STREAM to its subclass. The
relay joins two streams (one per connection) into a pair: what one receives
the other sends. Sending respects the peer's windows; what does not fit waits
in the stream's queue until a WINDOW_UPDATE. A stream's receive window is
given back only when its data has gone out on the other side, so a slow
receiver slows its sender and the relay holds at most one window per stream.

Writes are gathered per connection and sent once per event-loop callback
(``flush``): a response's HEADERS, DATA and trailers leave in one ``send``.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import threading
from collections import deque
from typing import Any, cast

from micro._hpack import Decoder, HPACKError
from micro._reads import BufferedReads, ReadFuture

__all__ = [
    "CANCEL",
    "END_STREAM",
    "INTERNAL_ERROR",
    "NO_ERROR",
    "PREFACE",
    "REFUSED_STREAM",
    "Connection",
    "ProtocolError",
    "Stream",
    "Wakeup",
    "flush",
]

log = logging.getLogger("micro.http2")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    range(10)
)
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 0x5, 0x6, 0x7, 0x8, 0x9

S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

DEFAULT_WINDOW = 65_535
MAX_FRAME = 16_384  # what we accept; every peer accepts at least this much
STREAM_WINDOW = 1 << 20  # per stream we receive on: what the relay may hold for it
CONNECTION_WINDOW = 1 << 30  # given back as it arrives; the streams' windows bound what is held
MAX_WINDOW = (1 << 31) - 1

_HEAD = struct.Struct(">BHBBI")
_SETTING = struct.Struct(">HI")
_U32 = struct.Struct(">I")
_GOAWAY = struct.Struct(">II")


class ProtocolError(Exception):
    """The peer broke HTTP/2: the connection ends with GOAWAY and ``code``."""

    def __init__(self, message: str, code: int = PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    length = len(payload)
    return _HEAD.pack(length >> 16, length & 0xFFFF, kind, flags, stream) + payload


def settings_frame(settings: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in settings.items()))


class Wakeup:
    """One task waits (``wait``) until something it checks may have changed (``set``).

    Check the state, then wait if it is not ready: a ``set`` while nobody waits is dropped.
    """

    __slots__ = ("_future", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._future: asyncio.Future[None] | None = None
        self._loop = loop  # else looked up at the first wait, once: get_running_loop makes a getpid

    async def wait(self) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._future = ReadFuture(loop=loop)  # set by a read: resumes as it ends
        await self._future

    def set(self) -> None:
        future, self._future = self._future, None
        if future is not None and not future.done():
            future.set_result(None)


class Stream:
    """One side of a relayed call on one connection; ``peer`` is the other side."""

    __slots__ = (
        "conn",
        "credit",
        "drained",
        "ended_in",
        "ended_out",
        "id",
        "owner",
        "peer",
        "queue",
        "window",
    )

    def __init__(self, conn: Connection, stream_id: int = 0) -> None:
        self.conn = conn
        self.id = stream_id  # 0 until an outgoing stream is opened
        self.peer: Stream | None = None
        self.owner: Any = None  # the relay's call this stream belongs to
        self.window = conn.peer_initial_window  # what the peer lets us send on it
        self.queue: deque[tuple[int, bytes, bool]] = deque()  # (DATA|HEADERS, payload, end) waiting
        self.credit = 0  # bytes received on it and forwarded, not yet given back
        self.ended_in = False  # the peer sent END_STREAM
        self.ended_out = False  # we sent END_STREAM
        self.drained = Wakeup()  # set when the queue empties or the stream ends


class _Dirty(threading.local):
    """The connections with frames gathered and not sent yet, of this thread's event loop.

    Per thread: a process may run event loops in several threads (a daemon in a test's thread,
    a service's client in a worker thread), and a flush in one must never send, or clear,
    another loop's frames.
    """

    def __init__(self) -> None:
        self.connections: list[Connection] = []


_dirty = _Dirty()


def flush() -> None:
    """Send what every connection gathered during this callback. Call it at the end of each entry point."""
    dirty = _dirty.connections
    while dirty:
        conn = dirty.pop()
        conn.dirty = False
        out = conn.out
        if out and conn.transport is not None:
            conn.transport.write(b"".join(out) if len(out) > 1 else out[0])
        out.clear()


class Connection(BufferedReads):
    """One HTTP/2 connection, either side; subclasses implement ``on_*`` for streams and its end."""

    client = False  # the side that sends the preface and opens odd streams

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] = []
        self.dirty = False
        self.streams: dict[int, Stream] = {}
        # We ask for no dynamic table (SETTINGS_HEADER_TABLE_SIZE 0), but until the peer has read
        # that it may use the default 4096 bytes: blocks arrive self-contained soon after.
        self.decoder = Decoder(4096)
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = MAX_FRAME
        self.window = DEFAULT_WINDOW  # connection-level: what the peer lets us send
        self.blocked: dict[Stream, None] = {}  # streams with queued output, in order
        self.closed = False
        self.goaway: int | None = None  # the last stream id of a GOAWAY the peer sent
        self.heard = False  # a whole frame arrived: the peer speaks HTTP/2
        self._buffer = b""
        self._preface = self.client  # whether the preface is behind us: a server waits for the client's
        self._received = 0  # connection-level bytes received not yet given back
        self._continuing: tuple[int, int, list[bytes]] | None = None  # (stream, flags, fragments)

    # -- the subclass's part --------------------------------------------------------------------

    def on_headers(self, stream_id: int, stream: Stream | None, block: bytes, end: bool) -> None:
        """A header block on ``stream_id``; ``stream`` is ``None`` if it is not (or no longer) tracked."""
        raise NotImplementedError

    def on_data(self, stream: Stream, payload: bytes, end: bool) -> None:
        raise NotImplementedError

    def on_reset(self, stream: Stream, code: int) -> None:
        raise NotImplementedError

    def on_goaway(self, last_stream: int) -> None:
        """The peer will take no stream above ``last_stream``."""

    def on_closed(self) -> None:
        """The connection is gone: every stream still in ``streams`` ended with it."""

    # -- asyncio, reading into the thread's buffer (BufferedReads) ------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                import socket

                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass  # a Unix socket
        settings = {
            S_HEADER_TABLE_SIZE: 0,
            S_ENABLE_PUSH: 0,
            S_INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            S_MAX_HEADER_LIST_SIZE: 1 << 20,
        }
        hello = settings_frame(settings) + frame(
            WINDOW_UPDATE, 0, 0, _U32.pack(CONNECTION_WINDOW - DEFAULT_WINDOW)
        )
        self.write(PREFACE + hello if self.client else hello)
        flush()

    def data_received(self, data: bytes) -> None:
        try:
            self._receive(data)
        except ProtocolError as error:
            self.fail(str(error), error.code)
        except HPACKError as error:
            self.fail(f"bad header block: {error}", COMPRESSION_ERROR)
        finally:
            flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        try:
            self.on_closed()
        finally:
            self.streams.clear()
            self.blocked.clear()
            flush()

    # -- sending ---------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        self.out.append(data)
        if not self.dirty:
            self.dirty = True
            _dirty.connections.append(self)

    def send_headers(self, stream: Stream, block: bytes, end: bool) -> None:
        """Send a header block on ``stream`` (after whatever it has queued)."""
        if stream.queue or not stream.id:
            stream.queue.append((HEADERS, block, end))
            return
        self._write_headers(stream, block, end)

    def send_data(self, stream: Stream, payload: bytes, end: bool) -> None:
        """Send ``payload`` on ``stream`` as far as the windows allow; queue the rest."""
        if stream.queue or not stream.id:
            stream.queue.append((DATA, payload, end))
            if stream.id:
                self.blocked[stream] = None
            return
        self._write_data(stream, payload, end)

    def reset(self, stream: Stream, code: int) -> None:
        """End ``stream`` at once with RST_STREAM ``code``, dropping what it has queued."""
        stream.queue.clear()
        self.blocked.pop(stream, None)
        if stream.id and not self.closed:
            self.write(frame(RST_STREAM, 0, stream.id, _U32.pack(code)))
        self.forget(stream)

    def reset_after(self, stream: Stream, code: int) -> None:
        """End ``stream`` with RST_STREAM ``code`` once what it has queued has gone out."""
        if stream.queue:
            stream.queue.append((RST_STREAM, _U32.pack(code), True))
        else:
            self.reset(stream, code)

    def open(self, stream: Stream, stream_id: int) -> None:
        """Give an outgoing ``stream`` its id and send what it queued (its HEADERS first)."""
        stream.id = stream_id
        stream.window = self.peer_initial_window
        self.streams[stream_id] = stream
        self._drain(stream)

    def forget(self, stream: Stream) -> None:
        """Stop tracking ``stream``: both directions ended, or it was reset."""
        if self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
        self.blocked.pop(stream, None)
        _wake(stream)

    def give_back(self, stream: Stream, count: int) -> None:
        """``count`` bytes received on ``stream`` went out on the other side: let the peer send more."""
        if stream.ended_in or self.closed:
            return
        stream.credit += count
        if stream.credit >= STREAM_WINDOW // 4:
            self.write(frame(WINDOW_UPDATE, 0, stream.id, _U32.pack(stream.credit)))
            stream.credit = 0

    def fail(self, reason: str, code: int = PROTOCOL_ERROR) -> None:
        """End the connection: GOAWAY with ``code``, then close."""
        log.warning("relay connection ended: %s", reason)
        last = max(self.streams, default=0)
        self.write(frame(GOAWAY, 0, 0, _GOAWAY.pack(last, code) + reason.encode()[:200]))
        flush()
        if self.transport is not None:
            self.transport.close()

    def _write_headers(self, stream: Stream, block: bytes, end: bool) -> None:
        flags = END_STREAM if end else 0
        limit = self.peer_max_frame
        if len(block) <= limit:
            self.write(frame(HEADERS, flags | END_HEADERS, stream.id, block))
        else:
            self.write(frame(HEADERS, flags, stream.id, block[:limit]))
            rest = block[limit:]
            while rest:
                chunk, rest = rest[:limit], rest[limit:]
                self.write(frame(CONTINUATION, 0 if rest else END_HEADERS, stream.id, chunk))
        if end:
            self._ended_out(stream)

    def _write_data(self, stream: Stream, payload: bytes, end: bool) -> bool:
        """Write as much as fits; queue the rest first in line. True if all of it went."""
        size = len(payload)
        room = stream.window if stream.window < self.window else self.window  # min() parses its arguments
        if size > room:
            if room > 0:
                self._write_data(stream, payload[:room], False)
            stream.queue.appendleft((DATA, payload[room:], end))
            self.blocked[stream] = None
            return False
        stream.window -= size
        self.window -= size
        limit = self.peer_max_frame
        if size <= limit:
            self.write(frame(DATA, END_STREAM if end else 0, stream.id, payload))
        else:  # a message of ours, not a forwarded frame: in frames the peer accepts
            for offset in range(0, size, limit):
                last = offset + limit >= size
                chunk = payload[offset : offset + limit]
                self.write(frame(DATA, END_STREAM if end and last else 0, stream.id, chunk))
        source = stream.peer
        if source is not None and size:
            source.conn.give_back(source, size)
        if end:
            self._ended_out(stream)
        return True

    def _drain(self, stream: Stream) -> None:
        queue = stream.queue
        while queue:
            kind, payload, end = queue.popleft()
            if kind == HEADERS:
                self._write_headers(stream, payload, end)
            elif kind == RST_STREAM:
                if not (stream.ended_in and stream.ended_out):  # else closed already: nothing to reset
                    self.reset(stream, _U32.unpack(payload)[0])
                return
            elif not self._write_data(stream, payload, end):
                return
        self.blocked.pop(stream, None)
        _wake(stream)

    def _ended_out(self, stream: Stream) -> None:
        stream.ended_out = True
        if stream.ended_in:
            self.forget(stream)

    # -- receiving -------------------------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        offset = 0
        if not self._preface:
            if len(buffer) < len(PREFACE):
                self._buffer = buffer
                return
            if not buffer.startswith(PREFACE):
                raise ProtocolError("not an HTTP/2 client (bad connection preface)")
            self._preface = True
            offset = len(PREFACE)
        end = len(buffer)
        unpack = _HEAD.unpack_from
        while end - offset >= 9:
            high, low, kind, flags, stream_id = unpack(buffer, offset)
            length = (high << 16) | low
            if length > MAX_FRAME:
                raise ProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME}", FRAME_SIZE_ERROR)
            if end - offset - 9 < length:
                break
            payload = buffer[offset + 9 : offset + 9 + length]
            offset += 9 + length
            self._frame(kind, flags, stream_id & 0x7FFFFFFF, payload)
            if self.closed:
                return
        self._buffer = buffer[offset:] if offset < end else b""

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        self.heard = True
        if self._continuing is not None and kind != CONTINUATION:
            raise ProtocolError("a header block was interrupted by another frame")
        if kind == DATA:
            self._data(flags, stream_id, payload)
        elif kind == HEADERS:
            self._headers(flags, stream_id, payload)
        elif kind == CONTINUATION:
            self._continuation(flags, stream_id, payload)
        elif kind == WINDOW_UPDATE:
            self._window_update(stream_id, payload)
        elif kind == RST_STREAM:
            stream = self.streams.get(stream_id)
            if stream is not None:
                self.forget(stream)  # through the subclass: a draining connection may close now
                stream.queue.clear()
                self.on_reset(stream, _U32.unpack(payload)[0] if len(payload) == 4 else INTERNAL_ERROR)
        elif kind == SETTINGS:
            if not flags & ACK:
                self._settings(payload)
        elif kind == PING:
            if not flags & ACK:
                self.write(frame(PING, ACK, 0, payload))
        elif kind == GOAWAY:
            last = _U32.unpack_from(payload)[0] & 0x7FFFFFFF if len(payload) >= 8 else 0
            self.goaway = last
            self.on_goaway(last)
        elif kind == PUSH_PROMISE:
            raise ProtocolError("PUSH_PROMISE although push is disabled")
        # PRIORITY and unknown frame types are ignored (RFC 9113 §5.5)

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        size = len(payload)
        self._received += size
        if self._received >= CONNECTION_WINDOW // 2:
            self.write(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._received)))
            self._received = 0
        if flags & PADDED:
            payload = _unpad(payload)
        stream = self.streams.get(stream_id)
        if stream is None:
            return  # a stream we reset or finished: its late data is dropped
        if len(payload) < size:
            self.give_back(stream, size - len(payload))  # the padding, which never goes out
        end = bool(flags & END_STREAM)
        if end:
            stream.ended_in = True
        self.on_data(stream, payload, end)
        if end and stream.ended_out:
            self.forget(stream)

    def _headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if flags & PADDED:
            payload = _unpad(payload)
        if flags & PRIORITY_FLAG:
            payload = payload[5:]
        if flags & END_HEADERS:
            self._header_block(stream_id, flags, payload)
        else:
            self._continuing = (stream_id, flags, [payload])

    def _continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        if self._continuing is None or self._continuing[0] != stream_id:
            raise ProtocolError("CONTINUATION without a header block to continue")
        self._continuing[2].append(payload)
        if flags & END_HEADERS:
            _, first_flags, fragments = self._continuing
            self._continuing = None
            self._header_block(stream_id, first_flags, b"".join(fragments))

    def _header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        end = bool(flags & END_STREAM)
        stream = self.streams.get(stream_id)
        if end and stream is not None:
            stream.ended_in = True
        self.on_headers(stream_id, stream, block, end)
        if end and stream is not None and stream.ended_out:
            self.forget(stream)

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolError("WINDOW_UPDATE of other than 4 bytes", FRAME_SIZE_ERROR)
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            self.window += increment
            if self.window > MAX_WINDOW:
                raise ProtocolError("connection window overflow", FLOW_CONTROL_ERROR)
            for stream in list(self.blocked):
                self._drain(stream)
                if self.window <= 0:
                    break
            return
        target = self.streams.get(stream_id)
        if target is not None:
            target.window += increment
            if target.queue:
                self._drain(target)

    def _settings(self, payload: bytes) -> None:
        for offset in range(0, len(payload) - len(payload) % 6, 6):
            key, value = _SETTING.unpack_from(payload, offset)
            if key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError("initial window too large", FLOW_CONTROL_ERROR)
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for stream in self.streams.values():
                    stream.window += delta
            elif key == S_MAX_FRAME_SIZE:
                self.peer_max_frame = value
        self.write(frame(SETTINGS, ACK, 0))
        for stream in list(self.blocked):
            self._drain(stream)


def _wake(stream: Stream) -> None:
    stream.drained.set()


def _unpad(payload: bytes) -> bytes:
    if not payload:
        raise ProtocolError("padded frame without a pad length")
    pad = payload[0]
    if pad >= len(payload):
        raise ProtocolError("padding longer than the frame")
    return payload[1 : len(payload) - pad]
