#!/usr/bin/env python3
"""What fills a pruned migration's final round (issue 19's downtime), first asked of the armed guest
module's periodic rescans: one PVH guest (SOFTPAGE_BENCH_GUEST_MB, default 2048) migrated to
localhost with pruning SOFTPAGE_BENCH_REPS times (default 2) for each value of softpage.ko's
``scan_interval_ms`` in SOFTPAGE_PROBE_INTERVALS (default "1000,0": every second while armed, the
default, against scans on dom0's requests only), interleaved, the parameter written in the guest
(it is writable at run time) before each migration. Per migration: every round's dirty pages and
pages with data from softpage's ``--stats``, the downtime, and what the receiver's tap read between
the suspend request and the stream's END (bytes, pages with data; one clock: one host). With
SOFTPAGE_PROBE_STOCK=1, first one stock `xl migrate` of the same guest, whose rounds only the tap
can count. With SOFTPAGE_PROBE_PFNS=1, each migration's final round is also classified: the PFNs
the tap saw with data between the suspend request and the END, looked up in the guest's
/proc/kpageflags once it runs again (``final_round_kinds``).

While armed the module walks the guest's memory every ``scan_interval_ms`` and publishes: it
clears and refills its private copy of the four category bitmaps and copies the frames that
changed into the pages it shares with dom0 (softpage_publish), and both are guest pages the dirty
log sees. A migration that asks for no report in a round gains nothing from those scans.

    .venv/bin/python -m tests.bench.scan_probe     (writes results/scan-probe-DATE/)
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from softpage_testbed import Guest, Testbed, TestbedConfig, booted_testbed
from tests.bench.link_bench import TIMELINE_BYTES, TIMELINE_PAGES, timeline_between
from tests.bench.xen_bench import (
    REPO,
    XEN_PVH_VERSION,
    bench_guest,
    install_dom0_tools,
    migrate_and_check,
    size_testbed_for,
    start_guest,
)

PARAMETER = "/sys/module/softpage/parameters/scan_interval_ms"
TAP_PFNS = "/tmp/bench-tap-pfns.txt"
GUEST_PFNS = "/tmp/probe-pfns"
PFNS_PER_LINE = 60
"""Console lines stay well under the tty's 4096-character line."""

KPF_BITS = {7: "slab", 10: "buddy", 12: "anon", 26: "pgtable", 32: "reserved", 5: "lru"}
"""/proc/kpageflags bits (include/uapi/linux/kernel-page-flags.h) the classes below are named after,
in order of precedence; a page with none of them is "other" (vmalloc, alloc_pages, kernel stacks)."""


def set_interval(guest: Guest, interval_ms: int, token: str) -> None:
    marker = f"PROBE-{token}"
    guest.console_command(f"echo {interval_ms} > {PARAMETER}; echo {marker} $(cat {PARAMETER})")
    guest.wait_for(rf"{marker} {interval_ms}\b")


def after_suspend(measured: dict[str, object]) -> list[float | None]:
    """[bytes, pages with data] the tap read from the suspend request to the END (both moments on
    this host's clock)."""
    send, tap = measured["send"], measured["tap"]
    assert isinstance(send, dict) and isinstance(tap, dict)
    requested, end_at, samples = send.get("requested_at"), tap.get("end_at"), tap.get("timeline")
    if not isinstance(requested, float | int) or not isinstance(end_at, float | int) or not samples:
        return [None, None]
    return [timeline_between(samples, requested, end_at, column)
            for column in (TIMELINE_BYTES, TIMELINE_PAGES)]


def final_round_pfns(testbed: Testbed, requested: float, end_at: float) -> list[int]:
    """The PFNs whose data the tap read from the suspend request to the END (one clock: one host)."""
    pfns: set[int] = set()
    for line in testbed.run(["cat", TAP_PFNS], check=True).stdout.splitlines():
        moment, *carried = line.split()
        if requested <= float(moment) <= end_at:
            pfns.update(int(pfn) for pfn in carried)
    return sorted(pfns)


def kind_of(flags: int, kernel_data: list[tuple[int, int]], pfn: int) -> str:
    """One class for a page: the first of KPF_BITS it has ("reserved" split into the kernel image's
    data and bss, and the rest: the memory map, per-CPU areas, early allocations)."""
    for bit, name in KPF_BITS.items():
        if flags >> bit & 1:
            if name == "reserved" and any(first <= pfn <= last for first, last in kernel_data):
                return "reserved-kernel-data"
            return name
    return "other"


def final_round_kinds(guest: Guest, pfns: list[int], token: str) -> list[tuple[int, int, str]]:
    """[PFN, kpageflags, class of ``kind_of``] for each of ``pfns``, from the guest's /proc/kpageflags
    read once it runs again after the migration (a page's use then, not at the suspend)."""
    guest.console_command(f"rm -f {GUEST_PFNS}")
    for start in range(0, len(pfns), PFNS_PER_LINE):
        chunk = " ".join(map(str, pfns[start:start + PFNS_PER_LINE]))
        guest.console_command(f"for p in {chunk}; do echo $p; done >> {GUEST_PFNS}")
    marker = f"PROBE-KINDS-{token}"
    # The echoed command shows $m, never the marker itself: only the answers match below.
    guest.console_command(
        f"m={marker}; grep -E 'Kernel (data|bss)' /proc/iomem | sed \"s/^ */$m-IOMEM /\"; "
        "od -An -v -t x8 -w8 /proc/kpageflags | awk -v m=$m 'NR == FNR {want[$1]; next} "
        f"(FNR - 1) in want {{print m \"-PFN\", FNR - 1, $1}}' {GUEST_PFNS} -; echo $m-DONE")
    guest.wait_for(rf"(?m)^{marker}-DONE", timeout_s=600, poll_s=5.0)
    log = guest.console_log()
    kernel_data = [(int(first, 16) >> 12, int(last, 16) >> 12) for first, last in
                   re.findall(rf"^{marker}-IOMEM ([0-9a-f]+)-([0-9a-f]+) :", log, re.MULTILINE)]
    return [(int(pfn), int(flags, 16), kind_of(int(flags, 16), kernel_data, int(pfn)))
            for pfn, flags in re.findall(rf"^{marker}-PFN (\d+) ([0-9a-f]{{16}})", log, re.MULTILINE)]


