"""Offline token verification (every attack a service must refuse) and the typed auth client."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

import micro.auth
from micro._binding import bind
from micro.auth import PUBLIC_KEY_ENV, Account, AuthClient, TokenVerifier, bearer_token, pem_bytes
from micro.client import Client
from micro.context import Context
from micro.errors import BadRequest, Forbidden, NotFound, SetupError, Unauthorized
from micro.proto import auth_pb2
from micro.transport import MockTransport
from micro_daemon.auth.engine import AuthEngine
from micro_daemon.auth.keys import KeyPair
from micro_daemon.auth.passwords import SecretHasher
from micro_daemon.auth.service import AccountsHandler, AuthHandler, RulesHandler
from micro_daemon.store.backends.memory import MemoryBackend

NOW = 1_800_000_000


class Clock:
    def __init__(self) -> None:
        self.now = float(NOW)

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def public_pem(key) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def verifier(public_pem, clock) -> TokenVerifier:
    return TokenVerifier(public_pem, clock=clock)


def claims(**changes) -> dict:
    payload = {
        "sub": "alice",
        "iss": "micro",
        "type": "user",
        "scopes": ["admin"],
        "name": "Alice",
        "metadata": {"team": "a"},
        "iat": NOW,
        "exp": NOW + 900,
        "jti": "t1",
    }
    payload.update(changes)
    return {k: v for k, v in payload.items() if v is not None}


def mint(key, algorithm: str = "RS256", **changes) -> str:
    return jwt.encode(claims(**changes), key, algorithm=algorithm)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict, payload: dict, sign=lambda signing_input: b"") -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signing_input}.{b64(sign(signing_input.encode()))}"


def test_a_valid_token_gives_its_account(verifier, key):
    account = verifier.verify(mint(key))
    assert account == Account("alice", "user", "micro", ("admin",), {"team": "a"}, "Alice")
    assert account.has_scope("admin")
    decoded = verifier.decode(mint(key, iat=NOW + 0.25))
    assert (decoded.issued_at, decoded.expires_at, decoded.token_id) == (NOW + 0.25, NOW + 900, "t1")


def test_another_keys_signature_is_refused(verifier):
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(Unauthorized, match="signature does not match") as info:
        verifier.verify(mint(stranger))
    assert info.value.id == "auth"


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_unsigned_tokens_are_refused(verifier, alg):
    token = forge({"alg": alg, "typ": "JWT"}, claims())
    with pytest.raises(Unauthorized, match="only RS256 is accepted"):
        verifier.verify(token)


def test_hs256_signed_with_the_public_key_as_secret_is_refused(verifier, public_pem):
    token = forge(
        {"alg": "HS256", "typ": "JWT"},
        claims(scopes=["admin"]),
        lambda signing_input: hmac.new(public_pem, signing_input, hashlib.sha256).digest(),
    )
    with pytest.raises(Unauthorized, match="'HS256'; only RS256 is accepted"):
        verifier.verify(token)


def test_other_rsa_algorithms_with_the_right_key_are_refused(verifier, key):
    with pytest.raises(Unauthorized, match="only RS256"):
        verifier.verify(mint(key, algorithm="RS512"))


def test_a_tampered_payload_is_refused(verifier, key):
    header, _, signature = mint(key, scopes=[]).split(".")
    payload = b64(json.dumps(claims(scopes=["admin"])).encode())
    with pytest.raises(Unauthorized, match="signature"):
        verifier.verify(f"{header}.{payload}.{signature}")


def test_expired_tokens_are_refused(verifier, key, clock):
    with pytest.raises(Unauthorized, match="expired"):
        verifier.verify(mint(key, exp=NOW))
    token = mint(key)
    verifier.verify(token)
    clock.now = NOW + 900  # cached, yet refused once expired
    with pytest.raises(Unauthorized, match="expired"):
        verifier.verify(token)


def test_a_token_of_another_namespace_is_refused_when_an_issuer_is_required(verifier, key):
    token = mint(key, iss="a")
    assert verifier.verify(token).issuer == "a"
    assert verifier.verify(token, issuer="a").id == "alice"
    with pytest.raises(Unauthorized, match="issued by namespace 'a', not 'b'"):
        verifier.verify(token, issuer="b")


@pytest.mark.parametrize(
    "changes",
    [
        {"sub": None},
        {"sub": ""},
        {"iss": None},
        {"iss": "../micro"},
        {"iss": "a/b"},
        {"exp": None},
        {"exp": "soon"},
        {"iat": None},
        {"iat": True},
        {"jti": None},
        {"type": "root"},
        {"scopes": "admin"},
        {"scopes": [1]},
        {"metadata": {"a": 1}},
        {"name": 3},
    ],
    ids=repr,
)
def test_malformed_claims_are_refused(verifier, key, changes):
    with pytest.raises(Unauthorized, match="access token refused"):
        verifier.verify(mint(key, **changes))


@pytest.mark.parametrize("token", ["", "abc", "a.b.c", "a.b", "x" * 20_000])
def test_garbage_is_refused(verifier, token):
    with pytest.raises(Unauthorized, match="access token refused"):
        verifier.verify(token)


def test_a_token_is_verified_once_then_served_from_the_cache(verifier, key, monkeypatch):
    calls = []
    real_decode = jwt.decode

    def counting_decode(*args, **kwargs):
        calls.append(1)
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting_decode)
    token = mint(key)
    for _ in range(3):
        assert verifier.verify(token).id == "alice"
    assert len(calls) == 1
    verifier.verify(mint(key, jti="t2"))
    assert len(calls) == 2


def test_failures_are_not_cached(verifier, key, monkeypatch):
    calls = []
    real_decode = jwt.decode
    monkeypatch.setattr(jwt, "decode", lambda *a, **k: calls.append(1) or real_decode(*a, **k))
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = mint(stranger)
    for _ in range(2):
        with pytest.raises(Unauthorized):
            verifier.verify(token)
    assert len(calls) == 2


def test_the_cache_is_bounded(public_pem, key, clock):
    verifier = TokenVerifier(public_pem, cache_size=2, clock=clock)
    tokens = [mint(key, jti=str(i)) for i in range(3)]
    for token in tokens:
        verifier.verify(token)
    assert list(verifier._cache) == tokens[1:]


def test_the_public_key_may_be_base64_and_come_from_the_environment(public_pem, key, monkeypatch):
    monkeypatch.setenv(PUBLIC_KEY_ENV, base64.b64encode(public_pem).decode())
    assert TokenVerifier.from_env().verify(mint(key, exp=2**40)).id == "alice"
    monkeypatch.delenv(PUBLIC_KEY_ENV)
    with pytest.raises(SetupError, match=PUBLIC_KEY_ENV):
        TokenVerifier.from_env()
    assert pem_bytes(base64.b64encode(public_pem)) == public_pem.strip()


def test_a_public_key_that_is_not_rsa_is_refused():
    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(SetupError, match="not an RSA key"):
        TokenVerifier(ec_pem)
    with pytest.raises(SetupError, match="not a PEM public key"):
        TokenVerifier("nonsense")


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ({"authorization": "Bearer abc"}, "abc"),
        ({"authorization": "bearer  abc "}, "abc"),
        ({"authorization": "Basic abc"}, None),
        ({"authorization": "Bearer "}, None),
        ({}, None),
    ],
)
def test_bearer_token(metadata, token):
    assert bearer_token(metadata) == token


def test_importing_micro_auth_imports_neither_jwt_nor_cryptography():
    code = "import sys, micro.auth; print([m for m in ('jwt', 'cryptography', 'grpc') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_public_api_resolves():
    assert len(set(micro.auth.__all__)) == len(micro.auth.__all__)
    for name in micro.auth.__all__:
        assert getattr(micro.auth, name) is not None


# The typed client, against the real handlers in-process.


@pytest.fixture(scope="module")
def pair() -> KeyPair:
    return KeyPair.generate(2048)


@pytest.fixture
def transport(pair) -> MockTransport:
    engine = AuthEngine(MemoryBackend(), pair, hasher=SecretHasher(n=2**4))
    handlers = {
        "Auth": AuthHandler(engine),
        "Accounts": AccountsHandler(engine),
        "Rules": RulesHandler(engine),
    }
    methods = {
        m.path: m
        for name, handler in handlers.items()
        for m in bind(handler, auth_pb2.DESCRIPTOR.services_by_name[name])
    }

    async def route(path, data, metadata):
        headers = dict(metadata)
        assert headers["micro-service"] == "auth"
        method = methods[path]
        context = Context(namespace=headers["micro-namespace"], metadata=headers)
        response = await method.func(method.request_type.FromString(data), context)
        return response.SerializeToString()

    return MockTransport(route)


async def signed_in(transport, namespace="micro", **credentials) -> AuthClient:
    token = await AuthClient(Client(transport, namespace=namespace)).token(**credentials)
    return AuthClient(
        Client(transport, namespace=namespace, metadata={"authorization": f"Bearer {token.access_token}"})
    )


async def test_the_client_drives_accounts_tokens_and_rules(transport):
    anonymous = AuthClient(Client(transport))
    with pytest.raises(Unauthorized):
        await anonymous.list()
    admin = await signed_in(transport, id="admin", secret="micro")

    created = await admin.generate("bob", scopes=["dev"], metadata={"team": "b"}, namespace="tenant")
    assert (created.id, created.issuer, created.type, list(created.scopes)) == (
        "bob",
        "tenant",
        "user",
        ["dev"],
    )
    assert created.secret
    assert [a.id for a in await admin.list(namespace="tenant")] == ["bob"]
    assert all(not a.secret for a in await admin.list(namespace="tenant"))

    token = await anonymous.token(id="bob", secret=created.secret, namespace="tenant", expiry=60)
    assert token.expiry - token.created == 60
    assert (await anonymous.inspect(token.access_token)).id == "bob"
    refreshed = await anonymous.token(refresh_token=token.refresh_token, namespace="tenant")
    assert refreshed.refresh_token == token.refresh_token

    await admin.create_rule("devs", "service:store:*", scope="dev", namespace="tenant")
    await admin.create_rule(
        "nobody", "service:store:Store.Delete", scope="dev", access="denied", priority=5, namespace="tenant"
    )
    assert {r.id for r in await admin.list_rules(namespace="tenant")} == {"devs", "nobody"}
    allowed = await admin.verify("service:store:Store.Read", account_id="bob", namespace="tenant")
    assert (allowed.granted, allowed.rule.id) == (True, "devs")
    denied = await admin.verify("service:store:Store.Delete", account_id="bob", namespace="tenant")
    assert (denied.granted, denied.rule.id) == (False, "nobody")
    assert not (await admin.verify("service:config:*", namespace="tenant")).granted
    await admin.delete_rule("nobody", namespace="tenant")
    with pytest.raises(NotFound):
        await admin.delete_rule("nobody", namespace="tenant")

    await admin.change_secret("bob", "new secret", namespace="tenant")
    with pytest.raises(Unauthorized):
        await anonymous.token(refresh_token=token.refresh_token, namespace="tenant")
    bob = await signed_in(transport, "tenant", id="bob", secret="new secret")
    await bob.change_secret("bob", "newer", old_secret="new secret")
    with pytest.raises(Unauthorized, match="revoked"):  # his own token too
        await bob.list()
    bob = await signed_in(transport, "tenant", id="bob", secret="newer")
    with pytest.raises(Forbidden, match="not an administrator"):
        await bob.list()

    await admin.delete("bob", namespace="tenant")
    with pytest.raises(Unauthorized, match="no longer exists"):
        await anonymous.inspect(token.access_token)


async def test_a_malformed_resource_is_refused_before_sending(transport):
    with pytest.raises(BadRequest, match="type:name:endpoint"):
        await AuthClient(Client(transport)).create_rule("r", "service:store")
