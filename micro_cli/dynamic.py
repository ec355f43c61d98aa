"""Every service is a command: ``micro <service> [COMMAND] [--flags]`` (Micro §1, §2).

A first word that is no built-in command resolves, in this order, to

1. a ``micro-<word>`` program on PATH, run in micro's place with the remaining arguments;
2. a service of the current namespace, else of the building blocks (namespace ``micro``);
3. nothing: "Unrecognized micro command", exit 2, with the closest name suggested.

The service's registry entry comes from the schema cache when it is there, so
help needs no round trip; every call refreshes it. A cached entry that lacks
the command or flag asked for is refreshed once before that is an error.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn

from typer.core import TyperCommand

from micro.home import Home
from micro_cli.dynamic_names import UnknownCommand, endpoint_for
from micro_cli.schema_cache import FALLBACK_DOMAIN, CachedEndpoint, CachedService, SchemaCache
from micro_cli.session import connect, options, run, target

if TYPE_CHECKING:
    from google.protobuf.descriptor import Descriptor

    from micro.client import Client
    from micro_cli.dynamic_schema import Schema
    from micro_cli.flags import ParsedFlags

__all__ = ["DynamicCommand", "run_service_command", "split_words"]

HELP_FLAGS = ("-h", "--help")


class DynamicCommand(TyperCommand):
    """The command ``micro <word> ...`` for a first word that no built-in command has."""

    def __init__(self, name: str, builtins: Iterable[str] = ()) -> None:
        super().__init__(name, add_help_option=False, help=f"Call an endpoint of the {name} service.")
        self.word = name
        self.builtins = sorted(builtins)

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        ctx.args = list(args)  # all of them are the service's: read once its schema is known
        return list(args)

    def invoke(self, ctx: Any) -> None:
        run_service_command(self.word, list(ctx.args), self.builtins)

    def shell_complete(self, ctx: Any, incomplete: str) -> list[Any]:
        from micro_cli.dynamic_complete import complete_command

        return complete_command(self.word, list(ctx.args), incomplete)


def run_service_command(word: str, args: list[str], builtins: Sequence[str] = ()) -> None:
    """Run ``micro <word> <args>``: a ``micro-<word>`` program, or an endpoint of service ``word``."""
    program = shutil.which(f"micro-{word}")
    if program is not None:
        _exec(program, args)
    words, flags = split_words(args)
    lookup = _Lookup(word, builtins)
    service = lookup.cached or lookup.fetch()
    if not words:
        from micro_cli.dynamic_help import service_help
        from micro_cli.dynamic_schema import Schema

        print(service_help(word, Schema(service)))
        return
    wants_help = any(a in HELP_FLAGS for a in flags)
    plan = _prepare(lookup, service, words, flags, wants_help)
    if plan.parsed is None:
        from micro_cli.dynamic_help import endpoint_help

        print(endpoint_help(word, plan.endpoint, plan.schema))
        return
    run(_call(lookup, plan, refresh=plan.service is lookup.cached))


class _Plan(NamedTuple):
    service: CachedService
    endpoint: CachedEndpoint
    schema: Schema
    message: Descriptor | None = None
    parsed: ParsedFlags | None = None


class _Lookup:
    """A service's registry entry: from the cache, or from the registry (and then cached)."""

    def __init__(self, word: str, builtins: Sequence[str]) -> None:
        self.word = word
        self.builtins = builtins
        self.env, self.namespace = target()
        self.cache = SchemaCache.for_home(Home.from_env())
        self.cached = self.cache.find(self.env.name, self.namespace, word)

    def fetch(self) -> CachedService:
        """The entry from the registry; ``UnknownCommand`` if no namespace has the service."""
        if self.env.is_local and not _local_daemon_running():
            raise self._unrecognized([])  # nothing is registered where no daemon runs
        return run(self._fetch())

    async def _fetch(self) -> CachedService:
        async with connect() as client:
            found = await self.refresh(client)
            if found is None:
                raise self._unrecognized(await _service_names(client))
            return found

    async def refresh(self, client: Client) -> CachedService | None:
        """Look the service up again and update the cache; ``None`` if it is registered nowhere."""
        from micro.errors import NotFound
        from micro.registry import RegistryClient

        domains = [self.namespace] if self.namespace == FALLBACK_DOMAIN else [self.namespace, FALLBACK_DOMAIN]
        for domain in domains:
            try:
                versions = await RegistryClient(client, domain=domain).get_service(self.word)
            except NotFound:
                versions = []
            entries = [CachedService.from_registry(v, domain) for v in versions]
            if not entries:
                self.cache.forget(self.env.name, domain, self.word)
                continue
            if entries != [self.cached]:
                self.cache.save(self.env.name, domain, entries)
            return entries[0]
        return None

    def _unrecognized(self, services: Iterable[str]) -> UnknownCommand:
        cached = self.cache.service_names(self.env.name, {self.namespace, FALLBACK_DOMAIN})
        names = sorted({*self.builtins, *services, *cached} - {self.word})
        match = difflib.get_close_matches(self.word, names, n=1)
        suggestion = f" Did you mean '{match[0]}'?" if match else ""
        return UnknownCommand(
            f"Unrecognized micro command: {self.word}.{suggestion} "
            "See 'micro --help', and 'micro services' for the services."
        )


