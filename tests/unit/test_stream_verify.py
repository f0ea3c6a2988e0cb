"""Xen 4.17's own verify-stream-v2 accepts what StreamWriter writes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from softpage.backend import EndOfCheckpoint, GuestType, PvStaticInfo, PvVcpuState, StaticInfo
from softpage.errors import StreamError
from softpage.stream.writer import StreamWriter
from tests.unit.stream_builders import BROKEN, CONFIG, END, XALLOC, XTAB, ByteSink, build_stream, page_of

Verify = Callable[..., Any]  # conftest.verify_stream_v2: (bytes, fmt) -> Verdict


def test_mixed_page_types_pass(verify_stream_v2: Verify) -> None:
    pinned_l2 = 0xA000_0000
    stream = build_stream(
        [
            [(pfn, 0, page_of(pfn)) for pfn in range(64)]
            + [(100, XALLOC, None), (101, XTAB, None), (102, BROKEN, None), (103, pinned_l2, page_of(103))],
            [(5, XALLOC, None)],
        ]
    )
    verdict = verify_stream_v2(stream)
    assert verdict.ok, verdict.output
    assert "Libxc Image Header: Version 3, little endian" in verdict.output
    assert "Libxl Record: End" in verdict.output


def test_multi_batch_stream_without_policies_passes(verify_stream_v2: Verify) -> None:
    sink = ByteSink()
    writer = StreamWriter(sink.writev)
    writer.begin(CONFIG, GuestType.HVM, (4, 17), StaticInfo(cpuid_policy=b"", msr_policy=b""))
    pfns = np.arange(3000, dtype=np.uint64)
    types = np.where(pfns % 2 == 0, XALLOC, 0).astype(np.uint32)
    writer.write_pages(pfns, types, bytes(1500 * 4096))
    writer.finish(EndOfCheckpoint(END.tsc, b"\x01" * 1000, ()))
    verdict = verify_stream_v2(bytes(sink.buffer))
    assert verdict.ok, verdict.output
    assert "Squashed 3 Page Data records together" in verdict.output


def test_the_verifier_catches_xalloc_with_data(verify_stream_v2: Verify) -> None:
    """The oracle can fail: an XALLOC entry that still carries its page."""
    pfn = 0x1234
    stream = bytearray(build_stream([[(pfn, 0, page_of(pfn))]]))
    word_at = stream.index(pfn.to_bytes(8, "little") + page_of(pfn)[:8])
    stream[word_at + 7] = 0xE0  # NOTAB -> XALLOC, data left in place
    verdict = verify_stream_v2(bytes(stream))
    assert not verdict.ok
    assert "Expected 8 + 8 + 0, got 4112" in verdict.output


def test_a_pv_stream_passes(verify_stream_v2: Verify) -> None:
    """X86_PV_INFO before the policies, X86_PV_P2M_FRAMES after STATIC_DATA_END, page tables
    among the pages, then TSC, SHARED_INFO and each vCPU's records (the optional ones only
    where the vCPU has such state)."""
    sink = ByteSink()
    writer = StreamWriter(sink.writev)
    pv = PvStaticInfo(guest_width=8, pt_levels=4, p2m_end_pfn=1023, p2m_frame_pfns=(7, 9))
    writer.begin(b'{"c_info":{"type":"pv","name":"guest"}}', GuestType.PV, (4, 17),
                 StaticInfo(cpuid_policy=bytes(48), msr_policy=bytes(32), pv=pv))
    pfns = np.arange(16, dtype=np.uint64)
    l4, pinned_l4 = 0x4000_0000, 0xC000_0000
    types = np.array([l4 if pfn == 3 else pinned_l4 if pfn == 4 else XALLOC if pfn > 11 else 0
                      for pfn in range(16)], dtype=np.uint32)
    writer.write_pages(pfns, types, bytes(12 * 4096))
    vcpus = (PvVcpuState(0, bytes(5168), extended=bytes(128), msrs=bytes(32)), PvVcpuState(1, bytes(5168)))
    writer.finish(EndOfCheckpoint(END.tsc, pv_shared_info=bytes(4096), pv_vcpus=vcpus))
    verdict = verify_stream_v2(bytes(sink.buffer))
    assert verdict.ok, verdict.output
    assert "Domain Header: x86 PV" in verdict.output
    assert "64bit guest, 4 levels of pagetables" in verdict.output
    assert "Start pfn 0x0, End 0x3ff" in verdict.output
    for record in ("x86 PV P2M frames", "Shared info", "x86 PV vcpu basic", "x86 PV vcpu extended",
                   "x86 PV vcpu msrs"):
        assert f"Libxc Record: {record}" in verdict.output, record
    assert "Libxc Record: x86 PV vcpu xsave" not in verdict.output


def test_pv_records_belong_to_pv_streams_only() -> None:
    writer = StreamWriter(ByteSink().writev)
    writer.xl_header(CONFIG)
    writer.libxl_header()
    writer.libxl_libxc_context()
    writer.libxc_headers(GuestType.PVH, (4, 17))
    pv = PvStaticInfo(guest_width=8, pt_levels=4, p2m_end_pfn=511, p2m_frame_pfns=(1,))
    with pytest.raises(StreamError, match="PV information is for PV guests"):
        writer.static_data(StaticInfo(cpuid_policy=b"", msr_policy=b"", pv=pv))
