"""The SQLite events backend: the embedded engine over one WAL-mode file.

Writes (appends, group positions, dead letters) go through one writer thread
with group commit (``micro_daemon.sqlite_writer``), and ``publish`` returns
once its event is committed. Durability is the address's ``synchronous``
option: ``normal`` (the default) commits without an fsync, so a published
event survives the daemon being killed but maybe not a power loss, as
JetStream's file store with its default sync interval; ``full``
(``sqlite://?synchronous=full``) fsyncs every commit, shared by the
publishers that commit together, and survives power loss too. Reads run on
reader threads; consumers fetch in batches of ``group.FETCH_ROWS`` rows, so
replay costs one query per batch.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from micro.errors import SetupError
from micro.proto import events_pb2
from micro_daemon.events.backend import ERROR_ID, MAX_EVENT_BYTES, Retention
from micro_daemon.events.engine import EmbeddedEvents
from micro_daemon.events.log import Append, EventLog, GroupState, GroupStats, GroupWrite, TopicStats
from micro_daemon.sqlite_writer import SQLiteFile

__all__ = ["SQLiteEvents", "open_sqlite"]

# A rowid table: payloads may be large, and the (namespace, topic, seq) index keeps range scans cheap.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    namespace TEXT NOT NULL,
    topic TEXT NOT NULL,
    seq INTEGER NOT NULL,
    id TEXT NOT NULL,
    ts INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    payload BLOB NOT NULL,
    PRIMARY KEY (namespace, topic, seq)
);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
CREATE TABLE IF NOT EXISTS topics (
    namespace TEXT NOT NULL,
    topic TEXT NOT NULL,
    last_seq INTEGER NOT NULL,
    PRIMARY KEY (namespace, topic)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS groups (
    namespace TEXT NOT NULL,
    topic TEXT NOT NULL,
    grp TEXT NOT NULL,
    acked_seq INTEGER NOT NULL,      -- every event up to it is done
    delivered_seq INTEGER NOT NULL,  -- every event up to it is done or pending
    PRIMARY KEY (namespace, topic, grp)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending (
    namespace TEXT NOT NULL,
    topic TEXT NOT NULL,
    grp TEXT NOT NULL,
    seq INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    PRIMARY KEY (namespace, topic, grp, seq)
) WITHOUT ROWID;
"""
_EVENT = "seq, id, ts, metadata, payload"
_TRIM_CHUNK = 5000
# A commit at most this big may run on the event loop: about a hundred microseconds without an fsync.
_SHORT_APPENDS = 16
_SHORT_ROWS = 64
_SHORT_BYTES = 64 * 1024
_NO_METADATA = "{}"


def _encode(metadata: Mapping[str, str]) -> str:
    return json.dumps(metadata, ensure_ascii=False, separators=(",", ":")) if metadata else _NO_METADATA


def _event(topic: str, row: Any) -> events_pb2.Event:
    seq, event_id, ts, metadata, payload = row
    return events_pb2.Event(
        id=event_id,
        topic=topic,
        metadata=json.loads(metadata) if metadata != _NO_METADATA else None,
        payload=payload,
        timestamp=ts,
        sequence=seq,
    )


