from __future__ import annotations

import importlib.resources
import json
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
from google.protobuf import descriptor_pb2, json_format
from grpc_tools import protoc  # type: ignore[import-untyped]
from openapi_spec_validator import validate

from micro import __version__, schema
from micro.errors import BadRequest
from micro.openapi import endpoint_path, openapi_document
from micro.proto import registry_pb2
from micro_daemon.gateway.resolve import endpoint_key, resolve

PROTOS = Path(__file__).resolve().parents[1] / "protos"
BLOCKS = Path(schema.__file__).parent / "proto" / "blocks.binpb"

EXTRA_PROTO = textwrap.dedent(
    """
    syntax = "proto3";
    package extra.v1;

    import "google/protobuf/any.proto";
    import "google/protobuf/empty.proto";
    import "google/protobuf/field_mask.proto";
    import "google/protobuf/struct.proto";
    import "google/protobuf/wrappers.proto";

    service Tools {
      // Grow adds a branch.
      //
      // The branch is added under the root.
      rpc Grow(Tree) returns (Tree);
      rpc Ping(google.protobuf.Empty) returns (Kinds);
    }

    // Tree holds trees.
    message Tree {
      string label = 1;
      repeated Tree children = 2;
      Tree parent = 3;
    }

    enum Mood {
      MOOD_UNSPECIFIED = 0;
      // a good one
      HAPPY = 1;
    }

    message Kinds {
      fixed32 f32 = 1;
      fixed64 f64 = 2;
      sfixed32 sf32 = 3;
      sfixed64 sf64 = 4;
      sint64 s64 = 5;
      map<int64, string> by_id = 6;
      map<uint32, Tree> by_number = 7;
      map<bool, Mood> by_flag = 8;
      google.protobuf.Any any = 9;
      google.protobuf.Empty empty = 10;
      google.protobuf.FieldMask mask = 11;
      google.protobuf.Value value = 12;
      google.protobuf.ListValue list = 13;
      google.protobuf.Int64Value big = 14;
      google.protobuf.BoolValue flag = 15;
      google.protobuf.BytesValue blob = 16;
      google.protobuf.NullValue nothing = 17;
    }
    """
)


def descriptor_set(source: Path, name: str, out: Path) -> bytes:
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    target = out / f"{name}.binpb"
    args = ["protoc", f"-I{source}", f"-I{well_known}", f"--descriptor_set_out={target}"]
    assert protoc.main([*args, "--include_imports", "--include_source_info", name]) == 0
    return target.read_bytes()


def entry(name: str, data: bytes, *services: str, version: str = "1.0.0") -> registry_pb2.Service:
    pool = schema.pool_from_schema(data)
    endpoints = [e for s in services for e in schema.endpoints(pool.FindServiceByName(s))]
    return registry_pb2.Service(name=name, version=version, endpoints=endpoints, schema=data)


@pytest.fixture(scope="module")
def kitchen(tmp_path_factory: pytest.TempPathFactory) -> registry_pb2.Service:
    data = descriptor_set(PROTOS, "kitchen.proto", tmp_path_factory.mktemp("kitchen"))
    return entry("kitchen", data, "kitchen.Kitchen")


@pytest.fixture(scope="module")
def greeter(tmp_path_factory: pytest.TempPathFactory) -> registry_pb2.Service:
    data = descriptor_set(PROTOS, "greeter.proto", tmp_path_factory.mktemp("greeter"))
    return entry("greeter", data, "greeter.Greeter")


@pytest.fixture(scope="module")
def extra(tmp_path_factory: pytest.TempPathFactory) -> registry_pb2.Service:
    tmp = tmp_path_factory.mktemp("extra")
    (tmp / "extra.proto").write_text(EXTRA_PROTO)
    return entry("extra", descriptor_set(tmp, "extra.proto", tmp), "extra.v1.Tools")


@pytest.fixture(scope="module")
def doc(kitchen: registry_pb2.Service, greeter: registry_pb2.Service, extra: registry_pb2.Service) -> Any:
    document = openapi_document([kitchen, greeter, extra])
    validate(document)
    return document


def component(doc: Any, name: str) -> Any:
    return doc["components"]["schemas"][name]


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def validator(doc: Any, name: str) -> jsonschema.Draft202012Validator:
    root = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    return jsonschema.Draft202012Validator(root, format_checker=jsonschema.FormatChecker())


