"""The PostgreSQL store backend: one table in its own schema, shared by every daemon of a platform.

Each call runs one autocommit statement on a pooled connection
(``psycopg_pool.AsyncConnectionPool``), so a write is committed before it
returns. Under load, reads and plain writes of one table share statements
(``postgres_batches``): those that come while two statements run wait and go together.

While the server is unreachable (down, restarting) calls fail at once
with ``ServiceUnavailable`` naming it: a call that finds a pooled connection
closed, or waits over a second for one, tries a connection of its own, and once
such a probe has failed every call probes instead of queueing on the pool,
until one succeeds. The pool retries a lost connection for only a few
seconds, so it reconnects as soon as the next call needs it rather than after
minutes of backoff.

A conditional write is a single statement (``UPDATE ... WHERE version
= n`` or ``INSERT ... ON CONFLICT DO UPDATE ... WHERE``) whose row lock makes
it atomic against other writers, in this daemon or another one. Keys are
``text COLLATE "C"``: byte order of UTF-8, which is code point order, as in
the other engines; a prefix is a range scan of the primary key.

The address is a libpq URI plus micro's own query parameters, which are
removed before it reaches libpq: ``schema`` (default ``micro``) and
``pool_size`` (default 10). Passwords never appear in messages or logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict
from psycopg.errors import DeadlockDetected, ProgramLimitExceeded, SerializationFailure, TransactionRollback
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolClosed, PoolTimeout

from micro.errors import BadRequest, Conflict, InternalServerError, NotFound, ServiceUnavailable, SetupError
from micro_daemon.store.backend import Field, Query, Record, StoreBackend
from micro_daemon.store.backends.memory import conflict_detail
from micro_daemon.store.backends.postgres_batches import Coalescer, Kind
from micro_daemon.store.backends.postgres_schema import migrate, quote_identifier
from micro_daemon.store.backends.sqlite import prefix_upper_bound

__all__ = ["PostgresAddress", "PostgresBackend", "map_postgres_exceptions", "open_postgres"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
Connection = psycopg.AsyncConnection[TupleRow]

_OURS = ("schema", "pool_size")
_DEFAULT_SCHEMA = "micro"
_DEFAULT_POOL_SIZE = 10
_CONNECT_TIMEOUT = 5  # seconds, libpq's connect_timeout unless the address sets one
_ACQUIRE_TIMEOUT = 10.0  # seconds a call waits for a pooled connection
_BUSY_WAIT = 1.0  # seconds a call waits for a pooled connection before checking the server answers
_RECONNECT_TIMEOUT = 2.0  # seconds the pool retries a connection before leaving it to the next call
_OPEN_TIMEOUT = 10.0
_ROLLBACK_ATTEMPTS = 4  # serialization failures and deadlocks are retried this many times
_LIVE = "(expires_at IS NULL OR expires_at > %(now)s)"
_COLUMNS = "key, value, metadata, expires_at, version"
_ROLLBACKS = (TransactionRollback, SerializationFailure, DeadlockDetected)  # retried: they change nothing
_DISCONNECTED = ("08", "57P01", "57P02", "57P03")  # connection exceptions, server shutting down


@dataclass(frozen=True)
class PostgresAddress:
    """A ``postgres://`` address, split into what libpq gets and what micro keeps.

    ``shown`` is the address without its password (safe to log and print);
    ``location`` is ``host:port`` for messages.
    """

    conninfo: str
    shown: str
    location: str
    secrets: tuple[str, ...] = ()
    schema: str = _DEFAULT_SCHEMA
    pool_size: int = _DEFAULT_POOL_SIZE

    @classmethod
    def parse(cls, address: str) -> PostgresAddress:
        """Parse ``address``; raises ``SetupError`` (naming it without password) if it is invalid."""
        base, _, query = address.partition("?")
        items = [item for item in query.split("&") if item]
        ours = dict(parse_qsl("&".join(i for i in items if _name(i) in _OURS), keep_blank_values=True))
        libpq_query = "&".join(i for i in items if _name(i) not in _OURS)
        conninfo = f"{base}?{libpq_query}" if libpq_query else base
        shown, secrets = _without_password(base, items)
        try:
            info = conninfo_to_dict(conninfo)
        except psycopg.Error as exc:
            raise SetupError(
                f"invalid store address {shown}: {_scrub(str(exc), secrets)}", id="store"
            ) from exc
        return cls(
            conninfo=conninfo,
            shown=shown,
            location=_location(info),
            secrets=(*secrets, str(info.get("password") or "")),
            schema=_schema(ours.get("schema", _DEFAULT_SCHEMA), shown),
            pool_size=_pool_size(ours.get("pool_size", str(_DEFAULT_POOL_SIZE)), shown),
        )

    def scrub(self, text: str) -> str:
        """``text`` with this address's password masked."""
        return _scrub(text, self.secrets)

    def connect_kwargs(self) -> dict[str, Any]:
        """libpq options micro sets unless the address chose them."""
        info = conninfo_to_dict(self.conninfo)
        defaults = {"connect_timeout": _CONNECT_TIMEOUT, "application_name": "micro-store"}
        return {"autocommit": True} | {name: value for name, value in defaults.items() if name not in info}


