"""Explicit routes: google.api.http templates, Micro's endpoint metadata, HttpRule options."""

from __future__ import annotations

import pytest

from micro.proto import registry_pb2
from micro_daemon.gateway.rules import _types, compile_template, endpoint_rules


@pytest.mark.parametrize(
    ("template", "path", "captures"),
    [
        ("/v1/orders/{id}", "/v1/orders/42", {("id",): "42"}),
        ("/v1/orders/{id}", "/v1/orders/42/items", None),
        (
            "/v1/orders/{order.id}/items/{item}",
            "/v1/orders/1/items/2",
            {("order", "id"): "1", ("item",): "2"},
        ),
        ("/v1/{name=shelves/*/books/*}", "/v1/shelves/a/books/b", {("name",): "shelves/a/books/b"}),
        ("/v1/{name=files/**}", "/v1/files/a/b/c", {("name",): "files/a/b/c"}),
        ("/v1/orders/{id}:cancel", "/v1/orders/7:cancel", {("id",): "7"}),
        ("/v1/orders/{id}:cancel", "/v1/orders/7", None),
        ("/v1/*/x", "/v1/any/x", {}),
        ("^/re/(?P<id>[0-9]+)$", "/re/12", {("id",): "12"}),
        ("^/re/(?P<customer__email>[^/]+)$", "/re/a@b", {("customer", "email"): "a@b"}),
    ],
)
def test_templates(template: str, path: str, captures: dict[tuple[str, ...], str] | None) -> None:
    pattern, fields = compile_template(template)
    found = pattern.fullmatch(path)
    if captures is None:
        assert found is None
    else:
        assert found is not None
        assert dict(zip(fields, found.groups(), strict=True)) == captures


@pytest.mark.parametrize("template", ["v1/no-slash", "/v1/{id", "/v1/{bad-name}", "/v1/a*b", "^/(unnamed)$"])
def test_invalid_templates(template: str) -> None:
    with pytest.raises(ValueError):
        compile_template(template)


def test_metadata_routes_as_micro_encodes_them() -> None:
    endpoint = registry_pb2.Endpoint(
        name="Orders.Create", metadata={"path": "/orders, /v2/orders", "method": "post,PUT", "body": "order"}
    )
    rules = endpoint_rules(endpoint)
    assert {(r.method, r.template, r.body, r.endpoint) for r in rules} == {
        (m, t, "order", "Orders.Create") for m in ("POST", "PUT") for t in ("/orders", "/v2/orders")
    }
    assert rules[0].match("GET", "/orders") is None
    assert rules[0].match("POST", "/orders") == ()


def test_invalid_metadata_routes_are_ignored() -> None:
    assert endpoint_rules(registry_pb2.Endpoint(name="A.B", metadata={"path": "/x/{oops"})) == []


def test_http_rule_options() -> None:
    rule_type, options_type = _types()
    rule = rule_type(get="/v1/orders/{id}")
    rule.additional_bindings.add(post="/v1/orders/{id}:touch", body="*")
    rule.additional_bindings.add(custom={"kind": "PURGE", "path": "/v1/orders"})
    options = options_type(http=rule).SerializeToString()
    rules = endpoint_rules(
        registry_pb2.Endpoint(name="Orders.Get"), b"\x10\x01" + options
    )  # with another option
    assert [(r.method, r.template, r.body) for r in rules] == [
        ("GET", "/v1/orders/{id}", ""),
        ("POST", "/v1/orders/{id}:touch", "*"),
        ("PURGE", "/v1/orders", ""),
    ]
    assert rules[0].match("GET", "/v1/orders/9") == ((("id",), "9"),)


def test_options_without_http_rule() -> None:
    assert endpoint_rules(registry_pb2.Endpoint(name="A.B"), b"\x10\x01") == []
    assert endpoint_rules(registry_pb2.Endpoint(name="A.B"), b"\xff\xff") == []


def test_specific_routes_sort_first() -> None:
    endpoint = registry_pb2.Endpoint(name="A.B", metadata={"path": "/v1/{x},/v1/orders,/v1/orders/{id}"})
    ordered = sorted(endpoint_rules(endpoint), key=lambda r: r.weight)
    assert [r.template for r in ordered] == ["/v1/orders/{id}", "/v1/orders", "/v1/{x}"]
