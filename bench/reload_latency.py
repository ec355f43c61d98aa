"""Hot reload: from saving a .py file to the first call answered by the new code, beside uvicorn --reload.

micro: a helloworld service (``micro new`` + ``micro run .``, which watches its folder) under a
daemon this script started. Each edit rewrites ``handler/helloworld.py`` in place with a new,
unique greeting; two callers in this process call ``Helloworld.Call`` through the daemon's proxy
back to back (proto, ``client.call``), all the while. The time of an edit is the moment the write
returns; its latency ends when any caller first receives the new greeting. Every failed call
counts, and so does the longest wait for one answer (a stall while nothing serves).

Baseline: ``uvicorn app:app --reload`` (watchfiles, as uvicorn picks it when installed; default
reload settings) serving a raw ASGI app in its own temporary folder that answers ``GET /?name=x``
with ``{GREETING} x``; each edit rewrites ``GREETING`` in ``app.py``. It starts through
``_uvicorn_nodelay.py``, which gives the socket uvicorn binds for ``--reload`` TCP_NODELAY (see
there: without it every response waits ~40 ms for a delayed ACK; ``--plain-uvicorn`` runs
``python -m uvicorn`` itself). Two callers of a minimal HTTP/1.1 keep-alive client on asyncio
streams call it back to back. Like any pooled HTTP client, a request that finds its kept-alive
connection closed before any byte of an answer is sent again once on a new connection (counted
as ``resent``, not failed): uvicorn closes idle connections when its old worker stops.

An edit whose new code never answers because the runtime reported the reload failed (an
``error:`` line of its own in the service's log; the old instance keeps serving) counts under
``no answer`` and is left out of the percentiles; the next edit reloads again.

Rounds alternate the two sides (only the side being edited has callers), the first side of each
round alternating too; one warm-up edit each first. Between edits a side settles: micro until
the old instance's process has exited, uvicorn for as long, both plus 0.2 s.

Target: micro's p50 <= 1.5x uvicorn's, and zero failed micro calls.
Run: .venv/bin/python bench/reload_latency.py [--edits N]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    PYTHON,
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
    run_service,
    service_node,
    start_daemon,
)

from micro.client import Client
from micro.transport import connect

LIMIT = 1.5
CALLERS = 2
ANSWER_TIMEOUT = 20.0  # an edit whose new answer does not come within this is a failure of the run
SETTLE = 0.2
CALL_TIMEOUT = 10.0

APP = """GREETING = "{greeting}"


async def app(scope, receive, send):
    name = scope["query_string"].decode().partition("name=")[2] or "world"
    body = f"{{GREETING}} {{name}}".encode()
    await send(
        {{
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())],
        }}
    )
    await send({{"type": "http.response.body", "body": body}})
"""


@dataclass
class Edit:
    """One edit's outcome."""

    latency: float | None  # save -> first new answer, seconds; None: the new code never answered
    calls: int  # answered calls during the round
    failed: int
    resent: int
    stall: float  # the longest single call of the round, seconds
    duration: float  # how long the callers ran, seconds
    swap: float | None = None  # micro's own "reloaded in" figure, seconds
    error: str = ""  # why the reload failed


@dataclass
class Side:
    """One server under test: how to edit it, how to call it, and its results."""

    name: str
    call: Callable[[int], Awaitable[str]]  # caller index -> greeting word of the answer
    write: Callable[[str], None]  # greeting -> rewrite the source file
    settle: Callable[[], Awaitable[None]]
    before_edit: Callable[[], Awaitable[None]]
    events: Callable[[], list[str]] = lambda: []  # the runtime's new messages about the service
    resent: Callable[[], int] = lambda: 0
    diagnose: Callable[[], str] = lambda: ""
    edits: list[Edit] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def answered(self) -> list[Edit]:
        return [e for e in self.edits if e.latency is not None]

    @property
    def latencies(self) -> list[float]:
        return [e.latency for e in self.edits if e.latency is not None]

    @property
    def failed_reloads(self) -> list[Edit]:
        return [e for e in self.edits if e.latency is None]


