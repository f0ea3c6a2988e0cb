"""Xen 4.17's own verify-stream-v2 accepts what StreamWriter writes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from stream_builders import BROKEN, CONFIG, END, XALLOC, XTAB, ByteSink, build_stream, page_of

from softpage.backend import EndOfCheckpoint, GuestType, StaticInfo
from softpage.stream.writer import StreamWriter

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
