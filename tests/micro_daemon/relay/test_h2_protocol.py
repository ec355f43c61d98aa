"""The relay's HTTP/2 with a bare client: framing it must accept, flow control, and peers it must drop."""

from __future__ import annotations

import asyncio
import json
import os
import struct
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest

from micro_daemon.relay.relay import Relay

from .conftest import DOWNLOAD, TIMEOUT, UNARY, UPLOAD, Node, payload, relay_address, settled
from .rawh2 import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    RawClient,
    frame,
    goaway_code,
    grpc_message,
    settings,
    window_update,
)

PROTOCOL_ERROR, FRAME_SIZE_ERROR, COMPRESSION_ERROR, CANCEL = 0x1, 0x6, 0x9, 0x8


@pytest.fixture
async def raw(relay: Relay) -> AsyncIterator[RawClient]:
    client = await RawClient.connect(relay_address(relay))
    yield client
    await client.close()


def status(trailers: list[tuple[bytes, bytes]]) -> bytes:
    return dict(trailers)[b"grpc-status"]


async def test_settings_and_ping_are_answered(raw: RawClient) -> None:
    first = await raw.frame()
    assert first is not None and (first.kind, first.flags) == (SETTINGS, 0)
    announced = dict(struct.iter_unpack(">HI", first.payload))
    assert announced[0x1] == 0  # no dynamic table, please: blocks stay self-contained
    assert announced[0x4] == 1 << 20
    raw.send(frame(PING, 0, 0, b"12345678"))
    frames = [await raw.frame() for _ in range(3)]  # its WINDOW_UPDATE, the SETTINGS ack, the PING ack
    kinds = {(f.kind, f.flags, f.payload) for f in frames if f is not None}
    assert (SETTINGS, ACK, b"") in kinds
    assert (PING, ACK, b"12345678") in kinds


async def test_padding_priority_and_continuation(raw: RawClient, nodes: tuple[Node, Node]) -> None:
    block = raw.request(UNARY, ("x-note", "padded"))
    head, rest = block[:10], block[10:]
    padded_head = bytes([3]) + struct.pack(">IB", 0, 15) + head + b"\x00" * 3  # pad length, priority
    body = grpc_message(b"ping")
    raw.send(
        frame(PRIORITY, 0, 1, struct.pack(">IB", 0, 7)),  # ignored
        frame(0x20, 0, 0, b"an extension"),  # an unknown frame type: ignored
        frame(HEADERS, PADDED | PRIORITY_FLAG, 1, padded_head),
        frame(CONTINUATION, END_HEADERS, 1, rest),
        frame(DATA, PADDED | END_STREAM, 1, bytes([4]) + body + b"\x00" * 4),
    )
    response = await raw.response(1)
    assert dict(response.headers)[b":status"] == b"200"
    assert response.messages == [b"ping"]
    assert status(response.trailers) == b"0"
    assert nodes[0].metadata[0]["x-note"] == "padded"


async def test_calls_whose_blocks_refer_to_the_callers_table(
    raw: RawClient, nodes: tuple[Node, Node]
) -> None:
    # hpack's encoder indexes every field: from the second call on, its blocks are table references.
    for stream in (1, 3, 5, 7):
        raw.send(
            frame(HEADERS, END_HEADERS, stream, raw.request(UNARY, ("x-same", "same"), ("x-n", str(stream)))),
            frame(DATA, END_STREAM, stream, grpc_message(b"%d" % stream)),
        )
        response = await raw.response(stream)
        assert response.messages == [b"%d" % stream]
        assert status(response.trailers) == b"0"
        assert dict(response.trailers)[b"x-n"] == str(stream).encode()
    seen = [(m["x-same"], m["x-n"]) for node in nodes for m in node.metadata]
    assert seen == [("same", "1"), ("same", "5"), ("same", "3"), ("same", "7")]


async def test_request_trailers_end_the_call(raw: RawClient, nodes: tuple[Node, Node]) -> None:
    raw.send(
        frame(HEADERS, END_HEADERS, 1, raw.request(UPLOAD)),
        frame(DATA, 0, 1, grpc_message(b"one") + grpc_message(b"two")),
        frame(HEADERS, END_HEADERS | END_STREAM, 1, raw.encoder.encode([("x-trailer", "t")])),
    )
    response = await raw.response(1)
    assert status(response.trailers) == b"0"
    assert json.loads(response.messages[0])["count"] == 2


