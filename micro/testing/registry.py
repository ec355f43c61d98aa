"""The conformance suite of registry backends.

Subclass it in a test module and provide an empty, open backend::

    class TestMyRegistry(RegistryContract):
        watch_buffer = 8

        @pytest.fixture
        async def registry(self) -> AsyncIterator[RegistryBackend]:
            backend = await MyRegistry.open(..., watch_buffer=self.watch_buffer)
            yield backend
            await backend.close()

The suite uses the public interface only and assumes nothing about storage or
process: a remote engine (NATS KV) passes it too. Watch events may arrive a
little after the call that caused them returns, so the suite waits for them
(up to ``TIMEOUT`` seconds) and proves that nothing else came by checking what
comes next. TTL tests use lifetimes of ``short_ttl`` seconds.
Run it with pytest-asyncio (``asyncio_mode = "auto"``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar

import pytest

from micro.errors import BadRequest, NotFound, TooManyRequests
from micro.proto import registry_pb2

if TYPE_CHECKING:
    from micro_daemon.registry.backend import RegistryBackend, Watcher

__all__ = ["RegistryContract", "node_ids", "svc"]

TTL = 60.0
TIMEOUT = 5.0


def svc(
    name: str = "helloworld",
    version: str = "latest",
    *nodes: str,
    metadata: dict[str, str] | None = None,
) -> registry_pb2.Service:
    """A service with one endpoint and a schema, whose nodes are ``<id>`` listening on ``<id>:8080``."""
    return registry_pb2.Service(
        name=name,
        version=version,
        metadata=metadata or {},
        endpoints=[registry_pb2.Endpoint(name="Helloworld.Call")],
        nodes=[registry_pb2.Node(id=node, address=f"{node}:8080") for node in nodes],
        schema=b"schema",
    )


def node_ids(service: registry_pb2.Service) -> list[str]:
    """The ids of ``service``'s nodes, in order."""
    return [node.id for node in service.nodes]


async def _next(watcher: Watcher) -> registry_pb2.Result:
    result: registry_pb2.Result = await asyncio.wait_for(anext(watcher), TIMEOUT)
    return result


async def _event(watcher: Watcher) -> tuple[str, str, str, list[str]]:
    result = await _next(watcher)
    return result.action, result.service.name, result.service.version, node_ids(result.service)


_BadCall = Callable[["RegistryBackend"], Awaitable[Any]]
_BAD_CALLS: dict[str, _BadCall] = {
    "register-no-nodes": lambda r: r.register("micro", svc("helloworld", "v1"), TTL),
    "deregister-no-nodes": lambda r: r.deregister("micro", svc("helloworld", "v1")),
    "deregister-node-without-id": lambda r: r.deregister(
        "micro", registry_pb2.Service(name="helloworld", nodes=[{"address": "x:1"}])
    ),
    "version-whitespace": lambda r: r.register("micro", svc("helloworld", "v 1", "a"), TTL),
    "negative-ttl": lambda r: r.register("micro", svc("helloworld", "v1", "a"), -1),
    "nan-ttl": lambda r: r.register("micro", svc("helloworld", "v1", "a"), float("nan")),
    "infinite-ttl": lambda r: r.register("micro", svc("helloworld", "v1", "a"), float("inf")),
    "register-wildcard": lambda r: r.register("*", svc("helloworld", "v1", "a"), TTL),
    "deregister-wildcard": lambda r: r.deregister("*", svc("helloworld", "v1", "a")),
    "empty-domain": lambda r: r.register("", svc("helloworld", "v1", "a"), TTL),
    "list-empty-domain": lambda r: r.list_services(""),
    "get-bad-domain": lambda r: r.get_service("a b", "helloworld"),
}


