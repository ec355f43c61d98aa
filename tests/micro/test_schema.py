from __future__ import annotations

import importlib.resources
import textwrap
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, timestamp_pb2
from grpc_tools import protoc  # type: ignore[import-untyped]

from micro import schema
from micro.errors import BadRequest
from micro.proto import registry_pb2, store_pb2

BLOCKS = Path(schema.__file__).parent / "proto" / "blocks.binpb"

KITCHEN_PROTO = textwrap.dedent(
    """
    syntax = "proto3";
    package kitchen.v1;

    import "google/protobuf/duration.proto";
    import "google/protobuf/struct.proto";
    import "google/protobuf/timestamp.proto";

    // Sink does everything.
    service Sink {
      // Wash one dish.
      rpc Wash(Everything) returns (Level1);
      rpc Drain(Everything) returns (stream Level1);
      rpc Fill(stream Everything) returns (Level1);
      rpc Swirl(stream Everything) returns (stream Level1);
    }

    enum Colour {
      COLOUR_UNSPECIFIED = 0;
      // a warm one
      RED = 1;
    }

    message Level1 {
      message Level2 {
        message Level3 {
          string leaf = 1;
        }
        Level3 three = 1;
      }
      Level2 two = 1;
    }

    message Tree {
      string label = 1;
      repeated Tree children = 2;
    }

    // Everything has a field of every kind.
    message Everything {
      // a text
      string s = 1;
      int32 i32 = 2;
      int64 i64 = 3;
      uint32 u32 = 4;
      uint64 u64 = 5;
      sint32 s32 = 6;
      sint64 s64 = 7;
      fixed32 f32 = 8;
      fixed64 f64 = 9;
      sfixed32 sf32 = 10;
      sfixed64 sf64 = 11;
      double d = 12;
      float f = 13;
      bool b = 14;
      bytes raw = 15;
      Colour colour = 16;
      repeated string tags = 17;
      repeated Level1 levels = 18;
      map<string, string> labels = 19;
      map<string, Level1.Level2.Level3> leaves = 20;
      Level1 nested = 21;
      // one of two
      oneof choice {
        string text = 22;
        int64 number = 23;
      }
      google.protobuf.Timestamp at = 24;
      google.protobuf.Duration took = 25;
      google.protobuf.Struct extra = 26;
      Tree tree = 27;
      repeated google.protobuf.Timestamp times = 28;
      map<string, google.protobuf.Duration> timeouts = 29;
      optional string maybe = 30;
    }
    """
)


