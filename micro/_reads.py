"""Socket reads into one buffer per thread, for protocols that parse bytes as they arrive.

asyncio reads a plain ``Protocol``'s socket with ``recv(256 KiB)``: a new
256 KiB bytes object per read, which glibc's malloc serves with ``mmap``,
shrinks with ``mremap`` and frees with ``munmap``, page faults included. In a
client publishing one event at a time through the daemon that was 50 of its 100
µs of CPU per publish, most of it system time; 75 µs in all with this.
A ``BufferedProtocol`` reads into a buffer it lends instead; lending one per
thread is safe because asyncio reads into it and hands the bytes over in one
callback, before any other read of that thread's loop.
"""

from __future__ import annotations

import asyncio
import threading

__all__ = ["READ_SIZE", "BufferedReads"]

READ_SIZE = 256 * 1024  # what asyncio's selector transports read at most at once


class _ThreadBuffer(threading.local):
    def __init__(self) -> None:
        self.view = memoryview(bytearray(READ_SIZE))


_buffer = _ThreadBuffer()


class BufferedReads(asyncio.BufferedProtocol):
    """A protocol whose reads land in its thread's buffer and reach ``data_received`` as bytes.

    Subclasses implement ``data_received`` as they would for ``asyncio.Protocol``.
    """

    def get_buffer(self, sizehint: int) -> memoryview:
        return _buffer.view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(_buffer.view[:nbytes]))

    def data_received(self, data: bytes) -> None:
        raise NotImplementedError
