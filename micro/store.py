"""Typed client of the store building block."""

from __future__ import annotations

import builtins

from micro.client import Client
from micro.proto import store_pb2

__all__ = ["StoreClient"]

_SERVICE = "store"
_PATH = "/micro.store.v1.Store/"


class StoreClient:
    """Reads and writes records of one table (default ``micro``) in the caller's namespace."""

    def __init__(self, client: Client, *, table: str = "", database: str = "") -> None:
        self.client = client
        self.table = table
        self.database = database

    async def read(
        self,
        key: str,
        *,
        prefix: bool = False,
        suffix: bool = False,
        limit: int = 0,
        offset: int = 0,
        order: str = "",
    ) -> list[store_pb2.Record]:
        """Records with exactly ``key``, or whose keys start and/or end with it. Raises ``NotFound``."""
        options = store_pb2.ReadOptions(
            database=self.database,
            table=self.table,
            prefix=prefix,
            suffix=suffix,
            limit=limit,
            offset=offset,
            order=order,
        )
        request = store_pb2.ReadRequest(key=key, options=options)
        response = await self.client.call(_SERVICE, _PATH + "Read", request, store_pb2.ReadResponse)
        return list(response.records)

    async def write(
        self,
        key: str,
        value: bytes,
        *,
        expiry: int = 0,
        metadata: dict[str, store_pb2.Field] | None = None,
        if_version: int | None = None,
    ) -> int:
        """Write a record (``expiry`` in seconds, 0: never) and return its new version."""
        record = store_pb2.Record(key=key, value=value, expiry=expiry, metadata=metadata or {})
        options = store_pb2.WriteOptions(database=self.database, table=self.table, if_version=if_version)
        request = store_pb2.WriteRequest(record=record, options=options)
        response = await self.client.call(_SERVICE, _PATH + "Write", request, store_pb2.WriteResponse)
        return response.version

    async def delete(self, key: str) -> None:
        options = store_pb2.DeleteOptions(database=self.database, table=self.table)
        request = store_pb2.DeleteRequest(key=key, options=options)
        await self.client.call(_SERVICE, _PATH + "Delete", request, store_pb2.DeleteResponse)

    async def list(
        self, *, prefix: str = "", suffix: str = "", limit: int = 0, offset: int = 0, order: str = ""
    ) -> builtins.list[str]:
        options = store_pb2.ListOptions(
            database=self.database,
            table=self.table,
            prefix=prefix,
            suffix=suffix,
            limit=limit,
            offset=offset,
            order=order,
        )
        keys: builtins.list[str] = []
        stream = self.client.stream(
            _SERVICE, _PATH + "List", store_pb2.ListRequest(options=options), store_pb2.ListResponse
        )
        async for page in stream:
            keys.extend(page.keys)
        return keys

    async def databases(self) -> builtins.list[str]:
        response = await self.client.call(
            _SERVICE, _PATH + "Databases", store_pb2.DatabasesRequest(), store_pb2.DatabasesResponse
        )
        return list(response.databases)

    async def tables(self) -> builtins.list[str]:
        request = store_pb2.TablesRequest(database=self.database)
        response = await self.client.call(_SERVICE, _PATH + "Tables", request, store_pb2.TablesResponse)
        return list(response.tables)
