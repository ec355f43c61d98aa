"""The relay between real things: grpc.aio nodes on ephemeral ports, a real ``Relay``, grpc.aio callers."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc
import grpc.aio
import pytest

from micro._hpack import encode
from micro.errors import NotFound
from micro_daemon.relay.relay import Destination, Relay

from .rawh2 import FakeNode

SERVICE = "relaytest.Echo"
UNARY = f"/{SERVICE}/Unary"
FAIL = f"/{SERVICE}/Fail"
HOLD = f"/{SERVICE}/Hold"
DOWNLOAD = f"/{SERVICE}/Download"
UPLOAD = f"/{SERVICE}/Upload"
CHAT = f"/{SERVICE}/Chat"
DESTINATION = "relaytest"
BIG = 64 << 20
OPTIONS = [
    ("grpc.max_receive_message_length", BIG),
    ("grpc.max_send_message_length", BIG),
    ("grpc.max_metadata_size", 1 << 20),
    ("grpc.absolute_max_metadata_size", 1 << 20),
    ("grpc.use_local_subchannel_pool", 1),
]
TIMEOUT = 10.0  # every call's deadline: a hang fails the test instead of blocking it


def payload(seed: int, size: int) -> bytes:
    """Bytes that differ from message to message, so a lost or reordered chunk shows."""
    return random.Random(seed).randbytes(size)


class Node:
    """A user service's node: a grpc.aio server on 127.0.0.1:0 that records what its handlers saw."""

    def __init__(self, name: str, options: Sequence[tuple[str, Any]] = ()) -> None:
        self.name = name
        self.server = grpc.aio.server(options=[*OPTIONS, *options])
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
            "Hold": grpc.unary_unary_rpc_method_handler(self.hold),
            "Download": grpc.unary_stream_rpc_method_handler(self.download),
            "Upload": grpc.stream_unary_rpc_method_handler(self.upload),
            "Chat": grpc.stream_stream_rpc_method_handler(self.chat),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.metadata: list[dict[str, Any]] = []  # each call's invocation metadata
        self.started: asyncio.Queue[str] = asyncio.Queue()  # method names, as handlers begin
        self.finished: asyncio.Queue[str] = asyncio.Queue()  # "done" or "cancelled", as they end
        self.release = asyncio.Event()  # lets ``Hold`` calls answer

    async def unary(self, request: bytes, context: Any) -> bytes:
        """Echoes the request; trailing metadata: the node's name and the caller's ``x-`` metadata."""
        metadata = self._begin("Unary", context)
        echoed = [(key, value) for key, value in metadata.items() if key.startswith("x-")]
        context.set_trailing_metadata((("node", self.name), *echoed))
        return request

    async def fail(self, request: bytes, context: Any) -> bytes:
        """Aborts as the JSON request says: ``code``, ``details``, ``trailers`` (after ``count`` bytes)."""
        self._begin("Fail", context)
        spec = json.loads(request)
        trailers = tuple(
            (key, value.encode() if key.endswith("-bin") else value) for key, value in spec["trailers"]
        )
        await context.abort(grpc.StatusCode[spec["code"]], spec["details"], trailing_metadata=trailers)
        raise AssertionError("abort returned")

    async def hold(self, request: bytes, context: Any) -> bytes:
        """Answers once ``release`` is set; ``finished`` says whether it got there or was cancelled."""
        self._begin("Hold", context)
        async with self._outcome():
            await self.release.wait()
        return self.name.encode()

    async def download(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        """Streams ``count`` messages of ``size`` bytes (``payload(i, size)``), ``pause`` seconds apart."""
        self._begin("Download", context)
        spec = json.loads(request)
        async with self._outcome():
            for i in range(spec["count"]):
                yield payload(i, spec["size"])
                if spec.get("pause"):
                    await asyncio.sleep(spec["pause"])

    async def upload(self, requests: AsyncIterator[bytes], context: Any) -> bytes:
        """The SHA-256 and count of the messages, read ``x-pause`` seconds apart (a slow consumer)."""
        metadata = self._begin("Upload", context)
        pause = float(metadata.get("x-pause", 0))
        digest, count = hashlib.sha256(), 0
        async for message in requests:
            digest.update(message)
            count += 1
            if pause:
                await asyncio.sleep(pause)
        return json.dumps({"sha256": digest.hexdigest(), "count": count, "node": self.name}).encode()

    async def chat(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        """Each message back reversed; ``b"flood:N:SIZE"`` answers N messages and ends, ``b"fail"``
        aborts, ``b"hold"`` waits for ``release``."""
        self._begin("Chat", context)
        async with self._outcome():
            async for message in requests:
                if message == b"fail":
                    trailers = (("x-after", "1"),)
                    await context.abort(grpc.StatusCode.ABORTED, "chat failed", trailing_metadata=trailers)
                if message.startswith(b"flood:"):
                    _, count, size = message.split(b":")
                    for i in range(int(count)):
                        yield payload(i, int(size))
                    return  # while the caller still has its side open
                yield message[::-1]
                if message == b"hold":
                    await self.release.wait()

    def _begin(self, method: str, context: Any) -> dict[str, Any]:
        metadata = dict(context.invocation_metadata())
        self.metadata.append(metadata)
        self.started.put_nowait(method)
        return metadata

    def _outcome(self) -> _Outcome:
        return _Outcome(self.finished)


class _Outcome:
    """Puts how the block ended on ``finished``: ``done``, ``cancelled`` or the exception's name.

    grpc.aio ends a handler whose call the caller cancelled with ``CancelledError`` where it
    waits, or, an async generator blocked writing, by closing it (``GeneratorExit``).
    """

    def __init__(self, finished: asyncio.Queue[str]) -> None:
        self._finished = finished

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if kind is None:
            self._finished.put_nowait("done")
        elif issubclass(kind, (asyncio.CancelledError, GeneratorExit)):
            self._finished.put_nowait("cancelled")
        else:
            self._finished.put_nowait(kind.__name__)


class Router:
    """The test's ``Router``: round-robin over ``addresses``, or what the call's ``x-route`` asks.

    ``x-route``: ``notfound`` raises ``NotFound``; ``async`` routes after a wait (``async-slow``, a
    longer one), ``async-notfound`` (``async-slow-notfound``) raises after one; ``crash`` and
    ``async-crash`` raise a bug; ``vouch`` adds ``x-vouched``.
    """

    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.picks: list[str] = []
        self.headers: list[dict[bytes, bytes]] = []
        self._turn = 0
        self.destination = Destination(DESTINATION, self.pick)
        self.vouching = Destination(
            DESTINATION, self.pick, lambda peer: encode([(b"x-vouched", peer.encode())])
        )

    def pick(self, dead: dict[str, float], exclude: str | None) -> str | None:
        now = time.monotonic()
        live = [a for a in self.addresses if a != exclude and dead.get(a, 0.0) <= now]
        if not live:
            return None
        address = live[self._turn % len(live)]
        self._turn += 1
        self.picks.append(address)
        return address

    def route(self, headers: Mapping[bytes, bytes], peer: str) -> Destination | Awaitable[Destination]:
        self.headers.append(dict(headers))
        how = headers.get(b"x-route", b"").decode()
        if how == "notfound":
            raise NotFound("no route to it: ünï 100% %41", id="relaytest.route")
        if how == "crash":
            raise RuntimeError("the router has a bug")
        if how == "vouch":
            return self.vouching
        if how.startswith("async"):
            return self._later(how)
        return self.destination

    async def _later(self, how: str) -> Destination:
        await asyncio.sleep(0.2 if how.startswith("async-slow") else 0.01)
        if how.endswith("-notfound"):
            raise NotFound("no route to it, later", id="relaytest.route")
        if how == "async-crash":
            raise RuntimeError("the router has a bug, later")
        return self.destination


StartNode = Callable[..., Awaitable[Node]]


@pytest.fixture
async def start_node() -> AsyncIterator[StartNode]:
    nodes: list[Node] = []

    async def start(name: str, options: Sequence[tuple[str, Any]] = ()) -> Node:
        node = Node(name, options)
        await node.server.start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.release.set()
        await node.server.stop(None)


StartFake = Callable[..., Awaitable[FakeNode]]


@pytest.fixture
async def start_fake() -> AsyncIterator[StartFake]:
    fakes: list[FakeNode] = []

    async def start(mode: str, **options: int) -> FakeNode:
        fake = await FakeNode(mode, **options).start()
        fakes.append(fake)
        return fake

    yield start
    for fake in fakes:
        await fake.stop()


@pytest.fixture
def router() -> Router:
    return Router()


@pytest.fixture
async def relay(router: Router) -> AsyncIterator[Relay]:
    relay = Relay(router, grace=5.0)
    await relay.listen("127.0.0.1", 0)
    yield relay
    await relay.close()
    await asyncio.sleep(0)  # the connections' connection_lost


def relay_address(relay: Relay) -> str:
    server = relay._servers[0]
    assert isinstance(server, asyncio.Server)
    return f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


@pytest.fixture
async def channel(relay: Relay) -> AsyncIterator[grpc.aio.Channel]:
    """A caller's channel to the relay; when the test ends, no stream may be left in the relay."""
    async with grpc.aio.insecure_channel(relay_address(relay), options=OPTIONS) as channel:
        yield channel
        await settled(relay)


@pytest.fixture
async def nodes(start_node: StartNode, router: Router) -> tuple[Node, Node]:
    """Two nodes the router spreads calls over, ``a`` first."""
    a, b = await start_node("a"), await start_node("b")
    router.addresses[:] = [a.address, b.address]
    return a, b


async def until(condition: Callable[[], object], within: float = 5.0) -> None:
    """Wait until ``condition()`` holds (fails after ``within`` seconds)."""
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.005)


async def settled(relay: Relay, within: float = 3.0) -> None:
    """Wait until the relay tracks no stream on any connection (fails if some remain)."""
    deadline = time.monotonic() + within
    while True:
        left = leftovers(relay)
        if not left:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"streams left in the relay: {left}")
        await asyncio.sleep(0.01)


def leftovers(relay: Relay) -> dict[str, Any]:
    left: dict[str, Any] = {}
    for conn in [*relay._downstreams, *relay._upstreams]:
        waiting = getattr(conn, "waiting", [])
        if conn.streams or conn.blocked or waiting:
            name = f"{type(conn).__name__}@{id(conn):x}"
            left[name] = {
                "streams": sorted(conn.streams),
                "blocked": len(conn.blocked),
                "waiting": len(waiting),
            }
    return left


def refused_address() -> str:
    """An address nothing listens on: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def micro_error(error: grpc.aio.AioRpcError) -> dict[str, Any]:
    """The ``micro-error`` trailer's JSON."""
    values = [value for key, value in error.trailing_metadata() or () if key == "micro-error"]
    assert len(values) == 1, error.trailing_metadata()
    data: dict[str, Any] = json.loads(values[0])
    return data
