"""HTTP requests to request messages: bodies, query strings, forms and path captures.

A JSON body is the request as is. Query parameters (dotted keys are nested
fields: ``?customer.email=x&tags=a&tags=b``) and form fields (urlencoded or
multipart, files as base64 ``bytes``) become a JSON object, with values typed
by the request message where a string would not parse (booleans) and repeated
keys or repeated fields as lists. A urlencoded body that starts like JSON is
JSON (what ``curl -d '{"name": "x"}'`` sends). The body wins over the query
string and path captures win over both. ``GET`` and ``HEAD`` take the request from the query
string (and captures) only; without parameters they send ``{}``. Proto content
types carry wire-format bytes through untouched (query parameters do not apply).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from micro.codec import decode_json, decode_proto, encode_json
from micro.errors import BadGateway, BadRequest, MicroError, PayloadTooLarge

__all__ = [
    "MULTIPART",
    "PROTO_TYPES",
    "URLENCODED",
    "body_object",
    "fields_json",
    "json_to_wire",
    "merge",
    "read_body",
    "read_multipart",
    "set_field",
    "too_large",
    "urlencoded_fields",
    "wire_to_json",
]

ERROR_ID = "micro.api"

PROTO_TYPES = frozenset(
    {
        "application/protobuf",
        "application/x-protobuf",
        "application/grpc",
        "application/grpc+proto",
        "application/octet-stream",
    }
)
URLENCODED = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"

_TRUE = frozenset({"", "true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_BOOL_WRAPPER = "google.protobuf.BoolValue"


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the request body is larger than the limit of {limit} bytes", id=ERROR_ID)


async def read_body(request: web.BaseRequest, limit: int) -> bytes:
    """The whole body, refusing at once a declared length over ``limit`` and stopping at ``limit``."""
    length = request.content_length
    if length is not None and length > limit:
        raise too_large(limit)
    if not request.body_exists:
        return b""
    try:
        return await request.read()  # the application's client_max_size is ``limit``
    except web.HTTPRequestEntityTooLarge:
        raise too_large(limit) from None


async def read_multipart(
    request: web.BaseRequest, limit: int, descriptor: Descriptor | None
) -> dict[str, Any]:
    """A multipart form body as JSON fields (files as base64)."""
    length = request.content_length
    if length is not None and length > limit:
        raise too_large(limit)
    try:
        form = await request.post()
    except web.HTTPRequestEntityTooLarge:
        raise too_large(limit) from None
    except ValueError as exc:
        raise BadRequest(f"malformed form body: {exc}", id=ERROR_ID) from exc
    items = ((key, _form_value(value)) for key, value in form.items())
    return fields_json(items, descriptor)


def urlencoded_fields(body: bytes, descriptor: Descriptor | None) -> dict[str, Any] | None:
    """A urlencoded body as JSON fields; ``None`` if it is JSON (``curl -d '{...}'`` sends JSON so)."""
    if body.lstrip()[:1] in (b"{", b"["):
        return None
    try:
        text = body.decode()
    except UnicodeDecodeError as exc:
        raise BadRequest(f"malformed form body: {exc}", id=ERROR_ID) from exc
    return fields_json(parse_qsl(text, keep_blank_values=True), descriptor)


def _form_value(value: Any) -> str:
    if isinstance(value, web.FileField):
        return base64.b64encode(value.file.read()).decode()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return str(value)


def fields_json(items: Iterable[tuple[str, str]], descriptor: Descriptor | None) -> dict[str, Any]:
    """``key=value`` pairs as a JSON object: dotted keys nest, repeated keys and fields are lists."""
    result: dict[str, Any] = {}
    for key, value in items:
        set_field(result, key.split("."), value, descriptor)
    return result


def set_field(
    result: dict[str, Any], parts: Sequence[str], value: str, descriptor: Descriptor | None
) -> None:
    """Put ``value`` at the field path ``parts`` of ``result``, typed by ``descriptor``'s fields."""
    node, slot = result, _Slot(descriptor)
    for part in parts[:-1]:
        field = slot.field(part)
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node, slot = child, slot.child(field)
    last = parts[-1]
    field = slot.field(last)
    typed = _typed(field, value)
    existing = node.get(last)
    if field is not None and field.is_repeated and not _is_map(field):
        node[last] = [*existing, typed] if isinstance(existing, list) else [typed]
    elif last in node:
        node[last] = [*existing, typed] if isinstance(existing, list) else [existing, typed]
    else:
        node[last] = typed


class _Slot:
    """Where a key part lands: a message's fields, or any key of a map with a value field."""

    def __init__(self, message: Descriptor | None, map_value: FieldDescriptor | None = None) -> None:
        self.message = message
        self.map_value = map_value

    def field(self, name: str) -> FieldDescriptor | None:
        if self.map_value is not None:
            return self.map_value
        if self.message is None:
            return None
        found = self.message.fields_by_name.get(name)
        if found is None:
            found = next((f for f in self.message.fields if f.json_name == name), None)
        return found

    def child(self, field: FieldDescriptor | None) -> _Slot:
        if field is None or field.message_type is None:
            return _Slot(None)
        if _is_map(field):
            return _Slot(None, field.message_type.fields_by_name["value"])
        return _Slot(field.message_type)


def _is_map(field: FieldDescriptor) -> bool:
    message = field.message_type
    return bool(field.is_repeated and message is not None and message.GetOptions().map_entry)


def _typed(field: FieldDescriptor | None, value: str) -> Any:
    if field is None:
        return value
    is_bool = field.type == FieldDescriptor.TYPE_BOOL or (
        field.message_type is not None and field.message_type.full_name == _BOOL_WRAPPER
    )
    if is_bool:
        lowered = value.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    return value


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``over``, nested objects merged rather than replaced."""
    for key, value in over.items():
        current = base.get(key)
        if isinstance(current, dict) and isinstance(value, dict):
            merge(current, value)
        else:
            base[key] = value
    return base


def body_object(body: bytes) -> dict[str, Any]:
    """A JSON body that is to be merged with other fields: it must be an object."""
    if not body.strip():
        return {}
    try:
        parsed = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the request body is not JSON: {exc}", id=ERROR_ID) from exc
    if not isinstance(parsed, dict):
        raise BadRequest("the request body must be a JSON object", id=ERROR_ID)
    return parsed


def json_to_wire(data: bytes, request_type: type[Message]) -> bytes:
    """A JSON request as wire-format bytes; ``BadRequest`` (id ``micro.api``) if it does not fit."""
    try:
        return decode_json(data, request_type).SerializeToString()
    except MicroError as error:
        error.id = error.id or ERROR_ID
        raise


def wire_to_json(data: bytes, response_type: type[Message]) -> bytes:
    """An upstream response as JSON; ``BadGateway`` if the upstream sent bytes that do not parse."""
    try:
        return encode_json(decode_proto(data, response_type))
    except MicroError as error:
        raise BadGateway(f"the service answered with {error.detail}", id=ERROR_ID) from error
