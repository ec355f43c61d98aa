from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator

import pytest

from micro.errors import BadRequest, NotFound, TooManyRequests
from micro.proto import registry_pb2
from micro.testing.registry import node_ids, svc
from micro_daemon.registry.backend import RegistryBackend, Watcher
from micro_daemon.registry.memory import MemoryRegistry

TTL = 60.0
SHORT = 0.05


@pytest.fixture
async def registry() -> AsyncIterator[MemoryRegistry]:
    backend = MemoryRegistry(watch_buffer=8)
    yield backend
    await backend.close()


async def next_event(watcher: Watcher) -> tuple[str, str, list[str]]:
    result = await asyncio.wait_for(anext(watcher), 1)
    return result.action, result.service.version, node_ids(result.service)


def pending(watcher: Watcher) -> bool:
    """Whether an event is buffered (the watcher would not block)."""
    return not watcher._subscription.queue.empty()  # type: ignore[attr-defined]


def test_is_a_backend() -> None:
    assert issubclass(MemoryRegistry, RegistryBackend)


async def test_register_then_get(registry: MemoryRegistry) -> None:
    await registry.register("micro", svc("helloworld", "v1", "a", metadata={"k": "v"}), TTL)
    [found] = await registry.get_service("micro", "helloworld")
    assert found == svc("helloworld", "v1", "a", metadata={"k": "v"})


async def test_get_unknown_is_not_found(registry: MemoryRegistry) -> None:
    with pytest.raises(NotFound) as info:
        await registry.get_service("micro", "nothing")
    assert info.value.id == "registry"


async def test_register_merges_nodes_and_replaces_the_rest(registry: MemoryRegistry) -> None:
    await registry.register("micro", svc("helloworld", "v1", "a", metadata={"old": "1"}), TTL)
    refreshed = svc("helloworld", "v1", "b", metadata={"new": "2"})
    refreshed.ClearField("endpoints")
    await registry.register("micro", refreshed, TTL)
    [found] = await registry.get_service("micro", "helloworld")
    assert node_ids(found) == ["a", "b"]
    assert dict(found.metadata) == {"new": "2"}
    assert not found.endpoints


async def test_register_replaces_a_node_with_the_same_id(registry: MemoryRegistry) -> None:
    await registry.register("micro", svc("helloworld", "v1", "a"), TTL)
    moved = svc("helloworld", "v1")
    moved.nodes.add(id="a", address="elsewhere:1", metadata={"x": "y"})
    await registry.register("micro", moved, TTL)
    [found] = await registry.get_service("micro", "helloworld")
    assert list(found.nodes) == [registry_pb2.Node(id="a", address="elsewhere:1", metadata={"x": "y"})]


async def test_versions_are_separate_and_sorted(registry: MemoryRegistry) -> None:
    await registry.register("micro", svc("helloworld", "v2", "b"), TTL)
    await registry.register("micro", svc("helloworld", "v1", "a"), TTL)
    found = await registry.get_service("micro", "helloworld")
    assert [(s.version, node_ids(s)) for s in found] == [("v1", ["a"]), ("v2", ["b"])]


async def test_stored_and_returned_services_are_copies(registry: MemoryRegistry) -> None:
    service = svc("helloworld", "v1", "a")
    await registry.register("micro", service, TTL)
    service.nodes.add(id="sneaky", address="x:1")
    [found] = await registry.get_service("micro", "helloworld")
    found.nodes.add(id="sneakier", address="x:2")
    [again] = await registry.get_service("micro", "helloworld")
    assert node_ids(again) == ["a"]


async def test_list_is_sorted_and_leaves_out_endpoints_and_schema(registry: MemoryRegistry) -> None:
    await registry.register("micro", svc("zeta", "v1", "z"), TTL)
    await registry.register("micro", svc("alpha", "v2", "b"), TTL)
    await registry.register("micro", svc("alpha", "v1", "a"), TTL)
    listed = await registry.list_services("micro")
    assert [(s.name, s.version, node_ids(s)) for s in listed] == [
        ("alpha", "v1", ["a"]),
        ("alpha", "v2", ["b"]),
        ("zeta", "v1", ["z"]),
    ]
    assert not any(s.endpoints or s.schema for s in listed)


async def test_list_of_an_empty_domain(registry: MemoryRegistry) -> None:
    assert await registry.list_services("micro") == []


