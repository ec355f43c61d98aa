"""The daemon's API gateway: ``POST /helloworld/call`` over HTTP, against calling the service's own
port over gRPC, and against a bare aiohttp JSON endpoint.

One helloworld service (``micro new`` + ``micro run . --no-watch``) under a daemon this script
started (isolated MICRO_HOME, ephemeral ports); the gateway's address is ``api_address`` in the
daemon's state file, the service's the node address it registered. Three routes:

* ``gateway``: ``POST http://API/helloworld/call`` with ``{"name":"x"}`` (``Content-Type:
  application/json``): aiohttp in the daemon, JSON transcoded to proto, forwarded over gRPC.
* ``direct gRPC``: ``/helloworld.Helloworld/Call`` with proto to the node's port (no daemon).
* ``bare aiohttp``: a JSON endpoint answering the same greeting, served by this script
  (``--echo-server``) in a process of its own, with the gateway's aiohttp settings: the floor
  of any HTTP front built on aiohttp, on this machine, under the same load.

Load: ``wrk -t2 -c50 -d10s --latency -s post.lua URL`` for the HTTP routes; for gRPC, a
``grpc.aio`` client in this process with 50 calls in flight on one channel for as long. Each
after a short warm-up; with ``--rounds`` > 1 the routes alternate their order round by round.
Latency with 1 in flight: a sequential client (blocking socket, keep-alive HTTP/1.1; the sync
``grpc`` stub), calls alternating between routes in rounds.

Targets: gateway throughput >= 70% of direct gRPC (median over rounds); the latency the gateway
adds with 1 in flight, median over rounds of (gateway p50 - direct gRPC p50), <= 1 ms. The wrk
percentiles under load are shown, not judged.
Run: .venv/bin/python bench/gateway.py [--duration 10] [--rounds 1] [--seq-calls 200]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
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

THROUGHPUT_SHARE = 0.7
P50_ADDED_MS = 1.0
CONNECTIONS = 50
THREADS = 2
PATH = "/helloworld.Helloworld/Call"
HTTP_PATH = "/helloworld/call"
BODY = b'{"name":"x"}'
GREETING = "Hello x"

GATEWAY, DIRECT, ECHO = "gateway (HTTP)", "direct gRPC", "bare aiohttp (info)"

LUA = r"""
wrk.method = "POST"
wrk.body = '{"name":"x"}'
wrk.headers["Content-Type"] = "application/json"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,' ..
    '"timeout":%d,"p50_us":%d,"p75_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency.max))
