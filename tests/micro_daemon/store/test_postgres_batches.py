"""Coalesced reads and plain writes of the PostgreSQL store (``postgres_batches``).

Against a real server first: small pools (``pool_size`` 1 or 2) make calls wait, hence share
statements. A ``Recorder`` wraps the backend's two ``Kind``s (what the ``Coalescer`` calls: the
bound methods ``_get_many``/``_put_many`` were captured when the backend was made, so patching
them on the instance would see nothing) to prove that batches ran, and each test checks that
every caller still got its own answer. Then the ``Coalescer`` alone, with fake statements held
by ``asyncio.Event`` gates.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from micro.errors import BadRequest, Conflict, NotFound, ServiceUnavailable
from micro_daemon.store.backend import Field, Query, Record
from micro_daemon.store.backends import postgres_batches
from micro_daemon.store.backends.postgres import PostgresBackend, open_postgres
from micro_daemon.store.backends.postgres_batches import ALONE, BATCH_AT, MAX_BATCH, Coalescer, Kind
from tests.micro_daemon.store import test_postgres
from tests.micro_daemon.store.test_postgres import with_params

# The fixtures this module uses, found by pytest under these names (no conftest: imported here).
postgres_dsn = test_postgres.postgres_dsn
schema = test_postgres.schema
address = test_postgres.address

DB, TB = "db", "tb"
T = TypeVar("T")
R = TypeVar("R")
Opener = Callable[[int], Awaitable[PostgresBackend]]


# -- helpers ------------------------------------------------------------------------------------


@pytest.fixture
async def open_backend(address: str, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens backends on this test's schema with a given ``pool_size``; closes them after the test."""
    opened: list[PostgresBackend] = []

    async def open_with(pool_size: int) -> PostgresBackend:
        backend = await open_postgres(with_params(address, pool_size=str(pool_size)), tmp_path)
        opened.append(backend)
        return backend

    yield open_with
    for backend in opened:
        await backend.close()


@dataclass
class Statement:
    """One statement the Coalescer ran: a read or a write, alone or for many calls, and its keys."""

    kind: str
    many: bool
    keys: list[str]
    error: BaseException | None = None


class Recorder:
    """Every statement the backend's Coalescer runs from now on, and how many ran at once."""

    def __init__(self, backend: PostgresBackend) -> None:
        self.statements: list[Statement] = []
        self.running = 0
        self.most_running = 0
        self._wrap("get", backend._gets, lambda key: key)
        self._wrap("put", backend._puts, lambda record: record.key)

    def batches(self, kind: str) -> list[list[str]]:
        """The keys of each statement of ``kind`` that ran for more than one call."""
        return [s.keys for s in self.statements if s.kind == kind and s.many]

    def keys(self, kind: str) -> list[str]:
        """The keys of every statement of ``kind`` that succeeded: each call's, once per time it ran."""
        return [key for s in self.statements if s.kind == kind and s.error is None for key in s.keys]

    @contextlib.contextmanager
    def _running(self, statement: Statement) -> Iterator[None]:
        self.statements.append(statement)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            yield
        except BaseException as exc:
            statement.error = exc
            raise
        finally:
            self.running -= 1

    def _wrap(self, name: str, kind: Kind[T, R], key: Callable[[T], str]) -> None:
        one, many = kind.one, kind.many

        async def run_one(group: Any, item: T) -> R:
            with self._running(Statement(name, False, [key(item)])):
                return await one(group, item)

        async def run_many(group: Any, items: Sequence[T]) -> list[R]:
            with self._running(Statement(name, True, [key(item) for item in items])):
                return await many(group, items)

        kind.one, kind.many = run_one, run_many


async def _settle() -> None:
    """Let every task that can run do so (the fakes below never wait for I/O)."""
    for _ in range(20):
        await asyncio.sleep(0)


async def _lock_waiters(dsn: str, application_name: str, count: int) -> None:
    """Wait until exactly ``count`` sessions of ``application_name`` wait for a lock."""
    sql = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'"
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for _ in range(500):
            row = await (await conn.execute(sql, (application_name,))).fetchone()
            if row is not None and row[0] == count:
                return
            await asyncio.sleep(0.01)
    raise AssertionError(f"never saw {count} statements waiting for a lock")


@contextlib.asynccontextmanager
async def _row_locked(dsn: str, schema_name: str, *keys: str) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A transaction holding the row locks of ``keys`` until the block ends (or it rolls back)."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await conn.execute(
            f'SELECT 1 FROM "{schema_name}".records WHERE key = ANY(%s) FOR UPDATE', (list(keys),)
        )
        try:
            yield conn
        finally:
            await conn.rollback()


def _record(i: int) -> Record:
    expires = time.time() + 3600 if i % 3 == 0 else None
    meta = {"n": Field(type="int", value=str(i)), "q": Field(type="string", value=f'"{i}",\\{{}}')}
    return Record(key=f"rec/{i:03}", value=f"value {i}".encode(), expires_at=expires, metadata=meta)


# -- reads --------------------------------------------------------------------------------------


