"""Shared helpers of the benchmarks: a private daemon, timing statistics, and the report format.

Every benchmark measures its own baseline in the same run and judges only ratios against it,
because the machine it runs on is shared and noisy.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Daemon",
    "Target",
    "bench_env",
    "emit_json",
    "fmt_ms",
    "importtime_top",
    "median",
    "memory_kb",
    "micro_cli",
    "new_service",
    "parse_importtime",
    "percentile",
    "print_import_table",
    "print_importtime",
    "print_table",
    "print_targets",
    "process_cpu",
    "process_switches",
    "run_service",
    "runtime_events",
    "service_node",
    "spawn_daemon",
    "start_daemon",
]

PYTHON = sys.executable
# The venv's console script sits next to its interpreter (do not resolve: the venv's python is a symlink).
MICRO = str(Path(sys.executable).parent / "micro")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

# Child processes cache bytecode in a private folder (removed at exit), as an installed package
# would have its .pyc files: without it, PYTHONDONTWRITEBYTECODE=1 (set in some environments) makes
# every process compile micro's own modules again. BENCH_NO_PYCACHE=1 keeps the inherited setting.
PYCACHE: str | None = None
if not os.environ.get("BENCH_NO_PYCACHE"):
    PYCACHE = tempfile.mkdtemp(prefix="micro-bench-pycache-")
    atexit.register(shutil.rmtree, PYCACHE, True)


def bench_env(home: str | None = None, **extra: str) -> dict[str, str]:
    """The environment for micro processes: isolated home, ephemeral ports, no inherited choices."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MICRO_")}
    if PYCACHE is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = PYCACHE
    env["MICRO_SERVER_ADDRESS"] = "127.0.0.1:0"
    env["MICRO_API_ADDRESS"] = "127.0.0.1:0"
    if home is not None:
        env["MICRO_HOME"] = home
    env.update(extra)
    return env


