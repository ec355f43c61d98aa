"""The CLI starts fast: heavy modules are imported only by the commands that need them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from micro_cli.main import COMMANDS

HEAVY = (
    "grpc",
    "httpx",
    "keyring",
    "jwt",
    "rich",
    "google.protobuf",
    "micro_daemon",
    "watchfiles",
    "pydantic",
)

# The modules of the built-in commands: each is imported only by a command line that names it.
COMMAND_MODULES = {entry.module for entry in COMMANDS.values()}

# The console script: shell completion answers to the program name it was installed as.
MICRO = Path(sys.executable).parent / "micro"


def _imported(*args: str) -> set[str]:
    """Every module ``python -m micro_cli ARGS`` imports, read from ``-X importtime``."""
    return _run([sys.executable, "-X", "importtime", "-m", "micro_cli", *args])[1]


def _completed(line: str) -> tuple[list[str], set[str]]:
    """What bash completion offers for the last word of ``line``, and every module imported for it."""
    words = line.split()
    cword = len(words) if line.endswith(" ") else len(words) - 1
    env = {**os.environ, "_MICRO_COMPLETE": "complete_bash", "COMP_WORDS": line, "COMP_CWORD": str(cword)}
    out, modules = _run([sys.executable, "-X", "importtime", str(MICRO)], env)
    return out.split(), modules


def _run(command: list[str], env: dict[str, str] | None = None) -> tuple[str, set[str]]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    return result.stdout, {line.rsplit("|", 1)[1].strip() for line in lines[1:]}  # line 0: the header


def _heavy(modules: set[str], names: tuple[str, ...]) -> set[str]:
    return {m for m in modules if any(m == n or m.startswith(n + ".") for n in names)}


def test_the_import_check_sees_imports():
    assert "typer" in _imported("--help")


def test_help_imports_no_heavy_module(micro_home):
    assert _heavy(_imported("--help"), HEAVY) == set()


def test_help_imports_no_command_module(micro_home):
    modules = _imported("--help")
    assert "micro_cli.lazy" in modules
    assert modules & {*COMMAND_MODULES, "micro_cli.session", "micro.errors"} == set()


@pytest.mark.parametrize(
    ("args", "module"),
    [
        (["store", "--help"], "micro_cli.store"),
        (["auth", "create", "--help"], "micro_cli.auth"),
        (["server", "--help"], "micro_cli.server"),
        (["env"], "micro_cli.environments_cmd"),
        (["user", "namespace"], "micro_cli.user"),
        (["logout"], "micro_cli.login"),
        (["kill", "--help"], "micro_cli.runtime"),
    ],
)
def test_a_command_imports_only_its_own_module(micro_home, args, module):
    assert _imported(*args) & COMMAND_MODULES == {module}


@pytest.mark.parametrize(
    "args",
    [["store", "--help"], ["env"], ["user", "namespace"], ["--version"], ["auth", "--help"], ["logout"]],
)
def test_local_commands_import_no_transport(micro_home, args):
    assert _heavy(_imported(*args), ("grpc", "google.protobuf", "micro_daemon", "httpx")) == set()


def test_store_read_imports_only_the_http2_client(micro_server, micro_cli):
    micro_cli("store", "write", "k", "v").assert_success()
    modules = _imported("store", "read", "k")
    assert "micro.http2_transport" in modules  # the call went through micro's own client: grpc is not needed
    assert modules & COMMAND_MODULES == {"micro_cli.store"}
    assert _heavy(modules, ("grpc", "httpx", "keyring", "jwt", "micro_daemon", "rich", "pydantic")) == set()


def test_a_command_with_a_saved_login_imports_no_keyring(micro_server, micro_cli):
    micro_cli("login", "-u", "admin", "--password", "micro").assert_success()
    modules = _imported("store", "list")
    assert "micro.http2_transport" in modules
    assert _heavy(modules, ("keyring", "jwt", "httpx", "micro_daemon", "pydantic")) == set()


def test_a_service_command_imports_no_command_module(micro_server, micro_cli):
    calls = _imported("registry", "list-services")  # a building block: a dynamic command, as any service
    assert "micro_cli.dynamic" in calls
    assert calls & COMMAND_MODULES == set()
    assert _imported("registry", "list-services", "--help") & COMMAND_MODULES == set()


def test_completion_of_a_first_word_imports_no_command_module(micro_server, micro_cli):
    micro_cli("registry", "list-services").assert_success()  # the schema cache now holds registry
    offered, modules = _completed("micro ")
    assert {"store", "services", "registry"} <= set(offered)  # built-in commands and cached services
    assert modules & COMMAND_MODULES == set()
    offered, modules = _completed("micro reg")
    assert offered == ["registry"]
    assert modules & COMMAND_MODULES == set()


def test_completion_inside_a_group_imports_only_its_module(micro_home):
    offered, modules = _completed("micro store ")
    assert offered == ["read", "write", "delete", "list", "databases", "tables"]
    assert modules & COMMAND_MODULES == {"micro_cli.store"}