@pytest.mark.parametrize(
    ("service", "endpoint", "path"),
    [
        ("helloworld", "Helloworld.Call", "/helloworld/call"),
        ("store", "Store.Read", "/store/read"),
        ("greeter", "Greeter.PingPong", "/greeter/ping-pong"),
        ("foo", "Bar.BazXyz", "/foo/bar/baz-xyz"),
        ("hello-world", "HelloWorld.Call", "/hello-world/call"),
        ("my_svc", "MySvc.Get", "/my_svc/my-svc/get"),
        ("api", "HTTPProxy.GetURL", "/api/http-proxy/get-url"),
        ("users", "Accounts.list_all", "/users/accounts/list_all"),
        ("v1.foo", "Foo.Bar", "/v1/foo/bar"),
        ("v1.foo", "Baz.Bar", "/v1/foo/baz/bar"),
        ("foo.bar", "Bar.Cat", "/foo/bar/bar/cat"),
        ("go.micro.srv.greeter", "Greeter.Hello", "/go/micro/srv/greeter/greeter/hello"),
    ],
)
def test_endpoint_path_follows_micro_resolution(service: str, endpoint: str, path: str) -> None:
    assert endpoint_path(service, endpoint) == path
    # the gateway's resolver leads back to the same service and endpoint
    resolved_service, resolved_endpoint = resolve(path)
    assert resolved_service == service
    assert endpoint_key(resolved_endpoint) == endpoint_key(endpoint)


@pytest.mark.parametrize("endpoint", ["Call", ".Call", "Greeter.", "A.B.C"])
def test_endpoint_path_refuses_malformed_endpoints(endpoint: str) -> None:
    with pytest.raises(BadRequest, match=r"Handler\.Method"):
        endpoint_path("greeter", endpoint)


def test_paths_and_operations(doc: Any) -> None:
    assert doc["openapi"] == "3.1.0"
    assert list(doc["paths"]) == [
        *("/kitchen/echo", "/kitchen/count", "/kitchen/sum", "/kitchen/chat"),
        *("/greeter/call", "/greeter/stream", "/greeter/collect", "/greeter/ping-pong"),
        *("/extra/tools/grow", "/extra/tools/ping"),
    ]
    echo = doc["paths"]["/kitchen/echo"]["post"]
    assert echo["operationId"] == "kitchen.Kitchen.Echo"
    assert echo["tags"] == ["kitchen"]
    assert echo["parameters"] == [{"$ref": "#/components/parameters/Namespace"}]
    assert doc["components"]["parameters"]["Namespace"]["name"] == "Micro-Namespace"
    assert echo["requestBody"]["content"]["application/json"]["schema"] == ref("kitchen.Order")
    assert echo["responses"]["200"]["content"]["application/json"]["schema"] == ref("kitchen.Order")
    assert {"400", "404", "500", "502", "503", "default"} <= set(echo["responses"])
    error = doc["components"]["responses"]["NotFound"]["content"]["application/json"]["schema"]
    assert error == ref("Error")
    assert set(component(doc, "Error")["required"]) == {"id", "code", "detail", "status"}


def test_comments_become_summaries_and_descriptions(doc: Any) -> None:
    echo = doc["paths"]["/kitchen/echo"]["post"]
    assert echo["summary"] == echo["description"] == "Echo returns the request as it arrived."
    grow = doc["paths"]["/extra/tools/grow"]["post"]
    assert grow["summary"] == "Grow adds a branch."
    assert grow["description"] == "Grow adds a branch.\n\nThe branch is added under the root."
    assert doc["paths"]["/extra/tools/ping"]["post"]["summary"] == "Tools.Ping"  # no comment
    assert {"name": "kitchen", "description": "Kitchen echoes whatever it is sent."} in doc["tags"]
    order = component(doc, "kitchen.Order")
    assert order["description"].startswith("Order has one field of every kind.")
    assert order["properties"]["name"]["description"] == "the customer's name"
    assert order["properties"]["customer"] == {**ref("kitchen.Customer"), "description": "who ordered"}
    assert component(doc, "kitchen.Size")["description"].startswith("Size of a dish.")
    assert "- `HAPPY`: a good one" in component(doc, "extra.v1.Mood")["description"]


