"""The JetStream writer's own NATS connection: publishes written straight to the socket, answers
resolved from ``data_received``, no task on the path.

nats-py hands every publish to a flusher task and every answer to a
subscription task: four event-loop turns and about 150 µs of CPU per publish
on top of the round trip (``bench/platform_profile.py``). The writer
publishes each event with a reply subject and waits for JetStream's ack, so
this connection speaks just that part of the protocol: INFO, CONNECT (with a
user and password or a token from the address), one SUB for the reply
subjects, HPUB, MSG/HMSG, PING/PONG, +OK and -ERR.

It reconnects by itself, for as long as it is open. What was in flight when
the connection dropped fails with ``ConnectionResetError``: its outcome is
unknown, and the writer sends it again (JetStream recognises the message id).
A server that wants TLS gets ``Unsupported``: the backend then publishes
through nats-py, which speaks TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast
from urllib.parse import unquote, urlsplit

from micro._reads import BufferedReads, ReadFuture

__all__ = ["Answers", "Headers", "Publisher", "Reply", "Unsupported", "header_dict", "header_lines"]

RECONNECT_WAIT = 0.5  # seconds between attempts while the server is away
_HEADER_LINE = b"NATS/1.0\r\n"
_REPLY_SID = b"1"
logger = logging.getLogger(__name__)
K = TypeVar("K")


Headers = Mapping[str, str] | bytes
"""A publish's headers: a mapping, or already written as ``Key: Value\\r\\n`` lines (``header_lines``)."""


class Unsupported(Exception):
    """The server or the address asks for something this connection does not speak (TLS)."""


@dataclass(slots=True)
class Reply:
    """A message answering a publish: its headers (``Status`` for a control message) and body.

    Not to be changed once made (not frozen, which costs a call per field: one is made per publish)."""

    headers: dict[str, str] | None
    data: bytes


