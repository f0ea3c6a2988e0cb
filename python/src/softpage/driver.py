"""The migration driver: precopy rounds with soft-page pruning, then stop-and-copy.

It reads top to bottom in stream order, like ``save()`` in
tools/libs/guest/xg_sr_save.c, and talks only to the protocols of
``softpage.backend`` and to a ``PageSink`` (the stream writer, or a test
double). It never imports the Xen backend.

Ownership of the domain's fate: ``send_domain`` returns with the domain
suspended and the stream complete. If anything fails before that, it resumes
the domain on the source, disarms the guest and raises ``MigrationError``. The
caller decides afterwards (destroy after the receiver took over, or
``backend.resume()`` if the handshake fails) and calls ``backend.cleanup()``
exactly once.
"""

from __future__ import annotations

import itertools
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from softpage import bitmap
from softpage.backend import (
    DomainInfo,
    DropOutcome,
    EndOfCheckpoint,
    MigrationBackend,
    PageBatch,
    SoftPageChannel,
    StaticInfo,
)
from softpage.categories import CacheMode
from softpage.errors import BitmapError, MigrationError, SoftpageError
from softpage.interrupts import held_signals
from softpage.options import DriverOptions
from softpage.pfnset import PfnArray, PfnSet
from softpage.planner import RoundPlan, RoundPlanner, SentPages
from softpage.policy import Decision, PrecopyPolicy, PrecopyStats
from softpage.snapshot import SoftSnapshot
from softpage.stream.records import PFINFO_SHIFT, PageType, pagetable_levels

FEW_CANDIDATES_NOTE = "few dirty pages: no report asked"
QUIET_NOTES = ("pruning off", "no snapshot", FEW_CANDIDATES_NOTE)
"""Why a round used no soft pages, when that is by design and not worth a log line."""

READ_BATCH_PFNS = 4096
"""PFNs typed, mapped and written per step of a round: 16 MiB mapped at a time. The sink splits
them into PAGE_DATA records of at most 1024 (``stream.records.MAX_BATCH_SIZE``), as the stock
receiver wants; reading four records' worth at once costs a quarter of the per-batch Python
work, which in an emulated dom0 was seconds per GiB."""


class PageSink(Protocol):
    """Where the stream goes: ``softpage.stream`` implements it."""

    def begin(self, domain: DomainInfo, static: StaticInfo) -> None:
        """Write everything up to and including STATIC_DATA_END."""
        ...

    def write_pages(self, pfns: PfnArray, types: npt.NDArray[np.uint32], data: memoryview) -> int:
        """Write the entries as PAGE_DATA records of at most 1024 entries each
        (up to ``READ_BATCH_PFNS`` come at once); ``data`` holds the pages of the
        entries whose type carries data, in order. Returns the bytes written."""
        ...

    def drain(self) -> None:
        """Return once everything written so far has reached the receiver: ``write_pages`` may
        return earlier (softpage.stream.background)."""
        ...

    def end(self, end_of_checkpoint: EndOfCheckpoint) -> None:
        """Write the post-memory records and the END records, and drain."""
        ...


@dataclass
class RoundStats:
    """One JSON record of ``--stats``."""

    round: int
    kind: str
    """"live" (the precopy policy's rounds), "after-drop" (the pages the guest's early cache drop
    wrote, sent while it still runs) or "final"."""
    candidates: int
    dirty: int | None = None
    """Pages in the dirty log this round was planned from; None for a round that plans every
    PFN (the first, or a final round without a log)."""
    pages_data: int = 0
    pages_xalloc: int = 0
    pages_skipped: int = 0
    holes: int = 0
    pages_deferred: int = 0
    """PV page tables the guest was rewriting: sent by a later round."""
    bytes: int = 0
    duration_s: float = 0.0
    snapshot_used: bool = False
    snapshot_note: str = ""
    guest_scan_ms: float | None = None
    report_s: float | None = None
    """Before ``duration_s``: asking the guest for its soft-page report and waiting for it (its
    scan, xenstore, the decoding); None when no report was asked for."""
    types_s: float = 0.0
    """Of ``duration_s``: asking Xen for the page types, holes included."""
    read_s: float = 0.0
    """Of ``duration_s``: mapping and copying the pages with data."""
    write_s: float = 0.0
    """Of ``duration_s``: handing the pages to the stream, waiting for room whenever the receiver
    is ``max_queued_bytes`` behind (softpage.stream.background: it populates, maps and copies
    each record before it reads the next)."""
    drain_s: float = 0.0
    """After ``duration_s``, live rounds only: waiting for the receiver to take what this round
    queued, before the next harvest (``MigrationSession.live_round``)."""


