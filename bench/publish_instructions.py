"""Instructions per single publish, counted by callgrind: a noise-free view of the publish path.

``platform_profile.py`` judges single publish by wall time, which on a shared 2-core machine moves
±10% between two runs of the same code: a change worth 5% cannot be seen there. Valgrind's
callgrind counts the instructions a process executes, the same count in every run of the same
code (±0.5% here), whatever else the machine is doing. This script counts, per publish of 1 KB
with 1 in flight on the ``platform`` profile (PostgreSQL and NATS JetStream on this machine):

* the daemon's instructions, with callgrind on only while the publishes run (the daemon starts
  under valgrind: about 30 s);
* the micro client's (``EventsClient.publish``), in a process of its own under valgrind;
* nats-py's client (``js.publish``), the baseline, measured the same way in the same run.

User-space instructions only: the kernel's side of each socket call, and what a process spends
waiting, are not counted; nor is the NATS server. The ratio is informational, no target:
the issue's targets are in ``platform_profile.py``.

``--base DIR``: also count a daemon running the code of the checkout ``DIR`` (say, a
``git worktree`` of main), to compare a change with what it changes, in one run.

Needs ``valgrind`` on PATH. Run: .venv/bin/python bench/publish_instructions.py [--publishes N] [--base DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from _common import PYTHON, Daemon, bench_env, emit_json, print_table
from messaging import JetStream, payload
from platform_profile import NATS_URL, POSTGRES_URL, Platform, client_of

from micro.events import EventsClient

WARM = 100
START_TIMEOUT = 600.0  # a daemon under valgrind starts about 30 times slower
# Makes the micro packages import from the checkout in MICRO_BENCH_BASE (--base).
_BASE_SITE = """\
import importlib.machinery, os, sys

class _Base:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name in ("micro", "micro_daemon", "micro_cli"):
            return importlib.machinery.PathFinder.find_spec(name, [os.environ["MICRO_BENCH_BASE"]])
        return None

sys.meta_path.insert(0, _Base)
"""


def counted(out: str) -> int:
    """Instructions in callgrind's dump files ``out*`` (the largest: the one dumped while on)."""
    totals = [
        int(line.split()[1])
        for dump in Path(out).parent.glob(Path(out).name + "*")
        for line in dump.read_text().splitlines()
        if line.startswith("totals:")
    ]
    return max(totals, default=0)


def callgrind(out: str, command: list[str], **popen: Any) -> subprocess.Popen[bytes]:
    """``command`` under callgrind, counting nothing until ``callgrind_control -i on``."""
    return subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", *command],
        **popen,
    )


def control(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True)


async def publishes(pid: int, publish: Callable[[int], Awaitable[object]], count: int) -> None:
    """Warm up, then ``count`` publishes with callgrind of ``pid`` counting; dump the counts."""
    for i in range(WARM):
        await publish(i)
    control(pid, "-i", "on")
    for i in range(count):
        await publish(i)
    control(pid, "-i", "off")
    control(pid, "-d")