async def test_deregister_some_nodes_keeps_the_version(registry: MemoryRegistry) -> None:
    await registry.register("micro", svc("helloworld", "v1", "a", "b"), TTL)
    await registry.deregister("micro", svc("helloworld", "v1", "a"))
    [found] = await registry.get_service("micro", "helloworld")
    assert node_ids(found) == ["b"]


async def test_deregister_last_node_removes_the_version(registry: MemoryRegistry) -> None:
    await registry.register("micro", svc("helloworld", "v1", "a"), TTL)
    await registry.register("micro", svc("helloworld", "v2", "b"), TTL)
    await registry.deregister(
        "micro", registry_pb2.Service(name="helloworld", version="v1", nodes=[{"id": "a"}])
    )
    assert [s.version for s in await registry.get_service("micro", "helloworld")] == ["v2"]
    await registry.deregister("micro", svc("helloworld", "v2", "b"))
    with pytest.raises(NotFound):
        await registry.get_service("micro", "helloworld")
    assert await registry.list_services("micro") == []


async def test_deregister_unknown_is_ignored(registry: MemoryRegistry) -> None:
    await registry.deregister("micro", svc("nothing", "v1", "a"))
    await registry.register("micro", svc("helloworld", "v1", "a"), TTL)
    await registry.deregister("micro", svc("helloworld", "v1", "zz"))
    await registry.deregister("micro", svc("helloworld", "v9", "a"))
    assert len(await registry.get_service("micro", "helloworld")) == 1


async def test_expired_nodes_are_invisible_at_once(registry: MemoryRegistry) -> None:
    await registry.register("micro", svc("helloworld", "v1", "short"), SHORT)
    await registry.register("micro", svc("helloworld", "v1", "long"), TTL)
    await registry.register("micro", svc("other", "v1", "gone"), SHORT)
    await asyncio.sleep(SHORT * 2)
    [found] = await registry.get_service("micro", "helloworld")
    assert node_ids(found) == ["long"]
    with pytest.raises(NotFound):
        await registry.get_service("micro", "other")
    assert [s.name for s in await registry.list_services("micro")] == ["helloworld"]


async def test_register_refreshes_the_ttl(registry: MemoryRegistry) -> None:
    await registry.register("micro", svc("helloworld", "v1", "a"), SHORT)
    await asyncio.sleep(SHORT * 0.6)
    await registry.register("micro", svc("helloworld", "v1", "a"), SHORT * 4)
    await asyncio.sleep(SHORT * 0.6)
    assert len(await registry.get_service("micro", "helloworld")) == 1


async def test_zero_ttl_never_expires() -> None:
    now = [0.0]
    registry = MemoryRegistry(clock=lambda: now[0])
    await registry.register("micro", svc("helloworld", "v1", "a"), 0)
    now[0] = 1e9
    assert await registry.expire() == 0
    assert len(await registry.get_service("micro", "helloworld")) == 1


async def test_expire_counts_dropped_nodes(registry: MemoryRegistry) -> None:
    await registry.register("micro", svc("helloworld", "v1", "a", "b"), SHORT)
    await registry.register("micro", svc("helloworld", "v1", "c"), TTL)
    await registry.register("other", svc("other", "v1", "d"), SHORT)
    assert await registry.expire() == 0
    await asyncio.sleep(SHORT * 2)
    assert await registry.expire() == 3
    assert await registry.expire() == 0
    assert [s.name for s in await registry.list_services("*")] == ["helloworld"]


async def test_domains_are_isolated(registry: MemoryRegistry) -> None:
    await registry.register("micro", svc("helloworld", "v1", "a"), TTL)
    await registry.register("team", svc("helloworld", "v1", "b"), TTL)
    await registry.register("team", svc("billing", "v1", "c"), TTL)
    [mine] = await registry.get_service("micro", "helloworld")
    assert node_ids(mine) == ["a"]
    with pytest.raises(NotFound):
        await registry.get_service("micro", "billing")
    assert [s.name for s in await registry.list_services("micro")] == ["helloworld"]
    await registry.deregister("team", svc("helloworld", "v1", "a"))
    assert node_ids((await registry.get_service("micro", "helloworld"))[0]) == ["a"]


