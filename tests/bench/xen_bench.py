#!/usr/bin/env python3
"""`make bench`: softpage against stock `xl migrate`, side by side in one run on the real testbed.

The SonicMigration experiment, scaled to the testbed: a PVH guest (SOFTPAGE_BENCH_GUEST_MB,
default 1024) whose page cache is filled from its data disk, user (anonymous) allocation swept
over SOFTPAGE_BENCH_ANON_MB (default 0,200,400,600,800). For each step one guest is created and
migrated to localhost SOFTPAGE_BENCH_REPS times (default 3) by each method, interleaved:

    stock      xl migrate -s "" GUEST "<receiver>"
    no-prune   softpage migrate --no-prune -s "" GUEST "<receiver>"
    prune      softpage migrate -s "" GUEST "<receiver>"
    helper     LIBXL_SAVE_HELPER=softpage-save-helper xl migrate -s "" GUEST "<receiver>" (pruning)

SOFTPAGE_BENCH_METHODS picks some of them (comma-separated; stock always runs: it is what the
others are measured against). SOFTPAGE_BENCH_PRUNE is the ``--prune LIST`` of both pruning methods
(unset: softpage's default, ``free,cache=cold,slab``). The bench reads the cached files again after
every migration, so before any pruned run the cache has been read twice: active, hot to
``cache=cold`` by its rule (docs/design.md), which then sends it with data. ``free,cache=all,slab``
is the SonicMigration experiment (a full, idle page cache dropped) and what the sweeps up to
2026-12-05 ran.

Every method is measured the same way (tests/bench/dom0/): the receiver command is the stock `xl
migrate-receive` behind a tap that counts the stream's bytes and pages; a watcher polls Xen for
the downtime (suspend request -> incoming copy unpaused, and from the source's suspension as Xen
shows it); dom0 CPU is the busy time of all of dom0's vCPUs while the sender ran (sender,
receiver, tap and watchers together: the same measure for every method); sender CPU is the rusage
of the sender's process tree less the receiver's (softpage's senders only: stock xl does not reap
its receiver, so its own CPU is not measured, nor that of xl running softpage's helper). After
every migration the guest must pass the workload's full integrity check, or the run stops; a run
during which Xen logged a guest triple fault (nested SVM under TCG, testbed/README.md) is
measured again on a fresh guest instead (up to TRIPLE_FAULT_RETRIES times). Medians per step and
method go to results/bench-DATE/ (CSV of every run, summary CSV, Markdown table, PNG plots) and
the ratios to stock are printed; softpage's own per-round records go to stats/.

SOFTPAGE_BENCH_CHECK=step checks the guest's memory and files once per step, after its last
migration, instead of after every migration (each migration is still followed by heartbeats, a
boot count and a re-read of the cached files, so that every migration starts with the step's page
cache): the check takes about 1.5 minutes of a 5-minute run at 800 MB under TCG. A run on a guest
that triple-faults later in the step is then not covered by a full check.

SOFTPAGE_BENCH_XEN=4.20.4 runs it all on the Debian 13 host (Xen 4.20.4, trixie dom0) instead of
the Debian 12 one (4.17.7); SOFTPAGE_BENCH_GUEST_KERNEL=6.12 boots the guests on Debian 13's kernel.

SOFTPAGE_BENCH_KERNEL_ARGS="init_on_free=1" (or page_poison=1) boots the guests with those
options: runs.csv then says what softpage.ko's rewrite of its HELD pages at resume costs
(guest_reinit_ms, interrupts off in the guest after the destination copy was unpaused, so not in
downtime_s; guest_reinit_pages).

Under TCG a full sweep takes hours, so nothing waits for the end: each run is appended to
runs.csv as it finishes and the summary is rewritten after every step. SOFTPAGE_BENCH_OUT=DIR
continues a sweep in DIR (same guest size), running only the runs it does not have yet.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from softpage_testbed import (
    DEFAULT_GUEST_KERNEL,
    GUEST_KERNELS,
    XEN_PVH_VERSION,
    ConsoleGuest,
    Guest,
    GuestSpec,
    Testbed,
    TestbedConfig,
    TestbedError,
    booted_testbed,
    describe_disk_rate,
    retry_after_triple_faults,
)

REPO = Path(__file__).resolve().parents[2]

METHODS = ("stock", "no-prune", "prune", "helper")
PRUNING_METHODS = ("prune", "helper")
SAVE_HELPER = "/opt/softpage/py/bin/softpage-save-helper"
"""softpage's save helper in the testbed's build of the package."""
COMPARED_WITH_STOCK = ("pages_data", "stream_bytes", "wall_s", "downtime_s", "sender_cpu_s", "dom0_cpu_s")
KERNEL_AND_WORKLOAD_MB = 160
"""Guest memory the page cache cannot have: kernel, initramfs, workload slack."""
DOM0_TOOLS = "/tmp/softpage-bench"
BENCH_STATS = "/tmp/bench-stats.json"
"""softpage's per-round records of the last migration (``--stats``)."""
RunRow = TypeVar("RunRow")
"""A dataclass whose instances are rows of a runs.csv (``Run``, or another bench's)."""
TRIPLE_FAULT_RETRIES = 3
"""1 GiB guests triple-fault under TCG far more often than the e2e suite's 256 MiB ones: twice in
one run of a step on 2026-11-30 (the retried run was hit too)."""


