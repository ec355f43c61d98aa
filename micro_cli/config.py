"""``micro config``: dynamic config and secrets of the current namespace."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from micro_cli.output import Output, print_json
from micro_cli.session import connect, run

__all__ = ["app"]

app = typer.Typer(help="Get and set config values and secrets.", no_args_is_help=True)

Secret = Annotated[
    bool, typer.Option("--secret", "-s", help="Encrypt the value at rest / show it decrypted.")
]


@app.command()
def get(
    path: Annotated[str, typer.Argument(help="Dotted path, e.g. db.host (empty: everything).")] = "",
    secret: Secret = False,
    output: Annotated[Output | None, typer.Option("--output", help="json prints strings quoted.")] = None,
) -> None:
    """Print the value at a path: strings as they are, anything else as JSON."""
    from micro.config import ConfigClient

    async def go() -> Any:
        async with connect() as client:
            return await ConfigClient(client).get(path, secret=secret)

    value = run(go())
    if output is Output.json or not isinstance(value, str):
        print_json(value)
    else:
        print(value)


@app.command("set")
def set_(
    path: Annotated[str, typer.Argument(help="Dotted path, e.g. db.host.")],
    value: Annotated[
        str, typer.Argument(help="JSON value (anything that is not JSON is stored as a string).")
    ],
    secret: Secret = False,
) -> None:
    """Set a value: objects merge with what is there, anything else replaces it."""
    from micro.config import ConfigClient

    async def go() -> None:
        async with connect() as client:
            await ConfigClient(client).set(path, _parse(value), secret=secret)

    run(go())


@app.command("del")
def delete(
    path: Annotated[str, typer.Argument(help="Dotted path to delete, with everything below it.")],
) -> None:
    """Delete a value and everything below it."""
    from micro.config import ConfigClient

    async def go() -> None:
        async with connect() as client:
            await ConfigClient(client).delete(path)

    run(go())


def _parse(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
