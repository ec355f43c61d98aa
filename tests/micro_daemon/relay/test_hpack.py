"""The relay's HPACK against the ``hpack`` library: it decodes what hpack encodes, and the reverse."""

from __future__ import annotations

from collections.abc import Iterable

import hpack
import pytest
from hpack import HeaderTuple, NeverIndexedHeaderTuple
from hpack.hpack import decode_integer
from hypothesis import event, given, settings
from hypothesis import strategies as st

from micro._hpack import STATIC, Decoder, HPACKError, encode

Field = tuple[bytes, bytes]

names = st.one_of(
    st.sampled_from(sorted({name for name, _ in STATIC})),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=24).map(str.encode),
    st.binary(min_size=1, max_size=200),  # long enough for multi-byte lengths
)
values = st.one_of(
    st.sampled_from(sorted({value for _, value in STATIC})),
    st.text(max_size=40).map(str.encode),
    st.binary(max_size=300),
    st.binary(min_size=4000, max_size=4200),  # bigger than the table: it empties it
)
fields = st.one_of(st.sampled_from(STATIC), st.tuples(names, values))
field_lists = st.lists(fields, max_size=12)
# One block: its fields (some never indexed), Huffman or not, and a table resize before it (or None).
blocks = st.tuples(
    st.lists(st.tuples(fields, st.booleans()), max_size=12),
    st.booleans(),
    st.one_of(st.none(), st.integers(0, 4096)),
)


def refers_to_table(block: bytes) -> bool:
    """Whether ``block`` names an entry of the dynamic table: an index past the static table."""
    i = 0
    while i < len(block):
        first = block[i]
        if first & 0x80:  # indexed field
            index, used = decode_integer(block[i:], 7)
        elif first & 0x40:  # literal with indexing
            index, used = decode_integer(block[i:], 6)
        elif first & 0x20:  # table size update
            i += decode_integer(block[i:], 5)[1]
            continue
        else:  # literal without indexing, or never indexed
            index, used = decode_integer(block[i:], 4)
        i += used
        if index > len(STATIC):
            return True
        if not first & 0x80:
            if index == 0:
                i = _skip_string(block, i)
            i = _skip_string(block, i)
    return False


def _skip_string(block: bytes, i: int) -> int:
    length, used = decode_integer(block[i:], 7)
    return i + used + length


def poisoned_decoder() -> hpack.Decoder:
    """A reference decoder whose dynamic table holds entries no block of the test refers to."""
    decoder = hpack.Decoder()
    for i in range(5):
        decoder.header_table.add(b"poison-%d" % i, b"!")
    return decoder


def table_size(entries: Iterable[Field]) -> int:
    return sum(len(name) + len(value) + 32 for name, value in entries)


@settings(max_examples=150, deadline=None)
@given(st.lists(blocks, min_size=1, max_size=10))
def test_decodes_what_hpack_encodes(
    sequence: list[tuple[list[tuple[Field, bool]], bool, int | None]],
) -> None:
    encoder, decoder = hpack.Encoder(), Decoder(4096)
    for headers, huffman, resize in sequence:
        if resize is not None:
            encoder.header_table_size = resize
        tuples = [NeverIndexedHeaderTuple(*f) if never else HeaderTuple(*f) for f, never in headers]
        block = encoder.encode(tuples, huffman=huffman)
        decoded, dynamic = decoder.decode(block)
        assert decoded == [f for f, _ in headers]
        assert dynamic == refers_to_table(block)
        event(f"dynamic={dynamic}")
        # Its table is the encoder's, entry for entry, after resizes and evictions.
        assert list(decoder.entries) == list(encoder.header_table.dynamic_entries)
        assert decoder.size == table_size(decoder.entries) <= decoder.max_size
        if not dynamic:  # self-contained: it means the same to a receiver with any table
            assert [tuple(f) for f in poisoned_decoder().decode(block, raw=True)] == decoded


