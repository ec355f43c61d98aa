"""Where the CLI keeps its logins: the OS keyring when it is a real one, else a private file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import keyring.backend
import pytest
from keyring.backends import fail, null

from micro.credentials import OwnerToken, RefreshingToken, StaticToken
from micro.errors import SetupError
from micro.home import Home
from micro_cli.credentials import CredentialsFileError, KeyringError_, Login, TokenStore, find, os_keyring
from micro_cli.environments import Environment
from tests.micro_cli._keyrings import FakeSecretService, MemoryKeyring

MEMORY = "tests.micro_cli._keyrings.MemoryKeyring"
LOCAL = Environment("local", "", "")
REMOTE = Environment("prod", "10.0.0.5:8081", "")


@pytest.fixture(autouse=True)
def isolated_keyring(monkeypatch, tmp_path):
    """No keyring (tests choose one), no keyring config file, and an empty memory keyring."""
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.fail.Keyring")
    monkeypatch.delenv("MICRO_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))  # keyring's own config file
    MemoryKeyring.secrets.clear()


@pytest.fixture
def store(micro_home) -> TokenStore:
    return TokenStore(Home.from_env())


def _login(account: str = "alice", address: str = "") -> Login:
    now = time.time()
    return Login(account, f"access-{account}", f"refresh-{account}", now + 900, now, address)


def _file(store: TokenStore) -> dict:
    return json.loads(store.path.read_text())["logins"]


@pytest.mark.parametrize("name", ["keyring.backends.fail.Keyring", "keyring.backends.null.Keyring"])
def test_the_fail_and_null_backends_mean_no_keyring(monkeypatch, name):
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", name)
    assert os_keyring() is None


def test_a_backend_chosen_with_the_variable_is_used(monkeypatch):
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", MEMORY)
    assert isinstance(os_keyring(), MemoryKeyring)


def test_a_chosen_backend_that_cannot_load_means_the_file(monkeypatch, capsys):
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "no.such.Backend")
    assert os_keyring() is None
    assert "Warning: the chosen keyring backend cannot be used" in capsys.readouterr().err


def test_without_a_choice_only_real_os_backends_are_picked(monkeypatch):
    monkeypatch.delenv("PYTHON_KEYRING_BACKEND")
    not_os = [fail.Keyring(), null.Keyring(), MemoryKeyring()]  # MemoryKeyring stands for keyrings.alt
    monkeypatch.setattr(keyring.backend, "get_all_keyring", lambda: not_os)
    assert os_keyring() is None
    monkeypatch.setattr(FakeSecretService, "viable", True)
    monkeypatch.setattr(keyring.backend, "get_all_keyring", lambda: [*not_os, FakeSecretService()])
    assert isinstance(os_keyring(), FakeSecretService)


def test_headless_detection_finds_no_keyring(monkeypatch):
    monkeypatch.delenv("PYTHON_KEYRING_BACKEND")
    monkeypatch.delenv("DBUS_SESSION_BUS_ADDRESS", raising=False)
    found = os_keyring()
    assert found is None or type(found).__module__.startswith("keyring.backends.")


def test_without_keyring_installed_the_file_is_used(store, monkeypatch):
    monkeypatch.setitem(sys.modules, "keyring", None)
    monkeypatch.setitem(sys.modules, "keyring.backend", None)
    monkeypatch.setitem(sys.modules, "keyring.core", None)
    assert os_keyring() is None
    assert store.save("local", "micro", _login()).where == str(store.path)


def test_the_file_keeps_logins_per_environment_and_namespace(store):
    store.save("local", "micro", _login("alice"))
    store.save("local", "team", _login("tina"))
    store.save("prod", "micro", _login("bob", "10.0.0.5:8081"))
    assert store.load("local", "micro").account == "alice"
    assert store.load("local", "team").account == "tina"
    prod = store.load("prod", "micro")
    assert (prod.account, prod.address, prod.access_token) == ("bob", "10.0.0.5:8081", "access-bob")
    assert store.load("prod", "team") is None
    assert oct(store.path.stat().st_mode & 0o777) == "0o600"
    assert oct(store.path.parent.stat().st_mode & 0o777) == "0o700"
    assert store.delete("local", "micro").account == "alice"
    assert store.load("local", "micro") is None
    assert store.delete("local", "micro") is None


def test_a_group_readable_file_is_refused(store):
    store.save("local", "micro", _login())
    os.chmod(store.path, 0o604)
    with pytest.raises(SetupError, match=rf"run chmod 600 {store.path}"):
        store.load("local", "micro")


def test_a_damaged_file_is_reported(store):
    store.path.parent.mkdir(parents=True)
    store.path.write_text("{not json")
    os.chmod(store.path, 0o600)
    with pytest.raises(CredentialsFileError, match="fix or remove the file"):
        store.load("local", "micro")


def test_a_loose_folder_is_made_private(store):
    store.path.parent.mkdir(parents=True, mode=0o755)
    os.chmod(store.path.parent, 0o755)
    store.save("local", "micro", _login())
    assert store.path.parent.stat().st_mode & 0o777 == 0o700


def test_a_keyring_login_keeps_no_token_in_the_file(store, monkeypatch):
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", MEMORY)
    saved = store.save("local", "micro", _login())
    assert saved.where == f"the keyring ({MEMORY})"
    entry = _file(store)["local/micro"]
    assert entry["keyring"] == MEMORY and entry["account"] == "alice"
    assert "access_token" not in entry and "refresh_token" not in entry
    assert "access-alice" not in store.path.read_text()
    [(service, user)] = MemoryKeyring.secrets
    assert service == "micro" and user.startswith("local/micro (")
    loaded = store.load("local", "micro")
    assert (loaded.access_token, loaded.refresh_token) == ("access-alice", "refresh-alice")


def test_renewed_tokens_go_back_where_the_login_is(store, monkeypatch):
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", MEMORY)
    store.save("local", "micro", _login())
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.fail.Keyring")  # not asked again
    renewed = Login("alice", "access-2", "refresh-alice", time.time() + 900, time.time())
    store.update("local", "micro", renewed)
    assert "keyring" in _file(store)["local/micro"]
    assert store.load("local", "micro").access_token == "access-2"


def test_a_renewal_does_not_bring_back_a_logged_out_or_replaced_login(store):
    alice = _login("alice")
    store.save("local", "micro", alice)
    store.delete("local", "micro")  # `micro logout` while `micro logs -f` runs
    assert store.update("local", "micro", alice) is None
    assert store.load("local", "micro") is None
    store.save("local", "micro", _login("bob"))  # `micro login` as someone else meanwhile
    assert store.update("local", "micro", alice) is None
    assert store.load("local", "micro").account == "bob"


def test_a_login_saved_to_the_file_leaves_nothing_in_the_keyring(store, monkeypatch):
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", MEMORY)
    store.save("local", "micro", _login())
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.fail.Keyring")
    assert store.save("local", "micro", _login("bob")).where == str(store.path)
    assert MemoryKeyring.secrets == {}
    assert store.load("local", "micro").account == "bob"


def test_logout_removes_the_keyring_item(store, monkeypatch):
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", MEMORY)
    store.save("local", "micro", _login())
    assert store.delete("local", "micro").account == "alice"
    assert MemoryKeyring.secrets == {} and _file(store) == {}


def test_a_keyring_that_refuses_to_save_falls_back_to_the_file(store, monkeypatch, capsys):
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "tests.micro_cli._keyrings.LockedKeyring")
    assert store.save("local", "micro", _login()).where == str(store.path)
    assert "could not save to the keyring (the collection is locked)" in capsys.readouterr().err
    assert store.load("local", "micro").access_token == "access-alice"


def test_an_unreadable_keyring_login_says_what_to_do(store, monkeypatch):
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", MEMORY)
    store.save("local", "micro", _login())
    MemoryKeyring.secrets.clear()  # removed behind our back
    with pytest.raises(KeyringError_, match="run `micro logout` then `micro login`") as caught:
        store.load("local", "micro")
    assert caught.value.exit_code == 6
    assert store.delete("local", "micro") is None  # logout still cleans up
    assert _file(store) == {}


def test_find_prefers_the_variable_then_the_login_then_the_owner(store, monkeypatch):
    assert isinstance(find(LOCAL, "micro", store.home).credentials, OwnerToken)
    remote = find(REMOTE, "micro", store.home)
    assert (remote.credentials, remote.source) == (None, "none")
    store.save("local", "micro", _login())
    store.save("prod", "micro", _login("bob", REMOTE.address))
    found = find(LOCAL, "micro", store.home)
    assert found.source == "login" and isinstance(found.credentials, RefreshingToken)
    assert found.credentials.tokens.access_token == "access-alice"
    assert find(REMOTE, "micro", store.home).login.account == "bob"
    assert find(LOCAL, "team", store.home).source == "owner"
    monkeypatch.setenv("MICRO_AUTH_TOKEN", "from-the-variable")
    found = find(REMOTE, "micro", store.home)
    assert found.source == "variable" and isinstance(found.credentials, StaticToken)


def test_a_login_for_another_address_is_not_used(store):
    store.save("prod", "micro", _login("bob", "10.9.9.9:8081"))
    assert find(REMOTE, "micro", store.home).source == "none"


def test_login_through_the_cli_into_a_keyring(micro_server, micro_cli, monkeypatch):
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", MEMORY)
    micro_cli("login", "-u", "admin", "--password", "micro").assert_success()
    assert f"with micro login (saved in the keyring ({MEMORY}))" in micro_cli("user").assert_success().out
    store = TokenStore(Home.from_env())
    assert "access_token" not in _file(store)["local/micro"]
    first = store.load("local", "micro")
    entry = _file(store)["local/micro"]
    entry.update(
        expiry=time.time() + 10, created=time.time() - 890
    )  # near expiry: renewed by the next command
    store.path.write_text(json.dumps({"logins": {"local/micro": entry}}))
    micro_cli("store", "write", "k", "v").assert_success()
    assert store.load("local", "micro").access_token != first.access_token
    assert "access_token" not in _file(store)["local/micro"]
    micro_cli("logout").assert_success()
    assert MemoryKeyring.secrets == {}


_REAL_KEYRING = textwrap.dedent(
    """
    import json, sys, time
    from micro.home import Home
    from micro_cli.credentials import Login, TokenStore, os_keyring

    backend = os_keyring()
    store = TokenStore(Home.from_env())
    login = Login("alice", "access-a", "refresh-a", time.time() + 900, time.time())
    saved = store.save("local", "micro", login)
    loaded = store.load("local", "micro")
    print(json.dumps({
        "backend": type(backend).__module__ if backend else None,
        "where": saved.where,
        "access": loaded.access_token,
        "file": store.path.read_text(),
        "deleted": store.delete("local", "micro").account,
        "after": backend.get_password("micro", store._user("local", "micro")) if backend else None,
    }))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(
    not (shutil.which("dbus-run-session") and shutil.which("gnome-keyring-daemon")),
    reason="needs dbus-run-session and gnome-keyring-daemon (Debian: dbus, gnome-keyring)",
)
def test_a_real_secret_service_keyring_headless(micro_home, tmp_path):
    script = tmp_path / "real_keyring.py"
    script.write_text(_REAL_KEYRING)
    shell = (
        'eval "$(printf test | gnome-keyring-daemon --unlock --components=secrets)" >/dev/null; '
        f"export GNOME_KEYRING_CONTROL; exec {sys.executable} {script}"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHON_KEYRING_BACKEND", "DBUS_SESSION_BUS_ADDRESS")
    }
    env["HOME"] = str(tmp_path)  # gnome-keyring keeps its files here
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    result = subprocess.run(
        ["dbus-run-session", "--", "bash", "-c", shell],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["backend"] == "keyring.backends.SecretService"
    assert data["where"] == "the keyring (keyring.backends.SecretService.Keyring)"
    assert data["access"] == "access-a"
    assert "access-a" not in data["file"] and "refresh-a" not in data["file"]
    assert data["deleted"] == "alice" and data["after"] is None
