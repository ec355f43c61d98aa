"""One command-line value as the proto JSON of one field: scalars, enums, bytes, well-known types.

``convert(field, text)`` returns what ``json_format`` expects for ``field``
(a single element for repeated fields); ``type_label(field)`` and
``hint(field)`` describe the expected text in help.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf.descriptor import FieldDescriptor

from micro._scalars import SCALAR_NAMES

if TYPE_CHECKING:
    from google.protobuf.descriptor import Descriptor

__all__ = ["BadValue", "convert", "hint", "is_well_known", "type_label"]

_INT32 = (-(2**31), 2**31 - 1)
_UINT32 = (0, 2**32 - 1)
_INT64 = (-(2**63), 2**63 - 1)
_UINT64 = (0, 2**64 - 1)
_FLOAT_MAX = 3.4028234663852886e38
_PROTO_DURATION = re.compile(r"(-?\d{1,12})(?:\.\d{1,9})?s")
_DURATION_MAX = 315_576_000_000
_WORD_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


_INT_RANGES: dict[int, tuple[int, int]] = {
    FieldDescriptor.TYPE_INT32: _INT32,
    FieldDescriptor.TYPE_SINT32: _INT32,
    FieldDescriptor.TYPE_SFIXED32: _INT32,
    FieldDescriptor.TYPE_UINT32: _UINT32,
    FieldDescriptor.TYPE_FIXED32: _UINT32,
    FieldDescriptor.TYPE_INT64: _INT64,
    FieldDescriptor.TYPE_SINT64: _INT64,
    FieldDescriptor.TYPE_SFIXED64: _INT64,
    FieldDescriptor.TYPE_UINT64: _UINT64,
    FieldDescriptor.TYPE_FIXED64: _UINT64,
}
_TRUE = frozenset({"true", "t", "yes", "y", "1", "on"})
_FALSE = frozenset({"false", "f", "no", "n", "0", "off"})

_WRAPPERS = frozenset(
    f"google.protobuf.{name}Value"
    for name in ("Double", "Float", "Int64", "UInt64", "Int32", "UInt32", "Bool", "String", "Bytes")
)


class BadValue(Exception):
    """A value that does not fit its field; the message says why, without the flag's name."""


def is_well_known(message: Descriptor) -> bool:
    return message.file.name.startswith("google/protobuf/")


def type_label(field: FieldDescriptor) -> str:
    """The type shown in help: ``int32``, ``Size``, ``timestamp``, ``JSON`` ..."""
    if field.enum_type is not None:
        return field.enum_type.name
    message = field.message_type
    if message is None:
        return SCALAR_NAMES[field.type]
    if message.full_name in _WRAPPERS:
        return type_label(message.fields_by_name["value"])
    return _WKT_LABELS.get(message.full_name, "JSON")


def hint(field: FieldDescriptor) -> str:
    """How to write a value of ``field``, when its type alone does not say."""
    if field.enum_type is not None:
        return "one of " + ", ".join(v.name for v in field.enum_type.values)
    message = field.message_type
    if message is None:
        return _SCALAR_HINTS.get(field.type, "")
    if message.full_name in _WRAPPERS:
        return hint(message.fields_by_name["value"])
    return _WKT_HINTS.get(message.full_name, f"{message.name} as a JSON object")


def convert(field: FieldDescriptor, text: str) -> Any:
    """``text`` as the JSON value of one element of ``field``. Raises ``BadValue``."""
    if field.enum_type is not None:
        return _enum(field, text)
    message = field.message_type
    if message is None:
        return _scalar(field.type, text)
    if message.full_name in _WRAPPERS:
        return convert(message.fields_by_name["value"], text)
    special = _WKT_CONVERTERS.get(message.full_name)
    if special is not None:
        return special(text)
    return _json(text, dict, f"{message.name} as a JSON object")


def _scalar(kind: int, text: str) -> Any:
    if kind in _INT_RANGES:
        return _integer(kind, text)
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return _float(kind, text)
    if kind == FieldDescriptor.TYPE_BOOL:
        return _bool(text)
    if kind == FieldDescriptor.TYPE_BYTES:
        return _bytes(text)
    return text


def _integer(kind: int, text: str) -> int:
    name = SCALAR_NAMES[kind]
    try:
        value = int(text.strip(), 0) if text.strip().lower().startswith(("0x", "-0x")) else int(text)
    except ValueError:
        raise BadValue(f"{text!r} is not {_article(name)} {name}") from None
    low, high = _INT_RANGES[kind]
    if not low <= value <= high:
        raise BadValue(f"{value} is out of range for {name} ({low} to {high})")
    return value


def _float(kind: int, text: str) -> float | str:
    name = SCALAR_NAMES[kind]
    try:
        value = float(text)
    except ValueError:
        raise BadValue(f"{text!r} is not a {name}") from None
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    if kind == FieldDescriptor.TYPE_FLOAT and abs(value) > _FLOAT_MAX:
        raise BadValue(f"{text} is out of range for float (±{_FLOAT_MAX:.7g})")
    return value


