"""The store service: validates requests, applies Micro's defaults and calls the backend."""

from __future__ import annotations

import math
import re
import time
from collections.abc import AsyncIterator

from micro.context import DEFAULT_NAMESPACE, Context
from micro.errors import BadRequest, PayloadTooLarge
from micro.proto import store_pb2
from micro_daemon.auth.namespaces import is_admin
from micro_daemon.namespaces import target_namespace
from micro_daemon.store.backend import SYSTEM_DATABASE, Field, Order, Query, Record, StoreBackend

__all__ = ["MAX_KEY_BYTES", "MAX_VALUE_BYTES", "StoreHandler"]

DEFAULT_TABLE = "micro"
# PostgreSQL indexes a key of up to 2704 bytes: 2048 fits every engine, whatever the key.
MAX_KEY_BYTES = 2048
MAX_VALUE_BYTES = 8 * 1024 * 1024
LIST_PAGE = 1000
_TABLE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class StoreHandler:
    """Serves ``micro.store.v1.Store`` on top of a ``StoreBackend``."""

    def __init__(self, backend: StoreBackend) -> None:
        self.backend = backend

    async def Read(self, request: store_pb2.ReadRequest, context: Context) -> store_pb2.ReadResponse:
        options = request.options
        database, table = _location(options.database, options.table, context)
        if not options.prefix and not options.suffix:
            _check_key(request.key)
            records = [await self.backend.get(database, table, request.key)]
        else:
            query = Query(
                prefix=request.key if options.prefix else "",
                suffix=request.key if options.suffix else "",
                limit=options.limit,
                offset=options.offset,
                order=_order(options.order),
            )
            records = await self.backend.query(database, table, query)
        return store_pb2.ReadResponse(records=[_to_proto(r) for r in records])

    async def Write(self, request: store_pb2.WriteRequest, context: Context) -> store_pb2.WriteResponse:
        database, table = _location(request.options.database, request.options.table, context)
        record = request.record
        _check_key(record.key)
        if len(record.value) > MAX_VALUE_BYTES:
            raise PayloadTooLarge(
                f"value of {record.key!r} is {len(record.value)} bytes; the limit is {MAX_VALUE_BYTES}"
            )
        if record.expiry < 0:
            raise BadRequest(f"expiry must be 0 (never) or a number of seconds, not {record.expiry}")
        if_version = request.options.if_version if request.options.HasField("if_version") else None
        if if_version is not None and if_version < 0:
            raise BadRequest(f"if_version must be 0 (only if absent) or a version, not {if_version}")
        stored = Record(
            key=record.key,
            value=record.value,
            expires_at=time.time() + record.expiry if record.expiry else None,
            metadata={k: Field(type=v.type, value=v.value) for k, v in record.metadata.items()},
        )
        version = await self.backend.put(database, table, stored, if_version=if_version)
        return store_pb2.WriteResponse(version=version)

    async def Delete(self, request: store_pb2.DeleteRequest, context: Context) -> store_pb2.DeleteResponse:
        database, table = _location(request.options.database, request.options.table, context)
        _check_key(request.key)
        await self.backend.delete(database, table, request.key)
        return store_pb2.DeleteResponse()

    async def List(
        self, request: store_pb2.ListRequest, context: Context
    ) -> AsyncIterator[store_pb2.ListResponse]:
        options = request.options
        database, table = _location(options.database, options.table, context)
        query = Query(
            prefix=options.prefix,
            suffix=options.suffix,
            limit=options.limit,
            offset=options.offset,
            order=_order(options.order),
        )
        keys = await self.backend.keys(database, table, query)
        for start in range(0, max(len(keys), 1), LIST_PAGE):
            yield store_pb2.ListResponse(keys=keys[start : start + LIST_PAGE])

    async def Databases(
        self, request: store_pb2.DatabasesRequest, context: Context
    ) -> store_pb2.DatabasesResponse:
        databases = [d for d in await self.backend.databases() if d != SYSTEM_DATABASE]
        account = context.account
        every = context.namespace == DEFAULT_NAMESPACE and account is not None and is_admin(account)
        if not every:  # from namespace micro, its administrators see every namespace's database
            databases = [d for d in databases if d == context.namespace]
        return store_pb2.DatabasesResponse(databases=databases)

    async def Tables(self, request: store_pb2.TablesRequest, context: Context) -> store_pb2.TablesResponse:
        database, _ = _location(request.database, DEFAULT_TABLE, context)
        return store_pb2.TablesResponse(tables=await self.backend.tables(database))


def _location(database: str, table: str, context: Context) -> tuple[str, str]:
    """Micro's defaults: database = the caller's namespace, table = ``micro``."""
    database = target_namespace(database, context, what="the store")
    table = table or DEFAULT_TABLE
    if not _TABLE.match(table):
        raise BadRequest(f"invalid table {table!r}: use 1-128 letters, digits, '_', '.' or '-'")
    return database, table


def _check_key(key: str) -> None:
    if not key:
        raise BadRequest("key is empty: give the key of the record")
    size = len(key.encode())
    if size > MAX_KEY_BYTES:
        raise BadRequest(f"key is {size} bytes long; the limit is {MAX_KEY_BYTES}")


def _order(order: str) -> Order:
    if order in ("", "asc"):
        return "asc"
    if order == "desc":
        return "desc"
    raise BadRequest(f"invalid order {order!r}: use asc or desc")


def _to_proto(record: Record) -> store_pb2.Record:
    expiry = 0
    if record.expires_at is not None:
        expiry = max(1, math.ceil(record.expires_at - time.time()))
    return store_pb2.Record(
        key=record.key,
        value=record.value,
        expiry=expiry,
        metadata={k: store_pb2.Field(type=f.type, value=f.value) for k, f in record.metadata.items()},
        version=record.version,
    )
