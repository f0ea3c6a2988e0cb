"""The simulator itself: guest memory, log-dirty, the module's reports, the destination rules."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from softpage import abi, bitmap
from softpage.abi import PAGE_SIZE
from softpage.backend import DropOutcome
from softpage.driver import send_domain
from softpage.errors import BackendError, BitmapError, StreamError
from softpage.options import DriverOptions
from softpage.pfnset import PfnSet
from softpage.sim.backend import SimBackend
from softpage.sim.destination import DestinationMemory, DirectSink, page_data_record_bytes
from softpage.sim.experiment import GuestShape, boot_guest, migrate
from softpage.sim.guest import (
    DropBehaviour,
    FinalBehaviour,
    PageKind,
    ReportBehaviour,
    SimGuest,
    corrupt,
    mask_from_pfnset,
    pfnset_from_mask,
)
from softpage.sim.link import LinkModel, SimClock
from softpage.sim.stream import RestoreSink
from softpage.sim.workload import Workload, WorkloadRunner
from softpage.snapshot import SnapshotState
from softpage.stream.records import PageType

NOTAB = np.uint32(PageType.NOTAB.pfinfo)
XALLOC = np.uint32(PageType.XALLOC.pfinfo)
XTAB = np.uint32(PageType.XTAB.pfinfo)
SMALL = GuestShape(memory_mib=4, kernel_mib=1, min_free_mib=1)


def read(backend: Any, pfns: Any) -> memoryview:
    """``read_pages`` of plain (NOTAB) pages: their data."""
    return backend.read_pages(pfns, np.zeros(len(pfns), dtype=np.uint32)).data



def guest_with(free: int = 0, cache: int = 0, anon: int = 0, holes: tuple[int, ...] = ()) -> SimGuest:
    size = free + cache + anon + len(holes)
    guest = SimGuest(size, np.array(holes, dtype=np.uint64), seed=1)
    guest.allocate_anon(anon)
    guest.fill_cache(cache)
    return guest


# -- memory and log-dirty ----------------------------------------------------------
def test_writes_give_new_contents_and_are_logged_only_after_enable() -> None:
    guest = guest_with(free=8)
    backend = SimBackend(guest)
    before = guest.tokens.copy()
    guest.write(np.array([1, 2]))
    assert (guest.tokens[[1, 2]] != before[[1, 2]]).all()
    backend.enable_logdirty()
    assert not backend.harvest_dirty(final=False)
    guest.write(np.array([3]))
    assert backend.harvest_dirty(final=False) == PfnSet.from_pfns(8, [3])
    assert not backend.harvest_dirty(final=False)


def test_tokens_never_repeat() -> None:
    guest = guest_with(free=4)
    guest.write(np.array([0, 1, 2, 3]))
    guest.write(np.array([0, 1]))
    assert len(set(guest.tokens.tolist())) == 4


def test_read_pages_returns_token_and_pfn_and_refuses_holes() -> None:
    guest = guest_with(free=4, holes=(4, 5))
    backend = SimBackend(guest)
    pages = np.frombuffer(read(backend, np.array([3, 1], dtype=np.uint64)), dtype=np.uint64)
    assert pages.size == 2 * PAGE_SIZE // 8
    assert pages[0] == guest.tokens[3] and pages[1] == 3
    assert pages[512] == guest.tokens[1] and pages[513] == 1
    assert not pages.reshape(2, 512)[:, 2:].any()
    with pytest.raises(BackendError, match="XTAB"):
        read(backend, np.array([4], dtype=np.uint64))
    types = backend.page_types(np.array([3, 4], dtype=np.uint64))
    assert types.tolist() == [int(NOTAB), int(XTAB)]


def test_guest_cannot_write_while_suspended() -> None:
    guest = guest_with(anon=4)
    backend = SimBackend(guest)
    backend.enable_logdirty()
    backend.suspend()
    with pytest.raises(BackendError, match="suspended"):
        guest.write(np.array([0]))
    assert guest.allocate_anon(1) == 0


def test_allocation_reclaims_clean_unpinned_cache_when_memory_is_full() -> None:
    guest = guest_with(cache=10)
    guest.pin_cache(4)
    assert guest.allocate_anon(10) == 6
    assert guest.count(PageKind.CACHE) == 4 and guest.pinned[guest.kind == PageKind.CACHE].all()


def test_pfnset_mask_round_trip() -> None:
    mask = np.zeros(130, dtype=bool)
    mask[[0, 63, 64, 129]] = True
    pfns = pfnset_from_mask(mask)
    assert pfns == PfnSet.from_pfns(130, [0, 63, 64, 129])
    assert np.array_equal(mask_from_pfnset(pfns), mask)


# -- the module's reports --------------------------------------------------------------
def test_prompt_report_decodes_to_the_scan() -> None:
    guest = guest_with(free=5, cache=6, anon=7)
    guest.grow_slab(2)
    backend = SimBackend(guest)
    channel = backend.soft_channel()
    assert channel is not None
    channel.request(41)
    raw = channel.read(41, timeout=0)
    assert raw is not None
    report = bitmap.decode(raw, guest.p2m_size)
    assert report.state is SnapshotState.SNAPSHOT and report.request_id == 41
    assert report.free == pfnset_from_mask(guest.kind == PageKind.FREE)
    assert report.cache == pfnset_from_mask(guest.kind == PageKind.CACHE)
    assert report.slab.count() == 2
    assert channel.read(40, timeout=0) is None


def test_lagging_report_answers_the_request_with_the_previous_scan() -> None:
    guest = guest_with(free=8, anon=8)
    channel = SimBackend(guest).soft_channel()
    assert channel is not None
    channel.request(1)
    first_free = pfnset_from_mask(guest.kind == PageKind.FREE)
    guest.allocate_anon(4)
    guest.report_behaviour = ReportBehaviour.LAGGING
    channel.request(2)
    raw = channel.read(2, timeout=0)
    assert raw is not None
    assert bitmap.decode(raw, guest.p2m_size).free == first_free


def test_lying_report_calls_pages_in_use_free() -> None:
    guest = guest_with(free=8, anon=8)
    guest.report_behaviour = ReportBehaviour.LYING
    channel = SimBackend(guest).soft_channel()
    assert channel is not None
    channel.request(3)
    raw = channel.read(3, timeout=0)
    assert raw is not None
    free = mask_from_pfnset(bitmap.decode(raw, guest.p2m_size).free)
    assert (free & (guest.kind == PageKind.ANON)).any()


@pytest.mark.parametrize("how", ["magic", "count", "stray-bit", "reserved", "flags"])
def test_every_malformation_is_rejected_by_the_decoder(how: str) -> None:
    guest = guest_with(free=8, anon=8)
    channel = SimBackend(guest).soft_channel()
    assert channel is not None
    channel.request(9)
    assert guest.published is not None
    octets = bytearray(guest.published)
    corrupt(octets, how)
    with pytest.raises(BitmapError):
        bitmap.decode(bytes(octets), guest.p2m_size)


@pytest.mark.parametrize(
    "behaviour", [ReportBehaviour.SILENT, ReportBehaviour.TORN, ReportBehaviour.OLD_REQUEST]
)
def test_reports_the_channel_never_returns(behaviour: ReportBehaviour) -> None:
    guest = guest_with(free=8, anon=8)
    channel = SimBackend(guest).soft_channel()
    assert channel is not None
    channel.request(1)
    guest.report_behaviour = behaviour
    channel.request(2)
    assert channel.read(2, timeout=0) is None


def test_no_module_no_channel() -> None:
    guest = guest_with(free=4)
    guest.module_loaded = False
    assert SimBackend(guest).soft_channel() is None


# -- suspend ----------------------------------------------------------------------------
def test_freeze_drops_unpinned_cache_and_slab_and_holds_every_free_page() -> None:
    guest = guest_with(free=10, cache=10, anon=10)
    guest.grow_slab(4)
    guest.pin_cache(3)
    free_before = guest.kind == PageKind.FREE
    backend = SimBackend(guest)
    channel = backend.soft_channel()
    assert channel is not None
    channel.arm(True)
    channel.request_final(77)
    backend.enable_logdirty()
    backend.suspend()
    assert guest.count(PageKind.CACHE) == 3
    assert guest.count(PageKind.FREE) == 0
    assert guest.count(PageKind.SLAB) == 0
    assert guest.count(PageKind.HELD) == 6 + 4 + 7
    assert (guest.kind[free_before] == PageKind.HELD).all()
    raw = channel.read(77, timeout=0)
    assert raw is not None
    report = bitmap.decode(raw, guest.p2m_size)
    assert report.state is SnapshotState.FINAL
    assert report.held == pfnset_from_mask(guest.kind == PageKind.HELD) == backend.suspended_held
    assert report.flags == abi.FLAG_HELD_REINIT  # neither init_on_free nor page poisoning
    backend.resume()
    assert guest.count(PageKind.HELD) == 0 and guest.count(PageKind.FREE) == 6 + 4 + 7 and not guest.armed


def test_an_unarmed_guest_does_nothing_at_freeze() -> None:
    guest = guest_with(free=10, cache=4)
    backend = SimBackend(guest)
    backend.enable_logdirty()
    backend.suspend()
    assert guest.count(PageKind.HELD) == 0 and guest.count(PageKind.CACHE) == 4
    assert guest.published is None


def test_stale_final_report_is_not_returned_for_the_final_request() -> None:
    guest = guest_with(free=10, anon=4)
    guest.final_behaviour = FinalBehaviour.STALE_REQUEST
    backend = SimBackend(guest)
    channel = backend.soft_channel()
    assert channel is not None
    channel.arm(True)
    channel.request(4)
    channel.request_final(5)
    backend.enable_logdirty()
    backend.suspend()
    assert channel.read(5, timeout=0) is None
    assert guest.final_report is not None and guest.final_report.request_id == 4


# -- the early drop ---------------------------------------------------------------------
def test_early_drop_frees_unpinned_cache_and_slab_while_the_guest_runs() -> None:
    guest = guest_with(free=10, cache=10, anon=10)
    guest.grow_slab(4)
    guest.pin_cache(3)
    tokens = guest.tokens.copy()
    backend = SimBackend(guest)
    channel = backend.soft_channel()
    assert channel is not None
    channel.arm(True)
    assert channel.drop_caches(5, timeout=1.0) is DropOutcome.DONE
    assert guest.running and guest.dropped == 5 and backend.channel.drops == [5]
    assert guest.count(PageKind.CACHE) == 3 and guest.pinned[guest.kind == PageKind.CACHE].all()
    assert guest.count(PageKind.SLAB) == 0
    assert guest.count(PageKind.FREE) == 6 + 7 + 4
    assert np.array_equal(guest.tokens, tokens)  # dropping writes nothing
    channel.request_final(5)
    backend.enable_logdirty()
    backend.suspend()
    assert guest.count(PageKind.HELD) == 6 + 7 + 4


def test_freeze_after_an_early_drop_holds_what_a_freeze_alone_holds() -> None:
    held = []
    for early_drop in (False, True):
        guest = boot_guest(SMALL, 1, seed=3)
        backend = SimBackend(guest)
        backend.channel.arm(True)
        if early_drop:
            assert backend.channel.drop_caches(1, timeout=1.0) is DropOutcome.DONE
        backend.channel.request_final(1)
        backend.enable_logdirty()
        backend.suspend()
        held.append(backend.suspended_held)
    assert held[0] == held[1] and held[0] is not None and held[0].count() > 0


def test_an_unarmed_guest_answers_the_drop_without_dropping() -> None:
    guest = guest_with(free=4, cache=6)
    channel = SimBackend(guest).channel
    assert channel.drop_caches(3, timeout=1.0) is DropOutcome.DONE
    assert guest.count(PageKind.CACHE) == 6 and guest.dropped == 3


def test_a_drop_id_not_above_the_last_answered_is_ignored() -> None:
    guest = guest_with(free=4, cache=6)
    channel = SimBackend(guest).channel
    channel.arm(True)
    assert channel.drop_caches(8, timeout=1.0) is DropOutcome.DONE
    guest.fill_cache(3)
    assert channel.drop_caches(7, timeout=1.0) is DropOutcome.TIMED_OUT
    assert channel.drop_caches(8, timeout=1.0) is DropOutcome.DONE  # answered before
    assert guest.count(PageKind.CACHE) == 3 and guest.dropped == 8


@pytest.mark.parametrize(
    ("behaviour", "outcome", "asked"),
    [
        (DropBehaviour.SILENT, DropOutcome.TIMED_OUT, True),
        (DropBehaviour.OLD_MODULE, DropOutcome.UNSUPPORTED, False),
    ],
)
def test_silent_and_old_modules_drop_nothing(
    behaviour: DropBehaviour, outcome: DropOutcome, asked: bool
) -> None:
    guest = guest_with(free=4, cache=6)
    guest.drop_behaviour = behaviour
    channel = SimBackend(guest).channel
    channel.arm(True)
    assert channel.drop_caches(2, timeout=1.0) is outcome
    assert channel.drops == ([2] if asked else [])
    assert guest.count(PageKind.CACHE) == 6 and guest.dropped == 0


def test_a_suspended_guest_answers_no_drop() -> None:
    guest = guest_with(free=4, cache=6)
    backend = SimBackend(guest)
    backend.channel.arm(True)
    backend.enable_logdirty()
    backend.suspend()
    assert backend.channel.drop_caches(2, timeout=1.0) is DropOutcome.TIMED_OUT


# -- destination rules -------------------------------------------------------------------
def pages_for(tokens_and_pfns: list[tuple[int, int]]) -> memoryview:
    pages = np.zeros((len(tokens_and_pfns), 512), dtype=np.uint64)
    for index, (token, pfn) in enumerate(tokens_and_pfns):
        pages[index, :2] = (token, pfn)
    return memoryview(pages.reshape(-1).view(np.uint8))


def test_destination_applies_the_stock_receiver_rules() -> None:
    destination = DestinationMemory(8)
    destination.apply(np.array([0, 1, 2], dtype=np.uint64), np.array([NOTAB, XALLOC, XTAB]),
                      pages_for([(11, 0)]))
    assert destination.populated.tolist() == [True, True, False, False, False, False, False, False]
    assert destination.tokens[:2].tolist() == [11, 0]
    # XALLOC never changes a populated page; data overwrites it.
    destination.apply(np.array([0], dtype=np.uint64), np.array([XALLOC]), pages_for([]))
    assert destination.tokens[0] == 11
    destination.apply(np.array([1], dtype=np.uint64), np.array([NOTAB]), pages_for([(12, 1)]))
    assert destination.tokens[1] == 12
    assert destination.misplaced_pages == 0
    destination.apply(np.array([3], dtype=np.uint64), np.array([NOTAB]), pages_for([(13, 4)]))
    assert destination.misplaced_pages == 1


def test_destination_rejects_what_the_receiver_rejects() -> None:
    destination = DestinationMemory(8)
    with pytest.raises(StreamError, match="bytes of page data"):
        destination.apply(np.array([0], dtype=np.uint64), np.array([NOTAB]), pages_for([]))
    with pytest.raises(StreamError, match="below 8"):
        destination.apply(np.array([8], dtype=np.uint64), np.array([XALLOC]), pages_for([]))
    with pytest.raises(StreamError, match="invalid"):
        destination.apply(np.array([0], dtype=np.uint64), np.array([np.uint32(5 << 28)]), pages_for([]))


def test_direct_sink_agrees_with_the_stream_writer_and_restore_model() -> None:
    guest = boot_guest(SMALL, 1, seed=2)
    direct, restore = DirectSink(), RestoreSink()
    totals = [
        send_domain(SimBackend(boot_guest(SMALL, 1, seed=2)), sink, DriverOptions(), lambda message: None)
        .total_bytes
        for sink in (direct, restore)
    ]
    assert totals[0] == totals[1] == direct.counters.bytes
    assert direct.destination is not None
    ram = guest.ram
    assert np.array_equal(restore.populated(guest.p2m_size), direct.destination.populated)
    populated = np.flatnonzero(ram).astype(np.uint64)
    assert np.array_equal(restore.tokens(populated), direct.destination.tokens[ram])
    assert restore.writer.stats.data_pages == direct.counters.data_pages
    assert restore.writer.stats.xalloc_entries == direct.counters.xalloc_entries > 0
    assert restore.writer.stats.page_records == direct.counters.records


def test_page_data_record_bytes() -> None:
    assert page_data_record_bytes(1, 1) == 8 + 8 + 8 + 4096
    assert page_data_record_bytes(1025, 0) == 2 * 16 + 8 * 1025


# -- link and workload --------------------------------------------------------------------
def test_link_time_is_bytes_over_bandwidth_plus_cpu() -> None:
    link = LinkModel(bandwidth_mbit_s=8.0, page_cpu_us=10.0, entry_cpu_us=1.0, record_overhead_us=100.0)
    assert link.batch_seconds(1_000_000, 0, 0, 0) == pytest.approx(1.0)
    assert link.batch_seconds(0, 2, 3, 4) == pytest.approx(200e-6 + 3e-6 + 40e-6)
    with pytest.raises(BackendError, match="bandwidth"):
        LinkModel(bandwidth_mbit_s=0)


def test_clock_lets_the_guest_work_for_the_transfer_time() -> None:
    guest = boot_guest(SMALL, 1, seed=2)
    runner = WorkloadRunner(guest, Workload(dirty_pages_per_s=1000))
    clock = SimClock(LinkModel(bandwidth_mbit_s=8.0), runner.run_for)
    writes = guest.writes
    clock.transfer(250_000, 0, 0, 0)
    clock.transfer(250_000, 0, 0, 0)
    assert clock.now == pytest.approx(0.5)
    assert guest.writes - writes == 500


def test_workload_rejects_negative_rates() -> None:
    with pytest.raises(BackendError, match="dirty_pages_per_s"):
        Workload(dirty_pages_per_s=-1)


# -- whole migrations ----------------------------------------------------------------------
def test_migrate_is_correct_and_pruning_sends_fewer_pages() -> None:
    link, workload = LinkModel(), Workload(dirty_pages_per_s=5000, churn_pages_per_s=500)
    plain = migrate(boot_guest(SMALL, 1, seed=4), False, link, workload)
    pruned = migrate(boot_guest(SMALL, 1, seed=4), True, link, workload)
    assert plain.correct and pruned.correct  # pruned: with the early drop, as by default
    assert plain.pages_xalloc == 0 and pruned.pages_xalloc > 0
    assert pruned.pages_data < plain.pages_data
    assert pruned.migration_s < plain.migration_s
    assert plain.downtime_s > 0 and pruned.downtime_s > 0
    assert plain.rounds[-1].kind == "final"


def test_boot_guest_refuses_an_allocation_that_does_not_fit() -> None:
    with pytest.raises(BackendError, match="user allocation"):
        boot_guest(SMALL, 4, seed=1)


def test_every_workload_rate_does_its_kind_of_work() -> None:
    guest = boot_guest(SMALL, 1, seed=2)
    guest.drop_cache(200)
    anon, cache = guest.count(PageKind.ANON), guest.count(PageKind.CACHE)
    dirty_cache = guest.count(PageKind.CACHE_DIRTY)
    runner = WorkloadRunner(guest, Workload(allocation_pages_per_s=10, cache_fill_pages_per_s=20,
                                            cache_dirty_pages_per_s=5))
    runner.run_for(0.5)
    runner.run_for(0.5)
    assert guest.count(PageKind.ANON) == anon + 10
    assert guest.count(PageKind.CACHE_DIRTY) == dirty_cache + 5
    assert guest.count(PageKind.CACHE) == cache + 20 - 5


def test_migrate_is_deterministic_for_a_seed() -> None:
    link, workload = LinkModel(), Workload(dirty_pages_per_s=3000, churn_pages_per_s=300)
    first, second = (migrate(boot_guest(SMALL, 1, seed=9), True, link, workload) for _ in range(2))
    assert first == second


def test_migrate_check_catches_a_guest_lying_about_held_pages() -> None:
    # The guest claims in-use pages as held: dom0 trusts a well-formed FINAL
    # report, so exactly those pages arrive wrong, and the check sees it.
    guest = boot_guest(SMALL, 1, seed=6)
    guest.final_behaviour = FinalBehaviour.LYING
    outcome = migrate(guest, True, LinkModel(), Workload(dirty_pages_per_s=3000))
    assert guest.final_report is not None
    lies = guest.final_report.claimed_held.count() - guest.count(PageKind.HELD)
    assert not outcome.correct
    assert 0 < outcome.mismatched_pages <= lies
    assert outcome.unpopulated_ram == 0 and outcome.populated_holes == 0
