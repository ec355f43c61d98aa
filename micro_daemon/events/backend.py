"""The events backend interface every events engine implements.

Semantics every engine keeps (checked by ``micro.testing.messaging.EventsContract``):

* Topics are per namespace. Each topic numbers its events from 1 (``sequence``)
  and delivers them in that order; ``publish`` returns once the event is durable.
* A consumer group receives each event once: the consumers of one group share
  its events. A group's position survives consumer and daemon restarts: it
  resumes after its last acknowledged event. ``Start.GROUP`` uses that position
  (with none saved: new events only); ``BEGINNING``, ``SEQUENCE`` and ``TIME``
  move the group there, or with ``start_if_new`` only a group that is new (no
  saved position, no consumer yet): an existing one resumes. A start beyond
  the last event waits for it.
* Acknowledgement: with ``auto_ack`` an event counts as done once it is handed
  to the consumer. Otherwise it must be acked within ``ack_wait`` seconds, or it
  is delivered again (``attempt`` + 1) to any consumer of the group; a nack, or
  the consumer closing, sends it again at once. After ``retry_limit``
  deliveries without an ack it is published to ``<topic>.dead`` (same payload,
  metadata plus ``dead-letter-reason``, ``original-sequence``,
  ``original-topic``) and counts as done.
* Retention drops events older than ``Retention.max_age_s`` and, with
  ``max_count``, the oldest beyond that many per topic. Sequences never restart.

Backends raise only ``micro.errors`` exceptions with ``id="events"``.
"""

from __future__ import annotations

import abc
import enum
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from micro.errors import BadRequest, PayloadTooLarge
from micro.proto import events_pb2
from micro_daemon.broker.backend import validate_topic as _validate_topic

__all__ = [
    "DEAD_LETTER_SUFFIX",
    "DEFAULT_ACK_WAIT",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_READ_LIMIT",
    "DEFAULT_RETRY_LIMIT",
    "ERROR_ID",
    "MAX_EVENT_BYTES",
    "MAX_READ_LIMIT",
    "ConsumeSpec",
    "Consumer",
    "EventsBackend",
    "PublishItem",
    "Retention",
    "Start",
    "check_item",
    "check_items",
    "check_read",
    "new_ids",
    "validate_topic",
]

ERROR_ID = "events"
DEAD_LETTER_SUFFIX = ".dead"
DEFAULT_ACK_WAIT = 30.0
DEFAULT_MAX_IN_FLIGHT = 1000
DEFAULT_RETRY_LIMIT = 5
DEFAULT_READ_LIMIT = 250
MAX_READ_LIMIT = 10_000
MAX_EVENT_BYTES = 1024 * 1024
_GROUP = re.compile(r"^[A-Za-z0-9_.-]{1,255}$")


def validate_topic(topic: str) -> str:
    """Return ``topic`` if valid (the broker's rules: ``orders.created``), else raise ``BadRequest``."""
    return _validate_topic(topic, id=ERROR_ID)


def check_read(topic: str, limit: int, offset: int) -> None:
    """Raise ``BadRequest`` unless ``read(topic, limit, offset)`` asks for something valid."""
    validate_topic(topic)
    if not 1 <= limit <= MAX_READ_LIMIT:
        raise BadRequest(f"limit must be between 1 and {MAX_READ_LIMIT}, not {limit}", id=ERROR_ID)
    if offset < 0:
        raise BadRequest(f"offset must be 0 or more, not {offset}", id=ERROR_ID)


class Start(enum.IntEnum):
    """Where a consumer group starts (values match ``micro.events.v1.Start``)."""

    GROUP = 0
    BEGINNING = 1
    SEQUENCE = 2
    TIME = 3


