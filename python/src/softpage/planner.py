"""The round planner: which PFNs go out with data, which as XALLOC, which not at all.

A pure component over ``PfnSet`` bitmaps. It keeps, for the domain being
migrated, the PFNs already named in the stream (``named``), the PFNs the
sender found to be holes (``holes``: XTAB or BROKEN, never named) and the PFNs
whose copy on the destination may differ from the source (``stale``).

Its rules (docs/design.md, "The safety invariant"):

1. Every RAM PFN appears in the stream at least once, with data or as XALLOC:
   the first round plans every PFN, the sender names each one or reports it as
   a hole, and ``unaccounted()`` (neither) must be empty before the END record.
2. A PFN dirtied after its last send is sent again unless it is soft in a
   snapshot taken after that dirtying was harvested (the driver requests each
   snapshot after the harvest of its round and passes the request id it used;
   any other snapshot is ignored for the round).
3. Stop-and-copy: every PFN that is stale or dirty in the final harvest goes out
   with data, unless it is in the guest's final *held* set and its latest entry in
   the stream is not a page table (``tables``: a PV receiver pins page tables by
   the type they last had in the stream, and a stale one fails or, worse, pins).
   The held set is the guest's free pages at its last instant before the suspend, so a
   page reported soft that is still in use then (cache used again, mapped or dirtied,
   which ``prune-cache = cold`` leaves in place, or cache the drop did not free for any
   other reason) is not held and goes out with data here.
   A held page is not sent, so on the destination it holds whatever the stream
   last left there; the held set is honoured only if that cannot matter to the
   guest (``SoftSnapshot.held_contents_kept``): its allocator trusts nothing
   about a free page, or its module rewrites held pages at resume to what the
   allocator trusts (zero with ``init_on_free``, the poison pattern).
4. A snapshot that is missing, malformed, stale or in the wrong state is ignored
   (plain precopy for that round) and the reason is reported.

XALLOC is used only for a PFN's first appearance: the stock receiver ignores an
XALLOC for a PFN it already populated (measured on Xen 4.17.7,
shared/research/xalloc-experiment), so later soft PFNs are simply not named and
stay in ``stale`` until they are sent or held.
"""

from __future__ import annotations

from dataclasses import dataclass

from softpage import abi
from softpage.categories import PRUNABLE, Category
from softpage.errors import PlannerError
from softpage.pfnset import PfnSet
from softpage.snapshot import SnapshotState, SoftSnapshot


@dataclass(frozen=True)
class RoundPlan:
    """What one round should send. ``data`` and ``xalloc`` are disjoint.

    The sender may still find that a planned PFN is a hole (XTAB/BROKEN) or,
    for PV, a page table that must keep its data; it reports what it really did
    through ``RoundPlanner.record_sent``.
    """

    data: PfnSet
    xalloc: PfnSet
    skipped: PfnSet
    """Dirty or stale PFNs left out because they are soft (precopy) or held (final)."""
    snapshot_used: bool
    snapshot_note: str
    """Why the snapshot was or was not used, for the log and the stats."""


@dataclass(frozen=True)
class SentPages:
    """What the sender actually put in the stream for a plan."""

    data: PfnSet
    xalloc: PfnSet
    holes: PfnSet
    """Planned PFNs that turned out not to be RAM (XTAB/BROKEN) and were not named."""
    deferred: PfnSet | None = None
    """Planned PFNs the sender could not send in this round (a PV page table the guest was
    rewriting, as libxenguest's ``deferred_pages``): not named now, sent by a later round and
    at the latest by the final one."""
    tables: PfnSet | None = None
    """The part of ``data`` sent as page tables (L1-L4 types: PV guests only)."""


