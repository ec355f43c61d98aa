"""``Proxy``: the generic handler that routes calls for user services to their nodes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import message_factory

from micro._metadata import CODEC_KEY, NAMESPACE_KEY, SERVICE_KEY
from micro.context import DEFAULT_NAMESPACE, validate_namespace
from micro.errors import MicroError, NotFound, ServiceUnavailable
from micro.errors import NotImplemented as Unimplemented
from micro_daemon.auth.gate import Gate
from micro_daemon.proxy.channels import ChannelPool
from micro_daemon.proxy.directory import ERROR_ID, FALLBACK_DOMAIN, NOT_LOADED, Directory, Target
from micro_daemon.proxy.forward import Forward, ServicerContext, Transcoder, abort
from micro_daemon.proxy.guard import guarded
from micro_daemon.registry.backend import RegistryBackend

__all__ = ["Proxy"]


class Proxy(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc is untyped
    """Routes calls naming a registered service (metadata ``micro-service``) to one of its nodes.

    Consulted after the daemon's ``Dispatcher``: it declines calls without a
    service and calls to the building blocks (they are served in-process or
    not at all). Each call passes ``gate`` (auth and the namespace's rules)
    before it is forwarded. ``start`` loads the ``micro`` domain; other domains load on
    their first call. ``close`` stops the registry watches and closes every
    channel; it never raises.
    """

    def __init__(
        self,
        backend: RegistryBackend,
        *,
        pool: ChannelPool | None = None,
        gate: Gate | None = None,
        on_gone: Callable[[str], None] | None = None,
    ) -> None:
        """``on_gone(address)``: also told when no service lists a node at ``address`` any more."""
        self.pool = pool or ChannelPool()
        self._on_gone = on_gone
        self.directory = Directory(backend, on_gone=self._gone)
        self.gate = gate or Gate(None)

    def _gone(self, address: str) -> None:
        self.pool.discard(address)
        if self._on_gone is not None:
            self._on_gone(address)

    async def start(self) -> None:
        """Load the ``micro`` domain and start following it."""
        await self.directory.load(FALLBACK_DOMAIN)

    async def close(self) -> None:
        """Stop following the registry and close every channel. Never raises."""
        await self.directory.close()
        await self.pool.close()

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        service, namespace, json = _addressing(handler_call_details.invocation_metadata)
        if not service:
            return None
        path: str = handler_call_details.method
        try:
            found = self._find(namespace, service)
            if found is NOT_LOADED:
                return self._cold(namespace, service, path, json)
            if not isinstance(found, Target):
                raise _not_found(service, namespace)
            if found.local:
                return None  # a building block's method the Dispatcher does not know
            return found.routes.get((path, json)) or self._route(found, path, json)
        except MicroError as error:
            return _failing(error)

    def _find(self, namespace: str, service: str) -> Target | object | None:
        found = self.directory.resolve(namespace, service)
        if found is NOT_LOADED and namespace != FALLBACK_DOMAIN:
            validate_namespace(namespace)  # only valid names become domains
        return found

    def _route(self, target: Target, path: str, json: bool) -> grpc.RpcMethodHandler:
        return target.cache(
            (path, json), guarded(self._forward(target, path, json).handler(), self.gate, path)
        )

    def _forward(self, target: Target, path: str, json: bool) -> Forward:
        if json:
            method = target.endpoint_method(path.lstrip("/").replace("/", ".", 1))
            upstream = f"/{method.containing_service.full_name}/{method.name}"
            transcoder = Transcoder(
                message_factory.GetMessageClass(method.input_type),
                message_factory.GetMessageClass(method.output_type),
            )
            return Forward(
                target,
                upstream,
                self.pool,
                client_streaming=method.client_streaming,
                server_streaming=method.server_streaming,
                transcoder=transcoder,
            )
        found = target.method(path)
        if found is None:
            return Forward(target, path, self.pool)  # no schema for it: assume unary
        return Forward(
            target,
            path,
            self.pool,
            client_streaming=found.client_streaming,
            server_streaming=found.server_streaming,
        )

    def _cold(self, namespace: str, service: str, path: str, json: bool) -> grpc.RpcMethodHandler:
        """A handler for a domain not loaded yet: its shape is unknown, so it takes a stream either way."""

        async def behaviour(requests: AsyncIterator[bytes], context: ServicerContext) -> AsyncIterator[bytes]:
            try:
                forward = await self._resolve(namespace, service, path, json)
            except MicroError as error:
                await abort(context, error)
            async for response in forward.any_shape(requests, context):
                yield response

        return guarded(grpc.stream_stream_rpc_method_handler(behaviour), self.gate, path)

    async def _resolve(self, namespace: str, service: str, path: str, json: bool) -> Forward:
        try:
            await self.directory.load(namespace)
            await self.directory.load(FALLBACK_DOMAIN)
        except MicroError:
            raise
        except Exception as exc:
            raise ServiceUnavailable(f"the registry could not be read: {exc}", id=ERROR_ID) from exc
        found = self._find(namespace, service)
        if not isinstance(found, Target):
            raise _not_found(service, namespace)
        if found.local:
            raise Unimplemented(f"service {service!r} has no method at {path}", id=ERROR_ID)
        return self._forward(found, path, json)


def _addressing(metadata: Any) -> tuple[str, str, bool]:
    service = ""
    namespace = DEFAULT_NAMESPACE
    json = False
    for key, value in metadata or ():
        if key == SERVICE_KEY:
            service = value
        elif key == NAMESPACE_KEY:
            namespace = value or DEFAULT_NAMESPACE
        elif key == CODEC_KEY:
            json = value == "json"
    return service, namespace, json


def _not_found(service: str, namespace: str) -> NotFound:
    return NotFound(f"service {service!r} not found in namespace {namespace!r}", id=ERROR_ID)


def _failing(error: MicroError) -> grpc.RpcMethodHandler:
    """A handler that answers ``error`` at once, without waiting for a request message."""

    async def behaviour(requests: AsyncIterator[bytes], context: ServicerContext) -> AsyncIterator[bytes]:
        await abort(context, error)
        yield b""  # unreachable: makes this an async generator

    return grpc.stream_stream_rpc_method_handler(behaviour)
