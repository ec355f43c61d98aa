"""Socket reads into one buffer per thread, for protocols that parse bytes as they arrive.

asyncio reads a plain ``Protocol``'s socket with ``recv(256 KiB)``: a new
256 KiB bytes object per read, which glibc's malloc serves with ``mmap``,
shrinks with ``mremap`` and frees with ``munmap``, page faults included. In a
client publishing one event at a time through the daemon that was 50 of its 100
µs of CPU per publish, most of it system time; 75 µs in all with this.
A ``BufferedProtocol`` reads into a buffer it lends instead; lending one per
thread is safe because asyncio reads into it and hands the bytes over in one
callback, before any other read of that thread's loop.

A task waiting for what a read brings (an answer, a request) resumes on the
loop's next turn: one more poll and callback for each such wait. A
``ReadFuture`` saves it: completed within a read, its waiter resumes when that
read's ``data_received`` returns (see ``ReadFuture``).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["READ_SIZE", "BufferedReads", "ReadFuture"]

T = TypeVar("T")
_Waiter = tuple[Callable[[Any], object], contextvars.Context | None]

READ_SIZE = 256 * 1024  # what asyncio's selector transports read at most at once


class _ThreadBuffer(threading.local):
    def __init__(self) -> None:
        self.view = memoryview(bytearray(READ_SIZE))
        self.resumes: list[tuple[ReadFuture[Any], _Waiter]] | None = None  # during a read: run after it


_buffer = _ThreadBuffer()


class BufferedReads(asyncio.BufferedProtocol):
    """A protocol whose reads land in its thread's buffer and reach ``data_received`` as bytes.

    Subclasses implement ``data_received`` as they would for ``asyncio.Protocol``.
    """

    def get_buffer(self, sizehint: int) -> memoryview:
        return _buffer.view

    def buffer_updated(self, nbytes: int) -> None:
        local = _buffer
        resumes: list[tuple[ReadFuture[Any], _Waiter]] = []
        local.resumes = resumes
        try:
            self.data_received(bytes(local.view[:nbytes]))
        finally:
            local.resumes = None
            for future, waiter in resumes:
                future._run(waiter)

    def data_received(self, data: bytes) -> None:
        raise NotImplementedError


class ReadFuture(asyncio.Future[T]):
    """A future whose first waiter, when a read completes it, resumes as that read ends.

    ``loop.create_future()``'s schedules its callbacks on the loop: a task that
    awaits it resumes on the next turn, after a poll of the sockets. Completed
    in ``BufferedReads.data_received`` (a request or an answer arrived), this
    one runs its first callback, the awaiting task's wake-up as a rule, right
    after ``data_received`` returns, in the same callback: the task's next step
    (writing the answer, sending the next request) goes out without a turn of
    the loop. Completed anywhere else it behaves as any future. Later callbacks
    are scheduled as usual.
    """

    __slots__ = ("_waiter",)

    def __init__(self, *, loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(loop=loop)
        self._waiter: _Waiter | None = None

    def add_done_callback(
        self, fn: Callable[[ReadFuture[T]], object], *, context: contextvars.Context | None = None
    ) -> None:
        if self._waiter is None and not self.done():
            self._waiter = (fn, context)
        else:
            super().add_done_callback(fn, context=context)

    def remove_done_callback(self, fn: Callable[[ReadFuture[T]], object]) -> int:
        removed = super().remove_done_callback(fn)
        if self._waiter is not None and self._waiter[0] == fn:
            self._waiter = None
            removed += 1
        return removed

    def set_result(self, result: T, /) -> None:
        super().set_result(result)
        self._wake()

    def set_exception(self, exception: type | BaseException, /) -> None:
        super().set_exception(exception)
        self._wake()

    def cancel(self, msg: Any | None = None) -> bool:
        if not super().cancel(msg):
            return False
        self._wake()
        return True

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is None:
            return
        self._waiter = None
        resumes = _buffer.resumes
        if resumes is not None:
            resumes.append((self, waiter))  # at the end of this read
        else:
            fn, context = waiter
            self.get_loop().call_soon(fn, self, context=context)

    def _run(self, waiter: _Waiter) -> None:
        fn, context = waiter
        try:
            if context is None:
                fn(self)
            else:
                context.run(fn, self)
        except BaseException as exc:  # as the loop would: reported, and the reading goes on
            if isinstance(exc, (SystemExit, KeyboardInterrupt)):
                raise
            self.get_loop().call_exception_handler(
                {"message": f"Exception in callback {fn!r}", "exception": exc, "future": self}
            )
