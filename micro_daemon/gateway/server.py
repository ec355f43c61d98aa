"""``Gateway``: the HTTP server in front of every service, in the daemon's event loop."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote

from aiohttp import web
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor

from micro import __version__
from micro._dispatch import Dispatcher
from micro._metadata import CODEC_KEY, NAMESPACE_KEY, REMOTE_ADDRESS_KEY, SERVICE_KEY
from micro.context import DEFAULT_NAMESPACE, validate_namespace
from micro.errors import BadRequest, MicroError, NotFound, SetupError, error_for_code
from micro.openapi import openapi_document
from micro.proto import registry_pb2
from micro_daemon.auth.gate import Gate, log_refusal
from micro_daemon.gateway.payload import (
    MULTIPART,
    PROTO_TYPES,
    URLENCODED,
    body_object,
    fields_json,
    json_to_wire,
    merge,
    read_body,
    read_multipart,
    set_field,
    urlencoded_fields,
    wire_to_json,
)
from micro_daemon.gateway.routing import Plan, Route, Router
from micro_daemon.gateway.streams import server_sent_events, websocket
from micro_daemon.gateway.upstream import ERROR_ID, CallInfo, Local, Metadata, unexpected
from micro_daemon.proxy import Proxy
from micro_daemon.registry.backend import RegistryBackend
from micro_daemon.settings import parse_address

if TYPE_CHECKING:
    import ssl

__all__ = ["DEFAULT_TIMEOUT", "MAX_BODY", "Gateway"]

log = logging.getLogger("micro.api")

MAX_BODY = 10 * 1024 * 1024
DEFAULT_TIMEOUT = 30.0
OPENAPI_SUFFIX = "/openapi.json"
STOP_TIMEOUT = 0.5  # for handlers still running once the grace period is over

CORS_HEADERS = {
    "Access-Control-Allow-Credentials": "true",
    "Access-Control-Allow-Methods": "POST, PATCH, GET, OPTIONS, PUT, DELETE",
    "Access-Control-Allow-Headers": (
        "Accept, Content-Type, Content-Length, Accept-Encoding, X-CSRF-Token, Authorization, Micro-Namespace"
    ),
}
_NOT_FORWARDED = frozenset(
    {
        REMOTE_ADDRESS_KEY,  # the gateway sets it from the connection
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-type",
        "accept-encoding",
        "expect",
        "user-agent",
        "origin",
        # browser noise that means nothing to a service, and costs on every call
        "cache-control",
        "pragma",
        "priority",
        "dnt",
        "upgrade-insecure-requests",
        CODEC_KEY,
        SERVICE_KEY,
        NAMESPACE_KEY,
    }
)
_METADATA_KEY = re.compile(r"[0-9a-z_.-]+")
_BODYLESS = frozenset({"GET", "HEAD"})


class Gateway:
    """Serves Micro's HTTP API: a path names a service and endpoint, a JSON body is the request.

    Building blocks are called in-process through ``dispatcher``; user services
    through ``proxy``'s registry view and channels. ``max_body`` bounds request
    bodies and WebSocket messages; ``timeout`` bounds unary and client-streaming
    calls (streams that send responses run until either side ends them). An
    endpoint answering an empty message still answers ``{}`` with 200 (Micro
    answered 204).
    """

    def __init__(
        self,
        proxy: Proxy,
        dispatcher: Dispatcher,
        *,
        max_body: int = MAX_BODY,
        timeout: float | None = DEFAULT_TIMEOUT,
        cors: bool = True,
        registry: RegistryBackend | None = None,
        gate: Gate | None = None,
    ) -> None:
        self.router = Router(proxy, dispatcher)
        self.gate = gate or Gate(None)
        self.registry = registry
        self.max_body = max_body
        self.timeout = timeout
        self.cors = cors
        self.address = ""
        self.app = web.Application(client_max_size=max_body)
        self.app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner: web.AppRunner | None = None
        self._inflight: set[asyncio.Task[Any]] = set()
        self._streams: set[asyncio.Task[Any]] = set()
        self._metadata_keys: dict[str, str | None] = {}
        self._version = json.dumps({"version": __version__}, separators=(",", ":")).encode()

    async def start(self, address: str, *, ssl_context: ssl.SSLContext | None = None) -> str:
        """Listen on ``address`` (``HOST:PORT``, port 0 for any) and return the bound address.

        With ``ssl_context`` the gateway serves HTTPS.
        """
        host, port = parse_address(address, "MICRO_API_ADDRESS / --api-address")
        runner = web.AppRunner(
            self.app, access_log=None, handler_cancellation=True, shutdown_timeout=STOP_TIMEOUT
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise _port_error(host, port, address) from None
        self._runner = runner
        bound = runner.addresses[0][1]
        self.address = f"{host}:{bound}"
        return self.address

    async def stop(self, grace: float = 5.0) -> None:
        """Stop listening, end open streams, give other calls ``grace`` seconds, then close. Never raises."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        try:
            for site in list(runner.sites):
                await site.stop()
            for task in self._streams:
                task.cancel()
            if self._inflight:
                await asyncio.wait(list(self._inflight), timeout=grace)
            await runner.cleanup()
        except Exception:
            log.exception("the API gateway did not stop cleanly")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._inflight.add(task)
        try:
            return await self._serve(request)
        except MicroError as error:
            return self._error(request, error)
        except web.HTTPException as exc:  # aiohttp refusing a request, e.g. a broken WebSocket handshake
            return self._error(request, error_for_code(exc.status, exc.text or exc.reason, id=ERROR_ID))
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:
            log.exception("unexpected error serving %s %s", request.method, request.path)
            return self._error(request, unexpected(exc))
        finally:
            self._inflight.discard(task)

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        path = _checked_path(request)
        method = request.method
        if method == "OPTIONS":
            return self._answer(request, web.Response())
        if path == "/" and method in _BODYLESS:
            return self._answer(request, web.Response(body=self._version, content_type="application/json"))
        if path == "/favicon.ico":
            return self._answer(request, web.Response(status=204))
        namespace = validate_namespace(request.headers.get("Micro-Namespace") or DEFAULT_NAMESPACE)
        if method in _BODYLESS and path.endswith(OPENAPI_SUFFIX):
            return self._answer(request, await self._openapi(request, namespace, path))
        route = await self.router.route(namespace, method, path)
        plan = route.plan
        if request.headers.get("Upgrade", "").lower() == "websocket":
            call = await self._call(request, plan, namespace, streaming=True)
            return await self._stream(websocket(request, plan, call, self.max_body))
        if plan.client_streaming:
            raise BadRequest(
                f"{plan.endpoint} of {plan.service!r} streams requests: call it over a WebSocket",
                id=ERROR_ID,
            )
        content_type = _content_type(request)
        proto = content_type in PROTO_TYPES
        call = await self._call(request, plan, namespace, streaming=plan.server_streaming)
        wire = await self._request(request, route, content_type)
        if plan.server_streaming:
            return await self._stream(server_sent_events(request, plan, wire, call, self._cors(request)))
        data = await plan.upstream.unary(wire, call)
        if proto:
            response = web.Response(body=data, content_type=content_type)
        else:
            response = web.Response(
                body=wire_to_json(data, plan.response_type), content_type="application/json"
            )
        return self._answer(request, response)

    async def _openapi(self, request: web.Request, namespace: str, path: str) -> web.Response:
        """``/openapi.json``: every service of the namespace; ``/<service>/openapi.json``: one."""
        wanted = path.removesuffix(OPENAPI_SUFFIX).strip("/")
        if self.registry is None:
            raise NotFound("no registry to describe", id=ERROR_ID)
        if wanted:
            services = await self._described(namespace, wanted)
        else:
            listed = await self.registry.list_services(namespace)
            services = [
                s for name in sorted({s.name for s in listed}) for s in await self._described(namespace, name)
            ]
        server = f"{request.scheme}://{request.host}"
        document = openapi_document(services, server_url=server)
        return web.Response(body=json.dumps(document).encode(), content_type="application/json")

    async def _described(self, namespace: str, name: str) -> list[registry_pb2.Service]:
        assert self.registry is not None
        try:
            return (await self.registry.get_service(namespace, name))[:1]
        except NotFound:
            if namespace == DEFAULT_NAMESPACE:
                raise NotFound(f"service {name!r} not found", id=ERROR_ID) from None
            try:
                return (await self.registry.get_service(DEFAULT_NAMESPACE, name))[:1]
            except NotFound:
                raise NotFound(
                    f"service {name!r} not found in namespace {namespace!r}", id=ERROR_ID
                ) from None

    async def _stream(self, serving: Awaitable[web.StreamResponse]) -> web.StreamResponse:
        """Serve a stream, which ``stop`` ends at once rather than waiting for it."""
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        try:
            return await serving
        finally:
            self._streams.discard(task)

    async def _request(self, request: web.Request, route: Route, content_type: str) -> bytes:
        """The request message, as wire-format bytes, from the body, query string and path captures."""
        plan = route.plan
        bodyless = request.method in _BODYLESS or not route.body
        if content_type in PROTO_TYPES:
            return b"" if bodyless else await read_body(request, self.max_body)
        descriptor = cast(Descriptor, plan.request_type.DESCRIPTOR)  # typed twice by the stubs
        form: dict[str, Any] | None = None
        body = b""
        if not bodyless:
            if content_type == MULTIPART:
                form = await read_multipart(request, self.max_body, descriptor)
            else:
                body = await read_body(request, self.max_body)
                if content_type == URLENCODED:
                    form = urlencoded_fields(body, descriptor)
        if form is None and not route.captures and route.body == "*" and not request.query_string:
            return json_to_wire(body, plan.request_type)  # the common case: the body is the request
        fields = fields_json(request.query.items(), descriptor)
        if form is not None:
            merge(fields, form)
        elif route.body == "*":
            merge(fields, body_object(body))
        elif body.strip() and not bodyless:
            fields[route.body] = _json_value(body)
        captured: dict[str, Any] = {}
        for field, value in route.captures:
            set_field(captured, field, value, descriptor)
        return _dict_to_wire(merge(fields, captured), plan)

    async def _call(
        self, request: web.Request, plan: Plan, namespace: str, *, streaming: bool = False
    ) -> CallInfo:
        """The call's metadata and identity; refused here if the rules keep the caller from a service."""
        metadata = (
            *self._metadata(request, plan.service, namespace),
            (REMOTE_ADDRESS_KEY, request.remote or ""),
        )
        headers = dict(metadata)
        timeout = None if streaming else self.timeout
        if isinstance(plan.upstream, Local):  # a building block: its admit hook decides, with the account
            account, auth_error = await self.gate.authenticate(headers)
            return CallInfo(namespace, metadata, timeout, account, auth_error)
        account = await self.gate.check_call(headers, plan.service, plan.endpoint)
        return CallInfo(namespace, metadata, timeout, account)

    def _metadata(self, request: web.Request, service: str, namespace: str) -> Metadata:
        """The request's headers as call metadata, without hop-by-hop ones, plus micro's own keys."""
        metadata = [(SERVICE_KEY, service), (NAMESPACE_KEY, namespace)]
        keys = self._metadata_keys
        for name, value in request.headers.items():
            key = keys.get(name, "")
            if key == "":
                key = _metadata_key(name)
                if len(keys) < 1024:  # callers inventing header names cannot grow it further
                    keys[name] = key
            if key is not None and value.isascii() and value.isprintable():
                metadata.append((key, value))
        return tuple(metadata)

    def _cors(self, request: web.BaseRequest) -> dict[str, str]:
        if not self.cors:
            return {}
        return {"Access-Control-Allow-Origin": request.headers.get("Origin") or "*", **CORS_HEADERS}

    def _answer(self, request: web.BaseRequest, response: web.Response) -> web.Response:
        if self.cors:
            response.headers.update(self._cors(request))
        return response

    def _error(self, request: web.BaseRequest, error: MicroError) -> web.Response:
        error.id = error.id or ERROR_ID
        if error.code in (401, 403):
            log_refusal(f"{request.method} {request.path}", request.remote or "", error)
        status = error.code if 400 <= error.code <= 599 else 500
        response = web.Response(status=status, body=error.to_json().encode(), content_type="application/json")
        return self._answer(request, response)


