"""The JetStream writer's own NATS connection (``nats_publisher``) against real nats-servers.

Plain cases use the shared server (``MICRO_TEST_NATS``, default 127.0.0.1:4222), each with a
stream of its own, deleted afterwards. Cases that stop, freeze (SIGSTOP: the server stops
reading, so the socket fills and the transport pauses writing), kill or configure a server
(authorization, TLS, ``max_payload``, monitoring) start a nats-server of their own on a free
port, and kill it at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import nats
import pytest
from nats.js.api import StorageType
from nats.js.client import JetStreamContext

from micro.errors import ServiceUnavailable
from micro_daemon.events.backend import PublishItem
from micro_daemon.events.jetstream import JetStreamEvents, Names, open_jetstream
from micro_daemon.events.jetstream_wire import WRONG_LAST_SEQUENCE, Link, status
from micro_daemon.events.nats_publisher import RECONNECT_WAIT, Publisher, Reply, Unsupported
from tests._engines import PrivateNats, free_port, port_answers
from tests._tls import make_certificates

TIMEOUT = 2.0
NO_RESPONDERS = Reply({"Status": "503"}, b"")
NS = "ns"


# -- servers of its own -----------------------------------------------------------------


class ConfiguredNats:
    """A ``nats-server`` started from a configuration file of its own, on a free loopback port."""

    def __init__(self, root: Path, config: str) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.port = free_port()
        self.http_port = free_port()
        self.config = root / "nats.conf"
        self.config.write_text(
            f'host: "127.0.0.1"\nport: {self.port}\nhttp: "127.0.0.1:{self.http_port}"\n{config}\n'
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = ["nats-server", "-c", str(self.config), "-l", str(self.root / "nats.log")]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not port_answers(self.port):
            if self.process.poll() is not None:
                log = (self.root / "nats.log").read_text()[-2000:]
                raise AssertionError(f"nats-server exited {self.process.returncode}: {log}")
            assert time.monotonic() < deadline, f"nats-server on port {self.port} did not start"
            time.sleep(0.01)

    def freeze(self) -> None:
        assert self.process is not None
        _freeze(self.process)

    def thaw(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL, even a frozen server: the kernel resets its connections."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
        deadline = time.monotonic() + 10
        while port_answers(self.port):
            assert time.monotonic() < deadline, f"nats-server still answers on port {self.port}"
            time.sleep(0.01)

    def connections(self) -> int:
        """Client connections the server holds, from its monitoring port."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/connz", timeout=5) as answer:
            return int(json.load(answer)["num_connections"])

    def close(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGCONT)
            self.kill()


def _freeze(process: subprocess.Popen[bytes]) -> None:
    """SIGSTOP ``process`` and wait until it is stopped: from then on it reads nothing."""
    process.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, f"process {process.pid} did not stop"
        time.sleep(0.001)


@pytest.fixture
def configured(tmp_path: Path) -> Iterator[Callable[[str], ConfiguredNats]]:
    """Start nats-servers from configuration text; all are killed at the end."""
    servers: list[ConfiguredNats] = []

    def start(config: str = "") -> ConfiguredNats:
        server = ConfiguredNats(tmp_path / f"nats{len(servers)}", config)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[PrivateNats]:
    """A started ``PrivateNats`` (JetStream), stopped at the end even if a test froze it."""
    server = PrivateNats(tmp_path)
    server.start()
    try:
        yield server
    finally:
        if server.process is not None:
            with contextlib.suppress(ProcessLookupError):
                server.process.send_signal(signal.SIGCONT)
        server.close()


def _kill(server: PrivateNats) -> None:
    """SIGKILL a ``PrivateNats``, frozen or not (``stop`` sends SIGTERM, which a frozen one holds)."""
    assert server.process is not None
    server.process.kill()
    server.process.wait()
    server.process = None


# -- the shared server --------------------------------------------------------------------


