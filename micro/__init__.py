"""micro for Python: the framework service authors import.

``from micro import Service, Context, errors`` is all a service needs; see
``micro.service`` for a complete example. Names are loaded on first use, so
``import micro`` stays cheap for the CLI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "Client",
    "Context",
    "Service",
    "__version__",
    "current_service",
    "errors",
]

_LAZY = {
    "Client": "micro.client",
    "Context": "micro.context",
    "Service": "micro.service",
    "current_service": "micro.service",
    "errors": "micro.errors",
}

if TYPE_CHECKING:
    from micro import errors
    from micro.client import Client
    from micro.context import Context
    from micro.service import Service, current_service


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'micro' has no attribute {name!r}")
    loaded = importlib.import_module(module)
    return loaded if name == "errors" else getattr(loaded, name)
