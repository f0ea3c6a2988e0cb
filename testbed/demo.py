#!/usr/bin/env python3
"""`make demo`: boot the testbed, move a guest whose memory is mostly page cache with each
method, and print one table: what the move cost (time, stream) beside what the guest's
application paid for it afterwards (its hot files still cached or not, and the time it took to
read them again).

The guest (SOFTPAGE_DEMO_MEMORY_MB, default 256) keeps 16 MiB of anonymous memory dirty and
fills SOFTPAGE_DEMO_CACHE_MB (default 160) of page cache from its data disk at boot. An
application in it reads a hot set (``HOT_FILES``, 32 MiB of that cache) every second; the rest it
read once. Before each move every cached file has been read exactly once since the cache was
last dropped (at boot, or by ``refill`` after the previous move), so each method starts from the
same cache; then the application reads its hot set for ``HOT_READING_S``, long enough for the
module's aging passes (``cold_age_ms=COLD_AGE_MS``) to see the rest unused, and on through the
move (``HOT_READER``). After each move the
workload checks every anonymous byte and every cached file. Right after the move the application reads
its hot set once more, from memory if it arrived cached, else from the disk.

The guest's disk runs at SOFTPAGE_DISK_RATE (``DEMO_DISK_RATE`` when unset; ``0``: unthrottled)
while the guest moves and the application reads its hot set afterwards: that read's time depends
on it, and the table says which it was. The reads the demo does not time (the cache's fill at
boot and the checks before and after each move) run unthrottled, to keep the demo short.

Each method is a ``Method`` entry in ``METHODS``: a name and a function that moves the guest and
returns its wall time and stream bytes. The softpage rows run `softpage` in dom0 (the stream size
from its own --stats), the stock row `xl migrate` through a byte counter. A method during which
Xen logged a guest triple fault (nested SVM under TCG, see testbed/README.md) runs once more on a
fresh guest, as the e2e suite reruns such a test; any other failure ends the demo.

Environment: SOFTPAGE_DEMO_MEMORY_MB, SOFTPAGE_DEMO_CACHE_MB, SOFTPAGE_DISK_RATE and everything
TestbedConfig.from_env reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from softpage_testbed import (
    DISK_RATE_ENV,
    XEN_PVH_VERSION,
    Guest,
    GuestSpec,
    Testbed,
    TestbedConfig,
    TestbedError,
    booted_testbed,
    describe_disk_rate,
    parse_disk_rate,
    retry_after_triple_faults,
)

DEMO_DISK_RATE = "2M"
"""The demo's disk when SOFTPAGE_DISK_RATE is unset: 2 MiB/s, below the 3-4 MiB/s that a guest
reads its disk at under this TCG testbed even unthrottled (testbed/README.md, "The guests' disk
rate"), so that the rate is the one stated; a slow network disk or one shared by many guests."""
HOT_FILES = (0, 2)
"""The application's hot set: the data disk's first two files (16 MiB each), which the workload
also put into the cache at boot."""
COLD_AGE_MS = 4000
HOT_READING_S = 3 * COLD_AGE_MS / 1000 + 2
"""Two aging passes after the reads before it: the cold cache is then unused for over
COLD_AGE_MS, and ``cache=cold`` prunes it."""
FREEZES = "/sys/devices/platform/softpage/stats/freezes"
"""The module's count of armed suspends: the hot reader stops at the first one."""
HOT_READER = (f"f=$(cat {FREEZES}); while [ \"$(cat {FREEZES})\" = \"$f\" ]; do "
              "cat /data/data-000 /data/data-001 > /dev/null; sleep 1; done & echo $! > /run/hot-reader.pid")
"""The application: reads its hot set every second, through the move too, as a running
application does. It stops by itself once the module was frozen for a pruned move, so that the
read timed after the move is the first one on the destination; the demo stops it, and a read still
in progress, right after each move (a stock move does not arm the module). Stopped before the
move (the first version of this demo), the hot set went unread for far longer than
``COLD_AGE_MS`` during the move and ``cache=cold`` dropped it: 3% kept, in a run on 2026-12-06."""


@dataclasses.dataclass(frozen=True)
class Measurement:
    wall_s: float
    stream_bytes: int
    hot_cached_pages: int
    """The hot set's pages still in the guest's page cache right after the move."""
    hot_pages: int
    hot_read_s: float
    """The application's first read of its hot set after the move."""


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    move: Callable[[Guest], tuple[float, int]]
    """Moves the guest; its wall time and stream bytes."""


def stock_migrate(guest: Guest) -> tuple[float, int]:
    timings = guest.migrate_localhost()
    return timings["migrate_s"], int(timings["stream_bytes"])


SOFTPAGE_STATS = "/tmp/softpage-demo-stats.json"


def softpage_migrate(prune: str) -> Callable[[Guest], tuple[float, int]]:
    def move(guest: Guest) -> tuple[float, int]:
        result = guest.testbed.run(["python3", "-m", "softpage", "migrate", "--stats", SOFTPAGE_STATS,
                                    "--prune", prune, "-s", "", guest.name, "xl migrate-receive"],
                                   timeout_s=3600, check=True)
        totals = json.loads(guest.testbed.run(["tail", "-n", "1", SOFTPAGE_STATS], check=True).stdout)
        return result.wall_s, int(totals["stream_bytes"])

    return move


METHODS = [
    Method("xl migrate localhost (stock)", stock_migrate),
    Method("softpage migrate, cache=cold (default)", softpage_migrate("free,cache=cold,slab")),
    Method("softpage migrate, cache=all", softpage_migrate("free,cache=all,slab")),
]

COLUMNS = ("method", "time s", "stream MiB", "hot set cached after", "hot set re-read s", "guest after")


def format_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
             for row in [COLUMNS, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_row(name: str, measured: Measurement, state: str) -> tuple[str, ...]:
    share = measured.hot_cached_pages / measured.hot_pages if measured.hot_pages else 0.0
    return (name, f"{measured.wall_s:.1f}", f"{measured.stream_bytes / 2**20:.1f}",
            f"{share:.0%} ({measured.hot_cached_pages} of {measured.hot_pages} pages)",
            f"{measured.hot_read_s:.2f}", state)


@contextlib.contextmanager
def unthrottled(testbed: Testbed) -> Iterator[None]:
    """The guest's disk at full speed for reads the demo does not time; the stated rate after."""
    stated = testbed.disk_rate
    testbed.set_disk_rate(None)
    try:
        yield
    finally:
        testbed.set_disk_rate(stated)


def start_guest(testbed: Testbed, spec: GuestSpec) -> Guest:
    guest = testbed.create_guest(spec)
    with unthrottled(testbed):
        guest.wait_for_workload_ready()
    return guest


def verify(guest: Guest) -> str:
    """The workload's check of every anonymous byte and cached file: the table's last column."""
    with unthrottled(guest.testbed):
        verdict = guest.verify(timeout_s=900)
    return "alive, VERIFY ok" if verdict.ok and guest.boot_count() == 1 else verdict.line


def refill(guest: Guest) -> None:
    """Drop the guest's cache and read every file of it once, as the workload did at boot. A file
    read twice (the full check reads them all again) is active on the guest's LRU, hence hot for
    ``cache=cold`` whatever the application does: seen in the first run of this demo, where
    ``cache=cold`` then sent the whole cache (279 MiB against stock's 306)."""
    files = int(guest.wait_for(r"WORKLOAD READY .*files=(\d+)").group(1))
    with unthrottled(guest.testbed):
        guest.console_command("echo 3 > /proc/sys/vm/drop_caches")
        read = guest.workload_files(0, files, "check")
    if read["bad"]:
        raise TestbedError(f"guest {guest.name}: its cached files are not as on disk: {read}")


def move_and_wait(guest: Guest, method: Method) -> Measurement:
    """Let the application make its hot set hot, move the guest, and time the application's
    next read of its hot set."""
    guest.console_command(HOT_READER)
    time.sleep(HOT_READING_S)
    heartbeat = guest.heartbeat()
    wall_s, stream_bytes = method.move(guest)
    guest.console_command("kill $(cat /run/hot-reader.pid) 2>/dev/null; killall cat 2>/dev/null")
    hot = guest.workload_files(*HOT_FILES, "check")
    if hot["bad"]:
        raise TestbedError(f"guest {guest.name} after {method.name}: hot files not as on disk: {hot}")
    guest.wait_for_heartbeat(heartbeat + 2)
    return Measurement(wall_s, stream_bytes, int(hot["resident"]), int(hot["pages"]), hot["read_s"])


def main() -> int:
    memory_mb = int(os.environ.get("SOFTPAGE_DEMO_MEMORY_MB", "256"))
    cache_mb = int(os.environ.get("SOFTPAGE_DEMO_CACHE_MB", "160"))
    spec = GuestSpec(name="demo", guest_type="pvh", memory_mb=memory_mb, anon_mb=16, cache_mb=cache_mb,
                     dirty_rate=200, kmod_args=(f"cold_age_ms={COLD_AGE_MS}",))
    config = dataclasses.replace(TestbedConfig.from_env(XEN_PVH_VERSION),
                                 disk_rate=parse_disk_rate(os.environ.get(DISK_RATE_ENV, DEMO_DISK_RATE)))
    rows: list[tuple[str, ...]] = []
    started = time.monotonic()
    work_dir = Path(tempfile.mkdtemp(prefix="softpage-demo-"))
    try:
        with booted_testbed(config, work_dir) as testbed:
            print(f"testbed up: {testbed.boot_timings}; guest's {describe_disk_rate(testbed.disk_rate)}",
                  flush=True)
            guest = start_guest(testbed, spec)
            for index, method in enumerate(METHODS):
                print(f"running: {method.name}", flush=True)
                if index:
                    refill(guest)
                guest, measured = retry_after_triple_faults(
                    testbed, guest, functools.partial(move_and_wait, method=method),
                    functools.partial(start_guest, testbed, spec))
                rows.append(format_row(method.name, measured, verify(guest)))
    except TestbedError as error:
        print(f"demo failed: {error}", file=sys.stderr)
        return 1
    print()
    print(f"PVH guest, {memory_mb} MiB: {spec.anon_mb} MiB of anonymous memory, {cache_mb} MiB of page cache "
          f"read at boot, of which the application's hot set (data-000, data-001) was read every second "
          f"through the move; {describe_disk_rate(config.disk_rate)}")
    print(format_table(rows))
    print(f"\n(Xen {XEN_PVH_VERSION} under QEMU TCG: times are functional, not representative; "
          f"demo took {time.monotonic() - started:.0f} s)")
    return 0 if all(row[-1].startswith("alive") for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
