"""The round planner's rules 1-4 (softpage.planner), one group per rule.

Each test pins one consequence of a rule so that breaking the rule breaks the
test: the expected sets are written out, not recomputed with the planner's
own formulas.
"""

from __future__ import annotations

import pytest

from softpage import abi
from softpage.categories import Category
from softpage.errors import PlannerError
from softpage.pfnset import PfnSet
from softpage.planner import RoundPlan, RoundPlanner, SentPages
from softpage.snapshot import SnapshotState, SoftSnapshot

P2M = 64
EMPTY = PfnSet.empty(P2M)


def pfns(*members: int) -> PfnSet:
    return PfnSet.from_pfns(P2M, members)


def span(start: int, stop: int) -> PfnSet:
    return PfnSet.from_pfns(P2M, range(start, stop))


def snapshot(
    request_id: int,
    free: PfnSet = EMPTY,
    cache: PfnSet = EMPTY,
    slab: PfnSet = EMPTY,
    held: PfnSet = EMPTY,
    state: SnapshotState = SnapshotState.SNAPSHOT,
    flags: int = 0,
) -> SoftSnapshot:
    return SoftSnapshot(
        state=state,
        generation=2,
        request_id=request_id,
        flags=flags,
        guest_nr_pfns=P2M,
        scan_ns=1000,
        free=free,
        cache=cache,
        slab=slab,
        held=held,
    )


def final(request_id: int, held: PfnSet, flags: int = 0) -> SoftSnapshot:
    return snapshot(request_id, held=held, state=SnapshotState.FINAL, flags=flags)


def send_as_planned(planner: RoundPlanner, plan: RoundPlan, holes: PfnSet = EMPTY) -> None:
    """What a sender does when every planned PFN is RAM except ``holes``."""
    planned = plan.data | plan.xalloc
    sent = SentPages(data=plan.data - holes, xalloc=plan.xalloc - holes, holes=planned & holes)
    planner.record_sent(plan, sent)


def after_first_round(soft: PfnSet = EMPTY, holes: PfnSet = EMPTY) -> RoundPlanner:
    planner = RoundPlanner(P2M)
    plan = planner.plan_precopy(PfnSet.full(P2M), snapshot(1, free=soft), 1)
    send_as_planned(planner, plan, holes)
    return planner


# -- rule 1: every RAM PFN is named at least once ---------------------------------
def test_rule1_first_round_names_every_pfn_with_data_or_xalloc() -> None:
    planner = RoundPlanner(P2M)
    plan = planner.plan_precopy(PfnSet.full(P2M), snapshot(1, free=span(10, 20), cache=pfns(30)), 1)
    assert plan.xalloc == span(10, 20) | pfns(30)
    assert plan.data == PfnSet.full(P2M) - span(10, 20) - pfns(30)
    assert plan.skipped == EMPTY


def test_rule1_nothing_unaccounted_after_a_full_first_round_with_holes() -> None:
    planner = after_first_round(soft=span(0, 8), holes=span(40, 48))
    assert planner.unaccounted() == EMPTY
    assert planner.named == PfnSet.full(P2M) - span(40, 48)
    assert planner.holes == span(40, 48)


def test_rule1_final_round_names_what_a_partial_first_round_left_out() -> None:
    planner = RoundPlanner(P2M)
    send_as_planned(planner, planner.plan_precopy(span(0, 32), None, None))
    assert planner.unaccounted() == span(32, 64)
    plan = planner.plan_final(EMPTY, None, None)
    assert plan.data == span(32, 64)
    send_as_planned(planner, plan)
    assert planner.unaccounted() == EMPTY


def test_rule1_a_pfn_held_but_never_named_is_still_named_as_xalloc() -> None:
    planner = RoundPlanner(P2M)
    send_as_planned(planner, planner.plan_precopy(span(0, 60), None, None))
    plan = planner.plan_final(EMPTY, final(9, held=span(56, 64)), 9)
    assert plan.xalloc == span(60, 64)
    assert plan.data == EMPTY
    # 56..59 went out with data and were not written since: nothing to skip.
    assert plan.skipped == EMPTY


