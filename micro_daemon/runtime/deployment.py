"""One service in the runtime: its build, its processes, their supervision and hot reload.

Every change of code goes through ``swap``: build, start the new instances,
wait until each has registered, then stop the old ones (which deregister and
drain their in-flight calls). A failed build or start leaves the old
instances serving and records the error.

Restarts: a start that fails before the instance registers (``micro run``,
a reload, ``micro update``, a restore) is not retried: the code did not work,
and the caller is told at once. An instance that did register and then exits
is restarted after 0.25·2^k s (at most 10 s); a restart that fails counts as
one more crash. After 5 crashes within 60 s the instance is given up, and the
service is in error once none serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from micro.errors import MicroError
from micro.proto import registry_pb2, runtime_pb2
from micro_daemon.registry.backend import RegistryBackend
from micro_daemon.runtime.builder import Build, Builder, Change, classify
from micro_daemon.runtime.logs import LogFile
from micro_daemon.runtime.process import Instance

__all__ = ["Deployment", "Spec"]

log = logging.getLogger("micro.runtime")

START_TIMEOUT = float(os.environ.get("MICRO_START_TIMEOUT", "30"))
STOP_TIMEOUT = 10.0
CRASH_WINDOW = 60.0
MAX_CRASHES = 5
Status = runtime_pb2.Status
_DAEMON_ONLY = frozenset(
    {
        "MICRO_STORE_ADDRESS",
        "MICRO_EVENTS_ADDRESS",
        "MICRO_BROKER_ADDRESS",
        "MICRO_REGISTRY_ADDRESS",
        "MICRO_CONFIG_SECRET_KEY",
        "MICRO_AUTH_PRIVATE_KEY",
        "MICRO_SERVER_ADDRESS",
        "MICRO_API_ADDRESS",
        "MICRO_PROFILE",
    }
)
_PAST = {"start": "started", "reload": "reloaded", "update": "updated"}

ServiceEnv = Callable[[str, str], Awaitable[Mapping[str, str]]]
"""``(namespace, name) -> variables`` a new process of the service starts with (its credentials, ...)."""


@dataclass
class Spec:
    """What the user asked the runtime to run; persisted, so it survives a daemon restart."""

    name: str
    namespace: str
    source: str
    folder: str
    version: str = "latest"
    display_source: str = ""
    env: list[str] = field(default_factory=list)
    instances: int = 1
    watch: bool = False
    entrypoint: str = "main.py"
    running: bool = True
    owner: str = ""


class Deployment:
    """The live state of one ``Spec``: build, instances, status and metadata."""

    def __init__(
        self,
        spec: Spec,
        *,
        builder: Builder,
        registry: RegistryBackend,
        log_file: LogFile,
        proxy_address: Callable[[], str],
        service_env: ServiceEnv | None = None,
    ) -> None:
        self.spec = spec
        self.service_env = service_env
        self.builder = builder
        self.registry = registry
        self.log = log_file
        self.proxy_address = proxy_address
        self.status: int = Status.PENDING
        self.metadata: dict[str, str] = {}
        self.build: Build | None = None
        self.instances: list[Instance] = []
        self._retiring: set[Instance] = set()
        self._crashes: list[float] = []
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    @property
    def folder(self) -> Path:
        return Path(self.spec.folder)

    # -- life cycle -------------------------------------------------------------------------------

    def launch(self) -> None:
        """Build and start in the background; progress shows in ``status``."""
        self._stopped.clear()
        self._spawn_task(self._first_start())
        if self.spec.watch and self._watcher is None:
            self._watcher = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        """Stop watching, end a build or start in progress, stop every instance. Never raises."""
        self._stopped.set()
        self.status = Status.STOPPING
        # Cancelled, not awaited to the end: a pip install or a wait to register can take minutes.
        tasks = [task for task in (self._watcher, *self._tasks) if task is not None]
        self._watcher = None
        for task in tasks:
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)
        async with self._lock:
            await self._retire(self.instances)
            self.instances = []
        self.status = Status.STOPPED

    async def update(self) -> bool:
        """Rebuild everything and swap (``micro update``); False if the old instances still serve."""
        return await self.swap(Change.PROTO | Change.DEPS | Change.CODE, reason="update")

    def to_proto(self) -> runtime_pb2.Service:
        metadata = {"group": self.spec.namespace, "source": self.spec.display_source, **self.metadata}
        metadata["instances"] = str(len([i for i in self.instances if i.running]))
        if self.spec.owner:
            metadata["owner"] = self.spec.owner
        if self.build is not None:
            metadata["build"] = self.build.build_id
        return runtime_pb2.Service(
            name=self.spec.name,
            version=self.spec.version,
            source=self.spec.display_source,
            metadata=metadata,
            status=self.status,  # type: ignore[arg-type]  # an enum value held as int
        )

    # -- build and swap ---------------------------------------------------------------------------

    async def _first_start(self) -> None:
        self.status = Status.BUILDING
        ok = await self.swap(Change.PROTO | Change.DEPS | Change.CODE, reason="start")
        if not ok:
            self.status = Status.ERROR

    async def swap(self, change: Change, *, reason: str) -> bool:
        """Build what ``change`` needs, start new instances, retire the old ones. True on success."""
        began = time.monotonic()
        async with self._lock:
            if self._stopped.is_set():
                return False
            try:
                # Every step runs: the builder's cache makes an unchanged one free.
                build = await self.builder.build(self.folder)
            except MicroError as exc:
                self._fail(f"build failed: {exc.detail}")
                return False
            if not self.instances:
                self.status = Status.STARTING
            started = await self._start_instances(build, self.spec.instances)
            if started is None:
                return False
            old, self.instances, self.build = self.instances, started, build
            self.status = Status.RUNNING
            self.metadata.pop("error", None)
            self.metadata["started"] = _now()
            # Measured to the moment the new code serves; the old instances drain after.
            self.log.write_event(f"{_PAST[reason]} in {(time.monotonic() - began) * 1000:.0f} ms")
            await self._retire(old)
        return True

    async def _start_instances(self, build: Build, count: int) -> list[Instance] | None:
        try:
            instances = [self._instance(build, await self._service_env()) for _ in range(max(1, count))]
        except MicroError as exc:
            self._fail(exc.detail)
            return None
        try:
            await asyncio.gather(*(self._start_one(i) for i in instances))
        except MicroError as exc:
            await asyncio.gather(*(i.stop(timeout=2) for i in instances))
            self._fail(exc.detail)
            return None
        except asyncio.CancelledError:
            await asyncio.gather(*(i.stop(timeout=2) for i in instances))
            raise
        for instance in instances:
            self._spawn_task(self._supervise(instance))
        return instances

    async def _start_one(self, instance: Instance) -> None:
        await instance.start()
        exited = asyncio.ensure_future(instance.wait())
        registered = asyncio.ensure_future(self._registered(instance))
        try:
            done, _ = await asyncio.wait(
                {exited, registered}, timeout=START_TIMEOUT, return_when="FIRST_COMPLETED"
            )
        finally:
            exited.cancel()
            registered.cancel()
        if registered in done and not registered.cancelled() and registered.exception() is None:
            return
        if exited in done:
            raise MicroError(_crash_reason(instance), id="runtime")
        raise MicroError(
            f"{self.spec.name} did not register within {START_TIMEOUT:.0f} s: does its entry point "
            "call service.run()?",
            id="runtime",
        )

    async def _registered(self, instance: Instance) -> None:
        pid = str(instance.pid)
        while True:
            with contextlib.suppress(MicroError):
                for version in await self.registry.get_service(self.spec.namespace, self.spec.name):
                    if any(node.metadata.get("pid") == pid for node in version.nodes):
                        return
            await asyncio.sleep(0.02)

    async def _forget(self, instance: Instance) -> None:
        """Take a dead instance's node out of the registry now, not when its TTL lapses."""
        pid = str(instance.pid)
        with contextlib.suppress(MicroError):
            for version in await self.registry.get_service(self.spec.namespace, self.spec.name):
                dead = [node for node in version.nodes if node.metadata.get("pid") == pid]
                if dead:
                    gone = registry_pb2.Service(name=version.name, version=version.version, nodes=dead)
                    await self.registry.deregister(self.spec.namespace, gone)

    async def _service_env(self) -> Mapping[str, str]:
        if self.service_env is None:
            return {}
        return await self.service_env(self.spec.namespace, self.spec.name)

    def _instance(self, build: Build, service_env: Mapping[str, str]) -> Instance:
        # A service gets the daemon's environment, less the daemon's own secrets and engine
        # addresses (they can carry passwords): it reaches every block through MICRO_PROXY.
        env = {k: v for k, v in os.environ.items() if k not in _DAEMON_ONLY}
        env.update(
            PYTHONPATH=os.pathsep.join([str(self.folder), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            PYTHONUNBUFFERED="1",
            MICRO_SERVICE_NAME=self.spec.name,
            MICRO_SERVICE_VERSION=self.spec.version,
            MICRO_NAMESPACE=self.spec.namespace,
            MICRO_PROXY=self.proxy_address(),
        )
        if build.schema is not None:
            env["MICRO_SCHEMA_FILE"] = str(build.schema)
        env.update(service_env)
        env.update(_pairs(self.spec.env))
        argv = [str(build.python), str(self.folder / self.spec.entrypoint)]
        return Instance(self.spec.name, argv, self.folder, env, self.log)

    async def _retire(self, instances: list[Instance]) -> None:
        self._retiring.update(instances)
        await asyncio.gather(*(i.stop(timeout=STOP_TIMEOUT) for i in instances))
        self._retiring.difference_update(instances)

    # -- supervision ------------------------------------------------------------------------------

    async def _supervise(self, instance: Instance) -> None:
        code = await instance.wait()
        if instance in self._retiring or self._stopped.is_set() or instance not in self.instances:
            return
        reason = _crash_reason(instance)
        self.log.write_event(f"instance {instance.pid} exited with code {code}: {reason}")
        await self._forget(instance)
        while self._count_crash():
            if not any(i.running for i in self.instances):
                self.status = Status.STARTING  # until a restart registers, or the last one fails
            await asyncio.sleep(min(10.0, 0.25 * 2 ** (len(self._crashes) - 1)))
            failed = await self._replace(instance)
            if failed is None:
                return
            reason = failed  # a restart that fails before registering is one more crash
        if instance in self.instances:
            self.instances.remove(instance)
            self._fail(f"crashed {len(self._crashes)} times in {CRASH_WINDOW:.0f} s: {reason}")

    def _count_crash(self) -> bool:
        """Note a crash; False once there were too many in the window to try again."""
        now = time.monotonic()
        self._crashes = [t for t in self._crashes if now - t < CRASH_WINDOW] + [now]
        self.metadata["retries"] = str(int(self.metadata.get("retries", "0")) + 1)
        return len(self._crashes) < MAX_CRASHES

    async def _replace(self, crashed: Instance) -> str | None:
        """Start an instance in place of ``crashed``; why that failed, or None when done or not wanted."""
        async with self._lock:
            if self._stopped.is_set() or crashed not in self.instances or self.build is None:
                return None
            started = await self._start_instances(self.build, 1)
            if started is None:
                return self.metadata.get("error", "the restart failed")
            self.instances.remove(crashed)
            self.instances.extend(started)
            self.status = Status.RUNNING
            self.metadata.pop("error", None)
            return None

    def _fail(self, reason: str) -> None:
        self.metadata["error"] = reason
        self.log.write_event(f"error: {reason}")
        if not any(i.running for i in self.instances):
            self.status = Status.ERROR
        log.warning("%s/%s: %s", self.spec.namespace, self.spec.name, reason)

    # -- watching ---------------------------------------------------------------------------------

    async def _watch(self) -> None:
        import watchfiles

        async for changes in watchfiles.awatch(self.folder, debounce=200, step=10, stop_event=self._stopped):
            change = classify({Path(path) for _, path in changes}, self.folder)
            if change:
                await self.swap(change, reason="reload")

    def _spawn_task(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _crash_reason(instance: Instance) -> str:
    lines = [line for line in instance.tail_stderr() if line.strip()]
    if lines:
        return lines[-1].strip()
    return f"exited with code {instance.returncode} and printed nothing on stderr"


def _pairs(items: list[str]) -> Mapping[str, str]:
    return dict(item.split("=", 1) for item in items if "=" in item)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
