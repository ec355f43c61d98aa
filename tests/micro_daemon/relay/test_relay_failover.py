"""Where calls go when a node cannot take them, and what the relay answers itself when none can."""

from __future__ import annotations

import asyncio
import hashlib
import json

import grpc
import grpc.aio
import pytest

from micro_daemon.relay.relay import Relay

from .conftest import (
    CHAT,
    DESTINATION,
    HOLD,
    TIMEOUT,
    UNARY,
    UPLOAD,
    Node,
    Router,
    StartFake,
    StartNode,
    micro_error,
    payload,
    refused_address,
    until,
)


def sha256(*chunks: bytes) -> str:
    return hashlib.sha256(b"".join(chunks)).hexdigest()


async def started(node: Node, count: int) -> None:
    for _ in range(count):
        await asyncio.wait_for(node.started.get(), TIMEOUT)


async def node_of(call: grpc.aio.UnaryUnaryCall) -> str:
    await call
    node: str = (await call.trailing_metadata())["node"]
    return node


async def test_a_refused_node_is_skipped(
    channel: grpc.aio.Channel, start_node: StartNode, router: Router, relay: Relay
) -> None:
    dead = refused_address()
    live = await start_node("live")
    router.addresses[:] = [dead, live.address]
    unary = channel.unary_unary(UNARY)
    assert await node_of(unary(b"first", timeout=TIMEOUT)) == "live"
    assert router.picks == [dead, live.address]
    assert dead in relay.dead  # and the next calls do not try it again
    for _ in range(3):
        assert await node_of(unary(b"next", timeout=TIMEOUT)) == "live"
    assert router.picks.count(dead) == 1


async def test_no_node_left_answers_unavailable(channel: grpc.aio.Channel, router: Router) -> None:
    router.addresses[:] = [refused_address(), refused_address()]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await channel.unary_unary(UNARY)(b"x", timeout=TIMEOUT)
    error = raised.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details().startswith(f"service {DESTINATION!r} is unavailable: ")
    assert "refused" in error.details().lower() or "failed" in error.details().lower()
    trailer = micro_error(error)
    assert (trailer["code"], trailer["id"], trailer["detail"]) == (503, "micro.proxy", error.details())
    assert len(router.picks) == 2  # the first node, then one other, never more


async def test_no_node_at_all(channel: grpc.aio.Channel, router: Router) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await channel.stream_unary(UPLOAD)(timeout=TIMEOUT)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert raised.value.details() == f"service {DESTINATION!r} is unavailable"
    assert micro_error(raised.value)["code"] == 503


async def test_a_request_too_big_to_replay_is_not_retried(
    channel: grpc.aio.Channel, start_node: StartNode, router: Router
) -> None:
    # The relay keeps up to REPLAY_LIMIT bytes of a call to send it elsewhere; past that it cannot.
    live = await start_node("live")
    router.addresses[:] = [refused_address(), live.address]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await channel.unary_unary(UNARY)(payload(0, 200_000), timeout=TIMEOUT)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert await channel.unary_unary(UNARY)(payload(0, 200_000), timeout=TIMEOUT) == payload(0, 200_000)


async def test_a_refused_stream_goes_to_the_other_node(
    channel: grpc.aio.Channel, start_node: StartNode, router: Router
) -> None:
    # A node that takes one stream at a time answers a second with RST_STREAM(REFUSED_STREAM).
    narrow = await start_node("narrow", [("grpc.max_concurrent_streams", 1)])
    wide = await start_node("wide")
    router.addresses[:] = [narrow.address, wide.address]
    held = channel.unary_unary(HOLD)(b"", timeout=TIMEOUT)
    await started(narrow, 1)
    router.addresses[:] = [narrow.address]  # only the narrow node, then the other on a retry
    refused = channel.unary_unary(UNARY)(b"second", timeout=TIMEOUT)
    router.addresses[:] = [narrow.address, wide.address]
    assert await node_of(refused) == "wide"
    narrow.release.set()
    assert await held == b"narrow"


