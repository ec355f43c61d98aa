"""Shell completion of services, their commands and their flags, from the schema cache alone."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from micro.home import Home
from micro_cli.dynamic import split_words
from micro_cli.dynamic_names import command_words, endpoint_for
from micro_cli.schema_cache import FALLBACK_DOMAIN, CachedService, SchemaCache
from micro_cli.session import target

__all__ = ["complete_command", "complete_services"]


def complete_services(incomplete: str, exclude: Iterable[str] = ()) -> list[Any]:
    """Shell completion of a first word: the services in the schema cache."""
    try:
        env, namespace = target()
        names = SchemaCache.for_home(Home.from_env()).service_names(env.name, {namespace, FALLBACK_DOMAIN})
    except Exception:  # completion runs inside the shell: it must never print a traceback there
        return []
    skip = set(exclude)
    return _items((n, "service") for n in names if n.startswith(incomplete) and n not in skip)


def complete_command(word: str, args: list[str], incomplete: str) -> list[Any]:
    """Shell completion after ``micro <word>``: command words, then flags, then enum values."""
    return _items(_complete(word, args, incomplete))


def _complete(word: str, args: list[str], incomplete: str) -> list[tuple[str, str]]:
    try:
        env, namespace = target()
        service = SchemaCache.for_home(Home.from_env()).find(env.name, namespace, word)
        if service is None:
            return []
        words, flags = split_words(args)
        if incomplete.startswith("-") or flags:
            return _complete_flags(word, service, words, flags, incomplete)
        return _complete_words(word, service, words, incomplete)
    except Exception:  # completion runs inside the shell: it must never print a traceback there
        return []


def _complete_words(
    word: str, service: CachedService, words: list[str], incomplete: str
) -> list[tuple[str, str]]:
    from micro_cli.dynamic_schema import Schema

    schema = Schema(service)
    found: dict[str, str] = {}
    for endpoint in service.endpoints:
        spelled = command_words(word, endpoint.name)
        if len(spelled) > len(words) and list(spelled[: len(words)]) == words:
            nxt = spelled[len(words)]
            last = len(spelled) == len(words) + 1
            found.setdefault(nxt, schema.summary(endpoint) if last and service.schema else "")
    return sorted((w, h) for w, h in found.items() if w.startswith(incomplete))


def _complete_flags(
    word: str, service: CachedService, words: list[str], flags: list[str], incomplete: str
) -> list[tuple[str, str]]:
    from micro_cli.dynamic_schema import Schema
    from micro_cli.flags import body_flag, flag_specs, value_choices

    endpoint_name = endpoint_for(word, words, [e.name for e in service.endpoints])
    endpoint = next(e for e in service.endpoints if e.name == endpoint_name)
    schema = Schema(service)
    message = schema.request(endpoint)
    if not incomplete.startswith("-") and flags and "=" not in flags[-1]:
        return [
            (v, "") for v in value_choices(message, flags[-1][2:]) if v.lower().startswith(incomplete.lower())
        ]
    pairs = [(f"--{s.name}", s.help) for s in flag_specs(message, schema.comments)]
    body = body_flag(message)
    pairs += [(f"--{body}", "the whole request as JSON")] if body else []
    return [(name, text) for name, text in pairs if name.startswith(incomplete)]


def _items(pairs: Iterable[tuple[str, str]]) -> list[Any]:
    from typer._click.shell_completion import CompletionItem  # typer exports no name for it

    return [CompletionItem(value, help=text or None) for value, text in pairs]
