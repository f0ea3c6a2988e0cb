"""The migration driver on the simulator: the happy path and every failure path."""

from __future__ import annotations

import time

import numpy as np
import numpy.typing as npt
import pytest

from softpage import bitmap
from softpage.backend import DomainInfo, DropOutcome, EndOfCheckpoint, PageBatch, StaticInfo
from softpage.categories import CacheMode
from softpage.driver import FEW_CANDIDATES_NOTE, MigrationSession, send_domain
from softpage.errors import MigrationError
from softpage.options import DriverOptions
from softpage.pfnset import PfnArray
from softpage.sim.backend import SimBackend, SimFaults
from softpage.sim.destination import DirectSink
from softpage.sim.experiment import GuestShape, boot_guest
from softpage.sim.guest import (
    STRUCT_PAGES_PER_MEMMAP_PAGE,
    DropBehaviour,
    FinalBehaviour,
    PageKind,
    ReportBehaviour,
    SimGuest,
)
from softpage.snapshot import SnapshotState
from softpage.stream.records import PFINFO_SHIFT

SMALL = GuestShape(memory_mib=4, kernel_mib=1, min_free_mib=1)


def small_guest(user_alloc_mib: int = 1) -> SimGuest:
    return boot_guest(SMALL, user_alloc_mib, seed=5)


