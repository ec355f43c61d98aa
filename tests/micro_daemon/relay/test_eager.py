"""``eager``: a coroutine run in the caller's stack up to its first wait, the rest awaited later."""

from __future__ import annotations

import asyncio

import pytest

from micro.errors import Forbidden
from micro_daemon.relay.eager import Resumed, eager


async def test_a_coroutine_that_never_waits_is_done_at_once() -> None:
    ran: list[str] = []

    async def check() -> None:
        ran.append("checked")

    assert eager(check()) is None
    assert ran == ["checked"]


async def test_an_error_before_any_wait_is_raised_at_once() -> None:
    async def check() -> None:
        raise Forbidden("no", id="gate")

    with pytest.raises(Forbidden):
        eager(check())


async def test_the_rest_runs_when_awaited() -> None:
    ran: list[str] = []

    async def check() -> None:
        ran.append("before")
        await asyncio.sleep(0)
        ran.append("between")
        await asyncio.sleep(0.001)
        ran.append("after")

    pending = eager(check())
    assert pending is not None
    assert ran == ["before"]
    await pending
    assert ran == ["before", "between", "after"]


async def test_a_future_result_reaches_the_coroutine() -> None:
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    got: list[str] = []

    async def check() -> None:
        got.append(await future)

    pending = eager(check())
    assert pending is not None
    asyncio.get_running_loop().call_soon(future.set_result, "answer")
    await asyncio.wait_for(_awaited(pending), 1)
    assert got == ["answer"]


async def test_an_error_after_a_wait_is_raised_by_the_await() -> None:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def check() -> None:
        await future
        raise Forbidden("not after all", id="gate")

    pending = eager(check())
    assert pending is not None
    future.set_result(None)
    with pytest.raises(Forbidden, match="not after all"):
        await pending


async def test_a_failed_future_raises_in_the_coroutine() -> None:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    seen: list[BaseException] = []

    async def check() -> None:
        try:
            await future
        except LookupError as error:
            seen.append(error)
            raise

    pending = eager(check())
    assert pending is not None
    future.set_exception(LookupError("gone"))
    with pytest.raises(LookupError):
        await pending
    assert [str(e) for e in seen] == ["gone"]


async def test_an_already_finished_future() -> None:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def check() -> None:
        await future

    pending = eager(check())
    assert pending is not None
    future.set_result(None)  # done before anyone awaits the rest
    await asyncio.wait_for(_awaited(pending), 1)


async def test_cancelling_the_awaiting_task_cancels_the_coroutine() -> None:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    ended: list[str] = []

    async def check() -> None:
        try:
            await future
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise

    pending = eager(check())
    assert pending is not None
    task = asyncio.create_task(_awaited(pending))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ended == ["cancelled"]
    assert future.cancelled()


async def test_a_coroutine_may_clean_up_after_a_cancellation() -> None:
    # It catches the cancellation, waits again (for its cleanup), then finishes: the task ends
    # as the coroutine did, here without an error.
    first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    ended: list[str] = []

    async def check() -> None:
        try:
            await first
        except asyncio.CancelledError:
            await asyncio.sleep(0.001)
            ended.append("cleaned up")

    pending = eager(check())
    assert pending is not None
    task = asyncio.create_task(_awaited(pending))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.wait_for(task, 1)
    assert ended == ["cleaned up"]
    assert not task.cancelled()


async def test_a_coroutine_that_finishes_when_cancelled() -> None:
    first: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def check() -> None:
        try:
            await first
        except asyncio.CancelledError:
            return  # swallowed: nothing more to wait for

    pending = eager(check())
    assert pending is not None
    task = asyncio.create_task(_awaited(pending))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.wait_for(task, 1)
    assert task.done() and not task.cancelled()


async def _awaited(pending: object) -> None:
    await pending  # type: ignore[misc]


async def test_resumed_gives_the_coroutines_result() -> None:
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def compute() -> int:
        return await future * 2

    coro = compute()
    waiting_on = coro.send(None)
    asyncio.get_running_loop().call_soon(future.set_result, 21)
    assert await Resumed(coro, waiting_on) == 42
