#!/usr/bin/env python3
"""`make bench-link`: stock `xl migrate` against softpage between two hosts across a shaped link
(issue 19), with a neighbour guest on the source host whose throughput says what a migration
costs the host's other tenants.

A ``TestbedPair`` (host-a, host-b: Xen 4.17.7 on Debian 12 unless SOFTPAGE_BENCH_XEN says
otherwise) boots with its link shaped by ``tc netem`` on both ends (SOFTPAGE_LINK_RATE, default
LINK_RATE; SOFTPAGE_LINK_DELAY ms one way, default LINK_DELAY_MS). A PVH guest
(SOFTPAGE_BENCH_GUEST_MB, default GUEST_MB) with SOFTPAGE_BENCH_ANON_MB of user allocation per
step (default "0") and as much page cache from its data disk as the rest holds runs on host-a;
for each step it goes to host-b SOFTPAGE_BENCH_REPS times (default 3) by each method
(SOFTPAGE_BENCH_METHODS, default all three; stock is always added unless the sweep continued in
SOFTPAGE_BENCH_OUT has a stock run at that step already), interleaved:

    stock      xl migrate -s "" GUEST "<to host-b>"
    no-prune   softpage migrate --no-prune -s "" GUEST "<to host-b>"
    prune      softpage migrate -s "" GUEST "<to host-b>"        (the default --prune)

One transport for all, SOFTPAGE_LINK_TRANSPORT: ``tcp`` (the default) is one plain TCP
connection (tests/bench/dom0/tcp_pipe.py: ``tcp_pipe.py connect host-b PORT`` on host-a, the
receiver under ``tcp_pipe.py serve`` on host-b); ``ssh`` is ``ssh [SOFTPAGE_LINK_SSH_OPTIONS]
host-b '<receiver>'``, as users run migrations. In a TCG dom0 ssh carries a fifth of what TCP
does or less, whatever the cipher (0.43 against 2.04 MiB/s at load 10; 1.9-2.2 against
12.5-17.1 MiB/s on an idle machine, 2026-12-06; testbed/README.md "The bench across the
link"): to make the wire the bottleneck at a rate that fits the time, the bench runs over TCP.
The default rate, LINK_RATE, is below what stock `xl migrate` reached over TCP on an idle
machine at 40 Mbit/s (2.2 MiB/s, results/link-bench-20261206-063712). Over TCP the
connection's kernel buffers are sized to SOFTPAGE_LINK_BUFFER_S seconds of the shaped rate
(default BUFFER_S; 0: the kernel's autotuning, megabytes, as before 2026-12-06): what the link has
queued when a sender suspends its guest crosses in the downtime. The receiver is
xen_bench's (tap.py counting the stream's bytes and pages in front of `xl migrate-receive`,
under measure.py) on host-b.

After each measured migration the guest must run on on host-b (heartbeats, no second boot) and
goes back to host-a unmeasured (`softpage migrate`, pruning, the same transport), where it
passes the workload's full check (SOFTPAGE_BENCH_CHECK=step: its files are only read back into
the page cache, and the full check runs once per step). Going back with the
default prune drops the cache that is cold by then, so the check reads it in once more: each
measured migration starts with the step's page cache, read once QUIET_S before it.

Measured per migration:
* pages with data and stream bytes (the tap on host-b); bytes on the wire: the link NIC's tx and
  rx counters on both hosts (ssh, TCP, IP, Ethernet included);
* migration time: the sender's wall time on host-a;
* downtime: from the suspend request (seen on host-a) to the incoming copy running unpaused (seen
  on host-b), with the two dom0 clocks related through an offset measured over the link right
  before and right after the migration (tests/bench/dom0/clock_offset.py: the shortest of 20 UDP
  round trips, midpoint), their mean applied; the round trip bounds the error. Split in two at
  the moment the stream's END record reached the tap on host-b: ``stream_end_s`` (what was still
  on its way at the suspend, and the final round) and ``restore_s`` (the receiver's work after
  the stream: the restore's end, devices, the ready/go exchange, the unpause); of the first,
  ``receiver_wait_s`` is the tap's waiting for the receiver to take the stream (tap.py), the rest
  the link's;
* dom0 CPU on both hosts: each dom0's busy time while its side ran (the sender on host-a, the
  receiver on host-b: measure.py);
* the neighbour: a second guest on host-a running `workload spin` (testbed/guest/workload.c),
  which prints the pages it rewrote each second; its rate while the migration ran against its
  rate in the SOFTPAGE_BENCH_QUIET_S seconds (default QUIET_S) of quiet just before;
* this machine's cores each host's QEMU took while the sender ran (``Testbed.qemu_cpu_s``): the
  two hosts share this machine's cores, and the neighbour is a guest of one of them.

Once per sweep, before the first run, ``neighbour_control`` measures the neighbour's rate with no
migration: quiet, while host-a's dom0 keeps one vCPU busy, while host-b's does (SOFTPAGE_BENCH_CONTROL_S
seconds each, default CONTROL_S; 0: not measured), into control.txt and the README's notes: what
the neighbour loses to its own host's dom0 working, and what it loses to the other host's QEMU on
this machine's shared cores, which no real pair of hosts has.

A run that fails (a guest triple fault under TCG, a migration error) is written to failures.txt
(and what keep_failure_logs keeps, to failed-N/),
the guest is started again on host-a, and the bench goes on with the next run (at most
MAX_FAILURES). Each run is appended to results/link-bench-DATE/runs.csv as it finishes, and the
summary (medians, ratios to stock, the targets of issue 19) rewritten into README.md after every
run; SOFTPAGE_BENCH_OUT=DIR continues a sweep in DIR, and ``python -m tests.bench.link_bench
--rewrite-readme DIR`` writes DIR's summary again with this code (its hand-written part kept).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from softpage_testbed import (
    CONSOLE_LOG_DIR,
    XEN_PVH_VERSION,
    Guest,
    GuestSpec,
    LinkShape,
    Testbed,
    TestbedConfig,
    TestbedError,
    TestbedPair,
    booted_pair,
)
from tests.bench import xen_bench
from tests.bench.xen_bench import (
    BENCH_STATS,
    DOM0_TOOLS,
    PRUNING_METHODS,
    REPO,
    MigrationRun,
    Run,
    append_run,
    bench_guest,
    bench_guest_kernel,
    cell,
    check_guest,
    chosen_methods,
    environment_list,
    guest_suspend_counters,
    install_dom0_tools,
    keep_round_stats,
    measured_sender_command,
    output_dir,
    read_runs,
    receiver_command,
    runs_to_do,
    start_guest,
    to_run,
    warm_cache,
)

LINK_METHODS = ("stock", "no-prune", "prune")
DOM0_PROFILE = "/etc/profile.d/softpage.sh"
TRANSPORTS = ("tcp", "ssh")
FIRST_PORT = 5400
"""Every clock probe and TCP stream of a run gets a port of its own from here on."""
ACCEPT_S = 900.0
"""How long a TCP receiver waits for its sender before it gives up."""
GUEST_MB = 512
"""2 GiB, the issue's size, costs about an hour a repetition here (results/link-bench-20261206-063712)."""
LINK_RATE = "16mbit"
LINK_DELAY_MS = 5.0
SSH_CIPHERS = ("-c aes128-ctr -m umac-64-etm@openssh.com",)
"""A cheaper cipher and MAC measured beside ssh's own choice (chacha20-poly1305) at the start."""
PROBE_MIB = 16
NEIGHBOUR_MB = 128
"""The neighbour guest's memory; it spins over NEIGHBOUR_SPIN_MB of it."""
NEIGHBOUR_SPIN_MB = 32
NEIGHBOUR = "neighbour"
QUIET_S = 75.0
"""The quiet before each measured migration: the neighbour's rate without one, and time for the
page cache the guest read back after its return to turn cold (softpage's default
``--prune cache=cold``: a file read once is cold 30-60 s after the read, docs/design.md), as in
the single-host bench's guest whose cache was read once at its start."""
CONTROL_S = 60.0
"""Each window of the neighbour's control (``neighbour_control``; SOFTPAGE_BENCH_CONTROL_S, 0: none)."""
BURN_ONE_CPU = "timeout {seconds:g} sh -c 'while :; do :; done'"
"""One dom0 vCPU kept busy for a while: the control's stand-in for a migration's dom0 work."""
BUFFER_S = 0.25
"""The TCP transport's socket buffers, in seconds of the shaped link (tcp_pipe.py --buffer)."""
MIN_BUFFER_BYTES = 64 << 10
CLOCK_PROBES = 20
MAX_FAILURES = 3
MIGRATION_SLACK_S = 600.0
SPIN_LINE = re.compile(r"WORKLOAD SPIN seq=(\d+) pages=(\d+) seconds=([0-9.]+)")
"""workload.c's spin mode, one line a second (its header comment owns the format)."""

