"""The strict reader: round trips and rejection of malformed streams."""

from __future__ import annotations

import io
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from softpage.errors import StreamError
from softpage.stream import reader
from softpage.stream import records as wire
from softpage.stream.reader import (
    Layer,
    PageData,
    StreamFeeder,
    parse_stream,
    read_records,
)
from tests.unit.stream_builders import CONFIG, END, STATIC, XALLOC, XTAB, build_stream, page_of

RECORD_KINDS = [
    reader.XlHeader,
    reader.LibxlHeader,
    reader.LibxcContext,
    reader.ImageHeader,
    reader.DomainHeader,
    reader.X86CpuidPolicy,
    reader.X86MsrPolicy,
    reader.StaticDataEnd,
    reader.PageData,
    reader.X86TscInfo,
    reader.HvmContext,
    reader.HvmParams,
    reader.LibxcEnd,
    reader.LibxlEnd,
]


def small_stream() -> bytes:
    return build_stream([[(1, 0, page_of(1)), (2, XALLOC, None), (3, XTAB, None)]])


def test_round_trip_yields_every_record_with_its_fields() -> None:
    records = parse_stream(small_stream())
    assert [type(record) for record in records] == RECORD_KINDS
    xl, _, _, image, domain, cpuid, msr, _, pages, tsc, context, params, _, _ = records
    assert isinstance(xl, reader.XlHeader) and xl.config == CONFIG + b"\0" and xl.mandatory_flags == 3
    assert isinstance(image, reader.ImageHeader) and image.version == 3
    assert isinstance(domain, reader.DomainHeader) and domain.xen_version == (4, 17)
    assert isinstance(cpuid, reader.X86CpuidPolicy) and cpuid.leaves == STATIC.cpuid_policy
    assert isinstance(msr, reader.X86MsrPolicy) and msr.entries == STATIC.msr_policy
    assert isinstance(pages, PageData)
    assert pages.pfns.tolist() == [1, 2, 3]
    assert pages.types.tolist() == [0, XALLOC, XTAB]
    assert bytes(pages.data) == page_of(1)
    assert isinstance(tsc, reader.X86TscInfo) and tsc.tsc == END.tsc
    assert isinstance(context, reader.HvmContext) and context.blob == END.hvm_context
    assert isinstance(params, reader.HvmParams) and params.params == tuple(END.hvm_params)


def test_pull_push_and_in_memory_drivers_agree() -> None:
    stream = small_stream()
    pulled = list(read_records(io.BytesIO(stream).read))
    pushed: list[reader.Record] = []
    feeder = StreamFeeder(pushed.append)
    for offset in range(0, len(stream), 777):  # chunks that straddle every boundary
        feeder.feed(stream[offset : offset + 777])
    assert feeder.done
    kinds = [type(record) for record in parse_stream(stream)]
    assert [type(record) for record in pulled] == kinds == [type(record) for record in pushed]


def test_read_records_stops_at_the_end_and_leaves_the_handshake_unread() -> None:
    source = io.BytesIO(small_stream() + b"domain is yours")
    assert isinstance(list(read_records(source.read))[-1], reader.LibxlEnd)
    assert source.read() == b"domain is yours"


def corrupt(stream: bytes, offset: int, new: bytes) -> bytes:
    return stream[:offset] + new + stream[offset + len(new) :]


def image_header_byte(stream: bytes, index: int, value: int) -> bytes:
    """Set byte ``index`` of the 24-byte libxc image header."""
    return corrupt(stream, stream.index(b"\xff" * 8 + b"XENF") + index, bytes([value]))


