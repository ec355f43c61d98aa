from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from micro_daemon.runtime.logs import LogFile
from micro_daemon.runtime.process import Instance, StartError

READY = "import sys; print('ready', flush=True)\n"


@pytest.fixture
def log(tmp_path: Path) -> Iterator[LogFile]:
    log_file = LogFile(tmp_path / "svc.log")
    yield log_file
    log_file.close()


_spawned: list[Instance] = []


@pytest.fixture(autouse=True)
async def stop_leftovers() -> AsyncIterator[None]:
    """A failed test must not leave its processes behind."""
    yield
    await asyncio.gather(*(service.stop(timeout=1) for service in _spawned))
    _spawned.clear()


def instance(tmp_path: Path, log: LogFile, code: str, env: dict[str, str] | None = None) -> Instance:
    script = tmp_path / "main.py"
    script.write_text(textwrap.dedent(code))
    environ = {"PATH": os.environ["PATH"], **(env or {})}
    _spawned.append(service := Instance("svc", [sys.executable, str(script)], tmp_path, environ, log))
    return service


async def started(service: Instance, log: LogFile) -> Instance:
    """Start ``service`` and wait for its ``ready`` line, so its signal handlers are set."""
    stream = log.follow(0)
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    await service.start()
    assert (await asyncio.wait_for(waiting, 5)).message == "ready"
    await stream.aclose()
    return service


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


async def test_output_is_pumped_into_the_log_and_the_exit_code_returned(tmp_path: Path, log: LogFile) -> None:
    service = instance(
        tmp_path,
        log,
        """
        import os, sys
        print("hello", os.environ["GREETING"], os.getcwd())
        print("oops", file=sys.stderr)
        sys.stdout.write("no newline at the end")
        sys.exit(3)
        """,
        env={"GREETING": "world"},
    )
    await service.start()
    assert service.running and service.pid is not None and service.started_at is not None

    assert await service.wait() == 3
    assert service.returncode == 3 and not service.running
    records = {(line.metadata["stream"], line.message) for line in log.tail(10)}
    assert records == {
        ("stdout", f"hello world {tmp_path}"),
        ("stderr", "oops"),
        ("stdout", "no newline at the end"),
    }
    assert service.tail_stderr() == ["oops"]


async def test_stderr_tail_keeps_the_last_lines(tmp_path: Path, log: LogFile) -> None:
    service = instance(
        tmp_path, log, "import sys\nfor i in range(50): print(i, file=sys.stderr)\nsys.exit(1)"
    )
    await service.start()
    assert await service.wait() == 1
    assert service.tail_stderr() == [str(i) for i in range(30, 50)]
    assert len(log.tail(100)) == 50


async def test_long_lines_are_logged_in_pieces(tmp_path: Path, log: LogFile) -> None:
    service = instance(tmp_path, log, "print('x' * 200_000)")
    await service.start()
    assert await service.wait() == 0
    assert "".join(line.message for line in log.tail(100)) == "x" * 200_000


async def test_stop_sends_sigterm(tmp_path: Path, log: LogFile) -> None:
    service = await started(instance(tmp_path, log, READY + "import time; time.sleep(60)"), log)
    assert os.getpgid(service.pid or 0) == service.pid  # its own process group

    assert await service.stop() == -signal.SIGTERM
    assert not service.running
    assert await service.stop() == -signal.SIGTERM  # again: same answer, no error
    assert await service.wait() == -signal.SIGTERM


async def test_graceful_exit_code_on_sigterm(tmp_path: Path, log: LogFile) -> None:
    code = "import signal, sys, time\nsignal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
    service = await started(instance(tmp_path, log, code + READY + "time.sleep(60)"), log)
    assert await service.stop() == 0


async def test_stop_escalates_to_sigkill(tmp_path: Path, log: LogFile) -> None:
    code = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    service = await started(instance(tmp_path, log, code + READY + "time.sleep(60)"), log)

    began = time.monotonic()
    assert await service.stop(timeout=0.3) == -signal.SIGKILL
    assert 0.3 <= time.monotonic() - began < 3


async def test_stop_kills_the_whole_process_group(tmp_path: Path, log: LogFile) -> None:
    code = """
        import subprocess, sys, time
        child = subprocess.Popen(["sleep", "60"])
        print(child.pid, flush=True)
        time.sleep(60)
    """
    service = instance(tmp_path, log, code)
    await service.start()
    for _ in range(100):
        if log.tail(1):
            break
        await asyncio.sleep(0.02)
    grandchild = int(log.tail(1)[0].message)
    try:
        await service.stop(timeout=2)
        for _ in range(100):
            if not alive(grandchild):
                break
            await asyncio.sleep(0.02)
        assert not alive(grandchild)
    finally:
        if alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)


async def test_cancelled_stop_still_kills(tmp_path: Path, log: LogFile) -> None:
    code = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    service = await started(instance(tmp_path, log, code + READY + "time.sleep(60)"), log)
    stopping = asyncio.ensure_future(service.stop(timeout=30))
    await asyncio.sleep(0.05)
    stopping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert await asyncio.wait_for(service.wait(), 2) == -signal.SIGKILL


async def test_a_missing_program_is_a_start_error(tmp_path: Path, log: LogFile) -> None:
    service = Instance("svc", [str(tmp_path / "nope")], tmp_path, {}, log)
    with pytest.raises(StartError, match="cannot start svc") as caught:
        await service.start()
    assert caught.value.service == "svc"
    assert await service.stop() is None
    assert not service.running and service.pid is None


async def test_start_twice_is_refused(tmp_path: Path, log: LogFile) -> None:
    service = instance(tmp_path, log, "pass")
    await service.start()
    with pytest.raises(RuntimeError):
        await service.start()
    assert await service.wait() == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
async def test_the_process_dies_with_the_daemon(tmp_path: Path) -> None:
    daemon = tmp_path / "daemon.py"
    daemon.write_text(
        textwrap.dedent(
            """
            import asyncio, pathlib, sys, time
            from micro_daemon.runtime.logs import LogFile
            from micro_daemon.runtime.process import Instance

            async def main():
                log = LogFile(pathlib.Path(sys.argv[1]))
                service = Instance("svc", ["sleep", "60"], pathlib.Path.cwd(), {"PATH": "/usr/bin:/bin"}, log)
                await service.start()
                print(service.pid, flush=True)
                await asyncio.sleep(60)

            asyncio.run(main())
            """
        )
    )
    with subprocess.Popen(
        [sys.executable, str(daemon), str(tmp_path / "svc.log")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[3],
    ) as parent:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert alive(child)
        parent.kill()
    try:
        for _ in range(100):
            if not alive(child):
                break
            await asyncio.sleep(0.02)
        assert not alive(child)
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)
