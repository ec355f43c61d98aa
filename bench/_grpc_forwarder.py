"""The least a ``grpc.aio`` proxy can do: forward every unary call's bytes to one address.

A reference for ``proxy_overhead.py``: no registry, no routing, no metadata, no deadline, no
retry; one ``grpc.aio`` server and one channel in one process, as the daemon's proxy has. What the
daemon spends per call beyond this is micro's own work; what this spends is grpc.aio's floor.
Run: python _grpc_forwarder.py UPSTREAM_ADDRESS; prints the port it listens on, then serves
until SIGTERM.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

import grpc
import grpc.aio


class Forwarder(grpc.GenericRpcHandler):  # type: ignore[misc]  # grpc is untyped
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.calls: dict[str, Any] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method: str = details.method
        call = self.calls.get(method)
        if call is None:
            call = self.calls[method] = self.channel.unary_unary(method)

        async def forward(request: bytes, context: Any) -> bytes:
            response: bytes = await call(request)
            return response

        return grpc.unary_unary_rpc_method_handler(forward)


async def main(upstream: str) -> None:
    channel = grpc.aio.insecure_channel(upstream)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((Forwarder(channel),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)
    await channel.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
