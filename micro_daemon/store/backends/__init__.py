"""Store engines, chosen by the scheme of ``MICRO_STORE_ADDRESS``.

Built-ins are listed in ``BUILTIN`` as import strings (imported only when
chosen); third-party engines register a factory under the ``micro.store``
entry-point group. A factory is ``async (address: str, data_dir: Path) ->
StoreBackend``.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from difflib import get_close_matches
from importlib.metadata import entry_points
from pathlib import Path
from typing import cast

from micro.errors import SetupError
from micro_daemon.store.backend import StoreBackend

__all__ = ["BUILTIN", "open_store"]

Factory = Callable[[str, Path], Awaitable[StoreBackend]]

BUILTIN: dict[str, str] = {
    "sqlite": "micro_daemon.store.backends.sqlite:open_sqlite",
    "memory": "micro_daemon.store.backends.memory:open_memory",
    "postgres": "micro_daemon.store.backends.postgres:open_postgres",
    "postgresql": "micro_daemon.store.backends.postgres:open_postgres",
}


async def open_store(address: str, data_dir: Path) -> StoreBackend:
    """Open the engine ``address`` names: ``sqlite`` (default; ``sqlite:///path``), ``memory``, ``postgres://...``."""
    scheme = address.split("://", 1)[0] if address else "sqlite"
    return await _factory(scheme)(address, data_dir)


def _factory(scheme: str) -> Factory:
    plugins = {ep.name: ep for ep in entry_points(group="micro.store")}
    if scheme in plugins:
        return cast(Factory, plugins[scheme].load())
    if scheme not in BUILTIN:
        known = sorted(BUILTIN.keys() | plugins.keys())
        hint = get_close_matches(scheme, known, n=1)
        suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
        raise SetupError(
            f"unknown store engine {scheme!r} in MICRO_STORE_ADDRESS.{suggestion} Known: {', '.join(known)}",
            id="micro.server",
        )
    module, _, name = BUILTIN[scheme].partition(":")
    return cast(Factory, getattr(importlib.import_module(module), name))
