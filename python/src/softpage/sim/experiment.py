"""Whole migrations on the simulator, and the SonicMigration-shaped sweep.

``migrate`` runs the real driver (``send_domain``: planner, policy, batching)
on a ``SimBackend`` into a ``DirectSink``, times it with a ``LinkModel`` and
checks the destination against the source (the safety invariant). ``sweep``
repeats that for plain precopy and for pruning over a range of user
allocations, as the SonicMigration paper's Figure does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from softpage.abi import PAGE_SIZE
from softpage.driver import MigrationStats, RoundStats, send_domain
from softpage.errors import BackendError
from softpage.options import DriverOptions
from softpage.sim.backend import SimBackend
from softpage.sim.destination import DirectSink
from softpage.sim.guest import PageKind, SimGuest
from softpage.sim.link import LinkModel, SimClock
from softpage.sim.workload import Workload, WorkloadRunner

MIB_PAGES = (1 << 20) // PAGE_SIZE
LEGACY_VGA_HOLE = (0xA0, 0x100)
"""PFNs of the legacy VGA/ROM hole an HVM guest's p2m leaves unpopulated."""

PAPER_TIME_REDUCTION = 0.683
"""SonicMigration: migration time 68.3% shorter at 0 MB user allocation."""
PAPER_PAGE_REDUCTION = 0.839
"""SonicMigration: 83.9% fewer pages sent at 0 MB user allocation."""


@dataclass(frozen=True)
class GuestShape:
    """A guest booted for the experiment: kernel, user memory, and page cache filling the rest."""

    memory_mib: int = 2048
    kernel_mib: int = 36
    min_free_mib: int = 8
    """Free memory the kernel keeps; the page cache fills everything else."""
    pinned_cache_fraction: float = 0.02
    """Clean cache that is mapped (executables, libraries): not droppable at freeze."""

    def __post_init__(self) -> None:
        if self.memory_mib * MIB_PAGES <= LEGACY_VGA_HOLE[1]:
            raise BackendError(f"memory: expected more than 1 MiB, got {self.memory_mib} MiB")
        if not 0 <= self.pinned_cache_fraction <= 1:
            raise BackendError(f"pinned cache fraction: expected 0..1, got {self.pinned_cache_fraction}")


def boot_guest(shape: GuestShape, user_alloc_mib: int, seed: int) -> SimGuest:
    """A guest after boot, ``user_alloc_mib`` of user allocation, and a page cache filling memory."""
    p2m_size = shape.memory_mib * MIB_PAGES
    holes = np.arange(*LEGACY_VGA_HOLE, dtype=np.uint64)
    guest = SimGuest(p2m_size, holes, seed=seed)
    ram_pages = p2m_size - holes.size
    wanted = (shape.kernel_mib + user_alloc_mib + shape.min_free_mib) * MIB_PAGES
    if wanted > ram_pages:
        most = ram_pages // MIB_PAGES - shape.kernel_mib - shape.min_free_mib
        raise BackendError(
            f"user allocation: expected at most {most} MiB for a {shape.memory_mib} MiB guest, "
            f"got {user_alloc_mib} MiB"
        )
    # The kernel occupies low memory, as after a real boot.
    free = guest.pfns_of(PageKind.FREE)[: shape.kernel_mib * MIB_PAGES]
    guest.kind[free.astype(np.intp)] = PageKind.KERNEL
    guest.write(free)
    guest.allocate_anon(user_alloc_mib * MIB_PAGES)
    guest.fill_cache(guest.count(PageKind.FREE) - shape.min_free_mib * MIB_PAGES)
    guest.pin_cache(int(guest.count(PageKind.CACHE) * shape.pinned_cache_fraction))
    return guest


@dataclass(frozen=True)
class RoundTiming:
    round: int
    kind: str
    pages_data: int
    pages_xalloc: int
    seconds: float


@dataclass(frozen=True)
class MigrationOutcome:
    pruned: bool
    pages_data: int
    pages_xalloc: int
    wire_bytes: int
    migration_s: float
    downtime_s: float
    rounds: tuple[RoundTiming, ...]
    warnings: tuple[str, ...]
    mismatched_pages: int
    """RAM PFNs not held whose destination content differs from the source at suspend."""
    unpopulated_ram: int
    populated_holes: int

    @property
    def correct(self) -> bool:
        return self.mismatched_pages == 0 and self.unpopulated_ram == 0 and self.populated_holes == 0


