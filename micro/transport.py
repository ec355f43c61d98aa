"""The transport seam: how a client's calls reach a server.

``Client`` and the building blocks' typed clients speak only to a
``Transport``. ``connect`` picks the real one: ``Http2Transport`` (gRPC over
HTTP/2 in asyncio) for plaintext, ``GrpcTransport`` (grpcio) for TLS.
``MockTransport`` answers from a function, so tests of client code need no
socket.
"""

from __future__ import annotations

import abc
import os
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from micro.errors import SetupError

if TYPE_CHECKING:
    import grpc.aio

__all__ = ["GrpcTransport", "Metadata", "MockTransport", "Transport", "connect"]

Metadata = Sequence[tuple[str, str]]


class Transport(abc.ABC):
    """Carries one call's request bytes to a server and its response bytes back.

    Implementations raise ``micro.errors.MicroError`` subclasses only (for a
    refused connection, ``ConnectError``), never a library's own exceptions.
    """

    @abc.abstractmethod
    async def unary(self, path: str, request: bytes, *, metadata: Metadata, timeout: float | None) -> bytes:
        """Send one request to ``path`` and return the one response."""

    @abc.abstractmethod
    def server_stream(
        self, path: str, request: bytes, *, metadata: Metadata, timeout: float | None
    ) -> AsyncIterator[bytes]:
        """Send one request to ``path`` and yield each response as it arrives."""

    async def client_stream(
        self, path: str, requests: Sequence[bytes], *, metadata: Metadata, timeout: float | None
    ) -> bytes:
        """Send every request of ``requests`` to ``path``, then return the one response."""
        raise NotImplementedError(f"{type(self).__name__} does not stream requests")

    def bidi_stream(
        self, path: str, requests: AsyncIterable[bytes], *, metadata: Metadata, timeout: float | None
    ) -> AsyncIterator[bytes]:
        """Send ``requests`` as they come and yield each response as it arrives (bidirectional)."""
        raise NotImplementedError(f"{type(self).__name__} does not stream both ways")

    async def close(self) -> None:  # noqa: B027  # optional hook
        """Release connections. Must not raise."""


class GrpcTransport(Transport):
    """A gRPC channel to ``address`` (``host:port``), opened on first use.

    With ``secure`` the channel speaks TLS and trusts the system's root
    certificates, or only the CA certificates of the PEM file ``ca_file``
    (which implies ``secure``). A failed handshake raises ``TLSError``; an
    unreadable ``ca_file`` raises ``SetupError`` on first use.
    """

    def __init__(
        self, address: str, *, secure: bool = False, ca_file: str | os.PathLike[str] | None = None
    ) -> None:
        self.address = address
        self.ca_file = os.fspath(ca_file) if ca_file else None
        self.secure = secure or self.ca_file is not None
        self._channel: grpc.aio.Channel | None = None

    @property
    def _trust(self) -> str:
        if not self.secure:
            return ""
        return f"the CA file {self.ca_file}" if self.ca_file else "this machine's trusted CAs"

    def _errors(self) -> AbstractContextManager[None]:
        # Imported here: micro._grpc_errors imports grpc, which plaintext callers never need.
        from micro._grpc_errors import map_grpc_exceptions

        return map_grpc_exceptions(address=self.address, trust=self._trust)

    def _open(self) -> grpc.aio.Channel:
        if self._channel is None:
            import grpc.aio

            options = [
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                # A channel of its own connects afresh: grpc's shared subchannels would hand a new
                # client the backoff of an old one whose server went away (a restarted daemon).
                ("grpc.use_local_subchannel_pool", 1),
            ]
            if self.secure:
                roots = _read_ca_file(self.ca_file) if self.ca_file else None
                credentials = grpc.ssl_channel_credentials(root_certificates=roots)
                self._channel = grpc.aio.secure_channel(self.address, credentials, options=options)
            else:
                self._channel = grpc.aio.insecure_channel(self.address, options=options)
        return self._channel

    async def unary(self, path: str, request: bytes, *, metadata: Metadata, timeout: float | None) -> bytes:
        call = self._open().unary_unary(path)
        with self._errors():
            response: bytes = await call(request, metadata=tuple(metadata), timeout=timeout)
        return response

    async def server_stream(
        self, path: str, request: bytes, *, metadata: Metadata, timeout: float | None
    ) -> AsyncIterator[bytes]:
        call = self._open().unary_stream(path)(request, metadata=tuple(metadata), timeout=timeout)
        try:
            with self._errors():
                async for response in call:
                    yield response
        finally:
            call.cancel()

    async def client_stream(
        self, path: str, requests: Sequence[bytes], *, metadata: Metadata, timeout: float | None
    ) -> bytes:
        call = self._open().stream_unary(path)
        with self._errors():
            response: bytes = await call(iter(requests), metadata=tuple(metadata), timeout=timeout)
        return response

    async def bidi_stream(
        self, path: str, requests: AsyncIterable[bytes], *, metadata: Metadata, timeout: float | None
    ) -> AsyncIterator[bytes]:
        import asyncio

        call = self._open().stream_stream(path)(metadata=tuple(metadata), timeout=timeout)
        writer = asyncio.create_task(_write_all(call, requests))
        try:
            with self._errors():
                async for response in call:
                    yield response
        except (Exception, asyncio.CancelledError):
            # A request that failed to come (say, a malformed line) cancelled the call: raise
            # that reason, not the cancellation it caused.
            failed = writer_error(writer)
            if failed is not None:
                raise failed from None
            raise
        finally:
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            call.cancel()
        failed = writer_error(writer)
        if failed is not None:
            raise failed

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()