@dataclass
class MigrationStats:
    domid: int
    rounds: list[RoundStats] = field(default_factory=list)
    total_bytes: int = 0
    duration_s: float = 0.0
    suspend_requested_at: float | None = None
    """``time.monotonic()`` when the driver asked the guest to suspend: its user space freezes
    then, whatever it does before it suspends, so downtime starts here."""
    guest_drop_s: float | None = None
    """Seconds spent on the guest's early drop, before the suspend request (not downtime);
    None if it was not asked for (no soft-page channel, or ``drop_timeout`` 0)."""
    guest_drop_outcome: DropOutcome | None = None
    """The guest's answer to the early drop; None if it was not asked for."""
    cold_cache_left: int | None = None
    """``cache=cold``: PFNs reported as cold cache and still stale at the end of precopy, which
    decided the early drop (``DriverOptions.early_drop_min_cache_pages``); None in other modes."""
    first_drop_s: float | None = None
    """Seconds spent before round 1 on the guest's report and its drop of the cold cache it
    reported (``MigrationSession.drop_cold_cache_first``); None if that was not asked for."""
    first_drop_outcome: DropOutcome | None = None
    """The guest's answer to that first drop; None if it was not asked for (no report, no cold
    cache in it, not ``cache=cold``, not live, ``drop_timeout`` 0, a module without drops)."""
    cache_mode: CacheMode | None = None
    """The page cache the guest reports soft and drops: what was asked for, or ``ALL`` when its
    module predates ``prune-cache``; None without a soft-page channel."""
    sender_cpu_s: float = 0.0
    drain_s: float = 0.0
    """Seconds waited just before the suspend request for the receiver to take what was still
    queued; each live round drains its own data first (``RoundStats.drain_s``: their
    ``write_s`` counts only the waits for room in the queue)."""
    downtime_steps: dict[str, float] = field(default_factory=dict)
    """Seconds from the suspend request to the end of each step of the downtime, in order:
    ``suspended``, ``final_harvest``, ``final_report``, ``final_round``, ``stream_end`` here,
    then the sender's handshake steps (``receiver_ready``, ``renamed``, ``destination_running``)."""
    warnings: list[str] = field(default_factory=list)

    def mark_downtime(self, step: str) -> None:
        """Record that ``step`` of the downtime ends now (nothing before the suspend request)."""
        if self.suspend_requested_at is not None:
            self.downtime_steps[step] = round(time.monotonic() - self.suspend_requested_at, 3)

    @property
    def pages_data(self) -> int:
        return sum(r.pages_data for r in self.rounds)

    @property
    def pages_xalloc(self) -> int:
        return sum(r.pages_xalloc for r in self.rounds)

    @property
    def pages_skipped(self) -> int:
        return sum(r.pages_skipped for r in self.rounds)


Log = Callable[[str], None]
Progress = Callable[[RoundStats], None]


