"""Byte-exact golden checks of what StreamWriter emits, against the specs.

Expected bytes are spelled out field by field from tools/xl/xl.h,
docs/specs/libxl-migration-stream.pandoc and libxc-migration-stream.pandoc,
not computed with the module under test.
"""

from __future__ import annotations

import numpy as np
import pytest

from softpage.backend import EndOfCheckpoint, GuestType, StaticInfo, TscInfo
from softpage.stream import records as wire
from softpage.stream.writer import StreamWriter


class Capture:
    """A writev sink that keeps each call's bytes apart."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []

    def writev(self, buffers: object) -> int:
        chunk = b"".join(bytes(memoryview(buffer).cast("B")) for buffer in buffers)  # type: ignore[attr-defined]
        self.calls.append(chunk)
        return len(chunk)

    @property
    def data(self) -> bytes:
        return b"".join(self.calls)


def le32(value: int) -> bytes:
    return value.to_bytes(4, "little")


def le64(value: int) -> bytes:
    return value.to_bytes(8, "little")


def be32(value: int) -> bytes:
    return value.to_bytes(4, "big")


def test_xl_header_matches_save_domain_core_writeconfig() -> None:
    sink = Capture()
    StreamWriter(sink.writev).xl_header(b'{"c_info":{}}')
    config = b'{"c_info":{}}\0'  # xl counts and stores the NUL
    expected = (
        b"Xen saved domain, xl format\n \0 \r"
        + le32(0x01020304)  # SAVEFILE_BYTEORDER_VALUE
        + le32(0b11)  # XL_MANDATORY_FLAG_JSON | XL_MANDATORY_FLAG_STREAMv2
        + le32(0)  # optional_flags
        + le32(4 + len(config))  # optional_data_len: u32 config_len + config
        + le32(len(config))
        + config
    )
    assert sink.data == expected
    assert len(wire.XL_MAGIC) == 32


def test_xl_header_keeps_an_existing_nul_and_rejects_an_empty_config() -> None:
    sink = Capture()
    StreamWriter(sink.writev).xl_header(b"{}\0")
    assert sink.data.endswith(le32(3) + b"{}\0")
    from softpage.errors import StreamError

    with pytest.raises(StreamError, match="non-empty domain config"):
        StreamWriter(Capture().writev).xl_header(b"")


def test_libxl_and_libxc_headers_are_byte_exact() -> None:
    sink = Capture()
    writer = StreamWriter(sink.writev)
    writer.libxl_header()
    writer.libxl_libxc_context()
    writer.libxc_headers(GuestType.PVH, (4, 17))
    assert sink.calls == [
        b"LibxlFmt" + be32(2) + be32(0),  # ident, version 2, options 0 (all big-endian)
        le32(1) + le32(0),  # LIBXC_CONTEXT, length 0
        b"\xff" * 8 + b"XENF" + be32(3) + b"\0\0" + b"\0\0" + b"\0" * 4  # image header v3, LE
        + le32(2) + (12).to_bytes(2, "little") + b"\0\0" + le32(4) + le32(17),  # HVM, page shift 12
    ]


def test_static_data_records_and_padding() -> None:
    sink = Capture()
    writer = StreamWriter(sink.writev)
    writer.libxc_headers(GuestType.HVM, (4, 17))
    cpuid = bytes(range(24))
    msr = bytes(range(16))
    writer.static_data(StaticInfo(cpuid_policy=cpuid, msr_policy=msr))
    assert sink.calls[1:] == [
        le32(0x11) + le32(24) + cpuid,
        le32(0x12) + le32(16) + msr,
        le32(0x10) + le32(0),
    ]


def test_empty_policies_are_left_out_like_write_x86_cpu_policy_records() -> None:
    sink = Capture()
    writer = StreamWriter(sink.writev)
    writer.libxc_headers(GuestType.HVM, (4, 17))
    writer.static_data(StaticInfo(cpuid_policy=b"", msr_policy=b""))
    assert sink.calls[1:] == [le32(0x10) + le32(0)]


def test_page_data_record_is_byte_exact() -> None:
    sink = Capture()
    writer = StreamWriter(sink.writev)
    writer.libxc_headers(GuestType.HVM, (4, 17))
    writer.static_data(StaticInfo(b"", b""))
    page = bytes([7]) * 4096
    pfns = np.array([0x10, 0x11, 0x12, 0xF_FFFF_FFFF_FFFF], dtype=np.uint64)
    types = np.array([0x0, 0xE << 28, 0xF << 28, 0x1 << 28 | 1 << 31], dtype=np.uint32)
    writer.write_pages(pfns, types, page * 2)
    record = sink.calls[-1]
    assert record == (
        le32(0x01)
        + le32(8 + 4 * 8 + 2 * 4096)  # header + 4 pfn words + 2 pages (NOTAB, pinned L1)
        + le32(4)
        + le32(0)
        + le64(0x10)
        + le64(0xE000_0000_0000_0011)  # XALLOC in bits 63..60
        + le64(0xF000_0000_0000_0012)  # XTAB
        + le64(0x9000_0000_0000_0000 | 0xF_FFFF_FFFF_FFFF)  # pinned L1, the largest pfn
        + page
        + page
    )


def test_end_of_checkpoint_and_ends_are_byte_exact() -> None:
    sink = Capture()
    writer = StreamWriter(sink.writev)
    writer.libxl_header()
    writer.libxl_libxc_context()
    writer.libxc_headers(GuestType.PVH, (4, 17))
    writer.static_data(StaticInfo(b"", b""))
    sink.calls.clear()
    tsc = TscInfo(mode=2, khz=3000000, nsec=5, incarnation=9)
    writer.finish(EndOfCheckpoint(tsc, b"ctx", ((3, 0xFEFFF),)))
    assert sink.calls == [
        le32(0x08) + le32(24) + le32(2) + le32(3000000) + le64(5) + le32(9) + le32(0),
        le32(0x09) + le32(3) + b"ctx" + b"\0" * 5,  # HVM_CONTEXT padded to 8
        le32(0x0A) + le32(8 + 16) + le32(1) + le32(0) + le64(3) + le64(0xFEFFF),
        le32(0x00) + le32(0),  # libxc END
        le32(0x00) + le32(0),  # libxl END
    ]


def test_type_tables_follow_xg_sr_common() -> None:
    with_data = {0x0, 0x1, 0x2, 0x3, 0x4, 0x9, 0xA, 0xB, 0xC}
    populating = with_data | {0xE}
    known = with_data | {0xD, 0xE, 0xF}
    for value in range(16):
        assert wire.page_type_has_data(value) == (value in with_data), value
        assert wire.page_type_populates(value) == (value in populating), value
        assert wire.is_known_page_type(value) == (value in known), value
    values = np.arange(16, dtype=np.uint32)
    assert set(np.flatnonzero(wire.data_type_mask(values))) == with_data
    assert set(np.flatnonzero(wire.populate_type_mask(values))) == populating
    assert set(np.flatnonzero(wire.known_type_mask(values))) == known
    assert wire.PageType.XALLOC.pfinfo == 0xE000_0000
    assert set(wire.LIBXC_RECORD_NAMES) == set(wire.LibxcRecordType)
    assert set(wire.LIBXL_RECORD_NAMES) == set(wire.LibxlRecordType)


def test_pagetable_levels_of_every_type() -> None:
    PageType = wire.PageType
    types = np.array([int(page_type) for page_type in PageType], dtype=np.uint32)
    levels = dict(zip(PageType, wire.pagetable_levels(types).tolist(), strict=True))
    assert levels == {
        PageType.NOTAB: 0, PageType.L1TAB: 1, PageType.L2TAB: 2, PageType.L3TAB: 3, PageType.L4TAB: 4,
        PageType.L1TAB_PINNED: 1, PageType.L2TAB_PINNED: 2, PageType.L3TAB_PINNED: 3,
        PageType.L4TAB_PINNED: 4, PageType.BROKEN: 0, PageType.XALLOC: 0, PageType.XTAB: 0,
    }
