from __future__ import annotations

import logging

import pytest

from micro.auth import Account, TokenVerifier
from micro.errors import BadRequest, Conflict, InternalServerError, NotFound, TooManyRequests, Unauthorized
from micro_daemon.auth.engine import AuthEngine
from micro_daemon.auth.passwords import SecretHasher
from micro_daemon.auth.throttle import Throttle
from micro_daemon.auth.tokens import DATABASE, TABLE, revoking_time
from micro_daemon.store.backend import Query, Record

from .conftest import START, sign_in


async def raw_records(store) -> dict[str, bytes]:
    return {r.key: r.value for r in await store.query(DATABASE, TABLE, Query())}


async def test_generate_returns_the_secret_once_and_stores_only_its_hash(engine, store):
    account, secret = await engine.generate(
        "ns", "alice", scopes=["dev"], metadata={"team": "a"}, secret="s3cret!"
    )
    assert account == Account("alice", "user", "ns", ("dev",), {"team": "a"}, "alice")
    assert secret == "s3cret!"
    records = await raw_records(store)
    assert list(records) == ["account/ns/alice"]
    assert b"s3cret!" not in records["account/ns/alice"]
    assert b'"secret_hash":"scrypt$' in records["account/ns/alice"]
    assert await engine.list_accounts("ns") == [account]


async def test_an_empty_secret_is_generated(engine, store):
    _, secret = await engine.generate("ns", "svc", type="service")
    assert len(secret) >= 32
    assert secret.encode() not in (await raw_records(store))["account/ns/svc"]
    assert (await engine.token("ns", id="svc", secret=secret)).access_token


async def test_ids_and_names_are_unique_per_namespace(engine):
    await engine.generate("ns", "alice", name="al")
    for account_id, name in [("alice", ""), ("bob", "al"), ("bob", "alice"), ("al", "")]:
        with pytest.raises(Conflict, match="already exists in namespace 'ns'"):
            await engine.generate("ns", account_id, name=name)
    await engine.generate("other", "alice", name="al")


@pytest.mark.parametrize(
    ("namespace", "account_id", "options", "message"),
    [
        ("ns", "", {}, "invalid account id"),
        ("ns", "a/b", {}, "invalid account id"),
        ("ns", "../admin", {}, "invalid account id"),
        ("ns", "a b", {}, "invalid account id"),
        ("ns", "alice", {"name": "x/y"}, "invalid account name"),
        ("ns", "alice", {"type": "root"}, "invalid account type"),
        ("ns", "alice", {"scopes": ["two words"]}, "invalid scope"),
        ("ns", "alice", {"scopes": [""]}, "invalid scope"),
        ("ns", "alice", {"metadata": {"k": "v" * 5000}}, "limit is 4096"),
        ("ns", "alice", {"secret": "x" * 2000}, "at most 1024 bytes"),
        ("a/b", "alice", {}, "invalid namespace"),
        ("../micro", "alice", {}, "invalid namespace"),
        ("Micro", "alice", {}, "invalid namespace"),
    ],
)
async def test_invalid_accounts_are_refused(engine, namespace, account_id, options, message):
    with pytest.raises(BadRequest, match=message):
        await engine.generate(namespace, account_id, **options)


async def test_a_namespace_with_path_characters_is_refused_everywhere(engine):
    for call in (
        engine.token("micro/../x", id="admin", secret="micro"),
        engine.list_accounts("a/b"),
        engine.delete_account("../ns", "x"),
        engine.change_secret("ns/", "x", "y", old_secret=None),
    ):
        with pytest.raises(BadRequest, match="invalid namespace"):
            await call


async def test_sign_in_by_id_or_name(engine):
    await engine.generate("ns", "alice", secret="pw", name="al")
    for who in ("alice", "al"):
        token = await engine.token("ns", id=who, secret="pw")
        assert (await engine.inspect(token.access_token)).id == "alice"
        assert token.expiry == START + 900
        assert token.created == revoking_time(START)  # no earlier than the account (made this ms)


async def test_wrong_and_unknown_credentials_answer_alike(engine):
    await engine.generate("ns", "alice", secret="pw")
    messages = set()
    for who, secret in [("alice", "wrong"), ("nobody", "pw"), ("alice", "")]:
        with pytest.raises((Unauthorized, BadRequest)) as info:
            await engine.token("ns", id=who, secret=secret)
        messages.add(str(info.value))
    assert "wrong id or secret for namespace 'ns'" in messages


