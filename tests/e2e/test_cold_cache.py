"""``softpage migrate --prune cache=cold`` keeps the hot page cache; ``cache=all`` drops it;
stock ``xl migrate`` (``stock``, for comparison) sends both sets and keeps both cached.

The guest reads a cold file set once (``COLD``: 128 MiB of the data disk) and keeps reading a hot
one (``HOT``: 32 MiB) every second, so that the hot files are active on its LRU and the cold ones
inactive and, after an aging pass ``cold_age_ms`` earlier, unused since. The reading stops right
before the migration (active pages stay active: the hot set needs no traffic to stay hot). After
a localhost migration the guest's ``workload files`` counts, with mincore, which pages of each set
are still in its page cache, then reads every file and checks it against the data disk's
manifest, timing the reads: the hot set's read is what the guest's application pays after the
migration, at the testbed's disk rate (``SOFTPAGE_DISK_RATE``), which every line names. Before a
pruned migration the module is made to scan in each mode while armed, so that its own
``last_scan_ns`` says what the cold rule costs the walk.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator

import pytest

from softpage import abi
from softpage_testbed import Guest, Testbed, describe_disk_rate
from tests.e2e.helpers import (
    LOCALHOST_RECEIVER,
    STATS,
    assert_survived,
    data_file_pages,
    guest_output,
    module_stats,
    read_stats,
    softpage,
    softpage_home,
    start_guest,
)
from tests.e2e.kmod_probe import early_drop, probe

pytestmark = pytest.mark.e2e

COLD_AGE_MS = 4000
HOT = (0, 2)
"""Manifest index and count of the hot files: data-000 and data-001, 16 MiB each."""
COLD = (2, 8)
"""The cold files: data-002 to data-009."""
SCAN_SAMPLES = 4
PAGES_PER_GIB = 262144


def files(guest: Guest, first: int, count: int, mode: str) -> dict[str, float]:
    return guest.workload_files(first, count, mode, timeout_s=300)


@contextlib.contextmanager
def armed(testbed: Testbed, guest: Guest, mode: str) -> Iterator[None]:
    """The module armed with ``prune-cache`` = ``mode`` by hand, as dom0 arms it for a migration;
    disarmed (and back to ``all``, as the module creates the key) afterwards."""
    home = softpage_home(guest)
    testbed.run(["xenstore-write", f"{home}/{abi.XS_PRUNE_CACHE}", mode, f"{home}/{abi.XS_ARMED}", "1"],
                check=True)
    try:
        yield
    finally:
        testbed.run(["xenstore-write", f"{home}/{abi.XS_ARMED}", "0", f"{home}/{abi.XS_PRUNE_CACHE}",
                     abi.XS_PRUNE_CACHE_ALL], check=True)


def scan_cost(testbed: Testbed, guest: Guest, mode: str) -> list[int]:
    """The module's periodic scans (every second while armed) with ``prune-cache`` = ``mode``:
    their ``last_scan_ns``, one sample a scan."""
    samples: list[int] = []
    with armed(testbed, guest, mode):
        scans = module_stats(guest, "scans")["scans"]
        deadline = time.monotonic() + 120
        while len(samples) < SCAN_SAMPLES and time.monotonic() < deadline:
            now = module_stats(guest, "scans", "last_scan_ns", "cache_cold", "nr_pfns")
            if now["scans"] > scans:
                scans = now["scans"]
                assert now["cache_cold"] == (mode == "cold"), now
                samples.append(now["last_scan_ns"])
            time.sleep(1)
    assert len(samples) == SCAN_SAMPLES, samples
    return samples


STOCK = "stock"
"""Not a cache mode: the same guest moved by stock ``xl migrate``."""


# cache=all is the drop every other pruned test runs; make test keeps cache=cold's own proof only
@pytest.mark.parametrize("cache", ["cold", pytest.param("all", marks=pytest.mark.matrix_only),
                                   pytest.param(STOCK, marks=pytest.mark.matrix_only)])
def test_cache_cold_keeps_the_hot_files_cached_and_drops_the_cold_ones(
    xen_pvh_testbed: Testbed, cache: str
) -> None:
    guest = start_guest(xen_pvh_testbed, f"sp-cache{cache}", memory_mb=512, cache_mb=0,
                        kmod_args=(f"cold_age_ms={COLD_AGE_MS}",))
    read_cold = files(guest, *COLD, "check")
    assert read_cold["bad"] == 0, read_cold
    guest.console_command("while true; do cat /data/data-000 /data/data-001 > /dev/null; sleep 1; done & "
                          "echo $! > /run/hot-reader.pid")
    # Two aging passes after the cold reads: the later scans see the cold set unused for >= 4 s.
    time.sleep(3 * COLD_AGE_MS / 1000 + 2)
    nr_pfns = module_stats(guest, "nr_pfns")["nr_pfns"]
    costs = {} if cache == STOCK else {mode: scan_cost(xen_pvh_testbed, guest, mode)
                                       for mode in ("all", "cold")}
    guest.console_command("kill $(cat /run/hot-reader.pid)")
    before_hot, before_cold = files(guest, *HOT, "resident"), files(guest, *COLD, "resident")
    for before, which in ((before_hot, HOT), (before_cold, COLD)):
        assert before["resident"] == before["pages"] == data_file_pages(xen_pvh_testbed, *which), before

    heartbeat = guest.heartbeat()
    disk = describe_disk_rate(xen_pvh_testbed.disk_rate)
    if cache == STOCK:
        moved = guest.migrate_localhost()
        after_hot, after_cold = files(guest, *HOT, "resident"), files(guest, *COLD, "resident")
        hot_read, cold_read = files(guest, *HOT, "check"), files(guest, *COLD, "check")
        assert hot_read["bad"] == 0 and cold_read["bad"] == 0, (hot_read, cold_read)
        print(f"stock xl migrate, {disk}: {moved['stream_bytes'] / 2**20:.1f} MiB, "
              f"{moved['migrate_s']:.1f} s; hot set resident "
              f"{after_hot['resident']:.0f}/{after_hot['pages']:.0f} pages, cold set "
              f"{after_cold['resident']:.0f}/{after_cold['pages']:.0f}; re-read hot {hot_read['read_s']} s, "
              f"cold {cold_read['read_s']} s (cold set first read {read_cold['read_s']} s)")
        # every page went with its data: both sets arrive cached
        assert after_hot["resident"] == after_hot["pages"], after_hot
        assert after_cold["resident"] == after_cold["pages"], after_cold
        assert_survived(guest, heartbeat)
        return
    result = softpage(xen_pvh_testbed, "migrate", "-s", "", "--prune", f"free,cache={cache},slab",
                      "--stats", STATS, guest.name, LOCALHOST_RECEIVER)
    assert result.ok, result.stderr
    rounds, totals = read_stats(xen_pvh_testbed)
    assert totals["cache_mode"] == cache and totals["warnings"] == [], totals
    after_hot, after_cold = files(guest, *HOT, "resident"), files(guest, *COLD, "resident")
    dropped = module_stats(guest, "cache_cold", "evict_candidates", "evicted_cache_pages", "remembered_cache",
                           "dropped_cache_pages", "age_passes", "last_age_ns", "early_drops",
                           "early_drop_ns", "drop_ns", "freeze_drops_skipped")
    hot_read, cold_read = files(guest, *HOT, "check"), files(guest, *COLD, "check")
    assert hot_read["bad"] == 0 and cold_read["bad"] == 0, (hot_read, cold_read)
    gib = nr_pfns / PAGES_PER_GIB
    print(f"cache={cache}, {disk}: {totals['pages_data']} pages with data, {totals['pages_xalloc']} XALLOC, "
          f"{totals['pages_skipped']} skipped, {int(totals['stream_bytes']) / 2**20:.1f} MiB, "  # type: ignore[call-overload]
          f"{totals['migration_s']} s, downtime {totals['downtime_s']} s, "
          f"first drop {totals['first_drop_s']} s, early drop {totals['guest_drop_s']} s, "
          f"downtime steps {totals['downtime_steps']}; "
          f"hot set resident {after_hot['resident']:.0f}/{after_hot['pages']:.0f} pages, cold set "
          f"{after_cold['resident']:.0f}/{after_cold['pages']:.0f}; re-read hot {hot_read['read_s']} s, "
          f"cold {cold_read['read_s']} s (cold set first read {read_cold['read_s']} s); module {dropped}; "
          f"scan ns all {costs['all']}, cold {costs['cold']} for {nr_pfns} PFNs "
          f"({min(costs['all']) / gib / 1e6:.0f} / {min(costs['cold']) / gib / 1e6:.0f} ms per GiB, "
          f"aging pass {dropped['last_age_ns'] / gib / 1e6:.0f} ms per GiB); rounds "
          f"{[(r['kind'], r['pages_data'], r['pages_xalloc']) for r in rounds]}")
    assert dropped["early_drops"] >= 1, dropped
    if cache == "cold":
        # The hot set was never reported soft: sent with data, still cached on the destination.
        assert after_hot["resident"] == after_hot["pages"], after_hot
        # The cold set was reported, evicted by the targeted drops, and held: most of it by the
        # first drop before round 1, the rest by the early drop. The module's counters are the
        # last drop's; its kernel log has one line for each drop.
        assert after_cold["resident"] <= after_cold["pages"] // 20, after_cold
        assert dropped["cache_cold"] == 1, dropped
        assert totals["first_drop_outcome"] == "done", totals
        drops = guest_output(guest, "COLDDROPS", "dmesg | grep 'softpage: early drop'")
        evicted = sum(int(pages) for pages in re.findall(r"early drop \d+: dropped (\d+) cache", drops))
        assert evicted >= before_cold["pages"] * 9 // 10, drops
    else:
        assert after_hot["resident"] <= after_hot["pages"] // 20, after_hot
        assert after_cold["resident"] <= after_cold["pages"] // 20, after_cold
        assert dropped["cache_cold"] == 0, dropped
        assert totals["first_drop_outcome"] is None, totals  # the hot cache stays until the end
    assert_survived(guest, heartbeat)


def test_cache_read_after_the_first_drop_stays_hot(xen_pvh_testbed: Testbed) -> None:
    """Cache the application read after the migration's first drop is hot however long ago: a
    file read once then is cold for the aging rule alone ``cold_age_ms`` to twice that later, but
    the application asked for it while the migration ran (docs/design.md, "Keep the hot cache").
    Done by hand as ``softpage migrate`` does it: arm with cold, a report, the first drop, the
    reads, a later report and the early drop."""
    guest = start_guest(xen_pvh_testbed, "sp-cacheread", memory_mb=512, cache_mb=0,
                        kmod_args=(f"cold_age_ms={COLD_AGE_MS}",))
    heartbeat = guest.heartbeat()
    assert files(guest, *COLD, "check")["bad"] == 0
    time.sleep(3 * COLD_AGE_MS / 1000 + 2)
    with armed(xen_pvh_testbed, guest, "cold"):
        assert probe(xen_pvh_testbed, guest, "request", "1")["snapshot"]["request_id"] == 1
        early_drop(xen_pvh_testbed, guest, 1)
        dropped = files(guest, *COLD, "resident")
        assert dropped["resident"] <= dropped["pages"] // 20, dropped
        # The drop forgot the PFNs it evicted: refilled with other files' pages they are not
        # evictable until a report calls them cache in turn.
        first = module_stats(guest, "evicted_cache_pages", "remembered_cache")
        assert first["evicted_cache_pages"] >= dropped["pages"] * 9 // 10, first
        assert first["remembered_cache"] <= dropped["pages"] // 20, first
        # Two of the cold files read again after the first drop, once, then left alone long
        # enough for the aging rule alone to call them cold.
        again = (COLD[0], 2)
        assert files(guest, *again, "check")["bad"] == 0
        time.sleep(3 * COLD_AGE_MS / 1000 + 2)
        report = probe(xen_pvh_testbed, guest, "request", "2")["snapshot"]
        early_drop(xen_pvh_testbed, guest, 2)
        kept = files(guest, *again, "resident")
        stats = module_stats(guest, "cache_cold", "evicted_cache_pages", "last_mark_ns", "early_drops")
    print(f"read after the first drop: {kept['resident']:.0f}/{kept['pages']:.0f} pages still cached after "
          f"the second drop; report 2's CACHE {report['count'][abi.CAT_CACHE]} pages; after the first "
          f"drop {first}; module {stats}")
    assert kept["resident"] == kept["pages"] == data_file_pages(xen_pvh_testbed, *again), kept
    assert stats["cache_cold"] == 1 and stats["early_drops"] == 2 and stats["last_mark_ns"] > 0, stats
    assert_survived(guest, heartbeat)
