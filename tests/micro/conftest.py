"""Fixtures of the framework's tests: a client of the plugin's in-process ``daemon``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from micro.client import Client
from micro.transport import connect
from micro_daemon.app import Daemon

WAIT = 5.0


@pytest.fixture
async def client(daemon: Daemon) -> AsyncIterator[Client]:
    """A client of the daemon, as its local owner, with a short timeout."""
    client = Client(connect(daemon.address), timeout=WAIT)
    yield client
    await client.close()
