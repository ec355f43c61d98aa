"""The relay: each gRPC call routed to a node's HTTP/2 connection, its frames copied, never terminated.

A caller's connection (``Downstream``) may carry calls for many services; each
call's HEADERS are parsed to find where it goes (``Router.route``), then the
call becomes a stream on a pooled connection to that node (``Upstream``) and
every frame of it is copied across: header blocks as they are (see
``hpack``), DATA as it is, with stream ids rewritten and flow control kept on
each side. Nothing of the gRPC message is decoded, so a call costs the relay a
few dictionary lookups and buffer copies, not a gRPC server's and a gRPC
client's work.

A call that fails to reach its node before any answer (connection refused,
a GOAWAY that excludes it, REFUSED_STREAM) is sent to another node, once, if
the relay still holds what the caller sent (up to ``REPLAY_LIMIT`` bytes).
The relay answers by itself only to say why a call was not forwarded: a gRPC
trailers-only response with the micro error in ``micro-error``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ssl import SSLContext
from typing import Protocol
from urllib.parse import quote

from micro._grpc_errors import ERROR_METADATA_KEY, grpc_status_for
from micro._hpack import encode
from micro._http2 import CANCEL, NO_ERROR, REFUSED_STREAM, Connection, ProtocolError, Stream, flush
from micro.errors import InternalServerError, MicroError, ServiceUnavailable

__all__ = ["Call", "Destination", "Handover", "Relay", "Route", "Router", "end_with", "error_block"]

log = logging.getLogger("micro.relay")

ATTEMPTS = 2  # the first node, then one other
REPLAY_LIMIT = 64 * 1024  # request bytes kept per call until its first answer, to try another node
DEAD_FOR = 3.0
DRAIN_GRACE = 30.0
ERROR_ID = "micro.proxy"


@dataclass(frozen=True)
class Destination:
    """Where a call goes: ``pick`` gives the next node's address (or ``None``), skipping ``exclude``.

    ``vouch``, if set, gives header fields to add to the call's own, from the caller's address.
    """

    name: str
    pick: Callable[[dict[str, float], str | None], str | None]
    vouch: Callable[[str], bytes] | None = None


class Handover(Protocol):
    """A route's answer meaning "not forwarded: this takes the call over" (see ``local.Serve``).

    ``attach`` makes itself the owner of ``call.down`` (``Stream.owner``), so it
    gets the stream's ``on_data(stream, payload, end)`` and ``on_reset(stream,
    code)``, and answers the caller itself.
    """

    def attach(self, call: Call, relay: Relay, headers: dict[bytes, bytes]) -> None: ...


Route = Destination | Handover


class Router(Protocol):
    """Decides each call's destination from its request headers (pseudo-headers and metadata)."""

    def route(self, headers: dict[bytes, bytes], peer: str) -> Route | Awaitable[Route]:
        """The call's destination, or raise ``MicroError`` to answer the caller with it."""
        ...


class Call:
    """One relayed call: the caller's stream, the node's stream, what to replay on another node."""

    __slots__ = (
        "address",
        "answered",
        "attempts",
        "block",
        "destination",
        "down",
        "early",
        "peer",
        "replay",
        "replayed",
        "up",
    )

    def __init__(self, down: Stream, block: bytes, peer: str) -> None:
        self.down: Stream = down
        self.peer = peer  # the caller's address
        self.up: Stream | None = None
        self.block = block
        self.destination: Destination | None = None
        self.address: str | None = None
        self.attempts = 0
        self.early: list[tuple[bytes, bool]] | None = []  # request data until the call has a node
        self.replay: list[tuple[bytes, bool]] | None = []  # request data until the first answer
        self.replayed = 0
        self.answered = False  # the node's response headers went to the caller


