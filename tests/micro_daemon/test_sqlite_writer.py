"""The SQLite file behind the embedded engines: group commit, and short writes on the event loop."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from micro.errors import BadRequest, InternalServerError
from micro_daemon import sqlite_writer
from micro_daemon.sqlite_writer import SQLiteFile

T = TypeVar("T")
SCHEMA = "CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v BLOB NOT NULL);"


async def _open(tmp_path: Path, synchronous: str) -> SQLiteFile:
    return await SQLiteFile(tmp_path / "t.db", SCHEMA, block="test", synchronous=synchronous).open()


@pytest.fixture
async def normal(tmp_path: Path) -> AsyncIterator[SQLiteFile]:
    file = await _open(tmp_path, "NORMAL")
    yield file
    await file.close()


def _insert(key: int, value: bytes = b"x") -> tuple[list[str], Callable[[sqlite3.Connection], int]]:
    threads: list[str] = []

    def apply(conn: sqlite3.Connection) -> int:
        threads.append(threading.current_thread().name)
        conn.execute("INSERT INTO t VALUES (?, ?)", (key, value))
        return key

    return threads, apply


async def _write_short(file: SQLiteFile, apply: Callable[[sqlite3.Connection], T]) -> T:
    """A short write as the events engine makes one: now if it can, else through the writer."""
    done = file.write_now(apply)
    return done[0] if done is not None else await file.write(apply)


async def _count(file: SQLiteFile) -> int:
    return int((await file.read(lambda conn: conn.execute("SELECT count(*) FROM t").fetchone()))[0])


async def test_short_writes_commit_on_the_loop_when_the_writer_is_idle(normal: SQLiteFile) -> None:
    threads, apply = _insert(1)
    assert await _write_short(normal, apply) == 1
    assert threads == [threading.current_thread().name]
    threads, apply = _insert(2)
    assert await normal.write(apply) == 2
    assert threads == ["micro-test-writer"]
    assert await _count(normal) == 2


async def test_short_writes_stay_on_the_loop_while_the_writer_is_idle(normal: SQLiteFile) -> None:
    names = []
    for key in range(3000):
        threads, apply = _insert(key)
        await _write_short(normal, apply)
        names += threads
    # Only while the writer checkpoints does a write wait for it.
    assert names.count("micro-test-writer") < len(names) // 20
    assert await _count(normal) == 3000


async def test_the_wal_is_checkpointed_with_short_writes_only(normal: SQLiteFile) -> None:
    wal = normal.path.with_name("t.db-wal")
    for key in range(16_000):  # about 128 MB, as fast as the loop goes: many checkpoints' worth
        _, apply = _insert(key, b"x" * 8000)
        await _write_short(normal, apply)
    # The checkpoints run behind such writes, and restart the WAL: it stays bounded (about 45 MB here).
    assert wal.stat().st_size < 64 * 1024 * 1024


async def test_a_slow_checkpoint_holds_short_writes_off_so_the_wal_stays_bounded(
    normal: SQLiteFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = sqlite_writer._Writer._checkpoint

    def slow_disk(writer: sqlite_writer._Writer) -> None:
        time.sleep(0.3)  # the checkpoint's fsyncs on a busy disk; the loop goes on writing meanwhile
        checkpoint(writer)

    monkeypatch.setattr(sqlite_writer._Writer, "_checkpoint", slow_disk)
    wal = normal.path.with_name("t.db-wal")
    largest = 0
    for key in range(8_000):  # 64 MB
        _, apply = _insert(key, b"x" * 8000)
        await _write_short(normal, apply)
        largest = max(largest, wal.stat().st_size)
    assert largest < sqlite_writer._WAL_HOLD_BYTES + 4 * 1024 * 1024
    assert await _count(normal) == 8_000


async def test_concurrent_writes_queue_behind_the_writer(normal: SQLiteFile) -> None:
    applies = [_insert(key) for key in range(200)]
    results = await asyncio.gather(*(_write_short(normal, apply) for _, apply in applies))
    assert sorted(results) == list(range(200))
    assert await _count(normal) == 200


async def test_a_failing_short_write_rolls_back_and_maps_its_error(normal: SQLiteFile) -> None:
    def half(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES (1, x'00')")
        conn.execute("INSERT INTO t VALUES (1, x'00')")  # a duplicate key

    with pytest.raises(InternalServerError):
        await _write_short(normal, half)

    def refuse(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES (2, x'00')")
        raise BadRequest("no", id="test")

    with pytest.raises(BadRequest):
        await _write_short(normal, refuse)
    assert await _count(normal) == 0
    _, apply = _insert(3)
    assert await _write_short(normal, apply) == 3


async def test_full_never_writes_on_the_loop(tmp_path: Path) -> None:
    file = await _open(tmp_path, "FULL")
    try:
        threads, apply = _insert(1)
        await _write_short(file, apply)
        assert threads == ["micro-test-writer"]
    finally:
        await file.close()


def test_synchronous_is_full_or_normal(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        SQLiteFile(tmp_path / "t.db", SCHEMA, block="test", synchronous="OFF")
