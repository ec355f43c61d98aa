"""One OS process of a service, its output pumped line by line into the service's log.

The process runs in its own process group, so stopping it also stops whatever it
spawned, and on Linux it gets SIGTERM when the daemon dies (``PR_SET_PDEATHSIG``),
so a killed daemon leaves no orphan services. Output is read by an asyncio
subprocess protocol: no threads, no blocking reads.

No ``preexec_fn``: it makes Python fork() rather than vfork(), and fork() runs
grpc's fork handlers, whose pollers then crash the child (SIGABRT, SIGSEGV) of
a daemon that is serving calls. A small launcher sets the death signal and
execs the program instead, under the same pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from micro.errors import InternalServerError
from micro_daemon.runtime.logs import LogFile

__all__ = ["Instance", "StartError"]

_STDERR_TAIL = 20
_MAX_LINE = 64 * 1024  # a longer "line" is logged in pieces rather than buffered without bound
_DRAIN_TIMEOUT = 1.0  # how long output may trail the exit (a grandchild can hold the pipes)
_KILL_TIMEOUT = 5.0
_STREAMS = {1: "stdout", 2: "stderr"}


class StartError(InternalServerError):
    """The process could not be spawned: no such program, not executable, bad ``cwd``."""

    def __init__(self, detail: str, *, service: str = "") -> None:
        super().__init__(detail, id="runtime")
        self.service = service


class _Pipes(asyncio.SubprocessProtocol):
    """Splits the child's stdout and stderr into lines and notes its exit."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_line: Callable[[str, str], None]) -> None:
        self._on_line = on_line
        self._partial: dict[int, bytes] = {}
        self.exited: asyncio.Future[None] = loop.create_future()
        self.finished: asyncio.Future[None] = loop.create_future()

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        chunk = data.encode() if isinstance(data, str) else data
        *lines, rest = (self._partial.pop(fd, b"") + chunk).split(b"\n")
        if len(rest) > _MAX_LINE:
            lines.append(rest)
            rest = b""
        for line in lines:
            self._emit(fd, line)
        if rest:
            self._partial[fd] = rest

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        rest = self._partial.pop(fd, b"")
        if rest:
            self._emit(fd, rest)

    def process_exited(self) -> None:
        _resolve(self.exited)

    def connection_lost(self, exc: Exception | None) -> None:
        _resolve(self.exited)
        _resolve(self.finished)

    def _emit(self, fd: int, raw: bytes) -> None:
        self._on_line(_STREAMS.get(fd, str(fd)), raw.decode("utf-8", "replace").rstrip("\r"))


class Instance:
    """One OS process of the service ``name``.

    ``start()`` spawns ``argv`` in ``cwd`` with exactly ``env`` (the caller merges
    ``os.environ`` and the service identity in; ``PYTHONUNBUFFERED=1`` keeps a
    Python service's prints timely). Every stdout/stderr line becomes a record
    in ``log`` with metadata ``{"stream": "stdout"|"stderr"}``. An instance
    runs once: start a new ``Instance`` to restart.
    """

    def __init__(self, name: str, argv: list[str], cwd: Path, env: dict[str, str], log: LogFile) -> None:
        self.name = name
        self.argv = list(argv)
        self.cwd = cwd
        self.env = dict(env)
        self.log = log
        self._stderr: deque[str] = deque(maxlen=_STDERR_TAIL)
        self._transport: asyncio.SubprocessTransport | None = None
        self._pipes: _Pipes | None = None
        self._started_at: float | None = None

    @property
    def pid(self) -> int | None:
        """The process id once started."""
        return None if self._transport is None else self._transport.get_pid()

    @property
    def returncode(self) -> int | None:
        """The exit code once exited; ``-N`` when killed by signal ``N``."""
        return None if self._transport is None else self._transport.get_returncode()

    @property
    def running(self) -> bool:
        """Started and not yet exited."""
        return self._transport is not None and self.returncode is None

    @property
    def started_at(self) -> float | None:
        """Unix time of the spawn."""
        return self._started_at

    def tail_stderr(self) -> list[str]:
        """The last stderr lines (up to 20), oldest first: the usual reason for a crash."""
        return list(self._stderr)

    async def start(self) -> None:
        """Spawn the process; ``StartError`` when the OS refuses (missing program, bad ``cwd``)."""
        if self._transport is not None:
            raise RuntimeError(f"instance of {self.name} already started")
        loop = asyncio.get_running_loop()
        try:
            transport, pipes = await loop.subprocess_exec(
                lambda: _Pipes(loop, self._on_line),
                *_with_parent_death_signal(self.argv, self.cwd, self.env),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=self.cwd,
                env=self.env,
                process_group=0,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise StartError(f"cannot start {self.name}: {exc}", service=self.name) from exc
        self._transport, self._pipes = transport, pipes
        self._started_at = time.time()

    async def wait(self) -> int:
        """Wait for the exit and for the output before it to reach the log; the exit code."""
        if self._pipes is None:
            raise RuntimeError(f"instance of {self.name} not started")
        await asyncio.shield(self._pipes.exited)
        await self._drain()
        code = self.returncode
        assert code is not None  # set before the exit is reported
        return code

    async def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM the process group, SIGKILL it after ``timeout`` s; the exit code. Never raises.

        ``None`` when never started, or when even SIGKILL did not end it in 5 s.
        If the caller is cancelled meanwhile, the group is killed before the
        cancellation propagates.
        """
        if self._pipes is None:
            return None
        try:
            if self.running:
                self._signal(signal.SIGTERM)
                if not await self._exited_within(timeout):
                    self._signal(signal.SIGKILL)
                    await self._exited_within(_KILL_TIMEOUT)
            await self._drain()
        except asyncio.CancelledError:
            self._signal(signal.SIGKILL)
            raise
        return self.returncode

    def _on_line(self, stream: str, message: str) -> None:
        if stream == "stderr":
            self._stderr.append(message)
        with contextlib.suppress(OSError):  # a full disk must not take the service down
            self.log.write(message, {"stream": stream})

    def _signal(self, signum: int) -> None:
        pid = self.pid
        if pid is None or not self.running:
            return  # once reaped, the pid (and group id) may belong to someone else
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signum)

    async def _exited_within(self, timeout: float) -> bool:
        assert self._pipes is not None
        try:
            await asyncio.wait_for(asyncio.shield(self._pipes.exited), timeout)
        except TimeoutError:
            return False
        return True

    async def _drain(self) -> None:
        assert self._pipes is not None and self._transport is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._pipes.finished), _DRAIN_TIMEOUT)
        if self.returncode is not None:
            self._transport.close()  # only after the exit: close() kills a live child


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):  # the daemon died before prctl took effect\n"
    "    os.kill(os.getpid(), signal.SIGTERM)\n"
    "os.execv(sys.argv[2], sys.argv[3:])\n"
)


def _with_parent_death_signal(argv: list[str], cwd: Path, env: dict[str, str]) -> list[str]:
    """``argv`` run by the launcher that asks Linux to SIGTERM it when this thread dies."""
    if not _has_prctl():
        return argv
    program = argv[0] if os.sep in argv[0] else shutil.which(argv[0], path=env.get("PATH", os.defpath))
    if program is None or not os.access(cwd / program, os.X_OK) or (cwd / program).is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such program", argv[0])
    launcher = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(os.getpid())]
    return [*launcher, str(cwd / program), *argv]


@functools.cache
def _has_prctl() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        return hasattr(ctypes.CDLL(None), "prctl")
    except OSError:
        return False
