"""The NATS broker: core NATS subjects, queue groups and headers, with bounded subscriber buffers.

A topic of a namespace is the subject ``<prefix>.broker.<namespace>.<topic>``,
with prefix ``micro`` unless the address says ``?prefix=NAME`` (as the events
engine's does). ``validate_topic`` already keeps topics NATS-safe (no
whitespace, control characters, wildcards or empty tokens); the namespace is
escaped into a single token so that ``a.b``/``c`` and ``a``/``b.c`` never meet.
Queue groups are NATS queue subscriptions. Message headers travel as NATS
headers, escaped where NATS would alter them (see ``_encode_headers``).

Each subscriber has its own queue of at most ``buffer`` messages. nats-py hands
over everything a socket read brought at once, so a full queue gives its reader
a few event-loop turns to make room before giving up, while the rest of the
burst waits in the NATS subscription's pending queue. That queue is bounded too
(at least ``buffer`` and a few socket reads' worth of messages, at most 64 MiB).
A subscriber whose queue stays full, or whose pending queue overflows, is
dropped: it yields what its own queue holds, then ``TooManyRequests``. NATS
cannot count deliveries, so ``publish`` returns 0.

The connection helpers here (``connect``, ``check_connected``, ``connection_state``,
``parse_address``, ``shown_address``, ``map_nats_exceptions``) are shared with the NATS KV registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

import nats
import nats.errors

from micro.errors import (
    MicroError,
    PayloadTooLarge,
    ServiceUnavailable,
    SetupError,
    TooManyRequests,
)
from micro.proto import broker_pb2
from micro_daemon.broker.backend import (
    ERROR_ID,
    MAX_MESSAGE_BYTES,
    BrokerBackend,
    Subscription,
    check_message,
    validate_topic,
)
from micro_daemon.broker.memory import DEFAULT_BUFFER, _validate_queue

if TYPE_CHECKING:
    from pathlib import Path

    from nats.aio.client import Client as NATS
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription as NatsSubscription

__all__ = [
    "DEFAULT_PREFIX",
    "NatsBroker",
    "check_connected",
    "connect",
    "connection_state",
    "map_nats_exceptions",
    "open_nats",
    "parse_address",
    "shown_address",
    "subject",
]

DEFAULT_PREFIX = "micro"
_CONNECT_TIMEOUT = 2.0
_RECONNECT_WAIT = 2.0
_FLUSH_TIMEOUT = 5
_PATIENCE = 8  # event-loop turns a full subscriber gets to take a message before it is dropped
_PENDING_MESSAGES = 8192  # more than a few socket reads of the smallest messages
_PENDING_BYTES = 64 * 1024 * 1024
_SAFE_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_PREFIX = re.compile(r"[A-Za-z0-9_-]{1,64}")
# RFC 7230 token characters, which nats-py accepts in header names; '%' is ours, for escapes.
_HEADER_NAME_CHARS = frozenset("!#$&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")

ErrorCallback = Callable[[Exception], Awaitable[None]]
ClosedCallback = Callable[[], Awaitable[None]]


def shown_address(url: str) -> str:
    """``url`` (one or several comma-separated servers) without user names, passwords or tokens."""
    shown = []
    for server in url.split(","):
        server = server.strip()
        parts = urllib.parse.urlsplit(server if "://" in server else f"nats://{server}")
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        try:
            port = f":{parts.port}" if parts.port else ""
        except ValueError:
            port = ""
        shown.append(f"{parts.scheme}://{host}{port}")
    return ",".join(shown)


async def connect(
    url: str,
    *,
    name: str,
    id: str,
    error_cb: ErrorCallback | None = None,
    closed_cb: ClosedCallback | None = None,
    reconnected_cb: ClosedCallback | None = None,
) -> NATS:
    """Connect to the NATS servers of ``url``, or raise ``SetupError`` naming them (without credentials).

    The first connection is tried briefly. Once connected, the client reconnects
    for as long as it takes: meanwhile nats-py buffers publishes (up to 2 MiB),
    and calls that need an answer time out as ``ServiceUnavailable``.
    """
    last_error: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        last_error[:] = [exc]
        if error_cb is not None:
            await error_cb(exc)

    servers = [server.strip() for server in url.split(",") if server.strip()]
    try:
        connection = await nats.connect(
            servers,
            name=name,
            connect_timeout=_CONNECT_TIMEOUT,
            # Two tries at start-up, then (below) reconnect forever.
            max_reconnect_attempts=1,
            reconnect_time_wait=0.1,
            error_cb=on_error,
            closed_cb=closed_cb,
            reconnected_cb=reconnected_cb,
        )
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        cause = last_error[0] if last_error else exc
        raise SetupError(
            f"cannot connect to NATS at {shown_address(url)}: {_describe(cause)}", id=id
        ) from exc
    connection.options["max_reconnect_attempts"] = -1
    connection.options["reconnect_time_wait"] = _RECONNECT_WAIT
    return connection


@contextlib.contextmanager
def map_nats_exceptions(id: str, address: str) -> Iterator[None]:
    """Convert nats-py errors raised inside the block into ``micro.errors`` ones with ``id``.

    Too large a payload: ``PayloadTooLarge``; anything else (closed, reconnecting,
    timed out, JetStream unavailable, a socket error): ``ServiceUnavailable``
    naming ``address``, which must carry no credentials.
    """
    try:
        yield
    except nats.errors.MaxPayloadError as exc:
        raise PayloadTooLarge(f"message is larger than the NATS server at {address} accepts", id=id) from exc
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        raise ServiceUnavailable(
            f"{id} engine: NATS at {address} is unavailable: {_describe(exc)}", id=id
        ) from exc


def connection_state(connection: NATS, address: str) -> str:
    """``"ok"``, or what is wrong with ``connection``: closed for good, or reconnecting."""
    if connection.is_closed:
        return f"the connection to NATS at {address} is closed"
    if not connection.is_connected:
        return f"not connected to NATS at {address} (reconnecting)"
    return "ok"


def check_connected(connection: NATS, id: str, address: str) -> None:
    """Raise ``ServiceUnavailable`` at once while ``connection`` is down (a call would only time out)."""
    state = connection_state(connection, address)
    if state != "ok":
        raise ServiceUnavailable(f"{id} engine: {state}", id=id)


def parse_address(address: str, *, block: str, options: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """Split ``nats://[user:password@]host:port[,...][?name=value&...]`` into servers and options.

    ``SetupError`` for an option not in ``options`` or an invalid ``prefix``.
    """
    servers, _, query = address.partition("?")
    given = {
        name: values[-1] for name, values in urllib.parse.parse_qs(query, keep_blank_values=True).items()
    }
    unknown = sorted(given.keys() - set(options))
    if unknown:
        raise SetupError(
            f"unknown option(s) {unknown} in the {block} address {shown_address(servers)}; "
            f"known: {', '.join(options)}",
            id=block,
        )
    prefix = given.get("prefix", DEFAULT_PREFIX)
    if not _PREFIX.fullmatch(prefix):
        raise SetupError(f"invalid NATS prefix {prefix!r}: use 1-64 letters, digits, '_' or '-'", id=block)
    return servers, given


def _describe(exc: BaseException) -> str:
    text = str(exc).removeprefix("nats: ").strip()
    return text or type(exc).__name__


class _Inbox:
    """One subscriber's received messages, at most ``size`` of them.

    Once ended it takes nothing more; its reader gets what is left, then
    ``error`` if there is one, else ``StopAsyncIteration``.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.messages: deque[Msg] = deque()
        self.open = True
        self.error: MicroError | None = None
        self._waiter: asyncio.Future[None] | None = None

    def has_room(self) -> bool:
        return not self.open or len(self.messages) < self.size

    def offer(self, message: Msg) -> bool:
        """Keep ``message``; False if ended, or now dropped because it is full."""
        if not self.open:
            return False
        if len(self.messages) >= self.size:
            self.drop()
            return False
        self.messages.append(message)
        self._wake()
        return True

    def drop(self, why: str = "") -> None:
        why = why or f"{self.size} messages behind"
        self.end(TooManyRequests(f"subscriber too slow: {why}, dropped", id=ERROR_ID))

    def end(self, error: MicroError | None = None, *, discard: bool = False) -> None:
        if self.open:
            self.open = False
            self.error = error
        if discard:
            self.messages.clear()
            self.error = None
        self._wake()

    async def next(self) -> Msg:
        while not self.messages:
            if not self.open:
                error, self.error = self.error, None
                if error is not None:
                    raise error
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.messages.popleft()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _NatsSubscription(Subscription):
    def __init__(self, broker: NatsBroker, inbox: _Inbox) -> None:
        self._broker = broker
        self._inbox = inbox

    async def __anext__(self) -> broker_pb2.Message:
        return _decode(await self._inbox.next())

    async def close(self) -> None:
        self._inbox.end(discard=True)
        await self._broker._unsubscribe(self._inbox)

    def __del__(self) -> None:
        # An abandoned subscription must not keep receiving until it is dropped.
        self._inbox.end(discard=True)
        self._broker._release(self._inbox)