class RoundPlanner:
    """Plans precopy rounds and the stop-and-copy round for one domain."""

    def __init__(self, p2m_size: int, prune: tuple[Category, ...] = PRUNABLE, honour_held: bool = True):
        for category in prune:
            if category not in PRUNABLE:
                raise PlannerError(f"cannot prune category {category.name} in precopy rounds")
        self.p2m_size = p2m_size
        self.prune = tuple(prune)
        self.honour_held = honour_held
        self.named = PfnSet.empty(p2m_size)
        self.holes = PfnSet.empty(p2m_size)
        self.stale = PfnSet.empty(p2m_size)
        self.tables = PfnSet.empty(p2m_size)
        """Named PFNs whose latest entry in the stream is a page table."""
        self.rounds_planned = 0
        self.final_planned = False

    # -- planning ---------------------------------------------------------
    def plan_precopy(
        self, candidates: PfnSet, snapshot: SoftSnapshot | None, expected_request_id: int | None
    ) -> RoundPlan:
        """Plan a live round over ``candidates`` (every PFN in the first round,
        the harvested dirty set after that)."""
        self._check_open()
        self._check_universe(candidates)
        soft, used, note = self._precopy_soft(snapshot, expected_request_id)
        plan = self._plan(candidates, soft, used, note)
        self.rounds_planned += 1
        return plan

    def plan_final(
        self, final_dirty: PfnSet, snapshot: SoftSnapshot | None, expected_request_id: int | None
    ) -> RoundPlan:
        """Plan the stop-and-copy round, with the domain suspended."""
        self._check_open()
        self._check_universe(final_dirty)
        held, used, note = self._final_held(snapshot, expected_request_id)
        held = held - self.tables
        # unaccounted() is empty after a first round over every PFN; naming it
        # here keeps rule 1 even for a driver that planned a partial first round.
        candidates = final_dirty | self.stale | self.unaccounted()
        plan = self._plan(candidates, held, used, note)
        self.final_planned = True
        return plan

    # -- bookkeeping ------------------------------------------------------
    def record_sent(self, plan: RoundPlan, sent: SentPages) -> None:
        """Account for what the sender really wrote for ``plan``."""
        deferred = sent.deferred if sent.deferred is not None else PfnSet.empty(self.p2m_size)
        tables = sent.tables if sent.tables is not None else PfnSet.empty(self.p2m_size)
        for pfns in (sent.data, sent.xalloc, sent.holes, deferred, tables):
            self._check_universe(pfns)
        if not tables.issubset(sent.data):
            raise PlannerError("a PFN was reported sent as a page table without data")
        if not sent.data.isdisjoint(sent.xalloc):
            raise PlannerError("a PFN was reported sent both with data and as XALLOC")
        if not deferred.isdisjoint(sent.data | sent.xalloc | sent.holes):
            raise PlannerError("a deferred PFN was reported sent as well")
        planned = plan.data | plan.xalloc
        if not (sent.data | sent.xalloc | sent.holes | deferred).issubset(planned):
            raise PlannerError("the sender reports PFNs the plan did not contain")
        if not sent.xalloc.issubset(plan.xalloc):
            raise PlannerError("the sender used XALLOC for a PFN planned with data")
        if not sent.xalloc.isdisjoint(self.named):
            raise PlannerError("XALLOC for a PFN already in the stream")
        self.named |= sent.data
        self.named |= sent.xalloc
        self.holes |= sent.holes
        self.holes -= self.named
        self.stale -= sent.data
        self.stale -= sent.holes
        # An XALLOC PFN arrives as a fresh page on the destination: it differs
        # from the source until it is sent with data or held at the end.
        self.stale |= sent.xalloc
        self.stale |= plan.skipped & self.named
        # Its copy on the destination is older than the source's, or missing.
        self.stale |= deferred
        self.tables -= sent.data | sent.xalloc
        self.tables |= tables

    def unaccounted(self) -> PfnSet:
        """PFNs neither named in the stream nor seen as holes (must be empty before END)."""
        return PfnSet.full(self.p2m_size) - self.named - self.holes

    def unsent_stale(self, held: PfnSet) -> PfnSet:
        """Stale PFNs not covered by ``held``: empty after a correct final round."""
        return self.stale - held

    # -- internals --------------------------------------------------------
    def _plan(self, candidates: PfnSet, soft: PfnSet, used: bool, note: str) -> RoundPlan:
        first_time_soft = (candidates & soft) - self.named
        skipped = (candidates & soft) & self.named
        return RoundPlan(
            data=candidates - soft,
            xalloc=first_time_soft,
            skipped=skipped,
            snapshot_used=used,
            snapshot_note=note,
        )

    def _precopy_soft(
        self, snapshot: SoftSnapshot | None, expected_request_id: int | None
    ) -> tuple[PfnSet, bool, str]:
        if not self.prune:
            return PfnSet.empty(self.p2m_size), False, "pruning off"
        refusal = _refusal(snapshot, SnapshotState.SNAPSHOT, expected_request_id, "snapshot")
        if refusal is not None or snapshot is None:
            return PfnSet.empty(self.p2m_size), False, refusal or "no snapshot"
        soft = snapshot.soft(self.prune)
        self._check_universe(soft)
        return soft, True, f"snapshot generation {snapshot.generation}: {soft.count()} soft pages"

    def _final_held(
        self, snapshot: SoftSnapshot | None, expected_request_id: int | None
    ) -> tuple[PfnSet, bool, str]:
        if not self.honour_held:
            return PfnSet.empty(self.p2m_size), False, "pruning off"
        refusal = _refusal(snapshot, SnapshotState.FINAL, expected_request_id, "final snapshot")
        if refusal is not None or snapshot is None:
            return PfnSet.empty(self.p2m_size), False, refusal or "no final snapshot"
        self._check_universe(snapshot.held)
        if not snapshot.held_contents_kept:
            trusted = ", ".join(abi.flag_names(snapshot.flags & abi.FREE_CONTENTS_FLAGS))
            return PfnSet.empty(self.p2m_size), False, (
                f"the guest trusts what its free pages hold ({trusted}) and its module does not "
                "restore that on held pages at resume: sending every stale page"
            )
        note = f"final generation {snapshot.generation}: {snapshot.held.count()} held pages"
        return snapshot.held, True, note

    def _check_open(self) -> None:
        if self.final_planned:
            raise PlannerError("the final round was already planned")

    def _check_universe(self, pfns: PfnSet) -> None:
        if pfns.nr_pfns != self.p2m_size:
            raise PlannerError(f"PfnSet universe {pfns.nr_pfns}, expected {self.p2m_size}")


def _refusal(
    snapshot: SoftSnapshot | None, state: SnapshotState, expected_request_id: int | None, what: str
) -> str | None:
    """Why ``snapshot`` may not be used for a round that needs ``state`` and the
    given request id (rule 4), or None if it may."""
    if snapshot is None:
        return f"no {what}"
    if snapshot.state is not state:
        return f"{what} state {snapshot.state.name}, expected {state.name}"
    if expected_request_id is None or snapshot.request_id != expected_request_id:
        return f"{what} answers request {snapshot.request_id}, expected {expected_request_id}"
    return None
