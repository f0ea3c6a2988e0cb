#!/usr/bin/env python3
"""How many pages the armed guest module's periodic rescans add to each round (issue 19's
downtime): one PVH guest (SOFTPAGE_BENCH_GUEST_MB, default 2048) migrated to localhost with
pruning SOFTPAGE_BENCH_REPS times (default 2) for each value of softpage.ko's ``scan_interval_ms``
in SOFTPAGE_PROBE_INTERVALS (default "1000,0": every second while armed, the default, against
scans on dom0's requests only), interleaved, the parameter written in the guest (it is writable
at run time) before each migration. Per migration: every round's dirty pages and pages with
data from softpage's ``--stats``, the downtime, and what the receiver's tap read between the
suspend request and the stream's END (bytes, pages with data; one clock: one host). With
SOFTPAGE_PROBE_STOCK=1, first one stock `xl migrate` of the same guest, whose rounds only the tap
can count.

While armed the module walks the guest's memory every ``scan_interval_ms`` and publishes: it
clears and refills its private copy of the four category bitmaps and copies all of it into the
pages it shares with dom0 (softpage_publish), and both are guest pages the dirty log sees. A
migration that asks for no report in a round gains nothing from those scans.

    .venv/bin/python -m tests.bench.scan_probe     (writes results/scan-probe-DATE/)
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from softpage_testbed import Guest, TestbedConfig, booted_testbed
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
    with booted_testbed(TestbedConfig.from_env(xen_version),
                        Path(tempfile.mkdtemp(prefix="softpage-probe-"))) as testbed:
        install_dom0_tools(testbed)
        guest = start_guest(testbed, bench_guest("probe", guest_mb, 0))
        if os.environ.get("SOFTPAGE_PROBE_STOCK") == "1":
            measured = migrate_and_check(guest, "stock", "stock", full_check=False)
            send = measured["send"]
            assert isinstance(send, dict)
            line = {"method": "stock", "downtime_s": send.get("downtime_s"),
                    "after_suspend": after_suspend(measured)}
            lines.append(line)
            print(f"scan_probe: {json.dumps(line)}", flush=True)
        for repetition in range(repetitions):
            for interval in intervals:
                token = f"{interval}-{repetition}"
                set_interval(guest, interval, token)
                time.sleep(5)
                measured = migrate_and_check(guest, "prune", token, full_check=False)
                send = measured["send"]
                assert isinstance(send, dict)
                rounds = rounds_of(measured)
                line = {"scan_interval_ms": interval, "repetition": repetition,
                        "downtime_s": send.get("downtime_s"), "after_suspend": after_suspend(measured),
                        "rounds": [[r["kind"], r["dirty"], r["pages_data"]] for r in rounds]}
                lines.append(line)
                print(f"scan_probe: {json.dumps(line)}", flush=True)
                (out / "runs.jsonl").write_text("".join(json.dumps(item) + "\n" for item in lines))
    summary = [summary_line(lines, interval) for interval in intervals]
    (out / "summary.txt").write_text("\n".join(summary) + "\n")
    print("\n".join(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
