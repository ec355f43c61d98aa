"""The proxy's view of the registry: services by domain, their nodes and their schemas.

One ``Domain`` per namespace the proxy has been asked about, loaded once from
the backend and then kept fresh by a watch of that domain, so routing a call
reads only dicts. Each service is a long-lived ``Target`` whose nodes and
versions change in place as registry events arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.descriptor_pool import DescriptorPool

from micro.context import DEFAULT_NAMESPACE
from micro.errors import MicroError, NotFound
from micro.errors import NotImplemented as Unimplemented
from micro.proto import registry_pb2
from micro.schema import pool_from_schema
from micro_daemon.registry.backend import RegistryBackend

__all__ = ["Directory", "Schema", "Target"]

log = logging.getLogger("micro.proxy")

ERROR_ID = "micro.proxy"
BUILDING_BLOCK = "building-block"
RESYNC_DELAY = 1.0
FALLBACK_DOMAIN = DEFAULT_NAMESPACE  # where the building blocks live, readable from every namespace
MAX_ROUTES = 1024  # cached routes per service: a caller inventing paths cannot grow it further


class Schema:
    """One version's registered ``FileDescriptorSet``, parsed on first use."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self._pool: DescriptorPool | None = None
        self._services: dict[str, list[str]] = {}  # short name -> full names

    def method(self, full_name: str) -> MethodDescriptor | None:
        """The method named ``pkg.Service.Method``, or ``None`` if the schema lacks it."""
        pool = self._load()
        if pool is None:
            return None
        try:
            return pool.FindMethodByName(full_name)
        except KeyError:
            return None

    def handler_method(self, handler: str, method: str) -> MethodDescriptor | None:
        """The method ``method`` of the proto service named ``handler`` (any package)."""
        pool = self._load()
        if pool is None:
            return None
        for full_name in self._services.get(handler, ()):
            found = pool.FindServiceByName(full_name).methods_by_name.get(method)
            if found is not None:
                return found
        return self._only_method_named(pool, method)

    def _only_method_named(self, pool: DescriptorPool, method: str) -> MethodDescriptor | None:
        # A handler bound under another name than its proto service: accept an unambiguous match.
        found = [
            m
            for names in self._services.values()
            for name in names
            if (m := pool.FindServiceByName(name).methods_by_name.get(method)) is not None
        ]
        return found[0] if len(found) == 1 else None

    def _load(self) -> DescriptorPool | None:
        if self._pool is None and self.data:
            try:
                self._pool = pool_from_schema(self.data)
                self._services = _service_names(self.data)
            except MicroError as exc:
                log.warning("ignoring an unusable schema: %s", exc)
                self.data = b""
        return self._pool


def _service_names(data: bytes) -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for file in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        prefix = f"{file.package}." if file.package else ""
        for service in file.service:
            names.setdefault(service.name, []).append(prefix + service.name)
    return names


class Target:
    """One service in one domain: its live versions, their nodes (all versions) and schemas.

    ``routes`` caches what the proxy derived from a call's path; it is cleared
    whenever a version's endpoints or schema change, not when only nodes do.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.nodes: tuple[str, ...] = ()
        self.local = False
        self.routes: dict[tuple[str, bool], Any] = {}
        self._versions: dict[str, tuple[registry_pb2.Service, Schema]] = {}
        self._next = 0

    @property
    def empty(self) -> bool:
        return not self._versions

    def put(self, service: registry_pb2.Service) -> None:
        """Replace the state of ``service``'s version (a create or update event)."""
        old = self._versions.get(service.version)
        if old is not None and old[1].data == service.schema:
            schema = old[1]
        else:
            schema = Schema(service.schema)
        if old is None or schema is not old[1] or old[0].endpoints != service.endpoints:
            self.routes.clear()
        self._versions[service.version] = (service, schema)
        self._refresh()

    def replace(self, services: list[registry_pb2.Service]) -> None:
        """Make ``services`` the complete set of live versions (a resync)."""
        for version in set(self._versions) - {s.version for s in services}:
            self.remove(version)
        for service in services:
            self.put(service)

    def remove(self, version: str) -> None:
        """Forget ``version`` (a delete event)."""
        if self._versions.pop(version, None) is not None:
            self.routes.clear()
            self._refresh()

    def cache(self, key: tuple[str, bool], route: Any) -> Any:
        """Remember ``route`` for ``key`` (within ``MAX_ROUTES``) and return it."""
        if len(self.routes) < MAX_ROUTES:
            self.routes[key] = route
        return route

    def pick(self, dead: dict[str, float], exclude: str | None = None) -> str | None:
        """The next node address in round-robin order, skipping ``exclude`` and, if it can, dead ones."""
        nodes = self.nodes
        count = len(nodes)
        if not count:
            return None
        start = self._next % count
        if not dead and exclude is None:
            self._next = start + 1
            return nodes[start]
        now = time.monotonic()
        fallback = None
        for i in range(count):
            address = nodes[(start + i) % count]
            if address == exclude:
                continue
            if dead.get(address, 0.0) <= now:
                self._next = start + i + 1
                return address
            fallback = fallback or address
        self._next = start + 1
        return fallback  # every other node failed recently: one of them may be back

    def method(self, path: str) -> MethodDescriptor | None:
        """The method at gRPC ``path`` (``/pkg.Service/Method``) in any version's schema."""
        full_name = path.lstrip("/").replace("/", ".")
        for _, schema in self._versions.values():
            found = schema.method(full_name)
            if found is not None:
                return found
        return None

    def endpoint_method(self, endpoint: str) -> MethodDescriptor:
        """The proto method behind ``Handler.Method``; ``NotFound`` or ``NotImplemented`` if none."""
        if not any(e.name == endpoint for service, _ in self._versions.values() for e in service.endpoints):
            raise NotFound(f"endpoint {endpoint!r} not found on service {self.name!r}", id=ERROR_ID)
        handler, _, method = endpoint.partition(".")
        for _, schema in self._versions.values():
            found = schema.handler_method(handler, method)
            if found is not None:
                return found
        raise Unimplemented(
            f"service {self.name!r} registered no schema for {endpoint}: its JSON calls cannot be transcoded",
            id=ERROR_ID,
        )

    def _refresh(self) -> None:
        services = [service for _, (service, _) in sorted(self._versions.items())]
        self.nodes = tuple(dict.fromkeys(node.address for s in services for node in s.nodes))
        self.local = any(s.metadata.get("type") == BUILDING_BLOCK for s in services)


