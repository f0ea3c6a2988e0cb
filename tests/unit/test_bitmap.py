"""softpage.bitmap: the decoder's rules (docs/spec/bitmap-page.md, "Decoder rules").

Every rejection test matches the message of the one rule it exercises, so it
fails if that rule is removed (the input would then decode, or trip a later
rule with a different message).
"""

from __future__ import annotations

import dataclasses
import io
import struct
import tracemalloc

import numpy as np
import pytest

from softpage import abi, bitmap
from softpage.categories import Category
from softpage.errors import BitmapError
from softpage.pfnset import PfnSet
from softpage.snapshot import SnapshotState, SoftSnapshot

NR_PFNS = 40_000  # two bitmap pages per category, the second one partly beyond nr_pfns
P2M_SIZE = 50_000
PAGE = abi.PAGE_SIZE
BITMAP_BYTES = 2 * PAGE  # per category


def make_snapshot(
    state: SnapshotState = SnapshotState.FINAL, nr_pfns: int = NR_PFNS, p2m_size: int = P2M_SIZE
) -> SoftSnapshot:
    def members(*pfns: int) -> PfnSet:
        return PfnSet.from_pfns(p2m_size, [pfn for pfn in pfns if pfn < nr_pfns])

    return SoftSnapshot(
        state=state,
        generation=10,
        request_id=7,
        flags=abi.FLAG_INIT_ON_FREE,
        guest_nr_pfns=nr_pfns,
        scan_ns=123_456,
        free=members(0, 1, 2, 100, 32_767, 32_768, nr_pfns - 1),
        cache=members(3, 4, 5000),
        slab=members(6, 39_000),
        held=members(8, 9, 10, 11, 35_000) if state == SnapshotState.FINAL else members(),
    )


@pytest.fixture
def valid() -> bytes:
    return bitmap.encode(make_snapshot(), list_grefs=[17])


def with_header(data: bytes, **changes: object) -> bytes:
    header = dataclasses.replace(abi.unpack_header(data), **changes)  # type: ignore[arg-type]
    return abi.pack_header(header) + data[abi.HEADER.size :]


