"""Streaming calls over HTTP: Server-Sent Events and WebSockets.

**Server-Sent Events** (a server-streaming endpoint called with plain HTTP):
the request comes from the query string and body as for a unary call; each
response is one ``data: <json>`` event. If the stream fails once open, an
``event: error`` carries the error JSON (``{id, code, detail, status}``) and
the response ends; errors before it opens are ordinary JSON error responses.

**WebSocket** (any endpoint, required for client-streaming and bidirectional
ones): every message is one JSON request or response, as a text frame
(binary frames are read as JSON too). The client ends its side by sending the
text message ``{"__end__": true}`` (closing the socket also ends it, but a
client that closes cannot read the answer of a client-streaming call). The
gateway closes with code 1000 once the call is done; on an error it first
sends the error JSON as a text message and closes with ``4000 + code``
(``4404``, ``4503`` ...). A unary or server-streaming call takes its one
request from the first message.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Mapping

from aiohttp import WSMsgType, web

from micro.errors import BadRequest, MicroError
from micro_daemon.gateway.payload import json_to_wire, wire_to_json
from micro_daemon.gateway.routing import Plan
from micro_daemon.gateway.upstream import ERROR_ID, CallInfo, unexpected

__all__ = ["END_MARKER", "server_sent_events", "websocket"]

log = logging.getLogger("micro.api")

END_MARKER = {"__end__": True}
_END_KEY = b"__end__"
_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # proxies such as nginx must not hold events back
}


async def server_sent_events(
    request: web.BaseRequest, plan: Plan, wire: bytes, call: CallInfo, headers: Mapping[str, str]
) -> web.StreamResponse:
    """Answer a server-streaming call as an event stream (see the module docstring)."""
    responses = await plan.upstream.server_stream(wire, call)
    response = web.StreamResponse(headers={**_SSE_HEADERS, **headers})
    try:
        await response.prepare(request)
        try:
            async for data in responses:
                await response.write(b"data: " + wire_to_json(data, plan.response_type) + b"\n\n")
        except MicroError as error:
            await response.write(_error_event(error))
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("unexpected error streaming %s %s", plan.service, plan.endpoint)
            await response.write(_error_event(unexpected(exc)))
    finally:
        await responses.aclose()
    await response.write_eof()
    return response


def _error_event(error: MicroError) -> bytes:
    error.id = error.id or ERROR_ID
    return b"event: error\ndata: " + error.to_json().encode() + b"\n\n"


async def websocket(
    request: web.BaseRequest, plan: Plan, call: CallInfo, max_message: int
) -> web.WebSocketResponse:
    """Serve a call of any shape over a WebSocket (see the module docstring)."""
    ws = web.WebSocketResponse(autoclose=False, max_msg_size=max_message)
    await ws.prepare(request)
    code = 1000
    responses = _responses(plan, _requests(ws, plan), call)
    try:
        async for data in responses:
            await ws.send_str(wire_to_json(data, plan.response_type).decode())
    except MicroError as error:
        code = await _send_error(ws, error)
    except (ConnectionError, asyncio.CancelledError):
        raise
    except Exception as exc:
        log.exception("unexpected error streaming %s %s", plan.service, plan.endpoint)
        code = await _send_error(ws, unexpected(exc))
    finally:
        await responses.aclose()
    await ws.close(code=code)
    return ws


async def _send_error(ws: web.WebSocketResponse, error: MicroError) -> int:
    error.id = error.id or ERROR_ID
    if not ws.closed:
        await ws.send_str(error.to_json())
    return 4000 + error.code if 0 < error.code < 1000 else 4500


async def _responses(
    plan: Plan, requests: AsyncIterator[bytes], call: CallInfo
) -> AsyncGenerator[bytes, None]:
    upstream = plan.upstream
    if plan.client_streaming and plan.server_streaming:
        responses = await upstream.bidi(requests, call)
    elif plan.client_streaming:
        yield await upstream.client_stream(requests, call)
        return
    elif plan.server_streaming:
        responses = await upstream.server_stream(await _first(requests), call)
    else:
        yield await upstream.unary(await _first(requests), call)
        return
    try:
        async for response in responses:
            yield response
    finally:
        await responses.aclose()


async def _first(requests: AsyncIterator[bytes]) -> bytes:
    async for request in requests:
        return request
    raise BadRequest("the WebSocket sent no request message", id=ERROR_ID)


async def _requests(ws: web.WebSocketResponse, plan: Plan) -> AsyncIterator[bytes]:
    """The client's messages as wire-format requests, until it closes or sends the end marker."""
    while True:
        message = await ws.receive()
        if message.type == WSMsgType.TEXT:
            data = message.data.encode()
        elif message.type == WSMsgType.BINARY:
            data = message.data
        else:
            return  # closed, closing or failed: the client's side is over
        if _END_KEY in data and _is_end(data):
            return
        yield json_to_wire(data, plan.request_type)


def _is_end(data: bytes) -> bool:
    try:
        return bool(json.loads(data) == END_MARKER)
    except ValueError:
        return False
