"""HPACK (RFC 7541) for the relay: a decoder that keeps the dynamic table, an encoder that never indexes.

The relay forwards header blocks untouched whenever it can: a block that
refers to no entry of its sender's dynamic table means the same thing to any
receiver, so it can go to another connection as it is. ``Decoder.decode`` says
whether a block is such a block. The relay asks its peers for a table of size
0 (``SETTINGS_HEADER_TABLE_SIZE``), so after their first few blocks every
block is; a block that does refer to the table is re-encoded with ``encode``,
which only writes literals and static-table references, so what it writes is
always self-contained too.

Huffman-coded strings are decoded once and remembered by their bytes: the same
token or path arrives on every call.
"""

from __future__ import annotations

from collections import deque

from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

__all__ = ["Decoder", "HPACKError", "encode"]

Field = tuple[bytes, bytes]

STATIC: tuple[Field, ...] = HeaderTable.STATIC_TABLE
_STATIC_COUNT = len(STATIC)
_STATIC_FIELD = {field: index + 1 for index, field in reversed(list(enumerate(STATIC)))}
_STATIC_NAME = {name: index + 1 for index, (name, _) in reversed(list(enumerate(STATIC)))}
_ENTRY_OVERHEAD = 32  # RFC 7541 §4.1
_MAX_CACHED = 4096  # strings and encoded fields remembered, per process
_CACHE_FROM = 16  # Huffman strings at least this long are remembered


class HPACKError(Exception):
    """A header block that does not decode: a connection error (COMPRESSION_ERROR)."""


_huffman: dict[bytes, bytes] = {}
_pure: dict[bytes, list[Field]] = {}  # blocks that neither use nor change a table, decoded
_encoded: dict[Field, bytes] = {}


class Decoder:
    """The decoding side of one connection direction: its dynamic table and the size limit we announced."""

    __slots__ = ("entries", "limit", "max_size", "size")

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit  # what our SETTINGS_HEADER_TABLE_SIZE allows the encoder
        self.max_size = limit  # what the encoder last set, within the limit
        self.entries: deque[Field] = deque()
        self.size = 0

    def decode(self, block: bytes) -> tuple[list[Field], bool]:
        """The block's fields, and whether it referred to the dynamic table (True: it cannot be forwarded).

        The list may be shared with other calls' (see ``_pure``): do not change it.
        """
        fields = _pure.get(block)
        if fields is not None:
            return fields, False
        fields = []
        dynamic = False
        touched = False  # the block changed the table: its meaning depends on the table's state
        i = 0
        end = len(block)
        try:
            while i < end:
                byte = block[i]
                if byte & 0x80:  # indexed field
                    index, i = _integer(block, i, 7)
                    if index > _STATIC_COUNT:
                        dynamic = True
                    fields.append(self._field(index))
                elif byte & 0x40:  # literal, added to the table
                    index, i = _integer(block, i, 6)
                    name, i, dynamic = self._name(block, i, index, dynamic)
                    value, i = _string(block, i)
                    fields.append((name, value))
                    self._add(name, value)
                    touched = True
                elif byte & 0x20:  # table size update
                    touched = True
                    size, i = _integer(block, i, 5)
                    if size > self.limit:
                        raise HPACKError(f"table size update to {size} exceeds {self.limit}")
                    self.max_size = size
                    self._evict(0)
                else:  # literal, not indexed (0000) or never indexed (0001)
                    index, i = _integer(block, i, 4)
                    name, i, dynamic = self._name(block, i, index, dynamic)
                    value, i = _string(block, i)
                    fields.append((name, value))
        except IndexError:
            raise HPACKError("header block ends inside a field") from None
        if not dynamic and not touched:
            # Static references and literals only: the same bytes mean the same fields on any
            # connection, and a caller sends the same block on every call to one method.
            if len(_pure) >= _MAX_CACHED:
                _pure.clear()
            _pure[block] = fields
        return fields, dynamic

    def _name(self, block: bytes, i: int, index: int, dynamic: bool) -> tuple[bytes, int, bool]:
        if index == 0:
            name, i = _string(block, i)
            return name, i, dynamic
        return self._field(index)[0], i, dynamic or index > _STATIC_COUNT

    def _field(self, index: int) -> Field:
        if 0 < index <= _STATIC_COUNT:
            return STATIC[index - 1]
        position = index - _STATIC_COUNT - 1
        if index == 0 or position >= len(self.entries):
            raise HPACKError(f"header index {index} is not in the table")
        return self.entries[position]

    def _add(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + _ENTRY_OVERHEAD
        if size > self.max_size:
            self.entries.clear()
            self.size = 0
            return
        self._evict(size)
        self.entries.appendleft((name, value))
        self.size += size

    def _evict(self, room: int) -> None:
        while self.entries and self.size + room > self.max_size:
            name, value = self.entries.pop()
            self.size -= len(name) + len(value) + _ENTRY_OVERHEAD


def encode(fields: list[Field]) -> bytes:
    """A self-contained header block for ``fields``: static-table references and literals, never indexed."""
    out = []
    for field in fields:
        data = _encoded.get(field)
        if data is None:
            data = _encode_field(field)
            if len(_encoded) >= _MAX_CACHED:
                _encoded.clear()
            _encoded[field] = data
        out.append(data)
    return b"".join(out)


def _encode_field(field: Field) -> bytes:
    index = _STATIC_FIELD.get(field)
    if index is not None:
        return _integer_bytes(index, 7, 0x80)
    name, value = field
    index = _STATIC_NAME.get(name)
    head = _integer_bytes(index, 4, 0x00) if index else b"\x00" + _integer_bytes(len(name), 7, 0) + name
    return head + _integer_bytes(len(value), 7, 0) + value


def _integer(data: bytes, i: int, bits: int) -> tuple[int, int]:
    mask = (1 << bits) - 1
    value = data[i] & mask
    i += 1
    if value < mask:
        return value, i
    shift = 0
    while True:
        byte = data[i]
        i += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i
        if shift > 28:
            raise HPACKError("header integer too large")


def _string(data: bytes, i: int) -> tuple[bytes, int]:
    huffman = data[i] & 0x80
    length, i = _integer(data, i, 7)
    end = i + length
    if end > len(data):
        raise HPACKError("header string runs past the block")
    raw = data[i:end]
    if not huffman:
        return raw, end
    value = _huffman.get(raw)
    if value is None:
        try:
            value = decode_huffman(raw)
        except Exception as exc:
            raise HPACKError(f"bad Huffman string: {exc}") from None
        if length >= _CACHE_FROM:  # short ones (a timeout, a status) decode as fast as a lookup
            if len(_huffman) >= _MAX_CACHED:
                _huffman.clear()  # callers churn: start again rather than keep stale strings
            _huffman[raw] = value
    return value, end


def _integer_bytes(value: int, bits: int, flags: int) -> bytes:
    mask = (1 << bits) - 1
    if value < mask:
        return bytes((flags | value,))
    out = bytearray((flags | mask,))
    value -= mask
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
