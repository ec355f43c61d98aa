"""Typed client of the events building block: durable, ordered, replayable streams.

In a service, ``await micro.events.publish("orders", order)`` appends an event;
``@service.consume("orders", group="billing")`` receives each event once per
group, acked when the handler returns and redelivered when it raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from micro._publisher import publisher
from micro.client import Client
from micro.payload import CONTENT_TYPE, encode
from micro.proto import events_pb2

__all__ = ["Consumer", "EventsClient", "publish", "read"]

_SERVICE = "events"
_STREAM = "/micro.events.v1.Stream/"
_STORE = "/micro.events.v1.Store/"
# How long a closing consumer with manual acks waits for the daemon to read its last acks.
_ACK_GRACE = 0.1
# Events per PublishBatch call, and about the most payload bytes; acks per request at most.
_PUBLISH_BATCH = 1000
_PUBLISH_BYTES = 4 * 1024 * 1024
_BUILD_STEP = 100  # events built between letting a batch in flight make progress
_ACK_BATCH = 500
_FLUSH = object()
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
        """Append ``message`` durably; returns ``(event id, sequence number)``.

        The request goes on a stream the client keeps open while it publishes
        (one message each way instead of a call; see ``micro._publisher``).
        """
        return await publisher(self.client).publish(_publish_request(topic, message, metadata, timestamp))

    async def publish_many(self, topic: str, messages: Iterable[Any]) -> list[tuple[str, int]]:
        """Append many events, in order, far faster than one call each; returns each ``(id, sequence)``.

        They go in ``PublishBatch`` calls of up to 1,000 events (or about 4 MiB), one after the
        other: each call is one transaction (all or none), so on an error the earlier calls'
        events stay published and none of the failed call's are.
        """
        results: list[tuple[str, int]] = []
        sending: asyncio.Task[list[tuple[str, int]]] | None = None
        batch, size = events_pb2.PublishBatchRequest(), 0
        try:
            for message in messages:
                if batch.events and (len(batch.events) >= _PUBLISH_BATCH or size >= _PUBLISH_BYTES):
                    if sending is not None:
                        results += await sending
                    sending = asyncio.create_task(self._publish_batch(batch))
                    batch, size = events_pb2.PublishBatchRequest(), 0
                request = batch.events.add()
                _fill_publish_request(request, topic, message, None, None)
                size += len(request.payload)
                if sending is not None and len(batch.events) % _BUILD_STEP == 0:
                    await asyncio.sleep(0)  # let the batch being sent go on while this one is built
            if sending is not None:
                results += await sending
                sending = None
            if batch.events:
                results += await self._publish_batch(batch)
        finally:
            if sending is not None:
                sending.cancel()
                with contextlib.suppress(BaseException):
                    await sending
        return results

    async def _publish_batch(self, batch: events_pb2.PublishBatchRequest) -> list[tuple[str, int]]:
        response = await self.client.call(
            _SERVICE, _STREAM + "PublishBatch", batch, events_pb2.PublishBatchResponse
        )
        return [(r.id, r.sequence) for r in response.results]

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
        start_if_new: bool = False,
    ) -> Consumer:
        """Deliver the events of ``topic`` to ``group`` from: group, beginning, sequence, or ``since``.

        ``start_if_new``: only a new group starts there; an existing one
        resumes from its saved position (Micro's ``Offset``).
        """
        options = events_pb2.ConsumeOptions(
            topic=topic,
            group=group,
            start=events_pb2.TIME if since is not None else _STARTS[start],
            sequence=sequence,
            since=int((since or 0) * 1e9),
            auto_ack=auto_ack,
            ack_wait=int(ack_wait * 1000),
            retry_limit=retry_limit,
            start_if_new=start_if_new,
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
    """An open consumption: iterate for events; with ``auto_ack=False`` ack or nack each.

    Events arrive in batches (``ConsumeBatches``) and are handed out one by one;
    acks and nacks go back in batches: those given before the request stream
    next sends (within one turn of the event loop, say) share a request.
    """

    def __init__(self, client: Client, options: events_pb2.ConsumeOptions) -> None:
        # Requests to send; _FLUSH: send the acks given so far (those of one turn of the loop).
        self._requests: asyncio.Queue[events_pb2.ConsumeRequest | object | None] = asyncio.Queue()
        self._requests.put_nowait(events_pb2.ConsumeRequest(options=options))
        self._batches = client.bidi(
            _SERVICE, _STREAM + "ConsumeBatches", self._outgoing(), events_pb2.EventBatch
        )
        self._ready: deque[events_pb2.Event] = deque()
        self._acks: list[events_pb2.Ack] = []
        self._flush_queued = False
        self._closed = False
        self._manual = options.HasField("auto_ack") and not options.auto_ack
        self._started = False
        self._flushed = asyncio.Event()

    def __aiter__(self) -> Consumer:
        return self

    async def __anext__(self) -> events_pb2.Event:
        self._started = True
        while not self._ready:
            batch = await self._batches.__anext__()
            self._ready.extend(batch.events)
        return self._ready.popleft()

    async def ack(self, event: events_pb2.Event) -> None:
        self._settle(events_pb2.Ack(id=event.id, success=True))

    async def nack(self, event: events_pb2.Event) -> None:
        """Ask for ``event`` to be delivered again now."""
        self._settle(events_pb2.Ack(id=event.id, success=False))

    async def close(self, *, grace: float = _ACK_GRACE) -> None:
        """Stop consuming; events received but not acked go back to the group.

        With manual acks, the acks given so far are sent first, and the stream
        stays open up to ``grace`` seconds for the daemon to apply them (one it
        misses is delivered again: at least once).
        """
        self._closed = True  # the acks given so far are sent first: their _FLUSH is queued
        self._ready.clear()
        await self._requests.put(None)
        try:
            if self._manual and self._started:
                with contextlib.suppress(Exception):  # the stream may have failed already: nothing to send
                    await asyncio.wait_for(self._drain(), grace)
        finally:
            await self._batches.aclose()  # type: ignore[attr-defined]  # an async generator

    def _settle(self, ack: events_pb2.Ack) -> None:
        if self._closed:
            return
        self._acks.append(ack)
        if not self._flush_queued:
            self._flush_queued = True
            self._requests.put_nowait(_FLUSH)

    def _take_acks(self) -> list[events_pb2.ConsumeRequest]:
        self._flush_queued = False
        acks, self._acks = self._acks, []
        if len(acks) == 1:
            return [events_pb2.ConsumeRequest(ack=acks[0])]
        return [
            events_pb2.ConsumeRequest(ack_batch=events_pb2.AckBatch(acks=acks[i : i + _ACK_BATCH]))
            for i in range(0, len(acks), _ACK_BATCH)
        ]

    async def _drain(self) -> None:
        await self._flushed.wait()  # every ack written to the transport
        async for _ in self._batches:  # later events are not acked: they go back to the group
            pass

    async def _outgoing(self) -> AsyncIterator[events_pb2.ConsumeRequest]:
        while (request := await self._requests.get()) is not None:
            if request is _FLUSH:
                for acks in self._take_acks():
                    yield acks
            else:
                assert isinstance(request, events_pb2.ConsumeRequest)
                yield request
        self._flushed.set()


def _publish_request(
    topic: str, message: Any, metadata: Mapping[str, str] | None, timestamp: float | None
) -> events_pb2.PublishRequest:
    request = events_pb2.PublishRequest()
    _fill_publish_request(request, topic, message, metadata, timestamp)
    return request


def _fill_publish_request(
    request: events_pb2.PublishRequest,
    topic: str,
    message: Any,
    metadata: Mapping[str, str] | None,
    timestamp: float | None,
) -> None:
    payload, content_type = encode(message)
    request.topic = topic
    request.payload = payload
    request.metadata[CONTENT_TYPE] = content_type
    if metadata:
        request.metadata.update(metadata)
    request.timestamp = int((timestamp if timestamp is not None else time.time()) * 1e9)


async def publish(topic: str, message: Any, *, metadata: Mapping[str, str] | None = None) -> tuple[str, int]:
    """Publish as the service running in this process."""
    from micro.service import current_service

    return await EventsClient(current_service().client).publish(topic, message, metadata=metadata)


async def read(topic: str, *, limit: int = 250, offset: int = 0) -> list[events_pb2.Event]:
    """Read a topic's history as the service running in this process."""
    from micro.service import current_service

    return await EventsClient(current_service().client).read(topic, limit=limit, offset=offset)
