"""``micro user``: the namespace (and, with auth, the account) commands act as."""

from __future__ import annotations

from typing import Annotated

import typer

from micro.home import Home
from micro_cli.environments import Environments
from micro_cli.session import target

__all__ = ["app"]

app = typer.Typer(help="Who and where commands act as.", no_args_is_help=True)
namespace_app = typer.Typer(
    help="Show or set the namespace of the current environment.", invoke_without_command=True
)
app.add_typer(namespace_app, name="namespace")


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
