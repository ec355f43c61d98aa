"""Protobuf descriptors as Micro's registry schema.

A service registers each endpoint with a field tree of its request and
response (``registry_pb2.Value``, as Micro's ``Value{name, type, values}``)
and its protos as a serialized ``FileDescriptorSet``, from which a client
rebuilds the message classes (``pool_from_schema``) and reads the proto
comments (``comments``) for help texts.

Type names in a field tree: proto scalars by their proto name (``string``,
``int64``, ``sint32``, ``fixed64``, ``bytes`` ...), enums and messages by
their short name, well-known types (``google/protobuf/*.proto``) by their full
name as leaves, repeated fields as ``[]<type>`` and maps as ``map<K,V>``.
"""

from __future__ import annotations

import importlib
import re
import textwrap
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, cast

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError

from micro._scalars import SCALAR_NAMES
from micro.errors import BadRequest
from micro.proto import registry_pb2

if TYPE_CHECKING:
    from google._upb._message import Descriptor as _UpbDescriptor

__all__ = ["comments", "endpoints", "file_descriptor_set", "pool_from_schema", "value_tree"]


_WELL_KNOWN_PREFIX = "google/protobuf/"
_WELL_KNOWN_FILE = re.compile(r"google/protobuf/(?:[a-z0-9_]+/)*[a-z0-9_]+\.proto")


def value_tree(descriptor: Descriptor | _UpbDescriptor, depth: int = 6) -> registry_pb2.Value:
    """The field tree of a message: ``Value(name=<Name>, type=<full name>, values=<fields>)``.

    ``depth`` is how many levels of fields are expanded: 1 lists the message's
    own fields without the fields of their messages, 0 lists none. It bounds
    self-referential types. Well-known types have no children. Takes
    ``Message.DESCRIPTOR`` as typed by both the pure-Python and upb stubs.
    """
    message = cast(Descriptor, descriptor)  # the same object at runtime, typed twice by the stubs
    return registry_pb2.Value(name=message.name, type=message.full_name, values=_fields(message, depth))


def endpoints(service: ServiceDescriptor, handler_name: str | None = None) -> list[registry_pb2.Endpoint]:
    """One endpoint per method, named ``<Handler>.<Method>``.

    ``handler_name`` defaults to the proto service's name. Streaming methods
    carry ``metadata["stream"]`` = ``"server"``, ``"client"`` or ``"bidi"``.
    """
    handler = handler_name or service.name
    result = []
    for method in service.methods:
        endpoint = registry_pb2.Endpoint(
            name=f"{handler}.{method.name}",
            request=value_tree(method.input_type),
            response=value_tree(method.output_type),
        )
        stream = _stream_kind(method.client_streaming, method.server_streaming)
        if stream:
            endpoint.metadata["stream"] = stream
        result.append(endpoint)
    return result


def file_descriptor_set(*files: FileDescriptor) -> bytes:
    """A serialized ``FileDescriptorSet`` of ``files`` and everything they import.

    Dependencies come before the files that import them; each file appears once.
    """
    fds = descriptor_pb2.FileDescriptorSet()
    for file in _with_dependencies(files):
        fds.file.add().MergeFromString(file.serialized_pb)
    return fds.SerializeToString()


def pool_from_schema(data: bytes) -> descriptor_pool.DescriptorPool:
    """A fresh descriptor pool holding the files of a serialized ``FileDescriptorSet``.

    Files may come in any order. An import missing from the set is taken from
    the default pool when it knows it (e.g. ``google/protobuf/*.proto``).
    Raises ``micro.errors.BadRequest`` if ``data`` is no valid set.
    """
    protos = {f.name: f for f in _parse_set(data).file}
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()
    for name in protos:
        _add_file(pool, name, protos, added)
    return pool


def comments(fds_bytes: bytes) -> dict[str, str]:
    """The leading comment of every commented element, by full name.

    Keys are full names such as ``micro.store.v1.Store.Read``,
    ``micro.store.v1.ReadRequest.key`` or, for enum values, ``pkg.Enum.VALUE``.
    An element without a leading comment falls back to its trailing comment.
    Empty when the set was compiled without source info.
    """
    result: dict[str, str] = {}
    for file in _parse_set(fds_bytes).file:
        names = dict(_element_paths(file))
        for location in file.source_code_info.location:
            name = names.get(tuple(location.path))
            text = _clean_comment(location.leading_comments or location.trailing_comments)
            if name and text:
                result[name] = text
    return result


def _fields(descriptor: Descriptor, depth: int) -> list[registry_pb2.Value]:
    if depth <= 0 or _is_well_known(descriptor):
        return []
    return [_field_value(field, depth - 1) for field in descriptor.fields]


def _field_value(field: FieldDescriptor, depth: int) -> registry_pb2.Value:
    value = registry_pb2.Value(name=field.name)
    entry = _map_entry(field)
    if entry is not None:
        key, val = entry.fields_by_name["key"], entry.fields_by_name["value"]
        value.type = f"map<{_type_name(key)},{_type_name(val)}>"
        children = val.message_type
    else:
        value.type = ("[]" if field.is_repeated else "") + _type_name(field)
        children = field.message_type
    if children is not None:
        value.values.extend(_fields(children, depth))
    return value


