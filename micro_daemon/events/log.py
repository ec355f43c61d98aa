"""The storage seam under the embedded events engine: what a log must keep and answer.

The delivery engine (``engine.EmbeddedEvents``, ``group.Group``) holds group
state in memory and persists it here. A group's persisted state is
``delivered`` (every sequence up to it was handed out, or reserved for an
auto-ack group) plus ``pending``: the sequences up to ``delivered`` that are not
done yet, with their delivery attempts. Every sequence up to ``delivered`` that
is not pending is done. ``acked`` (all up to it are done) is derived and stored
for listings.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from micro.proto import events_pb2
from micro_daemon.events.backend import Retention

__all__ = ["Append", "EventLog", "GroupState", "GroupStats", "GroupWrite", "TopicStats"]


@dataclass(slots=True)
class Append:
    """An event to append; the log assigns its sequence. Not changed once made (not frozen: a
    frozen dataclass costs about a microsecond more to make, paid per event)."""

    topic: str
    id: str
    payload: bytes
    metadata: Mapping[str, str]
    timestamp_ns: int


@dataclass
class GroupState:
    """A group's persisted position (see the module docstring)."""

    delivered: int
    pending: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class GroupWrite:
    """New values for one group: its row, plus pending rows to upsert (seq → attempts) or delete.

    ``reset`` deletes every pending row of the group first.
    """

    topic: str
    group: str
    delivered: int
    acked: int
    upsert: Mapping[int, int] = field(default_factory=dict)
    delete: Sequence[int] = ()
    reset: bool = False


@dataclass(frozen=True)
class GroupStats:
    name: str
    delivered: int
    pending: int


@dataclass(frozen=True)
class TopicStats:
    name: str
    count: int
    first_seq: int
    last_seq: int
    groups: list[GroupStats]


class EventLog(abc.ABC):
    """Durable storage of events and group positions for one engine instance."""

    @abc.abstractmethod
    async def commit(
        self, namespace: str, appends: Sequence[Append], groups: Sequence[GroupWrite]
    ) -> list[tuple[int, int]]:
        """Append events and write group states in one transaction; return ``(sequence, timestamp_ns)``
        of each append (a timestamp of 0 becomes the commit time)."""

    def commit_now(
        self, namespace: str, appends: Sequence[Append], groups: Sequence[GroupWrite]
    ) -> list[tuple[int, int]] | None:
        """``commit`` on the calling thread, if this log can do it without waiting (a short write
        to an idle writer); ``None`` when it cannot, having written nothing. By default never."""
        return None

    @abc.abstractmethod
    async def last_seq(self, namespace: str, topic: str) -> int:
        """The last sequence ever assigned in ``topic`` (0: none)."""

    @abc.abstractmethod
    async def fetch(
        self, namespace: str, topic: str, after: int, limit: int, max_bytes: int
    ) -> list[events_pb2.Event]:
        """Stored events with sequence > ``after`` in order: at most ``limit``, and stop once
        ``max_bytes`` of payload are reached (at least one event when any)."""

    @abc.abstractmethod
    async def get(self, namespace: str, topic: str, seq: int) -> events_pb2.Event | None:
        """The stored event ``seq``, or None if retention removed it."""

    @abc.abstractmethod
    async def read(self, namespace: str, topic: str, limit: int, offset: int) -> list[events_pb2.Event]:
        """Stored events oldest first, skipping ``offset``."""

    @abc.abstractmethod
    async def seq_at(self, namespace: str, topic: str, since_ns: int) -> int | None:
        """The lowest stored sequence with a timestamp at or after ``since_ns``, or None."""

    @abc.abstractmethod
    async def load_group(self, namespace: str, topic: str, group: str) -> GroupState | None:
        """The saved state of ``group``, or None if it was never saved."""

    @abc.abstractmethod
    async def stats(self, namespace: str) -> list[TopicStats]:
        """Every topic of ``namespace`` that ever had an event, sorted by name, with its groups."""

    @abc.abstractmethod
    async def trim(self, default: Retention, overrides: Mapping[str, Retention], now_ns: int) -> int:
        """Delete the events retention drops (``overrides`` by topic name); return how many."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release the storage. Idempotent; must not raise."""