async def edit_round(side: Side, greeting: str) -> Edit:
    """Rewrite the greeting under a steady stream of calls; time save -> first new answer."""
    stop = asyncio.Event()
    first: list[float] = []
    calls = failed = 0
    stall = 0.0
    resent0 = side.resent()

    async def caller(index: int) -> None:
        nonlocal calls, failed, stall
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                word = await side.call(index)
            except Exception as exc:  # every failure counts, whatever its kind
                failed += 1
                if len(side.errors) < 5:
                    side.errors.append(repr(exc))
                await asyncio.sleep(0.001)
                continue
            t1 = time.perf_counter()
            calls += 1
            stall = max(stall, t1 - t0)
            if word == greeting and not first:
                first.append(t1)

    await side.before_edit()
    side.events()  # what happened before this edit is not its doing
    swap: float | None = None
    error = ""

    def read_events() -> None:
        nonlocal swap, error
        for message in side.events():
            if found := re.match(r"reloaded in (\d+) ms", message):
                swap = int(found.group(1)) / 1000
            elif message.startswith("error:"):
                error = message

    began = time.perf_counter()
    tasks = [asyncio.create_task(caller(i)) for i in range(CALLERS)]
    await asyncio.sleep(0.1)  # the stream is flowing before the save
    side.write(greeting)
    saved = time.perf_counter()
    deadline = saved + ANSWER_TIMEOUT
    polls = 0
    while not first and not error and time.perf_counter() < deadline:
        await asyncio.sleep(0.005)
        polls += 1
        if polls % 10 == 0:
            read_events()
    if first:
        await side.settle()
    else:
        await asyncio.sleep(SETTLE)
    stop.set()
    await asyncio.gather(*tasks)
    read_events()
    duration = time.perf_counter() - began
    if not first and not error:
        raise RuntimeError(
            f"{side.name}: no answer with {greeting!r} within {ANSWER_TIMEOUT:.0f} s\n{side.diagnose()}"
        )
    latency = first[0] - saved if first else None
    return Edit(latency, calls, failed, side.resent() - resent0, stall, duration, swap, error)


