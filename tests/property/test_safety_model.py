"""The dirty-page safety invariant, as a stateful model (docs/design.md "The safety invariant").

Hypothesis drives arbitrary interleavings of guest activity (allocations,
frees, cache fills, cache that becomes dirty or mapped, slab growth, writes
while pages are being read or while a report is being built), soft-page
reports (prompt, silent, lagging, answering an old request, lying, malformed,
torn), either cache mode (``prune-cache`` cold or all, a module that does not
know it, cold cache used again after it was reported, hot cache going cold),
the early drop before the suspend and the first drop of ``cache=cold`` before
round 1 (answered, never answered, not offered, not asked for, with guest work
right after it, and any guest activity between it and round 1), dirty-log harvests
and live rounds through the real ``MigrationSession`` and ``RoundPlanner`` on
the simulator, into the real stream writer, reader and ``RestoreModel``. After
stop-and-copy it checks:

* every RAM PFN is populated on the destination, and no hole is;
* every RAM PFN outside the final held set has on the destination exactly the
  content it had on the source at suspend. The held set is the one the guest
  published in a well-formed FINAL report answering the final request (what
  it claims, lies included: a lying guest may only corrupt itself).
* what the guest relies on in its free pages: a guest booted with
  ``init_on_free`` (free means zero) or page poisoning (free means the
  pattern) hands out a free page trusting its content, so for such a guest the
  pages really held must also match the source (zero or the pattern) once its
  module's resume callback has run on the destination. The destination's heap
  may be unscrubbed: a page populated without data then reads as junk, as Xen
  allows (``RestoreModel(fresh_fill=...)``).

The same machine must catch deliberately broken planners, and today's planner
before the fix for such guests (``IgnoresFreePageContents`` with a module that
does not rewrite held pages).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    rule,
    run_state_machine_as_test,
)

from softpage import abi
from softpage.categories import CacheMode, Category
from softpage.driver import MigrationSession
from softpage.options import DriverOptions
from softpage.pfnset import PfnArray, PfnSet
from softpage.planner import RoundPlan, RoundPlanner
from softpage.sim.backend import SimBackend
from softpage.sim.guest import (
    DropBehaviour,
    FinalBehaviour,
    FreeContents,
    PageKind,
    ReportBehaviour,
    SimGuest,
    mask_from_pfnset,
)
from softpage.sim.stream import RestoreSink
from softpage.snapshot import SoftSnapshot

STEPS = 25
pages = st.integers(min_value=1, max_value=24)


class SafetyModel(RuleBasedStateMachine):
    """One live migration of a small simulated guest, step by step."""

    planner_class: type[RoundPlanner] = RoundPlanner
    free_contents = st.sampled_from(FreeContents)
    module_reinits_held = st.booleans()
    """Whether the guest's module rewrites held pages at resume (a module from before that
    fix does not, and says so by leaving ``FLAG_HELD_REINIT`` out)."""
    fresh_fill = st.sampled_from([0, 0x5A])
    """What a page populated without data reads as on the destination: Xen scrubbed it, or not."""

    def __init__(self) -> None:
        super().__init__()
        self.session: MigrationSession | None = None
        self.stopped = False
        self.first_dropped = False
        self.read_activity = 0
        self.messages: list[str] = []

    # -- setup ---------------------------------------------------------------
    @initialize(
        seed=st.integers(0, 2**32 - 1),
        p2m_size=st.integers(64, 320),
        hole=st.tuples(st.integers(0, 300), st.integers(0, 16)),
        kernel=st.integers(1, 40),
        anon=st.integers(0, 80),
        cache=st.integers(0, 120),
        slab=st.integers(0, 20),
        pinned=st.integers(0, 20),
        module_loaded=st.booleans(),
        skip_early_drop=st.booleans(),
        cache_mode=st.sampled_from(CacheMode),
        knows_prune_cache=st.booleans(),
        hot=st.integers(0, 60),
        snapshot_min_candidates=st.sampled_from([0, 0, 8, 40]),
        data=st.data(),
    )
    def boot(
        self,
        seed: int,
        p2m_size: int,
        hole: tuple[int, int],
        kernel: int,
        anon: int,
        cache: int,
        slab: int,
        pinned: int,
        module_loaded: bool,
        skip_early_drop: bool,
        cache_mode: CacheMode,
        knows_prune_cache: bool,
        hot: int,
        snapshot_min_candidates: int,
        data: st.DataObject,
    ) -> None:
        hole_start = min(hole[0], p2m_size - 1)
        holes = np.arange(hole_start, min(p2m_size - 1, hole_start + hole[1]), dtype=np.uint64)
        guest = SimGuest(p2m_size, holes, seed=seed, free_contents=data.draw(self.free_contents))
        guest.module_reinits_held = data.draw(self.module_reinits_held)
        kernel_pages = guest.pfns_of(PageKind.FREE)[:kernel].astype(np.intp)
        guest.kind[kernel_pages] = PageKind.KERNEL
        guest.write(kernel_pages)
        guest.allocate_anon(anon)
        guest.fill_cache(cache)
        guest.grow_slab(slab)
        guest.pin_cache(pinned)
        guest.use_cache(hot)
        guest.knows_prune_cache = knows_prune_cache
        guest.module_loaded = module_loaded or seed % 8 != 0
        self.guest = guest
        self.backend = SimBackend(guest, read_hook=self._while_reading)
        self.sink = RestoreSink(fresh_fill=data.draw(self.fresh_fill))
        options = DriverOptions(
            snapshot_timeout=0.0, final_snapshot_timeout=0.0, drop_timeout=0.0 if skip_early_drop else 1.0,
            snapshot_min_candidates=snapshot_min_candidates, cache=cache_mode,
        )
        self.session = MigrationSession(self.backend, self.sink, options, self.messages.append)
        self.session.planner = self.planner_class(p2m_size, options.prune, honour_held=False)
        self.session.start()
        self.pending = PfnSet.empty(p2m_size)
        self.live_rounds = 0

    def _while_reading(self, guest: SimGuest, pfns: PfnArray) -> None:
        """The guest keeps running while dom0 copies pages: some just-read pages change."""
        if not self.read_activity:
            return
        in_use = np.isin(guest.kind[pfns.astype(np.intp)], (PageKind.ANON, PageKind.KERNEL))
        guest.write(pfns[in_use][: self.read_activity])
        guest.churn(self.read_activity)

    # -- guest activity ------------------------------------------------------
    @rule(count=pages)
    def allocate(self, count: int) -> None:
        self.guest.allocate_anon(count)

    @rule(count=pages)
    def free(self, count: int) -> None:
        self.guest.free_anon(count)

    @rule(count=pages)
    def churn(self, count: int) -> None:
        self.guest.churn(count)

    @rule(count=pages)
    def fill_cache(self, count: int) -> None:
        self.guest.fill_cache(count)

    @rule(count=pages)
    def dirty_cache(self, count: int) -> None:
        self.guest.dirty_cache(count)

    @rule(count=pages)
    def write_back(self, count: int) -> None:
        self.guest.write_back(count)

    @rule(count=pages)
    def map_cache(self, count: int) -> None:
        self.guest.pin_cache(count)

    @rule(count=pages)
    def use_cache(self, count: int) -> None:
        """Cached files read again: cold cache, reported soft or not, becomes hot."""
        self.guest.use_cache(count)

    @rule(count=pages)
    def cool_cache(self, count: int) -> None:
        self.guest.cool_cache(count)

    @rule(count=pages)
    def drop_cache(self, count: int) -> None:
        self.guest.drop_cache(count)

    @rule(count=pages, grow=st.booleans())
    def slab(self, count: int, grow: bool) -> None:
        if grow:
            self.guest.grow_slab(count)
        else:
            self.guest.shrink_slab(count)

    @rule(count=pages)
    def dirty_memory(self, count: int) -> None:
        self.guest.dirty_in_use(count)

    @rule(count=st.integers(0, 8))
    def activity_while_reading(self, count: int) -> None:
        self.read_activity = count

    @rule(count=st.integers(0, 8))
    def activity_while_scanning(self, count: int) -> None:
        """Pages reported soft are reallocated and written before the report is out."""
        self.guest.after_scan = (lambda guest: guest.churn(count)) if count else None

    @rule(count=st.integers(0, 8))
    def activity_after_drop(self, count: int) -> None:
        """Files are read back and pages written between the early drop and the suspend request."""

        def read_back_and_churn(guest: SimGuest) -> None:
            guest.fill_cache(count)
            guest.churn(count)

        self.guest.after_drop = read_back_and_churn if count else None

    @rule(count=st.integers(0, 8))
    def activity_after_freeze(self, count: int) -> None:
        """The kernel writes pages after the module published FINAL, before the suspend."""
        self.guest.after_freeze = (lambda guest: guest.dirty_in_use(count)) if count else None

    # -- the module's behaviour ---------------------------------------------
    @rule(behaviour=st.sampled_from(ReportBehaviour))
    def next_reports(self, behaviour: ReportBehaviour) -> None:
        self.guest.report_behaviour = behaviour

    @rule(behaviour=st.sampled_from(DropBehaviour))
    def next_drop(self, behaviour: DropBehaviour) -> None:
        self.guest.drop_behaviour = behaviour

    @rule(behaviour=st.sampled_from(FinalBehaviour))
    def final_report(self, behaviour: FinalBehaviour) -> None:
        self.guest.final_behaviour = behaviour

    # -- migration -------------------------------------------------------------
    @rule()
    def harvest(self) -> None:
        assert self.session is not None
        self.pending |= self.session.harvest()

    @rule()
    def live_round(self) -> None:
        assert self.session is not None
        if not self.live_rounds and not self.first_dropped:
            self.first_drop()  # as send_domain: right before round 1, unless a step did it earlier
        self.session.live_round(self.pending if self.live_rounds else None)
        self.pending = PfnSet.empty(self.guest.p2m_size)
        self.live_rounds += 1

    @rule()
    def first_drop(self) -> None:
        """What send_domain does before round 1 (nothing unless cache=cold and a module), here
        with any guest activity between it and round 1; only then (a no-op as a later step)."""
        assert self.session is not None
        if self.live_rounds or self.first_dropped:
            return
        self.first_dropped = True
        self.session.drop_cold_cache_first()

    @rule()
    def harvest_then_live_round(self) -> None:
        """The driver's own step, given more weight than the separate ones."""
        self.harvest()
        self.live_round()

    def teardown(self) -> None:
        # Every run ends with stop-and-copy and the check, whatever the steps were.
        if self.session is not None and not self.stopped:
            self._stop_and_check()

    # -- the invariant -----------------------------------------------------------
    def _stop_and_check(self) -> None:
        assert self.session is not None
        if self.live_rounds and self.pending:
            # Harvested pages go out live before the suspend, as the driver's loop does.
            self.session.live_round(self.pending)
        self.stopped = True
        self.session.stop_and_copy()
        stats = self.session.stats
        event(f"live rounds: {min(self.live_rounds, 3)}{'+' if self.live_rounds >= 3 else ''}")
        event(f"XALLOC used: {stats.pages_xalloc > 0}; soft pages skipped: {stats.pages_skipped > 0}")
        event(f"final report used: {stats.rounds[-1].snapshot_used}")
        event(f"early drop: {stats.guest_drop_outcome}")
        event(f"first drop: {stats.first_drop_outcome}")
        event(f"cache mode: {stats.cache_mode}")
        guest, backend = self.guest, self.backend
        source = backend.suspended_tokens
        assert source is not None and backend.suspended_held is not None

        ram = guest.ram
        named = np.zeros(guest.p2m_size, dtype=bool)
        named[self.sink.model.named_pfns().astype(np.intp)] = True
        assert np.array_equal(named, ram), "the stream must name every RAM PFN and no hole"
        populated = self.sink.populated(guest.p2m_size)
        assert not (ram & ~populated).any(), f"RAM PFNs never named: {np.flatnonzero(ram & ~populated)}"
        assert not (~ram & populated).any(), f"holes populated: {np.flatnonzero(~ram & populated)}"

        exempt = np.zeros(guest.p2m_size, dtype=bool)
        report = guest.final_report
        if report is not None:
            final_request = backend.channel.requests[-1]
            if report.well_formed and report.request_id == final_request:
                exempt = mask_from_pfnset(report.claimed_held)
            if guest.final_behaviour is FinalBehaviour.PROMPT:
                assert report.claimed_held == backend.suspended_held, "the simulator's guest lied"
        free_token = guest.free_contents.value
        event(f"free pages: {guest.free_contents.name}; module rewrites held: {guest.module_reinits_held}")
        if free_token is not None:
            # The guest hands its really free pages out trusting their content: only the pages
            # it lied about are its own business.
            really_held = mask_from_pfnset(backend.suspended_held)
            assert (source[really_held] == free_token).all(), "the simulator freed a page without zeroing it"
            exempt &= ~really_held

        must_match = np.flatnonzero(ram & ~exempt).astype(np.uint64)
        # The guest's first step on the destination, before anything can allocate.
        destination = guest.reinit_held(must_match, self.sink.tokens(must_match))
        wrong = must_match[destination != source[must_match.astype(np.intp)]]
        assert wrong.size == 0, (
            f"{wrong.size} PFNs differ on the destination: {wrong[:16]} "
            f"(kinds {guest.kind[wrong[:16].astype(np.intp)]})"
        )


