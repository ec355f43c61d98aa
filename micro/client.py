"""Calling services by name, with typed messages or JSON."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Final, Generic, Literal, TypeVar

from google.protobuf.message import Message

from micro._metadata import AUTHORIZATION_KEY, CODEC_KEY, NAMESPACE_KEY, SERVICE_KEY, json_path
from micro.codec import decode_proto
from micro.context import DEFAULT_NAMESPACE, current_context, validate_namespace
from micro.credentials import Credentials, from_environment
from micro.errors import BadRequest, MicroError
from micro.transport import Metadata, Transport

__all__ = ["AUTO", "Client", "OpenBidi"]

M = TypeVar("M", bound=Message)

DEFAULT_TIMEOUT = 30.0
AUTO: Final = "auto"
"""``credentials=AUTO``: find them in the environment (``micro.credentials.from_environment``)."""


class Client:
    """Calls services through one transport, as one namespace.

    ``call``/``stream`` take and return generated message types and use the
    method's own gRPC path; ``call_json``/``stream_json`` name the endpoint as
    ``Handler.Method`` and let the server transcode JSON. Every call carries
    the access token of ``credentials`` (``None``: anonymous calls).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        timeout: float | None = DEFAULT_TIMEOUT,
        metadata: Mapping[str, str] | None = None,
        credentials: Credentials | Literal["auto"] | None = AUTO,
    ) -> None:
        self.transport = transport
        self.namespace = validate_namespace(namespace)
        self.timeout = timeout
        self.metadata = dict(metadata or {})
        self._credentials = credentials

    @property
    def credentials(self) -> Credentials | None:
        """What the calls are authenticated with (found on first use when ``AUTO``)."""
        if self._credentials == AUTO:
            self._credentials = from_environment(getattr(self.transport, "address", None))
        return self._credentials

    async def call(self, service: str, path: str, request: Message, response_type: type[M]) -> M:
        """Call the unary RPC at gRPC ``path`` (``/pkg.Service/Method``) of ``service``."""
        data = await self.transport.unary(
            path, request.SerializeToString(), metadata=await self._metadata(service), timeout=self._timeout()
        )
        return decode_proto(data, response_type)

    async def stream(
        self, service: str, path: str, request: Message, response_type: type[M]
    ) -> AsyncIterator[M]:
        """Call the server-streaming RPC at ``path`` and yield each response."""
        responses = self.transport.server_stream(
            path, request.SerializeToString(), metadata=await self._metadata(service), timeout=None
        )
        async for data in responses:
            yield decode_proto(data, response_type)

    async def call_client_stream(
        self, service: str, path: str, requests: Sequence[Message], response_type: type[M]
    ) -> M:
        """Send ``requests`` to the client-streaming RPC at ``path`` and return its one response."""
        data = await self.transport.client_stream(
            path,
            [r.SerializeToString() for r in requests],
            metadata=await self._metadata(service),
            timeout=self._timeout(),
        )
        return decode_proto(data, response_type)

    async def bidi(
        self, service: str, path: str, requests: AsyncIterable[Message], response_type: type[M]
    ) -> AsyncIterator[M]:
        """Call the bidirectional RPC at ``path``: send ``requests`` as they come, yield each response."""
        encoded = (r.SerializeToString() async for r in requests)
        responses = self.transport.bidi_stream(
            path, encoded, metadata=await self._metadata(service), timeout=None
        )
        async for data in responses:
            yield decode_proto(data, response_type)

    async def open_bidi(self, service: str, path: str, response_type: type[M]) -> OpenBidi[M] | None:
        """Open the bidirectional RPC at ``path`` to write to directly, if the transport can (else ``None``:
        use ``bidi``). Writing a message then costs no task switch: for request/answer traffic."""
        opener = getattr(self.transport, "open_bidi", None)
        if opener is None:
            return None
        call = await opener(path, metadata=await self._metadata(service), timeout=None)
        return OpenBidi(call, response_type)

    async def bidi_json(
        self, service: str, endpoint: str, bodies: AsyncIterable[bytes]
    ) -> AsyncIterator[bytes]:
        """Call a bidirectional or client-streaming ``Handler.Method`` with JSON bodies; yield the answers."""
        responses = self.transport.bidi_stream(
            _endpoint_path(endpoint), bodies, metadata=await self._metadata(service, json=True), timeout=None
        )
        async for data in responses:
            yield data

    async def call_json(self, service: str, endpoint: str, body: bytes) -> bytes:
        """Call ``Handler.Method`` of ``service`` with a JSON body; return the JSON response."""
        return await self.transport.unary(
            _endpoint_path(endpoint),
            body,
            metadata=await self._metadata(service, json=True),
            timeout=self._timeout(),
        )

    async def stream_json(self, service: str, endpoint: str, body: bytes) -> AsyncIterator[bytes]:
        """Call a server-streaming ``Handler.Method`` with a JSON body; yield each JSON response."""
        responses = self.transport.server_stream(
            _endpoint_path(endpoint), body, metadata=await self._metadata(service, json=True), timeout=None
        )
        async for data in responses:
            yield data

    async def close(self) -> None:
        await self.transport.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _timeout(self) -> float | None:
        """The client's timeout, shortened to the deadline of the call being served, if any."""
        context = current_context()
        remaining = context.time_remaining() if context is not None else None
        if remaining is None:
            return self.timeout
        return remaining if self.timeout is None else min(remaining, self.timeout)

    async def _metadata(self, service: str, *, json: bool = False) -> Metadata:
        metadata = [*self.metadata.items(), (SERVICE_KEY, service), (NAMESPACE_KEY, self.namespace)]
        if json:
            metadata.append((CODEC_KEY, "json"))
        credentials = self.credentials
        if credentials is not None and AUTHORIZATION_KEY not in self.metadata:
            token = await credentials.token(self.transport)
            if token:
                metadata.append((AUTHORIZATION_KEY, f"Bearer {token}"))
        return metadata


