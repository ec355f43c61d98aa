"""Run every benchmark in turn and print a summary of their targets.

Each benchmark's own output is shown as it runs; its last line (JSON) is collected for the
summary. A missed target is reported, not an error: the exit status is non-zero only when a
benchmark fails to run. Run: .venv/bin/python bench/run_all.py [NAME ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    "cli_startup",
    "dynamic_cli",
    "store_throughput",
    "cold_start",
    "reload_latency",
    "proxy_overhead",
    "gateway",
    "messaging",
    "platform_profile",
    "memory",
]
TIMEOUT = 300.0


def run(name: str) -> tuple[dict[str, object] | None, float]:
    """Run one benchmark, echoing its output; its final JSON object (None on failure) and wall time."""
    print(f"=== {name} " + "=" * max(0, 66 - len(name)), flush=True)
    start = time.perf_counter()
    last = ""
    try:
        with subprocess.Popen(
            [sys.executable, str(HERE / f"{name}.py")], stdout=subprocess.PIPE, text=True, bufsize=1
        ) as process:
            assert process.stdout is not None
            for line in process.stdout:
                print(line, end="", flush=True)
                if line.strip():
                    last = line
            rc = process.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        print(f"{name}: timed out after {TIMEOUT:.0f} s", file=sys.stderr)
        return None, time.perf_counter() - start
    elapsed = time.perf_counter() - start
    print(flush=True)
    if rc != 0:
        print(f"{name}: exited {rc}", file=sys.stderr)
        return None, elapsed
    try:
        result = json.loads(last)
    except ValueError:
        print(f"{name}: no JSON result line", file=sys.stderr)
        return None, elapsed
    return result, elapsed


def _fmt(t: dict[str, object]) -> tuple[str, str]:
    """A target's measured value and limit as text: a ratio (``x``) unless it names a ``unit``."""
    unit = str(t.get("unit", "x"))
    ratio, limit = float(t["ratio"]), float(t["limit"])  # type: ignore[arg-type]
    op = ">=" if t.get("at_least") else "<="
    if unit == "x":
        return f"{ratio:.2f}x", f"{op} {limit:g}x"
    return f"{ratio:.3g} {unit}", f"{op} {limit:g} {unit}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run: {', '.join(BENCHMARKS)} (default: all)")
    args = parser.parse_args()
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    names = args.names or BENCHMARKS

    rows: list[list[str]] = []
    failed: list[str] = []
    results: dict[str, object] = {}
    for name in names:
        result, elapsed = run(name)
        if result is None:
            failed.append(name)
            rows.append([name, "(failed)", "-", "-", "ERROR", f"{elapsed:.1f}"])
            continue
        results[name] = result
        targets = result.get("targets", {})
        assert isinstance(targets, dict)
        if not targets:
            rows.append([name, "(figures only, no target)", "-", "-", "-", f"{elapsed:.1f}"])
        for target, t in targets.items():
            verdict = "PASS" if t["pass"] else "MISS"
            measured, limit = _fmt(t)
            rows.append([name, target, measured, limit, verdict, f"{elapsed:.1f}"])

    print("=== summary " + "=" * 58)
    header = ["bench", "target", "measured", "limit", "verdict", "wall s"]
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for n, row in enumerate(table):
        print(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))
    missed = sum(1 for r in rows if r[4] == "MISS")
    passed = sum(1 for r in rows if r[4] == "PASS")
    print(f"\n{passed} passed, {missed} missed, {len(failed)} failed")
    print(json.dumps({"bench": "run_all", "results": results, "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
