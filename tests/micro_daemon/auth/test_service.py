"""The gRPC handlers, called directly with a Context carrying ``authorization: Bearer ...``."""

from __future__ import annotations

import pytest

from micro._binding import bind
from micro.errors import BadRequest, Forbidden, NotFound, TooManyRequests, Unauthorized
from micro.proto import auth_pb2
from micro_daemon.auth.service import AccountsHandler, AuthHandler, RulesHandler

from .conftest import START, admin_token, context, sign_in


@pytest.fixture
def auth(engine):
    return AuthHandler(engine)


@pytest.fixture
def accounts(engine):
    return AccountsHandler(engine)


@pytest.fixture
def rules(engine):
    return RulesHandler(engine)


def options(namespace: str = "") -> auth_pb2.Options:
    return auth_pb2.Options(namespace=namespace)


def test_the_handlers_bind_to_the_proto(engine):
    for handler, name in ((AuthHandler, "Auth"), (AccountsHandler, "Accounts"), (RulesHandler, "Rules")):
        assert bind(handler(engine), auth_pb2.DESCRIPTOR.services_by_name[name])


async def generate(auth, token, id, namespace="", **fields):
    request = auth_pb2.GenerateRequest(id=id, options=options(namespace), **fields)
    return (await auth.Generate(request, context(token))).account


async def test_token_and_inspect_are_public(auth):
    request = auth_pb2.TokenRequest(id="admin", secret="micro", token_expiry=120)
    token = (await auth.Token(request, context())).token
    assert (token.created, token.expiry) == (int(START), int(START) + 120)
    assert token.refresh_token
    account = (await auth.Inspect(auth_pb2.InspectRequest(token=token.access_token), context())).account
    assert (account.id, account.issuer, list(account.scopes), account.secret) == (
        "admin",
        "micro",
        ["admin"],
        "",
    )
    with pytest.raises(BadRequest, match="token is empty"):
        await auth.Inspect(auth_pb2.InspectRequest(), context())


async def test_token_acts_on_the_callers_namespace_by_default(engine, auth):
    await engine.generate("tenant", "ann", secret="pw")
    request = auth_pb2.TokenRequest(id="ann", secret="pw")
    assert (await auth.Token(request, context(namespace="tenant"))).token.access_token
    with pytest.raises(Unauthorized):
        await auth.Token(request, context())


async def test_generate_needs_an_admin_of_the_namespace(engine, auth):
    with pytest.raises(Unauthorized):
        await generate(auth, None, "bob")
    admin = await admin_token(engine)
    created = await generate(auth, admin, "boss", "tenant", scopes=["admin"], secret="pw")
    assert (created.issuer, created.secret) == ("tenant", "pw")
    boss = await sign_in(engine, "tenant", "boss", "pw")
    assert (await generate(auth, boss, "bob", "tenant")).secret
    with pytest.raises(Forbidden, match="may not use namespace 'micro'"):
        await generate(auth, boss, "sneaky", "micro", scopes=["admin"])
    carol_secret = (await generate(auth, boss, "carol", "tenant", secret="pw2")).secret
    carol = await sign_in(engine, "tenant", "carol", carol_secret)
    with pytest.raises(Forbidden, match="not an administrator"):
        await generate(auth, carol, "dave", "tenant")