async def test_concurrent_gets_share_statements_and_each_gets_its_own_record(open_backend: Opener) -> None:
    backend = await open_backend(1)
    expected: dict[str, Record] = {}
    for i in range(150):
        record = _record(i)
        version = await backend.put(DB, TB, record)
        if i % 5 == 0:
            record = Record(record.key, b"again", record.expires_at, record.metadata)
            version = await backend.put(DB, TB, record)
        expected[record.key] = Record(record.key, record.value, record.expires_at, record.metadata, version)
    keys = [*expected, *(f"missing/{i}" for i in range(50))]
    random.Random(1).shuffle(keys)
    recorder = Recorder(backend)

    answers = await asyncio.gather(*(backend.get(DB, TB, key) for key in keys), return_exceptions=True)

    for key, answer in zip(keys, answers, strict=True):
        if key in expected:
            assert answer == expected[key]
        else:
            assert isinstance(answer, NotFound), answer
            assert repr(key) in answer.detail
    assert {answer.version for answer in answers if isinstance(answer, Record)} == {1, 2}
    assert max(map(len, recorder.batches("get"))) > 1  # they did share statements
    assert sorted(recorder.keys("get")) == sorted(keys)  # each call ran once
    assert recorder.most_running == 1


async def test_reads_of_one_key_in_a_batch_all_get_its_record(open_backend: Opener) -> None:
    backend = await open_backend(1)
    version = await backend.put(DB, TB, Record(key="hot", value=b"v", metadata={"m": Field("string", "x")}))
    recorder = Recorder(backend)

    answers = await asyncio.gather(
        *(backend.get(DB, TB, key) for key in ["hot", "cold"] * 40), return_exceptions=True
    )

    assert answers[0::2] == [Record("hot", b"v", metadata={"m": Field("string", "x")}, version=version)] * 40
    assert all(isinstance(answer, NotFound) for answer in answers[1::2])
    assert any(batch.count("hot") > 1 and batch.count("cold") > 1 for batch in recorder.batches("get"))


async def test_expired_records_are_not_found_in_a_batch_as_alone(open_backend: Opener) -> None:
    backend = await open_backend(1)
    past, future = time.time() - 60, time.time() + 3600
    for i in range(20):
        await backend.put(DB, TB, Record(key=f"gone/{i}", value=b"old", expires_at=past))
        await backend.put(DB, TB, Record(key=f"live/{i}", value=b"new", expires_at=future))
    with pytest.raises(NotFound):
        await backend.get(DB, TB, "gone/0")
    recorder = Recorder(backend)
    keys = ["first", *(f"{state}/{i}" for i in range(20) for state in ("gone", "live"))]

    answers = await asyncio.gather(*(backend.get(DB, TB, key) for key in keys), return_exceptions=True)

    for key, answer in zip(keys, answers, strict=True):
        if key.startswith("live/"):
            assert answer == Record(key=key, value=b"new", expires_at=future, version=1)
        else:
            assert isinstance(answer, NotFound), (key, answer)
    batched = {key for batch in recorder.batches("get") for key in batch}
    assert {f"gone/{i}" for i in range(20)} <= batched


async def test_a_read_the_engine_refuses_fails_alone(open_backend: Opener) -> None:
    backend = await open_backend(1)
    for i in range(10):
        await backend.put(DB, TB, Record(key=f"k{i}", value=str(i).encode()))
    refused = ["nul\x00key", "lone \ud800 surrogate"]
    long_key = secrets.token_hex(2000)  # too long to index, but a read of it is no error: not found
    keys = [
        "first",
        *(f"k{i}" for i in range(5)),
        refused[0],
        long_key,
        *(f"k{i}" for i in range(5, 10)),
        refused[1],
    ]
    recorder = Recorder(backend)

    answers = await asyncio.gather(*(backend.get(DB, TB, key) for key in keys), return_exceptions=True)

    for key, answer in zip(keys, answers, strict=True):
        if key in refused:
            assert isinstance(answer, BadRequest), answer
            assert "cannot hold this value" in answer.detail
        elif key in ("first", long_key):
            assert isinstance(answer, NotFound), answer
        else:
            assert answer == Record(key=key, value=key[1:].encode(), version=1)
    failed = [s for s in recorder.statements if s.many and s.error is not None]
    assert len(failed) == 1 and isinstance(failed[0].error, BadRequest)
    assert sorted(failed[0].keys) == sorted(keys[1:])  # the batch was refused, then each call ran alone
    assert sorted(recorder.keys("get")) == sorted(key for key in keys if key not in refused)


# -- writes -------------------------------------------------------------------------------------


async def test_concurrent_puts_of_distinct_keys_share_statements(open_backend: Opener) -> None:
    backend = await open_backend(1)
    records = [_record(i) for i in range(300)]
    recorder = Recorder(backend)

    versions = await asyncio.gather(*(backend.put(DB, TB, record) for record in records))

    assert versions == [1] * 300
    assert [len(batch) for batch in recorder.batches("put")] == [MAX_BATCH, 99]  # the first ran alone
    assert sorted(recorder.keys("put")) == sorted(record.key for record in records)
    stored = await backend.query(DB, TB, Query())
    assert stored == [Record(r.key, r.value, r.expires_at, r.metadata, version=1) for r in records]
    assert [await backend.get(DB, TB, r.key) for r in records[:5]] == stored[:5]


