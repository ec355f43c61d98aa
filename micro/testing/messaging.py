"""Conformance suites for the messaging building blocks: broker and events backends.

Subclass a suite in a test module and provide what it names::

    class TestMyBroker(BrokerContract):
        @pytest.fixture
        async def broker(self) -> AsyncIterator[BrokerBackend]:
            broker = await MyBroker.connect(...)
            yield broker
            await broker.close()

    class TestMyEvents(EventsContract):
        @pytest.fixture
        async def events(self) -> AsyncIterator[EventsBackend]: ...

        async def reopen(self, events: EventsBackend, retention: Retention | None = None) -> EventsBackend:
            '''Close ``events`` and open a new backend over the same data (a daemon restart).'''

The suites assume nothing about storage or process: a remote engine (NATS,
JetStream) passes them too. Timing tests use short waits (``SHORT`` seconds).
Run them with pytest-asyncio (``asyncio_mode = "auto"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, ClassVar

import pytest

from micro.errors import BadRequest, NotFound, PayloadTooLarge, ServiceUnavailable, TooManyRequests
from micro.proto import broker_pb2, events_pb2
from micro_daemon.broker.backend import MAX_MESSAGE_BYTES
from micro_daemon.events.backend import MAX_EVENT_BYTES, ConsumeSpec, PublishItem, Retention, Start

if TYPE_CHECKING:
    from micro_daemon.broker.backend import BrokerBackend, Subscription
    from micro_daemon.events.backend import Consumer, EventsBackend

__all__ = ["BrokerContract", "EventsContract"]

NS = "ns"
TIMEOUT = 5.0
SHORT = 0.2
DAY_NS = 86400 * 10**9
INVALID_TOPICS = ["", " ", "a b", "a\tb", "a\nb", "a\x00b", "a*", "a.>", "*", ".a", "a.", "a..b", "x" * 256]


async def _within(awaitable: Any, timeout: float = TIMEOUT) -> Any:
    return await asyncio.wait_for(awaitable, timeout)


async def _quiet(iterator: Subscription | Consumer, seconds: float = SHORT) -> None:
    """Assert that ``iterator`` yields nothing for ``seconds``."""
    with pytest.raises(asyncio.TimeoutError):
        got = await asyncio.wait_for(anext(iterator), seconds)
        pytest.fail(f"expected nothing, got {got}")


def _message(body: bytes, **header: str) -> broker_pb2.Message:
    return broker_pb2.Message(header=header, body=body)


async def _bodies(subscription: Subscription, count: int) -> list[bytes]:
    return [(await _within(anext(subscription))).body for _ in range(count)]


class BrokerContract:
    """The behaviour every ``BrokerBackend`` must show.

    The subclass provides an async ``broker`` fixture yielding an open broker
    whose subscribers may hold ``slow_buffer`` messages before being dropped.
    An engine that cannot count deliveries sets ``counts_deliveries = False``.
    """

    slow_buffer: ClassVar[int] = 1000
    counts_deliveries: ClassVar[bool] = True

    def _assert_count(self, delivered: int, expected: int) -> None:
        if self.counts_deliveries:
            assert delivered == expected

    async def test_every_subscriber_gets_each_message_in_order(self, broker: BrokerBackend) -> None:
        subscriptions = [await broker.subscribe(NS, "orders.created") for _ in range(3)]
        for i in range(5):
            self._assert_count(await broker.publish(NS, "orders.created", _message(b"%d" % i)), 3)
        for subscription in subscriptions:
            assert await _bodies(subscription, 5) == [b"0", b"1", b"2", b"3", b"4"]
            await subscription.close()

    async def test_message_roundtrips_and_is_copied(self, broker: BrokerBackend) -> None:
        async with await broker.subscribe(NS, "t") as subscription:
            message = _message(bytes(range(256)), **{"Content-Type": "application/octet-stream", "ü": "ñ"})
            await broker.publish(NS, "t", message)
            message.body = b"changed"
            received = await _within(anext(subscription))
            assert received == _message(
                bytes(range(256)), **{"Content-Type": "application/octet-stream", "ü": "ñ"}
            )

    async def test_queue_members_share_the_messages(self, broker: BrokerBackend) -> None:
        members = [await broker.subscribe(NS, "jobs", queue="workers") for _ in range(3)]
        everyone = await broker.subscribe(NS, "jobs")
        for i in range(30):
            self._assert_count(await broker.publish(NS, "jobs", _message(b"%d" % i)), 2)
        assert await _bodies(everyone, 30) == [b"%d" % i for i in range(30)]
        shares = [await self._drain(member) for member in members]
        assert sorted(body for share in shares for body in share) == sorted(b"%d" % i for i in range(30))
        assert all(share for share in shares)

    async def test_two_queues_each_get_every_message(self, broker: BrokerBackend) -> None:
        first = await broker.subscribe(NS, "jobs", queue="a")
        second = await broker.subscribe(NS, "jobs", queue="b")
        for i in range(3):
            self._assert_count(await broker.publish(NS, "jobs", _message(b"%d" % i)), 2)
        assert await _bodies(first, 3) == await _bodies(second, 3) == [b"0", b"1", b"2"]

    async def test_message_without_subscriber_is_dropped(self, broker: BrokerBackend) -> None:
        self._assert_count(await broker.publish(NS, "nobody", _message(b"lost")), 0)
        async with await broker.subscribe(NS, "nobody") as subscription:
            await broker.publish(NS, "nobody", _message(b"kept"))
            assert await _bodies(subscription, 1) == [b"kept"]
            await _quiet(subscription)

    async def test_namespaces_and_topics_are_isolated(self, broker: BrokerBackend) -> None:
        mine = await broker.subscribe("one", "a")
        for namespace, topic in [("two", "a"), ("one", "a.b"), ("one", "b"), ("one", "a")]:
            await broker.publish(namespace, topic, _message(f"{namespace}/{topic}".encode()))
        assert await _bodies(mine, 1) == [b"one/a"]
        await _quiet(mine)
        await mine.close()

    async def test_closed_subscription_ends_and_others_go_on(self, broker: BrokerBackend) -> None:
        leaving = await broker.subscribe(NS, "t")
        staying = await broker.subscribe(NS, "t")
        await leaving.close()
        self._assert_count(await broker.publish(NS, "t", _message(b"x")), 1)
        with pytest.raises(StopAsyncIteration):
            await _within(anext(leaving))
        assert await _bodies(staying, 1) == [b"x"]
        await leaving.close()  # idempotent
        await staying.close()

    @pytest.mark.parametrize("topic", INVALID_TOPICS)
    async def test_invalid_topics_are_rejected(self, broker: BrokerBackend, topic: str) -> None:
        with pytest.raises(BadRequest):
            await broker.publish(NS, topic, _message(b"x"))
        with pytest.raises(BadRequest):
            await broker.subscribe(NS, topic)

    async def test_longest_and_unusual_topics_are_allowed(self, broker: BrokerBackend) -> None:
        for topic in ["x" * 255, "a.b-c_d.ünï", "UPPER.123"]:
            async with await broker.subscribe(NS, topic) as subscription:
                await broker.publish(NS, topic, _message(b"ok"))
                assert await _bodies(subscription, 1) == [b"ok"]

    async def test_oversized_message_is_rejected(self, broker: BrokerBackend) -> None:
        async with await broker.subscribe(NS, "big") as subscription:
            with pytest.raises(PayloadTooLarge) as caught:
                await broker.publish(NS, "big", _message(b"x" * (MAX_MESSAGE_BYTES + 1)))
            assert str(MAX_MESSAGE_BYTES) in caught.value.detail
            await broker.publish(NS, "big", _message(b"x" * (MAX_MESSAGE_BYTES - 64)))
            assert len((await _within(anext(subscription))).body) == MAX_MESSAGE_BYTES - 64

    async def test_slow_subscriber_is_dropped_after_what_it_holds(self, broker: BrokerBackend) -> None:
        slow = await broker.subscribe(NS, "firehose")
        fast = await broker.subscribe(NS, "firehose")
        total = self.slow_buffer + 10
        reader = asyncio.create_task(_bodies(fast, total))
        for i in range(total):
            await broker.publish(NS, "firehose", _message(b"%d" % i))
            await asyncio.sleep(0)
        assert len(await _within(reader)) == total
        received = []
        with pytest.raises(TooManyRequests) as caught:
            while True:
                received.append((await _within(anext(slow))).body)
        assert "too slow" in caught.value.detail
        assert 0 < len(received) <= self.slow_buffer
        assert received == [b"%d" % i for i in range(len(received))]
        await slow.close()
        await fast.close()

    async def test_close_ends_subscriptions_and_refuses_calls(self, broker: BrokerBackend) -> None:
        subscription = await broker.subscribe(NS, "t")
        await broker.close()
        with pytest.raises(StopAsyncIteration):
            await _within(anext(subscription))
        with pytest.raises(ServiceUnavailable):
            await broker.publish(NS, "t", _message(b"x"))
        await broker.close()

    async def _drain(self, subscription: Subscription) -> list[bytes]:
        bodies = []
        with contextlib.suppress(asyncio.TimeoutError):
            while True:
                bodies.append((await asyncio.wait_for(anext(subscription), SHORT)).body)
        await subscription.close()
        return bodies


def _seqs(events: list[events_pb2.Event]) -> list[int]:
    return [event.sequence for event in events]


async def _take(consumer: Consumer, count: int) -> list[events_pb2.Event]:
    return [await _within(anext(consumer)) for _ in range(count)]


async def _publish(events: EventsBackend, topic: str, count: int, namespace: str = NS) -> list[int]:
    items = [PublishItem(topic, b"%d" % i) for i in range(count)]
    return [seq for _, seq in await events.publish_many(namespace, items)]


def _manual(group: str = "g", **options: Any) -> ConsumeSpec:
    return ConsumeSpec(group=group, auto_ack=False, **{"ack_wait": SHORT, **options})


class EventsContract:
    """The behaviour every ``EventsBackend`` must show.

    The subclass provides an async ``events`` fixture yielding an open, empty
    backend with the default ``Retention``, and ``reopen`` (see the module
    docstring). Backends reopened by a test are closed by it. An engine whose
    consumers never hand out several events at once (``Consumer.take_ready``
    left to its default) sets ``batches = False``.
    """

    batches: ClassVar[bool] = True

    async def reopen(self, events: EventsBackend, retention: Retention | None = None) -> EventsBackend:
        """Close ``events`` and open a new backend over the same data, with ``retention`` if given."""
        raise NotImplementedError

    def event_size_limit(self, events: EventsBackend) -> int:
        """The largest event (payload plus metadata) ``events`` stores: ``MAX_EVENT_BYTES``, unless its
        server bounds messages lower (a NATS server's ``max_payload``)."""
        return MAX_EVENT_BYTES

    @contextlib.asynccontextmanager
    async def _reopened(
        self, events: EventsBackend, retention: Retention | None = None
    ) -> AsyncIterator[EventsBackend]:
        backend = await self.reopen(events, retention)
        try:
            yield backend
        finally:
            await backend.close()

    # -- publish and read ---------------------------------------------------

    async def test_sequences_start_at_one_per_topic(self, events: EventsBackend) -> None:
        first = [await events.publish(NS, "a", b"x") for _ in range(3)]
        assert [seq for _, seq in first] == [1, 2, 3]
        assert len({event_id for event_id, _ in first}) == 3
        assert (await events.publish(NS, "b", b"y"))[1] == 1

    async def test_read_returns_what_was_published(self, events: EventsBackend) -> None:
        event_id, _ = await events.publish(NS, "a.b", bytes(range(256)), {"k": "v", "ü": "ñ"}, 123)
        before = time.time_ns()
        await events.publish(NS, "a.b", b"")
        stored = await events.read(NS, "a.b")
        assert stored[0] == events_pb2.Event(
            id=event_id,
            topic="a.b",
            metadata={"k": "v", "ü": "ñ"},
            payload=bytes(range(256)),
            timestamp=123,
            sequence=1,
        )
        assert stored[1].payload == b"" and stored[1].sequence == 2
        assert before - 10**9 <= stored[1].timestamp <= time.time_ns() + 10**9

    async def test_read_limit_and_offset(self, events: EventsBackend) -> None:
        await _publish(events, "t", 10)
        assert _seqs(await events.read(NS, "t", limit=3)) == [1, 2, 3]
        assert _seqs(await events.read(NS, "t", limit=4, offset=8)) == [9, 10]
        assert _seqs(await events.read(NS, "t", offset=10)) == []
        assert _seqs(await events.read(NS, "t")) == list(range(1, 11))
        assert await events.read(NS, "unknown") == []

    @pytest.mark.parametrize(("limit", "offset"), [(0, 0), (10_001, 0), (1, -1)])
    async def test_read_rejects_bad_bounds(self, events: EventsBackend, limit: int, offset: int) -> None:
        with pytest.raises(BadRequest):
            await events.read(NS, "t", limit=limit, offset=offset)

    async def test_publish_many_is_ordered_and_all_or_nothing(self, events: EventsBackend) -> None:
        items = [PublishItem("a", b"1"), PublishItem("b", b"2"), PublishItem("a", b"3", {"m": "x"})]
        assert [seq for _, seq in await events.publish_many(NS, items)] == [1, 1, 2]
        with pytest.raises(BadRequest):
            await events.publish_many(NS, [PublishItem("a", b"4"), PublishItem("bad topic", b"5")])
        assert [e.payload for e in await events.read(NS, "a")] == [b"1", b"3"]
        assert await events.publish_many(NS, []) == []

    @pytest.mark.parametrize("topic", INVALID_TOPICS)
    async def test_invalid_topics_are_rejected(self, events: EventsBackend, topic: str) -> None:
        with pytest.raises(BadRequest):
            await events.publish(NS, topic, b"x")
        with pytest.raises(BadRequest):
            await events.consume(NS, topic, ConsumeSpec())
        with pytest.raises(BadRequest):
            await events.read(NS, topic)

    async def test_oversized_event_is_rejected(self, events: EventsBackend) -> None:
        limit = self.event_size_limit(events)
        with pytest.raises(PayloadTooLarge):
            await events.publish(NS, "t", b"x" * (limit + 1))
        await events.publish(NS, "t", b"x" * (limit - 64))
        assert _seqs(await events.read(NS, "t")) == [1]

    @pytest.mark.parametrize(
        "options",
        [
            {"retry_limit": 0},
            {"retry_limit": -2},
            {"ack_wait": 0},
            {"group": "bad group"},
            {"group": "a*"},
            {"start": Start.SEQUENCE, "sequence": 0},
            {"max_in_flight": 0},
        ],
    )
    def test_bad_consume_options_are_rejected(self, options: dict[str, Any]) -> None:
        with pytest.raises(BadRequest):
            ConsumeSpec(**options)

    async def test_namespaces_are_isolated(self, events: EventsBackend) -> None:
        watcher = await events.consume("two", "t", ConsumeSpec(group="g"))
        await _publish(events, "t", 2, namespace="one")
        assert (await events.publish("two", "t", b"mine"))[1] == 1
        assert [e.payload for e in await _take(watcher, 1)] == [b"mine"]
        await _quiet(watcher)
        assert _seqs(await events.read("one", "t")) == [1, 2]
        assert [t.name for t in await events.topics("three")] == []
        await watcher.close()

    async def test_order_holds_under_concurrent_publishers(self, events: EventsBackend) -> None:
        consumer = await events.consume(NS, "t", ConsumeSpec(group="g"))

        async def publisher(name: str) -> None:
            for i in range(40):
                await events.publish(NS, "t", f"{name}:{i}".encode())

        await asyncio.gather(*(publisher(f"p{n}") for n in range(5)))
        received = await _take(consumer, 200)
        assert _seqs(received) == list(range(1, 201))
        for n in range(5):
            mine = [e.payload for e in received if e.payload.startswith(b"p%d:" % n)]
            assert mine == [f"p{n}:{i}".encode() for i in range(40)]
        await consumer.close()

    # -- groups and start positions -----------------------------------------

    async def test_new_group_gets_events_published_from_now_on(self, events: EventsBackend) -> None:
        await _publish(events, "t", 2)
        consumer = await events.consume(NS, "t", ConsumeSpec(group="g"))
        await _publish(events, "t", 2)
        received = await _take(consumer, 2)
        assert _seqs(received) == [3, 4] and {e.attempt for e in received} == {1}
        assert {e.topic for e in received} == {"t"}
        await _quiet(consumer)
        await consumer.close()

    async def test_groups_and_private_consumers_each_get_every_event(self, events: EventsBackend) -> None:
        consumers = [await events.consume(NS, "t", ConsumeSpec(group=g)) for g in ["g1", "g2", "", ""]]
        await _publish(events, "t", 3)
        for consumer in consumers:
            assert _seqs(await _take(consumer, 3)) == [1, 2, 3]
            await consumer.close()
        [topic] = await events.topics(NS)
        assert [g.name for g in topic.groups] == ["g1", "g2"]

    async def test_consumers_of_a_group_share_its_events(self, events: EventsBackend) -> None:
        consumers = [await events.consume(NS, "t", ConsumeSpec(group="g")) for _ in range(2)]
        shares: list[list[int]] = [[], []]

        async def work(index: int) -> None:
            while sum(map(len, shares)) < 40:
                with contextlib.suppress(asyncio.TimeoutError):
                    shares[index].append((await asyncio.wait_for(anext(consumers[index]), SHORT)).sequence)
                    await asyncio.sleep(0.002)  # the work that lets the other member take a turn

        workers = [asyncio.create_task(work(i)) for i in range(2)]
        await _publish(events, "t", 40)
        await _within(asyncio.gather(*workers))
        assert sorted(shares[0] + shares[1]) == list(range(1, 41))
        assert shares[0] and shares[1]
        assert shares[0] == sorted(shares[0]) and shares[1] == sorted(shares[1])
        for consumer in consumers:
            await consumer.close()

    async def test_group_position_survives_consumer_and_backend_restarts(self, events: EventsBackend) -> None:
        consumer = await events.consume(NS, "t", ConsumeSpec(group="g"))
        await _publish(events, "t", 5)
        assert _seqs(await _take(consumer, 2)) == [1, 2]
        await consumer.close()
        consumer = await events.consume(NS, "t", ConsumeSpec(group="g"))
        assert _seqs(await _take(consumer, 1)) == [3]
        async with self._reopened(events) as reopened:
            consumer = await reopened.consume(NS, "t", ConsumeSpec(group="g"))
            await _publish(reopened, "t", 1)
            assert _seqs(await _take(consumer, 3)) == [4, 5, 6]
            await _quiet(consumer)

    async def test_start_beginning_sequence_and_time_move_a_saved_group(self, events: EventsBackend) -> None:
        await _publish(events, "t", 3)
        await asyncio.sleep(0.002)
        await _publish(events, "t", 2)
        since = (await events.read(NS, "t"))[3].timestamp
        cases = [
            (ConsumeSpec(group="g"), []),
            (ConsumeSpec(group="g", start=Start.BEGINNING), [1, 2, 3, 4, 5]),
            (ConsumeSpec(group="g", start=Start.SEQUENCE, sequence=3), [3, 4, 5]),
            (ConsumeSpec(group="g", start=Start.TIME, since_ns=since), [4, 5]),
            (ConsumeSpec(group="g", start=Start.TIME, since_ns=time.time_ns() + DAY_NS), []),
        ]
        for options, expected in cases:
            consumer = await events.consume(NS, "t", options)
            assert _seqs(await _take(consumer, len(expected))) == expected, options
            await _quiet(consumer, 0.05)
            await consumer.close()

    async def test_start_beyond_the_end_waits_for_that_sequence(self, events: EventsBackend) -> None:
        await _publish(events, "t", 2)
        consumer = await events.consume(NS, "t", ConsumeSpec(group="g", start=Start.SEQUENCE, sequence=5))
        await _quiet(consumer, 0.05)
        await _publish(events, "t", 2)
        await _quiet(consumer, 0.05)
        await _publish(events, "t", 2)
        assert _seqs(await _take(consumer, 2)) == [5, 6]
        await consumer.close()

    async def test_start_if_new_starts_a_new_group_there(self, events: EventsBackend) -> None:
        await _publish(events, "t", 1)
        await asyncio.sleep(0.002)
        await _publish(events, "t", 2)
        since = (await events.read(NS, "t"))[1].timestamp
        cases = [
            (ConsumeSpec(group="a", start=Start.BEGINNING, start_if_new=True), [1, 2, 3]),
            (ConsumeSpec(group="b", start=Start.SEQUENCE, sequence=2, start_if_new=True), [2, 3]),
            (ConsumeSpec(group="c", start=Start.TIME, since_ns=since, start_if_new=True), [2, 3]),
            (ConsumeSpec(start=Start.BEGINNING, start_if_new=True), [1, 2, 3]),  # private: always new
            (ConsumeSpec(group="d", start_if_new=True), []),
        ]
        for options, expected in cases:
            consumer = await events.consume(NS, "t", options)
            assert _seqs(await _take(consumer, len(expected))) == expected, options
            await _quiet(consumer, 0.05)
            await consumer.close()

    @pytest.mark.parametrize(
        "start", [{"start": Start.BEGINNING}, {"start": Start.SEQUENCE, "sequence": 1}, {"start": Start.TIME}]
    )
    async def test_start_if_new_resumes_an_existing_group(
        self, events: EventsBackend, start: dict[str, Any]
    ) -> None:
        options = ConsumeSpec(group="g", start_if_new=True, **start)
        consumer = await events.consume(NS, "t", options)
        await _publish(events, "t", 4)
        assert _seqs(await _take(consumer, 2)) == [1, 2]
        await consumer.close()
        consumer = await events.consume(NS, "t", options)
        assert _seqs(await _take(consumer, 2)) == [3, 4]
        await _quiet(consumer, 0.05)
        await consumer.close()
        async with self._reopened(events) as reopened:
            consumer = await reopened.consume(NS, "t", options)
            await _publish(reopened, "t", 1)
            assert _seqs(await _take(consumer, 1)) == [5]
            await _quiet(consumer, 0.05)
            await consumer.close()

    async def test_start_if_new_joins_a_group_in_use(self, events: EventsBackend) -> None:
        first = await events.consume(NS, "t", ConsumeSpec(group="g"))
        await _publish(events, "t", 2)
        assert _seqs(await _take(first, 2)) == [1, 2]
        options = ConsumeSpec(group="g", start=Start.BEGINNING, start_if_new=True)
        second = await events.consume(NS, "t", options)
        await first.close()
        await _quiet(second, 0.05)
        await _publish(events, "t", 1)
        assert _seqs(await _take(second, 1)) == [3]
        await second.close()

    async def test_take_ready_hands_out_what_is_ready_in_order(self, events: EventsBackend) -> None:
        await _publish(events, "t", 300)
        consumer = await events.consume(NS, "t", ConsumeSpec(group="g", start=Start.BEGINNING))
        got: list[events_pb2.Event] = []
        largest = 0
        while len(got) < 300:
            got.append(await _within(anext(consumer)))
            ready = await _within(consumer.take_ready(300 - len(got)))
            largest = max(largest, len(ready))
            got += ready
        assert _seqs(got) == list(range(1, 301))
        assert await _within(consumer.take_ready(10), SHORT) == []  # nothing ready: no waiting
        if self.batches:
            assert largest > 1
        await consumer.close()

    async def test_take_ready_keeps_within_max_in_flight(self, events: EventsBackend) -> None:
        await _publish(events, "t", 20)
        consumer = await events.consume(NS, "t", _manual(start=Start.BEGINNING, max_in_flight=5))
        held = [await _within(anext(consumer))]
        for _ in range(10):
            held += await _within(consumer.take_ready(20))
            assert len(held) <= 5
        for event in held:
            await consumer.ack(event.id)
        more = [await _within(anext(consumer))]
        more += await _within(consumer.take_ready(20))
        assert _seqs(held + more) == list(range(1, len(held + more) + 1))
        await consumer.close()

    async def test_closed_consumer_and_backend_end_iteration(self, events: EventsBackend) -> None:
        closed = await events.consume(NS, "t", ConsumeSpec(group="a"))
        await closed.close()
        with pytest.raises(StopAsyncIteration):
            await _within(anext(closed))
        waiting = await events.consume(NS, "t", ConsumeSpec(group="b"))
        pending = asyncio.create_task(_within(anext(waiting)))
        await asyncio.sleep(0.01)
        await events.close()
        with pytest.raises(StopAsyncIteration):
            await pending
        with pytest.raises(ServiceUnavailable):
            await events.publish(NS, "t", b"x")

    # -- acknowledgement ----------------------------------------------------

    async def test_auto_acked_events_are_not_delivered_again(self, events: EventsBackend) -> None:
        consumer = await events.consume(NS, "t", ConsumeSpec(group="g"))
        await _publish(events, "t", 3)
        assert _seqs(await _take(consumer, 3)) == [1, 2, 3]
        async with self._reopened(events) as reopened:
            consumer = await reopened.consume(NS, "t", ConsumeSpec(group="g"))
            await _publish(reopened, "t", 1)
            assert _seqs(await _take(consumer, 1)) == [4]

    async def test_acked_events_are_done_and_acks_may_come_out_of_order(self, events: EventsBackend) -> None:
        consumer = await events.consume(NS, "t", _manual())
        await _publish(events, "t", 4)
        received = await _take(consumer, 4)
        for index in (2, 0, 3):
            await consumer.ack(received[index].id)
        redelivered = await _take(consumer, 1)
        assert (redelivered[0].sequence, redelivered[0].attempt) == (2, 2)
        await consumer.ack(redelivered[0].id)
        await _quiet(consumer, SHORT * 1.5)
        async with self._reopened(events) as reopened:
            consumer = await reopened.consume(NS, "t", _manual())
            await _quiet(consumer)

    async def test_unacked_event_is_redelivered_after_ack_wait(self, events: EventsBackend) -> None:
        consumer = await events.consume(NS, "t", _manual())
        await _publish(events, "t", 1)
        first = await _take(consumer, 1)
        started = time.monotonic()
        again = await _take(consumer, 1)
        assert time.monotonic() - started >= SHORT * 0.8
        assert (again[0].id, again[0].sequence, again[0].attempt) == (first[0].id, 1, 2)
        await consumer.ack(again[0].id)
        await _quiet(consumer, SHORT * 1.5)
        await consumer.close()

    async def test_nack_redelivers_at_once(self, events: EventsBackend) -> None:
        consumer = await events.consume(NS, "t", _manual(ack_wait=30.0))
        await _publish(events, "t", 2)
        first, second = await _take(consumer, 2)
        await consumer.nack(first.id)
        again = await _within(anext(consumer), 1.0)
        assert (again.sequence, again.attempt) == (1, 2)
        await consumer.ack(again.id)
        await consumer.ack(second.id)
        await consumer.close()

    async def test_expired_event_goes_to_a_consumer_that_joined_later(self, events: EventsBackend) -> None:
        first = await events.consume(NS, "t", _manual(ack_wait=SHORT, max_in_flight=1))
        await _publish(events, "t", 1)
        held = await _take(first, 1)
        later = await events.consume(NS, "t", _manual(ack_wait=30.0))
        got = await _take(later, 1)
        assert (got[0].sequence, got[0].attempt) == (1, 2)
        with pytest.raises(NotFound):
            await first.ack(held[0].id)
        await later.ack(got[0].id)
        await first.close()
        await later.close()

    async def test_events_of_a_closed_consumer_go_to_another_at_once(self, events: EventsBackend) -> None:
        leaving = await events.consume(NS, "t", _manual(ack_wait=30.0))
        staying = await events.consume(NS, "t", _manual(ack_wait=30.0))
        await _publish(events, "t", 1)
        taker, other = (leaving, staying) if await self._holds(leaving) else (staying, leaving)
        await taker.close()
        got = await _within(anext(other), 1.0)
        assert (got.sequence, got.attempt) == (1, 2)
        await other.close()

    async def test_events_left_by_departing_consumers_stay_in_the_group(self, events: EventsBackend) -> None:
        first = await events.consume(NS, "t", ConsumeSpec(group="g"))
        second = await events.consume(NS, "t", ConsumeSpec(group="g"))
        await _publish(events, "t", 20)
        taken = _seqs(await _take(first, 3)) + _seqs(await _take(second, 2))
        await first.close()
        await second.close()
        async with self._reopened(events) as reopened:
            consumer = await reopened.consume(NS, "t", ConsumeSpec(group="g"))
            rest = _seqs(await _take(consumer, 15))
            await _quiet(consumer)
        assert sorted(taken + rest) == list(range(1, 21))

    async def test_every_event_is_settled_under_churn(self, events: EventsBackend) -> None:
        consumers = [
            await events.consume(NS, "t", _manual(ack_wait=0.1, retry_limit=-1, start=Start.BEGINNING))
            for _ in range(3)
        ]
        await _publish(events, "t", 150)
        acked: set[int] = set()

        async def work(index: int) -> None:
            consumer = consumers[index]
            while len(acked) < 150:
                with contextlib.suppress(asyncio.TimeoutError):
                    event = await asyncio.wait_for(anext(consumer), SHORT)
                    fate = (event.sequence * 7 + event.attempt + index) % 5
                    if fate == 0 and event.attempt < 3:
                        await consumer.nack(event.id)
                    elif fate == 1 and event.attempt < 3:
                        continue  # let the ack wait expire
                    else:
                        with contextlib.suppress(NotFound):  # expired meanwhile: settled elsewhere
                            await consumer.ack(event.id)
                        acked.add(event.sequence)

        await _within(asyncio.gather(*(work(i) for i in range(3))), 30)
        assert acked == set(range(1, 151))
        for consumer in consumers:
            await consumer.close()
        async with self._reopened(events) as reopened:
            consumer = await reopened.consume(NS, "t", _manual())
            await _quiet(consumer, SHORT * 1.5)
            [topic] = await reopened.topics(NS)
            assert [(g.name, g.lag) for g in topic.groups] == [("g", 0)]

    async def test_unacked_events_and_attempts_survive_a_restart(self, events: EventsBackend) -> None:
        consumer = await events.consume(NS, "t", _manual(ack_wait=30.0))
        await _publish(events, "t", 2)
        first = await _take(consumer, 2)
        await consumer.ack(first[1].id)
        async with self._reopened(events) as reopened:
            consumer = await reopened.consume(NS, "t", _manual(ack_wait=30.0))
            again = await _take(consumer, 1)
            assert (again[0].sequence, again[0].attempt) == (1, 2)
            await consumer.ack(again[0].id)
            await _quiet(consumer)

    async def test_retry_limit_sends_the_event_to_the_dead_letter_topic(self, events: EventsBackend) -> None:
        dead = await events.consume(NS, "t.dead", ConsumeSpec(group="dlq"))
        consumer = await events.consume(NS, "t", _manual(ack_wait=30.0, retry_limit=2))
        await events.publish(NS, "t", b"poison", {"k": "v"})
        for attempt in (1, 2):
            event = await _take(consumer, 1)
            assert event[0].attempt == attempt
            await consumer.nack(event[0].id)
        [letter] = await _take(dead, 1)
        assert letter.payload == b"poison" and letter.topic == "t.dead"
        assert letter.metadata["k"] == "v"
        assert letter.metadata["original-sequence"] == "1"
        assert letter.metadata["original-topic"] == "t"
        assert letter.metadata["dead-letter-reason"]
        await _quiet(consumer)
        [topic] = [t for t in await events.topics(NS) if t.name == "t"]
        assert [(g.name, g.lag) for g in topic.groups] == [("g", 0)]
        await consumer.close()
        await dead.close()

    async def test_ack_wait_expiry_counts_towards_the_retry_limit(self, events: EventsBackend) -> None:
        consumer = await events.consume(NS, "t", _manual(retry_limit=1))
        await _publish(events, "t", 1)
        await _take(consumer, 1)
        await asyncio.sleep(SHORT * 2)
        await _quiet(consumer)
        deadline = time.monotonic() + TIMEOUT
        while not await events.read(NS, "t.dead") and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert [e.payload for e in await events.read(NS, "t.dead")] == [b"0"]
        await consumer.close()

    async def test_acking_wrongly_is_refused(self, events: EventsBackend) -> None:
        auto = await events.consume(NS, "t", ConsumeSpec(group="auto"))
        manual = await events.consume(NS, "t", _manual())
        await _publish(events, "t", 1)
        event = (await _take(auto, 1))[0]
        with pytest.raises(BadRequest):
            await auto.ack(event.id)
        with pytest.raises(NotFound):
            await manual.ack("no-such-event")
        got = (await _take(manual, 1))[0]
        await manual.ack(got.id)
        with pytest.raises(NotFound):
            await manual.nack(got.id)
        await auto.close()
        await manual.close()

    # -- topics, retention, scale -------------------------------------------

    async def test_topics_list_counts_and_group_lag(self, events: EventsBackend) -> None:
        consumer = await events.consume(NS, "a", ConsumeSpec(group="g"))
        await _publish(events, "a", 5)
        await _publish(events, "b", 2)
        await _take(consumer, 2)
        await consumer.close()
        listed = {t.name: t for t in await events.topics(NS)}
        assert sorted(listed) == ["a", "b"]
        assert (listed["a"].count, listed["a"].last_sequence) == (5, 5)
        assert [(g.name, g.lag) for g in listed["a"].groups] == [("g", 3)]
        assert (listed["b"].count, listed["b"].last_sequence, list(listed["b"].groups)) == (2, 2, [])

    async def test_retention_by_age_keeps_the_sequence_going(self, events: EventsBackend) -> None:
        await _publish(events, "t", 3)
        assert await events.apply_retention() == 0
        assert await events.apply_retention(time.time_ns() + 8 * DAY_NS) == 3
        assert await events.read(NS, "t") == []
        [topic] = await events.topics(NS)
        assert (topic.count, topic.last_sequence) == (0, 3)
        assert (await events.publish(NS, "t", b"x"))[1] == 4

    async def test_retention_by_count_keeps_the_newest(self, events: EventsBackend) -> None:
        async with self._reopened(events, Retention(max_count=2)) as reopened:
            await _publish(reopened, "t", 5)
            await _publish(reopened, "u", 1)
            assert await reopened.apply_retention() == 3
            assert _seqs(await reopened.read(NS, "t")) == [4, 5]
            consumer = await reopened.consume(NS, "t", ConsumeSpec(start=Start.BEGINNING))
            assert _seqs(await _take(consumer, 2)) == [4, 5]
            await consumer.close()

    async def test_ten_thousand_topics_are_cheap(self, events: EventsBackend) -> None:
        started = time.monotonic()
        names = [f"topic.{i}" for i in range(10_000)]
        for chunk in range(0, len(names), 500):
            await events.publish_many(
                NS, [PublishItem(name, name.encode()) for name in names[chunk : chunk + 500]]
            )
        for chunk in range(0, len(names), 500):
            reads = await asyncio.gather(*(events.read(NS, name) for name in names[chunk : chunk + 500]))
            assert [r[0].payload.decode() for r in reads] == names[chunk : chunk + 500]
        assert len(await events.topics(NS)) == 10_000
        assert time.monotonic() - started < 60

    async def _holds(self, consumer: Consumer) -> bool:
        try:
            await asyncio.wait_for(anext(consumer), SHORT)
        except TimeoutError:
            return False
        return True
