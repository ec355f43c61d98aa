"""A consumer group of the embedded engine: hands events to its consumers.

Consumers pull: each ``__anext__`` takes the group's next event (redeliveries
first, then fresh events from a shared buffer filled from the log in batches,
or by the publish that committed them when the group had read up to them), so
the consumers of a group share its events one at a time.

What must be saved before an event leaves (``saving`` writes it): an auto-ack
hand-over must be durable first, or a crash would deliver the event twice; to
keep replay fast the group reserves (marks done) a window of buffered events
with one write (see ``_reserve``). Reserved events not handed out when the last
consumer leaves become pending again; after a crash they are skipped (at most
once, as JetStream's AckNone). A manual hand-over is saved right after (a crash
re-delivers it, which manual acks allow); acks are durable before ``ack``
returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
from collections import deque

from micro.errors import BadRequest, NotFound
from micro.proto import events_pb2
from micro_daemon.events.backend import ERROR_ID, Consumer, ConsumeSpec
from micro_daemon.events.log import GroupState
from micro_daemon.events.saving import Host, Pending, SavedGroup, TopicState, dead_letter

__all__ = ["FETCH_BYTES", "FETCH_ROWS", "RESERVE_SPAN", "Group", "GroupConsumer"]

FETCH_ROWS = 500
FETCH_BYTES = 8 * 1024 * 1024
RESERVE_SPAN = 0.05
logger = logging.getLogger(__name__)
_tokens = itertools.count(1)


class GroupConsumer(Consumer):
    """One consumer of a ``Group``."""

    def __init__(self, group: Group, spec: ConsumeSpec) -> None:
        self.group = group
        self.auto_ack = spec.auto_ack
        self.ack_wait = spec.ack_wait
        self.retry_limit = spec.retry_limit
        self.max_in_flight = spec.max_in_flight
        self.inflight: dict[str, int] = {}
        self.closed = False

    async def __anext__(self) -> events_pb2.Event:
        if self.closed:
            raise StopAsyncIteration
        return await self.group.take(self)

    async def take_ready(self, limit: int) -> list[events_pb2.Event]:
        return await self.group.take_ready(self, limit)

    async def ack(self, id: str) -> None:
        await self.group.ack(self, self._seq(id))

    async def nack(self, id: str) -> None:
        await self.group.nack(self, self._seq(id))

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            await self.group.detach(self)
        except Exception:
            logger.exception("closing a consumer of %s failed", self.group.describe())

    def _seq(self, id: str) -> int:
        if self.auto_ack:
            raise BadRequest("this consumer acknowledges automatically: do not ack or nack", id=ERROR_ID)
        seq = self.inflight.pop(id, None)
        if seq is None:
            raise NotFound(
                f"event {id!r} is not awaiting an ack from this consumer (already acked, "
                "or redelivered after its ack wait)",
                id=ERROR_ID,
            )
        return seq


class Group(SavedGroup):
    """The delivery state of one consumer group of one topic (see the module docstring)."""

    def __init__(
        self, host: Host, topic: TopicState, name: str, state: GroupState, *, persistent: bool = True
    ) -> None:
        super().__init__(host, topic, name, state, persistent=persistent)
        self.ready: deque[int] = deque(sorted(self.pending))
        self.buffer: deque[events_pb2.Event] = deque()
        self.next_seq = state.delivered + 1
        self.handed_max = state.delivered
        self._waiters: list[asyncio.Future[None]] = []
        self._filling: asyncio.Future[None] | None = None
        self._deadlines: list[tuple[float, int, int]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._window = 1
        self._reserved_at = 0.0

    def reads_next(self, seq: int) -> bool:
        """Whether ``seq`` is the event this group would read next from the log, for a consumer."""
        following = self.buffer[-1].sequence + 1 if self.buffer else self.next_seq
        return following == seq and self._filling is None and bool(self.consumers)

    def lag(self, first_seq: int) -> int:
        """Events of the topic not done by the group yet."""
        done_upto = max(self.next_seq - 1, first_seq - 1)
        return max(0, self.topic.last_seq - done_upto) + len(self.pending)

    # -- consumers ----------------------------------------------------------

    def attach(self, spec: ConsumeSpec) -> GroupConsumer:
        consumer = GroupConsumer(self, spec)
        self.consumers.add(consumer)
        self._attached = True
        return consumer

    async def detach(self, consumer: GroupConsumer) -> None:
        self.consumers.discard(consumer)
        held = [self.pending[seq] for seq in consumer.inflight.values() if seq in self.pending]
        consumer.inflight.clear()
        for item in held:
            item.holder = None
        if not self.consumers:
            self._release_buffer()
        self._touch()
        self.wake()
        for item in held:
            await self._give_back(item, "its consumer closed")
        await self.sync()
        self.host.evict(self)

    def reset(self, start_seq: int) -> None:
        """Move the group to ``start_seq``: forget every pending event and buffered batch."""
        self.generation += 1
        for item in self.pending.values():
            if item.holder is not None and item.event is not None:
                item.holder.inflight.pop(item.event.id, None)
        self.pending.clear()
        self._low.clear()
        self.ready.clear()
        self.buffer.clear()
        self._deadlines.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.next_seq = start_seq
        self.frontier = self.handed_max = start_seq - 1
        self.durable = -1  # the old position stays saved until the reset is
        self._changed.clear()
        self._reset = True
        self._touch()
        self.wake()

    # -- taking events ------------------------------------------------------

    async def take(self, consumer: GroupConsumer) -> events_pb2.Event:
        """The next event for ``consumer``: a redelivery, else the next fresh one; waits for one."""
        while True:
            if consumer.closed:
                raise StopAsyncIteration
            if len(consumer.inflight) >= consumer.max_in_flight:
                await self._wait()  # until one of its events is acked, nacked or expires
            elif self.ready:
                event = await self._redeliver(consumer, self.ready.popleft())
                if event is not None:
                    return event
            elif self.buffer:
                return await self._hand_fresh(consumer, self.buffer.popleft())
            elif self.next_seq <= self.topic.last_seq:
                await self._fill()
            else:
                await self._wait()

    async def take_ready(self, consumer: GroupConsumer, limit: int) -> list[events_pb2.Event]:
        """Up to ``limit`` events for ``consumer`` as ``take`` would give them, without waiting for any."""
        events: list[events_pb2.Event] = []
        while len(events) < limit and not consumer.closed:
            if len(consumer.inflight) >= consumer.max_in_flight:
                break
            if self.ready:
                event = await self._redeliver(consumer, self.ready.popleft())
                if event is not None:
                    events.append(event)
            elif self.buffer:
                try:
                    events.append(await self._hand_fresh(consumer, self.buffer.popleft()))
                except Exception:
                    if not events:
                        raise
                    break  # hand over those taken; the next take meets the error again
            elif self.next_seq <= self.topic.last_seq:
                await self._fill()
            else:
                break
        return events

    async def _hand_fresh(self, consumer: GroupConsumer, event: events_pb2.Event) -> events_pb2.Event:
        seq, generation = event.sequence, self.generation
        self.next_seq = max(self.next_seq, seq + 1)
        self.handed_max = max(self.handed_max, seq)
        event.attempt = 1
        if consumer.auto_ack:
            if self.persistent and seq > self.durable:
                if seq > self.frontier:
                    self._reserve(seq)
                await self._sync_or_give_back(generation, Pending(seq, 1, event))
            return event
        covered = seq <= self.frontier
        item = Pending(seq, 1, event)
        self._add(item)
        self._hold(consumer, item)
        self.frontier = max(self.frontier, seq)
        self._changed.add(seq)
        self._touch()
        if covered:  # inside a reserved batch: the pending row must be saved before the event leaves
            await self._sync_or_give_back(generation, item)
        else:
            self._sync_soon()
        return event

    def _reserve(self, seq: int) -> None:
        """Mark ``seq`` and a window of buffered events after it done, with one write.

        The window doubles while the consumer uses it up quickly and halves when
        it does not, so replay costs few writes while a crash skips only about
        ``RESERVE_SPAN`` seconds' worth of events.
        """
        now = asyncio.get_running_loop().time()
        fast = now - self._reserved_at < RESERVE_SPAN
        self._window = min(FETCH_ROWS, self._window * 2) if fast else max(1, self._window // 2)
        self._reserved_at = now
        end = self.buffer[-1].sequence if self.buffer else seq
        self.frontier = max(seq, min(end, seq + self._window - 1))
        self._touch()

    async def _redeliver(self, consumer: GroupConsumer, seq: int) -> events_pb2.Event | None:
        item = self.pending.get(seq)
        if item is None or item.holder is not None:
            return None
        if item.event is None:
            generation = self.generation
            try:
                item.event = await self.host.log.get(self.topic.namespace, self.topic.name, seq)
            except BaseException:
                if generation == self.generation and self.pending.get(seq) is item:
                    self.ready.appendleft(seq)
                raise
            if generation != self.generation or self.pending.get(seq) is not item:
                return None
            if item.event is None:  # removed by retention
                self._forget(seq)
                self._sync_soon()
                return None
        item.attempts += 1
        event = events_pb2.Event()
        event.CopyFrom(item.event)
        event.attempt = item.attempts
        if consumer.auto_ack:
            self._forget(seq)
            await self._sync_or_give_back(self.generation, item)
        else:
            self._hold(consumer, item)
            self._changed.add(seq)
            self._touch()
            self._sync_soon()
        return event

    async def _sync_or_give_back(self, generation: int, item: Pending) -> None:
        """Save the hand-over of ``item``; if that fails, the event goes back to the group."""
        try:
            await self.sync()
        except BaseException:
            if generation == self.generation:
                if item.holder is not None and item.event is not None:
                    item.holder.inflight.pop(item.event.id, None)
                item.holder = None
                item.attempts -= 1
                self._add(item)
                self.ready.appendleft(item.seq)
                self._changed.add(item.seq)
                self._touch()
            raise

    async def _fill(self) -> None:
        if self._filling is not None:
            await asyncio.shield(self._filling)
            return
        done = self._filling = asyncio.get_running_loop().create_future()
        generation, after, last = self.generation, self.next_seq - 1, self.topic.last_seq
        try:
            events = await self.host.log.fetch(
                self.topic.namespace, self.topic.name, after, FETCH_ROWS, FETCH_BYTES
            )
            if generation == self.generation:
                self.buffer.extend(events)
                if not events:  # removed by retention
                    self.next_seq = max(self.next_seq, last + 1)
        finally:
            self._filling = None
            done.set_result(None)

    async def _wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def wake(self) -> None:
        """Let every waiting consumer look for an event again."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- acks, timers, dead letters -----------------------------------------

    async def ack(self, consumer: GroupConsumer, seq: int) -> None:
        self._forget(seq)
        if len(consumer.inflight) + 1 == consumer.max_in_flight:
            self.wake()
        await self.sync()

    async def nack(self, consumer: GroupConsumer, seq: int) -> None:
        item = self.pending[seq]
        item.holder = None
        await self._give_back(item, "nacked")

    def _hold(self, consumer: GroupConsumer, item: Pending) -> None:
        assert item.event is not None
        item.holder = consumer
        item.retry_limit = consumer.retry_limit
        item.token = next(_tokens)
        consumer.inflight[item.event.id] = item.seq
        loop = asyncio.get_running_loop()
        deadline = loop.time() + consumer.ack_wait
        heapq.heappush(self._deadlines, (deadline, item.seq, item.token))
        if self._deadlines[0][2] == item.token:
            self._arm(loop)

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(self._deadlines[0][0], self._expire) if self._deadlines else None

    def _expire(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, seq, token = heapq.heappop(self._deadlines)
            item = self.pending.get(seq)
            if item is None or item.token != token or item.holder is None:
                continue  # acked, given back or held again since
            assert item.event is not None
            item.holder.inflight.pop(item.event.id, None)
            item.holder = None
            if item.exhausted():
                self.host.spawn(self._dead_letter(item, "ack wait expired"))
            else:
                self.ready.append(seq)
            self.wake()
        self._timer = None
        self._arm(loop)

    async def _give_back(self, item: Pending, reason: str) -> None:
        if item.exhausted():
            await self._dead_letter(item, reason)
        else:
            self.ready.append(item.seq)
            self.wake()

    async def _dead_letter(self, item: Pending, reason: str) -> None:
        self._dead_lettering += 1
        try:
            generation = self.generation
            event = item.event or await self.host.log.get(self.topic.namespace, self.topic.name, item.seq)
            if generation != self.generation or self.pending.get(item.seq) is not item:
                return
            self._forget(item.seq)
            if event is not None:
                self._outbox.append(dead_letter(event, item.attempts, reason))
            await self.sync()
        finally:
            self._dead_lettering -= 1

    def _release_buffer(self) -> None:
        """The last consumer left: buffered events go back to the log, and their reservation is undone.

        The buffer only holds events above everything handed out, so lowering
        the frontier to just below it un-reserves exactly those.
        """
        if not self.buffer:
            return
        first = self.buffer[0].sequence
        self.buffer.clear()
        if first <= self.frontier:
            self.frontier = first - 1
            self.durable = min(self.durable, self.frontier)
        self.next_seq = first

    def unload(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
