"""Forwarding one call to a node of its service, in each of the four call shapes.

Request and response bytes pass through untouched unless a ``Transcoder``
converts JSON callers' bodies. The caller's metadata goes along (minus
hop-by-hop keys), with the time left of its deadline. A connection that fails
before any response marks the node dead and the call moves to another node;
any other upstream status reaches the caller unchanged, with its trailers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import grpc.aio
from google.protobuf.message import Message

from micro._grpc_errors import ERROR_METADATA_KEY, grpc_status_for, trailing_metadata_for
from micro._metadata import CODEC_KEY, RELAY_KEY
from micro.codec import decode_json, decode_proto, encode_json
from micro.errors import BadRequest, MicroError, ServiceUnavailable
from micro_daemon.proxy.channels import ChannelPool
from micro_daemon.proxy.directory import ERROR_ID, Target

__all__ = ["Forward", "RequestPump", "Transcoder", "abort", "has_error_trailer", "unreachable"]

ATTEMPTS = 2  # the first node, then one other
_HOP_BY_HOP = frozenset({"user-agent", "te", "host", "connection", "content-type", CODEC_KEY, RELAY_KEY})

ServicerContext = Any  # grpc.aio.ServicerContext; grpc is untyped
Metadata = tuple[tuple[str, str | bytes], ...]


@dataclass(frozen=True)
class Transcoder:
    """JSON bodies to and from one method's proto messages."""

    request_type: type[Message]
    response_type: type[Message]

    def request(self, data: bytes) -> bytes:
        return decode_json(data, self.request_type).SerializeToString()

    def response(self, data: bytes) -> bytes:
        return encode_json(decode_proto(data, self.response_type))


class Forward:
    """The calls of one route: a target service, an upstream path, a shape and an optional transcoder."""

    def __init__(
        self,
        target: Target,
        path: str,
        pool: ChannelPool,
        *,
        client_streaming: bool = False,
        server_streaming: bool = False,
        transcoder: Transcoder | None = None,
    ) -> None:
        self.target = target
        self.path = path
        self.pool = pool
        self.client_streaming = client_streaming
        self.server_streaming = server_streaming
        self.transcoder = transcoder

    def handler(self) -> grpc.RpcMethodHandler:
        """The gRPC method handler of this route's shape."""
        if self.client_streaming and self.server_streaming:
            return grpc.stream_stream_rpc_method_handler(self.bidi)
        if self.client_streaming:
            return grpc.stream_unary_rpc_method_handler(self.client_stream)
        if self.server_streaming:
            return grpc.unary_stream_rpc_method_handler(self.server_stream)
        return grpc.unary_unary_rpc_method_handler(self.unary)

    async def any_shape(
        self, requests: AsyncIterator[bytes], context: ServicerContext
    ) -> AsyncIterator[bytes]:
        """Serve this route from a stream-stream handler, whatever the caller's shape."""
        if self.client_streaming and self.server_streaming:
            async for response in self.bidi(requests, context):
                yield response
        elif self.client_streaming:
            yield await self.client_stream(requests, context)
        else:
            request = await _single(requests, context)
            if self.server_streaming:
                async for response in self.server_stream(request, context):
                    yield response
            else:
                yield await self.unary(request, context)

    async def unary(self, request: bytes, context: ServicerContext) -> bytes:
        try:
            return await self._unary(request, context)
        except MicroError as error:
            await abort(context, error)

    async def server_stream(self, request: bytes, context: ServicerContext) -> AsyncIterator[bytes]:
        try:
            async for response in self._server_stream(request, context):
                yield response
        except MicroError as error:
            await abort(context, error)

    async def client_stream(self, requests: AsyncIterator[bytes], context: ServicerContext) -> bytes:
        try:
            return await self._client_stream(requests, context)
        except MicroError as error:
            await abort(context, error)

    async def bidi(self, requests: AsyncIterator[bytes], context: ServicerContext) -> AsyncIterator[bytes]:
        try:
            async for response in self._bidi(requests, context):
                yield response
        except MicroError as error:
            await abort(context, error)

    async def _unary(self, request: bytes, context: ServicerContext) -> bytes:
        if self.transcoder is not None:
            request = self.transcoder.request(request)
        metadata = forward_metadata(context.invocation_metadata())
        failed: str | None = None
        last: grpc.aio.AioRpcError | None = None
        for _ in range(ATTEMPTS):
            address = self.target.pick(self.pool.dead, failed)
            if address is None:
                break
            call = self.pool.channel(address).unary_unary(self.path)
            try:
                response: bytes = await call(request, metadata=metadata, timeout=context.time_remaining())
            except grpc.aio.AioRpcError as exc:
                await self._unless_unreachable(context, exc)
                self.pool.mark_dead(address)
                failed, last = address, exc
                continue
            return response if self.transcoder is None else self.transcoder.response(response)
        raise self._unavailable(last)

    async def _server_stream(self, request: bytes, context: ServicerContext) -> AsyncIterator[bytes]:
        if self.transcoder is not None:
            request = self.transcoder.request(request)
        metadata = forward_metadata(context.invocation_metadata())
        failed: str | None = None
        last: grpc.aio.AioRpcError | None = None
        for _ in range(ATTEMPTS):
            address = self.target.pick(self.pool.dead, failed)
            if address is None:
                break
            call = self.pool.channel(address).unary_stream(self.path)(
                request, metadata=metadata, timeout=context.time_remaining()
            )
            started = False
            try:
                async for response in call:
                    started = True
                    yield response if self.transcoder is None else self.transcoder.response(response)
                return
            except grpc.aio.AioRpcError as exc:
                if started:
                    await relay(context, exc)
                await self._unless_unreachable(context, exc)
                self.pool.mark_dead(address)
                failed, last = address, exc
            finally:
                call.cancel()
        raise self._unavailable(last)

    async def _client_stream(self, requests: AsyncIterator[bytes], context: ServicerContext) -> bytes:
        call = await self._open(lambda channel: channel.stream_unary(self.path), context)
        pump = RequestPump(requests, call, self.transcoder)
        try:
            response: bytes = await call
        except grpc.aio.AioRpcError as exc:
            await relay(context, exc)
        except asyncio.CancelledError:
            pump.raise_error()
            raise
        finally:
            await pump.stop()
            call.cancel()
        return response if self.transcoder is None else self.transcoder.response(response)

    async def _bidi(self, requests: AsyncIterator[bytes], context: ServicerContext) -> AsyncIterator[bytes]:
        call = await self._open(lambda channel: channel.stream_stream(self.path), context)
        pump = RequestPump(requests, call, self.transcoder)
        try:
            async for response in call:
                yield response if self.transcoder is None else self.transcoder.response(response)
        except grpc.aio.AioRpcError as exc:
            await relay(context, exc)
        except asyncio.CancelledError:
            pump.raise_error()
            raise
        finally:
            await pump.stop()
            call.cancel()

    async def _open(self, open_call: Callable[[grpc.aio.Channel], Any], context: ServicerContext) -> Any:
        """Start a request-streaming call on a node that accepts the connection."""
        metadata = forward_metadata(context.invocation_metadata())
        failed: str | None = None
        last: grpc.aio.AioRpcError | None = None
        for _ in range(ATTEMPTS):
            address = self.target.pick(self.pool.dead, failed)
            if address is None:
                break
            call = open_call(self.pool.channel(address))(metadata=metadata, timeout=context.time_remaining())
            try:
                await call.wait_for_connection()  # no request is consumed before this succeeds
            except grpc.aio.AioRpcError as exc:
                call.cancel()
                await self._unless_unreachable(context, exc)
                self.pool.mark_dead(address)
                failed, last = address, exc
                continue
            return call
        raise self._unavailable(last)

    @staticmethod
    async def _unless_unreachable(context: ServicerContext, exc: grpc.aio.AioRpcError) -> None:
        """Relay ``exc`` to the caller unless it says the node could not be reached."""
        if not unreachable(exc):
            await relay(context, exc)

    def _unavailable(self, last: grpc.aio.AioRpcError | None) -> ServiceUnavailable:
        reason = f": {last.details()}" if last is not None else ""
        return ServiceUnavailable(f"service {self.target.name!r} is unavailable{reason}", id=ERROR_ID)