def page_data_offset(stream: bytes) -> int:
    """Offset of the first PAGE_DATA record header."""
    return stream.index(struct.pack("<II", 1, 8 + 3 * 8 + 4096))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: corrupt(s, 0, b"Xen saved domain, XL"), "expected magic"),
        (lambda s: corrupt(s, 32, struct.pack("<I", 0x04030201)), "expected byteorder"),
        (lambda s: corrupt(s, 36, struct.pack("<I", 1)), "expected the STREAMv2 flag"),
        (lambda s: corrupt(s, 36, struct.pack("<I", 7)), "mandatory flags"),
        (lambda s: corrupt(s, 48, struct.pack("<I", 1)), "optional data"),
        (lambda s: s.replace(b"LibxlFmt", b"LibxlFmX"), "expected ident"),
        (lambda s: image_header_byte(s, 15, 4), "expected version 2 or 3"),
        (lambda s: image_header_byte(s, 17, 1), "little-endian"),
        (lambda s: image_header_byte(s, 17, 2), "expected options within"),
        (lambda s: image_header_byte(s, 19, 1), "reserved fields"),
        (lambda s: image_header_byte(s, 23, 1), "reserved fields"),
        (lambda s: corrupt(s, page_data_offset(s) + 12, b"\x01"), "_res1"),
        (lambda s: corrupt(s, page_data_offset(s) + 8, struct.pack("<I", 0)), "count >= 1"),
        (lambda s: corrupt(s, page_data_offset(s) + 16 + 6, b"\x10"), "reserved bits 59..52"),
        (lambda s: corrupt(s, page_data_offset(s) + 16 + 7, b"\x50"), "known page type"),
        # XALLOC turned into NOTAB: now the record lacks a page of data.
        (lambda s: corrupt(s, page_data_offset(s) + 24 + 7, b"\x00"), "expected 8 \\+ 24 \\+ 8192"),
    ],
)
def test_malformed_streams_are_rejected(mutate: object, message: str) -> None:
    stream = small_stream()
    mutated = mutate(stream)  # type: ignore[operator]
    assert mutated != stream
    with pytest.raises(StreamError, match=message):
        parse_stream(mutated)


def test_non_zero_padding_and_unknown_records_are_rejected() -> None:
    stream = small_stream()
    context_at = stream.index(b"hvm-context-blob")
    # Declaring the 16-byte context 15 bytes long turns its last byte into padding.
    short = corrupt(stream, context_at - 4, struct.pack("<I", 15))
    with pytest.raises(StreamError, match="padding: expected zero bytes, got 62"):
        parse_stream(short)
    assert isinstance(parse_stream(corrupt(short, context_at + 15, b"\0"))[10], reader.HvmContext)
    unknown = corrupt(stream, context_at - 8, struct.pack("<I", 0x13))
    with pytest.raises(StreamError, match="known type, got 0x13"):
        parse_stream(unknown)
    optional = corrupt(stream, context_at - 8, struct.pack("<I", 0x8000_0009))
    with pytest.raises(StreamError, match="known type"):
        parse_stream(optional)


def test_truncated_and_overlong_streams_are_rejected() -> None:
    stream = small_stream()
    for cut in (10, 48, 100, page_data_offset(stream) + 30, len(stream) - 1):
        with pytest.raises(StreamError, match="expected"):
            parse_stream(stream[:cut])
    with pytest.raises(StreamError, match="more bytes"):
        parse_stream(stream + b"\0")
    with pytest.raises(StreamError, match="before EOF"):
        list(read_records(io.BytesIO(stream[:-4]).read))


def test_v2_libxc_stream_must_not_carry_static_data_end() -> None:
    stream = small_stream()
    start = stream.index(b"\xff" * 8 + b"XENF")
    libxc = stream[start : -8]  # drop the libxl END
    v2 = libxc.replace(b"XENF\x00\x00\x00\x03", b"XENF\x00\x00\x00\x02", 1)
    with pytest.raises(StreamError, match="v3 stream"):
        parse_stream(v2, Layer.LIBXC)
    records = parse_stream(libxc, Layer.LIBXC)
    assert isinstance(records[-1], reader.LibxcEnd)


def test_page_data_record_fields_are_views_not_copies() -> None:
    stream = bytearray(build_stream([[(9, 0, page_of(9))]]))
    page_record = next(record for record in parse_stream(stream) if isinstance(record, PageData))
    assert page_record.page(0).obj is stream  # zero-copy down to the caller's buffer
    assert np.array_equal(page_record.data_mask(), [True])


def test_a_claimed_length_allocates_no_more_than_the_file_has(tmp_path: Path) -> None:
    # An xl header claiming 1 GiB of optional data, in a file of 64 bytes: a buffered file's
    # read(1 GiB) would allocate 1 GiB before meeting the end of the file.
    streamv2 = wire.XL_MANDATORY_FLAG_STREAMV2
    header = wire.XL_HEADER.pack(wire.XL_MAGIC, wire.XL_BYTEORDER, streamv2, 0, 1 << 30)
    path = tmp_path / "lying.stream"
    path.write_bytes(header + b"\0" * 16)
    tracemalloc.start()
    try:
        with path.open("rb") as stream, pytest.raises(StreamError, match="before EOF"):
            list(read_records(stream.read))
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= reader.READ_CHUNK_MAX + (1 << 20), f"reading a 64-byte file allocated {peak} bytes"
