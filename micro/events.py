"""Typed client of the events building block: durable, ordered, replayable streams.

In a service, ``await micro.events.publish("orders", order)`` appends an event;
``@service.consume("orders", group="billing")`` receives each event once per
group, acked when the handler returns and redelivered when it raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from micro.client import Client
from micro.payload import CONTENT_TYPE, encode
from micro.proto import events_pb2

__all__ = ["Consumer", "EventsClient", "publish", "read"]

_SERVICE = "events"
_STREAM = "/micro.events.v1.Stream/"
_STORE = "/micro.events.v1.Store/"
# How long a closing consumer with manual acks waits for the daemon to read its last acks.
_ACK_GRACE = 0.1
_STARTS = {"group": events_pb2.GROUP, "beginning": events_pb2.BEGINNING, "sequence": events_pb2.SEQUENCE}


class EventsClient:
    """Publishes, consumes and reads the event streams of the caller's namespace."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def publish(
        self,
        topic: str,
        message: Any,
        *,
        metadata: Mapping[str, str] | None = None,
        timestamp: float | None = None,
    ) -> tuple[str, int]:
        """Append ``message`` durably; returns ``(event id, sequence number)``."""
        request = _publish_request(topic, message, metadata, timestamp)
        response = await self.client.call(_SERVICE, _STREAM + "Publish", request, events_pb2.PublishResponse)
        return response.id, response.sequence

    async def publish_many(self, topic: str, messages: Iterable[Any]) -> list[tuple[str, int]]:
        """Append many events over one stream (much faster than one call each)."""

        async def requests() -> AsyncIterator[events_pb2.PublishRequest]:
            for message in messages:
                yield _publish_request(topic, message, None, None)

        responses = self.client.bidi(
            _SERVICE, _STREAM + "PublishStream", requests(), events_pb2.PublishResponse
        )
        return [(r.id, r.sequence) async for r in responses]

    def consume(
        self,
        topic: str,
        *,
        group: str = "",
        start: str = "group",
        sequence: int = 0,
        since: float | None = None,
        auto_ack: bool = True,
        ack_wait: float = 30.0,
        retry_limit: int = 5,
    ) -> Consumer:
        """Deliver the events of ``topic`` to ``group`` from: group, beginning, sequence, or ``since``."""
        options = events_pb2.ConsumeOptions(
            topic=topic,
            group=group,
            start=events_pb2.TIME if since is not None else _STARTS[start],
            sequence=sequence,
            since=int((since or 0) * 1e9),
            auto_ack=auto_ack,
            ack_wait=int(ack_wait * 1000),
            retry_limit=retry_limit,
        )
        return Consumer(self.client, options)

    async def read(self, topic: str, *, limit: int = 250, offset: int = 0) -> list[events_pb2.Event]:
        request = events_pb2.ReadRequest(topic=topic, limit=limit, offset=offset)
        response = await self.client.call(_SERVICE, _STORE + "Read", request, events_pb2.ReadResponse)
        return list(response.events)

    async def topics(self) -> list[events_pb2.Topic]:
        request = events_pb2.TopicsRequest()
        response = await self.client.call(_SERVICE, _STREAM + "Topics", request, events_pb2.TopicsResponse)
        return list(response.topics)


class Consumer:
    """An open consumption: iterate for events; with ``auto_ack=False`` ack or nack each."""

    def __init__(self, client: Client, options: events_pb2.ConsumeOptions) -> None:
        self._requests: asyncio.Queue[events_pb2.ConsumeRequest | None] = asyncio.Queue()
        self._requests.put_nowait(events_pb2.ConsumeRequest(options=options))
        self._events = client.bidi(_SERVICE, _STREAM + "Consume", self._outgoing(), events_pb2.Event)
        self._manual = options.HasField("auto_ack") and not options.auto_ack
        self._started = False
        self._flushed = asyncio.Event()

    def __aiter__(self) -> Consumer:
        return self

    async def __anext__(self) -> events_pb2.Event:
        self._started = True
        return await self._events.__anext__()

    async def ack(self, event: events_pb2.Event) -> None:
        await self._requests.put(events_pb2.ConsumeRequest(ack=events_pb2.Ack(id=event.id, success=True)))

    async def nack(self, event: events_pb2.Event) -> None:
        """Ask for ``event`` to be delivered again now."""
        await self._requests.put(events_pb2.ConsumeRequest(ack=events_pb2.Ack(id=event.id, success=False)))

    async def close(self, *, grace: float = _ACK_GRACE) -> None:
        """Stop consuming; events received but not acked go back to the group.

        With manual acks, the acks given so far are sent first, and the stream
        stays open up to ``grace`` seconds for the daemon to apply them (one it
        misses is delivered again: at least once).
        """
        await self._requests.put(None)
        try:
            if self._manual and self._started:
                with contextlib.suppress(Exception):  # the stream may have failed already: nothing to send
                    await asyncio.wait_for(self._drain(), grace)
        finally:
            await self._events.aclose()  # type: ignore[attr-defined]  # an async generator

    async def _drain(self) -> None:
        await self._flushed.wait()  # every ack written to the transport
        async for _ in self._events:  # later events are not acked: they go back to the group
            pass

    async def _outgoing(self) -> AsyncIterator[events_pb2.ConsumeRequest]:
        while (request := await self._requests.get()) is not None:
            yield request
        self._flushed.set()


def _publish_request(
    topic: str, message: Any, metadata: Mapping[str, str] | None, timestamp: float | None
) -> events_pb2.PublishRequest:
    payload, content_type = encode(message)
    return events_pb2.PublishRequest(
        topic=topic,
        payload=payload,
        metadata={CONTENT_TYPE: content_type, **(metadata or {})},
        timestamp=int((timestamp if timestamp is not None else time.time()) * 1e9),
    )


async def publish(topic: str, message: Any, *, metadata: Mapping[str, str] | None = None) -> tuple[str, int]:
    """Publish as the service running in this process."""
    from micro.service import current_service

    return await EventsClient(current_service().client).publish(topic, message, metadata=metadata)


async def read(topic: str, *, limit: int = 250, offset: int = 0) -> list[events_pb2.Event]:
    """Read a topic's history as the service running in this process."""
    from micro.service import current_service

    return await EventsClient(current_service().client).read(topic, limit=limit, offset=offset)