@dataclass(frozen=True)
class Stream:
    name: str
    subject: str  # the stream holds ``<subject>.>``
    js: JetStreamContext


@pytest.fixture
async def stream(nats_url: str) -> AsyncIterator[Stream]:
    """A memory stream of its own on the shared server, deleted afterwards."""
    token = uuid.uuid4().hex[:12]
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    name, subject = f"PUBTEST_{token}", f"pubtest.{token}"
    await js.add_stream(name=name, subjects=[f"{subject}.>"], storage=StorageType.MEMORY)
    try:
        yield Stream(name, subject, js)
    finally:
        await js.delete_stream(name)
        await nc.close()


@pytest.fixture
async def publisher(nats_url: str) -> AsyncIterator[Publisher]:
    opened = await Publisher.open(nats_url, timeout=TIMEOUT)
    yield opened
    await opened.close()


async def _delete_streams(url: str, prefix: str) -> None:
    nc = await nats.connect(url)
    try:
        answer = await nc.request("$JS.API.STREAM.NAMES", b"{}", timeout=5)
        for name in json.loads(answer.data).get("streams") or []:
            if name.startswith(f"{prefix.upper()}_EVENTS_"):
                await nc.request(f"$JS.API.STREAM.DELETE.{name}", b"", timeout=10)
    finally:
        await nc.close()


@pytest.fixture
async def prefix(nats_url: str) -> AsyncIterator[str]:
    """A stream prefix of its own for the events backend on the shared server."""
    name = f"p{uuid.uuid4().hex[:12]}"
    yield name
    await _delete_streams(nats_url, name)


# -- helpers -------------------------------------------------------------------------------


