"""OpenAPI 3.1 documents of registered services, built from their protobuf schema.

The HTTP gateway serves ``GET /openapi.json`` (every service of a namespace)
and ``GET /<service>/openapi.json`` from ``openapi_document``, and routes calls
by the same ``endpoint_path`` convention. Unary and server-streaming endpoints
are ``POST`` with a JSON body (server streams answer with server-sent events);
client-streaming and bidirectional endpoints are a WebSocket opened with ``GET``.

Messages and enums become JSON Schemas under ``components/schemas``, named by
their full proto name and following the proto3 JSON mapping, with proto field
names (``snake_case``) as property names. Proto comments become descriptions.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.descriptor_pool import DescriptorPool

from micro import __version__
from micro.errors import BadRequest
from micro.proto import registry_pb2
from micro.schema import comments, pool_from_schema

__all__ = ["endpoint_path", "openapi_document"]

_Schema = dict[str, Any]

_SCHEMAS = "#/components/schemas/"
_VERSION = re.compile(r"v[0-9]+")
_INT32: _Schema = {"type": "integer", "format": "int32", "minimum": -(2**31), "maximum": 2**31 - 1}
_UINT32: _Schema = {"type": "integer", "format": "uint32", "minimum": 0, "maximum": 2**32 - 1}
# proto3 JSON writes 64-bit integers as strings and reads strings or numbers.
_INT64: _Schema = {"type": ["string", "integer"], "format": "int64", "pattern": "^-?[0-9]+$"}
_UINT64: _Schema = {"type": ["string", "integer"], "format": "uint64", "pattern": "^[0-9]+$", "minimum": 0}
_BYTES: _Schema = {"type": "string", "contentEncoding": "base64"}
_T = FieldDescriptor
_SCALARS: dict[int, _Schema] = {
    **dict.fromkeys((_T.TYPE_INT32, _T.TYPE_SINT32, _T.TYPE_SFIXED32), _INT32),
    **dict.fromkeys((_T.TYPE_UINT32, _T.TYPE_FIXED32), _UINT32),
    **dict.fromkeys((_T.TYPE_INT64, _T.TYPE_SINT64, _T.TYPE_SFIXED64), _INT64),
    **dict.fromkeys((_T.TYPE_UINT64, _T.TYPE_FIXED64), _UINT64),
    _T.TYPE_DOUBLE: {"type": "number", "format": "double"},
    _T.TYPE_FLOAT: {"type": "number", "format": "float"},
    _T.TYPE_BOOL: {"type": "boolean"},
    _T.TYPE_STRING: {"type": "string"},
    _T.TYPE_BYTES: _BYTES,
}


def _nullable(scalar: _Schema, what: str) -> _Schema:
    types = scalar["type"] if isinstance(scalar["type"], list) else [scalar["type"]]
    return {**scalar, "type": [*types, "null"], "description": f"{what}, or null."}


_WELL_KNOWN: dict[str, _Schema] = {
    "google.protobuf.Timestamp": {
        "type": "string",
        "format": "date-time",
        "description": "An RFC 3339 time, e.g. `2017-01-15T01:30:15.01Z`.",
    },
    "google.protobuf.Duration": {
        "type": "string",
        "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$",
        "description": "Seconds with an `s` suffix, e.g. `1.5s`.",
    },
    "google.protobuf.Struct": {"type": "object", "description": "Any JSON object."},
    "google.protobuf.Value": {"description": "Any JSON value."},
    "google.protobuf.ListValue": {"type": "array", "description": "Any JSON array."},
    "google.protobuf.NullValue": {"type": "null"},
    "google.protobuf.Empty": {"type": "object", "description": "An empty object."},
    "google.protobuf.FieldMask": {
        "type": "string",
        "description": "Comma-separated field paths in lowerCamelCase, e.g. `user.displayName,photo`.",
    },
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string", "description": "The type URL of the packed message."}},
        "required": ["@type"],
        "description": "A message of any type: `@type` and the fields of the message.",
    },
    "google.protobuf.DoubleValue": _nullable(_SCALARS[_T.TYPE_DOUBLE], "A double"),
    "google.protobuf.FloatValue": _nullable(_SCALARS[_T.TYPE_FLOAT], "A float"),
    "google.protobuf.Int64Value": _nullable(_INT64, "An int64"),
    "google.protobuf.UInt64Value": _nullable(_UINT64, "A uint64"),
    "google.protobuf.Int32Value": _nullable(_INT32, "An int32"),
    "google.protobuf.UInt32Value": _nullable(_UINT32, "A uint32"),
    "google.protobuf.BoolValue": _nullable(_SCALARS[_T.TYPE_BOOL], "A bool"),
    "google.protobuf.StringValue": _nullable(_SCALARS[_T.TYPE_STRING], "A string"),
    "google.protobuf.BytesValue": _nullable(_BYTES, "Base64 bytes"),
}

_ERROR: _Schema = {
    "type": "object",
    "description": "Micro's error, as every service and the gateway return it.",
    "properties": {
        "id": {"type": "string", "description": "who raised the error, e.g. a service name"},
        "code": {"type": "integer", "description": "the HTTP status code"},
        "detail": {"type": "string", "description": "what went wrong"},
        "status": {"type": "string", "description": "the HTTP reason phrase, e.g. `Not Found`"},
    },
    "required": ["id", "code", "detail", "status"],
}
_ERRORS = {
    "400": "BadRequest",
    "404": "NotFound",
    "500": "InternalServerError",
    "502": "BadGateway",
    "503": "ServiceUnavailable",
    "default": "Error",
}
_NAMESPACE: _Schema = {
    "name": "Micro-Namespace",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "default": "micro"},
    "description": "The namespace the service runs in.",
}


def endpoint_path(service: str, endpoint: str) -> str:
    """The HTTP path of ``endpoint`` (``Handler.Method``) of ``service``, as Micro's API resolves it.

    A dotted service name becomes path segments (``v1.foo`` → ``/v1/foo``).
    The handler is left out when it is named as the (last part of the)
    service, ignoring case and ``-``, and the path stays unambiguous: for a
    one-part service or a ``v<N>.<name>`` one. Handler and method are written
    in lower case, words joined by ``-``: ``endpoint_path("foo", "Bar.BazXyz")
    == "/foo/bar/baz-xyz"``, ``endpoint_path("store", "Store.Read") == "/store/read"``.
    Raises ``micro.errors.BadRequest`` if ``endpoint`` is not ``Handler.Method``.
    """
    handler, dot, method = endpoint.partition(".")
    if not dot or not handler or not method or "." in method:
        raise BadRequest(f"endpoint {endpoint!r} is not of the form Handler.Method, e.g. Store.Read")
    parts = service.split(".")
    short = len(parts) == 1 or (len(parts) == 2 and _VERSION.fullmatch(parts[0]) is not None)
    if short and _squash(handler) == _squash(parts[-1]):
        return "/" + "/".join([*parts, _kebab(method)])
    return "/" + "/".join([*parts, _kebab(handler), _kebab(method)])


def openapi_document(
    services: Sequence[registry_pb2.Service],
    *,
    title: str = "micro",
    version: str | None = None,
    server_url: str | None = None,
) -> dict[str, Any]:
    """An OpenAPI 3.1 document of the endpoints of ``services``, ready for ``json.dumps``.

    ``version`` defaults to the version of a lone service, else micro's own.
    An entry whose ``schema`` is missing or unreadable still gets its paths,
    with untyped JSON objects as bodies. When several entries (versions) share
    a name, the first one's endpoints and message schemas win.
    """
    builder = _Builder()
    for service in services:
        builder.add_service(service)
    lone = services[0].version if len(services) == 1 else ""
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version or lone or __version__},
    }
    if server_url is not None:
        document["servers"] = [{"url": server_url}]
    return copy.deepcopy(  # the tables above are shared: the caller gets a document of its own
        {
            **document,
            "tags": list(builder.tags.values()),
            "paths": builder.paths,
            "components": {
                "schemas": builder.schemas,
                "responses": {name: _error_response(code) for code, name in _ERRORS.items()},
                "parameters": {"Namespace": _NAMESPACE},
                "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            },
            "security": [{}, {"bearer": []}],
        }
    )


@dataclass
class _Protos:
    """One registry entry's schema: its descriptor pool and its comments by full name."""

    pool: DescriptorPool | None = None
    notes: dict[str, str] = field(default_factory=dict)
    methods: dict[str, list[MethodDescriptor]] = field(default_factory=dict)

    @classmethod
    def load(cls, schema: bytes) -> _Protos:
        try:
            pool = pool_from_schema(schema)
        except BadRequest:
            return cls()  # one unreadable entry must not take the whole document down
        protos = cls(pool, comments(schema))
        for file in descriptor_pb2.FileDescriptorSet.FromString(schema).file:
            for service in pool.FindFileByName(file.name).services_by_name.values():
                for method in service.methods:
                    protos.methods.setdefault(method.name, []).append(method)
        return protos

    def method(self, handler: str, name: str, request_type: str) -> MethodDescriptor | None:
        def rank(method: MethodDescriptor) -> tuple[bool, bool]:
            return method.containing_service.name == handler, method.input_type.full_name == request_type

        best = max(self.methods.get(name, []), key=rank, default=None)
        return best if best is not None and any(rank(best)) else None

    def message(self, full_name: str) -> Descriptor | None:
        try:
            return self.pool.FindMessageTypeByName(full_name) if self.pool and full_name else None
        except KeyError:
            return None