class FailingSink(DirectSink):
    """A receiver whose connection breaks at the ``fail_at``-th PAGE_DATA write."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.fail_at = fail_at
        self.writes = 0

    def write_pages(self, pfns: PfnArray, types: npt.NDArray[np.uint32], data: memoryview) -> int:
        self.writes += 1
        if self.writes == self.fail_at:
            raise BrokenPipeError(32, "receiver went away")
        return super().write_pages(pfns, types, data)


class Messages(list[str]):
    def __call__(self, message: str) -> None:
        self.append(message)


def check_destination(backend: SimBackend, sink: DirectSink) -> None:
    destination, source, held = sink.destination, backend.suspended_tokens, backend.suspended_held
    assert destination is not None and source is not None and held is not None
    ram = backend.guest.ram
    assert np.array_equal(destination.populated, ram)
    must_match = ram.copy()
    must_match[held.to_pfns().astype(np.intp)] = False
    assert np.array_equal(destination.tokens[must_match], source[must_match])


# -- success ---------------------------------------------------------------------
def test_pruned_migration_is_correct_and_sends_soft_pages_as_xalloc() -> None:
    guest = small_guest()
    cache_pages = guest.count(PageKind.CACHE)
    backend, sink, log = SimBackend(guest), DirectSink(), Messages()
    stats = send_domain(backend, sink, DriverOptions(), log)
    check_destination(backend, sink)
    assert stats.warnings == []
    assert stats.rounds[0].snapshot_used
    assert stats.rounds[0].pages_xalloc >= cache_pages
    assert stats.rounds[-1].kind == "final" and stats.rounds[-1].snapshot_used
    assert backend.suspended and guest.armed
    assert "resume" not in backend.calls
    assert sink.ended
    assert stats.total_bytes == sink.counters.bytes


def test_plain_precopy_sends_every_ram_page_with_data() -> None:
    guest = small_guest()
    backend, sink = SimBackend(guest), DirectSink()
    stats = send_domain(backend, sink, DriverOptions(prune=()), Messages())
    check_destination(backend, sink)
    assert stats.pages_xalloc == 0
    assert stats.rounds[0].pages_data == int(np.count_nonzero(guest.ram))
    assert backend.channel.requests == []
    assert not guest.armed


class DeferringBackend(SimBackend):
    """Defers every PFN divisible by 7 while the guest runs (and, if ``when_suspended``, after),
    as a PV backend defers a page table the guest is rewriting: ``data`` holds the others."""

    when_suspended = False

    def read_pages(self, pfns: PfnArray, types: npt.NDArray[np.uint32]) -> PageBatch:
        batch = super().read_pages(pfns, types)
        if self.suspended and not self.when_suspended:
            return batch
        deferred = np.asarray(pfns) % 7 == 0
        pages = np.frombuffer(batch.data, dtype=np.uint8).reshape(-1, 4096)[~deferred]
        return PageBatch(pages.reshape(-1).data, deferred)


def test_pages_deferred_in_live_rounds_reach_the_destination_by_the_final_round() -> None:
    guest = small_guest()
    backend, sink = DeferringBackend(guest), DirectSink()
    stats = send_domain(backend, sink, DriverOptions(prune=()), Messages())
    check_destination(backend, sink)
    assert stats.rounds[0].pages_deferred > 0
    assert stats.rounds[-1].kind == "final" and stats.rounds[-1].pages_deferred == 0
    assert stats.rounds[-1].pages_data >= stats.rounds[0].pages_deferred


# -- failures ----------------------------------------------------------------------
def test_a_page_deferred_with_the_guest_suspended_fails_the_migration_and_resumes_the_guest() -> None:
    guest = small_guest()
    backend = DeferringBackend(guest)
    backend.when_suspended = True
    sink = DirectSink()
    with pytest.raises(MigrationError, match="could not be read with the guest suspended"):
        send_domain(backend, sink, DriverOptions(prune=()), Messages())
    assert not sink.ended
    assert "resume" in backend.calls and guest.running
def test_suspend_failure_resumes_and_disarms() -> None:
    guest = small_guest()
    backend = SimBackend(guest, faults=SimFaults(suspend_fails=True))
    with pytest.raises(MigrationError, match="simulated suspend failure"):
        send_domain(backend, DirectSink(), DriverOptions(), Messages())
    assert backend.calls.index("resume") > backend.calls.index("suspend")
    assert guest.running
    assert not guest.armed


def test_unacknowledged_suspend_resumes_and_releases_held_pages() -> None:
    guest = small_guest()
    backend = SimBackend(guest, faults=SimFaults(suspend_unacknowledged=True))
    with pytest.raises(MigrationError, match="did not acknowledge"):
        send_domain(backend, DirectSink(), DriverOptions(), Messages())
    assert "resume" in backend.calls
    assert guest.count(PageKind.HELD) == 0
    assert guest.running and not guest.armed
    assert guest.published is not None
    assert bitmap.decode(guest.published, guest.p2m_size).state is SnapshotState.EMPTY


def test_receiver_failure_in_the_final_round_resumes_the_guest() -> None:
    guest = small_guest()
    backend = SimBackend(guest, read_hook=lambda guest, pfns: guest.dirty_in_use(200))
    probe = DirectSink()
    send_domain(SimBackend(small_guest(), read_hook=lambda guest, pfns: guest.dirty_in_use(200)),
                probe, DriverOptions(), Messages())
    # Same guest, same seed: fail on the last PAGE_DATA write, which is in the final round.
    sink = FailingSink(fail_at=probe.counters.records)
    with pytest.raises(MigrationError, match="receiver went away"):
        send_domain(backend, sink, DriverOptions(), Messages())
    assert "suspend" in backend.calls
    assert backend.calls[-1] == "resume"
    assert guest.running and not backend.suspended
    assert guest.count(PageKind.HELD) == 0
    assert not guest.armed


def test_receiver_failure_in_a_live_round_leaves_the_guest_running() -> None:
    guest = small_guest()
    backend = SimBackend(guest)
    with pytest.raises(MigrationError, match="receiver went away"):
        send_domain(backend, FailingSink(fail_at=1), DriverOptions(), Messages())
    assert "suspend" not in backend.calls
    assert guest.running and not guest.armed


def test_read_failure_is_a_migration_error() -> None:
    guest = small_guest()
    backend = SimBackend(guest, faults=SimFaults(read_fails_after=0))
    with pytest.raises(MigrationError, match="simulated I/O error"):
        send_domain(backend, DirectSink(), DriverOptions(), Messages())
    assert guest.running and not guest.armed


def test_resume_failure_is_logged_and_the_original_error_kept() -> None:
    guest = small_guest()
    backend = SimBackend(guest, faults=SimFaults(suspend_fails=True, resume_fails=True))
    log = Messages()
    with pytest.raises(MigrationError, match="simulated suspend failure"):
        send_domain(backend, DirectSink(), DriverOptions(), log)
    assert any("could not resume" in message for message in log)


# -- degraded guests -----------------------------------------------------------------
def test_guest_without_module_gets_plain_precopy_and_a_warning() -> None:
    guest = small_guest()
    guest.module_loaded = False
    backend, sink, log = SimBackend(guest), DirectSink(), Messages()
    stats = send_domain(backend, sink, DriverOptions(), log)
    check_destination(backend, sink)
    assert len(stats.warnings) == 1 and "module not loaded" in stats.warnings[0]
    assert stats.guest_drop_s is None and stats.guest_drop_outcome is None
    assert any(message.startswith("warning:") for message in log)
    assert stats.pages_xalloc == 0
    assert stats.rounds[0].pages_data == int(np.count_nonzero(guest.ram))


@pytest.mark.parametrize(
    ("behaviour", "warning"),
    [
        (ReportBehaviour.MALFORMED, "malformed soft-page report"),
        (ReportBehaviour.SILENT, "no soft-page report"),
        (ReportBehaviour.TORN, "no soft-page report"),
        (ReportBehaviour.OLD_REQUEST, "no soft-page report"),
    ],
)
def test_unusable_report_means_a_warning_and_a_full_round(behaviour: ReportBehaviour, warning: str) -> None:
    guest = small_guest()
    guest.report_behaviour = behaviour
    backend, sink = SimBackend(guest), DirectSink()
    stats = send_domain(backend, sink, DriverOptions(snapshot_timeout=0.0), Messages())
    check_destination(backend, sink)
    assert any(warning in message for message in stats.warnings)
    first = stats.rounds[0]
    assert not first.snapshot_used
    assert first.pages_xalloc == 0
    assert first.pages_data == int(np.count_nonzero(guest.ram))


def test_malformed_final_report_sends_everything_stale() -> None:
    guest = small_guest()
    guest.final_behaviour = FinalBehaviour.MALFORMED
    backend, sink = SimBackend(guest), DirectSink()
    stats = send_domain(backend, sink, DriverOptions(final_snapshot_timeout=0.0), Messages())
    final = stats.rounds[-1]
    assert not final.snapshot_used
    assert any("malformed" in message for message in stats.warnings)
    # Nothing may be skipped: every page the destination has must equal the source's.
    assert sink.destination is not None and backend.suspended_tokens is not None
    ram = guest.ram
    assert np.array_equal(sink.destination.tokens[ram], backend.suspended_tokens[ram])


# -- the session, step by step ----------------------------------------------------------
class ContractSink:
    """Records the order of the PageSink calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def begin(self, domain: DomainInfo, static: StaticInfo) -> None:
        self.calls.append("begin")

    def write_pages(self, pfns: PfnArray, types: npt.NDArray[np.uint32], data: memoryview) -> int:
        self.calls.append("write_pages")
        return 0

    def drain(self) -> None:
        self.calls.append("drain")

    def end(self, end_of_checkpoint: EndOfCheckpoint) -> None:
        self.calls.append("end")


