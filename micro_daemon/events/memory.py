"""The in-memory events backend, for tests: the embedded engine over dictionaries."""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial

from micro.proto import events_pb2
from micro_daemon.events.backend import MAX_EVENT_BYTES, Retention
from micro_daemon.events.engine import EmbeddedEvents
from micro_daemon.events.log import Append, EventLog, GroupState, GroupStats, GroupWrite, TopicStats

__all__ = ["MemoryEventData", "MemoryEvents"]

_TopicKey = tuple[str, str]
_GroupKey = tuple[str, str, str]


@dataclass
class _Topic:
    last_seq: int = 0
    seqs: list[int] = field(default_factory=list)
    events: list[events_pb2.Event] = field(default_factory=list)

    def keep(self, predicate: Callable[[events_pb2.Event], bool]) -> int:
        kept = [event for event in self.events if predicate(event)]
        removed = len(self.events) - len(kept)
        self.events = kept
        self.seqs = [event.sequence for event in kept]
        return removed


@dataclass
class _Group:
    delivered: int
    acked: int
    pending: dict[int, int] = field(default_factory=dict)


class MemoryEventData:
    """What a ``MemoryEvents`` stores; hand it to a new one to simulate a daemon restart."""

    def __init__(self) -> None:
        self.topics: dict[_TopicKey, _Topic] = {}
        self.groups: dict[_GroupKey, _Group] = {}


def _newer(cutoff: int, event: events_pb2.Event) -> bool:
    return event.timestamp >= cutoff


def _after(floor: int, event: events_pb2.Event) -> bool:
    return event.sequence > floor


def _copy(event: events_pb2.Event) -> events_pb2.Event:
    copy = events_pb2.Event()
    copy.CopyFrom(event)
    return copy


class _MemoryLog(EventLog):
    def __init__(self, data: MemoryEventData) -> None:
        self.data = data

    async def commit(
        self, namespace: str, appends: Sequence[Append], groups: Sequence[GroupWrite]
    ) -> list[tuple[int, int]]:
        results = [self._append(namespace, append) for append in appends]
        for write in groups:
            self._write_group(namespace, write)
        return results

    def _append(self, namespace: str, append: Append) -> tuple[int, int]:
        topic = self.data.topics.setdefault((namespace, append.topic), _Topic())
        topic.last_seq += 1
        timestamp = append.timestamp_ns or time.time_ns()
        event = events_pb2.Event(
            id=append.id,
            topic=append.topic,
            metadata=append.metadata,
            payload=append.payload,
            timestamp=timestamp,
            sequence=topic.last_seq,
        )
        topic.seqs.append(topic.last_seq)
        topic.events.append(event)
        return topic.last_seq, timestamp

    def _write_group(self, namespace: str, write: GroupWrite) -> None:
        key = (namespace, write.topic, write.group)
        group = self.data.groups.setdefault(key, _Group(write.delivered, write.acked))
        if write.reset:
            group.pending.clear()
        group.delivered, group.acked = write.delivered, write.acked
        group.pending.update(write.upsert)
        for seq in write.delete:
            group.pending.pop(seq, None)

    async def last_seq(self, namespace: str, topic: str) -> int:
        found = self.data.topics.get((namespace, topic))
        return found.last_seq if found else 0

    async def fetch(
        self, namespace: str, topic: str, after: int, limit: int, max_bytes: int
    ) -> list[events_pb2.Event]:
        found = self.data.topics.get((namespace, topic))
        if found is None:
            return []
        start = bisect.bisect_right(found.seqs, after)
        events, size = [], 0
        for event in found.events[start : start + limit]:
            events.append(_copy(event))
            size += len(event.payload)
            if size >= max_bytes:
                break
        return events

    async def get(self, namespace: str, topic: str, seq: int) -> events_pb2.Event | None:
        found = self.data.topics.get((namespace, topic))
        if found is None:
            return None
        index = bisect.bisect_left(found.seqs, seq)
        if index < len(found.seqs) and found.seqs[index] == seq:
            return _copy(found.events[index])
        return None

    async def read(self, namespace: str, topic: str, limit: int, offset: int) -> list[events_pb2.Event]:
        found = self.data.topics.get((namespace, topic))
        return [_copy(event) for event in found.events[offset : offset + limit]] if found else []

    async def seq_at(self, namespace: str, topic: str, since_ns: int) -> int | None:
        found = self.data.topics.get((namespace, topic))
        matching = [event.sequence for event in found.events if event.timestamp >= since_ns] if found else []
        return min(matching, default=None)

    async def load_group(self, namespace: str, topic: str, group: str) -> GroupState | None:
        found = self.data.groups.get((namespace, topic, group))
        return GroupState(found.delivered, dict(found.pending)) if found else None

    async def stats(self, namespace: str) -> list[TopicStats]:
        result = []
        for (space, name), topic in sorted(self.data.topics.items()):
            if space != namespace:
                continue
            groups = [
                GroupStats(group, state.delivered, len(state.pending))
                for (space_, topic_, group), state in sorted(self.data.groups.items())
                if (space_, topic_) == (namespace, name)
            ]
            first = topic.seqs[0] if topic.seqs else topic.last_seq + 1
            result.append(TopicStats(name, len(topic.events), first, topic.last_seq, groups))
        return result

    async def trim(self, default: Retention, overrides: Mapping[str, Retention], now_ns: int) -> int:
        removed = 0
        for (_, name), topic in self.data.topics.items():
            policy = overrides.get(name, default)
            if policy.max_age_s is not None:
                cutoff = now_ns - int(policy.max_age_s * 1e9)
                removed += topic.keep(partial(_newer, cutoff))
            if policy.max_count is not None:
                removed += topic.keep(partial(_after, topic.last_seq - policy.max_count))
        return removed

    async def close(self) -> None:
        pass


class MemoryEvents(EmbeddedEvents):
    """Events kept in this process only. Pass the ``data`` of a closed one to simulate a restart."""

    def __init__(
        self,
        data: MemoryEventData | None = None,
        *,
        retention: Retention | None = None,
        retention_overrides: Mapping[str, Retention] | None = None,
        max_event_bytes: int = MAX_EVENT_BYTES,
    ) -> None:
        self.data = data or MemoryEventData()
        super().__init__(
            _MemoryLog(self.data),
            retention=retention,
            retention_overrides=retention_overrides,
            max_event_bytes=max_event_bytes,
        )