@dataclass(frozen=True)
class ConsumeSpec:
    """How to consume a topic.

    ``group``: the consumer group ("" = a private group for this consumer,
    neither saved nor listed). ``start``: see ``Start``; ``sequence`` (from 1)
    goes with ``SEQUENCE``, ``since_ns`` (unix nanoseconds) with ``TIME``.
    ``start_if_new``: apply ``start`` only if the group is new; an existing
    group resumes from its saved position (Micro's ``Offset``).
    ``ack_wait`` (seconds), ``retry_limit`` (deliveries, -1 = unlimited) and
    ``max_in_flight`` (unacknowledged events a consumer may hold before it
    waits for acks, as JetStream's MaxAckPending) apply when ``auto_ack`` is
    false. Invalid values raise ``BadRequest``.
    """

    group: str = ""
    start: Start = Start.GROUP
    sequence: int = 0
    since_ns: int = 0
    auto_ack: bool = True
    ack_wait: float = DEFAULT_ACK_WAIT
    retry_limit: int = DEFAULT_RETRY_LIMIT
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    start_if_new: bool = False

    def __post_init__(self) -> None:
        if self.group and not _GROUP.match(self.group):
            raise BadRequest(
                f"invalid group {self.group!r}: use 1-255 letters, digits, '_', '.' or '-'", id=ERROR_ID
            )
        if self.start is Start.SEQUENCE and self.sequence < 1:
            raise BadRequest(
                f"start SEQUENCE needs a sequence of 1 or more, not {self.sequence}", id=ERROR_ID
            )
        if not self.ack_wait > 0:
            raise BadRequest(
                f"ack_wait must be a positive number of seconds, not {self.ack_wait}", id=ERROR_ID
            )
        if self.retry_limit == 0 or self.retry_limit < -1:
            raise BadRequest(
                f"retry_limit must be 1 or more deliveries, or -1 for no limit, not {self.retry_limit}",
                id=ERROR_ID,
            )
        if self.max_in_flight < 1:
            raise BadRequest(f"max_in_flight must be 1 or more, not {self.max_in_flight}", id=ERROR_ID)


@dataclass(slots=True)
class PublishItem:
    """One event to publish; ``timestamp_ns`` 0 means now. Not to be changed once made (not frozen:
    a frozen dataclass sets each field through ``object.__setattr__``, and one is made per event)."""

    topic: str
    payload: bytes
    metadata: Mapping[str, str] = field(default_factory=dict)
    timestamp_ns: int = 0


@dataclass(frozen=True)
class Retention:
    """How long a topic keeps its events: ``max_age_s`` seconds after their timestamp (None: for
    ever), and at most ``max_count`` events (None: no limit)."""

    max_age_s: float | None = 7 * 86400
    max_count: int | None = None

    def __post_init__(self) -> None:
        if self.max_age_s is not None and self.max_age_s <= 0:
            raise ValueError(f"max_age_s must be positive or None, not {self.max_age_s}")
        if self.max_count is not None and self.max_count < 0:
            raise ValueError(f"max_count must be 0 or more, or None, not {self.max_count}")


def check_item(item: PublishItem, limit: int = MAX_EVENT_BYTES) -> None:
    """Validate an event to publish: its topic, and its size (payload plus metadata) against ``limit``."""
    validate_topic(item.topic)
    _check_size(item, limit)


def check_items(items: Sequence[PublishItem], limit: int = MAX_EVENT_BYTES) -> None:
    """``check_item`` each of ``items``, checking each distinct topic once."""
    topics: set[str] = set()
    for item in items:
        if item.topic not in topics:
            validate_topic(item.topic)
            topics.add(item.topic)
        _check_size(item, limit)


def _check_size(item: PublishItem, limit: int) -> None:
    if item.timestamp_ns < 0:
        raise BadRequest(
            f"timestamp must be 0 (now) or unix nanoseconds, not {item.timestamp_ns}", id=ERROR_ID
        )
    size = len(item.payload)
    for key, value in item.metadata.items():
        size += len(key.encode()) + len(value.encode())
    if size > limit:
        raise PayloadTooLarge(
            f"event for {item.topic!r} is {size} bytes (payload and metadata); the limit is {limit}",
            id=ERROR_ID,
        )


