"""``BufferedReads``: protocols sharing one read buffer per thread, over real sockets."""

from __future__ import annotations

import asyncio
import os
import threading

from micro._reads import READ_SIZE, BufferedReads


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
