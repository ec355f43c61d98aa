"""Remote environments over TLS: ``micro env add NAME HOST:PORT --tls --ca-file CA`` against a TLS daemon."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from micro.home import Home
from micro.testing.pytest import DaemonThread
from tests._tls import Certificates, make_certificates
from tests.micro_cli.test_env import _rows


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return make_certificates(tmp_path / "tls")


def test_tls_flag_and_ca_file_are_listed_and_saved(micro_cli, certs: Certificates) -> None:
    micro_cli("env", "add", "plain", "10.0.0.5:8081").assert_success()
    added = micro_cli("env", "add", "public", "10.0.0.6:8081", "--tls").assert_success()
    assert "(10.0.0.6:8081, TLS)" in added.out
    micro_cli("env", "add", "private", "10.0.0.7:8081", "--ca-file", str(certs.ca)).assert_success()
    rows = _rows(micro_cli("env").out)
    assert rows["local"][3] == "no"
    assert rows["plain"][1:3] == ["10.0.0.5:8081", "no"]
    assert rows["public"][1:3] == ["10.0.0.6:8081", "yes"]
    assert rows["private"][1:3] == ["10.0.0.7:8081", f"ca:{certs.ca}"]
    envs = {e["name"]: e for e in json.loads(micro_cli("env", "--output", "json").out)}
    assert (envs["plain"]["tls"], envs["plain"]["ca_file"]) == (False, "")
    assert (envs["public"]["tls"], envs["private"]["tls"], envs["private"]["ca_file"]) == (
        True,
        True,
        str(certs.ca),
    )


@pytest.mark.parametrize(
    ("given", "address"),
    [
        ("https://api.example.com:9000", "api.example.com:9000"),
        ("https://api.example.com/", "api.example.com:443"),
        ("api.example.com:443", "api.example.com:443"),
        ("api.example.com", "api.example.com:443"),
    ],
)
def test_https_and_port_443_imply_tls(micro_cli, given: str, address: str) -> None:
    micro_cli("env", "add", "cloud", given).assert_success()
    assert _rows(micro_cli("env").out)["cloud"][1:3] == [address, "yes"]


def test_the_help_says_which_addresses_mean_tls(micro_cli) -> None:
    out = micro_cli("env", "add", "--help").assert_success().out
    assert "https://HOST:PORT" in out and "443" in out and "--ca-file" in out


def test_a_relative_ca_file_is_kept_absolute(micro_cli, certs: Certificates, monkeypatch) -> None:
    monkeypatch.chdir(certs.ca.parent)
    micro_cli("env", "add", "private", "10.0.0.7:8081", "--ca-file", "ca.pem").assert_success()
    assert _rows(micro_cli("env").out)["private"][2] == f"ca:{certs.ca}"


def test_a_missing_ca_file_and_other_schemes_are_refused(micro_cli, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    micro_cli("env", "add", "x", "10.0.0.7:8081", "--ca-file", str(missing)).assert_failure(
        3, err=f"No CA file at {missing}"
    )
    micro_cli("env", "add", "x", "http://10.0.0.7:8081").assert_failure(3, err="https://HOST:PORT for TLS")
    assert "x" not in _rows(micro_cli("env").out)


def test_a_config_file_from_before_tls_still_loads(micro_cli) -> None:
    config = Home.from_env().ensure().config_dir / "config.json"
    old = {"env": "local", "envs": {"prod": {"address": "10.0.0.5:8081"}, "cloud": {"address": "h:443"}}}
    config.write_text(json.dumps(old))
    rows = _rows(micro_cli("env").assert_success().out)
    assert rows["prod"][1:3] == ["10.0.0.5:8081", "no"]
    assert rows["cloud"][1:3] == ["h:443", "yes"]


# -- against a TLS daemon of another MICRO_HOME, as a remote environment -------------------------------


@pytest.fixture
def remote(micro_home: Path, certs: Certificates, monkeypatch: pytest.MonkeyPatch) -> Iterator[DaemonThread]:
    """A TLS daemon with a home of its own; the CLI signs in with its owner's token (MICRO_AUTH_TOKEN)."""
    base = micro_home.parent / "remote-home"
    home = Home(base / "config", base / "data", base / "state", base / "logs")
    with DaemonThread(home, tls_cert=str(certs.cert), tls_key=str(certs.key)) as daemon:
        token = json.loads(home.owner_token.read_text())["access_token"]
        monkeypatch.setenv("MICRO_AUTH_TOKEN", token)
        yield daemon


def _assert_no_local_daemon() -> None:
    home = Home.from_env()
    assert home.read_state() is None
    assert not home.daemon_running()
    assert not home.server_log.exists()


def test_an_env_with_tls_and_the_ca_reaches_the_daemon(
    micro_cli, remote: DaemonThread, certs: Certificates
) -> None:
    micro_cli("env", "add", "prod", remote.address, "--tls", "--ca-file", str(certs.ca)).assert_success()
    micro_cli("env", "set", "prod").assert_success()
    micro_cli("store", "write", "greeting", "hello").assert_success()
    assert micro_cli("store", "read", "greeting").assert_success().out == "hello\n"
    _assert_no_local_daemon()


def test_without_the_ca_the_certificate_is_not_trusted(micro_cli, remote: DaemonThread) -> None:
    micro_cli("env", "add", "prod", remote.address, "--tls").assert_success()
    outcome = micro_cli("-e", "prod", "store", "read", "k").assert_failure(5, err="is not trusted")
    assert "--ca-file" in outcome.err
    _assert_no_local_daemon()


def test_a_plaintext_env_on_the_tls_port_is_told_to_add_tls(micro_cli, remote: DaemonThread) -> None:
    micro_cli("env", "add", "prod", remote.address).assert_success()
    micro_cli("-e", "prod", "store", "read", "k").assert_failure(5, err="if it serves TLS, connect with TLS")
    _assert_no_local_daemon()


def test_an_unreachable_remote_env_never_starts_the_local_daemon(micro_cli, certs: Certificates) -> None:
    micro_cli("env", "add", "dead", "127.0.0.1:1", "--ca-file", str(certs.ca)).assert_success()
    micro_cli("env", "set", "dead").assert_success()
    micro_cli("store", "read", "k").assert_failure(5, err="Cannot reach environment 'dead'")
    _assert_no_local_daemon()


def test_the_local_env_uses_the_plaintext_port_of_a_local_tls_daemon(
    micro_cli, micro_home: Path, certs: Certificates
) -> None:
    with DaemonThread(Home.from_env(), tls_cert=str(certs.cert), tls_key=str(certs.key)):
        micro_cli("store", "write", "k", "v").assert_success()
        assert micro_cli("store", "read", "k").assert_success().out == "v\n"