async def test_a_token_of_namespace_a_gets_nothing_in_namespace_b(engine, auth, accounts, rules):
    admin = await admin_token(engine)
    await generate(auth, admin, "boss", "a", scopes=["admin"], secret="pw")
    await generate(auth, admin, "boss", "b", scopes=["admin"], secret="pw")
    token_a = await sign_in(engine, "a", "boss", "pw")
    calls = [
        auth.Generate(auth_pb2.GenerateRequest(id="x", options=options("b")), context(token_a)),
        accounts.List(auth_pb2.ListAccountsRequest(options=options("b")), context(token_a)),
        accounts.Delete(auth_pb2.DeleteAccountRequest(id="boss", options=options("b")), context(token_a)),
        accounts.ChangeSecret(
            auth_pb2.ChangeSecretRequest(id="boss", new_secret="x", old_secret="pw", options=options("b")),
            context(token_a),
        ),
        rules.List(auth_pb2.ListRulesRequest(options=options("b")), context(token_a)),
        # the header names namespace b, the token was issued by a: the token decides
        accounts.List(auth_pb2.ListAccountsRequest(), context(token_a, namespace="b")),
    ]
    for call in calls:
        with pytest.raises(Forbidden, match="of namespace 'a' may not use namespace 'b'"):
            await call
    with pytest.raises(Unauthorized):
        await auth.Token(auth_pb2.TokenRequest(refresh_token="x", options=options("b")), context(token_a))


async def test_an_invalid_caller_token_is_unauthorized(engine, accounts, other_keys, clock):
    admin = await admin_token(engine)
    request = auth_pb2.ListAccountsRequest()
    clock.advance(900)
    with pytest.raises(Unauthorized, match="expired"):
        await accounts.List(request, context(admin))
    with pytest.raises(Unauthorized, match="refused"):
        await accounts.List(request, context("not.a.token"))


async def test_list_and_delete_accounts(engine, auth, accounts):
    admin = await admin_token(engine)
    await generate(auth, admin, "bob", "tenant", secret="pw")
    listed = (
        await accounts.List(auth_pb2.ListAccountsRequest(options=options("tenant")), context(admin))
    ).accounts
    assert [(a.id, a.secret) for a in listed] == [("bob", "")]
    bob = await engine.token("tenant", id="bob", secret="pw")
    await accounts.Delete(auth_pb2.DeleteAccountRequest(id="bob", options=options("tenant")), context(admin))
    with pytest.raises(Unauthorized, match="refresh token is not valid"):
        await engine.token("tenant", refresh_token=bob.refresh_token)
    with pytest.raises(NotFound):
        await accounts.Delete(
            auth_pb2.DeleteAccountRequest(id="bob", options=options("tenant")), context(admin)
        )
    with pytest.raises(BadRequest, match="id is empty"):
        await accounts.Delete(auth_pb2.DeleteAccountRequest(), context(admin))


async def test_change_secret_is_for_the_account_itself_or_an_admin(engine, auth, accounts, clock):
    admin = await admin_token(engine)
    await generate(auth, admin, "bob", "tenant", secret="pw")
    await generate(auth, admin, "carol", "tenant", secret="pw")
    bob = await sign_in(engine, "tenant", "bob", "pw")

    def change(id, new, old=""):
        return auth_pb2.ChangeSecretRequest(id=id, old_secret=old, new_secret=new, options=options("tenant"))

    with pytest.raises(Unauthorized):
        await accounts.ChangeSecret(change("bob", "new", "pw"), context())
    with pytest.raises(Forbidden, match="its own secret only"):
        await accounts.ChangeSecret(change("carol", "new", "pw"), context(bob))
    with pytest.raises(BadRequest, match="old_secret is empty"):
        await accounts.ChangeSecret(change("bob", "new"), context(bob))
    with pytest.raises(Unauthorized, match="wrong id or secret"):
        await accounts.ChangeSecret(change("bob", "new", "nope"), context(bob))
    clock.advance(1)
    await accounts.ChangeSecret(change("bob", "new", "pw"), context(bob))
    with pytest.raises(Unauthorized, match="revoked"):
        await accounts.ChangeSecret(change("bob", "newer", "new"), context(bob))
    await accounts.ChangeSecret(change("bob", "by-admin"), context(admin))  # no old secret needed
    assert await sign_in(engine, "tenant", "bob", "by-admin")