def test_backend_call_order() -> None:
    guest = small_guest()
    backend, sink = SimBackend(guest), ContractSink()
    session = MigrationSession(backend, sink, DriverOptions(early_drop_min_cache_pages=0), Messages())
    session.start()
    session.live_round()
    session.live_round(session.harvest())
    session.stop_and_copy()
    calls = [call for call in backend.calls if call != "soft_channel"]
    assert calls == [
        "describe", "static_info", "enable_logdirty", "harvest_dirty",
        "harvest_dirty",  # after the early drop
        "suspend", "harvest_dirty(final)", "end_of_checkpoint",
    ]
    assert sink.calls[0] == "begin" and sink.calls[-1] == "end"
    assert "write_pages" in sink.calls
    # Drained after each live round (two, then the after-drop round) and once more before the
    # suspend, so before the final round's first write.
    assert sink.calls.count("drain") == 4
    last_drain = len(sink.calls) - 1 - sink.calls[::-1].index("drain")
    assert "write_pages" in sink.calls[last_drain:]


def test_each_live_round_drains_before_the_next_harvest() -> None:
    """A harvest taken while the queue still holds a round's data would leave what the guest
    writes during its transfer to the final round, in the downtime."""
    # The guest writes while each round reads it: the policy runs all its rounds.
    backend = SimBackend(small_guest(), read_hook=lambda guest, pfns: guest.dirty_in_use(200))
    sink = ContractSink()
    events = sink.calls
    harvest = backend.harvest_dirty

    def logged_harvest(final: bool) -> object:
        events.append("harvest(final)" if final else "harvest")
        return harvest(final)

    backend.harvest_dirty = logged_harvest  # type: ignore[method-assign]
    stats = send_domain(backend, sink, DriverOptions(early_drop_min_cache_pages=0), Messages())
    assert [r.kind for r in stats.rounds] == ["live"] * 5 + ["after-drop", "final"]
    # Every harvest after round 1 (the early drop's and the final one included) comes after a
    # drain with no write between them.
    for index, event in enumerate(events):
        if event.startswith("harvest") and "write_pages" in events[:index]:
            before = [e for e in events[:index] if e in ("drain", "write_pages")]
            assert before[-1] == "drain", events
    assert all(r.drain_s >= 0 for r in stats.rounds)