async def test_credentials_of_one_namespace_do_not_sign_in_to_another(engine):
    await engine.generate("a", "alice", secret="pw")
    with pytest.raises(Unauthorized):
        await engine.token("b", id="alice", secret="pw")


async def test_token_lifetime_is_requested_or_15_minutes(engine):
    await engine.generate("ns", "alice", secret="pw")
    assert (await engine.token("ns", id="alice", secret="pw", lifetime=60)).expiry == START + 60
    with pytest.raises(BadRequest, match="token_expiry"):
        await engine.token("ns", id="alice", secret="pw", lifetime=-5)
    short = AuthEngine(
        engine.accounts.store,
        engine.keys,
        token_lifetime=30,
        hasher=SecretHasher(n=2**4),
        clock=lambda: START,
    )
    assert (await short.token("ns", id="alice", secret="pw")).expiry == START + 30


async def test_a_refresh_token_gives_new_access_tokens(engine, clock):
    await engine.generate("ns", "alice", secret="pw")
    first = await engine.token("ns", id="alice", secret="pw")
    clock.advance(600)
    again = await engine.token("ns", refresh_token=first.refresh_token, lifetime=600)
    assert again.refresh_token == first.refresh_token
    assert again.access_token != first.access_token
    assert again.expiry == START + 1200
    assert (await engine.inspect(again.access_token)).id == "alice"
    with pytest.raises(Unauthorized, match="refresh token is not valid"):
        await engine.token("other", refresh_token=first.refresh_token)
    with pytest.raises(BadRequest, match="give an id and a secret"):
        await engine.token("ns", id="alice")


async def test_deleting_an_account_revokes_its_tokens(engine, keys, clock):
    await engine.generate("ns", "alice", secret="pw")
    token = await engine.token("ns", id="alice", secret="pw")
    await engine.inspect(token.access_token)  # cached as live
    await engine.delete_account("ns", "alice")
    with pytest.raises(Unauthorized, match="refresh token is not valid"):
        await engine.token("ns", refresh_token=token.refresh_token)
    with pytest.raises(Unauthorized, match="no longer exists"):
        await engine.inspect(token.access_token)
    # documented: an offline verifier sees no revocation and accepts it until it expires
    assert TokenVerifier(keys.public_pem, clock=clock).verify(token.access_token).id == "alice"
    with pytest.raises(NotFound):
        await engine.delete_account("ns", "alice")


async def test_an_account_created_again_does_not_revive_old_tokens(engine, clock):
    await engine.generate("ns", "alice", secret="pw")
    old = await engine.token("ns", id="alice", secret="pw")
    await engine.delete_account("ns", "alice")
    clock.advance(1)
    await engine.generate("ns", "alice", secret="pw")
    with pytest.raises(Unauthorized, match="revoked"):
        await engine.inspect(old.access_token)


async def test_changing_the_secret_revokes_tokens(engine, store, clock):
    await engine.generate("ns", "alice", secret="pw")
    old = await engine.token("ns", id="alice", secret="pw")
    clock.advance(1)
    with pytest.raises(Unauthorized):
        await engine.change_secret("ns", "alice", "new", old_secret="wrong")
    await engine.change_secret("ns", "alice", "new", old_secret="pw")
    assert b"new" not in (await raw_records(store))["account/ns/alice"].replace(b"not_before", b"")
    with pytest.raises(Unauthorized, match="revoked"):
        await engine.inspect(old.access_token)
    with pytest.raises(Unauthorized, match="refresh token"):
        await engine.token("ns", refresh_token=old.refresh_token)
    with pytest.raises(Unauthorized):
        await engine.token("ns", id="alice", secret="pw")
    fresh = await engine.token("ns", id="alice", secret="new")
    assert (await engine.inspect(fresh.access_token)).id == "alice"
    await engine.change_secret("ns", "alice", "newer", old_secret=None)  # an admin's change
    with pytest.raises(BadRequest, match="new secret is empty"):
        await engine.change_secret("ns", "alice", "", old_secret=None)
    with pytest.raises(NotFound):
        await engine.change_secret("ns", "nobody", "x", old_secret=None)


async def test_five_wrong_secrets_block_the_account_for_a_minute(engine, clock):
    await engine.generate("ns", "alice", secret="pw", name="al")
    for _ in range(5):
        with pytest.raises(Unauthorized):
            await engine.token("ns", id="alice", secret="guess")
    for who in ("alice", "al"):  # the right secret, under the id or the name, is refused too
        with pytest.raises(TooManyRequests, match="account 'alice' of namespace 'ns': try again in 60 s"):
            await engine.token("ns", id=who, secret="pw")
    clock.advance(60)
    assert (await engine.token("ns", id="alice", secret="pw")).access_token


