"""Serving bound handlers on a ``grpc.aio`` server, for proto and JSON callers.

Proto callers use the method's own gRPC path (``/micro.store.v1.Store/Read``).
JSON callers (the CLI, the gateway) send metadata ``micro-codec: json`` and
``micro-service: <name>`` to the path ``/<Handler>/<Method>``; their bodies are
transcoded with the method's descriptors. Handlers raise ``micro.errors``;
anything else is logged and answered as a 500 without its traceback.

Two optional hooks let a server put identity on the ``Context``:
``authenticate`` turns the call's metadata into the caller's account (an
invalid token is an anonymous caller whose ``auth_error`` says why), and
``admit`` may refuse the call before its handler runs. Both run on every
call, so both must be cheap (cache what they verify).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import grpc
from google.protobuf.message import Message

from micro._binding import Method
from micro._grpc_errors import grpc_status_for, trailing_metadata_for
from micro._metadata import CODEC_KEY, NAMESPACE_KEY, RELAY_KEY, REMOTE_ADDRESS_KEY, SERVICE_KEY
from micro.codec import decode_json, decode_proto, encode_json
from micro.context import DEFAULT_NAMESPACE, Context, _current, validate_namespace
from micro.errors import BadRequest, InternalServerError, MicroError

if TYPE_CHECKING:
    from micro.auth import Account

__all__ = [
    "Admit",
    "Authenticate",
    "Counters",
    "Dispatcher",
    "Lane",
    "LocalLane",
    "LocalStream",
    "LocalUnary",
]

log = logging.getLogger("micro.server")


@dataclass
class Counters:
    requests: int = 0
    errors: int = 0


Decoder = Callable[[bytes], Message]
Encoder = Callable[[Message], bytes]

Authenticate = Callable[[Mapping[str, str]], Awaitable[tuple["Account | None", MicroError | None]]]
"""``metadata -> (account, why a token was refused)``; ``(None, None)`` for no token."""

Admit = Callable[[Context], None]
"""Raises ``Unauthorized``/``Forbidden`` to refuse a call; the context carries the caller's account."""


