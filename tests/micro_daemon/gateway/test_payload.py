"""Query strings and form fields as request JSON, typed by the request message."""

from __future__ import annotations

from types import ModuleType
from urllib.parse import parse_qsl

from google.protobuf import json_format

from micro_daemon.gateway.payload import fields_json, merge, urlencoded_fields


def test_dotted_keys_nest_and_repeated_keys_are_lists() -> None:
    fields = fields_json(parse_qsl("customer.email=x&tags=a&tags=b&a.b.c=1"), None)
    assert fields == {"customer": {"email": "x"}, "tags": ["a", "b"], "a": {"b": {"c": "1"}}}


def test_fields_are_typed_by_the_message(kitchen_pb2: ModuleType) -> None:
    query = (
        "name=n&count=3&urgent=true&tags=one&seats=4&labels.k=v&counts.x=2&customer.address.city=Paris"
        "&customer.address.geo.lat=1.5&sizes=SMALL&priority=7&comment=c&placed=2024-01-02T03:04:05Z"
    )
    fields = fields_json(parse_qsl(query), kitchen_pb2.Order.DESCRIPTOR)
    assert fields["urgent"] is True
    assert fields["tags"] == ["one"]  # a repeated field is a list even with one value
    order = json_format.ParseDict(fields, kitchen_pb2.Order())
    assert (order.name, order.count, order.urgent, list(order.tags), list(order.seats)) == (
        "n",
        3,
        True,
        ["one"],
        [4],
    )
    assert dict(order.labels) == {"k": "v"}
    assert dict(order.counts) == {"x": 2}
    assert order.customer.address.city == "Paris"
    assert order.customer.address.geo.lat == 1.5
    assert list(order.sizes) == [kitchen_pb2.SMALL]
    assert order.priority == 7
    assert order.comment.value == "c"
    assert order.placed.seconds > 0


def test_boolean_spellings(kitchen_pb2: ModuleType) -> None:
    descriptor = kitchen_pb2.Order.DESCRIPTOR
    for text, value in [
        ("true", True),
        ("1", True),
        ("", True),
        ("false", False),
        ("0", False),
        ("off", False),
    ]:
        assert fields_json([("urgent", text)], descriptor) == {"urgent": value}
    assert fields_json([("urgent", "maybe")], descriptor) == {"urgent": "maybe"}  # the parser says why


def test_json_names_are_accepted(kitchen_pb2: ModuleType) -> None:
    assert fields_json([("urgent", "true")], kitchen_pb2.Order.DESCRIPTOR) == {"urgent": True}
    assert fields_json([("customer.email", "e")], kitchen_pb2.Order.DESCRIPTOR) == {
        "customer": {"email": "e"}
    }


def test_merge_is_deep_and_the_second_wins() -> None:
    base = {"a": {"b": 1, "c": 2}, "d": [1], "e": "x"}
    assert merge(base, {"a": {"b": 9}, "d": [2], "f": True}) == {
        "a": {"b": 9, "c": 2},
        "d": [2],
        "e": "x",
        "f": True,
    }


def test_urlencoded_json_is_json() -> None:
    assert urlencoded_fields(b'  {"name": "x"}', None) is None
    assert urlencoded_fields(b"name=x&name=y&empty=", None) == {"name": ["x", "y"], "empty": ""}
