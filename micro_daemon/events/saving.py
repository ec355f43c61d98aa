"""The saved side of a consumer group: its pending events and position, written as snapshots.

A group's persisted state (see ``log``) is ``delivered`` (the frontier) plus
its pending events with their attempts. Every change bumps an epoch; a write
is a snapshot of the current state, so concurrent changes share one write
(``sync`` waits for the write covering its epoch), a failed write is redone by
the next, and events to append with it (dead letters) go in the same
transaction.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from micro.errors import InternalServerError, MicroError, error_for_code
from micro.proto import events_pb2
from micro_daemon.events.backend import DEAD_LETTER_SUFFIX, ERROR_ID, new_ids
from micro_daemon.events.log import Append, GroupState, GroupWrite

if TYPE_CHECKING:
    from micro_daemon.events.group import Group, GroupConsumer
    from micro_daemon.events.log import EventLog

__all__ = ["Host", "Pending", "SavedGroup", "TopicState", "dead_letter"]

logger = logging.getLogger(__name__)


class Host(Protocol):
    """What a group needs from its engine."""

    log: EventLog

    async def commit(
        self, namespace: str, appends: Sequence[Append], groups: Sequence[GroupWrite]
    ) -> list[tuple[str, int]]: ...

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]: ...

    def evict(self, group: SavedGroup) -> None: ...


class TopicState:
    """A topic some group consumes: its last sequence and its loaded groups."""

    __slots__ = ("groups", "last_seq", "loading", "name", "namespace")

    def __init__(self, namespace: str, name: str) -> None:
        self.namespace = namespace
        self.name = name
        self.last_seq = 0
        self.groups: dict[str, Group] = {}
        self.loading: dict[str, asyncio.Future[Group]] = {}

    def advance(self, seq: int, event: Callable[[], events_pb2.Event] | None = None) -> None:
        """Record that ``seq`` was committed and wake the groups waiting for events.

        ``event`` makes the event: the groups that would read it next from the
        log get it in their buffer instead (a copy each), sparing them a read.
        """
        if seq <= self.last_seq:
            return
        self.last_seq = seq
        made: events_pb2.Event | None = None
        for group in self.groups.values():
            if event is not None and group.reads_next(seq):
                if made is None:
                    made = copy = event()
                else:
                    copy = events_pb2.Event()
                    copy.CopyFrom(made)
                group.buffer.append(copy)
            group.wake()


class Pending:
    """An event handed out and not done yet, or given back and waiting in ``ready``."""

    __slots__ = ("attempts", "event", "holder", "retry_limit", "seq", "token")

    def __init__(self, seq: int, attempts: int, event: events_pb2.Event | None = None) -> None:
        self.seq = seq
        self.attempts = attempts
        self.event = event
        self.holder: GroupConsumer | None = None
        self.retry_limit = -1
        self.token = 0

    def exhausted(self) -> bool:
        return self.retry_limit >= 0 and self.attempts >= self.retry_limit


class SavedGroup:
    """A group's state and how it is saved; ``Group`` adds the delivery on top."""

    def __init__(
        self, host: Host, topic: TopicState, name: str, state: GroupState, *, persistent: bool = True
    ) -> None:
        self.host = host
        self.topic = topic
        self.name = name
        self.persistent = persistent
        self.new = False  # no saved position and no consumer yet (taken by the first consume)
        self.consumers: set[GroupConsumer] = set()
        self.pending = {seq: Pending(seq, attempts) for seq, attempts in state.pending.items()}
        self._low: list[int] = sorted(self.pending)  # a heap of pending seqs (stale ones skipped lazily)
        self.frontier = state.delivered  # `delivered` of the next snapshot
        self.durable = state.delivered  # `delivered` as saved (lowered at once when the frontier is)
        self.generation = 0
        self._epoch = self._synced = 0
        self._changed: set[int] = set()
        self._reset = False
        self._outbox: list[Append] = []
        self._syncing: asyncio.Task[Any] | None = None
        self._sync_waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._dead_lettering = 0
        self._attached = False

    def describe(self) -> str:
        return f"group {self.name!r} of topic {self.topic.name!r}"

    def unload(self) -> None:
        """Release what the group holds in the event loop (timers); it is being dropped from memory."""

    def busy(self) -> bool:
        """Whether the group must stay loaded: in use, saving, or not yet taken by its first consumer."""
        in_use = self.consumers or self._syncing or self._dead_lettering or not self._attached
        return bool(in_use) or self._epoch > self._synced

    def _add(self, item: Pending) -> None:
        self.pending[item.seq] = item
        if self.persistent:  # only snapshots prune the heap
            heapq.heappush(self._low, item.seq)

    def _acked(self) -> int:
        """Every event up to this one is done."""
        while self._low and self._low[0] not in self.pending:
            heapq.heappop(self._low)
        return min(self._low[0] - 1, self.frontier) if self._low else self.frontier

    def _forget(self, seq: int) -> None:
        del self.pending[seq]
        self._changed.add(seq)
        self._touch()

    def _touch(self) -> None:
        self._epoch += 1

    async def sync(self) -> None:
        """Return once every change made before the call is saved."""
        target = self._epoch
        if self._synced >= target:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._sync_waiters.append((target, waiter))  # targets only grow: a queue suffices
        if self._syncing is None:
            self._start_sync()
        await waiter

    def _sync_soon(self) -> None:
        if self._syncing is None:
            self._start_sync()

    def _start_sync(self) -> None:
        epoch, changed, reset, outbox = self._epoch, self._changed, self._reset, self._outbox
        self._changed, self._reset, self._outbox = set(), False, []
        writes = [self._snapshot(changed, reset)] if self.persistent else []
        if not writes and not outbox:
            self._saved(epoch, None)
            return
        task = self.host.spawn(self.host.commit(self.topic.namespace, outbox, writes))
        self._syncing = task
        generation = self.generation

        def done(task: asyncio.Task[Any]) -> None:
            self._syncing = None
            error = _failure(task)
            if error is not None:
                self._changed |= changed
                self._reset |= reset
                self._outbox[:0] = outbox
                logger.warning("saving %s failed: %s", self.describe(), error.detail)
            elif writes and generation == self.generation:
                self.durable = min(writes[0].delivered, self.frontier)
            self._saved(epoch, error)

        task.add_done_callback(done)

    def _saved(self, epoch: int, error: MicroError | None) -> None:
        """A write covering changes up to ``epoch`` ended: answer its waiters, and go on if needed."""
        if error is None:
            self._synced = max(self._synced, epoch)
        while self._sync_waiters and self._sync_waiters[0][0] <= epoch:
            _, waiter = self._sync_waiters.popleft()
            if not waiter.done():
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(error_for_code(error.code, error.detail, id=error.id))
        # After a failure, only waiters for later changes retry; otherwise lazy changes are saved too.
        if self._sync_waiters or (error is None and self._epoch > self._synced):
            self._start_sync()
        elif not self.busy():
            self.host.evict(self)

    def _snapshot(self, changed: set[int], reset: bool) -> GroupWrite:
        upsert = {seq: self.pending[seq].attempts for seq in changed if seq in self.pending}
        if reset:
            upsert = {seq: item.attempts for seq, item in self.pending.items()}
        return GroupWrite(
            topic=self.topic.name,
            group=self.name,
            delivered=self.frontier,
            acked=self._acked(),
            upsert=upsert,
            delete=[seq for seq in changed if seq not in self.pending],
            reset=reset,
        )


def _failure(task: asyncio.Task[Any]) -> MicroError | None:
    if task.cancelled():
        return InternalServerError("saving the group was cancelled", id=ERROR_ID)
    exc = task.exception()
    if exc is None or isinstance(exc, MicroError):
        return exc
    return InternalServerError(f"saving the group failed: {exc!r}", id=ERROR_ID)


def dead_letter(event: events_pb2.Event, attempts: int, reason: str) -> Append:
    """The append that sends ``event`` to its topic's dead-letter topic."""
    metadata = dict(event.metadata)
    metadata.update(
        {
            "dead-letter-reason": f"not acknowledged after {attempts} deliveries (last: {reason})",
            "original-sequence": str(event.sequence),
            "original-topic": event.topic,
            "original-id": event.id,
        }
    )
    return Append(
        topic=event.topic + DEAD_LETTER_SUFFIX,
        id=new_ids(1)[0],
        payload=event.payload,
        metadata=metadata,
        timestamp_ns=0,
    )
