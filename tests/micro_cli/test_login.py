"""``micro login``, ``logout`` and ``user``: against a real daemon, with the login saved to a file."""

from __future__ import annotations

import json
import os
import stat
import time

import pytest

from micro.home import Home
from micro.testing.pytest import DaemonThread


def _credentials() -> dict:
    path = Home.from_env().config_dir / "logins" / "credentials.json"
    return json.loads(path.read_text())["logins"]


def _edit_login(key: str, **changes) -> None:
    path = Home.from_env().config_dir / "logins" / "credentials.json"
    data = json.loads(path.read_text())
    data["logins"][key].update(changes)
    path.write_text(json.dumps(data))


@pytest.fixture
def bob(micro_server, micro_cli):
    """An account without admin scope, created by the local owner."""
    micro_cli("auth", "create", "account", "bob", "--secret", "bob-pw").assert_success()
    return micro_cli


def test_login_as_the_default_admin_then_act_as_it(micro_server, micro_cli):
    outcome = micro_cli("login", "--username", "admin", "--password", "micro").assert_success()
    assert outcome.out == "Logged in as admin (environment local, namespace micro)\n"
    assert "default admin password" in outcome.err
    out = micro_cli("user").assert_success().out
    assert "account:      admin\n" in out
    assert "with micro login (saved in" in out
    out = micro_cli("auth", "list", "accounts").assert_success().out
    assert "admin" in out and "owner" in out
    login = _credentials()["local/micro"]
    assert login["account"] == "admin" and login["refresh_token"]
    assert login["expiry"] > time.time() + 60


def test_the_credentials_file_is_private(micro_server, micro_cli):
    micro_cli("login", "-u", "admin", "--password", "micro").assert_success()
    path = Home.from_env().config_dir / "logins" / "credentials.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_login_prompts_with_a_hidden_password(micro_server, micro_cli):
    outcome = micro_cli("login", input="admin\nmicro\n").assert_success()
    assert (
        outcome.out
        == "Username: admin\nPassword: \nLogged in as admin (environment local, namespace micro)\n"
    )


def test_login_reads_the_password_from_stdin(bob):
    bob("login", "-u", "bob", "--password-stdin", input="bob-pw\n").assert_success()
    assert "account:      bob\n" in bob("user").out
    bob("login", "-u", "bob", "--password", "x", "--password-stdin", input="y\n").assert_failure(
        3, err="not both"
    )


def test_a_wrong_password_is_refused_and_nothing_is_saved(micro_server, micro_cli):
    outcome = micro_cli("login", "-u", "admin", "--password", "nope").assert_failure(6)
    assert outcome.err == (
        "Error: Login refused: wrong id or secret for namespace 'micro' (environment 'local'); "
        "nothing was saved\n"
    )
    assert not (Home.from_env().config_dir / "logins" / "credentials.json").exists()
    assert "local owner" in micro_cli("user").out


def test_without_a_login_the_local_environment_acts_as_the_owner(micro_server, micro_cli):
    out = micro_cli("user").assert_success().out
    assert "account:      owner\n" in out and "scopes:       admin\n" in out
    assert "as the local owner of this machine's micro server (no login needed)" in out
    data = json.loads(micro_cli("user", "--output", "json").assert_success().out)
    assert data["account"] == "owner" and data["credentials"] == "owner"
    assert data["environment"] == "local" and data["namespace"] == "micro"


def test_user_token_prints_the_access_token(micro_server, micro_cli):
    owner = json.loads(Home.from_env().owner_token.read_text())["access_token"]
    assert micro_cli("user", "token").assert_success().out == owner + "\n"
    micro_cli("login", "-u", "admin", "--password", "micro").assert_success()
    assert micro_cli("user", "token").out == _credentials()["local/micro"]["access_token"] + "\n"