@dataclass
class MigrationRun:
    """What every bench's run of one migration records first (its CSV's first columns)."""

    anon_mb: int
    cache_mb: int
    method: str
    repetition: int
    wall_s: float
    """The sender's wall time."""
    downtime_s: float | None
    """From the suspend request (user space frozen from then on) to the incoming copy running
    (across two hosts: the request on the source, the copy on the destination, the offset of
    their clocks applied)."""
    suspended_s: float | None
    """From the source shut down for suspend, as Xen shows it, to the incoming copy running."""

    @property
    def guest_suspend_s(self) -> float | None:
        """From the suspend request to the source shut down for suspend: the guest's own suspend
        (acknowledging the request, freezing, its devices), as dom0's watcher saw both ends."""
        if self.downtime_s is None or self.suspended_s is None:
            return None
        return self.downtime_s - self.suspended_s


@dataclass
class Run(MigrationRun):
    sender_cpu_s: float | None
    stream_bytes: int
    pages_data: int
    pages_xalloc: int
    rounds: int | None
    guest_scan_ms: float | None
    """Median time the guest module took per precopy report (from the reports themselves)."""
    guest_drop_ms: float | None
    """The module's cache drop at .freeze (its drop_ns counter after the migration)."""
    guest_final_scan_ms: float | None
    """The module's final scan, interrupts off, just before the suspend (final_scan_ns)."""
    early_drop_s: float | None
    """softpage's wait for the guest's early cache drop, right before the suspend request (not
    downtime): the guest_drop_s of its totals record."""
    guest_dropped_cache_pages: int | None = None
    """Page-cache pages the module's drop at ``.freeze`` freed (in the downtime)."""
    guest_dropped_slab_pages: int | None = None
    """Reclaimable slab pages the same drop freed."""
    dom0_cpu_s: float | None = None
    """All of dom0's CPU time while the sender ran (every vCPU's busy time in /proc/stat: sender,
    receiver, tap, measurement), the one CPU figure measured alike for stock xl."""
    guest_reinit_ms: float | None = None
    """The module's check of its HELD pages at resume, interrupts off (held_reinit_ns): 0 unless
    the guest runs with init_on_free or page poisoning (SOFTPAGE_BENCH_KERNEL_ARGS)."""
    guest_reinit_pages: int | None = None
    """HELD pages that check rewrote (held_reinit_pages)."""
    final_pages_data: int | None = None
    """Pages with data in softpage's final round, the one in the downtime (its ``--stats``); None
    for stock xl, whose rounds the stream does not tell apart."""


def environment_list(name: str, default: str) -> list[int]:
    return [int(value) for value in os.environ.get(name, default).split(",") if value.strip()]


def install_dom0_tools(testbed: Testbed) -> None:
    testbed.run(["mkdir", "-p", DOM0_TOOLS], check=True)
    for name in ("tap.py", "measure.py", "stamp.py", "app_load.py"):
        testbed.write_file(f"{DOM0_TOOLS}/{name}", (REPO / "tests/bench/dom0" / name).read_text())


