"""micro for Python: the framework service authors import."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
