"""Where the daemon's relay sends each call: a user service's node, or the daemon's own gRPC server.

A proto call naming a registered user service (metadata ``micro-service``)
goes straight to one of its nodes, round-robin, after the gate's check of the
namespace's rules. Every other call goes to the daemon's gRPC server on its
private loopback port: the building blocks, JSON callers (which need
transcoding), services of a namespace not loaded yet (the server's ``Proxy``
loads it; the next call is relayed), and names that are not registered (the
``Proxy`` says why). Those calls carry the caller's address and a secret only
this relay and that server share (``forwarded_fields``), so the server knows
who is calling and trusts no one else's claim of it.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Mapping

from micro._dispatch import Dispatcher
from micro._hpack import encode
from micro._metadata import (
    AUTHORIZATION_KEY,
    CODEC_KEY,
    NAMESPACE_KEY,
    RELAY_KEY,
    REMOTE_ADDRESS_KEY,
    SERVICE_KEY,
)
from micro.context import DEFAULT_NAMESPACE, validate_namespace
from micro.errors import MicroError
from micro_daemon.auth.gate import Gate, log_refusal
from micro_daemon.proxy.directory import Directory, Target
from micro_daemon.proxy.guard import endpoint_of
from micro_daemon.relay.eager import eager
from micro_daemon.relay.local import Serve
from micro_daemon.relay.relay import Destination, Route

__all__ = ["ServiceRouter"]

_SERVICE = SERVICE_KEY.encode()
_NAMESPACE = NAMESPACE_KEY.encode()
_CODEC = CODEC_KEY.encode()
_AUTHORIZATION = AUTHORIZATION_KEY.encode()
_PATH = b":path"


class ServiceRouter:
    """The daemon's ``Router``: user services' nodes from ``directory``, everything else to ``internal``."""

    def __init__(self, directory: Directory, gate: Gate, internal: str, dispatcher: Dispatcher) -> None:
        self.directory = directory
        self.gate = gate
        self.dispatcher = dispatcher
        self._served: dict[object, Serve] = {}
        self.secret = secrets.token_urlsafe(24)
        self._internal = Destination(
            "micro", lambda dead, exclude: None if exclude == internal else internal, self.forwarded_fields
        )
        self._destinations: dict[Target, Destination] = {}

    def route(self, headers: Mapping[bytes, bytes], peer: str) -> Route | Awaitable[Route]:
        if headers.get(_CODEC) == b"json":
            return self._internal  # transcoding is the gRPC server's proxy's work
        service = headers.get(_SERVICE)
        name = service.decode("latin-1") if service else None
        if name:
            namespace = (headers.get(_NAMESPACE) or b"").decode("latin-1") or DEFAULT_NAMESPACE
            found = self.directory.resolve(namespace, name)
            if isinstance(found, Target) and not found.local and found.nodes:
                return self._to_nodes(headers, peer, namespace, name, found)
        path = headers.get(_PATH, b"").decode("latin-1")
        local = self.dispatcher.local(path, name)
        if local is None:
            # Streams, a namespace not loaded, an unknown name: the gRPC server serves or says why.
            return self._internal
        served = self._served.get(local)
        if served is None:
            served = self._served[local] = Serve(local)
        return served

    def _to_nodes(
        self, headers: Mapping[bytes, bytes], peer: str, namespace: str, name: str, found: Target
    ) -> Destination | Awaitable[Destination]:
        destination = self._destinations.get(found)
        if destination is None:
            if len(self._destinations) > 4096:
                self._destinations.clear()
            destination = self._destinations[found] = Destination(name, found.pick)
        if not self.gate.enabled:
            return destination
        path = headers.get(_PATH, b"").decode("latin-1")
        metadata = {NAMESPACE_KEY: namespace, SERVICE_KEY: name}
        token = headers.get(_AUTHORIZATION)
        if token is not None:
            metadata[AUTHORIZATION_KEY] = token.decode("latin-1")
        pending = eager(self._check(metadata, name, endpoint_of(path), peer))
        if pending is None:
            return destination
        return _then(pending, destination)

    def forwarded_fields(self, peer: str) -> bytes:
        """Header fields appended to a call relayed to the daemon's own server: the caller and the secret."""
        return encode(
            [(RELAY_KEY.encode(), self.secret.encode()), (REMOTE_ADDRESS_KEY.encode(), peer.encode())]
        )

    async def _check(self, metadata: dict[str, str], service: str, endpoint: str, peer: str) -> None:
        try:
            validate_namespace(metadata[NAMESPACE_KEY])
            await self.gate.check_call(metadata, service, endpoint)
        except MicroError as error:
            if error.code in (401, 403):
                log_refusal(f"{service} {endpoint}", peer, error)
            raise


async def _then(pending: Awaitable[None], destination: Destination) -> Destination:
    await pending
    return destination
