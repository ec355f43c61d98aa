"""The daemon's proxy: what it adds to a unary call, against calling the service's own port.

One helloworld service (``micro new`` + ``micro run .``) under a daemon this script started; one
process, one asyncio loop, two ``GrpcTransport`` channels: one to the daemon (the proxy routes by
the ``micro-service`` metadata) and one straight to the node address the service registered.
Same call both ways: ``/helloworld.Helloworld/Call`` with proto bytes (``client.call``); the proxy
forwards them untouched. Measured alongside, not judged: ``Helloworld.Call`` through the proxy
with a JSON body (transcoded by the proxy, what ``micro call`` does), and the same proto call
through ``_grpc_forwarder.py``, the least a proxy can do (one server, one channel, bytes
forwarded to the node, nothing else) in each way Python has: ``grpc.aio`` on grpc's polling
transport (the daemon's way: the floor of any proxy built like it) and on grpc's default
EventEngine transport, a sync ``grpc.server`` with blocking stubs, and a plain TCP relay (no gRPC
termination, so no routing: what one more Python process in the path costs by itself).

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
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    Daemon,
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
    process_switches,
    run_service,
    service_node,
    start_daemon,
)

from micro.client import Client
from micro.credentials import OwnerToken
from micro.transport import GrpcTransport
from micro_daemon.grpc_transport import EXPERIMENTS

P50_ADDED_MS = 0.6
P99_ADDED_MS = 2.0
THROUGHPUT_SHARE = 0.6
IN_FLIGHT = 50
PATH = "/helloworld.Helloworld/Call"
FORWARDER = Path(__file__).resolve().parent / "_grpc_forwarder.py"
# name -> (route label, --kind, GRPC_EXPERIMENTS); "" is grpc's default transport
FORWARDERS = {
    "aio": ("bare grpc.aio forwarder (info)", "aio", EXPERIMENTS),
    "aio-ee": ("bare grpc.aio forwarder, EventEngine (info)", "aio", ""),
    "sync": ("bare sync grpc forwarder (info)", "sync", EXPERIMENTS),
    "tcp": ("asyncio TCP relay, no gRPC (info)", "tcp", EXPERIMENTS),
    "relay": ("micro's HTTP/2 relay, one destination (info)", "relay", EXPERIMENTS),
}

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
    hop: str = ""  # the process between client and service: "daemon", "forwarder" or none
    hop_switches: int = 0  # its context switches in the 50-in-flight phases

    @property
    def throughput(self) -> float:
        return len(self.conc) / self.wall if self.wall else float("nan")

    def cpu_per_call_us(self, who: str) -> float:
        return self.cpu.get(who, 0.0) / len(self.conc) * 1e6 if self.conc else float("nan")

    @property
    def cpu_total_us(self) -> float:
        return sum(self.cpu_per_call_us(who) for who in self.cpu)

    @property
    def hop_switches_per_call(self) -> float:
        return self.hop_switches / len(self.conc) if self.hop and self.conc else float("nan")

    @property
    def hop_busy(self) -> float:
        """The hop's CPU over the wall time of the 50-in-flight phases: how much of one core it kept busy."""
        return self.cpu.get(self.hop, 0.0) / self.wall if self.hop and self.wall else float("nan")


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


async def measure(args: argparse.Namespace, daemon: Daemon, folder: str) -> dict[str, Any]:
    sys.path.insert(0, folder)
    pb = importlib.import_module("proto.helloworld_pb2")
    # Every route sends the owner's token, as `micro call` does: the proxy checks it, the rest
    # carry the same bytes.
    owner = OwnerToken(Path(daemon.home) / "config" / "auth" / "owner.json")

    def client(address: str) -> Client:
        return Client(GrpcTransport(address), credentials=owner, timeout=30)

    via_proxy = client(daemon.address)
    node_address, service_pid = await service_node(via_proxy)
    direct = client(node_address)
    daemon_pid = daemon.pid
    request = pb.Request(name="bench")

    def proto(client: Client) -> Op:
        async def op() -> None:
            response = await client.call("helloworld", PATH, request, pb.Response)
            assert response.msg == "Hello bench", response

        return op

    async def as_json() -> None:
        reply = await via_proxy.call_json("helloworld", "Helloworld.Call", b'{"name": "bench"}')
        assert reply.startswith(b'{"msg":'), reply

    forwarders = {
        name: await start_forwarder(kind, node_address, experiments)
        for name, (_, kind, experiments) in FORWARDERS.items()
        if name in args.forwarders
    }
    via_forwarder = {name: client(address) for name, (_, address) in forwarders.items()}
    ops: dict[str, Op] = {
        "direct": proto(direct),
        "proxy": proto(via_proxy),
        "proxy, JSON (info)": as_json,
        **{FORWARDERS[name][0]: proto(client) for name, client in via_forwarder.items()},
    }
    hops = {"proxy": daemon_pid, "proxy, JSON (info)": daemon_pid}
    hops.update({FORWARDERS[name][0]: process.pid for name, (process, _) in forwarders.items()})
    routes = {
        name: Route(hop="daemon" if hops.get(name) == daemon_pid else "forwarder" if name in hops else "")
        for name in ops
    }
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
            forwarder = hops[name] if route.hop == "forwarder" else -1
            pids = {"client": 0, "daemon": daemon_pid, "forwarder": forwarder, "service": service_pid}
            before = {who: _cpu(pid) for who, pid in pids.items()}
            switches = process_switches(hops[name]) if name in hops else 0
            lat, wall = await phase(op, args.calls, IN_FLIGHT)
            if name in hops:
                route.hop_switches += process_switches(hops[name]) - switches
            for who, pid in pids.items():
                route.cpu[who] = route.cpu.get(who, 0.0) + _cpu(pid) - before[who]
            route.conc += lat
            route.wall += wall
            route.round_throughput.append(len(lat) / wall)
    for each in (via_proxy, direct, *via_forwarder.values()):
        await each.close()
    for process, _ in forwarders.values():
        process.terminate()
        await process.wait()
    return {"routes": routes, "node": node_address}