def receiver_command(receive: str = "xl migrate-receive", watch: str = "-", tap_pfns: str = "") -> str:
    """The receiver every method migrates to: ``receive`` behind the tap, under measure.py
    (``watch``: its first argument, ``incoming`` on another host than the sender's; ``tap_pfns``:
    where the tap writes the PFNs each record carried data for, if anywhere)."""
    return (f"python3 {DOM0_TOOLS}/measure.py {watch} /tmp/bench-recv.json -- "
            f"sh -c 'python3 {DOM0_TOOLS}/tap.py /tmp/bench-tap.json {tap_pfns} | {receive}'")


def measured_sender_command(method: str, guest: ConsoleGuest, receiver: str,
                            prune: str | None = None) -> list[str]:
    """``method``'s migration of ``guest`` to the ``receiver`` command, under measure.py; ``prune``
    is softpage's ``--prune LIST`` (its default when None)."""
    source = guest.testbed.run(["xl", "domid", guest.name], check=True).stdout.strip()
    softpage = ["python3", "-m", "softpage", "migrate", "-q", "--stats", BENCH_STATS,
                *(["--prune", prune] if prune is not None else [])]
    senders = {
        "stock": ["xl", "migrate"],
        "no-prune": [*softpage, "--no-prune"],
        "prune": softpage,
        "helper": ["env", f"LIBXL_SAVE_HELPER={SAVE_HELPER}",
                   f"SOFTPAGE_SAVE_HELPER_OPTIONS=-q --stats {BENCH_STATS}"
                   f"{f' --prune {prune}' if prune is not None else ''}", "xl", "migrate"],
    }
    return ["python3", f"{DOM0_TOOLS}/measure.py", source, "/tmp/bench-send.json", "--",
            *senders[method], "-s", "", guest.name, receiver]


def migrate(guest: ConsoleGuest, method: str, receive: str = "xl migrate-receive",
            prune: str | None = None, tap_pfns: str = "") -> dict[str, object]:
    """One measured migration of ``guest`` by ``method`` to ``receive`` (see ``receiver_command``)."""
    testbed = guest.testbed
    command = measured_sender_command(method, guest, receiver_command(receive, tap_pfns=tap_pfns), prune)
    testbed.run(["rm", "-f", "/tmp/bench-recv.json", "/tmp/bench-tap.json", BENCH_STATS])
    result = testbed.run(command, timeout_s=3600)
    if not result.ok:
        raise RuntimeError(f"{method} migration failed (rc {result.rc}): {result.stderr[-3000:]}")
    measured: dict[str, object] = {}
    for name in ("send", "recv", "tap"):
        measured[name] = json.loads(testbed.run(["cat", f"/tmp/bench-{name}.json"], check=True).stdout)
    if method != "stock":
        lines = testbed.run(["cat", BENCH_STATS], check=True).stdout.splitlines()
        measured["stats"] = [json.loads(line) for line in lines]
    return measured


