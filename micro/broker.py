"""Typed client of the broker building block: ephemeral publish/subscribe.

In a service, ``await micro.broker.publish("orders.created", order)`` publishes
as the running service; ``@service.subscribe(topic)`` receives.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from micro.client import Client
from micro.payload import encode
from micro.proto import broker_pb2

__all__ = ["BrokerClient", "publish"]

_SERVICE = "broker"
_PATH = "/micro.broker.v1.Broker/"


class BrokerClient:
    """Publishes to and subscribes to topics of the caller's namespace."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def publish(self, topic: str, message: Any, *, header: Mapping[str, str] | None = None) -> None:
        """Send ``message`` (bytes, a protobuf message, or anything JSON can encode) to ``topic``."""
        body, content_type = encode(message)
        headers = {"Content-Type": content_type, **(header or {})}
        request = broker_pb2.PublishRequest(
            topic=topic, message=broker_pb2.Message(header=headers, body=body)
        )
        await self.client.call(_SERVICE, _PATH + "Publish", request, broker_pb2.PublishResponse)

    async def subscribe(self, topic: str, *, queue: str = "") -> AsyncIterator[broker_pb2.Message]:
        """Yield every message published to ``topic`` from now on (one per ``queue`` group)."""
        request = broker_pb2.SubscribeRequest(topic=topic, queue=queue)
        async for message in self.client.stream(_SERVICE, _PATH + "Subscribe", request, broker_pb2.Message):
            yield message


async def publish(topic: str, message: Any, *, header: Mapping[str, str] | None = None) -> None:
    """Publish as the service running in this process."""
    from micro.service import current_service

    await BrokerClient(current_service().client).publish(topic, message, header=header)
