"""The auth block of a daemon run with ``--auth none``: every RPC says auth is off, and what that means.

Without it a caller would hear that no service ``auth`` exists, which sends
them looking for a missing install rather than at the server's setting.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from micro.context import Context
from micro.errors import NotImplemented as Unimplemented

__all__ = ["DETAIL", "AuthDisabled"]

DETAIL = (
    "auth is disabled on this micro server (--auth none / MICRO_AUTH=none): there are no accounts "
    "or rules, and every caller acts as an administrator"
)


class AuthDisabled:
    """Answers any method of ``micro.auth.v1.Auth``, ``Accounts`` and ``Rules``: a 501, auth is off."""

    def __getattr__(self, name: str) -> Callable[[Any, Context], Awaitable[Any]]:
        async def refuse(request: Any, context: Context) -> Any:
            raise Unimplemented(DETAIL, id="auth")

        refuse.__qualname__ = f"AuthDisabled.{name}"
        return refuse
