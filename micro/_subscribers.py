"""Entrypoints that run on messages rather than calls: broker subscribers and event consumers.

Each runs in a task of the service, reconnecting with backoff when the daemon
goes away. An event consumer acks when its handler returns and nacks when it
raises, so a failing event is redelivered and, after the retry limit, lands
in ``<topic>.dead``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from micro.errors import MicroError
from micro.payload import decode
from micro.proto import broker_pb2, events_pb2, registry_pb2

if typing.TYPE_CHECKING:
    from micro.client import Client

__all__ = ["Consumption", "Subscription"]

log = logging.getLogger("micro.service")

Handler = Callable[[Any], Awaitable[None]]
MAX_BACKOFF = 5.0


@dataclass
class _Entrypoint:
    topic: str
    handler: Handler
    _task: asyncio.Task[None] | None = field(default=None, init=False)

    @property
    def name(self) -> str:
        return getattr(self.handler, "__qualname__", "handler").replace("<locals>.", "")

    def launch(self, client: Client) -> None:
        self._task = asyncio.create_task(self._run_forever(client), name=f"micro-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None

    def endpoint(self) -> registry_pb2.Endpoint:
        return registry_pb2.Endpoint(
            name=self.name, metadata={"subscriber": "true", "topic": self.topic, **self.extra()}
        )

    def extra(self) -> dict[str, str]:
        return {}

    async def _run_forever(self, client: Client) -> None:
        failures = 0
        while True:
            try:
                await self._run(client)
                failures = 0
            except MicroError as exc:  # the daemon restarting, or the stream dropped: subscribe again
                failures += 1
                log.warning("%s on %r stopped (%s); subscribing again", self.name, self.topic, exc.detail)
            await asyncio.sleep(min(MAX_BACKOFF, 0.1 * 2**failures))

    async def _run(self, client: Client) -> None:
        raise NotImplementedError

    def _wanted(self) -> Any:
        """The type the handler's first parameter asks for, if any."""
        try:
            hints = typing.get_type_hints(self.handler)
        except Exception:  # annotations naming what this module cannot see
            return None
        parameters = list(inspect.signature(self.handler).parameters)
        return hints.get(parameters[0]) if parameters else None


@dataclass
class Subscription(_Entrypoint):
    """``@service.subscribe(topic, queue=...)``: every broker message (one per queue group)."""

    queue: str = ""

    def extra(self) -> dict[str, str]:
        return {"queue": self.queue} if self.queue else {}

    async def _run(self, client: Client) -> None:
        from micro.broker import BrokerClient

        wanted = self._wanted()
        async for message in BrokerClient(client).subscribe(self.topic, queue=self.queue):
            try:  # a message that does not decode costs only itself, not the subscription
                value = (
                    message if wanted is broker_pb2.Message else decode(message.body, message.header, wanted)
                )
                await self.handler(value)
            except Exception:
                log.exception("subscriber %s failed on a message of %r", self.name, self.topic)


@dataclass
class Consumption(_Entrypoint):
    """``@service.consume(topic, group=...)``: each event once per group, acked by the handler's outcome."""

    group: str = ""
    start: str = "group"
    ack_wait: float = 30.0
    retry_limit: int = 5
    # Once an event arrived the group is positioned: reconnecting resumes it rather than
    # moving it to ``start`` again (a group from the beginning would replay everything). A
    # restarted process does the same through start_if_new: only a new group starts at ``start``.
    _positioned: bool = field(default=False, init=False)

    def extra(self) -> dict[str, str]:
        return {"group": self.group}

    async def _run(self, client: Client) -> None:
        from micro.events import EventsClient

        wanted = self._wanted()
        consumer = EventsClient(client).consume(
            self.topic,
            group=self.group,
            start="group" if self._positioned else self.start,
            start_if_new=True,
            auto_ack=False,
            ack_wait=self.ack_wait,
            retry_limit=self.retry_limit,
        )
        try:
            async for event in consumer:
                self._positioned = True
                try:  # an event that does not decode is nacked like one whose handler fails
                    value = (
                        event if wanted is events_pb2.Event else decode(event.payload, event.metadata, wanted)
                    )
                    await self.handler(value)
                except Exception:
                    log.exception(
                        "consumer %s failed on event %s of %r", self.name, event.sequence, self.topic
                    )
                    await consumer.nack(event)
                else:
                    await consumer.ack(event)
        finally:
            await consumer.close()
