"""Registry entries kept on disk, so a service's help and flags need no round trip.

One file per version of a service, under the data directory::

    <data_dir>/cache/services/<environment>/<namespace>/<service>/<version>.json

Each holds what the CLI needs of the registry entry: its endpoints (name,
request and response type, metadata), the namespace it was found in and its
schema (a base64 ``FileDescriptorSet``). Reading it imports no protobuf, so
shell completion stays fast. The cache is best effort: a file that cannot be
read is a miss, one that cannot be written is skipped.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

from micro.errors import MicroError
from micro.home import Home, write_private

if TYPE_CHECKING:
    from micro.proto import registry_pb2

__all__ = ["CachedEndpoint", "CachedService", "SchemaCache"]

FALLBACK_DOMAIN = "micro"
_NO_METADATA: Mapping[str, str] = MappingProxyType({})
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]|^\.")


class CachedEndpoint(NamedTuple):  # NamedTuples: a dataclass costs 0.5 ms of start-up to define
    """One endpoint of a registry entry: ``Handler.Method`` and its message types."""

    name: str
    request: str = ""
    response: str = ""
    metadata: Mapping[str, str] = _NO_METADATA

    @property
    def stream(self) -> str:
        """``""`` for a unary endpoint, else ``server``, ``client`` or ``bidi``."""
        return self.metadata.get("stream", "")


class CachedService(NamedTuple):
    """One version of a service as the dynamic commands use it."""

    name: str
    version: str
    namespace: str
    endpoints: tuple[CachedEndpoint, ...] = ()
    schema: bytes = b""

    @classmethod
    def from_registry(cls, entry: registry_pb2.Service, namespace: str) -> CachedService:
        endpoints = tuple(
            CachedEndpoint(e.name, e.request.type, e.response.type, dict(e.metadata)) for e in entry.endpoints
        )
        return cls(entry.name, entry.version, namespace, endpoints, entry.schema)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CachedService:
        endpoints = tuple(
            CachedEndpoint(e["name"], e.get("request", ""), e.get("response", ""), e.get("metadata", {}))
            for e in data.get("endpoints", ())
        )
        schema = base64.b64decode(data.get("schema", ""))
        return cls(data["name"], data.get("version", ""), data.get("namespace", ""), endpoints, schema)

    def to_json(self, rank: int = 0) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "namespace": self.namespace,
            "rank": rank,
            "endpoints": [
                {"name": e.name, "request": e.request, "response": e.response, "metadata": dict(e.metadata)}
                for e in self.endpoints
            ],
            "schema": base64.b64encode(self.schema).decode(),
        }


class SchemaCache:
    """The cached registry entries of every environment and namespace."""

    def __init__(self, root: Path, home: Home | None = None) -> None:
        self.root = root
        self._home = home

    @classmethod
    def for_home(cls, home: Home) -> SchemaCache:
        return cls(home.data_dir / "cache" / "services", home)

    def find(self, env: str, namespace: str, service: str) -> CachedService | None:
        """The entry of ``service`` in ``namespace``, else among the building blocks."""
        found = self.load(env, namespace, service)
        if found is None and namespace != FALLBACK_DOMAIN:
            found = self.load(env, FALLBACK_DOMAIN, service)
        return found

    def load(self, env: str, namespace: str, service: str) -> CachedService | None:
        """The first version the registry listed when the entry was last saved."""
        best: tuple[int, CachedService] | None = None
        for path in _files(self._dir(env, namespace, service)):
            try:
                data = json.loads(path.read_text())
                entry = (int(data.get("rank", 0)), CachedService.from_json(data))
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if best is None or entry[0] < best[0]:
                best = entry
        return best[1] if best else None

    def save(self, env: str, namespace: str, versions: Sequence[CachedService]) -> None:
        """Replace the cached versions of a service with ``versions`` (all of one name)."""
        if not versions:
            return
        folder = self._dir(env, namespace, versions[0].name)
        try:
            self._make(folder)
            keep = set()
            for rank, version in enumerate(versions):
                path = folder / f"{_safe(version.version or 'latest')}.json"
                data = json.dumps(version.to_json(rank)).encode()
                if not _holds(path, data):  # most refreshes change nothing: spare the fsync
                    write_private(path, data)
                keep.add(path)
            for stale in set(_files(folder)) - keep:
                stale.unlink(missing_ok=True)
        except (OSError, MicroError):
            pass  # a cache that cannot be written only costs a round trip next time

    def forget(self, env: str, namespace: str, service: str) -> None:
        shutil.rmtree(self._dir(env, namespace, service), ignore_errors=True)

    def service_names(self, env: str, namespaces: Iterable[str]) -> list[str]:
        """Names of the services cached for ``env`` in any of ``namespaces``, sorted."""
        names: set[str] = set()
        for namespace in namespaces:
            folder = self.root / _safe(env) / _safe(namespace)
            try:
                names.update(_unsafe(p.name) for p in folder.iterdir() if any(_files(p)))
            except OSError:
                continue
        return sorted(names)

    def _dir(self, env: str, namespace: str, service: str) -> Path:
        return self.root / _safe(env) / _safe(namespace) / _safe(service)

    def _make(self, folder: Path) -> None:
        if self._home is not None:
            self._home.ensure()
        missing = []
        for parent in (folder, *folder.parents):
            if parent.exists():
                break
            missing.append(parent)
        for directory in reversed(missing):
            directory.mkdir(mode=0o700, exist_ok=True)


def _files(folder: Path) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.suffix == ".json" and not p.name.startswith(".")]
    except OSError:
        return []


def _holds(path: Path, data: bytes) -> bool:
    try:
        return path.read_bytes() == data
    except OSError:
        return False


def _safe(name: str) -> str:
    return _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m[0].encode()), name) or "%"


def _unsafe(name: str) -> str:
    from urllib.parse import unquote

    return unquote(name)
