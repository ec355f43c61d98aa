"""``micro services`` and ``micro get service``: what runs, and what it exposes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from micro_cli.output import Output, print_json, print_table
from micro_cli.session import connect, run

if TYPE_CHECKING:
    from micro.client import Client
    from micro.proto import registry_pb2

__all__ = ["get_app", "services"]

OutputOption = Annotated[Output | None, typer.Option("--output", help="table or json.")]

get_app = typer.Typer(help="Show details of a resource.", no_args_is_help=True)


def services(output: OutputOption = None) -> None:
    """List the services of the current namespace and the building blocks."""
    from micro.registry import RegistryClient

    async def go() -> list[registry_pb2.Service]:
        async with connect() as client:
            own = await RegistryClient(client).list_services()
            blocks = (
                []
                if client.namespace == "micro"
                else await RegistryClient(client, domain="micro").list_services()
            )
            return own + blocks

    names = sorted({s.name for s in run(go())})
    if output is Output.json:
        print_json(names)
    else:
        for name in names:
            print(name)


@get_app.command("service")
def get_service(
    name: Annotated[str, typer.Argument(help="Service name.")],
    output: OutputOption = None,
) -> None:
    """Show a service's versions, nodes and endpoints with their request and response fields."""

    async def go() -> list[registry_pb2.Service]:
        async with connect() as client:
            return await lookup_service(client, name)

    versions = run(go())
    if output is Output.json:
        print_json([_service_json(v) for v in versions])
        return
    for version in versions:
        print(f"service  {version.name}\nversion  {version.version}\n")
        print_table(
            ["ID", "ADDRESS", "METADATA"], [(n.id, n.address, _pairs(n.metadata)) for n in version.nodes]
        )
        for endpoint in version.endpoints:
            print(f"\nEndpoint: {endpoint.name}")
            if endpoint.metadata:
                print(f"Metadata: {_pairs(endpoint.metadata)}")
            print(f"Request: {_fields(endpoint.request)}")
            print(f"Response: {_fields(endpoint.response)}")


async def lookup_service(client: Client, name: str) -> list[registry_pb2.Service]:
    """The service in the client's namespace, else among the building blocks (domain ``micro``)."""
    from micro.errors import NotFound
    from micro.registry import RegistryClient

    try:
        return await RegistryClient(client).get_service(name)
    except NotFound:
        if client.namespace == "micro":
            raise NotFound(f"service {name!r} not found; `micro services` lists them") from None
    try:
        return await RegistryClient(client, domain="micro").get_service(name)
    except NotFound:
        raise NotFound(f"service {name!r} not found in namespace {client.namespace!r}") from None


def _service_json(service: registry_pb2.Service) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    data = MessageToDict(service, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    data.pop("schema", None)  # the descriptors are for tools, not for reading
    return data


def _pairs(metadata: Any) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(metadata.items())) or "-"


def _fields(value: registry_pb2.Value, indent: int = 0) -> str:
    if not value.values:
        return "{}"
    pad = "\t" * (indent + 1)
    lines = []
    for field in value.values:
        nested = f" {_fields(field, indent + 1)}" if field.values else ""
        lines.append(f"{pad}{field.name} {field.type}{nested}")
    return "{\n" + "\n".join(lines) + "\n" + "\t" * indent + "}"