SafetyModel.TestCase.settings = settings(
    settings(), stateful_step_count=STEPS, suppress_health_check=[HealthCheck.too_slow]
)
TestSafetyModel = SafetyModel.TestCase


# -- broken planners the model must catch ------------------------------------------
class ForgetsStaleResend(RoundPlanner):
    """Stop-and-copy sends only the final harvest: pages skipped or XALLOC'd
    earlier and never rewritten keep their destination copy."""

    def plan_final(
        self, final_dirty: PfnSet, snapshot: SoftSnapshot | None, expected_request_id: int | None
    ) -> RoundPlan:
        stale = self.stale
        self.stale = PfnSet.empty(self.p2m_size)
        try:
            return super().plan_final(final_dirty, snapshot, expected_request_id)
        finally:
            self.stale = stale


class TrustsLastPrecopySnapshot(RoundPlanner):
    """Stop-and-copy also skips what the last precopy report called soft,
    although the guest may have reallocated and written it since."""

    last_soft: PfnSet | None = None

    def plan_precopy(
        self, candidates: PfnSet, snapshot: SoftSnapshot | None, expected_request_id: int | None
    ) -> RoundPlan:
        plan = super().plan_precopy(candidates, snapshot, expected_request_id)
        if plan.snapshot_used and snapshot is not None:
            self.last_soft = snapshot.soft((Category.FREE, Category.CACHE, Category.SLAB))
        return plan

    def plan_final(
        self, final_dirty: PfnSet, snapshot: SoftSnapshot | None, expected_request_id: int | None
    ) -> RoundPlan:
        plan = super().plan_final(final_dirty, snapshot, expected_request_id)
        if self.last_soft is None:
            return plan
        trusted = plan.data & self.last_soft & self.named
        return RoundPlan(
            data=plan.data - trusted,
            xalloc=plan.xalloc,
            skipped=plan.skipped | trusted,
            snapshot_used=plan.snapshot_used,
            snapshot_note=plan.snapshot_note,
        )


