"""The JetStream consumers behind consumer groups: created, joined, moved and re-created.

A group is a durable pull consumer named from its topic and group
(``Names.durable``), filtered to the topic's subject, with explicit acks, no
delivery limit on the server, and a description holding the topic, the group
and the floor (the topic sequence a SEQUENCE start beyond the end waits
for). Moving a group (``BEGINNING``, ``SEQUENCE``, ``TIME``) deletes and
re-creates its consumer: JetStream cannot move one. A private consumer is an
ephemeral one, removed by the server after an hour without requests.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, replace

from micro_daemon.events.backend import DEFAULT_ACK_WAIT, ConsumeSpec, Start
from micro_daemon.events.jetstream_queries import lower_bound
from micro_daemon.events.jetstream_wire import CONSUMER_NOT_FOUND, ApiError, Link, rfc3339

__all__ = ["SLACK", "Binding", "Groups"]

SLACK = 2.0
_PRIVATE_IDLE = 3600.0


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


@dataclass(frozen=True)
class Binding:
    """The JetStream consumer behind a member: where it reads and what the group saved with it."""

    namespace: str
    stream: str
    name: str
    topic: str
    subject: str
    group: str
    floor: int  # events below this topic sequence are skipped (a SEQUENCE start beyond the end)
    server_ack_wait: float


class Groups:
    """Creates, joins, moves and re-creates the JetStream consumers behind groups.

    ``on_reset(binding)`` is called when a group's consumer was re-created for
    a move, so the members of this process drop what they held.
    """

    def __init__(self, link: Link, on_reset: Callable[[Binding], None]) -> None:
        self.link = link
        self._on_reset = on_reset
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def bind(self, base: Binding, spec: ConsumeSpec) -> Binding:
        """The consumer for ``spec``: the group's, moved to ``spec.start`` unless GROUP (or, with
        ``start_if_new``, unless the group exists); a new private one."""
        wanted = (spec.ack_wait if not spec.auto_ack else DEFAULT_ACK_WAIT) + SLACK
        if not base.group:
            start, floor = await self._start(base, spec)
            return await self._create(replace(base, floor=floor, server_ack_wait=wanted), start)
        async with self._locks.setdefault((base.stream, base.name), asyncio.Lock()):
            if spec.start is Start.GROUP or spec.start_if_new:
                info = await self._info(base)
                if info is not None:
                    return await self._join(base, info, wanted)
                start, floor = await self._start(base, spec)
                try:
                    return await self._create(replace(base, floor=floor, server_ack_wait=wanted), start)
                except ApiError:  # created meanwhile by another daemon: join it
                    info = await self._info(base)
                    if info is None:
                        raise
                    return await self._join(base, info, wanted)
            start, floor = await self._start(base, spec)
            moved = replace(base, floor=floor, server_ack_wait=wanted)
            for attempt in range(3):  # another daemon may re-create it in between (a member rebinding)
                await self._delete(base)
                try:
                    await self._create(moved, start)
                    break
                except ApiError:
                    if attempt == 2:
                        raise
            self._on_reset(moved)
            return moved

    async def rebind(self, binding: Binding, after: int) -> Binding:
        """The consumer of ``binding`` vanished (a restart, a move elsewhere): find or re-create it."""
        async with self._locks.setdefault((binding.stream, binding.name), asyncio.Lock()):
            if binding.group:
                info = await self._info(binding)
                if info is not None:
                    return await self._join(binding, info, binding.server_ack_wait)
            start = {"deliver_policy": "by_start_sequence", "opt_start_seq": after + 1} if after else {}
            try:
                return await self._create(binding, start or {"deliver_policy": "new"})
            except ApiError:  # re-created meanwhile by another daemon
                info = await self._info(binding)
                if info is None:
                    raise
                return await self._join(binding, info, binding.server_ack_wait)

    async def delete(self, binding: Binding) -> None:
        await self._delete(binding)

    async def _start(self, base: Binding, spec: ConsumeSpec) -> tuple[dict[str, object], int]:
        if spec.start is Start.BEGINNING:
            return {"deliver_policy": "all"}, 0
        if spec.start is Start.TIME:
            return {"deliver_policy": "by_start_time", "opt_start_time": rfc3339(spec.since_ns)}, 0
        if spec.start is Start.SEQUENCE:
            found = await lower_bound(
                self.link, base.stream, base.subject, lambda m: m.topic_seq >= spec.sequence
            )
            if found is None:  # not published yet: start after the stream's end, skip up to it
                info = await self.link.api(f"STREAM.INFO.{base.stream}")
                seq = info["state"]["last_seq"] + 1
            else:
                seq = found.stream_seq
            return {"deliver_policy": "by_start_sequence", "opt_start_seq": seq}, spec.sequence
        return {"deliver_policy": "new"}, 0

    async def _info(self, binding: Binding) -> dict[str, object] | None:
        try:
            return await self.link.api(f"CONSUMER.INFO.{binding.stream}.{binding.name}")
        except ApiError as exc:
            if exc.err_code == CONSUMER_NOT_FOUND:
                return None
            raise

    async def _join(self, base: Binding, info: dict[str, object], wanted: float) -> Binding:
        config = info["config"]
        assert isinstance(config, dict)
        saved = json.loads(config.get("description") or "{}")
        current = config.get("ack_wait", 0) / 1e9
        if current < wanted:  # the server's ack wait must cover the member that waits longest
            config["ack_wait"] = _ns(wanted)
            await self.link.api(
                f"CONSUMER.DURABLE.CREATE.{base.stream}.{base.name}",
                {"stream_name": base.stream, "config": config},
            )
        return replace(base, floor=int(saved.get("floor", 0)), server_ack_wait=max(current, wanted))

    async def _create(self, binding: Binding, start: dict[str, object]) -> Binding:
        config: dict[str, object] = {
            "description": json.dumps(
                {"topic": binding.topic, "group": binding.group, "floor": binding.floor}
            ),
            "ack_policy": "explicit",
            "ack_wait": _ns(binding.server_ack_wait),
            "max_deliver": -1,
            "max_ack_pending": -1,
            "filter_subject": binding.subject,
            **start,
        }
        if not binding.group:
            config["inactive_threshold"] = _ns(_PRIVATE_IDLE)
            info = await self.link.api(
                f"CONSUMER.CREATE.{binding.stream}", {"stream_name": binding.stream, "config": config}
            )
            return replace(binding, name=str(info["name"]))
        config["durable_name"] = binding.name
        await self.link.api(
            f"CONSUMER.DURABLE.CREATE.{binding.stream}.{binding.name}",
            {"stream_name": binding.stream, "config": config},
        )
        return binding

    async def _delete(self, binding: Binding) -> None:
        try:
            await self.link.api(f"CONSUMER.DELETE.{binding.stream}.{binding.name}")
        except ApiError as exc:
            if exc.err_code != CONSUMER_NOT_FOUND:
                raise
