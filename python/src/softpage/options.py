"""What a softpage migration or save is asked to do: ``DriverOptions``, kept apart from the driver
so that the command line can build them without loading the numeric machinery."""

from __future__ import annotations

from dataclasses import dataclass, field

from softpage.categories import PRUNABLE, Category
from softpage.policy import PrecopyPolicy


@dataclass(frozen=True)
class DriverOptions:
    prune: tuple[Category, ...] = PRUNABLE
    """Categories skipped in precopy rounds; empty means plain precopy (``--no-prune``)."""
    policy: PrecopyPolicy = field(default_factory=PrecopyPolicy)
    snapshot_timeout: float = 5.0
    """Seconds to wait for each precopy snapshot before sending that round in full."""
    final_snapshot_timeout: float = 2.0
    """Seconds to wait for the FINAL report once the domain is suspended."""
    drop_timeout: float = 30.0
    """Seconds to wait for the guest's early drop of its caches, asked for right before the
    suspend request so that the drop is not downtime; 0: no early drop (the guest drops at suspend)."""
    live: bool = True
    """False: suspend first and send everything once (``xl save`` without live)."""
