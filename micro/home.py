"""Where micro keeps its files, and the state file through which the CLI finds the daemon.

``MICRO_HOME``, when set, holds everything (``config/``, ``data/``,
``state/``, ``logs/``); otherwise platformdirs' per-user directories for
``micro`` are used. Every directory is created 0700.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from micro.errors import SetupError

__all__ = ["DaemonState", "Home", "write_private"]


@dataclass(frozen=True)
class Home:
    """The directories micro uses."""

    config_dir: Path
    data_dir: Path
    state_dir: Path
    log_dir: Path

    @classmethod
    def from_env(cls) -> Home:
        root = os.environ.get("MICRO_HOME")
        if root:
            base = Path(root).expanduser().absolute()
            return cls(base / "config", base / "data", base / "state", base / "logs")
        import platformdirs

        return cls(
            Path(platformdirs.user_config_dir("micro")),
            Path(platformdirs.user_data_dir("micro")),
            Path(platformdirs.user_state_dir("micro")),
            Path(platformdirs.user_log_dir("micro")),
        )

    def ensure(self) -> Home:
        """Create the directories (0700); ``SetupError`` naming the one that cannot be written."""
        for directory in (self.config_dir, self.data_dir, self.state_dir, self.log_dir):
            try:
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise _not_writable(directory, exc) from exc
            if not os.access(directory, os.W_OK | os.X_OK):
                raise _not_writable(directory, PermissionError("permission denied"))
        return self

    @property
    def state_file(self) -> Path:
        return self.state_dir / "server.json"

    @property
    def server_lock(self) -> Path:
        """Held by the running daemon for its whole life."""
        return self.state_dir / "server.lock"

    @property
    def start_lock(self) -> Path:
        """Held by a CLI process while it starts a daemon, so only one starts."""
        return self.state_dir / "start.lock"

    @property
    def owner_token(self) -> Path:
        """The local owner's access token, which the daemon writes (0600) and the CLI sends."""
        return self.config_dir / "auth" / "owner.json"

    @property
    def server_log(self) -> Path:
        return self.log_dir / "server.log"

    def daemon_running(self) -> bool:
        """Whether a daemon holds this home's server lock.

        The lock, not the pid, is the test: a killed daemon that lingers as a
        zombie, or a pid reused by another process, holds no lock.
        """
        try:
            with open(self.server_lock, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    def read_state(self) -> DaemonState | None:
        """The running daemon's state, or ``None`` if no state file (or an unreadable one) is there."""
        try:
            data = json.loads(self.state_file.read_text())
            return DaemonState(**data)
        except (OSError, ValueError, TypeError):
            return None

    def write_state(self, state: DaemonState) -> None:
        write_private(self.state_file, json.dumps(asdict(state), indent=2).encode())

    def clear_state(self, pid: int) -> None:
        """Remove the state file if it still belongs to ``pid``."""
        state = self.read_state()
        if state is not None and state.pid == pid:
            self.state_file.unlink(missing_ok=True)


@dataclass(frozen=True)
class DaemonState:
    """What a running daemon publishes about itself.

    With ``tls``, ``address`` and ``api_address`` serve TLS, and the daemon
    also listens on ``local_address``, a plaintext loopback port for the
    clients and services of this machine.
    """

    pid: int
    address: str
    api_address: str
    started: float
    version: str
    tls: bool = False
    local_address: str = ""

    @property
    def client_address(self) -> str:
        """Where a client on this machine connects (plaintext)."""
        return self.local_address or self.address


def write_private(path: Path, data: bytes) -> None:
    """Atomically replace ``path`` with ``data``, readable only by its owner (0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _not_writable(directory: Path, exc: OSError) -> SetupError:
    return SetupError(
        f"cannot write to {directory} ({exc.strerror or exc}): set MICRO_HOME to a writable folder "
        "or fix the folder's permissions",
        id="micro.home",
    )
