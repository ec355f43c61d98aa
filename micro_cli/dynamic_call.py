"""Calling an endpoint with JSON in its own shape, printing each response as it arrives.

Unary and server-streaming calls send the one request built from the flags.
Client-streaming and bidirectional calls send that one request too when flags
give it; otherwise each non-blank line of stdin is one request, sent as it is
read (so a bidirectional call can be typed interactively). A malformed line
cancels the call and names the line.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, TextIO

from micro_cli.flags import json_object, validate

if TYPE_CHECKING:
    from google.protobuf.descriptor import Descriptor

    from micro.client import Client
    from micro_cli.flags import ParsedFlags

__all__ = ["call_endpoint", "print_message"]


def print_message(data: bytes) -> None:
    """One response, as indented JSON (as ``micro call`` prints it)."""
    print(json.dumps(json.loads(data), indent=2, ensure_ascii=False), flush=True)


async def call_endpoint(
    client: Client,
    service: str,
    endpoint: str,
    shape: str,
    message: Descriptor,
    one: bytes | None,
    flags: ParsedFlags | None = None,
) -> None:
    """Call ``endpoint`` of ``service`` with ``one`` request or, for request streams, stdin's lines.

    Each line is a JSON object with ``flags`` applied on top.
    """
    if shape == "server":
        async for response in client.stream_json(service, endpoint, one or b"{}"):
            print_message(response)
    elif shape in ("client", "bidi"):
        requests = _single(one) if one is not None else _stdin_requests(message, sys.stdin, flags)
        # One call shape on the wire serves both: a client stream simply answers once.
        async for response in client.bidi_json(service, endpoint, requests):
            print_message(response)
    else:
        print_message(await client.call_json(service, endpoint, one or b"{}"))


async def _single(request: bytes) -> AsyncIterator[bytes]:
    yield request


async def _stdin_requests(
    message: Descriptor, stream: TextIO, flags: ParsedFlags | None
) -> AsyncIterator[bytes]:
    if stream.isatty() and sys.stderr.isatty():
        sys.stderr.write(f"Reading {message.name} requests as JSON, one per line (Ctrl-D ends):\n")
    async for number, line in _lines(stream):
        what = f"stdin line {number}"
        request = json_object(line, what)
        if flags is not None:
            request = flags.over(request)
        validate(message, request, what=what)
        yield json.dumps(request).encode()


async def _lines(stream: TextIO) -> AsyncIterator[tuple[int, str]]:
    """Non-blank lines of ``stream`` with their numbers, read by a thread as they come."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    put: Callable[[str | None], None] = queue.put_nowait

    def pump() -> None:
        try:
            try:
                for line in iter(stream.readline, ""):
                    loop.call_soon_threadsafe(put, line)
            except (OSError, ValueError):
                pass  # stdin closed under us: that is its end
            loop.call_soon_threadsafe(put, None)
        except RuntimeError:
            pass  # the loop is closed: the call has ended without needing more

    threading.Thread(target=pump, name="micro-stdin", daemon=True).start()
    number = 0
    while (line := await queue.get()) is not None:
        number += 1
        if line.strip():
            yield number, line
