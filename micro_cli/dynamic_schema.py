"""A registry entry's schema: its descriptor pool, message types and proto comments.

The pool is built without ``descriptor_pb2``, whose import (by
``micro.schema.pool_from_schema``) costs a tenth of a dynamic command's
start-up: the set is split into its files by reading the wire format (a set
is field 1 repeated; a file's name is field 1, its imports field 3), and each
file is added after its imports. A set that does not hold all its imports, or
does not parse, goes to ``pool_from_schema``, which knows what to do about it.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from typing import TYPE_CHECKING

from micro_cli.errors import HandledError
from micro_cli.schema_cache import CachedEndpoint, CachedService

if TYPE_CHECKING:
    from google.protobuf.descriptor import Descriptor, MethodDescriptor
    from google.protobuf.descriptor_pool import DescriptorPool

__all__ = ["NoSchema", "Schema", "pool_from_set"]

_LENGTH_DELIMITED, _VARINT, _FIXED64, _FIXED32 = 2, 0, 1, 5


class NoSchema(HandledError):
    """The registered schema lacks an endpoint's message types (exit 4, as for anything not found)."""

    exit_code = 4


class Schema:
    """The message types and proto comments of one registry entry."""

    def __init__(self, service: CachedService) -> None:
        self.service = service

    @cached_property
    def pool(self) -> DescriptorPool:
        return pool_from_set(self.service.schema)

    @cached_property
    def comments(self) -> dict[str, str]:
        from micro.schema import comments

        return comments(self.service.schema) if self.service.schema else {}

    def request(self, endpoint: CachedEndpoint) -> Descriptor:
        """The request message of ``endpoint``. ``NoSchema`` if the schema lacks it."""
        try:
            return self.pool.FindMessageTypeByName(endpoint.request)
        except KeyError:
            raise NoSchema(
                f"service {self.service.name!r} registered no schema for {endpoint.name} "
                f"({endpoint.request or 'no request type'}): its flags are unknown"
            ) from None

    def method(self, endpoint: CachedEndpoint) -> MethodDescriptor | None:
        """The proto method behind ``Handler.Method``: same name and message types."""
        handler, _, name = endpoint.name.partition(".")
        candidates = [
            m for m in self._methods() if m.name == name and m.input_type.full_name == endpoint.request
        ]
        candidates.sort(key=lambda m: m.containing_service.name != handler)
        return candidates[0] if candidates else None

    def summary(self, endpoint: CachedEndpoint) -> str:
        """The first line of the method's comment."""
        return self.description(endpoint).partition("\n")[0]

    def description(self, endpoint: CachedEndpoint) -> str:
        method = self.method(endpoint) if self.service.schema else None
        return self.comments.get(method.full_name, "") if method is not None else ""

    def handler_comment(self, handler: str) -> str:
        for endpoint in self.service.endpoints:
            method = self.method(endpoint) if endpoint.name.startswith(f"{handler}.") else None
            if method is not None:
                return self.comments.get(method.containing_service.full_name, "")
        return ""

    def _methods(self) -> Iterator[MethodDescriptor]:
        if not self.service.schema:
            return
        for name in {e.request for e in self.service.endpoints}:
            try:
                file = self.pool.FindFileContainingSymbol(name)
            except KeyError:
                continue
            for service in file.services_by_name.values():
                yield from service.methods


def pool_from_set(data: bytes) -> DescriptorPool:
    """A fresh pool holding the files of ``data``; ``micro.errors.BadRequest`` if it is no valid set."""
    from google.protobuf.descriptor_pool import DescriptorPool

    try:
        files = _ordered_files(data)
        if files is not None:
            pool = DescriptorPool()
            for file in files:
                pool.AddSerializedFile(file)
            return pool
    except (ValueError, TypeError):
        pass
    from micro.schema import pool_from_schema

    return pool_from_schema(data)


def _ordered_files(data: bytes) -> list[bytes] | None:
    """The set's files, each after its imports; ``None`` if an import is not in the set."""
    files: dict[str, tuple[bytes, list[str]]] = {}
    for number, value in _fields(data):
        if number == 1:
            name, imports = _name_and_imports(value)
            files[name] = (value, imports)
    ordered: list[bytes] = []
    done: set[str] = set()

    def add(name: str) -> bool:
        if name in done:
            return True
        if name not in files:
            return False
        done.add(name)
        file, imports = files[name]
        if not all(add(i) for i in imports):
            return False
        ordered.append(file)
        return True

    return ordered if all(add(name) for name in list(files)) else None


def _name_and_imports(file: bytes) -> tuple[str, list[str]]:
    name, imports = "", []
    for number, value in _fields(file):
        if number == 1:
            name = value.decode()
        elif number == 3:
            imports.append(value.decode())
    return name, imports


def _fields(data: bytes) -> Iterator[tuple[int, bytes]]:
    """The length-delimited fields of a message (others are skipped). ``ValueError`` if malformed."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        kind = key & 7
        if kind == _LENGTH_DELIMITED:
            length, i = _varint(data, i)
            if i + length > len(data):
                raise ValueError("truncated field")
            yield key >> 3, data[i : i + length]
            i += length
        elif kind == _VARINT:
            _, i = _varint(data, i)
        elif kind in (_FIXED64, _FIXED32):
            i += 8 if kind == _FIXED64 else 4
        else:
            raise ValueError(f"unexpected wire type {kind}")
    if i != len(data):
        raise ValueError("truncated message")


def _varint(data: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while shift < 64:
        if i >= len(data):
            raise ValueError("truncated varint")
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, i
        shift += 7
    raise ValueError("varint too long")
