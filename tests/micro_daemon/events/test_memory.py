from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from micro.testing.messaging import EventsContract
from micro_daemon.events.backend import EventsBackend, Retention
from micro_daemon.events.memory import MemoryEvents


class TestMemoryEvents(EventsContract):
    @pytest.fixture
    async def events(self) -> AsyncIterator[EventsBackend]:
        events = MemoryEvents()
        yield events
        await events.close()

    async def reopen(self, events: EventsBackend, retention: Retention | None = None) -> EventsBackend:
        assert isinstance(events, MemoryEvents)
        await events.close()
        return MemoryEvents(events.data, retention=retention)
