"""What goes wrong with services, and what the runtime and ``micro`` say about it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e._support import MICRO, alive, micro, new_service, replace_in, wait_until

pytestmark = pytest.mark.slow

GREETING = 'f"Hello {request.name}"'


def call(*flags: str, name: str = "helloworld") -> subprocess.CompletedProcess[str]:
    return micro(*flags, "call", name, "Helloworld.Call", '{"name": "Alice"}')


def answer(*flags: str) -> str:
    called = call(*flags)
    assert called.returncode == 0, called.stderr
    return str(json.loads(called.stdout)["msg"])


def status(name: str, *flags: str) -> dict[str, object]:
    found = micro(*flags, "status", name, "--output", "json")
    assert found.returncode == 0, found.stderr
    [service] = json.loads(found.stdout)
    return dict(service)


def metadata(name: str) -> dict[str, str]:
    return dict(status(name)["metadata"])  # type: ignore[arg-type]


def run(folder: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return micro("run", str(folder), *flags, timeout=60)


def test_a_proto_that_does_not_compile_keeps_the_old_instance(home: Path, tmp_path: Path) -> None:
    folder = new_service(tmp_path)
    assert run(folder).returncode == 0
    replace_in(folder / "proto" / "helloworld.proto", "string say = 1;", "strin say = 1;")

    wait_until(lambda: "error" in metadata("helloworld"), timeout=20)
    found = status("helloworld")
    assert found["status"] == "running"
    error = metadata("helloworld")["error"]
    assert "protoc failed" in error and '"strin" is not defined' in error, error
    assert answer() == "Hello Alice"
    logs = micro("logs", "helloworld").stdout
    assert '"strin" is not defined' in logs


def test_a_dependency_that_cannot_be_installed(home: Path, tmp_path: Path) -> None:
    folder = new_service(tmp_path)
    requirements = folder / "requirements.txt"
    requirements.write_text("micro-no-such-package-xyz==0.0.1\n")
    ran = run(folder, "--no-watch")
    assert ran.returncode == 3, ran.stderr
    assert "pip install failed" in ran.stderr
    assert "No matching distribution found for micro-no-such-package-xyz==0.0.1" in ran.stderr
    envs = home / "data" / "builds" / "envs"
    assert [p.name for p in envs.iterdir() if p.is_dir()] == []

    requirements.write_text("")  # fixed: running it again replaces the failed one
    again = run(folder, "--no-watch")
    assert again.returncode == 0, again.stderr
    assert answer() == "Hello Alice"


def test_a_changed_requirements_file_installs_then_restarts(home: Path, tmp_path: Path) -> None:
    folder = new_service(tmp_path)
    handler = folder / "handler" / "helloworld.py"
    replace_in(handler, "import logging\n", "import logging\nimport sys\n")
    replace_in(handler, GREETING, 'f"{request.name} {sys.prefix}"')
    assert run(folder).returncode == 0
    assert answer() == f"Alice {sys.prefix}"  # no requirements: the daemon's own interpreter

    (folder / "requirements.txt").write_text("protobuf\n")
    envs = home / "data" / "builds" / "envs"
    wait_until(lambda: answer() != f"Alice {sys.prefix}", timeout=60)
    [env] = [p for p in envs.iterdir() if p.is_dir()]
    assert answer() == f"Alice {env}"
    assert "reloaded in" in micro("logs", "helloworld").stdout
    assert "error" not in metadata("helloworld")


def test_a_service_that_exits_at_once_fails_fast(home: Path, tmp_path: Path) -> None:
    folder = new_service(tmp_path)
    (folder / "main.py").write_text("raise SystemExit(3)\n")
    began = time.monotonic()
    ran = run(folder, "--no-watch")
    took = time.monotonic() - began
    assert ran.returncode == 3, ran.stderr
    assert "exited with code 3" in ran.stderr
    assert took < 10, f"micro run took {took:.1f} s to give up"
    found = status("helloworld")
    assert found["status"] == "error"
    assert "exited with code 3" in metadata("helloworld")["error"]
    assert "retries" not in metadata("helloworld")  # it never started: nothing to restart


def test_a_service_that_never_registers(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICRO_START_TIMEOUT", "3")  # read by the daemon this test starts
    folder = new_service(tmp_path)
    (folder / "main.py").write_text("import time\n\nwhile True:\n    time.sleep(1)\n")
    running = subprocess.Popen(
        [*MICRO, "run", str(folder), "--no-watch"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until(lambda: micro("status", "--output", "json").stdout.count('"starting"') == 1)
        quiet = micro("logs", "helloworld")
        assert (quiet.returncode, quiet.stdout) == (0, "")
        _, err = running.communicate(timeout=30)
    finally:
        if running.poll() is None:
            running.kill()
            running.communicate()
    assert running.returncode == 3
    assert "helloworld did not register within 3 s" in err
    assert "service.run()" in err
    assert not _processes_running(folder / "main.py")


def test_kill_of_an_unknown_service_in_a_namespace(home: Path) -> None:
    refused = micro("--namespace", "elsewhere", "kill", "nothing")
    assert refused.returncode == 4
    assert "'nothing'" in refused.stderr and "'elsewhere'" in refused.stderr


def test_one_name_in_two_namespaces(home: Path, tmp_path: Path) -> None:
    first = new_service(tmp_path / "a")
    second = tmp_path / "b" / "helloworld"
    shutil.copytree(first, second)
    replace_in(second / "handler" / "helloworld.py", GREETING, 'f"Ahoy {request.name}"')

    runs = [
        subprocess.Popen([*MICRO, "--namespace", ns, "run", str(folder)], stderr=subprocess.PIPE, text=True)
        for ns, folder in (("a", first), ("b", second))
    ]
    errors = [r.communicate(timeout=60)[1] for r in runs]
    assert [r.returncode for r in runs] == [0, 0], errors

    assert answer("--namespace", "a") == "Hello Alice"
    assert answer("--namespace", "b") == "Ahoy Alice"
    assert call().returncode == 4  # nothing runs in the default namespace
    assert status("helloworld", "--namespace", "b")["source"] == str(second)
    assert micro("--namespace", "a", "kill", "helloworld").returncode == 0
    assert answer("--namespace", "b") == "Ahoy Alice"
    assert call("--namespace", "a").returncode == 4


def _processes_running(script: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(script).encode() in command:
                found.append(int(entry.name))
    return [pid for pid in found if alive(pid)]