class IgnoresFreePageContents(RoundPlanner):
    """The planner before issue 17: it honours any well-formed held set, although a guest
    booted with ``init_on_free`` or page poisoning hands out a held page trusting that it is
    zero (or poisoned) while the destination holds the last data sent for it, or an
    unscrubbed frame populated for its XALLOC entry."""

    def plan_final(
        self, final_dirty: PfnSet, snapshot: SoftSnapshot | None, expected_request_id: int | None
    ) -> RoundPlan:
        if snapshot is not None:
            snapshot = dataclasses.replace(snapshot, flags=snapshot.flags | abi.FLAG_HELD_REINIT)
        return super().plan_final(final_dirty, snapshot, expected_request_id)


def _must_fail(machine: type[SafetyModel]) -> None:
    with pytest.raises(AssertionError, match="PFNs differ on the destination"):
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=300,
                stateful_step_count=STEPS,
                deadline=None,
                database=None,
                phases=[Phase.generate],
                suppress_health_check=list(HealthCheck),
                print_blob=False,
            ),
        )


@pytest.mark.parametrize("broken_planner", [ForgetsStaleResend, TrustsLastPrecopySnapshot])
def test_the_model_catches_a_broken_planner(broken_planner: type[RoundPlanner]) -> None:
    _must_fail(type(f"{broken_planner.__name__}Model", (SafetyModel,), {"planner_class": broken_planner}))