end
"""


# -- the bare aiohttp endpoint (a process of its own) ---------------------------------------------


def echo_server() -> None:
    """Serve ``POST /helloworld/call`` on 127.0.0.1, print the port, run until SIGTERM."""
    from aiohttp import web

    async def call(request: web.Request) -> web.Response:
        data = await request.json()
        body = json.dumps({"msg": f"Hello {data.get('name', '')}"}, separators=(",", ":"))
        return web.Response(body=body.encode(), content_type="application/json")

    async def serve() -> None:
        app = web.Application()
        app.router.add_route("POST", HTTP_PATH, call)
        # The gateway's own runner settings (micro_daemon/gateway/server.py).
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print(runner.addresses[0][1], flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(serve())


# -- clients ---------------------------------------------------------------------------------------


class HttpConnection:
    """A minimal blocking keep-alive HTTP/1.1 client: one request at a time, Content-Length bodies."""

    def __init__(self, address: str) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request = (
            f"POST {HTTP_PATH} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(BODY)}\r\n\r\n"
        ).encode() + BODY
        self.buffer = b""

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed by the server")
        self.buffer += chunk

    def call(self) -> bytes:
        self.sock.sendall(self.request)
        while b"\r\n\r\n" not in self.buffer:
            self._more()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(
            (
                int(v)
                for k, _, v in (line.partition(":") for line in lines[1:])
                if k.lower() == "content-length"
            ),
            None,
        )
        if length is None:
            raise RuntimeError(f"no Content-Length in {head!r}")
        while len(self.buffer) < length:
            self._more()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {body!r}")
        return body

    def close(self) -> None:
        self.sock.close()


def check_greeting(body: bytes) -> None:
    if json.loads(body) != {"msg": GREETING}:
        raise RuntimeError(f"unexpected answer {body!r}")


@dataclass
class Route:
    seq: list[float] = field(default_factory=list)
    seq_round_p50: list[float] = field(default_factory=list)
    load: list[dict[str, Any]] = field(default_factory=list)  # one per round
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds under load

    @property
    def requests(self) -> int:
        return sum(r["requests"] for r in self.load)

    @property
    def throughput(self) -> float:
        wall = sum(r["duration_us"] for r in self.load) / 1e6
        return self.requests / wall if wall else float("nan")

    def cpu_per_call_us(self, who: str) -> float:
        return self.cpu.get(who, 0.0) / self.requests * 1e6 if self.requests else float("nan")

    @property
    def errors(self) -> int:
        return sum(r.get(k, 0) for r in self.load for k in ("connect", "read", "write", "status", "timeout"))


def sequential(call: Any, calls: int) -> list[float]:
    latencies = []
    for _ in range(calls):
        t0 = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t0)
    return latencies


def run_wrk(url: str, script: str, duration: float) -> tuple[dict[str, Any], float]:
    """One wrk run; its figures (from the script's ``done``) and wrk's own CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = subprocess.run(
        [
            "wrk",
            f"-t{THREADS}",
            f"-c{CONNECTIONS}",
            f"-d{duration:g}s",
            "--latency",
            "-s",
            script,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=duration + 60,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"wrk exited {result.returncode}: {result.stderr.strip()}")
    for line in result.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            found: dict[str, Any] = json.loads(line[len("WRK_JSON ") :])
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            return found, cpu
    raise RuntimeError(f"no figures in wrk's output:\n{result.stdout}\n{result.stderr}")


async def grpc_load(stub: Any, request: Any, duration: float) -> dict[str, Any]:
    """``CONNECTIONS`` calls in flight on one grpc.aio channel for ``duration`` seconds."""
    latencies: list[float] = []
    deadline = time.perf_counter() + duration

    async def worker() -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            response = await stub(request, timeout=30)
            latencies.append(time.perf_counter() - t0)
            if response.msg != GREETING:
                raise RuntimeError(f"unexpected answer {response!r}")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
    wall = time.perf_counter() - t0
    return {
        "requests": len(latencies),
        "duration_us": int(wall * 1e6),
        "p50_us": percentile(latencies, 50) * 1e6,
        "p75_us": percentile(latencies, 75) * 1e6,
        "p90_us": percentile(latencies, 90) * 1e6,
        "p99_us": percentile(latencies, 99) * 1e6,
        "max_us": max(latencies) * 1e6,
    }


# -- the benchmark --------------------------------------------------------------------------------


def measure(
    args: argparse.Namespace, api: str, node: str, pids: dict[str, int], echo: str, folder: str, work: str
) -> dict[str, Route]:
    import grpc
    import grpc.aio

    sys.path.insert(0, folder)
    pb = importlib.import_module("proto.helloworld_pb2")
    request = pb.Request(name="x")
    routes = {name: Route() for name in (GATEWAY, DIRECT, ECHO)}
    http_address = {GATEWAY: api, ECHO: echo}

    # 1 in flight: a blocking client per route, rounds alternating the order.
    channel = grpc.insecure_channel(node)
    stub = channel.unary_unary(
        PATH, request_serializer=pb.Request.SerializeToString, response_deserializer=pb.Response.FromString
    )
    connections = {name: HttpConnection(address) for name, address in http_address.items()}

    def direct_call() -> None:
        response = stub(request, timeout=30)
        if response.msg != GREETING:
            raise RuntimeError(f"unexpected answer {response!r}")

    calls = {
        GATEWAY: lambda: connections[GATEWAY].call(),
        DIRECT: direct_call,
        ECHO: lambda: connections[ECHO].call(),
    }
    for name in (GATEWAY, ECHO):
        check_greeting(connections[name].call())
    for call in calls.values():  # warm-up: connections, caches, code paths
        sequential(call, 100)
    names = list(calls)
    for r in range(args.seq_rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            lat = sequential(calls[name], args.seq_calls)
            routes[name].seq += lat
            routes[name].seq_round_p50.append(percentile(lat, 50))
    for conn in connections.values():
        conn.close()
    channel.close()

    # 50 in flight: wrk for HTTP, grpc.aio for gRPC.
    script = str(Path(work) / "post.lua")
    Path(script).write_text(LUA)

    async def direct_load(duration: float) -> dict[str, Any]:
        async with grpc.aio.insecure_channel(node) as aio_channel:
            aio_stub = aio_channel.unary_unary(
                PATH,
                request_serializer=pb.Request.SerializeToString,
                response_deserializer=pb.Response.FromString,
            )
            await grpc_load(aio_stub, request, min(1.0, duration))  # the channel's warm-up
            return await grpc_load(aio_stub, request, duration)

    def load(name: str, duration: float) -> tuple[dict[str, Any], dict[str, float]]:
        before = {who: process_cpu(pid) for who, pid in pids.items()}
        client_before = time.process_time()
        if name == DIRECT:
            found = asyncio.run(direct_load(duration))
            client_cpu = time.process_time() - client_before
        else:
            found, client_cpu = run_wrk(f"http://{http_address[name]}{HTTP_PATH}", script, duration)
        cpu = {who: process_cpu(pid) - before[who] for who, pid in pids.items()}
        cpu["client"] = client_cpu
        return found, cpu

    for name in names:  # warm-up
        load(name, args.warmup)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            found, cpu = load(name, args.duration)
            routes[name].load.append(found)
            for who, seconds in cpu.items():
                routes[name].cpu[who] = routes[name].cpu.get(who, 0.0) + seconds
    return routes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per route and round")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load per route before")
    parser.add_argument("--rounds", type=int, default=1, help="load rounds, routes alternating (default 1)")
    parser.add_argument("--seq-rounds", type=int, default=10, help="rounds of 1-in-flight calls")
    parser.add_argument("--seq-calls", type=int, default=200, help="calls per route and round, 1 in flight")
    parser.add_argument(
        "--log-level",
        default="",
        help="MICRO_LOG_LEVEL for the service (default: the template's INFO, one log line per call)",
    )
    parser.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        echo_server()
        return

    from micro.client import Client
    from micro.transport import connect

    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")

    async def find_node(address: str) -> tuple[str, int]:
        client = Client(connect(address), timeout=30)
        try:
            return await service_node(client)
        finally:
            await client.close()

    work = tempfile.mkdtemp(prefix="micro-bench-gateway-")
    echo = subprocess.Popen(
        [sys.executable, __file__, "--echo-server"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=bench_env(),
        text=True,
    )
    try:
        assert echo.stdout is not None
        echo_address = f"127.0.0.1:{int(echo.stdout.readline())}"
        with start_daemon() as daemon:
            folder = new_service(daemon)
            log_level = ["--env_vars", f"MICRO_LOG_LEVEL={args.log_level}"] if args.log_level else []
            run_service(daemon, folder, "--no-watch", *log_level)
            api = json.loads(daemon.state_file.read_text())["api_address"]
            node, service_pid = asyncio.run(find_node(daemon.address))
            pids = {"daemon": daemon.pid, "service": service_pid, "echo": echo.pid}
            routes = measure(args, api, node, pids, echo_address, str(folder), work)
            if daemon.process.poll() is not None:
                raise RuntimeError(f"micro server died during the run:\n{daemon.log_tail()}")
    finally:
        if echo.poll() is None:
            echo.send_signal(signal.SIGTERM)
            try:
                echo.wait(10)
            except subprocess.TimeoutExpired:
                echo.kill()
                echo.wait()
        shutil.rmtree(work, ignore_errors=True)

    g, d, e = routes[GATEWAY], routes[DIRECT], routes[ECHO]
    print(
        f"POST {HTTP_PATH} through the gateway, Helloworld.Call straight to the service over gRPC, and a "
        f"bare aiohttp endpoint.\nLoad: {CONNECTIONS} in flight, {args.rounds} round(s) of "
        f"{args.duration:g} s per route (HTTP: wrk -t{THREADS} -c{CONNECTIONS}; gRPC: grpc.aio, one channel)."
        f"\n1 in flight: {args.seq_rounds} rounds of {args.seq_calls} calls per route "
        "(blocking socket HTTP/1.1 keep-alive; sync grpc stub).\n"
    )

    def us(value: float) -> str:
        return f"{value / 1000:.2f}"

    print_table(
        [
            "route",
            "seq p50 ms",
            "seq p99 ms",
            f"p50 ms @{CONNECTIONS}",
            f"p99 ms @{CONNECTIONS}",
            "req/s",
            "of direct",
            "errors",
            "client us",
            "daemon us",
            "service us",
            "echo us",
        ],
        [
            [
                name,
                fmt_ms(percentile(r.seq, 50)),
                fmt_ms(percentile(r.seq, 99)),
                us(median([x["p50_us"] for x in r.load])),
                us(median([x["p99_us"] for x in r.load])),
                f"{r.throughput:.0f}",
                f"{r.throughput / d.throughput:.0%}",
                str(r.errors) if name != DIRECT else "-",
                *(f"{r.cpu_per_call_us(who):.0f}" for who in ("client", "daemon", "service", "echo")),
            ]
            for name, r in routes.items()
        ],
    )
    print(
        "(p50/p99 @50: wrk's percentiles for HTTP, the client's own for gRPC, median over rounds; us: CPU"
        " time per request under load of each process, client = wrk or this process's grpc.aio client;"
        " the daemon's share on the direct route is the runtime pumping the service's log lines)"
    )
    cpu_total = {
        name: sum(r.cpu_per_call_us(who) for who in ("client", "daemon", "service", "echo"))
        for name, r in routes.items()
    }
    print(
        "CPU per request, all processes: "
        + ", ".join(f"{name} {cpu:.0f} us" for name, cpu in cpu_total.items())
        + "; were the 2 cores the limit, the gateway would reach "
        + f"{cpu_total[DIRECT] / cpu_total[GATEWAY]:.0%} of direct (info)"
    )

    share = median(
        [
            a["requests"] / a["duration_us"] / (b["requests"] / b["duration_us"])
            for a, b in zip(g.load, d.load, strict=True)
        ]
    )
    p50_added = median([a - b for a, b in zip(g.seq_round_p50, d.seq_round_p50, strict=True)]) * 1000
    over_echo = median([a - b for a, b in zip(g.seq_round_p50, e.seq_round_p50, strict=True)]) * 1000
    print(
        f"1 in flight, gateway p50 - bare aiohttp p50: {over_echo:.3f} ms (the daemon's routing, transcoding"
        f" and gRPC hop beyond HTTP itself; info); bare aiohttp / direct throughput: "
        f"{e.throughput / d.throughput:.0%} (info)"
    )
    targets = [
        Target(f"throughput @{CONNECTIONS}, gateway / direct gRPC", share, THROUGHPUT_SHARE, at_least=True),
        Target("seq p50 added by the gateway", p50_added, P50_ADDED_MS, unit="ms"),
    ]
    print_targets(targets)
    errors = {name: r.errors for name, r in routes.items() if r.errors}
    if errors:
        print(f"\nwarning: failed requests under load: {errors}", file=sys.stderr)

    def figures_of(r: Route) -> dict[str, Any]:
        return {
            "seq_p50_ms": round(percentile(r.seq, 50) * 1000, 4),
            "seq_p99_ms": round(percentile(r.seq, 99) * 1000, 4),
            "p50_ms": round(median([x["p50_us"] for x in r.load]) / 1000, 4),
            "p99_ms": round(median([x["p99_us"] for x in r.load]) / 1000, 4),
            "requests_per_s": round(r.throughput, 1),
            "errors": r.errors,
            "cpu_us_per_request": {who: round(r.cpu_per_call_us(who), 1) for who in r.cpu},
        }

    figures = {
        "connections": CONNECTIONS,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "routes": {name: figures_of(r) for name, r in routes.items()},
        "throughput_share": round(share, 4),
        "seq_p50_added_ms": round(p50_added, 4),
        "seq_p50_over_bare_aiohttp_ms": round(over_echo, 4),
        "cpu_bound_share": round(cpu_total[DIRECT] / cpu_total[GATEWAY], 4),
        "service_log_level": args.log_level or "INFO",
    }
    emit_json("gateway", figures, targets)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
