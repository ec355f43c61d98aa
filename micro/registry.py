"""Typed client of the registry building block."""

from __future__ import annotations

from collections.abc import AsyncIterator

from micro.client import Client
from micro.proto import registry_pb2

__all__ = ["RegistryClient"]

_SERVICE = "registry"
_PATH = "/micro.registry.v1.Registry/"


class RegistryClient:
    """Looks up, registers and watches services in a domain (default: the caller's namespace)."""

    def __init__(self, client: Client, *, domain: str = "") -> None:
        self.client = client
        self.domain = domain

    def _options(self, ttl: int = 0) -> registry_pb2.Options:
        return registry_pb2.Options(domain=self.domain, ttl=ttl)

    async def get_service(self, name: str) -> list[registry_pb2.Service]:
        """Every registered version of ``name``. Raises ``NotFound``."""
        request = registry_pb2.GetServiceRequest(service=name, options=self._options())
        response = await self.client.call(
            _SERVICE, _PATH + "GetService", request, registry_pb2.GetServiceResponse
        )
        return list(response.services)

    async def list_services(self) -> list[registry_pb2.Service]:
        request = registry_pb2.ListServicesRequest(options=self._options())
        response = await self.client.call(
            _SERVICE, _PATH + "ListServices", request, registry_pb2.ListServicesResponse
        )
        return list(response.services)

    async def register(self, service: registry_pb2.Service, *, ttl: int) -> None:
        request = registry_pb2.RegisterRequest(service=service, options=self._options(ttl))
        await self.client.call(_SERVICE, _PATH + "Register", request, registry_pb2.RegisterResponse)

    async def deregister(self, service: registry_pb2.Service) -> None:
        request = registry_pb2.DeregisterRequest(service=service, options=self._options())
        await self.client.call(_SERVICE, _PATH + "Deregister", request, registry_pb2.DeregisterResponse)

    async def watch(self, name: str = "") -> AsyncIterator[registry_pb2.Result]:
        request = registry_pb2.WatchRequest(service=name, options=self._options())
        async for result in self.client.stream(_SERVICE, _PATH + "Watch", request, registry_pb2.Result):
            yield result
