"""The NATS KV registry engine against a real NATS server with JetStream.

Not skipped when the server is missing: CI starts NATS, and a missing server
fails every test here with how to provide one. ``MICRO_TEST_NATS`` names the
server (default ``nats://127.0.0.1:4222``). Each test uses a bucket of its own,
deleted afterwards.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import nats
import nats.js.errors
import pytest

from micro.errors import BadRequest, ServiceUnavailable, SetupError
from micro.proto import registry_pb2
from micro.testing.registry import RegistryContract, node_ids, svc
from micro_daemon.engines import open_engine
from micro_daemon.registry.backend import RegistryBackend, Watcher
from micro_daemon.registry.nats_kv import NatsKVRegistry, _token, _untoken, bucket_key, open_nats_kv
from tests._engines import PrivateNats

TTL = 60.0
TIMEOUT = 5.0


@pytest.fixture
async def bucket(nats_url: str) -> AsyncIterator[str]:
    """A fresh bucket name; the bucket is deleted after the test."""
    name = f"micro_test_{uuid.uuid4().hex[:12]}"
    yield name
    connection = await nats.connect(nats_url)
    try:
        await connection.jetstream().delete_key_value(name)
    except nats.js.errors.NotFoundError:
        pass
    finally:
        await connection.close()


@pytest.fixture
async def opened(nats_url: str, bucket: str) -> AsyncIterator[Callable[..., Awaitable[NatsKVRegistry]]]:
    """Open registries on ``bucket``, each on a connection of its own; all closed after the test."""
    registries: list[NatsKVRegistry] = []

    async def open_registry(**options: object) -> NatsKVRegistry:
        registry = await NatsKVRegistry.open(nats_url, bucket=bucket, **options)  # type: ignore[arg-type]
        registries.append(registry)
        return registry

    yield open_registry
    for registry in registries:
        await registry.close()


class TestNatsKVRegistry(RegistryContract):
    short_ttl = 0.5  # several round trips to NATS on a busy machine

    @pytest.fixture
    async def registry(self, opened: Callable[..., Awaitable[NatsKVRegistry]]) -> RegistryBackend:
        return await opened(watch_buffer=self.watch_buffer)


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not await check():
            await asyncio.sleep(0.01)


async def event(watcher: Watcher) -> tuple[str, str, list[str]]:
    result = await asyncio.wait_for(anext(watcher), TIMEOUT)
    return result.action, result.service.version, node_ids(result.service)


async def test_daemons_sharing_a_bucket_see_each_other(opened) -> None:
    first, second = await opened(), await opened()
    async with second.watch("micro") as watcher:
        await first.register("micro", svc("helloworld", "v1", "a"), TTL)
        assert await event(watcher) == ("create", "v1", ["a"])
        assert await second.get_service("micro", "helloworld") == [svc("helloworld", "v1", "a")]
        await second.register("micro", svc("helloworld", "v1", "b"), TTL)
        assert await event(watcher) == ("update", "v1", ["a", "b"])
        await eventually(lambda: _node_count(first, 2))
        await first.deregister("micro", svc("helloworld", "v1", "a", "b"))
        assert await event(watcher) == ("delete", "v1", ["a", "b"])
        assert await second.list_services("*") == []


async def test_a_daemon_started_later_reads_what_is_there_without_events(opened) -> None:
    first = await opened()
    await first.register("micro", svc("helloworld", "v1", "a"), TTL)
    await first.register("team", svc("billing", "v2", "b"), 0)
    await first.deregister("micro", svc("helloworld", "v1", "a"))
    await first.register("micro", svc("helloworld", "v3", "c"), TTL)
    later = await opened()
    assert await later.list_services("*") == await first.list_services("*")
    async with later.watch("*") as watcher:
        await first.register("micro", svc("sentinel", "v1", "s"), TTL)
        assert await event(watcher) == ("create", "v1", ["s"])


async def test_concurrent_registers_of_one_version_all_land(opened) -> None:
    first, second = await opened(), await opened()
    await asyncio.gather(
        *(
            registry.register("micro", svc("helloworld", "v1", f"{index}-{i}"), TTL)
            for index, registry in enumerate((first, second))
            for i in range(10)
        )
    )
    await eventually(lambda: _node_count(first, 20))
    await eventually(lambda: _node_count(second, 20))


async def _node_count(registry: NatsKVRegistry, count: int) -> bool:
    [found] = await registry.get_service("micro", "helloworld")
    return len(found.nodes) == count


async def test_daemons_racing_to_expire_drop_each_node_once(opened) -> None:
    now = [1_000_000.0]
    first, second = await opened(clock=lambda: now[0]), await opened(clock=lambda: now[0])
    await first.register("micro", svc("helloworld", "v1", "a", "b"), 10)
    await first.register("micro", svc("helloworld", "v1", "c"), 100)
    await first.register("micro", svc("helloworld", "v2", "d"), 10)
    await eventually(lambda: _version_count(second, 2))
    async with first.watch("micro") as watcher:
        now[0] += 20
        counts = await asyncio.gather(first.expire(), second.expire(), first.expire())
        assert sum(counts) == 3
        seen = sorted([await event(watcher), await event(watcher)])
        assert seen == [("delete", "v2", ["d"]), ("update", "v1", ["c"])]
        await first.register("micro", svc("sentinel", "v1", "s"), 10)
        assert await event(watcher) == ("create", "v1", ["s"])
    assert [node_ids(s) for s in await second.get_service("micro", "helloworld")] == [["c"]]


async def test_racing_deregisters_of_the_last_node(opened) -> None:
    first, second = await opened(), await opened()
    await first.register("micro", svc("helloworld", "v1", "a", "b"), TTL)
    await eventually(lambda: _version_count(second, 1))
    async with first.watch("micro") as watcher:
        await asyncio.gather(
            first.deregister("micro", svc("helloworld", "v1", "a", "b")),
            second.deregister("micro", svc("helloworld", "v1", "a")),
            second.deregister("micro", svc("helloworld", "v1", "b")),
        )
        while (await event(watcher))[0] != "delete":
            pass
        await first.register("micro", svc("sentinel", "v1", "s"), TTL)
        assert await event(watcher) == ("create", "v1", ["s"])
    await eventually(lambda: _version_count(second, 1))
    assert [s.name for s in await second.list_services("*")] == ["sentinel"]


async def test_a_stale_write_is_a_conflict(opened) -> None:
    registry = await opened()
    await registry.register("micro", svc("helloworld", "v1", "a"), TTL)
    key = bucket_key("micro", "helloworld", "v1")
    with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
        await registry._store(key, None, 10_000)
    with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
        await registry._store(key, None, 0)


async def _version_count(registry: NatsKVRegistry, count: int) -> bool:
    return len(await registry.list_services("*")) == count


async def test_keys_are_escaped_tokens_and_values_carry_deadlines(opened, nats_url: str, bucket: str) -> None:
    now = [5_000.0]
    registry = await opened(clock=lambda: now[0])
    await registry.register("team.a", svc("go.micro", "1.0+ü", "n1"), 30)
    await registry.register("team.a", svc("go.micro", "1.0+ü", "n2"), 0)
    connection = await nats.connect(nats_url)
    try:
        kv = await connection.jetstream().key_value(bucket)
        assert await kv.keys() == ["team=2Ea.go=2Emicro.1=2E0=2B=C3=BC"]
        value = (await kv.get("team=2Ea.go=2Emicro.1=2E0=2B=C3=BC")).value or b""
        header, _, body = value.partition(b"\n")
        assert header == b'{"expires":[5030.0,0.0]}'
        assert registry_pb2.Service.FromString(body) == svc("go.micro", "1.0+ü", "n1", "n2")
    finally:
        await connection.close()


@pytest.mark.parametrize("text", ["", "=", "a", "a.b", "A-Z_09", "ü", "a b", "=3D", "1.0.0+build/7", "日本"])
def test_key_tokens_round_trip(text: str) -> None:
    token = _token(text)
    assert token and "." not in token
    assert _untoken(token) == text


def test_bucket_keys_are_distinct_where_parts_differ() -> None:
    keys = {bucket_key("a.b", "c", "d"), bucket_key("a", "b.c", "d"), bucket_key("a", "b", "c.d")}
    assert len(keys) == 3
    assert bucket_key("micro", "helloworld", "") == "micro.helloworld.="


async def test_foreign_keys_and_values_are_ignored(opened, nats_url: str, bucket: str) -> None:
    registry = await opened()
    connection = await nats.connect(nats_url)
    try:
        kv = await connection.jetstream().key_value(bucket)
        await kv.put("junk", b"x")
        await kv.put("micro.helloworld.v1", b"not a registry value")
        await kv.put("micro.helloworld.=ZZ", b"{}\n")
        await kv.put("micro.helloworld.v2", b'{"expires":[1.0,2.0]}\n')
        async with registry.watch("*") as watcher:
            await registry.register("micro", svc("sentinel", "v1", "s"), TTL)
            assert await event(watcher) == ("create", "v1", ["s"])
        assert [s.name for s in await registry.list_services("*")] == ["sentinel"]
        await registry.register("micro", svc("helloworld", "v1", "a"), TTL)
        assert await registry.get_service("micro", "helloworld") == [svc("helloworld", "v1", "a")]
    finally:
        await connection.close()


async def test_overlong_keys_are_bad_requests(opened) -> None:
    registry = await opened()
    with pytest.raises(BadRequest, match="too long"):
        await registry.register("micro", svc("helloworld", "ü" * 200, "a"), TTL)


async def test_abandoned_watcher_is_unsubscribed(opened) -> None:
    registry = await opened()
    registry.watch("micro")
    gc.collect()
    assert not registry._hub._subscriptions


async def test_calls_after_close_are_refused(opened) -> None:
    registry = await opened()
    await registry.register("micro", svc("helloworld", "v1", "a"), TTL)
    assert await registry.health() == "ok"
    await registry.close()
    assert await registry.health() == "closed"
    with pytest.raises(ServiceUnavailable):
        await registry.register("micro", svc("helloworld", "v1", "a"), TTL)
    await registry.close()


async def test_a_lost_connection_ends_watchers_and_refuses_calls(opened) -> None:
    registry = await opened()
    watcher = registry.watch("micro")
    await registry._connection.close()
    assert [r async for r in watcher] == []
    assert await registry.health() == f"unavailable: connection to NATS at {registry._address} closed"
    with pytest.raises(ServiceUnavailable, match="closed"):
        await registry.register("micro", svc("helloworld", "v1", "a"), TTL)
    with pytest.raises(ServiceUnavailable, match="closed"):
        await registry.list_services("micro")


async def test_a_restarted_nats_refuses_writes_at_once_then_serves_them_again(tmp_path: Path) -> None:
    server = PrivateNats(tmp_path)
    server.start()
    try:
        registry = await NatsKVRegistry.open(server.url, bucket="micro_registry")
        watcher = registry.watch("micro")
        await registry.register("micro", svc("helloworld", "v1", "a"), TTL)
        assert await event(watcher) == ("create", "v1", ["a"])
        await asyncio.to_thread(server.stop)

        async def disconnected() -> bool:
            return not registry._connection.is_connected

        await eventually(disconnected)
        assert await registry.health() == f"not connected to NATS at {server.url} (reconnecting)"

        began = asyncio.get_running_loop().time()
        with pytest.raises(ServiceUnavailable, match="registry engine: not connected to NATS at nats://"):
            await registry.register("micro", svc("helloworld", "v1", "b"), TTL)
        assert asyncio.get_running_loop().time() - began < 1
        assert node_ids((await registry.get_service("micro", "helloworld"))[0]) == ["a"]  # the copy

        await asyncio.to_thread(server.start)
        # Following the bucket again at once: a write sees itself come back (not after 10 s of
        # missed heartbeats), and the watchers go on.
        async with asyncio.timeout(TIMEOUT):
            while True:
                try:
                    await registry.register("micro", svc("helloworld", "v1", "c"), TTL)
                    break
                except ServiceUnavailable:
                    await asyncio.sleep(0.1)
        assert await event(watcher) == ("update", "v1", ["a", "c"])
        assert await registry.health() == "ok"
        await registry.close()
    finally:
        server.close()


async def test_unreachable_nats_is_a_setup_error_without_credentials() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(SetupError) as info:
        await NatsKVRegistry.open(f"nats://micro:hunter2@127.0.0.1:{port}")
    assert f"nats://127.0.0.1:{port}" in info.value.detail
    assert "hunter2" not in str(info.value) and "micro:" not in info.value.detail
    assert info.value.id == "registry"


async def test_invalid_bucket_is_a_setup_error(nats_url: str) -> None:
    with pytest.raises(SetupError, match="bucket"):
        await NatsKVRegistry.open(nats_url, bucket="no.dots")


async def test_the_engine_factory_names_the_bucket_by_prefix(nats_url: str, tmp_path: Path) -> None:
    prefix = f"t_{uuid.uuid4().hex[:8]}"
    registry = await open_engine("registry", f"{nats_url}?prefix={prefix}&replicas=1", "platform", tmp_path)
    try:
        assert isinstance(registry, NatsKVRegistry)
        await registry.register("micro", svc("helloworld", "v1", "a"), TTL)
        connection = await nats.connect(nats_url)
        try:
            kv = await connection.jetstream().key_value(f"{prefix}_registry")
            assert await kv.keys() == ["micro.helloworld.v1"]
            await connection.jetstream().delete_key_value(f"{prefix}_registry")
        finally:
            await connection.close()
    finally:
        await registry.close()


@pytest.mark.parametrize("query", ["?replicas=0", "?replicas=x", "?prefix=a.b", "?buffer=3"])
async def test_the_engine_factory_refuses_bad_options(query: str, tmp_path: Path) -> None:
    with pytest.raises(SetupError) as info:
        await open_nats_kv(f"nats://user:hunter2@127.0.0.1:4222{query}", tmp_path)
    assert "hunter2" not in info.value.detail
    assert info.value.id == "registry"