async def start_forwarder(
    kind: str, upstream: str, experiments: str
) -> tuple[asyncio.subprocess.Process, str]:
    """A ``_grpc_forwarder.py`` process of ``kind`` forwarding to ``upstream``, and its address."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(FORWARDER),
        "--kind",
        kind,
        upstream,
        stdout=asyncio.subprocess.PIPE,
        env=bench_env(GRPC_EXPERIMENTS=experiments),
    )
    assert process.stdout is not None
    port = int(await asyncio.wait_for(process.stdout.readline(), 30))
    return process, f"127.0.0.1:{port}"


def p50_added_by(r: Route, direct: Route) -> float:
    """Median over rounds of the route's p50 minus direct's, 1 in flight, in milliseconds."""
    return median([b - a for a, b in zip(direct.seq_round_p50, r.seq_round_p50, strict=True)]) * 1000


def p99_added_by(r: Route, direct: Route) -> float:
    """The route's pooled p99 minus direct's, 1 in flight, in milliseconds."""
    return (percentile(r.seq, 99) - percentile(direct.seq, 99)) * 1000


def share_of(r: Route, direct: Route) -> float:
    """Median over rounds of the route's throughput over direct's, 50 in flight."""
    return median([b / a for a, b in zip(direct.round_throughput, r.round_throughput, strict=True)])


def _cpu(pid: int) -> float:
    return time.process_time() if pid == 0 else process_cpu(pid) if pid > 0 else 0.0


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
    parser.add_argument(
        "--forwarders",
        default=",".join(FORWARDERS),
        help=f"bare forwarders measured alongside (default: {','.join(FORWARDERS)}; '' for none)",
    )
    args = parser.parse_args()
    args.forwarders = [name for name in args.forwarders.split(",") if name]
    unknown = set(args.forwarders) - set(FORWARDERS)
    if unknown:
        parser.error(f"unknown forwarders: {', '.join(sorted(unknown))}")

    with start_daemon() as daemon:
        folder = new_service(daemon)
        log_level = ["--env_vars", f"MICRO_LOG_LEVEL={args.log_level}"] if args.log_level else []
        run_service(daemon, folder, "--no-watch", *log_level)
        result = asyncio.run(measure(args, daemon, str(folder)))
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
            "+p50 ms",
            "+p99 ms",
            f"p50 ms @{IN_FLIGHT}",
            f"p99 ms @{IN_FLIGHT}",
            "calls/s",
            "share",
            "client us",
            "daemon us",
            "forwarder us",
            "service us",
            "hop cs",
            "hop busy",
        ],
        [
            [
                name,
                fmt_ms(percentile(r.seq, 50)),
                fmt_ms(percentile(r.seq, 99)),
                f"{p50_added_by(r, d):.2f}",
                f"{p99_added_by(r, d):.2f}",
                fmt_ms(percentile(r.conc, 50)),
                fmt_ms(percentile(r.conc, 99)),
                f"{r.throughput:.0f}",
                f"{share_of(r, d):.0%}",
                *(f"{r.cpu_per_call_us(who):.0f}" for who in ("client", "daemon", "forwarder", "service")),
                "" if not r.hop else f"{r.hop_switches_per_call:.1f}",
                "" if not r.hop else f"{r.hop_busy:.0%}",
            ]
            for name, r in routes.items()
        ],
    )
    print(
        "(+p50/+p99: added to direct's, 1 in flight, as judged; share: median over rounds of calls/s"
        " over direct's, 50 in flight; us: CPU time per call of each process over the 50-in-flight"
        " phases, the daemon's off the proxy routes being the runtime pumping the service's log lines;"
        " hop cs: context switches per call of the process between client and service; hop busy: its"
        " CPU time over the wall time, in cores)"
    )
    cpu_share = d.cpu_total_us / p.cpu_total_us
    print(
        f"CPU per call, all processes: direct {d.cpu_total_us:.0f} us, proxy {p.cpu_total_us:.0f} us: "
        f"the throughput share when the CPU is the limit would be {cpu_share:.0%} (info)"
    )
    cores = p.cpu_total_us * p.throughput / 1e6
    print(
        f"With {IN_FLIGHT} in flight through the proxy the daemon kept {p.hop_busy:.0%} of one core busy,"
        f" the three processes {cores:.2f} of the {os.cpu_count()} cores (info)"
    )

    p50_added = p50_added_by(p, d)
    p99_added = p99_added_by(p, d)
    share = share_of(p, d)
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
            "seq_p50_added_ms": round(p50_added_by(r, d), 4),
            "seq_p99_added_ms": round(p99_added_by(r, d), 4),
            "throughput_share": round(share_of(r, d), 4),
            **(
                {"hop_switches_per_call": round(r.hop_switches_per_call, 2), "hop_busy": round(r.hop_busy, 3)}
                if r.hop
                else {}
            ),
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
        "daemon_grpc_experiments": os.environ.get("GRPC_EXPERIMENTS", EXPERIMENTS),
    }
    emit_json("proxy_overhead", figures, targets)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
