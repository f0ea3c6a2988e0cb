"""Planner properties over random rounds, against an independent model of the destination.

The model knows, per PFN, whether the destination's copy equals the source's:
a send with data makes it equal, a guest write or a first-time XALLOC (a
fresh zero page) makes it differ. Whatever the dirty and soft sets, the
planner must keep every differing PFN in ``stale`` or in the pending dirty
log, and after stop-and-copy only held PFNs may differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from softpage.pfnset import PfnSet
from softpage.planner import RoundPlan, RoundPlanner, SentPages
from softpage.snapshot import SnapshotState, SoftSnapshot


@dataclass(frozen=True)
class Round:
    written_before: frozenset[int]
    """Guest writes harvested for this round."""
    soft: frozenset[int]
    snapshot_matches: bool
    written_during: frozenset[int]
    """Guest writes while the round is sent: logged for the next harvest."""
    deferred: frozenset[int]
    """Planned PFNs the sender could not send this round (PV page tables in flux)."""
    tables: frozenset[int]
    """PFNs that go out as page tables if sent with data this round (PV)."""


def pfn_sets(size: int) -> st.SearchStrategy[frozenset[int]]:
    return st.frozensets(st.integers(0, size - 1), max_size=size)


@dataclass(frozen=True)
class Migration:
    size: int
    holes: frozenset[int]
    rounds: list[Round]
    held: frozenset[int]
    final_matches: bool
    """The FINAL report answers the final request (else its held set must be ignored)."""
    final_writes: frozenset[int]


@st.composite
def migrations(draw: st.DrawFn) -> Migration:
    size = draw(st.integers(1, 200))
    round_strategy = st.builds(Round, pfn_sets(size), pfn_sets(size), st.booleans(), pfn_sets(size),
                               pfn_sets(size), pfn_sets(size))
    return Migration(
        size=size,
        holes=draw(pfn_sets(size)),
        rounds=draw(st.lists(round_strategy, min_size=1, max_size=6)),
        held=draw(pfn_sets(size)),
        final_matches=draw(st.booleans()),
        final_writes=draw(pfn_sets(size)),
    )


def as_set(size: int, members: frozenset[int]) -> PfnSet:
    return PfnSet.from_pfns(size, sorted(members))


def report(size: int, request_id: int, soft: PfnSet, held: PfnSet | None = None) -> SoftSnapshot:
    empty = PfnSet.empty(size)
    return SoftSnapshot(
        state=SnapshotState.FINAL if held is not None else SnapshotState.SNAPSHOT,
        generation=2, request_id=request_id, flags=0, guest_nr_pfns=size, scan_ns=0,
        free=soft, cache=empty, slab=empty, held=held if held is not None else empty,
    )


class Destination:
    """Per PFN: does the destination hold the source's current content?"""

    def __init__(self, size: int) -> None:
        self.equal = np.zeros(size, dtype=bool)
        self.named = np.zeros(size, dtype=bool)
        self.table = np.zeros(size, dtype=bool)
        """The PFN's latest entry was a page table: a PV receiver pins it by that type."""

    def guest_writes(self, pfns: frozenset[int]) -> None:
        self.equal[sorted(pfns)] = False

    def receive(self, sent: SentPages) -> None:
        data = sent.data.to_pfns().astype(np.intp)
        xalloc = sent.xalloc.to_pfns().astype(np.intp)
        assert not self.named[xalloc].any(), "XALLOC for a PFN the destination already has"
        self.equal[data] = True
        self.equal[xalloc] = False
        self.named[data] = True
        self.named[xalloc] = True
        self.table[data] = False
        self.table[xalloc] = False
        if sent.tables is not None:
            self.table[sent.tables.to_pfns().astype(np.intp)] = True


def send(planner: RoundPlanner, plan: RoundPlan, holes: PfnSet, destination: Destination,
         deferred: PfnSet | None = None, tables: PfnSet | None = None) -> None:
    planned = plan.data | plan.xalloc
    assert plan.data.isdisjoint(plan.xalloc)
    assert plan.xalloc.isdisjoint(planner.named), "XALLOC planned for a PFN already named"
    deferred = (deferred if deferred is not None else PfnSet.empty(planned.nr_pfns)) & (planned - holes)
    data = plan.data - holes - deferred
    sent = SentPages(data=data, xalloc=plan.xalloc - holes - deferred, holes=planned & holes,
                     deferred=deferred, tables=(tables & data) if tables is not None else None)
    planner.record_sent(plan, sent)
    destination.receive(sent)


@given(migrations())
def test_stale_covers_every_page_the_destination_has_wrong(migration: Migration) -> None:
    size, hole_members, final_writes = migration.size, migration.holes, migration.final_writes
    holes, ram = as_set(size, hole_members), ~as_set(size, hole_members)
    planner = RoundPlanner(size)
    destination = Destination(size)
    pending = PfnSet.empty(size)
    for number, planned_round in enumerate(migration.rounds, start=1):
        written = as_set(size, planned_round.written_before - hole_members)
        destination.guest_writes(planned_round.written_before - hole_members)
        candidates = PfnSet.full(size) if number == 1 else pending | written
        request_id = number if planned_round.snapshot_matches else number + 1000
        soft = as_set(size, planned_round.soft)
        plan = planner.plan_precopy(candidates, report(size, request_id, soft), number)
        assert plan.data | plan.xalloc | plan.skipped == candidates
        send(planner, plan, holes, destination, as_set(size, planned_round.deferred),
             as_set(size, planned_round.tables))
        during = planned_round.written_during - hole_members
        destination.guest_writes(during)
        pending = as_set(size, during)
        wrong = PfnSet.from_pfns(size, np.flatnonzero(destination.named & ~destination.equal))
        assert wrong.issubset(planner.stale | pending)

    destination.guest_writes(final_writes - hole_members)
    held = as_set(size, migration.held) & ram
    final_dirty = pending | as_set(size, final_writes - hole_members)
    answered = 99 if migration.final_matches else 98
    plan = planner.plan_final(final_dirty, report(size, answered, PfnSet.empty(size), held), 99)
    if not migration.final_matches:
        held = PfnSet.empty(size)
    send(planner, plan, holes, destination)
    assert planner.unaccounted() == PfnSet.empty(size)
    named = PfnSet.from_pfns(size, np.flatnonzero(destination.named))
    assert named == ram
    wrong = PfnSet.from_pfns(size, np.flatnonzero(destination.named & ~destination.equal))
    assert wrong.issubset(held)
    assert not (destination.table & ~destination.equal).any(), "a stale page table is left to pin"
    assert planner.unsent_stale(held) == PfnSet.empty(size)
