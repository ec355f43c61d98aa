"""Keyring backends for the tests, loadable by name through ``PYTHON_KEYRING_BACKEND``."""

from __future__ import annotations

from typing import ClassVar

from jaraco.classes import properties
from keyring.backend import KeyringBackend
from keyring.errors import KeyringLocked, PasswordDeleteError


class MemoryKeyring(KeyringBackend):
    """Secrets in a dictionary shared by every instance (the CLI loads a new one per use)."""

    priority = 1  # type: ignore[assignment]
    secrets: ClassVar[dict[tuple[str, str], str]] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.secrets.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.secrets[service, username] = password

    def delete_password(self, service: str, username: str) -> None:
        if self.secrets.pop((service, username), None) is None:
            raise PasswordDeleteError(username)


class LockedKeyring(KeyringBackend):
    """A keyring that refuses everything, as a locked vault does."""

    priority = 1  # type: ignore[assignment]

    def get_password(self, service: str, username: str) -> str | None:
        raise KeyringLocked("the collection is locked")

    def set_password(self, service: str, username: str, password: str) -> None:
        raise KeyringLocked("the collection is locked")

    def delete_password(self, service: str, username: str) -> None:
        raise KeyringLocked("the collection is locked")


class FakeSecretService(MemoryKeyring):
    """Stands for the Secret Service backend in backend selection (same module name).

    keyring's own detection sees every subclass of ``KeyringBackend``: this
    one is viable only while a test sets ``viable``, so detection elsewhere
    never picks it.
    """

    viable: ClassVar[bool] = False

    @properties.classproperty
    def priority(cls) -> float:
        if not cls.viable:
            raise RuntimeError("only for the backend selection test")
        return 5


FakeSecretService.__module__ = "keyring.backends.SecretService"
