"""Which engine backs each building block, chosen by profile and address.

Every block (store, events, broker, registry) has a table of engines by the
scheme of its address (``MICRO_STORE_ADDRESS=postgres://…``), as import
strings loaded only when chosen; third-party engines register a factory in
the entry-point group ``micro.<block>``. A factory is
``async (address: str, data_dir: Path) -> backend``.

Profiles give the defaults: ``local`` keeps everything on this machine
(SQLite files and memory); ``platform`` uses engines several daemons share
and has no defaults: each address must be given, so a missing one stops
start-up naming the variable to set.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Awaitable, Callable
from difflib import get_close_matches
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, cast

from micro.errors import SetupError

__all__ = ["BLOCKS", "ENGINES", "PROFILES", "open_engine", "redact"]

Factory = Callable[[str, Path], Awaitable[Any]]

ENGINES: dict[str, dict[str, str]] = {
    "store": {
        "sqlite": "micro_daemon.store.backends.sqlite:open_sqlite",
        "memory": "micro_daemon.store.backends.memory:open_memory",
        "postgres": "micro_daemon.store.backends.postgres:open_postgres",
        "postgresql": "micro_daemon.store.backends.postgres:open_postgres",
    },
    "events": {
        "sqlite": "micro_daemon.events.sqlite:open_sqlite",
        "nats": "micro_daemon.events.jetstream:open_jetstream",
    },
    "broker": {
        "memory": "micro_daemon.broker.memory:open_memory",
        "nats": "micro_daemon.broker.nats:open_nats",
    },
    "registry": {
        "memory": "micro_daemon.registry.memory:open_memory",
        "nats": "micro_daemon.registry.nats_kv:open_nats_kv",
    },
}
BLOCKS = tuple(ENGINES)

PROFILES: dict[str, dict[str, str]] = {
    "local": {"store": "sqlite", "events": "sqlite", "broker": "memory", "registry": "memory"},
    "platform": {},
}


async def open_engine(block: str, address: str, profile: str, data_dir: Path) -> Any:
    """Open ``block``'s engine for ``address`` (empty: the profile's default)."""
    address = address or PROFILES[profile].get(block, "")
    if not address:
        raise SetupError(
            f"profile {profile!r} needs an address for the {block}: set MICRO_{block.upper()}_ADDRESS "
            f"(e.g. {_EXAMPLES[block]})",
            id="micro.server",
        )
    scheme = address.split("://", 1)[0]
    factory = _factory(block, scheme)
    try:
        return await factory(address, data_dir)
    except SetupError as exc:
        if re.search(rf"(^|\s){block}\b", exc.detail, re.IGNORECASE):
            raise
        # An engine shared by several blocks (NATS) may not say which one it was opened for.
        raise SetupError(f"{block}: {exc.detail}", id=exc.id) from exc


def redact(address: str) -> str:
    """``address`` without a password, for banners and messages."""
    scheme, sep, rest = address.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return address
    credentials, _, host = rest.partition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user + '@' if user else ''}{host}"


_EXAMPLES = {
    "store": "postgres://user@db:5432/micro",
    "events": "nats://nats:4222",
    "broker": "nats://nats:4222",
    "registry": "nats://nats:4222",
}


def _factory(block: str, scheme: str) -> Factory:
    plugins = {ep.name: ep for ep in entry_points(group=f"micro.{block}")}
    if scheme in plugins:
        return cast(Factory, plugins[scheme].load())
    builtin = ENGINES[block]
    if scheme not in builtin:
        known = sorted(builtin.keys() | plugins.keys())
        hint = get_close_matches(scheme, known, n=1)
        suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
        raise SetupError(
            f"unknown {block} engine {scheme!r} in MICRO_{block.upper()}_ADDRESS.{suggestion} "
            f"Known: {', '.join(known)}",
            id="micro.server",
        )
    module, _, name = builtin[scheme].partition(":")
    return cast(Factory, getattr(importlib.import_module(module), name))
