"""The NATS side of the JetStream events backend: one connection, JetStream API calls, message codecs.

Everything here speaks NATS; ``map_nats_exceptions`` turns what the client or
the server raises into ``ServiceUnavailable`` (``id="events"``) at the
boundary. An event travels as one message: the payload as the body, and the
headers ``Nats-Msg-Id`` (the event id, JetStream's de-duplication key),
``Micro-Seq`` (its sequence in its topic), ``Micro-Meta`` (its metadata as
ASCII JSON, when any) and ``Micro-Time`` (its timestamp, when the publisher
set one; otherwise the time JetStream stored it).
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from micro.errors import ServiceUnavailable
from micro.proto import events_pb2
from micro_daemon.events.backend import ERROR_ID
from micro_daemon.events.nats_publisher import Answers, Headers, Publisher, Reply, Unsupported, header_dict

__all__ = [
    "CONSUMER_NOT_FOUND",
    "HEADER_ID",
    "HEADER_META",
    "HEADER_SEQ",
    "HEADER_TIME",
    "STREAM_NOT_FOUND",
    "WRONG_LAST_MSG_ID",
    "WRONG_LAST_SEQUENCE",
    "ApiError",
    "Delivery",
    "Link",
    "Stored",
    "event_header_lines",
    "headers_size",
    "map_nats_exceptions",
    "nats_error",
    "parse_time",
    "redact",
    "rfc3339",
    "status",
]

HEADER_ID = "Nats-Msg-Id"
HEADER_SEQ = "Micro-Seq"
HEADER_META = "Micro-Meta"
HEADER_TIME = "Micro-Time"
STREAM_NOT_FOUND = 10059
CONSUMER_NOT_FOUND = 10014
WRONG_LAST_MSG_ID = 10070
WRONG_LAST_SEQUENCE = 10071
_STATUS = "Status"
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))  # json.dumps with options makes one a call
_json_string = encode_basestring_ascii  # a str as a JSON string (ASCII, escaped), as JSONEncoder writes it
logger = logging.getLogger(__name__)


class ApiError(Exception):
    """A JetStream API error answer: ``code`` (HTTP-like), ``err_code`` (JetStream's own) and text."""

    def __init__(self, code: int, err_code: int, description: str) -> None:
        super().__init__(description)
        self.code = code
        self.err_code = err_code
        self.description = description


def redact(address: str) -> str:
    """``address`` without user, password or token, for messages and logs."""
    parts = urlsplit(address)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@contextlib.contextmanager
def map_nats_exceptions(address: str) -> Iterator[None]:
    """Raise what NATS raises inside as ``ServiceUnavailable`` naming ``address`` (already redacted)."""
    try:
        yield
    except Exception as exc:
        error = nats_error(exc, address)
        if error is None:
            raise
        raise error from exc


def nats_error(exc: Exception, address: str) -> ServiceUnavailable | None:
    """``exc`` as the ``ServiceUnavailable`` that names NATS at ``address``; None if not NATS's."""
    if isinstance(exc, ApiError):
        return _unavailable(f"JetStream at {address}: {exc.description}")
    if isinstance(exc, nats.errors.ConnectionClosedError):
        return _unavailable(f"the connection to NATS at {address} is closed")
    if isinstance(exc, ConnectionResetError):  # the own publisher's connection (nats_publisher)
        return _unavailable(f"the connection to NATS at {address} was lost")
    if isinstance(exc, nats.errors.TimeoutError | TimeoutError):
        return _unavailable(f"NATS at {address} did not answer in time")
    if isinstance(exc, nats.errors.Error):
        return _unavailable(f"NATS at {address}: {exc}")
    return None


def _unavailable(detail: str) -> ServiceUnavailable:
    return ServiceUnavailable(f"events engine: {detail}", id=ERROR_ID)


def rfc3339(ns: int) -> str:
    """Unix nanoseconds as the RFC 3339 UTC time JetStream reads."""
    seconds, fraction = divmod(ns, 10**9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{fraction:09d}Z"


def parse_time(text: str) -> int:
    """JetStream's RFC 3339 UTC time (``...T12:00:00.123456789Z``) as unix nanoseconds."""
    base, _, fraction = text.rstrip("Z").partition(".")
    seconds = calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S"))
    return seconds * 10**9 + int((fraction + "000000000")[:9])


def event_header_lines(event_id: str, metadata: Mapping[str, str], timestamp_ns: int) -> bytes:
    """The header lines (``header_lines``) that carry an event's id, metadata and timestamp; its
    sequence (``HEADER_SEQ``) is the writer's to add, with the chain's."""
    lines = f"{HEADER_ID}: {event_id}\r\n"
    if metadata:
        lines += f"{HEADER_META}: {metadata_json(metadata)}\r\n"
    if timestamp_ns:
        lines += f"{HEADER_TIME}: {timestamp_ns}\r\n"
    return lines.encode()


def metadata_json(metadata: Mapping[str, str]) -> str:
    """``metadata`` as compact JSON, what ``json.dumps(metadata, separators=(",", ":"))`` writes.

    Its strings written directly: a third of what a ``JSONEncoder`` call costs, once per event.
    """
    try:
        return "{" + ",".join([f"{_json_string(k)}:{_json_string(v)}" for k, v in metadata.items()]) + "}"
    except TypeError:  # not all strings after all: JSON's own rules
        return _COMPACT_JSON.encode(dict(metadata))


def headers_size(lines: bytes) -> int:
    """Bytes a header block of ``lines`` (``header_lines``) takes on the wire (``NATS/1.0`` line and
    blank line included)."""
    return 12 + len(lines)


def _event(topic: str, headers: Mapping[str, str], payload: bytes, stored_ns: int) -> events_pb2.Event:
    meta = headers.get(HEADER_META)
    stamp = headers.get(HEADER_TIME)
    return events_pb2.Event(
        id=headers.get(HEADER_ID, ""),
        topic=topic,
        metadata=json.loads(meta) if meta else None,
        payload=payload,
        timestamp=int(stamp) if stamp else stored_ns,
        sequence=int(headers.get(HEADER_SEQ, "0")),
    )


@dataclass(frozen=True)
class Stored:
    """A message read from a stream (a direct get): where it is, and what it holds."""

    stream_seq: int
    subject: str
    headers: Mapping[str, str]
    payload: bytes
    stored_ns: int

    @property
    def topic_seq(self) -> int:
        return int(self.headers.get(HEADER_SEQ, "0"))

    def event(self, topic: str) -> events_pb2.Event:
        return _event(topic, self.headers, self.payload, self.stored_ns)


@dataclass(frozen=True)
class Delivery:
    """A message a consumer delivered: its ack subject says which delivery of which stream message."""

    reply: str
    headers: Mapping[str, str]
    payload: bytes
    stream_seq: int
    attempt: int
    stored_ns: int
    received: float

    @classmethod
    def parse(cls, msg: Msg, now: float) -> Delivery:
        # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>, or the v2 form that adds
        # <domain>.<account> after ACK and a token at the end.
        tokens = msg.reply.split(".")
        base = 4 if len(tokens) == 9 else 6
        return cls(
            reply=msg.reply,
            headers=msg.headers or {},
            payload=msg.data,
            stream_seq=int(tokens[base + 1]),
            attempt=int(tokens[base]),
            stored_ns=int(tokens[base + 3]),
            received=now,
        )

    @property
    def topic_seq(self) -> int:
        return int(self.headers.get(HEADER_SEQ, "0"))

    def event(self, topic: str, *, attempt: bool = True) -> events_pb2.Event:
        event = _event(topic, self.headers, self.payload, self.stored_ns)
        if attempt:
            event.attempt = self.attempt
        return event


def status(msg: Msg | Reply) -> str:
    """The status of a control message (``"404"``, ``"408"``, ...), or ``""`` for a data message."""
    return (msg.headers or {}).get(_STATUS, "") if not msg.data else ""


class Link:
    """One NATS connection and the JetStream calls the backend makes over it.

    ``send`` publishes in call order and returns the future of the answer, so
    a caller can pipeline many publishes and then wait for all of them. It
    goes through a ``Publisher`` of its own when the server allows (plain
    ``nats://``), else through nats-py.
    """

    def __init__(self, nc: NATS, address: str, timeout: float, publisher: Publisher | None = None) -> None:
        self.nc = nc
        self.address = address
        self.timeout = timeout
        self.publisher = publisher
        self._inbox = nc.new_inbox()
        self._tokens = itertools.count(1)
        self._answers: Answers[str] = Answers(timeout)
        self._answer_sub: Subscription | None = None

    @classmethod
    async def open(
        cls,
        address: str,
        *,
        timeout: float,
        on_reconnect: Callable[[], Awaitable[None]],
        on_lost: Callable[[], Awaitable[None]],
        own_publisher: bool = True,
    ) -> Link:
        """Connect (one attempt, then raise), then keep reconnecting for ever.

        ``own_publisher=False`` publishes through nats-py even where a ``Publisher`` could.
        """

        async def quiet(exc: Exception) -> None:
            logger.debug("NATS at %s: %s", redact(address), exc)

        nc = await nats.connect(
            address,
            name="micro events",
            connect_timeout=max(1, round(timeout)),
            reconnect_time_wait=1,
            max_reconnect_attempts=1,
            error_cb=quiet,
            reconnected_cb=on_reconnect,
            closed_cb=on_lost,
        )
        nc.options["max_reconnect_attempts"] = -1  # the first connect fails fast; later ones never give up
        publisher = None
        if own_publisher:
            try:
                publisher = await Publisher.open(address, timeout=timeout)
            except Unsupported as exc:
                logger.debug("publishing to NATS at %s through nats-py: %s", redact(address), exc)
            except BaseException:
                await nc.close()
                raise
        link = cls(nc, redact(address), timeout, publisher)
        link._answer_sub = await nc.subscribe(f"{link._inbox}.*", cb=link._answered)
        return link

    @property
    def max_payload(self) -> int:
        return self.nc.max_payload

    @property
    def connected(self) -> bool:
        return self.nc.is_connected and (self.publisher is None or self.publisher.connected)

    def check_connected(self) -> None:
        """Raise ``ServiceUnavailable`` at once while the connection is down, rather than time out."""
        if self.nc.is_closed:
            raise _unavailable(f"the connection to NATS at {self.address} is closed")
        if not self.connected:
            raise _unavailable(f"not connected to NATS at {self.address} (reconnecting)")

    def new_inbox(self) -> str:
        return self.nc.new_inbox()

    async def api(self, call: str, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Call ``$JS.API.<call>``; return the answer, or raise ``ApiError``."""
        data = json.dumps(body).encode() if body is not None else b""
        answer = await self.nc.request(f"$JS.API.{call}", data, timeout=self.timeout)
        result: dict[str, Any] = json.loads(answer.data)
        error = result.get("error")
        if error:
            raise ApiError(error.get("code", 500), error.get("err_code", 0), error.get("description", ""))
        return result

    async def get(self, stream: str, **query: Any) -> Stored | None:
        """A direct get from ``stream`` (``seq``, ``next_by_subj``, ``last_by_subj``); None if none."""
        answer = await self.nc.request(
            f"$JS.API.DIRECT.GET.{stream}", json.dumps(query).encode(), timeout=self.timeout
        )
        headers = answer.headers or {}
        if _STATUS in headers:
            if headers[_STATUS] == "404":
                return None
            raise ApiError(int(headers[_STATUS]), 0, f"direct get from {stream} answered {headers[_STATUS]}")
        return Stored(
            stream_seq=int(headers["Nats-Sequence"]),
            subject=headers["Nats-Subject"],
            headers=headers,
            payload=answer.data,
            stored_ns=parse_time(headers["Nats-Time-Stamp"]),
        )

    async def send(
        self, subject: str, payload: bytes, headers: Headers | None = None
    ) -> asyncio.Future[Reply]:
        """Publish now, in call order; the future resolves with the answer, or fails with
        ``TimeoutError`` after the link's timeout.

        ``ConnectionResetError`` (raised, or the future's) means the connection was down or lost:
        whether the server got the message is unknown.
        """
        if self.publisher is not None:
            return await self.publisher.send(subject, payload, headers)
        token = f"{self._inbox}.{next(self._tokens)}"
        answer = self._answers.expect(token)
        try:
            await self.nc.publish(
                subject, payload, reply=token, headers=header_dict(headers) if headers else None
            )
        except BaseException:
            self._answers.drop(token)
            raise
        return answer

    async def wait(self, answer: asyncio.Future[Reply]) -> Reply:
        """The answer to a ``send``; ``nats.errors.TimeoutError`` if it does not come in time."""
        try:
            return await answer
        except TimeoutError:
            raise nats.errors.TimeoutError from None

    async def confirm(self, subject: str, payload: bytes) -> None:
        """Publish and wait until the server has applied it (acks: JetStream answers once applied)."""
        answer = await self.nc.request(subject, payload, timeout=self.timeout)
        if status(answer) == "503":
            raise nats.errors.NoRespondersError

    async def post(self, subject: str, payload: bytes, reply: str = "") -> None:
        """Publish without waiting for anything."""
        await self.nc.publish(subject, payload, reply=reply)

    async def subscribe(self, subject: str, callback: Callable[[Msg], Awaitable[None]]) -> Subscription:
        return await self.nc.subscribe(subject, cb=callback)

    async def close(self) -> None:
        """Flush what is pending and close. Must not raise."""
        self._answers.fail_all(ConnectionResetError("the events backend closed"))
        if self.publisher is not None:
            await self.publisher.close()
        try:
            await asyncio.wait_for(self.nc.drain(), self.timeout)
        except Exception as exc:
            logger.debug("draining the NATS connection failed: %s", exc)
        with contextlib.suppress(Exception):
            await self.nc.close()

    async def _answered(self, msg: Msg) -> None:
        self._answers.resolve(msg.subject, Reply(msg.headers, msg.data))
