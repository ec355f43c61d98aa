"""Daemon cold start: spawn to the first answered ``Debug.Health``, as a ratio to ``python -c 'import grpc'``.

Each run spawns ``python -m micro_cli server`` on an ephemeral port, waits for its state file (the
only way to learn the port), then calls ``Debug.Health`` of the store block over gRPC from this
process (new connection each time) until it answers. The daemon is stopped with SIGTERM after
each run. Runs are interleaved with the baseline, ~7 of each; the figures are medians.

* cold start (the target): a new process on a MICRO_HOME that a first start set up, as after a
  reboot or ``micro server`` run again: its files exist, nothing of it is in memory;
* first start (info): a fresh MICRO_HOME each run, so the daemon also makes its SQLite files,
  secret key and RSA-3072 signing key. Generating that key alone takes 0.13-1.2 s here, by the
  luck of the prime search: a one-time cost of an installation, not of a start.

Target: cold start <= 4x the baseline. Run: .venv/bin/python bench/cold_start.py [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import shutil
import subprocess
import sys
import tempfile
import time

from _common import (
    PYTHON,
    Target,
    bench_env,
    emit_json,
    fmt_ms,
    median,
    parse_importtime,
    print_import_table,
    print_table,
    print_targets,
    spawn_daemon,
)

from micro.client import Client
from micro.debug import DebugClient
from micro.errors import MicroError
from micro.transport import connect

LIMIT = 4.0
HEALTH_TIMEOUT = 30.0


def baseline(env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([PYTHON, "-c", "import grpc"], env=env, check=True, capture_output=True, timeout=60)
    return time.perf_counter() - start


async def first_health(address: str) -> None:
    """Call Debug.Health until it answers (it should at once: the state file follows the bind)."""
    deadline = time.monotonic() + HEALTH_TIMEOUT
    while True:
        client = Client(connect(address), timeout=5.0)
        try:
            await DebugClient(client, service="store").health()
            return
        except MicroError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.005)
        finally:
            await client.close()


def cold_start(python_args: tuple[str, ...] = (), home: str | None = None) -> tuple[float, float, float, str]:
    """One run: (spawn to state file, spawn to health answered, SIGTERM to exit) and the daemon's
    log; on ``home`` (kept), else on a fresh home."""
    start = time.perf_counter()
    daemon = spawn_daemon(python_args, home)
    try:
        daemon.wait_ready(poll=0.002)
        ready = time.perf_counter() - start
        asyncio.run(first_health(daemon.address))
        answered = time.perf_counter() - start
        log = daemon.log_tail(100_000)
    finally:
        t = time.perf_counter()
        daemon.stop()  # SIGTERM, wait, remove the home
        stopped = time.perf_counter() - t
    return ready, answered, stopped, log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs of each (default 7)")
    parser.add_argument("--no-importtime", action="store_true", help="skip the -X importtime breakdown")
    args = parser.parse_args()
    env = bench_env()

    home = tempfile.mkdtemp(prefix="micro-bench-home-")
    atexit.register(shutil.rmtree, home, True)
    baseline(env)  # warm-up: page cache and bytecode of both
    cold_start(home=home)  # the first start: this home's files and keys
    base: list[float] = []
    ready: list[float] = []
    answered: list[float] = []
    stopped: list[float] = []
    first: list[float] = []
    for _ in range(args.runs):
        base.append(baseline(env))
        r, a, s, _log = cold_start(home=home)
        ready.append(r)
        answered.append(a)
        stopped.append(s)
        first.append(cold_start()[1])

    b = median(base)
    print(f"Daemon cold start, {args.runs} interleaved runs each\n")
    print_table(
        ["measure", "median ms", "min ms", "max ms", "ratio"],
        [
            [name, fmt_ms(median(v)), fmt_ms(min(v)), fmt_ms(max(v)), f"{median(v) / b:.2f}x"]
            for name, v in [
                ("python -c 'import grpc'", base),
                ("spawn -> state file", ready),
                ("spawn -> Debug.Health answered", answered),
                ("SIGTERM -> exited (info)", stopped),
                ("first start: fresh home -> answered (info)", first),
            ]
        ],
    )
    targets = [Target("cold start / import grpc", median(answered) / b, LIMIT)]
    print_targets(targets)

    import_total = None
    if not args.no_importtime:
        *_, log = cold_start(("-X", "importtime"), home)
        rows, total = parse_importtime(log)
        import_total = total / 1e6
        print_import_table("micro server (until stopped)", rows, total)
        _, grpc_total = parse_importtime(
            subprocess.run(
                [PYTHON, "-X", "importtime", "-c", "import grpc"], env=env, capture_output=True, text=True
            ).stderr
        )
        print(f"(python -c 'import grpc': all imports {grpc_total / 1000:.1f} ms)")

    figures = {
        "runs": args.runs,
        "median_s": {
            "import_grpc": round(b, 5),
            "state_file": round(median(ready), 5),
            "health_answered": round(median(answered), 5),
            "stop": round(median(stopped), 5),
            "first_start": round(median(first), 5),
        },
        "daemon_import_total_s": None if import_total is None else round(import_total, 5),
    }
    emit_json("cold_start", figures, targets)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
