"""Who may act on a namespace (Micro v3's ``namespace.Authorize`` and ``AuthorizeAdmin``).

Administrators of the ``micro`` namespace (a ``user`` with scope ``admin``, or
a ``service`` with scope ``service``) may act on any namespace. Anyone else
must be a ``user`` or ``service`` account of the namespace itself, and, for
``authorize_admin``, one of those two kinds of administrator there.
"""

from __future__ import annotations

from micro.auth import Account
from micro.context import DEFAULT_NAMESPACE
from micro.errors import Forbidden, Unauthorized

__all__ = ["authorize", "authorize_admin", "is_admin"]


def is_admin(account: Account) -> bool:
    """A ``user`` with scope ``admin`` or a ``service`` with scope ``service``, of its own namespace."""
    return (account.type == "user" and account.has_scope("admin")) or (
        account.type == "service" and account.has_scope("service")
    )


def authorize(account: Account | None, namespace: str) -> Account:
    """Return ``account`` if it may act on ``namespace``; ``Unauthorized`` or ``Forbidden`` if not."""
    if account is None:
        raise Unauthorized(f"sign in to use namespace {namespace!r}", id="auth")
    if account.issuer == DEFAULT_NAMESPACE and is_admin(account):
        return account
    if account.issuer != namespace:
        raise Forbidden(
            f"account {account.id!r} of namespace {account.issuer!r} may not use namespace {namespace!r}",
            id="auth",
        )
    if account.type not in ("user", "service"):
        raise Forbidden(f"a {account.type} account may not use namespace {namespace!r}", id="auth")
    return account


def authorize_admin(account: Account | None, namespace: str) -> Account:
    """Like ``authorize``, and the account must also be an administrator."""
    authorize(account, namespace)
    assert account is not None
    if not is_admin(account):
        raise Forbidden(
            f"account {account.id!r} is not an administrator of namespace {namespace!r} "
            "(a user with scope admin, or a service with scope service)",
            id="auth",
        )
    return account
