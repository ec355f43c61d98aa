"""One long-lived ``PublishStream`` per client: single publishes without a call each.

A unary call costs about twice a message each way on an open stream, so
``EventsClient.publish`` puts its request on a stream the client keeps open
and waits for the answer, which comes in order. The publishes waiting when the
stream sends go as one message (one answer), so concurrent publishers share
messages as well. The stream opens on the first publish and closes after
``IDLE`` seconds without one. A daemon without the stream (or a transport that
cannot stream both ways) gets unary ``Publish`` calls instead.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import AsyncIterator

from micro._reads import ReadFuture
from micro.client import Client, OpenBidi
from micro.context import current_context
from micro.errors import MicroError, ServiceUnavailable, Timeout, error_for_code
from micro.proto import events_pb2

__all__ = ["IDLE", "publisher"]

IDLE = 10.0
_SERVICE = "events"
_PATH = "/micro.events.v1.Stream/PublishStream"
_publishers: weakref.WeakKeyDictionary[Client, _Publisher] = weakref.WeakKeyDictionary()


class _Unsupported(Exception):
    """The stream cannot be used here: the request was not sent, publish it with a call."""


def publisher(client: Client) -> _Publisher:
    """The publisher of ``client`` (one per client, shared by its ``EventsClient`` objects)."""
    found = _publishers.get(client)
    if found is None:
        found = _publishers[client] = _Publisher(client)
    return found


class _Stream:
    """One open ``PublishStream``: the publishes to send, and the callers waiting for answers."""

    def __init__(self, client: Client) -> None:
        self.loop = asyncio.get_running_loop()
        self.wakeups: asyncio.Queue[bool] = asyncio.Queue()  # True: send what is queued; False: end
        self.queued: list[bytes] = []  # each a PublishBatchRequest's ``events`` field (see _event_field)
        self.queued_answers: list[asyncio.Future[events_pb2.PublishResult]] = []
        self.waiting: deque[list[asyncio.Future[events_pb2.PublishResult]]] = deque()  # one per message
        self.closing = False
        # When each waiting publish times out, in send order, and one timer for the earliest: a
        # timer per publish (made and cancelled) was a tenth of a publish's work in the client.
        self.deadlines: deque[tuple[float, asyncio.Future[events_pb2.PublishResult]]] = deque()
        self.expiry: asyncio.TimerHandle | None = None
        self.idle: asyncio.TimerHandle | None = None
        self.idle_since = 0.0
        # With a transport that can be written to directly, a publish goes out from its caller's
        # task (no hop through a writer task): what a single publish waits for is the round trip.
        self.direct: OpenBidi[events_pb2.PublishResults] | None = None
        self.opening = hasattr(client.transport, "open_bidi")
        self.flushing = False
        if self.opening:
            self.reader = self.loop.create_task(self._read_direct(client))
        else:
            answers = client.bidi(_SERVICE, _PATH, self._outgoing(), events_pb2.PublishResults)
            self.reader = self.loop.create_task(self._read(answers))

    def send(self, request: events_pb2.PublishRequest) -> asyncio.Future[events_pb2.PublishResult]:
        answer: asyncio.Future[events_pb2.PublishResult] = ReadFuture(loop=self.loop)  # see ReadFuture
        self.queued.append(_event_field(request))
        self.queued_answers.append(answer)
        if self.direct is not None:
            if not self.waiting:
                self._flush()  # nothing in flight: out now
            elif not self.flushing:
                self.flushing = True  # others are in flight: those queued meanwhile go as one message
                self.loop.call_soon(self._flush)
        elif not self.opening and len(self.queued_answers) == 1:
            self.wakeups.put_nowait(True)
        return answer

    def expire_after(
        self, answer: asyncio.Future[events_pb2.PublishResult], timeout: float
    ) -> asyncio.TimerHandle | None:
        """Fail ``answer`` with ``Timeout`` unless it is done within ``timeout`` seconds.

        Deadlines in send order share the stream's timer; one earlier than the last (a publish
        made while serving a call with a shorter deadline) gets a timer of its own, returned for
        the caller to cancel.
        """
        deadline = self.loop.time() + timeout
        if self.deadlines and deadline < self.deadlines[-1][0]:
            return self.loop.call_at(deadline, _expire, answer)
        self.deadlines.append((deadline, answer))
        expiry = self.expiry
        if expiry is None or deadline < expiry.when():  # armed for one answered since: too late
            if expiry is not None:
                expiry.cancel()
            self.expiry = self.loop.call_at(deadline, self._expire_due)
        return None

    def _expire_due(self) -> None:
        self.expiry = None
        now = self.loop.time()
        deadlines = self.deadlines
        while deadlines:
            deadline, answer = deadlines[0]
            if not answer.done() and deadline > now:
                self.expiry = self.loop.call_at(deadline, self._expire_due)
                return
            deadlines.popleft()
            _expire(answer)

    def _flush(self) -> None:
        self.flushing = False
        if self.direct is None or not self.queued_answers or self.closing:
            return
        message, self.queued = self.queued, []
        self.waiting.append(self.queued_answers)
        self.queued_answers = []
        self.direct.write_encoded(b"".join(message))

    def _close_idle(self) -> None:
        # One timer for many publishes, not one per publish: it checks, and waits again if used.
        self.idle = None
        if self.waiting or self.queued_answers or self.closing:
            return  # busy: armed again once idle
        left = self.idle_since + IDLE - self.loop.time()
        if left > 0:
            self.idle = self.loop.call_later(left, self._close_idle)
        else:
            self.closing = True
            if self.direct is not None:
                self.direct.done_writing()
            else:
                self.wakeups.put_nowait(False)

    async def _outgoing(self) -> AsyncIterator[events_pb2.PublishBatchRequest]:
        while await self.wakeups.get():
            message, self.queued = self.queued, []
            self.waiting.append(self.queued_answers)
            self.queued_answers = []
            yield events_pb2.PublishBatchRequest.FromString(b"".join(message))

    async def _read_direct(self, client: Client) -> None:
        try:
            direct = await client.open_bidi(_SERVICE, _PATH, events_pb2.PublishResults)
        except BaseException as exc:
            self.opening = False
            await self._read(_failing(exc))
            return
        assert direct is not None
        self.direct = direct
        self.opening = False
        self._flush()  # what was sent while it opened
        # Answers resolve their publishers from the connection's reading: no task between.
        direct.listen(self._on_answer, self._on_end)

    def _on_answer(self, answer: events_pb2.PublishResults) -> None:
        try:
            self._answered(answer)
        except ValueError as exc:
            assert self.direct is not None
            self.direct.cancel()
            self._ended(exc)

    def _on_end(self, error: BaseException | None) -> None:
        if error is not None and self.direct is not None:
            self.direct.cancel()
        self._ended(error)

    async def _read(self, answers: AsyncIterator[events_pb2.PublishResults]) -> None:
        try:
            async for answer in answers:
                self._answered(answer)
        except BaseException as exc:
            self._ended(exc)
            raise
        self._ended(None)

    def _answered(self, answer: events_pb2.PublishResults) -> None:
        if not self.waiting or len(answer.results) != len(self.waiting[0]):
            expected = len(self.waiting[0]) if self.waiting else 0
            raise ValueError(f"{len(answer.results)} results for {expected} events")
        waiters = self.waiting.popleft()
        results = answer.results  # as many as waiters (checked above): no zip(strict=True) to parse
        for index, waiter in enumerate(waiters):
            if not waiter.done():
                waiter.set_result(results[index])
        deadlines = self.deadlines
        while deadlines and deadlines[0][1].done():  # answered in order: what waits stays
            deadlines.popleft()
        if not self.waiting and not self.queued_answers:
            self.idle_since = self.loop.time()
            if self.idle is None:
                self.idle = self.loop.call_later(IDLE, self._close_idle)

    def _ended(self, error: BaseException | None) -> None:
        """The stream ended (``error`` None: the server ended it): every publish still waiting fails."""
        failure: BaseException
        if error is None:
            failure = ServiceUnavailable("the publish stream ended", id=_SERVICE)
        elif isinstance(error, NotImplementedError):
            failure = _Unsupported()
        elif isinstance(error, MicroError):
            failure = _Unsupported() if error.code == 501 else error
        elif isinstance(error, asyncio.CancelledError):
            failure = ServiceUnavailable("the publish stream was cancelled", id=_SERVICE)
        else:
            failure = ServiceUnavailable(f"the publish stream failed: {error!r}", id=_SERVICE)
        self.closing = True
        self.waiting.append(self.queued_answers)  # never sent: they fail too
        for waiters in self.waiting:  # their outcome is unknown, as a call's that fails
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(_copy(failure))
        self.waiting.clear()
        self.queued_answers = []


class _Publisher:
    """Publishes over a ``_Stream`` opened when needed (see the module docstring)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.supported = True
        self._stream: _Stream | None = None

    async def publish(self, request: events_pb2.PublishRequest) -> tuple[str, int]:
        if self.supported:
            try:
                return await self._over_stream(request)
            except _Unsupported:
                self.supported = False
        response = await self.client.call(
            _SERVICE, "/micro.events.v1.Stream/Publish", request, events_pb2.PublishResponse
        )
        return response.id, response.sequence

    async def _over_stream(self, request: events_pb2.PublishRequest) -> tuple[str, int]:
        stream = self._open()
        answer = stream.send(request)  # this caller's own: it may give up on it (time out, cancel)
        timeout = _timeout(self.client)
        own_timer = stream.expire_after(answer, timeout) if timeout is not None else None
        try:
            result = await answer
        finally:
            if own_timer is not None:
                own_timer.cancel()
        if result.HasField("error"):
            error = result.error
            raise error_for_code(error.code, error.detail, id=error.id)
        return result.id, result.sequence

    def _open(self) -> _Stream:
        stream = self._stream
        if stream is None or stream.closing or stream.loop is not asyncio.get_running_loop():
            stream = self._stream = _Stream(self.client)
        return stream


