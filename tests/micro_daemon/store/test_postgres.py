"""The PostgreSQL store engine against a real server.

Not skipped when the server is missing: CI starts PostgreSQL, and a missing
server fails every test here with how to provide one. ``MICRO_TEST_POSTGRES``
names the server (a libpq URI); by default the local ``postgres`` role, then
``root``, both with trust authentication.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg_pool import PoolTimeout

from micro.errors import BadRequest, InternalServerError, ServiceUnavailable, SetupError
from micro.testing.contracts import StoreContract
from micro_daemon.store.backend import Field, Query, Record, StoreBackend
from micro_daemon.store.backends import open_store
from micro_daemon.store.backends.postgres import (
    PostgresAddress,
    PostgresBackend,
    map_postgres_exceptions,
    open_postgres,
)
from micro_daemon.store.backends.postgres_schema import MIGRATIONS
from tests._engines import PrivatePostgres

DEFAULT_SERVERS = (
    "postgresql://postgres@127.0.0.1:5432/postgres",
    "postgresql://root@127.0.0.1:5432/root",
)
FAKE_PASSWORD = "hunter2-not-a-real-secret"


def _reachable(dsn: str) -> str | None:
    try:
        psycopg.connect(dsn, connect_timeout=3).close()
    except psycopg.Error as exc:
        return str(exc).strip()
    return None


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """The base URI of the test server: ``MICRO_TEST_POSTGRES``, else the first default that answers."""
    candidates = (
        (os.environ["MICRO_TEST_POSTGRES"],) if "MICRO_TEST_POSTGRES" in os.environ else DEFAULT_SERVERS
    )
    failures = {dsn: _reachable(dsn) for dsn in candidates}
    for dsn, failure in failures.items():
        if failure is None:
            return dsn
    shown = {dsn: PostgresAddress.parse(dsn) for dsn in failures}  # CI may put a password in the variable
    tried = "\n".join(f"  {shown[d].shown}: {shown[d].scrub(str(f))}" for d, f in failures.items())
    pytest.fail(
        "PostgreSQL is needed for these tests and did not answer:\n"
        f"{tried}\nStart it (`pg_ctlcluster --skip-systemctl-redirect 15 main start`) "
        "or set MICRO_TEST_POSTGRES to a libpq URI.",
        pytrace=False,
    )


def with_params(dsn: str, **params: str) -> str:
    query = "&".join(f"{name}={value}" for name, value in params.items())
    return f"{dsn}{'&' if '?' in dsn else '?'}{query}"


@pytest.fixture
async def schema(postgres_dsn: str) -> AsyncIterator[str]:
    """A fresh schema name, dropped with everything in it after the test."""
    name = f"micro_test_{uuid.uuid4().hex[:12]}"
    yield name
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
def address(postgres_dsn: str, schema: str) -> str:
    return with_params(postgres_dsn, schema=schema, application_name=schema)


@pytest.fixture
async def pg_backend(address: str, tmp_path: Path) -> AsyncIterator[PostgresBackend]:
    backend = await open_postgres(address, tmp_path)
    yield backend
    await backend.close()


class TestPostgresBackend(StoreContract):
    @pytest.fixture
    async def backend(self, pg_backend: PostgresBackend) -> AsyncIterator[StoreBackend]:
        yield pg_backend


async def _admin(postgres_dsn: str, sql: str, *params: object) -> list[tuple[object, ...]]:
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        cursor = await conn.execute(sql, params or None)
        return await cursor.fetchall() if cursor.description else []


async def _terminate(postgres_dsn: str, application_name: str, state: str = "%") -> int:
    """Terminate the server sessions of ``application_name`` in ``state``; wait until they are gone."""
    rows = await _admin(
        postgres_dsn,
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
        "WHERE application_name = %s AND state LIKE %s",
        application_name,
        state,
    )
    return len(rows)


async def _wait_for_lock_waiter(postgres_dsn: str, application_name: str) -> None:
    sql = "SELECT 1 FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'"
    for _ in range(500):
        if await _admin(postgres_dsn, sql, application_name):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the write never waited for the lock")


# -- schema and migrations ------------------------------------------------


async def test_concurrent_opens_migrate_once(
    address: str, postgres_dsn: str, schema: str, tmp_path: Path
) -> None:
    backends = await asyncio.gather(*(open_postgres(address, tmp_path) for _ in range(4)))
    try:
        applied = sorted(v for backend in backends for v in backend.applied_migrations)
        assert applied == [m.version for m in MIGRATIONS]
        rows = await _admin(
            postgres_dsn, f'SELECT version FROM "{schema}".schema_migrations ORDER BY version'
        )
        assert [row[0] for row in rows] == applied
        await backends[0].put("db", "tb", Record(key="k", value=b"v"))
        assert (await backends[3].get("db", "tb", "k")).value == b"v"
    finally:
        await asyncio.gather(*(backend.close() for backend in backends))


async def test_reopening_applies_nothing_and_keeps_data(address: str, tmp_path: Path) -> None:
    first = await open_postgres(address, tmp_path)
    await first.put("db", "tb", Record(key="k", value=b"v", metadata={"m": Field(type="string", value="x")}))
    await first.close()
    second = await open_postgres(address, tmp_path)
    try:
        assert second.applied_migrations == []
        assert (await second.get("db", "tb", "k")).metadata == {"m": Field(type="string", value="x")}
    finally:
        await second.close()


async def test_a_schema_from_a_newer_micro_is_refused(
    address: str, postgres_dsn: str, schema: str, tmp_path: Path
) -> None:
    await (await open_postgres(address, tmp_path)).close()
    await _admin(postgres_dsn, f"INSERT INTO \"{schema}\".schema_migrations VALUES (999, 'future')")
    with pytest.raises(SetupError, match="newer than this micro knows"):
        await open_postgres(address, tmp_path)


async def test_key_order_and_prefix_use_the_primary_key(
    pg_backend: PostgresBackend, postgres_dsn: str
) -> None:
    query = Query(prefix="user/", suffix=".json", order="desc", limit=10)
    sql, params = pg_backend._sql.select("key", "db", "tb", query, time.time())
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as conn:
        await conn.execute("SET enable_seqscan = off")
        plan = "\n".join(row[0] for row in await (await conn.execute(f"EXPLAIN {sql}", params)).fetchall())
    assert "Index Scan Backward using records_pkey" in plan
    assert "Sort" not in plan


# -- errors ---------------------------------------------------------------


async def test_an_unreachable_server_is_a_setup_error_without_password(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    address = f"postgresql://micro:{FAKE_PASSWORD}@127.0.0.1:1/db?schema=s&password={FAKE_PASSWORD}"
    with caplog.at_level(logging.DEBUG), pytest.raises(SetupError) as caught:
        await open_postgres(address, tmp_path)
    detail = caught.value.detail
    assert "postgres" in detail
    assert "postgresql://micro@127.0.0.1:1/db" in detail
    assert FAKE_PASSWORD not in detail + str(caught.value.__cause__) + caplog.text


async def test_an_unknown_libpq_parameter_is_a_setup_error_without_password(tmp_path: Path) -> None:
    with pytest.raises(SetupError) as caught:
        await open_postgres(f"postgres://micro:{FAKE_PASSWORD}@127.0.0.1:1/db?bogus=1", tmp_path)
    assert "bogus" in caught.value.detail
    assert FAKE_PASSWORD not in caught.value.detail


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("postgresql://127.0.0.1/db?schema=", "invalid schema"),
        (f"postgresql://127.0.0.1/db?schema={'s' * 64}", "invalid schema"),
        ("postgresql://127.0.0.1/db?pool_size=0", "invalid pool_size"),
        ("postgresql://127.0.0.1/db?pool_size=many", "invalid pool_size"),
    ],
)
def test_invalid_micro_parameters(address: str, message: str) -> None:
    with pytest.raises(SetupError, match=message):
        PostgresAddress.parse(address)


def test_address_parsing() -> None:
    parsed = PostgresAddress.parse(
        f"postgres://ana:{FAKE_PASSWORD}@db.example:6543/store?schema=tenant_1&pool_size=3&sslmode=disable"
    )
    assert parsed.schema == "tenant_1"
    assert parsed.pool_size == 3
    assert parsed.location == "db.example:6543"
    assert parsed.shown == "postgres://ana@db.example:6543/store?schema=tenant_1&pool_size=3&sslmode=disable"
    assert "schema" not in parsed.conninfo and "sslmode=disable" in parsed.conninfo
    assert parsed.scrub(f"echo {FAKE_PASSWORD}!") == "echo ***!"
    defaults = PostgresAddress.parse("postgresql:///store")
    assert (defaults.schema, defaults.pool_size, defaults.location) == ("micro", 10, "localhost:5432")
    assert PostgresAddress.parse("postgresql://a,b:7/x").location == "a:5432,b:7"
    assert PostgresAddress.parse("postgresql:///x?host=a,b&port=7").location == "a:7,b:7"
    assert PostgresAddress.parse("postgresql://a:1,b/x").location == "a:1,b:5432"


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: psycopg.OperationalError(f"connection lost for {FAKE_PASSWORD}"), ServiceUnavailable),
        (lambda: PoolTimeout("couldn't get a connection after 10.00 sec"), ServiceUnavailable),
        (lambda: psycopg.errors.SerializationFailure("could not serialize access"), ServiceUnavailable),
        (lambda: psycopg.errors.AdminShutdown("terminating connection"), ServiceUnavailable),
        (lambda: psycopg.InterfaceError("the connection is closed"), ServiceUnavailable),
        (lambda: psycopg.DataError("text fields cannot contain NUL"), BadRequest),
        (lambda: psycopg.errors.ProgramLimitExceeded("index row size 2712 exceeds maximum 2704"), BadRequest),
        (lambda: "x\ud800".encode(), BadRequest),
        (lambda: psycopg.errors.UndefinedTable("relation does not exist"), InternalServerError),
    ],
)
def test_map_postgres_exceptions(make: Callable[[], object], expected: type[Exception]) -> None:
    address = PostgresAddress.parse(f"postgresql://ana:{FAKE_PASSWORD}@127.0.0.1:5432/db")
    with pytest.raises(expected) as caught, map_postgres_exceptions(address):
        result = make()
        if isinstance(result, BaseException):
            raise result
    assert caught.value.id == "store"  # type: ignore[attr-defined]
    assert FAKE_PASSWORD not in str(caught.value)
    if expected is ServiceUnavailable:
        assert "store engine postgres at 127.0.0.1:5432 is unavailable" in str(caught.value)


async def test_values_the_engine_cannot_hold_are_bad_requests(pg_backend: PostgresBackend) -> None:
    bad = [
        Record(key="nul\x00key", value=b"v"),
        Record(key="lone \ud800 surrogate", value=b"v"),
        Record(key="k", value=b"v", metadata={"m": Field(type="string", value="nul\x00")}),
        Record(key=secrets.token_hex(2000), value=b"v"),  # 4000 incompressible bytes: over the index limit
    ]
    for record in bad:
        with pytest.raises(BadRequest):
            await pg_backend.put("db", "tb", record)
    long_key = secrets.token_hex(1024)
    assert await pg_backend.put("db", "tb", Record(key=long_key, value=b"v")) == 1
    assert await pg_backend.keys("db", "tb", Query()) == [long_key]
    assert await pg_backend.health() == "ok"


async def test_serialization_failures_are_retried(pg_backend: PostgresBackend) -> None:
    attempts = 0

    async def flaky(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> int:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise psycopg.errors.SerializationFailure("could not serialize access")
        return attempts

    assert await pg_backend._run(flaky, idempotent=False) == 3


async def test_connections_the_server_closed_are_skipped(
    pg_backend: PostgresBackend, postgres_dsn: str, schema: str
) -> None:
    await asyncio.gather(*(pg_backend.put("db", "tb", Record(key=f"k{i}", value=b"v")) for i in range(20)))
    assert await _terminate(postgres_dsn, schema) >= 2
    assert await pg_backend.put("db", "tb", Record(key="k0", value=b"w")) == 2
    assert (await pg_backend.get("db", "tb", "k0")).value == b"w"
    assert await pg_backend.health() == "ok"


async def test_a_write_cut_off_is_unavailable_and_not_replayed(
    pg_backend: PostgresBackend, postgres_dsn: str, schema: str
) -> None:
    await pg_backend.put("db", "tb", Record(key="k", value=b"v"))
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as locker:
        await locker.execute(f'SELECT 1 FROM "{schema}".records WHERE key = %s FOR UPDATE', ("k",))
        write = asyncio.create_task(pg_backend.put("db", "tb", Record(key="k", value=b"w")))
        await _wait_for_lock_waiter(postgres_dsn, schema)
        assert await _terminate(postgres_dsn, schema, state="active") == 1
        with pytest.raises(ServiceUnavailable) as caught:
            await write
        await locker.rollback()
    assert caught.value.detail.startswith("store engine postgres at 127.0.0.1:5432 is unavailable: ")
    assert (await pg_backend.health()).startswith("unavailable: store engine postgres")
    assert await pg_backend.get("db", "tb", "k") == Record(key="k", value=b"v", version=1)
    assert await pg_backend.health() == "ok"


async def test_calls_after_close_fail_and_close_is_idempotent(address: str, tmp_path: Path) -> None:
    backend = await open_postgres(address, tmp_path)
    await backend.close()
    await backend.close()
    assert await backend.health() == "closed"
    with pytest.raises(ServiceUnavailable):
        await backend.get("db", "tb", "k")
    with pytest.raises(ServiceUnavailable):
        await backend.put("db", "tb", Record(key="k", value=b"v"))


async def test_close_without_open_does_not_raise() -> None:
    await PostgresBackend(PostgresAddress.parse("postgresql://127.0.0.1:1/db")).close()


# -- engine registry ------------------------------------------------------


@pytest.mark.parametrize("scheme", ["postgres", "postgresql"])
async def test_open_store_chooses_postgres_by_scheme(address: str, tmp_path: Path, scheme: str) -> None:
    backend = await open_store(f"{scheme}://{address.partition('://')[2]}", tmp_path)
    try:
        assert isinstance(backend, PostgresBackend)
        assert await backend.put("db", "tb", Record(key=scheme, value=b"v")) == 1
        assert await backend.databases() == ["db"]
    finally:
        await backend.close()


# -- a server that goes away and comes back ---------------------------------------------------


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL server of this test's own, which it may stop (the shared one serves other tests)."""
    server = PrivatePostgres()
    try:
        server.start()
        yield server
    finally:
        server.close()


