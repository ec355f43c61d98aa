"""CLI start-up: ``micro --help`` and a one-shot ``micro store read KEY``, as ratios to ``python -c pass``.

Each command runs as a fresh process, interleaved with the baseline, ~15 times; the figure is
the median wall time (spawn to exit). ``store read`` talks to a daemon this script started
(isolated MICRO_HOME, ephemeral port), so no daemon start-up is included.

Targets: --help <= 5x, store read <= 8x the baseline. Run: .venv/bin/python bench/cli_startup.py
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from _common import (
    MICRO,
    PYTHON,
    Target,
    emit_json,
    fmt_ms,
    median,
    print_importtime,
    print_table,
    print_targets,
    start_daemon,
)

KEY = "bench-cli-key"
VALUE = "bench-cli-value"
HELP_LIMIT = 5.0
READ_LIMIT = 8.0


def timed(cmd: list[str], env: dict[str, str], expect: str | None = None) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {result.returncode}: {result.stderr.strip()}")
    if expect is not None and result.stdout.strip() != expect:
        raise RuntimeError(f"{' '.join(cmd)} printed {result.stdout.strip()!r}, expected {expect!r}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="timed runs of each command (default 15)")
    parser.add_argument("--no-importtime", action="store_true", help="skip the -X importtime breakdown")
    args = parser.parse_args()

    with start_daemon() as daemon:
        env = daemon.env
        subprocess.run(
            [MICRO, "store", "write", KEY, VALUE], env=env, check=True, capture_output=True, timeout=60
        )

        commands: dict[str, tuple[list[str], str | None]] = {
            "python -c pass": ([PYTHON, "-c", "pass"], None),
            "micro --help": ([MICRO, "--help"], None),
            "python -m micro_cli --help": ([PYTHON, "-m", "micro_cli", "--help"], None),
            "micro store read": ([MICRO, "store", "read", KEY], VALUE),
            "python -m micro_cli store read": ([PYTHON, "-m", "micro_cli", "store", "read", KEY], VALUE),
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for cmd, expect in commands.values():  # warm the page cache and .pyc files
            timed(cmd, env, expect)
        for _ in range(args.runs):
            for name, (cmd, expect) in commands.items():
                times[name].append(timed(cmd, env, expect))
        if daemon.process.poll() is not None:  # the reads would then have timed an auto-start
            raise RuntimeError(f"micro server died during the run:\n{daemon.log_tail()}")

        base = median(times["python -c pass"])
        rows = []
        for name, samples in times.items():
            m = median(samples)
            rows.append([name, fmt_ms(m), fmt_ms(min(samples)), fmt_ms(max(samples)), f"{m / base:.2f}x"])
        print(
            f"CLI start-up, {args.runs} interleaved runs each (wall, spawn to exit; daemon already running)\n"
        )
        print_table(["command", "median ms", "min ms", "max ms", "ratio"], rows)

        targets = [
            Target("micro --help", median(times["micro --help"]) / base, HELP_LIMIT),
            Target(
                "python -m micro_cli --help", median(times["python -m micro_cli --help"]) / base, HELP_LIMIT
            ),
            Target("micro store read", median(times["micro store read"]) / base, READ_LIMIT),
            Target(
                "python -m micro_cli store read",
                median(times["python -m micro_cli store read"]) / base,
                READ_LIMIT,
            ),
        ]
        print_targets(targets)

        imports: dict[str, float] = {}
        if not args.no_importtime:
            imports["micro --help"] = print_importtime("micro --help", [PYTHON, MICRO, "--help"], env) / 1e6
            imports["micro store read"] = (
                print_importtime("micro store read KEY", [PYTHON, MICRO, "store", "read", KEY], env) / 1e6
            )
            imports["python -c pass"] = print_importtime("python -c pass", [PYTHON, "-c", "pass"], env) / 1e6

    figures = {
        "runs": args.runs,
        "median_s": {name: round(median(s), 5) for name, s in times.items()},
        "import_total_s": {name: round(v, 5) for name, v in imports.items()},
    }
    emit_json("cli_startup", figures, targets)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
