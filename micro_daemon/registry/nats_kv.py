"""The NATS KV registry engine: daemons that share a bucket share one registry.

Layout: one bucket, ``<prefix>_registry`` (``micro_registry`` unless the
address says ``?prefix=NAME``), holds every domain, with one
key per service version, ``<domain>.<name>.<version>``. Each part is escaped
into one key token: ``[A-Za-z0-9_-]`` stays, any other byte becomes ``=XX``,
and an empty part is ``=``. The value is the version's whole state: a JSON line
``{"expires": [...]}`` (each node's deadline in Unix seconds, 0 for never) and
then the ``registry_pb2.Service`` with its nodes. We keep one key per version
rather than one per node because a ``register`` replaces the version's
metadata, endpoints and schema and merges its nodes, and with one key that is a
single compare-and-set write. Watchers then see one event per change, exactly
as with the memory engine. Many nodes heartbeating one version contend for its
key, and a losing write re-reads and retries.

Expiry: NATS 2.9 KV can only expire a whole bucket's entries after one
``max_age``. That can't express per-register TTLs (nor TTL 0, "never"), and a
version key holds nodes of different ages. So each node carries its own
deadline. It is measured on the wall clock because daemons on several machines
share it, so keep their clocks in sync. Reads skip lapsed nodes, and
``expire()`` rewrites the versions that hold some. Every write is a
compare-and-set on the key's revision. When several daemons expire at once, the
losers re-read, find nothing left to drop, and count nothing.

Reads and watches: each registry follows the bucket with a KV watcher
(``watchall``) into an in-memory copy. Reads are served from that copy, and
watch events come from its changes, whichever daemon wrote them. A write
returns only once the copy has seen it, so a daemon reads its own writes and
its watchers have the event before the call returns. Other daemons' writes
arrive as fast as NATS delivers them. While the connection to NATS is down
(the client reconnects for as long as it takes), writes fail at once with
``ServiceUnavailable`` and reads answer from the copy as it was, whose nodes
lapse as their deadlines pass, since nobody can renew them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import nats.errors
import nats.js.errors
from nats.js.api import Header
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE

from micro.errors import BadRequest, NotFound, ServiceUnavailable, SetupError
from micro.proto import registry_pb2
from micro_daemon.broker.nats import (
    DEFAULT_PREFIX,
    check_connected,
    connect,
    connection_state,
    map_nats_exceptions,
    parse_address,
    shown_address,
)
from micro_daemon.registry.backend import ALL_DOMAINS, RegistryBackend, Watcher

# The memory engine's request checks are the contract: share them rather than copy them.
from micro_daemon.registry.memory import (
    _ERROR_ID,
    WatchHub,
    _check_domain,
    _check_name,
    _check_node,
    _check_service,
    _check_ttl,
)

if TYPE_CHECKING:
    from pathlib import Path

    from nats.aio.client import Client as NATS
    from nats.js.kv import KeyValue

__all__ = ["DEFAULT_BUCKET", "NatsKVRegistry", "bucket_key", "open_nats_kv"]

log = logging.getLogger("micro.registry")

DEFAULT_BUCKET = "micro_registry"
_MAX_KEY = 1024  # bytes; the key travels in the NATS protocol line, which the server caps at 4 KiB
_ATTEMPTS = 20  # compare-and-set retries before giving up on a contended key
_SYNC_TIMEOUT = 30.0  # seconds to read the bucket at start-up
_SEEN_TIMEOUT = 10.0  # seconds for our own write to come back through the watcher
_REFOLLOW_DELAY = 0.5  # seconds between tries to watch the bucket again after a reconnect
_WRONG_LAST_SEQUENCE = (10071, 10164)  # JetStream's error codes, as KeyValue.update() reads them
_SAFE = re.compile(r"[A-Za-z0-9_-]")
_ESCAPE = re.compile(r"=([0-9A-F]{2})|([A-Za-z0-9_-])")

Clock = Callable[[], float]


@dataclass
class _Version:
    """A stored version: its service with every node, and each node's deadline (0: never)."""

    service: registry_pb2.Service
    expires: list[float]

    def lapsed(self, now: float) -> list[str]:
        return [node.id for node, at in zip(self.service.nodes, self.expires, strict=True) if 0 < at <= now]

    def live(self, now: float, *, full: bool = True) -> registry_pb2.Service | None:
        nodes = [node for node, at in zip(self.service.nodes, self.expires, strict=True) if not 0 < at <= now]
        if not nodes:
            return None
        service = registry_pb2.Service()
        service.CopyFrom(self.service)
        service.ClearField("nodes")
        if not full:
            service.ClearField("endpoints")
            service.ClearField("schema")
        service.nodes.extend(nodes)
        return service

    def merged(self, service: registry_pb2.Service, expires_at: float) -> _Version:
        """This version registered again with ``service``: its nodes (re)placed, the rest replaced."""
        nodes = dict(self._nodes())
        for node in service.nodes:
            nodes[node.id] = (node, expires_at)
        return _Version._of(service, list(nodes.values()))

    def without(self, node_ids: list[str]) -> _Version | None:
        """This version without ``node_ids``; None when no node is left."""
        kept = [(node, at) for node_id, (node, at) in self._nodes() if node_id not in node_ids]
        return _Version._of(self.service, kept) if kept else None

    def holds_any(self, node_ids: list[str]) -> bool:
        return any(node.id in node_ids for node in self.service.nodes)

    def encode(self) -> bytes:
        header = json.dumps({"expires": self.expires}, separators=(",", ":"))
        return header.encode() + b"\n" + self.service.SerializeToString()

    @classmethod
    def decode(cls, value: bytes) -> _Version:
        """Parse a stored value; ``ValueError`` if it is not one."""
        header, newline, body = value.partition(b"\n")
        expires = json.loads(header)["expires"] if newline else None
        service = registry_pb2.Service.FromString(body)
        if not isinstance(expires, list) or len(expires) != len(service.nodes):
            raise ValueError("node deadlines do not match the nodes")
        return cls(service, [float(at) for at in expires])

    def _nodes(self) -> Iterator[tuple[str, tuple[registry_pb2.Node, float]]]:
        for node, at in zip(self.service.nodes, self.expires, strict=True):
            yield node.id, (node, at)

    @staticmethod
    def _of(service: registry_pb2.Service, nodes: list[tuple[registry_pb2.Node, float]]) -> _Version:
        stored = registry_pb2.Service()
        stored.CopyFrom(service)
        stored.ClearField("nodes")
        stored.nodes.extend(node for node, _ in nodes)
        return _Version(stored, [at for _, at in nodes])


