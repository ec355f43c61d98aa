"""The daemon's settings, defined once: each field names its ``MICRO_*`` variable and its default.

Precedence: an explicit value (a CLI flag), then the environment, then the default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any

from micro.errors import SetupError
from micro_daemon.tls import HINT as TLS_HINT

__all__ = ["Settings", "parse_address"]


def _setting(env: str, default: str, help: str) -> Any:
    return field(default=default, metadata={"env": env, "help": help})


@dataclass(frozen=True)
class Settings:
    """Everything ``micro server`` can be told."""

    address: str = _setting("MICRO_SERVER_ADDRESS", "127.0.0.1:8081", "gRPC proxy address, HOST:PORT")
    api_address: str = _setting("MICRO_API_ADDRESS", "127.0.0.1:8080", "HTTP API gateway address, HOST:PORT")
    profile: str = _setting(
        "MICRO_PROFILE", "local", "backend profile: local (this machine) or platform (shared)"
    )
    store_address: str = _setting(
        "MICRO_STORE_ADDRESS",
        "",
        "store engine: sqlite (local default), sqlite:///path.db, memory, postgres://...",
    )
    events_address: str = _setting(
        "MICRO_EVENTS_ADDRESS",
        "",
        "events engine: sqlite (local default), sqlite:///path.db, sqlite://?synchronous=full (fsync "
        "per commit), nats://...",
    )
    broker_address: str = _setting(
        "MICRO_BROKER_ADDRESS", "", "broker engine: memory (local default), nats://..."
    )
    registry_address: str = _setting(
        "MICRO_REGISTRY_ADDRESS", "", "registry engine: memory (local default), nats://..."
    )
    registry_ttl: str = _setting(
        "MICRO_REGISTRY_TTL", "90", "seconds a node stays registered without a heartbeat"
    )
    auth: str = _setting(
        "MICRO_AUTH", "jwt", "auth: jwt (accounts, tokens and rules enforced) or none (everyone is admin)"
    )
    auth_disable_admin: str = _setting(
        "MICRO_AUTH_DISABLE_ADMIN", "", "set to 1 to never create the default admin/micro account"
    )
    auth_token_lifetime: str = _setting(
        "MICRO_AUTH_TOKEN_LIFETIME", "900", "seconds an access token lives unless the caller asks for less"
    )
    tls_cert: str = _setting(
        "MICRO_TLS_CERT",
        "",
        "PEM certificate (chain) served with TLS on the gRPC and API ports; needs the key",
    )
    tls_key: str = _setting("MICRO_TLS_KEY", "", "PEM private key of the TLS certificate (unencrypted)")

    @classmethod
    def load(cls, **overrides: str | None) -> Settings:
        """Settings from the environment, with non-``None`` ``overrides`` taking precedence."""
        values: dict[str, str] = {}
        for f in fields(cls):
            given = overrides.get(f.name)
            values[f.name] = given if given is not None else os.environ.get(f.metadata["env"], str(f.default))
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        parse_address(self.address, "MICRO_SERVER_ADDRESS / --address")
        parse_address(self.api_address, "MICRO_API_ADDRESS / --api-address")
        if self.profile not in ("local", "platform"):
            raise SetupError(f"unknown profile {self.profile!r}: use local or platform", id="micro.server")
        try:
            float(self.registry_ttl)
        except ValueError:
            raise SetupError(f"MICRO_REGISTRY_TTL={self.registry_ttl!r} is not a number of seconds") from None
        if self.auth not in ("jwt", "none"):
            raise SetupError(f"unknown auth {self.auth!r}: use jwt or none", id="micro.server")
        if not self.auth_token_lifetime.isdigit() or not 1 <= int(self.auth_token_lifetime) <= 86400:
            raise SetupError(
                f"MICRO_AUTH_TOKEN_LIFETIME={self.auth_token_lifetime!r} is not 1 to 86400 seconds",
                id="micro.server",
            )
        if bool(self.tls_cert.strip()) != bool(self.tls_key.strip()):
            given, missing = (
                ("--tls-cert", "--tls-key") if self.tls_cert.strip() else ("--tls-key", "--tls-cert")
            )
            raise SetupError(
                f"{given} is set but {missing} is not: TLS needs both; {TLS_HINT}", id="micro.server"
            )

    @property
    def tls(self) -> bool:
        """Whether the daemon serves TLS (both files given; ``micro_daemon.tls`` checks them)."""
        return bool(self.tls_cert.strip())

    @property
    def default_admin_disabled(self) -> bool:
        return self.auth_disable_admin.strip().lower() in ("1", "true", "yes", "on")


def parse_address(address: str, what: str = "address") -> tuple[str, int]:
    """Split ``HOST:PORT``; ``SetupError`` naming ``what`` if it is not one."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise SetupError(f"{what}: {address!r} is not HOST:PORT (e.g. 127.0.0.1:8081)", id="micro.server")
    return host.strip("[]"), int(port)
