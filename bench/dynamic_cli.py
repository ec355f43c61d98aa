"""Dynamic service commands: ``micro helloworld call``, its ``--help`` and shell completion, as
ratios to ``python -c pass``.

A daemon this script started (isolated MICRO_HOME, ephemeral ports) runs the helloworld service
(``micro new`` + ``micro run . --no-watch``); one warm-up round fills the schema cache (and the
bytecode cache). Then each command runs as a fresh process, interleaved with the baseline, ~15
times; the figure is the median wall time (spawn to exit). Every run's output is checked.

* ``micro helloworld call --name=x``: cached schema, one call through the daemon's proxy (JSON,
  transcoded there), the cache refreshed alongside.
* ``micro helloworld call --help``: from the schema cache alone, no round trip.
* completion of ``micro hello``: ``_MICRO_COMPLETE=complete_bash COMP_WORDS='micro hello'
  COMP_CWORD=1 micro`` (typer's protocol; the variable is ``_<PROG>_COMPLETE``), which must
  answer ``helloworld``. Completion of ``micro helloworld call --`` (the flags, which needs the
  service's schema: protobuf) is measured alongside, not judged, and so is ``micro --help`` (the
  start-up every command pays, as in ``cli_startup.py``).

The same commands also run with ``PYTHONDONTWRITEBYTECODE=1`` and no bytecode cache for micro's
own modules (an editable install in an environment that writes no ``.pyc``), not judged.

Targets: call <= 8x, call --help <= 5x, completion <= 5x the baseline.
Run: .venv/bin/python bench/dynamic_cli.py [--runs 15] [--no-importtime] [--no-uncached]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _common import (
    MICRO,
    PYCACHE,
    PYTHON,
    Target,
    emit_json,
    fmt_ms,
    median,
    new_service,
    print_importtime,
    print_table,
    print_targets,
    run_service,
    start_daemon,
)

CALL_LIMIT = 8.0
HELP_LIMIT = 5.0
COMPLETE_LIMIT = 5.0

BASELINE = "python -c pass"
CALL = "micro helloworld call --name=x"
HELP = "micro helloworld call --help"
COMPLETE = "complete 'micro hello'"
COMPLETE_FLAGS = "complete 'micro helloworld call --' (info)"
ROOT_HELP = "micro --help (info)"
UNCACHED = " [no .pyc]"


def check_call(out: str) -> None:
    if json.loads(out) != {"msg": "Hello x"}:
        raise ValueError("not the greeting")


def check_help(out: str) -> None:
    if not out.startswith("Usage: micro helloworld call") or "--name" not in out:
        raise ValueError("not the endpoint's help")


def check_complete(out: str) -> None:
    if "helloworld" not in out.split():
        raise ValueError("no 'helloworld' candidate")


def check_complete_flags(out: str) -> None:
    if "--name" not in out.split():
        raise ValueError("no '--name' candidate")


def check_root_help(out: str) -> None:
    if not out.startswith("Usage: micro"):
        raise ValueError("not micro's help")


def timed(cmd: list[str], env: dict[str, str], check: object = None) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {result.returncode}: {result.stderr.strip()}")
    if callable(check):
        try:
            check(result.stdout)
        except ValueError as exc:
            raise RuntimeError(f"{' '.join(cmd)} printed {result.stdout.strip()[:300]!r}: {exc}") from None
    return elapsed


def completion_env(env: dict[str, str], words: str, cword: int) -> dict[str, str]:
    return {**env, "_MICRO_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="timed runs of each command (default 15)")
    parser.add_argument("--no-importtime", action="store_true", help="skip the -X importtime breakdown")
    parser.add_argument(
        "--no-uncached", action="store_true", help="skip the runs without a bytecode cache (info)"
    )
    args = parser.parse_args()

    with start_daemon() as daemon:
        folder = new_service(daemon)
        run_service(daemon, folder, "--no-watch")
        env = daemon.env
        commands: dict[str, tuple[list[str], dict[str, str], object]] = {
            BASELINE: ([PYTHON, "-c", "pass"], env, None),
            CALL: ([MICRO, "helloworld", "call", "--name=x"], env, check_call),
            HELP: ([MICRO, "helloworld", "call", "--help"], env, check_help),
            COMPLETE: ([MICRO], completion_env(env, "micro hello", 1), check_complete),
            COMPLETE_FLAGS: (
                [MICRO],
                completion_env(env, "micro helloworld call --", 3),
                check_complete_flags,
            ),
            ROOT_HELP: ([MICRO, "--help"], env, check_root_help),
        }
        if PYCACHE is not None and not args.no_uncached:
            # As the environment would run them: no bytecode written, none cached for micro's modules
            # (the venv's third-party packages keep the .pyc files pip compiled at install).
            for name in (CALL, HELP, COMPLETE):
                cmd, cmd_env, check = commands[name]
                bare = {k: v for k, v in cmd_env.items() if k != "PYTHONPYCACHEPREFIX"}
                bare["PYTHONDONTWRITEBYTECODE"] = "1"
                commands[name + UNCACHED] = (cmd, bare, check)

        times: dict[str, list[float]] = {name: [] for name in commands}
        # Warm-up: fills the schema cache, the .pyc files and the page cache.
        for cmd, cmd_env, check in commands.values():
            timed(cmd, cmd_env, check)
        for _ in range(args.runs):
            for name, (cmd, cmd_env, check) in commands.items():
                times[name].append(timed(cmd, cmd_env, check))
        if daemon.process.poll() is not None:  # the calls would then have timed an auto-start
            raise RuntimeError(f"micro server died during the run:\n{daemon.log_tail()}")

        base = median(times[BASELINE])
        rows = []
        for name, samples in times.items():
            m = median(samples)
            rows.append([name, fmt_ms(m), fmt_ms(min(samples)), fmt_ms(max(samples)), f"{m / base:.2f}x"])
        print(
            f"Dynamic service commands, {args.runs} interleaved runs each "
            "(wall, spawn to exit; daemon and helloworld already running, schema cached)\n"
        )
        print_table(["command", "median ms", "min ms", "max ms", "ratio"], rows)
        if PYCACHE is None:
            print("(BENCH_NO_PYCACHE=1: the inherited bytecode setting applies to every row)")

        targets = [
            Target(CALL, median(times[CALL]) / base, CALL_LIMIT),
            Target(HELP, median(times[HELP]) / base, HELP_LIMIT),
            Target(COMPLETE, median(times[COMPLETE]) / base, COMPLETE_LIMIT),
        ]
        print_targets(targets)

        imports: dict[str, float] = {}
        if not args.no_importtime:
            for name in (CALL, HELP, COMPLETE):
                cmd, cmd_env, _ = commands[name]
                imports[name] = print_importtime(name, [PYTHON, *cmd], cmd_env) / 1e6
            imports[BASELINE] = print_importtime(BASELINE, [PYTHON, "-c", "pass"], env) / 1e6

    figures = {
        "runs": args.runs,
        "pycache": PYCACHE is not None,
        "median_s": {name: round(median(s), 5) for name, s in times.items()},
        "ratio": {name: round(median(s) / base, 3) for name, s in times.items()},
        "import_total_s": {name: round(v, 5) for name, v in imports.items()},
    }
    emit_json("dynamic_cli", figures, targets)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
