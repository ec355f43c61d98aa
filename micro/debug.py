"""Typed client of the ``Debug`` endpoints every service and the daemon serve."""

from __future__ import annotations

from micro.client import Client
from micro.proto import debug_pb2

__all__ = ["DebugClient"]

_PATH = "/micro.debug.v1.Debug/"


class DebugClient:
    """Asks one service (default: the daemon's ``registry`` block) about its health and resources."""

    def __init__(self, client: Client, *, service: str = "registry") -> None:
        self.client = client
        self.service = service

    async def health(self) -> debug_pb2.HealthResponse:
        return await self.client.call(
            self.service, _PATH + "Health", debug_pb2.HealthRequest(), debug_pb2.HealthResponse
        )

    async def stats(self) -> debug_pb2.StatsResponse:
        return await self.client.call(
            self.service, _PATH + "Stats", debug_pb2.StatsRequest(), debug_pb2.StatsResponse
        )
