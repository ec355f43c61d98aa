from __future__ import annotations

import asyncio
import json

import pytest

from micro.errors import BadRequest, Conflict, InternalServerError, NotFound, TooManyRequests
from micro_daemon.config import engine as engine_module
from micro_daemon.config.engine import DATABASE, MAX_VALUE_BYTES, TABLE, Change, ConfigEngine, Watch
from micro_daemon.config.secrets import SecretBox
from micro_daemon.store.backend import Record
from micro_daemon.store.backends.memory import MemoryBackend


@pytest.fixture
def store():
    return MemoryBackend()


@pytest.fixture
def box():
    return SecretBox.generate()


@pytest.fixture
def config(store, box):
    return ConfigEngine(store, box)


async def raw(store: MemoryBackend, namespace: str = "ns") -> bytes:
    return (await store.get(DATABASE, TABLE, namespace)).value


async def test_objects_merge_and_scalars_replace(config):
    await config.set("ns", "", {"a": 1, "b": {"b1": 2}, "c": 3})
    await config.set("ns", "", {"d": 4, "b": {"b2": 2.2}})
    assert await config.get("ns") == {"a": 1, "b": {"b1": 2, "b2": 2.2}, "c": 3, "d": 4}
    await config.set("ns", "b", [1, 2])
    assert await config.get("ns", "b") == [1, 2]


async def test_one_record_per_namespace(config, store):
    await config.set("ns", "db.host", "localhost")
    await config.set("other", "db.host", "remote")
    assert await config.get("ns", "db.host") == "localhost"
    assert await config.get("other", "db.host") == "remote"
    stored = json.loads(await raw(store))
    assert stored == {"db": {"host": {"value": "localhost", "leaf": True, "secret": False}}}


async def test_an_unknown_namespace_is_empty(config):
    assert await config.get("nobody") == {}
    with pytest.raises(NotFound, match=r"config path 'db\.host' not found"):
        await config.get("nobody", "db.host")


async def test_delete(config):
    await config.set("ns", "", {"a": {"b": 1}, "c": 2})
    await config.delete("ns", "a.b")
    assert await config.get("ns") == {"c": 2}
    with pytest.raises(NotFound, match="config path 'a' not found"):
        await config.delete("ns", "a")
    await config.delete("ns", "")
    assert await config.get("ns") == {}


async def test_secrets_are_encrypted_at_rest_and_masked(config, store):
    await config.set("ns", "db", {"user": "admin", "password": "hunter2"}, secret=True)
    await config.set("ns", "db.host", "localhost")
    assert b"hunter2" not in await raw(store)
    assert b"admin" not in await raw(store)
    assert await config.get("ns", "db") == {"user": "[secret]", "password": "[secret]", "host": "localhost"}
    assert await config.get("ns", "db.password", reveal=True) == "hunter2"


async def test_another_key_cannot_reveal(config, store):
    await config.set("ns", "token", "hunter2", secret=True)
    with pytest.raises(BadRequest, match="could not be decrypted"):
        await ConfigEngine(store, SecretBox.generate()).get("ns", "token", reveal=True)


@pytest.mark.parametrize("path", ["a..b", ".a", "a."])
async def test_malformed_paths_are_refused(config, path):
    for call in (config.get("ns", path), config.set("ns", path, 1), config.delete("ns", path)):
        with pytest.raises(BadRequest, match="malformed"):
            await call
    with pytest.raises(BadRequest, match="malformed"):
        config.watch("ns", path)


async def test_an_empty_namespace_is_refused(config):
    with pytest.raises(BadRequest, match="namespace is empty"):
        await config.set("", "a", 1)


async def test_values_over_a_mebibyte_are_refused(config, store):
    with pytest.raises(BadRequest, match="over the limit") as info:
        await config.set("ns", "blob", "x" * MAX_VALUE_BYTES)
    assert info.value.id == "config"
    with pytest.raises(NotFound):
        await store.get(DATABASE, TABLE, "ns")
    await config.set("ns", "blob", "x" * (MAX_VALUE_BYTES - 2))


@pytest.mark.parametrize("value", [{1, 2}, float("nan"), object()])
async def test_values_that_are_not_json_are_refused(config, value):
    with pytest.raises(BadRequest, match="not JSON"):
        await config.set("ns", "a", value)