def to_run(anon_mb: int, cache_mb: int, method: str, repetition: int, measured: dict[str, object]) -> Run:
    send, recv, tap = measured["send"], measured["recv"], measured["tap"]
    assert isinstance(send, dict) and isinstance(recv, dict) and isinstance(tap, dict)
    stats = measured.get("stats")
    rounds = scan_ms = early_drop_s = final_pages_data = None
    if isinstance(stats, list):
        per_round = [record for record in stats if not record.get("totals")]
        rounds = len(per_round)
        if per_round and per_round[-1].get("kind") == "final":
            final_pages_data = int(per_round[-1]["pages_data"])
        scans = [record["guest_scan_ms"] for record in per_round[:-1] if record.get("guest_scan_ms")]
        scan_ms = statistics.median(scans) if scans else None
        totals = [record for record in stats if record.get("totals")]
        early_drop_s = totals[0].get("guest_drop_s") if totals else None
    counters = measured.get("guest_counters")
    counters = counters if isinstance(counters, dict) else {}
    guest_ms = {name: int(value) / 1e6 for name, value in counters.items() if name.endswith("_ns")}
    return Run(
        anon_mb=anon_mb, cache_mb=cache_mb, method=method, repetition=repetition,
        wall_s=float(send["wall_s"]), downtime_s=send.get("downtime_s"), suspended_s=send.get("suspended_s"),
        sender_cpu_s=sender_cpu_s(method, send, recv),
        stream_bytes=int(tap["stream_bytes"]), pages_data=int(tap["pages_data"]),
        pages_xalloc=int(tap["pages_xalloc"]), rounds=rounds, guest_scan_ms=scan_ms,
        guest_drop_ms=guest_ms.get("drop_ns"), guest_final_scan_ms=guest_ms.get("final_scan_ns"),
        guest_dropped_cache_pages=counters.get("dropped_cache_pages"),
        guest_dropped_slab_pages=counters.get("dropped_slab_pages"),
        early_drop_s=early_drop_s, dom0_cpu_s=send.get("dom0_cpu_s"),  # type: ignore[arg-type]
        guest_reinit_ms=guest_ms.get("held_reinit_ns"), guest_reinit_pages=counters.get("held_reinit_pages"),
        final_pages_data=final_pages_data,
    )


def sender_cpu_s(method: str, send: dict[str, object], recv: dict[str, object]) -> float | None:
    """The sender's CPU time without the receiver's: softpage reaps the receiver it started, so
    its rusage holds the receiver's share, which the receiver's own wrapper measured. Stock xl
    does not wait for its receiver child (with softpage's helper either): on 2026-11-30 its rusage
    came out 108 s *below* the receiver's. What xl itself used is not measured, so there is no
    figure for it."""
    if method in ("stock", "helper"):
        return None
    return float(str(send["cpu_s"])) - float(str(recv["cpu_s"]))


GUEST_SUSPEND_COUNTERS = ("drop_ns", "final_scan_ns", "dropped_cache_pages", "dropped_slab_pages",
                          "held_reinit_ns", "held_reinit_pages")


def guest_suspend_counters(guest: Guest, token: str) -> dict[str, int]:
    """softpage.ko's counters of its last armed suspend, read in the guest."""
    stats = "/sys/bus/platform/devices/softpage*/stats"
    shown = " ".join(f"{name}=$(cat {stats}/{name})" for name in GUEST_SUSPEND_COUNTERS)
    guest.console_command(f"echo BENCH-{token} {shown}")
    values = " ".join(name + r"=\d+" for name in GUEST_SUSPEND_COUNTERS)
    line = guest.wait_for(rf"BENCH-{token} ({values})")
    return {name: int(value) for name, value in re.findall(r"(\w+)=(\d+)", line.group(1))}


def size_testbed_for(guest_mb: int) -> None:
    """Unless set already: a data disk as large as the guest, and QEMU memory for dom0 and the two
    copies of the guest that a localhost migration holds in Xen."""
    os.environ.setdefault("SOFTPAGE_DATA_MB", str(guest_mb))
    os.environ.setdefault("SOFTPAGE_QEMU_MEM_MB", str(1024 + 2 * guest_mb + 1024))


def bench_guest(name: str, guest_mb: int, anon_mb: int) -> GuestSpec:
    """A PVH guest with ``anon_mb`` of user allocation and as much page cache from its data disk
    (SOFTPAGE_DATA_MB) as the rest of its memory holds."""
    data_mb = int(os.environ.get("SOFTPAGE_DATA_MB", str(guest_mb)))
    cache_mb = max(0, min(data_mb, guest_mb - KERNEL_AND_WORKLOAD_MB - anon_mb))
    return GuestSpec(name=name, guest_type="pvh", memory_mb=guest_mb, anon_mb=anon_mb,
                     cache_mb=cache_mb, dirty_rate=100, kernel_args=bench_kernel_args(),
                     kernel=bench_guest_kernel())


def bench_guest_kernel() -> str:
    """The guests' Linux (SOFTPAGE_BENCH_GUEST_KERNEL, one of GUEST_KERNELS; default Debian 12's)."""
    kernel = os.environ.get("SOFTPAGE_BENCH_GUEST_KERNEL", DEFAULT_GUEST_KERNEL)
    if kernel not in GUEST_KERNELS:
        raise SystemExit(f"SOFTPAGE_BENCH_GUEST_KERNEL={kernel}: expected one of {', '.join(GUEST_KERNELS)}")
    return kernel


