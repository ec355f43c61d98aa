"""Conversion between ``micro.errors`` and gRPC statuses, at the gRPC boundary."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import grpc

from micro.errors import ConnectError, MicroError, TLSError, error_for_code

if TYPE_CHECKING:
    from collections.abc import Sequence

ERROR_METADATA_KEY = "micro-error"

# Every grpc.StatusCode maps to the HTTP code of the class the caller receives.
GRPC_TO_HTTP: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 408,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

_HTTP_TO_GRPC: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    409: grpc.StatusCode.ABORTED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_status_for(error: MicroError) -> grpc.StatusCode:
    """The gRPC status code that carries ``error``."""
    return _HTTP_TO_GRPC.get(error.code, grpc.StatusCode.INTERNAL)


def trailing_metadata_for(error: MicroError) -> tuple[tuple[str, str], ...]:
    return ((ERROR_METADATA_KEY, error.to_json()),)


def error_from_rpc(
    exc: grpc.RpcError, *, address: str = "", service: str = "", trust: str = ""
) -> MicroError:
    """Rebuild the ``MicroError`` an ``RpcError`` carries (or derive one from its status).

    ``trust`` names what the channel trusts when it speaks TLS (empty: plaintext),
    to explain a failed handshake.
    """
    code: grpc.StatusCode = exc.code()
    details: str = exc.details() or ""
    payload = _metadata_value(exc.trailing_metadata(), ERROR_METADATA_KEY)
    if payload:
        try:
            return MicroError.from_dict(json.loads(payload))
        except (ValueError, TypeError):
            pass  # a malformed trailer falls back to the status below
    if code == grpc.StatusCode.UNAVAILABLE and _is_connect_failure(details):
        where = address or service or "the server"
        reason = _tls_failure(details, where, trust)
        if reason:
            return TLSError(reason, address=address, id=service)
        return ConnectError(f"failed to connect to {where}", address=address, id=service)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        return error_for_code(413, f"the message is larger than the receiver accepts ({details})", id=service)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return error_for_code(408, "request timed out", id=service)
    return error_for_code(GRPC_TO_HTTP.get(code, 500), details or code.name.lower(), id=service)


@contextmanager
def map_grpc_exceptions(*, address: str = "", service: str = "", trust: str = "") -> Iterator[None]:
    """Convert any ``grpc.RpcError`` raised inside the block to a ``MicroError``."""
    try:
        yield
    except grpc.RpcError as exc:
        raise error_from_rpc(exc, address=address, service=service, trust=trust) from exc


def _is_connect_failure(details: str) -> bool:
    lowered = details.lower()
    return any(
        s in lowered for s in ("failed to connect", "connection refused", "dns resolution", "no address")
    )


def _tls_failure(details: str, where: str, trust: str) -> str:
    """What went wrong in a TLS handshake, and what to do; empty if ``details`` is no such failure."""
    if not trust:
        # A TLS server drops a plaintext client's first bytes without a word.
        if "socket closed" in details.lower():
            return (
                f"{where} closed the connection before answering: if it serves TLS, connect with TLS "
                "(micro env add NAME ADDRESS --tls)"
            )
        return ""
    if "CERTIFICATE_VERIFY_FAILED" in details:
        reason = details.partition("CERTIFICATE_VERIFY_FAILED")[2].strip(": ").partition(":")[0]
        if "expired" in reason:
            return f"the TLS certificate of {where} has expired: renew it on that server"
        return (
            f"the TLS certificate of {where} is not trusted by {trust} ({reason or 'verify failed'}): "
            "give the CA certificate that signed it with --ca-file PATH"
        )
    if "Hostname Verification" in details or "not in peer certificate" in details:
        return (
            f"the TLS certificate of {where} is not issued for that name: connect through a host name "
            "or address the certificate holds"
        )
    if "WRONG_VERSION_NUMBER" in details:
        return f"{where} does not speak TLS: connect without TLS (micro env add NAME ADDRESS, no --tls)"
    if "handshake failed" in details.lower():
        return f"the TLS handshake with {where} failed ({details.partition('last error: ')[2] or details})"
    return ""


def _metadata_value(metadata: Sequence[tuple[str, str | bytes]] | None, key: str) -> str | None:
    for k, v in metadata or ():
        if k == key:
            return v.decode() if isinstance(v, bytes) else v
    return None