async def test_failed_secrets_are_limited_per_caller_address(engine, auth):
    await engine.generate("micro", "root", secret="pw", scopes=["admin"])
    for n in range(5):
        with pytest.raises(Unauthorized):
            request = auth_pb2.TokenRequest(id=f"guess{n}", secret="x")
            await auth.Token(request, context(address="192.0.2.1:5555"))
    with pytest.raises(TooManyRequests, match=r"address 192\.0\.2\.1:5555"):
        await auth.Token(auth_pb2.TokenRequest(id="root", secret="pw"), context(address="192.0.2.1:5555"))
    assert await auth.Token(auth_pb2.TokenRequest(id="root", secret="pw"), context(address="192.0.2.2:1"))


async def test_rules_crud_and_verify(engine, auth, rules):
    admin = await admin_token(engine)
    await generate(auth, admin, "bob", "tenant", scopes=["dev"], secret="pw")
    ctx = context(admin)
    listed = (await rules.List(auth_pb2.ListRulesRequest(options=options("tenant")), ctx)).rules
    assert [(r.id, r.scope, r.access, r.resource.endpoint) for r in listed] == [
        ("default", "", auth_pb2.GRANTED, "*")
    ]

    lockdown = auth_pb2.Rule(
        id="onlydevs",
        scope="dev",
        resource=auth_pb2.Resource(type="*", name="*", endpoint="*"),
        access=auth_pb2.GRANTED,
    )
    await rules.Create(auth_pb2.CreateRuleRequest(rule=lockdown, options=options("tenant")), ctx)
    await rules.Delete(auth_pb2.DeleteRuleRequest(id="default", options=options("tenant")), ctx)

    def verify(account_id=""):
        resource = auth_pb2.Resource(type="service", name="store", endpoint="Store.Read")
        request = auth_pb2.VerifyRequest(account_id=account_id, resource=resource, options=options("tenant"))
        return rules.Verify(request, ctx)

    granted = await verify("bob")
    assert (granted.granted, granted.rule.id) == (True, "onlydevs")
    anonymous = await verify()
    assert (anonymous.granted, anonymous.HasField("rule")) == (False, False)
    assert "anonymous" in anonymous.reason
    with pytest.raises(NotFound):
        await verify("nobody")


@pytest.mark.parametrize(
    "resource",
    [
        auth_pb2.Resource(type="service", name="store"),
        auth_pb2.Resource(type="", name="store", endpoint="*"),
        auth_pb2.Resource(type="service", name="my store", endpoint="*"),
    ],
)
async def test_a_malformed_rule_resource_is_a_bad_request(engine, rules, resource):
    rule = auth_pb2.Rule(id="r", resource=resource, access=auth_pb2.GRANTED)
    with pytest.raises(BadRequest, match="invalid rule resource"):
        await rules.Create(auth_pb2.CreateRuleRequest(rule=rule), context(await admin_token(engine)))


async def test_a_rule_needs_an_access(engine, rules):
    resource = auth_pb2.Resource(type="*", name="*", endpoint="*")
    rule = auth_pb2.Rule(id="r", resource=resource)
    with pytest.raises(BadRequest, match="GRANTED or DENIED"):
        await rules.Create(auth_pb2.CreateRuleRequest(rule=rule), context(await admin_token(engine)))


async def test_rules_need_an_admin(engine, rules):
    await engine.generate("micro", "joe", secret="pw")
    joe = await sign_in(engine, "micro", "joe", "pw")
    for call in (
        rules.List(auth_pb2.ListRulesRequest(), context(joe)),
        rules.Delete(auth_pb2.DeleteRuleRequest(id="default"), context(joe)),
        rules.Verify(
            auth_pb2.VerifyRequest(resource=auth_pb2.Resource(type="*", name="*", endpoint="*")), context(joe)
        ),
    ):
        with pytest.raises(Forbidden, match="not an administrator"):
            await call
    with pytest.raises(Unauthorized):
        await rules.List(auth_pb2.ListRulesRequest(), context())
