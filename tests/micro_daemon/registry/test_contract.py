from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from micro.testing.registry import RegistryContract
from micro_daemon.registry.backend import RegistryBackend
from micro_daemon.registry.memory import MemoryRegistry


class TestMemoryRegistry(RegistryContract):
    @pytest.fixture
    async def registry(self) -> AsyncIterator[RegistryBackend]:
        backend = MemoryRegistry(watch_buffer=self.watch_buffer)
        yield backend
        await backend.close()