@pytest.mark.parametrize("mode", ["goaway", "refuse", "hangup", "garbage"])
async def test_a_node_that_does_not_take_the_call(
    channel: grpc.aio.Channel, start_node: StartNode, start_fake: StartFake, router: Router, mode: str
) -> None:
    fake = await start_fake(mode)
    live = await start_node("live")
    router.addresses[:] = [fake.address, live.address]
    call = channel.stream_unary(UPLOAD)(iter([b"one", b"two"]), timeout=TIMEOUT)  # replayed on the retry
    assert json.loads(await call) == {"sha256": sha256(b"one", b"two"), "count": 2, "node": "live"}
    assert fake.calls == 1


async def test_a_node_lost_after_answering(
    channel: grpc.aio.Channel, start_fake: StartFake, start_node: StartNode, router: Router
) -> None:
    fake = await start_fake("answer-then-hangup")
    live = await start_node("live")
    router.addresses[:] = [fake.address, live.address]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await channel.unary_unary(UNARY)(b"x", timeout=TIMEOUT)  # answered: never sent elsewhere
    error = raised.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == "the connection to the node was lost during the call"
    assert micro_error(error)["code"] == 503
    assert live.started.empty()


async def test_a_node_with_a_small_window(
    channel: grpc.aio.Channel, start_fake: StartFake, router: Router
) -> None:
    # Its first call may use the default window until the node's SETTINGS say 1000, which leaves
    # that stream's window negative for a while; its second sees 1000 from the start.
    fake = await start_fake("echo", window=1000)
    router.addresses[:] = [fake.address]
    unary = channel.unary_unary(UNARY)
    for i in range(2):
        call = unary(payload(i, 300_000), timeout=TIMEOUT)
        assert await call == payload(i, 300_000)
        assert (await call.trailing_metadata())["x-fake"] == "yes"
    assert fake.largest_data[3] <= 1000


async def test_graceful_stop_finishes_calls_in_flight_and_sends_new_ones_elsewhere(
    channel: grpc.aio.Channel, nodes: tuple[Node, Node], relay: Relay
) -> None:
    a, b = nodes
    hold = channel.unary_unary(HOLD)
    held = [hold(b"", timeout=TIMEOUT) for _ in range(4)]  # a, b, a, b
    await started(a, 2)
    await started(b, 2)
    stopping = asyncio.create_task(a.server.stop(TIMEOUT))
    await until(lambda: a.address not in relay._pool)  # the relay has read the node's GOAWAY
    unary = channel.unary_unary(UNARY)
    answered = [await node_of(unary(b"later", timeout=TIMEOUT)) for _ in range(6)]
    assert answered == ["b"] * 6
    a.release.set()
    b.release.set()
    assert sorted(await asyncio.gather(*held)) == [b"a", b"a", b"b", b"b"]
    await asyncio.wait_for(stopping, TIMEOUT)


async def test_a_node_dying_mid_call(channel: grpc.aio.Channel, nodes: tuple[Node, Node]) -> None:
    a, _ = nodes
    call = channel.unary_unary(HOLD)(b"", timeout=TIMEOUT)
    await started(a, 1)
    await a.server.stop(None)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


async def test_routing_error_answers_with_its_status(channel: grpc.aio.Channel, router: Router) -> None:
    for route in ("notfound", "async-notfound"):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await channel.unary_unary(UNARY)(b"x", metadata=(("x-route", route),), timeout=TIMEOUT)
        error = raised.value
        assert error.code() == grpc.StatusCode.NOT_FOUND
        trailer = micro_error(error)
        assert (trailer["code"], trailer["id"]) == (404, "relaytest.route")
        assert trailer["detail"] == error.details()
        assert error.details() in ("no route to it: ünï 100% %41", "no route to it, later")
    assert raised.value.details() == "no route to it, later"
    assert router.picks == []


