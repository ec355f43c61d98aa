"""CLI tests never touch the keyring of the person running them: logins go to the test's MICRO_HOME."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def no_os_keyring(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHON_KEYRING_BACKEND", "keyring.backends.fail.Keyring")
    monkeypatch.delenv("MICRO_AUTH_TOKEN", raising=False)