async def test_writes_of_one_key_never_share_a_statement(open_backend: Opener) -> None:
    backend = await open_backend(1)
    values = [f"value {i}".encode() for i in range(50)]
    recorder = Recorder(backend)

    versions = await asyncio.gather(*(backend.put(DB, TB, Record(key="k", value=v)) for v in values))

    assert versions == list(range(1, 51))  # one connection: in the order of the calls
    assert recorder.batches("put") == []  # each waited for the one before: none shared a statement
    assert recorder.keys("put") == ["k"] * 50
    assert await backend.get(DB, TB, "k") == Record(key="k", value=values[-1], version=50)


@pytest.mark.parametrize("pool_size", [1, 2])
async def test_writes_of_repeated_keys_share_statements_with_other_keys_only(
    open_backend: Opener, pool_size: int
) -> None:
    backend = await open_backend(pool_size)
    writes = [Record(key=f"k{i % 10}", value=f"{i}".encode()) for i in range(200)]  # each key 20 times
    recorder = Recorder(backend)

    versions = await asyncio.gather(*(backend.put(DB, TB, record) for record in writes))

    batches = recorder.batches("put")
    assert max(map(len, batches)) > 1
    assert all(len(set(batch)) == len(batch) for batch in batches)
    assert recorder.most_running <= pool_size
    for k in range(10):
        mine = [
            (version, record.value)
            for version, record in zip(versions, writes, strict=True)
            if record.key == f"k{k}"
        ]
        assert sorted(version for version, _ in mine) == list(range(1, 21))
        final = await backend.get(DB, TB, f"k{k}")
        assert final.version == 20
        assert final.value in {value for _, value in mine}
        if pool_size == 1:  # one statement at a time: in the order of the calls
            assert [version for version, _ in mine] == list(range(1, 21))
            assert final.value == mine[-1][1]


async def test_a_put_over_an_expired_record_restarts_at_version_1_in_a_batch(open_backend: Opener) -> None:
    backend = await open_backend(1)
    past = time.time() - 60
    for i in range(11):
        assert await backend.put(DB, TB, Record(key=f"expired/{i}", value=b"1")) == 1
        assert await backend.put(DB, TB, Record(key=f"expired/{i}", value=b"2", expires_at=past)) == 2
        assert await backend.put(DB, TB, Record(key=f"live/{i}", value=b"1")) == 1
    assert await backend.put(DB, TB, Record(key="expired/10", value=b"3")) == 1  # alone (_Statements.put)
    recorder = Recorder(backend)
    keys = ["first", *(f"{state}/{i}" for i in range(10) for state in ("expired", "live"))]

    versions = await asyncio.gather(*(backend.put(DB, TB, Record(key=key, value=b"3")) for key in keys))

    assert versions == [1] + [1, 2] * 10
    assert {f"expired/{i}" for i in range(10)} <= {key for batch in recorder.batches("put") for key in batch}
    for i in range(11):
        assert await backend.get(DB, TB, f"expired/{i}") == Record(key=f"expired/{i}", value=b"3", version=1)


async def test_a_put_the_engine_refuses_fails_alone_and_the_rest_of_its_batch_is_written(
    open_backend: Opener,
) -> None:
    backend = await open_backend(1)
    refused = [
        Record(key=secrets.token_hex(2000), value=b"v"),  # 4000 incompressible bytes: over the index limit
        Record(key="nul\x00key", value=b"v"),
        Record(key="meta", value=b"v", metadata={"m": Field(type="string", value="nul\x00")}),
    ]
    good = [Record(key=f"ok/{i:02}", value=str(i).encode()) for i in range(30)]
    calls = [
        Record(key="first", value=b"v"),
        *good[:10],
        refused[0],
        *good[10:20],
        refused[1],
        *good[20:],
        refused[2],
    ]
    recorder = Recorder(backend)

    answers = await asyncio.gather(*(backend.put(DB, TB, record) for record in calls), return_exceptions=True)

    for record, answer in zip(calls, answers, strict=True):
        if record in refused:
            assert isinstance(answer, BadRequest), answer
        else:
            assert answer == 1
    assert isinstance(next(s for s in recorder.statements if s.many).error, BadRequest)
    assert sorted(recorder.keys("put")) == sorted(["first", *(r.key for r in good)])
    assert await backend.keys(DB, TB, Query()) == ["first", *(r.key for r in good)]
    assert await backend.health() == "ok"


async def test_a_batch_mixing_int_and_float_expiries_is_one_statement(open_backend: Opener) -> None:
    backend = await open_backend(1)
    soon = time.time() + 3600
    recorder = Recorder(backend)
    records = [Record(key=f"k{i}", value=b"v", expires_at=int(soon) if i % 2 else soon) for i in range(10)]

    assert await asyncio.gather(*(backend.put(DB, TB, r) for r in records)) == [1] * 10

    assert [s.error for s in recorder.statements] == [None, None]  # the first alone, then one batch


async def test_puts_mixing_int_and_float_expiries_are_written(open_backend: Opener) -> None:
    backend = await open_backend(1)
    soon = time.time() + 3600
    records = [Record(key=f"k{i}", value=b"v", expires_at=int(soon) if i % 2 else soon) for i in range(10)]

    assert await asyncio.gather(*(backend.put(DB, TB, r) for r in records)) == [1] * 10

    assert await backend.query(DB, TB, Query()) == [
        Record(r.key, r.value, r.expires_at, version=1)
        for r in records  # 1700000000 == 1700000000.0
    ]