@settings(max_examples=150, deadline=None)
@given(field_lists)
def test_encode_is_self_contained(fields: list[Field]) -> None:
    block = encode(fields)
    reference = poisoned_decoder()
    assert [tuple(f) for f in reference.decode(block, raw=True)] == fields
    assert len(reference.header_table.dynamic_entries) == 5  # nothing added to the receiver's table
    assert Decoder().decode(block) == (fields, False)
    assert encode(fields) == block  # from its cache, the same


def test_encode_uses_the_static_table() -> None:
    assert encode([(b":method", b"POST"), (b":status", b"200")]) == b"\x83\x88"
    assert encode([(b"content-type", b"application/grpc")]) == b"\x0f\x10\x10application/grpc"
    assert encode([(b"x", b"y")]) == b"\x00\x01x\x01y"


def test_repeated_huffman_strings_decode_the_same() -> None:
    encoder = hpack.Encoder()
    encoder.header_table_size = 0  # every block all literals, so each string is decoded again
    block = encoder.encode([(b"x-a-rather-long-header-name", b"and a rather long value, too")])
    decoder = Decoder()
    for _ in range(3):
        assert decoder.decode(block) == (
            [(b"x-a-rather-long-header-name", b"and a rather long value, too")],
            False,
        )


def test_dynamic_flag_cases() -> None:
    decoder = Decoder()
    assert decoder.decode(b"\x82") == ([(b":method", b"GET")], False)  # static
    assert decoder.decode(b"\x40\x01a\x01b") == ([(b"a", b"b")], False)  # adds, refers to nothing
    assert decoder.decode(b"\xbe") == ([(b"a", b"b")], True)  # the entry just added
    assert decoder.decode(b"\x0f\x2f\x01c") == ([(b"a", b"c")], True)  # its name only
    assert decoder.decode(b"\x20") == ([], False)  # size update to 0: the table empties
    assert not decoder.entries


def test_size_update_limit() -> None:
    decoder = Decoder(limit=100)
    assert decoder.decode(b"\x3f\x45") == ([], False)  # to 100
    assert decoder.max_size == 100
    with pytest.raises(HPACKError, match="exceeds 100"):
        decoder.decode(b"\x3f\x46")  # to 101


def test_an_entry_larger_than_the_table_empties_it() -> None:
    decoder = Decoder()
    decoder.decode(b"\x3f\x21")  # max size 64
    decoder.decode(b"\x40\x01a\x01b")  # 34 bytes
    assert list(decoder.entries) == [(b"a", b"b")]
    decoder.decode(b"\x40\x01c\x01d")  # 34 more: the older goes
    assert list(decoder.entries) == [(b"c", b"d")]
    decoder.decode(b"\x40\x01e\x20" + b"f" * 32)  # 65 bytes: nothing fits
    assert (list(decoder.entries), decoder.size) == ([], 0)


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(b"\x80", id="index-0"),
        pytest.param(b"\xbe", id="index-past-the-table"),
        pytest.param(b"\x7f\x00\x01a", id="name-index-past-the-table"),
        pytest.param(b"\xff", id="integer-cut"),
        pytest.param(b"\xff\xff\xff\xff\xff\xff\x7f", id="integer-too-large"),
        pytest.param(b"\x00\x05ab", id="name-runs-past"),
        pytest.param(b"\x00\x01a", id="value-missing"),
        pytest.param(b"\x40\x01a\x03b", id="value-runs-past"),
        pytest.param(b"\x00\x84\xff\xff\xff\xff\x00", id="huffman-eos"),
        pytest.param(b"\x3f", id="size-update-cut"),
        pytest.param(b"\x3f\xe2\x1f", id="size-update-too-large"),
    ],
)
def test_malformed_blocks(block: bytes) -> None:
    with pytest.raises(HPACKError):
        Decoder().decode(block)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_decode_or_raise_hpack_error(block: bytes) -> None:
    decoder = Decoder()
    decoder.decode(b"\x40\x01a\x01b")
    try:
        decoder.decode(block)
    except HPACKError:
        pass
