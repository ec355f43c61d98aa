"""The config service: namespaces, JSON values and watches over a ``ConfigEngine``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from micro.context import Context
from micro.proto import config_pb2
from micro_daemon.config.engine import ConfigEngine
from micro_daemon.config.tree import parse_value
from micro_daemon.namespaces import target_namespace

__all__ = ["ConfigHandler"]


class ConfigHandler:
    """Serves ``micro.config.v1.Config``."""

    def __init__(self, engine: ConfigEngine) -> None:
        self.engine = engine

    async def Get(self, request: config_pb2.GetRequest, context: Context) -> config_pb2.GetResponse:
        namespace = target_namespace(request.namespace, context, what="the config")
        value = await self.engine.get(namespace, request.path, reveal=request.options.secret)
        return config_pb2.GetResponse(value=_value(value))

    async def Set(self, request: config_pb2.SetRequest, context: Context) -> config_pb2.SetResponse:
        namespace = target_namespace(request.namespace, context, what="the config")
        value = parse_value(request.value.data)
        await self.engine.set(namespace, request.path, value, secret=request.options.secret)
        return config_pb2.SetResponse()

    async def Delete(self, request: config_pb2.DeleteRequest, context: Context) -> config_pb2.DeleteResponse:
        await self.engine.delete(
            target_namespace(request.namespace, context, what="the config"), request.path
        )
        return config_pb2.DeleteResponse()

    async def Watch(
        self, request: config_pb2.WatchRequest, context: Context
    ) -> AsyncIterator[config_pb2.WatchResponse]:
        namespace = target_namespace(request.namespace, context, what="the config")
        # async with: the watch is released even when the caller cancels the stream
        async with self.engine.watch(namespace, request.path, reveal=request.options.secret) as changes:
            async for path, value in changes:
                yield config_pb2.WatchResponse(path=path, value=_value(value))


def _value(value: Any) -> config_pb2.Value:
    return config_pb2.Value(data=json.dumps(value), format="json")