def test_every_field_kind_follows_the_proto3_json_mapping(doc: Any) -> None:
    props = component(doc, "kitchen.Order")["properties"]
    int32 = {"type": "integer", "format": "int32", "minimum": -(2**31), "maximum": 2**31 - 1}
    int64 = {"type": ["string", "integer"], "format": "int64", "pattern": "^-?[0-9]+$"}
    assert props["count"] == {**int32, "description": "how many dishes"}
    assert props["delta"] == props["priority"] == int32
    assert props["total"] == int64
    assert props["table"] == {"type": "integer", "format": "uint32", "minimum": 0, "maximum": 2**32 - 1}
    assert props["ticket"]["type"] == ["string", "integer"] and props["ticket"]["format"] == "uint64"
    assert props["price"] == {"type": "number", "format": "double"}
    assert props["weight"] == {"type": "number", "format": "float"}
    assert props["urgent"]["type"] == "boolean"
    assert props["note"] == {"type": "string", "contentEncoding": "base64"}
    assert props["size"] == ref("kitchen.Size")
    assert props["tags"] == {"type": "array", "items": {"type": "string"}}
    assert props["seats"] == {"type": "array", "items": int32}
    assert props["guests"] == {"type": "array", "items": ref("kitchen.Customer")}
    assert props["sizes"] == {"type": "array", "items": ref("kitchen.Size")}
    assert component(doc, "kitchen.Geo")["properties"]["lat"]["type"] == "number"
    kinds = component(doc, "extra.v1.Kinds")["properties"]
    assert kinds["f32"]["format"] == "uint32" and kinds["sf32"] == int32
    assert kinds["f64"]["format"] == "uint64"
    assert kinds["sf64"] == kinds["s64"] == int64


def test_maps_are_objects_with_typed_values_and_keys(doc: Any) -> None:
    props = component(doc, "kitchen.Order")["properties"]
    assert props["labels"] == {"type": "object", "additionalProperties": {"type": "string"}}
    assert props["counts"]["additionalProperties"]["format"] == "int64"
    assert "propertyNames" not in props["labels"]
    kinds = component(doc, "extra.v1.Kinds")["properties"]
    assert kinds["by_id"]["propertyNames"] == {"pattern": "^-?[0-9]+$"}
    assert kinds["by_number"] == {
        "type": "object",
        "additionalProperties": ref("extra.v1.Tree"),
        "propertyNames": {"pattern": "^[0-9]+$"},
    }
    assert kinds["by_flag"]["propertyNames"] == {"enum": ["true", "false"]}
    assert not any(name.endswith("Entry") for name in doc["components"]["schemas"])


def test_enums_take_names_or_numbers(doc: Any) -> None:
    size = component(doc, "kitchen.Size")
    assert size["anyOf"][0] == {"type": "string", "enum": ["SIZE_UNSPECIFIED", "SMALL", "LARGE"]}
    assert size["anyOf"][1]["type"] == "integer"
    check = validator(doc, "kitchen.Size")
    assert check.is_valid("SMALL") and check.is_valid(2)
    assert not check.is_valid("MEDIUM")


def test_oneofs_are_documented_and_never_required(doc: Any) -> None:
    order = component(doc, "kitchen.Order")
    assert "required" not in order
    assert order["x-micro-oneofs"] == {"payment": ["card", "cash"]}  # `optional priority` is no oneof
    assert "At most one of `card`, `cash` is set (oneof `payment`)." in order["description"]
    assert order["properties"]["card"]["description"] == "Part of oneof `payment`."


def test_recursive_messages_refer_to_themselves(doc: Any) -> None:
    tree = component(doc, "extra.v1.Tree")
    assert tree["properties"]["children"] == {"type": "array", "items": ref("extra.v1.Tree")}
    assert tree["properties"]["parent"] == ref("extra.v1.Tree")
    assert validator(doc, "extra.v1.Tree").is_valid({"label": "a", "children": [{"children": [{}]}]})


