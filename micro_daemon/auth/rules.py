"""Access rules, and how they decide (Micro v3's ``VerifyAccess``).

A rule grants or denies a scope access to resources ``type:name:endpoint``.
``verify`` picks the rules whose type, name and endpoint match the resource
(``*`` matches anything; an endpoint that is a path also matches ``a/*``,
``a/b/*``, ... for each of its prefixes; case-insensitive), and looks at them
by priority, highest first. Each rule, for the caller:

* scope ``""`` (public): applies to everyone, anonymous or not;
* otherwise an anonymous caller skips it;
* scope other than ``+``, account of another namespace: denies (403);
* scope ``*`` (any account of the namespace) or ``+`` (any account at all):
  applies;
* any other scope: applies if the account has it (case-insensitive).

The first priority level holding a rule that applies decides, and there a
deny beats a grant, whatever their order in the list (Micro takes the first in
list order). When no rule applies: 401 for an anonymous caller, 403 for an
account.

Rules are stored as ``rules/<namespace>/<id>`` in store table ``micro/auth``.
The first time a namespace's rules are read and there are none, the default
rule (public, granted, ``*:*:*``) is written, and the namespace is marked
(``rules/<namespace>``) so that a namespace whose rules were all deleted
stays closed, even after a restart (Micro writes the default again then).
Creating a rule marks the namespace too: one whose first rule was created
before any read never gets the default.
"""

from __future__ import annotations

import asyncio
import builtins
import enum
import itertools
import json
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from micro.auth import Account
from micro.errors import BadRequest, Conflict, Forbidden, InternalServerError, NotFound, Unauthorized
from micro_daemon.auth.accounts import check_id
from micro_daemon.auth.tokens import DATABASE, TABLE
from micro_daemon.store.backend import Query, Record, StoreBackend

__all__ = ["DEFAULT_RULE", "Access", "Decision", "Resource", "Rule", "RuleStore", "verify"]

_FIELD = re.compile(r"^\S{1,256}$")
_SCOPE = re.compile(r"^\S{0,128}$")
_INT32 = range(-(2**31), 2**31)
RULES_TTL = 5.0


class Access(enum.Enum):
    GRANTED = "granted"
    DENIED = "denied"


@dataclass(frozen=True)
class Resource:
    """What a rule covers, e.g. ``service:store:Store.Read``; ``*`` matches anything."""

    type: str
    name: str
    endpoint: str

    @classmethod
    def parse(cls, text: str) -> Resource:
        """``type:name:endpoint`` (the endpoint may hold ``:``); ``BadRequest`` if malformed."""
        parts = text.split(":", 2)
        if len(parts) != 3:
            raise _bad_resource(text)
        return cls(*parts).check()

    def check(self) -> Resource:
        if not all(_FIELD.match(part) for part in (self.type, self.name, self.endpoint)):
            raise _bad_resource(str(self))
        return self

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{self.endpoint}"


@dataclass(frozen=True)
class Rule:
    """Grants or denies ``scope`` access to ``resource``; higher ``priority`` is looked at first."""

    id: str
    scope: str
    resource: Resource
    access: Access
    priority: int = 0

    def check(self) -> Rule:
        check_id(self.id, "rule id")
        self.resource.check()
        if not _SCOPE.match(self.scope):
            raise BadRequest(f"invalid rule scope {self.scope!r}: up to 128 characters, no spaces", id="auth")
        if self.priority not in _INT32:
            raise BadRequest(f"rule priority {self.priority} is out of the int32 range", id="auth")
        return self


DEFAULT_RULE = Rule("default", "", Resource("*", "*", "*"), Access.GRANTED, 0)


@dataclass(frozen=True)
class Decision:
    """The outcome of ``verify``: ``code`` is 200, or 401/403 when denied; ``rule`` is the deciding one."""

    granted: bool
    rule: Rule | None
    reason: str
    code: int = 200

    def raise_if_denied(self) -> None:
        """Raise ``Unauthorized`` (401) or ``Forbidden`` (403) unless granted."""
        if self.granted:
            return
        raise (Unauthorized if self.code == 401 else Forbidden)(self.reason, id="auth")


def verify(rules: Iterable[Rule], account: Account | None, resource: Resource, namespace: str) -> Decision:
    """Whether ``account`` (``None``: anonymous) may access ``resource`` in ``namespace``."""
    candidates = sorted((r for r in rules if _covers(r.resource, resource)), key=lambda r: -r.priority)
    for _, level in itertools.groupby(candidates, key=lambda r: r.priority):
        applying = [(rule, *_apply(rule, account, namespace)) for rule in level]
        for wanted in (Access.DENIED, Access.GRANTED):
            for rule, access, reason in applying:
                if access is wanted:
                    code = 200 if access is Access.GRANTED else 403
                    return Decision(access is Access.GRANTED, rule, reason, code)
    if account is None:
        return Decision(False, None, f"no rule lets anonymous callers access {resource}: sign in", 401)
    return Decision(False, None, f"no rule lets account {account.id!r} access {resource}", 403)


def _covers(pattern: Resource, resource: Resource) -> bool:
    return (
        _equal_or_any(pattern.type, resource.type)
        and _equal_or_any(pattern.name, resource.name)
        and pattern.endpoint.casefold() in _endpoints(resource.endpoint)
    )


def _equal_or_any(pattern: str, value: str) -> bool:
    return pattern == "*" or pattern.casefold() == value.casefold()


