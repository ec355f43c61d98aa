"""Coalescing the PostgreSQL store's calls: one statement for many reads, or many writes, of a table.

While fewer statements run than the pool has connections, a call runs at
once, alone: no wait, no task. Once every connection is busy, calls wait as
they would for a connection, grouped by what they do and where (a read of
table ``t``, a write to table ``t``), and when a statement finishes, the
oldest group waiting goes as one statement of up to ``MAX_BATCH`` calls
(``key = ANY(...)``, a multi-row ``INSERT ... ON CONFLICT``). Under load that
is one statement where there were many: a statement's own cost, psycopg's
work and the server's, is most of what a call costs (``bench/platform_profile.py``).

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

__all__ = ["MAX_BATCH", "Coalescer", "Kind"]

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
    """Runs calls alone while fewer than ``limit`` statements run, else in batches (see above)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._running = 0
        self._waiting: dict[tuple[Kind[Any, Any], Hashable], list[_Waiting[Any, Any]]] = {}
        self._batches: set[asyncio.Task[None]] = set()

    async def run(self, kind: Kind[T, R], group: Hashable, item: T) -> R:
        """``item``'s answer, from a statement of its own or one shared with its ``group``."""
        if self._running < self._limit and not self._waiting:
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
        while self._running < self._limit and self._waiting:
            kind, group = key = next(iter(self._waiting))
            batch, rest = _take(self._waiting.pop(key), kind.distinct)
            if rest:
                self._waiting[key] = rest  # at the end: other groups go first
            if batch:
                self._running += 1
                task = asyncio.get_running_loop().create_task(self._run_batch(kind, group, batch))
                self._batches.add(task)
                task.add_done_callback(self._batches.discard)

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
