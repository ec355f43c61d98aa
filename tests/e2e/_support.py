"""Helpers for end-to-end tests: ``micro`` as a real process, and the daemons it starts."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MICRO",
    "NATS_URL",
    "PLATFORM_TTL",
    "POSTGRES_URL",
    "Platform",
    "PlatformDaemon",
    "alive",
    "daemons",
    "drop_platform",
    "micro",
    "new_service",
    "ok",
    "platform_addresses",
    "processes_of",
    "replace_in",
    "require_platform_engines",
    "state",
    "stop",
    "wait_until",
]

MICRO = [sys.executable, "-m", "micro_cli"]


def micro(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MICRO, *args], capture_output=True, text=True, timeout=timeout)


def ok(*args: str, timeout: float = 30) -> str:
    """``micro ARGS``'s output; fails the test if it does not succeed."""
    done = micro(*args, timeout=timeout)
    assert done.returncode == 0, f"micro {' '.join(args)} exited {done.returncode}: {done.stderr}"
    return done.stdout


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


# -- the platform profile: PostgreSQL and NATS shared by several daemons ------------------------------

POSTGRES_URL = "postgres://postgres@127.0.0.1:5432/postgres"
NATS_URL = "nats://127.0.0.1:4222"
_START_ENGINES = (
    "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start; "
    "start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- "
    "-a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log"
)


