"""The daemon's proxy over real sockets: upstream services registered in its registry, called through it."""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from types import ModuleType
from typing import Any

import grpc
import grpc.aio
import pytest

from micro._binding import bind
from micro._dispatch import Dispatcher
from micro.client import Client
from micro.context import Context
from micro.errors import BadRequest, NotFound, ServiceUnavailable
from micro.proto import registry_pb2
from micro.registry import RegistryClient
from micro.schema import endpoints, file_descriptor_set
from micro.transport import GrpcTransport
from micro_daemon.app import Daemon
from micro_daemon.proxy import directory
from micro_daemon.proxy.directory import Directory, Target
from micro_daemon.registry.memory import MemoryRegistry

PROTO = """
syntax = "proto3";
package proxytest.v1;

service Echo {
  rpc Call(Request) returns (Response);
  rpc Count(Request) returns (stream Response);
  rpc Sum(stream Request) returns (Response);
  rpc Chat(stream Request) returns (stream Response);
}

message Request { string text = 1; int32 n = 2; }
message Response {
  string text = 1;
  string node = 2;
  int32 n = 3;
  double remaining = 4;
  string trace = 5;
  string codec = 6;
}
"""
CALL = "/proxytest.v1.Echo/Call"
COUNT = "/proxytest.v1.Echo/Count"
SUM = "/proxytest.v1.Echo/Sum"
CHAT = "/proxytest.v1.Echo/Chat"
JSON = (("micro-service", "echo"), ("micro-codec", "json"))
PROTO_MD = (("micro-service", "echo"),)


