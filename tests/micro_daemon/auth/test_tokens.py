from __future__ import annotations

import asyncio
import hashlib

import jwt
import pytest

from micro.auth import Account, TokenVerifier
from micro.errors import BadRequest, Unauthorized
from micro_daemon.auth.tokens import (
    DATABASE,
    MAX_LIFETIME,
    TABLE,
    RefreshTokens,
    TokenIssuer,
    Verifier,
    issued_time,
    revoking_time,
)
from micro_daemon.store.backend import Query

from .conftest import START, Clock

ALICE = Account("alice", "service", "ns", ("service", "dev"), {"team": "a"}, "Alice")


@pytest.fixture
def issuer(keys, clock):
    return TokenIssuer(keys, clock=clock)


def test_access_tokens_are_rs256_with_every_claim(issuer, keys, clock):
    clock.advance(0.1234)
    token, issued, expires = issuer.access_token(ALICE, 900)
    assert jwt.get_unverified_header(token)["alg"] == "RS256"
    claims = jwt.decode(
        token,
        keys.private_key.public_key(),
        algorithms=["RS256"],
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims == {
        "sub": "alice",
        "iss": "ns",
        "type": "service",
        "scopes": ["service", "dev"],
        "name": "Alice",
        "metadata": {"team": "a"},
        "iat": START + 0.123,
        "exp": START + 900,
        "jti": claims["jti"],
    }
    assert (issued, expires) == (START + 0.123, START + 900)
    assert len(claims["jti"]) >= 16
    assert issuer.access_token(ALICE, 900)[0] != token  # a fresh jti each time


def test_lifetimes(issuer):
    assert issuer.lifetime_for(0) == 900
    assert issuer.lifetime_for(60) == 60
    assert issuer.lifetime_for(MAX_LIFETIME) == MAX_LIFETIME
    for bad in (-1, MAX_LIFETIME + 1):
        with pytest.raises(BadRequest, match="token_expiry"):
            issuer.lifetime_for(bad)


def test_issued_time_truncates_to_the_millisecond():
    assert issued_time(10.12399) == 10.123
    assert issued_time(10.0) == 10.0


async def test_refresh_tokens_are_stored_hashed_per_account(store, clock):
    tokens = RefreshTokens(store, clock=clock)
    token = await tokens.issue("ns", "alice")
    assert len(token) >= 43
    keys = await store.keys(DATABASE, TABLE, Query(prefix="refresh/"))
    assert keys == [f"refresh/ns/alice/{hashlib.sha256(token.encode()).hexdigest()}"]
    record = await store.get(DATABASE, TABLE, keys[0])
    assert token.encode() not in record.value
    assert record.value == f'{{"created": {START}}}'.encode()
    assert record.expires_at == START + 30 * 24 * 3600
    assert await tokens.redeem("ns", token) == "alice"


async def test_refresh_tokens_of_another_namespace_or_revoked_are_refused(store, clock):
    tokens = RefreshTokens(store, lifetime=0, clock=clock)
    token = await tokens.issue("ns", "alice")
    other = await tokens.issue("ns", "alice")
    await tokens.issue("ns", "bob")
    assert (
        await store.get(DATABASE, TABLE, f"refresh/ns/alice/{hashlib.sha256(token.encode()).hexdigest()}")
    ).expires_at is None
    with pytest.raises(Unauthorized, match="refresh token is not valid"):
        await tokens.redeem("other", token)
    with pytest.raises(Unauthorized):
        await tokens.redeem("ns", token + "x")
    assert await tokens.revoke_all("ns", "alice") == 2
    for revoked in (token, other):
        with pytest.raises(Unauthorized):
            await tokens.redeem("ns", revoked)
    assert await store.keys(DATABASE, TABLE, Query(prefix="refresh/")) != []  # bob's is still there


class Accounts:
    """``not_before`` per account, counting lookups."""

    def __init__(self) -> None:
        self.not_before: dict[tuple[str, str], float] = {}
        self.lookups = 0
        self.gate: asyncio.Event | None = None

    async def __call__(self, namespace: str, account_id: str) -> float | None:
        self.lookups += 1
        found = self.not_before.get((namespace, account_id))
        if self.gate is not None:
            await self.gate.wait()
        return found


@pytest.fixture
def accounts():
    accounts = Accounts()
    accounts.not_before[("ns", "alice")] = START
    return accounts


@pytest.fixture
def ttl_clock():
    return Clock(0.0)


@pytest.fixture
def verifier(keys, clock, accounts, ttl_clock):
    return Verifier(TokenVerifier(keys.public_pem, clock=clock), accounts, ttl=5, clock=ttl_clock)


async def test_the_verifier_accepts_live_accounts_and_caches_what_it_learns(
    verifier, issuer, accounts, ttl_clock
):
    token = issuer.access_token(ALICE, 900)[0]
    assert await verifier.verify(token) == ALICE
    assert await verifier.verify(token, issuer="ns") == ALICE
    assert accounts.lookups == 1
    ttl_clock.advance(5)
    await verifier.verify(token)
    assert accounts.lookups == 2
    with pytest.raises(Unauthorized, match="issued by namespace 'ns', not 'other'"):
        await verifier.verify(token, issuer="other")


async def test_tokens_of_a_deleted_account_are_refused(verifier, issuer, accounts):
    token = issuer.access_token(ALICE, 900)[0]
    await verifier.verify(token)
    del accounts.not_before[("ns", "alice")]
    verifier.forget("ns", "alice")
    with pytest.raises(Unauthorized, match="no longer exists"):
        await verifier.verify(token)


async def test_tokens_issued_before_not_before_are_refused(verifier, issuer, accounts, clock):
    old = issuer.access_token(ALICE, 900)[0]
    clock.advance(0.001)
    accounts.not_before[("ns", "alice")] = issued_time(clock())
    verifier.forget("ns", "alice")
    with pytest.raises(Unauthorized, match="revoked"):
        await verifier.verify(old)
    assert await verifier.verify(issuer.access_token(ALICE, 900)[0]) == ALICE  # same millisecond: accepted


async def test_revoking_in_the_millisecond_a_token_was_issued_refuses_it_and_not_the_next(
    verifier, issuer, accounts, clock
):
    old = issuer.access_token(ALICE, 900)[0]
    not_before = revoking_time(clock())  # a secret changed in the same millisecond
    accounts.not_before[("ns", "alice")] = not_before
    verifier.forget("ns", "alice")
    with pytest.raises(Unauthorized, match="revoked"):
        await verifier.verify(old)
    token, issued, _ = issuer.access_token(ALICE, 900, not_before)  # signing in again at once
    assert issued == not_before > issued_time(clock())
    assert await verifier.verify(token) == ALICE


async def test_a_lookup_that_raced_a_forget_is_not_cached(verifier, issuer, accounts):
    token = issuer.access_token(ALICE, 900)[0]
    accounts.gate = asyncio.Event()
    pending = asyncio.create_task(verifier.verify(token))
    await asyncio.sleep(0)
    verifier.forget("ns", "alice")  # e.g. the account was deleted meanwhile
    del accounts.not_before[("ns", "alice")]
    accounts.gate.set()
    await pending
    with pytest.raises(Unauthorized, match="no longer exists"):
        await verifier.verify(token)
