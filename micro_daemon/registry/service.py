"""The registry service: domains, TTLs and watches over a ``RegistryBackend``."""

from __future__ import annotations

from collections.abc import AsyncIterator

from micro.context import DEFAULT_NAMESPACE, Context, validate_namespace
from micro.errors import BadRequest
from micro.proto import registry_pb2
from micro_daemon.auth.gate import require
from micro_daemon.registry.backend import RegistryBackend

__all__ = ["RegistryHandler"]

ALL_DOMAINS = "*"


class RegistryHandler:
    """Serves ``micro.registry.v1.Registry``; domains are namespaces, and ``micro`` is readable by all."""

    def __init__(self, backend: RegistryBackend, *, default_ttl: float) -> None:
        self.backend = backend
        self.default_ttl = default_ttl

    async def GetService(
        self, request: registry_pb2.GetServiceRequest, context: Context
    ) -> registry_pb2.GetServiceResponse:
        domain = _domain(request.options.domain, context, write=False)
        services = await self.backend.get_service(domain, request.service)
        return registry_pb2.GetServiceResponse(services=services)

    async def ListServices(
        self, request: registry_pb2.ListServicesRequest, context: Context
    ) -> registry_pb2.ListServicesResponse:
        domain = _domain(request.options.domain, context, write=False)
        return registry_pb2.ListServicesResponse(services=await self.backend.list_services(domain))

    async def Register(
        self, request: registry_pb2.RegisterRequest, context: Context
    ) -> registry_pb2.RegisterResponse:
        domain = _domain(request.options.domain, context, write=True)
        if request.options.ttl < 0:
            raise BadRequest(f"ttl must be a positive number of seconds, not {request.options.ttl}")
        ttl = float(request.options.ttl) or self.default_ttl
        await self.backend.register(domain, request.service, ttl)
        return registry_pb2.RegisterResponse()

    async def Deregister(
        self, request: registry_pb2.DeregisterRequest, context: Context
    ) -> registry_pb2.DeregisterResponse:
        domain = _domain(request.options.domain, context, write=True)
        await self.backend.deregister(domain, request.service)
        return registry_pb2.DeregisterResponse()

    async def Watch(
        self, request: registry_pb2.WatchRequest, context: Context
    ) -> AsyncIterator[registry_pb2.Result]:
        domain = _domain(request.options.domain, context, write=False)
        # async with: the watcher is released as soon as the caller cancels the stream
        async with self.backend.watch(domain, request.service) as watcher:
            async for result in watcher:
                yield result


def _domain(domain: str, context: Context, *, write: bool) -> str:
    """The domain a request acts on, if the caller may; ``micro`` is public to read (blocks live there)."""
    domain = domain or context.namespace
    if domain != ALL_DOMAINS:
        validate_namespace(domain)
    if domain == DEFAULT_NAMESPACE and not write:
        return domain
    require(context, domain, what="the registry")  # every domain ("*") only for micro's administrators
    return domain
