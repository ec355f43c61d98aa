"""Expected CLI failures and their exit codes.

An expected failure prints one line (no traceback) and exits with a
documented code; anything else is a bug and shows its traceback.

    code  meaning
    0     success
    1     an unexpected error (a bug: please report it)
    2     usage error: unknown command or flag, missing argument
    3     bad input: invalid value, malformed JSON, too large (HTTP 400, 413)
    4     not found (404)
    5     the server or a service cannot be reached (502, 503, 504)
    6     not authenticated or not allowed (401, 403)
    7     conflict: the record changed since it was read (409)
    8     timed out (408)
    9     local set-up: MICRO_HOME not writable, port in use, no such environment
   10     any other error answered by the server
"""

from __future__ import annotations

from micro.errors import (
    BadGateway,
    BadRequest,
    Conflict,
    ConnectError,
    Forbidden,
    GatewayTimeout,
    MicroError,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    SetupError,
    Timeout,
    Unauthorized,
)

__all__ = ["HandledError", "UsageError", "exit_code_for"]


class HandledError(Exception):
    """An expected failure: its message is shown as one line and the CLI exits with ``exit_code``."""

    exit_code = 3


class UsageError(HandledError):
    """The command line itself is wrong (a value that does not parse, a bad combination of flags)."""

    exit_code = 3


_EXIT_CODES: tuple[tuple[type[MicroError], int], ...] = (
    (SetupError, 9),
    (BadRequest, 3),
    (PayloadTooLarge, 3),
    (NotFound, 4),
    (ConnectError, 5),
    (ServiceUnavailable, 5),
    (BadGateway, 5),
    (GatewayTimeout, 5),
    (Unauthorized, 6),
    (Forbidden, 6),
    (Conflict, 7),
    (Timeout, 8),
)


def exit_code_for(error: MicroError) -> int:
    """The documented exit code of a micro error."""
    for cls, code in _EXIT_CODES:
        if isinstance(error, cls):
            return code
    return 10