def test_well_known_types(doc: Any) -> None:
    assert component(doc, "google.protobuf.Timestamp")["format"] == "date-time"
    assert component(doc, "google.protobuf.Duration")["pattern"] == r"^-?[0-9]+(\.[0-9]{1,9})?s$"
    assert component(doc, "google.protobuf.Struct")["type"] == "object"
    assert component(doc, "google.protobuf.StringValue")["type"] == ["string", "null"]
    assert component(doc, "google.protobuf.Int64Value")["type"] == ["string", "integer", "null"]
    assert component(doc, "google.protobuf.BoolValue")["type"] == ["boolean", "null"]
    assert component(doc, "google.protobuf.BytesValue")["contentEncoding"] == "base64"
    assert component(doc, "google.protobuf.Any")["required"] == ["@type"]
    assert component(doc, "google.protobuf.Empty")["type"] == "object"
    assert component(doc, "google.protobuf.FieldMask")["type"] == "string"
    assert component(doc, "google.protobuf.ListValue")["type"] == "array"
    assert component(doc, "google.protobuf.NullValue") == {"type": "null"}
    assert "properties" not in component(doc, "google.protobuf.Value")  # any JSON value
    ping = doc["paths"]["/extra/tools/ping"]["post"]["requestBody"]["content"]["application/json"]
    assert ping["schema"] == ref("google.protobuf.Empty")


def test_proto_json_of_a_full_order_matches_its_schema(doc: Any, kitchen_pb2: ModuleType) -> None:
    order = kitchen_pb2.Order(
        name="Ada", count=2, total=2**40, table=7, ticket=2**63, delta=-3, price=1.5, weight=0.25,
        urgent=True, note=b"\x00\xff", size=kitchen_pb2.LARGE, tags=["a"], seats=[1, 2],
        labels={"k": "v"}, counts={"x": -(2**62)}, card="visa", sizes=[1], priority=0,
        customer=kitchen_pb2.Customer(email="a@b.c", address={"city": "Oslo", "geo": {"lat": 1.0}}),
        guests=[kitchen_pb2.Customer(email="g@b.c")],
    )  # fmt: skip
    order.placed.FromSeconds(1_700_000_000)
    order.wait.FromMilliseconds(1500)
    order.extra.update({"any": [1, "two", None, {"three": True}]})
    order.comment.value = "no onions"
    check = validator(doc, "kitchen.Order")
    as_json = json.loads(json_format.MessageToJson(order, preserving_proto_field_name=True))
    assert isinstance(as_json["total"], str)
    check.validate(as_json)
    check.validate({"total": 12, "ticket": "12", "size": 1, "comment": None, "wait": "-0.5s"})
    for wrong in ({"total": "1.5"}, {"count": 2**31}, {"wait": "5m"}, {"placed": "yesterday"}):
        assert not check.is_valid(wrong), wrong


def test_streaming_endpoints(doc: Any) -> None:
    paths = doc["paths"]
    assert set(paths["/greeter/call"]) == {"post"}
    stream = paths["/greeter/stream"]["post"]
    assert stream["x-micro-stream"] == "server"
    ok = stream["responses"]["200"]
    assert ok["content"] == {"text/event-stream": {"schema": ref("greeter.StreamResponse")}}
    assert "each event's data is one `greeter.StreamResponse`" in ok["description"]
    for path, kind, send, receive in [
        ("/greeter/collect", "client", "greeter.Request", "greeter.Response"),
        ("/greeter/ping-pong", "bidi", "greeter.Ping", "greeter.Pong"),
    ]:
        operation = paths[path]["get"]
        assert operation["x-micro-stream"] == kind
        assert operation["x-micro-websocket"] == {"send": ref(send), "receive": ref(receive)}
        assert "WebSocket" in operation["responses"]["101"]["description"]
        assert "requestBody" not in operation
        assert send in doc["components"]["schemas"] and receive in doc["components"]["schemas"]


def test_one_service_document(greeter: registry_pb2.Service) -> None:
    document = openapi_document([greeter], title="greeter", server_url="http://localhost:8080")
    validate(document)
    assert document["info"] == {"title": "greeter", "version": "1.0.0"}
    assert document["servers"] == [{"url": "http://localhost:8080"}]
    assert [tag["name"] for tag in document["tags"]] == ["greeter"]
    assert "kitchen.Order" not in document["components"]["schemas"]
    assert openapi_document([greeter, greeter])["info"]["version"] == __version__
    assert openapi_document([greeter], version="2")["info"]["version"] == "2"


