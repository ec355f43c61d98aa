"""The runtime service: ``micro.runtime.v1.Runtime`` over the ``Runtime`` manager."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from micro.context import Context
from micro.errors import BadRequest, PayloadTooLarge
from micro.proto import runtime_pb2
from micro_daemon.namespaces import target_namespace
from micro_daemon.runtime.deployment import Spec
from micro_daemon.runtime.logs import Line
from micro_daemon.runtime.manager import Runtime
from micro_daemon.runtime.sources import MAX_UPLOAD_BYTES

__all__ = ["RuntimeHandler"]

DEFAULT_LOG_LINES = 15


class RuntimeHandler:
    """Serves ``micro.runtime.v1.Runtime``."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def Create(
        self, request: runtime_pb2.CreateRequest, context: Context
    ) -> runtime_pb2.CreateResponse:
        service, options = request.service, request.options
        if not service.name or not service.source:
            raise BadRequest("a service to create needs a name and a source", id="runtime")
        if options.instances < 0:
            raise BadRequest(f"instances must be 1 or more, not {options.instances}", id="runtime")
        bad_env = [e for e in options.env if "=" not in e or e.startswith("=")]
        if bad_env:
            raise BadRequest(f"environment variables are KEY=VALUE, not {bad_env[0]!r}", id="runtime")
        spec = Spec(
            name=service.name,
            namespace=target_namespace(options.namespace, context, what="the runtime"),
            source=service.source,
            folder="",
            version=service.version or "latest",
            display_source=service.metadata.get("source") or service.source,
            env=list(options.env),
            instances=options.instances or 1,
            watch=options.watch,
            entrypoint=options.entrypoint or "main.py",
        )
        deployment = await self.runtime.create(spec, force=options.force)
        return runtime_pb2.CreateResponse(service=deployment.to_proto())

    async def Read(self, request: runtime_pb2.ReadRequest, context: Context) -> runtime_pb2.ReadResponse:
        options = request.options
        deployments = self.runtime.read(
            target_namespace(options.namespace, context, what="the runtime"), options.service
        )
        services = [d.to_proto() for d in deployments if options.version in ("", d.spec.version)]
        return runtime_pb2.ReadResponse(services=services)

    async def Update(
        self, request: runtime_pb2.UpdateRequest, context: Context
    ) -> runtime_pb2.UpdateResponse:
        options = request.options
        deployment = await self.runtime.update(
            target_namespace(options.namespace, context, what="the runtime"),
            request.service.name,
            source=options.source,
            instances=max(0, options.instances),
        )
        return runtime_pb2.UpdateResponse(service=deployment.to_proto())

    async def Delete(
        self, request: runtime_pb2.DeleteRequest, context: Context
    ) -> runtime_pb2.DeleteResponse:
        await self.runtime.delete(
            target_namespace(request.options.namespace, context, what="the runtime"), request.service.name
        )
        return runtime_pb2.DeleteResponse()

    async def Logs(
        self, request: runtime_pb2.LogsRequest, context: Context
    ) -> AsyncIterator[runtime_pb2.LogRecord]:
        lines = self.runtime.logs(
            target_namespace(request.options.namespace, context, what="the runtime"),
            request.service,
            count=request.count if request.count > 0 else DEFAULT_LOG_LINES,
            since=float(request.since),
            follow=request.stream,
        )
        async for line in lines:
            yield _record(line)

    async def Upload(
        self, requests: AsyncIterator[runtime_pb2.UploadRequest], context: Context
    ) -> runtime_pb2.UploadResponse:
        chunks: list[bytes] = []
        size = 0
        async for chunk in requests:
            size += len(chunk.data)
            if size > MAX_UPLOAD_BYTES:
                raise PayloadTooLarge(f"the upload is over {MAX_UPLOAD_BYTES} bytes", id="runtime")
            chunks.append(chunk.data)
        # Unpacking up to 256 MiB is file work: keep it off the event loop.
        upload = await asyncio.to_thread(self.runtime.sources.store_upload, b"".join(chunks))
        return runtime_pb2.UploadResponse(id=upload)


def _record(line: Line) -> runtime_pb2.LogRecord:
    return runtime_pb2.LogRecord(timestamp=line.timestamp, metadata=line.metadata, message=line.message)
