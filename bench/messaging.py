"""Messaging through the daemon: events publish, consume, latency and replay, broker fan-out.

One process, one asyncio loop, against a daemon this script started (isolated MICRO_HOME, called
with its owner's credential). Side by side in the same run, the same workload on NATS JetStream
(nats-py, a stream with file storage on the local nats-server) and, for the broker, Redis
PUBLISH/SUBSCRIBE (redis.asyncio). Payloads are 1 KB unless said otherwise.

Durability, compared like for like: micro's SQLite events run with their default
synchronous=NORMAL (WAL): a commit is written to the OS but not fsynced, so a published event
survives the daemon being killed, not necessarily a power loss. JetStream's file store with its
default sync interval (2 minutes) is the same. --full runs micro with synchronous=full instead
(an fsync per commit, shared by the publishes that commit together), which JetStream only does
with sync_interval: always.

Also measured: replay through a second daemon whose events engine is that same JetStream
(MICRO_EVENTS_ADDRESS=nats://...), against replay on JetStream directly.

Targets: single publish >= 0.5x JetStream's rate, bulk publish >= 1x JetStream's, publish->deliver
p50 <= 2 ms, replay of 100,000 stored events >= 50,000 events/s. Fan-out: figures only.
Run: .venv/bin/python bench/messaging.py [--single N] [--bulk N] [--replay N] [--latency N] [--full]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    Daemon,
    Target,
    emit_json,
    fmt_ms,
    median,
    percentile,
    print_table,
    print_targets,
    start_daemon,
)

from micro.broker import BrokerClient
from micro.client import AUTO, Client
from micro.credentials import OwnerToken
from micro.debug import DebugClient
from micro.events import EventsClient
from micro.proto import events_pb2
from micro.transport import connect

PAYLOAD_SIZE = 1024
REPLAY_PAYLOAD_SIZE = 100
IN_FLIGHT = 50
ROUNDS = 3
SUBSCRIBERS = 10
FANOUT_IN_FLIGHT = 10
FANOUT_WINDOW = 300  # messages the publisher may run ahead of the slowest subscriber
NATS_URL = "nats://127.0.0.1:4222"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
SINGLE_LIMIT = 0.5
BULK_LIMIT = 1.0
LATENCY_LIMIT_MS = 2.0
REPLAY_LIMIT = 50_000.0


def payload(index: int, size: int = PAYLOAD_SIZE) -> bytes:
    """``size`` bytes starting with ``index`` (so a receiver can tell which one it got)."""
    head = f"{index:012d}".encode()
    return head + b"x" * (size - len(head))


def index_of(data: bytes) -> int:
    return int(data[:12])


@dataclass
class Side:
    """What one system (micro or JetStream) measured."""

    single_rates: list[float] = field(default_factory=list)  # events/s, 1 in flight, per round
    concurrent_rates: list[float] = field(default_factory=list)  # events/s, IN_FLIGHT in flight
    bulk_rates: list[float] = field(default_factory=list)  # events/s, per round
    consume_rate: float = float("nan")  # events/s, 1 KB, stored, from the beginning
    latencies: list[float] = field(default_factory=list)  # publish -> deliver, seconds
    replay_rate: float = float("nan")  # events/s
    empty_rates: list[float] = field(default_factory=list)  # micro only: Debug.Health, 1 in flight


async def timed(work: Awaitable[int]) -> float:
    """Await ``work`` (which returns how many it did); that many per second."""
    t0 = time.perf_counter()
    count = await work
    return count / (time.perf_counter() - t0)


async def concurrently(op: Callable[[int], Awaitable[Any]], count: int, in_flight: int) -> int:
    indexes = iter(range(count))

    async def worker() -> None:
        for i in indexes:
            await op(i)

    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return count


# -- micro -----------------------------------------------------------------------------------------


class Micro:
    def __init__(self, address: str, credentials: Any = AUTO) -> None:
        self.client = Client(connect(address), timeout=60, credentials=credentials)
        self.events = EventsClient(self.client)

    async def close(self) -> None:
        await self.client.close()

    def publisher(self, topic: str) -> Callable[[int], Awaitable[Any]]:
        """One publish of ``payload(i)`` to ``topic``: what ``single`` runs ``count`` times."""
        return lambda i: self.events.publish(topic, payload(i))

    async def single(self, topic: str, count: int, in_flight: int = 1) -> int:
        return await concurrently(self.publisher(topic), count, in_flight)

    async def empty(self, count: int) -> int:
        """``Debug.Health`` of the events block, 1 in flight: the floor of any call through the daemon."""
        debug = DebugClient(self.client, service="events")
        return await concurrently(lambda i: debug.health(), count, 1)

    async def bulk(self, topic: str, count: int, size: int = PAYLOAD_SIZE, first: int = 0) -> int:
        messages = (payload(i, size) for i in range(first, first + count))
        results = await self.events.publish_many(topic, messages)
        assert len(results) == count
        return count

    async def consume(self, topic: str, count: int, group: str = "") -> int:
        consumer = self.events.consume(topic, group=group, start="beginning")
        got, last = 0, -1
        try:
            async for event in consumer:
                got, last = got + 1, index_of(event.payload)
                if got == count:
                    break
            assert last == count - 1
        finally:
            await consumer.close()
        return got

    async def latency(self, topic: str, count: int) -> list[float]:
        arrived: dict[int, asyncio.Future[float]] = {}
        consumer = self.events.consume(topic)  # a private group: new events only

        async def receive() -> None:
            async for event in consumer:
                future = arrived.get(index_of(event.payload))
                if future is not None and not future.done():
                    future.set_result(time.perf_counter())

        async def publish(i: int) -> None:
            await self.events.publish(topic, payload(i))

        return await _latencies(receive, publish, arrived, count, consumer.close)


async def _latencies(
    receive: Callable[[], Coroutine[Any, Any, None]],
    publish: Callable[[int], Awaitable[None]],
    arrived: dict[int, asyncio.Future[float]],
    count: int,
    close: Callable[[], Awaitable[None]],
) -> list[float]:
    """Publish one at a time; the time from starting each publish to its delivery."""
    loop = asyncio.get_running_loop()
    receiver = asyncio.create_task(receive())
    try:
        warm = -1
        while True:  # until the consumer is surely listening: one delivery
            arrived[warm] = loop.create_future()
            await publish(warm)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(arrived[warm]), 1.0)
                break
            warm -= 1
        found = []
        for i in range(count):
            arrived[i] = loop.create_future()
            t0 = time.perf_counter()
            await publish(i)
            found.append(await asyncio.wait_for(arrived[i], 10) - t0)
        return found
    finally:
        receiver.cancel()
        with contextlib.suppress(BaseException):
            await receiver
        await close()


# -- NATS JetStream --------------------------------------------------------------------------------


class JetStream:
    def __init__(self, nc: Any, js: Any, stream: str) -> None:
        self.nc, self.js, self.stream = nc, js, stream

    @classmethod
    async def connect(cls) -> JetStream | None:
        try:
            import nats
            from nats.js.api import StorageType
        except ImportError:
            print("nats: nats-py not installed (.venv/bin/pip install nats-py), skipped", file=sys.stderr)
            return None

        async def quiet(exc: Exception) -> None:  # nats-py would print every failed attempt
            pass

        try:
            nc = await asyncio.wait_for(
                nats.connect(NATS_URL, connect_timeout=2, allow_reconnect=False, error_cb=quiet), 5
            )
        except Exception as exc:  # NATS is optional: report and go on
            print(f"nats: not reachable at {NATS_URL} ({exc!r}), skipped", file=sys.stderr)
            return None
        js = nc.jetstream(timeout=30)
        stream = f"MICROBENCH{os.getpid()}"
        await js.add_stream(name=stream, subjects=[f"{stream.lower()}.>"], storage=StorageType.FILE)
        return cls(nc, js, stream)

    def subject(self, topic: str) -> str:
        return f"{self.stream.lower()}.{topic}"

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.js.delete_stream(self.stream)
        await self.nc.close()

    def publisher(self, topic: str) -> Callable[[int], Awaitable[Any]]:
        """One ``js.publish`` of ``payload(i)`` to ``topic``'s subject, as ``single`` runs it."""
        subject = self.subject(topic)
        return lambda i: self.js.publish(subject, payload(i))

    async def single(self, topic: str, count: int, in_flight: int = 1) -> int:
        return await concurrently(self.publisher(topic), count, in_flight)

    async def bulk(self, topic: str, count: int, size: int = PAYLOAD_SIZE, first: int = 0) -> int:
        """Pipelined: ``publish_async`` (up to 4,000 awaiting their acks), then wait for every ack."""
        subject = self.subject(topic)
        acks = [await self.js.publish_async(subject, payload(i, size)) for i in range(first, first + count)]
        await self.js.publish_async_completed()
        assert all(ack.done() and not ack.exception() for ack in acks)
        return count

    async def consume(self, topic: str, count: int, durable: str | None = None) -> int:
        """A pull consumer from the first message, no acks (as micro's auto-ack), 1,000 per fetch."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        config = ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL)
        subscription = await self.js.pull_subscribe(self.subject(topic), durable=durable, config=config)
        got = 0
        try:
            while got < count:
                messages = await subscription.fetch(batch=min(1000, count - got), timeout=10)
                got += len(messages)
            assert index_of(messages[-1].data) == count - 1
        finally:
            await subscription.unsubscribe()
        return got

    async def latency(self, topic: str, count: int) -> list[float]:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        arrived: dict[int, asyncio.Future[float]] = {}

        async def on_message(message: Any) -> None:
            future = arrived.get(index_of(message.data))
            if future is not None and not future.done():
                future.set_result(time.perf_counter())

        config = ConsumerConfig(ack_policy=AckPolicy.NONE)
        subscription = await self.js.subscribe(
            self.subject(topic),
            cb=on_message,
            deliver_policy=DeliverPolicy.NEW,
            config=config,
            manual_ack=True,
        )

        async def receive() -> None:
            await asyncio.Event().wait()  # the callback receives

        async def publish(i: int) -> None:
            await self.js.publish(self.subject(topic), payload(i))

        return await _latencies(receive, publish, arrived, count, subscription.unsubscribe)


# -- the floor of one gRPC message per event -------------------------------------------------------

FLOOR_SERVER = """
import asyncio, sys
import grpc
data = bytes.fromhex(sys.argv[1])