def daemon_under_valgrind(platform: Platform, out: str, base: str | None) -> Daemon:
    home = tempfile.mkdtemp(prefix="micro-bench-")
    extra = {
        "MICRO_PROFILE": "platform",
        "MICRO_CONFIG_SECRET_KEY": platform.secret_key,
        "MICRO_STORE_ADDRESS": f"{POSTGRES_URL}?schema={platform.tag}",
        "MICRO_EVENTS_ADDRESS": f"{NATS_URL}?prefix={platform.tag}",
        "MICRO_BROKER_ADDRESS": f"{NATS_URL}?prefix={platform.tag}",
        "MICRO_REGISTRY_ADDRESS": f"{NATS_URL}?prefix={platform.tag}",
    }
    if base is not None:
        site = Path(home) / "base-site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(_BASE_SITE)
        extra.update(PYTHONPATH=str(site), MICRO_BENCH_BASE=base)
    env = bench_env(home, **extra)
    with open(Path(home) / "bench-server.log", "wb") as log:
        process = callgrind(
            out,
            [PYTHON, "-m", "micro_cli", "server"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    daemon = Daemon(home=home, process=process, env=env)
    platform.daemons.append(daemon)
    daemon.wait_ready(timeout=START_TIMEOUT)
    return daemon


async def count_daemon(platform: Platform, out: str, count: int, base: str | None) -> int:
    daemon = daemon_under_valgrind(platform, out, base)
    client = client_of(daemon.home, daemon.address, timeout=120)
    events = EventsClient(client)
    try:
        await publishes(daemon.process.pid, lambda i: events.publish("bench", payload(i)), count)
    finally:
        await client.close()
    daemon.stop()
    return counted(out)


def count_client(which: str, out: str, count: int, daemon: Daemon | None) -> int:
    """The client's count: this script again, as ``--client WHICH``, under callgrind."""
    args = [PYTHON, __file__, "--client", which, "--publishes", str(count)]
    if daemon is not None:
        args += ["--home", daemon.home, "--address", daemon.address]
    process = callgrind(out, args, stderr=subprocess.DEVNULL)
    if process.wait() != 0:
        raise RuntimeError(f"the {which} client under callgrind exited with {process.returncode}")
    return counted(out)


async def client_main(which: str, count: int, home: str, address: str) -> None:
    """In the process under callgrind: publish as ``which`` (micro or nats-py)."""
    pid = os.getpid()
    if which == "micro":
        client = client_of(home, address, timeout=120)
        events = EventsClient(client)
        try:
            await publishes(pid, lambda i: events.publish("bench-client", payload(i)), count)
        finally:
            await client.close()
        return
    jetstream = await JetStream.connect()
    if jetstream is None:
        raise SystemExit(1)
    subject = jetstream.subject("bench")
    try:
        await publishes(pid, lambda i: jetstream.js.publish(subject, payload(i)), count)
    finally:
        await jetstream.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--publishes", type=int, default=300, help="publishes counted in each (300)")
    parser.add_argument("--base", help="also count a daemon on the code of this checkout")
    parser.add_argument("--client", choices=["micro", "nats-py"], help=argparse.SUPPRESS)
    parser.add_argument("--home", default="", help=argparse.SUPPRESS)
    parser.add_argument("--address", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        asyncio.run(client_main(args.client, args.publishes, args.home, args.address))
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not on PATH: install it (Debian: apt-get install valgrind)")
    count = args.publishes
    dumps = tempfile.mkdtemp(prefix="micro-callgrind-")
    started = time.monotonic()
    platform = Platform()
    try:
        daemon = asyncio.run(count_daemon(platform, f"{dumps}/daemon.out", count, None)) / count
        base = None
        if args.base:
            base_dir = str(Path(args.base).resolve())
            base = asyncio.run(count_daemon(platform, f"{dumps}/base.out", count, base_dir)) / count
        helper = platform.start()  # the micro client's daemon, not under valgrind
        client = count_client("micro", f"{dumps}/client.out", count, helper) / count
        nats_py = count_client("nats-py", f"{dumps}/nats.out", count, None) / count
    finally:
        platform.close()
        shutil.rmtree(dumps, ignore_errors=True)

    rows = [["daemon", f"{daemon:,.0f}"], ["micro client", f"{client:,.0f}"]]
    if base is not None:
        rows.insert(1, [f"daemon at {args.base}", f"{base:,.0f}"])
    rows.append(["nats-py client (baseline)", f"{nats_py:,.0f}"])
    print(f"Instructions per single publish (1 KB, 1 in flight), callgrind, {count} each:\n")
    print_table(["process", "instructions"], rows)
    ratio = (daemon + client) / nats_py
    print(f"\ndaemon + micro client / nats-py client: {ratio:.2f}x")
    if base is not None:
        print(f"daemon / daemon at {args.base}: {daemon / base:.3f}x")
    print(f"({time.monotonic() - started:.0f} s)")
    figures = {"daemon": round(daemon), "micro client": round(client), "nats-py client": round(nats_py)}
    if base is not None:
        figures["base daemon"] = round(base)
    emit_json("publish_instructions", figures, [])


if __name__ == "__main__":
    main()
