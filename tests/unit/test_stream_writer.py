"""StreamWriter: order, entry rules, batching, partial writes, throughput."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from softpage.abi import PAGE_SIZE
from softpage.backend import EndOfCheckpoint, GuestType, PvStaticInfo, StaticInfo
from softpage.errors import StreamError
from softpage.stream.reader import PageData, parse_stream
from softpage.stream.writer import IOV_MAX, StreamWriter
from tests.unit.stream_builders import (
    BROKEN,
    CONFIG,
    END,
    STATIC,
    XALLOC,
    XTAB,
    ByteSink,
    build_stream,
    page_of,
)


def writer_in_memory_phase(sink: ByteSink | None = None) -> StreamWriter:
    writer = StreamWriter((sink or ByteSink()).writev)
    writer.begin(CONFIG, GuestType.PVH, (4, 17), STATIC)
    return writer


def page_records(stream: bytes) -> list[PageData]:
    return [record for record in parse_stream(stream) if isinstance(record, PageData)]


def test_calls_out_of_stream_order_are_refused() -> None:
    writer = StreamWriter(ByteSink().writev)
    with pytest.raises(StreamError, match="stream order: static_data"):
        writer.static_data(STATIC)
    writer.xl_header(CONFIG)
    with pytest.raises(StreamError, match="stream order: libxc_headers"):
        writer.libxc_headers(GuestType.PVH, (4, 17))
    writer.libxl_header()
    writer.libxl_libxc_context()
    writer.libxc_headers(GuestType.PVH, (4, 17))
    with pytest.raises(StreamError, match="stream order: write_pages"):
        writer.write_pages(np.array([1], dtype=np.uint64), np.array([XALLOC], dtype=np.uint32), b"")
    writer.static_data(STATIC)
    writer.end_of_checkpoint(END)
    with pytest.raises(StreamError, match="stream order: add_page"):
        writer.add_page(1, XALLOC)
    with pytest.raises(StreamError, match="stream order: libxl_end"):
        writer.libxl_end()


def test_a_pv_stream_needs_its_pv_records_rather_than_being_half_written() -> None:
    writer = StreamWriter(ByteSink().writev)
    writer.libxc_headers(GuestType.PV, (4, 17))
    with pytest.raises(StreamError, match="PV information is for PV guests"):
        writer.static_data(StaticInfo(cpuid_policy=b"", msr_policy=b""))

    writer = StreamWriter(ByteSink().writev)
    writer.libxc_headers(GuestType.PV, (4, 17))
    pv = PvStaticInfo(guest_width=8, pt_levels=4, p2m_end_pfn=511, p2m_frame_pfns=(1,))
    writer.static_data(StaticInfo(cpuid_policy=b"", msr_policy=b"", pv=pv))
    with pytest.raises(StreamError, match="SHARED_INFO: expected 4096 bytes, got 0"):
        writer.end_of_checkpoint(END)
    with pytest.raises(StreamError, match="one for every online vCPU"):
        writer.end_of_checkpoint(EndOfCheckpoint(END.tsc, pv_shared_info=bytes(4096)))


@pytest.mark.parametrize(
    ("pfns", "types", "data", "message"),
    [
        ([], [], b"", "at least one entry"),
        ([1], [0], b"", "expected 1 pages"),
        ([1], [XALLOC], bytes(PAGE_SIZE), "expected 0 pages"),
        ([1, 2], [XTAB, BROKEN], bytes(PAGE_SIZE), "expected 0 pages"),
        ([1 << 52], [XALLOC], b"", "pfns <= 0xfffffffffffff"),
        ([1], [0x5000_0000], b"", "known page type"),
        ([1], [0x0000_0001], b"", "XEN_DOMCTL_PFINFO"),
    ],
)
def test_write_pages_enforces_the_entry_rules(
    pfns: list[int], types: list[int], data: bytes, message: str
) -> None:
    writer = writer_in_memory_phase()
    with pytest.raises(StreamError, match=message):
        writer.write_pages(np.array(pfns, dtype=np.uint64), np.array(types, dtype=np.uint32), data)


def test_add_page_enforces_the_entry_rules() -> None:
    writer = writer_in_memory_phase()
    with pytest.raises(StreamError, match="expected a page of data"):
        writer.add_page(1, 0)
    with pytest.raises(StreamError, match="expected no data for type XALLOC"):
        writer.add_page(1, XALLOC, bytes(PAGE_SIZE))
    with pytest.raises(StreamError, match="expected 4096 bytes"):
        writer.add_page(1, 0, bytes(100))
    with pytest.raises(StreamError, match="pfns >= 0"):
        writer.write_pages(np.array([-1]), np.array([XALLOC], dtype=np.uint32), b"")


def test_batches_hold_at_most_1024_entries_and_keep_data_aligned() -> None:
    count = 2 * 1024 + 3
    pfns = np.arange(count, dtype=np.uint64) + 100
    types = np.where(pfns % 3 == 0, XALLOC, 0).astype(np.uint32)
    data = b"".join(page_of(int(pfn)) for pfn, page_type in zip(pfns, types, strict=True) if page_type == 0)
    sink = ByteSink()
    writer = writer_in_memory_phase(sink)
    writer.write_pages(pfns, types, data)
    writer.finish(END)
    records = page_records(bytes(sink.buffer))
    assert [len(record.pfns) for record in records] == [1024, 1024, 3]
    for record in records:
        data_pfns = record.pfns[record.data_mask()]
        for index, pfn in enumerate(data_pfns):
            assert bytes(record.page(index)) == page_of(int(pfn))
    assert writer.stats.page_entries == count
    assert writer.stats.xalloc_entries == int(np.count_nonzero(types == XALLOC))
    assert writer.stats.bytes_written == len(sink.buffer)


def test_add_page_and_write_pages_produce_the_same_bytes() -> None:
    entries = [(pfn, XALLOC if pfn % 4 == 0 else 0) for pfn in range(1500)]
    by_array = ByteSink()
    array_writer = writer_in_memory_phase(by_array)
    array_writer.write_pages(
        np.array([pfn for pfn, _ in entries], dtype=np.uint64),
        np.array([page_type for _, page_type in entries], dtype=np.uint32),
        b"".join(page_of(pfn) for pfn, page_type in entries if page_type == 0),
    )
    array_writer.finish(END)
    by_page = ByteSink()
    page_writer = writer_in_memory_phase(by_page)
    for pfn, page_type in entries:
        page_writer.add_page(pfn, page_type, page_of(pfn) if page_type == 0 else None)
    page_writer.finish(END)  # flushes the last partial batch
    assert bytes(by_page.buffer) == bytes(by_array.buffer)
    assert by_page.most_buffers <= IOV_MAX


def test_partial_writes_are_resumed_where_they_stopped() -> None:
    batches = [[(pfn, 0, page_of(pfn)) for pfn in range(40)], [(7, XALLOC, None), (900, XTAB, None)]]
    whole = build_stream(batches)
    trickle = ByteSink(limit=1000)
    assert build_stream(batches, trickle) == whole
    assert trickle.calls > len(whole) // 1000


def test_a_sink_that_accepts_nothing_is_an_error() -> None:
    writer = StreamWriter(lambda buffers: 0)
    with pytest.raises(OSError, match="accepted 0"):
        writer.xl_header(CONFIG)


def test_for_fd_writes_a_parseable_stream(tmp_path: object) -> None:
    read_end, write_end = os.pipe()
    try:
        writer = StreamWriter.for_fd(write_end)
        writer.begin(CONFIG, GuestType.HVM, (4, 17), STATIC)
        writer.add_page(3, 0, page_of(3))
        writer.finish(END)
        os.close(write_end)
        write_end = -1
        chunks = []
        while chunk := os.read(read_end, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
    stream = b"".join(chunks)
    assert len(stream) == writer.bytes_written
    assert page_records(stream)[0].pfns.tolist() == [3]


def test_writing_64k_pages_to_dev_null_is_fast() -> None:
    """The brief's yardstick: 64 Ki data pages (256 MiB) to /dev/null."""
    count = 64 * 1024
    pfns = np.arange(count, dtype=np.uint64)
    types = np.zeros(count, dtype=np.uint32)
    data = np.ones(count * PAGE_SIZE, dtype=np.uint8)  # touched, so no page faults are timed
    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        writer = StreamWriter.for_fd(fd)
        writer.begin(CONFIG, GuestType.PVH, (4, 17), STATIC)
        started = time.perf_counter()
        writer.write_pages(pfns, types, memoryview(data))
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
    megabytes_per_second = count * PAGE_SIZE / elapsed / 1e6
    print(f"\nwrite_pages: {count} pages in {elapsed * 1e3:.1f} ms = {megabytes_per_second:.0f} MB/s")
    assert writer.stats.page_records == 64
    # Generous floor for a shared 2-core box; measured rates are far above it.
    assert megabytes_per_second > 300