# -- rule 2: dirty pages are resent unless soft in a snapshot taken after the harvest --
def test_rule2_dirty_pages_are_resent_without_a_snapshot() -> None:
    planner = after_first_round()
    plan = planner.plan_precopy(pfns(3, 5, 7), None, None)
    assert plan.data == pfns(3, 5, 7)
    assert plan.xalloc == EMPTY


def test_rule2_dirty_pages_soft_in_the_current_snapshot_are_skipped_not_xalloc() -> None:
    planner = after_first_round()
    plan = planner.plan_precopy(pfns(3, 5, 7), snapshot(2, free=pfns(5), slab=pfns(7, 9)), 2)
    assert plan.data == pfns(3)
    # Already named: an XALLOC would leave the old copy on the receiver.
    assert plan.xalloc == EMPTY
    assert plan.skipped == pfns(5, 7)


def test_rule2_skipped_pages_become_stale_and_sent_pages_fresh() -> None:
    planner = after_first_round()
    send_as_planned(planner, planner.plan_precopy(pfns(3, 5, 7), snapshot(2, cache=pfns(5, 7)), 2))
    assert planner.stale == pfns(5, 7)
    send_as_planned(planner, planner.plan_precopy(pfns(5), None, None))
    assert planner.stale == pfns(7)


def test_rule2_xalloc_pages_are_stale_until_sent_with_data() -> None:
    planner = after_first_round(soft=pfns(1, 2))
    assert planner.stale == pfns(1, 2)


def test_rule2_a_snapshot_answering_another_request_prunes_nothing() -> None:
    planner = after_first_round()
    plan = planner.plan_precopy(pfns(3, 5), snapshot(1, free=pfns(3, 5)), 2)
    assert plan.data == pfns(3, 5)
    assert not plan.snapshot_used
    assert "expected 2" in plan.snapshot_note


def test_rule2_only_the_chosen_categories_are_pruned() -> None:
    planner = RoundPlanner(P2M, prune=(Category.FREE,))
    plan = planner.plan_precopy(PfnSet.full(P2M), snapshot(1, free=pfns(1), cache=pfns(2), slab=pfns(3)), 1)
    assert plan.xalloc == pfns(1)
    assert plan.data == PfnSet.full(P2M) - pfns(1)


def test_rule2_no_pruning_means_plain_precopy() -> None:
    planner = RoundPlanner(P2M, prune=())
    plan = planner.plan_precopy(PfnSet.full(P2M), snapshot(1, free=span(0, 32)), 1)
    assert plan.data == PfnSet.full(P2M)
    assert plan.snapshot_note == "pruning off"


def test_held_is_not_a_precopy_category() -> None:
    with pytest.raises(PlannerError, match="HELD"):
        RoundPlanner(P2M, prune=(Category.HELD,))


# -- rule 3: stop-and-copy sends everything stale or dirty that is not held ----------
def test_rule3_final_round_resends_stale_and_dirty_pages() -> None:
    planner = after_first_round(soft=pfns(1, 2))
    send_as_planned(planner, planner.plan_precopy(pfns(5, 6), snapshot(2, free=pfns(6)), 2))
    plan = planner.plan_final(pfns(9), None, None)
    # 1, 2: XALLOC'd in round 1; 6: skipped in round 2; 9: dirty now.
    assert plan.data == pfns(1, 2, 6, 9)
    assert plan.skipped == EMPTY


def test_rule3_held_pages_are_skipped_in_the_final_round() -> None:
    planner = after_first_round(soft=pfns(1, 2, 3))
    plan = planner.plan_final(pfns(3, 9), final(5, held=pfns(2, 3, 40)), 5)
    assert plan.data == pfns(1, 9)
    assert plan.skipped == pfns(2, 3)
    assert plan.snapshot_used


def test_rule3_precopy_categories_do_not_apply_in_the_final_round() -> None:
    planner = after_first_round(soft=pfns(1, 2))
    report = snapshot(5, free=pfns(1, 2, 9), cache=pfns(3), held=pfns(2), state=SnapshotState.FINAL)
    plan = planner.plan_final(pfns(9), report, 5)
    assert plan.data == pfns(1, 9)


