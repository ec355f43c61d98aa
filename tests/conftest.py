"""Test-wide guards and the test protos, compiled once per session."""

from __future__ import annotations

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
