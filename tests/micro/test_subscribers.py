"""@service.subscribe and @service.consume against a real daemon on the test's loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from micro import Service
from micro.broker import BrokerClient
from micro.client import Client
from micro.events import EventsClient
from micro.home import Home
from micro.proto import broker_pb2, events_pb2, registry_pb2
from micro.registry import RegistryClient
from micro.transport import GrpcTransport
from micro_daemon.app import Daemon
from micro_daemon.settings import Settings

NS = "micro"
WAIT = 5.0


@pytest.fixture
async def services() -> AsyncIterator[Callable[[str], Service]]:
    """New ``Service``s, each stopped at the end of the test."""
    made: list[Service] = []

    def make(name: str) -> Service:
        made.append(Service(name))
        return made[-1]

    yield make
    for service in made:
        await service.stop(grace=0)


async def eventually(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "timed out waiting"
        await asyncio.sleep(0.01)


def subscribers(daemon: Daemon, topic: str) -> int:
    """How many broker subscriptions of ``topic`` the daemon holds now."""
    found = daemon._broker._topics.get((NS, topic))  # type: ignore[union-attr]
    if found is None:
        return 0
    return len(found.everyone) + sum(len(queue.members) for queue in found.queues.values())


def consumers(daemon: Daemon, topic: str, group: str) -> int:
    """How many consumers of ``group`` on ``topic`` the daemon holds now."""
    state = daemon._events._topics.get((NS, topic))  # type: ignore[union-attr]
    found = state.groups.get(group) if state is not None else None
    return len(found.consumers) if found is not None else 0


async def test_a_subscriber_decodes_what_its_parameter_asks_for(
    daemon: Daemon, client: Client, services: Callable[[str], Service]
) -> None:
    got: dict[str, list[Any]] = {"json": [], "proto": [], "bytes": [], "raw": []}
    service = services("decoder")

    @service.subscribe("things")
    async def as_json(message) -> None:  # no annotation: the JSON value
        got["json"].append(message)

    @service.subscribe("things")
    async def as_proto(message: registry_pb2.Node) -> None:
        got["proto"].append(message)

    @service.subscribe("things")
    async def as_bytes(message: bytes) -> None:
        got["bytes"].append(message)

    @service.subscribe("things")
    async def as_raw(message: broker_pb2.Message) -> None:
        got["raw"].append(message)

    await service.start()
    await eventually(lambda: subscribers(daemon, "things") == 4)
    broker = BrokerClient(client)
    await broker.publish("things", {"id": "n1", "address": "a:1"})
    await broker.publish("things", registry_pb2.Node(id="n2"), header={"trace": "t2"})
    await eventually(lambda: all(len(values) == 2 for values in got.values()))

    assert got["json"][0] == {"id": "n1", "address": "a:1"}
    assert got["json"][1] == registry_pb2.Node(id="n2").SerializeToString()  # not JSON: the bytes
    assert got["proto"] == [registry_pb2.Node(id="n1", address="a:1"), registry_pb2.Node(id="n2")]
    assert got["bytes"] == [b'{"id":"n1","address":"a:1"}', registry_pb2.Node(id="n2").SerializeToString()]
    assert got["raw"][1].header["trace"] == "t2"
    assert got["raw"][1].header["Content-Type"] == "application/protobuf"
    assert got["raw"][0].header["Content-Type"] == "application/json"


async def test_a_message_that_does_not_decode_costs_only_itself(
    daemon: Daemon, client: Client, services: Callable[[str], Service], caplog: pytest.LogCaptureFixture
) -> None:
    got: list[registry_pb2.Node] = []
    service = services("strict")

    @service.subscribe("nodes")
    async def on_node(node: registry_pb2.Node) -> None:
        got.append(node)

    await service.start()
    await eventually(lambda: subscribers(daemon, "nodes") == 1)
    broker = BrokerClient(client)
    with caplog.at_level(logging.ERROR, logger="micro.service"):
        await broker.publish("nodes", {"no_such_field": 1})  # not a Node
        await broker.publish("nodes", {"id": "good"})
        await eventually(lambda: len(got) == 1)
    assert got == [registry_pb2.Node(id="good")]
    assert "nodes" in caplog.text


async def test_an_event_that_does_not_decode_is_retried_then_dead_lettered(
    daemon: Daemon, client: Client, services: Callable[[str], Service]
) -> None:
    got: list[registry_pb2.Node] = []
    service = services("typed")

    @service.consume("nodes", retry_limit=2)
    async def on_node(node: registry_pb2.Node) -> None:
        got.append(node)

    await service.start()
    await eventually(lambda: consumers(daemon, "nodes", "typed") == 1)
    events = EventsClient(client)
    await events.publish_many("nodes", [{"no_such_field": 1}, {"id": "good"}])
    await eventually(lambda: got == [registry_pb2.Node(id="good")])
    for _ in range(250):
        if dead := await events.read("nodes.dead"):
            break
        await asyncio.sleep(0.02)
    assert [letter.payload for letter in dead] == [b'{"no_such_field":1}']


async def test_queue_groups_share_and_everyone_else_gets_all(
    daemon: Daemon, client: Client, services: Callable[[str], Service]
) -> None:
    shared: dict[str, list[int]] = {"a": [], "b": []}
    everything: list[int] = []
    service = services("sharing")

    @service.subscribe("jobs", queue="workers")
    async def worker_a(n: int) -> None:
        shared["a"].append(n)

    @service.subscribe("jobs", queue="workers")
    async def worker_b(n: int) -> None:
        shared["b"].append(n)

    @service.subscribe("jobs")
    async def audit(n: int) -> None:
        everything.append(n)

    await service.start()
    await eventually(lambda: subscribers(daemon, "jobs") == 3)
    broker = BrokerClient(client)
    for n in range(20):
        await broker.publish("jobs", n)
    await eventually(lambda: len(everything) == 20 and len(shared["a"]) + len(shared["b"]) == 20)
    assert everything == list(range(20))
    assert sorted(shared["a"] + shared["b"]) == list(range(20))
    assert shared["a"] and shared["b"]


async def test_each_event_once_per_group(
    daemon: Daemon, client: Client, services: Callable[[str], Service]
) -> None:
    billing: list[int] = []
    shipping: list[int] = []
    service = services("orders")

    @service.consume("orders", group="billing")
    async def bill(order: dict[str, int]) -> None:
        billing.append(order["n"])

    @service.consume("orders", group="shipping")
    async def ship(order: dict[str, int]) -> None:
        shipping.append(order["n"])

    await service.start()
    await eventually(
        lambda: consumers(daemon, "orders", "billing") == 1 and consumers(daemon, "orders", "shipping") == 1
    )
    events = EventsClient(client)
    await events.publish_many("orders", [{"n": n} for n in range(10)])
    await eventually(lambda: len(billing) == 10 and len(shipping) == 10)
    await asyncio.sleep(0.2)  # nothing more arrives
    assert billing == list(range(10)) and shipping == list(range(10))
    await eventually(lambda: _lags(daemon) == {"billing": 0, "shipping": 0})


def _lags(daemon: Daemon) -> dict[str, int]:
    state = daemon._events._topics.get((NS, "orders"))  # type: ignore[union-attr]
    if state is None:
        return {}
    return {name: group.lag(1) + len(group.pending) for name, group in state.groups.items()}


async def test_the_group_defaults_to_the_service_name(
    daemon: Daemon, client: Client, services: Callable[[str], Service]
) -> None:
    service = services("billing-svc")

    @service.consume("invoices")
    async def on_invoice(invoice: Any) -> None:
        pass

    await service.start()
    await eventually(lambda: consumers(daemon, "invoices", "billing-svc") == 1)


async def test_a_handler_that_raises_is_retried_then_dead_lettered(
    daemon: Daemon, client: Client, services: Callable[[str], Service]
) -> None:
    attempts: dict[int, list[int]] = {}
    done: list[int] = []
    service = services("flaky")

    @service.consume("payments", retry_limit=3)
    async def pay(event: events_pb2.Event) -> None:
        attempts.setdefault(event.sequence, []).append(event.attempt)
        if event.payload == b'"poison"':
            raise ValueError("cannot pay that")
        if event.payload == b'"twice"' and event.attempt == 1:
            raise ValueError("try again")
        done.append(event.sequence)

    await service.start()
    await eventually(lambda: consumers(daemon, "payments", "flaky") == 1)
    events = EventsClient(client)
    [(_, poison), (_, twice), (_, fine)] = await events.publish_many("payments", ["poison", "twice", "fine"])

    async def dead() -> list[events_pb2.Event]:
        return await events.read("payments.dead")

    deadline = asyncio.get_running_loop().time() + WAIT
    while not (letters := await dead()):
        assert asyncio.get_running_loop().time() < deadline, "no dead letter"
        await asyncio.sleep(0.02)
    [letter] = letters
    assert letter.payload == b'"poison"'
    assert letter.metadata["original-topic"] == "payments"
    assert letter.metadata["original-sequence"] == str(poison)
    assert letter.metadata["dead-letter-reason"]
    assert letter.metadata["Content-Type"] == "application/json"
    await eventually(lambda: sorted(done) == [twice, fine])
    assert attempts[poison] == [1, 2, 3]
    assert attempts[twice] == [1, 2]
    assert attempts[fine] == [1]
    await asyncio.sleep(0.2)
    assert attempts[poison] == [1, 2, 3]  # not delivered again after it was dead-lettered


async def test_instances_of_a_service_share_its_events(
    daemon: Daemon, client: Client, services: Callable[[str], Service]
) -> None:
    received: list[list[int]] = [[], []]
    for got in received:
        instance = services("worker")

        @instance.consume("tasks")
        async def work(n: int, got: list[int] = got) -> None:
            got.append(n)

        await instance.start()
    await eventually(lambda: consumers(daemon, "tasks", "worker") == 2)
    events = EventsClient(client)
    for n in range(30):  # one at a time: both instances are waiting when each arrives
        await events.publish("tasks", n)
    await eventually(lambda: len(received[0]) + len(received[1]) == 30)
    await asyncio.sleep(0.2)
    assert sorted(received[0] + received[1]) == list(range(30))
    assert received[0] and received[1]


async def test_subscribers_and_consumers_are_listed_as_endpoints(
    daemon: Daemon, client: Client, services: Callable[[str], Service]
) -> None:
    service = services("listed")

    @service.subscribe("orders.created", queue="mail")
    async def on_created(order: Any) -> None:
        pass

    @service.consume("orders", group="billing")
    async def on_order(order: Any) -> None:
        pass

    await service.start()
    [entry] = await RegistryClient(client).get_service("listed")
    endpoints = {e.name: dict(e.metadata) for e in entry.endpoints if e.metadata.get("subscriber")}
    prefix = "test_subscribers_and_consumers_are_listed_as_endpoints."
    assert endpoints == {
        prefix + "on_created": {"subscriber": "true", "topic": "orders.created", "queue": "mail"},
        prefix + "on_order": {"subscriber": "true", "topic": "orders", "group": "billing"},
    }


def test_a_subscriber_must_be_async(micro_home: Path) -> None:
    service = Service("sync")

    def on_message(message: Any) -> None:
        pass

    with pytest.raises(TypeError, match="async"):
        service.subscribe("t")(on_message)  # type: ignore[arg-type]


async def test_subscribers_come_back_after_the_daemon_restarts(
    daemon: Daemon, micro_home: Path, services: Callable[[str], Service]
) -> None:
    messages: list[str] = []
    events: list[str] = []
    service = services("survivor")

    @service.subscribe("pings")
    async def on_ping(text: str) -> None:
        messages.append(text)

    @service.consume("jobs")
    async def on_job(text: str) -> None:
        events.append(text)

    await service.start()
    await eventually(lambda: subscribers(daemon, "pings") == 1 and consumers(daemon, "jobs", "survivor") == 1)
    async with _client(daemon.address) as before:
        await BrokerClient(before).publish("pings", "before")
        await EventsClient(before).publish("jobs", "before")
        await eventually(lambda: messages == ["before"] and events == ["before"])
    address = daemon.address
    await daemon.stop(grace=0)

    restarted = Daemon(Settings.load(address=address), Home.from_env())
    await restarted.start()
    try:
        async with _client(address) as after:
            await EventsClient(after).publish("jobs", "while-away")  # before the consumer is back
            await eventually(lambda: subscribers(restarted, "pings") == 1, timeout=10)
            await BrokerClient(after).publish("pings", "after")
            await EventsClient(after).publish("jobs", "after")
            await eventually(lambda: messages == ["before", "after"], timeout=10)
            # At least once: "before" comes again if its ack (sent in batches) had not reached the
            # daemon when it stopped; nothing is lost and the order holds.
            await eventually(
                lambda: list(dict.fromkeys(events)) == ["before", "while-away", "after"], timeout=10
            )
    finally:
        await service.stop(grace=0)
        await restarted.stop(grace=0)


@contextlib.asynccontextmanager
async def _client(address: str) -> AsyncIterator[Client]:
    client = Client(GrpcTransport(address), timeout=WAIT)
    try:
        yield client
    finally:
        await client.close()


async def test_a_consumer_from_the_beginning_does_not_start_over_when_it_reconnects(
    daemon: Daemon, client: Client, services: Callable[[str], Service]
) -> None:
    got: list[int] = []
    await EventsClient(client).publish_many("history", [1, 2, 3])
    service = services("replayer")

    @service.consume("history", start="beginning")
    async def on_event(n: int) -> None:
        got.append(n)

    await service.start()
    await eventually(lambda: got == [1, 2, 3])
    address = daemon.address
    await daemon.stop(grace=0)
    restarted = Daemon(Settings.load(address=address), Home.from_env())
    await restarted.start()
    try:
        await eventually(lambda: consumers(restarted, "history", "replayer") == 1, timeout=10)
        async with _client(address) as after:
            await EventsClient(after).publish("history", 4)
        await eventually(lambda: len(got) >= 4)
        await asyncio.sleep(0.2)
        assert got == [1, 2, 3, 4]
    finally:
        await service.stop(grace=0)
        await restarted.stop(grace=0)


async def test_a_restarted_service_resumes_its_group_instead_of_starting_over(
    daemon: Daemon, client: Client, services: Callable[[str], Service]
) -> None:
    got: list[int] = []
    await EventsClient(client).publish_many("ledger", [1, 2])

    def consuming() -> Service:
        service = services("bookkeeper")

        @service.consume("ledger", start="beginning")
        async def on_event(n: int) -> None:
            got.append(n)

        return service

    first = consuming()
    await first.start()
    await eventually(lambda: got == [1, 2])
    await first.stop(grace=0)
    await EventsClient(client).publish("ledger", 3)
    second = consuming()  # a new process of the same service: its group already exists
    await second.start()
    try:
        await eventually(lambda: len(got) >= 3)
        await asyncio.sleep(0.2)
        assert got == [1, 2, 3]
    finally:
        await second.stop(grace=0)