class Relay:
    """The relay's listeners, its pool of node connections and its ``Router``."""

    def __init__(self, router: Router, *, dead_for: float = DEAD_FOR, grace: float = DRAIN_GRACE) -> None:
        self.router = router
        self.dead: dict[str, float] = {}
        self._dead_for = dead_for
        self._grace = grace
        self._pool: dict[str, Upstream] = {}
        self._servers: list[asyncio.AbstractServer] = []
        self.loop: asyncio.AbstractEventLoop | None = None  # the one it listens on, once it does
        self._downstreams: set[Downstream] = set()
        self._upstreams: set[Upstream] = set()

    async def listen(self, host: str, port: int, *, ssl: SSLContext | None = None) -> int:
        """Accept callers on ``host:port`` (0: any free port); returns the port."""
        loop = self.loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Downstream(self), host, port, ssl=ssl)
        self._servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and close every connection. Never raises."""
        for server in self._servers:
            server.close()
        for conn in [*self._downstreams, *self._upstreams]:
            if conn.transport is not None:
                conn.transport.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()

    def discard(self, address: str) -> None:
        """``address`` left the registry: its connection takes no new call and closes once idle."""
        self.dead.pop(address, None)
        conn = self._pool.pop(address, None)
        if conn is not None:
            conn.drain(self._grace)

    # -- calls -----------------------------------------------------------------------------------

    def start(self, call: Call, headers: dict[bytes, bytes], peer: str) -> None:
        try:
            found = self.router.route(headers, peer)
        except MicroError as error:
            self.answer(call, error)
            return
        except Exception as exc:  # as in _route_later: this call fails, not the caller's connection
            log.exception("routing a call failed")
            self.answer(call, InternalServerError(f"the proxy failed to route the call: {exc}", id=ERROR_ID))
            return
        if isinstance(found, Awaitable):
            asyncio.get_running_loop().create_task(self._route_later(call, found, headers))
        else:
            self._routed(call, found, headers)

    async def _route_later(self, call: Call, pending: Awaitable[Route], headers: dict[bytes, bytes]) -> None:
        try:
            destination = await pending
        except MicroError as error:
            self.answer(call, error)
        except Exception as exc:  # a bug: the caller gets a 500, the log the traceback
            log.exception("routing a call failed")
            self.answer(call, InternalServerError(f"the proxy failed to route the call: {exc}", id=ERROR_ID))
        else:
            self._routed(call, destination, headers)
        finally:
            flush()

    def _routed(self, call: Call, destination: Route, headers: dict[bytes, bytes]) -> None:
        if call.down.conn.closed or call.down.owner is None:
            return  # the caller went away (or reset the call) while it was being routed
        if not isinstance(destination, Destination):
            destination.attach(call, self, headers)
            return
        call.destination = destination
        if destination.vouch is not None:
            call.block += destination.vouch(call.peer)
        self._attempt(call, None)

    def _attempt(self, call: Call, reason: str | None) -> None:
        """Send ``call`` to a node it has not failed on, or answer why none could take it."""
        destination = call.destination
        assert destination is not None
        address = None
        # A first attempt sends what ``early`` holds, however much; only another needs the replay.
        if call.attempts == 0 or (call.attempts < ATTEMPTS and call.replay is not None):
            address = destination.pick(self.dead, call.address)
        if address is None:
            detail = f": {reason}" if reason else ""
            self.answer(
                call, ServiceUnavailable(f"service {destination.name!r} is unavailable{detail}", id=ERROR_ID)
            )
            return
        call.attempts += 1
        call.address = address
        conn = self._connection(address)
        up = Stream(conn)
        up.owner = call
        up.peer = call.down
        call.down.peer = up
        call.up = up
        conn.send_headers(up, call.block, call.down.ended_in and not call.early and not call.replay)
        # What the caller sent so far: replayed on a second attempt, waiting on the first.
        sent = call.replay if call.attempts > 1 else call.early
        for payload, end in sent or ():
            conn.send_data(up, payload, end)
        call.early = None
        conn.request(up)

    def retry(self, call: Call, reason: str) -> None:
        """The node did not take ``call``: try another, or answer the caller."""
        if call.up is not None:
            call.up.owner = None
        call.up = None
        call.down.peer = None
        self._attempt(call, reason)

    def answer(self, call: Call, error: MicroError) -> None:
        """End the caller's call with ``error`` (a trailers-only response, or trailers after headers)."""
        down = call.down
        down.owner = None
        if down.conn.closed or down.ended_out or down.conn.streams.get(down.id) is not down:
            return  # over already, or reset by the caller (while it was routed): nothing may follow
        end_with(down, error, headers_sent=call.answered)

    def mark_dead(self, address: str) -> None:
        log.debug("node %s unreachable; skipping it for %.0fs", address, self._dead_for)
        self.dead[address] = time.monotonic() + self._dead_for

    def _connection(self, address: str) -> Upstream:
        conn = self._pool.get(address)
        if conn is None or conn.draining:
            conn = self._pool[address] = Upstream(self, address)
            asyncio.get_running_loop().create_task(conn.connect())
        return conn

    def _gone(self, conn: Upstream) -> None:
        if self._pool.get(conn.address) is conn:
            del self._pool[conn.address]