def send_domain(
    backend: MigrationBackend,
    sink: PageSink,
    options: DriverOptions,
    log: Log,
    progress: Progress | None = None,
) -> MigrationStats:
    """Write the whole stream for the backend's domain; see the module docstring."""
    try:
        session = MigrationSession(backend, sink, options, log, progress)
    except (SoftpageError, OSError) as error:
        raise MigrationError(f"cannot migrate: {error}") from error
    try:
        session.start()
        if options.live:
            session.drop_cold_cache_first()
            _precopy(session, options.policy)
        session.stop_and_copy()
    except BaseException as error:
        # A second interrupt must not cut the resume short.
        with held_signals():
            session.abandon()
        if isinstance(error, (SoftpageError, OSError)) and not isinstance(error, MigrationError):
            raise MigrationError(f"migration of domain {session.domain.domid} failed: {error}") from error
        raise
    return session.finish()


def _precopy(session: MigrationSession, policy: PrecopyPolicy) -> None:
    """Live rounds, with the stop decision made at the same points as libxenguest's."""
    total_written = 0
    iteration = 0
    candidates = None
    while True:
        round_stats = session.live_round(candidates)
        iteration += 1
        total_written += round_stats.pages_data + round_stats.pages_xalloc
        if policy.decide(PrecopyStats(iteration, total_written, -1)) is Decision.STOP_AND_COPY:
            return
        candidates = session.harvest()
        stats = PrecopyStats(iteration, total_written, candidates.count())
        if policy.decide(stats) is Decision.STOP_AND_COPY:
            # As libxenguest: the pages already harvested go out live, then suspend.
            session.live_round(candidates)
            return


