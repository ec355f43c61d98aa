"""Command words to endpoints and back (Micro §2.3-2.4).

``micro helloworld call`` names ``Helloworld.Call``: each word gets its first
letter upper-cased (``micro registry getService`` is ``Registry.GetService``),
and three words name a handler other than the service's own
(``micro events stream publish`` is ``Stream.Publish``). Words also match the
registered endpoints regardless of case, ``-`` and ``_`` (``get-service``).
Help shows an endpoint as kebab-case words, its handler left out when that is
the service's own: ``Helloworld.PingPong`` is ``ping-pong``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence

from micro_cli.errors import HandledError

__all__ = ["UnknownCommand", "command_words", "endpoint_for", "kebab", "micro_endpoint"]

_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


class UnknownCommand(HandledError):
    """A command word that names no built-in command, service or endpoint: exit 2."""

    exit_code = 2


def kebab(name: str) -> str:
    """``PingPong`` → ``ping-pong``, ``GetHTTPServer`` → ``get-http-server``."""
    return _BOUNDARY.sub("-", name).replace("_", "-").lower()


def micro_endpoint(service: str, words: Sequence[str]) -> str:
    """The endpoint Micro builds from the words: each capitalised, joined by a dot."""
    parts = [service, *words][-2:] if len(words) < 2 else list(words)
    if len(parts) < 2:
        parts.append("call")
    return ".".join(p[:1].upper() + p[1:] for p in parts)


def command_words(service: str, endpoint: str) -> tuple[str, ...]:
    """How help shows ``Handler.Method`` of ``service``: ``("call",)`` or ``("debug", "health")``."""
    handler, _, method = endpoint.partition(".")
    if _norm(handler) == _norm(service):
        return (kebab(method),)
    return (kebab(handler), kebab(method))


def endpoint_for(service: str, words: Sequence[str], endpoints: Iterable[str]) -> str:
    """The registered endpoint the words name. ``UnknownCommand`` lists the valid commands."""
    names = list(endpoints)
    if len(words) > 2:
        raise UnknownCommand(
            f"too many words: 'micro {service} {' '.join(words)}'; a command is one or two words "
            f"({_listing(service, names)})"
        )
    exact = micro_endpoint(service, words)
    if exact in names:
        return exact
    handler, _, method = exact.partition(".")
    for name in sorted(names):
        their_handler, _, their_method = name.partition(".")
        if (_norm(their_handler), _norm(their_method)) == (_norm(handler), _norm(method)):
            return name
    raise UnknownCommand(_not_found(service, words, names))


def _norm(word: str) -> str:
    return word.replace("-", "").replace("_", "").lower()


def _not_found(service: str, words: Sequence[str], names: list[str]) -> str:
    typed = " ".join(words)
    commands = [" ".join(command_words(service, n)) for n in names]
    match = difflib.get_close_matches(typed.lower(), commands, n=1, cutoff=0.5)
    suggestion = f"; did you mean '{match[0]}'?" if match else ""
    return f"no command '{typed}' in service {service}{suggestion} ({_listing(service, names)})"


def _listing(service: str, names: list[str]) -> str:
    commands = sorted(" ".join(command_words(service, n)) for n in names)
    return f"its commands: {', '.join(commands)}" if commands else "it has no endpoints"