TARGETS = {
    # issue 19, at 0 MB of user allocation, ratios to stock in the same run
    "prune": {"pages_data": 0.08, "wall_s": 0.25, "wire_bytes": 0.08, "dom0_cpu_a_s": 0.3,
              "dom0_cpu_b_s": 0.3, "neighbour_loss": 0.3, "neighbour_work_lost": 0.3, "downtime_s": 1.0},
    "no-prune": {"pages_data": 1.05, "wall_s": 1.05, "wire_bytes": 1.05, "dom0_cpu_a_s": 1.05,
                 "dom0_cpu_b_s": 1.05, "neighbour_loss": 1.05, "neighbour_work_lost": 1.05,
                 "downtime_s": 1.05},
}
"""The neighbour's loss is judged both ways: as the share of its rate while the migration runs
(``neighbour_loss``) and as the work that share costs it over the migration's time
(``neighbour_work_lost``)."""
COMPARED_WITH_STOCK = ("pages_data", "stream_bytes", "wire_bytes", "wall_s", "downtime_s",
                       "dom0_cpu_a_s", "dom0_cpu_b_s", "neighbour_loss", "neighbour_work_lost")
SUMMARY_FIELDS = (*COMPARED_WITH_STOCK, "suspended_s", "guest_suspend_s", "pages_xalloc", "rounds",
                  "early_drop_s", "neighbour_without", "neighbour_during", "clock_rtt_s", "load_1min",
                  "stream_end_s", "receiver_wait_s", "restore_s", "qemu_cores_a", "qemu_cores_b",
                  "final_pages_data", "after_suspend_bytes", "after_suspend_pages")


@dataclass
class LinkRun(MigrationRun):
    """A migration from host-a to host-b (``MigrationRun``'s fields first)."""

    pages_data: int
    pages_xalloc: int
    stream_bytes: int
    wire_bytes: int
    """Both directions on the link as host-a's NIC counted them (wire_a_tx + wire_a_rx)."""
    wire_a_tx: int
    wire_a_rx: int
    wire_b_tx: int
    wire_b_rx: int
    dom0_cpu_a_s: float | None
    """host-a's dom0 busy time while the sender ran."""
    dom0_cpu_b_s: float | None
    """host-b's dom0 busy time while the receiver ran."""
    receiver_wall_s: float
    rounds: int | None
    early_drop_s: float | None
    neighbour_without: float | None
    """The neighbour's pages/s in the quiet before the migration."""
    neighbour_during: float | None
    """Its pages/s while the sender ran."""
    neighbour_loss: float | None
    """1 - during / without: the share of its throughput the migration took."""
    clock_offset_s: float
    """host-b's monotonic clock minus host-a's (mean of before and after)."""
    clock_drift_s: float
    """The offset after the migration minus the one before."""
    clock_rtt_s: float
    """The longer of the two best round trips: the offset is good to half of it."""
    load_1min: float
    """This machine's load average when the run ended (other testbeds share its 2 cores)."""
    stream_end_s: float | None = None
    """From the suspend request (host-a) to the stream's END record at host-b's tap: the first
    part of ``downtime_s`` (None in runs before 2026-12-06's tap timeline)."""
    receiver_wait_s: float | None = None
    """Of ``stream_end_s``, the seconds the tap waited for the receiver to take the stream."""
    restore_s: float | None = None
    """From the END record at host-b's tap to the incoming copy running: the rest of the downtime."""
    qemu_cores_a: float | None = None
    """This machine's cores host-a's QEMU took while the sender ran (its CPU seconds over the
    sender's wall time; None in runs before 2026-12-06's afternoon). The neighbour is one of its
    vCPUs' guests: what the two QEMUs take beyond this machine's two cores, it waits for."""
    qemu_cores_b: float | None = None
    """The same for host-b's QEMU over the same interval."""
    final_pages_data: int | None = None
    """``Run.final_pages_data``: softpage's final round, in the downtime (None before 2026-12-07's
    noon, and for stock)."""
    after_suspend_bytes: float | None = None
    """Stream bytes that reached host-b's tap between the suspend request and the END record (the
    final round and what the link still held), for every method alike; None before 2026-12-07's
    noon."""
    after_suspend_pages: float | None = None
    """Of them, pages with data (read off the tap's timeline: within about 25 pages at 16 Mbit/s)."""

    @property
    def neighbour_work_lost(self) -> float | None:
        """The neighbour's pages not rewritten because of the migration: (without - during) x the
        migration's time. ``neighbour_loss`` is a share of its rate while the migration runs; a
        migration three times shorter at the same share costs the neighbour a third of the work,
        and the issue's "migration noise" is that whole cost."""
        if self.neighbour_without is None or self.neighbour_during is None:
            return None
        return (self.neighbour_without - self.neighbour_during) * self.wall_s


# -- pure parts -------------------------------------------------------------------------------

