"""Coalescing the PostgreSQL store's calls: one statement for many reads, or many writes, of a table.

While fewer than ``ALONE`` statements run, a call runs at once, alone: no
wait, no task. Beyond that, calls wait, grouped by what they do and where (a
read of table ``t``, a write to table ``t``). A group goes as one statement of
up to ``MAX_BATCH`` calls (``key = ANY(...)``, a multi-row ``INSERT ... ON
CONFLICT``) when fewer than ``ALONE`` statements run again, or at once, as an
extra statement, if it holds ``BATCH_AT`` calls or more, up to as many
statements as the pool has connections. Under load that is one statement
where there were many: a statement's own cost, psycopg's work and the
server's, is most of what a call costs.

Why a group size and not the pool's size decides when another statement
starts: the statements then running on the server follow the load (about the
calls in flight / ``BATCH_AT``), not the number of daemons times their pools.
Two daemons sharing one PostgreSQL did 0.87x the writes of one daemon taking
the same load when each ran up to its 10 connections, since each batched half
as deep; with this rule, 0.99x, and one daemon's writes went from 7,900/s to
9,000-10,000/s (``bench/platform_profile.py``, 2 cores).

Each call keeps its own answer: a read gets its record (or None), a write its
version. A batch the engine refuses for a reason that may be one call's (a
``BadRequest``, such as a key too long to index) is run again one call at a
time, so only that call fails. Two writes of one key never share a statement
(PostgreSQL refuses to change a row twice in one ``INSERT``): the later one
waits for the next.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

from micro.errors import BadRequest

__all__ = ["ALONE", "BATCH_AT", "MAX_BATCH", "Coalescer", "Kind"]

ALONE = 2  # statements a call may run beside, by itself; two, so one slow statement blocks nobody
BATCH_AT = 8  # calls waiting that are worth a statement of their own beyond ALONE
MAX_BATCH = 200

T = TypeVar("T")
R = TypeVar("R")


class Kind(Generic[T, R]):
    """One kind of call: ``one`` runs a call alone, ``many`` runs several as one statement and
    returns their answers in order. ``distinct`` (if set) names what two calls of one statement
    must not share, such as the key a write changes. Both get the group the call was made for."""

    def __init__(
        self,
        one: Callable[[Any, T], Awaitable[R]],
        many: Callable[[Any, Sequence[T]], Awaitable[list[R]]],
        distinct: Callable[[T], Hashable] | None = None,
    ) -> None:
        self.one = one
        self.many = many
        self.distinct = distinct


class _Waiting(Generic[T, R]):
    __slots__ = ("done", "item")

    def __init__(self, item: T) -> None:
        self.item = item
        self.done: asyncio.Future[R] = asyncio.get_running_loop().create_future()


class Coalescer:
    """Runs calls alone while fewer than ``ALONE`` statements run, else in batches, never more than
    ``limit`` statements at once (see above)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._alone = min(ALONE, limit)
        self._running = 0
        self._waiting: dict[tuple[Kind[Any, Any], Hashable], list[_Waiting[Any, Any]]] = {}
        self._batches: set[asyncio.Task[None]] = set()

    async def run(self, kind: Kind[T, R], group: Hashable, item: T) -> R:
        """``item``'s answer, from a statement of its own or one shared with its ``group``."""
        if self._running < self._alone and not self._waiting:
            self._running += 1
            try:
                return await kind.one(group, item)
            finally:
                self._running -= 1
                self._dispatch()
        waiting: _Waiting[T, R] = _Waiting(item)
        self._waiting.setdefault((kind, group), []).append(waiting)
        self._dispatch()
        return await waiting.done  # cancelled: the batch skips it, or drops its answer

    def abandon(self, error: BaseException) -> None:
        """Fail every call still waiting with ``error`` (the engine is closing)."""
        waiting, self._waiting = self._waiting, {}
        for entries in waiting.values():
            for entry in entries:
                if not entry.done.done():
                    entry.done.set_exception(error)

    async def close(self) -> None:
        """Wait for the batches running (the pool's closing ends them). Must not raise."""
        while self._batches:
            await asyncio.gather(*self._batches, return_exceptions=True)

    def _dispatch(self) -> None:
        while self._running < self._limit and (key := self._next_group()) is not None:
            kind, group = key
            batch, rest = _take(self._waiting.pop(key), kind.distinct)
            if rest:
                self._waiting[key] = rest  # at the end: other groups go first
            if batch:
                self._running += 1
                task = asyncio.get_running_loop().create_task(self._run_batch(kind, group, batch))
                self._batches.add(task)
                task.add_done_callback(self._batches.discard)

    def _next_group(self) -> tuple[Kind[Any, Any], Hashable] | None:
        """The group to run next: the oldest while fewer than ``ALONE`` statements run, else the
        oldest of ``BATCH_AT`` calls or more; None if none should go now."""
        if self._running < self._alone:
            return next(iter(self._waiting), None)
        return next((key for key, calls in self._waiting.items() if len(calls) >= BATCH_AT), None)

    async def _run_batch(self, kind: Kind[T, R], group: Hashable, batch: list[_Waiting[T, R]]) -> None:
        try:
            if len(batch) == 1:
                await _one_each(kind, group, batch)
            else:
                try:
                    answers = await kind.many(group, [waiting.item for waiting in batch])
                except BadRequest:  # maybe one call's: each alone, so that only it fails
                    await _one_each(kind, group, batch)
                else:
                    for waiting, answer in zip(batch, answers, strict=True):
                        if not waiting.done.done():
                            waiting.done.set_result(answer)
        except BaseException as exc:
            for waiting in batch:
                if not waiting.done.done():
                    waiting.done.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
        finally:
            self._running -= 1
            self._dispatch()


def _take(
    waiting: list[_Waiting[T, R]], distinct: Callable[[T], Hashable] | None
) -> tuple[list[_Waiting[T, R]], list[_Waiting[T, R]]]:
    """The next batch out of ``waiting`` (callers that gave up left out), and the rest in order."""
    live = [entry for entry in waiting if not entry.done.done()]
    if distinct is None:
        return live[:MAX_BATCH], live[MAX_BATCH:]
    batch: list[_Waiting[T, R]] = []
    rest: list[_Waiting[T, R]] = []
    seen: set[Hashable] = set()
    for entry in live:
        name = distinct(entry.item)
        if len(batch) < MAX_BATCH and name not in seen:
            seen.add(name)
            batch.append(entry)
        else:
            rest.append(entry)
    return batch, rest


async def _one_each(kind: Kind[T, R], group: Hashable, batch: list[_Waiting[T, R]]) -> None:
    for waiting in batch:
        if waiting.done.done():
            continue
        try:
            answer = await kind.one(group, waiting.item)
        except Exception as exc:
            if not waiting.done.done():
                waiting.done.set_exception(exc)
        else:
            if not waiting.done.done():
                waiting.done.set_result(answer)
