"""Running a coroutine in the caller's stack until it first waits: no task for what never waits."""

from __future__ import annotations

from collections.abc import Awaitable, Coroutine, Generator
from typing import Any, Generic, TypeVar

__all__ = ["Resumed", "eager", "run_eagerly"]

T = TypeVar("T")


def eager(coro: Coroutine[Any, Any, None]) -> Awaitable[None] | None:
    """Run ``coro`` until it first waits: ``None`` if it finished, else an awaitable of the rest.

    The gate's check almost never waits (its answers are cached), and a task per
    call would cost more than the check: this runs it in the caller's stack.
    Exceptions it raises before waiting propagate from here.
    """
    rest = run_eagerly(coro)
    return rest if isinstance(rest, Resumed) else None


def run_eagerly(coro: Coroutine[Any, Any, T]) -> T | Resumed[T]:
    """Run ``coro`` until it first waits: its result if it finished, else the ``Resumed`` rest.

    Exceptions it raises before waiting propagate from here.
    """
    try:
        waiting_on = coro.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    return Resumed(coro, waiting_on)


class Resumed(Generic[T]):
    """The rest of a coroutine that already ran up to its first wait (``waiting_on``)."""

    def __init__(self, coro: Coroutine[Any, Any, T], waiting_on: Any) -> None:
        self._coro = coro
        self._waiting_on = waiting_on

    def ready(self) -> bool:
        """Whether what it waits on is done (a future): awaiting it goes on at once."""
        done = getattr(self._waiting_on, "done", None)
        return done is not None and bool(done())

    def close(self) -> None:
        """Give the rest up: the coroutine gets ``GeneratorExit`` where it waits."""
        self._coro.close()

    def __await__(self) -> Generator[Any, Any, T]:
        coro, waiting_on = self._coro, self._waiting_on
        while True:
            try:
                sent = yield waiting_on
            except BaseException as exc:  # a cancellation: into the coroutine, where it waits
                try:
                    waiting_on = coro.throw(exc)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
                continue
            try:
                waiting_on = coro.send(sent)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