def test_snapshot_is_requested_after_the_harvest() -> None:
    guest = small_guest()
    backend = SimBackend(guest)
    order: list[str] = []
    harvest = backend.harvest_dirty

    def logged_harvest(final: bool) -> object:
        order.append("harvest")
        return harvest(final)

    request = backend.channel.request

    def logged_request(request_id: int) -> None:
        order.append("request")
        request(request_id)

    backend.harvest_dirty = logged_harvest  # type: ignore[method-assign,assignment]
    backend.channel.request = logged_request  # type: ignore[method-assign]
    session = MigrationSession(backend, DirectSink(), DriverOptions(snapshot_min_candidates=0), Messages())
    session.start()
    session.live_round()
    session.live_round(session.harvest())
    assert order == ["request", "harvest", "request"]
    requests = backend.channel.requests
    assert requests == sorted(requests) and len(set(requests)) == len(requests)


@pytest.mark.parametrize("threshold", [0, 10])
def test_a_round_of_few_dirty_pages_asks_no_report(threshold: int) -> None:
    guest = small_guest()
    backend = SimBackend(guest)
    log = Messages()
    session = MigrationSession(backend, DirectSink(), DriverOptions(snapshot_min_candidates=threshold), log)
    session.start()
    session.live_round()
    asked = len(backend.channel.requests)
    assert guest.fill_cache(9) == 9  # clean page cache read in since: dirty, and soft
    dirty = session.harvest()
    assert dirty.count() == 9
    round_stats = session.live_round(dirty)
    if threshold > dirty.count():
        assert len(backend.channel.requests) == asked
        assert (round_stats.pages_data, round_stats.pages_skipped) == (9, 0)
        assert round_stats.snapshot_note == FEW_CANDIDATES_NOTE
        assert not any("soft pages not used" in message for message in log)
    else:
        assert len(backend.channel.requests) == asked + 1
        assert (round_stats.pages_data, round_stats.pages_skipped) == (0, 9)


