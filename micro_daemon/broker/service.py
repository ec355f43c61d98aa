"""The broker service: ``micro.broker.v1.Broker`` over a ``BrokerBackend``, per namespace."""

from __future__ import annotations

from collections.abc import AsyncIterator

from micro.context import Context
from micro.proto import broker_pb2
from micro_daemon.broker.backend import BrokerBackend

__all__ = ["BrokerHandler"]


class BrokerHandler:
    """Serves ``micro.broker.v1.Broker``: topics live in the caller's namespace."""

    def __init__(self, backend: BrokerBackend) -> None:
        self.backend = backend

    async def Publish(
        self, request: broker_pb2.PublishRequest, context: Context
    ) -> broker_pb2.PublishResponse:
        await self.backend.publish(context.namespace, request.topic, request.message)
        return broker_pb2.PublishResponse()

    async def Subscribe(
        self, request: broker_pb2.SubscribeRequest, context: Context
    ) -> AsyncIterator[broker_pb2.Message]:
        # async with: the subscription ends as soon as the caller cancels the stream
        async with await self.backend.subscribe(context.namespace, request.topic, request.queue) as messages:
            async for message in messages:
                yield message