def spin_rate(console_text: str) -> float | None:
    """The neighbour's pages per second over the complete ``WORKLOAD SPIN`` lines of a slice of
    its console log (a slice may cut a line at either end: only whole lines count)."""
    pages = seconds = 0.0
    for line in console_text.replace("\r", "").split("\n")[:-1]:
        match = SPIN_LINE.fullmatch(line.strip())
        if match:
            pages += int(match.group(2))
            seconds += float(match.group(3))
    return pages / seconds if seconds > 0 else None


def throughput_loss(without: float | None, during: float | None) -> float | None:
    if without is None or during is None or without <= 0:
        return None
    return 1.0 - during / without


def cross_host_interval(start_on_a: float | None, end_on_b: float | None, offset_before: float,
                        offset_after: float) -> float | None:
    """Seconds from a moment on host-a's clock to one on host-b's, given host-b's clock minus
    host-a's measured before and after (their mean: the drift in between is reported beside)."""
    if start_on_a is None or end_on_b is None:
        return None
    return end_on_b - (offset_before + offset_after) / 2 - start_on_a


TIMELINE_BYTES, TIMELINE_WAITED, TIMELINE_PAGES = 1, 2, 3
"""The columns of a sample of the tap's timeline after its moment (tests/bench/dom0/tap.py):
stream bytes read, seconds waited for the receiver, pages with data read, all cumulative."""


def timeline_at(timeline: list[list[float]], moment: float, column: int) -> float | None:
    """The tap's cumulative ``column`` at ``moment`` (its clock), interpolated between the samples
    of its timeline (in time order); None for a timeline without that column (before 2026-12-07's
    noon a sample had no pages)."""
    if not timeline:
        return 0.0
    if len(timeline[0]) <= column:
        return None
    if moment <= timeline[0][0]:
        return 0.0
    for start, end in itertools.pairwise(timeline):
        if moment <= end[0]:
            share = (moment - start[0]) / (end[0] - start[0]) if end[0] > start[0] else 1.0
            return start[column] + share * (end[column] - start[column])
    return timeline[-1][column]


def timeline_between(timeline: list[list[float]], start: float, end: float, column: int) -> float | None:
    """How much of the tap's cumulative ``column`` came between ``start`` and ``end`` (its clock);
    None for a timeline without that column."""
    at_end, at_start = timeline_at(timeline, end, column), timeline_at(timeline, start, column)
    return None if at_end is None or at_start is None else at_end - at_start


DOWNTIME_PARTS = ("stream_end_s", "receiver_wait_s", "restore_s", "after_suspend_bytes",
                  "after_suspend_pages")


def downtime_parts(requested_on_a: float | None, tap: dict[str, object], running_on_b: float | None,
                   offset_before: float, offset_after: float) -> dict[str, float | None]:
    """The downtime split at the stream's END record on host-b (``stream_end_s``,
    ``restore_s``); within the first part, the tap's waits for the receiver and the stream's
    bytes and pages with data that reached host-b after the suspend request."""
    end_at = tap.get("end_at")
    if not isinstance(end_at, float | int) or requested_on_a is None or running_on_b is None:
        return dict.fromkeys(DOWNTIME_PARTS)
    timeline = tap.get("timeline")
    samples = timeline if isinstance(timeline, list) else []
    stream_end_s = cross_host_interval(requested_on_a, end_at, offset_before, offset_after)
    assert stream_end_s is not None  # both moments are known
    # the suspend request on host-b's clock: the END, stream_end_s earlier
    requested_on_b = end_at - stream_end_s
    return {
        "stream_end_s": stream_end_s,
        "receiver_wait_s": timeline_between(samples, requested_on_b, end_at, TIMELINE_WAITED),
        "restore_s": running_on_b - end_at,
        "after_suspend_bytes": timeline_between(samples, requested_on_b, end_at, TIMELINE_BYTES),
        "after_suspend_pages": timeline_between(samples, requested_on_b, end_at, TIMELINE_PAGES),
    }


def transport_buffer_bytes(shape: LinkShape | None, buffer_s: float) -> int | None:
    """The TCP transport's socket buffers: ``buffer_s`` seconds of the shaped rate, at least
    MIN_BUFFER_BYTES; None (the kernel's autotuning) for an unshaped link or ``buffer_s`` 0."""
    if shape is None or buffer_s <= 0:
        return None
    return max(MIN_BUFFER_BYTES, int(shape.bits_per_s() / 8 * buffer_s))


def qemu_cpu_s(pair: TestbedPair) -> list[float | None]:
    """Each host's ``Testbed.qemu_cpu_s`` now, host-a first."""
    return [testbed.qemu_cpu_s() for testbed in pair.testbeds]


def cores_taken(before: list[float | None], after: list[float | None], wall_s: float) -> list[float | None]:
    """Per host, the cores its QEMU took over ``wall_s``: CPU seconds between two readings of
    ``Testbed.qemu_cpu_s`` over the wall time (None where either reading is missing)."""
    return [None if start is None or end is None or wall_s <= 0 else (end - start) / wall_s
            for start, end in zip(before, after, strict=True)]


def link_delta(before: tuple[int, int], after: tuple[int, int]) -> tuple[int, int]:
    """(tx, rx) bytes between two readings of a NIC's counters."""
    tx, rx = after[0] - before[0], after[1] - before[1]
    if tx < 0 or rx < 0:
        raise ValueError(f"expected growing link counters, got {before} then {after}")
    return tx, rx


def step_methods(text: str, runs: list[LinkRun], anon_mb: int) -> tuple[str, ...]:
    """SOFTPAGE_BENCH_METHODS at step ``anon_mb``: the named methods in LINK_METHODS' order, with
    stock added unless ``runs`` (the sweep being continued) already has a stock run at that step:
    every ratio is to stock in the same sweep, so a continuation may add runs of the others."""
    has_stock = any(run.anon_mb == anon_mb and run.method == "stock" for run in runs)
    return chosen_methods(text, LINK_METHODS, with_stock=not has_stock)


def summarise(runs: list[LinkRun]) -> list[dict[str, object]]:
    """Medians per step and method, and each method's ratio to stock's median (the neighbour's
    loss: its loss over stock's)."""
    return xen_bench.summarise(runs, LINK_METHODS, SUMMARY_FIELDS, COMPARED_WITH_STOCK)


Verdict = tuple[str, str, float | None, float, bool]
"""(method, measure, ratio to stock, limit, met)."""


def targets(rows: list[dict[str, object]], anon_mb: int = 0) -> list[Verdict]:
    """Issue 19's targets at ``anon_mb``: (method, measure, ratio to stock, limit, met); a ratio
    not measured is not met."""
    verdicts = []
    for row in rows:
        if row["anon_mb"] != anon_mb or row["method"] not in TARGETS:
            continue
        for field, limit in TARGETS[str(row["method"])].items():
            ratio = row.get(f"{field}_vs_stock")
            value = float(ratio) if isinstance(ratio, float | int) else None
            verdicts.append((str(row["method"]), field, value, limit, value is not None and value <= limit))
    return verdicts


