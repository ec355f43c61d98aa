"""The NATS JetStream events backend (``nats://host:4222``): the platform profile's events engine.

Several daemons connected to one NATS share topics, groups and positions.

Layout, for a prefix ``p`` (default ``micro``; ``?prefix=NAME`` in the
address keeps tests apart):

* one stream per namespace, ``P_EVENTS_<namespace>``, holding the subjects
  ``p.events.<namespace>.<topic>`` (the events; a topic's segments are subject
  tokens) and ``p.eventseq.<namespace>.<topic>`` (a marker keeping a topic's
  last sequence once retention has removed all its events);
* a durable pull consumer per (topic, group), filtered to the topic's
  subject (``jetstream_groups``), pulled by the group's members in every
  daemon (``jetstream_consumer``).

One stream per topic would make topic sequences JetStream's own, but NATS 2.9
keeps files and about 70 kB of memory per stream: 10,000 topics exhausted the
server's 20,000 file descriptors here, and creating them took 38 s. One stream
per namespace costs nothing per topic; per-topic sequences are then stamped by
the writer (``jetstream_writer``), and a SEQUENCE start or a read offset is a
binary search over stream sequences (a few direct gets).

Retention is this backend's job, not the server's (``apply_retention``, run
by the daemon every minute): server limits would remove a topic's last event
together with its last sequence. Age counts from when JetStream stored an
event. ``max_event_bytes`` is the server's ``max_payload`` less room for
headers (at most ``MAX_EVENT_BYTES``; set ``max_payload: 2MB`` in the server
configuration for 1 MiB events).

Delivery is at least once: a daemon that dies holding events, or before its
automatic acks reached the server, has them redelivered after the server's
ack wait. An event is durable once JetStream acknowledged it (written to the
server, and with replicas to a quorum).

While the connection to NATS is down (the client reconnects for as long as it
takes), calls fail at once with ``ServiceUnavailable`` rather than time out;
open consumers wait, and go on once it is back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import Mapping, Sequence
from itertools import repeat
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import nats.errors

from micro.errors import BadRequest, PayloadTooLarge, ServiceUnavailable, SetupError
from micro.proto import events_pb2
from micro_daemon.events.backend import (
    DEFAULT_READ_LIMIT,
    ERROR_ID,
    MAX_EVENT_BYTES,
    Consumer,
    ConsumeSpec,
    EventsBackend,
    PublishItem,
    Retention,
    check_item,
    check_read,
    new_ids,
    validate_topic,
)
from micro_daemon.events.jetstream_consumer import Member
from micro_daemon.events.jetstream_groups import Binding, Groups
from micro_daemon.events.jetstream_queries import gather_map, lower_bound, pages, read_range, subject_counts
from micro_daemon.events.jetstream_retention import trim_namespace
from micro_daemon.events.jetstream_wire import (
    HEADER_SEQ,
    STREAM_NOT_FOUND,
    ApiError,
    Link,
    headers_size,
    map_nats_exceptions,
    redact,
)
from micro_daemon.events.jetstream_writer import CHAIN_HEADERS_BYTES, Entry, NamespaceWriter
from micro_daemon.events.saving import dead_letter

__all__ = ["JetStreamEvents", "Names", "open_jetstream"]

logger = logging.getLogger(__name__)
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SLUG = re.compile(r"[^A-Za-z0-9_-]+")
_HEADER_ROOM = 512
_SMALL_READ = 16
_DUPLICATE_WINDOW = 30.0


class Names:
    """Stream, subject and consumer names for one prefix (see the module docstring)."""

    def __init__(self, prefix: str = "micro") -> None:
        if not _NAME.match(prefix):
            raise SetupError(f"invalid JetStream prefix {prefix!r}: use 1-64 letters, digits, '_' or '-'")
        self.stream_prefix = f"{prefix.upper()}_EVENTS_"
        self.root = f"{prefix.lower()}.events"
        self.marker_root = f"{prefix.lower()}.eventseq"

    def stream(self, namespace: str) -> str:
        if not _NAME.match(namespace):
            raise BadRequest(f"invalid namespace {namespace!r} for JetStream", id=ERROR_ID)
        return self.stream_prefix + namespace

    def namespace(self, stream: str) -> str | None:
        return stream.removeprefix(self.stream_prefix) if stream.startswith(self.stream_prefix) else None

    def subject(self, namespace: str, topic: str) -> str:
        return f"{self.root}.{namespace}.{topic}"

    def marker(self, namespace: str, topic: str) -> str:
        return f"{self.marker_root}.{namespace}.{topic}"

    def durable(self, topic: str, group: str) -> str:
        digest = hashlib.sha256(f"{topic}\0{group}".encode()).hexdigest()[:16]
        return f"{_SLUG.sub('_', group)[:40]}__{_SLUG.sub('_', topic)[:40]}__{digest}"

    def stream_config(self, namespace: str, replicas: int) -> dict[str, Any]:
        return {
            "name": self.stream(namespace),
            "description": f"micro events of namespace {namespace}",
            "subjects": [f"{self.root}.{namespace}.>", f"{self.marker_root}.{namespace}.>"],
            "storage": "file",
            "retention": "limits",
            "discard": "old",
            "num_replicas": replicas,
            "allow_direct": True,
            "allow_rollup_hdrs": True,
            "duplicate_window": int(_DUPLICATE_WINDOW * 1e9),
        }


class JetStreamEvents(EventsBackend):
    """Events in NATS JetStream (see the module docstring). Open with ``open_jetstream``."""

    def __init__(
        self,
        link: Link,
        names: Names,
        *,
        replicas: int = 1,
        retention: Retention | None = None,
        retention_overrides: Mapping[str, Retention] | None = None,
        max_event_bytes: int | None = None,
    ) -> None:
        self.link = link
        self.names = names
        self.replicas = replicas
        self.retention = retention or Retention()
        self.retention_overrides = dict(retention_overrides or {})
        room = link.max_payload - _HEADER_ROOM
        self.max_event_bytes = min(max_event_bytes or MAX_EVENT_BYTES, MAX_EVENT_BYTES, room)
        self.groups = Groups(link, self._reset_members)
        self._writers: dict[str, NamespaceWriter] = {}
        self._streams: set[str] = set()
        self._members: set[Member] = set()
        self._closed = False
        self._loop = asyncio.get_running_loop()  # once: each look-up is a getpid system call (3.11)

    # -- EventsBackend ----------------------------------------------------------

    async def publish_many(self, namespace: str, items: Sequence[PublishItem]) -> list[tuple[str, int]]:
        self._check_open()
        # map and enumerate, not zip(strict=True): parsing that keyword costs more than the Entry
        entries = list(map(Entry, items, new_ids(len(items)), repeat(self._loop, len(items))))
        for entry in entries:
            self._check(entry)
        if not entries:
            return []
        writer = self._writer(namespace)
        seqs = await writer.append(entries)  # one per entry, in order
        return [(entry.id, seqs[index]) for index, entry in enumerate(entries)]

    async def consume(self, namespace: str, topic: str, options: ConsumeSpec) -> Consumer:
        self._check_open()
        validate_topic(topic)
        stream = self.names.stream(namespace)
        base = Binding(
            namespace=namespace,
            stream=stream,
            name=self.names.durable(topic, options.group) if options.group else "",
            topic=topic,
            subject=self.names.subject(namespace, topic),
            group=options.group,
            floor=0,
            server_ack_wait=0.0,
        )
        with map_nats_exceptions(self.link.address):
            if stream not in self._streams:
                await self._stream_last_seq(namespace)
            binding = await self.groups.bind(base, options)
            member = await Member(self, binding, options).start()
        self._members.add(member)
        return member

    async def read(
        self, namespace: str, topic: str, limit: int = DEFAULT_READ_LIMIT, offset: int = 0
    ) -> list[events_pb2.Event]:
        self._check_open()
        check_read(topic, limit, offset)
        stream, subject = self.names.stream(namespace), self.names.subject(namespace, topic)
        with map_nats_exceptions(self.link.address):
            if not await self._exists(namespace):
                return []
            first = await self.link.get(stream, seq=0, next_by_subj=subject)
            if first is not None and offset:
                target = first.topic_seq + offset
                first = await lower_bound(self.link, stream, subject, lambda m: m.topic_seq >= target)
            if first is None:
                return []
            events, cursor = [first.event(topic)], first
            while len(events) < min(limit, _SMALL_READ):
                found = await self.link.get(stream, seq=cursor.stream_seq + 1, next_by_subj=subject)
                if found is None:
                    return events
                events.append(found.event(topic))
                cursor = found
            if len(events) < limit:
                rest = await read_range(
                    self.link, stream, subject, cursor.stream_seq + 1, limit - len(events)
                )
                events += [delivery.event(topic, attempt=False) for delivery in rest]
            return events

    async def topics(self, namespace: str) -> list[events_pb2.Topic]:
        self._check_open()
        stream = self.names.stream(namespace)
        with map_nats_exceptions(self.link.address):
            if not await self._exists(namespace):
                return []
            counts = await subject_counts(self.link, stream, f"{self.names.root}.{namespace}.>")
            markers = await subject_counts(self.link, stream, f"{self.names.marker_root}.{namespace}.>")
            data_prefix = len(self.names.root) + len(namespace) + 2
            marker_prefix = len(self.names.marker_root) + len(namespace) + 2
            stored = {subject[data_prefix:]: count for subject, count in counts.items()}
            names = sorted(stored.keys() | {subject[marker_prefix:] for subject in markers})
            lasts = await gather_map(lambda name: self.last_topic_seq(namespace, name), names)
            lags = await self._group_lags(stream)
        return [
            events_pb2.Topic(
                name=name,
                count=stored.get(name, 0),
                last_sequence=last,
                groups=[events_pb2.Group(name=group, lag=lag) for group, lag in sorted(lags.get(name, []))],
            )
            for name, last in zip(names, lasts, strict=True)
        ]

    async def apply_retention(self, now_ns: int | None = None) -> int:
        self._check_open()
        now = time.time_ns() if now_ns is None else now_ns
        removed = 0
        with map_nats_exceptions(self.link.address):
            for stream in await pages(
                self.link, "STREAM.NAMES", "streams", {"subject": f"{self.names.root}.>"}
            ):
                namespace = self.names.namespace(stream)
                if namespace is not None:
                    removed += await trim_namespace(self, namespace, now)
        return removed

    async def health(self) -> str:
        if self._closed:
            return "closed"
        return "ok" if self.link.connected else f"not connected to NATS at {self.link.address}"

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            for member in list(self._members):
                await member.close()
            for writer in self._writers.values():
                await writer.close()
        except Exception:
            logger.exception("closing the JetStream events backend failed")
        await self.link.close()

    # -- used by members, the writer and retention -----------------------------------

    async def dead_letter(self, binding: Binding, event: events_pb2.Event, reason: str) -> None:
        """Publish ``event`` to its topic's dead-letter topic, with the embedded engine's metadata."""
        letter = dead_letter(event, event.attempt, reason)
        try:
            await self.publish_many(
                binding.namespace, [PublishItem(letter.topic, letter.payload, letter.metadata)]
            )
        except PayloadTooLarge as exc:  # retrying cannot help: the event is dropped, not redelivered for ever
            logger.error(
                "dropped event %s of %s instead of dead-lettering it: %s", event.id, event.topic, exc
            )

    def discard(self, member: Member) -> None:
        self._members.discard(member)

    async def last_topic_seq(self, namespace: str, topic: str) -> int:
        """The last sequence of ``topic``: its last event's, else its marker's, else 0."""
        stream = self.names.stream(namespace)
        for subject in (self.names.subject(namespace, topic), self.names.marker(namespace, topic)):
            found = await self.link.get(stream, last_by_subj=subject)
            if found is not None:
                return found.topic_seq
        return 0

    async def write_marker(self, namespace: str, topic: str, seq: int) -> None:
        """Keep ``seq`` as the last sequence of ``topic`` for when its events are all removed."""
        headers = {HEADER_SEQ: str(seq), "Nats-Rollup": "sub"}
        answer = await self.link.send(self.names.marker(namespace, topic), b"", headers)
        reply = json.loads((await self.link.wait(answer)).data)
        if reply.get("error"):
            raise ApiError(500, 0, reply["error"].get("description", "marker refused"))

    # -- helpers ----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ServiceUnavailable("events engine is closed", id=ERROR_ID)
        self.link.check_connected()

    def _check(self, entry: Entry) -> None:
        check_item(entry.item, self.max_event_bytes)
        size = len(entry.item.payload) + headers_size(entry.lines) + CHAIN_HEADERS_BYTES
        if size > self.link.max_payload:
            raise PayloadTooLarge(
                f"event for {entry.item.topic!r} takes {size} bytes as a NATS message; the server's "
                f"max_payload is {self.link.max_payload}",
                id=ERROR_ID,
            )

    def _writer(self, namespace: str) -> NamespaceWriter:
        writer = self._writers.get(namespace)
        if writer is None:
            writer = self._writers[namespace] = NamespaceWriter(
                self.link,
                self.names.stream(namespace),
                last_seq=lambda: self._stream_last_seq(namespace),
                subject=lambda topic: self.names.subject(namespace, topic),
                marker=lambda topic: self.names.marker(namespace, topic),
            )
        return writer

    async def _stream_last_seq(self, namespace: str) -> int:
        """The last sequence of the namespace's stream, creating the stream if needed."""
        stream = self.names.stream(namespace)
        try:
            info = await self.link.api(f"STREAM.INFO.{stream}")
        except ApiError as exc:
            if exc.err_code != STREAM_NOT_FOUND:
                raise
            info = await self._create_stream(namespace)
        self._streams.add(stream)
        return int(info["state"]["last_seq"])

    async def _create_stream(self, namespace: str) -> dict[str, Any]:
        """Create the namespace's stream; its info. Another daemon creating it at the same moment
        makes JetStream refuse this one ("subjects overlap with an existing stream", or "already in
        use"): then the stream is there, and that is what was wanted."""
        stream = self.names.stream(namespace)
        try:
            return await self.link.api(
                f"STREAM.CREATE.{stream}", self.names.stream_config(namespace, self.replicas)
            )
        except ApiError as refused:
            try:
                return await self.link.api(f"STREAM.INFO.{stream}")
            except ApiError:
                raise refused from None

    async def _exists(self, namespace: str) -> bool:
        stream = self.names.stream(namespace)
        if stream in self._streams:
            return True
        try:
            await self.link.api(f"STREAM.INFO.{stream}")
        except ApiError as exc:
            if exc.err_code == STREAM_NOT_FOUND:
                return False
            raise
        self._streams.add(stream)
        return True

    async def _group_lags(self, stream: str) -> dict[str, list[tuple[str, int]]]:
        lags: dict[str, list[tuple[str, int]]] = {}
        for info in await pages(self.link, f"CONSUMER.LIST.{stream}", "consumers"):
            config = info.get("config", {})
            try:
                saved = json.loads(config.get("description") or "") if config.get("durable_name") else None
            except ValueError:
                continue
            if isinstance(saved, dict) and saved.get("group"):
                lag = int(info.get("num_pending", 0)) + int(info.get("num_ack_pending", 0))
                lags.setdefault(str(saved["topic"]), []).append((str(saved["group"]), lag))
        return lags

    def _reset_members(self, binding: Binding) -> None:
        for member in self._members:
            if (member.binding.stream, member.binding.name) == (binding.stream, binding.name):
                member.reset(binding)

    async def _reconnected(self) -> None:
        for member in list(self._members):
            member.reconnected()

    async def _lost(self) -> None:
        if not self._closed:
            failure = ServiceUnavailable(
                f"the connection to NATS at {self.link.address} is closed", id=ERROR_ID
            )
            for member in list(self._members):
                member.lost(failure)