class MigrationSession:
    """One migration, step by step: ``start``, ``live_round``*, ``stop_and_copy``.

    ``send_domain`` drives it with a precopy policy; tests drive it directly to
    interleave guest activity with the rounds. After any failure the caller
    must call ``abandon()``.
    """

    def __init__(
        self,
        backend: MigrationBackend,
        sink: PageSink,
        options: DriverOptions,
        log: Log,
        progress: Progress | None = None,
    ) -> None:
        self.backend = backend
        self.sink = sink
        self.options = options
        self.log = log
        self.progress = progress
        self.domain = backend.describe()
        self.stats = MigrationStats(domid=self.domain.domid)
        self.channel: SoftPageChannel | None = None
        self.suspended = False
        self._requests = _RequestIds()
        self._first_report: tuple[SoftSnapshot, int, float] | None = None
        """The report ``drop_cold_cache_first`` asked for, with its request id and wait, when no
        drop followed it: round 1's report then (requested after log-dirty was on, rule 2)."""
        self._reported_cache = PfnSet.empty(self.domain.p2m_size)
        """Every PFN a report used for a live round called cache (what a cold drop may evict)."""
        self._started = time.monotonic()
        self._cpu_started = _cpu_seconds()
        self.planner = RoundPlanner(self.domain.p2m_size, options.prune, honour_held=False)

    def start(self) -> None:
        """Stream headers and static data, log-dirty on, the guest armed."""
        if self.options.prune:
            self.channel = self.backend.soft_channel()
            if self.channel is None:
                self._warn(f"domain {self.domain.domid} publishes no soft pages (module not loaded): "
                           "plain precopy")
        self.planner.honour_held = self.channel is not None
        self.sink.begin(self.domain, self.backend.static_info())
        # Log-dirty before the first snapshot request: a soft page written
        # after the guest reported it must show in the next harvest. A save
        # that is not live reads everything once, suspended, and needs none
        # (as xc_domain_save; a PV guest has no log-dirty without shadow paging).
        if self.options.live:
            self.backend.enable_logdirty()
        if self.channel is not None:
            self.stats.cache_mode = self._choose_cache(self.channel)
            self.channel.arm(True)

    def drop_cold_cache_first(self) -> None:
        """With ``cache=cold``, before round 1: the guest reports, then drops the cold cache it
        reported (a drop evicts only reported cache). Freeing a page writes its struct page (64
        bytes of the kernel's memmap for each 4 KiB page): dropped at the end of precopy, as the
        early drop does, those memmap pages go out in round 1 and again in the after-drop round
        (at 2 GiB with 1.8 GiB of cold cache, 7,970 of 42,675 pages); dropped first, once.
        Cold cache is what the guest is not using, so losing it minutes earlier costs it nothing;
        the early drop still takes what went cold meanwhile (docs/design.md, "The first drop").

        The dirty log is harvested and discarded after the drop: round 1 reads every page after
        that harvest, so each write before it is in round 1's data and each write after it in the
        next harvest; round 1's own report is asked for after it (planner rule 2). When the guest
        did not drop (no cold cache, no answer, a module without drops), nothing was discarded
        and round 1 uses this report instead of asking for another."""
        channel = self.channel
        if channel is None or self.stats.cache_mode is not CacheMode.COLD:
            return
        timeout = self.options.drop_wait(self.domain.max_memkb)
        if timeout <= 0:
            return
        started = time.monotonic()
        request_id = self._requests.next()
        channel.request(request_id)
        raw = channel.read(request_id, self.options.report_timeout(self.domain.max_memkb))
        try:
            report = None if raw is None else bitmap.decode(raw, self.domain.p2m_size)
        except BitmapError:
            report = None  # round 1 asks again and says what was wrong
        if report is None:
            self.log(f"domain {self.domain.domid}: no usable soft-page report before round 1: "
                     "no cold cache dropped first")
            return
        self._first_report = (report, request_id, time.monotonic() - started)
        if not report.cache.count():
            return
        outcome = channel.drop_caches(self._requests.next(), timeout)
        self.stats.first_drop_s = time.monotonic() - started
        self.stats.first_drop_outcome = outcome
        if outcome is DropOutcome.DONE:
            self._first_report = None
            self.harvest()
        elif outcome is DropOutcome.TIMED_OUT:
            # It may still drop while round 1 runs: the log catches those writes.
            self._warn(f"domain {self.domain.domid}: no answer to the first cold-cache drop "
                       f"within {timeout:g} s: round 1 goes ahead")

    def harvest(self) -> PfnSet:
        return self.backend.harvest_dirty(final=False)

    def live_round(self, candidates: PfnSet | None = None, kind: str = "live") -> RoundStats:
        """Send ``candidates`` (default: every PFN, the first round) while the guest runs.

        The soft snapshot is requested after ``candidates`` was harvested, so
        it may prune them (planner rule 2).
        """
        first = candidates is None
        if candidates is None:
            candidates = PfnSet.full(self.domain.p2m_size)
        count = candidates.count()
        dirty = None if first else count
        few = self.channel is not None and count < self.options.snapshot_min_candidates
        first_report, self._first_report = self._first_report, None
        snapshot: SoftSnapshot | None
        request_id: int | None
        report_s: float | None
        if first and first_report is not None and not few:
            snapshot, request_id, report_s = first_report
        else:
            asked = time.monotonic()
            snapshot, request_id = (None, None) if few else self._precopy_snapshot()
            report_s = None if request_id is None else time.monotonic() - asked
        plan = self.planner.plan_precopy(candidates, snapshot, request_id)
        if plan.snapshot_used and snapshot is not None:
            self._reported_cache |= snapshot.cache
        scan_ms = _scan_ms(snapshot)
        # The report's bitmaps are in the plan now: not held through the round as well.
        del snapshot, candidates
        round_stats = _send_round(
            self.backend, self.sink, self.planner, plan, len(self.stats.rounds) + 1, kind, scan_ms
        )
        round_stats.dirty = dirty
        round_stats.report_s = report_s
        if few:
            round_stats.snapshot_note = FEW_CANDIDATES_NOTE
        # The next harvest finds what the guest wrote while this round went over the link, as
        # libxenguest's blocking writes make it; harvested while the queue still held up to 64 MiB,
        # the rounds after the first took 0.1-0.7 s each with 40 s of backlog behind them (16 Mbit/s,
        # link-bench-20261207-080347). The final round did not shrink with the drains (682 pages
        # against 737-760, link-bench-20261207-102719): most of its excess over stock's was the
        # guest module's final walk (scan-probe-20261207-131639), whatever the rounds before did.
        round_stats.drain_s = self._drain()
        self._finish_round(round_stats)
        return round_stats

    def stop_and_copy(self) -> RoundStats:
        """Suspend, send what may be stale (less what the guest holds), end the stream."""
        dropped = (self.channel is not None and self._early_drop_pays()
                   and self._early_drop(self.channel, self._requests.next()))
        if dropped and self.options.live:
            # Freeing the cache writes the kernel's own pages (struct pages, free
            # lists, slab): send them now, while the guest runs, not in the downtime.
            self.live_round(self.harvest(), kind="after-drop")
        # Each live round drained its own data; what is left (the stream's headers when no
        # round ran live) goes to the receiver while the guest still runs, not in the downtime.
        self.stats.drain_s = self._drain()
        # Taken last: Rf must be greater than every request id used before it,
        # the after-drop round's included (docs/spec/guest-protocol.md).
        final_request = self._requests.next()
        if self.channel is not None:
            self.channel.request_final(final_request)
        # Set before the call: a guest that acknowledges after our timeout
        # may still suspend, and abandon() must then resume it.
        self.suspended = True
        self.stats.suspend_requested_at = time.monotonic()
        self.backend.suspend()
        self.stats.mark_downtime("suspended")
        final_dirty = self.backend.harvest_dirty(final=True) if self.options.live else None
        dirty = None if final_dirty is None else final_dirty.count()
        if final_dirty is None or not self.planner.rounds_planned:
            final_dirty, dirty = PfnSet.full(self.domain.p2m_size), None
        self.stats.mark_downtime("final_harvest")
        final_snapshot = self._read_snapshot(final_request, self.options.final_snapshot_timeout)
        self.stats.mark_downtime("final_report")
        plan = self.planner.plan_final(final_dirty, final_snapshot, final_request)
        scan_ms = _scan_ms(final_snapshot)
        del final_snapshot, final_dirty
        round_stats = _send_round(
            self.backend, self.sink, self.planner, plan, len(self.stats.rounds) + 1, "final", scan_ms
        )
        round_stats.dirty = dirty
        self._finish_round(round_stats)
        self.stats.mark_downtime("final_round")
        if round_stats.pages_deferred:
            raise MigrationError(f"{round_stats.pages_deferred} pages could not be read with the guest "
                                 "suspended; not ending the stream")
        unaccounted = self.planner.unaccounted()
        if unaccounted:
            raise MigrationError(f"{unaccounted.count()} PFNs were never named in the stream; not ending it")
        self.sink.end(self.backend.end_of_checkpoint())
        self.stats.mark_downtime("stream_end")
        return round_stats

    def finish(self) -> MigrationStats:
        self.stats.total_bytes = sum(r.bytes for r in self.stats.rounds)
        self.stats.duration_s = time.monotonic() - self._started
        self.stats.sender_cpu_s = _cpu_seconds() - self._cpu_started
        return self.stats

    def abandon(self) -> None:
        """Leave the guest running on the source; never raises over the original error.

        ``backend.resume()`` is a no-op for a domain that is running.
        """
        if self.suspended:
            try:
                self.backend.resume()
                self.suspended = False
            except (SoftpageError, OSError) as error:
                self.log(f"error: could not resume domain {self.domain.domid} on the source: {error} "
                         f"(`softpage resume {self.domain.domid}` retries)")
        if self.channel is not None:
            try:
                self.channel.arm(False)
            except (SoftpageError, OSError) as error:
                self.log(f"warning: could not disarm the guest: {error}")

    def _choose_cache(self, channel: SoftPageChannel) -> CacheMode:
        """Tell the guest which page cache to report and drop, before it is armed."""
        wanted = self.options.cache
        if channel.prune_cache(wanted):
            return wanted
        if wanted is not CacheMode.ALL:
            self._warn(f"domain {self.domain.domid}: the guest's softpage module predates "
                       f"prune-cache={wanted.value}: it reports and drops all of its clean page "
                       f"cache (cache={CacheMode.ALL.value})")
        return CacheMode.ALL

    # -- the guest's early drop ------------------------------------------
    def _early_drop_pays(self) -> bool:
        """Whether the early drop can spare the final round more pages than the guest writes
        while it drops and while the after-drop round goes out. ``cache=cold`` evicts only
        reported cache, so it can spare only the reported cold cache still stale; ``cache=all``
        drops the whole cache and always pays. Nothing depends on it for safety: a drop only
        frees pages, and what it leaves in use is sent (planner rule 3)."""
        if self.stats.cache_mode is not CacheMode.COLD:
            return True
        left = (self._reported_cache & self.planner.stale).count()
        self.stats.cold_cache_left = left
        if left >= self.options.early_drop_min_cache_pages:
            return True
        self.log(f"domain {self.domain.domid}: {left} pages of reported cold cache left: no early drop "
                 "(they go out in the final round unless the guest frees them)")
        return False

    def _early_drop(self, channel: SoftPageChannel, drop_id: int) -> bool:
        """Have the guest drop its caches while it still runs, so that its ``.freeze``
        finds little left to drop: this wait comes before the suspend request, outside
        the downtime. True if the guest says it dropped them."""
        timeout = self.options.drop_wait(self.domain.max_memkb)
        if timeout <= 0:
            return False
        started = time.monotonic()
        outcome = channel.drop_caches(drop_id, timeout)
        self.stats.guest_drop_s = time.monotonic() - started
        self.stats.guest_drop_outcome = outcome
        domid = self.domain.domid
        if outcome is DropOutcome.TIMED_OUT:
            self._warn(f"domain {domid}: no answer to the early cache drop within {timeout:g} s: "
                       "the guest drops its caches at suspend instead, in the downtime")
        elif outcome is DropOutcome.UNSUPPORTED:
            self.log(f"domain {domid}: the guest's softpage module predates the early cache drop: "
                     "it drops its caches at suspend, in the downtime")
        return outcome is DropOutcome.DONE

    # -- snapshots --------------------------------------------------------
    def _precopy_snapshot(self) -> tuple[SoftSnapshot | None, int | None]:
        if self.channel is None:
            return None, None
        request_id = self._requests.next()
        self.channel.request(request_id)
        return self._read_snapshot(request_id, self.options.report_timeout(self.domain.max_memkb)), request_id

    def _read_snapshot(self, request_id: int, timeout: float) -> SoftSnapshot | None:
        if self.channel is None:
            return None
        raw = self.channel.read(request_id, timeout)
        if raw is None:
            self._warn(f"domain {self.domain.domid}: no soft-page report for request {request_id} "
                       f"within {timeout:g} s: sending that round in full")
            return None
        try:
            return bitmap.decode(raw, self.domain.p2m_size)
        except BitmapError as error:
            self._warn(f"domain {self.domain.domid}: ignoring a malformed soft-page report: {error}")
            return None

    # -- bookkeeping ------------------------------------------------------
    def _drain(self) -> float:
        """Wait until the receiver has taken everything written so far; the seconds it took."""
        draining = time.monotonic()
        self.sink.drain()
        return time.monotonic() - draining

    def _finish_round(self, round_stats: RoundStats) -> None:
        self.stats.rounds.append(round_stats)
        if not round_stats.snapshot_used and round_stats.snapshot_note not in QUIET_NOTES:
            self.log(f"round {round_stats.round}: soft pages not used: {round_stats.snapshot_note}")
        if self.progress is not None:
            self.progress(round_stats)

    def _warn(self, message: str) -> None:
        self.stats.warnings.append(message)
        self.log(f"warning: {message}")


