"""Accounts and access tokens on the service side, and the typed client of the auth building block.

``TokenVerifier`` checks access tokens offline with the daemon's public key
(``MICRO_AUTH_PUBLIC_KEY``): RS256 only, the signature, the expiry and
well-formed claims. Each token is verified once and its result cached until
it expires, so a caller sending the same token on every call costs one
dictionary lookup per call.

Offline verification cannot see revocations: a token of an account deleted,
or issued before the account's secret changed, is accepted here until it
expires (at most the token lifetime, 15 minutes by default). The daemon's own
verifier checks those too; ask it (``AuthClient.inspect``) when that matters.

``jwt`` and ``cryptography`` are imported on first use, not with this module.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from micro.context import DEFAULT_NAMESPACE, validate_namespace
from micro.errors import BadRequest, MicroError, SetupError, Unauthorized
from micro.proto import auth_pb2

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

    from micro.client import Client

__all__ = [
    "ACCOUNT_TYPES",
    "ALGORITHM",
    "PUBLIC_KEY_ENV",
    "Account",
    "AuthClient",
    "Claims",
    "TokenVerifier",
    "bearer_token",
    "load_public_key",
    "offline_authenticator",
    "parse_resource",
    "pem_bytes",
]

ALGORITHM = "RS256"
ACCOUNT_TYPES = ("user", "service", "client")
PUBLIC_KEY_ENV = "MICRO_AUTH_PUBLIC_KEY"
DEFAULT_CACHE_SIZE = 4096
MAX_TOKEN_BYTES = 16 * 1024
_REQUIRED_CLAIMS = ["sub", "iss", "exp", "iat", "jti"]


@dataclass(frozen=True)
class Account:
    """Who a verified token speaks for: an account of namespace ``issuer``."""

    id: str
    type: str = "user"
    issuer: str = DEFAULT_NAMESPACE
    scopes: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    name: str = ""

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes


@dataclass(frozen=True)
class Claims:
    """A verified access token: its account, when it was issued and expires (unix seconds), its id."""

    account: Account
    issued_at: float
    expires_at: float
    token_id: str


class TokenVerifier:
    """Verifies RS256 access tokens with one public key, caching each result until the token expires.

    ``public_key`` is a PEM (or base64 of a PEM). ``clock`` returns unix
    seconds; expiry is judged by it, not by ``jwt``'s own clock.
    """

    def __init__(
        self,
        public_key: str | bytes,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = load_public_key(public_key)
        self._cache: OrderedDict[str, Claims] = OrderedDict()
        self._cache_size = cache_size
        self._clock = clock

    @classmethod
    def from_env(cls) -> TokenVerifier:
        """A verifier for the key in ``MICRO_AUTH_PUBLIC_KEY``; ``SetupError`` if unset."""
        key = os.environ.get(PUBLIC_KEY_ENV, "")
        if not key:
            raise SetupError(
                f"{PUBLIC_KEY_ENV} is not set: give the PEM (or base64 PEM) of the auth public key",
                id="auth",
            )
        return cls(key)

    def decode(self, token: str) -> Claims:
        """The claims of ``token``; ``Unauthorized`` saying why it is refused."""
        claims = self._cache.get(token)
        if claims is None:
            claims = self._decode(token)
            self._cache[token] = claims
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(token)
        if claims.expires_at <= self._clock():
            self._cache.pop(token, None)
            raise Unauthorized("access token has expired: get a new one (micro login)", id="auth")
        return claims

    def verify(self, token: str, *, issuer: str | None = None) -> Account:
        """The account of ``token``; with ``issuer``, only a token that namespace issued is accepted."""
        account = self.decode(token).account
        if issuer is not None and account.issuer != issuer:
            raise Unauthorized(
                f"access token was issued by namespace {account.issuer!r}, not {issuer!r}", id="auth"
            )
        return account

    def _decode(self, token: str) -> Claims:
        import jwt

        if len(token) > MAX_TOKEN_BYTES:
            raise _invalid(f"it is over {MAX_TOKEN_BYTES} bytes long")
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError as exc:
            raise _invalid(str(exc)) from exc
        if algorithm != ALGORITHM:  # also guarded by algorithms=[...] below: say it plainly
            raise _invalid(f"its algorithm is {algorithm!r}; only {ALGORITHM} is accepted")
        try:
            payload = jwt.decode(
                token,
                self._key,
                algorithms=[ALGORITHM],
                # expiry is checked against our clock, so cached and fresh results agree
                options={"verify_exp": False, "verify_iat": False, "require": _REQUIRED_CLAIMS},
            )
        except jwt.InvalidSignatureError as exc:
            raise _invalid("its signature does not match the auth public key") from exc
        except jwt.PyJWTError as exc:
            raise _invalid(str(exc)) from exc
        return _claims(payload)


def _claims(payload: dict[str, Any]) -> Claims:
    try:
        account = Account(
            id=_text(payload["sub"], nonempty=True),
            type=_one_of(payload.get("type", "user"), ACCOUNT_TYPES),
            issuer=validate_namespace(_text(payload["iss"])),
            scopes=tuple(_strings(payload.get("scopes", []))),
            metadata=_string_map(payload.get("metadata", {})),
            name=_text(payload.get("name", "")),
        )
        return Claims(account, _number(payload["iat"]), _number(payload["exp"]), _text(payload["jti"]))
    except (MicroError, ValueError) as exc:
        raise _invalid(f"its claims are malformed ({exc})") from exc


def _text(value: object, *, nonempty: bool = False) -> str:
    if not isinstance(value, str) or (nonempty and not value):
        raise ValueError(f"expected a {'non-empty ' if nonempty else ''}string, got {value!r}")
    return value


def _one_of(value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{value!r} is not one of {', '.join(allowed)}")
    return str(value)


def _strings(value: object) -> list[str]:
    if not isinstance(value, list):
        raise ValueError(f"expected a list of strings, got {value!r}")
    return [_text(item) for item in value]


def _string_map(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError(f"expected an object of strings, got {value!r}")
    return {_text(k): _text(v) for k, v in value.items()}


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number of seconds, got {value!r}")
    return float(value)


def _invalid(why: str) -> Unauthorized:
    return Unauthorized(f"access token refused: {why}", id="auth")


def pem_bytes(text: str | bytes) -> bytes:
    """A PEM as bytes, given either the PEM or the base64 of it (as Micro writes its key files)."""
    data = text.encode() if isinstance(text, str) else text
    data = data.strip()
    if data.startswith(b"-----BEGIN"):
        return data
    try:
        return base64.b64decode(data, validate=True).strip()
    except (binascii.Error, ValueError):
        return data  # not base64 either: let the PEM loader say what is wrong


def load_public_key(text: str | bytes) -> RSAPublicKey:
    """The RSA public key in ``text`` (PEM or base64 PEM); ``SetupError`` if it is not one."""
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(pem_bytes(text))
    except ValueError as exc:
        raise SetupError(f"the auth public key is not a PEM public key: {exc}", id="auth") from exc
    if not isinstance(key, RSAPublicKey):
        raise SetupError(f"the auth public key is {type(key).__name__}, not an RSA key", id="auth")
    return key


def bearer_token(metadata: Mapping[str, str]) -> str | None:
    """The token of an ``authorization: Bearer <token>`` header, ``None`` if there is none."""
    header = metadata.get("authorization", "")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def offline_authenticator(
    public_key: str | None,
) -> Callable[[Mapping[str, str]], Awaitable[tuple[Account | None, MicroError | None]]] | None:
    """A ``Dispatcher`` hook that puts the caller's account on the context, verified with ``public_key``.

    ``None`` without a key (the service then sees no accounts). The verifier
    (and ``jwt``) is loaded on the first call that carries a token.
    """
    if not public_key:
        return None
    verifier: TokenVerifier | None = None

    async def authenticate(metadata: Mapping[str, str]) -> tuple[Account | None, MicroError | None]:
        nonlocal verifier
        token = bearer_token(metadata)
        if token is None:
            return None, None
        if verifier is None:
            verifier = TokenVerifier(public_key)
        try:
            return verifier.verify(token), None
        except Unauthorized as error:
            return None, error

    return authenticate


_SERVICE = "auth"
_AUTH = "/micro.auth.v1.Auth/"
_ACCOUNTS = "/micro.auth.v1.Accounts/"
_RULES = "/micro.auth.v1.Rules/"


class AuthClient:
    """Accounts, tokens and rules of a namespace (``namespace=""``: the client's own)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def generate(
        self,
        id: str,
        *,
        secret: str = "",
        type: str = "user",
        scopes: Iterable[str] = (),
        metadata: Mapping[str, str] | None = None,
        name: str = "",
        namespace: str = "",
    ) -> auth_pb2.Account:
        """Create an account; the answer holds its secret (generated when empty), shown this once."""
        request = auth_pb2.GenerateRequest(
            id=id,
            secret=secret,
            type=type,
            scopes=list(scopes),
            metadata=dict(metadata or {}),
            name=name,
            options=_options(namespace),
        )
        response = await self.client.call(_SERVICE, _AUTH + "Generate", request, auth_pb2.GenerateResponse)
        return response.account

    async def token(
        self,
        *,
        id: str = "",
        secret: str = "",
        refresh_token: str = "",
        expiry: int = 0,
        namespace: str = "",
    ) -> auth_pb2.Token:
        """Exchange an id (or name) and secret, or a refresh token, for an access token."""
        request = auth_pb2.TokenRequest(
            id=id,
            secret=secret,
            refresh_token=refresh_token,
            token_expiry=expiry,
            options=_options(namespace),
        )
        response = await self.client.call(_SERVICE, _AUTH + "Token", request, auth_pb2.TokenResponse)
        return response.token

    async def inspect(self, token: str) -> auth_pb2.Account:
        """The account of ``token``, as the daemon sees it (revocations included)."""
        request = auth_pb2.InspectRequest(token=token)
        response = await self.client.call(_SERVICE, _AUTH + "Inspect", request, auth_pb2.InspectResponse)
        return response.account

    async def list(self, *, namespace: str = "") -> list[auth_pb2.Account]:
        request = auth_pb2.ListAccountsRequest(options=_options(namespace))
        response = await self.client.call(
            _SERVICE, _ACCOUNTS + "List", request, auth_pb2.ListAccountsResponse
        )
        return list(response.accounts)

    async def delete(self, id: str, *, namespace: str = "") -> None:
        """Delete an account: its refresh tokens stop working at once, its access tokens at the daemon."""
        request = auth_pb2.DeleteAccountRequest(id=id, options=_options(namespace))
        await self.client.call(_SERVICE, _ACCOUNTS + "Delete", request, auth_pb2.DeleteAccountResponse)

    async def change_secret(
        self, id: str, new_secret: str, *, old_secret: str = "", namespace: str = ""
    ) -> None:
        """Set a new secret (the old one is needed unless the caller is an admin); revokes its tokens."""
        request = auth_pb2.ChangeSecretRequest(
            id=id, old_secret=old_secret, new_secret=new_secret, options=_options(namespace)
        )
        await self.client.call(_SERVICE, _ACCOUNTS + "ChangeSecret", request, auth_pb2.ChangeSecretResponse)

    async def create_rule(
        self,
        id: str,
        resource: str,
        *,
        scope: str = "",
        access: Literal["granted", "denied"] = "granted",
        priority: int = 0,
        namespace: str = "",
    ) -> None:
        """Add or replace rule ``id`` on ``resource`` (``type:name:endpoint``) for ``scope``."""
        rule = auth_pb2.Rule(
            id=id,
            scope=scope,
            resource=parse_resource(resource),
            access=auth_pb2.GRANTED if access == "granted" else auth_pb2.DENIED,
            priority=priority,
        )
        request = auth_pb2.CreateRuleRequest(rule=rule, options=_options(namespace))
        await self.client.call(_SERVICE, _RULES + "Create", request, auth_pb2.CreateRuleResponse)

    async def delete_rule(self, id: str, *, namespace: str = "") -> None:
        request = auth_pb2.DeleteRuleRequest(id=id, options=_options(namespace))
        await self.client.call(_SERVICE, _RULES + "Delete", request, auth_pb2.DeleteRuleResponse)

    async def list_rules(self, *, namespace: str = "") -> builtins.list[auth_pb2.Rule]:
        request = auth_pb2.ListRulesRequest(options=_options(namespace))
        response = await self.client.call(_SERVICE, _RULES + "List", request, auth_pb2.ListRulesResponse)
        return list(response.rules)

    async def verify(
        self, resource: str, *, account_id: str = "", namespace: str = ""
    ) -> auth_pb2.VerifyResponse:
        """Whether ``account_id`` (empty: anonymous) may access ``resource``, and which rule decided."""
        request = auth_pb2.VerifyRequest(
            account_id=account_id, resource=parse_resource(resource), options=_options(namespace)
        )
        return await self.client.call(_SERVICE, _RULES + "Verify", request, auth_pb2.VerifyResponse)


def parse_resource(text: str) -> auth_pb2.Resource:
    """``type:name:endpoint`` as a ``Resource``; the endpoint may itself hold ``:``."""
    parts = text.split(":", 2)
    if len(parts) != 3:
        raise BadRequest(f"resource {text!r} is not of the form type:name:endpoint, e.g. service:store:*")
    return auth_pb2.Resource(type=parts[0], name=parts[1], endpoint=parts[2])


def _options(namespace: str) -> auth_pb2.Options:
    return auth_pb2.Options(namespace=namespace)
