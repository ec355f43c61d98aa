"""The SQLite store backend: one WAL-mode file, one writer thread with group commit.

Reads run on a small pool of read connections in worker threads (WAL lets them
proceed while a write commits). Writes are queued to a single writer thread,
which applies everything queued in one transaction, each write in its own
savepoint, and resolves the callers' futures only after the commit: many
concurrent writes share one fsync, and a conditional write is checked inside
the transaction that applies it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from micro.errors import (
    BadRequest,
    Conflict,
    InternalServerError,
    MicroError,
    NotFound,
    ServiceUnavailable,
    error_for_code,
)
from micro_daemon.store.backend import Field, Query, Record, StoreBackend
from micro_daemon.store.backends.memory import conflict_detail

__all__ = ["SQLiteBackend", "map_sqlite_exceptions"]

T = TypeVar("T")
logger = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    database TEXT NOT NULL,
    tbl TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB NOT NULL,
    metadata TEXT NOT NULL,
    expires_at REAL,
    version INTEGER NOT NULL,
    PRIMARY KEY (database, tbl, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_expires_at ON records (expires_at) WHERE expires_at IS NOT NULL;
"""
_LIVE = "(expires_at IS NULL OR expires_at > ?)"
_COLUMNS = "key, value, metadata, expires_at, version"
_MAX_BATCH = 1000
_READERS = 4
_BUSY_TIMEOUT = 5.0
_MAX_CODE_POINT = 0x10FFFF
_SURROGATES = range(0xD800, 0xE000)


@contextlib.contextmanager
def map_sqlite_exceptions() -> Iterator[None]:
    """Convert sqlite3 (and parameter encoding) errors into ``micro.errors`` ones."""
    try:
        yield
    except (sqlite3.DataError, OverflowError, UnicodeEncodeError) as exc:
        raise BadRequest(f"store cannot hold this value: {exc}", id="store") from exc
    except sqlite3.OperationalError as exc:
        raise ServiceUnavailable(f"store engine unavailable: {exc}", id="store") from exc
    except sqlite3.Error as exc:
        raise InternalServerError(f"store engine error: {exc}", id="store") from exc


def _closed_error() -> ServiceUnavailable:
    return ServiceUnavailable("store is closed", id="store")


def _connect(path: Path) -> sqlite3.Connection:
    # Autocommit mode: transactions are explicit, and a lone SELECT never leaves one open.
    return sqlite3.connect(path, timeout=_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)


def _rows(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...] | list[Any]) -> list[Any]:
    # A half-read cursor would pin its read snapshot: always drain and close.
    with contextlib.closing(conn.execute(sql, params)) as cursor:
        return cursor.fetchall()