@pytest.mark.parametrize("stored", [b"{not json", b"\xff", b"[]", b'{"a": 1}'])
async def test_a_corrupt_tree_is_reported_and_kept(config, store, stored):
    await store.put(DATABASE, TABLE, Record(key="ns", value=stored))
    for call in (config.get("ns"), config.set("ns", "a", 1), config.delete("ns", "a")):
        with pytest.raises(InternalServerError, match=r"config of namespace 'ns'.*is corrupt") as info:
            await call
        assert info.value.id == "config"
    assert await raw(store) == stored


async def test_concurrent_sets_all_survive(config):
    await asyncio.gather(*(config.set("ns", f"group{i % 5}.leaf{i}", i) for i in range(50)))
    tree = await config.get("ns")
    assert sum(len(group) for group in tree.values()) == 50
    assert tree["group3"]["leaf13"] == 13


async def test_concurrent_sets_from_several_engines_all_survive(store, box):
    # Engines sharing a store stand for daemons in several processes: only versions protect them.
    engines = [ConfigEngine(store, box) for _ in range(5)]
    await asyncio.gather(*(engines[i % 5].set("ns", f"leaf{i}", i) for i in range(50)))
    assert await engines[0].get("ns") == {f"leaf{i}": i for i in range(50)}


async def test_a_write_that_keeps_conflicting_gives_up(box, monkeypatch):
    class AlwaysConflicting(MemoryBackend):
        async def put(self, database, table, record, *, if_version=None):
            raise Conflict("someone else wrote", id="store")

    monkeypatch.setattr(engine_module, "_WRITE_ATTEMPTS", 3)
    with pytest.raises(Conflict, match="kept changing") as info:
        await ConfigEngine(AlwaysConflicting(), box).set("ns", "a", 1)
    assert info.value.id == "config"


async def next_change(watch: Watch) -> Change:
    return await asyncio.wait_for(anext(watch), timeout=1)


async def test_watch_sees_its_path_ancestors_and_descendants(config):
    await config.set("ns", "db", {"host": "h1", "port": 1})
    async with config.watch("ns", "db") as watch:
        await config.set("ns", "db.host", "h2")
        await config.set("ns", "", {"db": {"port": 2}})
        await config.set("ns", "db", {"user": "u"})
        await config.set("ns", "dbx", 1)
        await config.set("other", "db.host", "elsewhere")
        await config.delete("ns", "db")
        assert await next_change(watch) == ("db.host", {"host": "h2", "port": 1})
        assert await next_change(watch) == ("", {"host": "h2", "port": 2})
        assert await next_change(watch) == ("db", {"host": "h2", "port": 2, "user": "u"})
        assert await next_change(watch) == ("db", None)


async def test_watch_of_a_leaf_ignores_its_siblings(config):
    async with config.watch("ns", "db.host") as watch:
        await config.set("ns", "db.port", 1)
        await config.set("ns", "db.host", "h")
        assert await next_change(watch) == ("db.host", "h")


async def test_watch_masks_secrets_unless_revealing(config):
    masked, revealed = config.watch("ns", "token"), config.watch("ns", "token", reveal=True)
    await config.set("ns", "token", "hunter2", secret=True)
    assert await next_change(masked) == ("token", "[secret]")
    assert await next_change(revealed) == ("token", "hunter2")
    await masked.aclose()
    await revealed.aclose()


async def test_a_closed_watch_stops_and_is_forgotten(config):
    watch = config.watch("ns")
    reader = asyncio.create_task(anext(watch))
    await asyncio.sleep(0)
    await watch.aclose()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(reader, timeout=1)
    await config.set("ns", "a", 1)
    assert not config._watches
    assert [change async for change in watch] == []


async def test_a_watch_that_falls_behind_is_dropped(store, box):
    config = ConfigEngine(store, box, watch_queue_size=2)
    watch = config.watch("ns", "a")
    for i in range(4):
        await config.set("ns", "a", i)
    assert not config._watches
    assert await next_change(watch) == ("a", 0)
    assert await next_change(watch) == ("a", 1)
    with pytest.raises(TooManyRequests, match="fell 2 changes behind") as info:
        await next_change(watch)
    assert info.value.id == "config"


async def test_a_revealing_watch_fails_on_undecryptable_secrets(store, box):
    await ConfigEngine(store, SecretBox.generate()).set("ns", "token", "x", secret=True)
    config = ConfigEngine(store, box)
    async with config.watch("ns", "", reveal=True) as watch:
        await config.set("ns", "other", 1)
        with pytest.raises(BadRequest, match="could not be decrypted"):
            await next_change(watch)
