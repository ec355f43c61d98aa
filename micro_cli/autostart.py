"""Starting the local daemon in the background when a command needs it.

A state file whose daemon no longer holds the server lock (killed, or a
zombie) is stale: a new daemon is started and replaces it.

Exactly one daemon runs per ``MICRO_HOME``: a CLI process takes the start
lock, looks again, and only then starts one; the daemon itself holds the
server lock for its life, so a second one refuses to start.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Iterator

from micro.errors import SetupError
from micro.home import DaemonState, Home

__all__ = ["ensure_local_daemon"]

START_TIMEOUT = 30.0


def ensure_local_daemon(home: Home) -> DaemonState:
    """The running local daemon's state, starting the daemon first if none runs."""
    state = _running(home)
    if state is not None:
        return state
    home.ensure()
    with _locked(home):
        state = _running(home)
        if state is not None:
            return state
        return _start(home)


def _running(home: Home) -> DaemonState | None:
    state = home.read_state()
    if state is not None and home.daemon_running():
        return state
    return None


@contextlib.contextmanager
def _locked(home: Home) -> Iterator[None]:
    with open(home.start_lock, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _start(home: Home) -> DaemonState:
    log_path = home.server_log
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "micro_daemon"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # detached: survives the CLI and its terminal
            close_fds=True,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        state = _running(home)
        if state is not None and state.pid == process.pid:
            return state
        if process.poll() is not None:
            raise SetupError(f"the micro server did not start: {_last_line(log_path)} (log: {log_path})")
        time.sleep(0.02)
    process.terminate()
    raise SetupError(f"the micro server did not answer within {START_TIMEOUT:.0f} s (log: {log_path})")


def _last_line(path: os.PathLike[str]) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1].removeprefix("Error: ") if lines else "no output"
