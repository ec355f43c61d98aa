"""Test-wide guards and the test protos, compiled once per session."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from micro.testing.protos import compile_protos, import_compiled

PROTOS = Path(__file__).resolve().parent / "protos"

# Started in the background of a non-interactive shell (`cmd &`), this process inherits SIGINT
# ignored, and so would the CLI processes the tests stop with Ctrl-C. Catch it again: a caught
# signal is back to its default in a child, where Python turns it into KeyboardInterrupt.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


KEEPER_STREAM = "MICRO_TESTS_KEEPER"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Keep one stream on the shared NATS for good: nats-server 2.9 removes an account's folder
    with its last stream, and a stream another test worker creates meanwhile then fails with
    "error creating store for stream" (mkdir .../$G/streams: no such file). Tests delete their
    own streams, so without this one the count reaches 0 now and then. Nothing if NATS is away."""
    asyncio.run(_keep_a_stream(os.environ.get("MICRO_TEST_NATS", "nats://127.0.0.1:4222")))


async def _keep_a_stream(url: str) -> None:
    import nats

    with contextlib.suppress(Exception):
        connection = await nats.connect(
            url, connect_timeout=2, allow_reconnect=False, max_reconnect_attempts=0
        )
        try:
            await connection.jetstream().add_stream(name=KEEPER_STREAM, subjects=["micro_tests_keeper"])
        finally:
            await connection.close()


@pytest.fixture(autouse=True)
def check_environ_stable() -> Iterator[None]:
    before = dict(os.environ)
    yield
    after = dict(os.environ)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    changed.discard("PYTEST_CURRENT_TEST")
    assert not changed, f"test changed environment variables: {sorted(changed)}"


@pytest.fixture(scope="session")
def compiled_protos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tests/protos/*.proto`` compiled into one folder."""
    out = tmp_path_factory.mktemp("protos")
    compile_protos(PROTOS, out, "greeter.proto", "kitchen.proto")
    return out


@pytest.fixture(scope="session")
def greeter_pb2(compiled_protos: Path) -> ModuleType:
    """``tests/protos/greeter.proto``: a service with every call shape."""
    return import_compiled(compiled_protos, "greeter_pb2")


@pytest.fixture(scope="session")
def kitchen_pb2(compiled_protos: Path) -> ModuleType:
    """``tests/protos/kitchen.proto``: a request with every kind of field."""
    return import_compiled(compiled_protos, "kitchen_pb2")
