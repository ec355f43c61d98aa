from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from micro.errors import BadRequest, ServiceUnavailable
from micro.testing.contracts import StoreContract
from micro_daemon.store.backend import Query, Record, StoreBackend
from micro_daemon.store.backends.memory import MemoryBackend
from micro_daemon.store.backends.sqlite import SQLiteBackend, prefix_upper_bound, select_sql


class TestMemoryBackend(StoreContract):
    @pytest.fixture
    async def backend(self) -> AsyncIterator[StoreBackend]:
        backend = MemoryBackend()
        yield backend
        await backend.close()


class TestSQLiteBackend(StoreContract):
    @pytest.fixture
    async def backend(self, tmp_path: Path) -> AsyncIterator[StoreBackend]:
        backend = await SQLiteBackend(tmp_path / "store.db").open()
        yield backend
        await backend.close()


@pytest.fixture
async def sqlite_backend(tmp_path: Path) -> AsyncIterator[SQLiteBackend]:
    backend = await SQLiteBackend(tmp_path / "store.db").open()
    yield backend
    await backend.close()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_data_persists_after_close_and_reopen(tmp_path: Path) -> None:
    first = await SQLiteBackend(tmp_path / "store.db").open()
    await first.put("db", "tb", Record(key="k", value=b"v", expires_at=time.time() + 60))
    await first.put("db", "tb", Record(key="k", value=b"w"))
    await first.close()
    second = await SQLiteBackend(tmp_path / "store.db").open()
    try:
        assert await second.get("db", "tb", "k") == Record(key="k", value=b"w", version=2)
    finally:
        await second.close()


async def test_files_are_private(tmp_path: Path) -> None:
    path = tmp_path / "new-dir" / "store.db"
    backend = await SQLiteBackend(path).open()
    try:
        await backend.put("db", "tb", Record(key="k", value=b"v"))
        assert _mode(path.parent) == 0o700
        for file in path.parent.iterdir():
            assert _mode(file) == 0o600, file
    finally:
        await backend.close()


async def test_existing_file_is_made_private(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    path.touch(mode=0o644)
    path.chmod(0o644)
    backend = await SQLiteBackend(path).open()
    await backend.close()
    assert _mode(path) == 0o600


@pytest.mark.parametrize(
    ("prefix", "bound"),
    [
        ("", None),
        ("a", "b"),
        ("ab", "ac"),
        ("a\U0010ffff", "b"),
        ("\U0010ffff\U0010ffff", None),
        ("x\ud7ff", "x\ue000"),
        ("%", "&"),
    ],
)
def test_prefix_upper_bound(prefix: str, bound: str | None) -> None:
    assert prefix_upper_bound(prefix) == bound


@pytest.mark.parametrize("order", ["asc", "desc"])
async def test_prefix_query_searches_the_primary_key(sqlite_backend: SQLiteBackend, order: str) -> None:
    sql, params = select_sql("key", "db", "tb", Query(prefix="user/", suffix=".json", order=order), 0.0)  # type: ignore[arg-type]
    conn = sqlite3.connect(sqlite_backend.path)
    try:
        plan = " ".join(row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))
    finally:
        conn.close()
    assert "SEARCH records USING PRIMARY KEY (database=? AND tbl=? AND key>? AND key<?)" in plan
    assert "TEMP B-TREE" not in plan


async def test_group_commit_batches_concurrent_puts(sqlite_backend: SQLiteBackend) -> None:
    keys = [f"k{i:03d}" for i in range(200)]
    versions = await asyncio.gather(
        *(sqlite_backend.put("db", "tb", Record(key=k, value=k.encode())) for k in keys)
    )
    assert versions == [1] * 200
    assert await sqlite_backend.keys("db", "tb", Query()) == keys
    assert 0 < sqlite_backend.file.commits < 100


async def test_a_failing_write_fails_alone_in_its_batch(sqlite_backend: SQLiteBackend) -> None:
    unencodable = Record(key="lone \ud800 surrogate", value=b"v")
    results = await asyncio.gather(
        sqlite_backend.put("db", "tb", Record(key="before", value=b"v")),
        sqlite_backend.put("db", "tb", unencodable),
        sqlite_backend.put("db", "tb", Record(key="after", value=b"v")),
        return_exceptions=True,
    )
    assert results[0] == 1 and results[2] == 1
    assert isinstance(results[1], BadRequest)
    assert await sqlite_backend.keys("db", "tb", Query()) == ["after", "before"]


async def test_close_flushes_queued_writes(tmp_path: Path) -> None:
    backend = await SQLiteBackend(tmp_path / "store.db").open()
    tasks = [asyncio.create_task(backend.put("db", "tb", Record(key=f"k{i}", value=b"v"))) for i in range(50)]
    await asyncio.sleep(0)  # let every put enqueue
    await backend.close()
    assert await asyncio.gather(*tasks) == [1] * 50
    reopened = await SQLiteBackend(tmp_path / "store.db").open()
    try:
        assert len(await reopened.keys("db", "tb", Query())) == 50
    finally:
        await reopened.close()


async def test_calls_after_close_fail_and_close_is_idempotent(tmp_path: Path) -> None:
    backend = await SQLiteBackend(tmp_path / "store.db").open()
    assert await backend.health() == "ok"
    await backend.close()
    await backend.close()
    assert await backend.health() == "closed"
    with pytest.raises(ServiceUnavailable):
        await backend.put("db", "tb", Record(key="k", value=b"v"))
    with pytest.raises(ServiceUnavailable):
        await backend.get("db", "tb", "k")


async def test_close_without_open_does_not_raise(tmp_path: Path) -> None:
    await SQLiteBackend(tmp_path / "store.db").close()


CHILD = """
import asyncio, pathlib, sys
from micro_daemon.store.backend import Record
from micro_daemon.store.backends.sqlite import SQLiteBackend

async def worker(backend, w):
    for i in range(1_000_000):
        key = f"w{w}-{i:07d}"
        await backend.put("db", "tb", Record(key=key, value=key.encode() * 20))
        sys.stdout.write(key + "\\n")
        sys.stdout.flush()

async def main():
    backend = await SQLiteBackend(pathlib.Path(sys.argv[1])).open()
    await asyncio.gather(*(worker(backend, w) for w in range(int(sys.argv[2]))))

asyncio.run(main())
"""


def _kill_mid_burst(path: Path, workers: int, after: int) -> list[str]:
    """Run the writing child, SIGKILL it after `after` acknowledged writes; return every acknowledged key."""
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), str(workers)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None and child.stderr is not None
        lines = [child.stdout.readline() for _ in range(after)]
        os.kill(child.pid, signal.SIGKILL)
        # Read on through the same buffered reader: communicate() reads the pipe itself and would
        # miss what readline() already buffered, cutting a line in two.
        rest, err = child.stdout.read(), child.stderr.read()
        assert child.wait(timeout=30) == -signal.SIGKILL, err
    lines += rest.splitlines(keepends=True)
    return [line[:-1] for line in lines if line.endswith("\n")]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 8])
async def test_acknowledged_writes_survive_sigkill(tmp_path: Path, workers: int) -> None:
    path = tmp_path / "store.db"
    acknowledged = await asyncio.to_thread(_kill_mid_burst, path, workers, 300)
    assert len(acknowledged) >= 300
    backend = await SQLiteBackend(path).open()
    try:
        stored = set(await backend.keys("db", "tb", Query()))
    finally:
        await backend.close()
    assert set(acknowledged) <= stored
