"""The members of a group in the JetStream events backend: pulling its events on demand.

Every ``Member`` (one ``consume`` call) pulls from its group's consumer
(``jetstream_groups``): JetStream hands waiting pull requests one message
each in turn, which shares a group's events among its members, in this
daemon or in others. A member asks for events only while its caller waits
for one, in batches that double while a backlog lasts (up to ``MAX_WINDOW``).

What a member adds, the engine's semantics that JetStream has per consumer
rather than per member:

* ``ack_wait`` and ``retry_limit`` are the member's own: it naks an event
  when its ack wait expires (redelivered at once), and dead-letters it once
  its delivery count (JetStream's) reaches the limit. The server's ack wait
  is ``SLACK`` longer: it only redelivers the events of a daemon that died
  holding them.
* an auto-ack member acks an event as it hands it out (without waiting);
  closing waits until those acks are applied.
* closing naks what the member held or had fetched, so the group gets them
  at once (a fetched event never handed out thereby counts one delivery).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Protocol

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from micro.errors import BadRequest, MicroError, NotFound
from micro.proto import events_pb2
from micro_daemon.events.backend import ERROR_ID, Consumer, ConsumeSpec
from micro_daemon.events.jetstream_groups import Binding, Groups
from micro_daemon.events.jetstream_wire import Delivery, Link, map_nats_exceptions, status

__all__ = ["MAX_WINDOW", "PULL_EXPIRES", "Host", "Member"]

MAX_WINDOW = 256
PULL_EXPIRES = 10.0
logger = logging.getLogger(__name__)
_members = itertools.count(1)


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


class Host(Protocol):
    """What a member needs from its backend."""

    link: Link
    groups: Groups

    async def dead_letter(self, binding: Binding, event: events_pb2.Event, reason: str) -> None: ...

    def discard(self, member: Member) -> None: ...


@dataclass
class _Held:
    delivery: Delivery
    timer: asyncio.TimerHandle


class Member(Consumer):
    """One consumer of a group (see the module docstring)."""

    def __init__(self, host: Host, binding: Binding, spec: ConsumeSpec) -> None:
        self.host = host
        self.binding = binding
        self.spec = spec
        self.closed = False
        self._inbox = f"{host.link.new_inbox()}.{next(_members)}"
        self._sub: Subscription | None = None
        self._buffer: deque[Delivery] = deque()
        self._held: dict[str, _Held] = {}
        self._waiters: list[asyncio.Future[None]] = []
        self._requests = itertools.count(1)
        self._request = 0
        self._asked = 0
        self._window = 1
        self._request_timer: asyncio.TimerHandle | None = None
        self._acks: deque[str] = deque()
        self._acking: asyncio.Task[None] | None = None
        self._last_ack = ""
        self._last_seq = 0
        self._rebinding: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._failure: MicroError | None = None

    async def start(self) -> Member:
        self._sub = await self.host.link.subscribe(f"{self._inbox}.*", self._received)
        return self

    # -- Consumer -------------------------------------------------------------

    async def __anext__(self) -> events_pb2.Event:
        while True:
            if self._failure is not None:
                raise self._failure
            if self.closed:
                raise StopAsyncIteration
            if not self.spec.auto_ack and len(self._held) >= self.spec.max_in_flight:
                await self._wait()
            elif self._buffer:
                event = self._hand(self._buffer.popleft())
                if event is not None:
                    return event
            else:
                await self._pull()
                await self._wait()

    async def take_ready(self, limit: int) -> list[events_pb2.Event]:
        """Up to ``limit`` of the events already fetched (a pull brings up to ``MAX_WINDOW``)."""
        events: list[events_pb2.Event] = []
        while self._buffer and len(events) < limit and not self.closed and self._failure is None:
            if not self.spec.auto_ack and len(self._held) >= self.spec.max_in_flight:
                break
            event = self._hand(self._buffer.popleft())
            if event is not None:
                events.append(event)
        return events

    async def ack(self, id: str) -> None:
        held = self._take(id)
        with map_nats_exceptions(self.host.link.address):
            await self.host.link.confirm(held.delivery.reply, b"+ACK")

    async def nack(self, id: str) -> None:
        held = self._take(id)
        await self._give_back(held.delivery, "nacked")

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._wake()
        pulling = bool(self._request)
        self._end_request()
        for held in self._held.values():
            held.timer.cancel()
        try:
            await self._release(pulling)
        except Exception:
            logger.exception("closing a consumer of %s failed", self.binding.subject)
        finally:
            if self._rebinding is not None:
                self._rebinding.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self.host.discard(self)

    # -- called by the backend ------------------------------------------------

    def reconnected(self) -> None:
        """The connection came back: pull requests in flight were lost with the old one."""
        self._end_request()
        self._wake()

    def lost(self, failure: MicroError) -> None:
        """The connection is gone for good."""
        self._failure = failure
        self._wake()

    def reset(self, binding: Binding) -> None:
        """The group moved (``Groups.bind`` re-created its consumer): what this member held is void."""
        self.binding = binding
        for held in self._held.values():
            held.timer.cancel()
        self._held.clear()
        self._buffer.clear()
        self._end_request()
        self._wake()

    # -- handing out ----------------------------------------------------------

    def _hand(self, delivery: Delivery) -> events_pb2.Event | None:
        """Turn a fetched delivery into the event handed out now (None: skipped); never waits."""
        if delivery.topic_seq < self.binding.floor:
            self._ack_soon(delivery.reply)
            return None
        event = delivery.event(self.binding.topic)
        if self.spec.auto_ack:
            self._ack_soon(delivery.reply)
            return event
        if self._exhausted(delivery.attempt - 1):  # its last holder died holding it
            self._spawn(self._dead_letter(delivery, "its consumer stopped without acknowledging it"))
            return None
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.spec.ack_wait, self._expire, event.id, delivery)
        self._held[event.id] = _Held(delivery, timer)
        if loop.time() - delivery.received > self.binding.server_ack_wait - self.spec.ack_wait - 1:
            self._spawn(self.host.link.post(delivery.reply, b"+WPI"))  # restart the server's ack wait
        return event

    def _take(self, id: str) -> _Held:
        if self.spec.auto_ack:
            raise BadRequest("this consumer acknowledges automatically: do not ack or nack", id=ERROR_ID)
        held = self._held.pop(id, None)
        if held is None:
            raise NotFound(
                f"event {id!r} is not awaiting an ack from this consumer (already acked, "
                "or redelivered after its ack wait)",
                id=ERROR_ID,
            )
        held.timer.cancel()
        self._wake()
        return held

    def _expire(self, id: str, delivery: Delivery) -> None:
        held = self._held.get(id)
        if held is None or held.delivery is not delivery:
            return
        del self._held[id]
        self._spawn(self._give_back(delivery, "ack wait expired"))
        self._wake()

    def _exhausted(self, attempts: int) -> bool:
        return self.spec.retry_limit >= 0 and attempts >= self.spec.retry_limit

    async def _give_back(self, delivery: Delivery, reason: str) -> None:
        if self._exhausted(delivery.attempt):
            await self._dead_letter(delivery, reason)
            return
        with map_nats_exceptions(self.host.link.address):
            await self.host.link.confirm(delivery.reply, b"-NAK")

    async def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        await self.host.dead_letter(self.binding, delivery.event(self.binding.topic), reason)
        with map_nats_exceptions(self.host.link.address):
            await self.host.link.confirm(delivery.reply, b"+TERM")

    def _ack_soon(self, reply: str) -> None:
        self._acks.append(reply)
        self._last_ack = reply
        if self._acking is None:
            self._acking = asyncio.get_running_loop().create_task(self._send_acks())

    async def _send_acks(self) -> None:
        try:
            while self._acks:
                await self.host.link.post(self._acks.popleft(), b"+ACK")
        except Exception as exc:  # the server redelivers them after its ack wait
            logger.warning("acknowledging events of %s failed: %s", self.binding.subject, exc)
            self._acks.clear()
        finally:
            self._acking = None

    # -- fetching -------------------------------------------------------------

    async def _pull(self) -> None:
        if self._request or self._rebinding is not None or self.closed:
            return
        want = self._window
        if not self.spec.auto_ack:
            want = min(want, self.spec.max_in_flight - len(self._held) - len(self._buffer))
        if want < 1:
            return
        self._request, self._asked = next(self._requests), want
        request = {"batch": want, "expires": _ns(PULL_EXPIRES)}
        subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.binding.stream}.{self.binding.name}"
        try:
            with map_nats_exceptions(self.host.link.address):
                await self.host.link.post(
                    subject, json.dumps(request).encode(), f"{self._inbox}.{self._request}"
                )
        except BaseException:
            self._request = 0
            raise
        loop = asyncio.get_running_loop()
        self._request_timer = loop.call_later(PULL_EXPIRES + 2, self._request_silent, self._request)

    async def _received(self, msg: Msg) -> None:
        code = status(msg)
        if code:  # sent to the request's own subject: {inbox}.{request}
            if code == "100":
                return
            deleted = any("Deleted" in str(text) for text in (msg.headers or {}).values())
            if msg.subject.rsplit(".", 1)[-1] == str(self._request):
                if code == "409" and not deleted:  # over a server limit (max waiting): ask again later
                    self._end_request()
                    self._request = -1
                    self._request_timer = asyncio.get_running_loop().call_later(0.5, self._retry)
                    return
                self._end_request()
            if code == "409" and deleted:
                self._lose_consumer()
            self._wake()
            return
        # Events keep their own subject: they count against the request in flight (there is one at most).
        delivery = Delivery.parse(msg, asyncio.get_running_loop().time())
        self._last_seq = max(self._last_seq, delivery.stream_seq)
        self._buffer.append(delivery)
        if self._request:
            self._asked -= 1
            if self._asked <= 0:
                self._window = min(MAX_WINDOW, self._window * 2)  # a backlog: ask for more next time
                self._end_request()
        self._wake()

    def _end_request(self) -> None:
        self._request = 0
        if self._request_timer is not None:
            self._request_timer.cancel()
            self._request_timer = None

    def _retry(self) -> None:
        self._end_request()
        self._wake()

    def _request_silent(self, request: int) -> None:
        # No answer at all: the consumer does not exist (any more), or the server restarted.
        if request == self._request:
            self._end_request()
            self._lose_consumer()

    def _lose_consumer(self) -> None:
        if self._rebinding is None and not self.closed:
            self._rebinding = asyncio.get_running_loop().create_task(self._rebind())

    async def _rebind(self) -> None:
        try:
            with map_nats_exceptions(self.host.link.address):
                self.binding = await self.host.groups.rebind(self.binding, self._last_seq)
        except MicroError as exc:
            logger.warning("re-creating the consumer of %s failed: %s", self.binding.subject, exc)
            await asyncio.sleep(1)
        finally:
            self._rebinding = None
            self._wake()

    # -- closing --------------------------------------------------------------

    async def _release(self, pulling: bool) -> None:
        link = self.host.link
        if not link.connected:  # the server redelivers after its ack wait; nothing to tell it now
            return
        if self._sub is not None:
            with contextlib.suppress(Exception):  # late deliveries land in the buffer
                await asyncio.wait_for(self._sub.drain(), link.timeout)  # type: ignore[no-untyped-call]
        if self._acking is not None:
            await asyncio.gather(self._acking, return_exceptions=True)
        if not self.binding.group:
            await self.host.groups.delete(self.binding)
            return
        if pulling:
            await self._clear_pull_requests()
        give_back = [held.delivery.reply for held in self._held.values()]
        give_back += [delivery.reply for delivery in self._buffer]
        self._held.clear()
        self._buffer.clear()
        if self._last_ack and not give_back:
            give_back_payload, give_back = b"+ACK", [self._last_ack]  # a barrier: earlier acks are applied
        else:
            give_back_payload = b"-NAK"
        await asyncio.gather(*(link.confirm(reply, give_back_payload) for reply in give_back))

    async def _clear_pull_requests(self) -> None:
        """Make the server drop this member's pull request before it naks anything.

        NATS 2.9 mishandles a redelivery that finds only pull requests whose
        requester is gone: it moves the consumer back a message (redelivering
        an acknowledged one) and keeps the redelivery for the ack wait. A short
        request of our own makes the server sweep the dead ones first.
        """
        link, inbox = self.host.link, self.host.link.new_inbox()
        answers: asyncio.Queue[Msg] = asyncio.Queue()
        probe = await link.subscribe(inbox, answers.put)
        try:
            request = {"batch": 1, "no_wait": True, "expires": _ns(0.02)}
            subject = f"$JS.API.CONSUMER.MSG.NEXT.{self.binding.stream}.{self.binding.name}"
            await link.post(subject, json.dumps(request).encode(), inbox)
            answer = await asyncio.wait_for(answers.get(), link.timeout)
            if not status(answer):
                self._buffer.append(Delivery.parse(answer, 0.0))
        finally:
            await probe.unsubscribe()

    def _spawn(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await work
            except Exception as exc:
                logger.warning("settling an event of %s failed: %s", self.binding.subject, exc)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