class NatsBroker(BrokerBackend):
    """A broker on core NATS, shared by every daemon connected to the same NATS servers.

    Create it with ``open``. Each subscriber holds at most ``buffer`` messages
    (see the module docstring); ``max_message_bytes`` bounds body plus headers.
    """

    def __init__(
        self,
        connection: NATS,
        *,
        address: str,
        prefix: str = DEFAULT_PREFIX,
        buffer: int = DEFAULT_BUFFER,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        if buffer < 1:
            raise ValueError("buffer must be at least 1")
        self._connection = connection
        self._address = address
        self._prefix = prefix
        self._buffer = buffer
        self._max_message_bytes = max_message_bytes
        self._subscriptions: dict[_Inbox, NatsSubscription] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        buffer: int = DEFAULT_BUFFER,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> NatsBroker:
        """Connect to NATS at ``url``; ``SetupError`` (naming the servers, not credentials) if unreachable."""
        broker: NatsBroker | None = None

        async def on_error(exc: Exception) -> None:
            if broker is not None:
                broker._on_error(exc)

        async def on_closed() -> None:
            if broker is not None:
                broker._on_closed()

        connection = await connect(
            url, name="micro-broker", id=ERROR_ID, error_cb=on_error, closed_cb=on_closed
        )
        address = shown_address(url)
        broker = cls(
            connection, address=address, prefix=prefix, buffer=buffer, max_message_bytes=max_message_bytes
        )
        return broker

    async def publish(self, namespace: str, topic: str, message: broker_pb2.Message) -> int:
        self._check_open()
        validate_topic(topic)
        check_message(topic, message, self._max_message_bytes)
        with map_nats_exceptions(ERROR_ID, self._address):
            await self._connection.publish(
                subject(namespace, topic, self._prefix),
                message.body,
                headers=_encode_headers(message) or None,
            )
        return 0

    async def subscribe(self, namespace: str, topic: str, queue: str = "") -> Subscription:
        self._check_open()
        validate_topic(topic)
        _validate_queue(queue)
        check_connected(self._connection, ERROR_ID, self._address)
        inbox = _Inbox(self._buffer)

        async def receive(message: Msg) -> None:
            # NATS hands over a whole socket read at once: give a reader that is awake a few
            # turns to make room before calling it slow.
            for _ in range(_PATIENCE):
                if inbox.has_room():
                    break
                await asyncio.sleep(0)
            if not inbox.offer(message):
                self._release(inbox)

        with map_nats_exceptions(ERROR_ID, self._address):
            nats_subscription = await self._connection.subscribe(
                subject(namespace, topic, self._prefix),
                queue=queue,
                cb=receive,
                pending_msgs_limit=max(self._buffer, _PENDING_MESSAGES),
                pending_bytes_limit=max(self._max_message_bytes, _PENDING_BYTES),
            )
            self._subscriptions[inbox] = nats_subscription
            try:
                # The server must know of it before we return, so that nothing published later is missed.
                await self._connection.flush(_FLUSH_TIMEOUT)
            except BaseException:
                await self._unsubscribe(inbox)
                raise
        return _NatsSubscription(self, inbox)

    async def health(self) -> str:
        return "closed" if self._closed else connection_state(self._connection, self._address)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        subscriptions, self._subscriptions = self._subscriptions, {}
        for inbox in subscriptions:
            inbox.end()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._connection.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ServiceUnavailable("broker is closed", id=ERROR_ID)

    async def _unsubscribe(self, inbox: _Inbox) -> None:
        nats_subscription = self._subscriptions.pop(inbox, None)
        if nats_subscription is not None:
            await _quietly_unsubscribe(nats_subscription)

    def _release(self, inbox: _Inbox) -> None:
        """Unsubscribe ``inbox`` in the background (from a NATS callback or ``__del__``)."""
        nats_subscription = self._subscriptions.pop(inbox, None)
        if nats_subscription is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop any more: the connection goes with it
        task = loop.create_task(_quietly_unsubscribe(nats_subscription))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            for inbox, nats_subscription in list(self._subscriptions.items()):
                if nats_subscription is exc.sub:
                    inbox.drop("its NATS pending queue overflowed")
                    self._release(inbox)

    def _on_closed(self) -> None:
        if self._closed:
            return
        lost = ServiceUnavailable(f"connection to NATS at {self._address} closed", id=ERROR_ID)
        for inbox in list(self._subscriptions):
            inbox.end(lost)
        self._subscriptions.clear()


async def _quietly_unsubscribe(nats_subscription: NatsSubscription) -> None:
    with contextlib.suppress(nats.errors.Error, OSError):
        await nats_subscription.unsubscribe()


def subject(namespace: str, topic: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The NATS subject of ``topic`` (already validated) in ``namespace``."""
    return f"{prefix.lower()}.broker.{_token(namespace)}.{topic}"


def _token(text: str) -> str:
    """``text`` as one subject token: ``[A-Za-z0-9_-]`` kept, anything else as ``%XX`` bytes."""
    if _SAFE_TOKEN.fullmatch(text):
        return text
    return "".join(char if _SAFE_TOKEN.fullmatch(char) else _percent(char) for char in text) or "%"


def _percent(text: str) -> str:
    return "".join(f"%{byte:02X}" for byte in text.encode())


def _encode_headers(message: broker_pb2.Message) -> dict[str, str]:
    # nats-py drops empty names and rejects non-token ones, trims values and turns CR/LF into spaces.
    return {_escape_name(name): _escape_value(value) for name, value in message.header.items()}


def _escape_name(name: str) -> str:
    if not name:
        return "%"
    return "".join(char if char in _HEADER_NAME_CHARS else _percent(char) for char in name)


def _escape_value(value: str) -> str:
    escaped = "".join(_percent(char) if char == "%" or not char.isprintable() else char for char in value)
    core = escaped.strip(" ")
    if core == escaped:
        return escaped
    leading = len(escaped) - len(escaped.lstrip(" "))
    trailing = len(escaped) - len(escaped.rstrip(" ")) if core else 0
    return "%20" * leading + core + "%20" * trailing


def _unescape(text: str) -> str:
    return urllib.parse.unquote(text, errors="replace")


def _decode(message: Msg) -> broker_pb2.Message:
    headers = message.headers or {}
    header = {"" if name == "%" else _unescape(name): _unescape(value) for name, value in headers.items()}
    return broker_pb2.Message(header=header, body=message.data)


async def open_nats(address: str, data_dir: Path) -> NatsBroker:
    """The ``nats`` broker engine: ``nats://[user:password@]host:port[,...][?prefix=NAME]``."""
    servers, options = parse_address(address, block=ERROR_ID, options=("prefix",))
    return await NatsBroker.open(servers, prefix=options.get("prefix", DEFAULT_PREFIX))
