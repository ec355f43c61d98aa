"""The in-process registry engine.

State lives in dicts keyed ``domain -> name -> version``; nodes carry a
monotonic deadline, and reads skip lapsed nodes so an expired node vanishes at
once, while ``expire`` (or the next write to its version) removes it and tells
the watchers. No method awaits, so each runs atomically on the event loop.
"""

from __future__ import annotations

import asyncio
import enum
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from micro.errors import BadRequest, NotFound, TooManyRequests
from micro.proto import registry_pb2
from micro_daemon.registry.backend import ALL_DOMAINS, RegistryBackend, Watcher

__all__ = ["MemoryRegistry", "WatchHub"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_WHITESPACE = re.compile(r"\s")
_ERROR_ID = "registry"


@dataclass
class _Node:
    node: registry_pb2.Node
    expires_at: float


@dataclass
class _Version:
    """One version of a service: its latest registration (without nodes) and its nodes by id."""

    service: registry_pb2.Service
    nodes: dict[str, _Node] = field(default_factory=dict)

    def lapsed(self, now: float) -> list[str]:
        return [node_id for node_id, node in self.nodes.items() if node.expires_at <= now]

    def live(self, now: float) -> list[registry_pb2.Node]:
        return [node.node for node in self.nodes.values() if node.expires_at > now]

    def snapshot(self, nodes: list[registry_pb2.Node], *, full: bool = True) -> registry_pb2.Service:
        service = registry_pb2.Service()
        service.CopyFrom(self.service)
        if not full:
            service.ClearField("endpoints")
            service.ClearField("schema")
        service.nodes.extend(nodes)
        return service


class MemoryRegistry(RegistryBackend):
    """A registry kept in memory: fast, and gone when the process exits.

    ``watch_buffer`` is how many events a watcher may lag behind before it is
    dropped. ``clock`` is the monotonic time source of the TTLs.
    """

    def __init__(self, *, watch_buffer: int = 1024, clock: Callable[[], float] = time.monotonic) -> None:
        self._domains: dict[str, dict[str, dict[str, _Version]]] = {}
        self._hub = WatchHub(watch_buffer)
        self._clock = clock

    async def register(self, domain: str, service: registry_pb2.Service, ttl: float) -> None:
        _check_domain(domain, writable=True)
        _check_service(service)
        _check_ttl(ttl)
        if not service.nodes:
            raise BadRequest(f"service {service.name} has no nodes to register", id=_ERROR_ID)
        for node in service.nodes:
            _check_node(node, address=True)
        now = self._clock()
        self._purge(domain, service.name, service.version, now)
        self._upsert(domain, service, now, now + ttl if ttl > 0 else math.inf)

    async def deregister(self, domain: str, service: registry_pb2.Service) -> None:
        _check_domain(domain, writable=True)
        _check_service(service)
        if not service.nodes:
            raise BadRequest(f"service {service.name} has no nodes to deregister", id=_ERROR_ID)
        for node in service.nodes:
            _check_node(node, address=False)
        self._purge(domain, service.name, service.version, self._clock())
        version = self._version(domain, service.name, service.version)
        if version is not None:
            self._remove_nodes(domain, version, [node.id for node in service.nodes])

    async def get_service(self, domain: str, name: str) -> list[registry_pb2.Service]:
        _check_domain(domain, writable=False)
        _check_name(name)
        now = self._clock()
        found = [
            (version.service.version, version.snapshot(live))
            for _, version in self._versions(domain, name)
            if (live := version.live(now))
        ]
        if not found:
            raise NotFound(f"service {name} not found", id=_ERROR_ID)
        return [service for _, service in sorted(found, key=lambda pair: pair[0])]

    async def list_services(self, domain: str) -> list[registry_pb2.Service]:
        _check_domain(domain, writable=False)
        now = self._clock()
        found = [
            version.snapshot(live, full=False)
            for _, version in self._versions(domain)
            if (live := version.live(now))
        ]
        return sorted(found, key=lambda service: (service.name, service.version))

    def watch(self, domain: str, name: str = "") -> Watcher:
        _check_domain(domain, writable=False)
        if name:
            _check_name(name)
        return self._hub.subscribe(domain, name)

    async def expire(self) -> int:
        now = self._clock()
        versions = [
            (domain, version.service.name, version.service.version)
            for domain, version in self._versions(ALL_DOMAINS)
        ]
        return sum(self._purge(domain, name, version, now) for domain, name, version in versions)

    async def close(self) -> None:
        self._hub.close()

    def _upsert(self, domain: str, service: registry_pb2.Service, now: float, expires_at: float) -> None:
        versions = self._domains.setdefault(domain, {}).setdefault(service.name, {})
        version = versions.get(service.version)
        before = version.snapshot(version.live(now)) if version else None
        if version is None:
            version = versions[service.version] = _Version(registry_pb2.Service())
        version.service.CopyFrom(service)
        version.service.ClearField("nodes")
        for node in service.nodes:
            version.nodes[node.id] = _Node(_copy_node(node), expires_at)
        after = version.snapshot(version.live(now))
        if before is None:
            self._hub.publish(domain, "create", after)
        elif before != after:
            self._hub.publish(domain, "update", after)

    def _purge(self, domain: str, name: str, version_name: str, now: float) -> int:
        """Remove the lapsed nodes of one version, emitting their events; return how many."""
        version = self._version(domain, name, version_name)
        if version is None:
            return 0
        lapsed = version.lapsed(now)
        if lapsed:
            self._remove_nodes(domain, version, lapsed)
        return len(lapsed)

    def _remove_nodes(self, domain: str, version: _Version, node_ids: list[str]) -> None:
        removed = [version.nodes.pop(node_id).node for node_id in node_ids if node_id in version.nodes]
        if not removed:
            return
        if version.nodes:
            # Nodes lapsed but not yet purged are still stored; the event shows live ones only.
            self._hub.publish(domain, "update", version.snapshot(version.live(self._clock())))
            return
        self._drop_version(domain, version.service.name, version.service.version)
        self._hub.publish(domain, "delete", version.snapshot(removed))

    def _drop_version(self, domain: str, name: str, version_name: str) -> None:
        versions = self._domains[domain][name]
        del versions[version_name]
        if not versions:
            del self._domains[domain][name]
            if not self._domains[domain]:
                del self._domains[domain]

    def _version(self, domain: str, name: str, version_name: str) -> _Version | None:
        return self._domains.get(domain, {}).get(name, {}).get(version_name)

    def _versions(self, domain: str, name: str = "") -> Iterator[tuple[str, _Version]]:
        """``(domain, version)`` of every stored version in scope, domains in sorted order."""
        domains = sorted(self._domains) if domain == ALL_DOMAINS else [domain]
        for domain_name in domains:
            services = self._domains.get(domain_name, {})
            names = [name] if name else list(services)
            for service_name in names:
                for version in list(services.get(service_name, {}).values()):
                    yield domain_name, version


class _State(enum.Enum):
    OPEN = "open"
    OVERFLOWED = "overflowed"
    CLOSED = "closed"


class _Subscription:
    """One watcher's filter and bounded buffer. ``None`` in the queue wakes a blocked reader."""

    def __init__(self, domain: str, name: str, buffer: int) -> None:
        self.domain = domain
        self.name = name
        self.queue: asyncio.Queue[registry_pb2.Result | None] = asyncio.Queue(maxsize=buffer)
        self.state = _State.OPEN

    def matches(self, domain: str, name: str) -> bool:
        return self.domain in (ALL_DOMAINS, domain) and self.name in ("", name)

    def offer(self, result: registry_pb2.Result) -> bool:
        """Buffer ``result``; on a full buffer mark this subscription overflowed and return False."""
        try:
            self.queue.put_nowait(result)
        except asyncio.QueueFull:
            self.state = _State.OVERFLOWED
            return False
        return True

    def close(self) -> None:
        self.state = _State.CLOSED
        try:
            self.queue.put_nowait(None)
        except asyncio.QueueFull:
            pass  # a full queue has no blocked reader to wake

    async def next(self) -> registry_pb2.Result:
        if self.state is _State.OPEN:
            result = await self.queue.get()
            if result is not None and self.state is _State.OPEN:
                return result
        if self.state is _State.OVERFLOWED:
            self.state = _State.CLOSED
            raise TooManyRequests(
                f"watcher fell more than {self.queue.maxsize} events behind and was dropped", id=_ERROR_ID
            )
        raise StopAsyncIteration


class _QueueWatcher(Watcher):
    def __init__(self, hub: WatchHub, subscription: _Subscription) -> None:
        self._hub = hub
        self._subscription = subscription

    async def __anext__(self) -> registry_pb2.Result:
        result = registry_pb2.Result()
        result.CopyFrom(await self._subscription.next())
        return result

    async def aclose(self) -> None:
        self._hub.unsubscribe(self._subscription)

    def __del__(self) -> None:
        # An abandoned watcher must not keep buffering events until it overflows.
        self._hub.unsubscribe(self._subscription)


class WatchHub:
    """Fans registry events out to watchers, each through a bounded buffer of ``buffer`` events.

    A watcher whose buffer is full when an event arrives is dropped (see
    ``Watcher``), so a slow reader costs at most ``buffer`` events of memory.
    """

    def __init__(self, buffer: int = 1024) -> None:
        if buffer < 1:
            raise ValueError("buffer must be at least 1")
        self._buffer = buffer
        self._subscriptions: set[_Subscription] = set()
        self._closed = False

    def subscribe(self, domain: str, name: str = "") -> Watcher:
        """A watcher of the events of ``domain`` (``"*"``: all), only of ``name`` unless empty."""
        subscription = _Subscription(domain, name, self._buffer)
        if self._closed:
            subscription.close()
        else:
            self._subscriptions.add(subscription)
        return _QueueWatcher(self, subscription)

    def unsubscribe(self, subscription: _Subscription) -> None:
        subscription.close()
        self._subscriptions.discard(subscription)

    def publish(self, domain: str, action: str, service: registry_pb2.Service) -> None:
        """Send ``action`` on ``service`` of ``domain`` to every matching watcher."""
        result = registry_pb2.Result(action=action, service=service, timestamp=int(time.time()))
        for subscription in list(self._subscriptions):
            if subscription.matches(domain, service.name) and not subscription.offer(result):
                self._subscriptions.discard(subscription)

    def close(self) -> None:
        """End every watcher; later subscriptions end at once."""
        self._closed = True
        for subscription in list(self._subscriptions):
            self.unsubscribe(subscription)


def _copy_node(node: registry_pb2.Node) -> registry_pb2.Node:
    copy = registry_pb2.Node()
    copy.CopyFrom(node)
    return copy


def _check_domain(domain: str, *, writable: bool) -> None:
    if domain == ALL_DOMAINS and not writable:
        return
    if not _NAME.fullmatch(domain):
        raise BadRequest(f"invalid domain {domain!r}", id=_ERROR_ID)


def _check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise BadRequest(f"invalid service name {name!r}", id=_ERROR_ID)


def _check_service(service: registry_pb2.Service) -> None:
    _check_name(service.name)
    if _WHITESPACE.search(service.version):
        raise BadRequest(f"invalid version {service.version!r} of {service.name}", id=_ERROR_ID)


def _check_node(node: registry_pb2.Node, *, address: bool) -> None:
    if not node.id:
        raise BadRequest("node id is required", id=_ERROR_ID)
    if address and not node.address:
        raise BadRequest(f"node {node.id} has no address", id=_ERROR_ID)


def _check_ttl(ttl: float) -> None:
    if not ttl >= 0 or math.isinf(ttl):
        raise BadRequest(f"invalid ttl {ttl!r}: want seconds >= 0 (0: never expires)", id=_ERROR_ID)


async def open_memory(address: str, data_dir: Path) -> MemoryRegistry:
    """The ``memory`` registry: in this daemon only."""
    return MemoryRegistry()
