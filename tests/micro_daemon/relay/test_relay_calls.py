"""Calls of every shape through the relay arrive as they were sent: messages, metadata, statuses."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter
from collections.abc import AsyncIterator, Iterable

import grpc
import grpc.aio
import pytest

from micro_daemon.relay.relay import Relay

from .conftest import (
    CHAT,
    DOWNLOAD,
    FAIL,
    OPTIONS,
    TIMEOUT,
    UNARY,
    UPLOAD,
    Node,
    Router,
    payload,
    relay_address,
    settled,
)


async def aiter_of(items: Iterable[bytes]) -> AsyncIterator[bytes]:
    for item in items:
        yield item


def sha256(*chunks: bytes) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


async def test_unary_carries_metadata_both_ways(channel: grpc.aio.Channel, nodes: tuple[Node, Node]) -> None:
    metadata = (("x-trace", "t-1"), ("x-blob-bin", b"\x00\xff\x01"), ("x-empty", ""))
    call = channel.unary_unary(UNARY)(b"hello", metadata=metadata, timeout=TIMEOUT)
    assert await call == b"hello"
    assert await call.code() == grpc.StatusCode.OK
    seen = nodes[0].metadata[0]
    assert (seen["x-trace"], seen["x-blob-bin"], seen["x-empty"]) == ("t-1", b"\x00\xff\x01", "")
    trailers = await call.trailing_metadata()
    assert (trailers["node"], trailers["x-trace"], trailers["x-blob-bin"]) == ("a", "t-1", b"\x00\xff\x01")


async def test_repeated_metadata_reaches_the_node_each_time(
    channel: grpc.aio.Channel, nodes: tuple[Node, Node]
) -> None:
    # The caller's encoder refers to its dynamic table from the second call on: the relay re-encodes.
    unary = channel.unary_unary(UNARY)
    for i in range(6):
        assert (
            await unary(b"%d" % i, metadata=(("x-same", "value"), ("x-i", str(i))), timeout=TIMEOUT)
            == b"%d" % i
        )
    assert [(m["x-same"], m["x-i"]) for node in nodes for m in node.metadata] == [
        ("value", str(i)) for i in (0, 2, 4, 1, 3, 5)
    ]


async def test_metadata_larger_than_a_frame(channel: grpc.aio.Channel, nodes: tuple[Node, Node]) -> None:
    # 40 kB of header block: HEADERS + CONTINUATION frames in, re-split for the node, and back.
    big = "v" * 40_000
    call = channel.unary_unary(UNARY)(b"big", metadata=(("x-big", big),), timeout=TIMEOUT)
    assert await call == b"big"
    assert nodes[0].metadata[0]["x-big"] == big
    assert (await call.trailing_metadata())["x-big"] == big


async def test_server_streaming(channel: grpc.aio.Channel, nodes: tuple[Node, Node]) -> None:
    call = channel.unary_stream(DOWNLOAD)(json.dumps({"count": 5, "size": 10}).encode(), timeout=TIMEOUT)
    assert [message async for message in call] == [payload(i, 10) for i in range(5)]
    assert await call.code() == grpc.StatusCode.OK


async def test_client_streaming(channel: grpc.aio.Channel, nodes: tuple[Node, Node]) -> None:
    messages = [payload(i, 100) for i in range(7)]
    answer = json.loads(await channel.stream_unary(UPLOAD)(aiter_of(messages), timeout=TIMEOUT))
    assert (answer["sha256"], answer["count"]) == (sha256(*messages), 7)


async def test_bidi_one_message_at_a_time(channel: grpc.aio.Channel, nodes: tuple[Node, Node]) -> None:
    call = channel.stream_stream(CHAT)(timeout=TIMEOUT)
    for text in (b"abc", b"", b"xyz"):
        await call.write(text)
        assert await call.read() == text[::-1]
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


@pytest.mark.parametrize("code", [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION])
async def test_error_status_details_and_trailers(
    channel: grpc.aio.Channel, nodes: tuple[Node, Node], code: grpc.StatusCode
) -> None:
    spec = {
        "code": code.name,
        "details": "no such thing: ünïcode, 100% sure",
        "trailers": [["micro-error", '{"code": 404}'], ["x-why", "because"], ["x-raw-bin", "\x01\x02"]],
    }
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await channel.unary_unary(FAIL)(json.dumps(spec).encode(), timeout=TIMEOUT)
    error = raised.value
    assert (error.code(), error.details()) == (code, spec["details"])
    assert tuple(error.trailing_metadata()) == (
        ("micro-error", '{"code": 404}'),
        ("x-why", "because"),
        ("x-raw-bin", b"\x01\x02"),
    )


async def test_a_node_error_midway_through_a_stream(
    channel: grpc.aio.Channel, nodes: tuple[Node, Node]
) -> None:
    # Trailers after headers and messages: the caller gets the messages, then the status.
    call = channel.stream_stream(CHAT)(timeout=TIMEOUT)
    await call.write(b"one")
    assert await call.read() == b"eno"
    await call.write(b"fail")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call.read()
    assert (raised.value.code(), raised.value.details()) == (grpc.StatusCode.ABORTED, "chat failed")
    assert tuple(raised.value.trailing_metadata()) == (("x-after", "1"),)


async def test_node_ends_a_bidi_call_the_caller_still_has_open(
    channel: grpc.aio.Channel, nodes: tuple[Node, Node]
) -> None:
    call = channel.stream_stream(CHAT)(timeout=TIMEOUT)
    await call.write(b"flood:2:5")
    assert [await call.read(), await call.read()] == [payload(0, 5), payload(1, 5)]
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_large_messages_both_ways(channel: grpc.aio.Channel, nodes: tuple[Node, Node]) -> None:
    # Several MB each way: every window on both hops runs dry and is refilled many times.
    request = payload(1, 5_000_000)
    assert await channel.unary_unary(UNARY)(request, timeout=TIMEOUT) == request
    uploads = [payload(i, 3_000_000) for i in range(3)]
    answer = json.loads(await channel.stream_unary(UPLOAD)(aiter_of(uploads), timeout=TIMEOUT))
    assert (answer["sha256"], answer["count"]) == (sha256(*uploads), 3)
    call = channel.unary_stream(DOWNLOAD)(
        json.dumps({"count": 3, "size": 4_000_000}).encode(), timeout=TIMEOUT
    )
    assert [message async for message in call] == [payload(i, 4_000_000) for i in range(3)]


async def test_slow_reader_of_a_server_stream(channel: grpc.aio.Channel, nodes: tuple[Node, Node]) -> None:
    # The caller reads slower than the node writes: the relay's queue for it fills and drains.
    spec = {"count": 12, "size": 500_000}
    call = channel.unary_stream(DOWNLOAD)(json.dumps(spec).encode(), timeout=TIMEOUT)
    received = []
    async for message in call:
        received.append(message)
        await asyncio.sleep(0.02)
    assert received == [payload(i, 500_000) for i in range(12)]


async def test_slow_node_reading_a_client_stream(channel: grpc.aio.Channel, nodes: tuple[Node, Node]) -> None:
    messages = [payload(i, 400_000) for i in range(10)]
    call = channel.stream_unary(UPLOAD)(aiter_of(messages), metadata=(("x-pause", "0.02"),), timeout=TIMEOUT)
    answer = json.loads(await call)
    assert (answer["sha256"], answer["count"]) == (sha256(*messages), 10)


async def test_node_ends_a_bidi_call_the_slow_caller_still_has_open(
    relay: Relay, nodes: tuple[Node, Node]
) -> None:
    # The node sends its whole answer then RST_STREAM(NO_ERROR), as the caller never half-closed;
    # the end of the answer waits in the relay for the caller's window and must arrive before the reset.
    options = [*OPTIONS, ("grpc.http2.bdp_probe", 0)]  # the caller's window grows only as it reads
    async with grpc.aio.insecure_channel(relay_address(relay), options=options) as channel:
        call = channel.stream_stream(CHAT)(timeout=TIMEOUT)
        await call.write(b"flood:6:1000000")
        received = []
        while (message := await call.read()) is not grpc.aio.EOF:
            received.append(message)
            await asyncio.sleep(0.02)
        assert received == [payload(i, 1_000_000) for i in range(6)]
        assert await call.code() == grpc.StatusCode.OK
        await settled(relay)


async def test_hundreds_of_concurrent_calls_round_robin(
    channel: grpc.aio.Channel, nodes: tuple[Node, Node], router: Router
) -> None:
    unary = channel.unary_unary(UNARY)

    async def one(i: int) -> str:
        call = unary(payload(i, 2_000), metadata=(("x-i", str(i)),), timeout=TIMEOUT)
        assert await call == payload(i, 2_000)
        node: str = (await call.trailing_metadata())["node"]
        return node

    answered = await asyncio.gather(*(one(i) for i in range(400)))
    assert Counter(answered) == {"a": 200, "b": 200}
    assert Counter(router.picks) == {nodes[0].address: 200, nodes[1].address: 200}


async def test_concurrent_streams_of_every_shape(channel: grpc.aio.Channel, nodes: tuple[Node, Node]) -> None:
    async def download(i: int) -> None:
        call = channel.unary_stream(DOWNLOAD)(
            json.dumps({"count": 4, "size": 50_000 + i}).encode(), timeout=TIMEOUT
        )
        assert [m async for m in call] == [payload(k, 50_000 + i) for k in range(4)]

    async def upload(i: int) -> None:
        messages = [payload(i * 10 + k, 60_000) for k in range(4)]
        answer = json.loads(await channel.stream_unary(UPLOAD)(aiter_of(messages), timeout=TIMEOUT))
        assert answer["sha256"] == sha256(*messages)

    async def chat(i: int) -> None:
        messages = [payload(i * 100 + k, 30_000) for k in range(3)]
        call = channel.stream_stream(CHAT)(aiter_of(messages), timeout=TIMEOUT)
        assert [m async for m in call] == [m[::-1] for m in messages]

    await asyncio.gather(*(shape(i) for i in range(30) for shape in (download, upload, chat)))


async def test_two_callers_share_the_nodes_connections(
    relay: Relay, channel: grpc.aio.Channel, nodes: tuple[Node, Node]
) -> None:
    async with grpc.aio.insecure_channel(relay_address(relay), options=OPTIONS) as other:
        for _ in range(4):
            assert await channel.unary_unary(UNARY)(b"one", timeout=TIMEOUT) == b"one"
            assert await other.unary_unary(UNARY)(b"two", timeout=TIMEOUT) == b"two"
        assert len(relay._downstreams) == 2
        assert sorted(conn.address for conn in relay._upstreams) == sorted(node.address for node in nodes)