async def test_wildcard_domain_reads_every_domain(registry: MemoryRegistry) -> None:
    await registry.register("micro", svc("helloworld", "v1", "a"), TTL)
    await registry.register("team", svc("helloworld", "v1", "b"), TTL)
    await registry.register("team", svc("billing", "v1", "c"), TTL)
    found = await registry.get_service("*", "helloworld")
    assert sorted(node_ids(s)[0] for s in found) == ["a", "b"]
    listed = await registry.list_services("*")
    assert [(s.name, node_ids(s)) for s in listed] == [
        ("billing", ["c"]),
        ("helloworld", ["a"]),
        ("helloworld", ["b"]),
    ]


@pytest.mark.parametrize("name", ["", " helloworld", "hello world", "-leading", "new\nline", "a/b", "hé"])
async def test_invalid_names_are_bad_requests(registry: MemoryRegistry, name: str) -> None:
    with pytest.raises(BadRequest) as info:
        await registry.register("micro", svc(name, "v1", "a"), TTL)
    assert info.value.id == "registry"
    with pytest.raises(BadRequest):
        await registry.get_service("micro", name)
    with pytest.raises(BadRequest):
        await registry.deregister("micro", svc(name, "v1", "a"))


async def test_valid_names(registry: MemoryRegistry) -> None:
    for name in ("a", "go.micro.srv-x_1", "9lives"):
        await registry.register("micro", svc(name, "v1", "a"), TTL)
    assert len(await registry.list_services("micro")) == 3


@pytest.mark.parametrize(
    "node",
    [registry_pb2.Node(address="x:1"), registry_pb2.Node(id="a")],
    ids=["no-id", "no-address"],
)
async def test_nodes_need_id_and_address(registry: MemoryRegistry, node: registry_pb2.Node) -> None:
    with pytest.raises(BadRequest):
        await registry.register("micro", registry_pb2.Service(name="helloworld", nodes=[node]), TTL)


@pytest.mark.parametrize(
    "call",
    [
        lambda r: r.register("micro", svc("helloworld", "v1"), TTL),
        lambda r: r.deregister("micro", svc("helloworld", "v1")),
        lambda r: r.deregister("micro", registry_pb2.Service(name="helloworld", nodes=[{"address": "x:1"}])),
        lambda r: r.register("micro", svc("helloworld", "v 1", "a"), TTL),
        lambda r: r.register("micro", svc("helloworld", "v1", "a"), -1),
        lambda r: r.register("micro", svc("helloworld", "v1", "a"), float("nan")),
        lambda r: r.register("*", svc("helloworld", "v1", "a"), TTL),
        lambda r: r.deregister("*", svc("helloworld", "v1", "a")),
        lambda r: r.register("", svc("helloworld", "v1", "a"), TTL),
        lambda r: r.list_services(""),
    ],
    ids=[
        "register-no-nodes",
        "deregister-no-nodes",
        "deregister-node-without-id",
        "version-whitespace",
        "negative-ttl",
        "nan-ttl",
        "register-wildcard",
        "deregister-wildcard",
        "empty-domain",
        "list-empty-domain",
    ],
)
async def test_bad_requests(registry: MemoryRegistry, call) -> None:
    with pytest.raises(BadRequest):
        await call(registry)


async def test_watch_create_update_delete(registry: MemoryRegistry) -> None:
    async with registry.watch("micro") as watcher:
        await registry.register("micro", svc("helloworld", "v1", "a"), TTL)
        await registry.register("micro", svc("helloworld", "v1", "b"), TTL)
        await registry.deregister("micro", svc("helloworld", "v1", "a"))
        await registry.deregister("micro", svc("helloworld", "v1", "b"))
        assert await next_event(watcher) == ("create", "v1", ["a"])
        assert await next_event(watcher) == ("update", "v1", ["a", "b"])
        assert await next_event(watcher) == ("update", "v1", ["b"])
        assert await next_event(watcher) == ("delete", "v1", ["b"])
        assert not pending(watcher)


async def test_watch_events_carry_the_full_service_and_a_timestamp(registry: MemoryRegistry) -> None:
    async with registry.watch("micro") as watcher:
        await registry.register("micro", svc("helloworld", "v1", "a", metadata={"k": "v"}), TTL)
        result = await anext(watcher)
    assert result.service == svc("helloworld", "v1", "a", metadata={"k": "v"})
    assert result.timestamp > 1_600_000_000


