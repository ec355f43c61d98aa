"""The least a proxy can do: forward every unary call's bytes to one address, in one of three ways.

A reference for ``proxy_overhead.py``: no registry, no routing, no metadata, no deadline, no
retry; one server and one channel in one process, as the daemon's proxy has.

* ``aio``: a ``grpc.aio`` server and channel on one event loop, the daemon's way. What the daemon
  spends per call beyond this is micro's own work; what this spends is grpc.aio's floor.
* ``sync``: a ``grpc.server`` with a thread pool, each handler calling a blocking stub.
* ``relay``: micro's relay (``micro_daemon.relay``) with one fixed destination: HTTP/2 frames
  copied per call, nothing of gRPC terminated.
* ``tcp``: not a gRPC proxy: an asyncio relay copying the bytes of each connection to one upstream
  connection, with no HTTP/2 parsing (so it cannot route by call). What a hop through one more
  Python process costs when nothing terminates the calls.

grpc's transport comes from the environment (``GRPC_EXPERIMENTS``), as for the daemon.
Run: python _grpc_forwarder.py [--kind aio|sync|tcp] UPSTREAM_ADDRESS; prints the port it listens
on, then serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

SYNC_WORKERS = 64  # more than the benchmark's 50 calls in flight: none waits for a thread


def generic(behaviour: Any, unary_unary: Any) -> Any:
    """A generic handler serving ``behaviour`` for every path it has a callable for."""
    import grpc

    class Forwarder(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc is untyped
        def __init__(self) -> None:
            self.handlers: dict[str, Any] = {}

        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            method: str = details.method
            handler = self.handlers.get(method)
            if handler is None:
                call = unary_unary(method)
                handler = self.handlers[method] = grpc.unary_unary_rpc_method_handler(behaviour(call))
            return handler

    return Forwarder()


async def serve_aio(upstream: str) -> None:
    import grpc.aio

    def behaviour(call: Any) -> Any:
        async def forward(request: bytes, context: Any) -> bytes:
            response: bytes = await call(request)
            return response

        return forward

    channel = grpc.aio.insecure_channel(upstream)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((generic(behaviour, channel.unary_unary),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await _until_sigterm()
    await server.stop(1)
    await channel.close()


def serve_sync(upstream: str) -> None:
    import grpc

    def behaviour(call: Any) -> Any:
        def forward(request: bytes, context: Any) -> bytes:
            response: bytes = call(request)
            return response

        return forward

    channel = grpc.insecure_channel(upstream)
    server = grpc.server(ThreadPoolExecutor(SYNC_WORKERS))
    server.add_generic_rpc_handlers((generic(behaviour, channel.unary_unary),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(1).wait()
    channel.close()


async def serve_tcp(upstream: str) -> None:
    host, _, port = upstream.rpartition(":")

    async def copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await _until_sigterm()
    server.close()


async def serve_relay(upstream: str) -> None:
    from micro_daemon.relay.relay import Destination, Relay

    destination = Destination(upstream, lambda dead, exclude: None if exclude == upstream else upstream)

    class Fixed:
        def route(self, headers: object, peer: str) -> Destination:
            return destination

    relay = Relay(Fixed())
    port = await relay.listen("127.0.0.1", 0)
    print(port, flush=True)
    await _until_sigterm()
    await relay.close()


async def _until_sigterm() -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=("aio", "sync", "tcp", "relay"), default="aio")
    parser.add_argument("upstream")
    args = parser.parse_args()
    if args.kind == "sync":
        serve_sync(args.upstream)
    else:
        serve = {"aio": serve_aio, "tcp": serve_tcp, "relay": serve_relay}[args.kind]
        asyncio.run(serve(args.upstream))


if __name__ == "__main__":
    main()