def test_handlers_named_apart_from_the_service_get_their_own_segment(kitchen: registry_pb2.Service) -> None:
    renamed = registry_pb2.Service(name="shop", endpoints=kitchen.endpoints, schema=kitchen.schema)
    document = openapi_document([renamed])
    validate(document)
    assert "/shop/kitchen/echo" in document["paths"]
    assert document["paths"]["/shop/kitchen/echo"]["post"]["operationId"] == "shop.Kitchen.Echo"


def test_several_versions_of_a_service_document_the_first(greeter: registry_pb2.Service) -> None:
    older = registry_pb2.Service()
    older.CopyFrom(greeter)
    older.version = "0.9.0"
    document = openapi_document([greeter, older])
    validate(document)  # operationIds stay unique
    assert len(document["paths"]) == len(greeter.endpoints)
    assert [tag["name"] for tag in document["tags"]] == ["greeter"]


def test_entries_without_a_usable_schema_still_get_paths(greeter: registry_pb2.Service) -> None:
    bare = registry_pb2.Service(name="bare", endpoints=greeter.endpoints)
    broken = registry_pb2.Service(name="broken", endpoints=greeter.endpoints, schema=b"\xff\xff")
    odd = registry_pb2.Service(name="odd", endpoints=[registry_pb2.Endpoint(name="NoDot")])
    document = openapi_document([bare, broken, odd])
    validate(document)
    call = document["paths"]["/bare/greeter/call"]["post"]
    assert call["requestBody"]["content"]["application/json"]["schema"] == {"type": "object"}
    assert document["paths"]["/broken/greeter/stream"]["post"]["x-micro-stream"] == "server"
    assert "get" in document["paths"]["/bare/greeter/ping-pong"]
    assert not any(path.startswith("/odd") for path in document["paths"])


def test_endpoints_missing_from_the_protos_fall_back_to_their_message_types(
    greeter: registry_pb2.Service,
) -> None:
    known = registry_pb2.Endpoint(
        name="Legacy.Hello",
        request=registry_pb2.Value(name="Request", type="greeter.Request"),
        response=registry_pb2.Value(name="Response", type="greeter.Response"),
    )
    unknown = registry_pb2.Endpoint(name="Legacy.Gone", request=registry_pb2.Value(type="greeter.Gone"))
    service = registry_pb2.Service(name="greeter", endpoints=[known, unknown], schema=greeter.schema)
    document = openapi_document([service])
    validate(document)
    hello = document["paths"]["/greeter/legacy/hello"]["post"]
    assert hello["requestBody"]["content"]["application/json"]["schema"] == ref("greeter.Request")
    assert hello["responses"]["200"]["content"]["application/json"]["schema"] == ref("greeter.Response")
    assert hello["summary"] == "Legacy.Hello" and "x-micro-stream" not in hello
    gone = document["paths"]["/greeter/legacy/gone"]["post"]
    assert gone["requestBody"]["content"]["application/json"]["schema"] == {"type": "object"}


def test_documents_are_independent(greeter: registry_pb2.Service) -> None:
    first = openapi_document([greeter])
    first["components"]["schemas"]["Error"]["properties"].clear()
    assert openapi_document([greeter])["components"]["schemas"]["Error"]["properties"]


def test_the_building_blocks_schema_makes_a_valid_document() -> None:
    data = BLOCKS.read_bytes()
    store = openapi_document([entry("store", data, "micro.store.v1.Store")], title="store")
    validate(store)
    read = store["paths"]["/store/read"]["post"]
    assert read["operationId"] == "store.Store.Read"
    assert read["summary"].startswith("Read returns the record with a key")
    assert store["paths"]["/store/list"]["post"]["x-micro-stream"] == "server"
    record = store["components"]["schemas"]["micro.store.v1.Record"]
    assert record["properties"]["value"]["contentEncoding"] == "base64"
    assert record["properties"]["expiry"]["format"] == "int64"

    blocks = []
    for file in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        services = [f"{file.package}.{s.name}" for s in file.service]
        blocks.append(entry(file.package.split(".")[1], data, *services))  # micro.<block>.v1
    everything = openapi_document(blocks)
    validate(everything)
    assert {"/store/read", "/registry/get-service", "/runtime/logs"} <= set(everything["paths"])
