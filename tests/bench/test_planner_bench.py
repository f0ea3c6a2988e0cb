"""Planner benchmark: a round's set algebra on a 64 GiB guest (16 M PFNs) takes milliseconds.

Run with ``make bench`` (not part of ``make test``). Each step is timed on
fresh state, best of ``REPEATS``; the numbers are printed, and a step slower
than ``BUDGET_S`` fails the test (generous: the box is shared, the target is
a few milliseconds per step).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest

from softpage.pfnset import PfnSet
from softpage.planner import RoundPlanner, SentPages
from softpage.snapshot import SnapshotState, SoftSnapshot

NR_PFNS = 16 * 1024 * 1024
REPEATS = 5
BUDGET_S = 0.25
pytestmark = pytest.mark.slow


def random_set(rng: np.random.Generator, density_shift: int) -> PfnSet:
    """About one PFN in ``2 ** density_shift`` (0: one in two)."""
    words = rng.integers(0, 2**64, size=NR_PFNS // 64, dtype=np.uint64, endpoint=False)
    for _ in range(density_shift):
        words &= rng.integers(0, 2**64, size=NR_PFNS // 64, dtype=np.uint64, endpoint=False)
    return PfnSet(NR_PFNS, words)


def report(request_id: int, soft: PfnSet, held: PfnSet | None = None) -> SoftSnapshot:
    empty = PfnSet.empty(NR_PFNS)
    return SoftSnapshot(
        state=SnapshotState.FINAL if held is not None else SnapshotState.SNAPSHOT,
        generation=2, request_id=request_id, flags=0, guest_nr_pfns=NR_PFNS, scan_ns=0,
        free=soft, cache=empty, slab=empty, held=held if held is not None else empty,
    )


def best_of(step: Callable[[], object], setup: Callable[[], None]) -> float:
    timings = []
    for _ in range(REPEATS):
        setup()
        started = time.perf_counter()
        step()
        timings.append(time.perf_counter() - started)
    return min(timings)


class Rounds:
    """Planner state for one timed step; ``reset_*`` builds it outside the timing."""

    def __init__(self, soft: PfnSet) -> None:
        self.soft = soft
        self.everything = PfnSet.full(NR_PFNS)
        self.planner = RoundPlanner(NR_PFNS)
        self.plan = self.planner.plan_precopy(self.everything, report(1, soft), 1)

    def reset_fresh(self) -> None:
        self.planner = RoundPlanner(NR_PFNS)

    def reset_planned(self) -> None:
        self.planner = RoundPlanner(NR_PFNS)
        self.plan = self.planner.plan_precopy(self.everything, report(1, self.soft), 1)

    def reset_after_first_round(self) -> None:
        self.reset_planned()
        self.record_first_round()

    def plan_first_round(self) -> None:
        self.plan = self.planner.plan_precopy(self.everything, report(1, self.soft), 1)

    def record_first_round(self) -> None:
        sent = SentPages(self.plan.data, self.plan.xalloc, PfnSet.empty(NR_PFNS))
        self.planner.record_sent(self.plan, sent)


def test_round_set_algebra_on_16m_pfns(capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(7)
    soft = random_set(rng, 0)
    dirty = random_set(rng, 5)
    held = soft & random_set(rng, 0)
    rounds = Rounds(soft)
    timings = {
        "plan_precopy, first round (all PFNs)": best_of(rounds.plan_first_round, rounds.reset_fresh),
        "record_sent, first round": best_of(rounds.record_first_round, rounds.reset_planned),
        "plan_precopy, dirty round (1/32 dirty)": best_of(
            lambda: rounds.planner.plan_precopy(dirty, report(2, soft), 2), rounds.reset_after_first_round
        ),
        "plan_final with a held set": best_of(
            lambda: rounds.planner.plan_final(dirty, report(3, soft, held), 3), rounds.reset_after_first_round
        ),
        "unaccounted()": best_of(lambda: rounds.planner.unaccounted(), rounds.reset_after_first_round),
    }
    with capsys.disabled():
        print(f"\nplanner on {NR_PFNS:,} PFNs (best of {REPEATS}):")
        for name, seconds in timings.items():
            print(f"  {name:<40} {seconds * 1e3:8.2f} ms")
    slow = {name: seconds for name, seconds in timings.items() if seconds > BUDGET_S}
    assert not slow, f"expected every step under {BUDGET_S * 1e3:.0f} ms, got {slow}"
