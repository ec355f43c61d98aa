"""Typed client of the config building block."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from micro.client import Client
from micro.proto import config_pb2

__all__ = ["ConfigClient"]

_SERVICE = "config"
_PATH = "/micro.config.v1.Config/"


class ConfigClient:
    """Reads, writes and watches the caller's namespace's config tree."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def get(self, path: str = "", *, secret: bool = False) -> Any:
        """The value at dotted ``path`` (secrets read ``"[secret]"`` unless ``secret``); ``NotFound``."""
        request = config_pb2.GetRequest(path=path, options=config_pb2.Options(secret=secret))
        response = await self.client.call(_SERVICE, _PATH + "Get", request, config_pb2.GetResponse)
        return json.loads(response.value.data) if response.value.data else None

    async def set(self, path: str, value: Any, *, secret: bool = False) -> None:
        """Set ``path`` to ``value``: objects merge leaf by leaf, anything else replaces."""
        data = config_pb2.Value(data=json.dumps(value), format="json")
        request = config_pb2.SetRequest(path=path, value=data, options=config_pb2.Options(secret=secret))
        await self.client.call(_SERVICE, _PATH + "Set", request, config_pb2.SetResponse)

    async def delete(self, path: str) -> None:
        request = config_pb2.DeleteRequest(path=path)
        await self.client.call(_SERVICE, _PATH + "Delete", request, config_pb2.DeleteResponse)

    async def watch(self, path: str = "", *, secret: bool = False) -> AsyncIterator[tuple[str, Any]]:
        """Yield ``(changed path, new value at path)`` after each change touching ``path``."""
        request = config_pb2.WatchRequest(path=path, options=config_pb2.Options(secret=secret))
        async for change in self.client.stream(_SERVICE, _PATH + "Watch", request, config_pb2.WatchResponse):
            yield change.path, json.loads(change.value.data or "null")
