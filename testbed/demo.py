#!/usr/bin/env python3
"""`make demo`: boot the testbed, move a busy guest with each method, print one table.

Each method is a ``Method`` entry in ``METHODS``: a name and a function that moves the guest
and returns what it measured. The softpage rows run `softpage`
in dom0 (its stream size comes from its own --stats); the table, the guest set-up and the integrity
check are the same for every row.

A method during which Xen logged a guest triple fault (nested SVM under TCG, see
testbed/README.md) runs once more on a fresh guest, as the e2e suite reruns such a test; any other
failure ends the demo.

Environment: SOFTPAGE_DEMO_MEMORY_MB (guest memory, default 256), SOFTPAGE_DEMO_CACHE_MB (page
cache filled from the data disk, default 96) and everything TestbedConfig.from_env reads.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from softpage_testbed import (
    XEN_PVH_VERSION,
    Guest,
    GuestSpec,
    Testbed,
    TestbedConfig,
    TestbedError,
    booted_testbed,
    retry_after_triple_faults,
)


@dataclasses.dataclass(frozen=True)
class Measurement:
    wall_s: float
    stream_bytes: int


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    move: Callable[[Guest], Measurement]


def stock_save_restore(guest: Guest) -> Measurement:
    timings = guest.save_restore()
    return Measurement(timings["save_s"] + timings["restore_s"], int(timings["image_bytes"]))


def stock_migrate(guest: Guest) -> Measurement:
    timings = guest.migrate_localhost()
    return Measurement(timings["migrate_s"], int(timings["stream_bytes"]))


SOFTPAGE_STATS = "/tmp/softpage-demo-stats.json"


def softpage_run(guest: Guest, arguments: list[str]) -> tuple[float, int]:
    """Run ``softpage ARGUMENTS`` in dom0 with --stats; its wall time and stream bytes."""
    result = guest.testbed.run(["python3", "-m", "softpage", *arguments[:1], "--stats", SOFTPAGE_STATS,
                                *arguments[1:]], timeout_s=3600, check=True)
    totals = json.loads(guest.testbed.run(["tail", "-n", "1", SOFTPAGE_STATS], check=True).stdout)
    return result.wall_s, int(totals["stream_bytes"])


def softpage_migrate(extra: list[str]) -> Callable[[Guest], Measurement]:
    def move(guest: Guest) -> Measurement:
        wall_s, stream_bytes = softpage_run(guest, ["migrate", *extra, "-s", "", guest.name,
                                                    "xl migrate-receive"])
        return Measurement(wall_s, stream_bytes)

    return move


def softpage_save_restore(guest: Guest) -> Measurement:
    image = f"/var/lib/xen/softpage-{guest.name}.img"
    save_s, stream_bytes = softpage_run(guest, ["save", guest.name, image])
    restored = guest.testbed.run(["xl", "restore", image], timeout_s=3600, check=True)
    guest.testbed.run(["rm", "-f", image])
    return Measurement(save_s + restored.wall_s, stream_bytes)


METHODS = [
    Method("xl save + xl restore (stock)", stock_save_restore),
    Method("softpage save + xl restore", softpage_save_restore),
    Method("xl migrate localhost (stock)", stock_migrate),
    Method("softpage migrate --no-prune", softpage_migrate(["--no-prune"])),
    Method("softpage migrate (pruning)", softpage_migrate([])),
]

COLUMNS = ("method", "guest", "time s", "stream MiB", "guest after")


def format_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in [COLUMNS, *rows]) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
             for row in [COLUMNS, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def start_guest(testbed: Testbed, spec: GuestSpec) -> Guest:
    guest = testbed.create_guest(spec)
    guest.wait_for_workload_ready()
    return guest


def move_and_wait(guest: Guest, method: Method) -> Measurement:
    heartbeat = guest.heartbeat()
    measured = method.move(guest)
    guest.wait_for_heartbeat(heartbeat + 2)
    return measured


def main() -> int:
    memory_mb = int(os.environ.get("SOFTPAGE_DEMO_MEMORY_MB", "256"))
    cache_mb = int(os.environ.get("SOFTPAGE_DEMO_CACHE_MB", "96"))
    spec = GuestSpec(name="demo", guest_type="pvh", memory_mb=memory_mb, anon_mb=memory_mb // 4,
                     cache_mb=cache_mb, dirty_rate=200)
    guest_label = f"PVH {memory_mb} MiB"
    rows: list[tuple[str, ...]] = []
    started = time.monotonic()
    work_dir = Path(tempfile.mkdtemp(prefix="softpage-demo-"))
    try:
        with booted_testbed(TestbedConfig.from_env(XEN_PVH_VERSION), work_dir) as testbed:
            print(f"testbed up: {testbed.boot_timings}", flush=True)
            guest = start_guest(testbed, spec)
            for method in METHODS:
                print(f"running: {method.name}", flush=True)
                guest, measured = retry_after_triple_faults(
                    testbed, guest, functools.partial(move_and_wait, method=method),
                    functools.partial(start_guest, testbed, spec))
                verdict = guest.verify()
                state = "alive, VERIFY ok" if verdict.ok and guest.boot_count() == 1 else verdict.line
                rows.append((method.name, guest_label, f"{measured.wall_s:.1f}",
                             f"{measured.stream_bytes / 2**20:.1f}", state))
    except TestbedError as error:
        print(f"demo failed: {error}", file=sys.stderr)
        return 1
    print()
    print(format_table(rows))
    print(f"\n(Xen {XEN_PVH_VERSION} under QEMU TCG: times are functional, not representative; "
          f"demo took {time.monotonic() - started:.0f} s)")
    return 0 if all(row[-1].startswith("alive") for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
