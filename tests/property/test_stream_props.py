"""Properties of the stream library over random page plans.

A plan is a list of rounds; each round names pfns with a kind (data, XALLOC,
XTAB, BROKEN, pinned page table). The reference restore below is the rule of
xg_sr_restore.c in plain Python, written independently of RestoreModel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from softpage.abi import PAGE_SIZE
from softpage.backend import EndOfCheckpoint, GuestType, StaticInfo, TscInfo
from softpage.errors import StreamError
from softpage.stream.reader import PageData, StreamParser, parse_stream
from softpage.stream.receiver import RestoreModel
from softpage.stream.writer import StreamWriter
from tests.unit.stream_builders import ByteSink

KINDS = {"data": 0x0000_0000, "pinned_l1": 0x9000_0000, "xalloc": 0xE000_0000, "xtab": 0xF000_0000,
         "broken": 0xD000_0000}
WITH_DATA = {"data", "pinned_l1"}
POPULATES = WITH_DATA | {"xalloc"}
STATIC = StaticInfo(cpuid_policy=bytes(24), msr_policy=bytes(16))
END = EndOfCheckpoint(TscInfo(0, 1, 2, 3), b"context", ((2, 1),))

# Streams of up to ~2 MiB per example: cap the two costly properties below the
# CI profile's 1000 examples so the suite stays within a few minutes.
COSTLY = settings(max_examples=min(settings.default.max_examples, 300))

Entry = tuple[int, str]
Plan = list[list[Entry]]


def content(pfn: int, round_index: int) -> bytes:
    return (pfn.to_bytes(8, "little") + round_index.to_bytes(8, "little")) * (PAGE_SIZE // 16)


entries = st.tuples(st.integers(0, 2000), st.sampled_from(sorted(KINDS)))
small_rounds = st.lists(entries, min_size=1, max_size=40)
# Rounds past MAX_BATCH_SIZE exercise batching; they are the costly examples, so rarer.
large_rounds = st.lists(entries, min_size=1000, max_size=1100)
small_plans = st.lists(small_rounds, min_size=1, max_size=4)
plans = st.lists(st.one_of(small_rounds, small_rounds, small_rounds, large_rounds), min_size=1, max_size=4)


def write_plan(writer: StreamWriter, plan: Plan, use_add_page: Sequence[bool]) -> None:
    writer.begin(b'{"c_info":{}}', GuestType.PVH, (4, 17), STATIC)
    for round_index, (round_entries, by_page) in enumerate(zip(plan, use_add_page, strict=True)):
        if by_page:
            for pfn, kind in round_entries:
                writer.add_page(pfn, KINDS[kind], content(pfn, round_index) if kind in WITH_DATA else None)
        else:
            writer.write_pages(
                np.array([pfn for pfn, _ in round_entries], dtype=np.uint64),
                np.array([KINDS[kind] for _, kind in round_entries], dtype=np.uint32),
                b"".join(content(pfn, round_index) for pfn, kind in round_entries if kind in WITH_DATA),
            )
    writer.finish(END)


def reference_restore(plan: Plan) -> tuple[dict[int, bytes], set[int]]:
    memory: dict[int, bytes] = {}
    named: set[int] = set()
    for round_index, round_entries in enumerate(plan):
        for pfn, kind in round_entries:
            named.add(pfn)
            if kind in POPULATES and pfn not in memory:
                memory[pfn] = bytes(PAGE_SIZE)
            if kind in WITH_DATA:
                memory[pfn] = content(pfn, round_index)
    return memory, named


def assert_matches_reference(model: RestoreModel, plan: Plan) -> None:
    memory, named = reference_restore(plan)
    assert model.populated_pfns().tolist() == sorted(memory)
    assert model.named_pfns().tolist() == sorted(named)
    for pfn, expected in memory.items():
        assert model.page(pfn) == expected, pfn


@COSTLY
@given(plan=plans, use_add_page=st.lists(st.booleans(), min_size=4, max_size=4),
       limit=st.one_of(st.none(), st.integers(7, 70000)))
def test_written_streams_restore_like_the_reference(
    plan: Plan, use_add_page: list[bool], limit: int | None
) -> None:
    sink = ByteSink(limit)
    write_plan(StreamWriter(sink.writev), plan, use_add_page[: len(plan)])
    parsed = RestoreModel()
    parsed.apply_all(parse_stream(sink.buffer))
    parsed.complete()
    assert_matches_reference(parsed, plan)

    following = RestoreModel()
    write_plan(StreamWriter(following.sink().writev), plan, use_add_page[: len(plan)])
    following.complete()
    assert_matches_reference(following, plan)


@COSTLY
@given(plan=plans)
def test_entries_round_trip_in_order_with_batches_of_at_most_1024(plan: Plan) -> None:
    sink = ByteSink()
    write_plan(StreamWriter(sink.writev), plan, [False] * len(plan))
    records = [record for record in parse_stream(sink.buffer) if isinstance(record, PageData)]
    assert all(1 <= len(record.pfns) <= 1024 for record in records)
    flat = [entry for round_entries in plan for entry in round_entries]
    assert np.concatenate([record.pfns for record in records]).tolist() == [pfn for pfn, _ in flat]
    assert np.concatenate([record.types for record in records]).tolist() == [KINDS[kind] for _, kind in flat]
    sent_pages = b"".join(bytes(record.data) for record in records)
    expected_pages = b"".join(
        content(pfn, round_index)
        for round_index, round_entries in enumerate(plan)
        for pfn, kind in round_entries
        if kind in WITH_DATA
    )
    assert sent_pages == expected_pages


@given(plan=small_plans, data=st.data())
def test_every_truncation_and_every_extension_is_rejected(plan: Plan, data: st.DataObject) -> None:
    sink = ByteSink()
    write_plan(StreamWriter(sink.writev), plan, [False] * len(plan))
    stream = bytes(sink.buffer)
    cut = data.draw(st.integers(0, len(stream) - 1), label="cut")
    try:
        parse_stream(stream[:cut])
    except StreamError:
        pass
    else:
        raise AssertionError(f"a stream cut at {cut} of {len(stream)} bytes parsed")
    extra = data.draw(st.binary(min_size=1, max_size=16), label="extra")
    try:
        parse_stream(stream + extra)
    except StreamError:
        pass
    else:
        raise AssertionError("trailing bytes were accepted")


def page_data_offsets(stream: bytes) -> list[tuple[int, int]]:
    """(body offset, entry count) of every PAGE_DATA record, found by walking
    the stream with the parser rather than by searching its bytes."""
    parser = StreamParser()
    found: list[tuple[int, int]] = []
    position = 0
    while not parser.done:
        need = parser.bytes_needed
        record = parser.consume(stream[position : position + need])
        if isinstance(record, PageData):
            found.append((position, len(record.pfns)))
        position += need
    return found


@given(plan=small_plans, data=st.data())
def test_corrupt_pfn_words_are_rejected(plan: Plan, data: st.DataObject) -> None:
    sink = ByteSink()
    write_plan(StreamWriter(sink.writev), plan, [False] * len(plan))
    stream = bytearray(sink.buffer)
    page_records = page_data_offsets(bytes(stream))
    record_index = data.draw(st.integers(0, len(page_records) - 1), label="record")
    body_offset, count = page_records[record_index]
    entry = data.draw(st.integers(0, count - 1), label="entry")
    words_start = body_offset + 8  # after {count, _res1}
    top_byte = words_start + 8 * entry + 7
    damage = data.draw(
        st.sampled_from(["invalid type", "reserved bit"]), label="damage"
    )
    if damage == "invalid type":
        stream[top_byte] = (stream[top_byte] & 0x0F) | (data.draw(st.integers(5, 8)) << 4)
    else:
        stream[top_byte - 1] |= 1 << data.draw(st.integers(4, 7))  # bits 55..52
    try:
        parse_stream(stream)
    except StreamError:
        pass
    else:
        raise AssertionError(f"{damage} in entry {entry} of record {record_index} was accepted")
