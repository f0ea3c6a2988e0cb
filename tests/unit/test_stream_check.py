"""softpage.stream.verify: the mistakes syntax checks cannot see."""

from __future__ import annotations

import io

import pytest

from softpage.errors import StreamError
from softpage.pfnset import PfnSet
from softpage.stream.verify import check_stream
from tests.unit.stream_builders import XALLOC, XTAB, build_stream, page_of


def test_report_counts_and_a_complete_stream_is_restorable() -> None:
    stream = build_stream([[(0, 0, page_of(0)), (1, XALLOC, None), (2, XTAB, None)], [(0, 0, page_of(0, 1))]])
    report, model = check_stream(io.BytesIO(stream).read, ram_pfns=PfnSet.from_pfns(3, [0, 1]))
    assert report.record_counts["PageData"] == 2
    assert report.entries_by_type == {"NOTAB": 2, "XALLOC": 1, "XTAB": 1}
    assert report.populated == 2
    assert report.restorable and report.xalloc_after_data == 0
    assert model.page(0) == page_of(0, 1)


def test_a_ram_pfn_never_named_is_reported() -> None:
    stream = build_stream([[(0, 0, page_of(0)), (2, XALLOC, None)]])
    report, _ = check_stream(io.BytesIO(stream).read, ram_pfns=PfnSet.from_pfns(4, [0, 1, 2, 3]))
    assert report.unpopulated_ram_pfns.tolist() == [1, 3]
    assert not report.restorable


def test_xalloc_after_data_is_counted() -> None:
    stream = build_stream([[(5, 0, page_of(5)), (6, XALLOC, None)], [(5, XALLOC, None), (6, XALLOC, None)]])
    report, model = check_stream(io.BytesIO(stream).read)
    assert report.xalloc_after_data == 1  # pfn 5; pfn 6 never had data
    assert model.page(5) == page_of(5)


def test_restore_rule_violations_raise() -> None:
    stream = build_stream([[(0, 0, page_of(0))]])
    context_at = stream.index(b"hvm-context-blob")
    without_context = stream[: context_at - 8] + stream[context_at + 16 :]
    with pytest.raises(StreamError, match="HVM_CONTEXT"):
        check_stream(io.BytesIO(without_context).read)