async def test_keys_values_and_metadata_array_literals_would_mangle_survive_batches(
    open_backend: Opener,
) -> None:
    backend = await open_backend(1)
    keys = [
        "first",
        "NULL",
        "null",
        "",
        "a,b",
        "{x}",
        'q"uote',
        "back\\slash",
        " spaced ",
        "tab\t",
        "日本",
        "😀",
    ]
    meta = {"m": Field(type="string", value='q"\\{},NULL')}
    recorder = Recorder(backend)

    versions = await asyncio.gather(
        *(backend.put(DB, TB, Record(k, bytes(range(256)), metadata=meta)) for k in keys)
    )
    answers = await asyncio.gather(*(backend.get(DB, TB, key) for key in keys))

    assert versions == [1] * len(keys)
    assert answers == [Record(key, bytes(range(256)), metadata=meta, version=1) for key in keys]
    assert [len(batch) for batch in recorder.batches("put")] == [len(keys) - 1]
    assert [len(batch) for batch in recorder.batches("get")] == [len(keys) - 1]


async def test_batches_writing_the_same_keys_do_not_deadlock(
    open_backend: Opener,
    postgres_dsn: str,
    schema: str,
) -> None:
    backend = await open_backend(2)
    for key in ("hold1", "hold2", "a", "b"):
        await backend.put(DB, TB, Record(key=key, value=b"0"))
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
        setting = await (
            await conn.execute("SELECT setting::int FROM pg_settings WHERE name = 'deadlock_timeout'")
        ).fetchone()
    deadlock_timeout = (setting[0] if setting else 1000) / 1000
    recorder = Recorder(backend)
    async with (
        _row_locked(postgres_dsn, schema, "hold1") as hold1,
        _row_locked(postgres_dsn, schema, "hold2") as hold2,
        _row_locked(postgres_dsn, schema, "a") as hold_a,
    ):
        first = asyncio.create_task(backend.put(DB, TB, Record(key="hold1", value=b"1")))  # alone, waits
        second = asyncio.create_task(backend.put(DB, TB, Record(key="hold2", value=b"1")))  # alone, waits
        await _lock_waiters(postgres_dsn, schema, 2)
        writes = [
            asyncio.create_task(backend.put(DB, TB, Record(key=key, value=value)))
            for key, value in (("a", b"1"), ("b", b"1"), ("b", b"2"), ("a", b"2"))
        ]
        await _settle()
        await hold1.rollback()  # the first batch goes: a, b (and waits for a)
        await first
        await _lock_waiters(postgres_dsn, schema, 2)
        await hold2.rollback()  # the second batch goes: b, a (takes b, waits for a)
        await second
        await _lock_waiters(postgres_dsn, schema, 2)
        began = time.monotonic()
        await hold_a.rollback()
        versions = await asyncio.gather(*writes)
        took = time.monotonic() - began
    assert recorder.batches("put") == [["a", "b"], ["b", "a"]]
    assert sorted(versions) == [2, 2, 3, 3]
    assert took < deadlock_timeout / 2, f"the batches deadlocked: {took:.2f} s"


# -- other calls, and calls one at a time -------------------------------------------------------


async def test_conditional_writes_deletes_and_queries_are_not_coalesced(open_backend: Opener) -> None:
    backend = await open_backend(2)
    for i in range(10):
        await backend.put(DB, TB, Record(key=f"cas/{i}", value=b"1"))
        await backend.put(DB, TB, Record(key=f"del/{i}", value=b"1"))
    for i in range(50):
        await backend.put(DB, TB, Record(key=f"read/{i:02}", value=str(i).encode()))
    listed = await backend.query(DB, TB, Query(prefix="read/"))
    recorder = Recorder(backend)

    checks: list[tuple[Coroutine[Any, Any, object], Callable[[object], bool]]] = []
    for i in range(150):
        checks.append((backend.put(DB, TB, Record(key=f"new/{i}", value=b"n")), _equals(1)))
        checks.append((backend.get(DB, TB, f"read/{i % 50:02}"), _equals(listed[i % 50])))
    for i in range(10):
        checks.append((backend.put(DB, TB, Record(f"cas/{i}", b"2"), if_version=1), _equals(2)))
        checks.append((backend.put(DB, TB, Record(f"cas/{i}", b"3"), if_version=7), _is(Conflict)))
        checks.append((backend.put(DB, TB, Record(f"created/{i}", b"1"), if_version=0), _equals(1)))
        checks.append((backend.delete(DB, TB, f"del/{i}"), _equals(None)))
        checks.append((backend.delete(DB, TB, f"nothing/{i}"), _is(NotFound)))
        checks.append((backend.query(DB, TB, Query(prefix="read/")), lambda a: a == listed))
    random.Random(2).shuffle(checks)

    answers = await asyncio.gather(*(call for call, _ in checks), return_exceptions=True)

    assert [answer for answer, (_, check) in zip(answers, checks, strict=True) if not check(answer)] == []
    assert max(map(len, recorder.batches("put"))) > 1 and max(map(len, recorder.batches("get"))) > 1
    assert {key.partition("/")[0] for kind in ("get", "put") for key in recorder.keys(kind)} == {
        "new",
        "read",
    }
    for i in range(10):
        assert await backend.get(DB, TB, f"cas/{i}") == Record(key=f"cas/{i}", value=b"2", version=2)
        with pytest.raises(NotFound):
            await backend.get(DB, TB, f"del/{i}")
    assert len(await backend.keys(DB, TB, Query(prefix="new/"))) == 150


