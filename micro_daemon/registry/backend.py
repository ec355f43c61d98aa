"""The registry backend interface every registry engine implements.

A backend keeps, per domain (namespace), the versions of each named service
and the nodes serving each version. A version exists while it has live nodes:
each node expires ``ttl`` seconds after its last ``register``, and a version
whose last node is deregistered or expires disappears. The registry's gRPC
service authorizes requests and applies defaults (domain, TTL), then calls
one of these methods. Backends raise only
``micro.errors`` exceptions with ``id="registry"``.

Domain ``"*"`` in reads and watches means every domain; it cannot be
registered into.

Watch events (``registry_pb2.Result``):

* ``create``: a version appeared; ``service`` is its full state with its live nodes.
* ``update``: a version changed (nodes added, removed or changed, or its
  metadata, endpoints or schema replaced); ``service`` is its full new state,
  so a watcher replaces its copy rather than merging.
* ``delete``: a version disappeared; ``service`` is its last state, with
  the nodes that were removed last.

A refresh that changes nothing (a heartbeat ``register``) emits no event.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from types import TracebackType

from micro.proto import registry_pb2

__all__ = ["ALL_DOMAINS", "RegistryBackend", "Watcher"]

ALL_DOMAINS = "*"


class Watcher(AsyncIterator[registry_pb2.Result]):
    """A live stream of registry events, returned by ``RegistryBackend.watch``.

    Events are buffered from the moment ``watch`` returns. The iterator ends
    when the backend closes or ``aclose`` is called. A watcher that falls too
    far behind is dropped: its next ``__anext__`` raises
    ``micro.errors.TooManyRequests`` and it yields nothing more. Use it as an
    async context manager, or call ``aclose``, to stop buffering.
    """

    def __aiter__(self) -> Watcher:
        return self

    @abc.abstractmethod
    async def __anext__(self) -> registry_pb2.Result:
        """The next event; raises ``StopAsyncIteration`` once closed."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Stop the stream. Idempotent; must not raise."""

    async def __aenter__(self) -> Watcher:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class RegistryBackend(abc.ABC):
    """A registry engine. Implementations must be safe to call concurrently from one event loop.

    Services passed in are copied, and services returned are copies: callers
    may mutate either freely.
    """

    @abc.abstractmethod
    async def register(self, domain: str, service: registry_pb2.Service, ttl: float) -> None:
        """Add or refresh the nodes of ``service``'s version in ``domain``.

        Each listed node (re)starts its TTL of ``ttl`` seconds (0: never
        expires) and replaces a stored node with the same id. The version's
        metadata, endpoints and schema are replaced by those of ``service``;
        nodes not listed are kept. Raises ``micro.errors.BadRequest`` for an
        invalid name, domain or TTL, or a node without id or address.
        """

    @abc.abstractmethod
    async def deregister(self, domain: str, service: registry_pb2.Service) -> None:
        """Remove the listed nodes (by id) of ``service``'s version in ``domain``.

        Unknown services, versions and nodes are ignored. Raises
        ``micro.errors.BadRequest`` for an invalid name or domain, or when no
        node is listed.
        """

    @abc.abstractmethod
    async def get_service(self, domain: str, name: str) -> list[registry_pb2.Service]:
        """Every live version of ``name``, sorted by version, each with its live nodes only.

        Versions are complete: metadata, endpoints, nodes and schema. With
        domain ``"*"`` a version present in several domains appears once per
        domain. Raises ``micro.errors.NotFound`` if there is none.
        """

    @abc.abstractmethod
    async def list_services(self, domain: str) -> list[registry_pb2.Service]:
        """Every live version in ``domain`` (``"*"``: all), sorted by name then version.

        Each carries its name, version, metadata and live nodes; endpoints and
        schema are left out to keep listings small (``get_service`` has them).
        """

    @abc.abstractmethod
    def watch(self, domain: str, name: str = "") -> Watcher:
        """Stream the events of ``domain`` (``"*"``: all), only of ``name`` unless empty.

        The watcher receives every event that happens after ``watch`` returns.
        """

    @abc.abstractmethod
    async def expire(self) -> int:
        """Drop the nodes whose TTL has lapsed and emit their events; return how many.

        Reads already hide lapsed nodes; this makes their removal visible to
        watchers. Called periodically by the daemon.
        """

    async def health(self) -> str:
        """``"ok"``, or a short description of what is wrong with the engine."""
        return "ok"

    async def close(self) -> None:  # noqa: B027  # optional hook, nothing to do by default
        """End every watcher and release resources. Called once at shutdown; must not raise."""
