"""An account for each service the runtime runs, and the credentials it starts with.

Each service gets a ``service`` account ``service.<name>`` in its namespace,
without scopes: it may use the building blocks of its own namespace and call
what the rules let it, and it is no administrator (Micro gives its services
scope ``service``, which makes them administrators of ``micro``; we don't).
Every process started gets a fresh refresh token and an access token through
its environment, and renews the access token itself (``micro.credentials``);
the public key comes along so the service verifies its callers' tokens
without asking the daemon. Removing the service deletes the account, which
revokes every token it holds.
"""

from __future__ import annotations

from micro.auth import PUBLIC_KEY_ENV, Account
from micro.credentials import EXPIRY_ENV, REFRESH_TOKEN_ENV, TOKEN_ENV
from micro.errors import Conflict, NotFound, SetupError
from micro_daemon.auth.engine import AuthEngine

__all__ = ["ServiceAccounts", "account_id"]


def account_id(service: str) -> str:
    return f"service.{service}"


class ServiceAccounts:
    """Credentials for the runtime's services; with ``engine=None`` (auth disabled) there are none."""

    def __init__(self, engine: AuthEngine | None) -> None:
        self.engine = engine

    async def credentials(self, namespace: str, service: str) -> dict[str, str]:
        """The variables a new process of ``service`` starts with."""
        if self.engine is None:
            return {}
        account = await self._account(namespace, service)
        refresh = await self.engine.refresh_tokens.issue(namespace, account.id)
        access, _, expires = await self.engine.access_token(account, self.engine.issuer.lifetime)
        return {
            TOKEN_ENV: access,
            REFRESH_TOKEN_ENV: refresh,
            EXPIRY_ENV: str(int(expires)),
            PUBLIC_KEY_ENV: self.engine.keys.public_pem.decode(),
        }

    async def forget(self, namespace: str, service: str) -> None:
        """Delete the service's account, revoking its tokens (nothing if it has none)."""
        if self.engine is None:
            return
        try:
            await self.engine.delete_account(namespace, account_id(service))
        except NotFound:
            pass

    async def _account(self, namespace: str, service: str) -> Account:
        assert self.engine is not None
        wanted = account_id(service)
        try:
            await self.engine.generate(namespace, wanted, type="service", metadata={"service": service})
        except Conflict:
            pass
        account = await self.engine.account(namespace, wanted)
        if account.type != "service" or account.metadata.get("service") != service:
            raise SetupError(
                f"account {wanted!r} of namespace {namespace!r} exists and is not service {service!r}'s: "
                "delete it (micro auth delete account) so the runtime can create the service's own",
                id="runtime",
            )
        return account