@pytest.fixture(scope="session")
def pb(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """The test proto compiled once and loaded as a module (without touching ``sys.path``)."""
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("proxytest")
    (out / "proxytest_echo.proto").write_text(PROTO)
    assert protoc.main(["protoc", f"-I{out}", f"--python_out={out}", str(out / "proxytest_echo.proto")]) == 0
    spec = importlib.util.spec_from_file_location("proxytest_echo_pb2", out / "proxytest_echo_pb2.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Echo:
    """The upstream handler: every response says which node answered."""

    def __init__(self, pb: ModuleType, node: str) -> None:
        self.pb = pb
        self.node = node

    async def Call(self, request: Any, context: Context) -> Any:
        if request.text == "fail":
            raise BadRequest("text may not be 'fail'", id="echo.validate")
        remaining = context.time_remaining()
        return self.pb.Response(
            text=request.text,
            node=self.node,
            remaining=-1.0 if remaining is None else remaining,
            trace=context.metadata.get("x-trace", ""),
            codec=context.metadata.get("micro-codec", ""),
        )

    async def Count(self, request: Any, context: Context) -> AsyncIterator[Any]:
        for i in range(request.n):
            if request.text == "fail" and i == 2:
                raise BadRequest("failed after two", id="echo.count")
            yield self.pb.Response(text=request.text, node=self.node, n=i)

    async def Sum(self, requests: AsyncIterator[Any], context: Context) -> Any:
        texts, total = [], 0
        async for request in requests:
            texts.append(request.text)
            total += request.n
        return self.pb.Response(text=",".join(texts), n=total, node=self.node)

    async def Chat(self, requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        async for request in requests:
            yield self.pb.Response(text=request.text.upper(), n=request.n, node=self.node)


class Upstream:
    """A user service's node: a grpc.aio server serving ``Echo`` on an ephemeral port."""

    def __init__(self, pb: ModuleType, node: str) -> None:
        self.node = node
        self.server = grpc.aio.server()
        dispatcher = Dispatcher()
        dispatcher.add("echo", bind(Echo(pb, node), pb.DESCRIPTOR.services_by_name["Echo"]))
        self.server.add_generic_rpc_handlers((dispatcher,))
        self.address = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"

    def entry(self) -> registry_pb2.Node:
        return registry_pb2.Node(id=self.node, address=self.address)


@pytest.fixture
async def client(daemon: Daemon) -> AsyncIterator[Client]:
    client = Client(GrpcTransport(daemon.address))
    yield client
    await client.close()


@pytest.fixture
async def channel(daemon: Daemon) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(daemon.address) as channel:
        yield channel


Start = Callable[[str], Awaitable[Upstream]]


@pytest.fixture
async def start(pb: ModuleType) -> AsyncIterator[Start]:
    started: list[Upstream] = []

    async def start(node: str) -> Upstream:
        upstream = Upstream(pb, node)
        await upstream.server.start()
        started.append(upstream)
        return upstream

    yield start
    for upstream in started:
        await upstream.server.stop(None)


def echo_entry(
    pb: ModuleType, *nodes: Upstream, version: str = "1", schema: bool = True
) -> registry_pb2.Service:
    service = pb.DESCRIPTOR.services_by_name["Echo"]
    return registry_pb2.Service(
        name="echo",
        version=version,
        nodes=[node.entry() for node in nodes],
        endpoints=endpoints(service),
        schema=file_descriptor_set(pb.DESCRIPTOR) if schema else b"",
    )


async def register(client: Client, entry: registry_pb2.Service, domain: str = "") -> None:
    await RegistryClient(client, domain=domain).register(entry, ttl=60)


@pytest.fixture
async def echo(client: Client, start: Start, pb: ModuleType) -> Upstream:
    upstream = await start("n1")
    await register(client, echo_entry(pb, upstream))
    return upstream


def requests(pb: ModuleType, *pairs: tuple[str, int]) -> list[bytes]:
    return [pb.Request(text=text, n=n).SerializeToString() for text, n in pairs]


async def aiter_of(items: list[bytes]) -> AsyncIterator[bytes]:
    for item in items:
        yield item


# --- the four shapes, proto callers ---


async def test_unary_proto(client: Client, echo: Upstream, pb: ModuleType) -> None:
    response = await client.call("echo", CALL, pb.Request(text="hi"), pb.Response)
    assert (response.text, response.node) == ("hi", "n1")


async def test_unary_raw_bytes_pass_through(client: Client, echo: Upstream, pb: ModuleType) -> None:
    data = await client.transport.unary(
        CALL, pb.Request(text="raw").SerializeToString(), metadata=PROTO_MD, timeout=5
    )
    assert pb.Response.FromString(data).text == "raw"


async def test_server_stream_proto(client: Client, echo: Upstream, pb: ModuleType) -> None:
    responses = [r async for r in client.stream("echo", COUNT, pb.Request(text="c", n=4), pb.Response)]
    assert [r.n for r in responses] == [0, 1, 2, 3]


async def test_client_stream_proto(channel: grpc.aio.Channel, echo: Upstream, pb: ModuleType) -> None:
    call = channel.stream_unary(SUM)
    data = await call(aiter_of(requests(pb, ("a", 1), ("b", 2), ("c", 3))), metadata=PROTO_MD, timeout=5)
    response = pb.Response.FromString(data)
    assert (response.text, response.n) == ("a,b,c", 6)


async def test_bidi_proto(channel: grpc.aio.Channel, echo: Upstream, pb: ModuleType) -> None:
    call = channel.stream_stream(CHAT)(metadata=PROTO_MD, timeout=5)
    seen = []
    for text in ("x", "y"):
        await call.write(pb.Request(text=text).SerializeToString())
        seen.append(pb.Response.FromString(await call.read()).text)  # one at a time: truly interactive
    await call.done_writing()
    assert seen == ["X", "Y"]
    assert await call.read() is grpc.aio.EOF


# --- JSON callers ---


async def test_unary_json(client: Client, echo: Upstream) -> None:
    body = json.loads(await client.call_json("echo", "Echo.Call", b'{"text": "hi"}'))
    assert (body["text"], body["node"]) == ("hi", "n1")
    assert body["codec"] == ""  # upstream received proto, not the JSON marker


async def test_server_stream_json(client: Client, echo: Upstream) -> None:
    bodies = [json.loads(b) async for b in client.stream_json("echo", "Echo.Count", b'{"text":"j","n":3}')]
    assert [b["n"] for b in bodies] == [0, 1, 2]


async def test_client_stream_json(channel: grpc.aio.Channel, echo: Upstream) -> None:
    bodies = [b'{"text":"a","n":1}', b'{"text":"b","n":2}']
    data = await channel.stream_unary("/Echo/Sum")(aiter_of(bodies), metadata=JSON, timeout=5)
    assert json.loads(data)["n"] == 3


async def test_bidi_json(channel: grpc.aio.Channel, echo: Upstream) -> None:
    call = channel.stream_stream("/Echo/Chat")(aiter_of([b'{"text":"a"}', b'{"text":"b"}']), metadata=JSON)
    assert [json.loads(b)["text"] async for b in call] == ["A", "B"]


async def test_malformed_json_is_a_bad_request(client: Client, echo: Upstream) -> None:
    with pytest.raises(BadRequest, match="Request"):
        await client.call_json("echo", "Echo.Call", b'{"txt": 1}')


async def test_malformed_json_in_a_request_stream_is_a_bad_request(
    channel: grpc.aio.Channel, echo: Upstream
) -> None:
    call = channel.stream_unary("/Echo/Sum")(aiter_of([b'{"text":"a"}', b"{nope"]), metadata=JSON, timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_unknown_json_endpoint_is_not_found(client: Client, echo: Upstream) -> None:
    with pytest.raises(NotFound, match=r"Echo\.Nope"):
        await client.call_json("echo", "Echo.Nope", b"{}")


# --- routing ---


async def test_round_robin_across_nodes_of_all_versions(client: Client, start: Start, pb: ModuleType) -> None:
    one, two = await start("n1"), await start("n2")
    await register(client, echo_entry(pb, one, version="1"))
    await register(client, echo_entry(pb, two, version="2"))
    nodes = [(await client.call("echo", CALL, pb.Request(), pb.Response)).node for _ in range(10)]
    assert nodes.count("n1") == nodes.count("n2") == 5
    assert all(a != b for a, b in itertools.pairwise(nodes))


async def test_a_dead_node_is_skipped_without_a_failed_call(
    client: Client, start: Start, pb: ModuleType
) -> None:
    live, dead = await start("live"), await start("dead")
    await register(client, echo_entry(pb, live, dead))
    await dead.server.stop(None)  # still registered
    nodes = [(await client.call("echo", CALL, pb.Request(), pb.Response)).node for _ in range(20)]
    assert set(nodes) == {"live"}
    responses = [r async for r in client.stream("echo", COUNT, pb.Request(n=2), pb.Response)]
    assert [r.node for r in responses] == ["live", "live"]


async def test_a_dead_node_is_skipped_by_streaming_requests(
    channel: grpc.aio.Channel, client: Client, start: Start, pb: ModuleType
) -> None:
    live, dead = await start("live"), await start("dead")
    await register(client, echo_entry(pb, dead, live))
    await dead.server.stop(None)
    for _ in range(4):
        data = await channel.stream_unary(SUM)(aiter_of(requests(pb, ("a", 1))), metadata=PROTO_MD, timeout=5)
        assert pb.Response.FromString(data).node == "live"


async def test_no_reachable_node_is_service_unavailable(
    client: Client, echo: Upstream, pb: ModuleType
) -> None:
    await echo.server.stop(None)
    with pytest.raises(ServiceUnavailable, match="'echo' is unavailable") as raised:
        await client.call("echo", CALL, pb.Request(), pb.Response)
    assert raised.value.id == "micro.proxy"


async def test_unknown_service_is_not_found(client: Client, pb: ModuleType) -> None:
    with pytest.raises(NotFound) as raised:
        await client.call("nope", CALL, pb.Request(), pb.Response)
    assert raised.value.detail == "service 'nope' not found in namespace 'micro'"
    assert raised.value.id == "micro.proxy"
    with pytest.raises(NotFound):
        await client.call_json("nope", "Echo.Call", b"{}")


async def test_a_call_naming_no_service_is_declined(channel: grpc.aio.Channel, echo: Upstream) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await channel.unary_unary(CALL)(b"", timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_an_invalid_namespace_is_a_bad_request(channel: grpc.aio.Channel, echo: Upstream) -> None:
    metadata = (*PROTO_MD, ("micro-namespace", "Not_Valid"))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await channel.unary_unary(CALL)(b"", metadata=metadata, timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_service_without_schema_is_called_as_unary(
    client: Client, start: Start, pb: ModuleType
) -> None:
    upstream = await start("n1")
    await register(client, echo_entry(pb, upstream, schema=False))
    assert (await client.call("echo", CALL, pb.Request(text="s"), pb.Response)).text == "s"


async def test_registry_changes_are_followed(
    daemon: Daemon, client: Client, start: Start, pb: ModuleType
) -> None:
    one, two = await start("n1"), await start("n2")
    await register(client, echo_entry(pb, one))
    assert (await client.call("echo", CALL, pb.Request(), pb.Response)).node == "n1"
    await register(client, echo_entry(pb, two, version="2"))
    await RegistryClient(client).deregister(echo_entry(pb, one))
    assert {(await client.call("echo", CALL, pb.Request(), pb.Response)).node for _ in range(4)} == {"n2"}
    await RegistryClient(client).deregister(echo_entry(pb, two, version="2"))
    with pytest.raises(NotFound):
        await client.call("echo", CALL, pb.Request(), pb.Response)
    assert daemon._proxy is not None and len(daemon._proxy.pool) == 0  # both channels closed


async def test_a_call_in_flight_finishes_after_its_node_leaves(
    channel: grpc.aio.Channel, client: Client, echo: Upstream, pb: ModuleType
) -> None:
    call = channel.stream_stream(CHAT)(metadata=PROTO_MD, timeout=5)
    await call.write(pb.Request(text="a").SerializeToString())
    assert pb.Response.FromString(await call.read()).text == "A"
    await RegistryClient(client).deregister(echo_entry(pb, echo))
    with pytest.raises(NotFound):  # new calls no longer reach it ...
        await client.call("echo", CALL, pb.Request(), pb.Response)
    await call.write(pb.Request(text="b").SerializeToString())  # ... but the open one drains
    assert pb.Response.FromString(await call.read()).text == "B"
    await call.done_writing()
    assert await call.code() == grpc.StatusCode.OK


async def test_a_hot_swap_fails_no_call(client: Client, start: Start, pb: ModuleType) -> None:
    old, ghost = await start("old"), await start("ghost")
    await ghost.server.stop(None)  # a node that died without deregistering
    await register(client, echo_entry(pb, old, ghost))
    stop = asyncio.Event()

    async def load() -> list[str]:
        nodes = []
        while not stop.is_set():
            nodes.append((await client.call("echo", CALL, pb.Request(), pb.Response)).node)
        return nodes

    callers = [asyncio.create_task(load()) for _ in range(8)]
    await asyncio.sleep(0.05)
    new = await start("new")
    await register(client, echo_entry(pb, new, version="2"))
    await asyncio.sleep(0.05)
    await RegistryClient(client).deregister(echo_entry(pb, old))  # as Service.stop does: deregister,
    await asyncio.sleep(0.05)  # let the word spread,
    await old.server.stop(1)  # then drain and stop
    await asyncio.sleep(0.05)
    stop.set()
    runs = await asyncio.gather(*callers)
    assert {"old", "new"} <= {node for nodes in runs for node in nodes}
    assert "ghost" not in {node for nodes in runs for node in nodes}
    assert all(nodes[-1] == "new" for nodes in runs)


# --- errors, namespaces, deadlines, metadata ---


async def test_an_upstream_error_arrives_unchanged(
    client: Client, channel: grpc.aio.Channel, echo: Upstream, pb: ModuleType
) -> None:
    with pytest.raises(BadRequest) as raised:
        await client.call("echo", CALL, pb.Request(text="fail"), pb.Response)
    assert (raised.value.detail, raised.value.id) == ("text may not be 'fail'", "echo.validate")
    with pytest.raises(BadRequest, match="may not be 'fail'"):
        await client.call_json("echo", "Echo.Call", b'{"text":"fail"}')

    request = pb.Request(text="fail").SerializeToString()
    async with grpc.aio.insecure_channel(echo.address) as direct:
        with pytest.raises(grpc.aio.AioRpcError) as upstream:
            await direct.unary_unary(CALL)(request, metadata=PROTO_MD, timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as proxied:
        await channel.unary_unary(CALL)(request, metadata=PROTO_MD, timeout=5)
    assert proxied.value.code() == upstream.value.code()
    assert proxied.value.details() == upstream.value.details()
    assert tuple(proxied.value.trailing_metadata()) == tuple(upstream.value.trailing_metadata())


async def test_an_error_after_some_responses_ends_the_stream(
    client: Client, echo: Upstream, pb: ModuleType
) -> None:
    seen = []
    with pytest.raises(BadRequest, match="failed after two"):
        async for response in client.stream("echo", COUNT, pb.Request(text="fail", n=5), pb.Response):
            seen.append(response.n)
    assert seen == [0, 1]


async def test_namespaces_are_isolated(daemon: Daemon, client: Client, start: Start, pb: ModuleType) -> None:
    upstream = await start("a1")
    await register(client, echo_entry(pb, upstream), domain="a")
    in_a = Client(GrpcTransport(daemon.address), namespace="a")
    in_b = Client(GrpcTransport(daemon.address), namespace="b")
    try:
        assert (await in_a.call("echo", CALL, pb.Request(), pb.Response)).node == "a1"
        with pytest.raises(NotFound, match="namespace 'b'"):
            await in_b.call("echo", CALL, pb.Request(), pb.Response)
        with pytest.raises(NotFound, match="namespace 'micro'"):
            await client.call("echo", CALL, pb.Request(), pb.Response)
    finally:
        await in_a.close()
        await in_b.close()


async def test_the_micro_domain_is_reachable_from_every_namespace(
    daemon: Daemon, echo: Upstream, pb: ModuleType
) -> None:
    other = Client(GrpcTransport(daemon.address), namespace="other")
    try:
        assert (await other.call("echo", CALL, pb.Request(), pb.Response)).node == "n1"
    finally:
        await other.close()


@pytest.mark.parametrize("shape", ["unary", "server", "client", "bidi", "json"])
async def test_the_first_call_into_a_namespace_works_in_every_shape(
    daemon: Daemon, client: Client, start: Start, pb: ModuleType, shape: str
) -> None:
    upstream = await start("a1")
    await register(client, echo_entry(pb, upstream), domain="a")
    metadata = (*PROTO_MD, ("micro-namespace", "a"))
    async with grpc.aio.insecure_channel(daemon.address) as channel:
        if shape == "unary":
            data = await channel.unary_unary(CALL)(requests(pb, ("u", 0))[0], metadata=metadata, timeout=5)
            assert pb.Response.FromString(data).node == "a1"
        elif shape == "server":
            call = channel.unary_stream(COUNT)(requests(pb, ("s", 3))[0], metadata=metadata, timeout=5)
            assert [pb.Response.FromString(d).n async for d in call] == [0, 1, 2]
        elif shape == "client":
            data = await channel.stream_unary(SUM)(
                aiter_of(requests(pb, ("a", 1), ("b", 1))), metadata=metadata, timeout=5
            )
            assert pb.Response.FromString(data).n == 2
        elif shape == "bidi":
            call = channel.stream_stream(CHAT)(aiter_of(requests(pb, ("a", 0), ("b", 0))), metadata=metadata)
            assert [pb.Response.FromString(d).text async for d in call] == ["A", "B"]
        else:
            data = await channel.unary_unary("/Echo/Call")(
                b'{"text":"j"}', metadata=(*JSON, ("micro-namespace", "a")), timeout=5
            )
            assert json.loads(data)["node"] == "a1"


async def test_the_deadline_reaches_the_upstream(
    daemon: Daemon, channel: grpc.aio.Channel, echo: Upstream, pb: ModuleType
) -> None:
    timed = Client(GrpcTransport(daemon.address), timeout=5)
    try:
        remaining = (await timed.call("echo", CALL, pb.Request(), pb.Response)).remaining
    finally:
        await timed.close()
    assert 0 < remaining <= 5.1  # grpc rounds deadlines up a little
    data = await channel.unary_unary(CALL)(b"", metadata=PROTO_MD)
    assert pb.Response.FromString(data).remaining == -1.0  # no deadline, none invented


async def test_caller_metadata_is_forwarded(
    channel: grpc.aio.Channel, echo: Upstream, pb: ModuleType
) -> None:
    data = await channel.unary_unary(CALL)(b"", metadata=(*PROTO_MD, ("x-trace", "t-1")), timeout=5)
    assert pb.Response.FromString(data).trace == "t-1"


async def test_200_concurrent_calls_all_succeed(client: Client, start: Start, pb: ModuleType) -> None:
    one, two = await start("n1"), await start("n2")
    await register(client, echo_entry(pb, one, two))
    responses = await asyncio.gather(
        *(client.call("echo", CALL, pb.Request(text=str(i)), pb.Response) for i in range(200))
    )
    assert [r.text for r in responses] == [str(i) for i in range(200)]
    assert {r.node for r in responses} == {"n1", "n2"}


# --- the registry view on its own ---


def entry(name: str, address: str, version: str = "1") -> registry_pb2.Service:
    return registry_pb2.Service(
        name=name, version=version, nodes=[registry_pb2.Node(id=address, address=address)]
    )


async def eventually(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_watch_that_falls_behind_resyncs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(directory, "RESYNC_DELAY", 0.0)
    backend = MemoryRegistry(watch_buffer=1)
    gone: list[str] = []
    view = Directory(backend, on_gone=gone.append)
    try:
        await view.load("d")
        for i in range(3):  # no await suspends in between: the watcher overflows
            await backend.register("d", entry(f"s{i}", f"10.0.0.{i}:1"), ttl=0)
        await eventually(lambda: all(isinstance(view.find("d", f"s{i}"), Target) for i in range(3)))
        await backend.deregister("d", entry("s1", "10.0.0.1:1"))
        await eventually(lambda: view.find("d", "s1") is None)
        assert gone == ["10.0.0.1:1"]
    finally:
        await view.close()
        await backend.close()


async def test_a_node_shared_by_two_services_stays_until_both_leave() -> None:
    backend = MemoryRegistry()
    gone: list[str] = []
    view = Directory(backend, on_gone=gone.append)
    try:
        await view.load("d")
        await backend.register("d", entry("a", "h:1"), ttl=0)
        await backend.register("d", entry("b", "h:1"), ttl=0)
        await eventually(lambda: isinstance(view.find("d", "b"), Target))
        await backend.deregister("d", entry("a", "h:1"))
        await eventually(lambda: view.find("d", "a") is None)
        assert gone == []
        await backend.deregister("d", entry("b", "h:1"))
        await eventually(lambda: gone == ["h:1"])
    finally:
        await view.close()
        await backend.close()


def test_pick_skips_dead_and_excluded_nodes() -> None:
    target = Target("s")
    target.put(
        registry_pb2.Service(name="s", version="1", nodes=[registry_pb2.Node(id=a, address=a) for a in "abc"])
    )
    assert [target.pick({}) for _ in range(4)] == ["a", "b", "c", "a"]
    dead = {"c": float("inf")}
    assert [target.pick(dead) for _ in range(3)] == ["b", "a", "b"]
    assert target.pick(dead, exclude="a") == "b"
    assert target.pick({"b": float("inf"), "c": float("inf")}, exclude="a") in {
        "b",
        "c",
    }  # better than nothing
    assert Target("empty").pick({}) is None
