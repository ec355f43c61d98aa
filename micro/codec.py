"""JSON <-> protobuf transcoding with Micro's conventions (proto field names, defaults shown)."""

from __future__ import annotations

import json
from typing import TypeVar

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from micro.errors import BadRequest

__all__ = ["decode_json", "decode_proto", "encode_json"]

M = TypeVar("M", bound=Message)


def decode_json(data: bytes, message_type: type[M]) -> M:
    """Parse a JSON body (empty means ``{}``) into ``message_type``; ``BadRequest`` says what is wrong."""
    message = message_type()
    if not data.strip():
        return message
    try:
        json_format.Parse(data, message)
    except json_format.ParseError as exc:
        raise BadRequest(f"invalid request for {message.DESCRIPTOR.full_name}: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the request body is not JSON: {exc}") from exc
    return message


def encode_json(message: Message) -> bytes:
    """Serialize ``message`` as compact JSON with proto field names and every field present."""
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return json.dumps(data, separators=(",", ":")).encode()


def decode_proto(data: bytes, message_type: type[M]) -> M:
    """Parse wire-format bytes into ``message_type``; ``BadRequest`` if they do not parse."""
    try:
        return message_type.FromString(data)
    except DecodeError as exc:
        raise BadRequest(f"malformed {message_type.DESCRIPTOR.full_name}: {exc}") from exc
