"""Accounts as stored: one JSON record per account, ``account/<namespace>/<id>`` in ``micro/auth``.

A record holds the account, the scrypt hash of its secret (never the secret),
its creation time and ``not_before`` (tokens issued earlier are revoked).
Names are unique within a namespace, and no name is another account's id.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from micro.auth import ACCOUNT_TYPES, Account
from micro.errors import BadRequest, Conflict, InternalServerError, NotFound
from micro_daemon.auth.tokens import DATABASE, TABLE
from micro_daemon.store.backend import Query, Record, StoreBackend

__all__ = [
    "AccountStore",
    "StoredAccount",
    "check_account_type",
    "check_id",
    "check_metadata",
    "check_scopes",
]

MAX_SCOPES = 64
MAX_METADATA_BYTES = 4096
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")
_SCOPE = re.compile(r"^\S{1,128}$")


@dataclass(frozen=True)
class StoredAccount:
    """An account's record. ``version`` is the store's, for conditional writes; it is not stored."""

    id: str
    type: str
    issuer: str
    secret_hash: str
    created: float
    not_before: float
    scopes: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    name: str = ""
    version: int = 0

    def account(self) -> Account:
        """The public view, without the secret's hash."""
        return Account(self.id, self.type, self.issuer, self.scopes, dict(self.metadata), self.name)

    def encode(self) -> bytes:
        data = asdict(self)
        del data["version"]
        data["scopes"] = list(self.scopes)
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def decode(cls, key: str, raw: bytes, version: int) -> StoredAccount:
        try:
            data: dict[str, Any] = json.loads(raw)
            data["scopes"] = tuple(data.get("scopes", ()))
            return cls(**data, version=version)
        except (ValueError, TypeError, AttributeError) as exc:
            raise InternalServerError(
                f"account record {key!r} (store {DATABASE}/{TABLE}) is corrupt: {exc}; "
                "repair or delete that record",
                id="auth",
            ) from exc


class AccountStore:
    """Reads and writes account records on a ``StoreBackend``."""

    def __init__(self, store: StoreBackend) -> None:
        self.store = store

    async def get(self, namespace: str, account_id: str) -> StoredAccount:
        """The account; ``NotFound`` if there is none."""
        key = _key(namespace, account_id)
        try:
            record = await self.store.get(DATABASE, TABLE, key)
        except NotFound:
            raise NotFound(f"no account {account_id!r} in namespace {namespace!r}", id="auth") from None
        return StoredAccount.decode(key, record.value, record.version)

    async def find(self, namespace: str, id_or_name: str) -> StoredAccount | None:
        """The account with that id, else the one with that name, else ``None``."""
        try:
            return await self.get(namespace, id_or_name)
        except NotFound:
            pass
        return next((a for a in await self.list(namespace) if a.name == id_or_name), None)

    async def list(self, namespace: str) -> list[StoredAccount]:
        records = await self.store.query(DATABASE, TABLE, Query(prefix=_key(namespace, "")))
        return [StoredAccount.decode(r.key, r.value, r.version) for r in records]

    async def create(self, account: StoredAccount) -> StoredAccount:
        """Store a new account; ``Conflict`` if its id, or its name, is taken in its namespace."""
        for other in await self.list(account.issuer):
            if account.id in (other.id, other.name):
                raise _taken(account, account.id)
            if account.name in (other.id, other.name):
                raise _taken(account, account.name)
        record = Record(key=_key(account.issuer, account.id), value=account.encode())
        try:
            version = await self.store.put(DATABASE, TABLE, record, if_version=0)
        except Conflict:
            raise _taken(account, account.id) from None
        return replace(account, version=version)

    async def update(self, account: StoredAccount) -> StoredAccount:
        """Replace the record, if it still is at ``account.version``; else ``Conflict``."""
        record = Record(key=_key(account.issuer, account.id), value=account.encode())
        try:
            version = await self.store.put(DATABASE, TABLE, record, if_version=account.version)
        except Conflict:
            raise Conflict(
                f"account {account.id!r} changed during this update: try again", id="auth"
            ) from None
        return replace(account, version=version)

    async def delete(self, namespace: str, account_id: str) -> None:
        """Delete the record; ``NotFound`` if there is none."""
        try:
            await self.store.delete(DATABASE, TABLE, _key(namespace, account_id))
        except NotFound:
            raise NotFound(f"no account {account_id!r} in namespace {namespace!r}", id="auth") from None


def check_id(value: str, what: str = "account id") -> str:
    if not _ID.match(value):
        raise BadRequest(
            f"invalid {what} {value!r}: use 1-128 letters, digits, '.', '_', '@', '+' or '-', "
            "starting with a letter or digit",
            id="auth",
        )
    return value


def check_account_type(value: str) -> str:
    value = value or "user"
    if value not in ACCOUNT_TYPES:
        raise BadRequest(f"invalid account type {value!r}: use {', '.join(ACCOUNT_TYPES)}", id="auth")
    return value


def check_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    checked = tuple(dict.fromkeys(scopes))
    if len(checked) > MAX_SCOPES:
        raise BadRequest(f"an account has at most {MAX_SCOPES} scopes, not {len(checked)}", id="auth")
    for scope in checked:
        if not _SCOPE.match(scope):
            raise BadRequest(f"invalid scope {scope!r}: 1-128 characters, no spaces", id="auth")
    return checked


def check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    size = len(json.dumps(dict(metadata)).encode())
    if size > MAX_METADATA_BYTES:
        raise BadRequest(
            f"account metadata is {size} bytes as JSON; the limit is {MAX_METADATA_BYTES} "
            "(it travels in every token)",
            id="auth",
        )
    return dict(metadata)


def _key(namespace: str, account_id: str) -> str:
    return f"account/{namespace}/{account_id}"


def _taken(account: StoredAccount, taken: str) -> Conflict:
    return Conflict(
        f"an account with id or name {taken!r} already exists in namespace {account.issuer!r}", id="auth"
    )
