"""The daemon's gate: who is calling, and whether they may.

Every way into the daemon asks it: the building blocks (through the
``Dispatcher``'s hooks), the proxy and the API gateway (``check_call``).

* A call's account comes from its ``authorization: Bearer <token>``, verified
  with the daemon's verifier (signature, expiry, revocation; cached). A token
  that fails is an anonymous call whose refusal, if any, says why the token
  failed.
* Calls to user services are decided by the rules of the namespace they name
  (``micro-namespace``, default ``micro``) for resource
  ``service:<name>:<Endpoint>``, as Micro v3's auth wrapper does; a token of
  another namespace is refused unless it is a ``micro`` administrator's.
* Building blocks require an account of the namespace (``authorize``), except
  the public endpoints below; the auth and registry blocks check each request
  themselves (tokens are public to ask for, registry reads of ``micro`` are
  public).

With auth disabled (``--auth none``) every caller is ``LOCAL_ADMIN`` and no
rule is evaluated: that is what disabling auth means.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from micro._metadata import NAMESPACE_KEY
from micro.auth import Account, bearer_token
from micro.context import DEFAULT_NAMESPACE, Context, validate_namespace
from micro.errors import Forbidden, MicroError, Unauthorized
from micro_daemon.auth.engine import AuthEngine
from micro_daemon.auth.namespaces import authorize, is_admin
from micro_daemon.auth.rules import Decision, Resource, verify

__all__ = ["LOCAL_ADMIN", "PUBLIC_ENDPOINTS", "SELF_CHECKING_BLOCKS", "Gate", "log_refusal", "require"]

log = logging.getLogger("micro.auth")

LOCAL_ADMIN = Account(
    id="local", type="user", issuer=DEFAULT_NAMESPACE, scopes=("admin",), name="auth disabled"
)

MAX_DECISIONS = 8192

PUBLIC_ENDPOINTS = frozenset({"Debug.Health"})
"""Building-block endpoints anyone may call, signed in or not."""

SELF_CHECKING_BLOCKS = frozenset({"auth", "registry"})
"""Blocks whose handlers decide per request (see the module docstring)."""


def require(context: Context, namespace: str, *, what: str = "") -> Account:
    """The caller's account if it may act on ``namespace``; else ``Unauthorized``/``Forbidden``.

    An anonymous caller whose token was refused hears why (expired, revoked,
    ...), not just that it must sign in.
    """
    if context.account is None:
        if context.auth_error is not None:
            raise context.auth_error
        where = f"{what} of namespace {namespace!r}" if what else f"namespace {namespace!r}"
        raise Unauthorized(f"sign in to use {where} (micro login)", id="auth")
    return authorize(context.account, namespace)


class Gate:
    """Authentication and authorization for one daemon; ``engine=None`` disables auth."""

    def __init__(self, engine: AuthEngine | None) -> None:
        self.engine = engine
        # Decisions by (namespace, rules generation, who, service, endpoint): matching a call
        # against the rules costs tens of microseconds, a lookup well under one.
        self._decisions: dict[tuple[object, ...], Decision] = {}

    @property
    def enabled(self) -> bool:
        return self.engine is not None

    async def authenticate(self, metadata: Mapping[str, str]) -> tuple[Account | None, MicroError | None]:
        """The caller's account, or ``None`` and why its token was refused (``None, None``: no token)."""
        if self.engine is None:
            return LOCAL_ADMIN, None
        token = bearer_token(metadata)
        if token is None:
            return None, None
        try:
            return await self.engine.verifier.verify(token), None
        except Unauthorized as error:
            return None, error

    def admit_block(self, context: Context) -> None:
        """The ``Dispatcher`` hook for building blocks: an account of the call's namespace, or refused."""
        if context.endpoint in PUBLIC_ENDPOINTS or context.service in SELF_CHECKING_BLOCKS:
            return
        require(context, context.namespace, what=f"the {context.service}")

    async def check_call(self, metadata: Mapping[str, str], service: str, endpoint: str) -> Account | None:
        """Whether this call may reach ``endpoint`` of user service ``service``; its account if it may.

        Raises ``Unauthorized`` (no or an invalid token, and the rules want
        one) or ``Forbidden`` (an account the rules or the namespace refuse).
        """
        if self.engine is None:
            return LOCAL_ADMIN
        namespace = validate_namespace(metadata.get(NAMESPACE_KEY) or DEFAULT_NAMESPACE)
        account, token_error = await self.authenticate(metadata)
        if account is not None and account.issuer != namespace and not _micro_admin(account):
            raise Forbidden(
                f"account {account.id!r} of namespace {account.issuer!r} may not call "
                f"services of namespace {namespace!r}",
                id="auth",
            )
        decision = await self._decide(namespace, account, service, endpoint)
        if not decision.granted:
            if account is None and token_error is not None:
                raise token_error
            decision.raise_if_denied()
        return account

    async def _decide(self, namespace: str, account: Account | None, service: str, endpoint: str) -> Decision:
        assert self.engine is not None
        generation, rules = await self.engine.rules.versioned(namespace)
        who = None if account is None else (account.id, account.issuer, account.type, account.scopes)
        key = (namespace, generation, who, service, endpoint)
        decision = self._decisions.get(key)
        if decision is None:
            decision = verify(rules, account, Resource("service", service, endpoint), namespace)
            if generation is not None:
                if len(self._decisions) >= MAX_DECISIONS:
                    self._decisions.clear()  # rules changed or callers churn: start again
                self._decisions[key] = decision
        return decision


def log_refusal(what: str, address: str, error: MicroError) -> None:
    """One warning line per refused call (never the token), for whoever watches the server log."""
    log.warning("refused %s from %s: %s", what, address or "?", error.detail)


def _micro_admin(account: Account) -> bool:
    return account.issuer == DEFAULT_NAMESPACE and is_admin(account)