class LogTail:
    """The runtime's own messages in a service's log file, read incrementally (rotation restarts it)."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.name = name
        self.path: Path | None = None
        self.inode = 0
        self.offset = 0

    def new_messages(self) -> list[str]:
        if self.path is None:
            found = sorted(self.folder.glob(f"*/{self.name}.log"))
            if not found:
                return []
            self.path = found[0]
        try:
            with open(self.path, "rb") as f:
                inode = os.fstat(f.fileno()).st_ino
                if inode != self.inode or os.fstat(f.fileno()).st_size < self.offset:
                    self.inode, self.offset = inode, 0
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        complete = data.rpartition(b"\n")[0]
        self.offset += len(complete) + 1 if complete else 0
        messages = []
        for raw in complete.split(b"\n"):
            if b'"source":"runtime"' not in raw:
                continue
            try:
                messages.append(str(json.loads(raw)["message"]))
            except (ValueError, KeyError):
                continue
        return messages


# -- micro ----------------------------------------------------------------------------------------


def micro_side(address: str, folder: Path, logs: Path) -> tuple[Side, Client]:
    sys.path.insert(0, str(folder))
    pb = importlib.import_module("proto.helloworld_pb2")
    client = Client(connect(address), timeout=CALL_TIMEOUT)
    handler = folder / "handler" / "helloworld.py"
    source = handler.read_text()
    marker = 'f"Hello {request.name}"'
    if marker not in source:
        raise RuntimeError(f"{handler} does not answer {marker}: the template changed")
    request = pb.Request(name="bench")
    old_pid: list[int] = []

    async def call(index: int) -> str:
        response = await client.call("helloworld", "/helloworld.Helloworld/Call", request, pb.Response)
        return str(response.msg).partition(" ")[0]

    def write(greeting: str) -> None:
        handler.write_text(source.replace(marker, f'f"{greeting} {{request.name}}"'))

    async def before_edit() -> None:
        deadline = time.monotonic() + 10
        while True:  # one node: the last swap is over
            try:
                old_pid[:] = [(await service_node(client))[1]]
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    async def settle() -> None:
        deadline = time.monotonic() + 15
        while _alive(old_pid[0]) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(SETTLE)

    def diagnose() -> str:
        files = sorted(logs.glob("*/helloworld.log"))
        lines = [line for path in files for line in path.read_text(errors="replace").splitlines()]
        notable = [line for line in lines if "Received Helloworld.Call" not in line]
        return "the service's log (but its calls):\n" + "\n".join(notable[-25:])

    tail = LogTail(logs, "helloworld")
    side = Side("micro run", call, write, settle, before_edit, events=tail.new_messages, diagnose=diagnose)
    return side, client


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie counts as dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


# -- uvicorn --------------------------------------------------------------------------------------


class HttpClient:
    """One HTTP/1.1 keep-alive connection on asyncio streams: just enough for ``GET``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.resent = 0

    async def get(self, target: str) -> bytes:
        request = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n\r\n".encode()
        for attempt in range(2):
            fresh = self.writer is None
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            assert self.reader is not None
            started = False
            try:
                self.writer.write(request)
                await self.writer.drain()
                head = await self.reader.readuntil(b"\r\n\r\n")
                started = True
                status, headers = _parse_head(head)
                body = await self.reader.readexactly(int(headers.get("content-length", "0")))
                if headers.get("connection", "").lower() == "close":
                    self.close()
                if status != 200:
                    raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
                return body
            except (OSError, asyncio.IncompleteReadError) as exc:
                self.close()
                partial = isinstance(exc, asyncio.IncompleteReadError) and bool(exc.partial)
                if fresh or started or partial or attempt:
                    raise
                self.resent += 1  # the kept-alive connection was closed under us: send again
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if sep:
            headers[key.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_uvicorn(folder: Path, port: int, *, plain: bool = False) -> subprocess.Popen[bytes]:
    """``uvicorn app:app --reload`` in ``folder``; through ``_uvicorn_nodelay.py`` unless ``plain``."""
    (folder / "app.py").write_text(APP.format(greeting="Hello"))
    launcher = ["-m", "uvicorn"] if plain else [str(Path(__file__).resolve().parent / "_uvicorn_nodelay.py")]
    options = ["--reload", "--reload-dir", str(folder), "--app-dir", str(folder), "--lifespan", "off"]
    with open(folder.parent / "uvicorn.log", "wb") as log:
        return subprocess.Popen(
            [PYTHON, *launcher, "app:app", *options, "--host", "127.0.0.1", "--port", str(port)],
            cwd=folder,
            env=bench_env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its reloader and worker stop together (killpg)
        )


async def wait_http(process: subprocess.Popen[bytes], port: int, folder: Path) -> None:
    deadline = time.monotonic() + 30
    client = HttpClient(port)
    while True:
        try:
            await client.get("/?name=ready")
            client.close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                log = (folder.parent / "uvicorn.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"uvicorn did not answer on port {port}:\n{log}") from None
            await asyncio.sleep(0.02)


def uvicorn_side(folder: Path, port: int) -> Side:
    clients = [HttpClient(port) for _ in range(CALLERS)]
    app = folder / "app.py"

    async def call(index: int) -> str:
        body = await asyncio.wait_for(clients[index].get("/?name=bench"), CALL_TIMEOUT)
        return body.decode().partition(" ")[0]

    def write(greeting: str) -> None:
        app.write_text(APP.format(greeting=greeting))

    async def nothing() -> None:
        pass

    async def settle() -> None:
        # The old worker is gone before the new one answers; settle as long as micro's retire does.
        await asyncio.sleep(SETTLE)

    def diagnose() -> str:
        lines = (folder.parent / "uvicorn.log").read_text(errors="replace").splitlines()
        notable = [line for line in lines if '"GET /' not in line]
        return "uvicorn's output (but its access log):\n" + "\n".join(notable[-25:])

    return Side(
        "uvicorn --reload",
        call,
        write,
        settle,
        nothing,
        resent=lambda: sum(c.resent for c in clients),
        diagnose=diagnose,
    )


def stop_group(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, 15)
            process.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            os.killpg(process.pid, 9)
            process.wait(10)


# -- the run --------------------------------------------------------------------------------------


async def run(sides: list[Side], edits: int) -> None:
    for side in sides:  # warm-up edit: the first reload of each pays for cold caches
        await edit_round(side, "Warmup")
    for i in range(edits):
        for side in sides if i % 2 == 0 else sides[::-1]:
            # Consecutive greetings differ in length: a .pyc records its source's mtime in whole
            # seconds and its size, so two same-size saves within one second would load stale
            # bytecode (in uvicorn's worker and micro's instance alike; README.md, "Known issue").
            side.edits.append(await edit_round(side, f"Edit{i:02d}{'x' * (1 + i % 2)}{os.getpid()}"))


async def measure(args: argparse.Namespace, daemon: Daemon, folder: Path, web: Path) -> list[Side]:
    micro, client = micro_side(daemon.address, folder, Path(daemon.home) / "logs" / "services")
    port = free_port()
    process = start_uvicorn(web, port, plain=args.plain_uvicorn)
    try:
        await wait_http(process, port, web)
        uvicorn = uvicorn_side(web, port)
        await run([micro, uvicorn], args.edits)
    finally:
        stop_group(process)
        await client.close()
    return [micro, uvicorn]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=20, help="timed edits of each side (default 20)")
    parser.add_argument(
        "--plain-uvicorn",
        action="store_true",
        help="run python -m uvicorn itself (no TCP_NODELAY: ~20 calls/s per caller, see _uvicorn_nodelay.py)",
    )
    args = parser.parse_args()

    with start_daemon() as daemon, tempfile.TemporaryDirectory(prefix="micro-bench-uvicorn-") as web:
        folder = new_service(daemon)
        run_service(daemon, folder)
        (Path(web) / "app").mkdir()  # watched; uvicorn's log stays out of it, as micro's does
        sides = asyncio.run(measure(args, daemon, folder, Path(web) / "app"))
    micro, uvicorn = sides

    def ms(values: list[float], q: float) -> str:
        return fmt_ms(percentile(values, q)) if values else "-"

    print(
        f"Save -> first call answered by the new code, {args.edits} edits each, "
        f"{CALLERS} callers back to back all along\n"
    )
    print_table(
        [
            "server",
            "p50 ms",
            "p90 ms",
            "min ms",
            "max ms",
            "no answer",
            "failed calls",
            "resent",
            "stall p50 ms",
            "stall max ms",
            "calls/s",
        ],
        [
            [
                s.name,
                ms(s.latencies, 50),
                ms(s.latencies, 90),
                ms(s.latencies, 0),
                ms(s.latencies, 100),
                len(s.failed_reloads),
                sum(e.failed for e in s.edits),
                sum(e.resent for e in s.edits),
                ms([e.stall for e in s.edits], 50),
                ms([e.stall for e in s.edits], 100),
                f"{sum(e.calls for e in s.edits) / sum(e.duration for e in s.edits):.0f}",
            ]
            for s in sides
        ],
    )
    swaps = [e.swap for e in micro.edits if e.swap is not None]
    if swaps:
        print(
            f"(micro's own 'reloaded in' figure, swap start -> new instance registered: p50 "
            f"{ms(swaps, 50)} ms, p90 {ms(swaps, 90)} ms over {len(swaps)} reloads)"
        )
    print(
        "(no answer: edits whose new code never answered, the reload failed; stall: the longest single"
        " call of a round; resent: requests sent again on a new connection)"
    )
    for edit in micro.failed_reloads:
        print(f"micro reload failed: {edit.error}", file=sys.stderr)
    for side in sides:
        for error in side.errors:
            print(f"{side.name} call failed: {error}", file=sys.stderr)

    micro_failed = sum(e.failed for e in micro.edits)
    targets = [
        Target("reload p50, micro / uvicorn", median(micro.latencies) / median(uvicorn.latencies), LIMIT),
        Target("failed micro calls", micro_failed, 0, unit="calls"),
    ]
    print_targets(targets)

    def figures_of(side: Side) -> dict[str, Any]:
        def s(values: list[float], q: float) -> float | None:
            return round(percentile(values, q), 5) if values else None

        return {
            "p50_s": s(side.latencies, 50),
            "p90_s": s(side.latencies, 90),
            "min_s": s(side.latencies, 0),
            "max_s": s(side.latencies, 100),
            "failed_reloads": len(side.failed_reloads),
            "failed_calls": sum(e.failed for e in side.edits),
            "resent": sum(e.resent for e in side.edits),
            "calls": sum(e.calls for e in side.edits),
            "stall_p50_s": s([e.stall for e in side.edits], 50),
            "stall_max_s": s([e.stall for e in side.edits], 100),
            "latencies_s": [round(x, 4) for x in side.latencies],
        }

    figures = {
        "edits": args.edits,
        "callers": CALLERS,
        "micro": figures_of(micro),
        "uvicorn": figures_of(uvicorn),
        "micro_swap_p50_s": round(percentile(swaps, 50), 5) if swaps else None,
        "micro_reload_errors": [e.error for e in micro.failed_reloads],
    }
    emit_json("reload_latency", figures, targets)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
