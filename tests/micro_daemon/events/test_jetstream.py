"""The JetStream events backend against a real NATS server (``MICRO_TEST_NATS``, default 127.0.0.1:4222).

NATS with JetStream must be running (CI starts it): these tests fail, rather
than skip, when it does not answer. Each test uses its own stream prefix and
deletes its streams afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest

from micro.errors import ServiceUnavailable, SetupError
from micro.testing.messaging import EventsContract
from micro_daemon.events.backend import ConsumeSpec, EventsBackend, PublishItem, Retention, Start
from micro_daemon.events.jetstream import JetStreamEvents, open_jetstream
from micro_daemon.events.jetstream_wire import (
    HEADER_ID,
    HEADER_META,
    HEADER_TIME,
    STREAM_NOT_FOUND,
    ApiError,
    event_header_lines,
    headers_size,
    metadata_json,
)
from micro_daemon.events.jetstream_writer import _PLAIN_ACK, _ack
from micro_daemon.events.nats_publisher import Reply, header_dict, header_lines
from tests._engines import PrivateNats

NATS_URL = os.environ.get("MICRO_TEST_NATS", "nats://127.0.0.1:4222")
NS = "ns"


async def _delete_streams(prefix: str, url: str = NATS_URL) -> None:
    nc = await nats.connect(url)
    try:
        answer = await nc.request("$JS.API.STREAM.NAMES", json.dumps({"offset": 0}).encode(), timeout=5)
        names = json.loads(answer.data).get("streams") or []
        for name in names:
            if name.startswith(f"{prefix.upper()}_EVENTS_"):
                await nc.request(f"$JS.API.STREAM.DELETE.{name}", b"", timeout=30)
    finally:
        await nc.close()


@pytest.fixture
async def address() -> AsyncIterator[str]:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    try:
        await _delete_streams(prefix)
    except Exception as exc:
        pytest.fail(
            f"NATS with JetStream does not answer at {NATS_URL} ({exc!r}): start it with "
            "`nats-server -a 127.0.0.1 -p 4222 -js -sd <dir>` or set MICRO_TEST_NATS"
        )
    yield f"{NATS_URL}?prefix={prefix}"
    await _delete_streams(prefix)


async def _open(address: str, **options: object) -> JetStreamEvents:
    return await open_jetstream(address, Path("unused"), **options)


class TestJetStreamEvents(EventsContract):
    @pytest.fixture
    async def events(self, address: str) -> AsyncIterator[EventsBackend]:
        self.address = address
        events = await _open(address)
        yield events
        await events.close()

    async def reopen(self, events: EventsBackend, retention: Retention | None = None) -> EventsBackend:
        await events.close()
        return await _open(self.address, retention=retention)

    def event_size_limit(self, events: EventsBackend) -> int:
        assert isinstance(events, JetStreamEvents)
        return events.max_event_bytes


@pytest.fixture
async def two(address: str) -> AsyncIterator[tuple[JetStreamEvents, JetStreamEvents]]:
    """Two backends on two connections: two daemons sharing one NATS."""
    first, second = await _open(address), await _open(address)
    yield first, second
    await first.close()
    await second.close()


async def test_two_daemons_share_a_group_without_duplicates(
    two: tuple[JetStreamEvents, JetStreamEvents],
) -> None:
    first, second = two
    members = [await backend.consume(NS, "jobs", ConsumeSpec(group="workers")) for backend in two]
    shares: list[list[int]] = [[], []]

    async def work(index: int) -> None:
        while sum(map(len, shares)) < 200:
            with contextlib.suppress(TimeoutError):
                event = await asyncio.wait_for(anext(members[index]), 0.2)
                shares[index].append(event.sequence)
                await asyncio.sleep(0.001)

    workers = [asyncio.create_task(work(index)) for index in range(2)]
    for start in range(0, 200, 50):
        await first.publish_many(NS, [PublishItem("jobs", b"%d" % i) for i in range(start, start + 50)])
    await asyncio.wait_for(asyncio.gather(*workers), 10)
    assert sorted(shares[0] + shares[1]) == list(range(1, 201))
    assert shares[0] and shares[1]
    for member in members:
        await member.close()
    [topic] = await second.topics(NS)
    assert [(group.name, group.lag) for group in topic.groups] == [("workers", 0)]


async def test_publish_through_one_daemon_and_consume_through_the_other(
    two: tuple[JetStreamEvents, JetStreamEvents],
) -> None:
    first, second = two
    consumer = await second.consume(NS, "t", ConsumeSpec(group="g", auto_ack=False))
    event_id, seq = await first.publish(NS, "t", b"hello", {"k": "v"})
    event = await asyncio.wait_for(anext(consumer), 5)
    assert (event.id, event.sequence, event.payload, dict(event.metadata)) == (
        event_id,
        seq,
        b"hello",
        {"k": "v"},
    )
    await consumer.ack(event.id)
    await consumer.close()


async def test_events_held_by_a_daemon_that_died_go_to_another(
    two: tuple[JetStreamEvents, JetStreamEvents],
) -> None:
    dying, living = two
    spec = ConsumeSpec(group="g", auto_ack=False, ack_wait=0.2)
    held = await dying.consume(NS, "t", spec)
    await dying.publish(NS, "t", b"x")
    first = await asyncio.wait_for(anext(held), 5)
    await dying.link.nc.close()  # no goodbye: the server redelivers after its ack wait
    other = await living.consume(NS, "t", spec)
    again = await asyncio.wait_for(anext(other), 5)
    assert (again.id, again.sequence, again.attempt) == (first.id, 1, 2)
    await other.ack(again.id)
    await other.close()


async def test_concurrent_writers_keep_topic_sequences_contiguous(
    two: tuple[JetStreamEvents, JetStreamEvents],
) -> None:
    async def publish(backend: JetStreamEvents, name: str) -> list[int]:
        seqs = []
        for batch in range(10):
            items = [PublishItem("t", f"{name}{batch}.{i}".encode()) for i in range(20)]
            seqs += [seq for _, seq in await backend.publish_many(NS, items)]
        return seqs

    first, second = await asyncio.gather(publish(two[0], "a"), publish(two[1], "b"))
    assert sorted(first + second) == list(range(1, 401))
    stored = await two[0].read(NS, "t", limit=1000)
    assert [event.sequence for event in stored] == list(range(1, 401))
    for name, seqs in (("a", first), ("b", second)):
        mine = [event for event in stored if event.payload.startswith(name.encode())]
        assert [event.sequence for event in mine] == seqs  # each publisher's events in its order


async def test_a_stream_another_daemon_created_meanwhile_is_used(
    address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await _open(address)
    await first.publish(NS, "t", b"x")
    stream = first.names.stream(NS)
    # Made by another daemon, a little differently: creating it again is refused.
    await first.link.api(
        f"STREAM.UPDATE.{stream}", {**first.names.stream_config(NS, 1), "description": "another daemon's"}
    )
    second = await _open(address)
    api, asked = second.link.api, []

    async def racing(call: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        if call == f"STREAM.INFO.{stream}" and not asked:  # absent when asked, there when created
            asked.append(call)
            raise ApiError(404, STREAM_NOT_FOUND, "stream not found")
        return await api(call, body)

    monkeypatch.setattr(second.link, "api", racing)
    try:
        assert (await second.publish(NS, "t", b"y"))[1] == 2
        assert asked
    finally:
        await second.close()
        await first.close()


async def test_the_servers_usual_ack_is_read_without_a_json_parse(address: str) -> None:
    # The writer's fast path must match what this nats-server really sends, spacing included:
    # a pattern that never matches costs a json.loads per publish and no test would fail.
    prefix = address.rpartition("prefix=")[2]
    stream = f"{prefix.upper()}_EVENTS_ACKS"
    nc = await nats.connect(NATS_URL)
    try:
        config = {"name": stream, "subjects": [f"{prefix}.acks"], "storage": "memory"}
        await nc.request(f"$JS.API.STREAM.CREATE.{stream}", json.dumps(config).encode(), timeout=5)
        answer = await nc.request(f"{prefix}.acks", b"x", timeout=5)
    finally:
        await nc.close()
    plain = _PLAIN_ACK.fullmatch(answer.data)
    assert plain is not None, answer.data
    assert _ack(Reply(None, answer.data)) == {"seq": json.loads(answer.data)["seq"]} == {"seq": 1}


@pytest.mark.parametrize(
    "metadata",
    [{}, {"Content-Type": "application/json"}, {'é"\\': "line\nbreak\u2028 \x00"}, {"n": 5}],  # type: ignore[dict-item]
)
def test_metadata_is_written_as_json_dumps_writes_it(metadata: dict[str, str]) -> None:
    assert metadata_json(metadata) == json.dumps(metadata, separators=(",", ":"))


def test_header_lines_are_what_a_header_block_holds_and_read_back() -> None:
    headers = {"Nats-Msg-Id": "id-1", "Micro-Meta": metadata_json({"k": "é"}), "Note": "ünï ✓", "E": ""}
    lines = header_lines(headers)
    assert lines == b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items())
    assert header_dict(lines) == headers == header_dict(headers)
    assert headers_size(lines) == len(b"NATS/1.0\r\n" + lines + b"\r\n")
    assert headers_size(header_lines({})) == len(b"NATS/1.0\r\n\r\n")


def test_an_events_header_lines_carry_its_id_metadata_and_timestamp() -> None:
    assert event_header_lines("id-1", {"Content-Type": "text/plain"}, 123) == header_lines(
        {HEADER_ID: "id-1", HEADER_META: '{"Content-Type":"text/plain"}', HEADER_TIME: "123"}
    )
    assert event_header_lines("id-2", {}, 0) == header_lines({HEADER_ID: "id-2"})


@pytest.mark.parametrize(
    ("data", "fast"),
    [
        (b'{"stream":"S", "seq":7}', True),
        (b'{"stream":"S","seq":7}', True),
        (b'{"stream":"S", "domain":"hub", "seq":7}', True),
        (b'{"stream":"S", "seq":7, "duplicate":true}', False),
        (b'{"error":{"code":503,"err_code":10077,"description":"wrong last sequence"}}', False),
    ],
)
def test_an_ack_with_more_to_say_is_parsed(data: bytes, fast: bool) -> None:
    assert (_PLAIN_ACK.fullmatch(data) is not None) is fast
    assert _ack(Reply(None, data)) == (json.loads(data) if not fast else {"seq": 7})


async def test_sequences_continue_after_retention_emptied_a_topic(address: str) -> None:
    events = await _open(address)
    await events.publish_many(NS, [PublishItem("t", b"x")] * 3)
    assert await events.apply_retention(2**62) == 3
    await events.close()
    events = await _open(address, retention=Retention(max_count=0))
    assert (await events.publish(NS, "t", b"y"))[1] == 4
    assert await events.apply_retention() == 1
    [topic] = await events.topics(NS)
    assert (topic.count, topic.last_sequence) == (0, 4)
    await events.close()
    events = await _open(address)
    assert (await events.publish(NS, "t", b"z"))[1] == 5
    await events.close()


async def test_retention_overrides_apply_per_topic(address: str) -> None:
    events = await _open(
        address,
        retention=Retention(max_age_s=86400),
        retention_overrides={"audit": Retention(max_age_s=None), "recent": Retention(max_count=1)},
    )
    for topic in ("audit", "recent", "other"):
        await events.publish_many(NS, [PublishItem(topic, b"x")] * 3)
    assert await events.apply_retention() == 2  # "recent" keeps its newest
    assert await events.apply_retention(time.time_ns() + 2 * 86400 * 10**9) == 3  # "other" is too old
    counts = {topic.name: (topic.count, topic.last_sequence) for topic in await events.topics(NS)}
    assert counts == {"audit": (3, 3), "other": (0, 3), "recent": (1, 3)}
    await events.close()


async def test_unusual_topics_map_to_subjects(address: str) -> None:
    events = await _open(address)
    for topic in ["x" * 255, "a.b-c_d.ünï", "UPPER.123"]:
        consumer = await events.consume(NS, topic, ConsumeSpec(group="g-1.x"))
        assert (await events.publish(NS, topic, b"ok"))[1] == 1
        event = await asyncio.wait_for(anext(consumer), 5)
        assert (event.topic, event.payload) == (topic, b"ok")
        assert [e.payload for e in await events.read(NS, topic)] == [b"ok"]
        await consumer.close()
    assert sorted(t.name for t in await events.topics(NS)) == sorted(["x" * 255, "a.b-c_d.ünï", "UPPER.123"])
    await events.close()


async def test_a_start_sequence_beyond_the_end_survives_a_restart(address: str) -> None:
    events = await _open(address)
    await events.publish_many(NS, [PublishItem("t", b"x")] * 2)
    consumer = await events.consume(NS, "t", ConsumeSpec(group="g", start=Start.SEQUENCE, sequence=4))
    await consumer.close()
    await events.close()
    events = await _open(address)
    consumer = await events.consume(NS, "t", ConsumeSpec(group="g"))
    await events.publish_many(NS, [PublishItem("t", b"x")] * 3)
    assert [(await asyncio.wait_for(anext(consumer), 5)).sequence for _ in range(2)] == [4, 5]
    await consumer.close()
    await events.close()


async def test_unreachable_nats_is_a_setup_error_without_credentials() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(SetupError) as caught:
        await _open(f"nats://admin:s3cret@127.0.0.1:{port}", timeout=1)
    assert f"127.0.0.1:{port}" in caught.value.detail
    assert "s3cret" not in caught.value.detail and "admin" not in caught.value.detail


async def test_unknown_address_options_are_refused() -> None:
    with pytest.raises(SetupError, match="replica"):
        await _open(f"{NATS_URL}?replica=3")


async def test_a_lost_connection_is_service_unavailable(address: str) -> None:
    events = await _open(address)
    consumer = await events.consume(NS, "t", ConsumeSpec(group="g"))
    waiting = asyncio.create_task(anext(consumer))
    await asyncio.sleep(0.05)
    await events.link.nc.close()
    with pytest.raises(ServiceUnavailable):
        await asyncio.wait_for(waiting, 5)
    with pytest.raises(ServiceUnavailable):
        await events.publish(NS, "t", b"x")
    assert await events.health() != "ok"
    await events.close()


async def test_consumers_resume_after_nats_restarts(tmp_path: Path) -> None:
    server = PrivateNats(tmp_path)  # of its own, to restart
    server.start()
    url = server.url
    try:
        events = await _open(url)
        consumer = await events.consume(NS, "t", ConsumeSpec(group="g", auto_ack=False, ack_wait=30))
        await events.publish_many(NS, [PublishItem("t", b"%d" % i) for i in range(3)])
        first = await asyncio.wait_for(anext(consumer), 5)
        await consumer.ack(first.id)
        await asyncio.to_thread(server.stop)
        for _ in range(100):
            if await events.health() != "ok":
                break
            await asyncio.sleep(0.05)
        assert await events.health() == f"not connected to NATS at {url}"
        began = asyncio.get_running_loop().time()
        with pytest.raises(ServiceUnavailable, match=f"events engine: not connected to NATS at {url}"):
            await events.publish(NS, "t", b"during")
        assert asyncio.get_running_loop().time() - began < 1  # at once, not after a timeout
        await asyncio.to_thread(server.start)
        second = await asyncio.wait_for(anext(consumer), 10)
        assert second.sequence == 2
        await consumer.ack(second.id)
        assert (await events.publish(NS, "t", b"after"))[1] == 4
        assert [(await asyncio.wait_for(anext(consumer), 5)).sequence for _ in range(2)] == [3, 4]
        await consumer.close()
        await events.close()
    finally:
        server.close()
