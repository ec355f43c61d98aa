"""Auth through a real daemon: each attack refused (and logged), and namespaces isolating every block.

Accounts: the local owner (the daemon's token file), ``alice`` admin of
namespace ``a``, ``bob`` admin of namespace ``b``, and a service account of
``a``. Calls go over gRPC to the daemon on an ephemeral port.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest

from micro.auth import AuthClient
from micro.broker import BrokerClient
from micro.client import Client
from micro.config import ConfigClient
from micro.credentials import StaticToken
from micro.errors import BadRequest, Forbidden, MicroError, TooManyRequests, Unauthorized
from micro.events import EventsClient
from micro.proto import registry_pb2
from micro.registry import RegistryClient
from micro.runtime import RuntimeClient
from micro.store import StoreClient
from micro.testing.pytest import session_auth_key
from micro.transport import GrpcTransport
from micro_daemon.app import Daemon
from micro_daemon.auth.keys import KeyPair


def client(daemon: Daemon, token: str | None, namespace: str = "micro") -> Client:
    credentials = StaticToken(token) if token else None
    return Client(GrpcTransport(daemon.address), namespace=namespace, credentials=credentials, timeout=10)


@pytest.fixture
async def owner(daemon: Daemon) -> AsyncIterator[Client]:
    """The local owner's client: its credentials come from MICRO_HOME by themselves."""
    c = Client(GrpcTransport(daemon.address), timeout=10)
    yield c
    await c.close()


async def account(
    owner: Client, namespace: str, id: str, *, type: str = "user", scopes: tuple[str, ...] = ()
) -> str:
    """Create an account in ``namespace`` and return an access token of it."""
    auth = AuthClient(owner)
    await auth.generate(id, secret=f"{id}-secret", type=type, scopes=scopes, namespace=namespace)
    return (await auth.token(id=id, secret=f"{id}-secret", namespace=namespace)).access_token


@pytest.fixture
async def tenants(owner: Client) -> dict[str, str]:
    return {
        "alice": await account(owner, "a", "alice", scopes=("admin",)),
        "bob": await account(owner, "b", "bob", scopes=("admin",)),
        "service": await account(owner, "a", "worker", type="service"),
    }


async def refused(call: Any, error: type[MicroError]) -> MicroError:
    with pytest.raises(error) as caught:
        await call
    return caught.value


def forged(
    claims: dict[str, Any], *, key: Any, algorithm: str = "RS256", headers: dict[str, Any] | None = None
) -> str:
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers)


def claims(sub: str = "admin", iss: str = "micro", *, exp: float | None = None) -> dict[str, Any]:
    now = time.time()
    return {
        "sub": sub,
        "iss": iss,
        "type": "user",
        "scopes": ["admin"],
        "iat": int(now),
        "exp": int(exp if exp is not None else now + 600),
        "jti": "x",
    }


def unsigned(payload: dict[str, Any], header: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part(header)}.{part(payload)}."


# -- attacks -------------------------------------------------------------------------------------


async def test_an_anonymous_caller_is_told_to_sign_in(daemon: Daemon) -> None:
    async with client(daemon, None) as anonymous:
        error = await refused(StoreClient(anonymous).read("k"), Unauthorized)
    assert "micro login" in error.detail


