"""A real daemon with its gateway, real user services on the test's loop, and an HTTP client."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from types import ModuleType
from typing import Any

import aiohttp
import pytest

from micro import Context, Service, errors
from micro.home import Home
from micro_daemon.app import Daemon
from micro_daemon.gateway import Gateway

SLOW = 1000  # a Stream count from which the greeter streams forever, slowly


def greeter_handler(pb: ModuleType) -> Any:
    class Greeter:
        async def Call(self, request: Any, context: Context) -> Any:
            if not request.name:
                raise errors.BadRequest("name is required")
            if request.name == "slow":
                await asyncio.sleep(5)
            if request.name == "crash":
                raise RuntimeError("the handler broke")
            trace = context.metadata.get("x-trace", "")
            return pb.Response(msg=f"Hello {request.name} ({context.namespace}){trace}")

        async def Stream(self, request: Any, context: Context) -> AsyncIterator[Any]:
            if request.count < 0:
                raise errors.BadRequest("count must not be negative")
            i = 0
            while i < request.count:
                if i == 2 and request.count == 999:
                    raise errors.Conflict("stopped after two", id="greeter.stream")
                yield pb.StreamResponse(count=i)
                i += 1
                if request.count >= SLOW:
                    await asyncio.sleep(0.05)

        async def Collect(self, requests: AsyncIterator[Any], context: Context) -> Any:
            return pb.Response(msg=",".join([r.name async for r in requests]))

        async def PingPong(self, requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            async for ping in requests:
                if ping.stroke < 0:
                    raise errors.BadRequest("strokes are positive")
                yield pb.Pong(stroke=ping.stroke)

    return Greeter()


def kitchen_handler(pb: ModuleType) -> Any:
    class Kitchen:
        async def Echo(self, request: Any, context: Context) -> Any:
            return request

        async def Count(self, request: Any, context: Context) -> AsyncIterator[Any]:
            for i in range(request.count):
                yield pb.CountResponse(number=i)

        async def Sum(self, requests: AsyncIterator[Any], context: Context) -> Any:
            return pb.CountResponse(number=sum([r.number async for r in requests]))

        async def Chat(self, requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            async for request in requests:
                yield request

    return Kitchen()


@pytest.fixture
def base(daemon: Daemon) -> str:
    return f"http://{daemon.api_address}"


@pytest.fixture
async def http(daemon: Daemon) -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client signed in as the local owner (the building blocks want an account)."""
    owner = json.loads(Home.from_env().owner_token.read_text())["access_token"]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {owner}"}) as session:
        yield session


@pytest.fixture
async def greeter(daemon: Daemon, greeter_pb2: ModuleType) -> AsyncIterator[Service]:
    service = Service("greeter")
    service.handle(greeter_handler(greeter_pb2), proto=greeter_pb2)
    await service.start()
    yield service
    await service.stop(grace=0.1)


@pytest.fixture
async def kitchen(daemon: Daemon, kitchen_pb2: ModuleType) -> AsyncIterator[Service]:
    service = Service("kitchen")
    service.handle(kitchen_handler(kitchen_pb2), proto=kitchen_pb2)
    await service.start()
    yield service
    await service.stop(grace=0.1)


StartGateway = Callable[..., Awaitable[str]]


@pytest.fixture
async def another_gateway(daemon: Daemon) -> AsyncIterator[StartGateway]:
    """Start a second gateway on the daemon's proxy with other options; returns its base URL."""
    started: list[Gateway] = []

    async def start(**options: Any) -> str:
        assert daemon._proxy is not None
        dispatcher = options.pop("dispatcher", daemon.dispatcher)
        gateway = Gateway(daemon._proxy, dispatcher, **options)
        started.append(gateway)
        return f"http://{await gateway.start('127.0.0.1:0')}"

    yield start
    for gateway in started:
        await gateway.stop(grace=0.1)


async def raw_request(address: str, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send bytes as they are (no client normalises them) and return the status and body."""
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + body)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5)
        headers = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = next(
            (
                int(line.split(b":")[1])
                for line in headers.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            ),
            0,
        )
        content = await asyncio.wait_for(reader.readexactly(length), 5)
        return int(status_line.split()[1]), content
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
