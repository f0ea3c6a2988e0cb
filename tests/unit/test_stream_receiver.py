"""RestoreModel follows xg_sr_restore.c for HVM/PVH streams."""

from __future__ import annotations

import numpy as np
import pytest

from softpage.backend import GuestType
from softpage.errors import StreamError
from softpage.stream import reader
from softpage.stream.reader import parse_stream
from softpage.stream.receiver import RestoreModel
from softpage.stream.writer import StreamWriter
from tests.unit.stream_builders import BROKEN, CONFIG, END, STATIC, XALLOC, XTAB, build_stream, page_of

ZERO_PAGE = bytes(4096)


def restored(batches: list[list[tuple[int, int, bytes | None]]]) -> RestoreModel:
    model = RestoreModel()
    model.apply_all(parse_stream(build_stream(batches)))
    model.complete()
    return model


def test_xalloc_after_data_keeps_the_old_content() -> None:
    model = restored([[(5, 0, page_of(5, 1))], [(5, XALLOC, None)]])
    assert model.page(5) == page_of(5, 1)


def test_data_after_data_replaces_and_data_after_xalloc_fills() -> None:
    first_round = [(5, 0, page_of(5, 1)), (6, XALLOC, None)]
    model = restored([first_round, [(5, 0, page_of(5, 2)), (6, 0, page_of(6, 2))]])
    assert model.page(5) == page_of(5, 2)
    assert model.page(6) == page_of(6, 2)


def test_xalloc_only_pfn_is_populated_and_reads_zero() -> None:
    model = restored([[(7, XALLOC, None)]])
    assert model.is_populated(7)
    assert model.page(7) == ZERO_PAGE


def test_never_named_pfn_stays_unpopulated() -> None:
    model = restored([[(1, 0, page_of(1)), (3, XALLOC, None)]])
    assert not model.is_populated(2)
    assert not model.was_named(2)
    assert model.page(2) is None
    assert model.populated_pfns().tolist() == [1, 3]


def test_xtab_and_broken_are_named_but_never_populated() -> None:
    model = restored([[(10, XTAB, None), (11, BROKEN, None)]])
    assert model.named_pfns().tolist() == [10, 11]
    assert model.nr_populated == 0
    assert model.page(10) is None


def test_xtab_does_not_unpopulate_an_earlier_page() -> None:
    model = restored([[(4, 0, page_of(4))], [(4, XTAB, None)]])
    assert model.page(4) == page_of(4)


def test_last_copy_of_a_pfn_within_one_record_wins() -> None:
    model = restored([[(8, 0, page_of(8, 1)), (8, XALLOC, None), (8, 0, page_of(8, 2))]])
    assert model.page(8) == page_of(8, 2)
    assert model.nr_populated == 1


def test_pinned_page_tables_carry_data_and_populate() -> None:
    pinned_l4 = 0xC000_0000
    model = restored([[(2, pinned_l4, page_of(2))]])
    assert model.page(2) == page_of(2)


def test_large_pfns_grow_the_tracking_like_pfn_set_populated() -> None:
    model = restored([[(0xF_FFFF, XALLOC, None), (3, 0, page_of(3))]])
    assert model.populated_pfns().tolist() == [3, 0xF_FFFF]
    assert model.populated_set(0x10_0000).count() == 2
    with pytest.raises(StreamError, match="below 1024"):
        model.populated_set(1024)
    assert np.array_equal(model.pages(np.array([3]))[0], np.frombuffer(page_of(3), dtype=np.uint8))
    with pytest.raises(StreamError, match="unpopulated"):
        model.pages(np.array([4]))


def test_incremental_sink_matches_parse_then_apply() -> None:
    follower = RestoreModel()
    writer = StreamWriter(follower.sink().writev)
    writer.begin(CONFIG, GuestType.PVH, (4, 17), STATIC)
    writer.add_page(1, 0, page_of(1))
    writer.flush()
    assert follower.page(1) == page_of(1)  # visible as soon as the record is written
    writer.add_page(1, XALLOC)
    writer.add_page(2, XALLOC)
    writer.finish(END)
    follower.complete()
    assert follower.page(1) == page_of(1)
    assert follower.page(2) == ZERO_PAGE
    assert follower.tsc == END.tsc and follower.hvm_params == dict(END.hvm_params)
    assert follower.xl_config == CONFIG + b"\0"
    assert follower.libxl_end_seen


def test_page_data_before_static_data_end_fails_like_the_real_restore() -> None:
    records = parse_stream(build_stream([[(1, 0, page_of(1))]]))
    reordered = [record for record in records if not isinstance(record, reader.StaticDataEnd)]
    model = RestoreModel()
    with pytest.raises(StreamError, match="STATIC_DATA_END before PAGE_DATA"):
        model.apply_all(reordered)


def test_records_the_hvm_restorer_does_not_handle_fail() -> None:
    model = RestoreModel()
    with pytest.raises(StreamError, match="X86PvInfo"):
        model.apply(reader.X86PvInfo(guest_width=8, pt_levels=4))
    with pytest.raises(StreamError, match="x86 HVM domain"):
        model.apply(reader.DomainHeader(reader.wire.DomainType.X86_PV, 12, (4, 17)))
    model.apply(reader.StaticDataEnd())
    with pytest.raises(StreamError, match="a second"):
        model.apply(reader.StaticDataEnd())
    with pytest.raises(StreamError, match="before STATIC_DATA_END"):
        model.apply(reader.X86CpuidPolicy(bytes(24)))


def test_complete_requires_end_and_hvm_context() -> None:
    records = parse_stream(build_stream([[(1, 0, page_of(1))]]))
    truncated = RestoreModel()
    ends = (reader.LibxcEnd, reader.LibxlEnd)
    truncated.apply_all(record for record in records if not isinstance(record, ends))
    with pytest.raises(StreamError, match="libxc END"):
        truncated.complete()
    contextless = RestoreModel()
    contextless.apply_all(record for record in records if not isinstance(record, reader.HvmContext))
    with pytest.raises(StreamError, match="HVM_CONTEXT"):
        contextless.complete()
    ended = RestoreModel()
    ended.apply_all(records)
    with pytest.raises(StreamError, match="after END"):
        ended.apply(reader.StaticDataEnd())
