"""gRPC's length-prefixed messages on one HTTP/2 stream, for micro's own HTTP/2 peers.

Each message is a flag byte (1: compressed), a 4-byte big-endian length and
the bytes. An ``Inbox`` parses them out of DATA frames as they arrive and
gives the stream's window back: at once while fewer than ``limit`` bytes wait
unread (so a message larger than the window can still arrive whole), else as
they are read (so a reader that falls behind stops its sender).
"""

from __future__ import annotations

import struct
from collections import deque

from micro._http2 import Stream, flush

__all__ = ["PREFIX", "Inbox", "MessageError", "frame_message"]

PREFIX = struct.Struct(">BI")


class MessageError(Exception):
    """A message the inbox refuses: ``too_large`` (over ``max_message``) or compressed."""

    def __init__(self, too_large: bool) -> None:
        super().__init__("too large" if too_large else "compressed")
        self.too_large = too_large


def frame_message(message: bytes) -> bytes:
    """``message`` with its gRPC prefix (uncompressed)."""
    return PREFIX.pack(0, len(message)) + message


class Inbox:
    """The messages received on ``stream`` and not read yet."""

    __slots__ = ("buffer", "limit", "max_message", "messages", "owed", "stream", "unread")

    def __init__(self, stream: Stream, *, limit: int, max_message: int) -> None:
        self.stream = stream
        self.limit = limit
        self.max_message = max_message
        self.messages: deque[bytes] = deque()
        self.buffer = b""  # the start of a message still arriving
        self.unread = 0  # bytes of the messages not read yet
        self.owed = 0  # bytes received and not given back yet, because too many are unread

    def feed(self, payload: bytes) -> None:
        """Take a DATA frame's payload; ``MessageError`` for a message the inbox refuses."""
        data = self.buffer + payload if self.buffer else payload
        offset = 0
        while len(data) - offset >= 5:
            compressed, length = PREFIX.unpack_from(data, offset)
            if length > self.max_message:
                raise MessageError(too_large=True)
            if len(data) - offset - 5 < length:
                break
            if compressed:
                raise MessageError(too_large=False)
            self.messages.append(data[offset + 5 : offset + 5 + length])
            self.unread += 5 + length
            offset += 5 + length
        self.buffer = data[offset:]
        stream = self.stream
        if self.unread < self.limit:
            stream.conn.give_back(stream, len(payload) + self.owed)
            self.owed = 0
        else:
            self.owed += len(payload)

    def pop(self) -> bytes | None:
        """The oldest unread message, or ``None``."""
        if not self.messages:
            return None
        message = self.messages.popleft()
        self.unread -= len(message) + 5
        if self.owed and self.unread < self.limit:
            stream = self.stream
            stream.conn.give_back(stream, self.owed)
            self.owed = 0
            flush()
        return message
