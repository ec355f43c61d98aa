"""The framework's Service: real gRPC server, real daemon registry, every call shape."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import pytest

from micro import Context, Service, errors
from micro._binding import bind
from micro.client import Client
from micro.errors import BadRequest, NotFound, SetupError
from micro.registry import RegistryClient
from micro.transport import GrpcTransport
from micro_daemon.app import Daemon


def greeter(pb: ModuleType) -> Any:
    class Greeter:
        async def Call(self, request: Any, context: Context) -> Any:
            if not request.name:
                raise errors.BadRequest("name is required")
            remaining = context.time_remaining()
            return pb.Response(msg=f"Hello {request.name} ({context.namespace}, {remaining is not None})")

        async def Stream(self, request: Any, context: Context) -> AsyncIterator[Any]:
            for i in range(request.count):
                yield pb.StreamResponse(count=i)

        async def Collect(self, requests: AsyncIterator[Any], context: Context) -> Any:
            return pb.Response(msg=",".join([r.name async for r in requests]))

        async def PingPong(self, requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
            async for ping in requests:
                yield pb.Pong(stroke=ping.stroke)

    return Greeter()


@pytest.fixture
async def service(daemon: Daemon, greeter_pb2: ModuleType) -> AsyncIterator[Service]:
    service = Service("greeter")
    service.handle(greeter(greeter_pb2))
    await service.start()
    yield service
    await service.stop(grace=1)


@pytest.fixture
async def direct(service: Service) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(service._node.address) as channel:
        yield channel


async def test_registers_with_endpoints_schema_and_node(service: Service, daemon: Daemon) -> None:
    client = Client(GrpcTransport(daemon.address))
    try:
        [entry] = await RegistryClient(client).get_service("greeter")
    finally:
        await client.close()
    names = {e.name for e in entry.endpoints}
    assert {"Greeter.Call", "Greeter.Stream", "Greeter.Collect", "Greeter.PingPong", "Debug.Health"} <= names
    stream = next(e for e in entry.endpoints if e.name == "Greeter.PingPong")
    assert stream.metadata["stream"] == "bidi"
    assert entry.version == "latest"
    assert entry.nodes[0].address == service._node.address
    assert entry.schema


async def test_unary_and_errors(direct: grpc.aio.Channel, greeter_pb2: ModuleType) -> None:
    pb = greeter_pb2
    call = direct.unary_unary(
        "/greeter.Greeter/Call",
        request_serializer=pb.Request.SerializeToString,
        response_deserializer=pb.Response.FromString,
    )
    response = await call(pb.Request(name="Alice"), timeout=5)
    assert response.msg == "Hello Alice (micro, True)"
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(pb.Request())
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_errors_reach_a_micro_client_as_their_class(service: Service, greeter_pb2: ModuleType) -> None:
    client = Client(GrpcTransport(service._node.address))
    try:
        with pytest.raises(BadRequest, match="name is required") as raised:
            await client.call("greeter", "/greeter.Greeter/Call", greeter_pb2.Request(), greeter_pb2.Response)
        assert raised.value.id == "greeter"
    finally:
        await client.close()


async def test_server_streaming(direct: grpc.aio.Channel, greeter_pb2: ModuleType) -> None:
    pb = greeter_pb2
    call = direct.unary_stream(
        "/greeter.Greeter/Stream",
        request_serializer=pb.StreamRequest.SerializeToString,
        response_deserializer=pb.StreamResponse.FromString,
    )
    assert [r.count async for r in call(pb.StreamRequest(count=3))] == [0, 1, 2]


async def test_client_streaming(direct: grpc.aio.Channel, greeter_pb2: ModuleType) -> None:
    pb = greeter_pb2
    call = direct.stream_unary(
        "/greeter.Greeter/Collect",
        request_serializer=pb.Request.SerializeToString,
        response_deserializer=pb.Response.FromString,
    )
    response = await call(iter([pb.Request(name="a"), pb.Request(name="b")]))
    assert response.msg == "a,b"


async def test_bidirectional(direct: grpc.aio.Channel, greeter_pb2: ModuleType) -> None:
    pb = greeter_pb2
    call = direct.stream_stream(
        "/greeter.Greeter/PingPong",
        request_serializer=pb.Ping.SerializeToString,
        response_deserializer=pb.Pong.FromString,
    )
    pongs = [p.stroke async for p in call(iter([pb.Ping(stroke=i) for i in range(4)]))]
    assert pongs == [0, 1, 2, 3]


async def test_json_callers(service: Service) -> None:
    client = Client(GrpcTransport(service._node.address))
    try:
        answer = await client.call_json("greeter", "Greeter.Call", b'{"name": "Bob"}')
        assert b"Hello Bob" in answer
        health = await client.call_json("greeter", "Debug.Health", b"{}")
        assert b'"ok"' in health
    finally:
        await client.close()


async def test_stop_deregisters(daemon: Daemon, greeter_pb2: ModuleType) -> None:
    service = Service("greeter")
    service.handle(greeter(greeter_pb2))
    await service.start()
    await service.stop(grace=1)
    client = Client(GrpcTransport(daemon.address))
    try:
        with pytest.raises(NotFound):
            await RegistryClient(client).get_service("greeter")
    finally:
        await client.close()


async def test_sync_handlers_run_in_a_thread(daemon: Daemon, greeter_pb2: ModuleType) -> None:
    pb = greeter_pb2

    class Greeter:
        def Call(self, request: Any, context: Context) -> Any:
            time.sleep(0.01)  # blocking is fine here: this runs in a worker thread
            return pb.Response(msg="sync")

        async def Stream(self, request: Any, context: Context) -> AsyncIterator[Any]:
            yield pb.StreamResponse()

        async def Collect(self, requests: Any, context: Context) -> Any:
            return pb.Response()

        async def PingPong(self, requests: Any, context: Context) -> AsyncIterator[Any]:
            yield pb.Pong()

    service = Service("sync")
    service.handle(Greeter())
    await service.start()
    client = Client(GrpcTransport(service._node.address))
    try:
        results = await asyncio.gather(
            *(client.call("sync", "/greeter.Greeter/Call", pb.Request(), pb.Response) for _ in range(5))
        )
        assert {r.msg for r in results} == {"sync"}
    finally:
        await client.close()
        await service.stop(grace=1)


def test_a_handler_without_a_proto_is_refused(micro_home: Path) -> None:
    class Nothing:
        pass

    with pytest.raises(SetupError, match="no proto service named 'Nothing'"):
        Service("x").handle(Nothing())


def test_a_streaming_method_that_returns_is_refused(greeter_pb2: ModuleType, micro_home: Path) -> None:
    class Greeter:
        async def Call(self, request: Any, context: Context) -> Any: ...
        async def Stream(self, request: Any, context: Context) -> Any: ...
        async def Collect(self, requests: Any, context: Context) -> Any: ...
        async def PingPong(self, requests: Any, context: Context) -> Any: ...

    with pytest.raises(TypeError, match="must be an async generator"):
        Service("x").handle(Greeter())


def greeter_with_lanes(lanes: dict[str, Any]) -> object:
    class Greeter:
        async def Call(self, request: Any, context: Context) -> Any: ...
        async def Stream(self, request: Any, context: Context) -> AsyncIterator[Any]:
            yield None

        async def Collect(self, requests: Any, context: Context) -> Any: ...
        async def PingPong(self, requests: Any, context: Context) -> AsyncIterator[Any]:
            yield None

    greeter = Greeter()
    greeter.lanes = lanes  # type: ignore[attr-defined]
    return greeter


def test_a_lane_is_bound_to_its_bidirectional_rpc(greeter_pb2: ModuleType) -> None:
    async def ping_pong(lane: Any, context: Context) -> None: ...

    methods = bind(
        greeter_with_lanes({"PingPong": ping_pong}), greeter_pb2.DESCRIPTOR.services_by_name["Greeter"]
    )
    assert {m.name: m.lane for m in methods} == {
        "Call": None,
        "Stream": None,
        "Collect": None,
        "PingPong": ping_pong,
    }


@pytest.mark.parametrize(
    ("rpc", "sync", "error"),
    [
        ("Call", False, "Call is not bidirectional"),
        ("Collect", False, "Collect is not bidirectional"),
        ("PingPong", True, "must be a coroutine function"),
        ("Pong", False, "lanes names no RPC of .*Greeter: \\['Pong'\\]"),
    ],
)
def test_a_lane_that_cannot_serve_its_rpc_is_refused(
    greeter_pb2: ModuleType, rpc: str, sync: bool, error: str
) -> None:
    async def lane(lane: Any, context: Context) -> None: ...

    def sync_lane(lane: Any, context: Context) -> None: ...

    handler = greeter_with_lanes({rpc: sync_lane if sync else lane})
    with pytest.raises(TypeError, match=error):
        bind(handler, greeter_pb2.DESCRIPTOR.services_by_name["Greeter"])


async def test_no_daemon_is_a_clear_setup_error(micro_home: Path, greeter_pb2: ModuleType) -> None:
    service = Service("greeter")
    service.handle(greeter(greeter_pb2))
    with pytest.raises(SetupError, match="no micro server is running"):
        await service.start()
    await service.stop(grace=0)


def test_the_runtime_identity_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MICRO_SERVICE_NAME", "renamed")
    monkeypatch.setenv("MICRO_NAMESPACE", "team-a")
    service = Service("original")
    assert (service.name, service.namespace) == ("renamed", "team-a")


async def test_a_build_schema_keeps_its_comments_and_gains_debug(
    daemon: Daemon, greeter_pb2: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from grpc_tools import protoc

    from micro.schema import comments, pool_from_schema

    protos = Path(__file__).resolve().parent.parent / "protos"
    schema = tmp_path / "schema.binpb"
    args = ["protoc", f"-I{protos}", f"--descriptor_set_out={schema}", "--include_source_info"]
    assert protoc.main([*args, str(protos / "greeter.proto")]) == 0
    monkeypatch.setenv("MICRO_SCHEMA_FILE", str(schema))
    service = Service("greeter")
    service.handle(greeter(greeter_pb2))
    await service.start()
    client = Client(GrpcTransport(daemon.address))
    try:
        [entry] = await RegistryClient(client).get_service("greeter")
    finally:
        await client.close()
        await service.stop(grace=1)
    assert comments(entry.schema)["greeter.Greeter.Call"] == "Call answers once."
    assert pool_from_schema(entry.schema).FindMethodByName("micro.debug.v1.Debug.Health")


async def test_bidirectional_calls_through_the_client(service: Service, greeter_pb2: ModuleType) -> None:
    pb = greeter_pb2
    client = Client(GrpcTransport(service._node.address))

    async def pings() -> AsyncIterator[Any]:
        for stroke in range(3):
            yield pb.Ping(stroke=stroke)

    async def json_pings() -> AsyncIterator[bytes]:
        yield b'{"stroke": 7}'

    try:
        pongs = [
            p.stroke async for p in client.bidi("greeter", "/greeter.Greeter/PingPong", pings(), pb.Pong)
        ]
        assert pongs == [0, 1, 2]
        answers = [a async for a in client.bidi_json("greeter", "Greeter.PingPong", json_pings())]
        assert answers == [b'{"stroke":"7"}']
    finally:
        await client.close()