def test_rule3_unsent_stale_is_empty_after_a_correct_final_round() -> None:
    planner = after_first_round(soft=pfns(1, 2))
    plan = planner.plan_final(EMPTY, final(5, held=pfns(2)), 5)
    send_as_planned(planner, plan)
    assert planner.unsent_stale(pfns(2)) == EMPTY
    assert planner.unsent_stale(EMPTY) == pfns(2)


def test_rule3_held_ignored_when_the_guest_has_no_module() -> None:
    planner = after_first_round(soft=pfns(1))
    planner.honour_held = False
    plan = planner.plan_final(EMPTY, final(5, held=pfns(1)), 5)
    assert plan.data == pfns(1)


@pytest.mark.parametrize("trusted", [abi.FLAG_INIT_ON_FREE, abi.FLAG_PAGE_POISON])
def test_rule3_held_ignored_when_the_guest_trusts_free_pages_and_its_module_does_not_restore_them(
    trusted: int,
) -> None:
    # 1 was sent with data in round 1 and freed since: on the destination it still holds
    # that data, which an init_on_free allocator would hand out as zeroed memory.
    planner = after_first_round(soft=pfns(2))
    plan = planner.plan_final(pfns(1), final(5, held=pfns(1, 2), flags=trusted), 5)
    assert plan.data == pfns(1, 2)
    assert plan.skipped == EMPTY
    assert not plan.snapshot_used
    assert "does not restore" in plan.snapshot_note


@pytest.mark.parametrize("trusted", [0, abi.FLAG_INIT_ON_FREE, abi.FLAG_PAGE_POISON])
def test_rule3_held_honoured_when_the_module_restores_free_page_contents(trusted: int) -> None:
    planner = after_first_round(soft=pfns(2))
    plan = planner.plan_final(pfns(1), final(5, held=pfns(1, 2), flags=trusted | abi.FLAG_HELD_REINIT), 5)
    assert plan.data == EMPTY
    assert plan.skipped == pfns(1, 2)


def test_rule3_only_one_final_round() -> None:
    planner = after_first_round()
    planner.plan_final(EMPTY, None, None)
    with pytest.raises(PlannerError, match="already planned"):
        planner.plan_final(EMPTY, None, None)
    with pytest.raises(PlannerError, match="already planned"):
        planner.plan_precopy(EMPTY, None, None)


# -- rule 4: unusable snapshots are ignored and the reason reported -----------------
@pytest.mark.parametrize(
    ("report", "request_id", "reason"),
    [
        (None, 2, "no snapshot"),
        (snapshot(2, free=pfns(3), state=SnapshotState.EMPTY), 2, "state EMPTY"),
        (snapshot(2, held=pfns(3), state=SnapshotState.FINAL), 2, "state FINAL"),
        (snapshot(1, free=pfns(3)), 2, "answers request 1, expected 2"),
        (snapshot(2, free=pfns(3)), None, "expected None"),
    ],
)
def test_rule4_unusable_precopy_snapshot(
    report: SoftSnapshot | None, request_id: int | None, reason: str
) -> None:
    planner = after_first_round()
    plan = planner.plan_precopy(pfns(3), report, request_id)
    assert plan.data == pfns(3)
    assert not plan.snapshot_used
    assert reason in plan.snapshot_note


@pytest.mark.parametrize(
    ("report", "request_id", "reason"),
    [
        (None, 5, "no final snapshot"),
        (snapshot(5, free=pfns(1)), 5, "state SNAPSHOT, expected FINAL"),
        (final(4, held=pfns(1)), 5, "answers request 4, expected 5"),
    ],
)
def test_rule4_unusable_final_snapshot(report: SoftSnapshot | None, request_id: int, reason: str) -> None:
    planner = after_first_round(soft=pfns(1))
    plan = planner.plan_final(EMPTY, report, request_id)
    assert plan.data == pfns(1)
    assert not plan.snapshot_used
    assert reason in plan.snapshot_note