@dataclass
class Daemon:
    """A ``micro server`` subprocess with its own MICRO_HOME."""

    home: str
    process: subprocess.Popen[bytes]
    address: str = ""
    pid: int = 0
    env: dict[str, str] = field(default_factory=dict)
    keep_home: bool = False  # a home the caller made: ``stop`` leaves it

    @property
    def state_file(self) -> Path:
        return Path(self.home) / "state" / "server.json"

    @property
    def log_file(self) -> Path:
        return Path(self.home) / "bench-server.log"

    def wait_ready(self, timeout: float = START_TIMEOUT, poll: float = 0.005) -> None:
        """Block until the daemon has published its state file; raise if it dies or takes too long."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self._read_state()
            if state is not None and state.get("pid") == self.process.pid and state.get("address"):
                self.pid, self.address = state["pid"], state["address"]
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"micro server exited with {self.process.returncode}:\n{self.log_tail()}")
            time.sleep(poll)
        raise RuntimeError(f"micro server did not publish {self.state_file} within {timeout:.0f} s")

    def _read_state(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL as a last resort; then remove the home. Never raises."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(STOP_TIMEOUT)
        except Exception as exc:  # cleanup must not mask the benchmark's own error
            print(f"warning: stopping micro server {self.process.pid}: {exc}", file=sys.stderr)
        finally:
            self._stop_autostarted()
            if not self.keep_home:
                shutil.rmtree(self.home, ignore_errors=True)

    def _stop_autostarted(self) -> None:
        """Stop a daemon a CLI call auto-started in this private home (if ours died early)."""
        state = self._read_state()
        pid = state.get("pid") if state else None
        if not isinstance(pid, int) or pid == self.process.pid:
            return
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                ours = f"MICRO_HOME={self.home}".encode() in f.read().split(b"\0")
            if ours:
                print(f"warning: stopping auto-started micro server {pid}", file=sys.stderr)
                os.kill(pid, signal.SIGTERM)
        except OSError:
            pass

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def spawn_daemon(python_args: tuple[str, ...] = (), home: str | None = None, **extra_env: str) -> Daemon:
    """Spawn ``micro server`` on an ephemeral port with a fresh MICRO_HOME (or ``home``, which
    ``stop`` then leaves); do not wait for it."""
    kept = home is not None
    home = home if home is not None else tempfile.mkdtemp(prefix="micro-bench-")
    env = bench_env(home, **extra_env)
    with open(Path(home) / "bench-server.log", "wb") as log:
        process = subprocess.Popen(
            [PYTHON, *python_args, "-m", "micro_cli", "server"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Daemon(home=home, process=process, env=env, keep_home=kept)


def start_daemon(**extra_env: str) -> Daemon:
    """Spawn ``micro server`` and wait for its state file. Use as a context manager (stops it)."""
    daemon = spawn_daemon((), **extra_env)
    try:
        daemon.wait_ready()
    except BaseException:
        daemon.stop()
        raise
    return daemon


def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (0-100), nearest-rank on sorted data."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[rank]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))


@dataclass
class Target:
    """A target: ``ratio <= limit`` (or ``>= limit`` with ``at_least``).

    ``ratio`` is normally ``measured / baseline``; with ``unit="ms"`` it is a difference in
    milliseconds against a baseline of the same run (e.g. the latency a proxy adds).
    """

    name: str
    ratio: float
    limit: float
    unit: str = "x"
    at_least: bool = False

    @property
    def passed(self) -> bool:
        return self.ratio >= self.limit if self.at_least else self.ratio <= self.limit

    def fmt(self, value: float) -> str:
        return f"{value:.2f}x" if self.unit == "x" else f"{value:.3g} {self.unit}"

    @property
    def limit_text(self) -> str:
        return (
            f"{'>=' if self.at_least else '<='} {self.limit:g}{'x' if self.unit == 'x' else ' ' + self.unit}"
        )

    def as_json(self) -> dict[str, Any]:
        found: dict[str, Any] = {"ratio": round(self.ratio, 3), "limit": self.limit, "pass": self.passed}
        if self.unit != "x":
            found["unit"] = self.unit
        if self.at_least:
            found["at_least"] = True
        return found


def print_targets(targets: list[Target]) -> None:
    print()
    print_table(
        ["target", "measured", "limit", "verdict"],
        [[t.name, t.fmt(t.ratio), t.limit_text, "PASS" if t.passed else "MISS"] for t in targets],
    )


def emit_json(name: str, figures: dict[str, Any], targets: list[Target]) -> None:
    """The final line: every figure, machine-readable (``run_all.py`` parses it)."""
    print()
    print(
        json.dumps(
            {"bench": name, "figures": figures, "targets": {t.name: t.as_json() for t in targets}},
            sort_keys=False,
        )
    )


def importtime_top(cmd: list[str], env: dict[str, str]) -> tuple[list[tuple[int, int, str]], int]:
    """Run ``cmd`` (a Python command line) with ``-X importtime``; every import, and the total.

    Rows are ``(cumulative_us, self_us, name)``; the total sums the top-level imports' cumulative time.
    """
    # -X rather than PYTHONIMPORTTIME: some builds ignore the variable.
    result = subprocess.run(
        [cmd[0], "-X", "importtime", *cmd[1:]], env=env, capture_output=True, text=True, timeout=60
    )
    return parse_importtime(result.stderr)


def parse_importtime(text: str) -> tuple[list[tuple[int, int, str]], int]:
    """Every import in ``-X importtime`` output as ``(cumulative_us, self_us, name)``, and the total."""
    rows: list[tuple[int, int, str]] = []
    total = 0
    for line in text.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        try:
            self_us, cumulative, name = line[len("import time:") :].split("|", 2)
            row = (int(cumulative), int(self_us), name.strip())
        except ValueError:
            continue
        rows.append(row)
        if not name.startswith("  "):  # one space after the bar: a top-level import
            total += row[0]
    return rows, total


def print_importtime(title: str, cmd: list[str], env: dict[str, str], n: int = 10) -> int:
    """Print the ``n`` slowest imports of running ``cmd``; return the total import time in microseconds."""
    rows, total = importtime_top(cmd, env)
    print_import_table(title, rows, total, n)
    return total


def print_import_table(title: str, rows: list[tuple[int, int, str]], total: int, n: int = 10) -> None:
    print(f"\npython -X importtime, top {n} cumulative: {title}  (all imports: {total / 1000:.1f} ms)")
    top = sorted(rows, reverse=True)[:n]
    print_table(
        ["module", "cumulative ms", "self ms"],
        [[name, f"{c / 1000:.1f}", f"{s / 1000:.1f}"] for c, s, name in top],
    )
    by_self = sorted(rows, key=lambda r: r[1], reverse=True)[:6]
    print("largest self times: " + ", ".join(f"{name} {s / 1000:.1f}" for _, s, name in by_self))


# -- processes ------------------------------------------------------------------------------------


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) used so far by process ``pid``; 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def process_switches(pid: int) -> int:
    """Context switches (voluntary and not, all threads) of process ``pid`` so far; 0 if unreadable."""
    total = 0
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for thread in threads:
        try:
            with open(f"/proc/{pid}/task/{thread}/status") as f:
                total += sum(int(line.split()[1]) for line in f if "ctxt_switches:" in line)
        except (OSError, ValueError, IndexError):
            pass  # a thread that ended meanwhile
    return total


def memory_kb(pid: int) -> dict[str, int]:
    """Memory of ``pid`` in KiB: ``rss`` and ``hwm`` (VmRSS, VmHWM of /proc/PID/status) and, where
    /proc/PID/smaps_rollup is readable, ``pss`` and ``private`` (Private_Clean + Private_Dirty)."""
    found: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
                found[{"VmRSS": "rss", "VmHWM": "hwm"}.get(key, key.lower())] = int(value.split()[0])
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            private = 0
            for line in f:
                key, _, value = line.partition(":")
                if key == "Pss":
                    found["pss"] = int(value.split()[0])
                elif key in ("Private_Clean", "Private_Dirty"):
                    private += int(value.split()[0])
            found["private"] = private
    except (OSError, ValueError, IndexError):
        pass
    return found


# -- a helloworld service under the daemon's runtime ------------------------------------------------


def micro_cli(daemon: Daemon, *args: str, cwd: str | Path | None = None, timeout: float = 60.0) -> str:
    """Run ``micro ARGS`` against ``daemon``; its stdout. Raises with its stderr if it fails."""
    result = subprocess.run(
        [MICRO, *args], cwd=cwd, env=daemon.env, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode != 0:
        raise RuntimeError(f"micro {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result.stdout


def new_service(daemon: Daemon, name: str = "helloworld") -> Path:
    """``micro new NAME`` in a fresh temporary folder (removed with the daemon's home); its folder."""
    parent = Path(daemon.home) / "bench-src"  # not watched by anything but the runtime's watcher
    parent.mkdir(exist_ok=True)
    micro_cli(daemon, "new", name, cwd=parent)
    return parent / name


def run_service(daemon: Daemon, folder: Path, *extra: str, attempts: int = 3) -> None:
    """``micro run .`` in ``folder``: returns once the runtime reports the service running.

    A start that fails is tried again with ``--force`` (a warning on stderr says why): a service
    process that crashes as it starts (see README.md, "Found: services that crashed as they
    started") is not what the benchmarks measure.
    """
    for attempt in range(attempts):
        try:
            micro_cli(
                daemon, "run", ".", *extra, *(["--force"] if attempt else []), cwd=folder, timeout=120.0
            )
            return
        except RuntimeError as exc:
            if attempt == attempts - 1:
                raise
            print(f"warning: starting {folder.name} failed, trying again: {exc}", file=sys.stderr)


async def service_node(client: Any, name: str = "helloworld") -> tuple[str, int]:
    """The (address, pid) of the one registered node of ``name``, seen through ``client``."""
    from micro.registry import RegistryClient

    nodes = [node for version in await RegistryClient(client).get_service(name) for node in version.nodes]
    if len(nodes) != 1:
        raise RuntimeError(f"{name}: expected one registered node, found {len(nodes)}")
    return nodes[0].address, int(nodes[0].metadata["pid"])


def runtime_events(daemon: Daemon, name: str = "helloworld") -> list[tuple[float, str]]:
    """The runtime's own log lines about service ``name``: (timestamp, message), oldest first."""
    found: list[tuple[float, str]] = []
    for path in sorted((Path(daemon.home) / "logs" / "services").glob(f"*/{name}.log")):
        for raw in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if record.get("metadata", {}).get("source") == "runtime":
                found.append((float(record["timestamp"]), str(record["message"])))
    return sorted(found)
