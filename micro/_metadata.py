"""The metadata keys micro puts on every call, and the JSON callers' path convention."""

from __future__ import annotations

__all__ = [
    "AUTHORIZATION_KEY",
    "CODEC_KEY",
    "NAMESPACE_KEY",
    "REMOTE_ADDRESS_KEY",
    "SERVICE_KEY",
    "json_path",
]

CODEC_KEY = "micro-codec"
SERVICE_KEY = "micro-service"
NAMESPACE_KEY = "micro-namespace"
AUTHORIZATION_KEY = "authorization"
# Set by the server from the peer it sees; whatever a caller sends under it is overwritten.
REMOTE_ADDRESS_KEY = "micro-remote-address"


def json_path(endpoint: str) -> str:
    """The path a JSON caller uses for ``Handler.Method``: ``/Handler/Method``."""
    return "/" + endpoint.replace(".", "/", 1)