def test_logout_goes_back_to_the_owner(micro_server, micro_cli):
    micro_cli("login", "-u", "admin", "--password", "micro").assert_success()
    out = micro_cli("logout").assert_success().out
    assert (
        out
        == "Logged out admin (environment local, namespace micro); commands act as the local owner again\n"
    )
    assert _credentials() == {}
    assert "account:      owner\n" in micro_cli("user").out
    assert micro_cli("logout").out == "Not logged in (environment local, namespace micro)\n"


def test_logins_are_kept_per_namespace(bob, micro_cli):
    micro_cli(
        "auth", "create", "account", "--namespace", "team", "--secret", "t-pw", "--scopes", "admin", "tina"
    )
    micro_cli("-n", "team", "login", "-u", "tina", "--password", "t-pw").assert_success()
    micro_cli("login", "-u", "bob", "--password", "bob-pw").assert_success()
    assert set(_credentials()) == {"local/team", "local/micro"}
    assert "account:      tina\n" in micro_cli("-n", "team", "user").out
    assert "account:      bob\n" in micro_cli("user").out


def test_a_non_admin_is_refused_admin_commands_with_403(bob):
    bob("login", "-u", "bob", "--password", "bob-pw").assert_success()
    bob("auth", "list", "accounts").assert_failure(6, err="'bob' is not an administrator")
    bob("auth", "create", "rule", "r", "--resource", "*:*:*").assert_failure(6, err="not an administrator")
    out = bob("user").assert_success().out
    assert "scopes:       none\n" in out


def test_set_password_changes_it_and_stays_logged_in(bob):
    bob("login", "-u", "bob", "--password", "bob-pw").assert_success()
    outcome = bob("user", "set", "password", input="bob-pw\nnew-pw\nnew-pw\n").assert_success()
    assert outcome.out.endswith("Password changed for bob\n")
    assert "account:      bob\n" in bob("user").assert_success().out
    bob("login", "-u", "bob", "--password", "bob-pw").assert_failure(6, err="wrong id or secret")
    bob("login", "-u", "bob", "--password", "new-pw").assert_success()


def test_set_password_refuses_a_wrong_old_password_and_the_owner(bob):
    bob("user", "set", "password", "--old-password", "x", "--new-password", "y").assert_failure(
        3, err="local owner has no password"
    )
    bob("login", "-u", "bob", "--password", "bob-pw").assert_success()
    bob("user", "set", "password", "--old-password", "wrong", "--new-password", "y").assert_failure(
        3, err="old password is wrong"
    )
    bob("login", "-u", "bob", "--password", "bob-pw").assert_success()


def test_a_remote_environment_needs_a_login(micro_server, micro_cli):
    micro_cli("env", "add", "rem", micro_server.address).assert_success()
    outcome = micro_cli("-e", "rem", "store", "read", "k").assert_failure(6)
    assert outcome.err.startswith(
        "Error: Not signed in to environment 'rem', namespace 'micro': run `micro login` ("
    )
    assert outcome.err.count("\n") == 1
    micro_cli("-e", "rem", "user").assert_failure(6, err="not logged in to environment 'rem'")
    micro_cli("-e", "rem", "user", "token").assert_failure(6, err="run `micro login`")
    micro_cli("-e", "rem", "login", "-u", "admin", "--password", "micro").assert_success()
    micro_cli("-e", "rem", "store", "write", "k", "v").assert_success()
    assert micro_cli("-e", "rem", "store", "read", "k").out == "v\n"
    assert _credentials()["rem/micro"]["address"] == micro_server.address


def test_a_login_is_not_sent_to_a_redefined_environment(micro_server, micro_cli):
    micro_cli("env", "add", "rem", micro_server.address).assert_success()
    micro_cli("-e", "rem", "login", "-u", "admin", "--password", "micro").assert_success()
    _edit_login("rem/micro", address="10.0.0.5:8081")  # signed in to another server of that name
    micro_cli("-e", "rem", "user").assert_failure(6, err="not logged in")


