"""Typed client of the runtime building block."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

from micro.client import Client
from micro.proto import runtime_pb2

__all__ = ["RuntimeClient"]

_SERVICE = "runtime"
_PATH = "/micro.runtime.v1.Runtime/"
UPLOAD_CHUNK = 1024 * 1024


class RuntimeClient:
    """Runs, updates, stops and inspects services in the caller's namespace."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def create(
        self, service: runtime_pb2.Service, options: runtime_pb2.CreateOptions
    ) -> runtime_pb2.Service:
        request = runtime_pb2.CreateRequest(service=service, options=options)
        response = await self.client.call(_SERVICE, _PATH + "Create", request, runtime_pb2.CreateResponse)
        return response.service

    async def read(self, name: str = "") -> list[runtime_pb2.Service]:
        request = runtime_pb2.ReadRequest(options=runtime_pb2.ReadOptions(service=name))
        response = await self.client.call(_SERVICE, _PATH + "Read", request, runtime_pb2.ReadResponse)
        return list(response.services)

    async def update(self, name: str, *, source: str = "", instances: int = 0) -> runtime_pb2.Service:
        options = runtime_pb2.UpdateOptions(source=source, instances=instances)
        request = runtime_pb2.UpdateRequest(service=runtime_pb2.Service(name=name), options=options)
        response = await self.client.call(_SERVICE, _PATH + "Update", request, runtime_pb2.UpdateResponse)
        return response.service

    async def delete(self, name: str) -> None:
        request = runtime_pb2.DeleteRequest(service=runtime_pb2.Service(name=name))
        await self.client.call(_SERVICE, _PATH + "Delete", request, runtime_pb2.DeleteResponse)

    async def logs(
        self, name: str, *, count: int = 0, since: float = 0, follow: bool = False
    ) -> AsyncIterator[runtime_pb2.LogRecord]:
        request = runtime_pb2.LogsRequest(service=name, count=count, since=int(since), stream=follow)
        async for record in self.client.stream(_SERVICE, _PATH + "Logs", request, runtime_pb2.LogRecord):
            yield record

    async def upload(self, name: str, archive: bytes) -> str:
        """Send a tar.gz of a service's folder; returns the source id for ``create``."""
        chunks: Iterable[bytes] = [
            archive[i : i + UPLOAD_CHUNK] for i in range(0, len(archive), UPLOAD_CHUNK)
        ]
        requests = [
            runtime_pb2.UploadRequest(service=name if i == 0 else "", data=c) for i, c in enumerate(chunks)
        ]
        response = await self.client.call_client_stream(
            _SERVICE, _PATH + "Upload", requests, runtime_pb2.UploadResponse
        )
        return response.id
