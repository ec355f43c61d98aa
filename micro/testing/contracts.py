"""Conformance suites that every backend of a building block must pass.

Subclass the suite in a test module and provide the fixture it names::

    class TestMyStore(StoreContract):
        @pytest.fixture
        async def backend(self) -> AsyncIterator[StoreBackend]:
            backend = await MyStore.connect(...)
            yield backend
            await backend.close()

The tests are coroutines: run them with pytest-asyncio (``asyncio_mode = "auto"``,
or mark the subclass with ``pytest.mark.asyncio``).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import pytest

from micro.errors import Conflict, NotFound
from micro_daemon.store.backend import Field, Query, Record

if TYPE_CHECKING:
    from micro_daemon.store.backend import StoreBackend

__all__ = ["StoreContract"]

DB = "db"
TB = "tb"
UNUSUAL_KEYS = [
    "ünïcødé/ключ/键",
    "emoji-🙂-𝄞",
    "100%",
    "a_b",
    "back\\slash",
    "quote'double\"",
    "spaces and\ttabs\nnewline",
    "glob*?[x]",
    "x" * 2048,
]


def _past() -> float:
    return time.time() - 60


def _future() -> float:
    return time.time() + 3600


async def _put_keys(backend: StoreBackend, keys: list[str], table: str = TB) -> None:
    for key in keys:
        await backend.put(DB, table, Record(key=key, value=key.encode()))


async def _put_expired(backend: StoreBackend, key: str, database: str = DB, table: str = TB) -> None:
    await backend.put(database, table, Record(key=key, value=b"gone", expires_at=_past()))


async def _conflicts(backend: StoreBackend, key: str, if_version: int) -> bool:
    try:
        await backend.put(DB, TB, Record(key=key, value=str(if_version).encode()), if_version=if_version)
    except Conflict:
        return True
    return False


class StoreContract:
    """The behaviour every ``StoreBackend`` must show.

    The subclass provides an async ``backend`` fixture yielding an empty,
    open backend that it closes afterwards. Key order is Unicode code point
    order (UTF-8 byte order); key comparisons are case- and accent-sensitive.
    """

    # -- put and get ------------------------------------------------------

    async def test_put_then_get_returns_the_record(self, backend: StoreBackend) -> None:
        meta = {"owner": Field(type="string", value="ana"), "n": Field(type="int64", value="3")}
        version = await backend.put(DB, TB, Record(key="k", value=b"v", metadata=meta))
        assert version == 1
        assert await backend.get(DB, TB, "k") == Record(key="k", value=b"v", metadata=meta, version=1)

    async def test_put_ignores_the_given_version(self, backend: StoreBackend) -> None:
        assert await backend.put(DB, TB, Record(key="k", value=b"v", version=42)) == 1
        assert (await backend.get(DB, TB, "k")).version == 1

    @pytest.mark.parametrize("value", [b"", b"\x00", bytes(range(256)) * 4])
    async def test_binary_values_roundtrip(self, backend: StoreBackend, value: bytes) -> None:
        await backend.put(DB, TB, Record(key="bin", value=value))
        assert (await backend.get(DB, TB, "bin")).value == value

    async def test_long_key_and_large_value(self, backend: StoreBackend) -> None:
        key, value = "k" * 2048, bytes(range(256)) * (4 * 4096)
        await backend.put(DB, TB, Record(key=key, value=value))
        assert (await backend.get(DB, TB, key)).value == value
        assert await backend.keys(DB, TB, Query(prefix="kkk")) == [key]

    async def test_unicode_metadata_roundtrip(self, backend: StoreBackend) -> None:
        meta = {"名前": Field(type="string", value="ünï 🙂"), "": Field(type="", value="")}
        await backend.put(DB, TB, Record(key="k", value=b"v", metadata=meta))
        assert (await backend.get(DB, TB, "k")).metadata == meta

    async def test_future_expiry_is_kept(self, backend: StoreBackend) -> None:
        expires_at = _future()
        await backend.put(DB, TB, Record(key="k", value=b"v", expires_at=expires_at))
        assert (await backend.get(DB, TB, "k")).expires_at == pytest.approx(expires_at, abs=1e-3)

    async def test_get_absent_raises_not_found(self, backend: StoreBackend) -> None:
        with pytest.raises(NotFound) as caught:
            await backend.get(DB, TB, "missing")
        assert caught.value.id == "store"
        assert "missing" in caught.value.detail

    async def test_get_matches_the_exact_key_only(self, backend: StoreBackend) -> None:
        await _put_keys(backend, ["ab", "abc"])
        with pytest.raises(NotFound):
            await backend.get(DB, TB, "a")
        assert (await backend.get(DB, TB, "ab")).value == b"ab"

    # -- versions and conditional writes ----------------------------------

    async def test_version_grows_by_one_per_write(self, backend: StoreBackend) -> None:
        versions = [await backend.put(DB, TB, Record(key="k", value=bytes([i]))) for i in range(4)]
        assert versions == [1, 2, 3, 4]
        assert await backend.get(DB, TB, "k") == Record(key="k", value=b"\x03", version=4)

    async def test_overwrite_replaces_value_metadata_and_expiry(self, backend: StoreBackend) -> None:
        meta = {"a": Field(type="string", value="1")}
        await backend.put(DB, TB, Record(key="k", value=b"old", metadata=meta, expires_at=_future()))
        await backend.put(DB, TB, Record(key="k", value=b"new"))
        assert await backend.get(DB, TB, "k") == Record(key="k", value=b"new", version=2)

    async def test_version_restarts_after_delete(self, backend: StoreBackend) -> None:
        await _put_keys(backend, ["k", "k"])
        await backend.delete(DB, TB, "k")
        assert await backend.put(DB, TB, Record(key="k", value=b"again")) == 1

    async def test_if_version_match_writes(self, backend: StoreBackend) -> None:
        await backend.put(DB, TB, Record(key="k", value=b"1"))
        assert await backend.put(DB, TB, Record(key="k", value=b"2"), if_version=1) == 2
        assert (await backend.get(DB, TB, "k")).value == b"2"

    async def test_if_version_mismatch_conflicts_and_changes_nothing(self, backend: StoreBackend) -> None:
        meta = {"m": Field(type="string", value="x")}
        await backend.put(DB, TB, Record(key="k", value=b"1", metadata=meta))
        await backend.put(DB, TB, Record(key="k", value=b"2", metadata=meta))
        before = await backend.get(DB, TB, "k")
        for stale in (1, 3, 0):
            with pytest.raises(Conflict) as caught:
                await backend.put(DB, TB, Record(key="k", value=b"bad"), if_version=stale)
            assert caught.value.id == "store"
        assert await backend.get(DB, TB, "k") == before

    async def test_if_version_zero_creates_only_if_absent(self, backend: StoreBackend) -> None:
        assert await backend.put(DB, TB, Record(key="k", value=b"first"), if_version=0) == 1
        assert await _conflicts(backend, "k", 0)
        assert (await backend.get(DB, TB, "k")).value == b"first"

    async def test_if_version_on_absent_key_conflicts(self, backend: StoreBackend) -> None:
        assert await _conflicts(backend, "k", 1)
        with pytest.raises(NotFound):
            await backend.get(DB, TB, "k")

    async def test_expired_record_counts_as_absent_for_if_version(self, backend: StoreBackend) -> None:
        await _put_expired(backend, "k")
        assert await _conflicts(backend, "k", 1)
        assert await backend.put(DB, TB, Record(key="k", value=b"fresh"), if_version=0) == 1
        assert await backend.get(DB, TB, "k") == Record(key="k", value=b"fresh", version=1)

    async def test_expired_record_version_restarts(self, backend: StoreBackend) -> None:
        await backend.put(DB, TB, Record(key="k", value=b"1"))
        await backend.put(DB, TB, Record(key="k", value=b"2", expires_at=_past()))
        assert await backend.put(DB, TB, Record(key="k", value=b"3")) == 1

    # -- expiry -----------------------------------------------------------

    async def test_expired_record_is_invisible(self, backend: StoreBackend) -> None:
        await _put_expired(backend, "gone")
        with pytest.raises(NotFound):
            await backend.get(DB, TB, "gone")
        assert await backend.query(DB, TB, Query()) == []
        assert await backend.keys(DB, TB, Query(prefix="go")) == []
        assert await backend.databases() == []
        assert await backend.tables(DB) == []

    async def test_expired_records_hide_only_themselves(self, backend: StoreBackend) -> None:
        await _put_expired(backend, "b")
        await _put_expired(backend, "x", database="only-expired")
        await _put_expired(backend, "x", table="expired-table")
        await _put_keys(backend, ["a", "c"])
        assert await backend.keys(DB, TB, Query()) == ["a", "c"]
        assert await backend.databases() == [DB]
        assert await backend.tables(DB) == [TB]

    async def test_expired_records_do_not_count_for_offset_and_limit(self, backend: StoreBackend) -> None:
        await _put_keys(backend, ["k1", "k3", "k5", "k6"])
        for key in ["k0", "k2", "k4"]:
            await _put_expired(backend, key)
        assert await backend.keys(DB, TB, Query(offset=1, limit=2)) == ["k3", "k5"]
        assert await backend.keys(DB, TB, Query(order="desc", offset=1, limit=2)) == ["k5", "k3"]

    async def test_delete_of_expired_raises_not_found(self, backend: StoreBackend) -> None:
        await _put_expired(backend, "gone")
        with pytest.raises(NotFound):
            await backend.delete(DB, TB, "gone")

    async def test_purge_expired_removes_and_counts(self, backend: StoreBackend) -> None:
        await _put_keys(backend, ["live"])
        await backend.put(DB, TB, Record(key="later", value=b"v", expires_at=_future()))
        for key in ["a", "b", "c"]:
            await _put_expired(backend, key)
        await _put_expired(backend, "d", database="other")
        assert await backend.purge_expired() == 4
        assert await backend.purge_expired() == 0
        assert await backend.keys(DB, TB, Query()) == ["later", "live"]
        assert await backend.put(DB, TB, Record(key="a", value=b"new"), if_version=0) == 1

    async def test_record_disappears_when_it_expires(self, backend: StoreBackend) -> None:
        await backend.put(DB, TB, Record(key="brief", value=b"v", expires_at=time.time() + 0.5))
        assert (await backend.get(DB, TB, "brief")).value == b"v"
        await asyncio.sleep(0.6)
        with pytest.raises(NotFound):
            await backend.get(DB, TB, "brief")
        assert await backend.keys(DB, TB, Query()) == []

    # -- queries ----------------------------------------------------------

    async def test_empty_query_selects_everything_in_order(self, backend: StoreBackend) -> None:
        await _put_keys(backend, ["b", "a", "c"])
        assert await backend.keys(DB, TB, Query()) == ["a", "b", "c"]
        assert await backend.keys(DB, TB, Query(order="desc")) == ["c", "b", "a"]

    async def test_prefix(self, backend: StoreBackend) -> None:
        await _put_keys(backend, ["a", "user/1", "user/2", "user/10", "user", "userx", "v"])
        assert await backend.keys(DB, TB, Query(prefix="user/")) == ["user/1", "user/10", "user/2"]
        assert await backend.keys(DB, TB, Query(prefix="user")) == [
            "user",
            "user/1",
            "user/10",
            "user/2",
            "userx",
        ]
        assert await backend.keys(DB, TB, Query(prefix="nope")) == []

    async def test_suffix(self, backend: StoreBackend) -> None:
        await _put_keys(backend, ["a.json", "b.txt", "c.json", "json", "x.jsonx"])
        assert await backend.keys(DB, TB, Query(suffix=".json")) == ["a.json", "c.json"]
        assert await backend.keys(DB, TB, Query(suffix="json", order="desc")) == ["json", "c.json", "a.json"]
        assert await backend.keys(DB, TB, Query(suffix="longer-than-any-key.json")) == []

    async def test_prefix_and_suffix(self, backend: StoreBackend) -> None:
        await _put_keys(backend, ["ab", "abab", "ab/x.json", "ab/y.txt", "b/z.json", "ab.json"])
        assert await backend.keys(DB, TB, Query(prefix="ab/", suffix=".json")) == ["ab/x.json"]
        # prefix and suffix may overlap inside a short key
        assert await backend.keys(DB, TB, Query(prefix="ab", suffix="b")) == ["ab", "abab"]

    async def test_offset_and_limit(self, backend: StoreBackend) -> None:
        keys = [f"k{i:02d}" for i in range(10)]
        await _put_keys(backend, keys)
        assert await backend.keys(DB, TB, Query(limit=3)) == keys[:3]
        assert await backend.keys(DB, TB, Query(offset=7)) == keys[7:]
        assert await backend.keys(DB, TB, Query(offset=8, limit=5)) == keys[8:]
        assert await backend.keys(DB, TB, Query(offset=10)) == []
        assert await backend.keys(DB, TB, Query(limit=0)) == keys

    async def test_order_offset_limit_with_filters(self, backend: StoreBackend) -> None:
        await _put_keys(backend, [f"p/{i:02d}.{'a' if i % 2 else 'b'}" for i in range(20)] + ["q/01.a"])
        selected = Query(prefix="p/", suffix=".a", order="desc", offset=2, limit=3)
        assert await backend.keys(DB, TB, selected) == ["p/15.a", "p/13.a", "p/11.a"]

    @pytest.mark.parametrize(
        "query",
        [
            Query(),
            Query(prefix="k1"),
            Query(suffix="5", order="desc"),
            Query(offset=3, limit=4, order="desc"),
        ],
    )
    async def test_query_and_keys_agree(self, backend: StoreBackend, query: Query) -> None:
        await _put_keys(backend, [f"k{i}" for i in range(15)])
        records = await backend.query(DB, TB, query)
        assert [r.key for r in records] == await backend.keys(DB, TB, query)
        assert all(r.value == r.key.encode() and r.version == 1 for r in records)

    async def test_query_returns_whole_records(self, backend: StoreBackend) -> None:
        meta = {"m": Field(type="bool", value="true")}
        await backend.put(DB, TB, Record(key="a", value=b"1", metadata=meta))
        await backend.put(DB, TB, Record(key="a", value=b"2", metadata=meta))
        assert await backend.query(DB, TB, Query(prefix="a")) == [
            Record(key="a", value=b"2", metadata=meta, version=2)
        ]

    async def test_query_of_unknown_table_is_empty(self, backend: StoreBackend) -> None:
        await _put_keys(backend, ["a"])
        assert await backend.query(DB, "nope", Query()) == []
        assert await backend.keys("nope", TB, Query()) == []

    # -- databases and tables ---------------------------------------------

    async def test_empty_backend_lists_nothing(self, backend: StoreBackend) -> None:
        assert await backend.databases() == []
        assert await backend.tables(DB) == []

    async def test_databases_and_tables_are_listed_sorted(self, backend: StoreBackend) -> None:
        for database, table in [("b", "t2"), ("a", "t1"), ("b", "t1"), ("a", "t1")]:
            await backend.put(database, table, Record(key="k", value=b"v"))
        assert await backend.databases() == ["a", "b"]
        assert await backend.tables("a") == ["t1"]
        assert await backend.tables("b") == ["t1", "t2"]
        assert await backend.tables("c") == []

    async def test_databases_are_isolated(self, backend: StoreBackend) -> None:
        await backend.put("one", TB, Record(key="k", value=b"1"))
        await backend.put("two", TB, Record(key="k", value=b"2"))
        assert (await backend.get("one", TB, "k")).value == b"1"
        await backend.delete("one", TB, "k")
        assert await backend.get("two", TB, "k") == Record(key="k", value=b"2", version=1)
        assert await backend.databases() == ["two"]

    async def test_tables_are_isolated(self, backend: StoreBackend) -> None:
        await _put_keys(backend, ["a", "b"], table="t1")
        await _put_keys(backend, ["b", "c"], table="t2")
        assert await backend.keys(DB, "t1", Query()) == ["a", "b"]
        assert await backend.keys(DB, "t2", Query()) == ["b", "c"]
        assert await backend.put(DB, "t2", Record(key="b", value=b"x"), if_version=1) == 2
        assert (await backend.get(DB, "t1", "b")).version == 1

    async def test_names_that_are_prefixes_of_each_other(self, backend: StoreBackend) -> None:
        await backend.put("db", "t", Record(key="k", value=b"1"))
        await backend.put("db2", "t", Record(key="k", value=b"2"))
        await backend.put("db", "t2", Record(key="k", value=b"3"))
        assert await backend.tables("db") == ["t", "t2"]
        assert await backend.keys("db", "t", Query()) == ["k"]
        assert (await backend.get("db2", "t", "k")).value == b"2"

    async def test_unusual_database_and_table_names(self, backend: StoreBackend) -> None:
        names = ["ns/ünï", "100%", "a_b", "back\\slash", "🙂"]
        for name in names:
            await backend.put(name, name, Record(key="k", value=name.encode()))
        assert await backend.databases() == sorted(names)
        for name in names:
            assert await backend.tables(name) == [name]
            assert (await backend.get(name, name, "k")).value == name.encode()

    async def test_deleting_the_last_record_hides_table_and_database(self, backend: StoreBackend) -> None:
        await _put_keys(backend, ["only"])
        await backend.delete(DB, TB, "only")
        assert await backend.databases() == []
        assert await backend.tables(DB) == []

    # -- delete -----------------------------------------------------------

    async def test_delete_removes_only_that_key(self, backend: StoreBackend) -> None:
        await _put_keys(backend, ["a", "ab", "b"])
        await backend.delete(DB, TB, "a")
        with pytest.raises(NotFound):
            await backend.get(DB, TB, "a")
        assert await backend.keys(DB, TB, Query()) == ["ab", "b"]

    async def test_delete_of_absent_raises_not_found(self, backend: StoreBackend) -> None:
        with pytest.raises(NotFound) as caught:
            await backend.delete(DB, TB, "missing")
        assert caught.value.id == "store"
        await _put_keys(backend, ["k"])
        await backend.delete(DB, TB, "k")
        with pytest.raises(NotFound):
            await backend.delete(DB, TB, "k")

    # -- concurrency ------------------------------------------------------

    async def test_concurrent_creates_have_one_winner(self, backend: StoreBackend) -> None:
        results = await asyncio.gather(*(_conflicts(backend, "k", 0) for _ in range(20)))
        assert results.count(False) == 1
        assert (await backend.get(DB, TB, "k")).version == 1

    async def test_concurrent_conditional_writes_have_one_winner_per_version(
        self, backend: StoreBackend
    ) -> None:
        await backend.put(DB, TB, Record(key="k", value=b"0"))
        for version in range(1, 6):
            results = await asyncio.gather(*(_conflicts(backend, "k", version) for _ in range(10)))
            assert results.count(False) == 1
        assert await backend.get(DB, TB, "k") == Record(key="k", value=b"5", version=6)

    async def test_concurrent_compare_and_swap_counter(self, backend: StoreBackend) -> None:
        await backend.put(DB, TB, Record(key="n", value=b"0"))

        async def increment() -> None:
            while True:
                current = await backend.get(DB, TB, "n")
                value = str(int(current.value) + 1).encode()
                try:
                    await backend.put(DB, TB, Record(key="n", value=value), if_version=current.version)
                    return
                except Conflict:
                    await asyncio.sleep(0)

        await asyncio.gather(*(increment() for _ in range(25)))
        assert await backend.get(DB, TB, "n") == Record(key="n", value=b"25", version=26)

    async def test_concurrent_puts_of_many_keys(self, backend: StoreBackend) -> None:
        keys = [f"key-{i:03d}" for i in range(100)]
        versions = await asyncio.gather(*(backend.put(DB, TB, Record(key=k, value=k.encode())) for k in keys))
        assert versions == [1] * len(keys)
        assert await backend.keys(DB, TB, Query()) == keys

    # -- unusual keys -----------------------------------------------------

    @pytest.mark.parametrize("key", UNUSUAL_KEYS)
    async def test_unusual_key_roundtrip(self, backend: StoreBackend, key: str) -> None:
        await backend.put(DB, TB, Record(key=key, value=b"v"))
        assert (await backend.get(DB, TB, key)).key == key
        assert await backend.keys(DB, TB, Query(prefix=key)) == [key]
        assert await backend.keys(DB, TB, Query(suffix=key)) == [key]
        await backend.delete(DB, TB, key)
        assert await backend.keys(DB, TB, Query()) == []

    async def test_wildcard_characters_are_literal(self, backend: StoreBackend) -> None:
        await _put_keys(backend, ["100%", "1000", "a_b", "aXb", "a\\b", "a\\\\b", "*", "x", "?"])
        assert await backend.keys(DB, TB, Query(prefix="100%")) == ["100%"]
        assert await backend.keys(DB, TB, Query(prefix="a_")) == ["a_b"]
        assert await backend.keys(DB, TB, Query(prefix="a\\")) == ["a\\\\b", "a\\b"]
        assert await backend.keys(DB, TB, Query(suffix="%")) == ["100%"]
        assert await backend.keys(DB, TB, Query(suffix="_b")) == ["a_b"]
        assert await backend.keys(DB, TB, Query(prefix="*")) == ["*"]
        assert await backend.keys(DB, TB, Query(suffix="?")) == ["?"]

    async def test_matching_is_case_and_accent_sensitive(self, backend: StoreBackend) -> None:
        await _put_keys(backend, ["Abc", "abc", "ábc", "ABC"])
        assert await backend.keys(DB, TB, Query(prefix="a")) == ["abc"]
        assert await backend.keys(DB, TB, Query(suffix="BC")) == ["ABC"]
        with pytest.raises(NotFound):
            await backend.get(DB, TB, "aBc")

    async def test_order_is_code_point_order(self, backend: StoreBackend) -> None:
        keys = ["a", "B", "é", "🙂", "a0", "Z", "~", "\u00a0", "中", "\uffff", " ", "aa"]
        await _put_keys(backend, keys)
        assert await backend.keys(DB, TB, Query()) == sorted(keys)
        assert await backend.keys(DB, TB, Query(order="desc")) == sorted(keys, reverse=True)

    async def test_prefixes_ending_in_the_highest_code_points(self, backend: StoreBackend) -> None:
        top = "\U0010ffff"
        keys = ["a", f"a{top}", f"a{top}z", f"a{top}{top}", "b", top, f"{top}{top}x", "\ud7ffz", "\ue000"]
        await _put_keys(backend, keys)
        assert await backend.keys(DB, TB, Query(prefix=f"a{top}")) == [f"a{top}", f"a{top}z", f"a{top}{top}"]
        assert await backend.keys(DB, TB, Query(prefix=top)) == [top, f"{top}{top}x"]
        assert await backend.keys(DB, TB, Query(prefix=f"{top}{top}")) == [f"{top}{top}x"]
        assert await backend.keys(DB, TB, Query(prefix="\ud7ff")) == ["\ud7ffz"]
        assert await backend.keys(DB, TB, Query(prefix="\uffff")) == []

    # -- health -----------------------------------------------------------

    async def test_health_is_ok(self, backend: StoreBackend) -> None:
        assert await backend.health() == "ok"
