"""Environments (which daemon the CLI talks to) and the namespace chosen in each.

Kept in ``config.json`` under the config directory::

    {"env": "local",
     "envs": {"prod": {"address": "10.0.0.5:8081", "description": "...",
                       "tls": true, "ca_file": "/abs/ca.pem"}},
     "namespaces": {"local": "micro"}}

The built-in ``local`` environment is the daemon of this ``MICRO_HOME``,
started on demand; it cannot be deleted. An environment speaks TLS when added
with ``tls`` (or a CA file), as ``https://HOST:PORT``, or on port 443; files
written before TLS existed (no ``tls`` key) load as plaintext unless on 443.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Any

from micro.context import DEFAULT_NAMESPACE, validate_namespace
from micro.errors import MicroError
from micro.home import Home, write_private
from micro_cli.errors import HandledError, UsageError

__all__ = ["LOCAL", "Environment", "Environments"]

LOCAL = "local"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class EnvironmentError_(HandledError):
    """An environment that does not exist, or may not be changed."""

    exit_code = 9


@dataclass(frozen=True)
class Environment:
    """A named daemon address. ``address`` is empty for ``local`` (found through the state file).

    With ``tls`` the CLI connects over TLS, trusting the system's roots or only
    the CA certificates in ``ca_file`` (an absolute path) when one is given.
    """

    name: str
    address: str
    description: str
    tls: bool = False
    ca_file: str = ""

    @property
    def is_local(self) -> bool:
        return self.name == LOCAL


_BUILTIN = Environment(LOCAL, "", "the micro server of this machine, started on demand")


class Environments:
    """Reads and changes the CLI's environments and namespaces."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self.path = home.config_dir / "config.json"

    def list(self) -> list[Environment]:
        data = self._load()
        added = [_from_json(n, e) for n, e in data["envs"].items()]
        return [_BUILTIN, *sorted(added, key=lambda e: e.name)]

    def current(self) -> str:
        return str(self._load()["env"])

    def get(self, name: str) -> Environment:
        for env in self.list():
            if env.name == name:
                return env
        names = [e.name for e in self.list()]
        hint = get_close_matches(name, names, n=1)
        suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
        raise EnvironmentError_(
            f"no environment named {name!r}.{suggestion} Known: {', '.join(names)}; add one with "
            "`micro env add NAME HOST:PORT`"
        )

    def set_current(self, name: str) -> None:
        self.get(name)
        with self._editing() as data:
            data["env"] = name

    def add(
        self, name: str, address: str, description: str = "", *, tls: bool = False, ca_file: str = ""
    ) -> Environment:
        """Add or replace ``name``; ``https://`` or port 443 in ``address``, or a ``ca_file``, imply TLS."""
        if not _NAME.match(name):
            raise UsageError(f"invalid environment name {name!r}: use letters, digits, '_' and '-'")
        if name == LOCAL:
            raise EnvironmentError_("'local' is built in and cannot be redefined; choose another name")
        address, implied = _normalize_address(address)
        ca_file = _ca_file(ca_file) if ca_file else ""
        env = Environment(name, address, description, tls or implied or bool(ca_file), ca_file)
        with self._editing() as data:
            data["envs"][name] = {
                "address": env.address,
                "description": description,
                "tls": env.tls,
                "ca_file": env.ca_file,
            }
        return env

    def delete(self, name: str) -> None:
        self.get(name)
        if name == LOCAL:
            raise EnvironmentError_("'local' is built in and cannot be deleted")
        with self._editing() as data:
            if data["env"] == name:
                raise EnvironmentError_(
                    f"{name!r} is the current environment: switch first with `micro env set local`"
                )
            del data["envs"][name]
            data["namespaces"].pop(name, None)

    def namespace(self, env: str) -> str:
        return str(self._load()["namespaces"].get(env, DEFAULT_NAMESPACE))

    def set_namespace(self, env: str, namespace: str) -> None:
        self.get(env)
        try:
            validate_namespace(namespace)
        except MicroError as exc:
            raise UsageError(str(exc)) from None
        with self._editing() as data:
            data["namespaces"][env] = namespace

    def _load(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.path.read_text())
        except (FileNotFoundError, NotADirectoryError):
            data = {}  # a MICRO_HOME that cannot be used is reported when a command needs it
        except (OSError, ValueError) as exc:
            raise EnvironmentError_(f"cannot read {self.path}: {exc}; fix or remove the file") from exc
        data.setdefault("env", LOCAL)
        data.setdefault("envs", {})
        data.setdefault("namespaces", {})
        return data

    @contextlib.contextmanager
    def _editing(self) -> Iterator[dict[str, Any]]:
        self.home.ensure()
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = self._load()
            yield data
            write_private(self.path, json.dumps(data, indent=2).encode())


def _from_json(name: str, entry: dict[str, Any]) -> Environment:
    address = str(entry.get("address", ""))
    tls = bool(entry.get("tls")) or address.endswith(":443")  # files from before TLS: 443 meant TLS
    return Environment(name, address, str(entry.get("description", "")), tls, str(entry.get("ca_file", "")))


def _normalize_address(address: str) -> tuple[str, bool]:
    """``HOST:PORT`` and whether the address itself asks for TLS (``https://``, port 443)."""
    given, https = address, False
    scheme, sep, rest = address.partition("://")
    if sep:
        if scheme.lower() != "https":
            raise UsageError(f"invalid address {given!r}: use HOST:PORT, or https://HOST:PORT for TLS")
        address, https = rest.rstrip("/"), True
    if ":" not in address or address.endswith("]"):
        address += ":443"  # as Micro: an address without a port is a TLS endpoint
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"invalid address {given!r}: use HOST:PORT, e.g. 10.0.0.5:8081")
    return address, https or port == "443"


def _ca_file(path: str) -> str:
    resolved = Path(path).expanduser().absolute()
    if not resolved.is_file():
        raise UsageError(
            f"no CA file at {resolved}: give the PEM file of the CA that signed the server's certificate"
        )
    return str(resolved)
