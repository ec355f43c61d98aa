"""Store engines: ``sqlite`` (default), ``memory`` and ``postgres``; chosen in ``micro_daemon.engines``."""

from __future__ import annotations

from pathlib import Path

from micro_daemon.store.backend import StoreBackend

__all__ = ["open_store"]


async def open_store(address: str, data_dir: Path) -> StoreBackend:
    """Open the store engine ``address`` names (empty: SQLite in ``data_dir``)."""
    from micro_daemon.engines import open_engine

    backend: StoreBackend = await open_engine("store", address, "local", data_dir)
    return backend
