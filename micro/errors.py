"""Micro's error model, one exception tree end to end.

Every error that crosses a process boundary is ``{id, code, detail, status}``
as in Micro v3: ``code`` is an HTTP status, ``id`` names who raised it. It
travels as a gRPC status plus the ``micro-error`` trailing metadata (JSON) and
is rebuilt on the caller's side as the same class, chosen by ``code``::

    MicroError                     any error with {id, code, detail, status}
     ├── BadRequest                400
     ├── Unauthorized              401
     ├── Forbidden                 403
     ├── NotFound                  404
     ├── MethodNotAllowed          405
     ├── Timeout                   408
     ├── Conflict                  409
     ├── PayloadTooLarge           413
     ├── TooManyRequests           429
     ├── InternalServerError       500
     ├── NotImplemented            501
     ├── BadGateway                502
     ├── ServiceUnavailable        503
     │    └── ConnectError         the daemon or a service could not be reached
 │         └── TLSError         the TLS handshake failed: certificate not trusted, server without TLS
     ├── GatewayTimeout            504
     ├── RemoteError               a code outside this table
     └── SetupError                the local set-up is wrong: a folder not writable, a port in use
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any, ClassVar

__all__ = [
    "BadGateway",
    "BadRequest",
    "Conflict",
    "ConnectError",
    "Forbidden",
    "GatewayTimeout",
    "InternalServerError",
    "MethodNotAllowed",
    "MicroError",
    "NotFound",
    "NotImplemented",
    "PayloadTooLarge",
    "RemoteError",
    "ServiceUnavailable",
    "SetupError",
    "TLSError",
    "Timeout",
    "TooManyRequests",
    "Unauthorized",
    "error_for_code",
]


class MicroError(Exception):
    """An error with Micro's ``{id, code, detail, status}`` shape.

    Raise a subclass in a handler to answer the caller with that code; the
    caller receives the same class with the same ``id``, ``code`` and ``detail``.
    """

    code: ClassVar[int] = 500

    def __init__(self, detail: str, *, id: str = "", code: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.id = id
        if code is not None:
            self.code = code  # type: ignore[misc]  # instance override of the class default

    @property
    def status(self) -> str:
        """The HTTP reason phrase of ``code``, e.g. ``"Not Found"``."""
        try:
            return HTTPStatus(self.code).phrase
        except ValueError:
            return "Unknown"

    def to_dict(self) -> dict[str, Any]:
        """The wire form: ``{"id", "code", "detail", "status"}``."""
        return {"id": self.id, "code": self.code, "detail": self.detail, "status": self.status}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MicroError:
        """Rebuild the error class that ``data["code"]`` names (allow-listed by code)."""
        code = int(data.get("code") or 500)
        return error_for_code(code, str(data.get("detail", "")), id=str(data.get("id", "")))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.id!r}, code={self.code}, detail={self.detail!r})"

    def __str__(self) -> str:
        return self.detail


class BadRequest(MicroError):
    """The request is malformed or invalid (400)."""

    code = 400


class Unauthorized(MicroError):
    """The caller is not authenticated (401)."""

    code = 401


class Forbidden(MicroError):
    """The caller may not perform this request (403)."""

    code = 403


class NotFound(MicroError):
    """The thing asked for does not exist (404)."""

    code = 404


class MethodNotAllowed(MicroError):
    """The method is not allowed here (405)."""

    code = 405


class Timeout(MicroError):
    """The request timed out (408)."""

    code = 408


class Conflict(MicroError):
    """The request conflicts with the current state, e.g. a stale version (409)."""

    code = 409


class PayloadTooLarge(MicroError):
    """The request is larger than allowed (413)."""

    code = 413


class TooManyRequests(MicroError):
    """The caller is rate limited (429)."""

    code = 429


class InternalServerError(MicroError):
    """The server failed unexpectedly (500)."""

    code = 500


class NotImplemented(MicroError):  # noqa: A001  # Micro's name for 501
    """The endpoint exists but is not implemented (501)."""

    code = 501


class BadGateway(MicroError):
    """An upstream service answered badly (502)."""

    code = 502


class ServiceUnavailable(MicroError):
    """The service cannot serve now (503)."""

    code = 503


class ConnectError(ServiceUnavailable):
    """No connection could be made to ``address``."""

    def __init__(self, detail: str, *, address: str = "", id: str = "") -> None:
        super().__init__(detail, id=id)
        self.address = address


class TLSError(ConnectError):
    """The connection to ``address`` failed in its TLS handshake; ``detail`` says why and what to do.

    Raised by the caller's transport only, never sent over the wire.
    """


class GatewayTimeout(MicroError):
    """An upstream service did not answer in time (504)."""

    code = 504


class RemoteError(MicroError):
    """An error whose code has no class of its own."""


class SetupError(MicroError):
    """The local set-up prevents this: a folder that is not writable, a port in use.

    Never sent over the wire; ``detail`` says what to change.
    """


_BY_CODE: dict[int, type[MicroError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        MethodNotAllowed,
        Timeout,
        Conflict,
        PayloadTooLarge,
        TooManyRequests,
        InternalServerError,
        NotImplemented,
        BadGateway,
        ServiceUnavailable,
        GatewayTimeout,
    )
}


def error_for_code(code: int, detail: str, *, id: str = "") -> MicroError:
    """Build the exception class for an HTTP status code (``RemoteError`` if none)."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return RemoteError(detail, id=id, code=code)
    return cls(detail, id=id)
