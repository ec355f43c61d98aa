"""An endpoint's flags, from its request message: names, help, and the JSON body they build.

Nested fields join with ``.`` (``--customer.address.geo.lat=1.5``); ``_`` and
``-`` separate levels too, as in Micro, and a field's JSON name (camelCase)
works as well. Maps take ``--labels key=value`` or ``--labels.key=value``;
repeated fields take the flag again, a comma list or a JSON array; message
fields take a JSON object. ``--data`` is the whole body as JSON (``-`` reads
stdin, ``@FILE`` a file) and the other flags override its fields.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from micro_cli.errors import HandledError
from micro_cli.flag_values import BadValue, convert, hint, is_well_known, type_label

if TYPE_CHECKING:
    from google.protobuf.descriptor import Descriptor, FieldDescriptor, OneofDescriptor

__all__ = [
    "FlagError",
    "FlagSpec",
    "ParsedFlags",
    "UnknownFlag",
    "body_flag",
    "flag_specs",
    "json_object",
    "parse_flags",
    "validate",
    "value_choices",
]

BODY_FLAGS = ("data", "json")  # the first one the request has no field of is the body flag
HELP_FLAGS = ("-h", "--help")
MAX_DEPTH = 8  # levels of nested messages that get flags of their own
_WHOLE = frozenset({"JSON", "paths"})  # values that may hold commas: never split into a list


class FlagError(HandledError):
    """A flag the endpoint's request does not have, or a value that does not fit it: exit 2."""

    exit_code = 2


class UnknownFlag(FlagError):
    """A flag that names no field of the request (a newer schema may have it)."""


class FlagSpec(NamedTuple):
    """One flag of an endpoint, as help and completion show it."""

    name: str
    type: str
    markers: tuple[str, ...] = ()
    help: str = ""


class _Target(NamedTuple):
    path: tuple[FieldDescriptor, ...]
    key: str | None = None  # a map key written in the flag's name: --labels.env=prod

    @property
    def value_field(self) -> FieldDescriptor:
        leaf = self.path[-1]
        return _map_fields(leaf)[1] if self.key is not None else leaf


class ParsedFlags:
    """A command line's flags, checked against a request message; ``body()`` applies them."""

    def __init__(self, message: Descriptor) -> None:
        self.message = message
        self.assignments: list[tuple[str, _Target, str]] = []
        self.data: str | None = None  # the body flag's text; "-" reads stdin

    @property
    def empty(self) -> bool:
        return not self.assignments and self.data is None

    @property
    def unchecked(self) -> bool:
        """Whether some of the body is JSON as given (``--data``, objects, arrays): ``validate`` it."""
        return self.data is not None or any(v.lstrip()[:1] in ("{", "[") for _, _, v in self.assignments)

    def body(self, stdin: Callable[[], str]) -> dict[str, Any]:
        """The JSON body: ``--data`` (read now), overridden by the other flags."""
        return self.over(self._data(stdin) if self.data is not None else {})

    def over(self, base: Mapping[str, Any]) -> dict[str, Any]:
        """``base`` with the flags' fields on top (a oneof member set by a flag drops the others)."""
        flags: dict[str, Any] = {}
        chosen: dict[tuple[tuple[str, ...], str], tuple[str, str]] = {}
        for flag, target, value in self.assignments:
            _check_oneofs(target, flag, chosen)
            try:
                _assign(flags, target, value)
            except BadValue as exc:
                raise FlagError(f"--{flag}: {exc}") from None
        return _merge(self.message, base, flags)

    def _data(self, stdin: Callable[[], str]) -> dict[str, Any]:
        name = f"--{body_flag(self.message)}"
        text = self.data or ""
        if text == "-":
            text = stdin()
        elif text.startswith("@"):
            try:
                text = Path(text[1:]).expanduser().read_text()
            except OSError as exc:
                raise FlagError(f"{name}: cannot read {text[1:]}: {exc.strerror or exc}") from None
        return json_object(text.strip() or "{}", name)


