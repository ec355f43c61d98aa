"""The metadata keys micro puts on every call, and the JSON callers' path convention."""

from __future__ import annotations

__all__ = ["CODEC_KEY", "NAMESPACE_KEY", "SERVICE_KEY", "json_path"]

CODEC_KEY = "micro-codec"
SERVICE_KEY = "micro-service"
NAMESPACE_KEY = "micro-namespace"


def json_path(endpoint: str) -> str:
    """The path a JSON caller uses for ``Handler.Method``: ``/Handler/Method``."""
    return "/" + endpoint.replace(".", "/", 1)
