"""Guest workloads: what the guest does per simulated second while it migrates."""

from __future__ import annotations

from dataclasses import dataclass, field

from softpage.errors import BackendError
from softpage.sim.guest import SimGuest


@dataclass(frozen=True)
class Workload:
    """Page rates; each kind of work runs as whole pages, the remainder carried over."""

    dirty_pages_per_s: float = 0.0
    """Writes to memory in use (user, kernel, dirty cache)."""
    churn_pages_per_s: float = 0.0
    """User pages freed and reallocated (then written)."""
    allocation_pages_per_s: float = 0.0
    """New user allocations (free memory first, then reclaimed cache)."""
    cache_fill_pages_per_s: float = 0.0
    """File reads into free memory."""
    cache_dirty_pages_per_s: float = 0.0
    """Writes to cached files."""

    def __post_init__(self) -> None:
        for name in ("dirty_pages_per_s", "churn_pages_per_s", "allocation_pages_per_s",
                     "cache_fill_pages_per_s", "cache_dirty_pages_per_s"):
            if getattr(self, name) < 0:
                raise BackendError(f"workload {name}: expected >= 0, got {getattr(self, name)}")


@dataclass
class WorkloadRunner:
    """Runs a ``Workload`` on a guest for spans of simulated time."""

    guest: SimGuest
    workload: Workload
    _carry: dict[str, float] = field(default_factory=dict)

    def run_for(self, seconds: float) -> None:
        if not self.guest.running:
            return
        work = self.workload
        self.guest.dirty_in_use(self._pages("dirty", work.dirty_pages_per_s, seconds))
        self.guest.churn(self._pages("churn", work.churn_pages_per_s, seconds))
        self.guest.allocate_anon(self._pages("allocate", work.allocation_pages_per_s, seconds))
        self.guest.fill_cache(self._pages("fill", work.cache_fill_pages_per_s, seconds))
        self.guest.dirty_cache(self._pages("cache-dirty", work.cache_dirty_pages_per_s, seconds))

    def _pages(self, name: str, rate: float, seconds: float) -> int:
        due = self._carry.get(name, 0.0) + rate * seconds
        whole = int(due)
        self._carry[name] = due - whole
        return whole