async def stream(request, context):
    for _ in range(int(request)):
        yield data

async def main():
    server = grpc.aio.server()
    methods = {"Stream": grpc.unary_stream_rpc_method_handler(stream)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("floor.Floor", methods),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


async def stream_floor(count: int) -> float:
    """Events/s a bare ``grpc.aio`` server in its own process streams to this one, one ``Event``
    (as replay sends it) per message, each parsed here: what any one-message-per-event stream costs."""
    event = events_pb2.Event(
        id="00000000-0000-0000-0000-000000000000",
        topic="replay",
        metadata={"Content-Type": "application/octet-stream"},
        payload=payload(0, REPLAY_PAYLOAD_SIZE),
        timestamp=time.time_ns(),
        sequence=1,
        attempt=1,
    )
    server = subprocess.Popen(
        [sys.executable, "-c", FLOOR_SERVER, event.SerializeToString().hex()],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        import grpc.aio

        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stream = channel.unary_stream("/floor.Floor/Stream")

            async def receive(n: int) -> int:
                got = 0
                async for data in stream(str(n).encode()):
                    events_pb2.Event.FromString(data)
                    got += 1
                return got

            await receive(1000)
            return await timed(receive(count))
    finally:
        server.kill()
        server.wait()


# -- broker fan-out: micro and Redis -----------------------------------------------------------------


@dataclass
class Fanout:
    delivered_per_s: float = float("nan")
    published_per_s: float = float("nan")
    lost: int = 0


async def _fanout(
    subscribe: Callable[[int, Callable[[bytes], None]], Awaitable[Callable[[], Awaitable[None]]]],
    publish: Callable[[bytes], Awaitable[Any]],
    messages: int,
) -> Fanout:
    """``SUBSCRIBERS`` subscribers; ``messages`` published with ``FANOUT_IN_FLIGHT`` in flight, the
    publisher kept within ``FANOUT_WINDOW`` of the slowest subscriber (no buffer overflows)."""
    counts = [0] * SUBSCRIBERS
    probes = [0] * SUBSCRIBERS
    progress = asyncio.Event()

    def receiver(n: int) -> Callable[[bytes], None]:
        def on_message(data: bytes) -> None:
            if data.startswith(b"probe"):
                probes[n] += 1
            else:
                counts[n] += 1
            progress.set()

        return on_message

    stops = [await subscribe(n, receiver(n)) for n in range(SUBSCRIBERS)]
    try:
        deadline = time.monotonic() + 10
        while min(probes) == 0:  # every subscriber is listening
            assert time.monotonic() < deadline, "subscribers never received a probe"
            await publish(b"probe")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
        indexes = iter(range(messages))

        async def publisher() -> None:
            for i in indexes:
                while i - min(counts) > FANOUT_WINDOW:
                    progress.clear()
                    await progress.wait()
                await publish(payload(i))

        t0 = time.perf_counter()
        await asyncio.gather(*(publisher() for _ in range(FANOUT_IN_FLIGHT)))
        published = time.perf_counter() - t0
        deadline = time.monotonic() + 30
        while sum(counts) < messages * SUBSCRIBERS and time.monotonic() < deadline:
            progress.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(progress.wait(), 1)
        elapsed = time.perf_counter() - t0
        return Fanout(sum(counts) / elapsed, messages / published, messages * SUBSCRIBERS - sum(counts))
    finally:
        for stop in stops:
            await stop()


async def micro_fanout(address: str, messages: int) -> Fanout:
    publisher = Client(connect(address), timeout=30)
    clients: list[Client] = []

    async def subscribe(n: int, on_message: Callable[[bytes], None]) -> Callable[[], Awaitable[None]]:
        client = Client(connect(address), timeout=None)
        clients.append(client)

        async def listen() -> None:
            async for message in BrokerClient(client).subscribe("fanout"):
                on_message(message.body)

        task = asyncio.create_task(listen())

        async def stop() -> None:
            task.cancel()  # a subscriber dropped for falling behind shows as messages not delivered
            with contextlib.suppress(BaseException):
                await task

        return stop

    try:
        broker = BrokerClient(publisher)
        return await _fanout(subscribe, lambda data: broker.publish("fanout", data), messages)
    finally:
        for client in [publisher, *clients]:
            await client.close()


async def redis_fanout(messages: int) -> Fanout | None:
    try:
        import redis.asyncio as aioredis
    except ImportError:
        print("redis: redis-py not installed, skipped", file=sys.stderr)
        return None
    r = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT, socket_connect_timeout=2)
    try:
        await r.ping()
    except Exception as exc:  # Redis is optional: report and go on
        print(f"redis: not reachable on {REDIS_HOST}:{REDIS_PORT} ({exc!r}), skipped", file=sys.stderr)
        await r.aclose()
        return None
    channel = f"micro-bench:{os.getpid()}:fanout"
    connections: list[Any] = []

    async def subscribe(n: int, on_message: Callable[[bytes], None]) -> Callable[[], Awaitable[None]]:
        client = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        connections.append((client, pubsub))
        await pubsub.subscribe(channel)

        async def listen() -> None:
            async for message in pubsub.listen():
                if message["type"] == "message":
                    on_message(message["data"])

        task = asyncio.create_task(listen())

        async def stop() -> None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

        return stop

    try:
        return await _fanout(subscribe, lambda data: r.publish(channel, data), messages)
    finally:
        for client, pubsub in connections:
            await pubsub.aclose()
            await client.aclose()
        await r.aclose()


# -- the run -----------------------------------------------------------------------------------------


@dataclass
class Results:
    micro: Side
    jetstream: Side | None
    fanout_micro: Fanout
    fanout_redis: Fanout | None
    args: argparse.Namespace
    extra: dict[str, float] = field(default_factory=dict)


async def replay_through(daemon: Daemon, count: int) -> float:
    """Events/s replayed from the beginning through ``daemon`` (whose events engine is JetStream)."""
    micro = Micro(daemon.address, OwnerToken(Path(daemon.home) / "config" / "auth" / "owner.json"))
    try:
        for chunk in range(0, count, 20_000):
            await micro.bulk("replay", min(20_000, count - chunk), REPLAY_PAYLOAD_SIZE, chunk)
        return await timed(micro.consume("replay", count, "replayers"))
    finally:
        await micro.close()


async def delete_streams(prefix: str) -> None:
    import json

    import nats

    nc = await nats.connect(NATS_URL)
    try:
        answer = await nc.request("$JS.API.STREAM.NAMES", json.dumps({"offset": 0}).encode(), timeout=5)
        for name in json.loads(answer.data).get("streams") or []:
            if name.startswith(f"{prefix.upper()}_EVENTS_"):
                await nc.request(f"$JS.API.STREAM.DELETE.{name}", b"", timeout=30)
    finally:
        await nc.close()


async def run(address: str, server_pid: int, args: argparse.Namespace, js_daemon: Daemon | None) -> Results:
    from _common import process_cpu

    micro = Micro(address)
    jetstream = await JetStream.connect()
    mine, theirs = Side(), Side() if jetstream else None
    systems: list[tuple[Micro | JetStream, Side]] = [(micro, mine)]
    if jetstream is not None and theirs is not None:
        systems.append((jetstream, theirs))
    extra: dict[str, float] = {}
    try:
        for system, _ in systems:  # warm-up: connections, code paths, the stores' first pages
            await system.single("warm", 200, IN_FLIGHT)
            await system.bulk("warm", 1000)
        for r in range(ROUNDS):  # interleaved, the order alternating: drift hits both alike
            for system, side in systems if r % 2 == 0 else systems[::-1]:
                n = args.single // ROUNDS
                side.single_rates.append(await timed(system.single(f"single{r}", n)))
                if system is micro:
                    side.empty_rates.append(await timed(micro.empty(n)))
                side.concurrent_rates.append(await timed(system.single(f"conc{r}", n * 2, IN_FLIGHT)))
                side.bulk_rates.append(await timed(system.bulk(f"bulk{r}", args.bulk)))
        for system, side in systems:
            # The last bulk topic holds args.bulk events of 1 KB: read them all from the beginning.
            side.consume_rate = await timed(system.consume(f"bulk{ROUNDS - 1}", args.bulk))
            side.latencies = await system.latency("latency", args.latency)
        for system, side in systems:
            for chunk in range(0, args.replay, 20_000):
                await system.bulk("replay", min(20_000, args.replay - chunk), REPLAY_PAYLOAD_SIZE, chunk)
            before = process_cpu(server_pid)
            group = "replayers" if system is micro else "REPLAYERS"
            side.replay_rate = await timed(system.consume("replay", args.replay, group))
            if system is micro:
                extra["replay_daemon_cpu_us_per_event"] = (
                    (process_cpu(server_pid) - before) / args.replay * 1e6
                )
    finally:
        await micro.close()
        if jetstream is not None:
            await jetstream.close()
    if js_daemon is not None and jetstream is not None:
        extra["replay_daemon_jetstream_per_s"] = await replay_through(js_daemon, args.replay)
    extra["stream_floor_per_s"] = await stream_floor(args.floor)
    fan_micro = await micro_fanout(address, args.fanout)
    fan_redis = await redis_fanout(args.fanout)
    return Results(mine, theirs, fan_micro, fan_redis, args, extra)


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value == value else "-"


def report(results: Results) -> tuple[dict[str, Any], list[Target]]:
    mine, theirs, args = results.micro, results.jetstream, results.args
    base = theirs or Side()

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b == b and b else "-"

    single, single_js = median(mine.single_rates), median(base.single_rates)
    conc, conc_js = median(mine.concurrent_rates), median(base.concurrent_rates)
    bulk, bulk_js = median(mine.bulk_rates), median(base.bulk_rates)
    empty, floor = median(mine.empty_rates), results.extra["stream_floor_per_s"]
    print(
        f"Events: micro (SQLite, synchronous={'FULL' if args.full else 'NORMAL'}) vs NATS JetStream "
        f"(file storage), {PAYLOAD_SIZE} B payloads, median of {ROUNDS} interleaved rounds\n"
    )
    via_js = results.extra.get("replay_daemon_jetstream_per_s", float("nan"))
    print_table(
        ["workload", "micro events/s", "JetStream events/s", "micro / JetStream"],
        [
            [
                f"publish, 1 in flight ({args.single // ROUNDS}/round)",
                _rate(single),
                _rate(single_js),
                ratio(single, single_js),
            ],
            [
                f"publish, {IN_FLIGHT} in flight ({args.single // ROUNDS * 2}/round)",
                _rate(conc),
                _rate(conc_js),
                ratio(conc, conc_js),
            ],
            [f"bulk publish ({args.bulk}/round)", _rate(bulk), _rate(bulk_js), ratio(bulk, bulk_js)],
            [
                f"consume {args.bulk} stored, from the beginning",
                _rate(mine.consume_rate),
                _rate(base.consume_rate),
                ratio(mine.consume_rate, base.consume_rate),
            ],
            [
                f"replay {args.replay:,} x {REPLAY_PAYLOAD_SIZE} B, durable group",
                _rate(mine.replay_rate),
                _rate(base.replay_rate),
                ratio(mine.replay_rate, base.replay_rate),
            ],
            [
                f"replay {args.replay:,} x {REPLAY_PAYLOAD_SIZE} B through a daemon on JetStream",
                _rate(via_js),
                _rate(base.replay_rate),
                ratio(via_js, base.replay_rate),
            ],
            ["reference: empty call (Debug.Health), 1 in flight", _rate(empty), "-", "-"],
            [
                f"reference: bare grpc.aio stream, 1 Event ({REPLAY_PAYLOAD_SIZE} B) per message",
                _rate(floor),
                "-",
                "-",
            ],
        ],
    )
    print(
        "\npublish: micro EventsClient.publish (over the client's PublishStream); JetStream js.publish."
        "\nbulk: micro publish_many (PublishBatch calls of 1,000); JetStream publish_async"
        " (4,000 pending), then every ack.\nconsume/replay: micro auto-ack consumer (ConsumeBatches,"
        " up to 500 events a message); JetStream pull consumer, AckNone, fetch 1,000.\nreferences:"
        " the floor of one call through the daemon (single publish), and of a stream that sends one"
        "\nevent per gRPC message, as Consume does (a grpc.aio server process with nothing else to do).\n"
    )
    daemon_us = results.extra.get("replay_daemon_cpu_us_per_event", 0)
    print(
        f"single publish / empty call: {single / empty:.2f}x;  replay / stream floor: "
        f"{mine.replay_rate / floor:.2f}x;  daemon CPU per replayed event: {daemon_us:.0f} us\n"
    )
    print(f"publish -> deliver, {args.latency} events one at a time, {PAYLOAD_SIZE} B:\n")
    lat_rows = [["micro", fmt_ms(percentile(mine.latencies, 50)), fmt_ms(percentile(mine.latencies, 99))]]
    if theirs:
        lat_rows.append(
            ["JetStream", fmt_ms(percentile(theirs.latencies, 50)), fmt_ms(percentile(theirs.latencies, 99))]
        )
    print_table(["system", "p50 ms", "p99 ms"], lat_rows)

    fm, fr = results.fanout_micro, results.fanout_redis
    print(
        f"\nBroker fan-out: 1 topic, {SUBSCRIBERS} subscribers, {args.fanout} messages of {PAYLOAD_SIZE} B"
        f" ({FANOUT_IN_FLIGHT} publishes in flight)\n"
    )
    fan_rows = [["micro broker", _rate(fm.delivered_per_s), _rate(fm.published_per_s), str(fm.lost)]]
    if fr:
        fan_rows.append(
            ["Redis PUBLISH/SUBSCRIBE", _rate(fr.delivered_per_s), _rate(fr.published_per_s), str(fr.lost)]
        )
    print_table(["system", "delivered msgs/s", "published msgs/s", "not delivered"], fan_rows)
    if fr:
        print(f"micro / Redis delivered: {fm.delivered_per_s / fr.delivered_per_s:.2f}x")

    targets = []
    if theirs:
        targets += [
            Target("single publish / JetStream", single / single_js, SINGLE_LIMIT, at_least=True),
            Target("bulk publish / JetStream", bulk / bulk_js, BULK_LIMIT, at_least=True),
        ]
    targets += [
        Target("publish->deliver p50", percentile(mine.latencies, 50) * 1000, LATENCY_LIMIT_MS, unit="ms"),
        Target("replay 100k events/s", mine.replay_rate, REPLAY_LIMIT, unit="events/s", at_least=True),
    ]
    print_targets(targets)

    def side_json(side: Side | None) -> dict[str, Any] | None:
        if side is None:
            return None
        return {
            "single_per_s": round(median(side.single_rates), 1),
            "single_rounds": [round(x, 1) for x in side.single_rates],
            "concurrent_per_s": round(median(side.concurrent_rates), 1),
            "bulk_per_s": round(median(side.bulk_rates), 1),
            "bulk_rounds": [round(x, 1) for x in side.bulk_rates],
            "consume_per_s": round(side.consume_rate, 1),
            "latency_p50_ms": round(percentile(side.latencies, 50) * 1000, 3),
            "latency_p99_ms": round(percentile(side.latencies, 99) * 1000, 3),
            "replay_per_s": round(side.replay_rate, 1),
            **({"empty_call_per_s": round(median(side.empty_rates), 1)} if side.empty_rates else {}),
        }

    def fan_json(fan: Fanout | None) -> dict[str, Any] | None:
        if fan is None:
            return None
        return {
            "delivered_per_s": round(fan.delivered_per_s, 1),
            "published_per_s": round(fan.published_per_s, 1),
            "lost": fan.lost,
        }

    figures = {
        "payload_bytes": PAYLOAD_SIZE,
        "replay_payload_bytes": REPLAY_PAYLOAD_SIZE,
        "micro": side_json(mine),
        "jetstream": side_json(theirs),
        "fanout": {"subscribers": SUBSCRIBERS, "micro": fan_json(fm), "redis": fan_json(fr)},
        **{k: round(v, 1) for k, v in results.extra.items()},
    }
    return figures, targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--single", type=int, default=1500, help="single publishes, over all rounds (1500)")
    parser.add_argument("--bulk", type=int, default=10_000, help="events per bulk publish round (10000)")
    parser.add_argument("--latency", type=int, default=500, help="publish->deliver samples (500)")
    parser.add_argument("--replay", type=int, default=100_000, help="events to replay (100000)")
    parser.add_argument("--fanout", type=int, default=5000, help="broker messages to fan out (5000)")
    parser.add_argument("--floor", type=int, default=20_000, help="messages of the gRPC stream floor (20000)")
    parser.add_argument("--full", action="store_true", help="micro's SQLite events with synchronous=full")
    parser.add_argument(
        "--no-jetstream-daemon", action="store_true", help="skip the replay through a daemon on JetStream"
    )
    args = parser.parse_args()
    events = {"MICRO_EVENTS_ADDRESS": "sqlite://?synchronous=full"} if args.full else {}
    prefix = f"microbench{os.getpid()}"
    with start_daemon(**events) as daemon, contextlib.ExitStack() as more:
        os.environ["MICRO_HOME"] = daemon.home  # the client calls as the daemon's local owner
        js_daemon = None
        if not args.no_jetstream_daemon:
            js_daemon = more.enter_context(start_daemon(MICRO_EVENTS_ADDRESS=f"{NATS_URL}?prefix={prefix}"))
        try:
            results = asyncio.run(run(daemon.address, daemon.pid, args, js_daemon))
        finally:
            if js_daemon is not None:
                with contextlib.suppress(Exception):
                    asyncio.run(delete_streams(prefix))
        if daemon.process.poll() is not None:
            raise RuntimeError(f"micro server died during the run:\n{daemon.log_tail()}")
    figures, targets = report(results)
    emit_json("messaging", figures, targets)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(130)