def bench_kernel_args() -> tuple[str, ...]:
    """Guest kernel options for the whole sweep (SOFTPAGE_BENCH_KERNEL_ARGS, space-separated), e.g.
    ``init_on_free=1`` to measure what the module's HELD rewrite at resume costs."""
    return tuple(os.environ.get("SOFTPAGE_BENCH_KERNEL_ARGS", "").split())


def start_guest(testbed: Testbed, spec: GuestSpec) -> Guest:
    guest = testbed.create_guest(spec, timeout_s=900)
    guest.wait_for_workload_ready(timeout_s=1800)
    return guest


def migrate_and_check(guest: Guest, method: str, token: str, full_check: bool = True,
                      prune: str | None = None, tap_pfns: str = "") -> dict[str, object]:
    """One migration by ``method``; the guest must then run on (heartbeats, no reboot) and, with
    ``full_check``, pass the workload's check of all its memory and files, which also reads its
    files back into the page cache; without, the files are only read back (``warm_cache``), so
    that every migration starts with the step's page cache, whatever a pruned one dropped.
    ``prune``: as ``measured_sender_command``'s; ``tap_pfns``: as ``receiver_command``'s."""
    heartbeat = guest.heartbeat()
    measured = migrate(guest, method, prune=prune, tap_pfns=tap_pfns)
    guest.wait_for_heartbeat(heartbeat + 2, timeout_s=300)
    if guest.boot_count() != 1:
        raise RuntimeError(f"guest rebooted after {method}")
    if full_check:
        check_guest(guest, f"after {method}")
    else:
        warm_cache(guest, token)
    if method in PRUNING_METHODS:
        measured["guest_counters"] = guest_suspend_counters(guest, token)
    return measured


def warm_cache(guest: Guest, token: str) -> None:
    """Read back, in the guest, the data files the workload cached (the first ``cache_mb`` of its
    MANIFEST, as ``load_manifest`` in testbed/guest/workload.c picks them)."""
    wanted = guest.spec.cache_mb << 20
    if not wanted:
        return
    marker = f"BENCH-WARM-{token}-{time.monotonic_ns()}"
    guest.console_command(warm_cache_command(wanted, marker))
    # The echoed command line shows "$got", never digits: only the answer matches.
    guest.wait_for(rf"{marker} read=\d+", timeout_s=900, poll_s=5.0)


def warm_cache_command(wanted_bytes: int, marker: str, data_dir: str = "/data") -> str:
    """The guest shell command for ``warm_cache``: files in MANIFEST order until ``wanted_bytes``."""
    return (f"got=0; while read f b s; do [ $got -ge {wanted_bytes} ] && break; "
            f"cat {data_dir}/$f > /dev/null; got=$((got + b)); done < {data_dir}/MANIFEST; "
            f"echo {marker} read=$got")


def check_guest(guest: Guest, when: str) -> None:
    """The workload's full check of every anonymous byte and every cached file."""
    verdict = guest.verify(timeout_s=900)
    if not verdict.ok or guest.boot_count() != 1:
        raise RuntimeError(f"guest damaged {when}: {verdict.line}")


def keep_round_stats(out: Path, run: Run, measured: dict[str, object]) -> None:
    """softpage's own --stats records of the run (one JSON line per round, then the totals), as
    stats/USER_MB-METHOD-REPETITION.jsonl: where a run's time went."""
    stats = measured.get("stats")
    if not isinstance(stats, list):
        return
    folder = out / "stats"
    folder.mkdir(exist_ok=True)
    lines = "".join(json.dumps(record) + "\n" for record in stats)
    (folder / f"{run.anon_mb}-{run.method}-{run.repetition}.jsonl").write_text(lines)


def median(runs: list[Any], field: str) -> float | None:
    values = [getattr(run, field) for run in runs if getattr(run, field) is not None]
    return statistics.median(values) if values else None


