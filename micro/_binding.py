"""Binding a handler object to the proto service it implements."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

__all__ = ["Method", "bind"]


@dataclass(frozen=True)
class Method:
    """One RPC of a bound handler: what it is called, its types and its shape."""

    handler: str
    descriptor: MethodDescriptor
    request_type: type[Message]
    response_type: type[Message]
    func: Callable[..., Any]
    lane: Callable[..., Any] | None = None  # the same RPC served message by message (see ``bind``)

    @property
    def name(self) -> str:
        return self.descriptor.name

    @property
    def endpoint(self) -> str:
        """Micro's endpoint name, e.g. ``Store.Read``."""
        return f"{self.handler}.{self.descriptor.name}"

    @property
    def path(self) -> str:
        """The gRPC path, e.g. ``/micro.store.v1.Store/Read``."""
        return f"/{self.descriptor.containing_service.full_name}/{self.descriptor.name}"

    @property
    def client_streaming(self) -> bool:
        return bool(self.descriptor.client_streaming)

    @property
    def server_streaming(self) -> bool:
        return bool(self.descriptor.server_streaming)


def bind(handler: object, service: ServiceDescriptor, name: str | None = None) -> list[Method]:
    """Bind each RPC of ``service`` to the method of ``handler`` with the same name.

    Unary methods are ``async def M(self, request, context) -> Response``
    (or a plain ``def``, run in a worker thread); server-streaming ones are
    async generators; client-streaming and bidirectional ones take an async
    iterator of requests. Raises ``TypeError`` naming the first RPC the
    handler lacks or implements with the wrong shape.

    A handler may also serve a bidirectional RPC as a *lane*: its ``lanes``
    attribute, a mapping, maps the RPC's name to ``async def lane(lane: Lane,
    context)``, which takes the request messages' bytes as they arrive and
    sends its answers itself (``micro._dispatch.Lane``). A server that parses
    calls itself (the daemon's relay) uses it instead of the async iterators
    and their layers; every other server uses the method.
    """
    handler_name = name or service.name
    found = getattr(handler, "lanes", None)  # a handler's __getattr__ may answer anything: a mapping only
    lanes: dict[str, Callable[..., Any]] = dict(found) if isinstance(found, Mapping) else {}
    methods = []
    for rpc in service.methods:
        func = getattr(handler, rpc.name, None)
        if func is None or not callable(func):
            raise TypeError(f"{type(handler).__name__} has no method {rpc.name} for {service.full_name}")
        _check_shape(func, rpc)
        lane = lanes.pop(rpc.name, None)
        if lane is not None and not (rpc.client_streaming and rpc.server_streaming):
            raise TypeError(f"{rpc.full_name} is not bidirectional: only a bidirectional RPC has a lane")
        if lane is not None and not inspect.iscoroutinefunction(lane):
            raise TypeError(f"the lane of {rpc.full_name} must be a coroutine function (async def)")
        methods.append(
            Method(
                handler=handler_name,
                descriptor=rpc,
                request_type=message_factory.GetMessageClass(rpc.input_type),
                response_type=message_factory.GetMessageClass(rpc.output_type),
                func=_awaitable(func),
                lane=lane,
            )
        )
    if lanes:
        raise TypeError(
            f"{type(handler).__name__}.lanes names no RPC of {service.full_name}: {sorted(lanes)}"
        )
    return methods


def _awaitable(func: Callable[..., Any]) -> Callable[..., Any]:
    """A plain (sync) unary handler runs in a worker thread, so it cannot stall the event loop."""
    if inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
        return func

    async def in_thread(request: Any, context: Any) -> Any:
        return await asyncio.to_thread(func, request, context)

    in_thread.__qualname__ = getattr(func, "__qualname__", "handler")
    return in_thread


def _check_shape(func: Callable[..., Any], rpc: MethodDescriptor) -> None:
    name = getattr(func, "__qualname__", rpc.name)
    is_generator = inspect.isasyncgenfunction(func)
    if rpc.server_streaming and not is_generator:
        raise TypeError(
            f"{rpc.full_name} streams responses: {name} must be an async generator (async def + yield)"
        )
    if not rpc.server_streaming and (is_generator or inspect.isgeneratorfunction(func)):
        raise TypeError(f"{rpc.full_name} returns one response: {name} must return it, not yield")
    if rpc.client_streaming and not (is_generator or inspect.iscoroutinefunction(func)):
        raise TypeError(f"{rpc.full_name} streams requests: {name} must be async (it gets an async iterator)")
