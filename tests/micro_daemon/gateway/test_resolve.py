"""Micro's path resolution table, row by row."""

from __future__ import annotations

import pytest

from micro_daemon.gateway.resolve import endpoint_key, resolve


@pytest.mark.parametrize(
    ("path", "service", "endpoint"),
    [
        # the table of Micro v3's "micro" resolver
        ("/helloworld", "helloworld", "Helloworld.Call"),
        ("/helloworld/call", "helloworld", "Helloworld.Call"),
        ("/foo/bar", "foo", "Foo.Bar"),
        ("/foo/bar/baz", "foo", "Bar.Baz"),
        ("/foo/bar/baz-xyz", "foo", "Bar.BazXyz"),
        ("/foo/bar/baz/cat", "foo.bar", "Baz.Cat"),
        ("/foo/bar/baz/cat/car", "foo.bar.baz", "Cat.Car"),
        ("/v1/foo/bar", "v1.foo", "Foo.Bar"),
        ("/v1/foo/bar/baz", "v1.foo", "Bar.Baz"),
        # and what follows from its rules
        ("/v1/foo", "v1", "V1.Foo"),
        ("/v12/foo/bar", "v12.foo", "Foo.Bar"),
        ("/version/foo/bar", "version", "Foo.Bar"),
        ("/store/read", "store", "Store.Read"),
        ("/store/debug/health", "store", "Debug.Health"),
        ("/registry/list-services", "registry", "Registry.ListServices"),
        ("/foo/bar-baz-qux", "foo", "Foo.BarBazQux"),
        ("/foo/Bar", "foo", "Foo.Bar"),
        ("/helloworld/", "helloworld", "Helloworld.Call"),
        ("//foo//bar/", "foo", "Foo.Bar"),
        ("/./foo/./bar", "foo", "Foo.Bar"),
        ("/", "", ""),
        ("", "", ""),
    ],
)
def test_the_resolution_table(path: str, service: str, endpoint: str) -> None:
    assert resolve(path) == (service, endpoint)


@pytest.mark.parametrize(
    ("a", "b"),
    [("Helloworld.Call", "helloworld.call"), ("Registry.ListServices", "registry.list-services")],
)
def test_endpoints_match_without_case_or_hyphens(a: str, b: str) -> None:
    assert endpoint_key(a) == endpoint_key(b)
