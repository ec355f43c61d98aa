"""The gateway over real HTTP, in front of a real daemon and real user services."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from types import ModuleType
from typing import Any

import aiohttp
import pytest

from micro import Service, __version__
from micro._binding import bind
from micro._dispatch import Dispatcher
from micro.client import Client
from micro.home import Home
from micro.proto import registry_pb2, store_pb2
from micro.registry import RegistryClient
from micro.schema import endpoints, file_descriptor_set
from micro.transport import GrpcTransport
from micro_daemon.app import Daemon
from micro_daemon.settings import Settings

from .conftest import StartGateway, raw_request

CORS = {
    "Access-Control-Allow-Credentials": "true",
    "Access-Control-Allow-Methods": "POST, PATCH, GET, OPTIONS, PUT, DELETE",
    "Access-Control-Allow-Headers": (
        "Accept, Content-Type, Content-Length, Accept-Encoding, X-CSRF-Token, Authorization, Micro-Namespace"
    ),
}


async def call(
    http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
    async with http.request(method, url, **kwargs) as response:
        body = await response.read()
        data = json.loads(body) if response.content_type == "application/json" else body
        return response.status, data, response.headers


async def register(daemon: Daemon, entry: registry_pb2.Service) -> None:
    client = Client(GrpcTransport(daemon.address))
    try:
        await RegistryClient(client).register(entry, ttl=60)
    finally:
        await client.close()


# -- the basics ----------------------------------------------------------------------------------


async def test_root_answers_the_version(http: aiohttp.ClientSession, base: str) -> None:
    status, data, headers = await call(http, "GET", base + "/")
    assert (status, data) == (200, {"version": __version__})
    assert headers["Content-Type"] == "application/json"


async def test_favicon_is_quiet(http: aiohttp.ClientSession, base: str) -> None:
    status, data, _ = await call(http, "GET", base + "/favicon.ico")
    assert (status, data) == (204, b"")


async def test_the_state_file_names_the_bound_api_address(daemon: Daemon) -> None:
    state = Home.from_env().read_state()
    assert state is not None
    assert state.api_address == daemon.api_address
    assert not state.api_address.endswith(":0")


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("/greeter", {"name": "a"}, "Hello a (micro)"),
        ("/greeter/call", {"name": "b"}, "Hello b (micro)"),
        ("/greeter/Call", {"name": "c"}, "Hello c (micro)"),
        ("/greeter/greeter/call", {"name": "d"}, "Hello d (micro)"),
    ],
)
async def test_paths_resolve_to_endpoints(
    http: aiohttp.ClientSession, base: str, greeter: Service, path: str, body: Any, expected: str
) -> None:
    status, data, _ = await call(http, "POST", base + path, json=body)
    assert (status, data) == (200, {"msg": expected})


async def test_building_blocks_in_process(http: aiohttp.ClientSession, base: str) -> None:
    record = {"record": {"key": "k", "value": base64.b64encode(b"v").decode()}}
    assert (await call(http, "POST", base + "/store/write", json=record))[:2] == (200, {"version": "1"})
    status, data, _ = await call(http, "POST", base + "/store/read", json={"key": "k"})
    assert status == 200
    assert base64.b64decode(data["records"][0]["value"]) == b"v"
    status, data, _ = await call(http, "GET", base + "/store/read?key=k")
    assert (status, data["records"][0]["key"]) == (200, "k")
    status, data, _ = await call(http, "GET", base + "/store/debug/health")
    assert (status, data["status"]) == (200, "ok")
    status, data, _ = await call(http, "GET", base + "/registry/list-services")
    assert status == 200
    assert {s["name"] for s in data["services"]} >= {"store", "config", "registry", "runtime"}


async def test_block_errors_keep_their_id_and_code(http: aiohttp.ClientSession, base: str) -> None:
    status, data, _ = await call(http, "POST", base + "/store/read", json={"key": "missing"})
    assert status == 404
    assert (data["id"], data["code"], data["status"]) == ("store", 404, "Not Found")
    assert "missing" in data["detail"]


# -- bodies --------------------------------------------------------------------------------------


async def test_json_body(http: aiohttp.ClientSession, base: str, kitchen: Service) -> None:
    order = {"name": "n", "count": 2, "customer": {"email": "e", "address": {"city": "c"}}, "tags": ["x"]}
    status, data, _ = await call(http, "POST", base + "/kitchen/echo", json=order)
    assert status == 200
    assert (data["name"], data["count"], data["customer"]["email"], data["tags"]) == ("n", 2, "e", ["x"])
    assert data["urgent"] is False  # proto field names, every field present
    assert data["total"] == "0"


async def test_query_string_nests_dotted_keys(
    http: aiohttp.ClientSession, base: str, kitchen: Service
) -> None:
    url = base + "/kitchen/echo?customer.email=x&tags=a&tags=b&urgent=true&count=3&labels.k=v"
    status, data, _ = await call(http, "GET", url)
    assert status == 200
    assert data["customer"]["email"] == "x"
    assert (data["tags"], data["urgent"], data["count"], data["labels"]) == (["a", "b"], True, 3, {"k": "v"})


async def test_query_and_body_merge_with_the_body_winning(
    http: aiohttp.ClientSession, base: str, kitchen: Service
) -> None:
    url = base + "/kitchen/echo?name=query&count=1&customer.email=q"
    body = {"name": "body", "customer": {"address": {"city": "c"}}}
    status, data, _ = await call(http, "POST", url, json=body)
    assert status == 200
    assert (data["name"], data["count"]) == ("body", 1)
    assert (data["customer"]["email"], data["customer"]["address"]["city"]) == ("q", "c")


async def test_get_without_parameters_sends_an_empty_request(
    http: aiohttp.ClientSession, base: str, kitchen: Service
) -> None:
    status, data, _ = await call(http, "GET", base + "/kitchen/echo")
    assert (status, data["name"], data["count"]) == (200, "", 0)


async def test_urlencoded_form(http: aiohttp.ClientSession, base: str, kitchen: Service) -> None:
    form = [("name", "f"), ("tags", "a"), ("tags", "b"), ("customer.email", "e"), ("urgent", "on")]
    status, data, _ = await call(http, "POST", base + "/kitchen/echo", data=form)
    assert status == 200
    assert (data["name"], data["tags"], data["customer"]["email"], data["urgent"]) == (
        "f",
        ["a", "b"],
        "e",
        True,
    )


async def test_curl_style_json_sent_as_a_form(
    http: aiohttp.ClientSession, base: str, greeter: Service
) -> None:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    status, data, _ = await call(
        http, "POST", base + "/greeter/call", data=b'{"name":"John"}', headers=headers
    )
    assert (status, data) == (200, {"msg": "Hello John (micro)"})


async def test_multipart_form_with_a_file(http: aiohttp.ClientSession, base: str, kitchen: Service) -> None:
    form = aiohttp.FormData()
    form.add_field("name", "m")
    form.add_field("seats", "1")
    form.add_field("seats", "2")
    form.add_field("note", b"\x00\x01file", filename="note.bin", content_type="application/octet-stream")
    status, data, _ = await call(http, "POST", base + "/kitchen/echo", data=form)
    assert status == 200
    assert (data["name"], data["seats"]) == ("m", [1, 2])
    assert base64.b64decode(data["note"]) == b"\x00\x01file"


@pytest.mark.parametrize(
    "content_type",
    ["application/protobuf", "application/x-protobuf", "application/octet-stream", "application/grpc"],
)
async def test_proto_bodies_pass_through(
    http: aiohttp.ClientSession, base: str, kitchen: Service, kitchen_pb2: ModuleType, content_type: str
) -> None:
    order = kitchen_pb2.Order(name="p", count=5, note=b"\xff")
    headers = {"Content-Type": content_type}
    async with http.post(base + "/kitchen/echo", data=order.SerializeToString(), headers=headers) as response:
        assert response.status == 200
        assert response.content_type == content_type
        assert kitchen_pb2.Order.FromString(await response.read()) == order


async def test_proto_bodies_reach_building_blocks(http: aiohttp.ClientSession, base: str) -> None:
    headers = {"Content-Type": "application/protobuf"}
    write = store_pb2.WriteRequest(record=store_pb2.Record(key="p", value=b"v"))
    async with http.post(base + "/store/write", data=write.SerializeToString(), headers=headers) as response:
        assert response.status == 200
        assert store_pb2.WriteResponse.FromString(await response.read()).version == 1


# -- namespaces and metadata ---------------------------------------------------------------------


async def test_namespace_header(http: aiohttp.ClientSession, base: str, greeter: Service) -> None:
    headers = {"Micro-Namespace": "team-a"}
    status, data, _ = await call(http, "POST", base + "/greeter/call", json={"name": "n"}, headers=headers)
    assert (status, data) == (200, {"msg": "Hello n (team-a)"})


async def test_namespaces_partition_building_blocks(http: aiohttp.ClientSession, base: str) -> None:
    record = {"record": {"key": "k", "value": ""}}
    assert (await call(http, "POST", base + "/store/write", json=record, headers={"Micro-Namespace": "a"}))[
        0
    ] == 200
    status, _, _ = await call(
        http, "POST", base + "/store/read", json={"key": "k"}, headers={"Micro-Namespace": "b"}
    )
    assert status == 404
    status, _, _ = await call(
        http, "POST", base + "/store/read", json={"key": "k"}, headers={"Micro-Namespace": "a"}
    )
    assert status == 200


@pytest.mark.parametrize("namespace", ["Bad", "a/b", "-x", "a" * 64])
async def test_an_invalid_namespace_is_a_bad_request(
    http: aiohttp.ClientSession, base: str, greeter: Service, namespace: str
) -> None:
    headers = {"Micro-Namespace": namespace}
    status, data, _ = await call(http, "POST", base + "/greeter/call", json={"name": "n"}, headers=headers)
    assert status == 400
    assert "invalid namespace" in data["detail"]


async def test_headers_travel_as_metadata(http: aiohttp.ClientSession, base: str, greeter: Service) -> None:
    headers = {"X-Trace": "-t1", "Connection": "keep-alive"}
    status, data, _ = await call(http, "POST", base + "/greeter/call", json={"name": "n"}, headers=headers)
    assert (status, data) == (200, {"msg": "Hello n (micro)-t1"})


# -- CORS ----------------------------------------------------------------------------------------


async def test_cors_headers_echo_the_origin(http: aiohttp.ClientSession, base: str, greeter: Service) -> None:
    headers = {"Origin": "https://app.example"}
    _, _, got = await call(http, "POST", base + "/greeter/call", json={"name": "n"}, headers=headers)
    assert got["Access-Control-Allow-Origin"] == "https://app.example"
    assert {k: got[k] for k in CORS} == CORS
    _, _, got = await call(http, "GET", base + "/nope")
    assert got["Access-Control-Allow-Origin"] == "*"  # errors carry them too


async def test_options_is_answered_at_once(http: aiohttp.ClientSession, base: str) -> None:
    status, body, got = await call(http, "OPTIONS", base + "/anything/at/all", headers={"Origin": "http://x"})
    assert (status, body) == (200, b"")
    assert got["Access-Control-Allow-Origin"] == "http://x"
    assert {k: got[k] for k in CORS} == CORS


async def test_cors_can_be_turned_off(http: aiohttp.ClientSession, another_gateway: StartGateway) -> None:
    base = await another_gateway(cors=False)
    _, _, got = await call(http, "GET", base + "/", headers={"Origin": "http://x"})
    assert "Access-Control-Allow-Origin" not in got


# -- errors --------------------------------------------------------------------------------------


async def test_unknown_service_and_endpoint(http: aiohttp.ClientSession, base: str, greeter: Service) -> None:
    status, data, _ = await call(http, "POST", base + "/nope/call")
    assert status == 404
    assert data == {
        "id": "micro.api",
        "code": 404,
        "detail": "service 'nope' not found in namespace 'micro'",
        "status": "Not Found",
    }
    status, data, _ = await call(http, "POST", base + "/greeter/missing")
    assert (status, data["id"]) == (404, "micro.api")
    assert "Greeter.Missing" in data["detail"]


async def test_service_errors_keep_their_class(
    http: aiohttp.ClientSession, base: str, greeter: Service
) -> None:
    status, data, _ = await call(http, "POST", base + "/greeter/call", json={})
    assert status == 400
    assert data == {"id": "greeter", "code": 400, "detail": "name is required", "status": "Bad Request"}


async def test_a_crashing_handler_is_a_500(http: aiohttp.ClientSession, base: str, greeter: Service) -> None:
    status, data, _ = await call(http, "POST", base + "/greeter/call", json={"name": "crash"})
    assert (status, data["code"], data["id"]) == (500, 500, "greeter")
    assert "Traceback" not in data["detail"]


@pytest.mark.parametrize("body", [b"{nope", b'{"name": 5}', b'{"bogus": 1}', b"[1]", b"\xff"])
async def test_malformed_json_is_a_bad_request(
    http: aiohttp.ClientSession, base: str, greeter: Service, body: bytes
) -> None:
    headers = {"Content-Type": "application/json"}
    status, data, _ = await call(http, "POST", base + "/greeter/call", data=body, headers=headers)
    assert (status, data["id"], data["code"]) == (400, "micro.api", 400)


async def test_malformed_query_values_are_bad_requests(
    http: aiohttp.ClientSession, base: str, kitchen: Service
) -> None:
    status, data, _ = await call(http, "GET", base + "/kitchen/echo?count=many")
    assert (status, data["id"]) == (400, "micro.api")
    status, data, _ = await call(http, "POST", base + "/kitchen/echo?count=1", data=b"[1]")
    assert status == 400


async def test_an_unreachable_service_is_unavailable(
    http: aiohttp.ClientSession, base: str, daemon: Daemon, greeter_pb2: ModuleType
) -> None:
    await register(daemon, _greeter_entry("ghost", greeter_pb2, "127.0.0.1:1"))
    status, data, _ = await call(http, "POST", base + "/ghost/greeter/call", json={"name": "n"})
    assert status == 503
    assert (data["id"], data["status"]) == ("micro.api", "Service Unavailable")
    assert "ghost" in data["detail"]


async def test_a_dead_node_is_skipped(
    http: aiohttp.ClientSession, base: str, daemon: Daemon, greeter: Service, greeter_pb2: ModuleType
) -> None:
    await register(daemon, _greeter_entry("greeter", greeter_pb2, "127.0.0.1:1", version="2"))
    for _ in range(4):  # round-robin meets the dead node; each call still succeeds
        status, data, _ = await call(http, "POST", base + "/greeter/call", json={"name": "n"})
        assert (status, data) == (200, {"msg": "Hello n (micro)"})


async def test_a_slow_service_times_out(
    http: aiohttp.ClientSession, another_gateway: StartGateway, greeter: Service
) -> None:
    base = await another_gateway(timeout=0.2)
    started = time.monotonic()
    status, data, _ = await call(http, "POST", base + "/greeter/call", json={"name": "slow"})
    assert time.monotonic() - started < 3
    assert (status, data["id"], data["status"]) == (504, "micro.api", "Gateway Timeout")


async def test_body_limit_by_content_length_without_reading_the_body(another_gateway: StartGateway) -> None:
    base = await another_gateway(max_body=1024)
    address = base.removeprefix("http://")
    head = (
        b"POST /store/write HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 104857600\r\n\r\n"
    )
    started = time.monotonic()
    status, body = await raw_request(address, head, b"{" + b" " * 1000)  # 100 MB announced, 1 kB sent
    assert time.monotonic() - started < 2
    assert status == 413
    assert json.loads(body)["id"] == "micro.api"


async def test_body_limit_while_reading(http: aiohttp.ClientSession, another_gateway: StartGateway) -> None:
    base = await another_gateway(max_body=1024)

    async def chunks() -> Any:  # no Content-Length: the limit applies as the body arrives
        for _ in range(64):
            yield b" " * 1024

    status, data, _ = await call(http, "POST", base + "/store/write", data=chunks())
    assert (status, data["code"]) == (413, 413)
    status, data, _ = await call(
        http, "POST", base + "/store/write", data=aiohttp.FormData({"a": "x" * 4096})
    )
    assert status == 413


async def test_the_default_body_limit_is_ten_mebibytes(daemon: Daemon) -> None:
    head = b"POST /store/write HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (10 * 1024 * 1024 + 1)
    status, _ = await raw_request(daemon.api_address, head)
    assert status == 413


@pytest.mark.parametrize(
    "target",
    [
        "/store/../store/read",
        "/store/..",
        "/store/%2e%2e/read",
        "/store%2Fread",
        "/store%2fread/x",
        "/a/%5c..%5cb",
    ],
)
async def test_traversal_and_encoded_slashes_are_refused(daemon: Daemon, target: str) -> None:
    head = f"GET {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()
    status, body = await raw_request(daemon.api_address, head)
    assert status == 400
    assert json.loads(body)["id"] == "micro.api"


async def test_unexpected_errors_are_500_without_traceback(
    http: aiohttp.ClientSession, daemon: Daemon, another_gateway: StartGateway
) -> None:
    class Store:
        async def Read(self, request: Any, context: Any) -> Any:
            raise RuntimeError("disk on fire")

    dispatcher = Dispatcher()
    methods = [m for m in bind(_Everything(Store()), store_pb2.DESCRIPTOR.services_by_name["Store"])]
    dispatcher.add("boom", methods)
    entry = registry_pb2.Service(
        name="boom",
        version="1",
        metadata={"type": "building-block"},
        nodes=[registry_pb2.Node(id="boom-1", address=daemon.address)],
        endpoints=endpoints(store_pb2.DESCRIPTOR.services_by_name["Store"]),
    )
    await register(daemon, entry)
    base = await another_gateway(dispatcher=dispatcher)
    status, data, _ = await call(http, "POST", base + "/boom/store/read", json={"key": "k"})
    assert status == 500
    assert data == {
        "id": "micro.api",
        "code": 500,
        "detail": "error during request: disk on fire",
        "status": "Internal Server Error",
    }


async def test_a_port_in_use_is_a_setup_error(micro_home: Any) -> None:
    import socket

    from micro.errors import SetupError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = Daemon(Settings.load(api_address=f"127.0.0.1:{port}"), Home.from_env())
        with pytest.raises(SetupError, match=f"port {port} is in use.*--api-address.*MICRO_API_ADDRESS"):
            await daemon.start()
    assert Home.from_env().read_state() is None


async def test_stop_ends_open_streams(daemon: Daemon, http: aiohttp.ClientSession, greeter: Service) -> None:
    base = f"http://{daemon.api_address}"
    async with http.post(base + "/greeter/stream", json={"count": 5000}) as response:
        assert await asyncio.wait_for(response.content.readline(), 5)
        started = time.monotonic()
        assert daemon._gateway is not None
        await daemon._gateway.stop(grace=5)
        assert time.monotonic() - started < 2
        with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
            await asyncio.wait_for(response.read(), 5)


class _Everything:
    """A handler with every Store method; only those of ``inner`` do anything."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        found = getattr(self.inner, name, None)
        if found is not None:
            return found

        async def unused(request: Any, context: Any) -> Any:
            raise NotImplementedError

        async def unused_stream(request: Any, context: Any) -> Any:
            yield None

        return unused_stream if name in {"List"} else unused


def _greeter_entry(name: str, pb: ModuleType, *addresses: str, version: str = "1") -> registry_pb2.Service:
    service = pb.DESCRIPTOR.services_by_name["Greeter"]
    return registry_pb2.Service(
        name=name,
        version=version,
        nodes=[registry_pb2.Node(id=f"{name}-{i}", address=a) for i, a in enumerate(addresses)],
        endpoints=endpoints(service),
        schema=file_descriptor_set(pb.DESCRIPTOR),
    )
