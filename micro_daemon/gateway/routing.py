"""From a namespace, an HTTP method and a path to the endpoint that serves them.

Explicit routes (``rules``) are tried first, in the caller's namespace and then
in ``micro``; otherwise the path resolver names a service, looked up in the
namespace and then in ``micro`` (where the building blocks live), and an
endpoint, matched without regard to case or hyphens against the endpoints the
service registered.

What is derived from the registry is cached on the proxy's directory targets,
whose route caches are cleared whenever a service's endpoints or schema change,
so a call reads a few dicts and nothing goes stale.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message

from micro._dispatch import Dispatcher
from micro.context import DEFAULT_NAMESPACE
from micro.errors import MicroError, NotFound, ServiceUnavailable
from micro.proto import debug_pb2
from micro_daemon.gateway.directory_view import domain_targets, registered_endpoints
from micro_daemon.gateway.resolve import endpoint_key, resolve
from micro_daemon.gateway.rules import Captures, Rule, endpoint_rules
from micro_daemon.gateway.upstream import ERROR_ID, Local, Remote, Upstream
from micro_daemon.proxy import Proxy
from micro_daemon.proxy.directory import Target

__all__ = ["Plan", "Route", "Router"]

FALLBACK_DOMAIN = DEFAULT_NAMESPACE
PLAN_PREFIX = "gateway:"  # keys of our entries in Target.routes; the proxy's start with "/"
ENDPOINTS_KEY = ("gateway:endpoints", True)
RULES_KEY = ("gateway:rules", True)
MAX_PATHS = 4096
_DEBUG = debug_pb2.DESCRIPTOR.services_by_name["Debug"]


class Plan:
    """How to call one endpoint: its message types, its shape and its upstream."""

    def __init__(
        self,
        service: str,
        endpoint: str,
        request_type: type[Message],
        response_type: type[Message],
        *,
        client_streaming: bool,
        server_streaming: bool,
        upstream: Upstream,
    ) -> None:
        self.service = service
        self.endpoint = endpoint
        self.request_type = request_type
        self.response_type = response_type
        self.client_streaming = client_streaming
        self.server_streaming = server_streaming
        self.upstream = upstream
        self.route = Route(self)  # the route of a resolved path: no captures, the whole body


@dataclass(frozen=True)
class Route:
    """A plan with what the matched route adds: captured fields and where the body goes."""

    plan: Plan
    captures: Captures = ()
    body: str = "*"


@dataclass(frozen=True)
class _Table:
    """The explicit routes of one domain, with the target versions they were derived from."""

    entries: tuple[tuple[Target, tuple[Rule, ...]], ...]
    rules: tuple[tuple[Rule, Target], ...]

    def fresh(self, targets: Mapping[str, Target]) -> bool:
        return len(self.entries) == len(targets) and all(
            targets.get(target.name) is target and target.routes.get(RULES_KEY) is rules
            for target, rules in self.entries
        )


_EMPTY = _Table((), ())


class Router:
    """Finds the ``Route`` of a request, loading a namespace's registry domain on first use."""

    def __init__(self, proxy: Proxy, dispatcher: Dispatcher) -> None:
        self._directory = proxy.directory
        self._pool = proxy.pool
        self._dispatcher = dispatcher
        self._paths: dict[str, tuple[str, str]] = {}
        self._tables: dict[str, _Table] = {}

    async def route(self, namespace: str, method: str, path: str) -> Route:
        """The route of ``method`` ``path`` in ``namespace``; ``NotFound`` if nothing serves it."""
        domains = await self._domains(namespace)
        for name, targets in domains:
            for rule, target in self._table(name, targets).rules:
                captures = rule.match(method, path)
                if captures is not None:
                    return Route(self._plan(target, rule.endpoint), captures, rule.body)
        service, endpoint = self._resolve(path)
        for _, targets in domains:
            found = targets.get(service)
            if found is not None:
                return self._plan(found, endpoint).route
        raise NotFound(f"service {service!r} not found in namespace {namespace!r}", id=ERROR_ID)

    async def _domains(self, namespace: str) -> list[tuple[str, Mapping[str, Target]]]:
        names = [namespace] if namespace == FALLBACK_DOMAIN else [namespace, FALLBACK_DOMAIN]
        domains = []
        for name in names:
            targets = domain_targets(self._directory, name)
            if targets is None:
                targets = await self._load(name)
            domains.append((name, targets))
        return domains

    async def _load(self, name: str) -> Mapping[str, Target]:
        try:
            await self._directory.load(name)
        except Exception as exc:
            raise ServiceUnavailable(f"the registry could not be read: {exc}", id=ERROR_ID) from exc
        return domain_targets(self._directory, name) or {}

    def _resolve(self, path: str) -> tuple[str, str]:
        found = self._paths.get(path)
        if found is None:
            found = resolve(path)
            if len(self._paths) >= MAX_PATHS:
                self._paths.clear()  # callers inventing paths cannot grow it further
            self._paths[path] = found
        return found

    def _plan(self, target: Target, endpoint: str) -> Plan:
        key = endpoint_key(endpoint)
        plan = target.routes.get((PLAN_PREFIX + key, True))
        if plan is None:
            name = self._endpoints(target).get(key)
            if name is None:
                raise NotFound(f"endpoint {endpoint!r} not found on service {target.name!r}", id=ERROR_ID)
            plan = target.cache((PLAN_PREFIX + key, True), self._build(target, name))
        assert isinstance(plan, Plan)
        return plan

    def _endpoints(self, target: Target) -> dict[str, str]:
        names = target.routes.get(ENDPOINTS_KEY)
        if names is None:
            names = {}
            for endpoint in registered_endpoints(target):
                names.setdefault(endpoint_key(endpoint.name), endpoint.name)
            target.routes[ENDPOINTS_KEY] = names
        assert isinstance(names, dict)
        return names

    def _build(self, target: Target, endpoint: str) -> Plan:
        if target.local:
            method = self._dispatcher.find(target.name, endpoint)
            if method is None:
                raise NotFound(f"endpoint {endpoint!r} not found on service {target.name!r}", id=ERROR_ID)
            return Plan(
                target.name,
                endpoint,
                method.request_type,
                method.response_type,
                client_streaming=method.client_streaming,
                server_streaming=method.server_streaming,
                upstream=Local(target.name, method, self._dispatcher.counters, admit=self._dispatcher.admit),
            )
        descriptor = _method(target, endpoint)
        return Plan(
            target.name,
            endpoint,
            message_factory.GetMessageClass(descriptor.input_type),
            message_factory.GetMessageClass(descriptor.output_type),
            client_streaming=descriptor.client_streaming,
            server_streaming=descriptor.server_streaming,
            upstream=Remote(
                target, f"/{descriptor.containing_service.full_name}/{descriptor.name}", self._pool
            ),
        )

    def _table(self, name: str, targets: Mapping[str, Target]) -> _Table:
        table = self._tables.get(name, _EMPTY)
        if table.fresh(targets):
            return table
        entries = []
        for target in targets.values():
            rules = target.routes.get(RULES_KEY)
            if rules is None:
                rules = target.routes[RULES_KEY] = _target_rules(target)
            entries.append((target, rules))
        ordered = sorted(
            ((rule, target) for target, rules in entries for rule in rules), key=lambda pair: pair[0].weight
        )
        table = self._tables[name] = _Table(tuple(entries), tuple(ordered))
        return table


def _method(target: Target, endpoint: str) -> MethodDescriptor:
    """The proto method of a user service's endpoint; its Debug endpoints come from micro's own proto."""
    try:
        return target.endpoint_method(endpoint)
    except MicroError as error:
        handler, _, method = endpoint.partition(".")
        if handler == _DEBUG.name and method in _DEBUG.methods_by_name:
            return _DEBUG.methods_by_name[method]
        error.id = ERROR_ID
        raise


def _target_rules(target: Target) -> tuple[Rule, ...]:
    rules: list[Rule] = []
    for endpoint in registered_endpoints(target):
        options = b""
        if not target.local:
            try:
                options = target.endpoint_method(endpoint.name).GetOptions().SerializeToString()
            except MicroError:
                pass  # no schema for it: only its metadata can declare routes
        rules.extend(endpoint_rules(endpoint, options))
    return tuple(rules)