class SlowSink(DirectSink):
    """A receiver that takes ``delay`` seconds over each PAGE_DATA write."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.writes = 0

    def write_pages(self, pfns: PfnArray, types: npt.NDArray[np.uint32], data: memoryview) -> int:
        self.writes += 1
        time.sleep(self.delay)
        return super().write_pages(pfns, types, data)


class SlowTypesBackend(SimBackend):
    """A hypervisor that takes ``delay`` seconds over each page-type query."""

    delay = 0.0
    queries = 0

    def page_types(self, pfns: PfnArray) -> npt.NDArray[np.uint32]:
        self.queries += 1
        time.sleep(self.delay)
        return super().page_types(pfns)


def test_a_round_says_where_its_time_went() -> None:
    guest = small_guest()
    backend, sink = SlowTypesBackend(guest), SlowSink(delay=0.02)
    backend.delay = 0.01
    session = MigrationSession(backend, sink, DriverOptions(snapshot_min_candidates=10), Messages())
    session.start()
    first = session.live_round()
    assert first.snapshot_used and first.report_s is not None and first.report_s >= 0
    assert first.types_s >= 0.01 * backend.queries > 0
    assert first.write_s >= 0.02 * sink.writes > 0
    assert first.read_s > 0
    assert first.types_s + first.read_s + first.write_s <= first.duration_s
    assert guest.fill_cache(3) == 3
    few = session.live_round(session.harvest())
    assert few.snapshot_note == FEW_CANDIDATES_NOTE and few.report_s is None


# -- the early drop ---------------------------------------------------------------------
def test_early_drop_comes_before_the_final_request_and_the_suspend() -> None:
    guest = small_guest()
    backend = SimBackend(guest)
    channel = backend.channel
    order: list[str] = []
    drop_caches, request_final, suspend = channel.drop_caches, channel.request_final, backend.suspend
    dropped_at: list[float] = []

    def logged_drop(drop_id: int, timeout: float) -> DropOutcome:
        order.append("drop")
        outcome = drop_caches(drop_id, timeout)
        dropped_at.append(time.monotonic())
        return outcome

    def logged_request_final(request_id: int) -> None:
        order.append("request_final")
        request_final(request_id)

    def logged_suspend() -> None:
        order.append("suspend")
        assert guest.pinned[guest.kind == PageKind.CACHE].all()  # only cache it cannot drop is left
        suspend()

    channel.drop_caches = logged_drop  # type: ignore[method-assign]
    channel.request_final = logged_request_final  # type: ignore[method-assign]
    backend.suspend = logged_suspend  # type: ignore[method-assign]
    sink = DirectSink()
    options = DriverOptions(drop_timeout=5.0, early_drop_min_cache_pages=0)
    stats = send_domain(backend, sink, options, Messages())
    check_destination(backend, sink)
    # cache=cold (the default): the first drop before round 1, the early drop before the suspend
    # (asked for whatever reported cold cache is left: early_drop_min_cache_pages=0).
    assert order == ["drop", "drop", "request_final", "suspend"]
    # Ids only grow: each drop's is newer than the requests before it, and the final request is
    # the newest of all (it comes after the after-drop round's).
    requests = channel.requests
    final = requests[-1]
    assert requests == sorted(requests) and len(set(requests)) == len(requests)
    assert len(channel.drops) == 2 and channel.drops == sorted(channel.drops) and channel.drops[-1] < final
    assert stats.guest_drop_outcome is DropOutcome.DONE and stats.guest_drop_s is not None
    # The drop is not downtime: that starts at the suspend request, after it.
    assert stats.suspend_requested_at is not None and stats.suspend_requested_at >= dropped_at[0]
    assert stats.warnings == [] and stats.rounds[-1].snapshot_used


def test_unanswered_early_drop_warns_and_the_migration_completes() -> None:
    guest = small_guest()
    guest.drop_behaviour = DropBehaviour.SILENT
    backend, sink, log = SimBackend(guest), DirectSink(), Messages()
    stats = send_domain(backend, sink, DriverOptions(drop_timeout=0.5, early_drop_min_cache_pages=0), log)
    check_destination(backend, sink)
    assert stats.first_drop_outcome is stats.guest_drop_outcome is DropOutcome.TIMED_OUT
    assert len(stats.warnings) == 2
    assert "first cold-cache drop within 0.5 s: round 1 goes ahead" in stats.warnings[0]
    assert "early cache drop within 0.5 s" in stats.warnings[1]
    assert any(message.startswith("warning:") and "early cache drop" in message for message in log)
    assert backend.suspended and sink.ended
    assert stats.rounds[-1].snapshot_used  # the guest dropped at freeze and held its free pages


def test_old_module_is_not_asked_to_drop_and_gets_no_warning() -> None:
    guest = small_guest()
    guest.drop_behaviour = DropBehaviour.OLD_MODULE
    backend, sink, log = SimBackend(guest), DirectSink(), Messages()
    stats = send_domain(backend, sink, DriverOptions(early_drop_min_cache_pages=0), log)
    check_destination(backend, sink)
    assert stats.guest_drop_outcome is DropOutcome.UNSUPPORTED and backend.channel.drops == []
    assert stats.warnings == []
    assert [message for message in log if "early cache drop" in message] == [
        f"domain {backend.domid}: the guest's softpage module predates the early cache drop: "
        "it drops its caches at suspend, in the downtime"
    ]


def test_drop_timeout_zero_skips_the_early_drop() -> None:
    guest = small_guest()
    backend, sink = SimBackend(guest), DirectSink()
    stats = send_domain(backend, sink, DriverOptions(drop_timeout=0.0), Messages())
    check_destination(backend, sink)
    assert backend.channel.drops == [] and guest.dropped == 0
    assert stats.guest_drop_s is None and stats.guest_drop_outcome is None


def test_no_early_drop_when_the_first_drop_left_no_reported_cold_cache() -> None:
    """cache=cold evicts only reported cache: once the first drop took it, an early drop would
    cost its own time and an after-drop round, while the guest writes pages for the final round."""
    guest = small_guest()
    backend, sink, log = SimBackend(guest), DirectSink(), Messages()
    stats = send_domain(backend, sink, DriverOptions(), log)
    check_destination(backend, sink)
    assert stats.first_drop_outcome is DropOutcome.DONE and len(backend.channel.drops) == 1
    assert stats.guest_drop_outcome is None and stats.guest_drop_s is None
    assert stats.cold_cache_left is not None and stats.cold_cache_left < 256
    assert "after-drop" not in [r.kind for r in stats.rounds]
    assert (f"domain {backend.domid}: {stats.cold_cache_left} pages of reported cold cache left: "
            "no early drop (they go out in the final round unless the guest frees them)") in log
    assert stats.warnings == [] and stats.rounds[-1].snapshot_used  # its free pages held all the same


@pytest.mark.parametrize(("threshold", "asked"), [(100, True), (256, False)])
def test_the_early_drop_is_asked_for_when_enough_reported_cold_cache_is_left(
    monkeypatch: pytest.MonkeyPatch, threshold: int, asked: bool
) -> None:
    """Without the first drop, round 1 reports the guest's cold cache (about 120 of its 160 pages)
    and nothing takes it before the end of precopy: the early drop comes if that is at least
    ``early_drop_min_cache_pages``; either way the destination is whole."""
    monkeypatch.setattr(MigrationSession, "drop_cold_cache_first", lambda session: None)
    guest, _hot = guest_with_hot_cache()
    backend, sink = SimBackend(guest), DirectSink()
    stats = send_domain(backend, sink, DriverOptions(early_drop_min_cache_pages=threshold), Messages())
    check_destination(backend, sink)
    assert stats.cold_cache_left is not None and 100 <= stats.cold_cache_left < 256
    assert (stats.guest_drop_outcome is DropOutcome.DONE) is asked
    assert ("after-drop" in [r.kind for r in stats.rounds]) is asked


def test_cache_all_always_asks_for_the_early_drop() -> None:
    guest = small_guest()
    stats = send_domain(SimBackend(guest), DirectSink(), DriverOptions(cache=CacheMode.ALL), Messages())
    assert stats.guest_drop_outcome is DropOutcome.DONE and stats.cold_cache_left is None


def test_pages_written_between_the_early_drop_and_the_suspend_are_sent() -> None:
    guest = small_guest()

    def read_back_and_write(guest: SimGuest) -> None:
        guest.fill_cache(40)
        guest.churn(40)
        guest.dirty_in_use(40)

    guest.after_drop = read_back_and_write
    backend, sink = SimBackend(guest), DirectSink()
    stats = send_domain(backend, sink, DriverOptions(early_drop_min_cache_pages=0), Messages())
    check_destination(backend, sink)
    assert stats.guest_drop_outcome is DropOutcome.DONE
    after_drop = stats.rounds[-2]
    assert after_drop.kind == "after-drop" and after_drop.dirty is not None and after_drop.dirty >= 80


@pytest.mark.parametrize("drop_timeout", [0.0, 1.0])
def test_what_the_early_drop_writes_goes_out_before_the_suspend(drop_timeout: float) -> None:
    """Freeing the cache writes the kernel's memmap: with an early drop those pages are sent in
    one more live round, and the final round (the downtime) has next to nothing dirty left.
    cache=all: no first drop took the cache before round 1."""
    guest = small_guest(user_alloc_mib=0)
    assert guest.count(PageKind.CACHE) > 256
    backend, sink = SimBackend(guest), DirectSink()
    options = DriverOptions(drop_timeout=drop_timeout, cache=CacheMode.ALL)
    stats = send_domain(backend, sink, options, Messages())
    check_destination(backend, sink)
    final = stats.rounds[-1]
    assert final.kind == "final" and final.dirty is not None
    if drop_timeout:
        assert stats.rounds[-2].dirty and stats.rounds[-2].dirty > 0
        assert final.dirty == 0
    else:
        assert final.dirty > 0, "the drop at freeze writes the memmap in the downtime"



def test_a_save_that_is_not_live_needs_no_log_dirty() -> None:
    """Suspend first, read everything once: as xc_domain_save without XCFLAGS_LIVE, and all a PV
    guest gets from a hypervisor without shadow paging."""
    guest = small_guest()
    backend, sink = SimBackend(guest), DirectSink()
    stats = send_domain(backend, sink, DriverOptions(live=False), Messages())
    check_destination(backend, sink)
    assert "enable_logdirty" not in backend.calls and "harvest_dirty(final)" not in backend.calls
    assert [r.kind for r in stats.rounds] == ["final"]


# -- prune-cache: cold (the default) and all ---------------------------------------------------------
def guest_with_hot_cache() -> tuple[SimGuest, npt.NDArray[np.bool_]]:
    """A small guest whose page cache is a quarter hot (used again), and the hot pages."""
    guest = small_guest()
    guest.use_cache(guest.count(PageKind.CACHE) // 4)
    hot = (guest.kind == PageKind.CACHE) & guest.hot
    assert hot.any()
    return guest, hot


class XallocRecordingSink(DirectSink):
    """Also keeps every PFN named as XALLOC."""

    def __init__(self) -> None:
        super().__init__()
        self.xalloc: set[int] = set()

    def write_pages(self, pfns: PfnArray, types: npt.NDArray[np.uint32], data: memoryview) -> int:
        stream_types = types >> np.uint32(PFINFO_SHIFT)
        self.xalloc.update(int(pfn) for pfn in pfns[stream_types == 0xE])
        return super().write_pages(pfns, types, data)


def test_cache_cold_sends_the_hot_cache_and_keeps_it_in_the_guest() -> None:
    guest, hot = guest_with_hot_cache()
    cold = (guest.kind == PageKind.CACHE) & ~guest.hot & ~guest.pinned
    backend, sink = SimBackend(guest), XallocRecordingSink()
    stats = send_domain(backend, sink, DriverOptions(), Messages())
    check_destination(backend, sink)
    assert stats.cache_mode is CacheMode.COLD and guest.prune_cache is CacheMode.COLD
    assert stats.warnings == []
    # Hot cache went out with data and is still cache; the cold cache was dropped and held.
    assert (guest.kind[hot] == PageKind.CACHE).all()
    assert (guest.kind[cold] == PageKind.HELD).all()
    # No hot page was ever reported soft, so none travelled as XALLOC; the cold ones did.
    assert sink.xalloc.isdisjoint(np.flatnonzero(hot).tolist())
    assert set(np.flatnonzero(cold).tolist()) <= sink.xalloc


def test_cache_all_drops_hot_and_cold_cache_alike() -> None:
    guest, hot = guest_with_hot_cache()
    backend, sink = SimBackend(guest), DirectSink()
    stats = send_domain(backend, sink, DriverOptions(cache=CacheMode.ALL), Messages())
    check_destination(backend, sink)
    assert stats.cache_mode is CacheMode.ALL and guest.prune_cache is CacheMode.ALL
    assert (guest.kind[hot & ~guest.pinned] == PageKind.HELD).all()


def test_cache_cold_sends_fewer_pages_with_data_only_by_the_hot_cache() -> None:
    cold_guest, hot = guest_with_hot_cache()
    all_guest, _ = guest_with_hot_cache()
    cold_stats = send_domain(SimBackend(cold_guest), DirectSink(), DriverOptions(), Messages())
    all_options = DriverOptions(cache=CacheMode.ALL)
    all_stats = send_domain(SimBackend(all_guest), DirectSink(), all_options, Messages())
    # cold sends the hot cache besides, and the memmap of the cold cache it dropped before round 1
    # once where all sends it twice (round 1, after-drop): at most the whole guest's memmap, one
    # page for each 64 PFNs.
    extra = cold_stats.pages_data - all_stats.pages_data
    hot_pages = int(np.count_nonzero(hot))
    assert cold_stats.first_drop_outcome is DropOutcome.DONE and all_stats.first_drop_outcome is None
    memmap_pages = -(-cold_guest.p2m_size // STRUCT_PAGES_PER_MEMMAP_PAGE)
    assert hot_pages - memmap_pages <= extra <= hot_pages + 64


def test_the_cold_cache_dropped_before_round_1_sends_its_memmap_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first drop frees the cold cache before round 1 reads the kernel's memmap, so the
    after-drop round has only what went cold meanwhile: fewer pages with data than the same
    migration with the cold cache dropped only at the end of precopy, and a whole destination."""
    first_guest, _ = guest_with_hot_cache()
    cache_before = first_guest.count(PageKind.CACHE)
    first_backend, first_sink = SimBackend(first_guest), DirectSink()
    first = send_domain(first_backend, first_sink, DriverOptions(early_drop_min_cache_pages=0), Messages())
    check_destination(first_backend, first_sink)
    monkeypatch.setattr(MigrationSession, "drop_cold_cache_first", lambda session: None)
    late_guest, _ = guest_with_hot_cache()
    late_backend, late_sink = SimBackend(late_guest), DirectSink()
    late = send_domain(late_backend, late_sink, DriverOptions(early_drop_min_cache_pages=0), Messages())
    check_destination(late_backend, late_sink)
    assert first.first_drop_outcome is DropOutcome.DONE and late.first_drop_outcome is None
    cache_after = first_guest.count(PageKind.CACHE)
    assert cache_after == late_guest.count(PageKind.CACHE) and cache_before - cache_after > 64
    assert [stats.rounds[-2].kind for stats in (first, late)] == ["after-drop", "after-drop"]
    assert first.rounds[-2].dirty < late.rounds[-2].dirty
    assert first.pages_data < late.pages_data


