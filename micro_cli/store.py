"""``micro store``: read and write the store of the current namespace."""

from __future__ import annotations

import base64
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from micro_cli.durations import parse_duration
from micro_cli.output import Output, print_json, print_table
from micro_cli.session import connect, run

if TYPE_CHECKING:
    from micro.proto import store_pb2
    from micro.store import StoreClient

__all__ = ["app"]

app = typer.Typer(help="Read and write records in the store.", no_args_is_help=True)

Table = Annotated[str, typer.Option("--table", "-t", help="Table to use.")]
Limit = Annotated[int, typer.Option("--limit", "-l", min=0, help="At most this many (0: no limit).")]
Offset = Annotated[int, typer.Option("--offset", "-o", min=0, help="Skip this many first.")]
Order = Annotated[str, typer.Option("--order", help="Key order: asc or desc.")]
OutputOption = Annotated[Output | None, typer.Option("--output", help="table (human) or json.")]


def _store(client: Any, table: str) -> StoreClient:
    from micro.store import StoreClient

    return StoreClient(client, table=table)


@app.command()
def read(
    key: Annotated[str, typer.Argument(help="Key to read (a prefix or suffix with -p/-s).")],
    prefix: Annotated[bool, typer.Option("--prefix", "-p", help="Read every key starting with KEY.")] = False,
    suffix: Annotated[bool, typer.Option("--suffix", "-s", help="Read every key ending with KEY.")] = False,
    limit: Limit = 0,
    offset: Offset = 0,
    order: Order = "asc",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show keys, values and expiry.")] = False,
    table: Table = "",
    output: OutputOption = None,
) -> None:
    """Read a record's value, or the records matching a prefix or suffix."""

    async def go() -> list[store_pb2.Record]:
        async with connect() as client:
            return await _store(client, table).read(
                key, prefix=prefix, suffix=suffix, limit=limit, offset=offset, order=order
            )

    records = run(go())
    if output is Output.json:
        print_json([_record_json(r) for r in records])
    elif verbose or output is Output.table:
        print_table(["KEY", "VALUE", "EXPIRY", "VERSION"], [_record_row(r) for r in records])
    else:
        for record in records:
            sys.stdout.write(_text(record.value) + "\n")


@app.command()
def write(
    key: Annotated[str, typer.Argument(help="Key to write.")],
    value: Annotated[list[str], typer.Argument(help="Value (words are joined by spaces; '-' reads stdin).")],
    expiry: Annotated[
        str | None, typer.Option("--expiry", "-e", help="Time to live, e.g. 90s, 10m, 1h.")
    ] = None,
    if_version: Annotated[
        int | None,
        typer.Option(
            "--if-version", min=0, help="Write only if the record has this version (0: only if absent)."
        ),
    ] = None,
    table: Table = "",
) -> None:
    """Write a record."""
    data = sys.stdin.buffer.read() if value == ["-"] else " ".join(value).encode()
    ttl = parse_duration(expiry, what="--expiry") if expiry is not None else 0
    if expiry is not None and ttl < 1:
        from micro_cli.errors import UsageError

        raise UsageError(f"--expiry {expiry!r} is shorter than a second: records live for whole seconds")

    async def go() -> int:
        async with connect() as client:
            return await _store(client, table).write(key, data, expiry=int(ttl), if_version=if_version)

    run(go())


@app.command()
def delete(key: Annotated[str, typer.Argument(help="Key to delete.")], table: Table = "") -> None:
    """Delete a record."""

    async def go() -> None:
        async with connect() as client:
            await _store(client, table).delete(key)

    run(go())


@app.command("list")
def list_(
    prefix: Annotated[str, typer.Argument(help="Only keys starting with this.")] = "",
    suffix: Annotated[str, typer.Option("--suffix", "-s", help="Only keys ending with this.")] = "",
    limit: Limit = 0,
    offset: Offset = 0,
    order: Order = "asc",
    table: Table = "",
    output: OutputOption = None,
) -> None:
    """List keys."""

    async def go() -> list[str]:
        async with connect() as client:
            return await _store(client, table).list(
                prefix=prefix, suffix=suffix, limit=limit, offset=offset, order=order
            )

    keys = run(go())
    if output is Output.json:
        print_json(keys)
    else:
        for key in keys:
            print(key)


@app.command()
def databases(output: OutputOption = None) -> None:
    """List the databases (one per namespace)."""

    async def go() -> list[str]:
        async with connect() as client:
            return await _store(client, "").databases()

    _print_names(run(go()), output)


@app.command()
def tables(output: OutputOption = None) -> None:
    """List the tables of the current namespace's database."""

    async def go() -> list[str]:
        async with connect() as client:
            return await _store(client, "").tables()

    _print_names(run(go()), output)


def _print_names(names: list[str], output: Output | None) -> None:
    if output is Output.json:
        print_json(names)
    else:
        for name in names:
            print(name)


def _text(value: bytes) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError:
        return "base64:" + base64.b64encode(value).decode()


def _record_json(record: store_pb2.Record) -> dict[str, Any]:
    data: dict[str, Any] = {"key": record.key}
    try:
        data["value"] = record.value.decode()
    except UnicodeDecodeError:
        data["value_base64"] = base64.b64encode(record.value).decode()
    data["expiry"] = record.expiry
    data["version"] = record.version
    data["metadata"] = {k: {"type": f.type, "value": f.value} for k, f in record.metadata.items()}
    return data


def _record_row(record: store_pb2.Record) -> list[str]:
    expiry = f"{record.expiry}s" if record.expiry else "never"
    return [record.key, _text(record.value), expiry, str(record.version)]