# -- the sender's report is checked -------------------------------------------------
def test_record_sent_rejects_pfns_outside_the_plan() -> None:
    planner = RoundPlanner(P2M)
    plan = planner.plan_precopy(span(0, 8), None, None)
    with pytest.raises(PlannerError, match="did not contain"):
        planner.record_sent(plan, SentPages(data=span(0, 9), xalloc=EMPTY, holes=EMPTY))


def test_record_sent_rejects_xalloc_for_a_named_pfn() -> None:
    planner = after_first_round()
    plan = RoundPlan(data=EMPTY, xalloc=pfns(4), skipped=EMPTY, snapshot_used=True, snapshot_note="")
    with pytest.raises(PlannerError, match="already in the stream"):
        planner.record_sent(plan, SentPages(data=EMPTY, xalloc=pfns(4), holes=EMPTY))


def test_record_sent_rejects_xalloc_for_a_page_planned_with_data() -> None:
    planner = RoundPlanner(P2M)
    plan = planner.plan_precopy(span(0, 8), None, None)
    with pytest.raises(PlannerError, match="planned with data"):
        planner.record_sent(plan, SentPages(data=span(0, 7), xalloc=pfns(7), holes=EMPTY))


def test_planner_rejects_sets_of_another_universe() -> None:
    planner = RoundPlanner(P2M)
    with pytest.raises(PlannerError, match="universe"):
        planner.plan_precopy(PfnSet.full(P2M + 1), None, None)


def test_a_deferred_page_is_stale_and_goes_out_in_the_final_round_even_if_never_dirtied() -> None:
    """A PV page table the sender could not send in a live round (the guest was rewriting it),
    once sent before (pfn 5) or never (pfn 6): both must go out with data at the end, though
    neither is dirty again."""
    planner = after_first_round()
    plan = planner.plan_precopy(pfns(5), None, None)
    planner.record_sent(plan, SentPages(data=EMPTY, xalloc=EMPTY, holes=EMPTY, deferred=pfns(5)))
    first = RoundPlanner(P2M)
    plan = first.plan_precopy(PfnSet.full(P2M), None, None)
    first.record_sent(plan, SentPages(data=plan.data - pfns(6), xalloc=EMPTY, holes=EMPTY, deferred=pfns(6)))
    for planner_under_test, pfn in ((planner, 5), (first, 6)):
        final = planner_under_test.plan_final(EMPTY, None, None)
        assert pfns(pfn).issubset(final.data), pfn


def test_record_sent_rejects_a_pfn_both_deferred_and_sent() -> None:
    planner = RoundPlanner(P2M)
    plan = planner.plan_precopy(span(0, 8), None, None)
    with pytest.raises(PlannerError, match="deferred PFN was reported sent"):
        planner.record_sent(plan, SentPages(data=span(0, 8), xalloc=EMPTY, holes=EMPTY, deferred=pfns(3)))


def test_a_held_page_last_sent_as_a_page_table_is_sent_again() -> None:
    """PV: a page table sent in round 1 and freed since is held at the end, but the receiver would
    pin its stale copy by the type it last had in the stream: it goes out again. A page sent as a
    table and later as a plain page may be held."""
    planner = RoundPlanner(P2M)
    plan = planner.plan_precopy(PfnSet.full(P2M), None, None)
    planner.record_sent(plan, SentPages(data=plan.data, xalloc=EMPTY, holes=EMPTY, tables=pfns(3, 4)))
    plan = planner.plan_precopy(pfns(4), None, None)
    planner.record_sent(plan, SentPages(data=pfns(4), xalloc=EMPTY, holes=EMPTY))
    final_plan = planner.plan_final(pfns(3, 4, 5), final(9, pfns(3, 4, 5)), 9)
    assert final_plan.data == pfns(3)
    assert final_plan.skipped == pfns(4, 5)


def test_record_sent_rejects_a_page_table_without_data() -> None:
    planner = RoundPlanner(P2M)
    plan = planner.plan_precopy(span(0, 8), None, None)
    with pytest.raises(PlannerError, match="page table without data"):
        planner.record_sent(plan, SentPages(data=span(0, 7), xalloc=EMPTY, holes=EMPTY, tables=pfns(7)))
