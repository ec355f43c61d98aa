"""The daemon's proxy: what it adds to a unary call, against calling the service's own port.

One helloworld service (``micro new`` + ``micro run .``) under a daemon this script started; one
process, one asyncio loop, two ``GrpcTransport`` channels: one to the daemon (the proxy routes by
the ``micro-service`` metadata) and one straight to the node address the service registered.
Same call both ways: ``/helloworld.Helloworld/Call`` with proto bytes (``client.call``); the proxy
forwards them untouched. Measured alongside, not judged: ``Helloworld.Call`` through the proxy
with a JSON body (transcoded by the proxy, what ``micro call`` does), and the same proto call
through ``_grpc_forwarder.py``, the least a ``grpc.aio`` proxy can do (one server, one channel,
bytes forwarded to the node, nothing else): the floor of any proxy built the daemon's way.

Each round runs, per route, a phase with 1 call in flight (``seq``) and a phase with 50 in flight
(asyncio tasks); routes alternate their order from round to round so drift hits all alike.

Targets: with 1 in flight, p50 added <= 0.6 ms (median over rounds of proxy p50 - direct p50) and
p99 added <= 2 ms (pooled); with 50 in flight, throughput >= 60% of direct (median over rounds).
Run: .venv/bin/python bench/proxy_overhead.py [--rounds R] [--seq-calls N] [--calls N]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    Target,
    bench_env,
    emit_json,
    fmt_ms,
    median,
    new_service,
    percentile,
    print_table,
    print_targets,
    process_cpu,
    run_service,
    service_node,
    start_daemon,
)

from micro.client import Client
from micro.transport import GrpcTransport

P50_ADDED_MS = 0.6
P99_ADDED_MS = 2.0
THROUGHPUT_SHARE = 0.6
IN_FLIGHT = 50
PATH = "/helloworld.Helloworld/Call"

Op = Callable[[], Awaitable[Any]]


@dataclass
class Route:
    """Every call of one route: 1-in-flight latencies, 50-in-flight latencies and wall time, CPU."""

    seq: list[float] = field(default_factory=list)
    seq_round_p50: list[float] = field(default_factory=list)
    conc: list[float] = field(default_factory=list)
    wall: float = 0.0
    round_throughput: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds in the 50-in-flight phases

    @property
    def throughput(self) -> float:
        return len(self.conc) / self.wall if self.wall else float("nan")

    def cpu_per_call_us(self, who: str) -> float:
        return self.cpu.get(who, 0.0) / len(self.conc) * 1e6 if self.conc else float("nan")

    @property
    def cpu_total_us(self) -> float:
        return sum(self.cpu_per_call_us(who) for who in self.cpu)


async def phase(op: Op, calls: int, in_flight: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    counter = iter(range(calls))

    async def worker() -> None:
        for _ in counter:
            t0 = time.perf_counter()
            await op()
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return latencies, time.perf_counter() - t0


async def measure(
    args: argparse.Namespace, daemon_address: str, daemon_pid: int, folder: str
) -> dict[str, Any]:
    sys.path.insert(0, folder)
    pb = importlib.import_module("proto.helloworld_pb2")
    via_proxy = Client(GrpcTransport(daemon_address), timeout=30)
    node_address, service_pid = await service_node(via_proxy)
    direct = Client(GrpcTransport(node_address), timeout=30)
    request = pb.Request(name="bench")

    def proto(client: Client) -> Op:
        async def op() -> None:
            response = await client.call("helloworld", PATH, request, pb.Response)
            assert response.msg == "Hello bench", response

        return op

    async def as_json() -> None:
        reply = await via_proxy.call_json("helloworld", "Helloworld.Call", b'{"name": "bench"}')
        assert reply.startswith(b'{"msg":'), reply

    forwarder = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(__file__).resolve().parent / "_grpc_forwarder.py"),
        node_address,
        stdout=asyncio.subprocess.PIPE,
        env=bench_env(),
    )
    assert forwarder.stdout is not None
    port = int(await asyncio.wait_for(forwarder.stdout.readline(), 30))
    via_forwarder = Client(GrpcTransport(f"127.0.0.1:{port}"), timeout=30)
    ops: dict[str, Op] = {
        "direct": proto(direct),
        "proxy": proto(via_proxy),
        "proxy, JSON (info)": as_json,
        "bare grpc.aio forwarder (info)": proto(via_forwarder),
    }
    pids = {"client": 0, "daemon": daemon_pid, "forwarder": forwarder.pid, "service": service_pid}
    routes = {name: Route() for name in ops}
    for op in ops.values():  # warm-up: channels, route caches, code paths
        await phase(op, 400, IN_FLIGHT)
        await phase(op, 100, 1)
    names = list(ops)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            route, op = routes[name], ops[name]
            lat, _ = await phase(op, args.seq_calls, 1)
            route.seq += lat
            route.seq_round_p50.append(percentile(lat, 50))
            before = {
                who: time.process_time() if who == "client" else process_cpu(pid) for who, pid in pids.items()
            }
            lat, wall = await phase(op, args.calls, IN_FLIGHT)
            for who, pid in pids.items():
                now = time.process_time() if who == "client" else process_cpu(pid)
                route.cpu[who] = route.cpu.get(who, 0.0) + now - before[who]
            route.conc += lat
            route.wall += wall
            route.round_throughput.append(len(lat) / wall)
    for client in (via_proxy, direct, via_forwarder):
        await client.close()
    forwarder.terminate()
    await forwarder.wait()
    return {"routes": routes, "node": node_address}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (default 10)")
    parser.add_argument("--seq-calls", type=int, default=200, help="calls per route per round, 1 in flight")
    parser.add_argument(
        "--calls", type=int, default=800, help=f"calls per route per round, {IN_FLIGHT} in flight"
    )
    parser.add_argument(
        "--log-level",
        default="",
        help="MICRO_LOG_LEVEL for the service (default: the template's INFO, one log line per call)",
    )
    args = parser.parse_args()

    with start_daemon() as daemon:
        folder = new_service(daemon)
        log_level = ["--env_vars", f"MICRO_LOG_LEVEL={args.log_level}"] if args.log_level else []
        run_service(daemon, folder, "--no-watch", *log_level)
        result = asyncio.run(measure(args, daemon.address, daemon.pid, str(folder)))
    routes: dict[str, Route] = result["routes"]
    d, p = routes["direct"], routes["proxy"]

    print(
        f"Unary Helloworld.Call, {args.rounds} interleaved rounds: {args.seq_calls} calls with 1 in flight "
        f"and {args.calls} with {IN_FLIGHT} in flight per route and round\n"
    )
    print_table(
        [
            "route",
            "seq p50 ms",
            "seq p99 ms",
            f"p50 ms @{IN_FLIGHT}",
            f"p99 ms @{IN_FLIGHT}",
            "calls/s",
            "share",
            "client us",
            "daemon us",
            "forwarder us",
            "service us",
        ],
        [
            [
                name,
                fmt_ms(percentile(r.seq, 50)),
                fmt_ms(percentile(r.seq, 99)),
                fmt_ms(percentile(r.conc, 50)),
                fmt_ms(percentile(r.conc, 99)),
                f"{r.throughput:.0f}",
                f"{r.throughput / d.throughput:.0%}",
                *(f"{r.cpu_per_call_us(who):.0f}" for who in ("client", "daemon", "forwarder", "service")),
            ]
            for name, r in routes.items()
        ],
    )
    print(
        "(us: CPU time per call of each process over the 50-in-flight phases; the daemon's share"
        " off the proxy routes is the runtime pumping the service's log lines)"
    )
    cpu_share = d.cpu_total_us / p.cpu_total_us
    print(
        f"CPU per call, all processes: direct {d.cpu_total_us:.0f} us, proxy {p.cpu_total_us:.0f} us: "
        f"the throughput share when the CPU is the limit would be {cpu_share:.0%} (info)"
    )

    p50_added = median([b - a for a, b in zip(d.seq_round_p50, p.seq_round_p50, strict=True)]) * 1000
    p99_added = (percentile(p.seq, 99) - percentile(d.seq, 99)) * 1000
    share = median([b / a for a, b in zip(d.round_throughput, p.round_throughput, strict=True)])
    targets = [
        Target("seq p50 added by the proxy", p50_added, P50_ADDED_MS, unit="ms"),
        Target("seq p99 added by the proxy", p99_added, P99_ADDED_MS, unit="ms"),
        Target(f"throughput @{IN_FLIGHT}, proxy / direct", share, THROUGHPUT_SHARE, at_least=True),
    ]
    print_targets(targets)

    def figures_of(r: Route) -> dict[str, Any]:
        return {
            "seq_p50_ms": round(percentile(r.seq, 50) * 1000, 4),
            "seq_p99_ms": round(percentile(r.seq, 99) * 1000, 4),
            "p50_ms": round(percentile(r.conc, 50) * 1000, 4),
            "p99_ms": round(percentile(r.conc, 99) * 1000, 4),
            "calls_per_s": round(r.throughput, 1),
            "cpu_us_per_call": {who: round(r.cpu_per_call_us(who), 1) for who in r.cpu},
        }

    figures = {
        "rounds": args.rounds,
        "in_flight": IN_FLIGHT,
        "routes": {name: figures_of(r) for name, r in routes.items()},
        "seq_p50_added_ms": round(p50_added, 4),
        "seq_p99_added_ms": round(p99_added, 4),
        "throughput_share": round(share, 4),
        "cpu_bound_share": round(cpu_share, 4),
        "service_log_level": args.log_level or "INFO",
    }
    emit_json("proxy_overhead", figures, targets)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
