"""The auth engine: accounts, tokens and rules of every namespace, kept in a store backend.

Secrets are hashed off the event loop and never logged. Failed secret checks
are rate limited per account and per caller address (``Throttle``). The
default administrator (``admin``, secret ``micro``, scope ``admin``) is
created the first time this process is asked for a token in namespace
``micro`` while it holds no ``user`` account, unless
``disable_default_admin``; a warning then says to change its secret.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

from micro.auth import Account, TokenVerifier, bearer_token
from micro.context import DEFAULT_NAMESPACE, validate_namespace
from micro.errors import BadRequest, Conflict, NotFound, Unauthorized
from micro_daemon.auth.accounts import (
    AccountStore,
    StoredAccount,
    check_account_type,
    check_id,
    check_metadata,
    check_scopes,
)
from micro_daemon.auth.passwords import SecretHasher
from micro_daemon.auth.rules import Decision, Resource, RuleStore, verify
from micro_daemon.auth.throttle import Throttle
from micro_daemon.auth.tokens import (
    DEFAULT_LIFETIME,
    REFRESH_LIFETIME,
    REVOCATION_TTL,
    IssuedToken,
    RefreshTokens,
    TokenIssuer,
    Verifier,
    revoking_time,
)

if TYPE_CHECKING:
    from micro.context import Context
    from micro_daemon.auth.keys import KeyPair
    from micro_daemon.store.backend import StoreBackend

__all__ = ["DEFAULT_ADMIN_ID", "DEFAULT_ADMIN_SECRET", "MAX_SECRET_BYTES", "OWNER_ID", "AuthEngine"]

log = logging.getLogger("micro.auth")

DEFAULT_ADMIN_ID = "admin"
DEFAULT_ADMIN_SECRET = "micro"
OWNER_ID = "owner"  # the local owner (micro_daemon.auth.owner): not a user who signs in
MAX_SECRET_BYTES = 1024


class AuthEngine:
    """Everything the auth service does, on ``store`` with the signing ``keys``.

    Errors are ``micro.errors`` with ``id="auth"``: ``BadRequest`` for bad
    input, ``Unauthorized`` for wrong credentials and invalid tokens,
    ``TooManyRequests`` after too many failed secrets, ``NotFound`` and
    ``Conflict`` for accounts and rules. ``clock`` (unix seconds) dates
    tokens and accounts.
    """

    def __init__(
        self,
        store: StoreBackend,
        keys: KeyPair,
        *,
        token_lifetime: int = DEFAULT_LIFETIME,
        refresh_lifetime: float = REFRESH_LIFETIME,
        revocation_ttl: float = REVOCATION_TTL,
        disable_default_admin: bool = False,
        hasher: SecretHasher | None = None,
        throttle: Throttle | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = keys
        self.accounts = AccountStore(store)
        self.rules = RuleStore(store)
        self.refresh_tokens = RefreshTokens(store, lifetime=refresh_lifetime, clock=clock)
        self.issuer = TokenIssuer(keys, lifetime=token_lifetime, clock=clock)
        self.verifier = Verifier(
            TokenVerifier(keys.public_pem, clock=clock), self._not_before, ttl=revocation_ttl
        )
        self.hasher = hasher or SecretHasher()
        self.throttle = throttle or Throttle()
        self.disable_default_admin = disable_default_admin
        self._clock = clock
        self._admin_checked = False
        self._admin_lock = asyncio.Lock()
        self._create_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def generate(
        self,
        namespace: str,
        account_id: str,
        *,
        type: str = "user",
        scopes: Iterable[str] = (),
        metadata: Mapping[str, str] | None = None,
        secret: str = "",
        name: str = "",
    ) -> tuple[Account, str]:
        """Create an account; return it with its secret (generated when empty), which is kept hashed only."""
        namespace = validate_namespace(namespace)
        check_id(account_id)
        _check_secret(secret)
        secret = secret or secrets.token_urlsafe(24)
        now = self._clock()
        stored = StoredAccount(
            id=account_id,
            type=check_account_type(type),
            issuer=namespace,
            secret_hash=await self.hasher.hash_async(secret),
            created=now,
            not_before=revoking_time(now),  # a former account of this id: its tokens too
            scopes=check_scopes(scopes),
            metadata=check_metadata(metadata or {}),
            name=check_id(name, "account name") if name else account_id,
        )
        async with self._create_locks[namespace]:  # spares this process the race on unique names
            await self.accounts.create(stored)
        self.verifier.forget(namespace, account_id)  # it may be cached as deleted
        return stored.account(), secret

    async def token(
        self,
        namespace: str,
        *,
        id: str = "",
        secret: str = "",
        refresh_token: str = "",
        lifetime: int = 0,
        address: str = "",
    ) -> IssuedToken:
        """Exchange an id (or name) and secret, or a refresh token, for an access token.

        ``address`` is the caller's, for rate limiting; ``lifetime`` 0 is the default.
        """
        namespace = validate_namespace(namespace)
        lifetime = self.issuer.lifetime_for(lifetime)
        if address:
            self.throttle.check(("address", address), f"address {address}")
        if refresh_token:
            stored = await self._redeem(namespace, refresh_token, address)
        elif id and secret:
            stored = await self._sign_in(namespace, id, secret, address)
            refresh_token = await self.refresh_tokens.issue(namespace, stored.id)
        else:
            raise BadRequest("give an id and a secret, or a refresh token", id="auth")
        access, issued, expires = self.issuer.access_token(stored.account(), lifetime, stored.not_before)
        return IssuedToken(access, refresh_token, issued, expires)

    async def access_token(self, account: Account, lifetime: int) -> tuple[str, float, float]:
        """A signed token for ``account`` (``TokenIssuer.access_token``), stamped no earlier than
        its ``not_before``: valid even when issued in the millisecond the account was made."""
        stored = await self.accounts.get(account.issuer, account.id)
        return self.issuer.access_token(stored.account(), lifetime, stored.not_before)

    async def inspect(self, token: str) -> Account:
        """The account of a valid access token; ``Unauthorized`` if invalid, expired or revoked."""
        return await self.verifier.verify(token)

    async def caller(self, context: Context) -> Account | None:
        """The account of the call's ``authorization: Bearer`` token, ``None`` without one.

        An invalid, expired or revoked token raises ``Unauthorized``.
        """
        token = bearer_token(context.metadata)
        return None if token is None else await self.verifier.verify(token)

    async def account(self, namespace: str, account_id: str) -> Account:
        """The account (``NotFound`` if absent)."""
        return (await self.accounts.get(validate_namespace(namespace), account_id)).account()

    async def list_accounts(self, namespace: str) -> list[Account]:
        return [a.account() for a in await self.accounts.list(validate_namespace(namespace))]

    async def delete_account(self, namespace: str, account_id: str) -> None:
        """Delete the account and revoke its tokens."""
        namespace = validate_namespace(namespace)
        await self.accounts.delete(namespace, account_id)
        self.verifier.forget(namespace, account_id)
        await self.refresh_tokens.revoke_all(namespace, account_id)

    async def change_secret(
        self,
        namespace: str,
        account_id: str,
        new_secret: str,
        *,
        old_secret: str | None,
        address: str = "",
    ) -> None:
        """Set a new secret and revoke the account's tokens; ``old_secret=None`` skips checking the old."""
        namespace = validate_namespace(namespace)
        _check_secret(new_secret)
        if not new_secret:
            raise BadRequest("the new secret is empty", id="auth")
        if address:
            self.throttle.check(("address", address), f"address {address}")
        stored = await self.accounts.get(namespace, account_id)
        if old_secret is not None:
            _check_secret(old_secret)
            await self._check_secret(namespace, account_id, stored, old_secret, address)
        updated = replace(
            stored,
            secret_hash=await self.hasher.hash_async(new_secret),
            not_before=revoking_time(self._clock()),
        )
        await self.accounts.update(updated)
        self.verifier.forget(namespace, account_id)
        await self.refresh_tokens.revoke_all(namespace, account_id)

    async def verify_access(self, namespace: str, resource: Resource, account: Account | None) -> Decision:
        """How the rules of ``namespace`` decide on ``account`` accessing ``resource``."""
        namespace = validate_namespace(namespace)
        return verify(await self.rules.list(namespace), account, resource.check(), namespace)

    async def _sign_in(self, namespace: str, id_or_name: str, secret: str, address: str) -> StoredAccount:
        _check_secret(secret)
        await self._ensure_default_admin(namespace)
        stored = await self.accounts.find(namespace, id_or_name)
        return await self._check_secret(namespace, id_or_name, stored, secret, address)

    async def _check_secret(
        self, namespace: str, id_or_name: str, stored: StoredAccount | None, secret: str, address: str
    ) -> StoredAccount:
        key = ("account", namespace, stored.id if stored else id_or_name)
        self.throttle.check(key, f"account {key[2]!r} of namespace {namespace!r}")
        if stored is None:
            await self.hasher.check_nothing_async(secret)  # an unknown id answers as slowly as a known one
        elif await self.hasher.check_async(secret, stored.secret_hash):
            self.throttle.succeed(key)
            return stored
        self.throttle.fail(key)
        if address:
            self.throttle.fail(("address", address))
        raise Unauthorized(f"wrong id or secret for namespace {namespace!r}", id="auth")

    async def _redeem(self, namespace: str, refresh_token: str, address: str) -> StoredAccount:
        try:
            account_id = await self.refresh_tokens.redeem(namespace, refresh_token)
            return await self.accounts.get(namespace, account_id)
        except (Unauthorized, NotFound):
            if address:
                self.throttle.fail(("address", address))
            raise Unauthorized(
                "refresh token is not valid (revoked, expired, or of another namespace): sign in again",
                id="auth",
            ) from None

    async def _ensure_default_admin(self, namespace: str) -> None:
        if namespace != DEFAULT_NAMESPACE or self.disable_default_admin or self._admin_checked:
            return
        async with self._admin_lock:
            if self._admin_checked:
                return
            accounts = await self.accounts.list(namespace)
            if not any(a.type == "user" and a.id != OWNER_ID for a in accounts):
                await self._create_default_admin()
            self._admin_checked = True

    async def _create_default_admin(self) -> None:
        try:
            await self.generate(
                DEFAULT_NAMESPACE,
                DEFAULT_ADMIN_ID,
                type="user",
                scopes=["admin"],
                secret=DEFAULT_ADMIN_SECRET,
            )
        except Conflict:  # an account named admin exists (a service, say): leave it
            return
        log.warning(
            "created the default account %r in namespace %r with the well-known secret; "
            "change it now (Accounts.ChangeSecret), or start the server with the default admin disabled",
            DEFAULT_ADMIN_ID,
            DEFAULT_NAMESPACE,
        )

    async def _not_before(self, namespace: str, account_id: str) -> float | None:
        try:
            return (await self.accounts.get(namespace, account_id)).not_before
        except NotFound:
            return None


def _check_secret(secret: str) -> None:
    if len(secret.encode()) > MAX_SECRET_BYTES:
        raise BadRequest(f"a secret is at most {MAX_SECRET_BYTES} bytes long", id="auth")