def _is(error: type[Exception]) -> Callable[[object], bool]:
    return lambda answer: isinstance(answer, error)


def _equals(expected: object) -> Callable[[object], bool]:
    return lambda answer: answer == expected


async def test_calls_one_at_a_time_always_run_alone(open_backend: Opener) -> None:
    backend = await open_backend(1)
    recorder = Recorder(backend)
    for i in range(20):
        assert await backend.put(DB, TB, Record(key=f"k{i}", value=b"v")) == 1
        assert (await backend.get(DB, TB, f"k{i}")).value == b"v"
        with pytest.raises(NotFound):
            await backend.get(DB, TB, f"missing{i}")
    two = await open_backend(2)
    recorder_two = Recorder(two)
    for i in range(20):  # as many at once as the pool has connections
        await asyncio.gather(two.put(DB, TB, Record(key=f"k{i}", value=b"w")), two.get(DB, TB, f"k{i}"))

    assert recorder.batches("get") == recorder.batches("put") == []
    assert len(recorder.statements) == 60
    assert recorder_two.batches("get") == recorder_two.batches("put") == []
    assert len(recorder_two.statements) == 40


# -- cancellation and closing -------------------------------------------------------------------


async def test_callers_that_give_up_while_waiting_are_skipped(
    open_backend: Opener,
    postgres_dsn: str,
    schema: str,
) -> None:
    backend = await open_backend(1)
    await backend.put(DB, TB, Record(key="blocker", value=b"v"))
    for i in range(20):
        await backend.put(DB, TB, Record(key=f"read/{i}", value=str(i).encode()))
    tasks_before = asyncio.all_tasks()
    recorder = Recorder(backend)
    async with _row_locked(postgres_dsn, schema, "blocker") as locker:
        blocked = asyncio.create_task(backend.put(DB, TB, Record(key="blocker", value=b"w")))  # alone, waits
        await _lock_waiters(postgres_dsn, schema, 1)
        gets = [asyncio.create_task(backend.get(DB, TB, f"read/{i}")) for i in range(20)]
        puts = [
            asyncio.create_task(backend.put(DB, TB, Record(key=f"new/{i}", value=b"n"))) for i in range(20)
        ]
        timed_out = [
            asyncio.create_task(asyncio.wait_for(backend.get(DB, TB, "read/0"), 0.01)),
            asyncio.create_task(asyncio.wait_for(backend.put(DB, TB, Record(key="late", value=b"l")), 0.01)),
        ]
        await asyncio.sleep(0.05)
        for task in gets[1::2] + puts[1::2]:
            task.cancel()
        await locker.rollback()
        assert await blocked == 2

    _, pending = await asyncio.wait([*gets, *puts, *timed_out], timeout=5)
    assert not pending
    assert all(task.cancelled() for task in gets[1::2] + puts[1::2])
    assert all([isinstance(task.exception(), TimeoutError) for task in timed_out])
    assert [task.result() for task in gets[0::2]] == [
        Record(key=f"read/{i}", value=str(i).encode(), version=1) for i in range(0, 20, 2)
    ]
    assert [task.result() for task in puts[0::2]] == [1] * 10
    assert max(map(len, recorder.batches("get"))) > 1 and max(map(len, recorder.batches("put"))) > 1
    assert sorted(recorder.keys("get")) == sorted(f"read/{i}" for i in range(0, 20, 2))  # the rest skipped
    assert sorted(recorder.keys("put")) == sorted(["blocker", *(f"new/{i}" for i in range(0, 20, 2))])
    assert await backend.keys(DB, TB, Query(prefix="new/")) == sorted(f"new/{i}" for i in range(0, 20, 2))
    with pytest.raises(NotFound):
        await backend.get(DB, TB, "late")
    await backend.close()
    assert asyncio.all_tasks() <= tasks_before


async def test_close_ends_every_call_running_or_waiting(open_backend: Opener) -> None:
    backend = await open_backend(1)
    for i in range(50):
        await backend.put(DB, TB, Record(key=f"read/{i}", value=b"r"))
    tasks_before = asyncio.all_tasks()
    recorder = Recorder(backend)
    calls: list[asyncio.Task[object]] = []
    for i in range(150):
        calls.append(asyncio.create_task(backend.get(DB, TB, f"read/{i % 50}")))
        calls.append(asyncio.create_task(backend.put(DB, TB, Record(key=f"new/{i}", value=b"n"))))
    for _ in range(3):
        await asyncio.sleep(0)  # the first call runs alone, the others wait for it

    await backend.close()

    _, pending = await asyncio.wait(calls, timeout=5)
    assert not pending, f"{len(pending)} calls still wait after close()"
    answers = [task.exception() or task.result() for task in calls]
    assert any(isinstance(answer, ServiceUnavailable) for answer in answers)
    for i, answer in enumerate(answers):  # each: its own answer (its statement ran before close) or 503
        if not isinstance(answer, ServiceUnavailable):
            assert answer == (1 if i % 2 else Record(key=f"read/{i // 2 % 50}", value=b"r", version=1))
    assert recorder.most_running == 1
    assert asyncio.all_tasks() <= tasks_before
    after = await asyncio.gather(
        *(backend.get(DB, TB, f"read/{i}") for i in range(20)),
        *(backend.put(DB, TB, Record(key=f"after/{i}", value=b"a")) for i in range(20)),
        return_exceptions=True,
    )
    assert all(isinstance(answer, ServiceUnavailable) for answer in after), after
    assert await backend.health() == "closed"


