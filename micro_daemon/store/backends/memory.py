"""An in-memory store backend, for tests and throwaway daemons."""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import itertools
import time
from collections.abc import Iterator
from pathlib import Path

from micro.errors import BadRequest, Conflict, NotFound
from micro_daemon.store.backend import Query, Record, StoreBackend

__all__ = ["MemoryBackend"]


def _live(record: Record, now: float) -> bool:
    return record.expires_at is None or record.expires_at > now


def _copy(record: Record, version: int | None = None) -> Record:
    # Records are frozen, but their metadata dict is not: never share it with callers.
    return dataclasses.replace(
        record, metadata=dict(record.metadata), version=record.version if version is None else version
    )


class _Table:
    """The records of one (database, table), with their keys kept sorted."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.records: dict[str, Record] = {}

    def live(self, key: str, now: float) -> Record | None:
        record = self.records.get(key)
        return record if record is not None and _live(record, now) else None

    def set(self, record: Record) -> None:
        if record.key not in self.records:
            bisect.insort(self.keys, record.key)
        self.records[record.key] = record

    def remove(self, key: str) -> None:
        del self.records[key]
        del self.keys[bisect.bisect_left(self.keys, key)]

    def has_live(self, now: float) -> bool:
        return any(_live(record, now) for record in self.records.values())

    def prefix_range(self, prefix: str) -> tuple[int, int]:
        low = bisect.bisect_left(self.keys, prefix)
        # Past `low`, keys with the prefix form one run: find its end without computing an upper bound.
        high = bisect.bisect_left(self.keys, True, lo=low, key=lambda k: not k.startswith(prefix))
        return low, high

    def select(self, query: Query, now: float) -> Iterator[Record]:
        low, high = self.prefix_range(query.prefix)
        positions = range(high - 1, low - 1, -1) if query.order == "desc" else range(low, high)
        for position in positions:
            record = self.records[self.keys[position]]
            if _live(record, now) and record.key.endswith(query.suffix):
                yield record


def _check_order(query: Query) -> None:
    if query.order not in ("asc", "desc"):
        raise BadRequest(f"order must be 'asc' or 'desc', not {query.order!r}", id="store")


class MemoryBackend(StoreBackend):
    """Keeps every record in process memory; nothing survives ``close()``.

    Each call yields to the event loop once before it acts, so tests see the
    interleavings a real engine would allow; the check and the write of a
    conditional ``put`` happen without a yield in between.
    """

    def __init__(self) -> None:
        self._tables: dict[tuple[str, str], _Table] = {}

    async def get(self, database: str, table: str, key: str) -> Record:
        await asyncio.sleep(0)
        found = self._table(database, table).live(key, time.time())
        if found is None:
            raise NotFound(f"key {key!r} not found in table {table!r} of namespace {database!r}", id="store")
        return _copy(found)

    async def query(self, database: str, table: str, query: Query) -> list[Record]:
        await asyncio.sleep(0)
        return [_copy(record) for record in self._select(database, table, query)]

    async def keys(self, database: str, table: str, query: Query) -> list[str]:
        await asyncio.sleep(0)
        return [record.key for record in self._select(database, table, query)]

    async def put(self, database: str, table: str, record: Record, *, if_version: int | None = None) -> int:
        await asyncio.sleep(0)
        tbl = self._tables.setdefault((database, table), _Table())
        current = tbl.live(record.key, time.time())
        version = current.version if current is not None else 0
        if if_version is not None and if_version != version:
            raise Conflict(conflict_detail(database, table, record.key, version, if_version), id="store")
        tbl.set(_copy(record, version + 1))
        return version + 1

    async def delete(self, database: str, table: str, key: str) -> None:
        await asyncio.sleep(0)
        tbl = self._table(database, table)
        if tbl.live(key, time.time()) is None:
            raise NotFound(f"key {key!r} not found in table {table!r} of namespace {database!r}", id="store")
        tbl.remove(key)

    async def databases(self) -> list[str]:
        await asyncio.sleep(0)
        now = time.time()
        return sorted({database for (database, _), tbl in self._tables.items() if tbl.has_live(now)})

    async def tables(self, database: str) -> list[str]:
        await asyncio.sleep(0)
        now = time.time()
        return sorted(
            name for (db, name), tbl in self._tables.items() if db == database and tbl.has_live(now)
        )

    async def purge_expired(self) -> int:
        await asyncio.sleep(0)
        now = time.time()
        purged = 0
        for tbl in self._tables.values():
            for key in [key for key, record in tbl.records.items() if not _live(record, now)]:
                tbl.remove(key)
                purged += 1
        self._tables = {name: tbl for name, tbl in self._tables.items() if tbl.records}
        return purged

    async def close(self) -> None:
        """Forget every record."""
        self._tables.clear()

    def _table(self, database: str, table: str) -> _Table:
        return self._tables.get((database, table)) or _Table()

    def _select(self, database: str, table: str, query: Query) -> list[Record]:
        _check_order(query)
        selected = self._table(database, table).select(query, time.time())
        end = query.offset + query.limit if query.limit else None
        return list(itertools.islice(selected, query.offset, end))


def conflict_detail(database: str, table: str, key: str, version: int, expected: int) -> str:
    """The ``detail`` of the ``Conflict`` a failed conditional write raises (shared by the backends)."""
    where = f"{database}/{table}/{key}"
    if expected == 0:
        return f"{where} already exists (version {version})"
    if version == 0:
        return f"{where} does not exist (expected version {expected})"
    return f"{where} is at version {version}, not {expected}"


async def open_memory(address: str, data_dir: Path) -> MemoryBackend:
    """The ``memory`` engine: nothing is kept after the daemon stops."""
    return MemoryBackend()
