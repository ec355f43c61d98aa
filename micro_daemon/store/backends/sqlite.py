"""The SQLite store backend: one WAL-mode file, one writer thread with group commit.

The file, its writer thread and its reader pool are a ``SQLiteFile``
(``micro_daemon.sqlite_writer``): reads run on read connections in worker
threads (WAL lets them proceed while a write commits); writes are queued to the
single writer thread, which applies everything queued in one transaction, each
write in its own savepoint, and resolves the callers' futures only after the
commit: many concurrent writes share one fsync (``synchronous=FULL``), and a
conditional write is checked inside the transaction that applies it.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from micro.errors import BadRequest, Conflict, NotFound
from micro_daemon.sqlite_writer import SQLiteFile
from micro_daemon.store.backend import Field, Query, Record, StoreBackend
from micro_daemon.store.backends.memory import conflict_detail

__all__ = ["SQLiteBackend"]

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
_MAX_CODE_POINT = 0x10FFFF
_SURROGATES = range(0xD800, 0xE000)


def _rows(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...] | list[Any]) -> list[Any]:
    # A half-read cursor would pin its read snapshot: always drain and close (try/finally, not
    # contextlib.closing: this runs for every read and write).
    cursor = conn.execute(sql, params)
    try:
        return cursor.fetchall()
    finally:
        cursor.close()


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


class SQLiteBackend(StoreBackend):
    """Records in one SQLite file in WAL mode; see the module docstring for the threading.

    Create it with ``backend = await SQLiteBackend(path).open()``; ``close()`` flushes
    queued writes and releases the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = SQLiteFile(path, _SCHEMA, block="store")

    async def open(self) -> SQLiteBackend:
        """Create the file and schema if needed and start the writer thread."""
        await self.file.open()
        return self

    async def get(self, database: str, table: str, key: str) -> Record:
        sql = f"SELECT {_COLUMNS} FROM records WHERE database = ? AND tbl = ? AND key = ? AND {_LIVE}"
        params = (database, table, key, time.time())
        rows = self.file.read_now(lambda conn: _rows(conn, sql, params))  # a primary-key lookup
        if not rows:
            raise NotFound(f"key {key!r} not found in table {table!r} of namespace {database!r}", id="store")
        return _record(rows[0])

    async def query(self, database: str, table: str, query: Query) -> list[Record]:
        sql, params = select_sql(_COLUMNS, database, table, query, time.time())
        rows = await self.file.read(lambda conn: _rows(conn, sql, params))
        return [_record(row) for row in rows]

    async def keys(self, database: str, table: str, query: Query) -> list[str]:
        sql, params = select_sql("key", database, table, query, time.time())
        rows = await self.file.read(lambda conn: _rows(conn, sql, params))
        return [row[0] for row in rows]

    async def put(self, database: str, table: str, record: Record, *, if_version: int | None = None) -> int:
        return await self.file.write(lambda conn: _put(conn, database, table, record, if_version))

    async def delete(self, database: str, table: str, key: str) -> None:
        await self.file.write(lambda conn: _delete(conn, database, table, key))

    async def databases(self) -> list[str]:
        sql = f"SELECT DISTINCT database FROM records WHERE {_LIVE} ORDER BY database"
        now = time.time()
        return [row[0] for row in await self.file.read(lambda conn: _rows(conn, sql, (now,)))]

    async def tables(self, database: str) -> list[str]:
        sql = f"SELECT DISTINCT tbl FROM records WHERE database = ? AND {_LIVE} ORDER BY tbl"
        params = (database, time.time())
        return [row[0] for row in await self.file.read(lambda conn: _rows(conn, sql, params))]

    async def purge_expired(self) -> int:
        return await self.file.write(_purge)

    async def health(self) -> str:
        # No probe query: health is called often (it is the empty call of benchmarks and
        # load balancers), and a broken reader surfaces on the next read anyway.
        return self.file.status()

    async def close(self) -> None:
        """Flush queued writes, stop the writer thread and close every connection."""
        await self.file.close()


async def open_sqlite(address: str, data_dir: Path) -> SQLiteBackend:
    """The ``sqlite`` engine: ``sqlite:///abs/path.db``, or ``store.db`` in the data directory."""
    path = (
        Path(address.removeprefix("sqlite://")) if address.startswith("sqlite:///") else data_dir / "store.db"
    )
    return await SQLiteBackend(path).open()