async def eventually(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def _ack(reply: Reply) -> dict[str, Any]:
    assert reply.headers is None and status(reply) == "", reply
    ack: dict[str, Any] = json.loads(reply.data)
    return ack


def _block_size(headers: dict[str, str]) -> int:
    """Bytes of the header block HPUB sends for ``headers``."""
    return len(b"NATS/1.0\r\n\r\n") + sum(
        len(f"{key}: {value}\r\n".encode()) for key, value in headers.items()
    )


def _recorder(resolved: list[int], index: int) -> Callable[[asyncio.Future[Reply]], None]:
    return lambda _: resolved.append(index)


async def _flood(
    publisher: Publisher,
    answers: list[asyncio.Future[Reply]],
    resolved: list[int],
    count: int,
    size: int,
) -> None:
    """Send ``count`` messages of ``size`` bytes one after the other to a subject nobody
    listens to; keep the answers, and in ``resolved`` the order they resolve in."""
    payload = b"x" * size
    for index in range(count):
        answer = await publisher.send("nobody.listens", payload, None)
        answer.add_done_callback(_recorder(resolved, index))
        answers.append(answer)


async def _nothing() -> None:
    return None


# -- 1, 2: answers ------------------------------------------------------------------------


async def test_a_publish_to_a_stream_is_answered_with_its_pub_ack_and_headers_arrive(
    publisher: Publisher, stream: Stream
) -> None:
    headers = {"Nats-Msg-Id": "event-1", "X-Micro-Test": "two words: and a colon"}
    reply = await asyncio.wait_for(await publisher.send(f"{stream.subject}.a", b"hello", headers), TIMEOUT)
    assert _ack(reply) == {"stream": stream.name, "seq": 1}
    stored = await stream.js.get_msg(stream.name, 1)
    assert (stored.subject, stored.data) == (f"{stream.subject}.a", b"hello")
    assert stored.headers == headers

    again = await asyncio.wait_for(await publisher.send(f"{stream.subject}.a", b"hello", headers), TIMEOUT)
    assert _ack(again) == {"stream": stream.name, "seq": 1, "duplicate": True}  # Nats-Msg-Id de-duplicates
    other = await publisher.send(f"{stream.subject}.b", b"", {"Nats-Msg-Id": "event-2"})
    assert _ack(await asyncio.wait_for(other, TIMEOUT)) == {"stream": stream.name, "seq": 2}
    bare = await asyncio.wait_for(await publisher.send(f"{stream.subject}.c", b"no headers", None), TIMEOUT)
    assert _ack(bare) == {"stream": stream.name, "seq": 3}
    stored = await stream.js.get_msg(stream.name, 3)
    assert (stored.data, stored.headers or {}) == (b"no headers", {})
    info = await stream.js.stream_info(stream.name)
    assert (info.state.messages, info.state.last_seq) == (3, 3)


async def test_a_publish_refused_by_jetstream_is_answered_with_its_error(
    publisher: Publisher, stream: Stream
) -> None:
    wrong = {"Nats-Expected-Last-Sequence": "7"}
    reply = await asyncio.wait_for(await publisher.send(f"{stream.subject}.a", b"x", wrong), TIMEOUT)
    error = _ack(reply)["error"]
    assert error["err_code"] == WRONG_LAST_SEQUENCE  # what the writer's chain relies on


async def test_a_subject_without_a_stream_answers_no_responders(publisher: Publisher) -> None:
    subject = f"pubtest.nostream.{uuid.uuid4().hex}"
    for headers in (None, {"Nats-Msg-Id": "x"}):
        reply = await asyncio.wait_for(await publisher.send(subject, b"x", headers), TIMEOUT)
        assert reply == NO_RESPONDERS
        assert status(reply) == "503"


# -- 3: pipelining, big payloads, flow control ---------------------------------------------


async def test_pipelined_publishes_resolve_in_order(publisher: Publisher, stream: Stream) -> None:
    resolved: list[int] = []
    answers = []
    for index in range(2000):
        answer = await publisher.send(f"{stream.subject}.t", b"%d" % index, {"Nats-Msg-Id": f"m{index}"})
        answer.add_done_callback(_recorder(resolved, index))
        answers.append(answer)
    replies = await asyncio.wait_for(asyncio.gather(*answers), 10)
    assert [_ack(reply)["seq"] for reply in replies] == list(range(1, 2001))
    assert resolved == list(range(2000))
    last = await stream.js.get_msg(stream.name, 2000)
    assert (last.data, (last.headers or {}).get("Nats-Msg-Id")) == (b"1999", "m1999")


async def test_payloads_filling_max_payload_are_stored(
    publisher: Publisher, stream: Stream, nats_url: str
) -> None:
    nc = await nats.connect(nats_url)
    try:
        assert publisher.max_payload == nc.max_payload  # from the server's INFO
    finally:
        await nc.close()
    answers = []
    for index in range(8):  # 8 MiB at once: more than the socket takes, so writing pauses too
        headers = {"Nats-Msg-Id": f"big-{index}"}
        payload = bytes([65 + index]) * (publisher.max_payload - _block_size(headers))
        answers.append(await publisher.send(f"{stream.subject}.big", payload, headers))
    replies = await asyncio.wait_for(asyncio.gather(*answers), 10)
    assert [_ack(reply)["seq"] for reply in replies] == list(range(1, 9))
    stored = await stream.js.get_msg(stream.name, 8)
    assert stored.data == b"H" * (publisher.max_payload - _block_size({"Nats-Msg-Id": "big-7"}))


async def test_a_message_over_max_payload_costs_the_connection_which_comes_back(
    publisher: Publisher,
) -> None:
    subject = f"pubtest.nostream.{uuid.uuid4().hex}"
    too_big = await publisher.send(subject, b"x" * (publisher.max_payload - _block_size({}) + 1), None)
    with pytest.raises(ConnectionResetError):  # the server says Maximum Payload Violation and hangs up
        await asyncio.wait_for(too_big, TIMEOUT)
    await eventually(lambda: publisher.connected, "the publisher to reconnect")
    assert await asyncio.wait_for(await publisher.send(subject, b"x", None), TIMEOUT) == NO_RESPONDERS


async def test_sends_wait_while_the_server_does_not_read_then_all_are_answered_in_order(
    configured: Callable[[str], ConfiguredNats],
) -> None:
    server = configured("")
    publisher = await Publisher.open(server.url, timeout=5)  # the first answers wait for the thaw
    try:
        server.freeze()
        answers: list[asyncio.Future[Reply]] = []
        resolved: list[int] = []
        sender = asyncio.create_task(_flood(publisher, answers, resolved, 64, 512 * 1024))
        await asyncio.sleep(0.3)
        assert not sender.done() and len(answers) < 64  # 32 MiB do not fit: send waits for the drain
        assert resolved == []
        server.thaw()
        await asyncio.wait_for(sender, 10)
        replies = await asyncio.wait_for(asyncio.gather(*answers), 10)
        assert replies == [NO_RESPONDERS] * 64
        assert resolved == list(range(64))
        assert publisher.connected
    finally:
        await publisher.close()


async def test_an_answer_that_does_not_come_fails_with_timeout_error(
    configured: Callable[[str], ConfiguredNats],
) -> None:
    server = configured("")
    publisher = await Publisher.open(server.url, timeout=0.3)
    try:
        server.freeze()
        loop = asyncio.get_running_loop()
        began = loop.time()
        first = await publisher.send("nobody", b"1", None)
        await asyncio.sleep(0.1)
        second = await publisher.send("nobody", b"2", None)
        with pytest.raises(TimeoutError):
            await first
        assert 0.25 <= loop.time() - began < 1
        assert not second.done()  # each waits the timeout from its own send
        with pytest.raises(TimeoutError):
            await second
        assert 0.35 <= loop.time() - began < 1.5
        assert publisher.connected  # a late answer is not a lost connection
        server.thaw()  # the late answers arrive now, for nobody
        assert await asyncio.wait_for(await publisher.send("nobody", b"3", None), 2) == NO_RESPONDERS
    finally:
        await publisher.close()


async def test_a_send_waiting_for_the_drain_fails_when_the_connection_is_lost(
    configured: Callable[[str], ConfiguredNats],
) -> None:
    server = configured("")
    publisher = await Publisher.open(server.url, timeout=TIMEOUT)
    try:
        server.freeze()
        answers: list[asyncio.Future[Reply]] = []
        sender = asyncio.create_task(_flood(publisher, answers, [], 64, 512 * 1024))
        await asyncio.sleep(0.3)
        assert not sender.done()  # waiting for the drain
        await asyncio.to_thread(server.kill)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(sender, 2)  # the next send: not connected
        assert not publisher.connected
        _, pending = await asyncio.wait(answers, timeout=1)
        assert not pending, f"{len(pending)} of {len(answers)} answers unresolved 1 s after the loss"
        assert all(isinstance(answer.exception(), ConnectionResetError) for answer in answers)
    finally:
        await publisher.close()


# -- 4: losing the server, reconnecting, closing --------------------------------------------


async def test_in_flight_answers_fail_when_the_server_dies_and_the_publisher_comes_back(
    private_nats: PrivateNats,
) -> None:
    publisher = await Publisher.open(private_nats.url, timeout=TIMEOUT)
    reconnections: list[bool] = []
    back = asyncio.Event()

    async def reconnected() -> None:
        reconnections.append(publisher.connected)
        await asyncio.sleep(0)  # awaited, not just called
        back.set()

    publisher.on_reconnect = reconnected
    try:
        assert publisher.connected
        assert await asyncio.wait_for(await publisher.send("nobody", b"x", None), TIMEOUT) == NO_RESPONDERS
        assert private_nats.process is not None
        _freeze(private_nats.process)  # what is sent now is surely in flight
        in_flight = [await publisher.send("nobody", b"%d" % i, None) for i in range(5)]
        await asyncio.sleep(0.05)
        assert not any(answer.done() for answer in in_flight)
        await asyncio.to_thread(_kill, private_nats)
        for answer in in_flight:
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(answer, 2)
        assert not publisher.connected
        with pytest.raises(ConnectionResetError):
            await publisher.send("nobody", b"x", None)
        await asyncio.sleep(1.2 * RECONNECT_WAIT)  # attempts against a closed port
        assert not publisher.connected and reconnections == []

        began = time.monotonic()
        await asyncio.to_thread(private_nats.start)  # the same port
        await asyncio.wait_for(back.wait(), 5)
        assert time.monotonic() - began < RECONNECT_WAIT + 1
        assert reconnections == [True] and publisher.connected
        assert await asyncio.wait_for(await publisher.send("nobody", b"x", None), TIMEOUT) == NO_RESPONDERS
    finally:
        await publisher.close()
    assert reconnections == [True]


async def test_publishing_through_a_graceful_stop_leaves_nothing_unresolved(
    private_nats: PrivateNats,
) -> None:
    nc = await nats.connect(private_nats.url)
    await nc.jetstream().add_stream(name="GRACEFUL", subjects=["graceful.>"])
    await nc.close()
    publisher = await Publisher.open(private_nats.url, timeout=TIMEOUT)
    answers: list[asyncio.Future[Reply]] = []

    async def keep_publishing() -> None:
        while True:
            answers.append(await publisher.send("graceful.t", b"x", None))
            if len(answers) % 20 == 0:
                await asyncio.sleep(0.001)

    try:
        sender = asyncio.create_task(keep_publishing())
        await eventually(lambda: len(answers) > 200 and answers[0].done(), "acks to arrive")
        await asyncio.to_thread(private_nats.stop)  # SIGTERM
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(sender, 2)
        _, pending = await asyncio.wait(answers, timeout=2)
        assert not pending
        acked = [answer.result() for answer in answers if answer.exception() is None]
        failed = [answer.exception() for answer in answers if answer.exception() is not None]
        assert all(isinstance(exc, ConnectionResetError) for exc in failed)
        seqs = [_ack(reply)["seq"] for reply in acked if status(reply) != "503"]
        assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) > 100

        await asyncio.to_thread(private_nats.start)
        await eventually(lambda: publisher.connected, "the publisher to reconnect")
        after = await asyncio.wait_for(await publisher.send("graceful.t", b"y", None), TIMEOUT)
        assert _ack(after)["seq"] > seqs[-1]  # the stream kept what it acknowledged
    finally:
        await publisher.close()