def _prepare(path: Path) -> sqlite3.Connection:
    """Create the file (0600, in a 0700 directory if new) and schema; return the writer connection."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    os.chmod(path, 0o600)  # SQLite gives the -wal and -shm files the mode of the database file
    conn = _connect(path)
    try:
        with map_sqlite_exceptions():
            mode = _rows(conn, "PRAGMA journal_mode=WAL", ())[0][0]
            if mode != "wal":
                raise ServiceUnavailable(f"{path}: WAL mode unavailable (got {mode})", id="store")
            # FULL: each commit fsyncs the WAL, so a write survives power loss, not only a process
            # kill (NORMAL would do for that). Group commit spreads the fsync over a whole batch.
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
    except BaseException:
        conn.close()
        raise
    return conn


def prefix_upper_bound(prefix: str) -> str | None:
    """The least string greater than every string that starts with ``prefix`` (None: no bound).

    SQLite compares TEXT as UTF-8 bytes, which is code point order, so bumping the
    last character that is not U+10FFFF gives the bound; surrogates cannot occur
    in stored keys and are skipped.
    """
    chars = list(prefix)
    while chars:
        point = ord(chars.pop()) + 1
        if point <= _MAX_CODE_POINT:
            return "".join(chars) + chr(_SURROGATES.stop if point in _SURROGATES else point)
    return None


def select_sql(columns: str, database: str, table: str, query: Query, now: float) -> tuple[str, list[Any]]:
    """The SELECT for ``query``: prefix as a primary-key range, suffix as a filter."""
    where = ["database = ?", "tbl = ?", _LIVE]
    params: list[Any] = [database, table, now]
    if query.prefix:
        where.append("key >= ?")
        params.append(query.prefix)
        upper = prefix_upper_bound(query.prefix)
        if upper is not None:
            where.append("key < ?")
            params.append(upper)
    if query.suffix:
        where.append("substr(key, -?) = ?")  # counts characters; a too-long suffix yields all of key
        params += [len(query.suffix), query.suffix]
    direction = {"asc": "ASC", "desc": "DESC"}.get(query.order)
    if direction is None:
        raise BadRequest(f"order must be 'asc' or 'desc', not {query.order!r}", id="store")
    params += [query.limit or -1, query.offset]
    sql = (
        f"SELECT {columns} FROM records WHERE {' AND '.join(where)} ORDER BY key {direction} LIMIT ? OFFSET ?"
    )
    return sql, params


def _encode_metadata(metadata: dict[str, Field]) -> str:
    fields = {name: {"type": f.type, "value": f.value} for name, f in metadata.items()}
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))


def _record(row: Any) -> Record:
    key, value, metadata, expires_at, version = row
    fields = {name: Field(type=f["type"], value=f["value"]) for name, f in json.loads(metadata).items()}
    return Record(key=key, value=bytes(value), expires_at=expires_at, metadata=fields, version=version)


def _put(conn: sqlite3.Connection, database: str, table: str, record: Record, if_version: int | None) -> int:
    where = f"database = ? AND tbl = ? AND key = ? AND {_LIVE}"
    found = _rows(
        conn, f"SELECT version FROM records WHERE {where}", (database, table, record.key, time.time())
    )
    version: int = found[0][0] if found else 0
    if if_version is not None and if_version != version:
        raise Conflict(conflict_detail(database, table, record.key, version, if_version), id="store")
    conn.execute(
        "INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            database,
            table,
            record.key,
            record.value,
            _encode_metadata(record.metadata),
            record.expires_at,
            version + 1,
        ),
    )
    return version + 1


def _delete(conn: sqlite3.Connection, database: str, table: str, key: str) -> None:
    sql = f"DELETE FROM records WHERE database = ? AND tbl = ? AND key = ? AND {_LIVE}"
    if conn.execute(sql, (database, table, key, time.time())).rowcount == 0:
        raise NotFound(f"key {key!r} not found in table {table!r} of namespace {database!r}", id="store")


def _purge(conn: sqlite3.Connection) -> int:
    return conn.execute("DELETE FROM records WHERE expires_at <= ?", (time.time(),)).rowcount


@dataclass(frozen=True)
class _Write:
    apply: Callable[[sqlite3.Connection], Any]
    future: concurrent.futures.Future[Any]


class _Writer(threading.Thread):
    """Owns the only writing connection; commits whatever is queued as one transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        super().__init__(name="micro-store-writer", daemon=True)
        self.conn = conn
        self.queue: queue.SimpleQueue[_Write | None] = queue.SimpleQueue()
        self.commits = 0

    def run(self) -> None:
        try:
            while self._step():
                pass
        finally:
            self._fail_leftovers()
            self.conn.close()

    def _step(self) -> bool:
        batch, running = self._take()
        writes = [write for write in batch if write.future.set_running_or_notify_cancel()]
        if writes:
            self._commit(writes)
        return running

    def _take(self) -> tuple[list[_Write], bool]:
        first = self.queue.get()
        if first is None:
            return [], False
        batch = [first]
        while len(batch) < _MAX_BATCH:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, False
            batch.append(item)
        return batch, True

    def _commit(self, writes: list[_Write]) -> None:
        try:
            with map_sqlite_exceptions():
                self.conn.execute("BEGIN IMMEDIATE")
                outcomes = [self._apply(write) for write in writes]
                self.conn.execute("COMMIT")
        except Exception as exc:
            self._rollback()
            for write in writes:
                write.future.set_exception(_copy_error(exc))
            return
        self.commits += 1
        for write, (result, error) in zip(writes, outcomes, strict=True):
            if error is None:
                write.future.set_result(result)
            else:
                write.future.set_exception(error)

    def _apply(self, write: _Write) -> tuple[Any, MicroError | None]:
        self.conn.execute("SAVEPOINT write")
        try:
            with map_sqlite_exceptions():
                result = write.apply(self.conn)
        except Exception as exc:
            self.conn.execute("ROLLBACK TO write")
            self.conn.execute("RELEASE write")
            return None, exc if isinstance(exc, MicroError) else _copy_error(exc)
        self.conn.execute("RELEASE write")
        return result, None

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")

    def _fail_leftovers(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                write = self.queue.get_nowait()
                if write is not None and write.future.set_running_or_notify_cancel():
                    write.future.set_exception(_closed_error())


def _copy_error(exc: Exception) -> MicroError:
    # Every waiting caller gets its own exception object (tracebacks are per raise).
    if isinstance(exc, MicroError):
        return error_for_code(exc.code, exc.detail, id=exc.id)
    return InternalServerError(f"store write failed: {exc!r}", id="store")


class _ReaderPool:
    """Read-only connections, one per reader thread at most, created on demand."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._idle: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def run(self, read: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._acquire()
        try:
            with map_sqlite_exceptions():
                return read(conn)
        finally:
            self._idle.put(conn)

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()

    def _acquire(self) -> sqlite3.Connection:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        conn = _connect(self._path)
        conn.execute("PRAGMA query_only=ON")
        with self._lock:
            self._all.append(conn)
        return conn


class SQLiteBackend(StoreBackend):
    """Records in one SQLite file in WAL mode; see the module docstring for the threading.

    Create it with ``backend = await SQLiteBackend(path).open()``; ``close()`` flushes
    queued writes and releases the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer: _Writer | None = None
        self._readers = _ReaderPool(path)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False

    async def open(self) -> SQLiteBackend:
        """Create the file and schema if needed and start the writer thread."""
        conn = await asyncio.to_thread(_prepare, self.path)
        self._writer = _Writer(conn)
        self._writer.start()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            _READERS, thread_name_prefix="micro-store-read"
        )
        return self

    async def get(self, database: str, table: str, key: str) -> Record:
        sql = f"SELECT {_COLUMNS} FROM records WHERE database = ? AND tbl = ? AND key = ? AND {_LIVE}"
        params = (database, table, key, time.time())
        rows = await self._read(lambda conn: _rows(conn, sql, params))
        if not rows:
            raise NotFound(f"key {key!r} not found in table {table!r} of namespace {database!r}", id="store")
        return _record(rows[0])

    async def query(self, database: str, table: str, query: Query) -> list[Record]:
        sql, params = select_sql(_COLUMNS, database, table, query, time.time())
        rows = await self._read(lambda conn: _rows(conn, sql, params))
        return [_record(row) for row in rows]

    async def keys(self, database: str, table: str, query: Query) -> list[str]:
        sql, params = select_sql("key", database, table, query, time.time())
        rows = await self._read(lambda conn: _rows(conn, sql, params))
        return [row[0] for row in rows]

    async def put(self, database: str, table: str, record: Record, *, if_version: int | None = None) -> int:
        return await self._write(lambda conn: _put(conn, database, table, record, if_version))

    async def delete(self, database: str, table: str, key: str) -> None:
        await self._write(lambda conn: _delete(conn, database, table, key))

    async def databases(self) -> list[str]:
        sql = f"SELECT DISTINCT database FROM records WHERE {_LIVE} ORDER BY database"
        now = time.time()
        return [row[0] for row in await self._read(lambda conn: _rows(conn, sql, (now,)))]

    async def tables(self, database: str) -> list[str]:
        sql = f"SELECT DISTINCT tbl FROM records WHERE database = ? AND {_LIVE} ORDER BY tbl"
        params = (database, time.time())
        return [row[0] for row in await self._read(lambda conn: _rows(conn, sql, params))]

    async def purge_expired(self) -> int:
        return await self._write(_purge)

    async def health(self) -> str:
        if self._closed or self._writer is None:
            return "closed" if self._closed else "not open"
        if not self._writer.is_alive():
            return "writer thread stopped"
        # No probe query: health is called often (it is the empty call of benchmarks and
        # load balancers), and a broken reader surfaces on the next read anyway.
        return "ok"

    async def close(self) -> None:
        """Flush queued writes, stop the writer thread and close every connection."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._writer is not None:
                self._writer.queue.put(None)
                await asyncio.to_thread(self._writer.join)
            if self._executor is not None:
                await asyncio.to_thread(self._executor.shutdown, True)
            self._readers.close()
        except Exception:
            logger.exception("closing the SQLite store at %s failed", self.path)

    async def _read(self, read: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed or self._executor is None:
            raise _closed_error()
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._readers.run, read)

    async def _write(self, apply: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed or self._writer is None:
            raise _closed_error()
        if not self._writer.is_alive():
            raise ServiceUnavailable("store writer thread stopped", id="store")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._writer.queue.put(_Write(apply, future))
        return await asyncio.wrap_future(future)


async def open_sqlite(address: str, data_dir: Path) -> SQLiteBackend:
    """The ``sqlite`` engine: ``sqlite:///abs/path.db``, or ``store.db`` in the data directory."""
    path = (
        Path(address.removeprefix("sqlite://")) if address.startswith("sqlite:///") else data_dir / "store.db"
    )
    return await SQLiteBackend(path).open()
