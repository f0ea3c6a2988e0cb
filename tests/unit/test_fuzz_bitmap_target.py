"""The oracle of `make fuzz` (tests/fuzz/bitmap_target.py) passes the seeds and catches a broken decoder."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from softpage import abi, bitmap
from softpage.errors import BitmapError
from softpage.snapshot import SoftSnapshot
from tests.fuzz import bitmap_target

SEEDS = bitmap_target.seed_corpus()


@pytest.mark.parametrize("seed", SEEDS, ids=range(len(SEEDS)))
def test_every_seed_decodes_and_meets_the_oracle(seed: bytes) -> None:
    p2m_size, octets = bitmap_target.split_input(seed)
    bitmap.decode(octets, p2m_size)  # a seed that decoder rejects would only fuzz the header checks
    bitmap_target.one_input(seed, measure_memory=True)


def flipped(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    changed = bytearray(data)
    changed[offset] ^= mask
    return bytes(changed)


START = bitmap_target.P2M_PREFIX.size  # of the snapshot octets in an input
NR_PFNS_OFFSET = START + 32
MALFORMED = {
    "empty": b"",
    "prefix only": bitmap_target.P2M_PREFIX.pack(100),
    "short header": SEEDS[2][:300],
    "truncated bitmap": SEEDS[2][:-1],
    "one octet too many": SEEDS[2] + b"\0",
    "bad magic": flipped(SEEDS[2], START),
    "count off by one": flipped(SEEDS[2], START + 48),
    "nr_pfns beyond p2m_size": flipped(SEEDS[2], NR_PFNS_OFFSET + 3, 0x80),
    "p2m_size zero": bitmap_target.make_input(0, bitmap_target.split_input(SEEDS[2])[1]),
    "stray bit past nr_pfns": flipped(SEEDS[2], START + abi.PAGE_SIZE + 4_000 // 8, 0x80),
    "header page tail": flipped(SEEDS[0], START + abi.PAGE_SIZE - 1),
    "huge frames_per_category": flipped(SEEDS[0], START + 43, 0x40),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_input_is_rejected_with_bitmap_error_only(data: bytes) -> None:
    p2m_size, octets = bitmap_target.split_input(data)
    with pytest.raises(BitmapError):
        bitmap.decode(octets, p2m_size)
    bitmap_target.one_input(data, measure_memory=True)


def test_the_prefix_is_bounded_p2m_size() -> None:
    assert bitmap_target.split_input(b"\xff\xff\xff\xff")[0] <= bitmap_target.MAX_P2M_SIZE
    assert bitmap_target.split_input(bitmap_target.P2M_PREFIX.pack(4_096))[0] == 4_096


def test_an_exception_other_than_bitmap_error_escapes(monkeypatch: pytest.MonkeyPatch) -> None:
    def crashing_decode(data: bytes, p2m_size: int) -> SoftSnapshot:
        raise IndexError("index 5 is out of bounds")

    monkeypatch.setattr(bitmap, "decode", crashing_decode)
    with pytest.raises(IndexError):
        bitmap_target.one_input(SEEDS[0])


def test_a_snapshot_that_does_not_re_encode_is_a_finding(monkeypatch: pytest.MonkeyPatch) -> None:
    real_decode = bitmap.decode
    other = bitmap_target.split_input(SEEDS[1])

    def wrong_decode(data: bytes, p2m_size: int) -> SoftSnapshot:
        real_decode(data, p2m_size)
        return real_decode(other[1], other[0])  # valid, but not what was given

    monkeypatch.setattr(bitmap, "decode", wrong_decode)
    with pytest.raises(bitmap_target.FuzzFinding):
        bitmap_target.one_input(SEEDS[0])


def test_a_set_beyond_nr_pfns_is_a_finding(monkeypatch: pytest.MonkeyPatch) -> None:
    real_decode = bitmap.decode

    def leaky_decode(data: bytes, p2m_size: int) -> SoftSnapshot:
        snapshot = real_decode(data, p2m_size)
        snapshot.cache.words[-1] |= np.uint64(1) << np.uint64(63)  # PFN 63 >= nr_pfns 9
        return snapshot

    monkeypatch.setattr(bitmap, "decode", leaky_decode)
    with pytest.raises(bitmap_target.FuzzFinding, match="CACHE set: PFN 63 >= nr_pfns 9"):
        bitmap_target.one_input(SEEDS[1])


@pytest.mark.parametrize("already_tracing", [False, True], ids=["started-per-input", "fuzzer-started"])
def test_allocating_for_a_claimed_size_is_a_finding(
    monkeypatch: pytest.MonkeyPatch, already_tracing: bool
) -> None:
    real_decode = bitmap.decode
    if already_tracing:
        tracemalloc.start()
        np.ones(1 << 20, dtype=np.uint8)  # freed again: an earlier input's peak must not count

    def greedy_decode(data: bytes, p2m_size: int) -> SoftSnapshot:
        claimed_frames = abi.unpack_header(bytes(data[: abi.HEADER.size])).frames_per_category
        np.ones(claimed_frames * abi.PAGE_SIZE * abi.NR_CATEGORIES, dtype=np.uint8)  # before any check
        return real_decode(data, p2m_size)

    monkeypatch.setattr(bitmap, "decode", greedy_decode)
    bitmap_target.one_input(SEEDS[0], measure_memory=True)  # claims 1 frame, gives 1: within the bound
    lying = bytearray(SEEDS[0])
    lying[START + 40] = 200  # frames_per_category 200 in a 1-frame snapshot
    try:
        with pytest.raises(bitmap_target.FuzzFinding, match="decode allocated"):
            bitmap_target.one_input(bytes(lying), measure_memory=True)
        assert tracemalloc.is_tracing() == already_tracing
    finally:
        tracemalloc.stop()


def test_outcome_names_the_rule_that_rejects() -> None:
    assert bitmap_target.outcome(SEEDS[0]) == "accepted"
    assert bitmap_target.outcome(MALFORMED["bad magic"]) == "magic"
    assert bitmap_target.outcome(MALFORMED["count off by one"]) == "count[N] (free)"