class RegistryContract:
    """The behaviour every ``RegistryBackend`` must show.

    The subclass provides an async ``registry`` fixture yielding an open, empty
    backend whose watchers may lag ``watch_buffer`` events before being dropped.
    ``short_ttl`` is a TTL in seconds that lapses during a test: it must outlast
    a few calls, so a remote engine may need a longer one.
    """

    watch_buffer: ClassVar[int] = 8
    short_ttl: ClassVar[float] = 0.1

    # -- register, read, deregister -----------------------------------------

    async def test_register_then_get(self, registry: RegistryBackend) -> None:
        await registry.register("micro", svc("helloworld", "v1", "a", metadata={"k": "v"}), TTL)
        [found] = await registry.get_service("micro", "helloworld")
        assert found == svc("helloworld", "v1", "a", metadata={"k": "v"})

    async def test_get_unknown_is_not_found(self, registry: RegistryBackend) -> None:
        with pytest.raises(NotFound) as info:
            await registry.get_service("micro", "nothing")
        assert info.value.id == "registry"

    async def test_register_merges_nodes_and_replaces_the_rest(self, registry: RegistryBackend) -> None:
        await registry.register("micro", svc("helloworld", "v1", "a", metadata={"old": "1"}), TTL)
        refreshed = svc("helloworld", "v1", "b", metadata={"new": "2"})
        refreshed.ClearField("endpoints")
        refreshed.ClearField("schema")
        await registry.register("micro", refreshed, TTL)
        [found] = await registry.get_service("micro", "helloworld")
        assert node_ids(found) == ["a", "b"]
        assert dict(found.metadata) == {"new": "2"}
        assert not found.endpoints and not found.schema

    async def test_register_replaces_a_node_with_the_same_id(self, registry: RegistryBackend) -> None:
        await registry.register("micro", svc("helloworld", "v1", "a", "b"), TTL)
        moved = svc("helloworld", "v1")
        moved.nodes.add(id="a", address="elsewhere:1", metadata={"x": "y"})
        await registry.register("micro", moved, TTL)
        [found] = await registry.get_service("micro", "helloworld")
        assert list(found.nodes) == [
            registry_pb2.Node(id="a", address="elsewhere:1", metadata={"x": "y"}),
            registry_pb2.Node(id="b", address="b:8080"),
        ]

    async def test_versions_are_separate_and_sorted(self, registry: RegistryBackend) -> None:
        await registry.register("micro", svc("helloworld", "v2", "b"), TTL)
        await registry.register("micro", svc("helloworld", "v1", "a"), TTL)
        await registry.register("micro", svc("helloworld", "", "c"), TTL)
        found = await registry.get_service("micro", "helloworld")
        assert [(s.version, node_ids(s)) for s in found] == [("", ["c"]), ("v1", ["a"]), ("v2", ["b"])]

    async def test_unusual_names_versions_and_node_ids(self, registry: RegistryBackend) -> None:
        service = svc("go.micro.srv-x_1", "1.0.0+ünï/=%", "node.1:ü/=")
        await registry.register("team.a-b", service, TTL)
        assert await registry.get_service("team.a-b", "go.micro.srv-x_1") == [service]
        with pytest.raises(NotFound):
            await registry.get_service("team", "go.micro.srv-x_1")
        await registry.deregister("team.a-b", service)
        assert await registry.list_services("*") == []

    async def test_stored_and_returned_services_are_copies(self, registry: RegistryBackend) -> None:
        service = svc("helloworld", "v1", "a")
        await registry.register("micro", service, TTL)
        service.nodes.add(id="sneaky", address="x:1")
        [found] = await registry.get_service("micro", "helloworld")
        found.nodes.add(id="sneakier", address="x:2")
        [listed] = await registry.list_services("micro")
        listed.nodes.add(id="sneakiest", address="x:3")
        [again] = await registry.get_service("micro", "helloworld")
        assert node_ids(again) == ["a"]

    async def test_list_is_sorted_and_leaves_out_endpoints_and_schema(
        self, registry: RegistryBackend
    ) -> None:
        await registry.register("micro", svc("zeta", "v1", "z"), TTL)
        await registry.register("micro", svc("alpha", "v2", "b"), TTL)
        await registry.register("micro", svc("alpha", "v1", "a", metadata={"k": "v"}), TTL)
        listed = await registry.list_services("micro")
        assert [(s.name, s.version, node_ids(s)) for s in listed] == [
            ("alpha", "v1", ["a"]),
            ("alpha", "v2", ["b"]),
            ("zeta", "v1", ["z"]),
        ]
        assert dict(listed[0].metadata) == {"k": "v"}
        assert not any(s.endpoints or s.schema for s in listed)

    async def test_list_of_an_empty_domain(self, registry: RegistryBackend) -> None:
        assert await registry.list_services("micro") == []
        assert await registry.list_services("*") == []

    async def test_deregister_some_nodes_keeps_the_version(self, registry: RegistryBackend) -> None:
        await registry.register("micro", svc("helloworld", "v1", "a", "b", metadata={"k": "v"}), TTL)
        await registry.deregister("micro", svc("helloworld", "v1", "a"))
        [found] = await registry.get_service("micro", "helloworld")
        assert found == svc("helloworld", "v1", "b", metadata={"k": "v"})

    async def test_deregister_last_node_removes_the_version(self, registry: RegistryBackend) -> None:
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

    async def test_a_removed_version_can_come_back(self, registry: RegistryBackend) -> None:
        await registry.register("micro", svc("helloworld", "v1", "a", metadata={"k": "old"}), TTL)
        await registry.deregister("micro", svc("helloworld", "v1", "a"))
        await registry.register("micro", svc("helloworld", "v1", "b"), TTL)
        assert await registry.get_service("micro", "helloworld") == [svc("helloworld", "v1", "b")]

    async def test_deregister_unknown_is_ignored(self, registry: RegistryBackend) -> None:
        await registry.deregister("micro", svc("nothing", "v1", "a"))
        await registry.register("micro", svc("helloworld", "v1", "a"), TTL)
        await registry.deregister("micro", svc("helloworld", "v1", "zz"))
        await registry.deregister("micro", svc("helloworld", "v9", "a"))
        await registry.deregister("other", svc("helloworld", "v1", "a"))
        assert await registry.get_service("micro", "helloworld") == [svc("helloworld", "v1", "a")]

    async def test_domains_are_isolated(self, registry: RegistryBackend) -> None:
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

    async def test_wildcard_domain_reads_every_domain(self, registry: RegistryBackend) -> None:
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

    # -- TTL and expiry -----------------------------------------------------

    async def test_expired_nodes_are_invisible_at_once(self, registry: RegistryBackend) -> None:
        await registry.register("micro", svc("helloworld", "v1", "short"), self.short_ttl)
        await registry.register("micro", svc("helloworld", "v1", "long"), TTL)
        await registry.register("micro", svc("other", "v1", "gone"), self.short_ttl)
        await asyncio.sleep(self.short_ttl * 2)
        [found] = await registry.get_service("micro", "helloworld")
        assert node_ids(found) == ["long"]
        with pytest.raises(NotFound):
            await registry.get_service("micro", "other")
        assert [s.name for s in await registry.list_services("micro")] == ["helloworld"]
        assert [node_ids(s) for s in await registry.list_services("*")] == [["long"]]

    async def test_register_refreshes_the_ttl(self, registry: RegistryBackend) -> None:
        await registry.register("micro", svc("helloworld", "v1", "a"), self.short_ttl)
        await asyncio.sleep(self.short_ttl * 0.6)
        await registry.register("micro", svc("helloworld", "v1", "a"), self.short_ttl * 20)
        await asyncio.sleep(self.short_ttl * 0.6)
        assert len(await registry.get_service("micro", "helloworld")) == 1
        assert await registry.expire() == 0

    async def test_zero_ttl_never_expires(self, registry: RegistryBackend) -> None:
        await registry.register("micro", svc("helloworld", "v1", "forever"), 0)
        await registry.register("micro", svc("helloworld", "v1", "brief"), self.short_ttl)
        await asyncio.sleep(self.short_ttl * 2)
        assert await registry.expire() == 1
        [found] = await registry.get_service("micro", "helloworld")
        assert node_ids(found) == ["forever"]

    async def test_expire_counts_dropped_nodes(self, registry: RegistryBackend) -> None:
        await registry.register("micro", svc("helloworld", "v1", "a", "b"), self.short_ttl)
        await registry.register("micro", svc("helloworld", "v1", "c"), TTL)
        await registry.register("other", svc("other", "v1", "d"), self.short_ttl)
        assert await registry.expire() == 0
        await asyncio.sleep(self.short_ttl * 2)
        assert await registry.expire() == 3
        assert await registry.expire() == 0
        assert [s.name for s in await registry.list_services("*")] == ["helloworld"]

    # -- validation ---------------------------------------------------------

    @pytest.mark.parametrize("name", ["", " helloworld", "hello world", "-leading", "new\nline", "a/b", "hé"])
    async def test_invalid_names_are_bad_requests(self, registry: RegistryBackend, name: str) -> None:
        with pytest.raises(BadRequest) as info:
            await registry.register("micro", svc(name, "v1", "a"), TTL)
        assert info.value.id == "registry"
        with pytest.raises(BadRequest):
            await registry.get_service("micro", name)
        with pytest.raises(BadRequest):
            await registry.deregister("micro", svc(name, "v1", "a"))

    async def test_valid_names(self, registry: RegistryBackend) -> None:
        for name in ("a", "go.micro.srv-x_1", "9lives", "UPPER"):
            await registry.register("micro", svc(name, "v1", "a"), TTL)
        assert len(await registry.list_services("micro")) == 4

    @pytest.mark.parametrize(
        "node",
        [registry_pb2.Node(address="x:1"), registry_pb2.Node(id="a")],
        ids=["no-id", "no-address"],
    )
    async def test_nodes_need_id_and_address(
        self, registry: RegistryBackend, node: registry_pb2.Node
    ) -> None:
        with pytest.raises(BadRequest):
            await registry.register("micro", registry_pb2.Service(name="helloworld", nodes=[node]), TTL)
        assert await registry.list_services("*") == []

    @pytest.mark.parametrize("call", list(_BAD_CALLS.values()), ids=list(_BAD_CALLS))
    async def test_bad_requests(self, registry: RegistryBackend, call: _BadCall) -> None:
        with pytest.raises(BadRequest) as info:
            await call(registry)
        assert info.value.id == "registry"

    async def test_watch_validates(self, registry: RegistryBackend) -> None:
        with pytest.raises(BadRequest):
            registry.watch("")
        with pytest.raises(BadRequest):
            registry.watch("micro", "bad name")

    # -- watch --------------------------------------------------------------

    async def test_watch_create_update_delete(self, registry: RegistryBackend) -> None:
        async with registry.watch("micro") as watcher:
            await registry.register("micro", svc("helloworld", "v1", "a"), TTL)
            await registry.register("micro", svc("helloworld", "v1", "b"), TTL)
            await registry.deregister("micro", svc("helloworld", "v1", "a"))
            await registry.deregister("micro", svc("helloworld", "v1", "b"))
            await registry.register("micro", svc("sentinel", "v1", "s"), TTL)
            assert await _event(watcher) == ("create", "helloworld", "v1", ["a"])
            assert await _event(watcher) == ("update", "helloworld", "v1", ["a", "b"])
            assert await _event(watcher) == ("update", "helloworld", "v1", ["b"])
            assert await _event(watcher) == ("delete", "helloworld", "v1", ["b"])
            assert await _event(watcher) == ("create", "sentinel", "v1", ["s"])

    async def test_watch_events_carry_the_full_service_and_a_timestamp(
        self, registry: RegistryBackend
    ) -> None:
        async with registry.watch("micro") as watcher:
            await registry.register("micro", svc("helloworld", "v1", "a", metadata={"k": "v"}), TTL)
            result = await _next(watcher)
        assert result.service == svc("helloworld", "v1", "a", metadata={"k": "v"})
        assert result.timestamp > 1_600_000_000

    async def test_delete_event_carries_the_last_state(self, registry: RegistryBackend) -> None:
        await registry.register("micro", svc("helloworld", "v1", "a", "b", metadata={"k": "v"}), TTL)
        async with registry.watch("micro") as watcher:
            await registry.deregister("micro", svc("helloworld", "v1", "a", "b"))
            result = await _next(watcher)
        assert result.action == "delete"
        assert result.service == svc("helloworld", "v1", "a", "b", metadata={"k": "v"})

    async def test_heartbeat_emits_nothing_but_a_change_does(self, registry: RegistryBackend) -> None:
        await registry.register("micro", svc("helloworld", "v1", "a"), TTL)
        async with registry.watch("micro") as watcher:
            await registry.register("micro", svc("helloworld", "v1", "a"), TTL)
            await registry.register("micro", svc("helloworld", "v1", "a"), TTL * 2)
            await registry.register("micro", svc("helloworld", "v1", "a", metadata={"k": "v"}), TTL)
            result = await _next(watcher)
        assert result.action == "update"
        assert result.service == svc("helloworld", "v1", "a", metadata={"k": "v"})

    async def test_watch_filters_by_name_and_domain(self, registry: RegistryBackend) -> None:
        async with registry.watch("micro", "helloworld") as named, registry.watch("*") as everything:
            await registry.register("micro", svc("billing", "v1", "a"), TTL)
            await registry.register("team", svc("helloworld", "v1", "b"), TTL)
            await registry.register("micro", svc("helloworld", "v1", "c"), TTL)
            await registry.deregister("micro", svc("helloworld", "v1", "c"))
            assert await _event(named) == ("create", "helloworld", "v1", ["c"])
            assert await _event(named) == ("delete", "helloworld", "v1", ["c"])
            seen = [(await _next(everything)).service.name for _ in range(4)]
            assert seen == ["billing", "helloworld", "helloworld", "helloworld"]

    async def test_watch_sees_expiry(self, registry: RegistryBackend) -> None:
        await registry.register("micro", svc("helloworld", "v1", "a"), self.short_ttl)
        await registry.register("micro", svc("helloworld", "v1", "b"), TTL)
        await registry.register("micro", svc("helloworld", "v2", "c"), self.short_ttl)
        async with registry.watch("micro") as watcher:
            await asyncio.sleep(self.short_ttl * 2)
            assert await registry.expire() == 2
            events = sorted([await _event(watcher), await _event(watcher)])
            assert events == [("delete", "helloworld", "v2", ["c"]), ("update", "helloworld", "v1", ["b"])]
            await registry.register("micro", svc("sentinel", "v1", "s"), TTL)
            assert await _event(watcher) == ("create", "sentinel", "v1", ["s"])

    async def test_register_after_lapse_announces_the_expiry_first(self, registry: RegistryBackend) -> None:
        await registry.register("micro", svc("helloworld", "v1", "a"), self.short_ttl)
        async with registry.watch("micro") as watcher:
            await asyncio.sleep(self.short_ttl * 2)
            await registry.register("micro", svc("helloworld", "v1", "b"), TTL)
            assert await _event(watcher) == ("delete", "helloworld", "v1", ["a"])
            assert await _event(watcher) == ("create", "helloworld", "v1", ["b"])
        assert await registry.expire() == 0

    async def test_watcher_waits_for_events(self, registry: RegistryBackend) -> None:
        async with registry.watch("micro") as watcher:
            waiting = asyncio.ensure_future(anext(watcher))
            await asyncio.sleep(0)
            assert not waiting.done()
            await registry.register("micro", svc("helloworld", "v1", "a"), TTL)
            assert (await asyncio.wait_for(waiting, TIMEOUT)).action == "create"

    async def test_slow_watcher_is_dropped_with_an_error(self, registry: RegistryBackend) -> None:
        slow = registry.watch("micro")
        for i in range(self.watch_buffer + 1):
            await registry.register("micro", svc("helloworld", f"v{i}", "a"), TTL)
        with pytest.raises(TooManyRequests) as info:
            while True:
                await _next(slow)
        assert info.value.id == "registry"
        with pytest.raises(StopAsyncIteration):
            await _next(slow)
        await slow.aclose()

    async def test_blocked_slow_watcher_is_dropped_too(self, registry: RegistryBackend) -> None:
        slow = registry.watch("micro")
        waiting = asyncio.ensure_future(anext(slow))
        await asyncio.sleep(0)
        for i in range(self.watch_buffer + 2):
            await registry.register("micro", svc("helloworld", f"v{i}", "a"), TTL)
        received = 0
        with pytest.raises(TooManyRequests):
            await asyncio.wait_for(waiting, TIMEOUT)
            received += 1
            while True:
                await _next(slow)
                received += 1
        assert received <= self.watch_buffer + 1
        await slow.aclose()

    async def test_aclose_stops_buffering(self, registry: RegistryBackend) -> None:
        watcher = registry.watch("micro")
        await watcher.aclose()
        await watcher.aclose()
        await registry.register("micro", svc("helloworld", "v1", "a"), TTL)
        assert [r async for r in watcher] == []

    async def test_close_ends_watchers(self, registry: RegistryBackend) -> None:
        watcher = registry.watch("micro")
        waiting = asyncio.ensure_future(anext(watcher))
        await asyncio.sleep(0)
        await registry.close()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(waiting, TIMEOUT)
        late = registry.watch("micro")
        assert [r async for r in late] == []
