"""Explicit HTTP routes of endpoints, which take precedence over the path resolver.

Two sources declare them:

* ``google.api.http`` options on a method of the registered schema (the
  ``HttpRule`` extension, field 72295728 of ``MethodOptions``), with its
  ``additional_bindings``: ``get: "/v1/orders/{id}"``, ``body: "*"``;
* registry endpoint metadata, as Micro's API does: ``path`` (comma-separated
  templates, or ``^...$`` regular expressions with named groups), ``method``
  (comma-separated HTTP methods, any if absent) and ``body`` (default ``*``).

Path templates follow google.api.http: ``*`` is one segment, ``**`` the rest
of the path, ``{field}`` or ``{field.sub=pattern}`` captures into a request
field, ``:verb`` ends the path. ``HttpRule`` is defined here rather than
imported, so no copy of ``google/api/*.proto`` has to ship.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

from micro.proto import registry_pb2

__all__ = ["Rule", "compile_template", "endpoint_rules"]

log = logging.getLogger("micro.api")

HTTP_RULE_FIELD = 72295728  # google.api.http on google.protobuf.MethodOptions

FieldPath = tuple[str, ...]
Captures = tuple[tuple[FieldPath, str], ...]


@dataclass(frozen=True)
class Rule:
    """One explicit route: an HTTP method (``""`` for any) and a path pattern, to an endpoint."""

    method: str
    template: str
    pattern: re.Pattern[str]
    fields: tuple[FieldPath, ...]
    body: str
    endpoint: str

    @property
    def weight(self) -> tuple[int, int]:
        """Sort key: literal templates before patterns, longer before shorter."""
        literal = len(re.sub(r"\{[^}]*\}|\*", "", self.template))
        return (-literal, -len(self.template))

    def match(self, method: str, path: str) -> Captures | None:
        """The captured field values if ``method`` and ``path`` match, else ``None``."""
        if self.method and self.method != method:
            return None
        found = self.pattern.fullmatch(path)
        if found is None:
            return None
        return tuple((field, value) for field, value in zip(self.fields, found.groups(), strict=True))


def endpoint_rules(endpoint: registry_pb2.Endpoint, options: bytes = b"") -> list[Rule]:
    """The rules ``endpoint`` declares in its metadata and in its method's serialized options."""
    rules = list(_metadata_rules(endpoint))
    if options:
        rules.extend(_option_rules(endpoint.name, options))
    return rules


def compile_template(template: str) -> tuple[re.Pattern[str], tuple[FieldPath, ...]]:
    """A google.api.http path template (or a ``^...$`` regex) as a regex and its captured fields."""
    if template.startswith("^"):
        pattern = re.compile(template)
        names = sorted(pattern.groupindex.items(), key=lambda item: item[1])
        if pattern.groups != len(names):
            raise ValueError("every group of a route regex must be named: (?P<field>...)")
        return pattern, tuple(tuple(name.split("__")) for name, _ in names)
    if not template.startswith("/"):
        raise ValueError("a path template starts with '/'")
    path, verb = _split_verb(template)
    fields: list[FieldPath] = []
    parts = [_segment_regex(segment, fields) for segment in _segments(path[1:])]
    regex = "/" + "/".join(parts) + (":" + re.escape(verb) if verb else "")
    return re.compile(regex), tuple(fields)


def _metadata_rules(endpoint: registry_pb2.Endpoint) -> Iterator[Rule]:
    metadata = endpoint.metadata
    templates = [t.strip() for t in metadata.get("path", "").split(",") if t.strip()]
    methods = [m.strip().upper() for m in metadata.get("method", "").split(",") if m.strip()] or [""]
    body = metadata.get("body", "*")
    for template in templates:
        for method in methods:
            rule = _rule(method, template, body, endpoint.name)
            if rule is not None:
                yield rule