# -- one round ------------------------------------------------------------------
def _send_round(
    backend: MigrationBackend,
    sink: PageSink,
    planner: RoundPlanner,
    plan: RoundPlan,
    round_number: int,
    kind: str,
    guest_scan_ms: float | None,
) -> RoundStats:
    started = time.monotonic()
    planned = plan.data | plan.xalloc
    round_stats = RoundStats(
        round=round_number,
        kind=kind,
        candidates=planned.count() + plan.skipped.count(),
        pages_skipped=plan.skipped.count(),
        snapshot_used=plan.snapshot_used,
        snapshot_note=plan.snapshot_note,
        guest_scan_ms=guest_scan_ms,
    )
    # What the round did, kept as bitmaps filled batch by batch: a bit a PFN, whatever the
    # round's size (a list of the PFNs would take 8 bytes each).
    # Only PV guests have page tables, and deferred ones are rarer still: those two sets are
    # made when first needed.
    sent_data, sent_xalloc, holes = (PfnSet.empty(planner.p2m_size) for _ in range(3))
    deferred: PfnSet | None = None
    tables: PfnSet | None = None
    for batch in planned.iter_pfns(READ_BATCH_PFNS):
        step_started = time.monotonic()
        types = backend.page_types(batch)
        round_stats.types_s += time.monotonic() - step_started
        stream_types = types >> np.uint32(PFINFO_SHIFT)
        # Holes are left out of the stream altogether: the receiver treats an
        # unnamed PFN exactly like an XTAB one (neither populated nor written).
        is_hole = (stream_types == PageType.XTAB) | (stream_types == PageType.BROKEN)
        # XALLOC only for plain pages: PV page tables keep their type and data.
        use_xalloc = plan.xalloc.contains_many(batch) & (stream_types == PageType.NOTAB)
        with_data = ~is_hole & ~use_xalloc
        if with_data.any():
            step_started = time.monotonic()
            pages = backend.read_pages(batch[with_data], types[with_data])
            round_stats.read_s += time.monotonic() - step_started
            if pages.deferred is not None:
                # Not named now: the planner keeps them stale for a later round.
                later = np.zeros_like(with_data)
                later[with_data] = pages.deferred
                deferred = _add_to(deferred, planner.p2m_size, batch[later])
                with_data &= ~later
        else:
            pages = PageBatch(memoryview(b""))
        named = with_data | use_xalloc
        if named.any():
            entry_types = np.where(use_xalloc, np.uint32(PageType.XALLOC.pfinfo), types).astype(np.uint32)
            step_started = time.monotonic()
            round_stats.bytes += sink.write_pages(batch[named], entry_types[named], pages.data)
            round_stats.write_s += time.monotonic() - step_started
        sent_data.add(batch[with_data])
        is_table = with_data & (pagetable_levels(stream_types) > 0)
        if is_table.any():
            tables = _add_to(tables, planner.p2m_size, batch[is_table])
        sent_xalloc.add(batch[use_xalloc])
        holes.add(batch[is_hole])
    sent = SentPages(data=sent_data, xalloc=sent_xalloc, holes=holes, deferred=deferred, tables=tables)
    planner.record_sent(plan, sent)
    round_stats.pages_data = sent.data.count()
    round_stats.pages_xalloc = sent.xalloc.count()
    round_stats.holes = sent.holes.count()
    round_stats.pages_deferred = sent.deferred.count() if sent.deferred is not None else 0
    round_stats.duration_s = time.monotonic() - started
    return round_stats


def _add_to(pfn_set: PfnSet | None, p2m_size: int, pfns: PfnArray) -> PfnSet:
    """``pfn_set`` (a new one if None) with ``pfns`` added."""
    if pfn_set is None:
        pfn_set = PfnSet.empty(p2m_size)
    pfn_set.add(pfns)
    return pfn_set


def _scan_ms(snapshot: SoftSnapshot | None) -> float | None:
    return snapshot.scan_ns / 1e6 if snapshot is not None else None


# -- request ids ----------------------------------------------------------------
class _RequestIds:
    """Request ids that only grow, unique per driver run (docs/spec/guest-protocol.md)."""

    def __init__(self) -> None:
        # Nanoseconds since the epoch, so a later migration of the same guest
        # never reuses an id an earlier one wrote.
        self._counter = itertools.count(time.time_ns())

    def next(self) -> int:
        return next(self._counter)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
