#!/usr/bin/env python3
"""Where a migration's downtime goes on the stock receiver, for stock `xl migrate` and softpage.

    .venv/bin/python -m tests.bench.receiver_timeline

Boots the testbed, starts one PVH guest (SOFTPAGE_TIMELINE_GUEST_MB, default 1024, with
SOFTPAGE_TIMELINE_ANON_MB of user allocation, default 200, and the rest page cache) and migrates
it to localhost SOFTPAGE_TIMELINE_REPS times (default 2) by each of SOFTPAGE_TIMELINE_METHODS
(default stock,no-prune; the senders of `make bench`), with the receiver run as `xl -vvv
migrate-receive` and its log time-stamped in dom0 (dom0/stamp.py). The downtime is measured as
`make bench` measures it (dom0/measure.py: suspend request -> incoming copy unpaused); the
receiver's log splits it at the steps below. Logs and a Markdown table go to
results/receiver-timeline-DATE/.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from softpage_testbed import XEN_PVH_VERSION, Guest, TestbedConfig, booted_testbed
from tests.bench import xen_bench

TOOLS = xen_bench.DOM0_TOOLS
RECEIVER_LOG = "/tmp/timeline-recv.log"
RECEIVER_STEPS = (
    ("restored", re.compile(r"xc: info: Restore successful")),
    ("hotplug_started", re.compile(r"forking to execute: \S+/block add")),
    ("hotplug_done", re.compile(r"No hotplug script to execute")),
    ("ready", re.compile(r"migration target: Transfer complete")),
    ("started", re.compile(r"migration target: Domain started")),
)
"""The receiver's milestones after the stream, in the order ``xl -vvv migrate-receive`` logs them
(libxc's restore done; libxl's disk hotplug script forked, then found done; "ready" sent; the
copy unpaused)."""


@dataclass(frozen=True)
class Timeline:
    """Seconds from the suspend request to each receiver milestone."""

    downtime_s: float
    at: dict[str, float]

    def spans(self) -> dict[str, float]:
        """Each milestone's distance from the one before (the first from the suspend request)."""
        spans, previous = {}, 0.0
        for name, _ in RECEIVER_STEPS:
            if name in self.at:
                spans[name] = self.at[name] - previous
                previous = self.at[name]
        return spans


def receiver_milestones(log: str) -> dict[str, float]:
    """The monotonic time of each milestone's first line in a stamped receiver log, each searched
    after the one before."""
    found: dict[str, float] = {}
    steps = iter(RECEIVER_STEPS)
    name, pattern = next(steps)
    for line in log.splitlines():
        stamp, _, text = line.partition(" ")
        if pattern.search(text):
            found[name] = float(stamp)
            try:
                name, pattern = next(steps)
            except StopIteration:
                break
    return found


def timeline(log: str, downtime_s: float) -> Timeline:
    """Milestones relative to the suspend request, which is placed ``downtime_s`` before the copy
    was started (measure.py's downtime ends at the first poll that sees it run, within 20 ms)."""
    milestones = receiver_milestones(log)
    if "started" not in milestones:
        raise ValueError("the receiver's log has no 'Domain started' line")
    requested = milestones["started"] - downtime_s
    return Timeline(downtime_s, {name: at - requested for name, at in milestones.items()})


def migrate_with_receiver_log(guest: Guest, method: str, out: Path, tag: str) -> Timeline:
    testbed = guest.testbed
    # The receiver's stderr goes through stamp.py, its stdout (the handshake) back to the sender.
    receive = f"{{ xl -vvv migrate-receive 2>&1 1>&3 | python3 {TOOLS}/stamp.py {RECEIVER_LOG} 3>&-; }} 3>&1"
    testbed.run(["rm", "-f", RECEIVER_LOG])
    heartbeat = guest.heartbeat()
    send = xen_bench.migrate(guest, method, receive)["send"]
    guest.wait_for_heartbeat(heartbeat + 2, timeout_s=300)
    log = testbed.run(["cat", RECEIVER_LOG], check=True).stdout
    (out / f"{tag}-{method}-receiver.log").write_text(log)
    assert isinstance(send, dict)
    return timeline(log, float(send["downtime_s"]))


def table(rows: list[tuple[str, int, Timeline]]) -> str:
    names = [name for name, _ in RECEIVER_STEPS]
    lines = ["| method | run | downtime s | " + " | ".join(f"-> {name} s" for name in names) + " |",
             "|---|---:|---:|" + "---:|" * len(names)]
    for method, run, line in rows:
        spans = line.spans()
        cells = [f"{spans[name]:.2f}" if name in spans else "-" for name in names]
        lines.append(f"| {method} | {run} | {line.downtime_s:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    guest_mb = int(os.environ.get("SOFTPAGE_TIMELINE_GUEST_MB", "1024"))
    anon_mb = int(os.environ.get("SOFTPAGE_TIMELINE_ANON_MB", "200"))
    repetitions = int(os.environ.get("SOFTPAGE_TIMELINE_REPS", "2"))
    methods = os.environ.get("SOFTPAGE_TIMELINE_METHODS", "stock,no-prune").split(",")
    xen_bench.size_testbed_for(guest_mb)
    out = xen_bench.REPO / "results" / time.strftime("receiver-timeline-%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    rows = []
    with booted_testbed(TestbedConfig.from_env(XEN_PVH_VERSION),
                        Path(tempfile.mkdtemp(prefix="softpage-timeline-"))) as testbed:
        xen_bench.install_dom0_tools(testbed)
        guest = xen_bench.start_guest(testbed, xen_bench.bench_guest("timeline", guest_mb, anon_mb))
        for run in range(repetitions):
            for method in methods:
                rows.append((method, run, migrate_with_receiver_log(guest, method, out, f"r{run}")))
                print(f"timeline: {method} #{run}: downtime {rows[-1][2].downtime_s:.2f} s", flush=True)
        xen_bench.check_guest(guest, "after the last migration")
        guest.destroy()
    header = (f"Receiver time line, {time.strftime('%Y-%m-%d %H:%M')}: PVH guest {guest_mb} MiB, user "
              f"{anon_mb} MB, Xen {XEN_PVH_VERSION} under QEMU TCG. Each column: seconds since the "
              "milestone before (the first: since the suspend request).\n\n")
    summary = header + table(rows)
    (out / "table.md").write_text(summary)
    print("\n" + summary + f"\nlogs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
