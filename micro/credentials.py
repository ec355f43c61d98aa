"""Where a client's access token comes from, and how it stays fresh.

A ``Client`` sends ``authorization: Bearer <token>`` on every call when it has
``Credentials``. Without being told, it finds them in this order
(``from_environment``):

1. ``MICRO_AUTH_TOKEN`` (with ``MICRO_AUTH_REFRESH_TOKEN`` and
   ``MICRO_AUTH_TOKEN_EXPIRY``, as the runtime gives every service it runs:
   the token is then refreshed before it expires);
2. on the address of this ``MICRO_HOME``'s own daemon (its state file says
   which), the local owner's token that the daemon writes there (readable
   only by the user who runs it), so a developer's own scripts and services
   run by hand act as the machine's owner;
3. none: the call is anonymous, and the namespace's rules decide.

The CLI passes its own (a login per environment and namespace).
"""

from __future__ import annotations

import abc
import asyncio
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from micro.context import DEFAULT_NAMESPACE
from micro.errors import MicroError, SetupError, Unauthorized

if TYPE_CHECKING:
    from micro.transport import Transport

__all__ = [
    "EXPIRY_ENV",
    "REFRESH_TOKEN_ENV",
    "TOKEN_ENV",
    "Credentials",
    "OwnerToken",
    "RefreshingToken",
    "StaticToken",
    "TokenSet",
    "check_private",
    "from_environment",
    "is_loopback",
]

log = logging.getLogger("micro.auth")

TOKEN_ENV = "MICRO_AUTH_TOKEN"
REFRESH_TOKEN_ENV = "MICRO_AUTH_REFRESH_TOKEN"
EXPIRY_ENV = "MICRO_AUTH_TOKEN_EXPIRY"
REFRESH_MARGIN = 60.0
OWNER_RECHECK = 1.0


@dataclass(frozen=True)
class TokenSet:
    """An access token, what renews it, and when it expires (unix seconds; 0: unknown)."""

    access_token: str
    refresh_token: str = ""
    expiry: float = 0.0


class Credentials(abc.ABC):
    """The access token a client sends; implementations keep it fresh."""

    @abc.abstractmethod
    async def token(self, transport: Transport) -> str | None:
        """The access token to send now, renewed first (over ``transport``) if it is about to expire."""


class StaticToken(Credentials):
    """One token, sent as it is until it expires."""

    def __init__(self, access_token: str) -> None:
        self.access_token = access_token

    async def token(self, transport: Transport) -> str | None:
        return self.access_token


class RefreshingToken(Credentials):
    """A token renewed with its refresh token shortly before it expires.

    Renewal asks the auth block for a new access token (``Auth.Token``) in
    ``namespace``; ``on_refresh`` is told the new ``TokenSet`` (to save it).
    A failed renewal keeps using the old token while it lasts, then raises
    ``Unauthorized``. ``obtained`` is when ``tokens`` were issued (default:
    now), which sets how early before expiry they are renewed.
    """

    def __init__(
        self,
        tokens: TokenSet,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        on_refresh: Callable[[TokenSet], None] | None = None,
        clock: Callable[[], float] = time.time,
        obtained: float | None = None,
    ) -> None:
        self.tokens = tokens
        self.namespace = namespace
        self.on_refresh = on_refresh
        self._clock = clock
        self._obtained = clock() if obtained is None else obtained
        self._lock = asyncio.Lock()

    def due(self) -> bool:
        """Whether the token should be renewed now: within a minute (or a third of its life) of expiry."""
        tokens = self.tokens
        if not tokens.refresh_token or not tokens.expiry:
            return False
        margin = min(REFRESH_MARGIN, max(0.0, tokens.expiry - self._obtained) / 3)
        return tokens.expiry - self._clock() <= margin

    async def token(self, transport: Transport) -> str | None:
        if self.due():
            async with self._lock:
                if self.due():
                    await self._refresh(transport)
        return self.tokens.access_token

    async def _refresh(self, transport: Transport) -> None:
        from micro.auth import AuthClient
        from micro.client import Client

        client = Client(transport, namespace=self.namespace, credentials=None, timeout=10.0)
        try:
            token = await AuthClient(client).token(refresh_token=self.tokens.refresh_token)
        except MicroError as exc:
            if self.tokens.expiry > self._clock():
                log.warning("could not renew the access token (%s); using it until it expires", exc.detail)
                return
            raise Unauthorized(
                f"the access token expired and could not be renewed ({exc.detail}): sign in again",
                id="auth",
            ) from exc
        self.tokens = TokenSet(
            token.access_token, token.refresh_token or self.tokens.refresh_token, token.expiry
        )
        self._obtained = self._clock()
        if self.on_refresh is not None:
            self.on_refresh(self.tokens)


