"""How the gateway reaches an endpoint: in-process for building blocks, over gRPC for user services.

Both sides speak wire-format bytes in the four call shapes, so the HTTP layer
transcodes once whichever serves the call. ``Remote`` uses the proxy's
directory target and channel pool: a node that cannot be reached is marked
dead and the call moves to one other node, as long as no response has arrived.
Every failure leaves here as a ``MicroError``.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import Message

from micro._binding import Method
from micro._dispatch import Admit, Counters
from micro._grpc_errors import error_from_rpc
from micro.auth import Account
from micro.codec import decode_proto
from micro.context import Context
from micro.errors import (
    BadGateway,
    GatewayTimeout,
    InternalServerError,
    MicroError,
    ServiceUnavailable,
)
from micro_daemon.proxy.channels import ChannelPool
from micro_daemon.proxy.directory import Target
from micro_daemon.proxy.forward import RequestPump, has_error_trailer, unreachable

__all__ = ["ERROR_ID", "CallInfo", "Local", "Remote", "Upstream", "unexpected"]

log = logging.getLogger("micro.api")

ERROR_ID = "micro.api"
ATTEMPTS = 2  # the first node, then one other

Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class CallInfo:
    """What travels with one call: the caller's namespace, its metadata and the time it may take.

    ``account`` is the caller's (verified), ``auth_error`` why a token it sent was refused.
    """

    namespace: str
    metadata: Metadata
    timeout: float | None
    account: Account | None = None
    auth_error: MicroError | None = None


class Upstream(abc.ABC):
    """One endpoint's server, called with and answering wire-format bytes.

    Every method raises ``MicroError`` only. ``server_stream`` and ``bidi``
    return once the call is under way (a failure to start raises there), and
    their iterators end the upstream call when closed.
    """

    @abc.abstractmethod
    async def unary(self, request: bytes, call: CallInfo) -> bytes:
        """One request, one response."""

    @abc.abstractmethod
    async def server_stream(self, request: bytes, call: CallInfo) -> AsyncGenerator[bytes, None]:
        """Start a server-streaming call; iterate the result for its responses."""

    @abc.abstractmethod
    async def client_stream(self, requests: AsyncIterator[bytes], call: CallInfo) -> bytes:
        """Send every request of ``requests``, then return the one response."""

    @abc.abstractmethod
    async def bidi(self, requests: AsyncIterator[bytes], call: CallInfo) -> AsyncGenerator[bytes, None]:
        """Start a bidirectional call fed by ``requests``; iterate the result for its responses."""


def unexpected(exc: BaseException) -> InternalServerError:
    """The error a caller sees for an exception nobody expected: no traceback, a short reason."""
    reason = str(exc) or type(exc).__name__
    return InternalServerError(f"error during request: {reason}", id=ERROR_ID)


class Local(Upstream):
    """A building block's bound method, called in this process with a ``Context``."""

    def __init__(
        self, service: str, method: Method, counters: Counters, *, admit: Admit | None = None
    ) -> None:
        self.service = service
        self.method = method
        self.counters = counters
        self.admit = admit

    async def unary(self, request: bytes, call: CallInfo) -> bytes:
        message = decode_proto(request, self.method.request_type)
        with self._serving():
            async with asyncio.timeout(call.timeout):
                response: Message = await self.method.func(message, self._context(call))
        return response.SerializeToString()

    async def server_stream(self, request: bytes, call: CallInfo) -> AsyncGenerator[bytes, None]:
        message = decode_proto(request, self.method.request_type)
        self.counters.requests += 1
        return self._responses(self.method.func(message, self._context(call)))

    async def client_stream(self, requests: AsyncIterator[bytes], call: CallInfo) -> bytes:
        with self._serving():
            async with asyncio.timeout(call.timeout):
                response: Message = await self.method.func(self._decoded(requests), self._context(call))
        return response.SerializeToString()

    async def bidi(self, requests: AsyncIterator[bytes], call: CallInfo) -> AsyncGenerator[bytes, None]:
        self.counters.requests += 1
        return self._responses(self.method.func(self._decoded(requests), self._context(call)))

    async def _responses(self, responses: AsyncGenerator[Message, None]) -> AsyncGenerator[bytes, None]:
        try:
            with self._errors():
                async for response in responses:
                    yield response.SerializeToString()
        finally:
            with contextlib.suppress(Exception):
                await responses.aclose()

    async def _decoded(self, requests: AsyncIterator[bytes]) -> AsyncIterator[Message]:
        async for data in requests:
            yield decode_proto(data, self.method.request_type)

    def _context(self, call: CallInfo) -> Context:
        """The handler's context; refused here, as the ``Dispatcher`` would, if the caller may not call it."""
        context = Context(
            namespace=call.namespace,
            metadata=dict(call.metadata),
            service=self.service,
            endpoint=self.method.endpoint,
            deadline=None if call.timeout is None else time.monotonic() + call.timeout,
            account=call.account,
            auth_error=call.auth_error,
        )
        if self.admit is not None:
            self.admit(context)
        return context

    @contextlib.contextmanager
    def _serving(self) -> Iterator[None]:
        self.counters.requests += 1
        with self._errors():
            yield

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except MicroError as error:
            self.counters.errors += 1
            error.id = error.id or self.service
            raise
        except TimeoutError:
            self.counters.errors += 1
            raise GatewayTimeout(
                f"{self.method.endpoint} of {self.service!r} timed out", id=ERROR_ID
            ) from None
        except Exception as exc:
            self.counters.errors += 1
            log.exception("unexpected error in %s %s", self.service, self.method.endpoint)
            raise unexpected(exc) from exc