def _rows(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> list[Any]:
    # A half-read cursor would pin its read snapshot: always drain and close.
    with contextlib.closing(conn.execute(sql, params)) as cursor:
        return cursor.fetchall()


def _last_seq(conn: sqlite3.Connection, namespace: str, topic: str) -> int:
    rows = _rows(conn, "SELECT last_seq FROM topics WHERE namespace = ? AND topic = ?", (namespace, topic))
    return int(rows[0][0]) if rows else 0


class _LastSeqs:
    """The last sequence of each topic written, so a commit need not read it; void after a rollback.

    Used only inside the writer's transactions (one at a time).
    """

    def __init__(self, file: SQLiteFile) -> None:
        self.file = file
        self.seqs: dict[tuple[str, str], int] = {}
        self.rollbacks = 0

    def get(self, conn: sqlite3.Connection, namespace: str, topic: str) -> int:
        if self.rollbacks != self.file.rollbacks:
            self.seqs.clear()
            self.rollbacks = self.file.rollbacks
        seq = self.seqs.get((namespace, topic))
        return _last_seq(conn, namespace, topic) if seq is None else seq


def _commit(
    conn: sqlite3.Connection,
    namespace: str,
    appends: Sequence[Append],
    groups: Sequence[GroupWrite],
    known: _LastSeqs,
) -> list[tuple[int, int]]:
    last: dict[str, int] = {}
    rows, results = [], []
    now = time.time_ns()
    metadata: Mapping[str, str] | None = None
    encoded = _NO_METADATA
    for append in appends:
        topic = append.topic
        seq = (last[topic] if topic in last else known.get(conn, namespace, topic)) + 1
        last[topic] = seq
        ts = append.timestamp_ns or now
        if append.metadata != metadata:  # events of a batch mostly share their metadata
            metadata, encoded = append.metadata, _encode(append.metadata)
        rows.append((namespace, topic, seq, append.id, ts, encoded, append.payload))
        results.append((seq, ts))
    conn.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    conn.executemany(
        "INSERT INTO topics VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET last_seq = excluded.last_seq",
        [(namespace, topic, seq) for topic, seq in last.items()],
    )
    for write in groups:
        _write_group(conn, namespace, write)
    known.seqs.update(((namespace, topic), seq) for topic, seq in last.items())
    return results


def _write_group(conn: sqlite3.Connection, namespace: str, write: GroupWrite) -> None:
    key = (namespace, write.topic, write.group)
    if write.reset:
        conn.execute("DELETE FROM pending WHERE namespace = ? AND topic = ? AND grp = ?", key)
    conn.execute(
        "INSERT INTO groups VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE "
        "SET acked_seq = excluded.acked_seq, delivered_seq = excluded.delivered_seq",
        (*key, write.acked, write.delivered),
    )
    conn.executemany(
        "INSERT INTO pending VALUES (?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET attempts = excluded.attempts",
        [(*key, seq, attempts) for seq, attempts in write.upsert.items()],
    )
    conn.executemany(
        "DELETE FROM pending WHERE namespace = ? AND topic = ? AND grp = ? AND seq = ?",
        [(*key, seq) for seq in write.delete],
    )


def _fetch(
    conn: sqlite3.Connection, namespace: str, topic: str, after: int, limit: int, max_bytes: int
) -> list[events_pb2.Event]:
    sql = f"SELECT {_EVENT} FROM events WHERE namespace = ? AND topic = ? AND seq > ? ORDER BY seq LIMIT ?"
    events, size = [], 0
    with contextlib.closing(conn.execute(sql, (namespace, topic, after, limit))) as cursor:
        for row in cursor:  # stepping lazily: stop reading once the batch is big enough
            events.append(_event(topic, row))
            size += len(row[4])
            if size >= max_bytes:
                break
    return events


def _stats(conn: sqlite3.Connection, namespace: str) -> list[TopicStats]:
    counts = {
        topic: (count, first)
        for topic, count, first in _rows(
            conn,
            "SELECT topic, count(*), min(seq) FROM events WHERE namespace = ? GROUP BY topic",
            (namespace,),
        )
    }
    groups: dict[str, list[GroupStats]] = {}
    sql = (
        "SELECT g.topic, g.grp, g.delivered_seq, (SELECT count(*) FROM pending p WHERE p.namespace = "
        "g.namespace AND p.topic = g.topic AND p.grp = g.grp) FROM groups g WHERE g.namespace = ? "
        "ORDER BY g.topic, g.grp"
    )
    for topic, group, delivered, pending in _rows(conn, sql, (namespace,)):
        groups.setdefault(topic, []).append(GroupStats(group, delivered, pending))
    result = []
    sql = "SELECT topic, last_seq FROM topics WHERE namespace = ? ORDER BY topic"
    for topic, last_seq in _rows(conn, sql, (namespace,)):
        count, first = counts.get(topic, (0, last_seq + 1))
        result.append(TopicStats(topic, count, first, last_seq, groups.get(topic, [])))
    return result


def _trim_age(conn: sqlite3.Connection, cutoff: int, topic: str | None, exclude: Sequence[str]) -> int:
    where, params = ["ts < ?"], list[Any]([cutoff])
    if topic is not None:
        where.append("topic = ?")
        params.append(topic)
    if exclude:
        where.append(f"topic NOT IN ({', '.join('?' * len(exclude))})")
        params += exclude
    sql = f"DELETE FROM events WHERE rowid IN (SELECT rowid FROM events WHERE {' AND '.join(where)} LIMIT ?)"
    return conn.execute(sql, (*params, _TRIM_CHUNK)).rowcount


def _trim_count(conn: sqlite3.Connection, default: Retention, overrides: Mapping[str, Retention]) -> int:
    removed = 0
    for namespace, topic, last_seq in _rows(conn, "SELECT namespace, topic, last_seq FROM topics", ()):
        limit = overrides.get(topic, default).max_count
        if limit is not None:
            removed += conn.execute(
                "DELETE FROM events WHERE namespace = ? AND topic = ? AND seq <= ?",
                (namespace, topic, last_seq - limit),
            ).rowcount
    return removed


def _short(appends: Sequence[Append], groups: Sequence[GroupWrite]) -> bool:
    """Whether a commit is small enough to run on the event loop (``SQLiteFile.write``)."""
    if len(appends) > _SHORT_APPENDS or sum(len(g.upsert) + len(g.delete) for g in groups) > _SHORT_ROWS:
        return False
    return sum(len(append.payload) for append in appends) <= _SHORT_BYTES


class _SQLiteLog(EventLog):
    def __init__(self, file: SQLiteFile) -> None:
        self.file = file
        self._known = _LastSeqs(file)

    async def commit(
        self, namespace: str, appends: Sequence[Append], groups: Sequence[GroupWrite]
    ) -> list[tuple[int, int]]:
        return await self.file.write(lambda conn: _commit(conn, namespace, appends, groups, self._known))

    def commit_now(
        self, namespace: str, appends: Sequence[Append], groups: Sequence[GroupWrite]
    ) -> list[tuple[int, int]] | None:
        if not _short(appends, groups):
            return None
        done = self.file.write_now(lambda conn: _commit(conn, namespace, appends, groups, self._known))
        return done[0] if done is not None else None

    async def last_seq(self, namespace: str, topic: str) -> int:
        return await self.file.read(lambda conn: _last_seq(conn, namespace, topic))

    async def fetch(
        self, namespace: str, topic: str, after: int, limit: int, max_bytes: int
    ) -> list[events_pb2.Event]:
        return await self.file.read(lambda conn: _fetch(conn, namespace, topic, after, limit, max_bytes))

    async def get(self, namespace: str, topic: str, seq: int) -> events_pb2.Event | None:
        sql = f"SELECT {_EVENT} FROM events WHERE namespace = ? AND topic = ? AND seq = ?"
        rows = await self.file.read(lambda conn: _rows(conn, sql, (namespace, topic, seq)))
        return _event(topic, rows[0]) if rows else None

    async def read(self, namespace: str, topic: str, limit: int, offset: int) -> list[events_pb2.Event]:
        sql = f"SELECT {_EVENT} FROM events WHERE namespace = ? AND topic = ? ORDER BY seq LIMIT ? OFFSET ?"
        params = (namespace, topic, limit, offset)
        return await self.file.read(lambda conn: [_event(topic, row) for row in _rows(conn, sql, params)])

    async def seq_at(self, namespace: str, topic: str, since_ns: int) -> int | None:
        sql = "SELECT min(seq) FROM events WHERE namespace = ? AND topic = ? AND ts >= ?"
        rows = await self.file.read(lambda conn: _rows(conn, sql, (namespace, topic, since_ns)))
        return rows[0][0] if rows and rows[0][0] is not None else None

    async def load_group(self, namespace: str, topic: str, group: str) -> GroupState | None:
        key = (namespace, topic, group)

        def load(conn: sqlite3.Connection) -> GroupState | None:
            where = "namespace = ? AND topic = ? AND grp = ?"
            found = _rows(conn, f"SELECT delivered_seq FROM groups WHERE {where}", key)
            if not found:
                return None
            pending = _rows(conn, f"SELECT seq, attempts FROM pending WHERE {where}", key)
            return GroupState(found[0][0], dict(pending))

        return await self.file.read(load)

    async def stats(self, namespace: str) -> list[TopicStats]:
        return await self.file.read(lambda conn: _stats(conn, namespace))

    async def trim(self, default: Retention, overrides: Mapping[str, Retention], now_ns: int) -> int:
        removed = 0
        ages: list[tuple[str | None, Retention]] = []
        if default.max_age_s is not None:
            ages.append((None, default))
        ages += [(topic, policy) for topic, policy in overrides.items() if policy.max_age_s is not None]
        for topic, policy in ages:
            assert policy.max_age_s is not None
            cutoff = now_ns - int(policy.max_age_s * 1e9)
            exclude = list(overrides) if topic is None else []
            while True:  # in chunks: publishes interleave with a long trim
                chunk = await self.file.write(lambda conn: _trim_age(conn, cutoff, topic, exclude))  # noqa: B023
                removed += chunk
                if chunk < _TRIM_CHUNK:
                    break
        return removed + await self.file.write(lambda conn: _trim_count(conn, default, overrides))

    async def health(self) -> str:
        return "ok" if self.file.healthy() else "closed or writer thread stopped"

    async def close(self) -> None:
        await self.file.close()


class SQLiteEvents(EmbeddedEvents):
    """Events in one SQLite file (WAL), created 0600.

    ``events = await SQLiteEvents(path).open()``; ``close()`` ends the
    consumers, saves their groups and releases the file. ``synchronous``:
    ``NORMAL`` or ``FULL`` (see the module docstring).
    """

    def __init__(
        self,
        path: Path,
        *,
        retention: Retention | None = None,
        retention_overrides: Mapping[str, Retention] | None = None,
        max_event_bytes: int = MAX_EVENT_BYTES,
        synchronous: str = "NORMAL",
    ) -> None:
        self.path = path
        self.file = SQLiteFile(path, _SCHEMA, block=ERROR_ID, synchronous=synchronous)
        self._sqlite_log = _SQLiteLog(self.file)
        super().__init__(
            self._sqlite_log,
            retention=retention,
            retention_overrides=retention_overrides,
            max_event_bytes=max_event_bytes,
        )

    async def open(self) -> SQLiteEvents:
        """Create the file and schema if needed and start the writer thread."""
        await self.file.open()
        return self

    async def health(self) -> str:
        return await self._sqlite_log.health()


async def open_sqlite(address: str, data_dir: Path, **options: Any) -> SQLiteEvents:
    """The ``sqlite`` events engine: ``sqlite:///abs/path.db``, or ``events.db`` in the data directory;
    ``?synchronous=full`` fsyncs every commit (default ``normal``, see the module docstring)."""
    parts = urlsplit(address if "://" in address else "")
    query = {key.lower(): values[-1].upper() for key, values in parse_qs(parts.query).items()}
    synchronous = query.pop("synchronous", "NORMAL")
    if query or synchronous not in ("NORMAL", "FULL"):
        raise SetupError(
            f"the events address {address!r} takes only ?synchronous=normal or ?synchronous=full"
        )
    path = Path(parts.path) if parts.path.startswith("/") else data_dir / "events.db"
    return await SQLiteEvents(path, synchronous=synchronous, **options).open()