def markdown(rows: list[dict[str, object]], verdicts: list[Verdict]) -> str:
    def mib(value: object) -> object:
        return value / 2**20 if isinstance(value, float | int) else None

    def millions(value: object) -> object:
        return value / 1e6 if isinstance(value, float | int) else None

    lines = ["| user MB | method | runs | pages with data | x stock | stream MiB | wire MiB | x stock "
             "| time s | x stock | downtime s | x stock | dom0 CPU A s | x stock | dom0 CPU B s | x stock "
             "| neighbour pages/s quiet | during | loss | x stock | work lost, M pages | x stock | load |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
             "---:|---:|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row['anon_mb']} | {row['method']} | {row['runs']} | {cell(row['pages_data'], 0)} | "
            f"{cell(row['pages_data_vs_stock'])} | {cell(mib(row['stream_bytes']), 1)} | "
            f"{cell(mib(row['wire_bytes']), 1)} | {cell(row['wire_bytes_vs_stock'])} | "
            f"{cell(row['wall_s'], 1)} | {cell(row['wall_s_vs_stock'])} | {cell(row['downtime_s'])} | "
            f"{cell(row['downtime_s_vs_stock'])} | {cell(row['dom0_cpu_a_s'], 1)} | "
            f"{cell(row['dom0_cpu_a_s_vs_stock'])} | {cell(row['dom0_cpu_b_s'], 1)} | "
            f"{cell(row['dom0_cpu_b_s_vs_stock'])} | {cell(row['neighbour_without'], 0)} | "
            f"{cell(row['neighbour_during'], 0)} | {cell(row['neighbour_loss'])} | "
            f"{cell(row['neighbour_loss_vs_stock'])} | {cell(millions(row['neighbour_work_lost']), 1)} | "
            f"{cell(row['neighbour_work_lost_vs_stock'])} | {cell(row['load_1min'], 1)} |")
    lines += ["", "Where the downtime goes (medians, seconds; the stream's END record at host-b's tap splits "
              "it; of the first part, the guest's own suspend (from the request to Xen showing it shut "
              "down), the tap's waits for the receiver and what reached host-b after the suspend "
              "request; softpage's final round from its `--stats`, stock's rounds the stream "
              "does not tell apart):", "",
              "| user MB | method | downtime | suspend to END at host-b | of it, the guest's suspend "
              "| of it, waiting for the receiver "
              "| stream after the suspend request, MiB | of it, pages with data | END to running "
              "| final round, pages with data |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {row['anon_mb']} | {row['method']} | {cell(row['downtime_s'])} | "
              f"{cell(row['stream_end_s'])} | {cell(row['guest_suspend_s'])} | "
              f"{cell(row['receiver_wait_s'])} | "
              f"{cell(mib(row['after_suspend_bytes']), 1)} | {cell(row['after_suspend_pages'], 0)} | "
              f"{cell(row['restore_s'])} | {cell(row['final_pages_data'], 0)} |"
              for row in rows]
    if any(row.get("qemu_cores_a") is not None for row in rows):
        lines += ["", "Where the neighbour's rate goes (medians: this machine's cores each host's QEMU took "
                  "while the sender ran; the machine has " f"{os.cpu_count()}):", "",
                  "| user MB | method | neighbour loss | QEMU host-a cores | QEMU host-b cores |",
                  "|---:|---|---:|---:|---:|"]
        lines += [f"| {row['anon_mb']} | {row['method']} | {cell(row['neighbour_loss'])} | "
                  f"{cell(row['qemu_cores_a'])} | {cell(row['qemu_cores_b'])} |" for row in rows]
    lines += ["", "Targets of issue 19 (ratio to stock at 0 MB of user allocation):", ""]
    lines += [f"- {method} {field}: {cell(ratio)} (target <= {limit:g}): "
              f"{'not measured' if ratio is None else 'met' if met else 'MISSED'}"
              for method, field, ratio, limit, met in verdicts]
    if not verdicts:
        lines.append("- none measured yet: no softpage run at 0 MB of user allocation")
    return "\n".join(lines) + "\n"


# -- on the pair --------------------------------------------------------------------------------

def link_counters(pair: TestbedPair, testbed: Testbed) -> tuple[int, int]:
    """(tx, rx) bytes the host's link NIC counted since boot."""
    statistics_dir = f"/sys/class/net/{pair.plan.device}/statistics"
    text = testbed.run(f"cat {statistics_dir}/tx_bytes {statistics_dir}/rx_bytes", check=True).stdout
    tx, rx = (int(value) for value in text.split())
    return tx, rx


class Transport:
    """How a migration reaches the other host (SOFTPAGE_LINK_TRANSPORT), the same for every method
    and for the way back."""

    def __init__(self, kind: str, ssh_options: str, buffer_bytes: int | None = None) -> None:
        if kind not in TRANSPORTS:
            raise SystemExit(f"SOFTPAGE_LINK_TRANSPORT={kind}: expected one of {', '.join(TRANSPORTS)}")
        self.kind = kind
        self.ssh_options = ssh_options
        self.buffer_bytes = buffer_bytes
        """tcp only: tcp_pipe.py --buffer (None: the kernel's autotuning)."""
        self.ports = itertools.count(FIRST_PORT)

    def describe(self) -> str:
        if self.kind == "ssh":
            return f"`{shlex.join(['ssh', *shlex.split(self.ssh_options)])}`"
        buffers = ("the kernel's socket buffers" if self.buffer_bytes is None
                   else f"socket buffers of {self.buffer_bytes} bytes")
        return f"one plain TCP connection (tests/bench/dom0/tcp_pipe.py), {buffers}"

    def _buffer_option(self) -> str:
        return "" if self.buffer_bytes is None else f" --buffer {self.buffer_bytes}"

    def sender_rune(self, pair: TestbedPair, destination: Testbed, receive: str) -> str:
        """The HOST argument of ``xl migrate -s ""`` / ``softpage migrate -s ""`` that runs the
        ``receive`` command on ``destination`` (for TCP, started there now)."""
        name = pair.name(destination)
        if self.kind == "ssh":
            # ssh runs the receiver in a shell that is no login shell: dom0's profile (testbed/
            # dom0/configure.sh) puts the payload's softpage, which tap.py and measure.py import,
            # on its path
            return shlex.join(["ssh", *shlex.split(self.ssh_options), name, f". {DOM0_PROFILE}; {receive}"])
        port = next(self.ports)
        destination.run(f"nohup python3 {DOM0_TOOLS}/tcp_pipe.py serve{self._buffer_option()} {port} "
                        f"{ACCEPT_S:g} -- sh -c {shlex.quote(receive)} > /tmp/tcp-pipe-{port}.log 2>&1 &",
                        check=True)
        return f"python3 {DOM0_TOOLS}/tcp_pipe.py connect{self._buffer_option()} {name} {port}"


