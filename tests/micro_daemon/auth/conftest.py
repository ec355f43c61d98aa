"""Fixtures of the auth tests: one signing key per session, a fake clock, an engine on the memory store."""

from __future__ import annotations

import pytest

from micro.context import Context
from micro_daemon.auth.engine import AuthEngine
from micro_daemon.auth.keys import KeyPair
from micro_daemon.auth.passwords import SecretHasher
from micro_daemon.auth.throttle import Throttle
from micro_daemon.store.backends.memory import MemoryBackend

START = 1_800_000_000.0


class Clock:
    """Unix seconds that move only when told to."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="session")
def keys() -> KeyPair:
    return KeyPair.generate()


@pytest.fixture(scope="session")
def other_keys() -> KeyPair:
    return KeyPair.generate(2048)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store() -> MemoryBackend:
    return MemoryBackend()


@pytest.fixture
def engine(store, keys, clock) -> AuthEngine:
    # a cheap scrypt cost keeps the suite fast; test_passwords checks the real one
    return AuthEngine(store, keys, hasher=SecretHasher(n=2**4), throttle=Throttle(clock=clock), clock=clock)


def context(token: str | None = None, *, namespace: str = "micro", address: str = "") -> Context:
    """The Context of a call carrying ``authorization: Bearer <token>``."""
    metadata = {}
    if token is not None:
        metadata["authorization"] = f"Bearer {token}"
    if address:
        metadata["micro-remote-address"] = address
    return Context(namespace=namespace, metadata=metadata)


async def sign_in(engine: AuthEngine, namespace: str, id: str, secret: str) -> str:
    return (await engine.token(namespace, id=id, secret=secret)).access_token


async def admin_token(engine: AuthEngine) -> str:
    """A token of the default admin of namespace micro."""
    return await sign_in(engine, "micro", "admin", "micro")
