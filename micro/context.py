"""The request context a handler receives with every call."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from micro.errors import BadRequest, MicroError

if TYPE_CHECKING:
    from micro.auth import Account

__all__ = ["DEFAULT_NAMESPACE", "Context", "current_context", "validate_namespace"]

DEFAULT_NAMESPACE = "micro"

# Namespaces become database names, registry domains and file names: keep them
# to DNS-label characters so none of those can be escaped.
_NAMESPACE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def validate_namespace(namespace: str) -> str:
    """Return ``namespace`` if it is valid, else raise ``BadRequest`` saying why."""
    if not _NAMESPACE.match(namespace):
        raise BadRequest(
            f"invalid namespace {namespace!r}: use 1-63 lower-case letters, digits and '-', "
            "starting and ending with a letter or digit",
            id="micro.namespace",
        )
    return namespace


@dataclass
class Context:
    """What a handler knows about the call it serves.

    ``namespace`` is the caller's namespace (metadata ``micro-namespace``,
    default ``micro``); ``metadata`` holds every request header, lower-cased;
    ``deadline`` is an absolute ``time.monotonic()`` value or ``None``.
    ``account`` is the caller's, from a verified ``authorization: Bearer``
    token (``None`` for an anonymous caller, or where the server verifies no
    tokens); ``auth_error`` says why a token that was sent was refused.
    """

    namespace: str = DEFAULT_NAMESPACE
    metadata: Mapping[str, str] = field(default_factory=dict)
    service: str = ""
    endpoint: str = ""
    deadline: float | None = None
    account: Account | None = None
    auth_error: MicroError | None = None

    def time_remaining(self) -> float | None:
        """Seconds left before the caller's deadline, or ``None`` if it set none."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())


_current: ContextVar[Context | None] = ContextVar("micro_context", default=None)


def current_context() -> Context | None:
    """The context of the call being served in this task, if any (calls made from it inherit its deadline)."""
    return _current.get()