def json_object(text: str, what: str) -> dict[str, Any]:
    """``text`` parsed as a JSON object; ``FlagError`` naming ``what`` otherwise."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise FlagError(f'{what} is not JSON ({exc}); e.g. \'{{"name": "Alice"}}\'') from None
    if not isinstance(value, dict):
        raise FlagError(f"{what} must be a JSON object, not {type(value).__name__}")
    return value


def parse_flags(message: Descriptor, args: Sequence[str]) -> ParsedFlags:
    """Resolve every flag of ``args`` against ``message``. ``FlagError`` names the first bad one."""
    parsed = ParsedFlags(message)
    body_name = body_flag(message)
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if token in HELP_FLAGS:
            continue
        if not token.startswith("--") or token == "--":
            raise FlagError(f"unexpected argument {token!r}: give values as --flag=value")
        name, eq, value = token[2:].partition("=")
        target = None if name == body_name else _resolve(message, name)
        if target is None and name != body_name:
            raise UnknownFlag(_unknown_flag(message, name))
        if not eq:
            value, i = _value_after(args, i, token, target)
        if target is None:
            parsed.data = value
        else:
            parsed.assignments.append((name, target, value))
    return parsed


def body_flag(message: Descriptor) -> str | None:
    """The flag that takes the whole body as JSON: ``data``, unless the request has such a field."""
    taken = {f.name for f in message.fields}
    return next((name for name in BODY_FLAGS if name not in taken), None)


def flag_specs(message: Descriptor, comments: Mapping[str, str] | None = None) -> list[FlagSpec]:
    """A flag per leaf field, nested messages expanded (``customer.address.city``)."""
    specs: list[FlagSpec] = []
    _collect(message, "", frozenset({message.full_name}), comments or {}, (), specs)
    return specs


def value_choices(message: Descriptor, name: str) -> list[str]:
    """The values a flag can only take (enum names, ``true``/``false``); empty for any other."""
    target = _resolve(message, name)
    if target is None:
        return []
    value = target.value_field
    if value.enum_type is not None:
        return [v.name for v in value.enum_type.values]
    return ["true", "false"] if type_label(value) == "bool" else []


def validate(message: Descriptor, body: Mapping[str, Any], *, what: str = "the request") -> None:
    """Check that ``body`` parses as ``message``; ``FlagError`` says where it does not."""
    from google.protobuf import json_format, message_factory

    try:
        json_format.ParseDict(dict(body), message_factory.GetMessageClass(message)())
    except (json_format.ParseError, ValueError, TypeError) as exc:
        first = str(exc).splitlines()[0].rstrip(".") if str(exc) else type(exc).__name__
        raise FlagError(f"{what} does not fit {message.full_name}: {_explain(message, first)}") from None


# -- resolving names ------------------------------------------------------------------------------


def _resolve(message: Descriptor, name: str) -> _Target | None:
    return _walk(message, name, (), 0)


def _walk(message: Descriptor, name: str, path: tuple[FieldDescriptor, ...], depth: int) -> _Target | None:
    if depth > MAX_DEPTH:
        return None
    for candidate in sorted(message.fields, key=lambda f: -len(f.name)):
        for alias in _aliases(candidate):
            if _canon(name[: len(alias)]) != alias:
                continue
            here = (*path, candidate)
            separator, rest = name[len(alias) : len(alias) + 1], name[len(alias) + 1 :]
            if not separator:
                return _Target(here)
            if separator not in ".-_":
                continue
            if _is_map(candidate):
                return _Target(here, key=rest)
            if _descends(candidate) and rest:
                assert candidate.message_type is not None
                found = _walk(candidate.message_type, rest, here, depth + 1)
                if found is not None:
                    return found
    return None


def _canon(name: str) -> str:
    return name.lower().replace("_", "-")


def _aliases(descriptor: FieldDescriptor) -> tuple[str, ...]:
    name = _canon(descriptor.name)
    camel = descriptor.json_name.lower()
    return (name,) if camel == name else (name, camel)


def _value_after(args: Sequence[str], i: int, token: str, target: _Target | None) -> tuple[str, int]:
    nxt = args[i] if i < len(args) else None
    if target is not None and _is_switch(target):
        if nxt is not None and nxt.lower() in ("true", "false"):
            return nxt, i + 1
        return "true", i
    if nxt is None or (nxt.startswith("--") and len(nxt) > 2):
        label = "JSON" if target is None else _label(target.value_field)
        raise FlagError(f"{token} needs a value ({label})")
    return nxt, i + 1


def _is_switch(target: _Target) -> bool:
    value = target.value_field
    repeated = target.key is None and value.is_repeated
    return not repeated and type_label(value) == "bool"


def _unknown_flag(message: Descriptor, name: str) -> str:
    names = [s.name for s in flag_specs(message)]
    body = body_flag(message)
    names += [body] if body else []
    match = difflib.get_close_matches(_canon(name), names, n=1, cutoff=0.5)
    suggestion = f"; did you mean --{match[0]}?" if match else ""
    return f"unknown flag --{name}{suggestion}"


def _explain(message: Descriptor, error: str) -> str:
    found = re.search(r'"([\w.]+)" has no field named "([^"]+)"', error)
    if found is None:
        return error
    owner, name = found[1], found[2]
    try:
        fields = [f.name for f in message.file.pool.FindMessageTypeByName(owner).fields]
    except KeyError:
        fields = []
    match = difflib.get_close_matches(name, fields, n=1)
    return f"{owner} has no field {name!r}" + (f"; did you mean {match[0]!r}?" if match else "")


# -- building the body ----------------------------------------------------------------------------


def _check_oneofs(
    target: _Target, flag: str, chosen: dict[tuple[tuple[str, ...], str], tuple[str, str]]
) -> None:
    names: list[str] = []
    for member in target.path:
        oneof = _real_oneof(member)
        if oneof is not None:
            first_field, first_flag = chosen.setdefault((tuple(names), oneof.name), (member.name, flag))
            if first_field != member.name:
                raise FlagError(f"--{first_flag} and --{flag} are both in oneof {oneof.name}: set only one")
        names.append(member.name)


def _assign(body: dict[str, Any], target: _Target, value: str) -> None:
    parent = body
    for step in target.path[:-1]:
        child = parent.setdefault(step.name, {})
        if not isinstance(child, dict):
            raise BadValue(f"{step.name} was already given as {json.dumps(child)}")
        parent = child
    leaf = target.path[-1]
    if target.key is not None:
        key_field, value_field = _map_fields(leaf)
        parent.setdefault(leaf.name, {})[_map_key(key_field, target.key)] = convert(value_field, value)
    elif _is_map(leaf):
        parent.setdefault(leaf.name, {}).update(_map_items(leaf, value))
    elif leaf.is_repeated:
        parent.setdefault(leaf.name, []).extend(_elements(leaf, value))
    elif _descends(leaf):
        assert leaf.message_type is not None
        parent[leaf.name] = _merge(leaf.message_type, parent.get(leaf.name) or {}, convert(leaf, value))
    else:
        parent[leaf.name] = convert(leaf, value)


def _map_items(leaf: FieldDescriptor, text: str) -> Iterable[tuple[str, Any]]:
    key_field, value_field = _map_fields(leaf)
    if text.lstrip().startswith("{"):
        try:
            items = json.loads(text)
        except ValueError:
            items = None
        if isinstance(items, dict):
            return items.items()
    key, eq, value = text.partition("=")
    if not eq:
        raise BadValue(f"{text!r} is not KEY=VALUE (nor a JSON object)")
    return [(_map_key(key_field, key), convert(value_field, value))]


def _map_key(key_field: FieldDescriptor, text: str) -> str:
    key = convert(key_field, text)
    return json.dumps(key) if isinstance(key, bool) else str(key)


def _elements(leaf: FieldDescriptor, text: str) -> list[Any]:
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except ValueError:
            items = None
        if isinstance(items, list):
            return [convert(leaf, item) if isinstance(item, str) else item for item in items]
    if type_label(leaf) in _WHOLE:
        return [convert(leaf, text)]
    return [convert(leaf, part) for part in text.split(",")]


def _merge(message: Descriptor, base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``top``'s fields on top: messages merge, anything else is replaced."""
    result = dict(base)
    for key, value in top.items():
        member = message.fields_by_name.get(key)
        if member is None:
            result[key] = value
            continue
        old = result.pop(member.json_name, None) if member.json_name != key else None
        old = result.get(key, old)
        oneof = _real_oneof(member)
        for sibling in oneof.fields if oneof is not None else ():
            if sibling.name != key:
                result.pop(sibling.name, None)
                result.pop(sibling.json_name, None)
        if _descends(member) and isinstance(old, dict) and isinstance(value, dict):
            assert member.message_type is not None
            value = _merge(member.message_type, old, value)
        elif _is_map(member) and isinstance(old, dict) and isinstance(value, dict):
            value = {**old, **value}
        result[key] = value
    return result


