"""The broker backend interface every broker engine implements.

Semantics every engine keeps (checked by ``micro.testing.messaging.BrokerContract``):

* topics are per namespace; a message published in one namespace never reaches
  a subscriber of another;
* every subscriber of a topic gets each message, except that subscribers
  sharing a non-empty ``queue`` name share the load: each message goes to
  exactly one of them (round-robin where the engine can);
* nothing is stored: a message with no subscriber is dropped;
* a subscription receives every message published after ``subscribe()``
  returns, in publish order per publisher, until it is closed;
* a subscriber that falls too far behind is dropped: its iterator yields what
  it holds, then raises ``micro.errors.TooManyRequests``.

Backends raise only ``micro.errors`` exceptions with ``id="broker"``.
"""

from __future__ import annotations

import abc
from types import TracebackType

from micro.errors import BadRequest, PayloadTooLarge
from micro.proto import broker_pb2

__all__ = [
    "ERROR_ID",
    "MAX_MESSAGE_BYTES",
    "MAX_TOPIC_LENGTH",
    "BrokerBackend",
    "Subscription",
    "check_message",
    "validate_topic",
]

ERROR_ID = "broker"
MAX_TOPIC_LENGTH = 255
MAX_MESSAGE_BYTES = 1024 * 1024
_WILDCARDS = frozenset("*>")
_VALID_TOPICS: set[str] = set()  # topics that passed: a service publishes to a few, again and again
_VALID_TOPICS_LIMIT = 10_000


def validate_topic(topic: str, *, id: str = ERROR_ID) -> str:
    """Return ``topic`` if it is a valid topic name, else raise ``BadRequest`` saying why.

    A topic is 1-255 characters without whitespace, control characters or the
    wildcards ``*`` and ``>``, made of non-empty segments separated by ``.``
    (``orders.created``).
    """
    if topic in _VALID_TOPICS:
        return topic
    if not topic:
        raise BadRequest("topic is empty: name the topic, e.g. 'orders.created'", id=id)
    if len(topic) > MAX_TOPIC_LENGTH:
        raise BadRequest(f"topic is {len(topic)} characters long; the limit is {MAX_TOPIC_LENGTH}", id=id)
    for char in topic:
        if char.isspace() or not char.isprintable():
            raise BadRequest(
                f"invalid topic {topic!r}: whitespace and control characters are not allowed", id=id
            )
        if char in _WILDCARDS:
            raise BadRequest(f"invalid topic {topic!r}: wildcards ('*', '>') are not allowed", id=id)
    if "" in topic.split("."):
        raise BadRequest(f"invalid topic {topic!r}: segments separated by '.' must not be empty", id=id)
    if len(_VALID_TOPICS) >= _VALID_TOPICS_LIMIT:
        _VALID_TOPICS.clear()
    _VALID_TOPICS.add(topic)
    return topic


def check_message(topic: str, message: broker_pb2.Message, limit: int = MAX_MESSAGE_BYTES) -> None:
    """Raise ``PayloadTooLarge`` if ``message`` (body and headers) exceeds ``limit`` bytes."""
    size = message.ByteSize()
    if size > limit:
        raise PayloadTooLarge(
            f"message to {topic!r} is {size} bytes (body and headers); the limit is {limit}", id=ERROR_ID
        )


class Subscription(abc.ABC):
    """The messages of one subscription, returned by ``BrokerBackend.subscribe``.

    Messages are buffered from the moment ``subscribe`` returns. Iteration ends
    (``StopAsyncIteration``) once the subscription or the backend is closed; a
    subscriber dropped for being too slow gets what it holds, then
    ``TooManyRequests``. Use it as an async context manager, or call
    ``close``, so that it stops receiving.
    """

    def __aiter__(self) -> Subscription:
        return self

    @abc.abstractmethod
    async def __anext__(self) -> broker_pb2.Message:
        """The next message; a copy the caller may change."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop receiving and drop what is buffered. Idempotent; must not raise."""

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class BrokerBackend(abc.ABC):
    """A broker engine. Implementations must be safe to call concurrently from one event loop."""

    @abc.abstractmethod
    async def publish(self, namespace: str, topic: str, message: broker_pb2.Message) -> int:
        """Send ``message`` to the subscribers of ``topic`` in ``namespace``; return how many got it.

        Validates the topic (``validate_topic``) and the size (``check_message``).
        An engine that cannot count deliveries (a remote broker) returns 0.
        ``message`` is copied: the caller may change it afterwards.
        """

    @abc.abstractmethod
    async def subscribe(self, namespace: str, topic: str, queue: str = "") -> Subscription:
        """Subscribe to ``topic``; with a ``queue`` name, share its messages with that queue's members.

        Registered before it returns: nothing published afterwards is missed.
        """

    async def health(self) -> str:
        """``"ok"``, or a short description of what is wrong with the engine."""
        return "ok"

    @abc.abstractmethod
    async def close(self) -> None:
        """End every subscription and refuse later calls. Idempotent; must not raise."""
