"""One SQLite file in WAL mode: a writer thread with group commit and a pool of readers.

Writes are queued to a single writer thread, which applies everything queued in
one transaction, each write in its own savepoint, and resolves the callers'
futures only after the commit: concurrent writes share one fsync (with
``synchronous=FULL``, the default, a write survives power loss; with
``NORMAL`` a commit does not fsync, and survives a process kill but maybe not
a power loss). Reads run on a few read-only connections in worker threads; WAL
lets them proceed while a write commits. Nothing here blocks the event loop.

With ``NORMAL``, a short write may instead commit on the calling thread (the
event loop, ``write_now``) when the writer thread is idle: without an fsync it
takes tens of microseconds, less than the hop to the thread and back.
Checkpoints, which do fsync, then never run there: the writing connection does
not checkpoint by itself (``wal_autocheckpoint=0``); after every
``_CHECKPOINT_ROWS`` rows written or ``_CHECKPOINT_BYTES`` the WAL grew by, the
writer thread checkpoints through a connection of its own, alongside the writes
(``PASSIVE``), and only if writes never let the WAL start over does it hold
them off for a ``RESTART``. Should the WAL still reach ``_WAL_HOLD_BYTES``
(a checkpoint's fsyncs slower than the loop's writes), short writes stop
committing on the loop and queue behind that checkpoint: the WAL file stays
bounded (``journal_size_limit`` trims it when it starts over).

Both embedded engines are built on it: the store's
(``micro_daemon.store.backends.sqlite``) and the events'
(``micro_daemon.events.sqlite``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from micro.errors import BadRequest, InternalServerError, MicroError, ServiceUnavailable, error_for_code

__all__ = ["SQLiteFile", "map_sqlite_exceptions"]

T = TypeVar("T")
logger = logging.getLogger(__name__)

_MAX_BATCH = 1000
_READERS = 4
_BUSY_TIMEOUT = 5.0
_CHECKPOINT_ROWS = 1000  # rows written between checkpoints ...
_CHECKPOINT_BYTES = 4 * 1024 * 1024  # ... or bytes the WAL grew by (SQLite's default: 1000 pages)
_RESTART_FRAMES = 4000  # a WAL that grew past this many pages (16 MiB) is made to start over
_WAL_HOLD_BYTES = 32 * 1024 * 1024  # a WAL this big holds short writes off until it starts over
_CHECKPOINT = object()  # queued to the writer thread: checkpoint


class map_sqlite_exceptions:  # used as a function: ``with map_sqlite_exceptions(block):``
    """Convert sqlite3 (and parameter encoding) errors into ``micro.errors`` ones with ``id=block``.

    A class, not a ``@contextmanager``: it wraps every read and write, and a generator-based
    manager costs about a hundred bytecodes a use where this costs a few.
    """

    __slots__ = ("block",)

    def __init__(self, block: str) -> None:
        self.block = block

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            return
        block = self.block
        if isinstance(exc, (sqlite3.DataError, OverflowError, UnicodeEncodeError)):
            raise BadRequest(f"{block} cannot hold this value: {exc}", id=block) from exc
        if isinstance(exc, sqlite3.OperationalError):
            raise ServiceUnavailable(f"{block} engine unavailable: {exc}", id=block) from exc
        if isinstance(exc, sqlite3.Error):
            raise InternalServerError(f"{block} engine error: {exc}", id=block) from exc


def _connect(path: Path) -> sqlite3.Connection:
    # Autocommit mode: transactions are explicit, and a lone SELECT never leaves one open.
    return sqlite3.connect(path, timeout=_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False)


def _prepare(path: Path, schema: str, block: str, synchronous: str) -> sqlite3.Connection:
    """Create the file (0600, in a 0700 directory if new) and schema; return the writer connection."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    os.chmod(path, 0o600)  # SQLite gives the -wal and -shm files the mode of the database file
    conn = _connect(path)
    try:
        with map_sqlite_exceptions(block):
            with contextlib.closing(conn.execute("PRAGMA journal_mode=WAL")) as cursor:
                mode = cursor.fetchone()[0]
            if mode != "wal":
                raise ServiceUnavailable(f"{path}: WAL mode unavailable (got {mode})", id=block)
            # FULL: each commit fsyncs the WAL, so a write survives power loss, not only a process
            # kill (NORMAL does for that). Group commit spreads the fsync over a whole batch.
            conn.execute(f"PRAGMA synchronous={synchronous}")
            if synchronous == "NORMAL":  # inline commits must not checkpoint (see the module docstring)
                conn.execute("PRAGMA wal_autocheckpoint=0")
                # A WAL that starts over is trimmed back, so its file's size tells how full it is.
                conn.execute(f"PRAGMA journal_size_limit={_CHECKPOINT_BYTES}")
            conn.executescript(schema)
    except BaseException:
        conn.close()
        raise
    return conn


