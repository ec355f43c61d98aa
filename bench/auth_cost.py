"""What auth costs a call: the same unary call through a daemon enforcing auth and one with it off.

Two daemons this script started (isolated MICRO_HOMEs, ephemeral ports), each running the
helloworld service (``micro new`` + ``micro run .``): one with ``MICRO_AUTH=jwt`` (the default:
the proxy verifies the caller's RS256 token and evaluates the namespace's rules on every call;
this one holds the default rule plus ``EXTRA_RULES`` more, for rule evaluation to do some work),
one with ``MICRO_AUTH=none``. The client sends a real access token (the local owner's, from the
daemon's MICRO_HOME) to the first; to the second it sends the same-sized header, so the bytes on
the wire match. Same call both ways: ``/helloworld.Helloworld/Call`` with proto bytes.

Each round runs, per daemon, a phase with 1 call in flight and one with 50 in flight; the order
alternates from round to round so drift hits both alike. Beside the wall-clock figures, the CPU
time the daemon and the service spent per call in the 50-in-flight phases (from /proc): on a
shared, noisy machine that is the steadier measure of what auth adds. ``--control`` starts the
second daemon with auth on too (an A/A run): what it reports is the bench's own bias between two
identical daemons (seen here: the first about 30 us of daemon CPU a call above the second).

Target: auth on costs <= 10% (p50 with 1 in flight, and throughput with 50 in flight, medians
over rounds).
Run: .venv/bin/python bench/auth_cost.py [--rounds R] [--seq-calls N] [--calls N]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
from pathlib import Path

from _common import (
    Target,
    emit_json,
    fmt_ms,
    median,
    new_service,
    print_table,
    print_targets,
    process_cpu,
    run_service,
    service_node,
    start_daemon,
)
from proxy_overhead import IN_FLIGHT, PATH, phase

from micro.auth import AuthClient
from micro.client import Client
from micro.credentials import StaticToken
from micro.transport import connect

COST_LIMIT = 0.10
EXTRA_RULES = 10


async def measure(
    args: argparse.Namespace, on: tuple[str, str, int], off: tuple[str, int], folder: str
) -> dict[str, dict[str, list[float]]]:
    sys.path.insert(0, folder)
    pb = importlib.import_module("proto.helloworld_pb2")
    address_on, token, daemon_on = on
    with_auth = Client(connect(address_on), credentials=StaticToken(token), timeout=30)
    auth = AuthClient(with_auth)
    await auth.list_rules()  # the namespace's first read writes the default rule, which grants this call
    for i in range(EXTRA_RULES):  # rules a real namespace might hold, none of them deciding this call
        await auth.create_rule(f"deny-{i}", f"service:other-{i}:*", scope="*", access="denied", priority=i)
    without = Client(connect(off[0]), credentials=StaticToken("x" * len(token)), timeout=30)
    pids = {
        "auth on": (daemon_on, (await service_node(with_auth))[1]),
        "auth off": (off[1], (await service_node(without))[1]),
    }
    request = pb.Request(name="bench")

    def op(client: Client):  # type: ignore[no-untyped-def]
        async def call() -> None:
            response = await client.call("helloworld", PATH, request, pb.Response)
            assert response.msg == "Hello bench", response

        return call

    ops = {"auth on": op(with_auth), "auth off": op(without)}
    figures: dict[str, dict[str, list[float]]] = {
        name: {"p50": [], "throughput": [], "daemon_us": [], "service_us": []} for name in ops
    }
    for call in ops.values():
        await phase(call, 400, IN_FLIGHT)
        await phase(call, 100, 1)
    names = list(ops)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            latencies, _ = await phase(ops[name], args.seq_calls, 1)
            figures[name]["p50"].append(sorted(latencies)[len(latencies) // 2])
            daemon, service = pids[name]
            cpu = process_cpu(daemon), process_cpu(service)
            latencies, wall = await phase(ops[name], args.calls, IN_FLIGHT)
            figures[name]["throughput"].append(len(latencies) / wall)
            figures[name]["daemon_us"].append((process_cpu(daemon) - cpu[0]) / len(latencies) * 1e6)
            figures[name]["service_us"].append((process_cpu(service) - cpu[1]) / len(latencies) * 1e6)
    await with_auth.close()
    await without.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds (default 8)")
    parser.add_argument("--seq-calls", type=int, default=200, help="calls per daemon per round, 1 in flight")
    parser.add_argument(
        "--calls", type=int, default=800, help=f"calls per daemon per round, {IN_FLIGHT} in flight"
    )
    parser.add_argument(
        "--control", action="store_true", help="an A/A run: the second daemon enforces auth too"
    )
    args = parser.parse_args()

    second = "jwt" if args.control else "none"
    with start_daemon(MICRO_AUTH="jwt") as on, start_daemon(MICRO_AUTH=second) as off:
        folder = new_service(on)
        run_service(on, folder, "--no-watch", "--env_vars", "MICRO_LOG_LEVEL=WARNING")
        run_service(off, folder, "--no-watch", "--env_vars", "MICRO_LOG_LEVEL=WARNING")
        owner = json.loads((Path(on.home) / "config" / "auth" / "owner.json").read_text())
        figures = asyncio.run(
            measure(args, (on.address, owner["access_token"], on.pid), (off.address, off.pid), str(folder))
        )

    p50 = {name: median(f["p50"]) for name, f in figures.items()}
    rate = {name: median(f["throughput"]) for name, f in figures.items()}
    daemon_us = {name: median(f["daemon_us"]) for name, f in figures.items()}
    service_us = {name: median(f["service_us"]) for name, f in figures.items()}
    print(
        f"Unary Helloworld.Call through the proxy, {args.rounds} interleaved rounds: {args.seq_calls} calls "
        f"with 1 in flight and {args.calls} with {IN_FLIGHT} in flight per daemon and round\n"
    )
    print_table(
        [
            "daemon",
            "p50 ms (1 in flight)",
            f"calls/s ({IN_FLIGHT} in flight)",
            "daemon CPU us/call",
            "service CPU us/call",
        ],
        [
            [
                name,
                fmt_ms(p50[name]),
                f"{rate[name]:.0f}",
                f"{daemon_us[name]:.0f}",
                f"{service_us[name]:.0f}",
            ]
            for name in figures
        ],
    )
    targets = [
        Target("p50 with auth / without (1 in flight)", p50["auth on"] / p50["auth off"], 1 + COST_LIMIT),
        Target(
            f"calls/s with auth / without ({IN_FLIGHT} in flight)",
            rate["auth on"] / rate["auth off"],
            1 - COST_LIMIT,
            at_least=True,
        ),
    ]
    print_targets(targets)
    print(
        f"\ninfo: auth adds {daemon_us['auth on'] - daemon_us['auth off']:.0f} us of daemon CPU and "
        f"{service_us['auth on'] - service_us['auth off']:.0f} us of service CPU per call "
        f"({daemon_us['auth on'] / daemon_us['auth off']:.2f}x the daemon's CPU per call without auth)"
    )
    emit_json(
        "auth_cost",
        {"p50_s": p50, "calls_per_s": rate, "daemon_cpu_us": daemon_us, "service_cpu_us": service_us},
        targets,
    )


if __name__ == "__main__":
    main()