async def _start_behind_a_blocked_write(
    backend: PostgresBackend, dsn: str, application_name: str
) -> tuple[asyncio.Task[int], list[asyncio.Task[object]]]:
    """A write running alone and waiting for a row lock held elsewhere, and 100 calls waiting for it."""
    blocked = asyncio.create_task(backend.put(DB, TB, Record(key="blocker", value=b"w")))
    await _lock_waiters(dsn, application_name, 1)
    waiting: list[asyncio.Task[object]] = []
    for i in range(50):
        waiting.append(asyncio.create_task(backend.get(DB, TB, f"read/{i}")))
        waiting.append(asyncio.create_task(backend.put(DB, TB, Record(key=f"new/{i}", value=b"n"))))
    await _settle()
    assert not any(task.done() for task in waiting)
    return blocked, waiting


async def test_calls_waiting_when_close_begins_fail_once_the_running_statement_ends(
    open_backend: Opener,
    postgres_dsn: str,
    schema: str,
) -> None:
    backend = await open_backend(1)
    await backend.put(DB, TB, Record(key="blocker", value=b"v"))
    tasks_before = asyncio.all_tasks()
    async with _row_locked(postgres_dsn, schema, "blocker") as locker:
        blocked, waiting = await _start_behind_a_blocked_write(backend, postgres_dsn, schema)
        await asyncio.wait_for(backend.close(), 5)
        await locker.rollback()
        assert await asyncio.wait_for(blocked, 5) == 2  # its statement was running: it finished
    _, pending = await asyncio.wait(waiting, timeout=5)
    assert not pending
    assert all([isinstance(task.exception(), ServiceUnavailable) for task in waiting])
    assert asyncio.all_tasks() <= tasks_before


async def test_calls_waiting_when_close_begins_fail_at_once(
    open_backend: Opener,
    postgres_dsn: str,
    schema: str,
) -> None:
    backend = await open_backend(1)
    await backend.put(DB, TB, Record(key="blocker", value=b"v"))
    started: list[asyncio.Task[Any]] = []
    try:
        async with _row_locked(postgres_dsn, schema, "blocker"):
            blocked, waiting = await _start_behind_a_blocked_write(backend, postgres_dsn, schema)
            started += [blocked, *waiting]
            await asyncio.wait_for(backend.close(), 5)
            _, pending = await asyncio.wait(waiting, timeout=1)  # the write still waits for its lock
    finally:
        if started:
            await asyncio.wait(started, timeout=5)  # the lock released: everything ends
    outcomes = [task.exception() for task in waiting]  # retrieved: none is logged as never retrieved
    assert not pending, f"{len(pending)} calls still wait after close()"
    assert all(isinstance(outcome, ServiceUnavailable) for outcome in outcomes)


# -- the Coalescer alone ------------------------------------------------------------------------


class FakeStatements:
    """Statements that record their calls and wait for ``gate`` (open unless cleared) to answer.

    A statement reads ``gate`` when it begins: replace it to hold the next ones only. ``many``
    refuses any batch holding an item of ``bad`` (``BadRequest``, as ``one`` does for that item)
    and breaks on any holding one of ``broken`` (``RuntimeError``).
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, Hashable, list[str]]] = []
        self.running = 0
        self.most_running = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.bad: set[str] = set()
        self.broken: set[str] = set()

    async def one(self, group: Hashable, item: str) -> str:
        await self._statement("one", group, [item])
        if item in self.bad:
            raise BadRequest(f"bad {item}")
        return f"{group}:{item}"

    async def many(self, group: Hashable, items: Sequence[str]) -> list[str]:
        await self._statement("many", group, items)
        if self.bad.intersection(items):
            raise BadRequest("a bad batch")
        if self.broken.intersection(items):
            raise RuntimeError("a broken batch")
        return [f"{group}:{item}" for item in items]

    async def _statement(self, how: str, group: Hashable, items: Sequence[str]) -> None:
        self.calls.append((how, group, list(items)))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.gate.wait()
            await asyncio.sleep(0)
        finally:
            self.running -= 1


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What reaches the loop's exception handler (a future's exception never retrieved, ...): nothing."""
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    yield errors
    loop.set_exception_handler(None)
    assert errors == []


def _start(
    coalescer: Coalescer, kind: Kind[str, str], calls: Sequence[tuple[str, str]]
) -> list[asyncio.Task[str]]:
    return [asyncio.create_task(coalescer.run(kind, group, item)) for group, item in calls]


async def _run_queued(
    fake: FakeStatements,
    coalescer: Coalescer,
    kind: Kind[str, str],
    calls: Sequence[tuple[str, str]],
    *,
    return_exceptions: bool = False,
) -> list[Any]:
    """Start ``calls`` while ``fake`` holds its statements, so that all but the first queue, then
    let them run; their answers, in order."""
    fake.gate.clear()
    tasks = _start(coalescer, kind, calls)
    await _settle()
    fake.gate.set()
    return await asyncio.gather(*tasks, return_exceptions=return_exceptions)