def clock_offset(pair: TestbedPair, port: int) -> tuple[float, float]:
    """(host-b's monotonic clock minus host-a's, the best round trip), over the link."""
    tool = f"{DOM0_TOOLS}/clock_offset.py"
    pair.b.run(f"nohup python3 {tool} serve {port} 30 > /dev/null 2>&1 &", check=True)
    result = pair.a.run(["python3", tool, "probe", pair.name(pair.b), str(port), str(CLOCK_PROBES)],
                        timeout_s=300, check=True)
    measured = json.loads(result.stdout)
    return float(measured["offset_s"]), float(measured["rtt_s"])


def console_size(testbed: Testbed, name: str) -> int:
    return int(testbed.run(["stat", "-c", "%s", f"{CONSOLE_LOG_DIR}/guest-{name}.log"], check=True).stdout)


def console_slice(testbed: Testbed, name: str, start: int, end: int) -> str:
    return testbed.run(f"tail -c +{start + 1} {CONSOLE_LOG_DIR}/guest-{name}.log | head -c {end - start}",
                       check=True).stdout


def live_state(xl_state: str) -> bool:
    """An `xl list` state column (``Guest.xl_state``) of a domain that runs: listed, with no
    ``s``, ``c`` or ``d`` set (shut down, crashed, dying)."""
    return bool(xl_state) and not set(xl_state) & set("scd")


def ensure_neighbour(neighbour: Guest, spin_mb: int, notes: list[str]) -> Guest:
    """The neighbour, running: ``neighbour`` itself, or a new one if it is gone or died. A guest
    that crashed stays in `xl list` in state ``c`` (guests keep ``on_crash = "preserve"`` for the
    logs), so its name alone does not say it runs."""
    if live_state(neighbour.xl_state()):
        return neighbour
    neighbour.destroy()
    testbed = neighbour.testbed
    notes.append(f"{time.strftime('%H:%M:%S')} the neighbour was gone or dead (Xen's log: "
                 f"{testbed.triple_faults()} guest triple faults so far); started again")
    print(f"link_bench: {notes[-1]}", file=sys.stderr, flush=True)
    return start_neighbour(testbed, spin_mb)


def neighbour_control(pair: TestbedPair, window_s: float) -> list[str]:
    """The neighbour's rate with no migration, in three windows of ``window_s``: quiet; while
    host-a's dom0 keeps one vCPU busy (BURN_ONE_CPU); while host-b's dom0 does; with each the
    cores each host's QEMU took from this machine. A migration costs the neighbour rate in two
    ways: its own host's dom0 works (the sender, which a real host shares with its guests too),
    and, on this testbed only, the other host's QEMU takes this machine's cores (the receiver:
    two hosts on one 2-core machine). Comparing the migrations' losses with these two tells the
    two apart. Returns one line per window."""
    lines = []
    quiet = None
    for label, busy in (("quiet", None), ("host-a's dom0 busy on one vCPU", pair.a),
                        ("host-b's dom0 busy on one vCPU", pair.b)):
        start = console_size(pair.a, NEIGHBOUR)
        before, began = qemu_cpu_s(pair), time.monotonic()
        if busy is None:
            time.sleep(window_s)
        else:
            busy.run(BURN_ONE_CPU.format(seconds=window_s), timeout_s=window_s + 120)
        cores = cores_taken(before, qemu_cpu_s(pair), time.monotonic() - began)
        rate = spin_rate(console_slice(pair.a, NEIGHBOUR, start, console_size(pair.a, NEIGHBOUR)))
        quiet = rate if busy is None else quiet
        loss = throughput_loss(quiet, rate)
        lines.append(f"{time.strftime('%H:%M:%S')} neighbour control, {label} for {window_s:g} s: "
                     f"{cell(rate, 0)} pages/s (loss {cell(loss)}); QEMU cores host-a {cell(cores[0])}, "
                     f"host-b {cell(cores[1])}")
        print(f"link_bench: {lines[-1]}", file=sys.stderr, flush=True)
    return lines


def start_neighbour(testbed: Testbed, spin_mb: int) -> Guest:
    """The neighbour guest, its workload idle (no user memory, no cache, no dirtying), then
    `workload spin` typed into its shell. A PV guest: as a PVH guest it triple-faulted within
    minutes in three of four pair boots (2026-12-06; twice with Xen's own RIP, ffff82d0402044a5,
    in its saved state: TCG's nested SVM); a PV guest runs without SVM. It is never migrated, so PV's need of
    shadow paging for log-dirty does not arise."""
    spec = GuestSpec(name=NEIGHBOUR, guest_type="pv", memory_mb=NEIGHBOUR_MB, anon_mb=0, cache_mb=0,
                     dirty_rate=0, load_kmod=False, data_disk=False, kernel=bench_guest_kernel())
    guest = testbed.create_guest(spec, timeout_s=900)
    guest.console_command(f"/bin/workload spin --mb {spin_mb} &")
    guest.wait_for(r"WORKLOAD SPIN seq=\d+ ", timeout_s=300)
    return guest