async def test_close_fails_what_is_in_flight_without_waiting_for_the_server(
    configured: Callable[[str], ConfiguredNats],
) -> None:
    server = configured("")
    publisher = await Publisher.open(server.url, timeout=TIMEOUT)
    server.freeze()
    in_flight = [await publisher.send("nobody", b"x", None) for _ in range(3)]
    began = time.monotonic()
    await publisher.close()
    assert time.monotonic() - began < 0.5
    assert not publisher.connected
    for answer in in_flight:
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(answer, 1)
    with pytest.raises(ConnectionResetError):
        await publisher.send("nobody", b"x", None)
    await publisher.close()  # again: still no error


async def test_close_stops_reconnecting(configured: Callable[[str], ConfiguredNats]) -> None:
    server = configured("")
    publisher = await Publisher.open(server.url, timeout=TIMEOUT)
    reconnections: list[None] = []

    async def reconnected() -> None:
        reconnections.append(None)

    publisher.on_reconnect = reconnected
    assert await asyncio.to_thread(server.connections) == 1
    await asyncio.to_thread(server.kill)
    await eventually(lambda: not publisher.connected, "the publisher to notice")
    await asyncio.sleep(1.2 * RECONNECT_WAIT)  # between attempts now
    await publisher.close()  # must not raise
    await asyncio.to_thread(server.start)
    await asyncio.sleep(1.6 * RECONNECT_WAIT)  # an attempt would have connected by now
    assert await asyncio.to_thread(server.connections) == 0
    assert not publisher.connected and reconnections == []
    with pytest.raises(ConnectionResetError):
        await publisher.send("nobody", b"x", None)
    await publisher.close()