class Consumer(abc.ABC):
    """The events a consumer receives, returned by ``EventsBackend.consume``.

    Iterate it for ``events_pb2.Event`` values (``attempt`` > 1 marks a
    redelivery). With manual acks, ``ack`` or ``nack`` each event by id.
    Iteration ends (``StopAsyncIteration``) once the consumer or the backend is
    closed. Use it as an async context manager, or call ``close``: its
    unacknowledged events then go to the other consumers of its group.
    """

    def __aiter__(self) -> Consumer:
        return self

    @abc.abstractmethod
    async def __anext__(self) -> events_pb2.Event:
        """The next event of the group for this consumer; waits for one."""

    async def take_ready(self, limit: int) -> list[events_pb2.Event]:
        """Up to ``limit`` more events, only those ready now: never waits for one to be published.

        For batching after ``__anext__``; may do I/O (a read, a save) but does
        not join the consumers waiting for events. By default none.
        """
        return []

    @abc.abstractmethod
    async def ack(self, id: str) -> None:
        """Mark the event ``id`` done for the group; durable once this returns.

        Raises ``NotFound`` if ``id`` is not awaiting an ack from this consumer
        (already acked, or redelivered elsewhere after ``ack_wait``), and
        ``BadRequest`` on an auto-ack consumer.
        """

    @abc.abstractmethod
    async def nack(self, id: str) -> None:
        """Give the event ``id`` back for redelivery now (or dead-lettering at the retry limit).

        Raises like ``ack``.
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop consuming; unacknowledged events go back to the group. Idempotent; must not raise."""

    async def __aenter__(self) -> Consumer:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class EventsBackend(abc.ABC):
    """An events engine. Implementations must be safe to call concurrently from one event loop."""

    async def publish(
        self,
        namespace: str,
        topic: str,
        payload: bytes,
        metadata: Mapping[str, str] | None = None,
        timestamp_ns: int = 0,
    ) -> tuple[str, int]:
        """Append one event to ``topic``; return its id and sequence once it is durable."""
        item = PublishItem(topic, payload, dict(metadata or {}), timestamp_ns)
        return (await self.publish_many(namespace, [item]))[0]

    @abc.abstractmethod
    async def publish_many(self, namespace: str, items: Sequence[PublishItem]) -> list[tuple[str, int]]:
        """Append ``items`` in one transaction (all or none); return ``(id, sequence)`` of each, in order.

        Validates every item first (``check_item``): ``BadRequest``,
        ``PayloadTooLarge``.
        """

    @abc.abstractmethod
    async def consume(self, namespace: str, topic: str, options: ConsumeSpec) -> Consumer:
        """Start consuming ``topic`` as ``options.group``.

        Registered before it returns: nothing published afterwards is missed
        by the group.
        """

    @abc.abstractmethod
    async def read(
        self, namespace: str, topic: str, limit: int = DEFAULT_READ_LIMIT, offset: int = 0
    ) -> list[events_pb2.Event]:
        """Stored events of ``topic``, oldest first: skip ``offset``, return at most ``limit`` (1-10000).

        An unknown topic has no events.
        """

    @abc.abstractmethod
    async def topics(self, namespace: str) -> list[events_pb2.Topic]:
        """The topics of ``namespace`` sorted by name, with stored counts, last sequence and group lag."""

    @abc.abstractmethod
    async def apply_retention(self, now_ns: int | None = None) -> int:
        """Drop the events retention no longer keeps as of ``now_ns`` (default now); return how many.

        Called periodically by the daemon.
        """

    async def health(self) -> str:
        """``"ok"``, or a short description of what is wrong with the engine."""
        return "ok"

    @abc.abstractmethod
    async def close(self) -> None:
        """End every consumer, flush and release the engine. Idempotent; must not raise."""


def new_ids(count: int) -> list[str]:
    """``count`` distinct ids in UUID 4 form, at a fraction of ``uuid4()`` each.

    A process draws one random value (again after a fork) and counts up from it in the last 48
    bits: ids are unique in a process by the count, and across processes and daemons by the 74
    random bits of the rest, and making one costs no system call. They are not secrets.
    """
    global _next_id
    first = _next_id
    _next_id = first + count
    if _next_id > _LOW48:
        _reseed()
        return new_ids(count)
    prefix = _id_prefix
    return [f"{prefix}{n:012x}" for n in range(first, first + count)]


_LOW48 = (1 << 48) - 1
_UUID4_FIXED = (0xF << 76) | (0x3 << 62)  # the version and variant bits
_UUID4_BITS = (0x4 << 76) | (0x2 << 62)
_id_prefix = ""  # the random base's 80 high bits as the id's first four groups: only the count changes
_next_id = 0


def _reseed() -> None:
    """A new random base for ``new_ids``, counting from a random point below half its range."""
    global _id_prefix, _next_id
    value = int.from_bytes(os.urandom(16)) & ~_UUID4_FIXED | _UUID4_BITS
    _next_id = value & (_LOW48 >> 1)
    h = f"{value & ~_LOW48:032x}"
    _id_prefix = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-"


_reseed()
os.register_at_fork(after_in_child=_reseed)
