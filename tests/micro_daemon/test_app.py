"""The daemon over real gRPC: every building block, both codecs, errors, life cycle."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from micro.auth import AuthClient
from micro.client import Client
from micro.config import ConfigClient
from micro.credentials import StaticToken
from micro.debug import DebugClient
from micro.errors import BadRequest, ConnectError, Forbidden, NotFound, PayloadTooLarge, SetupError
from micro.home import Home
from micro.registry import RegistryClient
from micro.schema import pool_from_schema
from micro.store import StoreClient
from micro.transport import GrpcTransport
from micro_daemon.app import Daemon
from micro_daemon.settings import Settings


@pytest.fixture
async def client(daemon: Daemon) -> AsyncIterator[Client]:
    client = Client(GrpcTransport(daemon.address))
    yield client
    await client.close()


async def test_state_file_names_the_bound_address(daemon: Daemon) -> None:
    state = Home.from_env().read_state()
    assert state is not None
    assert state.pid == os.getpid()
    assert state.address == daemon.address
    assert not daemon.address.endswith(":0")


async def test_stop_removes_the_state_file(micro_home: Path) -> None:
    daemon = Daemon(Settings.load(), Home.from_env())
    await daemon.start()
    await daemon.stop(grace=1)
    assert Home.from_env().read_state() is None


async def test_store_roundtrip_over_grpc(client: Client) -> None:
    store = StoreClient(client)
    assert await store.write("a", b"1") == 1
    assert await store.write("a", b"2") == 2
    [record] = await store.read("a")
    assert (record.key, record.value, record.version) == ("a", b"2", 2)


async def test_errors_arrive_as_their_class_with_code_and_id(client: Client) -> None:
    with pytest.raises(NotFound) as raised:
        await StoreClient(client).read("missing")
    assert raised.value.code == 404
    assert raised.value.id == "store"
    assert "missing" in raised.value.detail


async def test_empty_and_oversized_keys_are_bad_requests(client: Client) -> None:
    store = StoreClient(client)
    with pytest.raises(BadRequest, match="key is empty"):
        await store.write("", b"x")
    with pytest.raises(BadRequest, match="limit is 2048"):
        await store.write("k" * 10_000_000, b"x")
    with pytest.raises(PayloadTooLarge):
        await store.write("big", b"x" * (9 * 1024 * 1024))


async def test_namespaces_partition_the_store(daemon: Daemon, client: Client) -> None:
    tokens = []
    for namespace in ("team-a", "team-b"):
        auth = AuthClient(client)
        await auth.generate("member", secret="member-secret", namespace=namespace)
        tokens.append(
            (await auth.token(id="member", secret="member-secret", namespace=namespace)).access_token
        )
    a = Client(GrpcTransport(daemon.address), namespace="team-a", credentials=StaticToken(tokens[0]))
    b = Client(GrpcTransport(daemon.address), namespace="team-b", credentials=StaticToken(tokens[1]))
    try:
        await StoreClient(a).write("k", b"from a")
        with pytest.raises(NotFound):
            await StoreClient(b).read("k")
        with pytest.raises(Forbidden):
            await StoreClient(b, database="team-a").read("k")
        assert await StoreClient(b).databases() == []
    finally:
        await a.close()
        await b.close()


async def test_an_invalid_namespace_is_refused(daemon: Daemon) -> None:
    client = Client(GrpcTransport(daemon.address))
    client.namespace = "a/b"  # bypasses the client's own check, as a foreign caller could
    try:
        with pytest.raises(BadRequest, match="invalid namespace"):
            await StoreClient(client).read("k")
    finally:
        await client.close()


async def test_json_callers_are_transcoded(client: Client) -> None:
    await client.call_json("store", "Store.Write", b'{"record": {"key": "j", "value": "aGk="}}')
    response = json.loads(await client.call_json("store", "Store.Read", b'{"key": "j"}'))
    assert response["records"][0]["value"] == "aGk="
    pages = [json.loads(p) async for p in client.stream_json("store", "Store.List", b"{}")]
    assert pages == [{"keys": ["j"]}]


async def test_malformed_json_is_a_bad_request(client: Client) -> None:
    with pytest.raises(BadRequest, match=r"not JSON|invalid request"):
        await client.call_json("store", "Store.Read", b"{nope")
    with pytest.raises(BadRequest, match="invalid request"):
        await client.call_json("store", "Store.Read", b'{"key": 5, "bogus": 1}')


async def test_config_watch_streams_changes(client: Client) -> None:
    config = ConfigClient(client)
    changes = config.watch("db")
    first = asyncio.ensure_future(anext(changes))
    await asyncio.sleep(0.1)  # the watch is open on the daemon before the change
    await config.set("db", {"host": "x"})
    assert await asyncio.wait_for(first, 5) == ("db", {"host": "x"})
    await changes.aclose()


async def test_config_secrets_are_masked(client: Client) -> None:
    config = ConfigClient(client)
    await config.set("api.key", "s3cret", secret=True)
    assert await config.get("api") == {"key": "[secret]"}
    assert await config.get("api.key", secret=True) == "s3cret"


async def test_blocks_register_with_endpoints_and_schema(client: Client) -> None:
    names = [s.name for s in await RegistryClient(client).list_services()]
    assert names == ["auth", "broker", "config", "events", "registry", "runtime", "store"]
    [store] = await RegistryClient(client).get_service("store")
    endpoints = {e.name for e in store.endpoints}
    assert {"Store.Read", "Store.List", "Debug.Health"} <= endpoints
    pool = pool_from_schema(store.schema)
    assert pool.FindMethodByName("micro.store.v1.Store.Read").input_type.name == "ReadRequest"
    assert store.nodes[0].address == client.transport.address  # type: ignore[attr-defined]


async def test_debug_health_and_stats(client: Client) -> None:
    health = await DebugClient(client, service="store").health()
    assert health.status == "ok"
    assert health.checks["store"] == "ok"
    stats = await DebugClient(client).stats()
    assert stats.requests >= 1
    assert stats.memory > 0


async def test_a_port_in_use_is_a_setup_error(micro_home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = Daemon(Settings.load(address=f"127.0.0.1:{port}"), Home.from_env())
        with pytest.raises(SetupError, match=f"port {port} is in use"):
            await daemon.start()
    assert Home.from_env().read_state() is None


async def test_a_second_daemon_on_the_same_home_refuses(daemon: Daemon) -> None:
    second = Daemon(Settings.load(), Home.from_env())
    with pytest.raises(SetupError, match="already running"):
        await second.start()
    assert Home.from_env().read_state() is not None  # the first one's state is untouched


async def test_data_survives_a_restart(micro_home: Path) -> None:
    for attempt in range(2):
        daemon = Daemon(Settings.load(), Home.from_env())
        await daemon.start()
        client = Client(GrpcTransport(daemon.address))
        try:
            if attempt == 0:
                await StoreClient(client).write("kept", b"yes")
                await ConfigClient(client).set("a.b", 1)
            else:
                assert (await StoreClient(client).read("kept"))[0].value == b"yes"
                assert await ConfigClient(client).get("a") == {"b": 1}
        finally:
            await client.close()
            await daemon.stop(grace=1)


async def test_no_daemon_is_a_connect_error(micro_home: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = Client(GrpcTransport(f"127.0.0.1:{port}"), timeout=5)
    try:
        with pytest.raises(ConnectError):
            await StoreClient(client).read("k")
    finally:
        await client.close()


async def test_a_proto_call_naming_another_service_is_not_answered_by_the_daemon(client: Client) -> None:
    with pytest.raises(NotFound, match="service 'elsewhere' not found"):
        await DebugClient(client, service="elsewhere").health()
