"""The metadata keys micro puts on every call, and the JSON callers' path convention."""

from __future__ import annotations

__all__ = [
    "AUTHORIZATION_KEY",
    "CODEC_KEY",
    "NAMESPACE_KEY",
    "RELAY_KEY",
    "REMOTE_ADDRESS_KEY",
    "SERVICE_KEY",
    "json_path",
]

CODEC_KEY = "micro-codec"
SERVICE_KEY = "micro-service"
NAMESPACE_KEY = "micro-namespace"
AUTHORIZATION_KEY = "authorization"
# Set by the server from the peer it sees; whatever a caller sends under it is overwritten,
# unless the call came through the daemon's relay, which vouches for it with RELAY_KEY.
REMOTE_ADDRESS_KEY = "micro-remote-address"
# The secret the daemon's relay and its own gRPC server share (never forwarded to services).
RELAY_KEY = "micro-relay"


def json_path(endpoint: str) -> str:
    """The path a JSON caller uses for ``Handler.Method``: ``/Handler/Method``."""
    return "/" + endpoint.replace(".", "/", 1)