SUMMARY_FIELDS = ("pages_data", "stream_bytes", "wall_s", "downtime_s", "suspended_s", "sender_cpu_s",
                  "dom0_cpu_s", "rounds", "guest_scan_ms", "early_drop_s", "guest_drop_ms",
                  "guest_final_scan_ms", "guest_dropped_cache_pages", "guest_dropped_slab_pages",
                  "guest_reinit_ms", "guest_reinit_pages")


def summarise(runs: list[Any], methods: tuple[str, ...] = METHODS, fields: tuple[str, ...] = SUMMARY_FIELDS,
              compared: tuple[str, ...] = COMPARED_WITH_STOCK) -> list[dict[str, object]]:
    """Medians of ``fields`` per step (``anon_mb``) and method of ``runs`` (``Run``s, or another
    bench's with those attributes), and for the ``compared`` ones the ratio to stock's median."""
    rows = []
    for anon_mb in sorted({run.anon_mb for run in runs}):
        stock = [run for run in runs if run.anon_mb == anon_mb and run.method == "stock"]
        for method in methods:
            chosen = [run for run in runs if run.anon_mb == anon_mb and run.method == method]
            if not chosen:
                continue
            row: dict[str, object] = {"anon_mb": anon_mb, "method": method, "runs": len(chosen)}
            for field in fields:
                row[field] = median(chosen, field)
                base = median(stock, field)
                if field in compared:
                    value = row[field]
                    row[f"{field}_vs_stock"] = (value / base if isinstance(value, float | int) and base
                                                else None)
            rows.append(row)
    return rows


def cell(value: object, digits: int = 2) -> str:
    """A Markdown table cell: "-" for nothing measured, floats to ``digits``."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict[str, object]], header: str) -> str:
    lines = [header, "",
             "| user MB | method | pages with data | x stock | MiB sent | time s | x stock | downtime s "
             "| x stock | suspended s | sender CPU s | dom0 CPU s | x stock | rounds | guest scan ms "
             "| early drop s | guest drop at suspend ms | guest final scan ms |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        mib = row["stream_bytes"] / 2**20 if isinstance(row["stream_bytes"], float | int) else None
        lines.append(
            f"| {row['anon_mb']} | {row['method']} | {cell(row['pages_data'], 0)} | "
            f"{cell(row['pages_data_vs_stock'])} | {cell(mib, 1)} | {cell(row['wall_s'], 1)} | "
            f"{cell(row['wall_s_vs_stock'])} | {cell(row['downtime_s'])} | "
            f"{cell(row['downtime_s_vs_stock'])} | {cell(row['suspended_s'])} | "
            f"{cell(row['sender_cpu_s'], 1)} | {cell(row['dom0_cpu_s'], 1)} | "
            f"{cell(row['dom0_cpu_s_vs_stock'])} | "
            f"{cell(row['rounds'], 0)} | {cell(row['guest_scan_ms'], 1)} | {cell(row['early_drop_s'])} | "
            f"{cell(row['guest_drop_ms'], 1)} | {cell(row['guest_final_scan_ms'], 1)} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, object]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (pages_axis, time_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for method in METHODS:
        chosen = [row for row in rows if row["method"] == method]
        if not chosen:
            continue
        xs = [row["anon_mb"] for row in chosen]
        pages_axis.plot(xs, [row["pages_data"] for row in chosen], marker="o", label=method)
        time_axis.plot(xs, [row["wall_s"] for row in chosen], marker="o", label=method)
    pages_axis.set(xlabel="user allocation (MB)", ylabel="pages sent with data", title="Pages sent")
    time_axis.set(xlabel="user allocation (MB)", ylabel="migration time (s)", title="Migration time")
    for axis in (pages_axis, time_axis):
        axis.grid(True, alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(out, dpi=120)


def load_runs(path: Path) -> list[Run]:
    """The runs an earlier, interrupted sweep wrote to ``path`` (none if there is no such file)."""
    return read_runs(path, Run)


def read_runs(path: Path, kind: type[RunRow]) -> list[RunRow]:
    """The rows of ``kind`` (a dataclass) that an earlier, interrupted sweep wrote to ``path``."""
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as runs_file:
        reader = csv.DictReader(runs_file)
        rows = list(reader)
    fields = {field.name: field.type for field in dataclasses.fields(kind)}  # type: ignore[arg-type]
    # an older sweep's columns: all of today's but trailing ones that have defaults
    columns = list(reader.fieldnames or [])
    defaulted = [field.name for field in dataclasses.fields(kind)  # type: ignore[arg-type]
                 if field.default is not dataclasses.MISSING]
    if columns != list(fields)[:len(columns)] or not set(list(fields)[len(columns):]) <= set(defaulted):
        raise SystemExit(f"{path} has the columns of another version of the bench: continue it "
                         "with that version, or start a new folder")
    return [kind(**row_values(row, fields)) for row in rows]


def row_values(row: dict[str, str], fields: dict[str, object]) -> dict[str, object]:
    """One CSV row typed by a dataclass's field annotations (empty: None)."""
    values: dict[str, object] = {}
    for name, text in row.items():
        kind = str(fields[name])
        if text == "":
            values[name] = None
        elif kind == "str":
            values[name] = text
        elif kind.startswith("int"):
            values[name] = int(text)
        else:
            values[name] = float(text)
    return values