async def test_coalescer_runs_alone_beside_fewer_than_alone_and_a_group_of_batch_at_beside_more(
    loop_errors: list[Any],
) -> None:
    fake = FakeStatements()
    fake.gate.clear()
    coalescer, kind = Coalescer(4), Kind(fake.one, fake.many)
    tasks = _start(coalescer, kind, [("a", "a0"), ("b", "b0")])
    await _settle()
    assert fake.calls == [("one", "a", ["a0"]), ("one", "b", ["b0"])]

    a_calls = [("a", f"a{i}") for i in range(1, BATCH_AT + 1)]
    tasks += _start(coalescer, kind, [*a_calls[:-1], ("b", "b1")])
    await _settle()
    assert len(fake.calls) == ALONE  # BATCH_AT - 1 calls of a, one of b: not worth a statement yet

    tasks += _start(coalescer, kind, a_calls[-1:])
    await _settle()
    assert fake.calls[ALONE:] == [("many", "a", [item for _, item in a_calls])]
    assert fake.running == ALONE + 1

    fake.gate.set()
    answers = await asyncio.gather(*tasks)
    assert answers == ["a:a0", "b:b0"] + [f"a:{item}" for _, item in a_calls[:-1]] + [
        "b:b1",
        f"a:{a_calls[-1][1]}",
    ]
    assert fake.calls[-1] == ("one", "b", ["b1"])  # once fewer than ALONE ran


async def test_coalescer_never_runs_more_than_its_limit_at_once(loop_errors: list[Any]) -> None:
    fake = FakeStatements()
    fake.gate.clear()
    coalescer, kind = Coalescer(3), Kind(fake.one, fake.many)
    calls = [(f"g{i % 4}", f"i{i}") for i in range(100)]
    tasks = _start(coalescer, kind, calls)
    await _settle()
    assert fake.running == 3

    fake.gate.set()
    answers = await asyncio.gather(*tasks)

    assert answers == [f"{group}:{item}" for group, item in calls]
    assert fake.most_running == 3
    assert sorted(item for _, _, items in fake.calls for item in items) == sorted(item for _, item in calls)
    assert all(len({calls[int(item[1:])][0] for item in items}) == 1 for _, _, items in fake.calls)
    assert max(len(items) for _, _, items in fake.calls) > 1
    assert coalescer._running == 0 and coalescer._waiting == {}


async def test_a_coalescer_of_limit_one_runs_one_statement_at_a_time(loop_errors: list[Any]) -> None:
    fake = FakeStatements()
    coalescer, kind = Coalescer(1), Kind(fake.one, fake.many)
    calls = [("g", f"i{i}") for i in range(3 * BATCH_AT)]
    answers = await _run_queued(fake, coalescer, kind, calls)

    assert answers == [f"g:{item}" for _, item in calls]
    assert fake.most_running == 1
    assert [(how, len(items)) for how, _, items in fake.calls] == [("one", 1), ("many", len(calls) - 1)]


async def test_coalescer_runs_the_oldest_group_first_and_a_leftover_after_the_others(
    monkeypatch: pytest.MonkeyPatch, loop_errors: list[Any]
) -> None:
    monkeypatch.setattr(postgres_batches, "MAX_BATCH", 2)
    fake = FakeStatements()
    coalescer, kind = Coalescer(1), Kind(fake.one, fake.many)
    calls = [("first", "x"), ("b", "b0"), ("a", "a0"), ("b", "b1"), ("b", "b2"), ("c", "c0"), ("a", "a1")]
    answers = await _run_queued(fake, coalescer, kind, calls)

    assert answers == [f"{group}:{item}" for group, item in calls]
    assert fake.calls == [
        ("one", "first", ["x"]),
        ("many", "b", ["b0", "b1"]),
        ("many", "a", ["a0", "a1"]),
        ("one", "c", ["c0"]),
        ("one", "b", ["b2"]),
    ]
    assert fake.most_running == 1


async def test_coalescer_batches_hold_max_batch_calls_at_most(loop_errors: list[Any]) -> None:
    fake = FakeStatements()
    coalescer, kind = Coalescer(1), Kind(fake.one, fake.many)
    calls = [("g", f"i{i}") for i in range(2 * MAX_BATCH + 51)]
    answers = await _run_queued(fake, coalescer, kind, calls)

    assert answers == [f"g:{item}" for _, item in calls]
    assert [(how, len(items)) for how, _, items in fake.calls] == [
        ("one", 1),
        ("many", MAX_BATCH),
        ("many", MAX_BATCH),
        ("many", 50),
    ]
    assert [item for _, _, items in fake.calls for item in items] == [item for _, item in calls]