class _Builder:
    def __init__(self) -> None:
        self.paths: dict[str, Any] = {}
        self.tags: dict[str, _Schema] = {}
        self.schemas: dict[str, _Schema] = {"Error": _ERROR}
        self._notes: dict[str, str] = {}

    def add_service(self, service: registry_pb2.Service) -> None:
        protos = _Protos.load(service.schema) if service.schema else _Protos()
        self._notes = protos.notes
        tag = self.tags.setdefault(service.name, {"name": service.name})
        for endpoint in service.endpoints:
            try:
                path = endpoint_path(service.name, endpoint.name)
            except BadRequest:
                continue  # not a Micro endpoint: nothing the gateway could route to
            if path in self.paths:
                continue  # another version of the service documented it first
            handler, _, name = endpoint.name.partition(".")
            method = protos.method(handler, name, endpoint.request.type)
            note = self._notes.get(method.containing_service.full_name, "") if method else ""
            if note and "description" not in tag:
                tag["description"] = note
            self.paths[path] = self._operation(service.name, endpoint, method, protos)

    def _operation(
        self, service: str, endpoint: registry_pb2.Endpoint, method: MethodDescriptor | None, protos: _Protos
    ) -> dict[str, Any]:
        request = method.input_type if method else protos.message(endpoint.request.type)
        response = method.output_type if method else protos.message(endpoint.response.type)
        note = self._notes.get(method.full_name, "") if method else ""
        operation: dict[str, Any] = {
            "operationId": f"{service}.{endpoint.name}",
            "tags": [service],
            "summary": note.splitlines()[0] if note else endpoint.name,
            **({"description": note} if note else {}),
            "parameters": [{"$ref": "#/components/parameters/Namespace"}],
        }
        errors = {code: {"$ref": f"#/components/responses/{name}"} for code, name in _ERRORS.items()}
        stream = endpoint.metadata.get("stream") or _stream_kind(method)
        if stream:
            operation["x-micro-stream"] = stream
        if stream in ("client", "bidi"):
            operation["x-micro-websocket"] = {"send": self._body(request), "receive": self._body(response)}
            switching = {"description": _websocket_text(stream, request, response)}
            return {"get": {**operation, "responses": {"101": switching, **errors}}}
        operation["requestBody"] = {"content": {"application/json": {"schema": self._body(request)}}}
        if stream == "server":
            events = f"Server-sent events: each event's data is one {_name(response)} as JSON."
            ok = {"description": events, "content": {"text/event-stream": {"schema": self._body(response)}}}
        else:
            ok = {"description": "OK", "content": {"application/json": {"schema": self._body(response)}}}
        return {"post": {**operation, "responses": {"200": ok, **errors}}}

    def _body(self, message: Descriptor | None) -> _Schema:
        return self._message_ref(message) if message else {"type": "object"}

    def _message_ref(self, message: Descriptor) -> _Schema:
        name = message.full_name
        if name not in self.schemas:
            self.schemas[name] = {}  # reserved first: a recursive type refers back to it
            known = _WELL_KNOWN.get(name)
            self.schemas[name] = known or self._message_schema(message)
        return {"$ref": _SCHEMAS + name}

    def _enum_ref(self, enum: EnumDescriptor) -> _Schema:
        name = enum.full_name
        if name not in self.schemas:
            known = _WELL_KNOWN.get(name)
            self.schemas[name] = known or self._enum_schema(enum)
        return {"$ref": _SCHEMAS + name}

    def _message_schema(self, message: Descriptor) -> _Schema:
        proto = descriptor_pb2.DescriptorProto()
        message.CopyToProto(proto)
        synthetic = {f.name for f in proto.field if f.proto3_optional}  # `optional` makes a hidden oneof
        oneofs = {
            o.name: [f.name for f in o.fields] for o in message.oneofs if o.fields[0].name not in synthetic
        }
        schema: _Schema = {
            "type": "object",
            "properties": {f.name: self._field_schema(f) for f in message.fields},
        }
        lines = [self._notes.get(message.full_name, "")]
        for oneof, members in oneofs.items():
            lines.append(f"At most one of {', '.join(f'`{m}`' for m in members)} is set (oneof `{oneof}`).")
            for member in members:
                _describe(schema["properties"][member], f"Part of oneof `{oneof}`.")
        if oneofs:
            schema["x-micro-oneofs"] = oneofs
        _describe(schema, "\n\n".join(line for line in lines if line))
        return schema

    def _enum_schema(self, enum: EnumDescriptor) -> _Schema:
        lines = [self._notes.get(enum.full_name, "")]
        for value in enum.values:
            note = self._notes.get(f"{enum.full_name}.{value.name}")
            if note:
                lines.append(f"- `{value.name}`: {note}")
        schema: _Schema = {
            "anyOf": [{"type": "string", "enum": [v.name for v in enum.values]}, dict(_INT32)],
        }
        _describe(schema, "\n".join(line for line in lines if line) + "\n\nNames or numbers are accepted.")
        return schema

    def _field_schema(self, field: FieldDescriptor) -> _Schema:
        entry = field.message_type
        if field.is_repeated and entry is not None and entry.GetOptions().map_entry:
            key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
            schema: _Schema = {"type": "object", "additionalProperties": self._single(value)}
            if key.type != _T.TYPE_STRING:
                schema["propertyNames"] = _map_key_names(key.type)
        elif field.is_repeated:
            schema = {"type": "array", "items": self._single(field)}
        else:
            schema = self._single(field)
        _describe(schema, self._notes.get(field.full_name, ""))
        return schema

    def _single(self, field: FieldDescriptor) -> _Schema:
        if field.message_type is not None:
            return self._message_ref(field.message_type)
        if field.enum_type is not None:
            return self._enum_ref(field.enum_type)
        return dict(_SCALARS[field.type])