def read_remote_json(testbed: Testbed, path: str, timeout_s: float = 120) -> dict[str, object]:
    """A JSON summary a dom0 tool writes when its command ended, which may be after the sender's
    end (stock xl does not wait for its receiver)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = testbed.run(["cat", path])
        if result.ok and result.stdout.strip():
            loaded = json.loads(result.stdout)
            assert isinstance(loaded, dict)
            return loaded
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} on {testbed.config.link.host if testbed.config.link else '?'}: "
                               f"not written {timeout_s:.0f} s after the sender ended")
        time.sleep(2)


def migration_timeout_s(memory_mb: int, shape: LinkShape | None) -> float:
    """How long a measured migration may take before it counts as hung: three times the guest's
    memory at the link's rate (1 MiB/s if unshaped), and MIGRATION_SLACK_S. A guest that
    triple-faults under TCG in the middle of a migration leaves `xl migrate` waiting for ever."""
    bytes_per_s = shape.bits_per_s() / 8 if shape else float(2**20)
    return MIGRATION_SLACK_S + 3 * (memory_mb << 20) / bytes_per_s


def measured_migration(pair: TestbedPair, guest: Guest, method: str, transport: Transport,
                       quiet_s: float) -> tuple[dict[str, object], dict[str, float | int | None]]:
    """One measured migration of ``guest`` from host-a to host-b by ``method``, with the quiet
    window of the neighbour before it; returns xen_bench's measured dict and this bench's
    cross-host measures."""
    pair.a.run(["rm", "-f", "/tmp/bench-send.json", BENCH_STATS], check=True)
    pair.b.run(["rm", "-f", "/tmp/bench-recv.json", "/tmp/bench-tap.json"], check=True)
    quiet_start = console_size(pair.a, NEIGHBOUR)
    time.sleep(quiet_s)
    quiet_end = console_size(pair.a, NEIGHBOUR)
    offset_before, rtt_before = clock_offset(pair, next(transport.ports))
    rune = transport.sender_rune(pair, pair.b, receiver_command(watch="incoming"))
    command = measured_sender_command(method, guest, rune)
    counters_before = {name: link_counters(pair, testbed) for name, testbed in (("a", pair.a), ("b", pair.b))}
    during_start = console_size(pair.a, NEIGHBOUR)
    qemu_before, began = qemu_cpu_s(pair), time.monotonic()
    result = pair.a.run(command, timeout_s=migration_timeout_s(guest.spec.memory_mb, LinkShape.from_env()))
    qemu_cores = cores_taken(qemu_before, qemu_cpu_s(pair), time.monotonic() - began)
    during_end = console_size(pair.a, NEIGHBOUR)
    if not result.ok:
        raise RuntimeError(f"{method} migration failed (rc {result.rc}): {result.stderr[-3000:]}")
    measured: dict[str, object] = {
        "send": read_remote_json(pair.a, "/tmp/bench-send.json"),
        "recv": read_remote_json(pair.b, "/tmp/bench-recv.json"),
        "tap": read_remote_json(pair.b, "/tmp/bench-tap.json"),
    }
    counters_after = {name: link_counters(pair, testbed) for name, testbed in (("a", pair.a), ("b", pair.b))}
    offset_after, rtt_after = clock_offset(pair, next(transport.ports))
    if method != "stock":
        lines = pair.a.run(["cat", BENCH_STATS], check=True).stdout.splitlines()
        measured["stats"] = [json.loads(line) for line in lines]
    send, recv, tap = measured["send"], measured["recv"], measured["tap"]
    assert isinstance(send, dict) and isinstance(recv, dict) and isinstance(tap, dict)
    a_tx, a_rx = link_delta(counters_before["a"], counters_after["a"])
    b_tx, b_rx = link_delta(counters_before["b"], counters_after["b"])
    without = during = None
    if NEIGHBOUR in pair.a.domains():  # else it died in the window (a triple fault under TCG)
        without = spin_rate(console_slice(pair.a, NEIGHBOUR, quiet_start, quiet_end))
        during = spin_rate(console_slice(pair.a, NEIGHBOUR, during_start, during_end))
    # the sender's own downtimes looked for the incoming copy on host-a: replaced by the
    # cross-host ones
    send["downtime_s"] = cross_host_interval(send.get("requested_at"), recv.get("running_at"),  # type: ignore[arg-type]
                                             offset_before, offset_after)
    send["suspended_s"] = cross_host_interval(send.get("suspended_at"), recv.get("running_at"),  # type: ignore[arg-type]
                                              offset_before, offset_after)
    extra: dict[str, float | int | None] = {
        "wire_a_tx": a_tx, "wire_a_rx": a_rx, "wire_b_tx": b_tx, "wire_b_rx": b_rx,
        "dom0_cpu_b_s": recv.get("dom0_cpu_s"),  # type: ignore[dict-item]
        "receiver_wall_s": float(str(recv["wall_s"])),
        "neighbour_without": without, "neighbour_during": during,
        "clock_offset_s": (offset_before + offset_after) / 2, "clock_drift_s": offset_after - offset_before,
        "clock_rtt_s": max(rtt_before, rtt_after),
        "qemu_cores_a": qemu_cores[0], "qemu_cores_b": qemu_cores[1],
        **downtime_parts(send.get("requested_at"), tap, recv.get("running_at"),  # type: ignore[arg-type]
                         offset_before, offset_after),
    }
    return measured, extra


def to_link_run(run: Run, extra: dict[str, float | int | None]) -> LinkRun:
    def measured(name: str) -> float | None:
        value = extra.get(name)
        return None if value is None else float(value)

    def counted(name: str) -> int:
        return int(extra[name] or 0)

    without, during = measured("neighbour_without"), measured("neighbour_during")
    return LinkRun(
        anon_mb=run.anon_mb, cache_mb=run.cache_mb, method=run.method, repetition=run.repetition,
        wall_s=run.wall_s, downtime_s=run.downtime_s, suspended_s=run.suspended_s,
        pages_data=run.pages_data, pages_xalloc=run.pages_xalloc, stream_bytes=run.stream_bytes,
        wire_bytes=counted("wire_a_tx") + counted("wire_a_rx"), wire_a_tx=counted("wire_a_tx"),
        wire_a_rx=counted("wire_a_rx"), wire_b_tx=counted("wire_b_tx"), wire_b_rx=counted("wire_b_rx"),
        dom0_cpu_a_s=run.dom0_cpu_s, dom0_cpu_b_s=measured("dom0_cpu_b_s"),
        receiver_wall_s=measured("receiver_wall_s") or 0.0, rounds=run.rounds, early_drop_s=run.early_drop_s,
        neighbour_without=without, neighbour_during=during, neighbour_loss=throughput_loss(without, during),
        clock_offset_s=measured("clock_offset_s") or 0.0, clock_drift_s=measured("clock_drift_s") or 0.0,
        clock_rtt_s=measured("clock_rtt_s") or 0.0, load_1min=os.getloadavg()[0],
        stream_end_s=measured("stream_end_s"), receiver_wait_s=measured("receiver_wait_s"),
        restore_s=measured("restore_s"), qemu_cores_a=measured("qemu_cores_a"),
        qemu_cores_b=measured("qemu_cores_b"), final_pages_data=run.final_pages_data,
        after_suspend_bytes=measured("after_suspend_bytes"),
        after_suspend_pages=measured("after_suspend_pages"),
    )


def boots_seen(testbed: Testbed, guest: Guest) -> int:
    """How often this host's console logs saw the guest boot (0 where it only ever arrived)."""
    return Guest(testbed, guest.spec).boot_count()


def arrive(source: Testbed, destination: Testbed, guest: Guest, heartbeat: int, boots: int) -> Guest:
    """The guest left ``source`` and runs on ``destination``, not booted again there."""
    if guest.name in source.domains():
        raise RuntimeError(f"{guest.name} still on the source after its migration: {source.domains()}")
    arrived = Guest(destination, guest.spec)
    arrived.wait_for_heartbeat(heartbeat + 2, timeout_s=300)
    if boots_seen(destination, guest) != boots:
        raise RuntimeError(f"{guest.name} booted again on the destination")
    return arrived


