"""Compiling protos in tests, the way the runtime's builder does (well-known types included)."""

from __future__ import annotations

import importlib
import sys
from importlib import resources
from pathlib import Path
from types import ModuleType

__all__ = ["compile_protos", "import_compiled"]


def compile_protos(source: Path, out: Path, *names: str) -> None:
    """Compile ``names`` (relative to ``source``) into Python modules in ``out``."""
    from grpc_tools import protoc

    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "protoc",
        f"-I{source}",
        f"-I{well_known}",
        f"--python_out={out}",
        *(str(source / n) for n in names),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(names)} in {source}")


def import_compiled(out: Path, module: str) -> ModuleType:
    """Import ``module`` from ``out`` (added to ``sys.path`` for good: the pool keeps its files anyway)."""
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    return importlib.import_module(module)