def _bool(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise BadValue(f"{text!r} is not a bool: use true or false")


def _bytes(text: str) -> str:
    if text.startswith("@"):
        try:
            data = Path(text[1:]).expanduser().read_bytes()
        except OSError as exc:
            raise BadValue(f"cannot read {text[1:]}: {exc.strerror or exc}") from None
        return base64.b64encode(data).decode()
    compact = "".join(text.split())
    padded = compact + "=" * (-len(compact) % 4)
    try:
        if "-" in compact or "_" in compact:
            data = base64.urlsafe_b64decode(padded)
        else:
            data = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise BadValue(f"{text!r} is not base64: give base64, or @FILE for a file's bytes") from None
    return base64.b64encode(data).decode()


def _enum(field: FieldDescriptor, text: str) -> str | int:
    enum = field.enum_type
    assert enum is not None
    wanted = text.strip().upper().replace("-", "_")
    prefix = _upper_snake(enum.name) + "_"
    for value in enum.values:
        if wanted in (value.name.upper(), value.name.upper().removeprefix(prefix)):
            return value.name
    try:
        return _integer(FieldDescriptor.TYPE_INT32, text)
    except BadValue:
        names = ", ".join(v.name for v in enum.values)
        raise BadValue(f"{text!r} is not a {enum.name}: use one of {names}") from None


def _timestamp(text: str) -> str:
    from google.protobuf.timestamp_pb2 import Timestamp

    try:
        Timestamp().FromJsonString(text)
        return text
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise BadValue(f"{text!r} is not an RFC 3339 time, e.g. 2024-05-01T12:00:00Z") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    moment = moment.astimezone(datetime.UTC)
    fraction = f".{moment.microsecond:06d}".rstrip("0") if moment.microsecond else ""
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + fraction + "Z"


def _duration(text: str) -> str:
    from micro_cli.durations import parse_duration
    from micro_cli.errors import UsageError

    exact = _PROTO_DURATION.fullmatch(text)
    sign, body = ("-", text[1:]) if text.startswith("-") else ("", text)
    try:
        seconds = int(exact[1]) if exact else parse_duration(body)
    except UsageError:
        raise BadValue(f"{text!r} is not a duration: use e.g. 1.5s, 250ms, 90m or 1h30m") from None
    if abs(seconds) > _DURATION_MAX:
        raise BadValue(f"{text!r} is out of range for a duration (±{_DURATION_MAX} s, about 10000 years)")
    if exact:
        return text  # already proto JSON: keep its nanoseconds exact
    digits = f"{seconds:.9f}".rstrip("0").rstrip(".")
    return f"{sign if seconds else ''}{digits}s"


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # a bare word is a string value


def _json(text: str, kind: type, what: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise BadValue(f"{text!r} is not JSON ({exc}): give {what}") from None
    if not isinstance(value, kind):
        raise BadValue(f"{text!r} is not {what}")
    return value


_WKT_CONVERTERS: dict[str, Callable[[str], Any]] = {
    "google.protobuf.Timestamp": _timestamp,
    "google.protobuf.Duration": _duration,
    "google.protobuf.Struct": lambda text: _json(text, dict, "a JSON object"),
    "google.protobuf.Value": _json_value,
    "google.protobuf.ListValue": lambda text: _json(text, list, "a JSON array"),
    "google.protobuf.Any": lambda text: _json(text, dict, 'a JSON object with "@type"'),
    "google.protobuf.Empty": lambda text: _json(text, dict, "{}"),
    "google.protobuf.FieldMask": str,
}
_WKT_LABELS = {
    "google.protobuf.Timestamp": "timestamp",
    "google.protobuf.Duration": "duration",
    "google.protobuf.FieldMask": "paths",
}
_WKT_HINTS = {
    "google.protobuf.Timestamp": "RFC 3339, e.g. 2024-05-01T12:00:00Z",
    "google.protobuf.Duration": "e.g. 1.5s, 250ms, 90m, 1h30m",
    "google.protobuf.Struct": "a JSON object",
    "google.protobuf.Value": "any JSON value",
    "google.protobuf.ListValue": "a JSON array",
    "google.protobuf.Any": 'a JSON object with "@type"',
    "google.protobuf.Empty": "{}",
    "google.protobuf.FieldMask": "comma-separated field paths",
}
_SCALAR_HINTS = {
    FieldDescriptor.TYPE_BYTES: "base64, or @FILE",
    FieldDescriptor.TYPE_BOOL: "a bare flag means true",
}


def _upper_snake(name: str) -> str:
    return _WORD_BOUNDARY.sub("_", name).upper()


def _article(name: str) -> str:
    return "an" if name[0] in "aeiou" else "a"