async def test_routing_error_on_a_stream_the_caller_is_still_sending(
    channel: grpc.aio.Channel, router: Router
) -> None:
    async def forever() -> object:
        while True:
            yield b"more"
            await asyncio.sleep(0.01)

    for route in ("notfound", "async-notfound"):
        call = channel.stream_unary(UPLOAD)(forever(), metadata=(("x-route", route),), timeout=TIMEOUT)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND
        assert micro_error(raised.value)["code"] == 404


async def test_async_routing(channel: grpc.aio.Channel, nodes: tuple[Node, Node]) -> None:
    unary = channel.unary_unary(UNARY)
    calls = [unary(payload(i, 100), metadata=(("x-route", "async"),), timeout=TIMEOUT) for i in range(10)]
    assert await asyncio.gather(*calls) == [payload(i, 100) for i in range(10)]
    # Request messages that arrive while the call is being routed wait for it.
    messages = [payload(i, 30_000) for i in range(5)]

    async def slowly() -> object:
        for message in messages:
            yield message

    call = channel.stream_unary(UPLOAD)(slowly(), metadata=(("x-route", "async-slow"),), timeout=TIMEOUT)
    assert b'"count": 5' in await call


@pytest.mark.parametrize("route", ["crash", "async-crash"])
async def test_a_router_bug_answers_internal_and_spares_the_connection(
    channel: grpc.aio.Channel, nodes: tuple[Node, Node], route: str
) -> None:
    unary = channel.unary_unary(UNARY)
    held = channel.unary_unary(HOLD)(b"", timeout=TIMEOUT)  # another call on the same connection
    await started(nodes[0], 1)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await unary(b"x", metadata=(("x-route", route),), timeout=TIMEOUT)
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert micro_error(raised.value)["code"] == 500
    assert "the router has a bug" in raised.value.details()
    nodes[0].release.set()
    assert await held == b"a"
    assert await unary(b"after", timeout=TIMEOUT) == b"after"


async def test_vouched_fields_reach_the_node(channel: grpc.aio.Channel, nodes: tuple[Node, Node]) -> None:
    call = channel.unary_unary(UNARY)(b"v", metadata=(("x-route", "vouch"),), timeout=TIMEOUT)
    assert await call == b"v"
    assert nodes[0].metadata[0]["x-vouched"] == "127.0.0.1"
    assert (await call.trailing_metadata())["x-vouched"] == "127.0.0.1"


async def test_discarded_node_finishes_its_calls_then_closes(
    channel: grpc.aio.Channel, nodes: tuple[Node, Node], relay: Relay
) -> None:
    a, _ = nodes
    held = channel.unary_unary(HOLD)(b"", timeout=TIMEOUT)
    await started(a, 1)
    (first,) = [conn for conn in relay._upstreams if conn.address == a.address]
    relay.discard(a.address)
    assert not first.closed
    a.release.set()
    assert await held == b"a"
    await until(lambda: first.closed)
    unary = channel.unary_unary(UNARY)
    assert [await node_of(unary(b"", timeout=TIMEOUT)) for _ in range(2)] == ["b", "a"]


async def test_discarded_node_closes_once_its_last_call_is_reset_by_the_node(
    channel: grpc.aio.Channel, nodes: tuple[Node, Node], relay: Relay
) -> None:
    # The node ends the call while the caller still sends, then resets it (NO_ERROR): the last call
    # of a draining connection ends by the node's RST_STREAM, and the connection closes then.
    a, _ = nodes
    call = channel.stream_stream(CHAT)(timeout=TIMEOUT)
    await call.write(b"hi")
    assert await call.read() == b"ih"
    (first,) = [conn for conn in relay._upstreams if conn.address == a.address]
    relay.discard(a.address)
    await call.write(b"flood:1:5")
    assert await call.read() == payload(0, 5)
    assert await call.read() is grpc.aio.EOF
    await until(lambda: first.closed, within=2.0)
