"""The proxy's access check: every forwarded call passes the daemon's ``Gate`` first.

``guarded`` wraps a route's handler so that, per call, the caller's token and
the rules of the namespace it names are checked before any byte is sent
upstream (``Gate.check_call`` on resource ``service:<name>:<Handler.Method>``).
The wrapper is built once per route; the check reads the call's own metadata,
so one cached route serves every caller.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from micro._dispatch import peer_host
from micro._metadata import AUTHORIZATION_KEY, NAMESPACE_KEY, SERVICE_KEY
from micro.errors import MicroError
from micro_daemon.auth.gate import Gate, log_refusal
from micro_daemon.proxy.forward import ServicerContext, abort

__all__ = ["endpoint_of", "guarded"]

_READ = frozenset({AUTHORIZATION_KEY, NAMESPACE_KEY, SERVICE_KEY})


def endpoint_of(path: str) -> str:
    """``Handler.Method`` of a gRPC path: ``/pkg.Handler/Method`` and ``/Handler/Method`` alike."""
    service, _, method = path.lstrip("/").partition("/")
    return f"{service.rpartition('.')[2]}.{method}"


def guarded(handler: grpc.RpcMethodHandler, gate: Gate, path: str) -> grpc.RpcMethodHandler:
    """``handler`` with the gate's check before each call (``handler`` itself when auth is off)."""
    if not gate.enabled:
        return handler
    endpoint = endpoint_of(path)

    async def check(context: ServicerContext) -> None:
        # Only the keys the gate reads: this runs on every proxied call.
        metadata = {k: v for k, v in context.invocation_metadata() or () if k in _READ}
        service = metadata.get(SERVICE_KEY, "")
        try:
            await gate.check_call(metadata, service, endpoint)
        except MicroError as error:
            if error.code in (401, 403):
                log_refusal(f"{service} {endpoint}", peer_host(context.peer() or ""), error)
            await abort(context, error)

    if handler.unary_unary is not None:
        unary_unary = handler.unary_unary

        async def checked_unary_unary(request: Any, context: ServicerContext) -> Any:
            await check(context)
            return await unary_unary(request, context)

        return handler._replace(unary_unary=checked_unary_unary)
    if handler.stream_unary is not None:
        stream_unary = handler.stream_unary

        async def checked_stream_unary(requests: Any, context: ServicerContext) -> Any:
            await check(context)
            return await stream_unary(requests, context)

        return handler._replace(stream_unary=checked_stream_unary)
    if handler.unary_stream is not None:
        unary_stream = handler.unary_stream

        async def checked_unary_stream(request: Any, context: ServicerContext) -> AsyncIterator[Any]:
            await check(context)
            async for response in unary_stream(request, context):
                yield response

        return handler._replace(unary_stream=checked_unary_stream)
    stream_stream = handler.stream_stream

    async def checked_stream_stream(requests: Any, context: ServicerContext) -> AsyncIterator[Any]:
        await check(context)
        async for response in stream_stream(requests, context):
            yield response

    return handler._replace(stream_stream=checked_stream_stream)