def _option_rules(endpoint: str, options: bytes) -> Iterator[Rule]:
    _, options_type = _types()
    try:
        parsed: Any = options_type.FromString(options)
    except DecodeError:
        return
    if not parsed.HasField("http"):
        return
    for http in (parsed.http, *parsed.http.additional_bindings):
        kind = http.WhichOneof("pattern")
        if kind is None:
            continue
        if kind == "custom":
            method, template = http.custom.kind.upper(), http.custom.path
        else:
            method, template = kind.upper(), getattr(http, kind)
        rule = _rule("" if method == "*" else method, template, http.body, endpoint)
        if rule is not None:
            yield rule


def _rule(method: str, template: str, body: str, endpoint: str) -> Rule | None:
    try:
        pattern, fields = compile_template(template)
    except (ValueError, re.error) as exc:
        log.warning("ignoring the route %r of %s: %s", template, endpoint, exc)
        return None
    return Rule(method, template, pattern, fields, body, endpoint)


def _split_verb(template: str) -> tuple[str, str]:
    colon = template.rfind(":")
    if colon > template.rfind("/") and colon > template.rfind("}"):
        return template[:colon], template[colon + 1 :]
    return template, ""


def _segments(path: str) -> list[str]:
    """Split on '/' outside braces: ``a/{name=x/*}/b`` is three segments."""
    segments, depth, start = [], 0, 0
    for i, char in enumerate(path):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif char == "/" and depth == 0:
            segments.append(path[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError("unbalanced braces")
    segments.append(path[start:])
    return segments


def _segment_regex(segment: str, fields: list[FieldPath]) -> str:
    if segment.startswith("{") and segment.endswith("}"):
        name, _, sub = segment[1:-1].partition("=")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", name):
            raise ValueError(f"invalid field path {name!r}")
        fields.append(tuple(name.split(".")))
        inner = "/".join(_plain_regex(s) for s in sub.split("/")) if sub else "[^/]+"
        return f"({inner})"
    return _plain_regex(segment)


def _plain_regex(segment: str) -> str:
    if segment == "*":
        return "[^/]+"
    if segment == "**":
        return ".*"
    if not segment or any(c in segment for c in "{}*"):
        raise ValueError(f"invalid path segment {segment!r}")
    return re.escape(segment)


@cache
def _types() -> tuple[type[Message], type[Message]]:
    """``HttpRule`` and a ``MethodOptions`` stand-in holding only the ``http`` field, in a private pool."""
    f = descriptor_pb2.FieldDescriptorProto
    string, message, optional, repeated = f.TYPE_STRING, f.TYPE_MESSAGE, f.LABEL_OPTIONAL, f.LABEL_REPEATED
    file = descriptor_pb2.FileDescriptorProto(
        name="micro/gateway/http_rule.proto", package="micro.gateway", syntax="proto3"
    )
    file.message_type.add(
        name="CustomHttpPattern",
        field=[f(name="kind", number=1, type=string, label=optional), f(name="path", number=2, type=string)],
    )
    rule = file.message_type.add(name="HttpRule")
    for number, name in ((1, "selector"), (7, "body"), (12, "response_body")):
        rule.field.add(name=name, number=number, type=string, label=optional)
    rule.oneof_decl.add(name="pattern")
    for number, name in ((2, "get"), (3, "put"), (4, "post"), (5, "delete"), (6, "patch")):
        rule.field.add(name=name, number=number, type=string, label=optional, oneof_index=0)
    rule.field.add(
        name="custom",
        number=8,
        type=message,
        label=optional,
        type_name=".micro.gateway.CustomHttpPattern",
        oneof_index=0,
    )
    rule.field.add(
        name="additional_bindings",
        number=11,
        type=message,
        label=repeated,
        type_name=".micro.gateway.HttpRule",
    )
    file.message_type.add(name="MethodOptions").field.add(
        name="http", number=HTTP_RULE_FIELD, type=message, label=optional, type_name=".micro.gateway.HttpRule"
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("micro.gateway.HttpRule")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("micro.gateway.MethodOptions")),
    )
