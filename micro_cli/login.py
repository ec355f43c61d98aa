"""``micro login`` and ``micro logout``: the account commands act as, per environment and namespace."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from micro.home import Home
from micro_cli.errors import HandledError, UsageError
from micro_cli.session import connect, run, target

if TYPE_CHECKING:
    from micro.client import Client
    from micro_cli.credentials import Login

__all__ = ["LoginFailed", "login", "logout", "read_password", "sign_in"]

DEFAULT_ADMIN = ("admin", "micro")


class LoginFailed(HandledError):
    """The daemon refused the id and secret (or a refresh token): nothing was saved."""

    exit_code = 6


def login(
    username: Annotated[
        str | None,
        typer.Option("--username", "--email", "-u", help="Account id or name (prompted if not given)."),
    ] = None,
    password: Annotated[
        str | None,
        typer.Option(
            "--password", help="Password (prompted, hidden, if not given; a flag stays in shell history)."
        ),
    ] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from the first line of stdin.")
    ] = False,
) -> None:
    """Sign in to the current environment and namespace; later commands act as that account."""
    env, namespace = target()
    account = username or typer.prompt("Username")
    secret = read_password(password, password_stdin, prompt="Password")

    async def go() -> Login:
        async with connect(anonymous=True) as client:  # a stale saved token must not get in the way
            return await sign_in(client, account, secret, address=env.address)

    from micro.errors import Unauthorized
    from micro_cli.credentials import TokenStore

    try:
        signed = run(go())
    except Unauthorized as exc:
        raise LoginFailed(
            f"login refused: {exc.detail} (environment {env.name!r}); nothing was saved"
        ) from None
    saved = TokenStore(Home.from_env()).save(env.name, namespace, signed)
    print(f"Logged in as {saved.account} (environment {env.name}, namespace {namespace})")
    if (account, secret) == DEFAULT_ADMIN:
        sys.stderr.write(
            "Warning: this is the default admin password: change it with `micro user set password`\n"
        )


def logout() -> None:
    """Forget the login of the current environment and namespace."""
    from micro_cli.credentials import TokenStore

    env, namespace = target()
    removed = TokenStore(Home.from_env()).delete(env.name, namespace)
    where = f"environment {env.name}, namespace {namespace}"
    if removed is None:
        print(f"Not logged in ({where})")
        return
    after = "; commands act as the local owner again" if env.is_local else ""
    print(f"Logged out {removed.account} ({where}){after}")


def read_password(given: str | None, from_stdin: bool, *, prompt: str, confirm: bool = False) -> str:
    """The password of a flag, of stdin's first line, or typed at a hidden prompt."""
    if given is not None and from_stdin:
        raise UsageError("give the password with --password or --password-stdin, not both")
    if from_stdin:
        secret = sys.stdin.readline().rstrip("\r\n")
    elif given is not None:
        secret = given
    else:
        secret = typer.prompt(prompt, hide_input=True, confirmation_prompt=confirm)
    if not secret:
        raise UsageError("the password is empty")
    return secret


async def sign_in(client: Client, account: str, secret: str, *, address: str) -> Login:
    """Exchange an id (or name) and secret for tokens, as a ``Login`` of the account they belong to."""
    import time

    from micro.auth import AuthClient
    from micro_cli.credentials import Login

    token = await AuthClient(client).token(id=account, secret=secret)
    return Login(
        account=_subject(token.access_token) or account,
        access_token=token.access_token,
        refresh_token=token.refresh_token,
        expiry=float(token.expiry),
        created=float(token.created or time.time()),
        address=address,
    )


def _subject(token: str) -> str:
    """The account id in a JWT the daemon just gave us (read, not verified: the daemon verifies)."""
    import base64
    import json

    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return str(claims.get("sub", ""))
    except (IndexError, ValueError, AttributeError):
        return ""