def with_octet(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + bytes([value]) + data[offset + 1 :]


def bitmap_offset(category: Category) -> int:
    return PAGE + int(category) * BITMAP_BYTES


def with_bit(data: bytes, category: Category, pfn: int) -> bytes:
    offset = bitmap_offset(category) + pfn // 8
    return with_octet(data, offset, data[offset] | 1 << (pfn % 8))


def reject(data: bytes, message: str, p2m_size: int = P2M_SIZE) -> None:
    with pytest.raises(BitmapError, match=message):
        bitmap.decode(data, p2m_size)


# -- acceptance -----------------------------------------------------------------
def test_decode_returns_what_was_encoded(valid: bytes) -> None:
    assert bitmap.decode(valid, P2M_SIZE) == make_snapshot()


def test_hand_built_snapshot_follows_the_spec_bit_order() -> None:
    # Built with struct and literal offsets, not with encode(), so that the
    # decoder is checked against the spec rather than against itself.
    nr_pfns = 32_768 + 16
    header = struct.pack(
        "<IHHIIQQQII4QQ21Q64I",
        0x47505353, 1, 512, 0, 1, 4, 9, nr_pfns, 2, 1, 2, 1, 1, 0, 55, *([0] * 21), 1234, *([0] * 63),
    )
    pages = bytearray(PAGE * 9)
    pages[: len(header)] = header
    pages[PAGE + 0] = 0x01  # free: PFN 0
    pages[PAGE + PAGE + 0] = 0x80  # free, second page: PFN 32768 + 7
    pages[PAGE + 2 * PAGE + 1] = 0x80  # cache: PFN 15
    pages[PAGE + 4 * PAGE + PAGE + 1] = 0x08  # slab, second page: PFN 32768 + 8 + 3

    snapshot = bitmap.decode(bytes(pages), nr_pfns)

    assert snapshot.free.to_pfns().tolist() == [0, 32_775]
    assert snapshot.cache.to_pfns().tolist() == [15]
    assert snapshot.slab.to_pfns().tolist() == [32_779]
    assert not snapshot.held
    assert (snapshot.state, snapshot.generation, snapshot.request_id, snapshot.scan_ns) == (
        SnapshotState.SNAPSHOT, 4, 9, 55
    )


def test_sets_are_widened_to_the_p2m_size(valid: bytes) -> None:
    snapshot = bitmap.decode(valid, 1_000_000)
    for category in Category:
        members = snapshot.category(category)
        assert members.nr_pfns == 1_000_000
        assert members.to_pfns().tolist() == make_snapshot().category(category).to_pfns().tolist()


def test_p2m_size_equal_to_nr_pfns_is_accepted(valid: bytes) -> None:
    assert bitmap.decode(valid, NR_PFNS).guest_nr_pfns == NR_PFNS


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_any_bytes_like_input(valid: bytes, wrap: type) -> None:
    assert bitmap.decode(wrap(valid), P2M_SIZE) == make_snapshot()


def test_empty_state_may_carry_bitmaps_but_not_held() -> None:
    data = bitmap.encode(make_snapshot(SnapshotState.EMPTY))
    assert bitmap.decode(data, P2M_SIZE).state == SnapshotState.EMPTY


def test_encode_is_byte_exact_inverse_of_decode(valid: bytes) -> None:
    assert bitmap.encode(bitmap.decode(valid, P2M_SIZE), list_grefs=[17]) == valid


def test_list_gref_entries_in_use_are_not_interpreted(valid: bytes) -> None:
    assert bitmap.decode(with_header(valid, list_gref=(0,) * 64), P2M_SIZE) == make_snapshot()


def test_decode_of_a_64_gib_guest_is_fast() -> None:
    import time

    nr_pfns = 16 * 1024 * 1024
    rng = np.random.default_rng(5)
    sets = [PfnSet.from_pfns(nr_pfns, rng.choice(nr_pfns, 1_000_000, replace=False)) for _ in range(4)]
    snapshot = SoftSnapshot(SnapshotState.FINAL, 2, 3, 0, nr_pfns, 0, *sets)
    data = bitmap.encode(snapshot)
    started = time.perf_counter()
    decoded = bitmap.decode(data, nr_pfns)
    elapsed = time.perf_counter() - started
    assert decoded == snapshot
    assert elapsed < 0.5, f"decoding 16 M PFNs took {elapsed:.3f} s"


# -- rejection rules, in the spec's order --------------------------------------------
def test_reject_shorter_than_a_header_page(valid: bytes) -> None:
    reject(valid[: PAGE - 1], "snapshot length: expected at least 4096 octets, got 4095")
    reject(b"", "snapshot length: expected at least 4096 octets, got 0")


def test_reject_bad_magic(valid: bytes) -> None:
    reject(with_header(valid, magic=0x53535047), "magic: expected 0x47505353, got 0x53535047")


def test_reject_unsupported_version(valid: bytes) -> None:
    reject(with_header(valid, version=2), "version: expected 1 .*got 2")


def test_reject_header_size_mismatch(valid: bytes) -> None:
    reject(with_header(valid, header_size=520), "header_size: expected 512, got 520")


def test_reject_unknown_flags(valid: bytes) -> None:
    reject(with_header(valid, flags=0x19), r"flags: expected only bits of 0xf, got 0x19 \(unknown 0x10\)")


def test_reject_unknown_state(valid: bytes) -> None:
    reject(with_header(valid, state=3), r"state: expected one of \[0, 1, 2\], got 3")


def test_reject_odd_generation(valid: bytes) -> None:
    reject(with_header(valid, generation=11), "generation: expected an even value.*got 11")


@pytest.mark.parametrize("index", [0, 10, 20])
def test_reject_non_zero_reserved(valid: bytes, index: int) -> None:
    reserved = tuple(0x5A if position == index else 0 for position in range(21))
    reject(with_header(valid, reserved=reserved), rf"reserved\[{index}\]: expected 0, got 0x5a")


@pytest.mark.parametrize("offset", [abi.HEADER.size, 1000, PAGE - 1])
def test_reject_non_zero_octets_after_the_header(valid: bytes, offset: int) -> None:
    reject(
        with_octet(valid, offset, 0x40), f"header page octet {offset}: expected 0 after the header, got 0x40"
    )


def test_reject_zero_nr_pfns(valid: bytes) -> None:
    reject(with_header(valid, nr_pfns=0), "nr_pfns: expected at least 1, got 0")


def test_reject_nr_pfns_beyond_the_p2m_size(valid: bytes) -> None:
    reject(valid, f"nr_pfns: expected at most {NR_PFNS - 1} .*got {NR_PFNS}", p2m_size=NR_PFNS - 1)


def test_reject_too_many_list_frames(valid: bytes) -> None:
    reject(with_header(valid, nr_list_frames=65), "nr_list_frames: expected at most 64, got 65")


def test_reject_a_guest_beyond_what_64_list_frames_can_describe() -> None:
    nr_pfns = abi.MAX_NR_PFNS + 1
    header = dataclasses.replace(
        abi.unpack_header(bitmap.encode(make_snapshot())),
        nr_pfns=nr_pfns,
        frames_per_category=abi.frames_per_category(nr_pfns),
        nr_list_frames=abi.nr_list_frames(abi.frames_per_category(nr_pfns)),
    )
    data = abi.pack_header(header) + bytes(PAGE - abi.HEADER.size)
    reject(data, "nr_list_frames: expected at most 64, got 65", p2m_size=nr_pfns)


@pytest.mark.parametrize("frames", [1, 3, 0])
def test_reject_frames_per_category_inconsistent_with_nr_pfns(valid: bytes, frames: int) -> None:
    reject(
        with_header(valid, frames_per_category=frames),
        f"frames_per_category: expected 2 for nr_pfns {NR_PFNS}, got {frames}",
    )


@pytest.mark.parametrize("list_frames", [0, 2])
def test_reject_nr_list_frames_inconsistent(valid: bytes, list_frames: int) -> None:
    reject(
        with_header(valid, nr_list_frames=list_frames),
        f"nr_list_frames: expected 1 for frames_per_category 2, got {list_frames}",
    )


@pytest.mark.parametrize("index", [1, 63])
def test_reject_list_gref_beyond_nr_list_frames(valid: bytes, index: int) -> None:
    grefs = tuple(17 if position == 0 else 99 if position == index else 0 for position in range(64))
    reject(with_header(valid, list_gref=grefs), rf"list_gref\[{index}\]: expected 0 .*got 99")


@pytest.mark.parametrize("extra", [-1, 1, PAGE, -PAGE])
def test_reject_a_length_other_than_the_header_implies(valid: bytes, extra: int) -> None:
    data = valid + bytes(extra) if extra > 0 else valid[:extra]
    reject(data, f"snapshot length: expected {9 * PAGE} octets .*got {9 * PAGE + extra}")


@pytest.mark.parametrize("category", list(Category))
@pytest.mark.parametrize("pfn", [NR_PFNS, NR_PFNS + 7, 2 * abi.PFNS_PER_FRAME - 1])
def test_reject_bits_at_or_beyond_nr_pfns(valid: bytes, category: Category, pfn: int) -> None:
    name = category.name.lower()
    reject(
        with_bit(valid, category, pfn),
        f"{name} bitmap: expected no bits at or beyond nr_pfns {NR_PFNS}, got PFN {pfn}",
    )


def test_reject_bits_beyond_nr_pfns_within_the_last_used_octet() -> None:
    data = bitmap.encode(make_snapshot(nr_pfns=NR_PFNS - 3))
    reject(with_bit(data, Category.SLAB, NR_PFNS - 2), f"slab bitmap: .*got PFN {NR_PFNS - 2}")


@pytest.mark.parametrize("category", list(Category))
@pytest.mark.parametrize("delta", [-1, 1])
def test_reject_count_that_is_not_the_popcount(valid: bytes, category: Category, delta: int) -> None:
    header = abi.unpack_header(valid)
    counts = list(header.count)
    actual = counts[category]
    counts[category] += delta
    reject(
        with_header(valid, count=tuple(counts)),
        rf"count\[{int(category)}\] \({category.name.lower()}\): "
        rf"expected {actual} \(bits set\), got {actual + delta}",
    )


def test_reject_a_bit_the_count_does_not_include(valid: bytes) -> None:
    reject(with_bit(valid, Category.CACHE, 12_345), r"count\[1\] \(cache\): expected 4 \(bits set\), got 3")


@pytest.mark.parametrize("state", [SnapshotState.EMPTY, SnapshotState.SNAPSHOT])
def test_reject_held_outside_final(state: SnapshotState) -> None:
    data = with_bit(bitmap.encode(make_snapshot(state)), Category.HELD, 77)
    data = with_header(data, count=(*abi.unpack_header(data).count[:3], 1))
    reject(data, f"held bitmap: expected empty outside state FINAL, got 1 PFNs in state {state.name}")


def test_huge_claims_are_rejected_before_any_allocation() -> None:
    nr_pfns = abi.MAX_NR_PFNS
    frames = abi.frames_per_category(nr_pfns)
    header = dataclasses.replace(
        abi.unpack_header(bitmap.encode(make_snapshot())),
        nr_pfns=nr_pfns,
        frames_per_category=frames,
        nr_list_frames=abi.nr_list_frames(frames),
        list_gref=(1,) * 64,
    )
    data = abi.pack_header(header) + bytes(PAGE - abi.HEADER.size)
    tracemalloc.start()
    try:
        with pytest.raises(BitmapError, match="snapshot length: expected"):
            bitmap.decode(data, nr_pfns)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"decode allocated {peak} bytes for a 4 KiB input"


# -- encode refuses what decode would reject --------------------------------------------
def test_encode_rejects_an_odd_generation() -> None:
    with pytest.raises(BitmapError, match="generation: expected an even 64-bit value, got 3"):
        bitmap.encode(dataclasses.replace(make_snapshot(), generation=3))


def test_encode_rejects_held_outside_final() -> None:
    snapshot = dataclasses.replace(make_snapshot(), state=SnapshotState.SNAPSHOT)
    with pytest.raises(BitmapError, match="held set: expected empty outside state FINAL, got 5 PFNs"):
        bitmap.encode(snapshot)


def test_encode_rejects_members_beyond_the_guest() -> None:
    snapshot = make_snapshot()
    snapshot.cache.words[NR_PFNS // 64] |= np.uint64(1 << (NR_PFNS % 64))
    message = f"cache set: expected PFNs below guest_nr_pfns {NR_PFNS}, got {NR_PFNS}"
    with pytest.raises(BitmapError, match=message):
        bitmap.encode(snapshot)


def test_encode_rejects_unknown_flags_and_too_many_grefs() -> None:
    with pytest.raises(BitmapError, match="flags: expected only bits of 0xf, got 0x10"):
        bitmap.encode(dataclasses.replace(make_snapshot(), flags=0x10))
    with pytest.raises(BitmapError, match=r"list_grefs: expected at most 1 \(nr_list_frames\), got 2"):
        bitmap.encode(make_snapshot(), list_grefs=[1, 2])


@pytest.mark.parametrize("nr_pfns", [0, abi.MAX_NR_PFNS + 1])
def test_encode_rejects_an_impossible_size(nr_pfns: int) -> None:
    with pytest.raises(BitmapError, match="guest_nr_pfns: expected 1"):
        bitmap.encode(dataclasses.replace(make_snapshot(), guest_nr_pfns=nr_pfns))


# -- dump files ----------------------------------------------------------------
def test_dump_and_load_round_trip() -> None:
    stream = io.BytesIO()
    bitmap.dump(make_snapshot(), stream, list_grefs=[17])
    stream.seek(0)
    loaded = bitmap.load(stream, P2M_SIZE)
    assert loaded == make_snapshot()
    assert bitmap.dumps(loaded, list_grefs=[17]) == stream.getvalue()


def test_loads_defaults_the_universe_to_the_guest_nr_pfns(valid: bytes) -> None:
    loaded = bitmap.loads(valid)
    assert loaded.free.nr_pfns == NR_PFNS
    assert loaded.free.to_pfns().tolist() == make_snapshot().free.to_pfns().tolist()


def test_loads_of_a_short_input_is_a_bitmap_error() -> None:
    with pytest.raises(BitmapError, match="expected at least 4096 octets, got 10"):
        bitmap.loads(bytes(10))


def test_load_stops_reading_past_the_largest_valid_snapshot(
    valid: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bitmap, "MAX_SNAPSHOT_SIZE", len(valid) - 1)
    with pytest.raises(BitmapError, match=f"snapshot length: expected at most {len(valid) - 1} octets"):
        bitmap.load(io.BytesIO(valid))


def test_max_snapshot_size_is_the_64_list_frame_limit() -> None:
    assert bitmap.MAX_SNAPSHOT_SIZE == abi.snapshot_size(abi.MAX_FRAMES_PER_CATEGORY) == 4096 * 65537


def test_rules_are_checked_in_the_spec_order(valid: bytes) -> None:
    # R17 (a stray bit in any category) is reported before R18 (a wrong count in an earlier one).
    counts = list(abi.unpack_header(valid).count)
    counts[Category.FREE] += 1
    data = with_bit(with_header(valid, count=tuple(counts)), Category.HELD, NR_PFNS + 1)
    reject(data, f"held bitmap: expected no bits at or beyond nr_pfns {NR_PFNS}, got PFN {NR_PFNS + 1}")
    # R2 (magic) before R7 (generation) before R16 (length).
    reject(with_header(valid, magic=0, generation=1)[:-1], "magic: ")
    reject(with_header(valid, generation=1)[:-1], "generation: ")