def classify_final_round(guest: Guest, measured: dict[str, object], token: str, out: Path) -> dict[str, int]:
    """Classify the final round of the migration just measured (SOFTPAGE_PROBE_PFNS=1): writes
    final-pfns-TOKEN.txt (PFN, flags, class) to ``out`` and returns the count of each class."""
    send, tap = measured["send"], measured["tap"]
    assert isinstance(send, dict) and isinstance(tap, dict)
    pfns = final_round_pfns(guest.testbed, float(send["requested_at"]), float(tap["end_at"]))
    rows = final_round_kinds(guest, pfns, token)
    (out / f"final-pfns-{token}.txt").write_text(
        "".join(f"{pfn} {flags:016x} {kind}\n" for pfn, flags, kind in rows))
    kinds: dict[str, int] = {"pfns": len(pfns), "classified": len(rows)}
    for _, _, kind in rows:
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def rounds_of(measured: dict[str, object]) -> list[dict[str, object]]:
    stats = measured.get("stats")
    assert isinstance(stats, list)
    return [record for record in stats if not record.get("totals")]


def summary_line(lines: list[dict[str, object]], interval: int) -> str:
    """The final rounds' pages with data, and the median dirty pages of the live rounds between
    the first and the final, of the migrations at ``interval``."""
    chosen = [line["rounds"] for line in lines if line.get("scan_interval_ms") == interval]
    finals = [rounds[-1][2] for rounds in chosen]  # type: ignore[index]
    between = [r[1] for rounds in chosen for r in rounds[1:-1] if r[1] is not None]  # type: ignore[index]
    middle = statistics.median(between) if between else None
    return (f"scan_interval_ms {interval}: final rounds' pages with data {finals}, "
            f"median dirty pages of the rounds between the first and the final {middle}")


def main() -> int:
    guest_mb = int(os.environ.get("SOFTPAGE_BENCH_GUEST_MB", "2048"))
    repetitions = int(os.environ.get("SOFTPAGE_BENCH_REPS", "2"))
    intervals = [int(value) for value in os.environ.get("SOFTPAGE_PROBE_INTERVALS", "1000,0").split(",")]
    os.environ.setdefault("SOFTPAGE_DATA_MB", "512")
    size_testbed_for(guest_mb)
    out = REPO / "results" / f"scan-probe-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True)
    lines: list[dict[str, object]] = []
    xen_version = os.environ.get("SOFTPAGE_BENCH_XEN", XEN_PVH_VERSION)
    tap_pfns = TAP_PFNS if os.environ.get("SOFTPAGE_PROBE_PFNS") == "1" else ""
    with booted_testbed(TestbedConfig.from_env(xen_version),
                        Path(tempfile.mkdtemp(prefix="softpage-probe-"))) as testbed:
        install_dom0_tools(testbed)
        guest = start_guest(testbed, bench_guest("probe", guest_mb, 0))
        if os.environ.get("SOFTPAGE_PROBE_STOCK") == "1":
            measured = migrate_and_check(guest, "stock", "stock", full_check=False, tap_pfns=tap_pfns)
            send = measured["send"]
            assert isinstance(send, dict)
            line = {"method": "stock", "downtime_s": send.get("downtime_s"),
                    "after_suspend": after_suspend(measured)}
            if tap_pfns:
                line["final_kinds"] = classify_final_round(guest, measured, "stock", out)
            lines.append(line)
            print(f"scan_probe: {json.dumps(line)}", flush=True)
        for repetition in range(repetitions):
            for interval in intervals:
                token = f"{interval}-{repetition}"
                set_interval(guest, interval, token)
                time.sleep(5)
                measured = migrate_and_check(guest, "prune", token, full_check=False, tap_pfns=tap_pfns)
                send = measured["send"]
                assert isinstance(send, dict)
                rounds = rounds_of(measured)
                line = {"scan_interval_ms": interval, "repetition": repetition,
                        "downtime_s": send.get("downtime_s"), "after_suspend": after_suspend(measured),
                        "rounds": [[r["kind"], r["dirty"], r["pages_data"]] for r in rounds]}
                if tap_pfns:
                    line["final_kinds"] = classify_final_round(guest, measured, token, out)
                lines.append(line)
                print(f"scan_probe: {json.dumps(line)}", flush=True)
                (out / "runs.jsonl").write_text("".join(json.dumps(item) + "\n" for item in lines))
    summary = [summary_line(lines, interval) for interval in intervals]
    (out / "summary.txt").write_text("\n".join(summary) + "\n")
    print("\n".join(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