def migrate(
    guest: SimGuest,
    prune: bool,
    link: LinkModel,
    workload: Workload,
    log: Callable[[str], None] | None = None,
) -> MigrationOutcome:
    """One live migration of ``guest`` through the real driver; the guest keeps working meanwhile."""
    runner = WorkloadRunner(guest, workload)
    clock = SimClock(link, runner.run_for)
    sink = DirectSink(on_transfer=clock.transfer)
    backend = SimBackend(guest)
    guest.module_loaded = True
    options = DriverOptions() if prune else DriverOptions(prune=())
    timings: list[RoundTiming] = []
    round_started = [link.setup_s]
    clock.advance(link.setup_s)

    def on_round(round_stats: RoundStats) -> None:
        overhead = link.round_overhead_ms / 1e3
        if round_stats.guest_scan_ms is not None:
            overhead += round_stats.guest_scan_ms / 1e3
        clock.advance(overhead, guest_runs=round_stats.kind != "final")
        timings.append(RoundTiming(round_stats.round, round_stats.kind, round_stats.pages_data,
                                   round_stats.pages_xalloc, clock.now - round_started[0]))
        round_started[0] = clock.now

    messages: list[str] = []
    try:
        stats: MigrationStats = send_domain(backend, sink, options, log or messages.append, on_round)
    finally:
        backend.cleanup()
    final_round = timings[-1]
    downtime = final_round.seconds + link.suspend_resume_ms / 1e3
    mismatched, unpopulated, populated_holes = _check_destination(backend, sink)
    return MigrationOutcome(
        pruned=prune,
        pages_data=stats.pages_data,
        pages_xalloc=stats.pages_xalloc,
        wire_bytes=sink.counters.bytes,
        migration_s=clock.now + link.suspend_resume_ms / 1e3,
        downtime_s=downtime,
        rounds=tuple(timings),
        warnings=tuple(stats.warnings),
        mismatched_pages=mismatched,
        unpopulated_ram=unpopulated,
        populated_holes=populated_holes,
    )


def _check_destination(backend: SimBackend, sink: DirectSink) -> tuple[int, int, int]:
    destination = sink.destination
    source = backend.suspended_tokens
    if destination is None or source is None or backend.suspended_held is None:
        raise BackendError("the migration did not reach stop-and-copy")
    ram = backend.guest.ram
    held = np.zeros(ram.size, dtype=bool)
    held[backend.suspended_held.to_pfns().astype(np.intp)] = True
    must_match = ram & ~held
    mismatched = int(np.count_nonzero(must_match & (destination.tokens != source)))
    unpopulated = int(np.count_nonzero(ram & ~destination.populated))
    populated_holes = int(np.count_nonzero(~ram & destination.populated))
    return mismatched + destination.misplaced_pages, unpopulated, populated_holes


@dataclass(frozen=True)
class SweepPoint:
    user_alloc_mib: int
    precopy: MigrationOutcome
    pruned: MigrationOutcome

    @property
    def page_reduction(self) -> float:
        return 1 - self.pruned.pages_data / self.precopy.pages_data

    @property
    def time_reduction(self) -> float:
        return 1 - self.pruned.migration_s / self.precopy.migration_s


def sweep(
    shape: GuestShape,
    user_allocs_mib: Sequence[int],
    link: LinkModel,
    workload: Workload,
    seed: int = 1,
    on_point: Callable[[SweepPoint], None] | None = None,
) -> list[SweepPoint]:
    """Plain precopy and pruning on identically booted guests, for each user allocation."""
    points = []
    for user_alloc in user_allocs_mib:
        outcomes = [
            migrate(boot_guest(shape, user_alloc, seed), prune, link, workload) for prune in (False, True)
        ]
        point = SweepPoint(user_alloc, outcomes[0], outcomes[1])
        points.append(point)
        if on_point is not None:
            on_point(point)
    return points