async def test_a_caller_window_smaller_than_the_answer(raw: RawClient, nodes: tuple[Node, Node]) -> None:
    # The caller allows 1000 bytes per stream: the relay sends that much and holds the rest, sends
    # more on a WINDOW_UPDATE, and the rest (then the trailers) when a SETTINGS widens every window.
    raw.send(settings(initial_window_size=1000))
    spec = json.dumps({"count": 1, "size": 6000}).encode()
    raw.send(
        frame(HEADERS, END_HEADERS, 1, raw.request(DOWNLOAD)), frame(DATA, END_STREAM, 1, grpc_message(spec))
    )
    received = await raw.data_until_quiet(1)
    assert len(received) == 1000
    raw.send(window_update(1, 2000))
    received += await raw.data_until_quiet(1)
    assert len(received) == 3000
    raw.send(settings(initial_window_size=100_000))
    response = await raw.response(1, window=False)
    assert response.data == grpc_message(payload(0, 6000))
    assert status(response.trailers) == b"0"


async def test_a_caller_connection_window_smaller_than_the_answer(
    raw: RawClient, nodes: tuple[Node, Node]
) -> None:
    raw.send(settings(initial_window_size=1 << 20))  # the connection's window stays at 65535
    spec = json.dumps({"count": 2, "size": 50_000}).encode()
    raw.send(
        frame(HEADERS, END_HEADERS, 1, raw.request(DOWNLOAD)), frame(DATA, END_STREAM, 1, grpc_message(spec))
    )
    received = await raw.data_until_quiet(1)
    assert len(received) == 65_535
    raw.send(window_update(0, 1 << 20))
    response = await raw.response(1, window=False)
    assert response.data == grpc_message(payload(0, 50_000)) + grpc_message(payload(1, 50_000))
    assert status(response.trailers) == b"0"


def _bad_hpack() -> bytes:
    return frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\xff\xff\xff\xff\xff\xff\xff")