def one_run(pair: TestbedPair, guest: Guest, method: str, repetition: int, transport: Transport,
            quiet_s: float, full_check: bool) -> tuple[Guest, LinkRun, Run, dict[str, object]]:
    """host-a -> host-b measured, then back unmeasured; returns the guest on host-a again."""
    heartbeat, boots_b = guest.heartbeat(), boots_seen(pair.b, guest)
    measured, extra = measured_migration(pair, guest, method, transport, quiet_s)
    on_b = arrive(pair.a, pair.b, guest, heartbeat, boots_b)
    token = f"{guest.spec.anon_mb}-{method}-{repetition}"
    if method in PRUNING_METHODS:
        measured["guest_counters"] = guest_suspend_counters(on_b, token)
    run = to_run(guest.spec.anon_mb, guest.spec.cache_mb, method, repetition, measured)
    heartbeat, boots_a = on_b.heartbeat(), boots_seen(pair.a, guest)
    back = pair.b.run(["python3", "-m", "softpage", "migrate", "-q", "-s", "", guest.name,
                       transport.sender_rune(pair, pair.a, "xl migrate-receive")], timeout_s=3600)
    if not back.ok:
        raise RuntimeError(f"the migration back to host-a failed (rc {back.rc}): {back.stderr[-3000:]}")
    on_a = arrive(pair.b, pair.a, guest, heartbeat, boots_a)
    if full_check:
        check_guest(on_a, f"after {method} and back")
    else:
        warm_cache(on_a, token)
    return on_a, to_link_run(run, extra), run, measured