def _name(item: str) -> str:
    return unquote(item.partition("=")[0])


def _without_password(base: str, items: list[str]) -> tuple[str, tuple[str, ...]]:
    """``base?items`` without its password (in the user info or a ``password=`` item), and the password."""
    scheme, sep, rest = base.partition("://")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    secrets = [password, unquote(password)]
    kept = []
    for item in items:
        if _name(item) == "password":
            secrets += [item.partition("=")[2], unquote(item.partition("=")[2])]
        else:
            kept.append(item)
    query = "?" + "&".join(kept) if kept else ""
    return f"{scheme}{sep}{user}{at}{hosts}{slash}{path}{query}", tuple(s for s in secrets if s)


def _scrub(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _location(info: dict[str, Any]) -> str:
    hosts = str(info.get("host") or info.get("hostaddr") or "localhost").split(",")
    ports = str(info.get("port") or "").split(",")
    ports += [ports[-1]] * (len(hosts) - len(ports))  # libpq: one port applies to every host
    return ",".join(f"{host}:{port or 5432}" for host, port in zip(hosts, ports, strict=False))


def _schema(name: str, shown: str) -> str:
    if not name or "\x00" in name or len(name.encode()) > 63:
        raise SetupError(f"invalid schema {name!r} in store address {shown}: use 1-63 bytes", id="store")
    return name


def _pool_size(text: str, shown: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise SetupError(f"invalid pool_size {text!r} in store address {shown}: use 1 or more", id="store")
    return int(text)


def _first_lines(exc: BaseException) -> str:
    # Server errors end with a CONTEXT block echoing parameters: keep the message and DETAIL only.
    lines = [line for line in str(exc).splitlines() if not line.startswith(("CONTEXT:", "unnamed portal"))]
    return " ".join(line.strip() for line in lines if line.strip())


@contextlib.contextmanager
def map_postgres_exceptions(address: PostgresAddress) -> Iterator[None]:
    """Convert psycopg (and parameter encoding) errors into ``micro.errors`` ones with ``id="store"``.

    Unreachable server, pool exhausted or closed, shutdown, retries exhausted:
    ``ServiceUnavailable``; a value the engine cannot hold: ``BadRequest``;
    anything else: ``InternalServerError``. Messages never contain the password.
    """
    try:
        yield
    except ProgramLimitExceeded as exc:
        # In practice: an index row over 2704 bytes (namespace, table and a long, incompressible key).
        raise BadRequest(
            f"store engine postgres cannot index this key: {address.scrub(str(exc).splitlines()[0])}; "
            "use a shorter key (2048 bytes always fit)",
            id="store",
        ) from exc
    except (psycopg.DataError, UnicodeEncodeError) as exc:
        detail = address.scrub(_first_lines(exc))
        raise BadRequest(f"store engine postgres cannot hold this value: {detail}", id="store") from exc
    except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
        raise _unavailable(address, address.scrub(_first_lines(exc))) from exc
    except psycopg.Error as exc:
        detail = address.scrub(_first_lines(exc))
        raise InternalServerError(f"store engine postgres failed: {detail}", id="store") from exc


def _unavailable(address: PostgresAddress, detail: str) -> ServiceUnavailable:
    return ServiceUnavailable(
        f"store engine postgres at {address.location} is unavailable: {detail}", id="store"
    )


def _disconnected(exc: psycopg.OperationalError) -> bool:
    if isinstance(exc, PoolTimeout | PoolClosed):
        return False
    return exc.sqlstate is None or exc.sqlstate.startswith(_DISCONNECTED)


def _record(row: TupleRow) -> Record:
    key, value, metadata, expires_at, version = row
    fields = {name: Field(type=f["type"], value=f["value"]) for name, f in metadata.items()}
    return Record(key=key, value=value, expires_at=expires_at, metadata=fields, version=version)


def _write_params(database: str, table: str, record: Record, now: float) -> dict[str, Any]:
    return {
        "database": database,
        "tbl": table,
        "key": record.key,
        "value": record.value,
        "metadata": _metadata_json(record),
        "expires_at": record.expires_at,
        "now": now,
    }


def _key_of(record: Record) -> str:
    return record.key


def _metadata_json(record: Record) -> Jsonb:
    return Jsonb({name: {"type": f.type, "value": f.value} for name, f in record.metadata.items()})


class _Statements:
    """The SQL of every call, for the ``records`` table of one schema."""

    def __init__(self, schema: str) -> None:
        self.table = table = f"{quote_identifier(schema)}.records"
        exact = f"database = %(database)s AND tbl = %(tbl)s AND key = %(key)s AND {_LIVE}"
        values = "(%(database)s, %(tbl)s, %(key)s, %(value)s, %(metadata)s, %(expires_at)s, 1)"
        upsert = (
            f"INSERT INTO {table} AS r (database, tbl, key, value, metadata, expires_at, version) "
            f"VALUES {values} ON CONFLICT (database, tbl, key) DO UPDATE SET value = excluded.value, "
            "metadata = excluded.metadata, expires_at = excluded.expires_at"
        )
        self.get = f"SELECT {_COLUMNS} FROM {table} WHERE {exact}"
        self.version = f"SELECT version FROM {table} WHERE {exact}"
        renew = (
            "version = CASE WHEN r.expires_at IS NULL OR r.expires_at > %(now)s THEN r.version + 1 ELSE 1 END"
        )
        self.put = f"{upsert}, {renew} RETURNING version"
        self.get_many = (
            f"SELECT {_COLUMNS} FROM {table} "
            f"WHERE database = %(database)s AND tbl = %(tbl)s AND key = ANY(%(keys)s::text[]) AND {_LIVE}"
        )
        self.put_many = (
            f"INSERT INTO {table} AS r (database, tbl, key, value, metadata, expires_at, version) "
            "SELECT %(database)s, %(tbl)s, u.key, u.value, u.metadata, u.expires_at, 1 FROM unnest("
            "%(keys)s::text[], %(values)s::bytea[], %(metadata)s::jsonb[], %(expires)s::float8[]"
            ") AS u(key, value, metadata, expires_at) "
            "ON CONFLICT (database, tbl, key) DO UPDATE SET value = excluded.value, "
            f"metadata = excluded.metadata, expires_at = excluded.expires_at, {renew} RETURNING key, version"
        )
        self.create = (
            f"{upsert}, version = 1 WHERE r.expires_at IS NOT NULL AND r.expires_at <= %(now)s "
            "RETURNING version"
        )
        self.swap = (
            f"UPDATE {table} SET value = %(value)s, metadata = %(metadata)s, expires_at = %(expires_at)s, "
            f"version = version + 1 WHERE {exact} AND version = %(if_version)s RETURNING version"
        )
        self.delete = f"DELETE FROM {table} WHERE {exact}"
        self.databases = f"SELECT DISTINCT database FROM {table} WHERE {_LIVE} ORDER BY database"
        self.tables = (
            f"SELECT DISTINCT tbl FROM {table} WHERE database = %(database)s AND {_LIVE} ORDER BY tbl"
        )
        self.purge = f"DELETE FROM {table} WHERE expires_at <= %(now)s"

    def select(self, columns: str, database: str, table: str, query: Query, now: float) -> tuple[str, Any]:
        """The SELECT for ``query``: prefix as a primary-key range, suffix as a filter."""
        where = ["database = %(database)s", "tbl = %(tbl)s", _LIVE]
        params: dict[str, Any] = {"database": database, "tbl": table, "now": now}
        if query.prefix:
            where.append("key >= %(low)s")
            params["low"] = query.prefix
            upper = prefix_upper_bound(query.prefix)
            if upper is not None:
                where.append("key < %(high)s")
                params["high"] = upper
        if query.suffix:
            where.append("right(key, %(length)s::integer) = %(suffix)s")
            params |= {"length": len(query.suffix), "suffix": query.suffix}
        direction = {"asc": "ASC", "desc": "DESC"}.get(query.order)
        if direction is None:
            raise BadRequest(f"order must be 'asc' or 'desc', not {query.order!r}", id="store")
        params |= {"limit": query.limit or None, "offset": query.offset}
        sql = (
            f"SELECT {columns} FROM {self.table} WHERE {' AND '.join(where)} "
            f"ORDER BY key {direction} LIMIT %(limit)s::bigint OFFSET %(offset)s::bigint"
        )
        return sql, params


class PostgresBackend(StoreBackend):
    """Records in ``<schema>.records`` of a PostgreSQL database; see the module docstring.

    Create it with ``backend = await PostgresBackend(PostgresAddress.parse(url)).open()``,
    which migrates the schema; ``close()`` closes the pool.
    """

    def __init__(self, address: PostgresAddress) -> None:
        self.address = address
        self.applied_migrations: list[int] = []
        self._sql = _Statements(address.schema)
        self._pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
            address.conninfo,
            kwargs=address.connect_kwargs(),
            min_size=1,
            max_size=address.pool_size,
            open=False,
            name="micro-store",
            timeout=_ACQUIRE_TIMEOUT,
            reconnect_timeout=_RECONNECT_TIMEOUT,
        )
        self._last_error: str | None = None
        self._unreachable: str | None = None  # why the last probe failed; None once one succeeds
        self._probes = 0
        self._probing = asyncio.Lock()
        self._closed = False
        # Reads and plain writes that come while two statements run wait to share one.
        self._calls = Coalescer(address.pool_size)
        self._gets: Kind[str, Record | None] = Kind(self._get_one, self._get_many)
        self._puts: Kind[Record, int] = Kind(self._put_one, self._put_many, distinct=_key_of)

    async def open(self) -> PostgresBackend:
        """Connect, migrate the schema and fill the pool; ``SetupError`` if the server cannot be used."""
        try:
            await self._migrate()
            await self._pool.open(wait=True, timeout=_OPEN_TIMEOUT)
        except BaseException as exc:
            await self.close()
            if isinstance(exc, psycopg.Error):
                detail = self.address.scrub(_first_lines(exc))
                raise SetupError(
                    f"store engine postgres at {self.address.shown} cannot be used: {detail}", id="store"
                ) from exc
            raise
        logger.info("store: postgres at %s, schema %r", self.address.shown, self.address.schema)
        return self

    async def _migrate(self) -> None:
        conninfo, kwargs = self.address.conninfo, self.address.connect_kwargs()
        async with await Connection.connect(conninfo, **kwargs) as conn:
            encoding = conn.info.parameter_status("server_encoding")
            if encoding != "UTF8":
                raise SetupError(
                    f"the database at {self.address.shown} uses encoding {encoding!r}: the store needs UTF8",
                    id="store",
                )
            self.applied_migrations = await migrate(conn, self.address.schema)
        if self.applied_migrations:
            logger.info(
                "store: applied migrations %s to schema %r", self.applied_migrations, self.address.schema
            )

    async def get(self, database: str, table: str, key: str) -> Record:
        record = await self._calls.run(self._gets, (database, table), key)
        if record is None:
            raise NotFound(f"key {key!r} not found in table {table!r} of namespace {database!r}", id="store")
        return record

    async def _get_one(self, where: tuple[str, str], key: str) -> Record | None:
        database, table = where
        params = {"database": database, "tbl": table, "key": key, "now": _now()}
        rows = await self._fetch(self._sql.get, params)
        return _record(rows[0]) if rows else None

    async def _get_many(self, where: tuple[str, str], keys: Sequence[str]) -> list[Record | None]:
        database, table = where
        params = {"database": database, "tbl": table, "keys": list(keys), "now": _now()}
        found = {row[0]: row for row in await self._fetch(self._sql.get_many, params)}
        return [_record(found[key]) if key in found else None for key in keys]

    async def query(self, database: str, table: str, query: Query) -> list[Record]:
        sql, params = self._sql.select(_COLUMNS, database, table, query, _now())
        return [_record(row) for row in await self._fetch(sql, params)]

    async def keys(self, database: str, table: str, query: Query) -> list[str]:
        sql, params = self._sql.select("key", database, table, query, _now())
        return [row[0] for row in await self._fetch(sql, params)]

    async def put(self, database: str, table: str, record: Record, *, if_version: int | None = None) -> int:
        if if_version is None:
            return await self._calls.run(self._puts, (database, table), record)
        params = _write_params(database, table, record, _now())
        if if_version == 0:
            sql = self._sql.create
        else:
            sql, params["if_version"] = self._sql.swap, if_version
        rows = await self._fetch(sql, params, idempotent=False)
        if rows:
            version: int = rows[0][0]
            return version
        current = await self._fetch(self._sql.version, params)
        found = current[0][0] if current else 0
        raise Conflict(conflict_detail(database, table, record.key, found, if_version or 0), id="store")

    async def _put_one(self, where: tuple[str, str], record: Record) -> int:
        database, table = where
        rows = await self._fetch(
            self._sql.put, _write_params(database, table, record, _now()), idempotent=False
        )
        version: int = rows[0][0]
        return version

    async def _put_many(self, where: tuple[str, str], records: Sequence[Record]) -> list[int]:
        database, table = where
        rows = sorted(records, key=_key_of)  # rows locked in key order: batches never deadlock
        params = {
            "database": database,
            "tbl": table,
            "keys": [record.key for record in rows],
            "values": [record.value for record in rows],
            "metadata": [_metadata_json(record) for record in rows],
            "expires": [None if record.expires_at is None else float(record.expires_at) for record in rows],
            "now": _now(),
        }
        versions: dict[str, int] = dict(await self._fetch(self._sql.put_many, params, idempotent=False))
        return [versions[record.key] for record in records]

    async def delete(self, database: str, table: str, key: str) -> None:
        params = {"database": database, "tbl": table, "key": key, "now": _now()}
        if await self._run(lambda conn: _rowcount(conn, self._sql.delete, params), idempotent=False) == 0:
            raise NotFound(f"key {key!r} not found in table {table!r} of namespace {database!r}", id="store")

    async def databases(self) -> list[str]:
        return [row[0] for row in await self._fetch(self._sql.databases, {"now": _now()})]

    async def tables(self, database: str) -> list[str]:
        rows = await self._fetch(self._sql.tables, {"database": database, "now": _now()})
        return [row[0] for row in rows]

    async def purge_expired(self) -> int:
        params = {"now": _now()}
        return await self._run(lambda conn: _rowcount(conn, self._sql.purge, params), idempotent=True)

    async def health(self) -> str:
        # No probe query: the last call's outcome tells, and the pool reconnects by itself.
        if self._closed:
            return "closed"
        if self._last_error is not None:
            return f"unavailable: {self._last_error}"
        return "ok"

    async def close(self) -> None:
        """Close the pool and its connections. Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        self._calls.abandon(
            ServiceUnavailable(f"store engine postgres at {self.address.location} is closed", id="store")
        )
        try:
            await self._pool.close(timeout=5.0)
        except Exception:
            logger.exception("closing the postgres store pool at %s failed", self.address.shown)
        await self._calls.close()

    async def _fetch(self, sql: str, params: Any, *, idempotent: bool = True) -> list[TupleRow]:
        return await self._run(lambda conn: _rows(conn, sql, params), idempotent=idempotent)

    async def _run(self, work: Callable[[Connection], Awaitable[T]], *, idempotent: bool) -> T:
        """Run ``work`` on a pooled connection, retrying rollbacks (and, if idempotent, a lost connection)."""
        try:
            with map_postgres_exceptions(self.address):
                result = await self._attempts(work, idempotent)
        except ServiceUnavailable as exc:
            self._last_error = exc.detail
            raise
        self._last_error = None
        return result

    async def _attempts(self, work: Callable[[Connection], Awaitable[T]], idempotent: bool) -> T:
        attempt = skipped = 0
        while True:
            attempt += 1
            conn = await self._acquire()
            try:
                # After a server restart every pooled connection is dead: skip them (the pool
                # discards them on return) rather than fail one call per connection, unless
                # the server is still down.
                if skipped <= self.address.pool_size and not _still_open(conn):
                    if not skipped:
                        await self._probe()
                    skipped += 1
                    continue
                return await work(conn)
            except _ROLLBACKS:
                if attempt >= _ROLLBACK_ATTEMPTS:
                    raise
                await asyncio.sleep(0.005 * 2**attempt)
            except psycopg.OperationalError as exc:
                # The server may also drop a connection after the check above: reads try another.
                if not (idempotent and attempt <= self.address.pool_size and _disconnected(exc)):
                    raise
            finally:
                await self._pool.putconn(conn)

    async def _acquire(self) -> Connection:
        """A pooled connection; ``ServiceUnavailable`` at once while the server does not answer."""
        if self._closed:
            raise ServiceUnavailable(
                f"store engine postgres at {self.address.location} is closed", id="store"
            )
        if self._unreachable is not None:
            await self._probe()
        try:
            return await self._pool.getconn(timeout=_BUSY_WAIT)
        except PoolTimeout:
            await self._probe()  # busy, or connecting to a server that is gone?
        return await self._pool.getconn(timeout=_ACQUIRE_TIMEOUT - _BUSY_WAIT)

    async def _probe(self) -> None:
        """Connect once, outside the pool: raise ``ServiceUnavailable`` if the server does not accept it."""
        probes = self._probes
        async with self._probing:
            if self._probes == probes:  # else one finished while this call waited: its outcome answers
                self._unreachable = await self._connect_error()
                self._probes += 1
            if self._unreachable is not None:
                raise _unavailable(self.address, self._unreachable)

    async def _connect_error(self) -> str | None:
        try:
            conn = await Connection.connect(self.address.conninfo, **self.address.connect_kwargs())
        except psycopg.Error as exc:
            return self.address.scrub(_first_lines(exc))
        await conn.close()
        return None


def _still_open(conn: Connection) -> bool:
    """Whether the server has not closed ``conn``: reads what is pending, sends nothing."""
    try:
        # A closed session has left its FATAL message, then EOF: the first read gets the message only.
        conn.pgconn.consume_input()
        conn.pgconn.consume_input()
    except psycopg.OperationalError:
        return False
    return conn.pgconn.status == pq.ConnStatus.OK


async def _rows(conn: Connection, sql: str, params: Any) -> list[TupleRow]:
    cursor = await conn.execute(sql, params)
    return await cursor.fetchall()


async def _rowcount(conn: Connection, sql: str, params: Any) -> int:
    cursor = await conn.execute(sql, params)
    return cursor.rowcount


def _now() -> float:
    return time.time()


async def open_postgres(address: str, data_dir: Path) -> PostgresBackend:
    """The ``postgres`` engine: ``postgresql://user@host:5432/dbname?schema=micro&pool_size=10``."""
    return await PostgresBackend(PostgresAddress.parse(address)).open()
