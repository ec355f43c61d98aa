"""Where a service comes from: a git URL at a ref, and an archive uploaded to a remote environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e._support import daemons, micro, new_service, replace_in, state, stop, wait_until

pytestmark = pytest.mark.slow

GREETING = 'f"Hello {request.name}"'


def git(folder: Path, *args: str) -> None:
    identity = ["-c", "user.name=micro", "-c", "user.email=micro@example.com", "-c", "commit.gpgsign=false"]
    done = subprocess.run(["git", *identity, *args], cwd=folder, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def call(*flags: str) -> dict[str, str]:
    answer = micro(*flags, "call", "helloworld", "Helloworld.Call", '{"name": "Alice"}')
    assert answer.returncode == 0, answer.stderr
    return json.loads(answer.stdout)


def test_a_git_url_at_a_tag_runs_that_commit(home: Path, tmp_path: Path) -> None:
    repo = new_service(tmp_path)
    git(repo, "init", "--quiet")
    git(repo, "add", "-A")
    git(repo, "commit", "--quiet", "-m", "v1")
    git(repo, "tag", "v1")
    replace_in(repo / "handler" / "helloworld.py", GREETING, 'f"Howdy {request.name}"')
    git(repo, "commit", "--quiet", "-am", "v2")

    ran = micro("run", f"file://{repo}@v1", timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert "helloworld is running" in ran.stdout
    assert "reloads on save" not in ran.stdout  # a clone is not watched
    assert call() == {"msg": "Hello Alice"}
    [status] = json.loads(micro("status", "--output", "json").stdout)
    assert status["source"] == f"file://{repo}@v1"


def test_update_fetches_a_git_source_again(home: Path, tmp_path: Path) -> None:
    repo = new_service(tmp_path)
    git(repo, "init", "--quiet")
    git(repo, "add", "-A")
    git(repo, "commit", "--quiet", "-m", "v1")
    ran = micro("run", f"file://{repo}", timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert call() == {"msg": "Hello Alice"}

    replace_in(repo / "handler" / "helloworld.py", GREETING, 'f"Howdy {request.name}"')
    git(repo, "commit", "--quiet", "-am", "v2")
    updated = micro("update", "helloworld", timeout=60)
    assert updated.returncode == 0, updated.stderr
    assert call() == {"msg": "Howdy Alice"}

    repo.rename(tmp_path / "moved")
    failed = micro("update", "helloworld", timeout=60)
    assert failed.returncode == 3
    assert f"cannot clone file://{repo}" in failed.stderr.lower()
    assert call() == {"msg": "Howdy Alice"}  # the clone it runs from is still there

    clones = home / "data" / "sources" / "git" / "micro"
    assert len(list(clones.iterdir())) == 1
    assert micro("kill", "helloworld").returncode == 0
    assert list(clones.iterdir()) == []


def test_a_git_url_that_does_not_exist_is_a_clear_error(home: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-repo"
    ran = micro("run", f"file://{missing}@v1")
    assert ran.returncode == 3, ran.stderr
    assert f"file://{missing}" in ran.stderr
    assert "does not appear to be a git repository" in ran.stderr
    assert "Traceback" not in ran.stderr
    assert micro("status", "--output", "json").stdout.strip() == "[]"


@pytest.fixture
def remote_home(tmp_path: Path) -> Path:
    return tmp_path / "other-home"


@pytest.fixture
def remote(remote_home: Path) -> Iterator[str]:
    """A second daemon with a MICRO_HOME of its own: its address."""
    other = remote_home
    env = {**os.environ, "MICRO_HOME": str(other), "MICRO_SERVER_ADDRESS": "127.0.0.1:0"}
    daemon = subprocess.Popen(
        [sys.executable, "-m", "micro_daemon"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        state_file = other / "state" / "server.json"
        wait_until(lambda: daemon.poll() is not None or state_file.exists())
        assert daemon.poll() is None, daemon.communicate()[1]
        yield state(other)["address"]
    finally:
        stop(daemon.pid)
        daemon.communicate(timeout=10)
        for pid in daemons(other):
            stop(pid)


def test_a_remote_environment_runs_an_uploaded_folder(
    home: Path, tmp_path: Path, remote: str, remote_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = new_service(tmp_path / "src")
    assert micro("env", "add", "remote", remote).returncode == 0
    monkeypatch.chdir(folder.parent)
    refused = micro("--env", "remote", "run", "./helloworld", timeout=60)
    assert refused.returncode == 6  # a remote environment wants a login
    assert "micro login" in refused.stderr
    signed_in = micro("--env", "remote", "login", "--username", "admin", "--password", "micro")
    assert signed_in.returncode == 0, signed_in.stderr

    ran = micro("--env", "remote", "run", "./helloworld", timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert "reloads on save" not in ran.stdout  # the remote side has a copy, not this folder
    [status] = json.loads(micro("--env", "remote", "status", "--output", "json").stdout)
    assert (status["name"], status["status"], status["source"]) == ("helloworld", "running", "helloworld")
    assert call("--env", "remote") == {"msg": "Hello Alice"}

    replace_in(folder / "handler" / "helloworld.py", GREETING, 'f"Howdy {request.name}"')
    updated = micro("--env", "remote", "update", "./helloworld", timeout=60)
    assert updated.returncode == 0, updated.stderr
    assert call("--env", "remote") == {"msg": "Howdy Alice"}
    uploads = remote_home / "data" / "sources" / "uploads"
    assert len(list(uploads.iterdir())) == 1  # the first upload went with the instances that ran it
    assert micro("--env", "remote", "kill", "helloworld").returncode == 0
    assert list(uploads.iterdir()) == []

    assert not (home / "state" / "server.json").exists()
    assert daemons(home) == []