def keep_failure_logs(pair: TestbedPair, name: str, folder: Path) -> None:
    """The guest's console logs on both hosts (what it was doing when a run failed), the tail of
    each Xen's log, softpage's --stats of the failed migration (if it wrote any) and the guest's
    xenstore keys on host-a (the early drop's and the suspend request's state as dom0 left them)
    and host-a's dom0 and xenstored logs, into ``folder``, before a fresh guest's start removes them."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "softpage-stats.jsonl").write_text(pair.a.run(["cat", BENCH_STATS]).stdout)
    keys = pair.a.run(f"domid=$(xl domid {name}) && for dir in data control; do "
                      f"xenstore-ls -fp /local/domain/$domid/$dir; done", timeout_s=120)
    (folder / "host-a-guest-xenstore.txt").write_text(keys.stdout + keys.stderr)
    dom0_logs = pair.a.run("dmesg | tail -n 100; ls -l /var/log/xen; tail -n 100 /var/log/xen/xenstored*.log",
                           timeout_s=120)
    (folder / "host-a-dom0-logs.txt").write_text(dom0_logs.stdout + dom0_logs.stderr)
    for host, testbed in (("host-a", pair.a), ("host-b", pair.b)):
        logs = testbed.run(f"tail -c 200000 {CONSOLE_LOG_DIR}/guest-{name}.log", timeout_s=120)
        (folder / f"{host}-guest-{name}.log").write_text(logs.stdout)
        xen_log = testbed.run("xl dmesg | tail -n 300", timeout_s=120)
        (folder / f"{host}-xl-dmesg.log").write_text(xen_log.stdout)


def start_again(pair: TestbedPair, spec: GuestSpec, failures: list[str], failures_path: Path, what: str,
                error: Exception, limit: int) -> Guest:
    """After a failed run or boot (``what``): the failure recorded in ``failures`` and
    failures.txt, the guest gone from both hosts, a fresh one on host-a, or the end once
    ``failures`` holds ``limit`` (the failures of a continued sweep's earlier sessions and
    MAX_FAILURES of this one)."""
    failures.append(f"{time.strftime('%H:%M:%S')} user {spec.anon_mb} MB, {what}: "
                    f"{str(error)[:300]}".replace("\n", " "))
    failures_path.write_text("\n".join(failures) + "\n")
    print(f"link_bench: FAILED {failures[-1]}", file=sys.stderr, flush=True)
    keep_failure_logs(pair, spec.name, failures_path.parent / f"failed-{len(failures)}")
    if len(failures) >= limit:
        raise SystemExit(f"link_bench: {MAX_FAILURES} failed runs, stopping")
    for testbed in pair.testbeds:
        # its console logs too: a new guest's heartbeats start again at 0
        testbed.run(f"xl destroy {spec.name}; rm -f {CONSOLE_LOG_DIR}/guest-{spec.name}*.log", timeout_s=300)
    return start_guest(pair.a, spec)


def measure_transports(pair: TestbedPair, mib: int, ssh_options: str) -> str:
    """What the unshaped link carries from host-a to host-b: plain TCP, ssh with its own choice of
    cipher, with SSH_CIPHERS, and with ``ssh_options``."""
    measured = [f"TCP {pair.measure_tcp(pair.a, mib):.2f} MiB/s"]
    for options in dict.fromkeys(("", *SSH_CIPHERS, ssh_options)):
        rate = pair.measure_ssh(pair.a, mib, options)
        measured.append(f"`ssh {options}`".replace(" `", "`") + f" {rate:.2f} MiB/s")
    summary = f"{mib} MiB each, " + ", ".join(measured) + f" (load `{machine_load()}`)"
    print(f"link_bench: {summary}", file=sys.stderr, flush=True)
    return summary


def machine_load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def size_hosts_for(guest_mb: int) -> None:
    """The pair's sizes for a guest of ``guest_mb``, unless the environment sets them: the data disk
    as large as the guest; each host holds dom0, one copy of the guest and the neighbour (no
    localhost migration: no second copy)."""
    os.environ.setdefault("SOFTPAGE_DATA_MB", str(guest_mb))
    os.environ.setdefault("SOFTPAGE_QEMU_MEM_MB", str(1024 + guest_mb + NEIGHBOUR_MB + 768))


def hand_written_part(readme: Path) -> str:
    """The hand-written part of a results README (from HAND_WRITTEN on), or "" if it has none or
    does not exist yet: what a bench keeps when it writes its summary again."""
    old = readme.read_text() if readme.exists() else ""
    return old[old.index(HAND_WRITTEN):] if HAND_WRITTEN in old else ""


def write_readme(out: Path, header: str, runs: list[LinkRun], failures: list[str], notes: list[str]) -> str:
    """The summary under ``header``; the hand-written part of a README already in ``out`` (a
    continued sweep's) is kept after it."""
    rows = summarise(runs)
    table = markdown(rows, targets(rows))
    failed = "".join(f"- {failure}\n" for failure in failures) or "- none\n"
    noted = "".join(f"- {note}\n" for note in notes) or "- none\n"
    readme = out / "README.md"
    hand = hand_written_part(readme)
    readme.write_text(f"{header}\n\n## Medians\n\n{table}\n## Failed runs (not in the table)\n\n"
                      f"{failed}\n## Notes\n\n{noted}{hand}")
    return table


HAND_WRITTEN = "\n## What this run is (written by hand"
"""Where a results README's hand-written part starts: kept when the summary is written again."""


def rewrite_readme(out: Path) -> str:
    """The summary of results in ``out`` written again by this code (after a change to the
    summary, or for a sweep an older version ran), from its runs.csv, failures.txt and notes.txt;
    the header the bench wrote and the hand-written part after the notes stay as they are."""
    header = (out / "README.md").read_text().split("\n\n## Medians", 1)[0]
    lines = {name: (out / name).read_text().splitlines() if (out / name).exists() else []
             for name in ("failures.txt", "notes.txt")}
    return write_readme(out, header, read_runs(out / "runs.csv", LinkRun), lines["failures.txt"],
                        lines["notes.txt"])


def main() -> int:
    if sys.argv[1:2] == ["--rewrite-readme"] and len(sys.argv) == 3:
        print(rewrite_readme(Path(sys.argv[2])))
        return 0
    guest_mb = int(os.environ.get("SOFTPAGE_BENCH_GUEST_MB", str(GUEST_MB)))
    steps = environment_list("SOFTPAGE_BENCH_ANON_MB", "0")
    repetitions = int(os.environ.get("SOFTPAGE_BENCH_REPS", "3"))
    methods = os.environ.get("SOFTPAGE_BENCH_METHODS", ",".join(LINK_METHODS))
    full_check = os.environ.get("SOFTPAGE_BENCH_CHECK", "each") != "step"
    ssh_options = os.environ.get("SOFTPAGE_LINK_SSH_OPTIONS", "")
    quiet_s = float(os.environ.get("SOFTPAGE_BENCH_QUIET_S", str(QUIET_S)))
    spin_mb = int(os.environ.get("SOFTPAGE_BENCH_NEIGHBOUR_MB", str(NEIGHBOUR_SPIN_MB)))
    control_s = float(os.environ.get("SOFTPAGE_BENCH_CONTROL_S", str(CONTROL_S)))
    xen_version = os.environ.get("SOFTPAGE_BENCH_XEN", XEN_PVH_VERSION)
    os.environ.setdefault("SOFTPAGE_LINK_RATE", LINK_RATE)
    os.environ.setdefault("SOFTPAGE_LINK_DELAY", f"{LINK_DELAY_MS:g}")
    shape = LinkShape.from_env()
    buffer_s = float(os.environ.get("SOFTPAGE_LINK_BUFFER_S", str(BUFFER_S)))
    transport = Transport(os.environ.get("SOFTPAGE_LINK_TRANSPORT", "tcp"), ssh_options,
                          transport_buffer_bytes(shape, buffer_s))
    size_hosts_for(guest_mb)
    out = output_dir(guest_mb, prefix="link-bench")
    runs_path = out / "runs.csv"
    runs = read_runs(runs_path, LinkRun)
    failures_path = out / "failures.txt"
    failures = failures_path.read_text().splitlines() if failures_path.exists() else []
    failure_limit = len(failures) + MAX_FAILURES
    notes_path = out / "notes.txt"
    notes = notes_path.read_text().splitlines() if notes_path.exists() else []
    done = {(run.anon_mb, run.method, run.repetition) for run in runs}
    started = time.monotonic()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=False).stdout.strip()
    config = TestbedConfig.from_env(xen_version)
    probe_mib = int(os.environ.get("SOFTPAGE_BENCH_PROBE_MIB", str(PROBE_MIB)))
    with booted_pair(config, config, Path(tempfile.mkdtemp(prefix="softpage-link-bench-"))) as pair:
        for testbed in pair.testbeds:
            install_dom0_tools(testbed)
            for tool in ("clock_offset.py", "tcp_pipe.py"):
                testbed.write_file(f"{DOM0_TOOLS}/{tool}", (REPO / "tests/bench/dom0" / tool).read_text())
        carried = measure_transports(pair, probe_mib, ssh_options) if probe_mib else "not measured"
        (out / "transport.txt").write_text(carried + "\n")
        pair.apply_shape(shape)
        xen_info = "; ".join(" ".join(line.split()) for line in
                             pair.a.run("xl info | grep -E '^(xen_version|nr_cpus)'").stdout.splitlines())
        header = (f"# Across the link: stock `xl migrate` vs softpage, host-a to host-b "
                  f"({time.strftime('%Y-%m-%d %H:%M')} UTC, commit {commit})\n\n"
                  f"`make bench-link` (tests/bench/link_bench.py): a PVH guest of {guest_mb} MiB on Linux "
                  f"{bench_guest_kernel()}, user allocation steps {steps} MB, up to {repetitions} "
                  f"interleaved repetitions, medians; Xen {xen_version} ({config.platform.release} dom0) on "
                  f"both hosts, {xen_info}, under QEMU TCG on this machine ({os.cpu_count()} cores, shared "
                  f"with other testbeds: load at start `{machine_load()}`). "
                  f"Link: {shape.tc_arguments() if shape else 'unshaped'} "
                  f"on both ends' egress; transport {transport.describe()}; unshaped, host-a to host-b: "
                  f"{carried}. Neighbour: a {NEIGHBOUR_MB} MiB PV "
                  f"guest on host-a spinning over {spin_mb} MiB; quiet window {quiet_s:g} s before each run.")
        neighbour = start_neighbour(pair.a, spin_mb)
        if control_s > 0:
            control = neighbour_control(pair, control_s)
            notes += control
            with (out / "control.txt").open("a") as written:
                written.write("".join(f"{line}\n" for line in control))
            notes_path.write_text("".join(f"{note}\n" for note in notes))
        for anon_mb in steps:
            todo = runs_to_do(done, anon_mb, repetitions, step_methods(methods, runs, anon_mb))
            if not todo:
                continue
            spec = bench_guest(f"link{anon_mb}", guest_mb, anon_mb)
            try:
                guest = start_guest(pair.a, spec)
            except TestbedError as error:  # a boot that triple-faults under TCG: once more
                guest = start_again(pair, spec, failures, failures_path, "starting the guest", error,
                                    failure_limit)
            for repetition, method in todo:
                neighbour = ensure_neighbour(neighbour, spin_mb, notes)
                notes_path.write_text("".join(f"{note}\n" for note in notes))
                try:
                    guest, link_run, run, measured = one_run(pair, guest, method, repetition, transport,
                                                             quiet_s, full_check)
                except (RuntimeError, TestbedError) as error:
                    guest = start_again(pair, spec, failures, failures_path, f"{method} #{repetition}", error,
                                        failure_limit)
                    continue
                runs.append(link_run)
                append_run(runs_path, link_run)
                keep_round_stats(out, run, measured)
                write_readme(out, header, runs, failures, notes)
                print(f"link_bench: user {anon_mb} MB, {method} #{repetition}: {link_run.wall_s:.1f} s, "
                      f"{link_run.pages_data} pages with data, "
                      f"{link_run.wire_bytes / 2**20:.1f} MiB on the wire, "
                      f"downtime {link_run.downtime_s}, neighbour loss {link_run.neighbour_loss}, "
                      f"load {link_run.load_1min:.1f}", file=sys.stderr, flush=True)
            if not full_check:
                try:
                    check_guest(guest, f"after the last migration of the {anon_mb} MB step")
                except (RuntimeError, TestbedError):
                    # Xen's log says whether the guest met TCG's triple fault or died of its own
                    keep_failure_logs(pair, spec.name, out / "failed-check")
                    raise
            guest.destroy()
        neighbour.destroy()
    table = write_readme(out, header, runs, failures, notes)
    print("\n" + table)
    print(f"results in {out} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