# -- help -----------------------------------------------------------------------------------------


def _collect(
    message: Descriptor,
    prefix: str,
    seen: frozenset[str],
    comments: Mapping[str, str],
    inherited: tuple[str, ...],
    out: list[FlagSpec],
) -> None:
    for member in message.fields:
        name = prefix + member.name.replace("_", "-")
        oneof = _real_oneof(member)
        markers = (*inherited, f"oneof {oneof.name}") if oneof is not None else inherited
        nested = member.message_type
        if _descends(member) and nested is not None and nested.fields:
            if nested.full_name not in seen and len(seen) < MAX_DEPTH:
                _collect(nested, name + ".", seen | {nested.full_name}, comments, markers, out)
                continue
        kind = ("map",) if _is_map(member) else ("repeated",) if member.is_repeated else ()
        out.append(FlagSpec(name, _label(member), (*kind, *markers), _help(member, comments)))


def _label(member: FieldDescriptor) -> str:
    if not _is_map(member):
        return type_label(member)
    key, value = (type_label(f) for f in _map_fields(member))
    return f"{'key' if key == 'string' else key}={'value' if value == 'string' else value}"


def _help(member: FieldDescriptor, comments: Mapping[str, str]) -> str:
    comment = " ".join(comments.get(member.full_name, "").split())
    how = hint(_map_fields(member)[1] if _is_map(member) else member)
    if type_label(member) == "bool" and member.is_repeated:
        how = ""
    if comment and how:
        return f"{comment} ({how})"
    return comment or how


# -- descriptors ----------------------------------------------------------------------------------


def _is_map(member: FieldDescriptor) -> bool:
    message = member.message_type
    return member.is_repeated and message is not None and message.GetOptions().map_entry


def _map_fields(member: FieldDescriptor) -> tuple[FieldDescriptor, FieldDescriptor]:
    entry = member.message_type
    assert entry is not None
    return entry.fields_by_name["key"], entry.fields_by_name["value"]


def _descends(member: FieldDescriptor) -> bool:
    """Whether ``--member.child`` flags reach into this field: a singular, ordinary message."""
    message = member.message_type
    return message is not None and not member.is_repeated and not is_well_known(message)


def _real_oneof(member: FieldDescriptor) -> OneofDescriptor | None:
    oneof = member.containing_oneof
    if oneof is None or (len(oneof.fields) == 1 and oneof.name == f"_{member.name}"):
        return None  # proto3 `optional` wraps its field in a synthetic oneof
    return oneof