class CuttingProxy:
    """A TCP relay to a real nats-server that cuts the chosen connections (counted from 1) right
    after relaying the server's first PONG: the end of the handshake the publisher waits for."""

    def __init__(self, host: str, port: int, cut: set[int]) -> None:
        self.host, self.target, self.cut = host, port, cut
        self.count = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._clients: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def drop(self) -> None:
        """Hang up on every client connected now."""
        for writer in self._clients:
            writer.close()

    async def close(self) -> None:
        """Stop listening and hang up everywhere: every relay then ends at its end of file."""
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        for writer in self._writers:
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._tasks.add(handler)
        self.count += 1
        cut = self.count in self.cut
        self._writers.append(client)
        self._clients.append(client)
        try:
            server_reader, server = await asyncio.open_connection(self.host, self.target)
            self._writers.append(server)
            relay = asyncio.create_task(self._relay(client_reader, server))
            self._tasks.add(relay)
            with contextlib.suppress(OSError):
                while data := await server_reader.read(65536):
                    client.write(data)
                    if cut and b"PONG\r\n" in data:
                        break
            server.close()
        finally:
            client.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
        writer.close()


@pytest.mark.parametrize("when", ["open", "reconnect"])
async def test_a_connection_lost_right_after_its_handshake_is_not_kept(nats_url: str, when: str) -> None:
    server = urlsplit(nats_url)
    proxy = CuttingProxy(server.hostname or "127.0.0.1", server.port or 4222, {1} if when == "open" else {2})
    await proxy.start()
    publisher: Publisher | None = None
    try:
        with contextlib.suppress(ConnectionError):  # refusing the lost connection would do too
            publisher = await Publisher.open(f"nats://127.0.0.1:{proxy.port}", timeout=TIMEOUT)
        if publisher is None:
            publisher = await Publisher.open(f"nats://127.0.0.1:{proxy.port}", timeout=TIMEOUT)
        if when == "reconnect":
            assert await asyncio.wait_for(await publisher.send("nobody", b"x", None), 2) == NO_RESPONDERS
            proxy.drop()  # the next connection, the publisher's own reconnection, is cut after its PONG
            await eventually(lambda: proxy.count >= 2, "the publisher to reconnect")
        reply: Reply | None = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.0
        while reply is None and loop.time() < deadline:
            try:
                reply = await asyncio.wait_for(await publisher.send("nobody", b"x", None), 0.3)
            except (ConnectionResetError, TimeoutError):
                await asyncio.sleep(0.05)
        assert reply == NO_RESPONDERS, f"no answer in 1 s; connected={publisher.connected}"
    finally:
        if publisher is not None:
            await publisher.close()
        await proxy.close()


