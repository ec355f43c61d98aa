"""What a client finds by itself: a token variable, else the owner's token for this home's own daemon only."""

from __future__ import annotations

import pytest

from micro.credentials import OwnerToken, RefreshingToken, StaticToken, from_environment
from micro_daemon.app import Daemon


async def test_the_owner_token_goes_to_this_homes_daemon(daemon: Daemon) -> None:
    assert isinstance(from_environment(daemon.address), OwnerToken)
    port = daemon.address.rpartition(":")[2]
    assert isinstance(from_environment(f"localhost:{port}"), OwnerToken)


async def test_never_to_another_daemon_on_this_machine(daemon: Daemon) -> None:
    assert from_environment("127.0.0.1:1") is None  # it may be another user's
    assert from_environment("10.0.0.5:8081") is None


def test_a_token_variable_comes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICRO_AUTH_TOKEN", "abc")
    assert isinstance(from_environment("127.0.0.1:1"), StaticToken)
    monkeypatch.setenv("MICRO_AUTH_REFRESH_TOKEN", "def")
    monkeypatch.setenv("MICRO_AUTH_TOKEN_EXPIRY", "1800000000")
    found = from_environment(None)
    assert isinstance(found, RefreshingToken) and found.tokens.refresh_token == "def"