_EMPTY = _Version(registry_pb2.Service(), [])


class NatsKVRegistry(RegistryBackend):
    """A registry in a NATS JetStream KV bucket, shared by every daemon that opens the same bucket.

    Create it with ``open``. ``watch_buffer`` is how many events a watcher may
    lag behind before it is dropped; ``clock`` is the wall-clock time source
    of the TTLs (see the module docstring for the layout and expiry).
    """

    def __init__(
        self,
        connection: NATS,
        kv: KeyValue,
        *,
        address: str,
        bucket: str,
        watch_buffer: int = 1024,
        clock: Clock = time.time,
    ) -> None:
        self._connection = connection
        self._kv = kv
        self._address = address
        self._bucket = bucket
        self._clock = clock
        self._hub = WatchHub(watch_buffer)
        self._domains: dict[str, dict[str, dict[str, _Version]]] = {}
        self._revision = 0  # the last bucket revision applied to the copy
        self._seen: list[tuple[int, asyncio.Future[None]]] = []
        self._synced = asyncio.Event()
        self._follower: asyncio.Task[None] | None = None
        self._refollowing: asyncio.Task[None] | None = None
        self._closed = False
        self._lost = ""  # why the copy went stale (the connection closed under us), if it did

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        bucket: str = DEFAULT_BUCKET,
        replicas: int = 1,
        watch_buffer: int = 1024,
        clock: Clock = time.time,
    ) -> NatsKVRegistry:
        """Connect to NATS at ``url`` and follow ``bucket``, creating it (with ``replicas``) if needed.

        Raises ``SetupError`` naming the servers (never credentials) if NATS is
        unreachable, has no JetStream, or the bucket cannot be used.
        """
        address = shown_address(url)
        registry: NatsKVRegistry | None = None

        async def on_closed() -> None:
            if registry is not None:
                registry._on_closed()

        async def on_reconnected() -> None:
            if registry is not None:
                registry._on_reconnected()

        connection = await connect(
            url, name="micro-registry", id=_ERROR_ID, closed_cb=on_closed, reconnected_cb=on_reconnected
        )
        try:
            try:
                kv = await _bucket(connection, bucket, replicas)
                registry = cls(
                    connection, kv, address=address, bucket=bucket, watch_buffer=watch_buffer, clock=clock
                )
                await registry._follow()
            except (TimeoutError, nats.errors.Error) as exc:
                raise SetupError(
                    f"cannot use registry bucket {bucket!r} on NATS at {address} (JetStream enabled?): "
                    f"{str(exc).removeprefix('nats: ') or type(exc).__name__}",
                    id=_ERROR_ID,
                ) from exc
        except BaseException:
            if registry is not None:
                await registry.close()
            await connection.close()
            raise
        return registry

    async def register(self, domain: str, service: registry_pb2.Service, ttl: float) -> None:
        _check_domain(domain, writable=True)
        _check_service(service)
        _check_ttl(ttl)
        if not service.nodes:
            raise BadRequest(f"service {service.name} has no nodes to register", id=_ERROR_ID)
        for node in service.nodes:
            _check_node(node, address=True)
        key = self._key(domain, service.name, service.version)
        expires_at = self._clock() + ttl if ttl > 0 else 0.0
        await self._change(key, lambda current: (current or _EMPTY).merged(service, expires_at))

    async def deregister(self, domain: str, service: registry_pb2.Service) -> None:
        _check_domain(domain, writable=True)
        _check_service(service)
        if not service.nodes:
            raise BadRequest(f"service {service.name} has no nodes to deregister", id=_ERROR_ID)
        for node in service.nodes:
            _check_node(node, address=False)
        node_ids = [node.id for node in service.nodes]
        key = self._key(domain, service.name, service.version)
        await self._change(
            key,
            lambda current: current.without(node_ids) if current and current.holds_any(node_ids) else current,
        )

    async def get_service(self, domain: str, name: str) -> list[registry_pb2.Service]:
        _check_domain(domain, writable=False)
        _check_name(name)
        self._check_open()
        now = self._clock()
        found = [service for version in self._versions(domain, name) if (service := version.live(now))]
        if not found:
            raise NotFound(f"service {name} not found", id=_ERROR_ID)
        return sorted(found, key=lambda service: service.version)

    async def list_services(self, domain: str) -> list[registry_pb2.Service]:
        _check_domain(domain, writable=False)
        self._check_open()
        now = self._clock()
        found = [service for version in self._versions(domain) if (service := version.live(now, full=False))]
        return sorted(found, key=lambda service: (service.name, service.version))

    def watch(self, domain: str, name: str = "") -> Watcher:
        _check_domain(domain, writable=False)
        if name:
            _check_name(name)
        return self._hub.subscribe(domain, name)

    async def expire(self) -> int:
        now = self._clock()
        keys = [
            self._key(domain, version.service.name, version.service.version)
            for domain in list(self._domains)
            for version in self._versions(domain)
            if version.lapsed(now)
        ]
        return sum([await self._change(key, lambda current: current) for key in keys])

    async def health(self) -> str:
        if self._closed:
            return "closed"
        if self._lost:  # the copy is stale until the daemon restarts
            return f"unavailable: {self._lost}"
        return connection_state(self._connection, self._address)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._hub.close()
        if self._refollowing is not None:
            self._refollowing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refollowing
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        for _, waiter in self._seen:
            waiter.cancel()
        with contextlib.suppress(Exception):
            await self._connection.close()

    # -- writing ------------------------------------------------------------

    async def _change(self, key: str, change: Callable[[_Version | None], _Version | None]) -> int:
        """Drop the lapsed nodes at ``key``, then apply ``change``; return how many nodes were dropped.

        ``change`` gets the stored version (None if there is none) and returns
        the new one (None deletes it, the same object writes nothing). Every
        write is a compare-and-set, retried from a fresh read on conflict.
        """
        dropped = 0
        for attempt in range(_ATTEMPTS):
            self._check_open()
            check_connected(self._connection, _ERROR_ID, self._address)
            with map_nats_exceptions(_ERROR_ID, self._address):
                current, revision = await self._load(key)
                try:
                    if current is not None and (lapsed := current.lapsed(self._clock())):
                        current = current.without(lapsed)
                        revision = await self._store(key, current, revision)
                        dropped += len(lapsed)
                    wanted = change(current)
                    if wanted is not current:
                        revision = await self._store(key, wanted, revision)
                except nats.js.errors.KeyWrongLastSequenceError:
                    await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
                    continue
            await self._caught_up(revision)
            return dropped
        raise ServiceUnavailable(
            f"registry key {key} is too contended: gave up after {_ATTEMPTS} tries", id=_ERROR_ID
        )

    async def _load(self, key: str) -> tuple[_Version | None, int]:
        try:
            entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError as exc:
            # A deleted key's marker has a revision too: the next write must name it.
            return None, exc.entry.revision if exc.entry is not None and exc.entry.revision else 0
        return _decode(key, entry.value or b""), entry.revision or 0

    async def _store(self, key: str, version: _Version | None, last: int) -> int:
        """Write ``version`` (None: delete) at ``key`` if its revision is still ``last``; return the new."""
        if version is not None:
            return await self._kv.update(key, version.encode(), last=last)
        # KeyValue.delete() does not return the marker's revision, which _caught_up needs.
        try:
            ack = await self._connection.jetstream().publish(
                f"$KV.{self._bucket}.{key}",
                headers={KV_OP: KV_DEL, Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(last)},
            )
        except nats.js.errors.APIError as exc:
            if exc.err_code in _WRONG_LAST_SEQUENCE:
                raise nats.js.errors.KeyWrongLastSequenceError(exc.description) from exc
            raise
        return ack.seq

    async def _caught_up(self, revision: int) -> None:
        """Wait until the copy holds ``revision``: the caller reads its write, watchers have its event."""
        if self._revision >= revision:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._seen.append((revision, waiter))
        try:
            await asyncio.wait_for(waiter, _SEEN_TIMEOUT)
        except TimeoutError:
            # The write is in the bucket, but this daemon's copy is stuck: say so rather than serve it.
            raise ServiceUnavailable(
                f"registry write to NATS at {self._address} not seen back within {_SEEN_TIMEOUT:g}s",
                id=_ERROR_ID,
            ) from None
        finally:
            self._seen = [(at, other) for at, other in self._seen if other is not waiter]

    def _check_open(self) -> None:
        if self._closed:
            raise ServiceUnavailable("registry is closed", id=_ERROR_ID)
        if self._lost:
            raise ServiceUnavailable(self._lost, id=_ERROR_ID)

    # -- following the bucket -----------------------------------------------

    async def _follow(self) -> None:
        """Start following the bucket; return once the copy holds what it held at the start."""
        watcher = await self._kv.watchall()
        self._follower = asyncio.get_running_loop().create_task(self._apply_all(watcher))
        await asyncio.wait_for(self._synced.wait(), _SYNC_TIMEOUT)

    def _on_reconnected(self) -> None:
        # A restarted server has lost the watcher's ephemeral consumer: nats-py would notice only
        # after two missed heartbeats (10 s), and writes wait to see themselves come back.
        if not self._closed and not self._lost:
            log.info(
                "reconnected to NATS at %s: following registry bucket %s again", self._address, self._bucket
            )
            if self._refollowing is not None:
                self._refollowing.cancel()
            self._refollowing = asyncio.get_running_loop().create_task(self._follow_again())

    async def _follow_again(self) -> None:
        """Replace the watcher with a new one, which delivers every key again (applied idempotently)."""
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
            self._follower = None
        while not self._closed and not self._lost:
            try:
                watcher = await self._kv.watchall()
            except (TimeoutError, nats.errors.Error) as exc:  # JetStream may still be starting
                log.debug("watching registry bucket %s again failed: %s", self._bucket, exc)
                await asyncio.sleep(_REFOLLOW_DELAY)
                continue
            self._follower = asyncio.get_running_loop().create_task(self._apply_all(watcher))
            return

    async def _apply_all(self, watcher: KeyValue.KeyWatcher) -> None:
        try:
            async for entry in watcher:
                if entry is None:  # the end of what the bucket held at the start
                    self._synced.set()
                else:
                    self._apply(entry)
        except Exception:
            log.exception("following registry bucket %s on NATS at %s failed", self._bucket, self._address)
            self._lost = f"following registry bucket {self._bucket} on NATS at {self._address} failed"
            self._hub.close()
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    def _apply(self, entry: KeyValue.Entry) -> None:
        parts = _parse_key(entry.key)
        if parts is not None:
            deleted = entry.operation in (KV_DEL, KV_PURGE) or entry.value is None
            self._replace(*parts, None if deleted else _decode(entry.key, entry.value or b""))
        self._revision = max(self._revision, entry.revision or 0)
        for revision, waiter in self._seen:
            if revision <= self._revision and not waiter.done():
                waiter.set_result(None)

    def _replace(self, domain: str, name: str, version_name: str, after: _Version | None) -> None:
        """Put ``after`` (None: nothing) in the copy and tell the watchers what changed."""
        versions = self._domains.setdefault(domain, {}).setdefault(name, {})
        before = versions.pop(version_name, None)
        if after is not None:
            versions[version_name] = after
        elif not versions:
            del self._domains[domain][name]
            if not self._domains[domain]:
                del self._domains[domain]
        if after is None:
            if before is not None:
                self._hub.publish(domain, "delete", before.service)
        elif before is None:
            self._hub.publish(domain, "create", after.service)
        elif before.service != after.service:  # a heartbeat moves deadlines only
            self._hub.publish(domain, "update", after.service)

    def _on_closed(self) -> None:
        if not self._closed:
            self._lost = f"connection to NATS at {self._address} closed"
            log.warning("%s: registry watchers end", self._lost)
            self._hub.close()

    # -- the copy -----------------------------------------------------------

    def _versions(self, domain: str, name: str = "") -> Iterator[_Version]:
        domains = sorted(self._domains) if domain == ALL_DOMAINS else [domain]
        for domain_name in domains:
            services = self._domains.get(domain_name, {})
            for service_name in [name] if name else list(services):
                yield from list(services.get(service_name, {}).values())

    def _key(self, domain: str, name: str, version: str) -> str:
        key = bucket_key(domain, name, version)
        if len(key) > _MAX_KEY:
            raise BadRequest(
                f"service {name} version {version[:40]!r} is too long for the registry: "
                f"its key is {len(key)} bytes, the limit {_MAX_KEY}",
                id=_ERROR_ID,
            )
        return key


