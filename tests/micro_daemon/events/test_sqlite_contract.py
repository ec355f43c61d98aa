from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from micro.testing.messaging import EventsContract
from micro_daemon.events.backend import EventsBackend, Retention
from micro_daemon.events.sqlite import SQLiteEvents


class TestSQLiteEvents(EventsContract):
    @pytest.fixture
    async def events(self, tmp_path: Path) -> AsyncIterator[EventsBackend]:
        events = await SQLiteEvents(tmp_path / "events.db").open()
        yield events
        await events.close()

    async def reopen(self, events: EventsBackend, retention: Retention | None = None) -> EventsBackend:
        assert isinstance(events, SQLiteEvents)
        await events.close()
        return await SQLiteEvents(events.path, retention=retention).open()