class Downstream(Connection):
    """A caller's connection: each new stream is a call to route."""

    def __init__(self, relay: Relay) -> None:
        super().__init__()
        self.relay = relay
        self.last_stream = 0
        self.peer_address = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.peer_address = peer[0] if isinstance(peer, tuple) else ""
        self.relay._downstreams.add(self)
        super().connection_made(transport)

    def on_headers(self, stream_id: int, stream: Stream | None, block: bytes, end: bool) -> None:
        fields, dynamic = self.decoder.decode(block)
        if stream is not None:  # trailers from the caller (gRPC callers send none, but HTTP/2 allows them)
            up = stream.peer
            if up is not None:
                up.conn.send_headers(up, encode(fields) if dynamic else block, end)
            return
        if not stream_id % 2:
            raise ProtocolError(f"stream {stream_id} cannot open a new call")
        if stream_id <= self.last_stream:
            return  # a closed stream's: after our RST_STREAM the caller's late frames are ignored
        self.last_stream = stream_id
        stream = Stream(self, stream_id)
        stream.ended_in = end
        self.streams[stream_id] = stream
        call = Call(stream, encode(fields) if dynamic else block, self.peer_address)
        stream.owner = call
        self.relay.start(call, dict(fields), self.peer_address)

    def on_data(self, stream: Stream, payload: bytes, end: bool) -> None:
        call = stream.owner
        if call is None:
            return  # answered by the relay already
        if type(call) is not Call:
            call.on_data(stream, payload, end)  # a Handover's
            return
        if call.replay is not None:
            call.replayed += len(payload)
            if call.replayed > REPLAY_LIMIT:
                call.replay = None
            else:
                call.replay.append((payload, end))
        up = stream.peer
        if up is None:
            if call.early is not None:
                call.early.append((payload, end))
            return
        up.conn.send_data(up, payload, end)

    def on_reset(self, stream: Stream, code: int) -> None:
        owner = stream.owner
        if owner is not None and type(owner) is not Call:
            owner.on_reset(stream, code)  # a Handover's
        stream.owner = None
        up = stream.peer
        if up is not None:
            up.owner = None
            up.conn.reset(up, CANCEL)

    def on_closed(self) -> None:
        self.relay._downstreams.discard(self)
        for stream in list(self.streams.values()):
            self.on_reset(stream, CANCEL)