def _type_name(field: FieldDescriptor) -> str:
    if field.message_type is not None:
        message = field.message_type
        return message.full_name if _is_well_known(message) else message.name
    if field.enum_type is not None:
        return field.enum_type.name
    return SCALAR_NAMES[field.type]


def _map_entry(field: FieldDescriptor) -> Descriptor | None:
    message = field.message_type
    if field.is_repeated and message is not None and message.GetOptions().map_entry:
        return message
    return None


def _is_well_known(descriptor: Descriptor) -> bool:
    return descriptor.file.name.startswith(_WELL_KNOWN_PREFIX)


def _stream_kind(client: bool, server: bool) -> str:
    if client and server:
        return "bidi"
    return "client" if client else "server" if server else ""


def _with_dependencies(files: Iterable[FileDescriptor]) -> Iterator[FileDescriptor]:
    seen: set[str] = set()

    def visit(file: FileDescriptor) -> Iterator[FileDescriptor]:
        if file.name in seen:
            return
        seen.add(file.name)
        for dependency in file.dependencies:
            yield from visit(dependency)
        yield file

    for file in files:
        yield from visit(file)


def _parse_set(data: bytes) -> descriptor_pb2.FileDescriptorSet:
    try:
        return descriptor_pb2.FileDescriptorSet.FromString(data)
    except DecodeError as exc:
        raise BadRequest(f"invalid schema: {exc}", id="registry") from exc


def _add_file(
    pool: descriptor_pool.DescriptorPool,
    name: str,
    protos: dict[str, descriptor_pb2.FileDescriptorProto],
    added: set[str],
) -> None:
    if name in added:
        return
    added.add(name)  # before the imports: a cycle then fails in AddSerializedFile, not here
    proto = protos.get(name) or _known_file(name)
    for dependency in proto.dependency:
        _add_file(pool, dependency, protos, added)
    try:
        pool.AddSerializedFile(proto.SerializeToString())
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"invalid schema file {name}: {exc}", id="registry") from exc


def _known_file(name: str) -> descriptor_pb2.FileDescriptorProto:
    if _WELL_KNOWN_FILE.fullmatch(name):
        # The default pool holds a well-known file only once its module is imported.
        module = name.removesuffix(".proto").replace("/", ".") + "_pb2"
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    try:
        file = descriptor_pool.Default().FindFileByName(name)
    except KeyError as exc:
        raise BadRequest(f"invalid schema: import {name} is missing", id="registry") from exc
    return descriptor_pb2.FileDescriptorProto.FromString(file.serialized_pb)


# Field numbers of descriptor.proto that source_code_info paths are made of.
_FILE_MESSAGES, _FILE_ENUMS, _FILE_SERVICES = 4, 5, 6
_MESSAGE_FIELDS, _MESSAGE_NESTED, _MESSAGE_ENUMS, _MESSAGE_ONEOFS = 2, 3, 4, 8
_ENUM_VALUES, _SERVICE_METHODS = 2, 2

_Path = tuple[int, ...]


def _element_paths(file: descriptor_pb2.FileDescriptorProto) -> Iterator[tuple[_Path, str]]:
    prefix = f"{file.package}." if file.package else ""
    for i, message in enumerate(file.message_type):
        yield from _message_paths(message, (_FILE_MESSAGES, i), prefix + message.name)
    for i, enum in enumerate(file.enum_type):
        yield from _enum_paths(enum, (_FILE_ENUMS, i), prefix + enum.name)
    for i, service in enumerate(file.service):
        name = prefix + service.name
        yield (_FILE_SERVICES, i), name
        for j, method in enumerate(service.method):
            yield (_FILE_SERVICES, i, _SERVICE_METHODS, j), f"{name}.{method.name}"


def _message_paths(
    message: descriptor_pb2.DescriptorProto, path: _Path, name: str
) -> Iterator[tuple[_Path, str]]:
    yield path, name
    yield from _named(message.field, (*path, _MESSAGE_FIELDS), name)
    yield from _named(message.oneof_decl, (*path, _MESSAGE_ONEOFS), name)
    for i, nested in enumerate(message.nested_type):
        yield from _message_paths(nested, (*path, _MESSAGE_NESTED, i), f"{name}.{nested.name}")
    for i, enum in enumerate(message.enum_type):
        yield from _enum_paths(enum, (*path, _MESSAGE_ENUMS, i), f"{name}.{enum.name}")


def _enum_paths(
    enum: descriptor_pb2.EnumDescriptorProto, path: _Path, name: str
) -> Iterator[tuple[_Path, str]]:
    yield path, name
    yield from _named(enum.value, (*path, _ENUM_VALUES), name)


def _named(
    elements: Sequence[
        descriptor_pb2.FieldDescriptorProto
        | descriptor_pb2.OneofDescriptorProto
        | descriptor_pb2.EnumValueDescriptorProto
    ],
    path: _Path,
    scope: str,
) -> Iterator[tuple[_Path, str]]:
    for i, element in enumerate(elements):
        yield (*path, i), f"{scope}.{element.name}"


def _clean_comment(text: str) -> str:
    return textwrap.dedent(text).strip()
