"""The delivery engine of the embedded events backends, over a storage ``EventLog``.

Publishing appends through the log, then wakes the groups of that topic that
are loaded in this process (no polling). A topic or group costs memory only
while some consumer uses it: idle ones are dropped, and publishing to a topic
nobody consumes touches nothing but the log. There are no per-topic tasks or
threads; a group runs a task only while it saves its state.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Coroutine, Mapping, Sequence
from functools import partial
from typing import Any

from micro.errors import ServiceUnavailable
from micro.proto import events_pb2
from micro_daemon.events.backend import (
    DEFAULT_READ_LIMIT,
    ERROR_ID,
    MAX_EVENT_BYTES,
    Consumer,
    ConsumeSpec,
    EventsBackend,
    PublishItem,
    Retention,
    Start,
    check_items,
    check_read,
    new_ids,
    validate_topic,
)
from micro_daemon.events.group import Group
from micro_daemon.events.log import Append, EventLog, GroupState, GroupWrite, TopicStats
from micro_daemon.events.saving import SavedGroup, TopicState

__all__ = ["EmbeddedEvents"]

logger = logging.getLogger(__name__)
_Key = tuple[str, str]


class EmbeddedEvents(EventsBackend):
    """Consumer groups, acks, redelivery and dead letters in this process, over ``log``.

    ``retention`` applies to every topic except those named in
    ``retention_overrides`` (by topic name, in every namespace); ``apply_retention``
    enforces both. ``max_event_bytes`` bounds payload plus metadata.
    """

    def __init__(
        self,
        log: EventLog,
        *,
        retention: Retention | None = None,
        retention_overrides: Mapping[str, Retention] | None = None,
        max_event_bytes: int = MAX_EVENT_BYTES,
    ) -> None:
        self.log = log
        self.retention = retention or Retention()
        self.retention_overrides = dict(retention_overrides or {})
        self.max_event_bytes = max_event_bytes
        self._topics: dict[_Key, TopicState] = {}
        self._topic_loads: dict[_Key, asyncio.Future[int]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    # -- EventsBackend ------------------------------------------------------

    async def publish_many(self, namespace: str, items: Sequence[PublishItem]) -> list[tuple[str, int]]:
        self._check_open()
        check_items(items, self.max_event_bytes)
        if not items:
            return []
        appends = [
            Append(item.topic, event_id, item.payload, dict(item.metadata), item.timestamp_ns)
            for item, event_id in zip(items, new_ids(len(items)), strict=True)
        ]
        return await self.commit(namespace, appends, [])

    async def consume(self, namespace: str, topic: str, options: ConsumeSpec) -> Consumer:
        self._check_open()
        validate_topic(topic)
        state = await self._topic(namespace, topic)
        group = await self._group(state, options.group)
        new, group.new = group.new, False
        consumer = group.attach(options)
        try:
            start = await self._start_seq(state, options) if new or not options.start_if_new else None
            if start is not None:
                group.reset(start)
                await group.sync()
        except BaseException:
            await consumer.close()
            raise
        return consumer

    async def read(
        self, namespace: str, topic: str, limit: int = DEFAULT_READ_LIMIT, offset: int = 0
    ) -> list[events_pb2.Event]:
        self._check_open()
        check_read(topic, limit, offset)
        return await self.log.read(namespace, topic, limit, offset)

    async def topics(self, namespace: str) -> list[events_pb2.Topic]:
        self._check_open()
        return [self._topic_entry(namespace, stats) for stats in await self.log.stats(namespace)]

    async def apply_retention(self, now_ns: int | None = None) -> int:
        self._check_open()
        now = time.time_ns() if now_ns is None else now_ns
        return await self.log.trim(self.retention, self.retention_overrides, now)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            for topic in list(self._topics.values()):
                for group in list(topic.groups.values()):
                    for consumer in list(group.consumers):
                        await consumer.close()
            while self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
        except Exception:
            logger.exception("closing the events engine failed")
        await self.log.close()

    # -- the Host protocol of groups ----------------------------------------

    async def commit(
        self, namespace: str, appends: Sequence[Append], groups: Sequence[GroupWrite]
    ) -> list[tuple[str, int]]:
        """Write through the log, then wake the consumers of the topics appended to.

        The write finishes (and wakes) even if the caller is cancelled meanwhile.
        """
        now = self.log.commit_now(namespace, appends, groups)
        if now is not None:
            self._wake(namespace, appends, now)
            return [(append.id, seq) for append, (seq, _) in zip(appends, now, strict=True)]
        write = asyncio.ensure_future(self.log.commit(namespace, appends, groups))
        write.add_done_callback(partial(self._committed, namespace, appends))
        stored = await asyncio.shield(write)
        return [(append.id, seq) for append, (seq, _) in zip(appends, stored, strict=True)]

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def evict(self, group: SavedGroup) -> None:
        topic = group.topic
        if topic.groups.get(group.name) is not group or group.busy():
            return
        del topic.groups[group.name]
        group.unload()
        key = (topic.namespace, topic.name)
        if not topic.groups and not topic.loading and key not in self._topic_loads:
            self._topics.pop(key, None)

    # -- helpers ------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ServiceUnavailable("events engine is closed", id=ERROR_ID)

    def _committed(self, namespace: str, appends: Sequence[Append], write: asyncio.Future[Any]) -> None:
        if not write.cancelled() and write.exception() is None:
            self._wake(namespace, appends, write.result())

    def _wake(self, namespace: str, appends: Sequence[Append], stored: list[tuple[int, int]]) -> None:
        for append, (seq, timestamp) in zip(appends, stored, strict=True):
            topic = self._topics.get((namespace, append.topic))
            if topic is not None:
                topic.advance(seq, partial(_stored_event, append, seq, timestamp))

    async def _topic(self, namespace: str, name: str) -> TopicState:
        key = (namespace, name)
        topic = self._topics.get(key)
        if topic is None:
            topic = self._topics[key] = TopicState(namespace, name)
            started = self._topic_loads[key] = asyncio.ensure_future(self.log.last_seq(namespace, name))
            started.add_done_callback(partial(self._topic_loaded, topic))
        load = self._topic_loads.get(key)
        if load is not None:
            await asyncio.shield(load)
        return topic

    def _topic_loaded(self, topic: TopicState, load: asyncio.Future[int]) -> None:
        key = (topic.namespace, topic.name)
        self._topic_loads.pop(key, None)
        if load.cancelled() or load.exception() is not None:
            if not topic.groups and not topic.loading:
                self._topics.pop(key, None)
            return
        topic.last_seq = max(topic.last_seq, load.result())  # publishes during the load count too

    async def _group(self, topic: TopicState, name: str) -> Group:
        if not name:
            private = Group(self, topic, f"~{uuid.uuid4()}", GroupState(topic.last_seq), persistent=False)
            private.new = True
            topic.groups[private.name] = private
            return private
        group = topic.groups.get(name)
        if group is not None:
            return group
        loading = topic.loading.get(name)
        if loading is None:
            loading = topic.loading[name] = asyncio.ensure_future(self._load_group(topic, name))
            loading.add_done_callback(partial(_forget_load, topic, name))
        return await asyncio.shield(loading)

    async def _load_group(self, topic: TopicState, name: str) -> Group:
        state = await self.log.load_group(topic.namespace, topic.name, name)
        group = Group(self, topic, name, state or GroupState(topic.last_seq))
        topic.groups[name] = group
        if state is None:  # a new group starts with the events published from now on
            group.new = True
            group.reset(topic.last_seq + 1)
            await group.sync()
        return group

    async def _start_seq(self, topic: TopicState, options: ConsumeSpec) -> int | None:
        if options.start is Start.BEGINNING:
            return 1
        if options.start is Start.SEQUENCE:
            return options.sequence
        if options.start is Start.TIME:
            last = topic.last_seq  # before the query: anything later is at or after `since`
            found = await self.log.seq_at(topic.namespace, topic.name, options.since_ns)
            return last + 1 if found is None else found
        return None

    def _topic_entry(self, namespace: str, stats: TopicStats) -> events_pb2.Topic:
        lags = {
            group.name: max(0, stats.last_seq - max(group.delivered, stats.first_seq - 1)) + group.pending
            for group in stats.groups
        }
        live = self._topics.get((namespace, stats.name))
        if live is not None:
            for group in live.groups.values():
                if group.persistent:
                    lags[group.name] = group.lag(stats.first_seq)
        return events_pb2.Topic(
            name=stats.name,
            count=stats.count,
            last_sequence=stats.last_seq,
            groups=[events_pb2.Group(name=name, lag=lag) for name, lag in sorted(lags.items())],
        )


def _stored_event(append: Append, seq: int, timestamp: int) -> events_pb2.Event:
    return events_pb2.Event(
        id=append.id,
        topic=append.topic,
        metadata=append.metadata,
        payload=append.payload,
        timestamp=timestamp,
        sequence=seq,
    )


def _forget_load(topic: TopicState, name: str, loading: asyncio.Future[Group]) -> None:
    topic.loading.pop(name, None)
    if not loading.cancelled():
        loading.exception()  # retrieved here: every waiter may have been cancelled