def _map_key_names(key_type: int) -> _Schema:
    if key_type == _T.TYPE_BOOL:
        return {"enum": ["true", "false"]}
    return {"pattern": "^[0-9]+$" if _SCALARS[key_type].get("minimum") == 0 else "^-?[0-9]+$"}


def _describe(schema: _Schema, text: str) -> None:
    if text:
        schema["description"] = f"{schema['description']}\n\n{text}" if "description" in schema else text


def _error_response(name: str) -> _Schema:
    description = "An error" if name == "Error" else re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name)
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": _SCHEMAS + "Error"}}},
    }


def _websocket_text(stream: str, request: Descriptor | None, response: Descriptor | None) -> str:
    answer = (
        f"answers with one {_name(response)} when the requests end"
        if stream == "client"
        else f"sends each {_name(response)} as one text message"
    )
    send = f"send each {_name(request)} as one JSON text message"
    return f"Switching to a WebSocket: {send}; the service {answer}."


def _name(message: Descriptor | None) -> str:
    return f"`{message.full_name}`" if message else "JSON object"


def _stream_kind(method: MethodDescriptor | None) -> str:
    if method is None:
        return ""
    client, server = method.client_streaming, method.server_streaming
    return "bidi" if client and server else "client" if client else "server" if server else ""


def _squash(name: str) -> str:
    return name.replace("-", "").lower()  # what Micro's resolver matches names by


def _kebab(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "-", name).lower()
