"""What a softpage migration or save is asked to do: ``DriverOptions``, kept apart from the driver
so that the command line can build them without loading the numeric machinery."""

from __future__ import annotations

from dataclasses import dataclass, field

from softpage.categories import PRUNABLE, CacheMode, Category
from softpage.policy import PrecopyPolicy

KIB_PER_GIB = 1 << 20


@dataclass(frozen=True)
class DriverOptions:
    prune: tuple[Category, ...] = PRUNABLE
    """Categories skipped in precopy rounds; empty means plain precopy (``--no-prune``)."""
    cache: CacheMode = CacheMode.COLD
    """Which page cache the guest reports soft and drops at suspend (``--prune cache=MODE``)."""
    policy: PrecopyPolicy = field(default_factory=PrecopyPolicy)
    snapshot_timeout: float = 10.0
    """Seconds per GiB of the guest's memory (at least one GiB counted) to wait for each precopy
    report before sending that round in full (``report_timeout``). A report is a scan of the
    guest's whole memory map, so its time grows with the guest: a 2 GiB guest with its memory
    full of page cache, under TCG beside a busy neighbour, did not answer its first request
    within a flat 5 s, and the 2 GiB it could have pruned went out in full (22 minutes on a
    16 Mbit/s link; results/link-bench-20261206-125045). Later reports of that guest took 0.2 s."""
    final_snapshot_timeout: float = 2.0
    """Seconds to wait for the FINAL report once the domain is suspended."""
    drop_timeout: float = 30.0
    """Seconds per GiB of the guest's memory (at least one GiB counted) to wait for the guest's
    early drop of its caches, asked for right before the suspend request so that the drop is not
    downtime (``drop_wait``); 0: no early drop (the guest drops at suspend). The drop frees every
    page of clean cache, so its time grows with the guest: a 2 GiB guest's drops of 1.9 GiB of
    cache took 20.8-27.7 s on the two-host testbed, against a flat 30 s then
    (results/link-bench-20261206-125045)."""
    snapshot_min_candidates: int = 1024
    """A live round over fewer dirty pages goes out without asking the guest for a report: the
    report costs the guest a scan of its memory map and the sender that wait (0.4-0.7 s for 1 GiB
    under TCG, `make bench` 2026-12-01), about what sending 1024 pages in full costs (418 took
    0.38 s), and the dirty pages of a late round are rarely soft (7 of 425). 0: always ask."""
    early_drop_min_cache_pages: int = 256
    """``cache=cold``: the early drop is asked for only if at least this many PFNs reported as
    cold cache are still stale at the end of precopy. A cold drop evicts only reported cache, so
    with fewer its only effect would be its own time and the after-drop round, while the guest
    writes more pages than that for the final round (376-467 pages on the testbed's 2 GiB guest
    across a 16 Mbit/s link, link-bench-20261207-132218); those few go out in the final round
    instead. 0: always ask. ``cache=all`` always asks."""
    live: bool = True
    """False: suspend first and send everything once (``xl save`` without live)."""

    def report_timeout(self, max_memkb: int) -> float:
        """Seconds to wait for a precopy report from a guest of ``max_memkb`` KiB:
        ``snapshot_timeout`` for each GiB, and for one GiB at least."""
        return self.snapshot_timeout * _gib_at_least_one(max_memkb)

    def drop_wait(self, max_memkb: int) -> float:
        """Seconds to wait for the early drop of a guest of ``max_memkb`` KiB:
        ``drop_timeout`` for each GiB, and for one GiB at least."""
        return self.drop_timeout * _gib_at_least_one(max_memkb)


def _gib_at_least_one(max_memkb: int) -> float:
    return max(1.0, max_memkb / KIB_PER_GIB)