def append_run(path: Path, run: Any) -> None:
    """One run (a dataclass: ``Run``, or another bench's) as a row of the CSV at ``path``; an
    older sweep's file (``read_runs``: fewer columns at the end) gets today's columns first, its
    rows empty in the new ones."""
    fieldnames = [field.name for field in dataclasses.fields(run)]
    new_file = not path.exists()
    if not new_file:
        with open(path, newline="", encoding="utf-8") as runs_file:
            columns = next(csv.reader(runs_file), [])
        if columns != fieldnames:
            with open(path, newline="", encoding="utf-8") as runs_file:
                rows = list(csv.DictReader(runs_file))
            with open(path, "w", newline="", encoding="utf-8") as runs_file:
                writer = csv.DictWriter(runs_file, fieldnames=fieldnames, restval="")
                writer.writeheader()
                writer.writerows(rows)
    with open(path, "a", newline="", encoding="utf-8") as runs_file:
        writer = csv.DictWriter(runs_file, fieldnames=fieldnames)
        if new_file:
            writer.writeheader()
        writer.writerow(asdict(run))


def write_summary(runs: list[Run], out: Path, header: str) -> str:
    rows = summarise(runs)
    with open(out / "summary.csv", "w", newline="", encoding="utf-8") as summary_file:
        writer = csv.DictWriter(summary_file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows, header)
    (out / "table.md").write_text(table)
    plot(rows, out / "pages-and-time.png")
    return table


