"""What a command talks to: the environment and namespace in force, and a client for them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from micro.context import validate_namespace
from micro.errors import ConnectError, MicroError
from micro.home import Home
from micro_cli.environments import Environment, Environments
from micro_cli.errors import UsageError

if TYPE_CHECKING:
    from micro.client import Client

__all__ = ["Options", "connect", "options", "run", "target"]

T = TypeVar("T")


@dataclass
class Options:
    """Global flags, set by the root command before any sub-command runs."""

    env: str | None = None
    namespace: str | None = None


options = Options()


def target() -> tuple[Environment, str]:
    """The environment and namespace in force: flags/variables first, then the saved choice."""
    envs = Environments(Home.from_env())
    env = envs.get(options.env or envs.current())
    namespace = options.namespace or envs.namespace(env.name)
    try:
        validate_namespace(namespace)
    except MicroError as exc:
        raise UsageError(str(exc)) from None
    return env, namespace


@contextlib.asynccontextmanager
async def connect(*, timeout: float | None = 30.0) -> AsyncIterator[Client]:
    """A client for the current environment and namespace; starts the local daemon if needed."""
    from micro.client import Client
    from micro.transport import GrpcTransport

    env, namespace = target()
    address = env.address
    if env.is_local:
        from micro_cli.autostart import ensure_local_daemon

        address = ensure_local_daemon(Home.from_env()).address
    client = Client(GrpcTransport(address), namespace=namespace, timeout=timeout)
    try:
        yield client
    except ConnectError as exc:
        raise ConnectError(_unreachable(env, address), address=address) from exc
    finally:
        await client.close()


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    import asyncio  # here, not at the top: --help should not pay for it

    return asyncio.run(coroutine)


def _unreachable(env: Environment, address: str) -> str:
    if env.is_local:
        return f"cannot reach the local micro server at {address}: see {Home.from_env().server_log}"
    return f"cannot reach environment {env.name!r} at {address}: is its micro server running?"
