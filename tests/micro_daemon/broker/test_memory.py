from __future__ import annotations

import gc
from collections.abc import AsyncIterator

import pytest

from micro.errors import BadRequest, PayloadTooLarge, TooManyRequests
from micro.proto import broker_pb2
from micro.testing.messaging import BrokerContract
from micro_daemon.broker import backend
from micro_daemon.broker.backend import BrokerBackend, validate_topic
from micro_daemon.broker.memory import MemoryBroker


class TestMemoryBroker(BrokerContract):
    slow_buffer = 50

    @pytest.fixture
    async def broker(self) -> AsyncIterator[BrokerBackend]:
        broker = MemoryBroker(buffer=self.slow_buffer)
        yield broker
        await broker.close()


async def test_a_slow_queue_member_is_dropped_and_the_message_goes_to_another() -> None:
    broker = MemoryBroker(buffer=2)
    slow = await broker.subscribe("ns", "t", queue="q")
    fast = await broker.subscribe("ns", "t", queue="q")
    got = []
    for i in range(6):
        assert await broker.publish("ns", "t", broker_pb2.Message(body=b"%d" % i)) == 1
        if i % 2 or i >= 4:
            got.append((await anext(fast)).body)
    assert got == [b"1", b"3", b"4", b"5"]
    assert [(await anext(slow)).body for _ in range(2)] == [b"0", b"2"]
    with pytest.raises(TooManyRequests, match="2 messages behind"):
        await anext(slow)
    await broker.close()


async def test_abandoned_subscription_is_unregistered() -> None:
    broker = MemoryBroker()
    subscription = await broker.subscribe("ns", "t")
    del subscription
    gc.collect()
    assert await broker.publish("ns", "t", broker_pb2.Message(body=b"x")) == 0
    await broker.close()


async def test_limits_are_configurable() -> None:
    broker = MemoryBroker(max_message_bytes=10)
    with pytest.raises(PayloadTooLarge):
        await broker.publish("ns", "t", broker_pb2.Message(body=b"x" * 11))
    with pytest.raises(BadRequest):
        await broker.subscribe("ns", "t", queue="two words")
    with pytest.raises(ValueError):
        MemoryBroker(buffer=0)
    await broker.close()


def test_validate_topic_explains() -> None:
    assert validate_topic("a.b") == "a.b"
    with pytest.raises(BadRequest, match="wildcards"):
        validate_topic("a.*")
    with pytest.raises(BadRequest, match="segments"):
        validate_topic("a..b")
    with pytest.raises(BadRequest) as caught:
        validate_topic("")
    assert caught.value.id == "broker"


def test_validate_topic_remembers_only_valid_topics_and_a_bounded_number() -> None:
    for i in range(backend._VALID_TOPICS_LIMIT + 5):
        validate_topic(f"orders.{i}")
    assert len(backend._VALID_TOPICS) <= backend._VALID_TOPICS_LIMIT
    assert validate_topic("orders.1") == "orders.1"
    for bad in ("a.*", "a..b", "a b", ""):
        for _ in range(2):  # a refusal is never remembered as valid
            with pytest.raises(BadRequest):
                validate_topic(bad)
