"""Per-service log files: JSON lines, rotated by size, read backwards, followed live.

Each record is one line ``{"timestamp": float, "metadata": {...}, "message": str}``,
the shape of the runtime's ``LogRecord``. ``name.log`` grows to ``max_bytes``,
then becomes ``name.log.1`` (``.1`` becomes ``.2`` and so on, the oldest beyond
``backups`` is dropped). Readers never poll the file: ``follow`` gets new records
from the ``LogFile`` that wrote them, so every writer and reader of one service
must share one ``LogFile`` object.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import deque
from collections.abc import AsyncGenerator, Generator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Line", "LogFile"]

MiB = 1024 * 1024
RUNTIME_SOURCE = {"source": "runtime"}
_BLOCK = 64 * 1024
_FOLLOW_BACKLOG = 10_000


@dataclass(frozen=True)
class Line:
    """One log record: a line a service wrote, or one the runtime wrote about it."""

    timestamp: float
    metadata: dict[str, str]
    message: str

    def to_json(self) -> str:
        record = {"timestamp": self.timestamp, "metadata": self.metadata, "message": self.message}
        return json.dumps(record, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes) -> Line | None:
        """Parse one stored line; ``None`` for a torn or foreign line."""
        try:
            record = json.loads(raw)
            metadata = {str(k): str(v) for k, v in record.get("metadata", {}).items()}
            return cls(float(record["timestamp"]), metadata, str(record["message"]))
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


class _Follower:
    """The new records one ``follow`` has not yielded yet; the oldest drop when it falls behind."""

    def __init__(self) -> None:
        self.pending: deque[Line] = deque()
        self.dropped = 0
        self.closed = False
        self.wakeup = asyncio.Event()

    def push(self, line: Line) -> None:
        if len(self.pending) >= _FOLLOW_BACKLOG:
            self.pending.popleft()
            self.dropped += 1
        self.pending.append(line)
        self.wakeup.set()

    def close(self) -> None:
        self.closed = True
        self.wakeup.set()

    def take(self) -> list[Line]:
        lines = list(self.pending)
        self.pending.clear()
        if self.dropped:
            note = f"{self.dropped} log lines skipped: the reader fell behind"
            lines.insert(0, Line(time.time(), dict(RUNTIME_SOURCE), note))
            self.dropped = 0
        return lines


class LogFile:
    """The log of one service: append, rotate, tail, follow.

    The file is created 0600 in a directory created 0700. Writes are synchronous
    single ``write`` calls on an ``O_APPEND`` descriptor (one line each, never
    interleaved); ``OSError`` from the disk propagates. ``close()`` releases the
    descriptor and ends every running ``follow`` once it has yielded what is pending;
    a later ``write`` opens the file again.
    """

    def __init__(self, path: Path, *, max_bytes: int = 10 * MiB, backups: int = 3) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._fd: int | None = None
        self._size = 0
        self._followers: set[_Follower] = set()

    def write(
        self, message: str, metadata: Mapping[str, str] | None = None, *, timestamp: float | None = None
    ) -> Line:
        """Append one record (now, unless ``timestamp`` is given) and hand it to followers."""
        line = Line(time.time() if timestamp is None else timestamp, dict(metadata or {}), message)
        data = (line.to_json() + "\n").encode()
        fd = self._open()
        if self._size and self._size + len(data) > self.max_bytes:
            self._rotate()
            fd = self._open()
        _write_all(fd, data)
        self._size += len(data)
        for follower in self._followers:
            follower.push(line)
        return line

    def write_event(self, message: str) -> Line:
        """Append a record from the runtime itself, e.g. ``"reloaded in 412 ms"``."""
        return self.write(message, RUNTIME_SOURCE)

    def tail(self, count: int, since: float = 0) -> list[Line]:
        """The last ``count`` records with ``timestamp >= since``, oldest first.

        Reads backwards from the end of the file, into the rotated files when it
        must, so the cost follows ``count`` rather than the size of the log.
        ``count <= 0`` returns nothing (as ``tail -n 0``).
        """
        found: list[Line] = []
        if count <= 0:
            return found
        with contextlib.closing(self._backwards()) as lines:
            for line in lines:
                if line.timestamp < since:
                    break
                found.append(line)
                if len(found) >= count:
                    break
        found.reverse()
        return found

    async def follow(self, count: int, since: float = 0) -> AsyncGenerator[Line, None]:
        """``tail(count, since)``, then every record written after it, until ``close()``.

        No record is lost or repeated between the tail and the live part, also
        across rotations. A reader more than 10,000 records behind loses the
        oldest and is told so by a runtime record.
        """
        follower = _Follower()
        self._followers.add(follower)  # before the tail: a write after it goes to the follower
        try:
            for line in self.tail(count, since):
                yield line
            while not follower.closed or follower.pending:
                await follower.wakeup.wait()
                follower.wakeup.clear()
                for line in follower.take():
                    if line.timestamp >= since:
                        yield line
        finally:
            self._followers.discard(follower)

    def files(self) -> list[Path]:
        """The current file and its rotated backups, newest first."""
        return [self.path] + [self._backup(i) for i in range(1, self.backups + 1)]

    def close(self) -> None:
        """Release the file descriptor and end every ``follow`` after its pending records."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for follower in self._followers:
            follower.close()

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            self._fd = os.open(self.path, flags, 0o600)
            stat = os.fstat(self._fd)
            if stat.st_mode & 0o077:
                os.fchmod(self._fd, 0o600)
            self._size = stat.st_size
        return self._fd

    def _rotate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.backups <= 0:
            self.path.unlink(missing_ok=True)
            return
        for i in range(self.backups - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self._backup(i), self._backup(i + 1))
        os.replace(self.path, self._backup(1))

    def _backup(self, index: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{index}")

    def _backwards(self) -> Generator[Line, None, None]:
        for path in self.files():
            for raw in _reverse_lines(path):
                line = Line.from_json(raw)
                if line is not None:
                    yield line


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _reverse_lines(path: Path) -> Iterator[bytes]:
    """The non-empty lines of ``path``, last first, read in blocks from the end."""
    try:
        file = path.open("rb")
    except FileNotFoundError:
        return
    with file:
        end = file.seek(0, os.SEEK_END)
        head = b""
        while end > 0:
            start = max(0, end - _BLOCK)
            file.seek(start)
            lines = (file.read(end - start) + head).split(b"\n")
            head = lines.pop(0)  # may continue in the previous block
            end = start
            yield from (line for line in reversed(lines) if line)
        if head:
            yield head
