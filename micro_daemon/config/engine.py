"""The config engine: Micro's config semantics over a store backend, plus watches.

Each namespace's tree (``micro_daemon.config.tree``) is one store record in
database ``micro``, table ``config``, keyed by the namespace, holding the
tree's JSON. Writes are read-modify-write guarded by the record's version and
retried on ``Conflict``, so concurrent writers, in this process or another one
sharing the store, never lose each other's leaves. A record that does not
parse is reported, never overwritten.

Watches are in-process: they see the writes made through this engine only.
Each has a queue of ``WATCH_QUEUE_SIZE`` changes; a watch that falls that far
behind is dropped, and its iterator raises ``TooManyRequests`` once it has
yielded the changes it holds (read the value again and watch anew).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import weakref
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from micro.errors import BadRequest, Conflict, InternalServerError, MicroError, NotFound, TooManyRequests
from micro_daemon.config import tree
from micro_daemon.store.backend import SYSTEM_DATABASE, Record

if TYPE_CHECKING:
    from types import TracebackType

    from micro_daemon.config.secrets import SecretBox
    from micro_daemon.config.tree import Tree
    from micro_daemon.store.backend import StoreBackend

__all__ = ["DATABASE", "MAX_VALUE_BYTES", "TABLE", "WATCH_QUEUE_SIZE", "Change", "ConfigEngine", "Watch"]

DATABASE = SYSTEM_DATABASE
TABLE = "config"
MAX_VALUE_BYTES = 1024 * 1024
WATCH_QUEUE_SIZE = 100
_WRITE_ATTEMPTS = 20

Change = tuple[str, Any]
"""``(changed_path, value_at_watched_path)``; the value is ``None`` once nothing is there."""


class ConfigEngine:
    """Get, set, delete and watch the config trees of namespaces, kept in a ``StoreBackend``.

    Errors are ``micro.errors`` with ``id="config"``: ``BadRequest`` for a bad
    namespace, path or value, ``NotFound`` for a missing path,
    ``InternalServerError`` for a corrupt stored tree.
    """

    def __init__(self, store: StoreBackend, secrets: SecretBox, *, watch_queue_size: int = WATCH_QUEUE_SIZE):
        self._store = store
        self._secrets = secrets
        self._watch_queue_size = watch_queue_size
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._watches: defaultdict[str, weakref.WeakSet[Watch]] = defaultdict(weakref.WeakSet)

    async def get(self, namespace: str, path: str = "", reveal: bool = False) -> Any:
        """The plain JSON at ``path`` (``""``: the whole tree, ``{}`` when empty).

        Secrets read as ``"[secret]"`` unless ``reveal``. Raises ``NotFound``.
        """
        current, _ = await self._load(_checked_namespace(namespace))
        return tree.get(current, path, reveal=reveal, cipher=self._secrets)

    async def set(self, namespace: str, path: str, value: Any, secret: bool = False) -> None:
        """Set ``value`` at ``path``: objects merge leaf by leaf, anything else replaces.

        With ``secret`` the leaves are stored encrypted. Raises ``BadRequest``
        for a value that is not JSON or is over ``MAX_VALUE_BYTES`` as JSON.
        """
        _check_value(value)
        await self._update(
            namespace,
            path,
            lambda current: tree.set(current, path, value, secret=secret, cipher=self._secrets),
        )

    async def delete(self, namespace: str, path: str) -> None:
        """Remove the node at ``path`` (``""``: everything). Raises ``NotFound``."""
        await self._update(namespace, path, lambda current: tree.delete(current, path))

    def watch(self, namespace: str, path: str = "", reveal: bool = False) -> Watch:
        """Start watching ``path``: changes made from now on are queued until iterated.

        A set or delete at ``path``, an ancestor or a descendant yields a
        ``Change``. Close the watch (``aclose()`` or ``async with``) when done.
        """
        tree.split_path(path)
        watch = Watch(_checked_namespace(namespace), path, reveal, self._watch_queue_size, self._forget)
        self._watches[namespace].add(watch)
        return watch

    async def _update(self, namespace: str, path: str, change: Callable[[Tree], Tree]) -> None:
        _checked_namespace(namespace)
        tree.split_path(path)
        # The lock spares writers of this process the retries; versions guard against other processes.
        async with self._locks[namespace]:
            updated = await self._write(namespace, change)
            self._notify(namespace, path, updated)

    async def _write(self, namespace: str, change: Callable[[Tree], Tree]) -> Tree:
        for attempt in range(_WRITE_ATTEMPTS):
            current, version = await self._load(namespace)
            updated = change(current)
            record = Record(key=namespace, value=_encode(updated))
            try:
                await self._store.put(DATABASE, TABLE, record, if_version=version)
            except Conflict:
                await asyncio.sleep(random.uniform(0, 0.001 * 2 ** min(attempt, 6)))
                continue
            return updated
        raise Conflict(
            f"config of namespace {namespace!r} kept changing during this write "
            f"({_WRITE_ATTEMPTS} attempts); try again",
            id="config",
        )

    async def _load(self, namespace: str) -> tuple[Tree, int]:
        try:
            record = await self._store.get(DATABASE, TABLE, namespace)
        except NotFound:
            return {}, 0
        return _decode(namespace, record.value), record.version

    def _notify(self, namespace: str, path: str, updated: Tree) -> None:
        for watch in list(self._watches.get(namespace, ())):
            if tree.overlaps(path, watch.path):
                self._deliver(watch, path, updated)

    def _deliver(self, watch: Watch, path: str, updated: Tree) -> None:
        try:
            value = tree.get(updated, watch.path, reveal=watch.reveal, cipher=self._secrets)
        except NotFound:
            value = None
        except MicroError as exc:
            watch._fail(exc)
            return
        watch._offer((path, value))

    def _forget(self, watch: Watch) -> None:
        watches = self._watches.get(watch.namespace)
        if watches is not None:
            watches.discard(watch)
            if not watches:
                del self._watches[watch.namespace]


class Watch(AsyncIterator[Change]):
    """The changes seen at one watched path of a namespace, as an async iterator of ``Change``.

    Raises ``TooManyRequests`` after falling too far behind, and stops once
    closed. Also an async context manager that closes it on exit.
    """

    def __init__(
        self, namespace: str, path: str, reveal: bool, maxsize: int, forget: Callable[[Watch], None]
    ) -> None:
        self.namespace = namespace
        self.path = path
        self.reveal = reveal
        # None wakes a waiting reader to look at _closed/_error.
        self._queue: asyncio.Queue[Change | None] = asyncio.Queue(maxsize)
        self._forget = forget
        self._closed = False
        self._error: MicroError | None = None

    async def __anext__(self) -> Change:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._error is not None and self._queue.empty():
                raise self._error
            change = await self._queue.get()
            if change is not None:
                return change

    async def aclose(self) -> None:
        """Stop watching; the iterator stops, dropping queued changes. Idempotent."""
        self._closed = True
        self._end()

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _offer(self, change: Change) -> None:
        try:
            self._queue.put_nowait(change)
        except asyncio.QueueFull:
            self._fail(
                TooManyRequests(
                    f"config watch of {self.path or 'the whole tree'!r} in namespace {self.namespace!r} "
                    f"fell {self._queue.maxsize} changes behind and was dropped; read the current value "
                    "and watch again",
                    id="config",
                )
            )

    def _fail(self, error: MicroError) -> None:
        if self._error is None:
            self._error = error
        self._end()

    def _end(self) -> None:
        self._forget(self)
        with contextlib.suppress(asyncio.QueueFull):  # a full queue means no reader is waiting
            self._queue.put_nowait(None)


def _checked_namespace(namespace: str) -> str:
    if not namespace:
        raise BadRequest("config namespace is empty; give one, e.g. 'micro'", id="config")
    return namespace


def _check_value(value: Any) -> None:
    try:
        size = len(json.dumps(value, allow_nan=False, separators=(",", ":")).encode())
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"config value is not JSON: {exc}", id="config") from exc
    if size > MAX_VALUE_BYTES:
        raise BadRequest(
            f"config value is {size} bytes as JSON, over the limit of {MAX_VALUE_BYTES}; "
            "split it over several paths",
            id="config",
        )


def _encode(config: Tree) -> bytes:
    return json.dumps(config, separators=(",", ":"), ensure_ascii=False).encode()


def _decode(namespace: str, raw: bytes) -> Tree:
    try:
        return tree.validate(json.loads(raw))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError included
        raise InternalServerError(
            f"config of namespace {namespace!r} (store {DATABASE}/{TABLE}, key {namespace!r}) is corrupt: "
            f"{exc}; it was left as it is: repair or delete that record",
            id="config",
        ) from exc