def require_platform_engines() -> None:
    """Fail (never skip) unless PostgreSQL and NATS with JetStream answer."""
    import asyncio

    import psycopg

    try:
        with psycopg.connect(POSTGRES_URL, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        raise AssertionError(
            f"PostgreSQL at {POSTGRES_URL} does not answer ({exc}); start it: {_START_ENGINES}"
        ) from exc

    async def jetstream() -> None:
        import nats

        nc = await nats.connect(NATS_URL, connect_timeout=3, max_reconnect_attempts=0, allow_reconnect=False)
        try:
            await nc.jetstream().account_info()
        finally:
            await nc.close()

    try:
        asyncio.run(jetstream())
    except Exception as exc:
        raise AssertionError(
            f"NATS with JetStream at {NATS_URL} does not answer ({exc!r}); start it: {_START_ENGINES}"
        ) from exc


def platform_addresses(
    tag: str, *, password: str = "", postgres: str = POSTGRES_URL, nats: str = NATS_URL
) -> dict[str, str]:
    """The four ``MICRO_*_ADDRESS`` variables of a platform in schema and prefix ``tag`` alone."""
    store = postgres.replace("postgres@", f"postgres:{password}@") if password else postgres
    return {
        "MICRO_STORE_ADDRESS": f"{store}?schema={tag}",
        "MICRO_EVENTS_ADDRESS": f"{nats}?prefix={tag}",
        "MICRO_BROKER_ADDRESS": f"{nats}?prefix={tag}",
        "MICRO_REGISTRY_ADDRESS": f"{nats}?prefix={tag}",
    }


def drop_platform(tag: str) -> None:
    """Drop the PostgreSQL schema ``tag`` and the JetStream streams and KV buckets of prefix ``tag``."""
    import asyncio

    import psycopg

    with psycopg.connect(POSTGRES_URL, connect_timeout=3, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{tag}" CASCADE')

    async def streams() -> None:
        import nats

        nc = await nats.connect(NATS_URL, connect_timeout=3, max_reconnect_attempts=0, allow_reconnect=False)
        try:
            js = nc.jetstream()
            ours = (f"{tag.upper()}_EVENTS_", f"KV_{tag.lower()}_")
            names: list[str] = []
            while page := await js.streams_info(offset=len(names)):  # a page holds at most 256
                names.extend(info.config.name or "" for info in page)
            for name in names:
                if name.startswith(ours):
                    await js.delete_stream(name)
        finally:
            await nc.close()

    asyncio.run(streams())


def processes_of(home: Path) -> list[int]:
    """The live processes whose environment has ``MICRO_HOME=home``: a daemon and the services it runs."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"MICRO_HOME={home}".encode() in environ:
            found.append(int(entry.name))
    return [pid for pid in found if alive(pid)]


PLATFORM_TTL = 3  # seconds a node stays registered without a heartbeat, for the daemons and their services


@dataclass
class PlatformDaemon:
    """A ``python -m micro_daemon`` of a platform, with its own MICRO_HOME."""

    name: str
    home: Path
    log: Path
    process: subprocess.Popen[bytes]
    address: str = ""

    def banner(self) -> str:
        return self.log.read_text()

    def client(self, address: str = "", **options: Any) -> Any:
        """A ``micro.client.Client`` signed in as this daemon's owner (its MICRO_HOME's token), of
        this daemon or of the one at ``address``."""
        from micro.client import Client
        from micro.credentials import OwnerToken
        from micro.transport import connect

        owner = OwnerToken(self.home / "config" / "auth" / "owner.json")
        return Client(connect(address or self.address), credentials=owner, **options)

    def micro(
        self, *args: str, timeout: float = 30, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``micro ARGS`` on this daemon's machine: its MICRO_HOME, so its local owner."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MICRO_")}
        env["MICRO_HOME"] = str(self.home)
        return subprocess.run(
            [*MICRO, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd
        )


class Platform:
    """Starts daemons on one schema and prefix, and stops them (and the services they run) at the end.

    The engines are the machine's shared PostgreSQL and NATS unless ``postgres`` and ``nats`` name
    others; ``drop_platform(platform.tag)`` removes what the daemons left in the shared ones.
    """

    def __init__(
        self,
        root: Path,
        *,
        password: str = "",
        postgres: str = POSTGRES_URL,
        nats: str = NATS_URL,
        ttl: int = PLATFORM_TTL,
    ) -> None:
        self.root = root
        self.tag = f"e2e_{uuid.uuid4().hex[:12]}"
        self.password = password
        self.postgres = postgres
        self.nats = nats
        self.ttl = ttl
        self.secret_key = base64.b64encode(os.urandom(32)).decode()  # shared by the daemons of a platform
        self.daemons: list[PlatformDaemon] = []

    def environ(self, home: Path, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MICRO_")}
        env.update(
            MICRO_HOME=str(home),
            MICRO_PROFILE="platform",
            MICRO_SERVER_ADDRESS="127.0.0.1:0",
            MICRO_API_ADDRESS="127.0.0.1:0",
            MICRO_REGISTRY_TTL=str(self.ttl),
            # Inherited by the services the runtime starts: their nodes too lapse within the TTL.
            MICRO_REGISTER_TTL=str(self.ttl),
            MICRO_REGISTER_INTERVAL="1",
            MICRO_CONFIG_SECRET_KEY=self.secret_key,
            **platform_addresses(self.tag, password=self.password, postgres=self.postgres, nats=self.nats),
        )
        env.update(extra)
        return env

    def start(self, name: str, *, env: str | None = "") -> PlatformDaemon:
        """Start daemon ``name`` (again, on its home if it ran before); add it as CLI env ``env``, signed in.

        ``env`` defaults to ``name``; ``None`` adds no environment.
        """
        home = self.root / name
        home.mkdir(exist_ok=True)
        log = self.root / f"{name}.{sum(d.name == name for d in self.daemons)}.log"
        state = home / "state" / "server.json"
        state.unlink(missing_ok=True)
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "micro_daemon"],
                env=self.environ(home),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        daemon = PlatformDaemon(name, home, log, process)
        self.daemons.append(daemon)

        def started() -> bool:  # the state file is written before the banner's last line
            assert process.poll() is None, f"daemon {name} exited {process.returncode}:\n{log.read_text()}"
            return state.exists() and "profile platform: " in log.read_text()

        wait_until(started, timeout=30)
        daemon.address = json.loads(state.read_text())["address"]
        if env is not None:  # a remote environment: the CLI signs in (the default admin, shared by all)
            ok("env", "add", env or name, daemon.address)
            ok("--env", env or name, "login", "--username", "admin", "--password", "micro")
        return daemon

    def close(self) -> None:
        for daemon in self.daemons:
            if daemon.process.poll() is None:
                daemon.process.send_signal(signal.SIGTERM)
        for daemon in self.daemons:
            try:
                daemon.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                daemon.process.kill()
                daemon.process.wait()
        # The services a daemon ran stop with it (a killed daemon's get SIGTERM from the kernel).
        for home in {d.home for d in self.daemons}:
            try:
                wait_until(lambda home=home: not processes_of(home), timeout=15)
            except AssertionError:
                for pid in processes_of(home):
                    os.kill(pid, signal.SIGKILL)
                raise
