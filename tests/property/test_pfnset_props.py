"""PfnSet against Python's set: every operation, on universes that do and do not fill the last word."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

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