class Remote(Upstream):
    """A user service's method at gRPC ``path``, on the nodes of its directory ``target``."""

    def __init__(self, target: Target, path: str, pool: ChannelPool) -> None:
        self.target = target
        self.path = path
        self.pool = pool
        self._unary: dict[str, tuple[grpc.aio.Channel, Any]] = {}  # address -> (channel, its callable)

    async def unary(self, request: bytes, call: CallInfo) -> bytes:
        failed: str | None = None
        last: grpc.aio.AioRpcError | None = None
        for _ in range(ATTEMPTS):
            address = self.target.pick(self.pool.dead, failed)
            if address is None:
                break
            rpc = self._unary_callable(address)
            try:
                response: bytes = await rpc(request, metadata=call.metadata, timeout=call.timeout)
            except grpc.aio.AioRpcError as exc:
                if not unreachable(exc):
                    raise self._error(exc) from exc
                self.pool.mark_dead(address)
                failed, last = address, exc
                continue
            return response
        raise self._unavailable(last)

    def _unary_callable(self, address: str) -> Any:
        channel = self.pool.channel(address)
        cached = self._unary.get(address)
        if cached is None or cached[0] is not channel:  # a node's channel is replaced if it comes back
            for gone in [a for a in self._unary if a not in self.target.nodes]:
                del self._unary[gone]  # nodes come and go with every restart: keep only live ones
            cached = self._unary[address] = (channel, channel.unary_unary(self.path))
        return cached[1]

    async def server_stream(self, request: bytes, call: CallInfo) -> AsyncGenerator[bytes, None]:
        rpc = await self._open(
            lambda channel: channel.unary_stream(self.path)(request, metadata=call.metadata, timeout=None)
        )
        return self._responses(rpc, None)

    async def client_stream(self, requests: AsyncIterator[bytes], call: CallInfo) -> bytes:
        rpc = await self._open(
            lambda channel: channel.stream_unary(self.path)(metadata=call.metadata, timeout=call.timeout)
        )
        pump = RequestPump(requests, rpc)
        try:
            response: bytes = await rpc
        except grpc.aio.AioRpcError as exc:
            pump.raise_error()
            raise self._error(exc) from exc
        except asyncio.CancelledError:
            pump.raise_error()
            raise
        finally:
            await pump.stop()
            rpc.cancel()
        return response

    async def bidi(self, requests: AsyncIterator[bytes], call: CallInfo) -> AsyncGenerator[bytes, None]:
        rpc = await self._open(
            lambda channel: channel.stream_stream(self.path)(metadata=call.metadata, timeout=None)
        )
        return self._responses(rpc, RequestPump(requests, rpc))

    async def _responses(self, rpc: Any, pump: RequestPump | None) -> AsyncGenerator[bytes, None]:
        try:
            async for response in rpc:
                yield response
        except grpc.aio.AioRpcError as exc:
            if pump is not None:
                pump.raise_error()
            raise self._error(exc) from exc
        except asyncio.CancelledError:
            if pump is not None:
                pump.raise_error()
            raise
        finally:
            if pump is not None:
                await pump.stop()
            rpc.cancel()

    async def _open(self, start: Callable[[grpc.aio.Channel], Any]) -> Any:
        """Start a streaming call on a node that accepts the connection."""
        failed: str | None = None
        last: grpc.aio.AioRpcError | None = None
        for _ in range(ATTEMPTS):
            address = self.target.pick(self.pool.dead, failed)
            if address is None:
                break
            rpc = start(self.pool.channel(address))
            try:
                await rpc.wait_for_connection()  # no request is consumed before this succeeds
            except grpc.aio.AioRpcError as exc:
                rpc.cancel()
                if not unreachable(exc):
                    raise self._error(exc) from exc
                self.pool.mark_dead(address)
                failed, last = address, exc
                continue
            return rpc
        raise self._unavailable(last)

    def _error(self, exc: grpc.aio.AioRpcError) -> MicroError:
        name = self.target.name
        if has_error_trailer(exc):
            return error_from_rpc(exc, service=name)
        code = exc.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return GatewayTimeout(f"service {name!r} did not answer in time", id=ERROR_ID)
        if code == grpc.StatusCode.UNAVAILABLE:
            return ServiceUnavailable(f"service {name!r} is unavailable: {exc.details()}", id=ERROR_ID)
        if code == grpc.StatusCode.CANCELLED:
            return BadGateway(f"service {name!r} ended the call: {exc.details() or 'cancelled'}", id=ERROR_ID)
        return error_from_rpc(exc, service=name)

    def _unavailable(self, last: grpc.aio.AioRpcError | None) -> ServiceUnavailable:
        reason = f": {last.details()}" if last is not None else ": it has no nodes"
        return ServiceUnavailable(f"service {self.target.name!r} is unavailable{reason}", id=ERROR_ID)
