"""``micro user``: the account and namespace commands act as."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from micro.home import Home
from micro_cli.environments import Environments
from micro_cli.errors import HandledError, UsageError
from micro_cli.output import Output, print_fields, print_json
from micro_cli.session import connect, run, target

if TYPE_CHECKING:
    from micro.client import Client
    from micro.proto import auth_pb2
    from micro_cli.credentials import Found
    from micro_cli.environments import Environment

__all__ = ["NotLoggedIn", "app"]

app = typer.Typer(help="Who and where commands act as (no subcommand: who am I).")
namespace_app = typer.Typer(
    help="Show or set the namespace of the current environment.", invoke_without_command=True
)
set_app = typer.Typer(help="Change your own account.", no_args_is_help=True)
app.add_typer(namespace_app, name="namespace")
app.add_typer(set_app, name="set")

OutputOption = Annotated[Output | None, typer.Option("--output", help="table (human) or json.")]


class NotLoggedIn(HandledError):
    """No credentials for the environment and namespace (a remote one without ``micro login``)."""

    exit_code = 6

    def __init__(self, env: Environment, namespace: str) -> None:
        super().__init__(
            f"you are not logged in to environment {env.name!r}, namespace {namespace!r}: run `micro login`"
        )


@app.callback(invoke_without_command=True)
def whoami(ctx: typer.Context, output: OutputOption = None) -> None:
    """Print the account commands act as: id, type, namespace, scopes, and how it signed in."""
    if ctx.invoked_subcommand is not None:
        return
    env, namespace = target()
    found = _found(env, namespace)

    async def go() -> auth_pb2.Account:
        from micro.auth import AuthClient

        async with connect() as client:
            return await AuthClient(client).inspect(await _token(client, env, namespace))

    account = run(go())
    how = _how(found)
    if output is Output.json:
        print_json(
            {
                "account": account.id,
                "name": account.name,
                "type": account.type,
                "namespace": account.issuer,
                "scopes": list(account.scopes),
                "environment": env.name,
                "current_namespace": namespace,
                "credentials": found.source,
            }
        )
        return
    fields: list[tuple[str, Any]] = [("account", account.id)]
    if account.name and account.name != account.id:
        fields.append(("name", account.name))
    fields += [
        ("type", account.type),
        ("namespace", account.issuer),
        ("scopes", ", ".join(account.scopes) or "none"),
        ("environment", env.name),
    ]
    if namespace != account.issuer:
        fields.append(("acting in", f"namespace {namespace}"))
    fields.append(("signed in", how))
    print_fields(fields)


@app.command()
def token() -> None:
    """Print the current access token (for ``Authorization: Bearer``), renewed first if near expiry."""
    env, namespace = target()
    _found(env, namespace)

    async def go() -> str:
        async with connect() as client:
            return await _token(client, env, namespace)

    print(run(go()))


@set_app.command("password")
def password(
    old_password: Annotated[
        str | None, typer.Option("--old-password", help="Current password (prompted, hidden, if not given).")
    ] = None,
    new_password: Annotated[
        str | None,
        typer.Option("--new-password", help="New password (prompted twice, hidden, if not given)."),
    ] = None,
) -> None:
    """Change the password of the account you are logged in as; stays logged in with the new one."""
    from micro_cli.login import read_password

    env, namespace = target()
    found = _found(env, namespace)
    if found.source == "owner":
        raise UsageError(
            "the local owner has no password (the daemon gives this machine's user its token): "
            "`micro login` as an account to change its password"
        )
    old = read_password(old_password, False, prompt="Old password")
    new = read_password(new_password, False, prompt="New password", confirm=True)
    account = run(_change_password(env, namespace, found, old, new))
    print(f"Password changed for {account}")


async def _change_password(env: Environment, namespace: str, found: Found, old: str, new: str) -> str:
    from micro.auth import AuthClient
    from micro.errors import Unauthorized
    from micro_cli.credentials import TokenStore
    from micro_cli.login import sign_in

    async with connect() as client:
        auth = AuthClient(client)
        account = await auth.inspect(await _token(client, env, namespace))
        try:  # checked here too: the daemon lets an administrator skip the old secret
            await auth.token(id=account.id, secret=old, namespace=account.issuer)
        except Unauthorized:
            raise UsageError("the old password is wrong: nothing was changed") from None
        await auth.change_secret(account.id, new, old_secret=old, namespace=account.issuer)
        if found.source == "login":  # the change revoked the saved tokens: sign in again
            signed = await sign_in(client, account.id, new, address=env.address)
            TokenStore(Home.from_env()).save(env.name, namespace, signed)
        return account.id


@namespace_app.callback()
def show(ctx: typer.Context) -> None:
    """Print the namespace commands use in the current environment."""
    if ctx.invoked_subcommand is None:
        print(target()[1])


@namespace_app.command("set")
def set_(namespace: Annotated[str, typer.Argument(help="Namespace to use from now on.")]) -> None:
    """Set the namespace of the current environment."""
    env, _ = target()
    Environments(Home.from_env()).set_namespace(env.name, namespace)
    print(f"Namespace set to {namespace} in environment {env.name}")


def _found(env: Environment, namespace: str) -> Found:
    from micro_cli.credentials import find

    found = find(env, namespace, Home.from_env())
    if found.credentials is None:
        raise NotLoggedIn(env, namespace)
    return found


async def _token(client: Client, env: Environment, namespace: str) -> str:
    credentials = client.credentials
    token = await credentials.token(client.transport) if credentials is not None else None
    if not token:
        raise NotLoggedIn(env, namespace)
    return token


def _how(found: Found) -> str:
    if found.source == "owner":
        return "as the local owner of this machine's micro server (no login needed)"
    if found.source == "variable":
        return "with the token in MICRO_AUTH_TOKEN"
    assert found.login is not None
    return f"with micro login (saved in {found.login.where})"