def test_a_group_readable_credentials_file_is_refused(micro_server, micro_cli):
    micro_cli("login", "-u", "admin", "--password", "micro").assert_success()
    path = Home.from_env().config_dir / "logins" / "credentials.json"
    os.chmod(path, 0o640)
    outcome = micro_cli("store", "read", "k").assert_failure(9)
    assert f"chmod 600 {path}" in outcome.err
    assert "Traceback" not in outcome.err
    micro_cli("user").assert_failure(9, err="chmod 600")
    os.chmod(path, 0o600)
    micro_cli("user").assert_success()


def test_a_token_near_expiry_is_renewed_and_saved(micro_server, micro_cli):
    micro_cli("login", "-u", "admin", "--password", "micro").assert_success()
    old = _credentials()["local/micro"]
    now = time.time()
    _edit_login("local/micro", expiry=now + 20, created=now - 880)  # 20 s left of 15 min
    micro_cli("store", "write", "k", "v").assert_success()
    new = _credentials()["local/micro"]
    assert new["access_token"] != old["access_token"]
    assert new["refresh_token"] == old["refresh_token"]
    assert new["expiry"] > now + 600
    assert "account:      admin\n" in micro_cli("user").out


def test_a_token_far_from_expiry_is_kept(micro_server, micro_cli):
    micro_cli("login", "-u", "admin", "--password", "micro").assert_success()
    old = _credentials()["local/micro"]
    micro_cli("store", "write", "k", "v").assert_success()
    assert _credentials()["local/micro"] == old


def test_an_expired_login_that_cannot_be_renewed_asks_to_log_in(micro_server, micro_cli):
    micro_cli("login", "-u", "admin", "--password", "micro").assert_success()
    _edit_login("local/micro", expiry=time.time() - 1, refresh_token="revoked")
    outcome = micro_cli("store", "read", "k").assert_failure(6)
    assert "Not signed in to environment 'local', namespace 'micro': run `micro login`" in outcome.err


def test_deleting_the_account_ends_its_login(bob, monkeypatch):
    bob("login", "-u", "bob", "--password", "bob-pw").assert_success()
    owner = json.loads(Home.from_env().owner_token.read_text())["access_token"]
    monkeypatch.setenv("MICRO_AUTH_TOKEN", owner)  # the variable comes before any saved login
    assert json.loads(bob("user", "--output", "json").out)["credentials"] == "variable"
    bob("auth", "delete", "account", "bob").assert_success()
    monkeypatch.delenv("MICRO_AUTH_TOKEN")
    outcome = bob("user").assert_failure(6)
    assert "Not signed in to environment 'local', namespace 'micro': run `micro login`" in outcome.err


@pytest.fixture
def short_lived(micro_home):
    """A daemon whose access tokens live 3 seconds."""
    with DaemonThread(Home.from_env(), auth_token_lifetime="3") as daemon:
        yield daemon


def test_short_lived_tokens_are_renewed_between_commands(short_lived, micro_cli):
    micro_cli("login", "-u", "admin", "--password", "micro").assert_success()
    first = _credentials()["local/micro"]
    assert first["expiry"] - first["created"] == 3
    time.sleep(3.5)  # expired
    micro_cli("store", "write", "k", "v").assert_success()
    assert _credentials()["local/micro"]["access_token"] != first["access_token"]


def test_a_long_command_keeps_the_saved_login_fresh(short_lived, micro_cli):
    import asyncio

    from micro.store import StoreClient
    from micro_cli.session import connect

    micro_cli("login", "-u", "admin", "--password", "micro").assert_success()
    first = _credentials()["local/micro"]

    async def long_command() -> bytes:
        async with connect() as client:
            await asyncio.sleep(4.5)  # as `micro logs -f` waits for lines, making no calls
            saved = _credentials()["local/micro"]
            assert saved["expiry"] > first["expiry"], "renewed while the command ran"
            await StoreClient(client).write("k", b"v")
            return (await StoreClient(client).read("k"))[0].value

    assert asyncio.run(long_command()) == b"v"
