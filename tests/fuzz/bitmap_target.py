"""The fuzz target of ``softpage.bitmap.decode``: one input, its oracle, and the seed corpus.

Kept free of atheris so that tests/unit/test_fuzz_bitmap_target.py runs the same
oracle in ``make test``; tests/fuzz/fuzz_bitmap.py hands it to the fuzzer.

An input is ``P2M_PREFIX`` (dom0's ``p2m_size``, trusted but fuzzed too) followed
by the snapshot octets a guest would publish. ``decode`` must either raise
``BitmapError`` or return a snapshot that re-encodes to exactly the octets given
and keeps every set inside the guest's ``nr_pfns``; and it may allocate only in
proportion to the octets given and to ``p2m_size``, never to a size the guest
claims. Any other exception, including ``FuzzFinding``, is a finding.
"""

from __future__ import annotations

import re
import struct
import tracemalloc
from typing import Final

from softpage import abi, bitmap
from softpage.categories import Category
from softpage.errors import BitmapError
from softpage.pfnset import PfnSet
from softpage.snapshot import SnapshotState, SoftSnapshot

P2M_PREFIX: Final = struct.Struct("<I")
MAX_P2M_SIZE: Final = 1 << 20
"""The largest ``p2m_size`` an input asks for (a 4 GiB domain): dom0 allocates in
proportion to it by design, so an unbounded one would only measure the machine."""

MEMORY_SLACK: Final = 64 * 1024
"""Allocation allowed on top of the proportional bound (numpy and Python overhead)."""


class FuzzFinding(AssertionError):
    """``decode`` accepted something it should not have, or misbehaved on it."""


def split_input(data: bytes) -> tuple[int, bytes]:
    """``(p2m_size, snapshot octets)`` of a fuzz input; a short prefix reads as zeros."""
    prefix = data[: P2M_PREFIX.size].ljust(P2M_PREFIX.size, b"\0")
    (raw_p2m_size,) = P2M_PREFIX.unpack(prefix)
    return raw_p2m_size % (MAX_P2M_SIZE + 1), data[P2M_PREFIX.size :]


def make_input(p2m_size: int, snapshot_octets: bytes) -> bytes:
    return P2M_PREFIX.pack(p2m_size) + snapshot_octets


