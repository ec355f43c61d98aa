"""Resident memory of an idle helloworld service and of the daemon, as ratios to a bare grpc process.

Figures are VmRSS of /proc/PID/status, read once a process has been idle for a moment (and the
largest of a few reads a little apart, so a read in the middle of a collection does not flatter
it). Side by side, PSS and private memory (from /proc/PID/smaps_rollup): a service runs on the
daemon's interpreter, so the pages of the shared libraries (libpython, grpc's extension) are
shared between them and RSS counts them in each.

Measured, in one run:

* baseline: ``python -c 'import grpc, time; time.sleep(60)'``, and for reference a bare
  ``grpc.aio`` server on a port doing nothing, and ``python -c 'import time; time.sleep(60)'``;
* the daemon (``python -m micro_cli server``, fresh MICRO_HOME) idle, before any service runs;
* a helloworld service (``micro new`` + ``micro run .``) idle under the runtime;
* the daemon again with that service running, idle, and both after 2,000 calls through the proxy.

Everything runs once before as a warm-up, so that every process loads cached bytecode (see
README.md, "Bytecode"): compiling modules costs memory a process loading .pyc files never spends.

No targets: figures and ratios only. Run: .venv/bin/python bench/memory.py [--settle S]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import subprocess
import sys
import time
from typing import Any

from _common import (
    PYTHON,
    bench_env,
    emit_json,
    memory_kb,
    new_service,
    print_table,
    run_service,
    service_node,
    start_daemon,
)

from micro.client import Client
from micro.transport import connect

CALLS = 2000
IN_FLIGHT = 20

BASELINES = {
    "python -c 'import grpc, time; time.sleep(60)'": "import grpc, time; time.sleep(60)",
    "python, bare grpc.aio server (info)": (
        "import asyncio, grpc.aio\n"
        "async def main():\n"
        "    server = grpc.aio.server()\n"
        "    server.add_insecure_port('127.0.0.1:0')\n"
        "    await server.start()\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n"
    ),
    "python -c 'import time; time.sleep(60)' (info)": "import time; time.sleep(60)",
}


def settled(pid: int, settle: float, reads: int = 3) -> dict[str, int]:
    """Memory of ``pid`` after ``settle`` seconds: the read with the largest RSS of a few."""
    time.sleep(settle)
    found: list[dict[str, int]] = []
    for _ in range(reads):
        found.append(memory_kb(pid))
        time.sleep(0.1)
    return max(found, key=lambda m: m["rss"])


def baseline(code: str, settle: float) -> dict[str, int]:
    process = subprocess.Popen([PYTHON, "-c", code], env=bench_env(), stdin=subprocess.DEVNULL)
    try:
        return settled(process.pid, settle)
    finally:
        process.kill()
        process.wait()


async def calls(address: str, folder: str) -> tuple[str, int]:
    """The service's node; then ``CALLS`` calls of Helloworld.Call through the proxy."""
    sys.path.insert(0, folder)
    pb = importlib.import_module("proto.helloworld_pb2")  # the service's generated module

    client = Client(connect(address))
    node = await service_node(client)
    counter = iter(range(CALLS))

    async def worker() -> None:
        for _ in counter:
            response = await client.call(
                "helloworld", "/helloworld.Helloworld/Call", pb.Request(name="m"), pb.Response
            )
            assert response.msg == "Hello m"

    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    await client.close()
    return node


async def lookup(address: str) -> tuple[str, int]:
    client = Client(connect(address))
    try:
        return await service_node(client)
    finally:
        await client.close()


def mib(kb: int) -> str:
    return f"{kb / 1024:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settle", type=float, default=1.5, help="idle seconds before reading (default 1.5)")
    args = parser.parse_args()

    # Warm-up: the first run of each compiles its modules into the private bytecode cache, which
    # costs memory (the compiler's) that a process loading .pyc files never spends.
    for code in BASELINES.values():
        baseline(code, 0.5)
    with start_daemon() as daemon:
        run_service(daemon, new_service(daemon))
        asyncio.run(lookup(daemon.address))

    rows: dict[str, dict[str, int]] = {}
    for name, code in BASELINES.items():
        rows[name] = baseline(code, args.settle)
    with start_daemon() as daemon:
        rows["daemon, idle, no service"] = settled(daemon.pid, args.settle)
        folder = new_service(daemon)
        run_service(daemon, folder)
        _, service_pid = asyncio.run(lookup(daemon.address))
        rows["helloworld service, idle"] = settled(service_pid, args.settle)
        rows["daemon, idle, helloworld running"] = settled(daemon.pid, 0)
        asyncio.run(calls(daemon.address, str(folder)))
        rows[f"helloworld service, after {CALLS} calls"] = settled(service_pid, args.settle)
        rows[f"daemon, after {CALLS} proxied calls"] = settled(daemon.pid, 0)

    base_name = next(iter(BASELINES))
    base = rows[base_name]["rss"]
    print("Resident memory (VmRSS), idle; MiB\n")
    print_table(
        ["process", "RSS MiB", "ratio", "peak MiB", "PSS MiB", "private MiB", "anon MiB", "threads"],
        [
            [
                name,
                mib(m["rss"]),
                f"{m['rss'] / base:.2f}x",
                mib(m["hwm"]),
                mib(m["pss"]) if "pss" in m else "-",
                mib(m["private"]) if "private" in m else "-",
                mib(m["rssanon"]) if "rssanon" in m else "-",
                m.get("threads", "-"),
            ]
            for name, m in rows.items()
        ],
    )
    print(f"(ratio: RSS over {base_name}'s; peak: VmHWM; anon: RssAnon, the heap and stacks)")

    figures: dict[str, Any] = {
        "baseline": base_name,
        "rss_kb": {name: m["rss"] for name, m in rows.items()},
        "ratio": {name: round(m["rss"] / base, 3) for name, m in rows.items()},
        "pss_kb": {name: m.get("pss") for name, m in rows.items()},
        "private_kb": {name: m.get("private") for name, m in rows.items()},
    }
    emit_json("memory", figures, [])


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
