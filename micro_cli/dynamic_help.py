"""Help for services and endpoints, written from the registered schema and its proto comments."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from micro_cli.dynamic_names import command_words
from micro_cli.flags import body_flag, flag_specs
from micro_cli.schema_cache import CachedEndpoint

if TYPE_CHECKING:
    from google.protobuf.descriptor import Descriptor

    from micro_cli.dynamic_schema import Schema

__all__ = ["endpoint_help", "service_help"]

_WIDEST = 36  # a longer flag pushes its help text out of the column, not the whole column out
_STREAM_NOTES = {
    "server": "[streams responses]",
    "client": "[reads JSON lines from stdin]",
    "bidi": "[JSON lines in, responses out]",
}


def service_help(word: str, schema: Schema) -> str:
    """``micro <service>``: its commands with the first line of their proto comments."""
    service = schema.service
    rows = []
    for endpoint in sorted(service.endpoints, key=lambda e: _order(word, e)):
        note = _STREAM_NOTES.get(endpoint.stream, "")
        text = " ".join(part for part in (schema.summary(endpoint) if service.schema else "", note) if part)
        rows.append((" ".join(command_words(word, endpoint.name)), text))
    own = [e.name.partition(".")[0] for e in service.endpoints if len(command_words(word, e.name)) == 1]
    about = schema.handler_comment(own[0]) if own and service.schema else ""
    lines = [f"Usage: micro {word} COMMAND [FLAGS]", ""]
    if about:
        lines += [_indent(about), ""]
    lines += ["Commands:", *_columns(rows)] if rows else [f"  {word} has no endpoints."]
    lines += [
        "",
        f"Service {service.name}, version {service.version or '-'}, namespace {service.namespace}.",
        f"Run 'micro {word} COMMAND --help' for the flags of a command.",
    ]
    return "\n".join(lines)


def endpoint_help(word: str, endpoint: CachedEndpoint, schema: Schema) -> str:
    """``micro <service> <command> --help``: each flag with its type, markers and comment."""
    message = schema.request(endpoint)
    command = " ".join(command_words(word, endpoint.name))
    rows = []
    specs = flag_specs(message, schema.comments)
    for spec in specs:
        markers = "".join(f" ({m})" for m in spec.markers)
        rows.append((f"--{spec.name} {spec.type}{markers}", spec.help))
    body = body_flag(message)
    if body:
        rows.append(
            (f"--{body} JSON", "the whole request as JSON ('-' reads stdin, @FILE a file); flags override it")
        )
    rows.append(("-h, --help", "show this help"))
    lines = [f"Usage: micro {word} {command} [FLAGS]", ""]
    description = schema.description(endpoint)
    if description:
        lines += [_indent(description), ""]
    lines += ["Flags:", *_columns(rows), "", *_notes(word, endpoint, message)]
    if any(m in ("repeated", "map") for spec in specs for m in spec.markers):
        lines.append("Repeated fields: repeat the flag or give a comma list; maps: --flag key=value.")
    return "\n".join(lines)


def _notes(word: str, endpoint: CachedEndpoint, message: Descriptor) -> list[str]:
    notes = [f"Calls {endpoint.name} of {word} ({message.full_name} in, {endpoint.response or '?'} out)."]
    if endpoint.stream in ("client", "bidi"):
        notes.append("Requests are JSON objects, one per line on stdin, unless flags give the one request.")
    if endpoint.stream in ("server", "bidi"):
        notes.append("Each response is printed as it arrives.")
    return notes


def _order(word: str, endpoint: CachedEndpoint) -> tuple[int, str]:
    words = command_words(word, endpoint.name)
    return (len(words), " ".join(words))


def _columns(rows: Sequence[tuple[str, str]]) -> list[str]:
    width = min(max(len(left) for left, _ in rows), _WIDEST)
    lines = []
    for left, right in rows:
        if not right:
            lines.append(f"  {left}")
        elif len(left) > width:
            lines.append(f"  {left}  {right}")
        else:
            lines.append(f"  {left.ljust(width)}  {right}")
    return lines


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" if line else "" for line in text.splitlines())