@pytest.mark.parametrize(
    ("sent", "code"),
    [
        pytest.param(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n", PROTOCOL_ERROR, id="http1"),
        pytest.param(os.urandom(3000), PROTOCOL_ERROR, id="garbage"),
        pytest.param(PREFACE + frame(DATA, 0, 1, b"x" * 20_000), FRAME_SIZE_ERROR, id="frame-too-large"),
        pytest.param(PREFACE + _bad_hpack(), COMPRESSION_ERROR, id="bad-hpack"),
        pytest.param(PREFACE + frame(HEADERS, END_HEADERS, 2, b"\x82"), PROTOCOL_ERROR, id="even-stream"),
        pytest.param(
            PREFACE + frame(HEADERS, 0, 1, b"\x83") + frame(PING, 0, 0, b"12345678"),
            PROTOCOL_ERROR,
            id="interrupted-block",
        ),
        pytest.param(
            PREFACE + frame(CONTINUATION, END_HEADERS, 1, b"\x82"), PROTOCOL_ERROR, id="stray-continuation"
        ),
        pytest.param(
            PREFACE + frame(PUSH_PROMISE, END_HEADERS, 1, b"\0\0\0\2\x82"), PROTOCOL_ERROR, id="push"
        ),
        pytest.param(
            PREFACE + frame(WINDOW_UPDATE, 0, 0, b"\0\0\1"), FRAME_SIZE_ERROR, id="short-window-update"
        ),
    ],
)
async def test_a_broken_peer_is_dropped_and_others_are_served(
    relay: Relay, channel: grpc.aio.Channel, nodes: tuple[Node, Node], sent: bytes, code: int
) -> None:
    assert await channel.unary_unary(UNARY)(b"before", timeout=TIMEOUT) == b"before"
    client = await RawClient.connect(relay_address(relay), preface=sent)
    frames = await client.until_closed()
    assert goaway_code(frames) == code
    await client.close()
    assert await channel.unary_unary(UNARY)(b"after", timeout=TIMEOUT) == b"after"
    assert len(relay._downstreams) == 1


async def test_a_silent_connection_holds_nothing(
    relay: Relay, channel: grpc.aio.Channel, nodes: tuple[Node, Node]
) -> None:
    client = await RawClient.connect(relay_address(relay), preface=b"")
    client.abort()
    assert await channel.unary_unary(UNARY)(b"x", timeout=TIMEOUT) == b"x"


async def test_a_caller_vanishing_mid_call_cancels_the_node_call(
    relay: Relay, raw: RawClient, nodes: tuple[Node, Node]
) -> None:
    a, _ = nodes
    raw.send(
        frame(HEADERS, END_HEADERS, 1, raw.request("/relaytest.Echo/Hold")),
        frame(DATA, END_STREAM, 1, grpc_message(b"")),
    )
    assert await asyncio.wait_for(a.started.get(), TIMEOUT) == "Hold"
    raw.abort()
    assert await asyncio.wait_for(a.finished.get(), TIMEOUT) == "cancelled"
    await settled(relay)


async def test_a_caller_reset_cancels_the_node_call(
    relay: Relay, raw: RawClient, nodes: tuple[Node, Node]
) -> None:
    a, _ = nodes
    raw.send(
        frame(HEADERS, END_HEADERS, 1, raw.request("/relaytest.Echo/Hold")),
        frame(DATA, END_STREAM, 1, grpc_message(b"")),
    )
    assert await asyncio.wait_for(a.started.get(), TIMEOUT) == "Hold"
    raw.send(frame(RST_STREAM, 0, 1, struct.pack(">I", CANCEL)))
    assert await asyncio.wait_for(a.finished.get(), TIMEOUT) == "cancelled"
    await settled(relay)
    # The connection goes on: a late frame on the reset stream is dropped, a new call is served.
    raw.send(frame(DATA, END_STREAM, 1, grpc_message(b"late")))
    raw.send(
        frame(HEADERS, END_HEADERS, 3, raw.request(UNARY)), frame(DATA, END_STREAM, 3, grpc_message(b"next"))
    )
    response = await raw.response(3)
    assert response.messages == [b"next"]
    assert GOAWAY not in {f.kind for f in raw.received}


@pytest.mark.parametrize("route", ["async-slow", "async-slow-notfound"])
async def test_nothing_is_sent_on_a_call_reset_while_being_routed(
    relay: Relay, raw: RawClient, nodes: tuple[Node, Node], route: str
) -> None:
    request = raw.request(UNARY, ("x-route", route))
    raw.send(frame(HEADERS, END_HEADERS, 1, request), frame(DATA, END_STREAM, 1, grpc_message(b"x")))
    raw.send(frame(RST_STREAM, 0, 1, struct.pack(">I", CANCEL)))
    await asyncio.sleep(0.3)  # routing ends
    raw.send(
        frame(HEADERS, END_HEADERS, 3, raw.request(UNARY)), frame(DATA, END_STREAM, 3, grpc_message(b"y"))
    )
    assert (await raw.response(3)).messages == [b"y"]
    assert [f for f in raw.received if f.stream == 1] == []
    assert nodes[0].metadata and len(nodes[0].metadata) + len(nodes[1].metadata) == 1


async def test_frames_crossing_the_relays_reset_are_ignored(raw: RawClient, nodes: tuple[Node, Node]) -> None:
    # The relay answers a call it cannot route, and resets it as the caller still sends: the caller's
    # next frames on it, sent before it read the reset, must not end the connection.
    raw.send(frame(HEADERS, END_HEADERS, 1, raw.request(UPLOAD, ("x-route", "notfound"))))
    response = await raw.response(1)
    assert dict(response.headers)[b"grpc-status"] == b"5"
    while response.reset is None:  # then RST_STREAM(NO_ERROR): stop sending
        await raw.frame()
    assert response.reset == 0
    raw.send(
        frame(DATA, 0, 1, grpc_message(b"in flight")),
        frame(HEADERS, END_HEADERS | END_STREAM, 1, raw.encoder.encode([("x-trailer", "t")])),
        frame(HEADERS, END_HEADERS, 3, raw.request(UNARY)),
        frame(DATA, END_STREAM, 3, grpc_message(b"next")),
    )
    assert (await raw.response(3)).messages == [b"next"]
    assert GOAWAY not in {f.kind for f in raw.received}


async def test_padding_is_credited_back(raw: RawClient, nodes: tuple[Node, Node]) -> None:
    # 1 byte of data and 254 of padding a frame: the relay's 1 MiB stream window is spent on padding
    # after ~4100 frames unless what is padding is given back too.
    message = payload(9, 6000)
    body = grpc_message(message)
    raw.send(frame(HEADERS, END_HEADERS, 1, raw.request(UPLOAD)))
    window = 1 << 20  # what the relay's SETTINGS allow per stream
    for i, byte in enumerate(body):
        while window < 255:
            got = await raw.frame()
            assert got is not None
            if got.kind == WINDOW_UPDATE and got.stream == 1:
                window += int.from_bytes(got.payload, "big")
        flags = PADDED | (END_STREAM if i == len(body) - 1 else 0)
        raw.send(frame(DATA, flags, 1, bytes([253, byte]) + b"\x00" * 253))
        window -= 255
    response = await raw.response(1)
    assert json.loads(response.messages[0])["count"] == 1
