"""pytest plugin shipped with micro (registered through the ``pytest11`` entry point).

Fixtures:

- ``micro_home``: an isolated ``MICRO_HOME`` with ephemeral ports and no
  ``MICRO_ENV``/``MICRO_NAMESPACE`` from the caller's environment.
- ``micro_server``: a real daemon on that home, serving on an ephemeral port
  in a background thread, stopped at the end of the test.
- ``daemon`` (with pytest-asyncio): a real daemon on the test's own event
  loop, for async tests.
- ``micro_cli``: runs ``micro`` commands in-process and returns an ``Outcome``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from micro.home import Home

# The conformance suites in micro.testing are assert-based: let pytest explain their failures.
pytest.register_assert_rewrite("micro.testing.contracts", "micro.testing.messaging", "micro.testing.registry")

__all__ = ["DaemonThread", "Outcome", "session_auth_key"]

PRIVATE_KEY_ENV = "MICRO_AUTH_PRIVATE_KEY"
_ISOLATED_VARIABLES = ("MICRO_ENV", "MICRO_NAMESPACE", "MICRO_PROFILE", "MICRO_STORE_ADDRESS", "MICRO_PROXY")


@pytest.fixture
def micro_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "micro-home"
    monkeypatch.setenv("MICRO_HOME", str(home))
    monkeypatch.setenv("MICRO_SERVER_ADDRESS", "127.0.0.1:0")
    monkeypatch.setenv("MICRO_API_ADDRESS", "127.0.0.1:0")
    for name in _ISOLATED_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(PRIVATE_KEY_ENV, session_auth_key().decode())
    return home


_auth_key: bytes | None = None


def session_auth_key() -> bytes:
    """This test session's auth private key (PEM), given to every daemon through its variable.

    A daemon makes a 3072-bit RSA key at its first start, about half a second
    here: once per session instead of once per test. The runtime never passes
    the variable on to services.
    """
    global _auth_key
    if _auth_key is None:
        from micro_daemon.auth.keys import KeyPair

        _auth_key = KeyPair.generate().private_pem()
    return _auth_key


class DaemonThread:
    """A real ``micro server`` running on its own event loop in a background thread."""

    def __init__(self, home: Home, **settings: str) -> None:
        self.home = home
        self.settings = settings
        self.address = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="micro-daemon", daemon=True)
        self._daemon: Any = None

    def __enter__(self) -> DaemonThread:
        from micro_daemon.app import Daemon
        from micro_daemon.settings import Settings

        self._thread.start()
        self._daemon = Daemon(Settings.load(**self.settings), self.home)
        asyncio.run_coroutine_threadsafe(self._daemon.start(), self._loop).result(timeout=30)
        self.address = self._daemon.address
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._daemon.stop(grace=1), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@pytest.fixture
def micro_server(micro_home: Path) -> Iterator[DaemonThread]:
    with DaemonThread(Home.from_env()) as daemon:
        yield daemon


try:
    import pytest_asyncio
except ImportError:  # async fixtures need pytest-asyncio; the others work without it
    HAS_ASYNCIO = False
else:
    HAS_ASYNCIO = True

if HAS_ASYNCIO:

    @pytest_asyncio.fixture
    async def daemon(micro_home: Path) -> AsyncIterator[Any]:
        """A real daemon on this test's event loop (ephemeral ports), stopped at the end."""
        from micro_daemon.app import Daemon
        from micro_daemon.settings import Settings

        running = Daemon(Settings.load(), Home.from_env())
        await running.start()
        yield running
        await running.stop(grace=1)


@dataclass
class Outcome:
    """What a ``micro`` command did."""

    exit_code: int
    out: str
    err: str

    def assert_success(self) -> Outcome:
        assert self.exit_code == 0, f"exit {self.exit_code}\nstdout: {self.out}\nstderr: {self.err}"
        return self

    def assert_failure(self, exit_code: int, *, err: str = "") -> Outcome:
        assert self.exit_code == exit_code, f"exit {self.exit_code}\nstdout: {self.out}\nstderr: {self.err}"
        assert err in self.err, f"{err!r} not in stderr: {self.err}"
        return self


class CliRunner:
    """Runs ``micro`` commands in this process."""

    def __call__(self, *args: str, input: str | None = None) -> Outcome:
        from typer.testing import CliRunner as TyperRunner

        from micro_cli.main import app

        result = TyperRunner().invoke(app, list(args), input=input)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return Outcome(result.exit_code, result.stdout, result.stderr)


@pytest.fixture
def micro_cli(micro_home: Path) -> CliRunner:
    return CliRunner()
