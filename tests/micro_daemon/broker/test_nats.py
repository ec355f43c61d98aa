"""The NATS broker against a real NATS server.

Not skipped when the server is missing: CI starts NATS, and a missing server
fails every test here with how to provide one. ``MICRO_TEST_NATS`` names the
server (default ``nats://127.0.0.1:4222``). Each test subscribes in a
namespace of its own, so runs sharing a server do not meet.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TypeVar

import nats
import nats.errors
import pytest
from nats.aio.client import Client

from micro.errors import BadRequest, PayloadTooLarge, ServiceUnavailable, SetupError, TooManyRequests
from micro.proto import broker_pb2
from micro.testing.messaging import BrokerContract
from micro_daemon.broker.backend import BrokerBackend, Subscription
from micro_daemon.broker.nats import NatsBroker, map_nats_exceptions, open_nats, shown_address, subject
from micro_daemon.engines import open_engine

TIMEOUT = 5.0
T = TypeVar("T")


@pytest.fixture
async def broker(nats_url: str) -> AsyncIterator[NatsBroker]:
    broker = await NatsBroker.open(nats_url, buffer=50)
    yield broker
    await broker.close()


@pytest.fixture
def ns() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def raw(nats_url: str) -> AsyncIterator[Client]:
    """A plain nats-py connection, as another NATS client would see the broker."""
    connection = await nats.connect(nats_url)
    yield connection
    await connection.close()


class TestNatsBroker(BrokerContract):
    slow_buffer = 50
    counts_deliveries = False

    @pytest.fixture
    async def broker(self, nats_url: str, ns: str) -> AsyncIterator[BrokerBackend]:
        broker = await NatsBroker.open(nats_url, buffer=self.slow_buffer)
        # The suite's namespaces ("ns", "one", "two") are made unique to this test.
        yield _Namespaced(broker, ns)
        await broker.close()


class _Namespaced(BrokerBackend):
    def __init__(self, broker: BrokerBackend, prefix: str) -> None:
        self._broker = broker
        self._prefix = prefix

    async def publish(self, namespace: str, topic: str, message: broker_pb2.Message) -> int:
        return await self._broker.publish(f"{self._prefix}-{namespace}", topic, message)

    async def subscribe(self, namespace: str, topic: str, queue: str = "") -> Subscription:
        return await self._broker.subscribe(f"{self._prefix}-{namespace}", topic, queue)

    async def close(self) -> None:
        await self._broker.close()


async def within(awaitable: Awaitable[T]) -> T:
    return await asyncio.wait_for(awaitable, TIMEOUT)


def message(body: bytes, **header: str) -> broker_pb2.Message:
    return broker_pb2.Message(header=header, body=body)


async def test_subjects_keep_namespaces_apart(broker: NatsBroker, ns: str) -> None:
    assert subject("micro", "orders.created") == "micro.broker.micro.orders.created"
    assert subject("a.b", "c") != subject("a", "b.c")
    dotted = await broker.subscribe(f"{ns}.b", "c")
    plain = await broker.subscribe(ns, "b.c")
    await broker.publish(ns, "b.c", message(b"plain"))
    await broker.publish(f"{ns}.b", "c", message(b"dotted"))
    assert (await within(anext(dotted))).body == b"dotted"
    assert (await within(anext(plain))).body == b"plain"
    await dotted.close()
    await plain.close()


HEADERS = {
    "Content-Type": "application/json; charset=utf-8",
    "": "empty name",
    "with space": "  padded both ends  ",
    "colon:name": "line\r\nbreak\ttab",
    "percent%": "100% sure %41",
    "ünï": "ñ 日本",
    "blank": "   ",
    "nothing": "",
}


async def test_any_header_round_trips(broker: NatsBroker, ns: str) -> None:
    async with await broker.subscribe(ns, "t") as subscription:
        await broker.publish(ns, "t", message(b"x", **HEADERS))
        received = await within(anext(subscription))
    assert dict(received.header) == HEADERS


async def test_plain_nats_clients_interoperate(broker: NatsBroker, raw: Client, ns: str) -> None:
    seen = await raw.subscribe(f"micro.broker.{ns}.orders.created")
    await raw.flush()
    async with await broker.subscribe(ns, "orders.created") as subscription:
        await broker.publish(ns, "orders.created", message(b"from micro", **{"Content-Type": "text/plain"}))
        got = await seen.next_msg(TIMEOUT)
        assert (got.data, got.headers) == (b"from micro", {"Content-Type": "text/plain"})
        await raw.publish(f"micro.broker.{ns}.orders.created", b"from nats", headers={"Trace-Id": "7"})
        assert [(await within(anext(subscription))).body for _ in range(2)] == [b"from micro", b"from nats"]
    await seen.unsubscribe()


async def test_brokers_on_two_connections_share_topics_and_queues(nats_url: str, ns: str) -> None:
    first = await NatsBroker.open(nats_url)
    second = await NatsBroker.open(nats_url)
    try:
        members = [
            await first.subscribe(ns, "jobs", queue="workers"),
            await second.subscribe(ns, "jobs", "workers"),
        ]
        everyone = await second.subscribe(ns, "jobs")
        for i in range(20):
            await first.publish(ns, "jobs", message(b"%d" % i))
        assert [(await within(anext(everyone))).body for _ in range(20)] == [b"%d" % i for i in range(20)]
        shares = [await _drain(member) for member in members]
        assert sorted(int(body) for share in shares for body in share) == list(range(20))
    finally:
        await first.close()
        await second.close()


async def _drain(subscription: Subscription) -> list[bytes]:
    bodies = []
    with contextlib.suppress(TimeoutError):
        while True:
            bodies.append((await asyncio.wait_for(anext(subscription), 0.3)).body)
    await subscription.close()
    return bodies


async def test_a_dropped_subscriber_stops_receiving(broker: NatsBroker, ns: str) -> None:
    slow = await broker.subscribe(ns, "t")
    for i in range(60):
        await broker.publish(ns, "t", message(b"%d" % i))
    await broker._connection.flush()
    await asyncio.sleep(0.05)
    assert not broker._subscriptions
    got = []
    with pytest.raises(TooManyRequests, match="50 messages behind"):
        while True:
            got.append((await within(anext(slow))).body)
    assert got == [b"%d" % i for i in range(50)]
    with pytest.raises(StopAsyncIteration):
        await anext(slow)


async def test_overflowing_the_nats_pending_queue_drops_the_subscriber(broker: NatsBroker, ns: str) -> None:
    subscription = await broker.subscribe(ns, "t")
    [nats_subscription] = broker._subscriptions.values()
    broker._on_error(nats.errors.SlowConsumerError(subject="s", reply="", sid=0, sub=nats_subscription))
    with pytest.raises(TooManyRequests, match="pending queue overflowed"):
        await within(anext(subscription))
    assert not broker._subscriptions


async def test_abandoned_subscription_is_unsubscribed(broker: NatsBroker, ns: str) -> None:
    subscription = await broker.subscribe(ns, "t")
    [nats_subscription] = broker._subscriptions.values()
    del subscription
    gc.collect()
    await asyncio.sleep(0.01)
    assert not broker._subscriptions
    assert nats_subscription._id not in broker._connection._subs


async def test_queue_names_are_checked(broker: NatsBroker, ns: str) -> None:
    with pytest.raises(BadRequest):
        await broker.subscribe(ns, "t", queue="two words")
    async with await broker.subscribe(ns, "t", queue="a.b*>") as odd:
        await broker.publish(ns, "t", message(b"ok"))
        assert (await within(anext(odd))).body == b"ok"


async def test_message_over_the_servers_limit_is_too_large(nats_url: str, ns: str) -> None:
    broker = await NatsBroker.open(nats_url, max_message_bytes=4 * 1024 * 1024)
    try:
        with pytest.raises(PayloadTooLarge, match="NATS server"):
            await broker.publish(ns, "t", message(b"x" * (2 * 1024 * 1024)))
    finally:
        await broker.close()


async def test_lost_connection_is_service_unavailable(nats_url: str, ns: str) -> None:
    broker = await NatsBroker.open(nats_url)
    subscription = await broker.subscribe(ns, "t")
    assert await broker.health() == "ok"
    await broker._connection.close()
    assert await broker.health() == f"the connection to NATS at {shown_address(nats_url)} is closed"
    with pytest.raises(ServiceUnavailable, match="closed"):
        await within(anext(subscription))
    with pytest.raises(ServiceUnavailable, match=re.escape(shown_address(nats_url))):
        await broker.publish(ns, "t", message(b"x"))
    await broker.close()
    assert await broker.health() == "closed"
    with pytest.raises(ServiceUnavailable, match="closed"):
        await broker.subscribe(ns, "t")


async def test_unreachable_nats_is_a_setup_error_without_credentials() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(SetupError) as info:
        await NatsBroker.open(f"nats://micro:hunter2@127.0.0.1:{port}")
    assert info.value.detail.startswith(f"cannot connect to NATS at nats://127.0.0.1:{port}: ")
    assert "hunter2" not in str(info.value) and "micro:" not in info.value.detail
    assert info.value.id == "broker"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://u:p@host:4222", "nats://host:4222"),
        ("tls://token@host", "tls://host"),
        ("127.0.0.1:4222", "nats://127.0.0.1:4222"),
        ("nats://a:1, nats://x:y@b:2", "nats://a:1,nats://b:2"),
        ("nats://u:p@[::1]:4222", "nats://[::1]:4222"),
        ("nats://host:notaport", "nats://host"),
    ],
)
def test_shown_address_leaves_out_credentials(url: str, shown: str) -> None:
    assert shown_address(url) == shown


def test_nats_errors_are_mapped() -> None:
    with pytest.raises(PayloadTooLarge) as too_large:
        with map_nats_exceptions("broker", "nats://h:1"):
            raise nats.errors.MaxPayloadError
    assert too_large.value.id == "broker"
    for error in (nats.errors.ConnectionClosedError(), nats.errors.TimeoutError(), ConnectionResetError()):
        with pytest.raises(ServiceUnavailable, match="nats://h:1"):
            with map_nats_exceptions("broker", "nats://h:1"):
                raise error


async def test_the_engine_factory_takes_a_prefix(nats_url: str, raw: Client, ns: str, tmp_path: Path) -> None:
    prefix = f"t_{uuid.uuid4().hex[:8]}"
    seen = await raw.subscribe(f"{prefix}.broker.{ns}.t")
    await raw.flush()
    broker = await open_engine("broker", f"{nats_url}?prefix={prefix}", "platform", tmp_path)
    try:
        assert isinstance(broker, NatsBroker)
        await broker.publish(ns, "t", message(b"x"))
        assert (await seen.next_msg(TIMEOUT)).data == b"x"
    finally:
        await broker.close()


@pytest.mark.parametrize("query", ["?prefix=a.b", "?prefix=", "?bucket=x"])
async def test_the_engine_factory_refuses_bad_options(nats_url: str, query: str, tmp_path: Path) -> None:
    with pytest.raises(SetupError) as info:
        await open_nats(f"nats://user:hunter2@127.0.0.1:4222{query}", tmp_path)
    assert "hunter2" not in info.value.detail