def memory_bound(p2m_size: int, snapshot_octets: bytes) -> int:
    """The most ``decode`` may allocate: the octets given, and the four sets of
    ``p2m_size`` bits it returns with one temporary copy each."""
    set_octets = -(-p2m_size // 64) * 8
    return len(snapshot_octets) + 2 * abi.NR_CATEGORIES * set_octets + MEMORY_SLACK


def one_input(data: bytes, measure_memory: bool = False) -> None:
    """Decode one fuzz input and check the oracle; raises ``FuzzFinding`` on a violation.

    ``measure_memory`` traces ``decode``'s allocations, starting ``tracemalloc``
    unless it runs already. The fuzzer starts it once: starting and stopping it
    around every input grows the process by about 1 KiB an input (CPython
    3.11), which over a million inputs would reach the RSS limit.
    """
    p2m_size, octets = split_input(data)
    started_here = measure_memory and not tracemalloc.is_tracing()
    if started_here:
        tracemalloc.start()
    if measure_memory:
        before, _peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
    try:
        snapshot = bitmap.decode(octets, p2m_size)
    except BitmapError:
        return
    finally:
        if measure_memory:
            _current, peak = tracemalloc.get_traced_memory()
            if started_here:
                tracemalloc.stop()
            allocated = peak - before
            if allocated > memory_bound(p2m_size, octets):
                raise FuzzFinding(
                    f"decode allocated {allocated} octets for {len(octets)} input octets and p2m_size "
                    f"{p2m_size} (bound {memory_bound(p2m_size, octets)})"
                )
    check_snapshot(snapshot, p2m_size, octets)


def outcome(data: bytes) -> str:
    """What ``decode`` made of an input: "accepted", or the field of the rule that rejected it
    (the message up to its colon, numbers as N), to tell which rules a corpus reaches."""
    p2m_size, octets = split_input(data)
    try:
        bitmap.decode(octets, p2m_size)
    except BitmapError as error:
        return re.sub(r"\d+", "N", str(error).split(":", 1)[0])
    return "accepted"


def check_snapshot(snapshot: SoftSnapshot, p2m_size: int, octets: bytes) -> None:
    """The invariants of an accepted snapshot, then its byte-exact re-encoding."""
    header = abi.unpack_header(octets[: abi.HEADER.size])
    if not 1 <= snapshot.guest_nr_pfns <= p2m_size:
        raise FuzzFinding(f"guest_nr_pfns {snapshot.guest_nr_pfns} outside 1..p2m_size {p2m_size}")
    for category in Category:
        members = snapshot.category(category)
        if members.nr_pfns != p2m_size:
            raise FuzzFinding(f"{category.name} set: universe {members.nr_pfns}, p2m_size {p2m_size}")
        pfns = members.to_pfns()
        if pfns.size and int(pfns[-1]) >= snapshot.guest_nr_pfns:
            raise FuzzFinding(f"{category.name} set: PFN {int(pfns[-1])} >= nr_pfns {snapshot.guest_nr_pfns}")
        if members.count() != header.count[category]:
            raise FuzzFinding(
                f"{category.name} set: {members.count()} PFNs, header count {header.count[category]}"
            )
    if snapshot.state != SnapshotState.FINAL and snapshot.held:
        raise FuzzFinding(f"held set of {snapshot.held.count()} PFNs in state {snapshot.state.name}")
    list_grefs = header.list_gref[: header.nr_list_frames]
    if bitmap.encode(snapshot, list_grefs) != octets:
        raise FuzzFinding("the accepted snapshot does not re-encode to the octets given")


def seed_corpus() -> list[bytes]:
    """Valid inputs made by ``bitmap.encode``, so that mutations start past the header checks.

    Sizes straddle a bitmap page (32768 PFNs a category); sets are sparse, dense
    and on the last PFN; every state and flag appears, with and without grants.
    """
    seeds: list[bytes] = []
    shapes = (
        # (nr_pfns, p2m_size, state, flags, list_grefs)
        (1, 1, SnapshotState.EMPTY, 0, ()),
        (9, 64, SnapshotState.SNAPSHOT, abi.FLAG_INIT_ON_FREE, (7,)),
        (4_000, 4_096, SnapshotState.FINAL, abi.FLAGS_KNOWN, (123,)),
        (abi.PFNS_PER_FRAME, abi.PFNS_PER_FRAME, SnapshotState.SNAPSHOT, abi.FLAG_PAGE_POISON, ()),
        (abi.PFNS_PER_FRAME + 1, 40_000, SnapshotState.FINAL, abi.FLAG_HOLD_SHORT, (1,)),
    )
    for nr_pfns, p2m_size, state, flags, list_grefs in shapes:
        last = nr_pfns - 1

        def members(pfns: list[int], nr_pfns: int = nr_pfns, p2m_size: int = p2m_size) -> PfnSet:
            return PfnSet.from_pfns(p2m_size, sorted({pfn for pfn in pfns if 0 <= pfn < nr_pfns}))

        held_pfns = [last, nr_pfns // 3, 5] if state == SnapshotState.FINAL else []
        snapshot = SoftSnapshot(
            state=state,
            generation=2 * nr_pfns,
            request_id=nr_pfns + 1,
            flags=flags,
            guest_nr_pfns=nr_pfns,
            scan_ns=1_000 * nr_pfns,
            free=members(list(range(0, nr_pfns, 3))),
            cache=members([1, 2, last - 1]),
            slab=members([last]),
            held=members(held_pfns),
        )
        seeds.append(make_input(p2m_size, bitmap.encode(snapshot, list_grefs)))
    return seeds
