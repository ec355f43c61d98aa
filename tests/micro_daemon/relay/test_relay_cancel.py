"""A call its caller gives up on (cancel, deadline, hang-up) ends at its node too, leaving nothing behind."""

from __future__ import annotations

import asyncio
import json

import grpc
import grpc.aio
import pytest

from micro_daemon.relay.relay import Relay

from .conftest import (
    CHAT,
    DOWNLOAD,
    HOLD,
    OPTIONS,
    TIMEOUT,
    UNARY,
    Node,
    Router,
    payload,
    relay_address,
    settled,
)

SOON = 2.0  # how long a node may take to hear of it


async def outcome(node: Node) -> str:
    return await asyncio.wait_for(node.finished.get(), SOON)


async def test_cancelling_a_server_stream(
    relay: Relay, channel: grpc.aio.Channel, nodes: tuple[Node, Node]
) -> None:
    spec = {"count": 10_000, "size": 100, "pause": 0.01}
    call = channel.unary_stream(DOWNLOAD)(json.dumps(spec).encode(), timeout=TIMEOUT)
    assert [await call.read(), await call.read()] == [payload(0, 100), payload(1, 100)]
    call.cancel()
    assert await outcome(nodes[0]) == "cancelled"
    assert await call.code() == grpc.StatusCode.CANCELLED
    await settled(relay)


async def test_cancelling_a_stream_whose_answer_waits_in_the_relay(
    relay: Relay, channel: grpc.aio.Channel, nodes: tuple[Node, Node]
) -> None:
    # The caller reads nothing: the node fills the relay's window for the stream, then is cancelled.
    call = channel.unary_stream(DOWNLOAD)(
        json.dumps({"count": 100, "size": 1_000_000}).encode(), timeout=TIMEOUT
    )
    assert await call.read() == payload(0, 1_000_000)
    await asyncio.sleep(0.1)
    call.cancel()
    assert await outcome(nodes[0]) == "cancelled"
    await settled(relay)


async def test_cancelling_a_bidi_call(
    relay: Relay, channel: grpc.aio.Channel, nodes: tuple[Node, Node]
) -> None:
    call = channel.stream_stream(CHAT)(timeout=TIMEOUT)
    await call.write(b"ab")
    assert await call.read() == b"ba"
    await call.write(b"hold")
    assert await call.read() == b"dloh"
    call.cancel()
    assert await outcome(nodes[0]) == "cancelled"
    await settled(relay)


async def test_a_deadline_expiring(relay: Relay, channel: grpc.aio.Channel, nodes: tuple[Node, Node]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await channel.unary_unary(HOLD)(b"", timeout=0.3)
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await outcome(nodes[0]) == "cancelled"
    await settled(relay)


async def test_closing_the_callers_channel(relay: Relay, nodes: tuple[Node, Node]) -> None:
    channel = grpc.aio.insecure_channel(relay_address(relay), options=OPTIONS)
    hold = channel.unary_unary(HOLD)
    calls = [hold(b"", timeout=TIMEOUT) for _ in range(4)]
    for node in nodes:
        for _ in range(2):
            await asyncio.wait_for(node.started.get(), TIMEOUT)
    await channel.close()
    assert [await outcome(node) for node in nodes for _ in range(2)] == ["cancelled"] * 4
    for call in calls:
        assert await call.code() == grpc.StatusCode.CANCELLED
    await settled(relay)


@pytest.mark.parametrize("route", ["async-slow", "async-slow-notfound"])
async def test_cancelled_while_being_routed(
    relay: Relay, channel: grpc.aio.Channel, nodes: tuple[Node, Node], router: Router, route: str
) -> None:
    other = channel.unary_unary(HOLD)(b"", timeout=TIMEOUT)  # a call on the same connection meanwhile
    await asyncio.wait_for(nodes[0].started.get(), TIMEOUT)
    call = channel.unary_unary(UNARY)(b"x", metadata=(("x-route", route),), timeout=TIMEOUT)
    while len(router.headers) < 2:
        await asyncio.sleep(0.005)
    call.cancel()
    await asyncio.sleep(0.3)  # routing ends: the call, gone, goes nowhere, and is not answered
    assert router.picks == [nodes[0].address]
    assert nodes[1].started.empty()
    nodes[0].release.set()
    assert await other == b"a"
    assert await channel.unary_unary(UNARY)(b"next", timeout=TIMEOUT) == b"next"


async def test_many_cancelled_calls_leave_nothing_behind(
    relay: Relay, channel: grpc.aio.Channel, nodes: tuple[Node, Node]
) -> None:
    hold = channel.unary_unary(HOLD)
    calls = [hold(b"", timeout=TIMEOUT) for _ in range(100)]
    for node in nodes:
        for _ in range(50):
            await asyncio.wait_for(node.started.get(), TIMEOUT)
    for call in calls:
        call.cancel()
    assert [await outcome(node) for node in nodes for _ in range(50)] == ["cancelled"] * 100
    await settled(relay)
    assert all(not conn.streams for conn in relay._upstreams)
