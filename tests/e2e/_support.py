"""Helpers for end-to-end tests: ``micro`` as a real process, and the daemons it starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = [
    "MICRO",
    "alive",
    "daemons",
    "micro",
    "new_service",
    "replace_in",
    "state",
    "stop",
    "wait_until",
]

MICRO = [sys.executable, "-m", "micro_cli"]


def micro(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MICRO, *args], capture_output=True, text=True, timeout=timeout)


def new_service(parent: Path, name: str = "helloworld") -> Path:
    """``micro new name`` in ``parent``: the new service's folder."""
    parent.mkdir(parents=True, exist_ok=True)
    created = subprocess.run([*MICRO, "new", name], cwd=parent, capture_output=True, text=True, timeout=30)
    assert created.returncode == 0, created.stderr
    return parent / name


def replace_in(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


def alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (left where PID 1 reaps nothing) counts as dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def wait_until(condition, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {condition}"
        time.sleep(0.02)


def state(home: Path) -> dict:
    return json.loads((home / "state" / "server.json").read_text())


def stop(pid: int) -> None:
    if not alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    try:
        wait_until(lambda: not alive(pid), timeout=10)
    except AssertionError:
        os.kill(pid, signal.SIGKILL)


def daemons(home: Path) -> list[int]:
    """The live ``micro server`` processes serving ``home``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        is_daemon = b"micro_daemon" in command or (b"micro_cli" in command and b"server" in command)
        if is_daemon and f"MICRO_HOME={home}".encode() in environ:
            found.append(int(entry.name))
    return [pid for pid in found if alive(pid)]
