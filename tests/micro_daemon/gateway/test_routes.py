"""Explicit routes through the gateway: google.api.http options and Micro's endpoint metadata."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from google.protobuf import message_factory

from micro import Context, Service
from micro.client import Client
from micro.proto import registry_pb2
from micro.registry import RegistryClient
from micro.schema import endpoints, file_descriptor_set, pool_from_schema
from micro.transport import GrpcTransport
from micro_daemon.app import Daemon

# Just enough of googleapis' google/api/http.proto and annotations.proto to compile against.
HTTP_PROTO = """
syntax = "proto3";
package google.api;
message HttpRule {
  string selector = 1;
  oneof pattern {
    string get = 2; string put = 3; string post = 4; string delete = 5; string patch = 6;
    CustomHttpPattern custom = 8;
  }
  string body = 7;
  string response_body = 12;
  repeated HttpRule additional_bindings = 11;
}
message CustomHttpPattern { string kind = 1; string path = 2; }
"""
ANNOTATIONS_PROTO = """
syntax = "proto3";
package google.api;
import "google/api/http.proto";
import "google/protobuf/descriptor.proto";
extend google.protobuf.MethodOptions { HttpRule http = 72295728; }
"""
ORDERS_PROTO = """
syntax = "proto3";
package orders.v1;
import "google/api/annotations.proto";

service Orders {
  rpc Get(GetRequest) returns (Order) {
    option (google.api.http) = {
      get: "/v1/orders/{id}"
      additional_bindings { post: "/v1/orders/{id}:touch" body: "*" }
      additional_bindings { put: "/v1/orders/{id}/note" body: "note" }
    };
  }
  rpc Create(Order) returns (Order) {
    option (google.api.http) = { post: "/v1/orders" body: "*" };
  }
}

message GetRequest { string id = 1; string name = 2; bool urgent = 3; Note note = 4; }
message Note { string text = 1; }
message Order { string id = 1; string name = 2; bool urgent = 3; string note = 4; string how = 5; }
"""


@pytest.fixture(scope="session")
def orders_pb(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The orders proto compiled into a private pool (googleapis' files stay out of the default one)."""
    from importlib import resources

    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("orders")
    (out / "google" / "api").mkdir(parents=True)
    (out / "google" / "api" / "http.proto").write_text(HTTP_PROTO)
    (out / "google" / "api" / "annotations.proto").write_text(ANNOTATIONS_PROTO)
    (out / "orders.proto").write_text(ORDERS_PROTO)
    well_known = resources.files("grpc_tools") / "_proto"
    schema = out / "orders.binpb"
    args = ["protoc", f"-I{out}", f"-I{well_known}", "--include_imports", f"--descriptor_set_out={schema}"]
    assert protoc.main([*args, str(out / "orders.proto")]) == 0
    pool = pool_from_schema(Path(schema).read_bytes())
    types = {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"orders.v1.{name}"))
        for name in ("GetRequest", "Order")
    }
    return SimpleNamespace(service=pool.FindServiceByName("orders.v1.Orders"), **types)


class Orders:
    def __init__(self, pb: SimpleNamespace) -> None:
        self.pb = pb

    async def Get(self, request: Any, context: Context) -> Any:
        return self.pb.Order(
            id=request.id, name=request.name, urgent=request.urgent, note=request.note.text, how="get"
        )

    async def Create(self, request: Any, context: Context) -> Any:
        request.how = "create"
        return request


@pytest.fixture
async def orders(daemon: Daemon, orders_pb: SimpleNamespace) -> AsyncIterator[Service]:
    service = Service("orders")
    service.handle(Orders(orders_pb), proto=orders_pb.service)
    await service.start()
    yield service
    await service.stop(grace=0.1)


async def call(http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with http.request(method, url, **kwargs) as response:
        return response.status, json.loads(await response.read())


async def eventually(request: Callable[[], Awaitable[tuple[int, Any]]], status: int) -> bool:
    """Whether ``request`` answers ``status`` within two seconds (registry events arrive asynchronously)."""
    for _ in range(40):
        if (await request())[0] == status:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_google_api_http_routes(http: aiohttp.ClientSession, base: str, orders: Service) -> None:
    status, data = await call(http, "GET", base + "/v1/orders/42?urgent=true&name=q")
    assert (status, data["id"], data["urgent"], data["name"], data["how"]) == (200, "42", True, "q", "get")
    status, data = await call(http, "POST", base + "/v1/orders/42:touch", json={"name": "b", "id": "other"})
    assert (status, data["id"], data["name"]) == (200, "42", "b")  # the path's capture wins
    status, data = await call(http, "PUT", base + "/v1/orders/7/note", json={"text": "hi"})
    assert (status, data["id"], data["note"]) == (200, "7", "hi")
    status, data = await call(http, "POST", base + "/v1/orders", json={"id": "n", "name": "new"})
    assert (status, data["how"], data["name"]) == (200, "create", "new")


async def test_routes_hold_in_every_namespace(
    http: aiohttp.ClientSession, base: str, orders: Service
) -> None:
    headers = {"Micro-Namespace": "team-a"}
    status, data = await call(http, "GET", base + "/v1/orders/1", headers=headers)
    assert (status, data["id"]) == (200, "1")


async def test_the_resolver_still_serves_other_paths(
    http: aiohttp.ClientSession, base: str, orders: Service
) -> None:
    status, data = await call(http, "POST", base + "/orders/orders/get", json={"id": "r"})
    assert (status, data["id"], data["how"]) == (200, "r", "get")
    status, data = await call(http, "DELETE", base + "/v1/orders/1")  # no route for DELETE: resolved
    assert (status, data["id"]) == (404, "micro.api")


async def test_metadata_routes_and_their_updates(
    http: aiohttp.ClientSession, base: str, daemon: Daemon, kitchen: Service, kitchen_pb2: Any
) -> None:
    status, _ = await call(http, "GET", base + "/menu/pizza")
    assert status == 404
    declared = endpoints(kitchen_pb2.DESCRIPTOR.services_by_name["Kitchen"])
    for endpoint in declared:
        if endpoint.name == "Kitchen.Echo":
            endpoint.metadata.update(
                {"path": "/menu/{name},^/dishes/(?P<customer__email>[a-z@.]+)$", "method": "GET"}
            )
    entry = registry_pb2.Service(
        name="kitchen",
        version="2",
        nodes=[registry_pb2.Node(id="kitchen-2", address=kitchen._node.address)],
        endpoints=declared,
        schema=file_descriptor_set(kitchen_pb2.DESCRIPTOR),
    )
    client = Client(GrpcTransport(daemon.address))
    try:
        await RegistryClient(client).register(entry, ttl=60)
        assert await eventually(lambda: call(http, "GET", base + "/menu/pizza"), 200)
        status, data = await call(http, "GET", base + "/menu/pizza?count=2")
        assert (status, data["name"], data["count"]) == (200, "pizza", 2)
        status, data = await call(http, "GET", base + "/dishes/a@b.c")
        assert (status, data["customer"]["email"]) == (200, "a@b.c")
        status, _ = await call(http, "POST", base + "/menu/pizza")
        assert status == 404  # GET only: POST falls through to the resolver (service "menu")
        await RegistryClient(client).deregister(entry)
    finally:
        await client.close()
    assert await eventually(lambda: call(http, "GET", base + "/menu/pizza"), 404)
