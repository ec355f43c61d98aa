"""The events services: ``micro.events.v1.Stream`` and ``micro.events.v1.Store`` over an ``EventsBackend``.

Topics live in the caller's namespace. ``Consume`` reads its first request as
the options and later ones as acks, concurrently with streaming events out;
``PublishStream`` publishes the valid events of the messages that have arrived
as one batch (one transaction), answering each message with a result or an
error per event. ``PublishBatch`` and ``ConsumeBatches`` are the batched forms
of ``Publish`` and ``Consume``: many events per gRPC message, which costs about
as much as an event's whole handling, so replay and bulk publish send few.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping
from typing import Any

from micro._dispatch import Lane
from micro.codec import decode_proto
from micro.context import Context
from micro.errors import BadRequest, MicroError, NotFound
from micro.proto import events_pb2
from micro_daemon.events.backend import (
    DEFAULT_ACK_WAIT,
    DEFAULT_READ_LIMIT,
    DEFAULT_RETRY_LIMIT,
    ERROR_ID,
    Consumer,
    ConsumeSpec,
    EventsBackend,
    PublishItem,
    Start,
    check_item,
)
from micro_daemon.relay.eager import Resumed, run_eagerly

__all__ = [
    "CONSUME_BATCH_BYTES",
    "CONSUME_BATCH_EVENTS",
    "PUBLISH_BATCH",
    "READ_RESPONSE_BYTES",
    "EventsStoreHandler",
    "StreamHandler",
]

PUBLISH_BATCH = 500
# What one ConsumeBatches message carries at most: events, and bytes (past one event).
CONSUME_BATCH_EVENTS = 500
CONSUME_BATCH_BYTES = 1024 * 1024
READ_RESPONSE_BYTES = 8 * 1024 * 1024
_ACKS_IN_FLIGHT = 256
_TAKE_READY = 50  # events taken at once for a batch: what passes its byte limit waits for the next
logger = logging.getLogger(__name__)


class StreamHandler:
    """Serves ``micro.events.v1.Stream``."""

    def __init__(self, backend: EventsBackend) -> None:
        self.backend = backend
        self.lanes = {"PublishStream": self.publish_lane}

    async def Publish(
        self, request: events_pb2.PublishRequest, context: Context
    ) -> events_pb2.PublishResponse:
        event_id, seq = await self.backend.publish(
            context.namespace, request.topic, request.payload, dict(request.metadata), request.timestamp
        )
        return events_pb2.PublishResponse(id=event_id, sequence=seq)

    async def PublishStream(
        self, requests: AsyncIterator[events_pb2.PublishBatchRequest], context: Context
    ) -> AsyncIterator[events_pb2.PublishResults]:
        """Publish the events of each message; an invalid one, or a batch the engine refuses, is
        answered with its error and the stream goes on."""
        reader = _Requests(requests)
        try:
            while messages := await reader.batch():
                for answer in await self._publish_messages(context.namespace, messages):
                    yield answer
        finally:
            await reader.close()

    async def publish_lane(self, lane: Lane, context: Context) -> None:
        """``PublishStream`` as a lane (see ``bind``): each batch is the messages that have arrived.

        For a publisher waiting for each answer that is the one message it sent, published as
        soon as it arrives. A message that does not decode is answered with the stream's error,
        after the messages before it are published and answered.
        """
        namespace = context.namespace
        messages = _LaneMessages(lane)
        carried: events_pb2.PublishBatchRequest | None = None  # over the last batch's limit
        while carried is not None or await lane.wait():
            batch = [carried] if carried is not None else []
            carried = _fill(batch, messages.arrived)
            for answer in await self._publish_messages(namespace, batch) if batch else ():
                lane.send(answer.SerializeToString())
            if messages.failure is not None:
                raise messages.failure

    async def _publish_messages(
        self, namespace: str, messages: list[events_pb2.PublishBatchRequest]
    ) -> list[events_pb2.PublishResults]:
        """Publish the valid events of ``messages`` as one batch; each message's answer: per event its
        ``(id, sequence)``, or why it was not published (invalid, or the batch refused)."""
        entries = [_entry(event) for message in messages for event in message.events]
        items = [entry for entry in entries if isinstance(entry, PublishItem)]
        published: Iterator[tuple[str, int]] = iter(())
        refused: MicroError | None = None
        try:
            published = iter(await self.backend.publish_many(namespace, items) if items else ())
        except MicroError as error:
            refused = error
        outcomes = iter(entries)
        answers = []
        for message in messages:
            answer = events_pb2.PublishResults()
            add = answer.results.add
            for _ in message.events:
                outcome = next(outcomes)
                if isinstance(outcome, MicroError):
                    add(error=_error(outcome))
                elif refused is not None:
                    add(error=_error(refused))
                else:
                    event_id, seq = next(published)
                    add(id=event_id, sequence=seq)
            answers.append(answer)
        return answers

    async def PublishBatch(
        self, request: events_pb2.PublishBatchRequest, context: Context
    ) -> events_pb2.PublishBatchResponse:
        """Publish every event in one transaction (all or none), after validating them all."""
        # publish_many validates every item before it writes any (check_item): no need to twice.
        items = [PublishItem(e.topic, e.payload, _metadata(e.metadata), e.timestamp) for e in request.events]
        response = events_pb2.PublishBatchResponse()
        add = response.results.add
        for event_id, seq in await self.backend.publish_many(context.namespace, items) if items else []:
            add(id=event_id, sequence=seq)
        return response

    async def Consume(
        self, requests: AsyncIterator[events_pb2.ConsumeRequest], context: Context
    ) -> AsyncIterator[events_pb2.Event]:
        consumer = await self._consumer(requests, context, "Consume")
        acks = _AckReader(requests, consumer)
        try:
            async for event in consumer:
                yield event
            acks.raise_failure()
        finally:
            await acks.stop()
            await consumer.close()

    async def ConsumeBatches(
        self, requests: AsyncIterator[events_pb2.ConsumeRequest], context: Context
    ) -> AsyncIterator[events_pb2.EventBatch]:
        """``Consume`` with every event the consumer has ready in one message."""
        consumer = await self._consumer(requests, context, "ConsumeBatches")
        acks = _AckReader(requests, consumer)
        batches = _EventBatches(consumer)
        try:
            while (batch := await batches.next()) is not None:
                yield batch
            acks.raise_failure()
        finally:
            await acks.stop()
            await consumer.close()

    async def _consumer(
        self, requests: AsyncIterator[events_pb2.ConsumeRequest], context: Context, rpc: str
    ) -> Consumer:
        first = await anext(requests, None)
        if first is None or first.WhichOneof("request") != "options":
            raise BadRequest(f"the first request of {rpc} must carry the options", id=ERROR_ID)
        options = first.options
        return await self.backend.consume(context.namespace, options.topic, consume_spec(options))

    async def Topics(self, request: events_pb2.TopicsRequest, context: Context) -> events_pb2.TopicsResponse:
        return events_pb2.TopicsResponse(topics=await self.backend.topics(context.namespace))


class EventsStoreHandler:
    """Serves ``micro.events.v1.Store``: the stored history of a topic."""

    def __init__(self, backend: EventsBackend) -> None:
        self.backend = backend

    async def Read(self, request: events_pb2.ReadRequest, context: Context) -> events_pb2.ReadResponse:
        """Up to ``limit`` events from ``offset``; fewer when they would pass ``READ_RESPONSE_BYTES``."""
        limit = request.limit or DEFAULT_READ_LIMIT
        events = await self.backend.read(context.namespace, request.topic, limit, request.offset)
        response = events_pb2.ReadResponse()
        size = 0
        for event in events:
            size += event.ByteSize()
            if size > READ_RESPONSE_BYTES and response.events:
                break
            response.events.append(event)
        return response


def consume_spec(options: events_pb2.ConsumeOptions) -> ConsumeSpec:
    """The backend's ``ConsumeSpec`` for wire options, with Micro's defaults (0 means default)."""
    try:
        start = Start(options.start)
    except ValueError:
        raise BadRequest(
            f"unknown start {options.start}: use GROUP, BEGINNING, SEQUENCE or TIME", id=ERROR_ID
        ) from None
    if options.ack_wait < 0:
        raise BadRequest(
            f"ack_wait must be a positive number of milliseconds, not {options.ack_wait}", id=ERROR_ID
        )
    return ConsumeSpec(
        group=options.group,
        start=start,
        sequence=options.sequence,
        since_ns=options.since,
        auto_ack=options.auto_ack if options.HasField("auto_ack") else True,
        ack_wait=options.ack_wait / 1000 if options.ack_wait else DEFAULT_ACK_WAIT,
        retry_limit=options.retry_limit or DEFAULT_RETRY_LIMIT,
        start_if_new=options.start_if_new,
    )


class _AckReader:
    """Applies the acks that follow the options, concurrently with the events going out.

    A bad request ends the stream: the consumer is closed and ``raise_failure``
    raises it. A late ack (``NotFound``) is ignored: the event was redelivered.
    """

    def __init__(self, requests: AsyncIterator[events_pb2.ConsumeRequest], consumer: Consumer) -> None:
        self._consumer = consumer
        self._failure: MicroError | None = None
        self._slots = asyncio.Semaphore(_ACKS_IN_FLIGHT)
        self._settling: set[asyncio.Task[None]] = set()
        self._task = asyncio.create_task(self._read(requests))

    def raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        for task in list(self._settling):
            task.cancel()
        await asyncio.gather(*self._settling, return_exceptions=True)

    async def _read(self, requests: AsyncIterator[events_pb2.ConsumeRequest]) -> None:
        try:
            async for request in requests:
                kind = request.WhichOneof("request")
                if kind == "ack":
                    settle = self._settle(request.ack)
                elif kind == "ack_batch":
                    settle = self._settle_all(list(request.ack_batch.acks))
                else:
                    raise BadRequest("after the options, Consume takes only acks", id=ERROR_ID)
                await self._slots.acquire()
                task = asyncio.create_task(self._released(settle))
                self._settling.add(task)
                task.add_done_callback(self._settling.discard)
            await asyncio.gather(*self._settling)
        except MicroError as error:
            self._failure = self._failure or error
            await self._consumer.close()

    async def _released(self, settle: Coroutine[Any, Any, None]) -> None:
        try:
            await settle
        finally:
            self._slots.release()

    async def _settle_all(self, acks: list[events_pb2.Ack]) -> None:
        """Settle a batch of acks together: their saves share writes."""
        await asyncio.gather(*(self._settle(ack) for ack in acks))

    async def _settle(self, ack: events_pb2.Ack) -> None:
        try:
            if ack.success:
                await self._consumer.ack(ack.id)
            else:
                await self._consumer.nack(ack.id)
        except NotFound:
            logger.debug("ignored a late ack of event %s", ack.id)
        except MicroError as error:
            self._failure = self._failure or error
            await self._consumer.close()


class _EventBatches:
    """Takes a consumer's events in batches: one event (waiting for it), then all that are ready.

    Events taken past a batch's byte limit start the next batch. Like
    ``Consume``, it takes events only as it sends them: an auto-acked event
    taken but never sent is lost when the stream ends.
    """

    def __init__(self, consumer: Consumer) -> None:
        self._consumer = consumer
        self._carried: deque[events_pb2.Event] = deque()

    async def next(self) -> events_pb2.EventBatch | None:
        """The next batch (never empty); ``None`` once the consumer ends."""
        if not self._carried:
            try:
                self._carried.append(await anext(self._consumer))
            except StopAsyncIteration:
                return None
        batch = events_pb2.EventBatch()
        size = 0
        while len(batch.events) < CONSUME_BATCH_EVENTS:
            if not self._carried:
                self._carried.extend(
                    await self._consumer.take_ready(
                        min(_TAKE_READY, CONSUME_BATCH_EVENTS - len(batch.events))
                    )
                )
                if not self._carried:
                    break
            event_size = self._carried[0].ByteSize()
            if batch.events and size + event_size > CONSUME_BATCH_BYTES:
                break
            batch.events.append(self._carried.popleft())
            size += event_size
        return batch


def _fill(
    batch: list[events_pb2.PublishBatchRequest],
    arrived: Callable[[], events_pb2.PublishBatchRequest | None],
) -> events_pb2.PublishBatchRequest | None:
    """Add the messages that have ``arrived`` to ``batch`` (one at most, if any), up to about
    ``PUBLISH_BATCH`` events; return the one taken that would pass it, to carry to the next batch.
    A message alone may pass it: it is never split."""
    events = len(batch[0].events) if batch else 0
    while events < PUBLISH_BATCH and (message := arrived()) is not None:
        if batch and events + len(message.events) > PUBLISH_BATCH:
            return message
        batch.append(message)
        events += len(message.events)
    return None


class _LaneMessages:
    """A lane's request messages, decoded as they are taken. The first that does not decode is
    kept in ``failure``, and nothing is taken after it."""

    __slots__ = ("failure", "lane")

    def __init__(self, lane: Lane) -> None:
        self.lane = lane
        self.failure: MicroError | None = None

    def arrived(self) -> events_pb2.PublishBatchRequest | None:
        if self.failure is not None or (data := self.lane.take()) is None:
            return None
        try:
            return decode_proto(data, events_pb2.PublishBatchRequest)
        except MicroError as undecodable:
            self.failure = undecodable
            return None


class _Requests:
    """The messages of a ``PublishStream``, in batches of those that have arrived.

    A batch is the next message (waiting for it) and every message that has
    already arrived behind it, about ``PUBLISH_BATCH`` events at most: while a
    publish waits (an fsync, another writer, a remote engine), the messages
    arriving meanwhile make the next batch. No task reads ahead: a read that
    would wait is started in the caller's stack and kept, half done, for the
    next batch (``eager``). A message that had to be waited for goes alone, at
    once: it came to an idle stream (a publisher waiting for each answer), and
    looking behind it would only delay its publish.
    """

    def __init__(self, requests: AsyncIterator[events_pb2.PublishBatchRequest]) -> None:
        self._requests = aiter(requests)
        self._carried: events_pb2.PublishBatchRequest | None = None  # over the last batch's limit
        self._waiting: Resumed[events_pb2.PublishBatchRequest | None] | None = None
        self._failure: BaseException | None = None
        self._ended = False

    async def batch(self) -> list[events_pb2.PublishBatchRequest]:
        """The next messages (waiting for one); empty once the stream ended."""
        first, waited = await self._next()
        if first is None:
            return []
        batch = [first]
        if not waited:
            self._carried = _fill(batch, self._arrived)
        return batch

    async def close(self) -> None:
        if self._waiting is not None:
            self._waiting.close()
            self._waiting = None

    async def _next(self) -> tuple[events_pb2.PublishBatchRequest | None, bool]:
        """The next message (None: the end), and whether it had to be waited for."""
        if self._carried is not None:
            carried, self._carried = self._carried, None
            return carried, False
        if self._failure is not None:
            raise self._failure  # the request stream failed after the last batch was taken
        if self._ended:
            return None, False
        waiting, self._waiting = self._waiting, None
        if waiting is None:
            read = run_eagerly(self._read())
            if not isinstance(read, Resumed):
                self._ended = read is None
                return read, False
            waiting = read
        waited = not waiting.ready()  # ready: it arrived while the last batch was published
        request = await waiting
        self._ended = request is None
        return request, waited

    def _arrived(self) -> events_pb2.PublishBatchRequest | None:
        """The next message if it has arrived, else None (a read that waits is kept for later)."""
        if self._ended or self._failure is not None or self._waiting is not None:
            return None
        try:
            read = run_eagerly(self._read())
        except Exception as failure:  # raised at the next batch, after this one is published
            self._failure = failure
            return None
        if isinstance(read, Resumed):
            self._waiting = read
            return None
        self._ended = read is None
        return read

    async def _read(self) -> events_pb2.PublishBatchRequest | None:
        async for request in self._requests:
            return request
        return None


def _error(error: MicroError) -> events_pb2.Error:
    return events_pb2.Error(
        id=error.id or ERROR_ID, code=error.code, detail=error.detail, status=error.status
    )


def _metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    # A protobuf map copies fastest key by key (dict() goes through the generic Mapping methods).
    return {key: metadata[key] for key in metadata}


def _entry(request: events_pb2.PublishRequest) -> PublishItem | MicroError:
    """The item to publish for ``request``, or why it cannot be published."""
    item = PublishItem(request.topic, request.payload, _metadata(request.metadata), request.timestamp)
    try:
        check_item(item)
    except MicroError as invalid:
        return invalid
    return item
