"""``micro broker`` and ``micro events`` in-process against a real daemon."""

from __future__ import annotations

import asyncio
import json
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from micro.testing.pytest import DaemonThread, Outcome

TOO_LARGE = json.dumps("x" * (1024 * 1024 + 16))


def lines(outcome: Outcome) -> list[Any]:
    return [json.loads(line) for line in outcome.out.splitlines()]


def payloads(outcome: Outcome) -> list[Any]:
    return [event["payload"] for event in lines(outcome)]


async def _publish(address: str, topic: str, values: list[Any], timestamp: float | None = None) -> None:
    from micro.client import Client
    from micro.events import EventsClient
    from micro.transport import GrpcTransport

    client = Client(GrpcTransport(address), timeout=5)
    try:
        for value in values:
            await EventsClient(client).publish(topic, value, timestamp=timestamp)
    finally:
        await client.close()


def publish(server: DaemonThread, topic: str, *values: Any, timestamp: float | None = None) -> None:
    """Publish from this thread without the CLI (whose runner swaps sys.stdout for the whole process)."""
    asyncio.run(_publish(server.address, topic, list(values), timestamp))


class Background:
    """A ``micro`` command running in a thread (for commands that wait)."""

    def __init__(self, micro_cli: Any, *args: str) -> None:
        self.outcome: Outcome | None = None
        self._thread = threading.Thread(target=self._run, args=(micro_cli, args), daemon=True)
        self._thread.start()

    def _run(self, micro_cli: Any, args: tuple[str, ...]) -> None:
        self.outcome = micro_cli(*args)

    def running(self) -> bool:
        return self._thread.is_alive()

    def result(self, timeout: float = 10) -> Outcome:
        self._thread.join(timeout)
        assert self.outcome is not None, "the command did not finish"
        return self.outcome


def consumers(server: DaemonThread, topic: str) -> int:
    state = server._daemon._events._topics.get(("micro", topic))
    return sum(len(group.consumers) for group in state.groups.values()) if state is not None else 0


# -- broker -------------------------------------------------------------------------------------------