class Domain:
    """The targets of one registry domain, ready once loaded from the backend."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.targets: dict[str, Target] = {}
        self.ready = asyncio.Event()
        self.error: BaseException | None = None
        self.task: asyncio.Task[None] | None = None


NOT_LOADED = object()


class Directory:
    """Every domain the proxy serves, kept fresh by one registry watch each.

    ``on_gone(address)`` is called when no service of any domain lists a node
    at ``address`` any more.
    """

    def __init__(self, backend: RegistryBackend, on_gone: Callable[[str], None]) -> None:
        self._backend = backend
        self._on_gone = on_gone
        self._domains: dict[str, Domain] = {}
        self._refs: dict[str, int] = {}

    def find(self, domain: str, name: str) -> Target | object | None:
        """The target ``name`` of ``domain``; ``None`` if absent; ``NOT_LOADED`` if not known yet."""
        loaded = self._domains.get(domain)
        if loaded is None or not loaded.ready.is_set():
            return NOT_LOADED
        return loaded.targets.get(name)

    def resolve(self, namespace: str, name: str) -> Target | object | None:
        """Service ``name`` as callers of ``namespace`` reach it: the namespace's own, else the
        ``micro`` domain's (the building blocks, readable from every namespace); as ``find``."""
        found = self.find(namespace, name)
        if found is None and namespace != FALLBACK_DOMAIN:
            return self.find(FALLBACK_DOMAIN, name)
        return found

    async def load(self, name: str) -> None:
        """Load domain ``name`` and start following it, unless that is done or under way."""
        domain = self._domains.get(name)
        if domain is None:
            domain = self._domains[name] = Domain(name)
            domain.task = asyncio.create_task(self._follow(domain), name=f"proxy-watch-{name}")
        await domain.ready.wait()
        if domain.error is not None:
            raise domain.error

    async def close(self) -> None:
        """Stop every watch. Never raises."""
        tasks = [d.task for d in self._domains.values() if d.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow(self, domain: Domain) -> None:
        while True:
            try:
                async with self._backend.watch(domain.name) as watcher:
                    await self._seed(domain)
                    domain.ready.set()
                    async for result in watcher:
                        self._apply(domain, result.action, result.service)
                return  # the backend closed
            except Exception as exc:
                if not domain.ready.is_set():
                    self._fail(domain, exc)
                    return
                log.warning("registry watch of domain %r failed (%s); resyncing", domain.name, exc)
                await asyncio.sleep(RESYNC_DELAY)

    def _fail(self, domain: Domain, exc: Exception) -> None:
        domain.error = exc
        domain.ready.set()
        del self._domains[domain.name]  # the next call tries again

    async def _seed(self, domain: Domain) -> None:
        fresh: dict[str, list[registry_pb2.Service]] = {}
        for name in dict.fromkeys(s.name for s in await self._backend.list_services(domain.name)):
            with contextlib.suppress(NotFound):  # gone since the listing
                fresh[name] = await self._backend.get_service(domain.name, name)
        for name in list(domain.targets):
            if name not in fresh:
                self._drop(domain, name)
        for name, versions in fresh.items():
            target = domain.targets.get(name) or Target(name)
            before = target.nodes
            target.replace(versions)
            self._store(domain, target, before)

    def _apply(self, domain: Domain, action: str, service: registry_pb2.Service) -> None:
        target = domain.targets.get(service.name)
        if action == "delete":
            if target is None:
                return
            before = target.nodes
            target.remove(service.version)
        else:
            target = target or Target(service.name)
            before = target.nodes
            target.put(service)
        self._store(domain, target, before)

    def _store(self, domain: Domain, target: Target, before: tuple[str, ...]) -> None:
        if target.empty:
            domain.targets.pop(target.name, None)
        else:
            domain.targets[target.name] = target
        self._count(target.nodes, before)

    def _drop(self, domain: Domain, name: str) -> None:
        target = domain.targets.pop(name)
        self._count((), target.nodes)

    def _count(self, after: Iterable[str], before: Iterable[str]) -> None:
        after, before = set(after), set(before)
        for address in after - before:
            self._refs[address] = self._refs.get(address, 0) + 1
        for address in before - after:
            left = self._refs.pop(address, 1) - 1
            if left > 0:
                self._refs[address] = left
            else:
                self._on_gone(address)
