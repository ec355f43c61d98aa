"""The CLI's logins, one per environment and namespace, and the credentials a command sends.

A command finds its credentials in this order (``find``):

1. ``MICRO_AUTH_TOKEN`` (with ``MICRO_AUTH_REFRESH_TOKEN`` and
   ``MICRO_AUTH_TOKEN_EXPIRY``), whatever the environment;
2. the login saved by ``micro login`` for the environment and namespace;
3. on the local environment, the local owner's token that the daemon writes;
4. none: the call is anonymous.

``micro login`` saves to the OS keyring when it is a real OS backend (Secret
Service, KWallet, macOS Keychain, Windows Credential Locker) or one chosen
with ``PYTHON_KEYRING_BACKEND``; a backend that could prompt or store in
plain text is never picked by itself. Otherwise, or without ``keyring``
installed, the tokens go to ``logins/credentials.json`` in the config
directory (0600 in a 0700 folder, replaced atomically; refused when group or
others may read it). That file is also the index of keyring logins, holding their
account and expiry but no token, so only a command whose login is in a
keyring pays for importing ``keyring``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from micro.home import Home, write_private
from micro_cli.errors import HandledError

if TYPE_CHECKING:
    from keyring.backend import KeyringBackend

    from micro.credentials import Credentials, TokenSet
    from micro_cli.environments import Environment

__all__ = ["CredentialsFileError", "Found", "KeyringError_", "Login", "TokenStore", "find", "os_keyring"]

KEYRING_SERVICE = "micro"
_OS_BACKENDS = (
    "keyring.backends.SecretService",
    "keyring.backends.libsecret",
    "keyring.backends.kwallet",
    "keyring.backends.macOS",
    "keyring.backends.Windows",
)
_NEVER = ("keyring.backends.fail", "keyring.backends.null", "keyring.backends.chainer")

Source = Literal["variable", "login", "owner", "none"]


class KeyringError_(HandledError):
    """A login saved in the OS keyring that cannot be read back (locked, or the backend is gone)."""

    exit_code = 6


class CredentialsFileError(HandledError):
    """The credentials file cannot be read: damaged, or not a JSON object."""

    exit_code = 9


@dataclass(frozen=True)
class Login:
    """What ``micro login`` keeps: the tokens, whose they are, and where they may be sent.

    ``address`` is the environment's address at login: a login is never sent
    to an environment that was since redefined to point elsewhere.
    """

    account: str
    access_token: str
    refresh_token: str
    expiry: float
    created: float
    address: str = ""
    where: str = field(default="", compare=False)  # "keyring (<backend>)" or the file's path


class TokenStore:
    """Saved logins of one ``MICRO_HOME``, keyed by environment and namespace."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self.path = home.config_dir / "logins" / "credentials.json"

    def load(self, env: str, namespace: str) -> Login | None:
        """The saved login, ``None`` if there is none; ``SetupError`` if the file is not private."""
        entry = self._entries().get(_key(env, namespace))
        if entry is None:
            return None
        if "keyring" in entry:
            return self._from_keyring(env, namespace, entry)
        return _login(entry, where=str(self.path))

    def save(self, env: str, namespace: str, login: Login) -> Login:
        """Save a new login where it belongs (a real keyring, else the file); return it with ``where``."""
        entry: dict[str, Any] | None = None
        backend = os_keyring()
        if backend is not None:
            try:
                entry = self._to_keyring(backend, env, namespace, login)
            except Exception as exc:  # a keyring backend may raise anything (D-Bus, a locked vault)
                _warn(f"could not save to the keyring ({exc}): saving to {self.path} instead")
        with self._editing() as entries:
            old = entries.get(_key(env, namespace))
            entries[_key(env, namespace)] = entry or _entry(login)
        if entry is None and old and old.get("keyring"):  # moved out of a keyring: leave nothing behind
            self._forget_keyring(env, namespace, old)
        return self._placed(login, entry)

    def update(self, env: str, namespace: str, login: Login) -> Login | None:
        """Save a login's renewed tokens where it is; ``None`` if it was logged out or replaced meanwhile."""
        key = _key(env, namespace)
        with self._editing() as entries:
            old = entries.get(key)
            if not old or old.get("account") != login.account:
                return None
            if old.get("refresh_token", login.refresh_token) != login.refresh_token:
                return None
            entry = None
            if old.get("keyring"):
                try:
                    entry = self._to_keyring(_load_backend(old["keyring"]), env, namespace, login)
                except Exception:
                    return None  # kept in memory for this command; the next one renews again
            entries[key] = entry or _entry(login)
        return self._placed(login, entry)

    def delete(self, env: str, namespace: str) -> Login | None:
        """Forget the login (in the keyring too); return what was there."""
        try:
            login = self.load(env, namespace)
        except KeyringError_:
            login = None
        with self._editing() as entries:
            entry = entries.pop(_key(env, namespace), None)
        if entry and entry.get("keyring"):
            self._forget_keyring(env, namespace, entry)
        return login

    def _to_keyring(self, backend: KeyringBackend, env: str, namespace: str, login: Login) -> dict[str, Any]:
        """Put the tokens in ``backend``; return the file's entry for them (no tokens)."""
        secret = {"access_token": login.access_token, "refresh_token": login.refresh_token}
        backend.set_password(KEYRING_SERVICE, self._user(env, namespace), json.dumps(secret))
        entry = _entry(login)
        del entry["access_token"], entry["refresh_token"]
        return {**entry, "keyring": f"{type(backend).__module__}.{type(backend).__qualname__}"}

    def _forget_keyring(self, env: str, namespace: str, entry: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            _load_backend(entry["keyring"]).delete_password(KEYRING_SERVICE, self._user(env, namespace))

    def _placed(self, login: Login, entry: dict[str, Any] | None) -> Login:
        where = f"the keyring ({entry['keyring']})" if entry else str(self.path)
        return replace(login, where=where)

    def _from_keyring(self, env: str, namespace: str, entry: dict[str, Any]) -> Login:
        name = str(entry["keyring"])
        try:
            secret = _load_backend(name).get_password(KEYRING_SERVICE, self._user(env, namespace))
            tokens = json.loads(secret or "")
            return _login({**entry, **tokens}, where=f"the keyring ({name})")
        except Exception as exc:
            raise KeyringError_(
                f"cannot read the login of environment {env!r}, namespace {namespace!r} from the keyring "
                f"({exc or type(exc).__name__}): unlock it, or run `micro logout` then `micro login`"
            ) from exc

    def _user(self, env: str, namespace: str) -> str:
        # one keyring serves every MICRO_HOME of the user: name the home too
        return f"{_key(env, namespace)} ({self.home.config_dir})"

    def _entries(self) -> dict[str, dict[str, Any]]:
        from micro.credentials import check_private

        try:
            check_private(self.path)
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except (OSError, ValueError) as exc:
            raise CredentialsFileError(f"cannot read {self.path}: {exc}; fix or remove the file") from exc
        logins = data.get("logins") if isinstance(data, dict) else None
        return logins if isinstance(logins, dict) else {}

    @contextlib.contextmanager
    def _editing(self) -> Iterator[dict[str, dict[str, Any]]]:
        self.home.ensure()
        folder = self.path.parent
        folder.mkdir(mode=0o700, exist_ok=True)
        if stat.S_IMODE(folder.stat().st_mode) & 0o077:
            folder.chmod(0o700)  # ours alone: whatever widened it, tokens are not kept there as it is
        lock_path = self.path.with_suffix(".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        with os.fdopen(fd, "r+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = self._entries()
            yield entries
            write_private(self.path, json.dumps({"logins": entries}, indent=2).encode())


@dataclass(frozen=True)
class Found:
    """The credentials a command sends, and where they came from."""

    credentials: Credentials | None
    source: Source
    login: Login | None = None


def find(env: Environment, namespace: str, home: Home) -> Found:
    """The credentials for ``env`` and ``namespace``, in the order of the module docstring."""
    from micro.credentials import TOKEN_ENV, OwnerToken, from_environment

    if os.environ.get(TOKEN_ENV):
        return Found(from_environment(None), "variable")
    store = TokenStore(home)
    login = store.load(env.name, namespace)
    if login is not None and login.address == env.address:
        return Found(_refreshing(store, env.name, namespace, login), "login", login)
    if env.is_local:
        return Found(OwnerToken(home.owner_token), "owner")
    return Found(None, "none")


def _refreshing(store: TokenStore, env: str, namespace: str, login: Login) -> Credentials:
    from micro.credentials import RefreshingToken, TokenSet

    def save(tokens: TokenSet) -> None:
        import time

        renewed = Login(
            login.account,
            tokens.access_token,
            tokens.refresh_token,
            tokens.expiry,
            time.time(),
            login.address,
        )
        store.update(env, namespace, renewed)

    tokens = TokenSet(login.access_token, login.refresh_token, login.expiry)
    return RefreshingToken(tokens, namespace=namespace, on_refresh=save, obtained=login.created)


def os_keyring() -> KeyringBackend | None:
    """The keyring to save logins in: the user's choice, else the best real OS backend; ``None`` if none.

    The choice is ``PYTHON_KEYRING_BACKEND`` or keyring's own config file; the
    ``fail`` and ``null`` backends mean "no keyring". Without a choice only
    the OS backends of ``_OS_BACKENDS`` are used, never one that may prompt
    on the terminal or keep secrets in plain text.
    """
    try:
        import keyring.backend
        import keyring.core
    except ImportError:
        return None
    try:
        chosen = keyring.core.load_env() or keyring.core.load_config()
    except Exception as exc:  # a chosen backend that cannot load: say so, and use the file
        _warn(f"the chosen keyring backend cannot be used ({exc}): saving to a file")
        return None
    if chosen is not None:
        return None if type(chosen).__module__.startswith(_NEVER) else chosen
    viable = [
        backend
        for backend in keyring.backend.get_all_keyring()
        if type(backend).__module__.startswith(_OS_BACKENDS) and keyring.core.recommended(backend)
    ]
    return max(viable, key=keyring.backend.by_priority, default=None)


def _load_backend(name: str) -> KeyringBackend:
    import keyring.core

    return keyring.core.load_keyring(name)


def _key(env: str, namespace: str) -> str:
    return f"{env}/{namespace}"


def _entry(login: Login) -> dict[str, Any]:
    entry = asdict(login)
    del entry["where"]
    return entry


def _login(entry: dict[str, Any], *, where: str) -> Login:
    try:
        return Login(
            account=str(entry["account"]),
            access_token=str(entry["access_token"]),
            refresh_token=str(entry.get("refresh_token", "")),
            expiry=float(entry.get("expiry", 0)),
            created=float(entry.get("created", 0)),
            address=str(entry.get("address", "")),
            where=where,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CredentialsFileError(
            f"the saved login is damaged ({exc!r}): run `micro logout` then `micro login`"
        ) from exc


def _warn(message: str) -> None:
    sys.stderr.write(f"Warning: {message}\n")