@pytest.mark.parametrize("free_contents", [FreeContents.ZERO, FreeContents.POISON])
@pytest.mark.parametrize("fresh_fill", [0, 0x5A])
def test_the_model_catches_the_planner_and_module_before_issue_17(
    free_contents: FreeContents, fresh_fill: int
) -> None:
    """The recorded mutation check: today's planner with a module that does not rewrite held
    pages leaves stale or unscrubbed memory in pages an ``init_on_free`` or poisoning guest
    trusts. With a scrubbed heap it fails through pages sent with data and freed later alone."""
    attributes = {
        "planner_class": IgnoresFreePageContents,
        "free_contents": st.just(free_contents),
        "module_reinits_held": st.just(False),
        "fresh_fill": st.just(fresh_fill),
    }
    _must_fail(type(f"Before17{free_contents.name}{fresh_fill}Model", (SafetyModel,), attributes))


@pytest.mark.parametrize("free_contents", [FreeContents.ZERO, FreeContents.POISON])
def test_the_fixed_planner_alone_keeps_an_old_modules_guest_safe(free_contents: FreeContents) -> None:
    """Half of the fix is dom0's: an old module in such a guest gets its held set ignored."""
    attributes = {
        "free_contents": st.just(free_contents),
        "module_reinits_held": st.just(False),
        "fresh_fill": st.just(0x5A),
    }
    machine = type(f"OldModule{free_contents.name}Model", (SafetyModel,), attributes)
    run_state_machine_as_test(
        machine, settings=settings(max_examples=100, stateful_step_count=STEPS, deadline=None, database=None)
    )
