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
    "NATS_URL",
    "POSTGRES_URL",
    "alive",
    "daemons",
    "drop_platform",
    "micro",
    "new_service",
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


def platform_addresses(tag: str, *, password: str = "") -> dict[str, str]:
    """The four ``MICRO_*_ADDRESS`` variables of a platform in schema and prefix ``tag`` alone."""
    store = POSTGRES_URL.replace("postgres@", f"postgres:{password}@") if password else POSTGRES_URL
    return {
        "MICRO_STORE_ADDRESS": f"{store}?schema={tag}",
        "MICRO_EVENTS_ADDRESS": f"{NATS_URL}?prefix={tag}",
        "MICRO_BROKER_ADDRESS": f"{NATS_URL}?prefix={tag}",
        "MICRO_REGISTRY_ADDRESS": f"{NATS_URL}?prefix={tag}",
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