async def _failing(exc: BaseException) -> AsyncIterator[events_pb2.PublishResults]:
    raise exc
    yield  # an async generator that raises at once


def _event_field(request: events_pb2.PublishRequest) -> bytes:
    """``request`` as one entry of ``PublishBatchRequest.events`` (field 1) on the wire.

    A message's repeated field is its entries one after the other, each a tag and a length: so
    a batch is these joined, with no batch object to copy each request into and serialize again.
    """
    data = request.SerializeToString()
    size = len(data)
    if size < 0x80:
        return b"\n%c%b" % (size, data)
    length = bytearray()
    while size > 0x7F:
        length.append(size & 0x7F | 0x80)
        size >>= 7
    length.append(size)
    return b"\n" + bytes(length) + data


def _timeout(client: Client) -> float | None:
    """The client's timeout, shortened to the deadline of the call being served, if any."""
    context = current_context()
    remaining = context.time_remaining() if context is not None else None
    if remaining is None:
        return client.timeout
    return remaining if client.timeout is None else min(remaining, client.timeout)


def _expire(answer: asyncio.Future[events_pb2.PublishResult]) -> None:
    if not answer.done():  # its answer, when it comes, is dropped: the outcome is unknown, as a call's
        answer.set_exception(Timeout("request timed out", id=_SERVICE))


def _copy(failure: BaseException) -> BaseException:
    # Every waiting caller gets its own exception object (tracebacks are per raise).
    if isinstance(failure, MicroError):
        return error_for_code(failure.code, failure.detail, id=failure.id)
    return _Unsupported()
