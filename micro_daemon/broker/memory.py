"""The in-process broker: per-subscriber bounded buffers, queue groups served round-robin."""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from pathlib import Path

from micro.errors import BadRequest, ServiceUnavailable, TooManyRequests
from micro.proto import broker_pb2
from micro_daemon.broker.backend import (
    ERROR_ID,
    MAX_MESSAGE_BYTES,
    MAX_TOPIC_LENGTH,
    BrokerBackend,
    Subscription,
    check_message,
    validate_topic,
)

__all__ = ["DEFAULT_BUFFER", "MemoryBroker"]

DEFAULT_BUFFER = 1000
_Key = tuple[str, str]


class _State(enum.Enum):
    OPEN = "open"
    DROPPED = "dropped"
    CLOSED = "closed"


class _Buffer:
    """One subscriber's pending messages, at most ``size`` of them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.messages: deque[broker_pb2.Message] = deque()
        self.state = _State.OPEN
        self._waiter: asyncio.Future[None] | None = None

    def offer(self, message: broker_pb2.Message) -> bool:
        """Buffer ``message``; a full buffer marks this subscriber dropped and returns False."""
        if len(self.messages) >= self.size:
            self.state = _State.DROPPED
            self._wake()
            return False
        self.messages.append(message)
        self._wake()
        return True

    def end(self) -> None:
        if self.state is _State.OPEN:
            self.state = _State.CLOSED
        self._wake()

    async def next(self) -> broker_pb2.Message:
        while not self.messages:
            if self.state is _State.DROPPED:
                self.state = _State.CLOSED
                raise TooManyRequests(
                    f"subscriber too slow: {self.size} messages behind, dropped", id=ERROR_ID
                )
            if self.state is _State.CLOSED:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.messages.popleft()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Queue:
    """The members of one queue group; each message goes to the next member that has room."""

    def __init__(self) -> None:
        self.members: list[_Buffer] = []
        self.turn = 0

    def deliver(self, message: broker_pb2.Message) -> tuple[int, list[_Buffer]]:
        dropped: list[_Buffer] = []
        for _ in range(len(self.members)):
            member = self.members[self.turn % len(self.members)]
            self.turn += 1
            if member.offer(message):
                return 1, dropped
            dropped.append(member)
        return 0, dropped


class _Topic:
    def __init__(self) -> None:
        self.everyone: list[_Buffer] = []
        self.queues: dict[str, _Queue] = {}

    def add(self, buffer: _Buffer, queue: str) -> None:
        if queue:
            self.queues.setdefault(queue, _Queue()).members.append(buffer)
        else:
            self.everyone.append(buffer)

    def remove(self, buffer: _Buffer) -> None:
        if buffer in self.everyone:
            self.everyone.remove(buffer)
        for name, group in list(self.queues.items()):
            if buffer in group.members:
                group.members.remove(buffer)
            if not group.members:
                del self.queues[name]

    def empty(self) -> bool:
        return not self.everyone and not self.queues

    def deliver(self, message: broker_pb2.Message) -> tuple[int, list[_Buffer]]:
        delivered, dropped = 0, []
        for buffer in self.everyone:
            if buffer.offer(message):
                delivered += 1
            else:
                dropped.append(buffer)
        for group in self.queues.values():
            count, lost = group.deliver(message)
            delivered += count
            dropped += lost
        return delivered, dropped


class _MemorySubscription(Subscription):
    def __init__(self, broker: MemoryBroker, key: _Key, buffer: _Buffer) -> None:
        self._broker = broker
        self._key = key
        self._buffer = buffer

    async def __anext__(self) -> broker_pb2.Message:
        message = broker_pb2.Message()
        message.CopyFrom(await self._buffer.next())
        return message

    async def close(self) -> None:
        self._broker._unsubscribe(self._key, self._buffer)

    def __del__(self) -> None:
        # An abandoned subscription must not keep buffering until it is dropped.
        self._broker._unsubscribe(self._key, self._buffer)


class MemoryBroker(BrokerBackend):
    """Fans messages out inside this process.

    Each subscriber holds at most ``buffer`` messages; one whose buffer is full
    when a message arrives is dropped (see ``Subscription``), so a slow reader
    costs bounded memory. ``max_message_bytes`` bounds body plus headers.
    """

    def __init__(self, *, buffer: int = DEFAULT_BUFFER, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        if buffer < 1:
            raise ValueError("buffer must be at least 1")
        self._buffer = buffer
        self._max_message_bytes = max_message_bytes
        self._topics: dict[_Key, _Topic] = {}
        self._closed = False

    async def publish(self, namespace: str, topic: str, message: broker_pb2.Message) -> int:
        self._check_open()
        validate_topic(topic)
        check_message(topic, message, self._max_message_bytes)
        subscribers = self._topics.get((namespace, topic))
        if subscribers is None:
            return 0
        shared = broker_pb2.Message()
        shared.CopyFrom(message)
        delivered, dropped = subscribers.deliver(shared)
        for buffer in dropped:
            self._unsubscribe((namespace, topic), buffer, ending=False)
        return delivered

    async def subscribe(self, namespace: str, topic: str, queue: str = "") -> Subscription:
        self._check_open()
        validate_topic(topic)
        _validate_queue(queue)
        buffer = _Buffer(self._buffer)
        self._topics.setdefault((namespace, topic), _Topic()).add(buffer, queue)
        return _MemorySubscription(self, (namespace, topic), buffer)

    async def close(self) -> None:
        self._closed = True
        topics, self._topics = self._topics, {}
        for subscribers in topics.values():
            for buffer in subscribers.everyone + [m for q in subscribers.queues.values() for m in q.members]:
                buffer.end()

    def _check_open(self) -> None:
        if self._closed:
            raise ServiceUnavailable("broker is closed", id=ERROR_ID)

    def _unsubscribe(self, key: _Key, buffer: _Buffer, *, ending: bool = True) -> None:
        if ending:
            buffer.end()
        subscribers = self._topics.get(key)
        if subscribers is None:
            return
        subscribers.remove(buffer)
        if subscribers.empty():
            del self._topics[key]


def _validate_queue(queue: str) -> None:
    if len(queue) > MAX_TOPIC_LENGTH:
        raise BadRequest(
            f"queue name is {len(queue)} characters long; the limit is {MAX_TOPIC_LENGTH}", id=ERROR_ID
        )
    if any(char.isspace() or not char.isprintable() for char in queue):
        raise BadRequest(
            f"invalid queue name {queue!r}: whitespace and control characters are not allowed", id=ERROR_ID
        )


async def open_memory(address: str, data_dir: Path) -> MemoryBroker:
    """The ``memory`` broker: in this daemon only."""
    return MemoryBroker()
