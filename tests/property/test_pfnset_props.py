"""PfnSet against Python's set: every operation, on universes that do and do not fill the last word."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from softpage import pfnset
from softpage.errors import PlannerError
from softpage.pfnset import PfnSet


@st.composite
def universe_and_sets(draw: st.DrawFn, count: int = 2) -> tuple[int, list[set[int]]]:
    nr_pfns = draw(st.integers(min_value=0, max_value=300))
    members = st.sets(st.integers(min_value=0, max_value=max(nr_pfns - 1, 0)), max_size=120)
    sets = [draw(members) if nr_pfns else set() for _ in range(count)]
    return nr_pfns, sets


@given(universe_and_sets())
def test_algebra_matches_python_sets(case: tuple[int, list[set[int]]]) -> None:
    nr_pfns, (left, right) = case
    a, b = PfnSet.from_pfns(nr_pfns, sorted(left)), PfnSet.from_pfns(nr_pfns, list(right))
    assert set(a.to_pfns().tolist()) == left
    assert (a | b).to_pfns().tolist() == sorted(left | right)
    assert (a & b).to_pfns().tolist() == sorted(left & right)
    assert (a - b).to_pfns().tolist() == sorted(left - right)
    assert (~a).to_pfns().tolist() == sorted(set(range(nr_pfns)) - left)
    assert a.count() == len(left) and bool(a) == bool(left)
    assert a.issubset(b) == left.issubset(right) and a.isdisjoint(b) == left.isdisjoint(right)
    probe = np.array(sorted(left | right), dtype=np.uint64)
    assert a.contains_many(probe).tolist() == [int(pfn) in left for pfn in probe]
    assert all((pfn in a) == (pfn in left) for pfn in range(nr_pfns + 2))
    assert PfnSet.from_bytes(nr_pfns, a.to_bytes()) == a
    c = a.copy()
    c |= b
    c -= a
    c &= b
    assert c == b - a


@given(universe_and_sets(count=1), st.randoms())
def test_from_pfns_accepts_any_order_and_duplicates(case: tuple[int, list[set[int]]], rng: object) -> None:
    nr_pfns, (members,) = case
    shuffled = sorted(members) * 2
    rng.shuffle(shuffled)  # type: ignore[attr-defined]
    rebuilt = PfnSet.from_pfns(nr_pfns, np.array(shuffled, dtype=np.uint64))
    assert rebuilt.to_pfns().tolist() == sorted(members)


def test_full_clears_the_bits_past_the_universe() -> None:
    assert PfnSet.full(70).count() == 70
    assert PfnSet.full(70).to_pfns().tolist() == list(range(70))
    assert PfnSet.full(0).count() == 0


def test_out_of_range_and_mixed_universes_are_errors() -> None:
    with pytest.raises(PlannerError):
        PfnSet.from_pfns(10, [10])
    with pytest.raises(PlannerError):
        PfnSet.from_pfns(10, [-1])
    with pytest.raises(PlannerError):
        _ = PfnSet.empty(10) | PfnSet.empty(11)


@given(universe_and_sets(count=1), st.integers(min_value=1, max_value=3), st.integers(1, 70))
def test_iter_pfns_cuts_to_pfns_in_order_across_blocks(
    case: tuple[int, list[set[int]]], block_words: int, max_count: int
) -> None:
    nr_pfns, (members,) = case
    pfn_set = PfnSet.from_pfns(nr_pfns, sorted(members))
    expected = sorted(members)
    # Blocks of one to three words, so that a batch spans several of them and some are empty.
    with mock.patch.object(pfnset, "_UNPACK_BLOCK_WORDS", block_words):
        batches = [batch.tolist() for batch in pfn_set.iter_pfns(max_count)]
        assert pfn_set.to_pfns().tolist() == expected
    assert [pfn for batch in batches for pfn in batch] == expected
    assert all(len(batch) == max_count for batch in batches[:-1])
    assert all(0 < len(batch) <= max_count for batch in batches)


@given(universe_and_sets(count=2), st.randoms())
def test_add_is_union_in_place_in_any_order(case: tuple[int, list[set[int]]], rng: object) -> None:
    nr_pfns, (first, second) = case
    pfn_set = PfnSet.from_pfns(nr_pfns, sorted(first))
    added = sorted(second) * 2
    rng.shuffle(added)  # type: ignore[attr-defined]
    pfn_set.add(np.array(added, dtype=np.uint64))
    assert pfn_set.to_pfns().tolist() == sorted(first | second)


def test_add_refuses_a_pfn_outside_the_universe() -> None:
    pfn_set = PfnSet.empty(100)
    with pytest.raises(PlannerError, match="out of range"):
        pfn_set.add(np.array([3, 100], dtype=np.uint64))
    assert not pfn_set
    with pytest.raises(PlannerError, match="max_count"):
        next(pfn_set.iter_pfns(0))