def output_dir(guest_mb: int, prefix: str = "bench") -> Path:
    """A new results/PREFIX-DATE/, or SOFTPAGE_BENCH_OUT to continue a sweep of the same guest size."""
    chosen = os.environ.get("SOFTPAGE_BENCH_OUT")
    out = Path(chosen) if chosen else REPO / "results" / time.strftime(f"{prefix}-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    meta = out / "sweep.json"
    if meta.exists():
        earlier = json.loads(meta.read_text())["guest_mb"]
        if earlier != guest_mb:
            raise SystemExit(f"xen_bench: {out} holds a sweep of a {earlier} MiB guest, not {guest_mb} MiB")
    else:
        meta.write_text(json.dumps({"guest_mb": guest_mb}) + "\n")
    return out


def chosen_methods(text: str, methods: tuple[str, ...] = METHODS, with_stock: bool = True) -> tuple[str, ...]:
    """SOFTPAGE_BENCH_METHODS, some of ``methods`` in their order, with stock added unless
    ``with_stock`` is False (a continued sweep that has its stock run already)."""
    named = {name.strip() for name in text.split(",") if name.strip()}
    unknown = named - set(methods)
    if unknown:
        raise SystemExit(f"SOFTPAGE_BENCH_METHODS: unknown {', '.join(sorted(unknown))}; "
                         f"expected some of {', '.join(methods)}")
    if with_stock:
        named.add("stock")
    return tuple(method for method in methods if method in named)


def runs_to_do(done: set[tuple[int, str, int]], anon_mb: int, repetitions: int,
               methods: tuple[str, ...]) -> list[tuple[int, str]]:
    """The step's (repetition, method) runs not in ``done`` ((anon_mb, method, repetition)), in
    the order they run: interleaved, every method once per repetition."""
    return [(repetition, method) for repetition in range(repetitions) for method in methods
            if (anon_mb, method, repetition) not in done]


def main() -> int:
    guest_mb = int(os.environ.get("SOFTPAGE_BENCH_GUEST_MB", "1024"))
    steps = environment_list("SOFTPAGE_BENCH_ANON_MB", "0,200,400,600,800")
    methods = chosen_methods(os.environ.get("SOFTPAGE_BENCH_METHODS", ",".join(METHODS)))
    repetitions = int(os.environ.get("SOFTPAGE_BENCH_REPS", "3"))
    check_each = os.environ.get("SOFTPAGE_BENCH_CHECK", "each") != "step"
    prune = os.environ.get("SOFTPAGE_BENCH_PRUNE") or None
    prune_text = f"--prune {prune}" if prune else "softpage's default --prune"
    size_testbed_for(guest_mb)
    out = output_dir(guest_mb)
    runs_path = out / "runs.csv"
    runs = load_runs(runs_path)
    done = {(run.anon_mb, run.method, run.repetition) for run in runs}
    if runs:
        print(f"bench: continuing {out}: {len(runs)} runs already measured", flush=True)
    started = time.monotonic()
    table = ""
    xen_version = os.environ.get("SOFTPAGE_BENCH_XEN", XEN_PVH_VERSION)
    with booted_testbed(TestbedConfig.from_env(xen_version),
                        Path(tempfile.mkdtemp(prefix="softpage-bench-"))) as testbed:
        install_dom0_tools(testbed)
        xen_info = testbed.run("xl info | grep -E '^(xen_version|host|nr_cpus)'").stdout
        kernel_args = " ".join(bench_kernel_args())
        platform = TestbedConfig.from_env(xen_version).platform.release
        header = (f"softpage vs stock `xl migrate`, {time.strftime('%Y-%m-%d')}, PVH guest {guest_mb} MiB"
                  f" on Linux {bench_guest_kernel()}{f' booted with {kernel_args}' if kernel_args else ''}, "
                  f"medians of up to {repetitions}; pruning with {prune_text}; "
                  f"{describe_disk_rate(testbed.disk_rate)} (the guest's "
                  f"data disk); Xen {xen_version} ({platform} dom0) under QEMU TCG on "
                  "this machine "
                  f"({os.cpu_count()} cores). {xen_info.strip()}".replace("\n", "; "))
        for anon_mb in steps:
            todo = runs_to_do(done, anon_mb, repetitions, methods)
            if not todo:
                continue
            spec = bench_guest(f"bench{anon_mb}", guest_mb, anon_mb)
            guest = start_guest(testbed, spec)
            for repetition, method in todo:
                guest, measured = retry_after_triple_faults(
                    testbed, guest,
                    functools.partial(migrate_and_check, method=method, token=f"{anon_mb}-{repetition}",
                                      full_check=check_each, prune=prune),
                    functools.partial(start_guest, testbed, spec), errors=(RuntimeError, TestbedError),
                    retries=TRIPLE_FAULT_RETRIES)
                run = to_run(anon_mb, spec.cache_mb, method, repetition, measured)
                runs.append(run)
                append_run(runs_path, run)
                keep_round_stats(out, run, measured)
                print(f"bench: user {anon_mb} MB, {method} #{repetition}: {run.wall_s:.1f} s, "
                      f"{run.pages_data} pages with data, {run.stream_bytes / 2**20:.1f} MiB, "
                      f"downtime {run.downtime_s}", flush=True)
            if not check_each:
                try:
                    check_guest(guest, f"after the last migration of the {anon_mb} MB step")
                except RuntimeError as error:
                    raise SystemExit(f"bench: {error}: this step's runs in {runs_path} are not to "
                                     "be trusted") from error
            guest.destroy()
            table = write_summary(runs, out, header)
    print("\n" + (table or (out / "table.md").read_text()))
    print(f"results in {out} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