@pytest.fixture(scope="module")
def kitchen_set(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """The kitchen proto and its imports, compiled with source info."""
    tmp = tmp_path_factory.mktemp("kitchen")
    (tmp / "kitchen.proto").write_text(KITCHEN_PROTO)
    out = tmp / "kitchen.binpb"
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    args = ["protoc", f"-I{tmp}", f"-I{well_known}", f"--descriptor_set_out={out}"]
    assert protoc.main([*args, "--include_imports", "--include_source_info", "kitchen.proto"]) == 0
    return out.read_bytes()


@pytest.fixture(scope="module")
def kitchen_pool(kitchen_set: bytes) -> descriptor_pool.DescriptorPool:
    return schema.pool_from_schema(kitchen_set)


def fields_of(value: registry_pb2.Value) -> dict[str, registry_pb2.Value]:
    return {child.name: child for child in value.values}


def types_of(value: registry_pb2.Value) -> dict[str, str]:
    return {child.name: child.type for child in value.values}


@pytest.fixture
def everything(kitchen_pool: descriptor_pool.DescriptorPool) -> dict[str, registry_pb2.Value]:
    tree = schema.value_tree(kitchen_pool.FindMessageTypeByName("kitchen.v1.Everything"))
    assert (tree.name, tree.type) == ("Everything", "kitchen.v1.Everything")
    return fields_of(tree)


def test_scalars_are_named_by_their_proto_type(everything: dict[str, registry_pb2.Value]) -> None:
    expected = {
        "s": "string",
        "i32": "int32",
        "i64": "int64",
        "u32": "uint32",
        "u64": "uint64",
        "s32": "sint32",
        "s64": "sint64",
        "f32": "fixed32",
        "f64": "fixed64",
        "sf32": "sfixed32",
        "sf64": "sfixed64",
        "d": "double",
        "f": "float",
        "b": "bool",
        "raw": "bytes",
        "maybe": "string",
    }
    assert {name: everything[name].type for name in expected} == expected
    assert all(not everything[name].values for name in expected)


def test_enum_repeated_and_oneof(everything: dict[str, registry_pb2.Value]) -> None:
    assert everything["colour"].type == "Colour"
    assert everything["tags"].type == "[]string"
    assert (everything["text"].type, everything["number"].type) == ("string", "int64")


def test_repeated_message_has_the_message_fields(everything: dict[str, registry_pb2.Value]) -> None:
    levels = everything["levels"]
    assert levels.type == "[]Level1"
    assert types_of(levels) == {"two": "Level2"}


def test_maps(everything: dict[str, registry_pb2.Value]) -> None:
    assert everything["labels"].type == "map<string,string>"
    assert not everything["labels"].values
    assert everything["leaves"].type == "map<string,Level3>"
    assert types_of(everything["leaves"]) == {"leaf": "string"}
    assert everything["timeouts"].type == "map<string,google.protobuf.Duration>"
    assert not everything["timeouts"].values


def test_nested_three_deep(everything: dict[str, registry_pb2.Value]) -> None:
    nested = everything["nested"]
    assert nested.type == "Level1"
    two = fields_of(nested)["two"]
    three = fields_of(two)["three"]
    assert (two.type, three.type) == ("Level2", "Level3")
    assert types_of(three) == {"leaf": "string"}


def test_well_known_types_are_leaves(everything: dict[str, registry_pb2.Value]) -> None:
    assert everything["at"].type == "google.protobuf.Timestamp"
    assert everything["took"].type == "google.protobuf.Duration"
    assert everything["extra"].type == "google.protobuf.Struct"
    assert everything["times"].type == "[]google.protobuf.Timestamp"
    assert not any(everything[name].values for name in ("at", "took", "extra", "times"))


def test_well_known_type_as_root_is_a_leaf() -> None:
    tree = schema.value_tree(timestamp_pb2.Timestamp.DESCRIPTOR)
    assert tree == registry_pb2.Value(name="Timestamp", type="google.protobuf.Timestamp")


def depth_of(value: registry_pb2.Value) -> int:
    return 1 + max((depth_of(child) for child in value.values), default=0)


@pytest.mark.parametrize("depth", [0, 1, 3, 6])
def test_self_reference_stops_at_depth(kitchen_pool: descriptor_pool.DescriptorPool, depth: int) -> None:
    tree = schema.value_tree(kitchen_pool.FindMessageTypeByName("kitchen.v1.Tree"), depth=depth)
    assert depth_of(tree) == depth + 1
    assert fields_of(tree).get("children", registry_pb2.Value()).type in ("", "[]Tree")


def test_depth_one_lists_fields_without_their_children(kitchen_pool: descriptor_pool.DescriptorPool) -> None:
    tree = schema.value_tree(kitchen_pool.FindMessageTypeByName("kitchen.v1.Level1"), depth=1)
    assert tree.values == [registry_pb2.Value(name="two", type="Level2")]


def test_endpoints_of_the_store_service() -> None:
    found = {e.name: e for e in schema.endpoints(store_pb2.DESCRIPTOR.services_by_name["Store"])}
    assert list(found) == [
        "Store.Read",
        "Store.Write",
        "Store.Delete",
        "Store.List",
        "Store.Databases",
        "Store.Tables",
    ]
    read = found["Store.Read"]
    assert (read.request.name, read.request.type) == ("ReadRequest", "micro.store.v1.ReadRequest")
    assert (read.response.name, read.response.type) == ("ReadResponse", "micro.store.v1.ReadResponse")
    assert types_of(read.request) == {"key": "string", "options": "ReadOptions"}
    records = fields_of(read.response)["records"]
    assert records.type == "[]Record"
    assert fields_of(records)["metadata"].type == "map<string,Field>"
    assert types_of(fields_of(records)["metadata"]) == {"type": "string", "value": "string"}
    assert dict(read.metadata) == {}
    assert dict(found["Store.List"].metadata) == {"stream": "server"}


def test_endpoints_stream_kinds_and_handler_name(kitchen_pool: descriptor_pool.DescriptorPool) -> None:
    service = kitchen_pool.FindServiceByName("kitchen.v1.Sink")
    found = {e.name: dict(e.metadata) for e in schema.endpoints(service, "Kitchen")}
    assert found == {
        "Kitchen.Wash": {},
        "Kitchen.Drain": {"stream": "server"},
        "Kitchen.Fill": {"stream": "client"},
        "Kitchen.Swirl": {"stream": "bidi"},
    }


def test_registry_endpoints_default_to_the_service_name() -> None:
    names = [e.name for e in schema.endpoints(registry_pb2.DESCRIPTOR.services_by_name["Registry"])]
    assert names[0] == "Registry.GetService"
    assert len(names) == 5


def parse_set(data: bytes) -> list[str]:
    return [f.name for f in descriptor_pb2.FileDescriptorSet.FromString(data).file]


def test_file_descriptor_set_puts_dependencies_first_once(
    kitchen_pool: descriptor_pool.DescriptorPool,
) -> None:
    kitchen = kitchen_pool.FindFileByName("kitchen.proto")
    timestamp = kitchen_pool.FindFileByName("google/protobuf/timestamp.proto")
    names = parse_set(schema.file_descriptor_set(timestamp, kitchen, kitchen))
    assert names == [
        "google/protobuf/timestamp.proto",
        "google/protobuf/duration.proto",
        "google/protobuf/struct.proto",
        "kitchen.proto",
    ]


def test_file_descriptor_set_round_trips_through_a_pool() -> None:
    data = schema.file_descriptor_set(registry_pb2.DESCRIPTOR, store_pb2.DESCRIPTOR)
    assert parse_set(data) == ["micro/registry/v1/registry.proto", "micro/store/v1/store.proto"]
    pool = schema.pool_from_schema(data)
    service = pool.FindMessageTypeByName("micro.registry.v1.Service")
    assert service is not registry_pb2.Service.DESCRIPTOR
    assert schema.value_tree(service) == schema.value_tree(registry_pb2.Service.DESCRIPTOR)


def test_pool_from_schema_accepts_any_order(kitchen_set: bytes) -> None:
    fds = descriptor_pb2.FileDescriptorSet.FromString(kitchen_set)
    reversed_set = descriptor_pb2.FileDescriptorSet(file=list(reversed(fds.file)))
    pool = schema.pool_from_schema(reversed_set.SerializeToString())
    at = pool.FindMessageTypeByName("kitchen.v1.Everything").fields_by_name["at"].message_type
    assert at is not None
    assert at.full_name == "google.protobuf.Timestamp"


def test_pool_from_schema_takes_missing_well_known_imports_from_the_default_pool(kitchen_set: bytes) -> None:
    fds = descriptor_pb2.FileDescriptorSet.FromString(kitchen_set)
    only_kitchen = descriptor_pb2.FileDescriptorSet(file=[f for f in fds.file if f.name == "kitchen.proto"])
    pool = schema.pool_from_schema(only_kitchen.SerializeToString())
    assert pool.FindMessageTypeByName("kitchen.v1.Everything").name == "Everything"
    assert pool.FindMessageTypeByName("google.protobuf.Struct").name == "Struct"


def test_pool_from_schema_rejects_a_missing_import() -> None:
    lonely = descriptor_pb2.FileDescriptorProto(name="a.proto", dependency=["nowhere.proto"])
    data = descriptor_pb2.FileDescriptorSet(file=[lonely]).SerializeToString()
    with pytest.raises(BadRequest, match=r"nowhere\.proto"):
        schema.pool_from_schema(data)


def test_pool_from_schema_rejects_garbage() -> None:
    with pytest.raises(BadRequest):
        schema.pool_from_schema(b"\xff\xff\xff")


def test_comments_of_the_building_blocks() -> None:
    found = schema.comments(BLOCKS.read_bytes())
    assert found["micro.store.v1.Store.Read"].startswith("Read returns the record with a key")
    assert found["micro.store.v1.ReadRequest.key"] == "key to read"
    assert found["micro.registry.v1.Registry"] == "Registry tracks running services and their nodes."
    assert found["micro.registry.v1.Service.name"] == 'name of the service, e.g. "helloworld"'
    assert "micro.registry.v1.Options" not in found


def test_comments_of_nested_enums_oneofs_and_services(kitchen_set: bytes) -> None:
    found = schema.comments(kitchen_set)
    assert found["kitchen.v1.Sink"] == "Sink does everything."
    assert found["kitchen.v1.Sink.Wash"] == "Wash one dish."
    assert found["kitchen.v1.Everything"] == "Everything has a field of every kind."
    assert found["kitchen.v1.Everything.s"] == "a text"
    assert found["kitchen.v1.Everything.choice"] == "one of two"
    assert found["kitchen.v1.Colour.RED"] == "a warm one"
    assert "kitchen.v1.Sink.Drain" not in found


def test_comments_without_source_info_are_empty() -> None:
    assert schema.comments(schema.file_descriptor_set(registry_pb2.DESCRIPTOR)) == {}