class OpenBidi(Generic[M]):
    """A bidirectional call open for direct writes: ``write`` a message, iterate the answers."""

    def __init__(self, call: Any, response_type: type[M]) -> None:
        self._call = call
        self._response_type = response_type

    def write(self, message: Message) -> None:
        self._call.write(message.SerializeToString())

    def write_encoded(self, data: bytes) -> None:
        """``write`` a message given as its serialized bytes."""
        self._call.write(data)

    def done_writing(self) -> None:
        self._call.done_writing()

    def cancel(self) -> None:
        self._call.cancel()

    def listen(self, on_answer: Callable[[M], None], on_end: Callable[[BaseException | None], None]) -> None:
        """Have each answer handed to ``on_answer`` as it arrives, then the call's end to ``on_end``
        (its error, or None), instead of iterating: no task between the reading and the callback.
        The callbacks must not raise or wait. An answer that does not parse ends the call."""

        ended = False

        def answered(data: bytes) -> None:
            if ended:
                return
            try:
                answer = decode_proto(data, self._response_type)
            except MicroError as exc:
                self._call.cancel()
                end(exc)
                return
            on_answer(answer)

        def end(error: BaseException | None) -> None:
            nonlocal ended
            if not ended:
                ended = True
                on_end(error)

        self._call.listen(answered, end)

    def __aiter__(self) -> OpenBidi[M]:
        return self

    async def __anext__(self) -> M:
        data: bytes = await self._call.__anext__()
        return decode_proto(data, self._response_type)


def _endpoint_path(endpoint: str) -> str:
    handler, dot, method = endpoint.partition(".")
    if not dot or not handler or not method or "." in method:
        raise BadRequest(f"endpoint {endpoint!r} is not of the form Handler.Method, e.g. Store.Read")
    return json_path(endpoint)