# -- 5: authorization -----------------------------------------------------------------------


async def _check_publishes(url: str) -> Publisher:
    publisher = await Publisher.open(url, timeout=TIMEOUT)
    try:
        assert await asyncio.wait_for(await publisher.send("nobody", b"x", None), TIMEOUT) == NO_RESPONDERS
    except BaseException:
        await publisher.close()
        raise
    return publisher


async def test_user_and_password_from_the_address(configured: Callable[[str], ConfiguredNats]) -> None:
    password = "p@ss w/rd:1%"
    server = configured(f'max_payload: 65536\nauthorization {{ user: "svc", password: "{password}" }}')
    host = f"127.0.0.1:{server.port}"
    publisher = await _check_publishes(f"nats://svc:{quote(password, safe='')}@{host}")
    assert publisher.max_payload == 65536  # the server's, from its INFO
    await publisher.close()
    for wrong in (f"nats://svc:wrong@{host}", f"nats://{host}", f"nats://{quote(password, safe='')}@{host}"):
        with pytest.raises(ConnectionRefusedError, match="Authorization Violation"):
            await Publisher.open(wrong, timeout=TIMEOUT)
    await eventually(lambda: server.connections() == 0, "refused connections to be gone", 2)


async def test_a_token_from_the_address(configured: Callable[[str], ConfiguredNats]) -> None:
    token = "s3cr:et/42"
    server = configured(f'authorization {{ token: "{token}" }}')
    host = f"127.0.0.1:{server.port}"
    publisher = await _check_publishes(f"nats://{quote(token, safe='')}@{host}")
    await publisher.close()
    for wrong in (f"nats://wrong@{host}", f"nats://{host}", f"nats://user:{quote(token, safe='')}@{host}"):
        with pytest.raises(ConnectionRefusedError, match="Authorization Violation"):
            await Publisher.open(wrong, timeout=TIMEOUT)


