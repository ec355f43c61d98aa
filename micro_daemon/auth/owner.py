"""The local owner credential: how the machine's own user acts without signing in.

The daemon keeps an administrator account ``owner`` in namespace ``micro``
with a random secret nobody knows, and writes an access token for it to
``Home.owner_token`` (0600 in a 0700 folder), renewed long before it
expires. Whoever can read that file can already read the daemon's private
key beside it, so it grants nothing new; the CLI and local clients send it on
a loopback address (``micro.credentials``), and the local developer loop never
asks for a password. ``micro login`` switches to another account.
"""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path

from micro.auth import Account
from micro.context import DEFAULT_NAMESPACE
from micro.errors import Conflict, NotFound
from micro.home import write_private
from micro_daemon.auth.engine import OWNER_ID, AuthEngine

__all__ = ["OWNER_LIFETIME", "RENEW_INTERVAL", "OwnerCredential"]

log = logging.getLogger("micro.auth")

OWNER_LIFETIME = 24 * 60 * 60
RENEW_INTERVAL = 60 * 60.0


class OwnerCredential:
    """Creates the owner account once and writes a fresh token for it to ``path``."""

    def __init__(self, engine: AuthEngine, path: Path) -> None:
        self.engine = engine
        self.path = path

    async def publish(self) -> None:
        """Write a new owner token (creating the account first if needed)."""
        account = await self._account()
        if account is None:
            return
        token, _, expires = await self.engine.access_token(account, OWNER_LIFETIME)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = {"account": account.id, "namespace": account.issuer, "access_token": token, "expiry": expires}
        write_private(self.path, json.dumps(data).encode())

    def withdraw(self) -> None:
        """Remove the token file (the daemon is stopping: nothing will verify it here)."""
        self.path.unlink(missing_ok=True)

    async def _account(self) -> Account | None:
        try:
            account = await self.engine.account(DEFAULT_NAMESPACE, OWNER_ID)
        except NotFound:  # a first start: create it (hashing its secret takes a while, so only then)
            try:
                await self.engine.generate(
                    DEFAULT_NAMESPACE,
                    OWNER_ID,
                    type="user",
                    scopes=["admin"],
                    metadata={"local": "owner"},
                    secret=secrets.token_urlsafe(32),
                    name=OWNER_ID,
                )
            except Conflict:
                pass  # another daemon on this store made it meanwhile
            account = await self.engine.account(DEFAULT_NAMESPACE, OWNER_ID)
        if (
            account.type != "user"
            or "admin" not in account.scopes
            or account.metadata.get("local") != "owner"
        ):
            log.error(
                "account %r of namespace %r is not the local owner's: the CLI will need micro login "
                "(delete that account to restore the local owner credential)",
                OWNER_ID,
                DEFAULT_NAMESPACE,
            )
            return None
        return account