async def test_a_token_signed_with_another_key_is_refused_and_logged(
    daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    other = KeyPair.generate(2048)
    token = forged(claims(), key=other.private_key)
    caplog.set_level(logging.WARNING)
    async with client(daemon, token) as attacker:
        error = await refused(StoreClient(attacker).read("k"), Unauthorized)
    assert "signature" in error.detail
    assert token not in caplog.text
    assert any("refused store" in r.getMessage() and "signature" in r.getMessage() for r in caplog.records)


async def test_alg_none_is_refused(daemon: Daemon) -> None:
    token = unsigned(claims(), {"alg": "none", "typ": "JWT"})
    async with client(daemon, token) as attacker:
        error = await refused(StoreClient(attacker).read("k"), Unauthorized)
    assert "algorithm" in error.detail


async def test_hs256_signed_with_the_public_key_is_refused(daemon: Daemon) -> None:
    public = KeyPair.from_pem(session_auth_key(), "the test key").public_pem
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
    body = base64.urlsafe_b64encode(json.dumps(claims()).encode()).rstrip(b"=")
    signature = hmac.new(public, header + b"." + body, hashlib.sha256).digest()
    token = b".".join([header, body, base64.urlsafe_b64encode(signature).rstrip(b"=")]).decode()
    async with client(daemon, token) as attacker:
        error = await refused(StoreClient(attacker).read("k"), Unauthorized)
    assert "HS256" in error.detail


async def test_an_expired_token_is_refused(daemon: Daemon, owner: Client) -> None:
    auth = AuthClient(owner)
    await auth.generate("carol", secret="carol-secret", scopes=["admin"])
    token = (await auth.token(id="carol", secret="carol-secret", expiry=1)).access_token
    await asyncio.sleep(1.1)
    async with client(daemon, token) as late:
        error = await refused(StoreClient(late).read("k"), Unauthorized)
    assert "expired" in error.detail


async def test_a_token_of_one_namespace_cannot_act_on_another_by_naming_it(
    daemon: Daemon, tenants: dict[str, str]
) -> None:
    async with client(daemon, tenants["alice"], namespace="b") as spoofing:
        await refused(StoreClient(spoofing).write("k", b"v"), Forbidden)
        await refused(ConfigClient(spoofing).get("x"), Forbidden)
    async with client(daemon, tenants["alice"], namespace="a") as alice:
        await refused(StoreClient(alice, database="b").read("k"), Forbidden)


async def test_a_refresh_token_dies_with_its_account(daemon: Daemon, owner: Client) -> None:
    auth = AuthClient(owner)
    await auth.generate("dave", secret="dave-secret", namespace="a")
    tokens = await auth.token(id="dave", secret="dave-secret", namespace="a")
    await auth.delete("dave", namespace="a")
    async with client(daemon, None, namespace="a") as anonymous:
        error = await refused(AuthClient(anonymous).token(refresh_token=tokens.refresh_token), Unauthorized)
    assert "refresh token" in error.detail
    async with client(daemon, tokens.access_token, namespace="a") as stale:
        error = await refused(StoreClient(stale).read("k"), Unauthorized)
    assert "no longer exists" in error.detail


async def test_guessing_a_password_is_rate_limited(daemon: Daemon, owner: Client) -> None:
    await AuthClient(owner).generate("erin", secret="erin-secret", namespace="a")
    async with client(daemon, None, namespace="a") as guesser:
        auth = AuthClient(guesser)
        outcomes = []
        for attempt in range(12):
            try:
                await auth.token(id="erin", secret=f"guess-{attempt}")
            except MicroError as error:
                outcomes.append(type(error))
        assert outcomes[0] is Unauthorized
        assert TooManyRequests in outcomes
        # the right secret is refused too while the account is locked
        await refused(auth.token(id="erin", secret="erin-secret"), TooManyRequests)


async def test_a_rule_with_a_malformed_resource_is_refused(daemon: Daemon, owner: Client) -> None:
    from micro.proto import auth_pb2

    rule = auth_pb2.Rule(
        id="bad", resource=auth_pb2.Resource(type="service", name="", endpoint="*"), access=auth_pb2.GRANTED
    )
    request = auth_pb2.CreateRuleRequest(rule=rule)
    with pytest.raises(BadRequest, match="resource"):
        await owner.call("auth", "/micro.auth.v1.Rules/Create", request, auth_pb2.CreateRuleResponse)


@pytest.mark.parametrize("namespace", ["../etc", "a/b", "A", "a b"])
async def test_a_namespace_with_path_characters_is_refused(
    daemon: Daemon, owner: Client, namespace: str
) -> None:
    await refused(AuthClient(owner).generate("x", namespace=namespace), BadRequest)
    await refused(StoreClient(owner, database=namespace).read("k"), BadRequest)


async def test_a_service_account_cannot_use_admin_endpoints(daemon: Daemon, tenants: dict[str, str]) -> None:
    async with client(daemon, tenants["service"], namespace="a") as service:
        await StoreClient(service).write("mine", b"ok")  # its own namespace's blocks: yes
        auth = AuthClient(service)
        await refused(auth.list(), Forbidden)
        await refused(auth.generate("sneaky", scopes=["admin"]), Forbidden)
        await refused(auth.create_rule("open", "service:*:*"), Forbidden)


async def test_another_namespaces_secrets_cannot_be_read(daemon: Daemon, tenants: dict[str, str]) -> None:
    async with client(daemon, tenants["bob"], namespace="b") as bob:
        await ConfigClient(bob).set("db.password", "hunter2", secret=True)
        assert await ConfigClient(bob).get("db.password", secret=True) == "hunter2"
    async with client(daemon, tenants["alice"], namespace="b") as alice:
        await refused(ConfigClient(alice).get("db.password", secret=True), Forbidden)


async def test_micro_admins_cross_namespaces(daemon: Daemon, owner: Client, tenants: dict[str, str]) -> None:
    async with client(daemon, tenants["bob"], namespace="b") as bob:
        await StoreClient(bob).write("k", b"bob's")
    cross = Client(GrpcTransport(daemon.address), namespace="b", timeout=10)  # the owner, acting on b
    async with cross:
        assert (await StoreClient(cross).read("k"))[0].value == b"bob's"


# -- isolation -----------------------------------------------------------------------------------


async def test_the_store_config_and_registry_isolate_namespaces(
    daemon: Daemon, tenants: dict[str, str]
) -> None:
    async with client(daemon, tenants["alice"], "a") as alice, client(daemon, tenants["bob"], "b") as bob:
        await StoreClient(alice).write("k", b"alice")
        await StoreClient(bob).write("k", b"bob")
        assert (await StoreClient(alice).read("k"))[0].value == b"alice"
        assert (await StoreClient(bob).read("k"))[0].value == b"bob"
        await ConfigClient(alice).set("colour", "red")
        await ConfigClient(bob).set("colour", "blue")
        assert await ConfigClient(alice).get("colour") == "red"
        assert await ConfigClient(bob).get("colour") == "blue"

        node = registry_pb2.Node(id="n1", address="127.0.0.1:1")
        await RegistryClient(alice).register(registry_pb2.Service(name="shop", nodes=[node]), ttl=60)
        assert [s.name for s in await RegistryClient(alice).list_services()] == ["shop"]
        assert await RegistryClient(bob).list_services() == []
        await refused(RegistryClient(bob, domain="a").list_services(), Forbidden)
        node_b = registry_pb2.Service(
            name="shop", nodes=[registry_pb2.Node(id="evil", address="127.0.0.1:2")]
        )
        await refused(RegistryClient(bob, domain="a").register(node_b, ttl=60), Forbidden)
        # the blocks' own domain is public to read
        assert "store" in {s.name for s in await RegistryClient(bob, domain="micro").list_services()}


async def test_events_and_broker_isolate_namespaces(daemon: Daemon, tenants: dict[str, str]) -> None:
    async with client(daemon, tenants["alice"], "a") as alice, client(daemon, tenants["bob"], "b") as bob:
        await EventsClient(alice).publish("orders", {"n": 1})
        assert [t.name for t in await EventsClient(alice).topics()] == ["orders"]
        assert await EventsClient(bob).topics() == []
        assert await EventsClient(bob).read("orders") == []

        received: list[Any] = []

        async def listen() -> None:
            async for message in BrokerClient(bob).subscribe("news"):
                received.append(message)

        listening = asyncio.create_task(listen())
        await asyncio.sleep(0.3)
        await BrokerClient(alice).publish("news", "for a only")
        await asyncio.sleep(0.3)
        listening.cancel()
        assert received == []
    async with client(daemon, tenants["alice"], "b") as spoofing:
        await refused(EventsClient(spoofing).publish("orders", {"n": 2}), Forbidden)
        await refused(BrokerClient(spoofing).publish("news", "x"), Forbidden)


async def test_the_runtime_isolates_namespaces(daemon: Daemon, tenants: dict[str, str]) -> None:
    async with client(daemon, tenants["alice"], "a") as alice, client(daemon, tenants["bob"], "b") as bob:
        assert await RuntimeClient(alice).read() == []
        async with client(daemon, tenants["alice"], "b") as spoofing:
            await refused(RuntimeClient(spoofing).read(), Forbidden)
            await refused(RuntimeClient(spoofing).delete("anything"), Forbidden)
        assert await RuntimeClient(bob).read() == []


# -- settings ------------------------------------------------------------------------------------


async def started(**settings: str) -> Daemon:
    from micro.home import Home
    from micro_daemon.settings import Settings

    running = Daemon(Settings.load(**settings), Home.from_env())
    await running.start()
    return running


async def test_without_the_default_admin_only_the_owner_gets_in(micro_home: Path) -> None:
    running = await started(auth_disable_admin="1")
    try:
        async with client(running, None) as anonymous:
            await refused(AuthClient(anonymous).token(id="admin", secret="micro"), Unauthorized)
        async with Client(GrpcTransport(running.address), timeout=10) as owner:  # the way in
            assert [a.id for a in await AuthClient(owner).list()] == ["owner"]
    finally:
        await running.stop(grace=0)


async def test_with_auth_off_anyone_is_an_administrator(micro_home: Path) -> None:
    running = await started(auth="none")
    try:
        async with client(running, None, namespace="team-a") as anonymous:
            await StoreClient(anonymous).write("k", b"v")
            assert (await StoreClient(anonymous, database="team-b").read("k", prefix=True)) == []
    finally:
        await running.stop(grace=0)


async def test_with_auth_off_the_auth_block_says_so(micro_home: Path) -> None:
    running = await started(auth="none")
    try:
        async with client(running, None) as anonymous:
            error = await refused(AuthClient(anonymous).list(), MicroError)
        assert error.code == 501 and "--auth none" in error.detail
    finally:
        await running.stop(grace=0)
