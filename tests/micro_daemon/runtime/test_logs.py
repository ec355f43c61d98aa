from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from micro_daemon.runtime.logs import Line, LogFile


@pytest.fixture
def log(tmp_path: Path) -> Iterator[LogFile]:
    log_file = LogFile(tmp_path / "logs" / "helloworld.log")
    yield log_file
    log_file.close()


def messages(lines: list[Line]) -> list[str]:
    return [line.message for line in lines]


async def take(stream: AsyncIterator[Line], count: int) -> list[str]:
    return [(await asyncio.wait_for(anext(stream), 1)).message for _ in range(count)]


def test_records_are_json_lines_in_a_private_file(log: LogFile) -> None:
    log.write("hello", {"stream": "stdout"}, timestamp=1.5)
    log.write_event("reloaded in 412 ms")

    raw = log.path.read_text().splitlines()
    assert json.loads(raw[0]) == {"timestamp": 1.5, "metadata": {"stream": "stdout"}, "message": "hello"}
    assert json.loads(raw[1])["metadata"] == {"source": "runtime"}
    assert stat.S_IMODE(log.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(log.path.parent.stat().st_mode) == 0o700


def test_a_message_with_newlines_stays_one_record(log: LogFile) -> None:
    log.write("Traceback:\n  line 1\n", {"stream": "stderr"})
    assert messages(log.tail(5)) == ["Traceback:\n  line 1\n"]


def test_tail_returns_the_last_records_oldest_first(log: LogFile) -> None:
    for i in range(10):
        log.write(f"line {i}")
    assert messages(log.tail(3)) == ["line 7", "line 8", "line 9"]
    assert messages(log.tail(100)) == [f"line {i}" for i in range(10)]
    assert log.tail(0) == []


def test_tail_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    assert LogFile(tmp_path / "none.log").tail(10) == []


def test_since_filters_older_records(log: LogFile) -> None:
    for i in range(10):
        log.write(f"line {i}", timestamp=100.0 + i)
    assert messages(log.tail(100, since=107)) == ["line 7", "line 8", "line 9"]
    assert messages(log.tail(2, since=105)) == ["line 8", "line 9"]
    assert log.tail(10, since=200) == []


def test_torn_and_foreign_lines_are_skipped(log: LogFile) -> None:
    log.write("before")
    with log.path.open("a") as file:
        file.write('{"timestamp": 1, "meta\nnot json at all\n[1, 2]\n')
    log.write("after")
    assert messages(log.tail(10)) == ["before", "after"]


def test_tail_reads_lines_longer_than_a_block(log: LogFile) -> None:
    big = "x" * 200_000
    log.write("first")
    log.write(big)
    log.write("last")
    assert messages(log.tail(3)) == ["first", big, "last"]


def test_rotation_keeps_the_configured_number_of_backups(tmp_path: Path) -> None:
    log = LogFile(tmp_path / "svc.log", max_bytes=1000, backups=2)
    for i in range(100):
        log.write(f"line {i:03d} " + "." * 40)
    log.close()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["svc.log", "svc.log.1", "svc.log.2"]
    assert all(p.stat().st_size <= 1000 for p in tmp_path.iterdir())
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in tmp_path.iterdir())


def test_tail_crosses_rotation_boundaries(tmp_path: Path) -> None:
    log = LogFile(tmp_path / "svc.log", max_bytes=1000, backups=3)
    for i in range(100):
        log.write(f"line {i}")
    current = len(log.path.read_text().splitlines())

    tail = messages(log.tail(current + 20))
    assert tail == [f"line {i}" for i in range(80 - current, 100)]
    log.close()


def test_a_reopened_log_appends_and_rotates_on_the_existing_size(tmp_path: Path) -> None:
    path = tmp_path / "svc.log"
    first = LogFile(path, max_bytes=500)
    for i in range(5):
        first.write(f"old {i}")
    first.close()

    second = LogFile(path, max_bytes=500)
    for i in range(10):
        second.write(f"new {i}")
    second.close()
    assert path.with_name("svc.log.1").exists()
    assert messages(second.tail(15)) == [f"old {i}" for i in range(5)] + [f"new {i}" for i in range(10)]


async def test_follow_yields_the_tail_then_new_records(log: LogFile) -> None:
    log.write("a")
    log.write("b")
    stream = log.follow(1)
    assert await take(stream, 1) == ["b"]

    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    log.write("c")
    assert (await asyncio.wait_for(waiting, 1)).message == "c"
    await stream.aclose()


async def test_follow_loses_nothing_written_while_the_tail_is_consumed(log: LogFile) -> None:
    log.write("a")
    stream = log.follow(10)
    assert await take(stream, 1) == ["a"]
    log.write("b")
    log.write("c")
    assert await take(stream, 2) == ["b", "c"]
    await stream.aclose()


async def test_follow_survives_rotation(tmp_path: Path) -> None:
    log = LogFile(tmp_path / "svc.log", max_bytes=300, backups=1)
    stream = log.follow(0)
    pending = asyncio.ensure_future(take(stream, 30))
    await asyncio.sleep(0.01)  # the follow subscribes when first iterated
    for i in range(30):
        log.write(f"line {i}")
    assert await pending == [f"line {i}" for i in range(30)]
    assert log.path.with_name("svc.log.1").exists()
    await stream.aclose()
    log.close()


async def test_follow_applies_since_to_new_records(log: LogFile) -> None:
    log.write("old", timestamp=10)
    stream = log.follow(10, since=50)
    log.write("older", timestamp=20)
    log.write("new", timestamp=60)
    assert await take(stream, 1) == ["new"]
    await stream.aclose()


async def test_close_ends_follow_after_pending_records(log: LogFile) -> None:
    stream = log.follow(0)
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    log.write("last")
    log.close()
    assert (await asyncio.wait_for(pending, 1)).message == "last"
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(stream), 1)


async def test_a_reader_far_behind_is_told_what_it_missed(log: LogFile) -> None:
    stream = log.follow(0)
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    for i in range(10_005):
        log.write(f"line {i}")
    first = await asyncio.wait_for(pending, 1)
    assert first.metadata == {"source": "runtime"}
    assert first.message.startswith("5 log lines skipped")
    assert await take(stream, 1) == ["line 5"]
    await stream.aclose()


async def test_an_abandoned_follow_unsubscribes(log: LogFile) -> None:
    stream = log.follow(0)
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    await stream.aclose()
    assert not log._followers