async def open_jetstream(address: str, data_dir: Path, **options: Any) -> JetStreamEvents:
    """The ``nats`` events engine: ``nats://[user:password@]host:port[?prefix=NAME&replicas=N]``.

    ``options``: ``retention``, ``retention_overrides``, ``max_event_bytes``
    and ``timeout`` (seconds to wait for NATS, default 5). ``SetupError`` if
    NATS does not answer or has no JetStream.
    """
    parts = urlsplit(address)
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    names = Names(query.pop("prefix", "micro"))
    replicas = query.pop("replicas", "1")
    if not replicas.isdigit() or not 1 <= int(replicas) <= 5:
        raise SetupError(
            f"replicas must be 1 to 5, not {replicas!r}, in the events address {redact(address)}"
        )
    if query:
        raise SetupError(f"unknown option(s) {sorted(query)} in the events address {redact(address)}")
    server = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    timeout = float(options.pop("timeout", 5.0))
    backend: JetStreamEvents | None = None

    async def reconnected() -> None:
        if backend is not None:
            await backend._reconnected()

    async def lost() -> None:
        if backend is not None:
            await backend._lost()

    try:
        link = await Link.open(server, timeout=timeout, on_reconnect=reconnected, on_lost=lost)
    except (OSError, nats.errors.Error, TimeoutError) as exc:
        raise SetupError(
            f"cannot reach NATS at {redact(address)} for events: {exc or type(exc).__name__}; "
            "start nats-server with JetStream (-js) or set MICRO_EVENTS_ADDRESS"
        ) from exc
    try:
        await link.api("INFO")
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError, ApiError) as exc:
        await link.close()
        raise SetupError(f"NATS at {redact(address)} has no JetStream: start nats-server with -js") from exc
    backend = JetStreamEvents(link, names, replicas=int(replicas), **options)
    return backend
