"""Access tokens (RS256 JWTs), refresh tokens, and the daemon's revocation-aware verifier.

Access tokens carry ``sub`` (account id), ``iss`` (namespace), ``type``,
``scopes``, ``name``, ``metadata``, ``exp``, ``iat`` and ``jti``. ``iat`` is
in milliseconds precision (a JSON number with a fraction, which RFC 7519
allows), so a token minted right after a secret change is told apart from
one minted right before it.

Refresh tokens are opaque random strings. Only their SHA-256 is stored, as
``refresh/<namespace>/<account id>/<hash>`` in store table ``micro/auth``,
with their creation time; they expire after ``refresh_lifetime`` (30 days).

Revocation: every account keeps a ``not_before`` time (its creation, then
each secret change). ``Verifier`` rejects tokens of an account that no longer
exists or that were issued before its ``not_before``. It caches what it
learns of an account for ``ttl`` seconds, and this process's own changes
clear that at once; a change made by another daemon sharing the store is seen
within ``ttl``. Services verifying offline with the public key
(``micro.auth.TokenVerifier``) see no revocation: they accept a token until
it expires.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from micro.auth import ALGORITHM, Account, TokenVerifier
from micro.errors import BadRequest, NotFound, Unauthorized
from micro_daemon.store.backend import SYSTEM_DATABASE, Query, Record

if TYPE_CHECKING:
    from micro_daemon.auth.keys import KeyPair
    from micro_daemon.store.backend import StoreBackend

__all__ = [
    "DATABASE",
    "DEFAULT_LIFETIME",
    "MAX_LIFETIME",
    "REFRESH_LIFETIME",
    "TABLE",
    "IssuedToken",
    "RefreshTokens",
    "TokenIssuer",
    "Verifier",
    "hash_refresh_token",
    "issued_time",
    "revoking_time",
]

DATABASE = SYSTEM_DATABASE
TABLE = "auth"
DEFAULT_LIFETIME = 15 * 60
MAX_LIFETIME = 24 * 60 * 60
REFRESH_LIFETIME = 30 * 24 * 60 * 60
REVOCATION_TTL = 5.0
_MAX_CACHED_ACCOUNTS = 10_000


def issued_time(now: float) -> float:
    """``now`` truncated to the millisecond: how ``iat`` and ``not_before`` are both kept."""
    return math.floor(now * 1000) / 1000


def revoking_time(now: float) -> float:
    """The ``not_before`` that revokes every token issued up to ``now``, in its millisecond too:
    the next millisecond. Tokens issued later are stamped no earlier (``TokenIssuer.access_token``),
    so one issued right after a secret changed is valid, and one issued right before is not."""
    return (math.floor(now * 1000) + 1) / 1000


@dataclass(frozen=True)
class IssuedToken:
    """What ``Auth.Token`` answers: the access token, its refresh token, and unix times."""

    access_token: str
    refresh_token: str
    created: float
    expiry: float


class TokenIssuer:
    """Signs access tokens with the daemon's private key."""

    def __init__(
        self, keys: KeyPair, *, lifetime: int = DEFAULT_LIFETIME, clock: Callable[[], float] = time.time
    ) -> None:
        self.keys = keys
        self.lifetime = lifetime
        self._clock = clock

    def lifetime_for(self, requested: int) -> int:
        """Seconds a token asked for ``requested`` (0: the default) lives; ``BadRequest`` if out of range."""
        if requested == 0:
            return self.lifetime
        if not 0 < requested <= MAX_LIFETIME:
            raise BadRequest(
                f"token_expiry must be 1 to {MAX_LIFETIME} seconds (0: {self.lifetime}), not {requested}",
                id="auth",
            )
        return requested

    def access_token(
        self, account: Account, lifetime: int, not_before: float = 0.0
    ) -> tuple[str, float, float]:
        """A signed token for ``account`` living ``lifetime`` seconds, with its ``iat`` and ``exp``;
        ``iat`` is ``not_before`` (the account's) if that is later than now."""
        import jwt

        issued = max(issued_time(self._clock()), not_before)
        expires = math.floor(issued) + lifetime
        claims = {
            "sub": account.id,
            "iss": account.issuer,
            "type": account.type,
            "scopes": list(account.scopes),
            "name": account.name,
            "metadata": dict(account.metadata),
            "iat": issued,
            "exp": expires,
            "jti": secrets.token_urlsafe(16),
        }
        return jwt.encode(claims, self.keys.private_key, algorithm=ALGORITHM), issued, expires