def _checked_path(request: web.BaseRequest) -> str:
    """The request's path, refusing ``..`` segments and percent-encoded slashes."""
    raw = request.raw_path.partition("?")[0]
    if "%" in raw:
        lowered = raw.lower()
        if "%2f" in lowered or "%5c" in lowered:
            raise BadRequest("the path may not contain percent-encoded slashes", id=ERROR_ID)
        raw = unquote(raw)
    if ".." in raw and ".." in raw.replace("\\", "/").split("/"):
        raise BadRequest("the path may not contain '..' segments", id=ERROR_ID)
    return request.path


def _content_type(request: web.BaseRequest) -> str:
    """The media type of the body, ``""`` if none is given (aiohttp would say octet-stream)."""
    return request.headers.get("Content-Type", "").partition(";")[0].strip().lower()


def _metadata_key(name: str) -> str | None:
    key = name.lower()
    if key in _NOT_FORWARDED or key.startswith(("grpc-", "sec-", ":")) or key.endswith("-bin"):
        return None
    return key if _METADATA_KEY.fullmatch(key) else None


def _json_value(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the request body is not JSON: {exc}", id=ERROR_ID) from exc


def _dict_to_wire(fields: dict[str, Any], plan: Plan) -> bytes:
    message = plan.request_type()
    try:
        json_format.ParseDict(fields, message)
    except json_format.ParseError as exc:
        raise BadRequest(f"invalid request for {message.DESCRIPTOR.full_name}: {exc}", id=ERROR_ID) from exc
    return message.SerializeToString()


def _port_error(host: str, port: int, address: str) -> SetupError:
    return SetupError(
        f"cannot listen on {address}: port {port} is in use or the address is not this "
        f"machine's; choose another with --api-address {host}:PORT or MICRO_API_ADDRESS",
        id="micro.server",
    )
