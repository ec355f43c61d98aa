"""What the gateway reads of the proxy's directory beyond its public API.

The proxy routes by exact endpoint name; the gateway also needs a domain's
targets (for explicit routes) and a target's registered endpoints (to match
names case-insensitively and read their metadata). Kept here, in one place,
until ``Directory`` and ``Target`` expose them.
"""

from __future__ import annotations

from collections.abc import Mapping

from micro.proto import registry_pb2
from micro_daemon.proxy.directory import Directory, Target

__all__ = ["domain_targets", "registered_endpoints"]


def domain_targets(directory: Directory, domain: str) -> Mapping[str, Target] | None:
    """The targets of ``domain`` by name, or ``None`` while it is not loaded."""
    loaded = directory._domains.get(domain)
    if loaded is None or not loaded.ready.is_set():
        return None
    return loaded.targets


def registered_endpoints(target: Target) -> list[registry_pb2.Endpoint]:
    """Every endpoint of every live version of ``target``, newest registration last."""
    return [endpoint for service, _ in target._versions.values() for endpoint in service.endpoints]