async def test_heartbeat_emits_nothing_but_a_change_does(registry: MemoryRegistry) -> None:
    await registry.register("micro", svc("helloworld", "v1", "a"), TTL)
    async with registry.watch("micro") as watcher:
        await registry.register("micro", svc("helloworld", "v1", "a"), TTL)
        assert not pending(watcher)
        await registry.register("micro", svc("helloworld", "v1", "a", metadata={"k": "v"}), TTL)
        assert await next_event(watcher) == ("update", "v1", ["a"])


async def test_watch_filters_by_name_and_domain(registry: MemoryRegistry) -> None:
    async with registry.watch("micro", "helloworld") as named, registry.watch("*") as everything:
        await registry.register("micro", svc("billing", "v1", "a"), TTL)
        await registry.register("team", svc("helloworld", "v1", "b"), TTL)
        await registry.register("micro", svc("helloworld", "v1", "c"), TTL)
        assert await next_event(named) == ("create", "v1", ["c"])
        assert not pending(named)
        seen = [(await anext(everything)).service.name for _ in range(3)]
        assert seen == ["billing", "helloworld", "helloworld"]


async def test_watch_sees_expiry(registry: MemoryRegistry) -> None:
    await registry.register("micro", svc("helloworld", "v1", "a"), SHORT)
    await registry.register("micro", svc("helloworld", "v1", "b"), TTL)
    await registry.register("micro", svc("helloworld", "v2", "c"), SHORT)
    async with registry.watch("micro") as watcher:
        await asyncio.sleep(SHORT * 2)
        assert not pending(watcher)
        assert await registry.expire() == 2
        assert await next_event(watcher) == ("update", "v1", ["b"])
        assert await next_event(watcher) == ("delete", "v2", ["c"])


async def test_register_after_lapse_announces_the_expiry_first(registry: MemoryRegistry) -> None:
    await registry.register("micro", svc("helloworld", "v1", "a"), SHORT)
    async with registry.watch("micro") as watcher:
        await asyncio.sleep(SHORT * 2)
        await registry.register("micro", svc("helloworld", "v1", "b"), TTL)
        assert await next_event(watcher) == ("delete", "v1", ["a"])
        assert await next_event(watcher) == ("create", "v1", ["b"])
    assert await registry.expire() == 0


async def test_watcher_waits_for_events(registry: MemoryRegistry) -> None:
    async with registry.watch("micro") as watcher:
        waiting = asyncio.ensure_future(anext(watcher))
        await asyncio.sleep(0)
        assert not waiting.done()
        await registry.register("micro", svc("helloworld", "v1", "a"), TTL)
        assert (await asyncio.wait_for(waiting, 1)).action == "create"


async def test_slow_watcher_is_dropped_with_an_error(registry: MemoryRegistry) -> None:
    slow = registry.watch("micro")
    for i in range(9):  # one more than the buffer of 8
        await registry.register("micro", svc("helloworld", f"v{i}", "a"), TTL)
    with pytest.raises(TooManyRequests) as info:
        await anext(slow)
    assert info.value.id == "registry"
    with pytest.raises(StopAsyncIteration):
        await anext(slow)
    assert not registry._hub._subscriptions


async def test_blocked_slow_watcher_is_dropped_too(registry: MemoryRegistry) -> None:
    slow = registry.watch("micro")
    waiting = asyncio.ensure_future(anext(slow))
    await asyncio.sleep(0)
    for i in range(10):
        await registry.register("micro", svc("helloworld", f"v{i}", "a"), TTL)
    with pytest.raises(TooManyRequests):
        await asyncio.wait_for(waiting, 1)


async def test_close_ends_watchers(registry: MemoryRegistry) -> None:
    watcher = registry.watch("micro")
    waiting = asyncio.ensure_future(anext(watcher))
    await asyncio.sleep(0)
    await registry.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiting, 1)
    late = registry.watch("micro")
    assert [r async for r in late] == []


async def test_aclose_stops_buffering(registry: MemoryRegistry) -> None:
    watcher = registry.watch("micro")
    await watcher.aclose()
    await watcher.aclose()
    await registry.register("micro", svc("helloworld", "v1", "a"), TTL)
    assert [r async for r in watcher] == []
    assert not registry._hub._subscriptions


async def test_abandoned_watcher_is_unsubscribed(registry: MemoryRegistry) -> None:
    registry.watch("micro")
    gc.collect()
    assert not registry._hub._subscriptions


async def test_watch_validates(registry: MemoryRegistry) -> None:
    with pytest.raises(BadRequest):
        registry.watch("")
    with pytest.raises(BadRequest):
        registry.watch("micro", "bad name")
