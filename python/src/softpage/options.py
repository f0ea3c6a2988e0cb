"""What a softpage migration or save is asked to do: ``DriverOptions``, kept apart from the driver
so that the command line can build them without loading the numeric machinery."""

from __future__ import annotations

from dataclasses import dataclass, field

from softpage.categories import PRUNABLE, CacheMode, Category
from softpage.policy import PrecopyPolicy


@dataclass(frozen=True)
class DriverOptions:
    prune: tuple[Category, ...] = PRUNABLE
    """Categories skipped in precopy rounds; empty means plain precopy (``--no-prune``)."""
    cache: CacheMode = CacheMode.COLD
    """Which page cache the guest reports soft and drops at suspend (``--prune cache=MODE``)."""
    policy: PrecopyPolicy = field(default_factory=PrecopyPolicy)
    snapshot_timeout: float = 5.0
    """Seconds to wait for each precopy snapshot before sending that round in full."""
    final_snapshot_timeout: float = 2.0
    """Seconds to wait for the FINAL report once the domain is suspended."""
    drop_timeout: float = 30.0
    """Seconds to wait for the guest's early drop of its caches, asked for right before the
    suspend request so that the drop is not downtime; 0: no early drop (the guest drops at suspend)."""
    snapshot_min_candidates: int = 1024
    """A live round over fewer dirty pages goes out without asking the guest for a report: the
    report costs the guest a scan of its memory map and the sender that wait (0.4-0.7 s for 1 GiB
    under TCG, `make bench` 2026-12-01), about what sending 1024 pages in full costs (418 took
    0.38 s), and the dirty pages of a late round are rarely soft (7 of 425). 0: always ask."""
    live: bool = True
    """False: suspend first and send everything once (``xl save`` without live)."""
