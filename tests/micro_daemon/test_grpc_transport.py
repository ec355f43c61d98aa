"""The daemon picks grpc's polling transport before grpc is imported, with names grpc knows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from micro_daemon.grpc_transport import EXPERIMENTS, use_polling_transport

# Stands in for micro_daemon.app: records what the daemon's process looked like when it was imported.
PROBE = """
import os, sys, types
app = types.ModuleType("micro_daemon.app")
app.run = lambda *args: print(os.environ.get("GRPC_EXPERIMENTS"), "grpc" in sys.modules)
sys.modules["micro_daemon.app"] = app
"""


def _probe(call: str, home: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS" and not k.startswith("MICRO_")}
    env["MICRO_HOME"] = str(home)
    result = subprocess.run(
        [sys.executable, "-c", PROBE + call], env=env, cwd=home, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_grpc_knows_every_experiment_named():
    env = {**os.environ, "GRPC_EXPERIMENTS": EXPERIMENTS}
    result = subprocess.run(
        [sys.executable, "-c", "import grpc"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "experiment" not in result.stderr.lower(), result.stderr


@pytest.mark.parametrize(
    "call",
    [
        "import micro_daemon.__main__ as m; m.main()",
        "from micro_cli.server import server; server()",
    ],
)
def test_entry_points_choose_before_grpc_is_imported(call, tmp_path):
    assert _probe(call, tmp_path) == f"{EXPERIMENTS} False"


def test_a_choice_in_the_environment_is_kept(monkeypatch):
    monkeypatch.setenv("GRPC_EXPERIMENTS", "")
    use_polling_transport()
    assert os.environ["GRPC_EXPERIMENTS"] == ""


def test_no_choice_gets_the_polling_transport(tmp_path):
    call = "from micro_daemon.grpc_transport import use_polling_transport\nuse_polling_transport()\n"
    call += "sys.modules['micro_daemon.app'].run()"
    assert _probe(call, tmp_path) == f"{EXPERIMENTS} False"


def test_once_grpc_is_imported_the_environment_is_left_alone(monkeypatch):
    import grpc  # noqa: F401  # as in a test process, or a program embedding the daemon

    monkeypatch.setenv("GRPC_EXPERIMENTS", "placeholder")
    monkeypatch.delenv("GRPC_EXPERIMENTS")
    use_polling_transport()
    assert "GRPC_EXPERIMENTS" not in os.environ