def connect(
    address: str, *, secure: bool = False, ca_file: str | os.PathLike[str] | None = None
) -> Transport:
    """The transport micro's clients use for ``address``.

    Plaintext: ``Http2Transport`` (gRPC over HTTP/2 in asyncio, a third of
    grpcio's CPU per call). TLS: ``GrpcTransport``, whose handshake errors
    micro explains.
    """
    if secure or ca_file:
        return GrpcTransport(address, secure=secure, ca_file=ca_file)
    from micro.http2_transport import Http2Transport

    return Http2Transport(address)


UnaryHandler = Callable[[str, bytes, Metadata], Awaitable[bytes]]


class MockTransport(Transport):
    """Answers every unary call with ``handler(path, request, metadata)``; streams yield that one answer."""

    def __init__(self, handler: UnaryHandler) -> None:
        self.handler = handler

    async def unary(self, path: str, request: bytes, *, metadata: Metadata, timeout: float | None) -> bytes:
        return await self.handler(path, request, metadata)

    async def server_stream(
        self, path: str, request: bytes, *, metadata: Metadata, timeout: float | None
    ) -> AsyncIterator[bytes]:
        yield await self.handler(path, request, metadata)


def _read_ca_file(path: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SetupError(
            f"cannot read the CA file {path} ({exc.strerror or exc}): give the PEM file of the CA "
            "that signed the server's certificate",
            id="micro.transport",
        ) from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise SetupError(
            f"the CA file {path} holds no PEM certificate (-----BEGIN CERTIFICATE-----): give the PEM "
            "file of the CA that signed the server's certificate",
            id="micro.transport",
        )
    return data


def writer_error(writer: Any) -> Exception | None:
    """Why a task writing a call's requests gave up (it returns the error), if it did."""
    error: Exception | None = writer.result() if writer.done() and not writer.cancelled() else None
    return error


async def _write_all(call: Any, requests: AsyncIterable[bytes]) -> Exception | None:
    """Write ``requests`` into ``call``; if producing one fails, cancel the call and return why."""
    import grpc.aio

    try:
        async for request in requests:
            await call.write(request)
        await call.done_writing()
    except (grpc.RpcError, grpc.aio.UsageError):
        return None  # the call ended first; its status says why
    except Exception as exc:
        call.cancel()
        return exc
    return None