@dataclass(frozen=True)
class _Write:
    """A write queued to the writer thread; ``future`` belongs to ``loop``, which alone settles it."""

    apply: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


Outcome = tuple[Any, BaseException | None]  # a write's result, or why it failed


def _settle(settled: list[tuple[asyncio.Future[Any], Outcome]]) -> None:
    """On the writes' loop: give each caller still waiting its outcome."""
    for future, (result, error) in settled:
        if future.done():  # the caller gave up after the writer took it: committed all the same
            continue
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)


def _hand_back(writes: list[_Write], outcomes: list[Outcome]) -> None:
    """Send ``outcomes`` to the writes' loops, one callback per loop (not one wake-up per write)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Outcome]]] = {}
    for write, outcome in zip(writes, outcomes, strict=True):
        by_loop.setdefault(write.loop, []).append((write.future, outcome))
    for loop, settled in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(_settle, settled)


class _Writer(threading.Thread):
    """Owns the only writing connection; commits whatever is queued as one transaction.

    ``lock`` is held while the connection is in use, by this thread or by an
    inline write on the event loop (``try_inline``, ``apply_inline``).
    """

    def __init__(
        self, conn: sqlite3.Connection, block: str, *, checkpointer: sqlite3.Connection | None
    ) -> None:
        super().__init__(name=f"micro-{block}-writer", daemon=True)
        self.conn = conn
        self.block = block
        self.checkpointer = checkpointer  # with NORMAL: inline writes, checkpoints through it
        self.queue: queue.SimpleQueue[_Write | object | None] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.commits = 0
        self.rollbacks = 0
        self.submitted = 0  # writes queued, counted by the event loop ...
        self.taken = 0  # ... and taken, counted by this thread: each count has one writer
        self._checkpointed = 0  # conn.total_changes at the last checkpoint request
        self._wal = f"{conn.execute('PRAGMA database_list').fetchone()[2]}-wal"
        self._wal_size = 0  # the WAL's size then
        self.held = False  # the WAL reached _WAL_HOLD_BYTES: no inline writes until it starts over

    def run(self) -> None:
        try:
            while self._step():
                pass
        finally:
            self._fail_leftovers()
            with self.lock:
                self.conn.close()
            if self.checkpointer is not None:
                self.checkpointer.close()

    def try_inline(self) -> bool:
        """Take the connection for a short write on the calling thread, if nothing waits for it."""
        if self.checkpointer is None or self.held or self.submitted != self.taken:
            return False
        return self.lock.acquire(blocking=False)

    def apply_inline(self, apply: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``apply`` in a transaction of its own, after ``try_inline`` took the connection."""
        try:
            with map_sqlite_exceptions(self.block):
                self.conn.execute("BEGIN IMMEDIATE")
                try:
                    result = apply(self.conn)
                    self.conn.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise
        except MicroError:
            raise
        except Exception as exc:
            raise self._copy_error(exc) from exc
        finally:
            self._committed()
            self.lock.release()
        return result

    def _committed(self) -> None:
        """Count a commit (holding ``lock``), and ask for a checkpoint when enough was written."""
        self.commits += 1
        if self.checkpointer is None:
            return
        try:  # a WAL restarted after a checkpoint refills before it grows: rows count meanwhile
            size = os.stat(self._wal).st_size
        except OSError:
            size = self._wal_size
        rows = self.conn.total_changes
        due = rows - self._checkpointed >= _CHECKPOINT_ROWS or size - self._wal_size >= _CHECKPOINT_BYTES
        if size >= _WAL_HOLD_BYTES and not self.held:
            self.held = due = True  # short writes now queue behind the checkpoint that restarts it
        if due:
            self._checkpointed, self._wal_size = rows, size
            self.queue.put(_CHECKPOINT)

    def _step(self) -> bool:
        batch, running, checkpoint = self._take()
        # A caller that gave up before this took its write drops it (a cancelled future only ever
        # stays cancelled, so reading that from this thread is safe); after, the write commits.
        writes = [write for write in batch if not write.future.cancelled()]
        if writes:
            with self.lock:
                outcomes = self._commit(writes)
            _hand_back(writes, outcomes)  # the connection is free
        if checkpoint:
            self._checkpoint()
        return running

    def _take(self) -> tuple[list[_Write], bool, bool]:
        """The writes queued (waiting for one), whether to go on, whether a checkpoint was asked."""
        batch: list[_Write] = []
        checkpoint = False
        item = self.queue.get()
        while True:
            if item is None:
                return batch, False, checkpoint
            if item is _CHECKPOINT:
                checkpoint = True
            else:
                assert isinstance(item, _Write)
                batch.append(item)
                self.taken += 1
            if len(batch) >= _MAX_BATCH:
                return batch, True, checkpoint
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return batch, True, checkpoint

    def _checkpoint(self) -> None:
        """Copy the WAL into the database alongside the writes; restart it if writes never let it."""
        assert self.checkpointer is not None
        try:
            with contextlib.closing(self.checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")) as cursor:
                _, frames, _ = cursor.fetchone()
            if frames > _RESTART_FRAMES or self.held:  # inline writes wait in the queue meanwhile
                with self.lock, contextlib.closing(self.conn.execute("PRAGMA wal_checkpoint(RESTART)")):
                    pass
        except sqlite3.Error as exc:
            logger.warning("checkpointing %s failed: %s", self.block, exc)
        finally:
            self.held = False

    def _commit(self, writes: list[_Write]) -> list[Outcome]:
        """Apply ``writes`` in one transaction: the result or error of each."""
        try:
            with map_sqlite_exceptions(self.block):
                self.conn.execute("BEGIN IMMEDIATE")
                outcomes = [self._apply(write) for write in writes]
                self.conn.execute("COMMIT")
        except Exception as exc:
            self._rollback()
            return [(None, self._copy_error(exc)) for _ in writes]
        self._committed()
        return outcomes

    def _apply(self, write: _Write) -> Outcome:
        self.conn.execute("SAVEPOINT write")
        try:
            with map_sqlite_exceptions(self.block):
                result = write.apply(self.conn)
        except Exception as exc:
            self.rollbacks += 1
            self.conn.execute("ROLLBACK TO write")
            self.conn.execute("RELEASE write")
            return None, exc if isinstance(exc, MicroError) else self._copy_error(exc)
        self.conn.execute("RELEASE write")
        return result, None

    def _rollback(self) -> None:
        self.rollbacks += 1
        with contextlib.suppress(sqlite3.Error):
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")

    def _fail_leftovers(self) -> None:
        leftovers: list[_Write] = []
        with contextlib.suppress(queue.Empty):
            while True:
                write = self.queue.get_nowait()
                if isinstance(write, _Write):
                    leftovers.append(write)
        closed: list[Outcome] = [
            (None, ServiceUnavailable(f"{self.block} is closed", id=self.block)) for _ in leftovers
        ]
        _hand_back(leftovers, closed)

    def _copy_error(self, exc: Exception) -> MicroError:
        # Every waiting caller gets its own exception object (tracebacks are per raise).
        if isinstance(exc, MicroError):
            return error_for_code(exc.code, exc.detail, id=exc.id)
        return InternalServerError(f"{self.block} write failed: {exc!r}", id=self.block)


class _ReaderPool:
    """Read-only connections, one per reader thread at most, created on demand."""

    def __init__(self, path: Path, block: str) -> None:
        self._path = path
        self._block = block
        self._idle: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def run(self, read: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._acquire()
        try:
            with map_sqlite_exceptions(self._block):
                return read(conn)
        finally:
            self._idle.put(conn)

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()

    def _acquire(self) -> sqlite3.Connection:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        conn = _connect(self._path)
        conn.execute("PRAGMA query_only=ON")
        with self._lock:
            self._all.append(conn)
        return conn


class SQLiteFile:
    """A SQLite file in WAL mode served by one writer thread and a few reader threads.

    ``await SQLiteFile(path, schema, block="events").open()`` creates the file
    (0600) and the schema; ``write(apply)`` runs ``apply(conn)`` inside the
    writer's next transaction and returns its result once committed; ``read``
    runs a function on a read connection in a worker thread. ``synchronous``:
    ``FULL`` or ``NORMAL`` (see the module docstring). Errors are
    ``micro.errors`` with ``id=block``.
    """

    def __init__(self, path: Path, schema: str, *, block: str, synchronous: str = "FULL") -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        self.path = path
        self.block = block
        self.synchronous = synchronous
        self._schema = schema
        self._writer: _Writer | None = None
        self._readers = _ReaderPool(path, block)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False

    @property
    def commits(self) -> int:
        """Transactions committed so far (a measure of group commit)."""
        return self._writer.commits if self._writer is not None else 0

    @property
    def rollbacks(self) -> int:
        """Writes or transactions rolled back so far: what a write function cached may be void."""
        return self._writer.rollbacks if self._writer is not None else 0

    async def open(self) -> SQLiteFile:
        """Create the file and schema if needed and start the threads."""
        conn = await asyncio.to_thread(_prepare, self.path, self._schema, self.block, self.synchronous)
        checkpointer = None
        if self.synchronous == "NORMAL":
            checkpointer = await asyncio.to_thread(_connect, self.path)
        self._writer = _Writer(conn, self.block, checkpointer=checkpointer)
        self._writer.start()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            _READERS, thread_name_prefix=f"micro-{self.block}-read"
        )
        return self

    async def read(self, read: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``read(conn)`` on a read-only connection off the event loop."""
        if self._closed or self._executor is None:
            raise ServiceUnavailable(f"{self.block} is closed", id=self.block)
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._readers.run, read)

    def read_now(self, read: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``read(conn)`` on the calling thread (the event loop).

        Only for lookups by primary key: they take microseconds, where the hop
        to a reader thread and back costs a hundred or more; and in WAL mode a
        reader never waits for the writer.
        """
        if self._closed or self._executor is None:
            raise ServiceUnavailable(f"{self.block} is closed", id=self.block)
        return self._readers.run(read)

    def write_now(self, apply: Callable[[sqlite3.Connection], T]) -> tuple[T] | None:
        """Commit ``apply(conn)`` on the calling thread if allowed (``NORMAL``) and the writer is
        idle: its result, in a 1-tuple. Otherwise ``None``, and nothing was done: use ``write``.

        Only for short writes (a few rows): the event loop waits for the commit.
        """
        writer = self._open_writer()
        return (writer.apply_inline(apply),) if writer.try_inline() else None

    async def write(self, apply: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``apply(conn)`` in the writer's next transaction; return its result once durable.

        Cancelling the caller before the writer takes the write drops it; after
        that, the write still commits.
        """
        writer = self._open_writer()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        writer.submitted += 1
        writer.queue.put(_Write(apply, future, loop))
        return await future

    def _open_writer(self) -> _Writer:
        if self._closed or self._writer is None:
            raise ServiceUnavailable(f"{self.block} is closed", id=self.block)
        if not self._writer.is_alive():
            raise ServiceUnavailable(f"{self.block} writer thread stopped", id=self.block)
        return self._writer

    def status(self) -> str:
        """``ok``, ``not open``, ``closed`` or ``writer thread stopped``; runs no query."""
        if self._closed:
            return "closed"
        if self._writer is None:
            return "not open"
        if not self._writer.is_alive():
            return "writer thread stopped"
        return "ok"

    def healthy(self) -> bool:
        """Whether the file is open and its writer thread running."""
        return self.status() == "ok"

    async def close(self) -> None:
        """Commit queued writes, stop the threads and close every connection. Never raises."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._writer is not None:
                self._writer.queue.put(None)
                await asyncio.to_thread(self._writer.join)
            if self._executor is not None:
                await asyncio.to_thread(self._executor.shutdown, True)
            self._readers.close()
        except Exception:
            logger.exception("closing the SQLite file %s failed", self.path)
