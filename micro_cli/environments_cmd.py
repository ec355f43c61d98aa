"""``micro env``: list, choose, add and delete environments."""

from __future__ import annotations

from typing import Annotated

import typer

from micro.home import Home
from micro_cli.environments import Environment, Environments
from micro_cli.output import Output, print_json, print_table
from micro_cli.session import options

__all__ = ["app"]

app = typer.Typer(help="Choose which micro server commands talk to.", invoke_without_command=True)


def _envs() -> Environments:
    return Environments(Home.from_env())


def _current(envs: Environments) -> str:
    """The environment in force; an unknown ``--env``/``MICRO_ENV`` is an error, not a silent name."""
    return envs.get(options.env).name if options.env else envs.current()


@app.callback()
def list_envs(
    ctx: typer.Context,
    output: Annotated[Output | None, typer.Option("--output", help="table or json.")] = None,
) -> None:
    """List environments; * marks the current one."""
    if ctx.invoked_subcommand is not None:
        return
    envs = _envs()
    current = _current(envs)
    if output is Output.json:
        print_json([_env_json(e, current) for e in envs.list()])
        return
    rows = [(e.name, e.address or "this machine", _tls(e), e.description) for e in envs.list()]
    print_table(
        ["", "NAME", "ADDRESS", "TLS", "DESCRIPTION"], [("*" if r[0] == current else "", *r) for r in rows]
    )


def _tls(env: Environment) -> str:
    if not env.tls:
        return "no"
    return f"ca:{env.ca_file}" if env.ca_file else "yes"


def _env_json(env: Environment, current: str) -> dict[str, object]:
    return {
        "name": env.name,
        "address": env.address,
        "description": env.description,
        "tls": env.tls,
        "ca_file": env.ca_file,
        "current": env.name == current,
    }


@app.command()
def get() -> None:
    """Print the current environment's name."""
    print(_current(_envs()))


@app.command("set")
def set_(name: Annotated[str, typer.Argument(help="Environment to use from now on.")]) -> None:
    """Choose the environment for every following command."""
    _envs().set_current(name)
    print(f"Environment set to {name}")


@app.command()
def add(
    name: Annotated[str, typer.Argument(help="Name of the new environment.")],
    address: Annotated[
        str,
        typer.Argument(
            help="Its micro server's HOST:PORT; https://HOST:PORT, port 443 or no port at all mean TLS."
        ),
    ],
    description: Annotated[str, typer.Option("--description", "-d", help="A note on what it is.")] = "",
    tls: Annotated[
        bool, typer.Option("--tls", help="Connect over TLS, trusting this machine's root certificates.")
    ] = False,
    ca_file: Annotated[
        str,
        typer.Option(
            "--ca-file",
            help="PEM file of the CA that signed the server's certificate (a private CA); implies --tls.",
        ),
    ] = "",
) -> None:
    """Add (or change) an environment."""
    env = _envs().add(name, address, description, tls=tls, ca_file=ca_file)
    how = f"TLS, trusting {env.ca_file}" if env.ca_file else "TLS" if env.tls else "plaintext"
    print(f"Environment {env.name} added ({env.address}, {how}); use it with `micro env set {env.name}`")


@app.command("del")
def delete(name: Annotated[str, typer.Argument(help="Environment to delete.")]) -> None:
    """Delete an environment (not the current one, and never 'local')."""
    _envs().delete(name)
    print(f"Environment {name} deleted")