async def _bucket(connection: NATS, bucket: str, replicas: int) -> KeyValue:
    js = connection.jetstream()
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(
            bucket=bucket, history=1, replicas=replicas, description="micro registry"
        )
    except nats.js.errors.BadRequestError:
        return await js.key_value(bucket)  # another daemon created it first


async def open_nats_kv(address: str, data_dir: Path) -> NatsKVRegistry:
    """The ``nats`` registry engine: ``nats://[user:password@]host:port[,...][?prefix=NAME&replicas=N]``."""
    servers, options = parse_address(address, block=_ERROR_ID, options=("prefix", "replicas"))
    replicas = options.get("replicas", "1")
    if not replicas.isdigit() or not 1 <= int(replicas) <= 5:
        raise SetupError(f"invalid replicas {replicas!r} in the registry address: use 1 to 5", id=_ERROR_ID)
    bucket = f"{options.get('prefix', DEFAULT_PREFIX).lower()}_registry"
    return await NatsKVRegistry.open(servers, bucket=bucket, replicas=int(replicas))


def bucket_key(domain: str, name: str, version: str) -> str:
    """The KV key of a service version (see the module docstring)."""
    return ".".join(_token(part) for part in (domain, name, version))


def _token(text: str) -> str:
    return "".join(char if _SAFE.fullmatch(char) else _escape(char) for char in text) or "="


def _escape(char: str) -> str:
    return "".join(f"={byte:02X}" for byte in char.encode())


def _untoken(token: str) -> str:
    """The text of a key token; ``ValueError`` if it is not one we wrote."""
    if token == "=":
        return ""
    raw = bytearray()
    position = 0
    for match in _ESCAPE.finditer(token):
        if match.start() != position:
            raise ValueError(f"not an escaped key token: {token!r}")
        raw += bytes.fromhex(match[1]) if match[1] else match[2].encode()
        position = match.end()
    if position != len(token) or not token:
        raise ValueError(f"not an escaped key token: {token!r}")
    return raw.decode()


def _parse_key(key: str) -> tuple[str, str, str] | None:
    parts = key.split(".")
    try:
        if len(parts) == 3:
            domain, name, version = (_untoken(part) for part in parts)
            return domain, name, version
    except ValueError:
        pass
    log.warning("ignoring registry key %r: not <domain>.<name>.<version>", key)
    return None


def _decode(key: str, value: bytes) -> _Version | None:
    try:
        return _Version.decode(value)
    except (ValueError, KeyError, TypeError) as exc:  # protobuf's DecodeError is a ValueError
        log.warning("ignoring registry key %r: unreadable value (%s)", key, exc)
        return None
