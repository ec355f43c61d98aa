"""Fixtures shared by the daemon's backend tests."""

from __future__ import annotations

import os
import socket
import urllib.parse

import pytest


@pytest.fixture(scope="session")
def nats_url() -> str:
    """``MICRO_TEST_NATS`` or the local server; fails (never skips) when it does not answer."""
    url = os.environ.get("MICRO_TEST_NATS", "nats://127.0.0.1:4222")
    parts = urllib.parse.urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 4222), timeout=3) as sock:
            assert sock.recv(4) == b"INFO"
    except (OSError, AssertionError) as exc:
        pytest.fail(
            f"NATS with JetStream is needed for these tests and {url} did not answer ({exc}).\n"
            "Start it (`start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- "
            "-a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server`) or set MICRO_TEST_NATS.",
            pytrace=False,
        )
    return url
