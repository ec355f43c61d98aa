"""``micro debug health|stats [SERVICE]``: how a service, or the server and its engines, is doing."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated

import typer

from micro_cli.output import Output, print_json, print_table
from micro_cli.session import connect, run

if TYPE_CHECKING:
    from micro.proto import debug_pb2

__all__ = ["app"]

app = typer.Typer(help="Health and statistics of services and of the server.", no_args_is_help=True)

Service = Annotated[
    str, typer.Argument(help="Service to ask (default: the server itself).", show_default=False)
]
# Every building block runs in the server's process and answers for it: with no service named,
# the commands ask this one, and show "server".
_SERVER_BLOCK = "registry"
OutputOption = Annotated[Output | None, typer.Option("--output", help="table or json.")]


@app.command()
def health(service: Service = "", output: OutputOption = None) -> None:
    """Print the health of a service; for the server, the state of each engine it uses."""
    from micro.debug import DebugClient

    async def go() -> debug_pb2.HealthResponse:
        async with connect() as client:
            return await DebugClient(client, service=_asked(service)).health()

    answer = run(go())
    if output is Output.json:
        print_json({"status": answer.status, "checks": dict(answer.checks)})
        return
    print(f"{_shown(service)}: {answer.status}")
    if answer.checks:
        print_table(["ENGINE", "STATE"], sorted(answer.checks.items()))
    if answer.status != "ok":
        raise typer.Exit(5)


@app.command()
def stats(service: Service = "", output: OutputOption = None) -> None:
    """Print a service's uptime, memory, threads, garbage collections and request counts."""
    from micro.debug import DebugClient

    async def go() -> debug_pb2.StatsResponse:
        async with connect() as client:
            return await DebugClient(client, service=_asked(service)).stats()

    answer = run(go())
    data = {
        "started": datetime.fromtimestamp(answer.started).isoformat(timespec="seconds"),
        "uptime": f"{answer.uptime}s",
        "memory": f"{answer.memory / 2**20:.1f} MiB",
        "threads": answer.threads,
        "gc": answer.gc,
        "requests": answer.requests,
        "errors": answer.errors,
    }
    if output is Output.json:
        print_json({"service": _shown(service), **data})
        return
    print_table(["SERVICE", *(k.upper() for k in data)], [(_shown(service), *data.values())])


def _asked(service: str) -> str:
    """The service to call: the one named, else one of the server's blocks."""
    return service or _SERVER_BLOCK


def _shown(service: str) -> str:
    """The name the output gives: the one named, else ``server``."""
    return service or "server"
