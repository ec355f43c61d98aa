"""The schema cache on disk, and descriptor pools read from cached schemas."""

from __future__ import annotations

import json

import pytest
from google.protobuf import descriptor_pb2

from micro.errors import BadRequest
from micro.proto import registry_pb2
from micro.schema import file_descriptor_set
from micro_cli.dynamic_schema import NoSchema, Schema, pool_from_set
from micro_cli.schema_cache import CachedEndpoint, CachedService, SchemaCache


def entry(name: str = "kitchen", version: str = "latest", namespace: str = "micro") -> CachedService:
    endpoint = CachedEndpoint(
        "Kitchen.Count", "kitchen.CountRequest", "kitchen.CountResponse", {"stream": "server"}
    )
    return CachedService(name, version, namespace, (endpoint,), b"\x0a\x00")


@pytest.fixture
def cache(tmp_path):
    return SchemaCache(tmp_path / "cache")


def test_a_saved_entry_loads_back(cache):
    cache.save("local", "micro", [entry()])
    loaded = cache.load("local", "micro", "kitchen")
    assert loaded == entry()
    assert loaded is not None and loaded.endpoints[0].stream == "server"


def test_the_first_listed_version_is_the_one_loaded(cache):
    cache.save("local", "micro", [entry(version="v2"), entry(version="v1")])
    assert cache.load("local", "micro", "kitchen").version == "v2"
    cache.save("local", "micro", [entry(version="v1")])
    assert cache.load("local", "micro", "kitchen").version == "v1"
    assert len(list(cache._dir("local", "micro", "kitchen").iterdir())) == 1  # v2 is gone


def test_find_falls_back_to_the_building_blocks(cache):
    cache.save("local", "micro", [entry("store")])
    assert cache.find("local", "team", "store").name == "store"
    assert cache.find("local", "team", "kitchen") is None
    assert cache.find("prod", "micro", "store") is None  # another environment, another cache


def test_forget_and_service_names(cache):
    cache.save("local", "micro", [entry("store")])
    cache.save(
        "local", "team", [entry("kitchen", namespace="team"), entry("kitchen", "v2", namespace="team")]
    )
    cache.save("local", "team", [entry("odd/name:1", namespace="team")])
    assert cache.service_names("local", ["team", "micro"]) == ["kitchen", "odd/name:1", "store"]
    cache.forget("local", "team", "kitchen")
    assert cache.service_names("local", ["team"]) == ["odd/name:1"]


def test_a_corrupt_file_is_a_miss(cache):
    cache.save("local", "micro", [entry()])
    [path] = cache._dir("local", "micro", "kitchen").iterdir()
    path.write_text("{not json")
    assert cache.load("local", "micro", "kitchen") is None


def test_an_unchanged_entry_is_not_rewritten(cache):
    cache.save("local", "micro", [entry()])
    [path] = cache._dir("local", "micro", "kitchen").iterdir()
    before = path.stat().st_mtime_ns
    path.touch()
    touched = path.stat().st_mtime_ns
    cache.save("local", "micro", [entry()])
    assert path.stat().st_mtime_ns == touched and touched >= before


def test_an_unwritable_cache_is_skipped(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")
    cache = SchemaCache(blocked / "cache")
    cache.save("local", "micro", [entry()])  # does not raise
    assert cache.load("local", "micro", "kitchen") is None


def test_cache_files_are_private(cache):
    cache.save("local", "micro", [entry()])
    [path] = cache._dir("local", "micro", "kitchen").iterdir()
    assert path.stat().st_mode & 0o077 == 0
    assert json.loads(path.read_text())["name"] == "kitchen"


def test_an_entry_from_the_registry(kitchen_pb2):
    service = registry_pb2.Service(
        name="kitchen",
        version="1",
        endpoints=[
            registry_pb2.Endpoint(
                name="Kitchen.Echo",
                request=registry_pb2.Value(type="kitchen.Order"),
                response=registry_pb2.Value(type="kitchen.Order"),
            )
        ],
        schema=file_descriptor_set(kitchen_pb2.DESCRIPTOR),
    )
    cached = CachedService.from_registry(service, "team")
    assert (cached.namespace, cached.endpoints[0].request, cached.endpoints[0].stream) == (
        "team",
        "kitchen.Order",
        "",
    )
    assert CachedService.from_json(cached.to_json()) == cached


# -- descriptor pools ------------------------------------------------------------------------------


def test_a_pool_from_a_set_holding_its_imports(kitchen_pb2):
    pool = pool_from_set(file_descriptor_set(kitchen_pb2.DESCRIPTOR))
    order = pool.FindMessageTypeByName("kitchen.Order")
    assert order.fields_by_name["placed"].message_type.full_name == "google.protobuf.Timestamp"
    assert [m.name for m in pool.FindServiceByName("kitchen.Kitchen").methods] == [
        "Echo",
        "Count",
        "Sum",
        "Chat",
    ]


def test_files_may_come_in_any_order(kitchen_pb2):
    data = descriptor_pb2.FileDescriptorSet.FromString(file_descriptor_set(kitchen_pb2.DESCRIPTOR))
    shuffled = descriptor_pb2.FileDescriptorSet(file=list(reversed(data.file)))
    assert pool_from_set(shuffled.SerializeToString()).FindMessageTypeByName("kitchen.Geo")


def test_a_set_missing_an_import_takes_it_from_the_default_pool(kitchen_pb2):
    data = descriptor_pb2.FileDescriptorSet.FromString(file_descriptor_set(kitchen_pb2.DESCRIPTOR))
    alone = descriptor_pb2.FileDescriptorSet(file=[f for f in data.file if f.name == "kitchen.proto"])
    assert pool_from_set(alone.SerializeToString()).FindMessageTypeByName("kitchen.Order")


def test_a_malformed_set_is_a_bad_request():
    with pytest.raises(BadRequest):
        pool_from_set(b"\x0a\x05abc")


def test_an_endpoint_missing_from_the_schema_has_no_flags(kitchen_pb2):
    service = CachedService(
        "kitchen",
        "latest",
        "micro",
        (
            CachedEndpoint("Debug.Health", "micro.debug.v1.HealthRequest"),
            CachedEndpoint("Kitchen.Echo", "kitchen.Order"),
        ),
        file_descriptor_set(kitchen_pb2.DESCRIPTOR),
    )
    schema = Schema(service)
    assert schema.request(service.endpoints[1]).full_name == "kitchen.Order"
    with pytest.raises(NoSchema, match=r"registered no schema for Debug\.Health") as raised:
        schema.request(service.endpoints[0])
    assert raised.value.exit_code == 4