class Answers(Generic[K]):
    """The answers awaited on one connection, by reply token.

    Each fails with ``TimeoutError`` once ``timeout`` passed since it was expected: one
    timer sweeps them all in the order they were sent, rather than one timer each. An
    answer whose waiter gave up (cancelled it) is dropped when its answer comes, or by
    the sweep. Made on the loop whose reads resolve them.
    """

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._waiting: dict[K, tuple[asyncio.Future[Reply], float]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()  # once: each look-up is a getpid system call (3.11)

    def expect(self, token: K) -> asyncio.Future[Reply]:
        loop = self._loop
        answer: asyncio.Future[Reply] = ReadFuture(loop=loop)  # its waiter resumes as the read ends
        self._waiting[token] = (answer, loop.time() + self._timeout)
        if self._sweep is None:
            self._sweep = loop.call_later(self._timeout, self._expire)
        return answer

    def resolve(self, token: K, reply: Reply) -> None:
        waiting = self._waiting.pop(token, None)
        if waiting is not None and not waiting[0].done():
            waiting[0].set_result(reply)

    def drop(self, token: K) -> None:
        self._waiting.pop(token, None)

    def fail_all(self, error: BaseException) -> None:
        """Fail every answer still awaited with ``error``."""
        waiting, self._waiting = self._waiting, {}
        for answer, _ in waiting.values():
            _fail(answer, error)
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    def _expire(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._sweep = None
        for token, (answer, deadline) in list(self._waiting.items()):
            if deadline > now and not answer.done():
                self._sweep = loop.call_at(deadline, self._expire)
                return
            del self._waiting[token]
            _fail(answer, TimeoutError())


class Publisher:
    """Publishes with a reply subject and returns the future of the answer (see the module docstring).

    ``send`` writes in call order. ``on_reconnect`` runs after each reconnection.
    """

    def __init__(self, host: str, port: int, auth: dict[str, str], *, timeout: float, name: str) -> None:
        self._host, self._port, self._auth = host, port, auth
        self._timeout = timeout
        self._name = name
        self._connection: _Connection | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._closed = False
        self.on_reconnect: Callable[[], Awaitable[None]] | None = None

    @classmethod
    async def open(cls, address: str, *, timeout: float, name: str = "micro events") -> Publisher:
        """Connect to the ``nats://`` server of ``address``; raise ``Unsupported`` for TLS, else
        ``OSError``, ``TimeoutError`` or ``ConnectionError`` if it cannot."""
        parts = urlsplit(address)
        if parts.scheme != "nats":
            raise Unsupported(f"{parts.scheme}:// addresses")
        publisher = cls(
            parts.hostname or "127.0.0.1",
            parts.port or 4222,
            _auth(parts.username, parts.password),
            timeout=timeout,
            name=name,
        )
        publisher._connection = await publisher._connect()
        return publisher

    @property
    def connected(self) -> bool:
        return self._connection is not None and not self._closed

    @property
    def max_payload(self) -> int:
        return self._connection.max_payload if self._connection is not None else 1024 * 1024

    async def send(self, subject: str, payload: bytes, headers: Headers | None) -> asyncio.Future[Reply]:
        """Publish now; the future resolves with the answer. ``ConnectionResetError`` while down.

        A caller's sends go out in the order it makes them (another caller's may come between).
        """
        connection = self._connection
        if connection is None or self._closed:
            raise ConnectionResetError("not connected to NATS")
        if connection.paused:
            await connection.drained.wait()
            if connection is not self._connection or connection.lost:  # lost while it waited
                raise ConnectionResetError("the connection to NATS was lost")
        return connection.publish(subject, payload, headers)

    async def close(self) -> None:
        """Close the connection and stop reconnecting; answers still awaited fail. Must not raise."""
        self._closed = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            with contextlib.suppress(BaseException):
                await self._reconnecting
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        connection = _Connection(self._auth, self._name, self._timeout, self._lost)
        try:
            await asyncio.wait_for(
                loop.create_connection(lambda: connection, self._host, self._port), self._timeout
            )
            await asyncio.wait_for(asyncio.shield(connection.ready), self._timeout)
        except BaseException:
            connection.close()
            raise
        if connection.lost:  # right after its handshake, before this resumed: nothing would answer
            raise ConnectionResetError("the connection to NATS was lost as it opened")
        return connection

    def _lost(self, connection: _Connection) -> None:
        if connection is not self._connection or self._closed:
            return
        self._connection = None
        self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        while not self._closed:
            try:
                connection = await self._connect()
            except (OSError, TimeoutError, ConnectionError, Unsupported) as exc:
                # Unsupported: the server came back wanting TLS; calls fail at once meanwhile.
                logger.debug("reconnecting to NATS at %s:%s: %s", self._host, self._port, exc)
                await asyncio.sleep(RECONNECT_WAIT)
                continue
            if self._closed:
                connection.close()
                return
            self._connection = connection
            self._reconnecting = None
            if self.on_reconnect is not None:
                await self.on_reconnect()
            return


def _auth(user: str | None, password: str | None) -> dict[str, str]:
    if user and password is not None:
        return {"user": unquote(user), "pass": unquote(password)}
    if user:
        return {"auth_token": unquote(user)}
    return {}


class _Connection(BufferedReads):
    """One TCP connection to NATS: parses what the server sends, resolves the answers."""

    def __init__(
        self, auth: dict[str, str], name: str, timeout: float, lost: Callable[[_Connection], None]
    ) -> None:
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()
        self.ready.add_done_callback(_retrieve)
        self.max_payload = 1024 * 1024
        self.paused = False
        self.lost = False
        self.drained = asyncio.Event()
        self.drained.set()
        self._auth, self._name, self._lost = auth, name, lost
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._inbox = b"_INBOX.micro" + os.urandom(8).hex().encode() + b"."
        self._tokens = itertools.count(1)
        self._answers: Answers[bytes] = Answers(timeout)

    def publish(self, subject: str, payload: bytes, headers: Headers | None) -> asyncio.Future[Reply]:
        assert self._transport is not None
        token = b"%d" % next(self._tokens)
        answer = self._answers.expect(token)
        lines = headers if isinstance(headers, bytes) else header_lines(headers or {})
        block = _HEADER_LINE + lines + b"\r\n"
        self._transport.write(
            b"HPUB %s %s%s %d %d\r\n%s%s\r\n"
            % (subject.encode(), self._inbox, token, len(block), len(block) + len(payload), block, payload)
        )
        return answer

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        failure = ConnectionResetError(f"the connection to NATS was lost ({exc or 'closed'})")
        if not self.ready.done():
            self.ready.set_exception(failure)
        self._answers.fail_all(failure)
        self.paused = False
        self.drained.set()
        self._lost(self)

    def pause_writing(self) -> None:
        self.paused = True
        self.drained.clear()

    def resume_writing(self) -> None:
        self.paused = False
        self.drained.set()

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        try:
            while (end := buffer.find(b"\r\n", start)) >= 0:
                if buffer.startswith(b"MSG ", start) or buffer.startswith(b"HMSG ", start):
                    consumed = self._message(buffer, start, end)
                    if consumed < 0:
                        break
                    start = consumed
                else:
                    line = bytes(buffer[start:end])
                    start = end + 2
                    self._control(line)
        finally:
            del buffer[:start]

    # -- what the server sends ---------------------------------------------------

    def _message(self, buffer: bytearray, start: int, end: int) -> int:
        """Handle the MSG or HMSG at ``start``; return where the next line starts, -1 if incomplete."""
        args = bytes(buffer[start:end]).split()
        total = int(args[-1])
        body = end + 2
        if len(buffer) < body + total + 2:
            return -1
        header_size = int(args[-2]) if args[0] == b"HMSG" else 0
        subject = args[1]
        if subject.startswith(self._inbox):
            headers = _parse_headers(bytes(buffer[body : body + header_size])) if header_size else None
            self._answers.resolve(
                subject[len(self._inbox) :], Reply(headers, bytes(buffer[body + header_size : body + total]))
            )
        return body + total + 2

    def _control(self, line: bytes) -> None:
        if line == b"PING":
            self._write(b"PONG\r\n")
        elif line == b"PONG":
            if not self.ready.done():
                self.ready.set_result(None)
        elif line.startswith(b"INFO "):
            self._info(json.loads(line[5:]))
        elif line.startswith(b"-ERR"):
            self._error(line[4:].strip().strip(b"'").decode(errors="replace"))

    def _info(self, info: dict[str, Any]) -> None:
        self.max_payload = int(info.get("max_payload", self.max_payload))
        if self.ready.done():
            return  # a later INFO (cluster changes): nothing else to do
        if info.get("tls_required") or not info.get("headers", False):
            self.ready.set_exception(
                Unsupported("TLS" if info.get("tls_required") else "a server without headers")
            )
            self.close()
            return
        connect = {
            "verbose": False,
            "pedantic": False,
            "tls_required": False,
            "name": self._name,
            "lang": "python",
            "version": "micro",
            "protocol": 1,
            "headers": True,
            "no_responders": True,
            **self._auth,
        }
        self._write(
            b"CONNECT %s\r\nSUB %s* %s\r\nPING\r\n" % (json.dumps(connect).encode(), self._inbox, _REPLY_SID)
        )

    def _error(self, text: str) -> None:
        # The server closes the connection after any error that matters (authorization, stale
        # connection, a message over max_payload): connection_lost does the rest.
        if not self.ready.done():
            self.ready.set_exception(ConnectionRefusedError(f"NATS refused the connection: {text}"))
        else:
            logger.warning("NATS: %s", text)

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)


def header_lines(headers: Mapping[str, str]) -> bytes:
    """``headers`` as the ``Key: Value\\r\\n`` lines of a NATS header block (without its first line
    and its blank last one)."""
    # Joined as text and encoded once: line by line it was a fifth of a publish's builtin calls.
    return "".join([f"{key}: {value}\r\n" for key, value in headers.items()]).encode()


def header_dict(headers: Headers) -> dict[str, str]:
    """``headers`` as a mapping, lines parsed (for a client that takes a mapping: nats-py)."""
    return _parse_headers(_HEADER_LINE + headers) if isinstance(headers, bytes) else dict(headers)


def _parse_headers(block: bytes) -> dict[str, str]:
    """``NATS/1.0[ status[ description]]`` then ``Key: Value`` lines; the status becomes ``Status``."""
    first, *lines = block.decode(errors="replace").split("\r\n")
    headers: dict[str, str] = {}
    status = first[len("NATS/1.0") :].strip()
    if status:
        code, _, description = status.partition(" ")
        headers["Status"] = code
        if description:
            headers["Description"] = description
    for line in lines:
        key, sep, value = line.partition(":")
        if sep:
            headers[key.strip()] = value.strip()
    return headers


def _fail(answer: asyncio.Future[Reply], error: BaseException) -> None:
    if not answer.done():
        answer.set_exception(error)
        answer.exception()  # whoever waits reads it; nobody may, without a warning


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()  # a connection given up on must not log "never retrieved"
