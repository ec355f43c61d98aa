"""What a command talks to: the environment and namespace in force, and a client for them."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from micro.context import validate_namespace
from micro.errors import ConnectError, MicroError, TLSError
from micro.home import Home
from micro_cli.environments import Environment, Environments
from micro_cli.errors import HandledError, UsageError

if TYPE_CHECKING:
    import asyncio

    from micro.client import Client
    from micro.credentials import RefreshingToken

__all__ = ["Options", "connect", "login_hint", "options", "run", "target"]

T = TypeVar("T")

REFRESH_POLL = 15.0


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
async def connect(*, timeout: float | None = 30.0, anonymous: bool = False) -> AsyncIterator[Client]:
    """A client for the current environment and namespace; starts the local daemon if needed.

    It sends the credentials of ``micro_cli.credentials.find`` (none when
    ``anonymous``) and keeps a saved login fresh while the command runs.
    """
    from micro.client import Client
    from micro.transport import connect
    from micro_cli.credentials import find

    env, namespace = target()
    address = env.address
    if env.is_local:
        from micro_cli.autostart import ensure_local_daemon

        address = ensure_local_daemon(Home.from_env()).client_address  # plaintext loopback even with TLS
    transport = connect(address, secure=env.tls, ca_file=env.ca_file or None)
    credentials = None if anonymous else find(env, namespace, Home.from_env()).credentials
    client = Client(transport, namespace=namespace, timeout=timeout, credentials=credentials)
    refresher = _keep_fresh(client)
    try:
        yield client
    except TLSError:
        raise  # it says what is wrong with the connection better than "cannot reach"
    except ConnectError as exc:
        raise ConnectError(_unreachable(env, address), address=address) from exc
    finally:
        if refresher is not None:
            refresher.cancel()
        await client.close()


def login_hint(detail: str) -> str:
    """The one line for a 401: what was refused, and that ``micro login`` in this env and namespace helps."""
    try:
        env, namespace = target()
    except (HandledError, MicroError):
        return f"{detail}: run `micro login`"
    return f"not signed in to environment {env.name!r}, namespace {namespace!r}: run `micro login` ({detail})"


def _keep_fresh(client: Client) -> asyncio.Task[None] | None:
    """Renew a refreshable token in the background, so a long command (``logs -f``) keeps its login saved."""
    import asyncio

    from micro.credentials import RefreshingToken

    credentials = client.credentials
    if not isinstance(credentials, RefreshingToken) or not credentials.tokens.refresh_token:
        return None
    return asyncio.get_running_loop().create_task(_refresh_loop(credentials, client))


async def _refresh_loop(credentials: RefreshingToken, client: Client) -> None:
    import asyncio
    import time

    while True:
        remaining = credentials.tokens.expiry - time.time()
        await asyncio.sleep(min(REFRESH_POLL, max(0.25, remaining / 4)))
        try:
            await credentials.token(client.transport)
        except (MicroError, OSError):
            pass  # the command's own next call says what is wrong


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    import asyncio  # here, not at the top: --help should not pay for it

    return asyncio.run(coroutine)


def _unreachable(env: Environment, address: str) -> str:
    if env.is_local:
        return f"cannot reach the local micro server at {address}: see {Home.from_env().server_log}"
    return f"cannot reach environment {env.name!r} at {address}: is its micro server running?"