def test_a_module_without_prune_cache_gets_cache_all_and_a_warning() -> None:
    guest, hot = guest_with_hot_cache()
    guest.knows_prune_cache = False
    backend, sink = SimBackend(guest), DirectSink()
    stats = send_domain(backend, sink, DriverOptions(), Messages())
    check_destination(backend, sink)
    assert stats.cache_mode is CacheMode.ALL and guest.prune_cache is CacheMode.ALL
    assert stats.warnings == [
        f"domain {backend.domid}: the guest's softpage module predates prune-cache=cold: it reports "
        "and drops all of its clean page cache (cache=all)"
    ]
    assert (guest.kind[hot & ~guest.pinned] == PageKind.HELD).all()


def test_a_module_without_prune_cache_asked_for_cache_all_gets_no_warning() -> None:
    guest, _hot = guest_with_hot_cache()
    guest.knows_prune_cache = False
    stats = send_domain(SimBackend(guest), DirectSink(), DriverOptions(cache=CacheMode.ALL), Messages())
    assert stats.cache_mode is CacheMode.ALL and stats.warnings == []


def test_cold_cache_used_again_after_its_report_is_kept_and_sent() -> None:
    guest = small_guest()
    reported: list[npt.NDArray[np.bool_]] = []

    def use_what_was_reported(guest: SimGuest) -> None:
        reported.append(guest.reported_cache.copy())
        guest.hot[guest.reported_cache & (guest.kind == PageKind.CACHE)] = True

    backend, sink = SimBackend(guest), DirectSink()
    session = MigrationSession(backend, sink, DriverOptions(drop_timeout=0.0), Messages())
    session.start()
    session.live_round()
    use_what_was_reported(guest)
    final = session.stop_and_copy()
    check_destination(backend, sink)
    used = reported[0] & (guest.kind == PageKind.CACHE)
    assert used.any() and not (guest.kind[reported[0]] == PageKind.HELD).any()
    assert final.pages_data >= int(np.count_nonzero(used))