class Subscriber:
    """``micro broker subscribe`` as a real process, stopped with Ctrl-C (SIGINT)."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "micro_cli", "broker", "subscribe", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def interrupt(self) -> tuple[int, list[Any]]:
        self.process.send_signal(signal.SIGINT)
        out, err = self.process.communicate(timeout=10)
        assert self.process.returncode == 0, err
        return self.process.returncode, [json.loads(line) for line in out.splitlines()]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def broker_subscribers(server: DaemonThread, topic: str) -> int:
    found = server._daemon._broker._topics.get(("micro", topic))
    return len(found.everyone) + sum(len(q.members) for q in found.queues.values()) if found else 0


def wait_for(condition: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_subscribe_prints_messages_and_queue_members_share(micro_server, micro_cli):
    everyone = Subscriber("orders.created")
    workers = [Subscriber("orders.created", "--queue", "billing") for _ in range(2)]
    try:
        wait_for(lambda: broker_subscribers(micro_server, "orders.created") == 3)
        for n in range(6):
            micro_cli("broker", "publish", "orders.created", json.dumps({"n": n})).assert_success()
        micro_cli("broker", "publish", "orders.created", "not json").assert_success()
        time.sleep(0.3)
        _, seen = everyone.interrupt()
        shared = [message for worker in workers for message in worker.interrupt()[1]]
    finally:
        for subscriber in [everyone, *workers]:
            subscriber.kill()
    assert [m["body"] for m in seen] == [{"n": n} for n in range(6)] + ["not json"]
    assert seen[0]["header"]["Content-Type"] == "application/json"
    assert sorted(json.dumps(m["body"]) for m in shared) == sorted(json.dumps(m["body"]) for m in seen)


def test_broker_publish_reads_stdin(micro_server, micro_cli):
    subscriber = Subscriber("stdin.topic")
    try:
        wait_for(lambda: broker_subscribers(micro_server, "stdin.topic") == 1)
        micro_cli("broker", "publish", "stdin.topic", "-", input='{"from": "stdin"}').assert_success()
        stdout = subscriber.process.stdout
        assert stdout is not None
        wait_for(lambda: select.select([stdout], [], [], 0)[0] != [], timeout=5)
        _, seen = subscriber.interrupt()
    finally:
        subscriber.kill()
    assert [m["body"] for m in seen] == [{"from": "stdin"}]


def test_publishing_with_nobody_listening_succeeds(micro_server, micro_cli):
    assert micro_cli("broker", "publish", "nobody.home", "{}").assert_success().out == ""


@pytest.mark.parametrize("topic", ["", "orders.*", "orders.>", "a b", "a..b"])
def test_broker_refuses_bad_topics(micro_server, micro_cli, topic):
    micro_cli("broker", "publish", topic, "{}").assert_failure(3, err="topic")
    micro_cli("broker", "subscribe", topic).assert_failure(3, err="topic")


def test_broker_refuses_a_message_over_the_limit(micro_server, micro_cli):
    micro_cli("broker", "publish", "big", "-", input=TOO_LARGE).assert_failure(3, err="limit")


# -- events publish ------------------------------------------------------------------------------------


def test_events_publish_prints_id_and_sequence_with_metadata(micro_server, micro_cli):
    first = json.loads(micro_cli("events", "publish", "orders", '{"id": 1}').assert_success().out)
    second = json.loads(
        micro_cli("events", "publish", "orders", "plain text", "--metadata", "source=cli", "-m", "k=a=b")
        .assert_success()
        .out
    )
    assert (first["sequence"], second["sequence"]) == (1, 2)
    assert first["id"] and first["id"] != second["id"]
    [one, two] = lines(micro_cli("events", "read", "orders").assert_success())
    assert one["payload"] == {"id": 1} and one["id"] == first["id"] and one["topic"] == "orders"
    assert two["payload"] == "plain text"
    assert two["metadata"] == {"Content-Type": "application/json", "source": "cli", "k": "a=b"}
    assert abs(two["timestamp"] - time.time()) < 60


@pytest.mark.parametrize("pair", ["novalue", "=value", ""])
def test_events_publish_refuses_bad_metadata(micro_server, micro_cli, pair):
    micro_cli("events", "publish", "orders", "{}", "--metadata", pair).assert_failure(3, err="KEY=VALUE")


@pytest.mark.parametrize("topic", ["", "orders.*", "orders.>", "orders..x"])
def test_events_refuse_bad_topics(micro_server, micro_cli, topic):
    micro_cli("events", "publish", topic, "{}").assert_failure(3, err="topic")
    micro_cli("events", "read", topic).assert_failure(3, err="topic")
    micro_cli("events", "consume", topic, "--limit", "1").assert_failure(3, err="topic")


def test_events_publish_refuses_an_event_over_the_limit(micro_server, micro_cli):
    micro_cli("events", "publish", "big", "-", input=TOO_LARGE).assert_failure(3, err="limit")
    assert micro_cli("events", "read", "big").assert_success().out == ""


# -- events consume --------------------------------------------------------------------------------------


def test_consume_from_the_beginning_with_a_limit(micro_server, micro_cli):
    publish(micro_server, "log", *range(5))
    out = micro_cli("events", "consume", "log", "--from-beginning", "--limit", "3").assert_success()
    assert [e["sequence"] for e in lines(out)] == [1, 2, 3]
    assert payloads(out) == [0, 1, 2]


def test_a_group_resumes_where_it_stopped_and_shows_its_lag(micro_server, micro_cli):
    publish(micro_server, "jobs", *range(5))
    first = micro_cli("events", "consume", "jobs", "-g", "workers", "--from-beginning", "-l", "2")
    assert payloads(first.assert_success()) == [0, 1]
    [topic] = json.loads(micro_cli("events", "topics", "--output", "json").assert_success().out)
    assert topic == {"name": "jobs", "count": 5, "last_sequence": 5, "groups": {"workers": 3}}
    table = micro_cli("events", "topics").assert_success().out.splitlines()
    assert table[0].split() == ["TOPIC", "EVENTS", "LAST", "GROUPS", "(LAG)"]
    assert table[-1].split() == ["jobs", "5", "5", "workers=3"]

    rest = micro_cli("events", "consume", "jobs", "--group", "workers", "--limit", "3")
    assert payloads(rest.assert_success()) == [2, 3, 4]
    [topic] = json.loads(micro_cli("events", "topics", "--output", "json").out)
    assert topic["groups"] == {"workers": 0}


def test_if_new_starts_only_a_new_group_there(micro_server, micro_cli):
    publish(micro_server, "jobs", *range(4))
    args = ("events", "consume", "jobs", "-g", "workers", "--from-beginning", "--if-new", "-l", "2")
    assert payloads(micro_cli(*args).assert_success()) == [0, 1]
    assert payloads(micro_cli(*args).assert_success()) == [2, 3]  # resumed, not moved back
    again = micro_cli("events", "consume", "jobs", "-g", "workers", "--from-beginning", "-l", "1")
    assert payloads(again.assert_success()) == [0]  # without --if-new the group moves


def test_if_new_needs_a_start(micro_server, micro_cli):
    micro_cli("events", "consume", "log", "-g", "g", "--if-new").assert_failure(3, err="--if-new")


def test_topics_without_any(micro_server, micro_cli):
    assert json.loads(micro_cli("events", "topics", "--output", "json").assert_success().out) == []


def test_consume_at_an_offset(micro_server, micro_cli):
    publish(micro_server, "log", *range(5))
    out = micro_cli("events", "consume", "log", "--offset", "4", "--limit", "2").assert_success()
    assert [e["sequence"] for e in lines(out)] == [4, 5]


def test_consume_beyond_the_end_waits_for_the_event(micro_server, micro_cli):
    publish(micro_server, "log", *range(3))
    waiting = Background(micro_cli, "events", "consume", "log", "--offset", "6", "--limit", "1")
    wait_for(lambda: consumers(micro_server, "log") == 1)
    time.sleep(0.3)
    assert waiting.running()
    publish(micro_server, "log", 3, 4)
    time.sleep(0.2)
    assert waiting.running()  # sequence 5: still before the offset
    publish(micro_server, "log", 5)
    out = waiting.result()
    assert [(e["sequence"], e["payload"]) for e in lines(out.assert_success())] == [(6, 5)]


def test_consume_of_new_events_only_by_default(micro_server, micro_cli):
    publish(micro_server, "news", "old")
    waiting = Background(micro_cli, "events", "consume", "news", "--limit", "1")
    wait_for(lambda: consumers(micro_server, "news") == 1)
    publish(micro_server, "news", "new")
    assert payloads(waiting.result().assert_success()) == ["new"]


def test_consume_since_a_duration_ago(micro_server, micro_cli):
    publish(micro_server, "audit", "two hours ago", timestamp=time.time() - 7200)
    publish(micro_server, "audit", "an hour ago", timestamp=time.time() - 3600)
    publish(micro_server, "audit", "now")
    out = micro_cli("events", "consume", "audit", "--since", "90m", "--limit", "2").assert_success()
    assert payloads(out) == ["an hour ago", "now"]
    out = micro_cli("events", "consume", "audit", "--since", "3h", "--limit", "1").assert_success()
    assert payloads(out) == ["two hours ago"]


def test_consume_until_ctrl_c_acknowledges_what_it_printed(micro_server, micro_cli):
    publish(micro_server, "jobs", "a", "b", "c")
    consumer = subprocess.Popen(
        [sys.executable, "-m", "micro_cli", "events", "consume", "jobs", "-g", "printer", "--from-beginning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert consumer.stdout is not None
        printed = [json.loads(consumer.stdout.readline())["payload"] for _ in range(3)]
        consumer.send_signal(signal.SIGINT)
        assert consumer.wait(timeout=10) == 0
    finally:
        if consumer.poll() is None:
            consumer.kill()
        consumer.communicate()
    assert printed == ["a", "b", "c"]
    [topic] = json.loads(micro_cli("events", "topics", "--output", "json").out)
    assert topic["groups"] == {"printer": 0}


@pytest.mark.parametrize(
    "flags",
    [
        ["--from-beginning", "--offset", "2"],
        ["--from-beginning", "--since", "10m"],
        ["--offset", "2", "--since", "10m"],
    ],
)
def test_consume_refuses_conflicting_starts(micro_server, micro_cli, flags):
    micro_cli("events", "consume", "log", *flags).assert_failure(3, err="one of --from-beginning")


def test_consume_refuses_bad_values(micro_server, micro_cli):
    micro_cli("events", "consume", "log", "--since", "yesterday").assert_failure(3, err="--since")
    micro_cli("events", "consume", "log", "--offset", "0").assert_failure(2)
    micro_cli("events", "consume", "log", "--limit", "-1").assert_failure(2)
    micro_cli("events", "consume", "log", "--group", "no spaces", "-l", "1").assert_failure(3, err="group")


# -- events read -----------------------------------------------------------------------------------------


def test_read_pages_through_a_topic(micro_server, micro_cli):
    publish(micro_server, "log", *range(5))
    assert payloads(micro_cli("events", "read", "log").assert_success()) == [0, 1, 2, 3, 4]
    assert payloads(micro_cli("events", "read", "log", "--offset", "1", "--limit", "2")) == [1, 2]
    assert micro_cli("events", "read", "unknown").assert_success().out == ""


def test_binary_payloads_are_shown_as_base64(micro_server, micro_cli):
    from micro.client import Client
    from micro.events import EventsClient
    from micro.transport import GrpcTransport

    async def go() -> None:
        client = Client(GrpcTransport(micro_server.address), timeout=5)
        try:
            await EventsClient(client).publish("bin", b"\xff\x00")
        finally:
            await client.close()

    asyncio.run(go())
    [event] = lines(micro_cli("events", "read", "bin").assert_success())
    assert event["payload"] == {"base64": "/wA="}
    assert event["metadata"]["Content-Type"] == "application/octet-stream"