# -- 6, 7: TLS and publishing through nats-py ------------------------------------------------


@pytest.fixture
def tls_nats(tmp_path: Path, configured: Callable[[str], ConfiguredNats]) -> tuple[ConfiguredNats, Path]:
    """A nats-server with JetStream that requires TLS, and the CA that signed its certificate."""
    certs = make_certificates(tmp_path / "certs")
    server = configured(
        f'jetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
        f'tls {{ cert_file: "{certs.cert}", key_file: "{certs.key}" }}'
    )
    return server, certs.ca


async def test_a_server_that_requires_tls_is_unsupported(tls_nats: tuple[ConfiguredNats, Path]) -> None:
    server, _ = tls_nats
    with pytest.raises(Unsupported, match="TLS"):
        await Publisher.open(server.url, timeout=TIMEOUT)
    await eventually(lambda: server.connections() == 0, "the connection to be closed", 2)


async def test_other_schemes_are_unsupported_without_connecting() -> None:
    with socket.socket() as listener:  # bound, not listening: a connection attempt would be refused
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        for scheme in ("tls", "ws", "wss"):
            with pytest.raises(Unsupported, match=f"{scheme}://"):
                await Publisher.open(f"{scheme}://127.0.0.1:{port}", timeout=TIMEOUT)
        with pytest.raises(ConnectionRefusedError):
            await Publisher.open(f"nats://127.0.0.1:{port}", timeout=TIMEOUT)