class Dispatcher(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc is untyped
    """Routes calls to bound methods by gRPC path, or by service and endpoint for JSON callers."""

    def __init__(
        self,
        *,
        authenticate: Authenticate | None = None,
        admit: Admit | None = None,
        relay_secret: str | None = None,
    ) -> None:
        """``relay_secret``: calls carrying it under ``micro-relay`` came through the daemon's relay,
        so their ``micro-remote-address`` (the relay's caller) is believed instead of the peer."""
        self.relay_secret = relay_secret
        self._local: dict[tuple[str, str | None], LocalUnary | LocalStream | LocalLane | None] = {}
        self._by_path: dict[str, tuple[str, Method]] = {}
        self._by_endpoint: dict[tuple[str, str], Method] = {}
        self.counters = Counters()
        self.authenticate = authenticate
        self.admit = admit

    def add(self, service: str, methods: list[Method]) -> None:
        """Serve ``methods`` as part of ``service``."""
        self._local.clear()
        for method in methods:
            self._by_path.setdefault(method.path, (service, method))
            self._by_endpoint[(service, method.endpoint)] = method

    def find(self, service: str, endpoint: str) -> Method | None:
        return self._by_endpoint.get((service, endpoint))

    def local(self, path: str, service: str | None) -> LocalUnary | LocalStream | LocalLane | None:
        """The method a proto call to ``path`` naming ``service`` reaches, to serve without gRPC.

        For a server that parses calls itself (the daemon's relay); ``None`` when
        the call is not one of ours (leave it to the gRPC server). A method with a
        lane is served by it (``LocalLane``).
        """
        key = (path, service)
        found = self._local.get(key)
        if found is None and key not in self._local:
            entry = self._by_path.get(path)
            method = entry and self._by_endpoint.get((service or entry[0], entry[1].endpoint))
            if method:
                assert entry is not None
                call = _Call(self, service or entry[0], method, *_proto_codec(method))
                streaming = method.client_streaming or method.server_streaming
                if method.lane is not None:
                    found = LocalLane(call, method.lane)
                else:
                    found = LocalStream(call) if streaming else LocalUnary(call)
            if len(self._local) < 4096:  # paths callers invent cannot grow it further
                self._local[key] = found
        return found

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        metadata = dict(handler_call_details.invocation_metadata)
        path: str = handler_call_details.method
        if metadata.get(CODEC_KEY) == "json":
            service = str(metadata.get(SERVICE_KEY, ""))
            method = self._by_endpoint.get((service, path.lstrip("/").replace("/", ".", 1)))
            if method is None:
                return None
            return self._handler(service, method, _json_codec(method))
        found = self._by_path.get(path)
        if found is None:
            return None
        service = str(metadata.get(SERVICE_KEY) or found[0])
        method = self._by_endpoint.get((service, found[1].endpoint))
        if method is None:
            return None  # the path is ours but the service named is not: let the next handler route it
        return self._handler(service, method, _proto_codec(method))

    def _handler(self, service: str, method: Method, codec: tuple[Decoder, Encoder]) -> grpc.RpcMethodHandler:
        decode, encode = codec
        call = _Call(self, service, method, decode, encode)
        if method.client_streaming and method.server_streaming:
            return grpc.stream_stream_rpc_method_handler(call.bidi)
        if method.client_streaming:
            return grpc.stream_unary_rpc_method_handler(call.client_stream)
        if method.server_streaming:
            return grpc.unary_stream_rpc_method_handler(call.server_stream)
        return grpc.unary_unary_rpc_method_handler(call.unary)


def _json_codec(method: Method) -> tuple[Decoder, Encoder]:
    return (lambda data: decode_json(data, method.request_type)), encode_json


def _proto_codec(method: Method) -> tuple[Decoder, Encoder]:
    return (lambda data: decode_proto(data, method.request_type)), (lambda m: m.SerializeToString())


class _Call:
    """The four call shapes around one bound method, with errors mapped to statuses."""

    def __init__(
        self, dispatcher: Dispatcher, service: str, method: Method, decode: Decoder, encode: Encoder
    ) -> None:
        self.counters = dispatcher.counters
        self.dispatcher = dispatcher
        self.service = service
        self.method = method
        self.decode = decode
        self.encode = encode

    async def unary(self, data: bytes, grpc_context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        async with _serving(self, grpc_context) as ctx:
            response = await self.method.func(self.decode(data), ctx)
            return self.encode(response)
        raise AssertionError("unreachable")  # _serving aborts on every error

    async def server_stream(
        self, data: bytes, grpc_context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        async with _serving(self, grpc_context) as ctx:
            async for response in self.method.func(self.decode(data), ctx):
                yield self.encode(response)

    async def client_stream(
        self, requests: AsyncIterator[bytes], grpc_context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        async with _serving(self, grpc_context) as ctx:
            response = await self.method.func(self._decoded(requests), ctx)
            return self.encode(response)
        raise AssertionError("unreachable")

    async def bidi(
        self, requests: AsyncIterator[bytes], grpc_context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        async with _serving(self, grpc_context) as ctx:
            async for response in self.method.func(self._decoded(requests), ctx):
                yield self.encode(response)

    async def _decoded(self, requests: AsyncIterator[bytes]) -> AsyncIterator[Message]:
        async for data in requests:
            yield self.decode(data)

    async def enter(self, metadata: Iterable[tuple[str, Any]], peer: str, deadline: float | None) -> Context:
        """Count the call and build its ``Context``, with the caller's identity, admitted or refused."""
        self.counters.requests += 1
        dispatcher = self.dispatcher
        values = {k: v for k, v in metadata if isinstance(v, str)}
        relayed = values.pop(RELAY_KEY, None)
        if relayed is None or relayed != dispatcher.relay_secret:
            values[REMOTE_ADDRESS_KEY] = peer
        context = Context(
            namespace=validate_namespace(values.get(NAMESPACE_KEY) or DEFAULT_NAMESPACE),
            metadata=values,
            service=self.service,
            endpoint=self.method.endpoint,
            deadline=deadline,
        )
        if dispatcher.authenticate is not None:
            context.account, context.auth_error = await dispatcher.authenticate(context.metadata)
        if dispatcher.admit is not None:
            dispatcher.admit(context)
        return context

    async def begin(self, metadata: Iterable[tuple[str, Any]], peer: str, deadline: float | None) -> Context:
        """``enter``, and make the call's ``Context`` the current one (of the caller's context)."""
        context = await self.enter(metadata, peer, deadline)
        _current.set(context)
        return context

    def failed(self, error: MicroError, peer: str) -> None:
        """Count ``error`` and log it if it refused access."""
        self.counters.errors += 1
        if not error.id:
            error.id = self.service
        if error.code in (401, 403):  # refused access is worth an operator's eye; the token is not logged
            log.warning("refused %s %s from %s: %s", self.service, self.method.endpoint, peer, error.detail)

    @contextmanager
    def errors_counted(self, peer: str) -> Iterator[None]:
        """Count (and log) what the block raises; anything not a ``MicroError`` becomes a logged 500."""
        try:
            yield
        except MicroError as error:
            self.failed(error, peer)
            raise
        except Exception as exc:
            unexpected = self.unexpected(exc)
            self.failed(unexpected, peer)
            raise unexpected from None

    def unexpected(self, exc: Exception) -> MicroError:
        log.exception("unexpected error in %s %s", self.service, self.method.endpoint)
        return InternalServerError(f"{self.method.endpoint} failed: {type(exc).__name__}: {exc}")


class _serving:
    """Builds the handler's Context, counts the call and turns exceptions into statuses."""

    def __init__(self, call: _Call, grpc_context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.call = call
        self.grpc_context = grpc_context

    async def __aenter__(self) -> Context:
        remaining = self.grpc_context.time_remaining()
        try:
            context = await self.call.enter(
                self.grpc_context.invocation_metadata() or (),
                peer_host(self.grpc_context.peer() or ""),
                None if remaining is None else time.monotonic() + remaining,
            )
        except MicroError as error:
            await self._abort(error)
            raise
        _current.set(context)  # each call runs in its own task: nothing to reset
        return context

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any
    ) -> bool:
        if exc is None or not isinstance(exc, Exception) or _is_abort(exc):
            return False
        await self._abort(exc if isinstance(exc, MicroError) else self.call.unexpected(exc))
        return False  # abort raises; this is never reached

    async def _abort(self, error: MicroError) -> None:
        self.call.failed(error, peer_host(self.grpc_context.peer() or ""))
        await self.grpc_context.abort(
            grpc_status_for(error), error.detail, trailing_metadata=trailing_metadata_for(error)
        )


class LocalUnary:
    """A unary method served to a caller that is not a gRPC server's: bytes in, bytes out.

    ``__call__`` raises ``MicroError`` (anything else a handler raises becomes a
    logged 500), so the caller writes the status itself. It sets the handler's
    ``Context`` as the current one: run it in a context of its own
    (``contextvars.copy_context().run``, or a task).
    """

    def __init__(self, call: _Call) -> None:
        self._call = call

    async def __call__(
        self, data: bytes, metadata: Iterable[tuple[str, str]], peer: str, deadline: float | None
    ) -> bytes:
        call = self._call
        with call.errors_counted(peer):
            context = await call.begin(metadata, peer, deadline)
            return call.encode(await call.method.func(call.decode(data), context))
        raise AssertionError("unreachable")  # errors_counted re-raises


class LocalStream:
    """A streaming method (any of the three shapes) served to a caller that is not a gRPC server's.

    ``__call__`` takes the request messages' bytes as an async iterator and
    yields the responses' bytes; errors as ``LocalUnary``'s. A server-streaming
    method reads exactly one request.
    """

    def __init__(self, call: _Call) -> None:
        self._call = call

    async def __call__(
        self,
        requests: AsyncIterator[bytes],
        metadata: Iterable[tuple[str, str]],
        peer: str,
        deadline: float | None,
    ) -> AsyncIterator[bytes]:
        call = self._call
        method = call.method
        with call.errors_counted(peer):
            context = await call.begin(metadata, peer, deadline)
            if not method.client_streaming:
                request = await anext(requests, None)
                if request is None:
                    raise BadRequest("the call sent no request message")
                async for response in method.func(call.decode(request), context):
                    yield call.encode(response)
            elif not method.server_streaming:
                yield call.encode(await method.func(call._decoded(requests), context))
            else:
                async for response in method.func(call._decoded(requests), context):
                    yield call.encode(response)


class Lane(Protocol):
    """A bidirectional call as a lane method sees it: request messages in, responses out.

    The server that parses the call (the relay) implements it. Request
    messages are the bytes of each, not decoded: the lane decodes them.
    """

    def take(self) -> bytes | None:
        """The next request message that has arrived, or ``None`` if none has (yet)."""
        ...

    async def wait(self) -> bool:
        """Wait until a request message has arrived (``True``) or the caller ended its side
        (``False``); first until the caller has read enough of the responses sent so far."""
        ...

    def send(self, response: bytes) -> None:
        """Send a response message now (dropped if the caller is gone: the lane is cancelled)."""
        ...


class LocalLane:
    """A bidirectional method served by its lane (``bind``), to a caller that is not a gRPC server's.

    ``__call__`` runs the lane with the call's ``Context``; errors as ``LocalUnary``'s.
    """

    def __init__(self, call: _Call, lane: Callable[[Lane, Context], Awaitable[None]]) -> None:
        self._call = call
        self._lane = lane

    async def __call__(
        self, lane: Lane, metadata: Iterable[tuple[str, str]], peer: str, deadline: float | None
    ) -> None:
        call = self._call
        with call.errors_counted(peer):
            context = await call.begin(metadata, peer, deadline)
            await self._lane(lane, context)


def peer_host(peer: str) -> str:
    """The host of a gRPC peer: ``ipv4:127.0.0.1:5000`` -> ``127.0.0.1``, ``ipv6:[::1]:5000`` -> ``::1``."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        host = rest.rpartition(":")[0] or rest
        return host.strip("[]")
    return peer


def _is_abort(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AbortError) or type(exc).__name__ == "AbortError"
