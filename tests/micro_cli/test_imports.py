"""The CLI starts fast: heavy modules are imported only by the commands that need them."""

from __future__ import annotations

import subprocess
import sys

import pytest

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


def _imported(*args: str) -> set[str]:
    """Every module ``python -m micro_cli ARGS`` imports, read from ``-X importtime``."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "micro_cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    return {line.rsplit("|", 1)[1].strip() for line in lines[1:]}  # the first line is the header


def _heavy(modules: set[str], names: tuple[str, ...]) -> set[str]:
    return {m for m in modules if any(m == n or m.startswith(n + ".") for n in names)}


def test_the_import_check_sees_imports():
    assert "typer" in _imported("--help")


def test_help_imports_no_heavy_module(micro_home):
    assert _heavy(_imported("--help"), HEAVY) == set()


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
    assert _heavy(modules, ("grpc", "httpx", "keyring", "jwt", "micro_daemon", "rich", "pydantic")) == set()


def test_a_command_with_a_saved_login_imports_no_keyring(micro_server, micro_cli):
    micro_cli("login", "-u", "admin", "--password", "micro").assert_success()
    modules = _imported("store", "list")
    assert "micro.http2_transport" in modules
    assert _heavy(modules, ("keyring", "jwt", "httpx", "micro_daemon", "pydantic")) == set()
