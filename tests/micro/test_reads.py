"""``BufferedReads``: protocols sharing one read buffer per thread, over real sockets."""

from __future__ import annotations

import asyncio
import os
import socket
import threading

import pytest

from micro._reads import READ_SIZE, BufferedReads, ReadFuture


class Collect(BufferedReads):
    """Keeps every chunk ``data_received`` got, as it got it."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.closed = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set_result(None)


async def _send_to_collectors(payloads: list[bytes]) -> list[Collect]:
    """One connection per payload, all in this loop, written in small interleaved pieces."""
    collectors: list[Collect] = []

    def accept() -> Collect:
        collectors.append(Collect())
        return collectors[-1]

    server = await asyncio.get_running_loop().create_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    writers = [(await asyncio.open_connection("127.0.0.1", port))[1] for _ in payloads]
    piece = 64 * 1024 + 7
    for start in range(0, max(map(len, payloads)), piece):
        for writer, payload in zip(writers, payloads, strict=True):
            writer.write(payload[start : start + piece])
        await asyncio.gather(*(writer.drain() for writer in writers))
        await asyncio.sleep(0)
    for writer in writers:
        writer.close()
    await asyncio.wait_for(asyncio.gather(*(c.closed for c in collectors)), 10)
    server.close()
    return collectors


async def test_each_connection_gets_exactly_its_bytes_and_chunks_stay_as_they_arrived() -> None:
    payloads = [os.urandom(3 * READ_SIZE + 5), os.urandom(READ_SIZE // 3), b"x" * 11]
    collectors = await _send_to_collectors(payloads)

    got = sorted((b"".join(c.chunks) for c in collectors), key=len)
    assert got == sorted(payloads, key=len)  # a chunk is a copy: later reads did not change it
    assert all(type(chunk) is bytes for c in collectors for chunk in c.chunks)
    assert max(len(chunk) for c in collectors for chunk in c.chunks) <= READ_SIZE


def test_loops_in_several_threads_read_at_once_without_mixing_their_bytes() -> None:
    results: dict[int, tuple[list[bytes], list[bytes]]] = {}

    def run(index: int) -> None:
        payloads = [os.urandom(READ_SIZE + index * 1000 + 1) for _ in range(2)]
        collectors = asyncio.run(_send_to_collectors(payloads))
        results[index] = (sorted(payloads), sorted(b"".join(c.chunks) for c in collectors))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(results) == [0, 1, 2]
    for sent, got in results.values():
        assert got == sent


class Answer(BufferedReads):
    """Completes ``pending`` with each read's bytes, and notes when the read callback's own
    ``call_soon`` ran: what ran before it ran within the read."""

    def __init__(self, order: list[str], fail: bool = False) -> None:
        self.order = order
        self.fail = fail
        self.pending: asyncio.Future[bytes] | None = None

    def data_received(self, data: bytes) -> None:
        asyncio.get_running_loop().call_soon(self.order.append, "next turn")
        if self.pending is not None and not self.pending.done():
            if self.fail:
                self.pending.set_exception(ConnectionResetError("refused"))
            else:
                self.pending.set_result(data)


async def _answered_after(make: type[asyncio.Future[bytes]], fail: bool = False) -> list[str]:
    """Where a task waiting for a read resumes: the order of its step and the loop's next turn."""
    loop = asyncio.get_running_loop()
    order: list[str] = []
    theirs, ours = socket.socketpair()
    protocol = Answer(order, fail)
    transport, _ = await loop.create_connection(lambda: protocol, sock=ours)
    protocol.pending = make(loop=loop)

    async def wait() -> None:
        assert protocol.pending is not None
        try:
            order.append(f"resumed with {await protocol.pending!r}")
        except ConnectionResetError as exc:
            order.append(f"resumed with {exc}")

    waiting = loop.create_task(wait())
    await asyncio.sleep(0)
    theirs.send(b"hi")
    await asyncio.wait_for(waiting, 5)
    await asyncio.sleep(0)
    transport.close()
    theirs.close()
    return order


async def test_a_task_waiting_for_a_read_future_resumes_within_the_read() -> None:
    assert await _answered_after(ReadFuture) == ["resumed with b'hi'", "next turn"]
    assert await _answered_after(ReadFuture, fail=True) == ["resumed with refused", "next turn"]
    # a plain future's waiter waits for the loop's next turn, behind what the read scheduled
    assert await _answered_after(asyncio.Future) == ["next turn", "resumed with b'hi'"]


async def test_a_read_future_completed_outside_a_read_is_an_ordinary_future() -> None:
    loop = asyncio.get_running_loop()
    future: ReadFuture[int] = ReadFuture(loop=loop)
    loop.call_later(0.01, future.set_result, 7)
    assert await future == 7

    later: ReadFuture[int] = ReadFuture(loop=loop)
    seen: list[int] = []
    later.add_done_callback(lambda f: seen.append(1))  # the first callback: kept apart
    later.add_done_callback(lambda f: seen.append(2))  # later ones: the usual way
    later.set_result(0)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert sorted(seen) == [1, 2]


async def test_a_wait_for_a_read_future_can_be_cancelled_timed_out_and_unhooked() -> None:
    loop = asyncio.get_running_loop()
    future: ReadFuture[int] = ReadFuture(loop=loop)
    task = loop.create_task(_await(future))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert future.cancelled()

    other: ReadFuture[int] = ReadFuture(loop=loop)
    done, pending = await asyncio.wait({other}, timeout=0.01)  # removes its callback at the timeout
    assert not done and pending == {other}
    called: list[int] = []

    def note(future: asyncio.Future[int]) -> None:
        called.append(future.result())

    other.add_done_callback(note)  # the first callback again: kept apart, and removed from there
    assert other.remove_done_callback(note) == 1
    other.set_result(1)
    assert await other == 1
    await asyncio.sleep(0)
    assert called == []


async def _await(future: asyncio.Future[int]) -> int:
    return await future


async def test_a_waiter_that_raises_is_reported_and_the_reading_goes_on() -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        theirs, ours = socket.socketpair()
        order: list[str] = []
        protocol = Answer(order)
        transport, _ = await loop.create_connection(lambda: protocol, sock=ours)
        protocol.pending = ReadFuture(loop=loop)

        def broken(future: asyncio.Future[bytes]) -> None:
            raise RuntimeError("a broken waiter")

        protocol.pending.add_done_callback(broken)
        theirs.send(b"one")
        for _ in range(100):
            if reported:
                break
            await asyncio.sleep(0.01)
        assert isinstance(reported[0]["exception"], RuntimeError)
        protocol.pending = ReadFuture(loop=loop)
        theirs.send(b"two")
        assert await asyncio.wait_for(protocol.pending, 5) == b"two"  # the connection still reads
        transport.close()
        theirs.close()
    finally:
        loop.set_exception_handler(None)