async def test_a_tls_server_gets_events_through_nats_py(
    tls_nats: tuple[ConfiguredNats, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, ca = tls_nats
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # nats-py's default TLS context trusts the test CA
    expected = 0
    for address in (f"tls://127.0.0.1:{server.port}", server.url):  # nats:// too: the server asks for TLS
        events = await open_jetstream(address, Path("unused"), timeout=TIMEOUT)
        try:
            assert events.link.publisher is None
            published = await events.publish_many(NS, [PublishItem("t", b"%d" % i) for i in range(3)])
            assert [seq for _, seq in published] == [expected + 1, expected + 2, expected + 3]
            expected += 3
            stored = await events.read(NS, "t", limit=100)
            assert [event.sequence for event in stored] == list(range(1, expected + 1))
            assert [event.id for event in stored[-3:]] == [event_id for event_id, _ in published]
        finally:
            await events.close()


async def test_open_jetstream_publishes_through_its_own_publisher(nats_url: str, prefix: str) -> None:
    events = await open_jetstream(f"{nats_url}?prefix={prefix}", Path("unused"), timeout=TIMEOUT)
    try:
        assert isinstance(events.link.publisher, Publisher) and events.link.publisher.connected
        published = await events.publish_many(NS, [PublishItem("t", b"%d" % i) for i in range(3)])
        assert [seq for _, seq in published] == [1, 2, 3]
    finally:
        await events.close()
    assert events.link.publisher is not None and not events.link.publisher.connected


async def test_a_link_without_its_own_publisher_publishes_through_nats_py(nats_url: str, prefix: str) -> None:
    link = await Link.open(
        nats_url, timeout=TIMEOUT, on_reconnect=_nothing, on_lost=_nothing, own_publisher=False
    )
    fallback = JetStreamEvents(link, Names(prefix))
    own = await open_jetstream(f"{nats_url}?prefix={prefix}", Path("unused"), timeout=TIMEOUT)
    try:
        assert link.publisher is None and own.link.publisher is not None
        items = [PublishItem("t", b"%d" % i, {"n": str(i)}) for i in range(5)]
        published = await fallback.publish_many(NS, items)
        assert [seq for _, seq in published] == [1, 2, 3, 4, 5]
        stored = await fallback.read(NS, "t", limit=100)
        assert [(event.id, event.sequence, event.payload) for event in stored] == [
            (event_id, seq, b"%d" % (seq - 1)) for event_id, seq in published
        ]
        assert [dict(event.metadata) for event in stored] == [{"n": str(i)} for i in range(5)]
        # Both ways write the same stream: one topic sequence, whichever wrote last.
        assert [seq for _, seq in await own.publish_many(NS, items[:2])] == [6, 7]
        assert [seq for _, seq in await fallback.publish_many(NS, items[:2])] == [8, 9]
        assert [event.sequence for event in await own.read(NS, "t", limit=100)] == list(range(1, 10))
    finally:
        await fallback.close()
        await own.close()


# -- 8: the writer while NATS restarts ------------------------------------------------------


async def test_the_writer_fails_fast_while_nats_is_down_and_continues_after(
    private_nats: PrivateNats,
) -> None:
    events = await open_jetstream(private_nats.url, Path("unused"), timeout=TIMEOUT)
    acknowledged: list[tuple[str, int]] = []
    failures: list[Exception] = []
    stop = asyncio.Event()

    async def keep_publishing() -> None:
        batch = 0
        while not stop.is_set():
            batch += 1
            try:
                items = [PublishItem("t", b"%d.%d" % (batch, i)) for i in range(5)]
                acknowledged.extend(await events.publish_many(NS, items))
            except ServiceUnavailable as exc:
                failures.append(exc)
            await asyncio.sleep(0.005)

    try:
        assert [seq for _, seq in await events.publish_many(NS, [PublishItem("t", b"x")] * 3)] == [1, 2, 3]
        acknowledged.clear()
        publishing = asyncio.create_task(keep_publishing())
        await eventually(lambda: len(acknowledged) >= 50, "events to be published")
        await asyncio.to_thread(private_nats.stop)
        await eventually(lambda: not events.link.connected, "the backend to notice")

        began = time.monotonic()
        with pytest.raises(ServiceUnavailable, match="not connected to NATS"):
            await events.publish_many(NS, [PublishItem("t", b"while down")])
        assert time.monotonic() - began < 0.2 * TIMEOUT  # at once, not after a timeout
        assert await events.health() != "ok"
        down = len(failures)
        await asyncio.sleep(0.2)
        assert len(failures) > down  # the background publisher fails too, without waiting

        await asyncio.to_thread(private_nats.start)
        await eventually(lambda: events.link.connected, "nats-py and the publisher to reconnect", 5)
        count = len(acknowledged)
        await eventually(lambda: len(acknowledged) >= count + 50, "publishing to work again")
        stop.set()
        await asyncio.wait_for(publishing, 5)

        last = await events.publish_many(NS, [PublishItem("t", b"last")])
        stored = await events.read(NS, "t", limit=10_000)
        seqs = [event.sequence for event in stored]
        assert seqs == list(range(1, len(stored) + 1))  # no gap, no duplicate
        assert last[0] == (stored[-1].id, stored[-1].sequence)
        assert len({event.id for event in stored}) == len(stored)
        by_id = {event.id: event.sequence for event in stored}
        assert all(by_id.get(event_id) == seq for event_id, seq in acknowledged)
        assert all(isinstance(exc, ServiceUnavailable) for exc in failures)
    finally:
        stop.set()
        await events.close()