async def test_guessing_the_old_secret_is_rate_limited_too(engine):
    await engine.generate("ns", "alice", secret="pw")
    for _ in range(5):
        with pytest.raises(Unauthorized):
            await engine.change_secret("ns", "alice", "new", old_secret="guess")
    with pytest.raises(TooManyRequests):
        await engine.change_secret("ns", "alice", "new", old_secret="pw")


async def test_five_failures_from_one_address_block_that_address(engine, clock):
    await engine.generate("ns", "alice", secret="pw")
    for n in range(5):  # across accounts, known or not, and refresh tokens
        with pytest.raises(Unauthorized):
            if n == 4:
                await engine.token("ns", refresh_token="guess", address="10.0.0.9")
            else:
                await engine.token("ns", id=f"user{n}", secret="guess", address="10.0.0.9")
    with pytest.raises(TooManyRequests, match=r"address 10\.0\.0\.9"):
        await engine.token("ns", id="alice", secret="pw", address="10.0.0.9")
    assert await engine.token("ns", id="alice", secret="pw", address="10.0.0.10")
    clock.advance(60)
    assert await engine.token("ns", id="alice", secret="pw", address="10.0.0.9")


async def test_the_default_admin_is_created_on_the_first_token_request(engine, caplog):
    with caplog.at_level(logging.WARNING, logger="micro.auth"):
        token = await sign_in(engine, "micro", "admin", "micro")
    assert await engine.inspect(token) == Account("admin", "user", "micro", ("admin",), {}, "admin")
    assert "change it now" in caplog.text


async def test_secrets_are_never_logged(engine, caplog):
    with caplog.at_level(logging.DEBUG):
        await engine.generate("ns", "alice", secret="hunter2-xyz")
        token = await engine.token("ns", id="alice", secret="hunter2-xyz")
        with pytest.raises(Unauthorized):
            await engine.token("ns", id="alice", secret="hunter3-xyz")
        await engine.change_secret("ns", "alice", "hunter4-xyz", old_secret="hunter2-xyz")
    assert "-xyz" not in caplog.text
    assert token.refresh_token not in caplog.text


async def test_the_default_admin_is_created_in_namespace_micro_only(engine):
    with pytest.raises(Unauthorized):
        await engine.token("ns", id="admin", secret="micro")
    assert await engine.list_accounts("ns") == []


async def test_the_default_admin_can_be_disabled(store, keys, clock):
    engine = AuthEngine(store, keys, disable_default_admin=True, hasher=SecretHasher(n=2**4), clock=clock)
    with pytest.raises(Unauthorized):
        await engine.token("micro", id="admin", secret="micro")
    assert await engine.list_accounts("micro") == []


async def test_no_default_admin_when_a_user_exists(engine):
    await engine.generate("micro", "root", secret="pw", scopes=["admin"])
    with pytest.raises(Unauthorized):
        await engine.token("micro", id="admin", secret="micro")
    assert [a.id for a in await engine.list_accounts("micro")] == ["root"]


async def test_a_service_named_admin_is_left_alone(engine):
    await engine.generate("micro", "admin", type="service", secret="svc")
    with pytest.raises(Unauthorized):
        await engine.token("micro", id="admin", secret="micro")
    assert (await engine.account("micro", "admin")).type == "service"


async def test_the_default_admin_is_not_created_again_once_deleted(engine):
    await sign_in(engine, "micro", "admin", "micro")
    await engine.delete_account("micro", "admin")
    with pytest.raises(Unauthorized):
        await engine.token("micro", id="admin", secret="micro")


async def test_a_corrupt_account_record_is_reported(engine, store):
    await store.put(DATABASE, TABLE, Record(key="account/ns/bad", value=b"[]"))
    with pytest.raises(InternalServerError, match="account/ns/bad"):
        await engine.list_accounts("ns")


async def test_a_concurrent_change_is_a_conflict(engine, store):
    await engine.generate("ns", "alice", secret="pw")
    stored = await engine.accounts.get("ns", "alice")
    await engine.change_secret("ns", "alice", "new", old_secret=None)
    with pytest.raises(Conflict, match="changed during this update"):
        await engine.accounts.update(stored)


async def test_real_throttle_defaults(store, keys):
    engine = AuthEngine(store, keys)
    assert isinstance(engine.throttle, Throttle)
    assert (engine.throttle.limit, engine.throttle.window, engine.throttle.block) == (5, 60, 60)
    assert engine.hasher.n == 2**14
