"""How messages and events carry values: bytes as they are, protobuf as wire bytes, the rest as JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypeVar, cast

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from micro.errors import BadRequest

__all__ = ["CONTENT_TYPE", "decode", "encode"]

CONTENT_TYPE = "Content-Type"
PROTOBUF = "application/protobuf"
JSON = "application/json"
BYTES = "application/octet-stream"

T = TypeVar("T")


def encode(value: Any) -> tuple[bytes, str]:
    """``(payload, content type)`` for a value to publish."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value), BYTES
    if isinstance(value, Message):
        return value.SerializeToString(), PROTOBUF
    try:
        return json.dumps(value, separators=(",", ":")).encode(), JSON
    except (TypeError, ValueError) as exc:
        raise BadRequest(
            f"cannot publish a {type(value).__name__}: use bytes, a protobuf message or JSON"
        ) from exc


def decode(payload: bytes, headers: Mapping[str, str], into: type[T] | None) -> T | Any:
    """The value a handler asked for: a message type, ``bytes``, or (default) the JSON value."""
    content_type = headers.get(CONTENT_TYPE, "")
    if into is bytes:
        return payload
    if into is not None and isinstance(into, type) and issubclass(into, Message):
        message = into()
        try:
            if content_type == JSON:
                json_format.Parse(payload, message)
            else:
                message.ParseFromString(payload)
        except (DecodeError, json_format.ParseError) as exc:
            raise BadRequest(f"the payload is not a {message.DESCRIPTOR.full_name}: {exc}") from exc
        return cast(T, message)
    if content_type in (JSON, ""):
        try:
            return json.loads(payload)
        except ValueError:
            return payload
    return payload