def _prepare(
    lookup: _Lookup, service: CachedService, words: list[str], flags: list[str], wants_help: bool
) -> _Plan:
    from micro.errors import MicroError
    from micro_cli.errors import HandledError
    from micro_cli.flags import UnknownFlag

    try:
        return _plan(lookup.word, service, words, flags, wants_help)
    except (UnknownCommand, UnknownFlag) as error:
        if service is not lookup.cached:
            raise
        try:
            fresh = lookup.fetch()  # the cache may predate the command or flag
        except (MicroError, HandledError):
            raise error from None  # no fresher entry to be had: the first answer stands
        if fresh == service:
            raise
        return _plan(lookup.word, fresh, words, flags, wants_help)


def _plan(word: str, service: CachedService, words: list[str], flags: list[str], wants_help: bool) -> _Plan:
    from micro_cli.dynamic_schema import Schema
    from micro_cli.flags import parse_flags

    name = endpoint_for(word, words, [e.name for e in service.endpoints])
    endpoint = next(e for e in service.endpoints if e.name == name)
    schema = Schema(service)
    if wants_help:
        return _Plan(service, endpoint, schema)
    message = schema.request(endpoint)
    return _Plan(service, endpoint, schema, message, parse_flags(message, flags))


async def _call(lookup: _Lookup, plan: _Plan, *, refresh: bool) -> None:
    import asyncio

    from micro_cli.dynamic_call import call_endpoint
    from micro_cli.flags import validate

    assert plan.parsed is not None and plan.message is not None
    parsed, endpoint = plan.parsed, plan.endpoint
    one = None
    if endpoint.stream not in ("client", "bidi") or not (parsed.empty or parsed.data == "-"):
        body = parsed.body(stdin=sys.stdin.read)
        if parsed.unchecked:
            validate(plan.message, body)
        one = json.dumps(body).encode()
    async with connect() as client:
        refreshing = asyncio.create_task(lookup.refresh(client)) if refresh else None
        try:
            await call_endpoint(
                client, lookup.word, endpoint.name, endpoint.stream, plan.message, one, parsed
            )
        finally:
            if refreshing is not None:
                await asyncio.gather(refreshing, return_exceptions=True)


async def _service_names(client: Client) -> list[str]:
    from micro.errors import MicroError
    from micro.registry import RegistryClient

    names: set[str] = set()
    for domain in {client.namespace, FALLBACK_DOMAIN}:
        try:
            names.update(s.name for s in await RegistryClient(client, domain=domain).list_services())
        except MicroError:
            continue
    return sorted(names)


def split_words(args: list[str]) -> tuple[list[str], list[str]]:
    """Command words lead; everything from the first flag on is flags."""
    for i, arg in enumerate(args):
        if arg.startswith("-"):
            return args[:i], args[i:]
    return args, []


def _exec(program: str, args: list[str]) -> NoReturn:
    env = dict(os.environ)
    if options.env:
        env["MICRO_ENV"] = options.env
    if options.namespace:
        env["MICRO_NAMESPACE"] = options.namespace
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(program, [program, *args], env)


def _local_daemon_running() -> bool:
    home = Home.from_env()
    return home.read_state() is not None and home.daemon_running()