class OwnerToken(Credentials):
    """The local owner's token, from the file the daemon keeps fresh in ``MICRO_HOME``.

    The file is re-read when it changes (a restarted daemon writes a new
    one). A file that group or others may read is refused.
    """

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._clock = clock
        self._access = ""
        self._mtime = 0.0
        self._checked = -OWNER_RECHECK

    async def token(self, transport: Transport) -> str | None:
        now = self._clock()
        if now - self._checked >= OWNER_RECHECK:
            self._checked = now
            self._reload()
        return self._access or None

    def _reload(self) -> None:
        try:
            info = self.path.stat()
        except OSError:
            self._access = ""
            return
        if info.st_mtime == self._mtime and self._access:
            return
        check_private(self.path, info)
        try:
            data = json.loads(self.path.read_text())
            self._access = str(data["access_token"])
        except (OSError, ValueError, KeyError, TypeError):
            self._access = ""  # being replaced, or not ours: anonymous until it is readable
            return
        self._mtime = info.st_mtime


def check_private(path: Path, info: os.stat_result | None = None) -> None:
    """``SetupError`` if group or others may read or write the credentials file at ``path``."""
    info = info or path.stat()
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise SetupError(
            f"{path} holds credentials but group or others may read it "
            f"(mode {stat.S_IMODE(info.st_mode):o}): run chmod 600 {path}",
            id="auth",
        )


def is_loopback(address: str) -> bool:
    """Whether ``host:port`` names this machine through the loopback interface."""
    host = address.rpartition(":")[0].strip("[]") if ":" in address else address
    return host in ("localhost", "::1") or host.startswith("127.")


def from_environment(address: str | None, environ: Mapping[str, str] | None = None) -> Credentials | None:
    """The credentials a client finds by itself (see the module docstring); ``None`` if there are none."""
    env = os.environ if environ is None else environ
    access = env.get(TOKEN_ENV, "")
    if access:
        refresh = env.get(REFRESH_TOKEN_ENV, "")
        if not refresh:
            return StaticToken(access)
        try:
            expiry = float(env.get(EXPIRY_ENV) or 0)
        except ValueError:
            raise SetupError(
                f"{EXPIRY_ENV} must be unix seconds, not {env.get(EXPIRY_ENV)!r}", id="auth"
            ) from None
        namespace = env.get("MICRO_NAMESPACE") or DEFAULT_NAMESPACE
        return RefreshingToken(TokenSet(access, refresh, expiry), namespace=namespace)
    if address is not None and is_loopback(address):
        from micro.home import Home

        # Only to this home's own daemon: another daemon on this machine may be another user's.
        home = Home.from_env()
        state = home.read_state()
        if state is not None and _host_port(address) in {
            _host_port(state.address),
            _host_port(state.local_address),
        }:
            if home.owner_token.exists():
                return OwnerToken(home.owner_token)
    return None


def _host_port(address: str) -> str:
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    return f"{'127.0.0.1' if host == 'localhost' else host}:{port}"
