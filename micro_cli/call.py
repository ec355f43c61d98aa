"""``micro call``: call any endpoint of any service with a JSON body."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from micro_cli.errors import UsageError
from micro_cli.session import connect, run

__all__ = ["call", "stream"]


def call(
    service: Annotated[str, typer.Argument(help="Service name, e.g. store.")],
    endpoint: Annotated[str, typer.Argument(help="Endpoint as Handler.Method, e.g. Store.Read.")],
    body: Annotated[str, typer.Argument(help="Request as JSON ('-' reads stdin).")] = "{}",
    timeout: Annotated[
        float | None, typer.Option("--request-timeout", min=0.001, help="Seconds to wait for an answer.")
    ] = 30.0,
) -> None:
    """Call an endpoint of a service and print the JSON response (each one, for a stream)."""
    data = sys.stdin.read() if body == "-" else body
    try:
        request = json.loads(data or "{}")
    except ValueError as exc:
        raise UsageError(f'the request body is not JSON ({exc}); e.g. \'{{"key": "a"}}\'') from None
    if not isinstance(request, dict):
        raise UsageError(f"the request body must be a JSON object, not {type(request).__name__}")
    run(_call(service, endpoint, json.dumps(request).encode(), timeout))


async def _call(service: str, endpoint: str, body: bytes, timeout: float | None) -> None:
    from micro.errors import NotFound
    from micro_cli.registry import lookup_service

    async with connect(timeout=timeout) as client:
        versions = await lookup_service(client, service)
        found = next((e for v in versions for e in v.endpoints if e.name == endpoint), None)
        if found is None:
            names = sorted({e.name for v in versions for e in v.endpoints})
            raise NotFound(
                f"endpoint {endpoint!r} not found in service {service!r}; it has: {', '.join(names)}"
            )
        if found.metadata.get("stream") == "server":
            async for message in client.stream_json(service, endpoint, body):
                _print(message)
        elif found.metadata.get("stream"):
            raise UsageError(f"{endpoint} streams requests: use `micro stream` (arrives with services)")
        else:
            _print(await client.call_json(service, endpoint, body))


def _print(message: bytes) -> None:
    print(json.dumps(json.loads(message), indent=2, ensure_ascii=False))


def stream(
    service: Annotated[str, typer.Argument(help="Service name, e.g. helloworld.")],
    endpoint: Annotated[
        str, typer.Argument(help="Streaming endpoint as Handler.Method, e.g. Helloworld.Stream.")
    ],
    body: Annotated[str, typer.Argument(help="Request as JSON ('-' reads stdin).")] = "{}",
) -> None:
    """Call a server-streaming endpoint and print each message as it arrives."""
    call(service, endpoint, body, timeout=None)