def hash_refresh_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class RefreshTokens:
    """Refresh tokens per account, kept hashed in the store."""

    def __init__(
        self,
        store: StoreBackend,
        *,
        lifetime: float = REFRESH_LIFETIME,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.lifetime = lifetime
        self._clock = clock

    async def issue(self, namespace: str, account_id: str) -> str:
        """A new refresh token for the account (returned here only: just its hash is kept)."""
        token = secrets.token_urlsafe(32)
        now = self._clock()
        record = Record(
            key=_key(namespace, account_id, hash_refresh_token(token)),
            value=json.dumps({"created": now}).encode(),
            expires_at=now + self.lifetime if self.lifetime else None,
        )
        await self.store.put(DATABASE, TABLE, record)
        return token

    async def redeem(self, namespace: str, token: str) -> str:
        """The id of the account ``token`` belongs to; ``Unauthorized`` if it is unknown or revoked."""
        prefix, suffix = _prefix(namespace), "/" + hash_refresh_token(token)
        keys = await self.store.keys(DATABASE, TABLE, Query(prefix=prefix, suffix=suffix, limit=1))
        if not keys:
            raise _refused()
        return keys[0][len(prefix) : -len(suffix)]

    async def revoke_all(self, namespace: str, account_id: str) -> int:
        """Delete every refresh token of the account; return how many there were."""
        keys = await self.store.keys(DATABASE, TABLE, Query(prefix=_key(namespace, account_id, "")))
        for key in keys:
            try:
                await self.store.delete(DATABASE, TABLE, key)
            except NotFound:  # expired, or revoked by a concurrent call meanwhile
                pass
        return len(keys)


def _prefix(namespace: str) -> str:
    return f"refresh/{namespace}/"


def _key(namespace: str, account_id: str, digest: str) -> str:
    return f"{_prefix(namespace)}{account_id}/{digest}"


def _refused() -> Unauthorized:
    return Unauthorized(
        "refresh token is not valid (revoked, expired, or of another namespace): sign in again", id="auth"
    )


NotBefore = Callable[[str, str], Awaitable[float | None]]
"""``(namespace, account id) -> not_before``, ``None`` if there is no such account."""


class Verifier:
    """The daemon's verifier: ``TokenVerifier``'s checks, then the account's revocation state."""

    def __init__(
        self,
        tokens: TokenVerifier,
        not_before: NotBefore,
        *,
        ttl: float = REVOCATION_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tokens = tokens
        self._not_before = not_before
        self._ttl = ttl
        self._clock = clock
        self._states: OrderedDict[tuple[str, str], tuple[float | None, float]] = OrderedDict()
        self._forgotten = 0  # a lookup that raced a forget() must not cache what it read

    async def verify(self, token: str, *, issuer: str | None = None) -> Account:
        """The account of ``token``; ``Unauthorized`` if it is invalid, expired or revoked."""
        claims = self.tokens.decode(token)
        account = claims.account
        if issuer is not None and account.issuer != issuer:
            raise Unauthorized(
                f"access token was issued by namespace {account.issuer!r}, not {issuer!r}", id="auth"
            )
        not_before = await self._state(account.issuer, account.id)
        if not_before is None:
            raise Unauthorized(f"account {account.id!r} no longer exists: sign in again", id="auth")
        if claims.issued_at < not_before:
            raise Unauthorized(
                f"access token of {account.id!r} was revoked (its secret changed): sign in again", id="auth"
            )
        return account

    def forget(self, namespace: str, account_id: str) -> None:
        """Drop what is cached of the account (call after changing or deleting it)."""
        self._states.pop((namespace, account_id), None)
        self._forgotten += 1

    async def _state(self, namespace: str, account_id: str) -> float | None:
        key = (namespace, account_id)
        now = self._clock()
        cached = self._states.get(key)
        if cached is not None and now - cached[1] < self._ttl:
            return cached[0]
        forgotten = self._forgotten
        not_before = await self._not_before(namespace, account_id)
        if forgotten != self._forgotten:
            return not_before
        self._states[key] = (not_before, now)
        self._states.move_to_end(key)
        if len(self._states) > _MAX_CACHED_ACCOUNTS:
            self._states.popitem(last=False)
        return not_before