async def test_a_restarted_server_fails_calls_at_once_then_serves_them_again(
    private_postgres: PrivatePostgres, tmp_path: Path
) -> None:
    backend = await open_postgres(private_postgres.url, tmp_path)
    try:
        await asyncio.gather(*(backend.put("db", "tb", Record(key=f"k{i}", value=b"v")) for i in range(10)))
        private_postgres.stop()

        for call in (
            lambda: backend.get("db", "tb", "k1"),
            lambda: backend.put("db", "tb", Record("k", b"w")),
        ):
            began = time.monotonic()
            with pytest.raises(ServiceUnavailable) as caught:
                await call()
            assert time.monotonic() - began < 3  # not the pool's 10 s wait for a connection
            assert f"store engine postgres at 127.0.0.1:{private_postgres.port} is unavailable" in str(
                caught.value
            )
            assert "Connection refused" in str(caught.value)
        assert (await backend.health()).startswith("unavailable: ")

        private_postgres.start()
        began = time.monotonic()
        assert (await backend.get("db", "tb", "k1")).value == b"v"  # not after the pool's backoff
        assert await backend.put("db", "tb", Record(key="k1", value=b"w")) == 2
        assert time.monotonic() - began < 3
        assert await backend.health() == "ok"
    finally:
        await backend.close()
