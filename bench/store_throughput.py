"""Store through the daemon: read/write latency and throughput, as ratios to an empty call.

One process, one asyncio loop, one connection (``connect``: micro's HTTP/2 client) to a daemon
this script started (isolated MICRO_HOME, ephemeral port, SQLite store with synchronous=FULL). Each
operation runs with 50 calls in flight (asyncio tasks) and, for reference, 1 in flight. The
baseline is ``Debug.Health`` of the store block on the same daemon, measured the same way;
the phases are interleaved over several rounds so drift on a shared machine hits all alike.
Side by side: Redis GET/SET (and PING, its empty call) through ``redis.asyncio`` with 50 in
flight, when a Redis server answers on 127.0.0.1:6379.

Targets (p50 latency with 50 in flight, over the empty call's): read <= 1.3x, write <= 2x.
Run: .venv/bin/python bench/store_throughput.py [--calls N] [--rounds R]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import Target, emit_json, fmt_ms, median, percentile, print_table, print_targets, start_daemon

from micro.client import Client
from micro.credentials import OwnerToken
from micro.debug import DebugClient
from micro.store import StoreClient
from micro.transport import connect

READ_LIMIT = 1.3
WRITE_LIMIT = 2.0
IN_FLIGHT = 50
KEYS = 1000
VALUE = os.urandom(50).hex().encode()  # 100 bytes
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379

Op = Callable[[int], Awaitable[Any]]


@dataclass
class Result:
    """Latencies of every call of one operation, and the wall time its phases took."""

    latencies: list[float] = field(default_factory=list)
    wall: float = 0.0
    sequential: list[float] = field(default_factory=list)
    round_p50s: list[float] = field(default_factory=list)  # p50 of each round's 50-in-flight phase
    client_cpu: float = 0.0  # CPU seconds of this process (all threads) during the 50-in-flight phases
    server_cpu: float = 0.0  # CPU seconds of the daemon during them

    def cpu_per_call(self, which: str) -> float:
        cpu = self.client_cpu if which == "client" else self.server_cpu
        return cpu / len(self.latencies) if self.latencies else float("nan")

    @property
    def throughput(self) -> float:
        return len(self.latencies) / self.wall if self.wall else float("nan")

    def p(self, q: float) -> float:
        return percentile(self.latencies, q)

    @property
    def seq_p50(self) -> float:
        return percentile(self.sequential, 50)


async def phase(op: Op, calls: int, in_flight: int, start: int = 0) -> tuple[list[float], float]:
    """``calls`` calls of ``op``, ``in_flight`` outstanding at a time; per-call latencies and wall time."""
    latencies: list[float] = []
    counter = iter(range(start, start + calls))

    async def worker() -> None:
        for i in counter:
            t0 = time.perf_counter()
            await op(i)
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return latencies, time.perf_counter() - t0


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid``; 0 where /proc is unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


async def measure(
    ops: dict[str, Op], calls: int, rounds: int, seq_calls: int, server_pid: int
) -> dict[str, Result]:
    results = {name: Result() for name in ops}
    for op in ops.values():  # warm-up: connections, caches, code paths
        await phase(op, max(IN_FLIGHT * 4, 200), IN_FLIGHT)
    per_round = max(1, calls // rounds)
    seq_per_round = max(1, seq_calls // rounds)
    for r in range(rounds):
        for name, op in ops.items():
            client0, server0 = time.process_time(), process_cpu(server_pid)
            lat, wall = await phase(op, per_round, IN_FLIGHT, start=r * per_round)
            results[name].client_cpu += time.process_time() - client0
            results[name].server_cpu += process_cpu(server_pid) - server0
            results[name].latencies += lat
            results[name].round_p50s.append(percentile(lat, 50))
            results[name].wall += wall
            lat, _ = await phase(op, seq_per_round, 1, start=r * seq_per_round)
            results[name].sequential += lat
    return results


async def micro_ops(address: str, home: str) -> tuple[Client, dict[str, Op]]:
    # The daemon's owner (its MICRO_HOME is not this process's): the store wants an account.
    client = Client(connect(address), credentials=OwnerToken(Path(home) / "config" / "auth" / "owner.json"))
    store = StoreClient(client)
    debug = DebugClient(client, service="store")
    for i in range(KEYS):  # the keys reads will find
        await store.write(f"bench-r-{i}", VALUE)

    async def health(i: int) -> None:
        await debug.health()

    async def stats(i: int) -> None:
        await debug.stats()

    async def read(i: int) -> None:
        records = await store.read(f"bench-r-{i % KEYS}")
        assert records and records[0].value == VALUE

    async def write(i: int) -> None:
        await store.write(f"bench-w-{i % KEYS}", VALUE)

    return client, {
        "Debug.Health (empty)": health,
        "Debug.Stats (info)": stats,
        "Store.Read": read,
        "Store.Write": write,
    }


async def redis_ops() -> tuple[Any, dict[str, Op]] | None:
    try:
        import redis.asyncio as aioredis
    except ImportError:
        print("redis: redis-py not installed, skipped", file=sys.stderr)
        return None
    r = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=2)
    prefix = f"micro-bench:{os.getpid()}:"
    try:
        await r.ping()
    except Exception as exc:  # Redis is optional: report and go on
        print(f"redis: not reachable on {REDIS_HOST}:{REDIS_PORT} ({exc}), skipped", file=sys.stderr)
        await r.aclose()
        return None
    await r.mset({f"{prefix}r-{i}": VALUE for i in range(KEYS)})

    async def ping(i: int) -> None:
        await r.ping()

    async def get(i: int) -> None:
        assert await r.get(f"{prefix}r-{i % KEYS}") == VALUE

    async def set_(i: int) -> None:
        await r.set(f"{prefix}w-{i % KEYS}", VALUE)

    r.bench_prefix = prefix  # type: ignore[attr-defined]
    return r, {"Redis PING (empty)": ping, "Redis GET": get, "Redis SET": set_}


async def redis_cleanup(r: Any) -> None:
    try:
        keys = [k async for k in r.scan_iter(match=r.bench_prefix + "*", count=1000)]
        if keys:
            await r.delete(*keys)
    finally:
        await r.aclose()


async def run(
    address: str, home: str, server_pid: int, calls: int, rounds: int, seq_calls: int
) -> dict[str, Result]:
    client, ops = await micro_ops(address, home)
    redis = await redis_ops()
    try:
        if redis is not None:
            ops.update(redis[1])
        return await measure(ops, calls, rounds, seq_calls, server_pid)
    finally:
        await client.close()
        if redis is not None:
            await redis_cleanup(redis[0])


def round_ratio(op: Result, base: Result) -> float:
    """The median over rounds of the op's p50 over the baseline's p50 in the same round.

    Robust to the machine's load drifting between rounds: each ratio compares phases run back to back.
    """
    return median([o / b for o, b in zip(op.round_p50s, base.round_p50s, strict=True)])


def report(results: dict[str, Result], calls: int, rounds: int) -> tuple[dict[str, Any], list[Target]]:
    base = results["Debug.Health (empty)"]
    redis_base = results.get("Redis PING (empty)")
    rows = []
    for name, r in results.items():
        ref = redis_base if name.startswith("Redis") and redis_base else base
        rows.append(
            [
                name,
                fmt_ms(r.p(50)),
                fmt_ms(r.p(99)),
                f"{r.throughput:,.0f}",
                f"{r.p(50) / ref.p(50):.2f}x",
                f"{ref.throughput / r.throughput:.2f}x",
                fmt_ms(r.seq_p50),
                f"{r.seq_p50 / ref.seq_p50:.2f}x",
                f"{r.cpu_per_call('client') * 1e6:.0f}",
                f"{r.cpu_per_call('server') * 1e6:.0f}" if not name.startswith("Redis") else "-",
            ]
        )
    print(
        f"Store through the daemon vs Redis: {calls} calls per operation with {IN_FLIGHT} in flight, "
        f"in {rounds} interleaved rounds, plus 1 in flight\n"
        "(ratios: micro rows over Debug.Health, Redis rows over Redis PING)\n"
    )
    print_table(
        [
            "operation",
            "p50 ms",
            "p99 ms",
            "calls/s",
            "p50 ratio",
            "cost ratio",
            "seq p50 ms",
            "seq ratio",
            "client us/call",
            "server us/call",
        ],
        rows,
    )
    print(
        "\ncost ratio: the empty call's throughput over the operation's (time per call, relative);"
        f"\nus/call: CPU time per call at {IN_FLIGHT} in flight, of this (client) process and of the daemon"
    )
    stats = results["Debug.Stats (info)"]
    print(
        "Debug.Health of the store block asks the engine's state (no query, no thread); Debug.Stats"
        " reads the process's figures."
        f"\nOver Debug.Stats (p50, {IN_FLIGHT} in flight / 1 in flight): "
        f"Health {base.p(50) / stats.p(50):.2f}x / {base.seq_p50 / stats.seq_p50:.2f}x, "
        f"read {results['Store.Read'].p(50) / stats.p(50):.2f}x / "
        f"{results['Store.Read'].seq_p50 / stats.seq_p50:.2f}x, "
        f"write {results['Store.Write'].p(50) / stats.p(50):.2f}x / "
        f"{results['Store.Write'].seq_p50 / stats.seq_p50:.2f}x"
    )
    if redis_base:
        print(
            f"micro over Redis at {IN_FLIGHT} in flight (p50): empty {base.p(50) / redis_base.p(50):.1f}x, "
            f"read {results['Store.Read'].p(50) / results['Redis GET'].p(50):.1f}x, "
            f"write {results['Store.Write'].p(50) / results['Redis SET'].p(50):.1f}x"
        )
    targets = [
        Target("Store.Read p50 / empty call", round_ratio(results["Store.Read"], base), READ_LIMIT),
        Target("Store.Write p50 / empty call", round_ratio(results["Store.Write"], base), WRITE_LIMIT),
    ]
    print_targets(targets)
    print("(target ratio: median over rounds of the p50 ratio within each round)")
    figures = {
        "in_flight": IN_FLIGHT,
        "calls": calls,
        "rounds": rounds,
        "ops": {
            name: {
                "p50_ms": round(r.p(50) * 1000, 3),
                "p99_ms": round(r.p(99) * 1000, 3),
                "round_p50_ms": [round(x * 1000, 3) for x in r.round_p50s],
                "calls_per_s": round(r.throughput, 1),
                "seq_p50_ms": round(r.seq_p50 * 1000, 3),
                "client_cpu_us_per_call": round(r.cpu_per_call("client") * 1e6, 1),
                "server_cpu_us_per_call": (
                    None if name.startswith("Redis") else round(r.cpu_per_call("server") * 1e6, 1)
                ),
            }
            for name, r in results.items()
        },
    }
    return figures, targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000, help="calls per operation at 50 in flight (5000)")
    parser.add_argument("--seq-calls", type=int, default=600, help="calls per operation at 1 in flight (600)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (10)")
    args = parser.parse_args()
    with start_daemon() as daemon:
        results = asyncio.run(
            run(daemon.address, daemon.home, daemon.pid, args.calls, args.rounds, args.seq_calls)
        )
        if daemon.process.poll() is not None:
            raise RuntimeError(f"micro server died during the run:\n{daemon.log_tail()}")
    figures, targets = report(results, args.calls, args.rounds)
    emit_json("store_throughput", figures, targets)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
