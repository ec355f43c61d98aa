"""Appending to a namespace's stream with per-topic sequences: the JetStream backend's writer.

JetStream numbers messages per stream; Micro numbers events per topic. The
writer of a namespace knows the stream's last sequence ``L`` and the last
sequence of the topics it writes, stamps each event with the next one of its
topic (header ``Micro-Seq``) and publishes a burst pipelined, as a chain: the
first message expects the stream to end at ``L``, each later one at ``L + i``
after the message before it (``Nats-Expected-Last-Sequence`` and
``Nats-Expected-Last-Msg-Id``). JetStream stores a prefix of the chain and
refuses the rest once anything else was written in between (another daemon,
a retention marker): the writer then reloads ``L`` and the topics, and sends
the rest again. Event ids are ``Nats-Msg-Id``s, so a resend after a lost
answer is recognised as a duplicate instead of stored twice.

Concurrent publishes of one namespace in this process share a burst (group
commit); bursts go one after the other.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from micro.errors import MicroError, ServiceUnavailable
from micro_daemon.events.backend import ERROR_ID, PublishItem
from micro_daemon.events.jetstream_wire import (
    HEADER_SEQ,
    WRONG_LAST_MSG_ID,
    WRONG_LAST_SEQUENCE,
    Link,
    event_header_lines,
    nats_error,
    status,
)
from micro_daemon.events.nats_publisher import Reply

__all__ = ["CHAIN_HEADERS_BYTES", "MAX_BURST", "Entry", "NamespaceWriter"]

MAX_BURST = 1000
MAX_ROUNDS = 30
MAX_KNOWN_TOPICS = 100_000
CHAIN_HEADERS_BYTES = 160  # room the chain headers and the sequence take next to the event's own
_CONFLICTS = {WRONG_LAST_SEQUENCE, WRONG_LAST_MSG_ID}
_CHAIN_LINES = f"{HEADER_SEQ}: %d\r\nNats-Expected-Last-Sequence: %d\r\n".encode()
# nats-server writes ``{"stream":"S", "seq":N}``, a space after the comma; others may not.
_PLAIN_ACK = re.compile(rb'\{"stream": ?"[^"\\]*", ?(?:"domain": ?"[^"\\]*", ?)?"seq": ?(\d+)\}')


class Entry:
    """One event waiting to be appended; ``done`` gets its topic sequence.

    ``lines`` are its event's header lines (``event_header_lines``), written once: a burst adds
    the sequence and the chain's.
    """

    __slots__ = ("done", "id", "item", "lines")

    def __init__(self, item: PublishItem, id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.item = item
        self.id = id
        self.lines = event_header_lines(id, item.metadata, item.timestamp_ns)
        self.done: asyncio.Future[int] = loop.create_future()


def _retrieve(future: asyncio.Future[int]) -> None:
    if not future.cancelled():
        future.exception()  # the publisher may have been cancelled: never "never retrieved"


class NamespaceWriter:
    """Appends the events of one namespace to its stream (see the module docstring).

    ``last_seq`` loads the stream's last sequence (creating the stream if
    needed); ``subject`` and ``marker`` name a topic's subjects.
    """

    def __init__(
        self,
        link: Link,
        stream: str,
        *,
        last_seq: Callable[[], Awaitable[int]],
        subject: Callable[[str], str],
        marker: Callable[[str], str],
    ) -> None:
        self.link = link
        self.stream = stream
        self._load_last_seq = last_seq
        self._subject = subject
        self._marker = marker
        self._queue: list[Entry] = []
        self._last_seq: int | None = None
        self._topics: dict[str, int] = {}
        self._running: asyncio.Task[None] | None = None
        self._inline = False  # a burst is being written in a caller's task
        self._inline_done: asyncio.Future[None] | None = None  # made when close() waits for it

    async def append(self, entries: Sequence[Entry]) -> list[int]:
        """Append ``entries``; return their topic sequences once stored.

        An idle writer appends them in the caller's task (no task, no hop); a busy one
        queues them for its next burst, shared with whatever else arrives meanwhile.
        """
        if self._running is None and not self._inline and len(entries) <= MAX_BURST:
            return await self._append_inline(list(entries))  # read right after: no _retrieve
        for entry in entries:
            entry.done.add_done_callback(_retrieve)
        self._queue.extend(entries)
        self._start()
        return [await asyncio.shield(entry.done) for entry in entries]

    async def close(self) -> None:
        """Finish the bursts already queued or being written. Must not raise."""
        if self._inline:
            self._inline_done = self._inline_done or asyncio.get_running_loop().create_future()
            await asyncio.gather(asyncio.shield(self._inline_done), return_exceptions=True)
        if self._running is not None:
            await asyncio.gather(self._running, return_exceptions=True)

    def forget(self) -> None:
        """Something else wrote to the stream: reload before the next burst."""
        self._last_seq = None
        self._topics.clear()

    async def _append_inline(self, burst: list[Entry]) -> list[int]:
        self._inline = True
        try:
            await self._burst(burst)
        except asyncio.CancelledError:
            self.forget()  # answers given up on: where the stream ends is unknown
            for entry in burst:
                entry.done.cancel()
            raise
        finally:
            self._inline = False
            if self._inline_done is not None:
                self._inline_done.set_result(None)
                self._inline_done = None
            self._start()
        seqs: list[int] = []
        first: BaseException | None = None
        for entry in burst:
            failure = entry.done.exception()  # each read: none "never retrieved"
            if failure is None:
                seqs.append(entry.done.result())
            elif first is None:
                first = failure
        if first is not None:
            raise first
        return seqs

    def _start(self) -> None:
        if self._queue and self._running is None and not self._inline:
            self._running = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while self._queue:
                burst, self._queue = self._queue[:MAX_BURST], self._queue[MAX_BURST:]
                await self._burst(burst)
        finally:
            self._running = None

    async def _burst(self, burst: list[Entry]) -> None:
        """Write ``burst``; each entry's ``done`` gets its sequence, or why it failed."""
        try:
            await self._write(burst)
        except Exception as exc:
            error = nats_error(exc, self.link.address) or (
                exc
                if isinstance(exc, MicroError)
                else ServiceUnavailable(f"publishing failed: {exc}", id=ERROR_ID)
            )
            for entry in burst:
                if not entry.done.done():
                    entry.done.set_exception(error)

    async def _write(self, burst: list[Entry]) -> None:
        pending = burst
        for attempt in range(MAX_ROUNDS):
            self.link.check_connected()  # a round would only time out
            if self._last_seq is None:
                self._last_seq = await self._load_last_seq()
            for entry in pending:  # a loop, not any(...): no generator made per burst
                if entry.item.topic not in self._topics:
                    await self._learn({entry.item.topic for entry in pending})
                    break
            pending = await self._send(pending)
            if not pending:
                return
            self.forget()
            await asyncio.sleep(random.uniform(0, 0.002 * attempt))  # let a competing writer finish
        raise ServiceUnavailable(
            f"could not append to {self.stream}: other writers kept interleaving", id=ERROR_ID
        )

    async def _learn(self, needed: set[str]) -> None:
        """Load the last sequence of the ``needed`` topics not known yet."""
        missing = needed - self._topics.keys()
        if len(self._topics) + len(missing) > MAX_KNOWN_TOPICS:
            self._topics.clear()
            missing = needed
        names = sorted(missing)
        for start in range(0, len(names), 500):
            chunk = names[start : start + 500]
            found = await asyncio.gather(*(self._topic_last(topic) for topic in chunk))
            self._topics.update(zip(chunk, found, strict=True))

    async def _topic_last(self, topic: str) -> int:
        data, marker = await asyncio.gather(
            self.link.get(self.stream, last_by_subj=self._subject(topic)),
            self.link.get(self.stream, last_by_subj=self._marker(topic)),
        )
        last = data or marker
        return last.topic_seq if last is not None else 0

    async def _send(self, pending: list[Entry]) -> list[Entry]:
        """Send ``pending`` as one chain; return the entries to send again (a conflict), else []."""
        assert self._last_seq is not None
        last_seq, known = self._last_seq, self._topics
        seqs: dict[str, int] = {}  # the sequences this chain gives, by topic
        assigned, answers = [], []
        for index, entry in enumerate(pending):
            topic = entry.item.topic
            seq = seqs.get(topic, known[topic]) + 1
            lines = entry.lines + _CHAIN_LINES % (seq, last_seq + index)
            if index:
                lines += b"Nats-Expected-Last-Msg-Id: %s\r\n" % pending[index - 1].id.encode()
            try:
                answers.append(await self.link.send(self._subject(topic), entry.item.payload, lines))
            except ConnectionResetError:
                break  # the connection is down: what was sent is awaited, the rest goes again
            seqs[topic] = seq
            assigned.append(seq)
        try:
            await _answered(answers)
        except BaseException:
            _cancel(answers)  # cancelled: nobody will read them
            raise
        for index, answer in enumerate(answers):
            entry = pending[index]
            if not answer.done() or answer.cancelled() or answer.exception() is not None:
                _cancel(answers[index:])
                return pending[index:]  # unknown outcome: resend, de-duplicated by id
            ack = _ack(answer.result())
            error = ack.get("error") if ack else {"err_code": WRONG_LAST_SEQUENCE}
            if error and error.get("err_code") in _CONFLICTS:
                _cancel(answers[index:])
                return pending[index:]
            if error:
                _cancel(answers[index:])
                raise ServiceUnavailable(
                    f"JetStream refused an event for {entry.item.topic!r}: {error.get('description')}",
                    id=ERROR_ID,
                )
            if ack.get("duplicate"):  # stored by an earlier round whose answer was lost
                stored = await self.link.get(self.stream, seq=ack["seq"])
                self._resolve(entry, stored.topic_seq if stored is not None else assigned[index])
                _cancel(answers[index + 1 :])
                return pending[index + 1 :]  # the chain breaks here: the rest is sent again
            self._resolve(entry, assigned[index])
            self._last_seq = ack["seq"]
        return pending[len(answers) :]

    def _resolve(self, entry: Entry, seq: int) -> None:
        topic = entry.item.topic
        if seq > self._topics.get(topic, 0):
            self._topics[topic] = seq
        if not entry.done.done():
            entry.done.set_result(seq)


def _ack(msg: Reply) -> dict[str, Any]:
    """JetStream's answer to a publish, ``{}`` for a 503 (no stream: deleted). The usual one,
    stored and nothing else to say, is read without a JSON parse."""
    if (plain := _PLAIN_ACK.fullmatch(msg.data)) is not None:
        return {"seq": int(plain[1])}
    return {} if status(msg) == "503" else json.loads(msg.data)


async def _answered(answers: Sequence[asyncio.Future[Reply]]) -> None:
    """Wait until every answer came or failed (``Link.send``'s fail after the link's timeout)."""
    for answer in answers:
        if not answer.done():
            try:
                await answer
            except Exception:  # read as each is processed (not contextlib.suppress: 3 calls a publish)
                pass


def _cancel(answers: Sequence[asyncio.Future[Reply]]) -> None:
    for answer in answers:
        answer.cancel()
