"""Properties of softpage.bitmap: round trips, and corruption never escapes as anything but BitmapError."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from softpage import abi, bitmap
from softpage.categories import Category
from softpage.errors import BitmapError
from softpage.pfnset import PfnSet
from softpage.snapshot import SnapshotState, SoftSnapshot

# Up to four bitmap pages per category keeps an example under 70 KiB while
# still crossing page boundaries and partial last pages.
MAX_TEST_PFNS = 3 * abi.PFNS_PER_FRAME + 100


@st.composite
def pfn_sets(draw: st.DrawFn, nr_pfns: int, p2m_size: int) -> PfnSet:
    style = draw(st.sampled_from(["empty", "sparse", "dense", "full"]))
    if style == "empty":
        return PfnSet.empty(p2m_size)
    if style == "full":
        return PfnSet.from_pfns(p2m_size, np.arange(nr_pfns))
    if style == "sparse":
        pfns = draw(st.lists(st.integers(0, nr_pfns - 1), max_size=50))
        return PfnSet.from_pfns(p2m_size, pfns)
    seed = draw(st.integers(0, 2**32 - 1))
    density = draw(st.floats(0.05, 0.95))
    chosen = np.flatnonzero(np.random.default_rng(seed).random(nr_pfns) < density)
    return PfnSet.from_pfns(p2m_size, chosen)


@st.composite
def snapshots(draw: st.DrawFn, max_nr_pfns: int = MAX_TEST_PFNS) -> tuple[SoftSnapshot, int]:
    nr_pfns = draw(
        st.one_of(
            st.integers(1, 200),
            st.sampled_from([abi.PFNS_PER_FRAME - 1, abi.PFNS_PER_FRAME, abi.PFNS_PER_FRAME + 1]),
            st.integers(1, max_nr_pfns),
        )
    )
    p2m_size = nr_pfns + draw(st.integers(0, 5000))
    state = draw(st.sampled_from(list(SnapshotState)))
    free, cache, slab = (draw(pfn_sets(nr_pfns, p2m_size)) for _ in range(3))
    held = draw(pfn_sets(nr_pfns, p2m_size)) if state == SnapshotState.FINAL else PfnSet.empty(p2m_size)
    snapshot = SoftSnapshot(
        state=state,
        generation=2 * draw(st.integers(0, 2**63 - 1)),
        request_id=draw(st.integers(0, 2**64 - 1)),
        flags=draw(st.integers(0, abi.FLAGS_KNOWN)),
        guest_nr_pfns=nr_pfns,
        scan_ns=draw(st.integers(0, 2**64 - 1)),
        free=free,
        cache=cache,
        slab=slab,
        held=held,
    )
    return snapshot, p2m_size


@given(snapshots())
def test_decode_inverts_encode(case: tuple[SoftSnapshot, int]) -> None:
    snapshot, p2m_size = case
    assert bitmap.decode(bitmap.encode(snapshot), p2m_size) == snapshot


@given(snapshots(), st.data())
def test_encode_inverts_decode_byte_for_byte(case: tuple[SoftSnapshot, int], data: st.DataObject) -> None:
    snapshot, p2m_size = case
    list_frames = abi.nr_list_frames(abi.frames_per_category(snapshot.guest_nr_pfns))
    grefs = data.draw(st.lists(st.integers(0, 2**32 - 1), max_size=list_frames))
    published = bitmap.encode(snapshot, grefs)
    assert bitmap.encode(bitmap.decode(published, p2m_size), grefs) == published


def assert_is_a_valid_snapshot(snapshot: SoftSnapshot, p2m_size: int) -> None:
    """What the planner relies on from anything decode returns."""
    assert 1 <= snapshot.guest_nr_pfns <= p2m_size
    assert snapshot.generation % 2 == 0
    assert snapshot.flags & ~abi.FLAGS_KNOWN == 0
    for category in Category:
        members = snapshot.category(category)
        assert members.nr_pfns == p2m_size
        pfns = members.to_pfns()
        assert pfns.size == 0 or int(pfns[-1]) < snapshot.guest_nr_pfns
    if snapshot.state != SnapshotState.FINAL:
        assert not snapshot.held
    # Whatever decode accepts is something a guest could have published.
    assert bitmap.decode(bitmap.encode(snapshot), p2m_size) == snapshot


def decode_or_reject(corrupt: bytes, p2m_size: int) -> None:
    try:
        decoded = bitmap.decode(corrupt, p2m_size)
    except BitmapError:
        return
    assert_is_a_valid_snapshot(decoded, p2m_size)
    # The format has exactly one encoding per snapshot (given the in-use list
    # grefs, which decode does not interpret): anything decode accepts must be
    # that encoding, or a rule let a corrupt octet through.
    header = abi.unpack_header(corrupt)
    assert bitmap.encode(decoded, header.list_gref[: header.nr_list_frames]) == corrupt


def octet_regions(snapshot: SoftSnapshot) -> list[tuple[int, int]]:
    """[start, end) octet ranges a corruption should reach, so that hypothesis'
    bias toward small offsets does not keep every flip inside the header."""
    regions = [(0, abi.HEADER.size), (abi.HEADER.size, abi.PAGE_SIZE)]
    bitmap_size = abi.frames_per_category(snapshot.guest_nr_pfns) * abi.PAGE_SIZE
    used = (snapshot.guest_nr_pfns + 7) // 8
    for category in Category:
        start = abi.PAGE_SIZE + int(category) * bitmap_size
        regions.append((start, start + used))
        # The last used octet, where bits below and beyond nr_pfns share an octet.
        regions.append((start + used - 1, start + bitmap_size))
    return regions


@given(snapshots(), st.data())
def test_flipped_octets_decode_or_raise_bitmap_error(
    case: tuple[SoftSnapshot, int], data: st.DataObject
) -> None:
    snapshot, p2m_size = case
    corrupt = bytearray(bitmap.encode(snapshot))
    regions = octet_regions(snapshot)
    for _ in range(data.draw(st.integers(1, 4))):
        start, end = data.draw(st.sampled_from(regions))
        offset = data.draw(st.integers(start, end - 1))
        corrupt[offset] ^= data.draw(st.integers(1, 255))
    note(f"corrupted header: {abi.unpack_header(corrupt)}")
    decode_or_reject(bytes(corrupt), p2m_size)


@given(snapshots(), st.data())
def test_truncated_or_extended_input_raises_bitmap_error(
    case: tuple[SoftSnapshot, int], data: st.DataObject
) -> None:
    snapshot, p2m_size = case
    published = bitmap.encode(snapshot)
    if data.draw(st.booleans()):
        corrupt = published[: data.draw(st.integers(0, len(published) - 1))]
    else:
        corrupt = published + data.draw(st.binary(min_size=1, max_size=2 * abi.PAGE_SIZE))
    try:
        bitmap.decode(corrupt, p2m_size)
    except BitmapError:
        return
    raise AssertionError(f"a {len(corrupt)}-octet input for a {len(published)}-octet snapshot decoded")


FIELD_WIDTHS = {"version": 16, "header_size": 16, "generation": 64, "request_id": 64, "nr_pfns": 64,
                "count": 64, "scan_ns": 64, "reserved": 64}
"""Bits per element of each header field; the others are 32-bit."""


def near_values(current: int, width: int) -> st.SearchStrategy[int]:
    """Values a lying or buggy guest plausibly writes: off by one, doubled, zero, all ones, or anything."""
    limit = 2**width - 1
    candidates = [current - 1, current + 1, current + 2, current * 2, current ^ 1, 0, 1, limit]
    return st.one_of(
        st.sampled_from([value for value in candidates if 0 <= value <= limit and value != current]),
        st.integers(0, limit),
    )


@pytest.mark.parametrize(("name", "_offset", "elements"), abi.HEADER_FIELDS)
@given(snapshots(max_nr_pfns=abi.PFNS_PER_FRAME + 100), st.data())  # header rules need few bitmap pages
def test_mutated_header_fields_decode_or_raise_bitmap_error(
    name: str, _offset: int, elements: int, case: tuple[SoftSnapshot, int], data: st.DataObject
) -> None:
    snapshot, p2m_size = case
    published = bitmap.encode(snapshot)
    header = abi.unpack_header(published)
    current = getattr(header, name)
    width = FIELD_WIDTHS.get(name, 32)
    if elements == 1:
        value: object = data.draw(near_values(current, width))
    else:
        index = data.draw(st.integers(0, elements - 1))
        value = (*current[:index], data.draw(near_values(current[index], width)), *current[index + 1 :])
    corrupt = abi.pack_header(dataclasses.replace(header, **{name: value})) + published[abi.HEADER.size :]
    decode_or_reject(corrupt, p2m_size)


@given(st.binary(min_size=0, max_size=3 * abi.PAGE_SIZE), st.integers(0, 10**9))
def test_arbitrary_bytes_decode_or_raise_bitmap_error(garbage: bytes, p2m_size: int) -> None:
    decode_or_reject(garbage, p2m_size)