async def test_coalescer_never_puts_two_calls_of_one_distinct_name_in_a_batch(loop_errors: list[Any]) -> None:
    fake = FakeStatements()
    coalescer = Coalescer(1)
    kind = Kind(fake.one, fake.many, distinct=lambda item: item.partition("=")[0])
    calls = [("g", item) for item in ("x=0", "k=1", "k=2", "j=1", "k=3", "j=2", "i=1")]
    answers = await _run_queued(fake, coalescer, kind, calls)

    assert answers == [f"g:{item}" for _, item in calls]
    assert fake.calls == [
        ("one", "g", ["x=0"]),
        ("many", "g", ["k=1", "j=1", "i=1"]),
        ("many", "g", ["k=2", "j=2"]),
        ("one", "g", ["k=3"]),
    ]


# One call alone, then a batch of a, b and c (b is the one made to fail), then a batch of d and e.
_ONE_BAD_IN_A_BATCH = [("g", "x"), ("g", "a"), ("g", "b"), ("g", "c"), ("h", "d"), ("h", "e")]


async def test_coalescer_runs_a_refused_batch_again_one_call_at_a_time(loop_errors: list[Any]) -> None:
    fake = FakeStatements()
    fake.bad = {"b"}
    coalescer, kind = Coalescer(1), Kind(fake.one, fake.many)
    answers = await _run_queued(
        fake,
        coalescer,
        kind,
        _ONE_BAD_IN_A_BATCH,
        return_exceptions=True,
    )

    assert answers[:2] == ["g:x", "g:a"] and answers[3:] == ["g:c", "h:d", "h:e"]
    assert isinstance(answers[2], BadRequest) and answers[2].detail == "bad b"
    assert fake.calls == [
        ("one", "g", ["x"]),
        ("many", "g", ["a", "b", "c"]),
        ("one", "g", ["a"]),
        ("one", "g", ["b"]),
        ("one", "g", ["c"]),
        ("many", "h", ["d", "e"]),
    ]


async def test_coalescer_fails_every_call_of_a_batch_that_breaks_otherwise(loop_errors: list[Any]) -> None:
    fake = FakeStatements()
    fake.broken = {"b"}
    coalescer, kind = Coalescer(1), Kind(fake.one, fake.many)
    answers = await _run_queued(
        fake,
        coalescer,
        kind,
        _ONE_BAD_IN_A_BATCH,
        return_exceptions=True,
    )

    assert answers[0] == "g:x" and answers[4:] == ["h:d", "h:e"]
    assert all(
        isinstance(answer, RuntimeError) and str(answer) == "a broken batch" for answer in answers[1:4]
    )
    assert fake.calls == [("one", "g", ["x"]), ("many", "g", ["a", "b", "c"]), ("many", "h", ["d", "e"])]


async def test_coalescer_skips_callers_that_gave_up_waiting(loop_errors: list[Any]) -> None:
    fake = FakeStatements()
    fake.gate.clear()
    coalescer, kind = Coalescer(1), Kind(fake.one, fake.many)
    first, a, b = _start(coalescer, kind, [("g", "x"), ("g", "a"), ("g", "b")])
    timed_out = asyncio.create_task(asyncio.wait_for(coalescer.run(kind, "g", "c"), 0.01))
    d, e, f = _start(coalescer, kind, [("g", "d"), ("g", "e"), ("h", "f")])
    await asyncio.sleep(0.05)
    b.cancel()
    f.cancel()  # all of group h
    fake.gate.set()

    assert list(await asyncio.gather(first, a, d, e)) == ["g:x", "g:a", "g:d", "g:e"]
    assert b.cancelled() and f.cancelled()
    with pytest.raises(TimeoutError):
        await timed_out
    assert fake.calls == [("one", "g", ["x"]), ("many", "g", ["a", "d", "e"])]
    await _settle()
    assert coalescer._waiting == {} and coalescer._running == 0


async def test_coalescer_drops_the_answer_of_a_caller_that_gave_up_during_its_batch(
    loop_errors: list[Any],
) -> None:
    fake = FakeStatements()
    fake.gate.clear()
    coalescer, kind = Coalescer(1), Kind(fake.one, fake.many)
    tasks = _start(coalescer, kind, [("g", "x"), ("g", "a"), ("g", "b"), ("g", "c")])
    await _settle()
    first_gate, fake.gate = fake.gate, asyncio.Event()
    first_gate.set()  # the first call ends: the batch begins and waits for the new gate
    await _settle()
    assert fake.calls[-1] == ("many", "g", ["a", "b", "c"])
    tasks[2].cancel()
    await _settle()
    fake.gate.set()

    assert list(await asyncio.gather(tasks[0], tasks[1], tasks[3])) == ["g:x", "g:a", "g:c"]
    assert tasks[2].cancelled()


async def test_coalescer_close_waits_for_the_batches_running(loop_errors: list[Any]) -> None:
    fake = FakeStatements()
    fake.gate.clear()
    coalescer, kind = Coalescer(1), Kind(fake.one, fake.many)
    tasks_before = asyncio.all_tasks()
    tasks = _start(coalescer, kind, [("g", "x"), ("g", "a"), ("g", "b")])
    await _settle()
    first_gate, fake.gate = fake.gate, asyncio.Event()
    first_gate.set()
    await _settle()
    closing = asyncio.create_task(coalescer.close())
    await _settle()
    assert not closing.done()

    fake.gate.set()
    await asyncio.wait_for(closing, 1)

    assert coalescer._batches == set()
    assert await asyncio.gather(*tasks) == ["g:x", "g:a", "g:b"]
    assert asyncio.all_tasks() <= tasks_before
