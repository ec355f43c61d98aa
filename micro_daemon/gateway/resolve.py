"""Micro's default ("micro") resolver: an HTTP path to a service name and an endpoint.

==========================  ===========  ==============
path                        service      endpoint
==========================  ===========  ==============
``/helloworld``             helloworld   Helloworld.Call
``/helloworld/call``        helloworld   Helloworld.Call
``/foo/bar``                foo          Foo.Bar
``/foo/bar/baz``            foo          Bar.Baz
``/foo/bar/baz-xyz``        foo          Bar.BazXyz
``/foo/bar/baz/cat``        foo.bar      Baz.Cat
``/v1/foo/bar``             v1.foo       Foo.Bar
``/v1/foo/bar/baz``         v1.foo       Bar.Baz
==========================  ===========  ==============

One part names the service and calls ``<Name>.Call``; two parts name the
service and both parts the endpoint; three parts starting with ``v<N>`` are a
versioned service; otherwise the last two parts are the endpoint and the rest,
joined with dots, the service. Hyphenated parts become CamelCase.
"""

from __future__ import annotations

import re

__all__ = ["endpoint_key", "resolve"]

_VERSION = re.compile(r"v[0-9]+")


def resolve(path: str) -> tuple[str, str]:
    """The ``(service, endpoint)`` a cleaned URL path names; ``("", "")`` for ``/``."""
    parts = [p for p in path.split("/") if p and p != "."]
    if not parts:
        return "", ""
    if len(parts) == 1:
        return parts[0], _method_name([parts[0], "Call"])
    if len(parts) == 2:
        return parts[0], _method_name(parts)
    if len(parts) == 3 and _VERSION.fullmatch(parts[0]):
        return ".".join(parts[:2]), _method_name(parts[1:])
    return ".".join(parts[:-2]), _method_name(parts[-2:])


def endpoint_key(endpoint: str) -> str:
    """What endpoint names are matched by: case and hyphens do not count."""
    return endpoint.replace("-", "").lower()


def _method_name(parts: list[str]) -> str:
    return ".".join(_camel(part) for part in parts)


def _camel(part: str) -> str:
    return "".join(word[:1].upper() + word[1:] for word in part.split("-"))