class Upstream(Connection):
    """The relay's connection to one node: calls become streams on it, opened in order."""

    client = True

    def __init__(self, relay: Relay, address: str) -> None:
        super().__init__()
        self.relay = relay
        self.address = address
        self.next_stream = 1
        self.draining = False
        self.waiting: list[Stream] = []  # streams to open once connected
        self._drain_timer: asyncio.TimerHandle | None = None

    async def connect(self) -> None:
        host, _, port = self.address.rpartition(":")
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: self, host.strip("[]"), int(port))
        except (OSError, ValueError) as exc:
            self.relay.mark_dead(self.address)
            self.relay._gone(self)
            self.closed = True
            waiting, self.waiting = self.waiting, []
            for stream in waiting:
                call: Call | None = stream.owner
                if call is not None:
                    self.relay.retry(call, _reason(exc))
            flush()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.relay._upstreams.add(self)
        super().connection_made(transport)
        waiting, self.waiting = self.waiting, []
        for stream in waiting:
            if stream.owner is not None:
                self._open(stream)
        flush()

    def request(self, stream: Stream) -> None:
        """Open ``stream`` (whose HEADERS are queued) now, or once connected."""
        if self.transport is None:
            self.waiting.append(stream)
        else:
            self._open(stream)

    def _open(self, stream: Stream) -> None:
        self.open(stream, self.next_stream)
        self.next_stream += 2
        if self.next_stream > 0x7FFFFFFF:
            self.relay._gone(self)
            self.drain(self.relay._grace)

    def drain(self, grace: float) -> None:
        """Take no new call; close once the calls in flight end, or after ``grace`` seconds."""
        self.draining = True
        if not self.streams and not self.waiting:
            self._close()
        elif self._drain_timer is None and not self.closed:
            self._drain_timer = asyncio.get_running_loop().call_later(grace, self._close)

    def forget(self, stream: Stream) -> None:
        super().forget(stream)
        if self.draining and not self.streams and not self.waiting:
            self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def on_headers(self, stream_id: int, stream: Stream | None, block: bytes, end: bool) -> None:
        fields, dynamic = self.decoder.decode(block)
        if stream is None:
            return  # a call we reset
        call: Call | None = stream.owner
        down = stream.peer
        if call is None or down is None:
            return
        call.replay = None  # answered: never replayed from here on
        call.answered = True
        down.conn.send_headers(down, encode(fields) if dynamic else block, end)
        if end:
            down.owner = None

    def on_data(self, stream: Stream, payload: bytes, end: bool) -> None:
        down = stream.peer
        if down is not None and stream.owner is not None:
            down.conn.send_data(down, payload, end)

    def on_reset(self, stream: Stream, code: int) -> None:
        call: Call | None = stream.owner
        down = stream.peer
        if call is None or down is None:
            return
        if code == REFUSED_STREAM and call.replay is not None:
            self.relay.retry(call, "the node refused the call")
            return
        down.owner = None
        if code == NO_ERROR and stream.ended_in:
            # The answer is complete (the caller had not finished sending): the caller gets all of
            # it, then the reset, rather than losing what still waits for its window.
            down.conn.reset_after(down, code)
        else:
            down.conn.reset(down, code)

    def on_goaway(self, last_stream: int) -> None:
        self.relay._gone(self)
        self.draining = True
        for stream_id in [i for i in self.streams if i > last_stream]:
            stream = self.streams[stream_id]
            self.forget(stream)  # and out of ``blocked``: nothing more goes out on it
            stream.queue.clear()
            call: Call | None = stream.owner
            if call is not None:
                self._lost(call, "the node is shutting down")
        if not self.streams:
            self._close()

    def on_closed(self) -> None:
        self.relay._gone(self)
        self.relay._upstreams.discard(self)
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        for stream in [*self.streams.values(), *self.waiting]:
            call: Call | None = stream.owner
            if call is not None:
                self._lost(call, "the connection to the node was lost")
        self.waiting.clear()

    def _lost(self, call: Call, reason: str) -> None:
        if call.replay is not None:
            self.relay.retry(call, reason)
        else:
            self.relay.answer(call, ServiceUnavailable(f"{reason} during the call", id=ERROR_ID))


def end_with(stream: Stream, error: MicroError, *, headers_sent: bool, stop_caller: bool = True) -> None:
    """End the call on ``stream`` with ``error``: what it still had queued is moot and dropped.

    ``stop_caller``: reset the stream (NO_ERROR) if the caller is still sending, so it can stop.
    """
    stream.queue.clear()
    stream.conn.blocked.pop(stream, None)
    stream.conn.send_headers(stream, error_block(error, headers_sent=headers_sent), True)
    if stop_caller and not stream.ended_in:
        stream.conn.reset(stream, NO_ERROR)


def error_block(error: MicroError, *, headers_sent: bool) -> bytes:
    """The header block that ends a gRPC call with ``error``: trailers, or a trailers-only response."""
    fields = [
        (b"grpc-status", str(grpc_status_for(error).value[0]).encode()),
        (b"grpc-message", quote(error.detail, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode()),
        (ERROR_METADATA_KEY.encode(), error.to_json().encode()),
    ]
    if not headers_sent:
        fields[:0] = [(b":status", b"200"), (b"content-type", b"application/grpc")]
    return encode(fields)


def _reason(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