def test_the_report_timeout_grows_with_the_guest() -> None:
    """A report scans the guest's whole memory map: the wait is per GiB, one GiB at least."""
    options = DriverOptions(snapshot_timeout=10.0)
    assert options.report_timeout(256 << 10) == 10.0
    assert options.report_timeout(1 << 20) == 10.0
    assert options.report_timeout(2 << 20) == 20.0
    assert DriverOptions(snapshot_timeout=0.0).report_timeout(4 << 20) == 0.0


def test_the_early_drop_wait_grows_with_the_guest() -> None:
    """The drop frees every page of clean cache: the wait is per GiB, one GiB at least, and 0
    still means no early drop."""
    options = DriverOptions(drop_timeout=30.0)
    assert options.drop_wait(256 << 10) == 30.0
    assert options.drop_wait(1 << 20) == 30.0
    assert options.drop_wait(2 << 20) == 60.0
    assert DriverOptions(drop_timeout=0.0).drop_wait(4 << 20) == 0.0


def test_round_1_uses_the_first_report_when_the_guest_has_no_cold_cache_to_drop() -> None:
    """No cold cache in the report asked for before round 1: no drop, nothing discarded, and that
    report serves round 1 (one scan, not two). After a drop round 1 asks for its own."""
    for hot, first_drop in ((True, None), (False, DropOutcome.DONE)):
        guest = small_guest()
        if hot:
            guest.use_cache(guest.count(PageKind.CACHE))
        backend, sink = SimBackend(guest), DirectSink()
        stats = send_domain(backend, sink, DriverOptions(), Messages())
        check_destination(backend, sink)
        assert stats.first_drop_outcome is first_drop
        reported = [r.round for r in stats.rounds if r.report_s is not None]
        assert reported[0] == 1 and stats.rounds[0].snapshot_used
        # every request answered a round, plus the final one, plus the first drop's own report
        assert len(backend.channel.requests) == len(reported) + 1 + (first_drop is not None)
