"""Streaming through the gateway: Server-Sent Events and WebSockets, in every call shape."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from micro import Service

from .conftest import SLOW

JSON = {"Content-Type": "application/json"}


async def events(response: aiohttp.ClientResponse) -> list[tuple[str, Any]]:
    """Every event of a Server-Sent Events body, as (event name, parsed data), until it ends."""
    text = (await asyncio.wait_for(response.read(), 10)).decode()
    found = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        found.append((fields.get("event", "message"), json.loads(fields["data"])))
    return found


async def test_server_streaming_as_events(http: aiohttp.ClientSession, base: str, greeter: Service) -> None:
    async with http.post(base + "/greeter/stream", json={"count": 3}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert await events(response) == [("message", {"count": str(i)}) for i in range(3)]


async def test_server_streaming_with_query_parameters(
    http: aiohttp.ClientSession, base: str, kitchen: Service
) -> None:
    async with http.get(base + "/kitchen/count?count=2") as response:  # what EventSource sends
        assert await events(response) == [("message", {"number": "0"}), ("message", {"number": "1"})]


async def test_an_empty_stream_ends_cleanly(http: aiohttp.ClientSession, base: str, greeter: Service) -> None:
    async with http.post(base + "/greeter/stream", json={"count": 0}) as response:
        assert (response.status, await events(response)) == (200, [])


async def test_a_failing_stream_ends_with_an_error_event(
    http: aiohttp.ClientSession, base: str, greeter: Service
) -> None:
    async with http.post(base + "/greeter/stream", json={"count": 999}) as response:
        assert response.status == 200
        got = await events(response)
    assert got[:2] == [("message", {"count": "0"}), ("message", {"count": "1"})]
    assert got[2] == (
        "error",
        {"id": "greeter.stream", "code": 409, "detail": "stopped after two", "status": "Conflict"},
    )
    assert len(got) == 3


async def test_a_bad_stream_request_is_an_ordinary_error(
    http: aiohttp.ClientSession, base: str, greeter: Service
) -> None:
    async with http.post(base + "/greeter/stream", data=b"{oops", headers=JSON) as response:
        assert response.status == 400
        assert (await response.json())["id"] == "micro.api"


async def test_a_service_that_stops_mid_stream(
    http: aiohttp.ClientSession, base: str, greeter: Service
) -> None:
    async with http.post(base + "/greeter/stream", json={"count": SLOW}) as response:
        assert response.status == 200
        first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)
        assert first == b'data: {"count":"0"}\n\n'
        await greeter.stop(grace=0.1)
        got = await events(response)  # ends: nothing hangs
    assert got[-1][0] == "error"
    assert got[-1][1]["code"] in (502, 503)
    assert all(name == "message" for name, _ in got[:-1])


async def test_building_block_streams(http: aiohttp.ClientSession, base: str) -> None:
    for key in ("a", "b"):
        async with http.post(base + "/store/write", json={"record": {"key": key}}) as response:
            assert response.status == 200
    async with http.get(base + "/store/list") as response:
        assert await events(response) == [("message", {"keys": ["a", "b"]})]


async def test_bidirectional_over_websocket(http: aiohttp.ClientSession, base: str, greeter: Service) -> None:
    async with http.ws_connect(base + "/greeter/ping-pong") as ws:
        for stroke in (1, 2, 3):
            await ws.send_json({"stroke": stroke})
            assert json.loads(await asyncio.wait_for(ws.receive_str(), 5)) == {"stroke": str(stroke)}
        await ws.send_json({"__end__": True})
        message = await asyncio.wait_for(ws.receive(), 5)
        assert message.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 1000


async def test_bidirectional_building_blocks_style_local_errors_close_the_socket(
    http: aiohttp.ClientSession, base: str, greeter: Service
) -> None:
    async with http.ws_connect(base + "/greeter/pingpong") as ws:
        await ws.send_json({"stroke": 1})
        assert json.loads(await ws.receive_str()) == {"stroke": "1"}
        await ws.send_json({"stroke": -1})
        error = json.loads(await asyncio.wait_for(ws.receive_str(), 5))
        assert (error["id"], error["code"], error["detail"]) == ("greeter", 400, "strokes are positive")
        await asyncio.wait_for(ws.receive(), 5)
        assert ws.close_code == 4400


async def test_malformed_websocket_messages(http: aiohttp.ClientSession, base: str, greeter: Service) -> None:
    async with http.ws_connect(base + "/greeter/ping-pong") as ws:
        await ws.send_str("{nope")
        error = json.loads(await asyncio.wait_for(ws.receive_str(), 5))
        assert (error["id"], error["code"]) == ("micro.api", 400)
        await asyncio.wait_for(ws.receive(), 5)
        assert ws.close_code == 4400


async def test_a_broken_websocket_handshake_is_a_bad_request(
    http: aiohttp.ClientSession, base: str, greeter: Service
) -> None:
    async with http.get(base + "/greeter/ping-pong", headers={"Upgrade": "websocket"}) as response:
        assert response.status == 400
        assert (await response.json())["id"] == "micro.api"


async def test_client_streaming_over_websocket(
    http: aiohttp.ClientSession, base: str, greeter: Service
) -> None:
    async with http.ws_connect(base + "/greeter/collect") as ws:
        for name in ("a", "b", "c"):
            await ws.send_json({"name": name})
        await ws.send_json({"__end__": True})
        assert json.loads(await asyncio.wait_for(ws.receive_str(), 5)) == {"msg": "a,b,c"}
        await asyncio.wait_for(ws.receive(), 5)
        assert ws.close_code == 1000


async def test_client_streaming_needs_a_websocket(
    http: aiohttp.ClientSession, base: str, greeter: Service
) -> None:
    async with http.post(base + "/greeter/collect", json={"name": "a"}) as response:
        assert response.status == 400
        error = await response.json()
    assert "WebSocket" in error["detail"]
    async with http.post(base + "/greeter/ping-pong", json={"stroke": 1}) as response:
        assert response.status == 400


@pytest.mark.parametrize(
    ("path", "request_", "expected"),
    [
        ("/greeter/call", {"name": "w"}, [{"msg": "Hello w (micro)"}]),
        ("/greeter/stream", {"count": 2}, [{"count": "0"}, {"count": "1"}]),
        ("/kitchen/count", {"count": 1}, [{"number": "0"}]),
    ],
)
async def test_one_request_shapes_over_websocket(
    http: aiohttp.ClientSession,
    base: str,
    greeter: Service,
    kitchen: Service,
    path: str,
    request_: Any,
    expected: list[Any],
) -> None:
    async with http.ws_connect(base + path) as ws:
        await ws.send_json(request_)
        got = []
        async for message in ws:
            got.append(json.loads(message.data))
        assert (got, ws.close_code) == (expected, 1000)


async def test_kitchen_shapes_over_websocket(
    http: aiohttp.ClientSession, base: str, kitchen: Service
) -> None:
    async with http.ws_connect(base + "/kitchen/sum") as ws:
        for number in (1, 2, 3):
            await ws.send_json({"number": number})
        await ws.send_json({"__end__": True})
        assert json.loads(await ws.receive_str()) == {"number": "6"}
    async with http.ws_connect(base + "/kitchen/chat") as ws:
        await ws.send_json({"number": 7})
        assert json.loads(await ws.receive_str()) == {"number": "7"}


async def test_a_websocket_client_that_goes_away(
    http: aiohttp.ClientSession, base: str, greeter: Service
) -> None:
    ws = await http.ws_connect(base + "/greeter/ping-pong")
    await ws.send_json({"stroke": 1})
    assert json.loads(await ws.receive_str()) == {"stroke": "1"}
    await ws.close()
    # the gateway let go of the call: the next one is served as usual
    async with http.post(base + "/greeter/call", json={"name": "n"}) as response:
        assert response.status == 200


async def test_a_service_that_stops_mid_websocket(
    http: aiohttp.ClientSession, base: str, greeter: Service
) -> None:
    async with http.ws_connect(base + "/greeter/ping-pong") as ws:
        await ws.send_json({"stroke": 1})
        assert json.loads(await ws.receive_str()) == {"stroke": "1"}
        await greeter.stop(grace=0.1)
        error = json.loads(await asyncio.wait_for(ws.receive_str(), 5))
        assert error["code"] in (502, 503)
        await asyncio.wait_for(ws.receive(), 5)
        assert ws.close_code in (4502, 4503)