def _endpoints(endpoint: str) -> set[str]:
    endpoint = endpoint.casefold()
    matching = {"*", endpoint}
    parts = endpoint.split("/")
    if len(parts) > 1:  # a path: /a/b is also covered by /*, /a/* and /a/b/*
        matching.update("/".join(parts[:i]) + "/*" for i in range(1, len(parts) + 1))
    return matching


def _apply(rule: Rule, account: Account | None, namespace: str) -> tuple[Access | None, str]:
    what = f"rule {rule.id!r} ({rule.access.value}, scope {rule.scope or 'public'!r})"
    if rule.scope == "":
        return rule.access, f"{what} applies to everyone"
    if account is None:
        return None, ""
    if rule.scope != "+" and account.issuer != namespace:
        return Access.DENIED, (
            f"{what} covers accounts of namespace {namespace!r} only, and {account.id!r} "
            f"is of namespace {account.issuer!r}"
        )
    if rule.scope in ("*", "+"):
        return rule.access, f"{what} applies to any account"
    if any(s.casefold() == rule.scope.casefold() for s in account.scopes):
        return rule.access, f"{what} applies to accounts with that scope"
    return None, ""


class RuleStore:
    """The rules of each namespace, on a ``StoreBackend``; lists are cached ``ttl`` seconds."""

    def __init__(
        self, store: StoreBackend, *, ttl: float = RULES_TTL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.store = store
        self._ttl = ttl
        self._clock = clock
        self._cache: dict[str, tuple[list[Rule], float, int]] = {}
        self._generations = itertools.count()
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    async def list(self, namespace: str) -> list[Rule]:
        """The rules, by id; the default rule is written the first time a namespace has none."""
        cached = self._cache.get(namespace)
        if cached is not None and self._clock() - cached[1] < self._ttl:
            return list(cached[0])
        async with self._locks[namespace]:  # concurrent first calls: one writes the default, all see it
            cached = self._cache.get(namespace)
            if cached is not None and self._clock() - cached[1] < self._ttl:
                return list(cached[0])
            rules = await self._read(namespace)
            if not rules:
                if await self._mark(namespace):
                    await self._put_default(namespace)
                    rules = await self._read(namespace)
                else:  # marked before: all deleted, or another daemon is writing the default now
                    return []  # not cached: the next call reads again
            self._cache[namespace] = (rules, self._clock(), next(self._generations))
            return list(rules)

    async def versioned(self, namespace: str) -> tuple[int | None, Sequence[Rule]]:
        """The rules (not to be changed), with a number that changes whenever they may have.

        The number is ``None`` when the rules are not cached (a namespace whose
        rules were all deleted): nothing decided on them should be cached either.
        """
        rules = await self.list(namespace)
        cached = self._cache.get(namespace)
        if cached is None:
            return None, rules
        return cached[2], cached[0]

    async def create(self, namespace: str, rule: Rule) -> None:
        """Add the rule, or replace the rule with its id."""
        rule.check()
        await self._mark(namespace)  # created before any list: the default rule is never added
        record = Record(key=_key(namespace, rule.id), value=_encode(rule))
        await self.store.put(DATABASE, TABLE, record)
        self._cache.pop(namespace, None)

    async def delete(self, namespace: str, rule_id: str) -> None:
        """Remove the rule; ``NotFound`` if there is none."""
        try:
            await self.store.delete(DATABASE, TABLE, _key(namespace, rule_id))
        except NotFound:
            raise NotFound(f"no rule {rule_id!r} in namespace {namespace!r}", id="auth") from None
        finally:
            self._cache.pop(namespace, None)

    async def _read(self, namespace: str) -> builtins.list[Rule]:
        records = await self.store.query(DATABASE, TABLE, Query(prefix=_key(namespace, "")))
        return [_decode(r.key, r.value) for r in records]

    async def _mark(self, namespace: str) -> bool:
        """Mark the namespace's rules as set up; ``True`` if this call did it."""
        try:
            await self.store.put(DATABASE, TABLE, Record(key=f"rules/{namespace}", value=b"{}"), if_version=0)
        except Conflict:
            return False
        return True

    async def _put_default(self, namespace: str) -> None:
        record = Record(key=_key(namespace, DEFAULT_RULE.id), value=_encode(DEFAULT_RULE))
        try:
            await self.store.put(DATABASE, TABLE, record, if_version=0)
        except Conflict:  # a rule with its id was created meanwhile: leave it
            pass


def _key(namespace: str, rule_id: str) -> str:
    return f"rules/{namespace}/{rule_id}"


def _encode(rule: Rule) -> bytes:
    data = {
        "id": rule.id,
        "scope": rule.scope,
        "resource": {
            "type": rule.resource.type,
            "name": rule.resource.name,
            "endpoint": rule.resource.endpoint,
        },
        "access": rule.access.value,
        "priority": rule.priority,
    }
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def _decode(key: str, raw: bytes) -> Rule:
    try:
        data: dict[str, Any] = json.loads(raw)
        resource = Resource(**data["resource"])
        return Rule(data["id"], data["scope"], resource, Access(data["access"]), int(data["priority"]))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise InternalServerError(
            f"rule record {key!r} (store {DATABASE}/{TABLE}) is corrupt: {exc}; repair or delete it",
            id="auth",
        ) from exc


def _bad_resource(text: str) -> BadRequest:
    return BadRequest(
        f"invalid rule resource {text!r}: use type:name:endpoint, each part non-empty and without spaces, "
        "e.g. service:store:Store.Read or service:*:*",
        id="auth",
    )