class RequestPump:
    """Copies the caller's request stream into an upstream call, in its own task (proxy and gateway)."""

    def __init__(
        self, requests: AsyncIterator[bytes], call: Any, transcoder: Transcoder | None = None
    ) -> None:
        self.error: MicroError | None = None
        self._task = asyncio.create_task(self._run(requests, call, transcoder))

    async def _run(self, requests: AsyncIterator[bytes], call: Any, transcoder: Transcoder | None) -> None:
        try:
            async for request in requests:
                await call.write(request if transcoder is None else transcoder.request(request))
            await call.done_writing()
        except MicroError as error:
            self.error = error
            call.cancel()  # the main side sees a cancelled call and raises this error instead
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the upstream call ended; its status tells the caller why

    def raise_error(self) -> None:
        """Raise the pump's error if it cancelled the call (and not the task being cancelled)."""
        task = asyncio.current_task()
        if self.error is not None and (task is None or not task.cancelling()):
            raise self.error

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def forward_metadata(metadata: Any) -> Metadata:
    """The caller's metadata without hop-by-hop keys, to send upstream."""
    return tuple(
        (key, value)
        for key, value in metadata or ()
        if key not in _HOP_BY_HOP and not key.startswith((":", "grpc-"))
    )


async def relay(context: ServicerContext, exc: grpc.aio.AioRpcError) -> NoReturn:
    """End the caller's call with the upstream status, details and trailing metadata."""
    trailing = tuple(exc.trailing_metadata() or ())
    await context.abort(exc.code(), exc.details() or "", trailing_metadata=trailing)
    raise AssertionError("abort raises")


async def abort(context: ServicerContext, error: MicroError) -> NoReturn:
    """End the caller's call with ``error`` as a micro error."""
    await context.abort(grpc_status_for(error), error.detail, trailing_metadata=trailing_metadata_for(error))
    raise AssertionError("abort raises")


async def _single(requests: AsyncIterator[bytes], context: ServicerContext) -> bytes:
    async for request in requests:
        return request
    await abort(context, BadRequest("the call sent no request message", id=ERROR_ID))


def unreachable(exc: grpc.aio.AioRpcError) -> bool:
    """The node could not be reached (no service answered): another node may serve the call."""
    return bool(exc.code() == grpc.StatusCode.UNAVAILABLE and not has_error_trailer(exc))


def has_error_trailer(exc: grpc.aio.AioRpcError) -> bool:
    return any(key == ERROR_METADATA_KEY for key, _ in exc.trailing_metadata() or ())
