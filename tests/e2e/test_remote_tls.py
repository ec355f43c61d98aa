"""A remote environment over TLS: ``micro server --tls-cert/--tls-key`` elsewhere, ``micro env add --tls``."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests._tls import Certificates, make_certificates
from tests.e2e._support import daemons, micro, new_service, ok, state, stop, wait_until

pytestmark = pytest.mark.slow


@dataclass
class Remote:
    home: Path
    address: str
    api_address: str
    banner: str


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return make_certificates(tmp_path / "tls")


@pytest.fixture
def remote(tmp_path: Path, certs: Certificates, monkeypatch: pytest.MonkeyPatch) -> Iterator[Remote]:
    """``micro server`` with TLS, in the foreground, in a home of its own; the CLI uses its owner's token."""
    with tls_server(tmp_path, certs) as started:
        token = json.loads((started.home / "config" / "auth" / "owner.json").read_text())["access_token"]
        monkeypatch.setenv("MICRO_AUTH_TOKEN", token)
        yield started


@contextlib.contextmanager
def tls_server(tmp_path: Path, certs: Certificates, **settings: str) -> Iterator[Remote]:
    """``micro server --tls-cert --tls-key`` in a home of its own, with extra ``MICRO_*`` ``settings``."""
    home = tmp_path / "remote-home"
    env = {**os.environ, "MICRO_HOME": str(home), "MICRO_SERVER_ADDRESS": "127.0.0.1:0", **settings}
    command = [
        sys.executable,
        "-m",
        "micro_cli",
        "server",
        "--tls-cert",
        str(certs.cert),
        "--tls-key",
        str(certs.key),
    ]
    log = tmp_path / "remote.log"
    with open(log, "w") as out:
        daemon = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: daemon.poll() is not None or "API gateway on" in log.read_text(), timeout=30)
        assert daemon.poll() is None, log.read_text()
        published = state(home)
        yield Remote(home, published["address"], published["api_address"], log.read_text())
    finally:
        stop(daemon.pid)
        daemon.wait(timeout=10)
        for pid in daemons(home):
            stop(pid)


def test_the_banner_and_state_file_say_tls(remote: Remote) -> None:
    assert f"listening on {remote.address} with TLS" in remote.banner
    assert f"API gateway on https://{remote.api_address}" in remote.banner
    published = state(remote.home)
    assert published["tls"] is True
    assert published["local_address"].startswith("127.0.0.1:")


def test_micro_run_uploads_to_a_tls_environment(
    home: Path, tmp_path: Path, remote: Remote, certs: Certificates, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = new_service(tmp_path / "src")
    ok("env", "add", "prod", remote.address, "--tls", "--ca-file", str(certs.ca))
    ok("env", "set", "prod")
    monkeypatch.chdir(folder.parent)

    ran = micro("run", "./helloworld", timeout=90)
    assert ran.returncode == 0, ran.stderr
    [status] = json.loads(ok("status", "--output", "json"))
    assert (status["name"], status["status"]) == ("helloworld", "running")
    answer = ok("call", "helloworld", "Helloworld.Call", '{"name": "Alice"}')
    assert json.loads(answer) == {"msg": "Hello Alice"}
    ok("kill", "helloworld")

    assert not (home / "state" / "server.json").exists()  # the local daemon was never started
    assert daemons(home) == []


def test_the_cli_explains_a_certificate_it_does_not_trust(home: Path, remote: Remote) -> None:
    ok("env", "add", "prod", remote.address, "--tls")
    failed = micro("--env", "prod", "store", "read", "k")
    assert failed.returncode == 5, failed.stderr
    assert "is not trusted" in failed.stderr and "--ca-file" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert daemons(home) == []


def test_a_local_and_a_remote_daemon_with_login_renewal_and_upload(
    home: Path, tmp_path: Path, certs: Certificates, monkeypatch: pytest.MonkeyPatch
) -> None:
    ok("store", "write", "where", "local")  # the local daemon, as its owner, without a login
    folder = new_service(tmp_path / "src")
    monkeypatch.chdir(folder.parent)
    with tls_server(tmp_path, certs, MICRO_AUTH_TOKEN_LIFETIME="4") as remote:
        ok("env", "add", "prod", remote.address, "--tls", "--ca-file", str(certs.ca))
        refused = micro("--env", "prod", "store", "read", "where")
        assert refused.returncode == 6
        assert "environment 'prod'" in refused.stderr and "micro login" in refused.stderr
        ok("--env", "prod", "login", "--username", "admin", "--password", "micro")
        ok("--env", "prod", "store", "write", "where", "remote")

        ran = micro("--env", "prod", "run", "./helloworld", timeout=90)
        assert ran.returncode == 0, ran.stderr
        first = ok("--env", "prod", "user", "token")
        time.sleep(5)  # past the access token's 4 seconds: the next command renews it by itself
        answer = ok("--env", "prod", "call", "helloworld", "Helloworld.Call", '{"name": "Alice"}')
        assert json.loads(answer) == {"msg": "Hello Alice"}
        assert ok("--env", "prod", "user", "token") != first
        assert ok("--env", "prod", "store", "read", "where") == "remote\n"
        ok("--env", "prod", "kill", "helloworld")
    assert ok("store", "read", "where") == "local\n"
