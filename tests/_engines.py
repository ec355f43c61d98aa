"""Private PostgreSQL and NATS servers that fault tests may stop and start again.

The machine's shared servers (PostgreSQL on 5432, NATS on 4222) serve every other test, so a
test that takes an engine down starts its own: a PostgreSQL cluster made by ``initdb`` and a
``nats-server -js``, each in a temporary folder on a free loopback port, restarted on the same
port and the same files. PostgreSQL refuses to run as root: as root, its cluster belongs to
the ``postgres`` user, in a folder of its own under the system's temporary directory (pytest's
``tmp_path`` is private to root).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["PrivateNats", "PrivatePostgres", "free_port", "port_answers", "postgres_bin"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def postgres_bin() -> Path:
    """The folder of ``initdb`` and ``pg_ctl``: Debian's newest, else the one ``pg_config`` names."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
    return Path(bindir.stdout.strip())


def port_answers(port: int) -> bool:
    """Whether something accepts connections on 127.0.0.1:``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


def _wait(condition: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class PrivatePostgres:
    """A PostgreSQL cluster of its own, trust authentication, user ``postgres``, on ``port``."""

    def __init__(self) -> None:
        self.port = free_port()
        self.bin = postgres_bin()
        self._as: list[str] = []
        self.root = Path(tempfile.mkdtemp(prefix="micro-test-pg-"))
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            # Not subprocess's user=: that forks (vfork cannot change user), and a fork of a process
            # using gRPC may crash in gRPC's fork handlers before it execs.
            self._as = ["runuser", "-u", "postgres", "--"]
        self.data = self.root / "data"
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "-N")

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: roll back what runs and shut down cleanly; ``immediate``: crash)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")
        _wait(lambda: not port_answers(self.port), f"PostgreSQL to leave port {self.port}")

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def close(self) -> None:
        """Stop the server if it runs, and remove its files."""
        try:
            if self.running:
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, program: str, *args: str) -> None:
        done = subprocess.run(
            [*self._as, str(self.bin / program), *args], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, f"{program} {' '.join(args)} exited {done.returncode}: {done.stderr}"


class PrivateNats:
    """A ``nats-server`` with JetStream (file storage in ``root``) of its own, on ``port``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = ["nats-server", "-js", "-sd", str(self.root / "jetstream"), "-a", "127.0.0.1"]
        command += ["-p", str(self.port), "-l", str(self.root / "nats.log")]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(lambda: self._alive() and port_answers(self.port), f"nats-server on port {self.port}")

    def stop(self) -> None:
        """Shut the server down (SIGTERM: JetStream writes its state first); SIGKILL if it lingers."""
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    @property
    def running(self) -> bool:
        return self.process is not None

    def close(self) -> None:
        self.stop()

    def _alive(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            log = self.root / "nats.log"
            raise AssertionError(f"nats-server exited {self.process.returncode}: {log.read_text()[-2000:]}")
        return True
