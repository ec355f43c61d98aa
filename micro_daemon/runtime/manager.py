"""The runtime: which services run in which namespace, persisted so they come back after a restart.

Each daemon keeps its records in the store under its own node id (a random id
kept in ``MICRO_HOME``'s data folder, ``runtime_node``): keys are
``<node>/<namespace>/<name>``. Daemons of a platform share one store, and each
restores only the services it ran itself, whose builds and uploaded sources
are on its machine. Records of an earlier version (``<namespace>/<name>``) are
taken over by the daemon only when its store is its own (``adopt_unscoped``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from micro.errors import BadRequest, Conflict, NotFound
from micro.home import Home, write_private
from micro.proto import runtime_pb2
from micro.service import REGISTER_TTL as DEFAULT_REGISTER_TTL
from micro_daemon.auth.service_accounts import ServiceAccounts
from micro_daemon.registry.backend import RegistryBackend
from micro_daemon.runtime.builder import Builder
from micro_daemon.runtime.deployment import Deployment, Spec
from micro_daemon.runtime.logs import Line, LogFile
from micro_daemon.runtime.sources import Sources, is_git
from micro_daemon.store.backend import SYSTEM_DATABASE, Query, Record, StoreBackend

__all__ = ["Runtime"]

log = logging.getLogger("micro.runtime")

_DATABASE = SYSTEM_DATABASE
_TABLE = "runtime"
_NODE_FILE = "runtime_node"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class Runtime:
    """Creates, updates, deletes and reports services; each is a ``Deployment``."""

    def __init__(
        self,
        home: Home,
        *,
        store: StoreBackend,
        registry: RegistryBackend,
        proxy_address: Callable[[], str],
        adopt_unscoped: bool = False,
        accounts: ServiceAccounts | None = None,
        register_ttl: float = DEFAULT_REGISTER_TTL,
    ) -> None:
        self.home = home
        self.node = _node_id(home.data_dir / _NODE_FILE)
        self._adopt_unscoped = adopt_unscoped
        self.store = store
        self.registry = registry
        self.proxy_address = proxy_address
        self.accounts = accounts or ServiceAccounts(None)
        self.register_ttl = register_ttl
        self.builder = Builder(home.data_dir / "builds")
        self.sources = Sources(home.data_dir / "sources")
        self._deployments: dict[tuple[str, str], Deployment] = {}

    async def create(self, spec: Spec, *, force: bool = False) -> Deployment:
        """Check the source, remember the service, and start building it in the background.

        A service of the same name is replaced if ``force`` is set or it is in error.
        """
        _check_name(spec.name)
        key = (spec.namespace, spec.name)
        existing = self._deployments.get(key)
        # One that failed serves nothing: running it again is the natural retry, not a conflict.
        if existing is not None and existing.status != runtime_pb2.Status.ERROR and not force:
            raise Conflict(
                f"{spec.name} is already running in namespace {spec.namespace}: "
                f"use `micro update {spec.name}` to rebuild it, or `micro run --force` to replace it"
            )
        folder = await self.sources.resolve(spec.source, namespace=spec.namespace, name=spec.name)
        spec = dataclasses.replace(spec, folder=str(folder), running=True)
        _check_entrypoint(folder, spec)
        if key in self._deployments:
            replaced = await self._remove(spec.namespace, spec.name)
            if replaced.spec.folder != spec.folder:
                await asyncio.to_thread(self.sources.discard, Path(replaced.spec.folder))
        await self._save(spec)
        return self._launch(spec)

    def read(self, namespace: str, name: str = "") -> list[Deployment]:
        found = [d for (ns, n), d in sorted(self._deployments.items()) if ns == namespace and name in ("", n)]
        if name and not found:
            raise NotFound(
                f"service {name!r} is not running in namespace {namespace!r}: `micro status` lists them"
            )
        return found

    async def update(self, namespace: str, name: str, *, source: str = "", instances: int = 0) -> Deployment:
        """Rebuild and swap; a new source or instance count is remembered, a git source fetched again."""
        deployment = self.read(namespace, name)[0]
        previous = deployment.spec.folder
        if not source and is_git(deployment.spec.source):
            source = deployment.spec.source  # fetched again: a branch may have moved
        if source or instances:
            spec = deployment.spec
            if source:
                folder = await self.sources.resolve(source, namespace=namespace, name=name)
                spec = dataclasses.replace(spec, source=source, folder=str(folder))
                _check_entrypoint(folder, spec)
            deployment.spec = dataclasses.replace(spec, instances=instances or spec.instances)
            await self._save(deployment.spec)
        if not await deployment.update():
            raise BadRequest(deployment.metadata.get("error", "the update failed"), id="runtime")
        if deployment.spec.folder != previous:  # the old instances, which ran from it, are gone
            await asyncio.to_thread(self.sources.discard, Path(previous))
        return deployment

    async def delete(self, namespace: str, name: str) -> None:
        deployment = await self._remove(namespace, name)
        await asyncio.to_thread(self.sources.discard, Path(deployment.spec.folder))

    async def _remove(self, namespace: str, name: str) -> Deployment:
        deployment = self.read(namespace, name)[0]
        del self._deployments[(namespace, name)]
        await deployment.stop()
        deployment.log.write_event("stopped and removed")
        await self.accounts.forget(namespace, name)
        try:
            await self.store.delete(_DATABASE, _TABLE, self._key(namespace, name))
        except NotFound:
            pass
        return deployment

    def logs(
        self, namespace: str, name: str, *, count: int, since: float, follow: bool
    ) -> AsyncIterator[Line]:
        """The last ``count`` lines since ``since``, then new ones if ``follow``."""
        deployment = self._deployments.get((namespace, name))
        log_file = deployment.log if deployment else self._log_file(namespace, name)
        if deployment is None and not log_file.path.exists():
            raise NotFound(f"service {name!r} not found in namespace {namespace!r}")
        if follow:
            return log_file.follow(count, since)
        return _aiter(log_file.tail(count, since))

    async def restore(self) -> None:
        """Start again every service that was running when this daemon last stopped."""
        if self._adopt_unscoped:
            await self._adopt()
        for record in await self.store.query(_DATABASE, _TABLE, Query(prefix=f"{self.node}/")):
            try:
                spec = Spec(**json.loads(record.value))
            except (TypeError, ValueError) as exc:
                log.error("skipping unreadable runtime record %s: %s", record.key, exc)
                continue
            if spec.running and (spec.namespace, spec.name) not in self._deployments:
                self._launch(spec).log.write_event("restored after a daemon restart")

    async def shutdown(self) -> None:
        """Stop every process, keeping the records so ``restore`` brings them back."""
        await asyncio.gather(*(d.stop() for d in self._deployments.values()))
        self._deployments.clear()

    def _launch(self, spec: Spec) -> Deployment:
        deployment = Deployment(
            spec,
            builder=self.builder,
            registry=self.registry,
            log_file=self._log_file(spec.namespace, spec.name),
            proxy_address=self.proxy_address,
            service_env=self._service_env,
        )
        self._deployments[(spec.namespace, spec.name)] = deployment
        deployment.launch()
        return deployment

    async def _service_env(self, namespace: str, name: str) -> dict[str, str]:
        """A new process's credentials, and a heartbeat TTL no longer than the daemon's registry TTL."""
        env = await self.accounts.credentials(namespace, name)
        env["MICRO_REGISTER_TTL"] = f"{min(DEFAULT_REGISTER_TTL, self.register_ttl):g}"
        return env

    def _log_file(self, namespace: str, name: str) -> LogFile:
        return LogFile(self.home.log_dir / "services" / namespace / f"{name}.log")

    async def _save(self, spec: Spec) -> None:
        value = json.dumps(dataclasses.asdict(spec)).encode()
        await self.store.put(_DATABASE, _TABLE, Record(key=self._key(spec.namespace, spec.name), value=value))

    def _key(self, namespace: str, name: str) -> str:
        return f"{self.node}/{namespace}/{name}"

    async def _adopt(self) -> None:
        """Move the records of an earlier version, keyed ``<namespace>/<name>``, under this node."""
        for record in await self.store.query(_DATABASE, _TABLE, Query()):
            if record.key.count("/") != 1:
                continue
            namespace, _, name = record.key.partition("/")
            await self.store.put(
                _DATABASE, _TABLE, Record(key=self._key(namespace, name), value=record.value)
            )
            with contextlib.suppress(NotFound):
                await self.store.delete(_DATABASE, _TABLE, record.key)


async def _aiter(lines: list[Line]) -> AsyncIterator[Line]:
    for line in lines:
        yield line


def _node_id(path: Path) -> str:
    """This daemon's node id, kept in ``path`` (created on first use)."""
    try:
        node = path.read_text().strip()
    except FileNotFoundError:
        node = ""
    if not node:
        node = uuid.uuid4().hex
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_private(path, node.encode())
    return node


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise BadRequest(
            f"invalid service name {name!r}: use letters, digits, '.', '_' and '-'", id="runtime"
        )


def _check_entrypoint(folder: Path, spec: Spec) -> None:
    entry = folder / spec.entrypoint
    if not entry.is_file():
        where = spec.display_source or spec.source
        raise BadRequest(
            f"no {spec.entrypoint} in {where}: a service folder has a {spec.entrypoint} that calls "
            "service.run() (`micro new NAME` writes one), or name another with --entrypoint",
            id="runtime",
        )
