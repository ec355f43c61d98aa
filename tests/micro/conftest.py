from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

PROTOS = Path(__file__).resolve().parent.parent / "protos"


@pytest.fixture(scope="session")
def greeter_pb2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """``tests/protos/greeter.proto`` compiled once and imported as ``greeter_pb2``."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("greeter")
    assert protoc.main(["protoc", f"-I{PROTOS}", f"--python_out={out}", str(PROTOS / "greeter.proto")]) == 0
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module("greeter_pb2")
    finally:
        sys.path.remove(str(out))
