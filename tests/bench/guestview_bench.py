#!/usr/bin/env python3
"""`make bench`, the guest's view (issue 21): what a web server's users see before, during and
after each migration, on the real testbed.

A Debian distro guest (testbed/softpage_testbed/distro.py: systemd, Debian's kernel,
softpage-dkms from apt, nginx serving the app-data disk's 64 KiB files on dom0's bridge;
SOFTPAGE_GUESTVIEW_RELEASE, default bookworm; SOFTPAGE_GUESTVIEW_GUEST_MB, default 1024; Xen
SOFTPAGE_BENCH_XEN, default 4.17.7; SOFTPAGE_GUESTVIEW_GUEST_TYPE, pvh by default, or pv, which
needs SOFTPAGE_BENCH_XEN=4.17.5 and never meets TCG's nested-SVM triple faults;
SOFTPAGE_GUESTVIEW_COLD_AGE_MS, softpage.ko's cold_age_ms in the guest, its own 30 s unless
given), booted afresh for each method in SOFTPAGE_GUESTVIEW_METHODS, so that every method starts
from the same hot/cold state of the guest's cache (on one guest the earlier runs' reads had made
every file active, and cache=cold sent them all). The methods, in this order by default:

    baseline     no migration: what the same stretch of time looks like without one
    stock        xl migrate -s "" GUEST "<receiver>"
    no-prune     softpage migrate --no-prune
    cache=cold   softpage migrate (pruning, today's default --prune free,cache=cold,slab)
    cache=all    softpage migrate --prune free,cache=all,slab (the whole clean cache dropped)

A run: the new guest reads every application file once into its page cache (``cat``: read once,
a file is cold for softpage.ko's rule 30-60 s later); the load generator (dom0/app_load.py)
starts in dom0 against nginx and runs for SOFTPAGE_GUESTVIEW_SETTLE_S (70) before the migration,
so that softpage.ko's aging passes (every cold_age_ms, 30 s) can tell the hot files (the load's,
read again and again: active) from the cold ones; the migration runs to localhost, measured as
xen_bench measures it (tests/bench/dom0: tap, downtime watcher); the load goes on for
SOFTPAGE_GUESTVIEW_AFTER_S (60) after the guest runs again. nginx must then serve the disk's
bytes (a sample of files checked through it) and systemd must still say running; the guest is
destroyed. A method during which Xen logged a guest triple fault (nested SVM under TCG,
testbed/README.md) runs again on a new boot, up to xen_bench's TRIPLE_FAULT_RETRIES times.

SOFTPAGE_GUESTVIEW_APP=postgresql measures the Debian 12 guest's PostgreSQL instead of nginx
(testbed/build.sh add_postgresql: a pgbench database, SOFTPAGE_PG_SCALE 100 by default, about
1.5 GiB): started after the boot, its database files read once, then point reads of
pgbench_accounts drawn from the first 25% of the rows (skew 2) by the same client's PostgreSQL
connections; afterwards the cluster must be active and a sample of rows as pgbench wrote them.

The load: SOFTPAGE_GUESTVIEW_CONNECTIONS (4) keep-alive connections from one Python client in
dom0, one request outstanding on each, requests drawn as testbed/distro/hot-set.lua draws them
(the first 25% of the files, skew 2); the client itself writes one line a second: requests
completed, latency p50/p99/max, and the requests slower than SOFTPAGE_GUESTVIEW_SLOW_MS (100)
("slow"). Until 2026-12-06 the samples were wrk started anew every second with new connections:
under TCG a one-second run took 2.8-4.1 s of wall time, the rest wrk's start and stop, unmeasured.
Side by side at load 10-11 (results/guestview-20261206-0320) wrk -d5s served 0.84 requests a
second and this client 8-20: under that load the guest is the limit, and the e2e's 324 a second
was at load 4-6. Once per sweep, on the first guest, ``compare_load_generators``
measures the two side by side and where the time goes (calibration.json;
SOFTPAGE_GUESTVIEW_METHODS="" boots one guest for that alone).
In the guest a sampler (bash builtins only, no process a sample) reads the sectors its disks read
(/sys/block/xvd*/stat) every half second; it stops while the guest is paused, and the longest
pause in a migration run is taken as the downtime: what it read from the first sample after that
is "read after the resume".

Per method (runs.csv, table.md): throughput before (the last SOFTPAGE_GUESTVIEW_BEFORE_S, 20, of
the settle), time from the resume until three seconds in a row reach 90% of it, the time from the
resume until the sender returned (``source_gone_s``: xl and softpage return once they destroyed
the source, a teardown the resumed guest shares this one host with), requests lost
(the baseline's rate over the window, less the requests completed in it; and the same against
the run's own throughput before, which does not depend on the load of the baseline's minutes) and
slowed (slow requests over the baseline's rate of them) in the window from the migration's start
to AFTER_S past the resume, the bytes read after the resume, the guest's active and inactive file
cache at the migration's start, migration time, downtime, pages sent with and without data, and
this machine's load average then. Every second of every run goes to samples.csv, the guest's disk
samples to disk.csv, the time line to timeline.png, softpage's --stats to stats/. The guests'
disk speed is SOFTPAGE_DISK_RATE's (unthrottled by default), named in the table's header. Output:
results/guestview-DATE/ or SOFTPAGE_GUESTVIEW_OUT, which also continues an interrupted sweep
(the methods it has already are not run again).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from softpage_testbed import (
    DISK_RATE_ENV,
    DISTRO_GUEST_TYPES,
    GUEST_ADDRESS,
    HOT_FRACTION,
    HOT_SKEW,
    HOTPLUG_TIMEOUT_MESSAGE,
    HTTP_PORT,
    XEN_PV_VERSION,
    XEN_PVH_VERSION,
    CommandFailed,
    DistroGuest,
    DistroGuestSpec,
    Testbed,
    TestbedConfig,
    TestbedError,
    WrkResult,
    again_after_triple_faults,
    app_file_names,
    booted_testbed,
    describe_disk_rate,
    fetch_checksums,
    parse_disk_rate,
    read_app_checksums,
    run_wrk,
    wrk_command,
)
from tests.bench.xen_bench import DOM0_TOOLS, TRIPLE_FAULT_RETRIES, install_dom0_tools, migrate, read_runs

REPO = Path(__file__).resolve().parents[2]

BASELINE = "baseline"
METHODS = {
    # name: (xen_bench's method, softpage's --prune LIST or None for its default)
    "stock": ("stock", None),
    "no-prune": ("no-prune", None),
    "cache=cold": ("prune", None),
    "cache=all": ("prune", "free,cache=all,slab"),
}
ALL_METHODS = (BASELINE, *METHODS)
COLD_AGE_PARAMETER = "cold_age_ms"
"""softpage.ko's parameter for its hot/cold rule (guest_kmod/softpage.c, docs/design.md)."""
RECOVERED_FRACTION = 0.9
RECOVERED_SECONDS = 3
"""Back: this many one-second samples in a row at RECOVERED_FRACTION of the throughput before."""
SECTOR_BYTES = 512
"""/sys/block/*/stat counts 512-byte sectors whatever the device's block size."""
DISK_SAMPLE_S = 0.5
LOAD_SEED = 2100
LOAD_OUT = "/tmp/guestview-load.jsonl"
LOAD_STOP = "/tmp/guestview-load.stop"
GUEST_DISK_LOG = "/run/guestview-disk.log"
GUEST_DISK_PID = "/run/guestview-disk.pid"
GUEST_DISK_FIFO = "/run/guestview-disk.fifo"
"""The sampler's clock: ``read -t`` on a FIFO nobody writes waits without a ``sleep`` process."""
SAMPLE_FILES = 12
HOTPLUG_ATTEMPTS = 4
"""Tries at a guest creation (each of them two ``xl create``) or a migration whose disk hotplug
meets libxl's fixed 40 s: on 2026-12-06, with four testbeds on this machine (load 8-10), two
``xl create`` in a row of the 1 GiB guest did."""
BOOT_TIMEOUT_S = 1800
CALIBRATION_S = 5
"""How long each load generator runs in ``compare_load_generators``."""
CALIBRATION_FILE = "calibration.json"
"""Written once per output directory; SOFTPAGE_GUESTVIEW_METHODS="" makes only this."""
CALIBRATION_WRK_SECONDS = 3
"""One-second wrk runs, as the samples were taken before 2026-12-06's change."""
APPS = ("nginx", "postgresql")
POSTGRESQL = "postgresql"
PG_PORT = 5432
PG_DATABASE = "bench"
PG_USER = "postgres"
PG_ROWS_PER_SCALE = 100_000
"""pgbench_accounts rows for each unit of pgbench's scale (pgbench_branches holds one row a unit)."""
SAMPLE_ROWS = 24
FORKING_DISK_SAMPLER = ("while :; do echo $(date +%s.%N) $(cat /sys/block/xvd*/stat | awk '{s += $3} "
                        "END {print s}'); sleep 0.5; done")
"""The guest's disk sampler before 2026-12-06's change (four processes every half second on the
guest's one vCPU): run once beside the load in ``compare_load_generators`` to show its cost."""


@dataclass(frozen=True)
class Settings:
    guest_mb: int
    release: str
    guest_type: str
    """SOFTPAGE_GUESTVIEW_GUEST_TYPE: pvh (the default) or pv, which needs SOFTPAGE_BENCH_XEN=4.17.5
    (``HostPlatform.pv_live_migration``) and never meets TCG's nested-SVM triple faults."""
    xen_version: str
    methods: tuple[str, ...]
    settle_s: float
    before_s: float
    after_s: float
    baseline_s: float
    """How long the baseline runs where the others migrate: a stand-in for the migration."""
    slow_ms: float
    connections: int
    cold_age_ms: int | None
    """SOFTPAGE_GUESTVIEW_COLD_AGE_MS: softpage.ko's ``cold_age_ms`` in the guest, given on its
    kernel command line (``softpage.cold_age_ms=``); None (the default): the module's own, 30 s."""
    disk_rate: int | None
    """SOFTPAGE_DISK_RATE (bytes per second; None: unthrottled): a sweep holds one rate."""
    app: str = "nginx"
    """SOFTPAGE_GUESTVIEW_APP: the application the load asks, nginx (the default) or postgresql
    (the Debian 12 guest's pgbench database, testbed/build.sh add_postgresql)."""

    @classmethod
    def from_env(cls) -> Settings:
        chosen = os.environ.get("SOFTPAGE_GUESTVIEW_METHODS", ",".join(ALL_METHODS))
        names = [name.strip() for name in chosen.split(",") if name.strip()]
        unknown = set(names) - set(ALL_METHODS)
        if unknown:
            raise SystemExit(f"SOFTPAGE_GUESTVIEW_METHODS: unknown {', '.join(sorted(unknown))}; "
                             f"expected some of {', '.join(ALL_METHODS)}")
        settings = cls(
            guest_mb=int(os.environ.get("SOFTPAGE_GUESTVIEW_GUEST_MB", "1024")),
            release=os.environ.get("SOFTPAGE_GUESTVIEW_RELEASE", "bookworm"),
            guest_type=os.environ.get("SOFTPAGE_GUESTVIEW_GUEST_TYPE", "pvh"),
            xen_version=os.environ.get("SOFTPAGE_BENCH_XEN", XEN_PVH_VERSION),
            methods=tuple(name for name in ALL_METHODS if name in names),
            settle_s=float(os.environ.get("SOFTPAGE_GUESTVIEW_SETTLE_S", "70")),
            before_s=float(os.environ.get("SOFTPAGE_GUESTVIEW_BEFORE_S", "20")),
            after_s=float(os.environ.get("SOFTPAGE_GUESTVIEW_AFTER_S", "60")),
            baseline_s=float(os.environ.get("SOFTPAGE_GUESTVIEW_BASELINE_S", "60")),
            slow_ms=float(os.environ.get("SOFTPAGE_GUESTVIEW_SLOW_MS", "100")),
            connections=int(os.environ.get("SOFTPAGE_GUESTVIEW_CONNECTIONS", "4")),
            cold_age_ms=int(os.environ["SOFTPAGE_GUESTVIEW_COLD_AGE_MS"])
            if os.environ.get("SOFTPAGE_GUESTVIEW_COLD_AGE_MS") else None,
            disk_rate=parse_disk_rate(os.environ.get(DISK_RATE_ENV, "")),
            app=os.environ.get("SOFTPAGE_GUESTVIEW_APP", "nginx"),
        )
        if settings.app not in APPS:
            raise SystemExit(f"SOFTPAGE_GUESTVIEW_APP: {settings.app!r}; expected one of {', '.join(APPS)}")
        if settings.app == POSTGRESQL and settings.release != "bookworm":
            raise SystemExit("SOFTPAGE_GUESTVIEW_APP=postgresql: only the Debian 12 (bookworm) guest has "
                             "the database")
        if settings.guest_type not in DISTRO_GUEST_TYPES:
            raise SystemExit(f"SOFTPAGE_GUESTVIEW_GUEST_TYPE: {settings.guest_type!r}; expected one of "
                             f"{', '.join(DISTRO_GUEST_TYPES)}")
        if settings.before_s > settings.settle_s:
            raise SystemExit("SOFTPAGE_GUESTVIEW_BEFORE_S must not exceed SOFTPAGE_GUESTVIEW_SETTLE_S")
        return settings


@dataclass(frozen=True)
class Second:
    """One second of the load generator (dom0/app_load.py), times in seconds from the
    migration's start (the baseline's stand-in moment)."""

    start: float
    end: float
    requests: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    slow: int

    @property
    def rate(self) -> float:
        return self.requests / (self.end - self.start)


@dataclass
class MethodRun:
    method: str
    cache_fill_s: float
    cached_mb_before: int
    cached_mb_after: int
    throughput_before: float
    """Requests per second over the BEFORE_S before the migration."""
    recovered_s: float | None
    """Resume to the first of RECOVERED_SECONDS samples in a row at 90% of throughput_before;
    None: not within AFTER_S."""
    window_s: float
    requests_in_window: int
    lost: float | None
    """The baseline's rate times window_s, less requests_in_window (None for the baseline)."""
    slow_in_window: int
    slowed: float | None
    errors_in_window: int
    disk_read_after_resume: int | None
    disk_read_in_run: int
    pause_s: float | None
    """The longest pause of the guest's disk sampler: where the resume is taken to be."""
    active_file_mb: int
    inactive_file_mb: int
    """The guest's file cache on the LRU's active and inactive lists (/proc/meminfo) at the end of
    the settle, right before the migration."""
    load_1m: float
    """This machine's one-minute load average at the migration's start."""
    wall_s: float | None = None
    downtime_s: float | None = None
    pages_data: int | None = None
    pages_xalloc: int | None = None
    stream_bytes: int | None = None
    resume_s: float | None = None
    """The resume (incoming copy unpaused), from the migration's start."""
    request_s: float | None = None
    """The suspend request, from the migration's start."""

    @property
    def source_gone_s(self) -> float | None:
        """From the resume to the sender's end, which both ``xl migrate`` and ``softpage migrate``
        reach only once they destroyed the source: on this one host the resumed guest shares
        dom0 and the machine with that teardown (Xen relinquishing the old domain's memory)."""
        if self.wall_s is None or self.resume_s is None:
            return None
        return self.wall_s - self.resume_s


class HotplugTimedOut(Exception):
    """The receiving xl's disk hotplug ran out of libxl's fixed 40 s (a dom0 starved under TCG,
    testbed/README.md) and softpage resumed the guest at the sender: the run is measured again."""


def create_guest(testbed: Testbed, settings: Settings) -> DistroGuest:
    """The distro guest, created again while its disks' hotplug meets libxl's fixed 40 s (the
    harness itself tries twice)."""
    spec = DistroGuestSpec(name="guestview", release=settings.release, guest_type=settings.guest_type,
                           memory_mb=settings.guest_mb, kernel_args=guest_kernel_args(settings))
    for attempt in range(1, HOTPLUG_ATTEMPTS + 1):
        try:
            return testbed.create_distro_guest(spec, timeout_s=BOOT_TIMEOUT_S)
        except CommandFailed as failed:
            if HOTPLUG_TIMEOUT_MESSAGE not in failed.result.stderr or attempt == HOTPLUG_ATTEMPTS:
                raise
            log(f"guestview: xl create met the disk-hotplug timeout twice (attempt {attempt}); again")
            testbed.run(["xl", "destroy", spec.name], timeout_s=120)
    raise AssertionError("unreachable: the last attempt returns or raises")


def guest_kernel_args(settings: Settings) -> tuple[str, ...]:
    """The distro guest's extra kernel options: module parameters for softpage.ko, which libkmod
    applies when the module loads at boot."""
    if settings.cold_age_ms is None:
        return ()
    return (f"softpage.{COLD_AGE_PARAMETER}={settings.cold_age_ms}",)


def fresh_guest(testbed: Testbed, settings: Settings) -> DistroGuest:
    booting = time.monotonic()
    guest = create_guest(testbed, settings)
    up = guest.up_line()
    log(f"guestview: guest up {time.monotonic() - booting:.0f} s after xl create: {up}")
    if up["system"] != "running" or up["nginx"] != "active":
        raise SystemExit(f"guestview: guest up with {up}")
    if settings.app == POSTGRESQL:
        # not started at boot (testbed/distro/configure.sh); systemctl waits until it accepts connections
        guest.check_shell(f"systemctl start {pg_cluster(guest).unit}", timeout_s=600)
    if settings.cold_age_ms is not None:
        loaded = guest.check_shell(f"cat /sys/module/softpage/parameters/{COLD_AGE_PARAMETER}").strip()
        if loaded != str(settings.cold_age_ms):
            raise SystemExit(f"guestview: softpage.ko in the guest runs with {COLD_AGE_PARAMETER}={loaded}, "
                             f"not the {settings.cold_age_ms} SOFTPAGE_GUESTVIEW_COLD_AGE_MS asked for")
    return guest


def retire_guest(guest: DistroGuest) -> None:
    """The next method gets a new boot of the same disks: the root disk synced first, so that the
    next boot finds no journal to replay."""
    guest.shell("sync", timeout_s=300)
    guest.destroy()


def log(message: str) -> None:
    """Every line this bench prints goes through here (progress on stdout, flushed)."""
    print(message, flush=True)


def meminfo_mb(guest: DistroGuest, *fields: str) -> list[int]:
    text = guest.check_shell("cat /proc/meminfo")
    values = {line.split(":")[0]: int(line.split()[1]) // 1024 for line in text.splitlines() if ":" in line}
    return [values[field] for field in fields]


def fill_cache(guest: DistroGuest, settings: Settings) -> float:
    """Read the application's data once: nginx's files, or every file of PostgreSQL's databases."""
    started = time.monotonic()
    files = f"{pg_cluster(guest).data}/base/*/*" if settings.app == POSTGRESQL else "/srv/app/f*"
    guest.check_shell(f"cat {files} > /dev/null", timeout_s=1800)
    return time.monotonic() - started


@dataclass(frozen=True)
class PgCluster:
    """The guest's one PostgreSQL cluster, as Debian's ``pg_lsclusters`` names it: its major version
    is the image's (testbed/build.sh add_postgresql), not this bench's."""

    version: str
    name: str
    data: str

    @property
    def unit(self) -> str:
        return f"postgresql@{self.version}-{self.name}"

    @classmethod
    def parse(cls, listing: str) -> PgCluster:
        """``pg_lsclusters --no-header``: version, cluster, port, status, owner, data directory, log."""
        clusters = [line.split() for line in listing.splitlines() if line.strip()]
        if len(clusters) != 1 or len(clusters[0]) < 6:
            raise SystemExit(f"guestview: expected one PostgreSQL cluster in the guest, pg_lsclusters says "
                             f"{listing!r}")
        version, name, _port, _status, _owner, data, *_log = clusters[0]
        return cls(version, name, data)


def pg_cluster(guest: DistroGuest) -> PgCluster:
    return PgCluster.parse(guest.check_shell("pg_lsclusters --no-header"))


def psql(guest: DistroGuest, sql: str) -> str:
    """One query in the guest, as the database's owner, unaligned and without headers."""
    # from /: su keeps root's working directory, which psql cannot enter and says so on stdout
    query = shlex.join(["psql", "-tAc", sql, PG_DATABASE])
    return guest.check_shell(f"cd / && su postgres -c {shlex.quote(query)}", timeout_s=600).strip()


def pg_rows(guest: DistroGuest) -> int:
    """pgbench_accounts' rows, from pgbench's scale (one pgbench_branches row a unit)."""
    return int(psql(guest, "SELECT count(*) FROM pgbench_branches")) * PG_ROWS_PER_SCALE


def load_items(guest: DistroGuest, settings: Settings, names: list[str]) -> int:
    """What the load draws from: nginx's files, or PostgreSQL's rows."""
    return pg_rows(guest) if settings.app == POSTGRESQL else len(names)


def disk_sampler_loop(sample_s: float = DISK_SAMPLE_S) -> str:
    """bash: every ``sample_s``, the guest's clock and the sectors all its xvd disks have read,
    with builtins only (a process a sample cost the guest's one vCPU a share of nginx's time)."""
    return (f"exec 3<>{GUEST_DISK_FIFO}; while :; do s=0; for f in /sys/block/xvd*/stat; do "
            "read -r _ _ r _ < \"$f\"; s=$((s + r)); done; echo \"$EPOCHREALTIME $s\"; "
            f"read -t {sample_s} -u 3 _; done")


def start_disk_sampler(guest: DistroGuest, loop: str | None = None) -> None:
    script = disk_sampler_loop() if loop is None else loop
    guest.check_shell(f"rm -f {GUEST_DISK_FIFO}; mkfifo {GUEST_DISK_FIFO}; "
                      f"nohup bash -c {shlex.quote(script)} > {GUEST_DISK_LOG} 2>&1 < /dev/null & "
                      f"echo $! > {GUEST_DISK_PID}")


def parse_disk_samples(text: str) -> list[tuple[float, int]]:
    """The sampler's lines ``SECONDS SECTORS`` -> (seconds, bytes read)."""
    samples = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].isdigit():
            samples.append((float(fields[0]), int(fields[1]) * SECTOR_BYTES))
    return samples


def stop_disk_sampler(guest: DistroGuest) -> list[tuple[float, int]]:
    text = guest.check_shell(f"kill $(cat {GUEST_DISK_PID}); cat {GUEST_DISK_LOG}")
    samples = parse_disk_samples(text)
    if len(samples) < 2:
        raise TestbedError(f"guest disk sampler left {len(samples)} samples: {text[-500:]}")
    return samples


def load_command(nitems: int, settings: Settings, out: str, stop: str, max_s: float) -> str:
    """app_load.py against the guest's nginx (``nitems`` files) or PostgreSQL (``nitems`` rows)."""
    if settings.app == POSTGRESQL:
        protocol, port, login = POSTGRESQL, PG_PORT, [PG_DATABASE, PG_USER]
    else:
        protocol, port, login = "http", HTTP_PORT, []
    return shlex.join(["python3", f"{DOM0_TOOLS}/app_load.py", protocol, GUEST_ADDRESS, str(port), out, stop,
                       str(max_s), str(nitems), str(HOT_FRACTION), str(HOT_SKEW), str(LOAD_SEED),
                       str(settings.connections), str(settings.slow_ms), *login])


def start_load(testbed: Testbed, nfiles: int, settings: Settings) -> int:
    max_s = settings.settle_s + 3600 + settings.after_s
    result = testbed.run(
        f"rm -f {LOAD_OUT} {LOAD_STOP}; nohup {load_command(nfiles, settings, LOAD_OUT, LOAD_STOP, max_s)} "
        f"> /tmp/guestview-load.log 2>&1 < /dev/null & echo $!", check=True)
    return int(result.stdout.split()[-1])


def load_records(testbed: Testbed, path: str = LOAD_OUT) -> list[dict[str, object]]:
    text = testbed.run(["cat", path], check=True).stdout
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def wait_for_load(testbed: Testbed, until: float) -> None:
    """Until the load's seconds reach ``until`` on dom0's monotonic clock."""
    while True:
        last = testbed.run(f"tail -1 {LOAD_OUT}", check=True).stdout.strip()
        if last and float(json.loads(last)["end"]) >= until:
            return
        time.sleep(2)


def stop_load(testbed: Testbed, pid: int) -> list[dict[str, object]]:
    testbed.run(f"touch {LOAD_STOP}; while kill -0 {pid} 2>/dev/null; do sleep 0.2; done", timeout_s=120,
                check=True)
    log_text = testbed.run("cat /tmp/guestview-load.log", check=True).stdout.strip()
    if log_text:
        raise TestbedError(f"the load generator said: {log_text[-1500:]}")
    return load_records(testbed)


def to_seconds(records: list[dict[str, object]], origin: float) -> list[Second]:
    """app_load.py's lines -> seconds from ``origin`` (dom0's monotonic clock)."""
    def optional(record: dict[str, object], key: str) -> float | None:
        return float(str(record[key])) if key in record else None

    return [Second(float(str(record["start"])) - origin, float(str(record["end"])) - origin,
                   int(str(record["requests"])), int(str(record["errors"])), optional(record, "p50_ms"),
                   optional(record, "p99_ms"), optional(record, "max_ms"), int(str(record["slow"])))
            for record in records]


def rate_over(seconds: list[Second]) -> float:
    """Requests per second from the first second's start to the last one's end."""
    if not seconds:
        return 0.0
    return sum(second.requests for second in seconds) / (seconds[-1].end - seconds[0].start)


def recovered_after(seconds: list[Second], resume: float, before: float) -> float | None:
    after = [second for second in seconds if second.start >= resume]
    for index in range(len(after) - RECOVERED_SECONDS + 1):
        run_of_seconds = after[index:index + RECOVERED_SECONDS]
        if all(second.rate >= RECOVERED_FRACTION * before for second in run_of_seconds):
            return after[index].start - resume
    return None


def longest_pause(disk: list[tuple[float, int]]) -> int:
    """The index of the first sample after the longest gap between two samples."""
    gaps = [disk[index][0] - disk[index - 1][0] for index in range(1, len(disk))]
    return 1 + gaps.index(max(gaps))


def check_postgresql(guest: DistroGuest, rows: int, when: str) -> None:
    """systemd running, the cluster active, and rows spread over the whole table as ``pgbench -i``
    wrote them (the load only reads): every sampled row there with a zero balance, and a range of
    10,000 rows complete."""
    state = guest.shell(f"systemctl is-system-running; systemctl is-active {pg_cluster(guest).unit}")
    if state.output.split() != ["running", "active"]:
        raise SystemExit(f"guestview: after {when}: systemd/PostgreSQL say {state.output.split()}")
    step = max(1, rows // SAMPLE_ROWS)
    aids = sorted({*range(1, rows + 1, step), rows})
    middle = rows // 2
    answer = psql(guest, f"SELECT count(*), sum(abalance) FROM pgbench_accounts WHERE aid IN "
                         f"({', '.join(map(str, aids))}); SELECT count(*) FROM pgbench_accounts "
                         f"WHERE aid BETWEEN {middle} AND {middle + 9999}")
    if answer.split() != [f"{len(aids)}|0", "10000"]:
        raise SystemExit(f"guestview: after {when}: PostgreSQL's rows are not pgbench's: {answer!r}")


def check_guest(testbed: Testbed, guest: DistroGuest, expected: dict[str, str], sample: list[str],
                when: str, settings: Settings, nitems: int) -> None:
    if settings.app == POSTGRESQL:
        check_postgresql(guest, nitems, when)
        return
    state = guest.shell("systemctl is-system-running; systemctl is-active nginx")
    if state.output.split() != ["running", "active"]:
        raise SystemExit(f"guestview: after {when}: systemd/nginx say {state.output.split()}")
    served = fetch_checksums(testbed, sample)
    wrong = [name for name in sample if served.get(name) != expected[name]]
    if wrong:
        raise SystemExit(f"guestview: after {when}: nginx served other bytes than the disk holds: {wrong}")


def summarise_load(records: list[dict[str, object]]) -> dict[str, object]:
    """A calibration run of app_load.py: its requests per second over the whole run, and the
    latency of its slowest second's p99."""
    seconds = to_seconds(records, 0.0)
    p99s = [second.p99_ms for second in seconds if second.p99_ms is not None]
    return {"seconds": len(seconds), "requests": sum(second.requests for second in seconds),
            "requests_per_s": rate_over(seconds), "worst_p99_ms": max(p99s) if p99s else None,
            "errors": sum(second.errors for second in seconds)}


CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
"""The first fields of /proc/stat's ``cpu`` line (USER_HZ ticks of all CPUs)."""
GUEST_CPU_WINDOW_S = 8
LOOPBACK_FETCHES = 40


def cpu_shares(first: str, second: str) -> dict[str, float]:
    """Two /proc/stat ``cpu`` lines -> each CPU_FIELDS' share of the time between them."""
    def ticks(line: str) -> list[int]:
        fields = line.split()
        if not fields or fields[0] != "cpu" or len(fields) < len(CPU_FIELDS) + 1:
            raise ValueError(f"expected /proc/stat's cpu line, got {line!r}")
        return [int(value) for value in fields[1:len(CPU_FIELDS) + 1]]

    spent = [after - before for before, after in zip(ticks(first), ticks(second), strict=True)]
    total = sum(spent) or 1
    return {name: round(value / total, 3) for name, value in zip(CPU_FIELDS, spent, strict=True)}


def loopback_fetches(guest: DistroGuest, nfiles: int) -> dict[str, float]:
    """nginx without the network: the guest fetches LOOPBACK_FETCHES hot files from its own nginx
    over 127.0.0.1 (bash's /dev/tcp, one connection a request), timed on its own clock."""
    hot = max(1, int(nfiles * HOT_FRACTION))
    names = " ".join(f"f{index * hot // LOOPBACK_FETCHES:05d}" for index in range(LOOPBACK_FETCHES))
    # printf's own \r\n: a CR typed into the guest's console would reach its shell as a newline.
    # SIGPIPE ignored: a write to a connection nginx closed fails with a message, not silently.
    script = (f"trap '' PIPE; t0=$EPOCHREALTIME; for f in {names}; do "
              f"exec 3<>/dev/tcp/127.0.0.1/{HTTP_PORT}; "
              "printf 'GET /%s HTTP/1.0\\r\\n\\r\\n' $f >&3; cat <&3 > /dev/null; exec 3<&-; done; "
              "echo $t0 $EPOCHREALTIME")
    start, end = (float(value) for value in guest.check_shell(f"bash -c {shlex.quote(script)}",
                                                               timeout_s=600).split()[-2:])
    return {"requests": LOOPBACK_FETCHES, "seconds": round(end - start, 3),
            "requests_per_s": LOOPBACK_FETCHES / (end - start)}


def compare_load_generators(testbed: Testbed, guest: DistroGuest, nfiles: int,
                            settings: Settings) -> dict[str, object]:
    """Where the requests of the one-second wrk samples went: on one guest with its cache filled,
    one after the other, wrk as the e2e runs it (one run of CALIBRATION_S), wrk run for one second
    CALIBRATION_WRK_SECONDS times (each one's wall time from dom0's start of it to its end, as
    the old samples were taken), app_load.py for CALIBRATION_S, and app_load.py again beside each
    of the guest's disk samplers (the old one, a process a sample; today's, builtins only); where
    the time goes: the guest's and dom0's CPU shares (/proc/stat) around one more app_load.py run
    (the guest's over GUEST_CPU_WINDOW_S around it), and nginx without the network
    (``loopback_fetches``)."""
    calibration: dict[str, object] = {"load_1m_start": os.getloadavg()[0]}
    wrk = run_wrk(testbed, nfiles, duration_s=CALIBRATION_S, connections=settings.connections)
    calibration["wrk_5s"] = {"requests_per_s": wrk.requests_per_s, "p50_ms": wrk.latency_p50_ms,
                             "p99_ms": wrk.latency_p99_ms, "errors": wrk.errors}
    one_second = []
    for seed in range(CALIBRATION_WRK_SECONDS):
        command = wrk_command(nfiles, duration_s=1, connections=settings.connections, seed=LOAD_SEED + seed)
        result = testbed.run(command, timeout_s=120, check=True)
        one_run = WrkResult.from_output(result.stdout)
        one_second.append({"wall_s": result.wall_s, "requests": one_run.requests,
                           "p99_ms": one_run.latency_p99_ms})
    calibration["wrk_1s_runs"] = one_second

    def http_load(label: str) -> None:
        out = f"/tmp/guestview-calibration-{label}.jsonl"
        testbed.run(load_command(nfiles, settings, out, "/nonexistent", CALIBRATION_S),
                    timeout_s=CALIBRATION_S + 120, check=True)
        calibration[label] = summarise_load(load_records(testbed, out))

    http_load("http_load")
    # where the time goes while it runs: the guest's and dom0's CPUs (steal: waiting for a CPU)
    guest.check_shell(f"nohup bash -c 'head -1 /proc/stat; sleep {GUEST_CPU_WINDOW_S}; head -1 /proc/stat' "
                      "> /run/guestview-cpu 2>&1 < /dev/null &")
    dom0_first = testbed.run("head -1 /proc/stat", check=True).stdout
    http_load("http_load_cpu")
    dom0_second = testbed.run("head -1 /proc/stat", check=True).stdout
    time.sleep(GUEST_CPU_WINDOW_S)
    guest_lines = guest.check_shell("cat /run/guestview-cpu").splitlines()
    calibration["dom0_cpu"] = cpu_shares(dom0_first, dom0_second)
    calibration["guest_cpu"] = cpu_shares(guest_lines[0], guest_lines[1])
    try:
        calibration["guest_loopback"] = loopback_fetches(guest, nfiles)
    except TestbedError as error:  # one probe of the calibration: recorded as failed, the rest goes on
        calibration["guest_loopback"] = {"error": str(error)[-1000:]}
    for label, loop in (("http_load_old_disk_sampler", FORKING_DISK_SAMPLER),
                        ("http_load_disk_sampler", disk_sampler_loop())):
        start_disk_sampler(guest, loop)
        http_load(label)
        stop_disk_sampler(guest)
    calibration["load_1m_end"] = os.getloadavg()[0]
    return calibration


def measure(testbed: Testbed, guest: DistroGuest, method: str, nfiles: int, settings: Settings,
            baseline: MethodRun | None, out: Path,
            fill_s: float) -> tuple[MethodRun, list[Second], list[tuple[float, int]]]:
    """One run of ``method`` on a guest whose cache ``fill_cache`` filled (module docstring);
    returns its summary, seconds and disk samples (seconds from the migration's start)."""
    [cached_before] = meminfo_mb(guest, "Cached")
    start_disk_sampler(guest)
    pid = start_load(testbed, nfiles, settings)
    time.sleep(settings.settle_s)
    active_file, inactive_file = meminfo_mb(guest, "Active(file)", "Inactive(file)")
    load_1m = os.getloadavg()[0]
    measured: dict[str, object] = {}
    if method == BASELINE:
        first = load_records(testbed)[0]
        origin = float(str(first["start"])) + settings.settle_s
        wait_for_load(testbed, origin + settings.baseline_s + settings.after_s)
        resume = request = None
        window_end = origin + settings.baseline_s + settings.after_s
    else:
        sender, prune = METHODS[method]
        try:
            measured = migrate(guest, sender, prune=prune)
        except RuntimeError as failure:
            stop_load(testbed, pid)
            stop_disk_sampler(guest)
            if HOTPLUG_TIMEOUT_MESSAGE in str(failure) and "Resumed OK" in str(failure):
                raise HotplugTimedOut(str(failure)[-1500:]) from failure
            raise
        send = measured["send"]
        assert isinstance(send, dict)
        origin = float(send["started_at"])
        if send.get("running_at") is None:
            raise SystemExit(f"guestview: {method}: the watcher did not see the guest run again: {send}")
        resume = float(send["running_at"]) - origin
        request = float(send["requested_at"]) - origin if send.get("requested_at") is not None else None
        window_end = float(send["running_at"]) + settings.after_s
        wait_for_load(testbed, window_end)
    records = stop_load(testbed, pid)
    guest_disk = stop_disk_sampler(guest)
    [cached_after] = meminfo_mb(guest, "Cached")
    seconds = to_seconds(records, origin)
    before = [second for second in seconds if -settings.before_s <= second.start and second.end <= 0]
    window = [second for second in seconds if second.start >= 0 and second.end <= window_end - origin]
    throughput_before = rate_over(before)
    window_s = window[-1].end - window[0].start if window else 0.0
    in_window = sum(second.requests for second in window)
    slow = sum(second.slow for second in window)

    disk_after: int | None = None
    pause_s: float | None = None
    disk: list[tuple[float, int]]
    if resume is not None:
        first_after = longest_pause(guest_disk)
        pause_s = guest_disk[first_after][0] - guest_disk[first_after - 1][0]
        disk_after = guest_disk[-1][1] - guest_disk[first_after][1]
        # The guest's clock is not dom0's: anchor its first sample after the pause at the resume.
        shift = resume - guest_disk[first_after][0]
    else:
        shift = seconds[0].start - guest_disk[0][0]
    disk = [(at + shift, read - guest_disk[0][1]) for at, read in guest_disk]

    run = MethodRun(
        method=method, cache_fill_s=round(fill_s, 1), cached_mb_before=cached_before,
        cached_mb_after=cached_after,
        throughput_before=throughput_before,
        recovered_s=recovered_after(seconds, resume, throughput_before) if resume is not None else None,
        window_s=window_s, requests_in_window=in_window,
        lost=None, slow_in_window=slow, slowed=None,
        errors_in_window=sum(second.errors for second in window),
        disk_read_after_resume=disk_after, disk_read_in_run=guest_disk[-1][1] - guest_disk[0][1],
        pause_s=pause_s, active_file_mb=active_file, inactive_file_mb=inactive_file, load_1m=load_1m,
        resume_s=resume, request_s=request)
    if baseline is not None and baseline.window_s:
        run.lost = baseline.requests_in_window / baseline.window_s * window_s - in_window
        run.slowed = slow - baseline.slow_in_window / baseline.window_s * window_s
    if measured:
        send, tap = measured["send"], measured["tap"]
        assert isinstance(send, dict) and isinstance(tap, dict)
        run.wall_s = float(send["wall_s"])
        run.downtime_s = send.get("downtime_s")
        run.pages_data, run.pages_xalloc = int(tap["pages_data"]), int(tap["pages_xalloc"])
        run.stream_bytes = int(tap["stream_bytes"])
        stats = measured.get("stats")
        if isinstance(stats, list):
            (out / "stats").mkdir(exist_ok=True)
            (out / "stats" / f"{method.replace('=', '-')}.jsonl").write_text(
                "".join(json.dumps(record) + "\n" for record in stats))
    return run, seconds, disk


def write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as output:
        writer = csv.DictWriter(output, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def append_csv(path: Path, rows: list[dict[str, object]]) -> None:
    new_file = not path.exists()
    with open(path, "a", newline="", encoding="utf-8") as output:
        writer = csv.DictWriter(output, fieldnames=list(rows[0]))
        if new_file:
            writer.writeheader()
        writer.writerows(rows)


def load_series(out: Path) -> tuple[dict[str, list[Second]], dict[str, list[tuple[float, int]]]]:
    seconds: dict[str, list[Second]] = {}
    disk: dict[str, list[tuple[float, int]]] = {}
    if (out / "samples.csv").exists():
        with open(out / "samples.csv", newline="", encoding="utf-8") as samples:
            for row in csv.DictReader(samples):
                p50, p99, most = (float(row[name]) if row[name] else None
                                  for name in ("p50_ms", "p99_ms", "max_ms"))
                seconds.setdefault(row["method"], []).append(Second(
                    float(row["start"]), float(row["end"]), int(row["requests"]), int(row["errors"]),
                    p50, p99, most, int(row["slow"])))
    if (out / "disk.csv").exists():
        with open(out / "disk.csv", newline="", encoding="utf-8") as samples:
            for row in csv.DictReader(samples):
                disk.setdefault(row["method"], []).append((float(row["at"]), int(row["read_bytes"])))
    return seconds, disk


def lost_against_before(run: MethodRun) -> float | None:
    """The run's own throughput before the migration times the window, less what it completed:
    the figure that does not depend on the baseline's load (other testbeds share this machine,
    and the throughput of one run's minutes need not be another's)."""
    if run.method == BASELINE:
        return None
    return run.throughput_before * run.window_s - run.requests_in_window


def table(runs: list[MethodRun], header: str, slow_ms: float) -> str:
    def cell(value: object, digits: int = 1) -> str:
        if value is None:
            return "-"
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    def mib(value: int | None) -> str:
        return "-" if value is None else f"{value / 2**20:.1f}"

    lines = [header, "",
             "| method | req/s before | back to 90% s | source gone s | requests in window | window s "
             "| lost vs baseline "
             f"| lost vs own before | slow (> {slow_ms:g} ms) | slowed | errors | MiB read after resume "
             "| cache MiB before / after "
             "| file cache MiB active / inactive | migration s | downtime s | pages with data "
             "| pages without data | MiB sent | load |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        lines.append(
            f"| {run.method} | {cell(run.throughput_before)} | {cell(run.recovered_s)} | "
            f"{cell(run.source_gone_s)} | "
            f"{run.requests_in_window} | {cell(run.window_s)} | {cell(run.lost, 0)} | "
            f"{cell(lost_against_before(run), 0)} | {run.slow_in_window} | "
            f"{cell(run.slowed, 0)} | {run.errors_in_window} | {mib(run.disk_read_after_resume)} | "
            f"{run.cached_mb_before} / {run.cached_mb_after} | "
            f"{run.active_file_mb} / {run.inactive_file_mb} | {cell(run.wall_s)} | "
            f"{cell(run.downtime_s, 2)} | "
            f"{cell(run.pages_data)} | {cell(run.pages_xalloc)} | {mib(run.stream_bytes)} | "
            f"{run.load_1m:.1f} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[MethodRun], seconds: dict[str, list[Second]], disk: dict[str, list[tuple[float, int]]],
         path: Path, slow_ms: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(runs), 3, figsize=(15, 2.4 * len(runs) + 0.6), sharex=True, squeeze=False)
    for row, run in enumerate(runs):
        series = seconds.get(run.method, [])
        middles = [(second.start + second.end) / 2 for second in series]
        throughput, latency, reads = axes[row]
        throughput.plot(middles, [second.rate for second in series], drawstyle="steps-mid")
        throughput.axhline(RECOVERED_FRACTION * run.throughput_before, color="grey", linestyle=":",
                           linewidth=1)
        throughput.set_ylabel(f"{run.method}\nreq/s")
        nan = float("nan")
        latency.plot(middles, [nan if second.p99_ms is None else second.p99_ms for second in series],
                     label="p99")
        latency.plot(middles, [nan if second.max_ms is None else second.max_ms for second in series],
                     label="max", alpha=0.5)
        latency.axhline(slow_ms, color="grey", linestyle=":", linewidth=1)
        latency.set_yscale("log")
        latency.set_ylabel("latency ms")
        samples = disk.get(run.method, [])
        rates = [((samples[i][0] + samples[i - 1][0]) / 2,
                  (samples[i][1] - samples[i - 1][1]) / 2**20 / max(samples[i][0] - samples[i - 1][0], 1e-3))
                 for i in range(1, len(samples))]
        reads.plot([at for at, _ in rates], [rate for _, rate in rates], drawstyle="steps-mid",
                   color="tab:brown")
        reads.set_ylabel("disk read MiB/s")
        for axis in (throughput, latency, reads):
            axis.grid(True, alpha=0.3)
            axis.axvline(0, color="black", linewidth=0.8)
            if run.request_s is not None:
                axis.axvline(run.request_s, color="tab:red", linestyle="--", linewidth=0.8)
            if run.resume_s is not None:
                axis.axvline(run.resume_s, color="tab:green", linestyle="--", linewidth=0.8)
        if row == 0:
            throughput.set_title("requests per second (dotted: 90% of before)")
            latency.set_title(f"latency, ms (dotted: {slow_ms:g} ms)")
            latency.legend(loc="upper left", fontsize=7)
            reads.set_title("guest's disk reads")
    figure.supxlabel("seconds from the migration's start (black; the baseline's stand-in moment); "
                     "red: suspend request, green: resume", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def output_dir(settings: Settings) -> Path:
    chosen = os.environ.get("SOFTPAGE_GUESTVIEW_OUT")
    out = Path(chosen) if chosen else REPO / "results" / time.strftime("guestview-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    meta = out / "settings.json"
    mine = {key: value for key, value in asdict(settings).items() if key != "methods"}
    # sweeps from before SOFTPAGE_GUESTVIEW_GUEST_TYPE, _COLD_AGE_MS and _APP: PVH, the module's own
    # age, nginx
    older = {"guest_type": "pvh", "cold_age_ms": None, "app": "nginx"}
    if meta.exists() and {**older, **json.loads(meta.read_text())} != mine:
        raise SystemExit(f"guestview: {out} holds a sweep with other settings: {meta.read_text()}")
    meta.write_text(json.dumps(mine) + "\n")
    return out



def testbed_config(settings: Settings) -> TestbedConfig:
    """QEMU memory for dom0 and the two copies of the guest a localhost migration holds (unless
    SOFTPAGE_QEMU_MEM_MB says otherwise)."""
    config = TestbedConfig.from_env(settings.xen_version)
    if settings.guest_type == "pv" and not config.platform.pv_live_migration:
        raise SystemExit(f"guestview: Xen {settings.xen_version} does not live-migrate PV guests (no shadow "
                         f"paging); SOFTPAGE_BENCH_XEN={XEN_PV_VERSION} does")
    if "SOFTPAGE_QEMU_MEM_MB" in os.environ:
        return config
    return dataclasses.replace(config, qemu_mem_mb=config.dom0_mem_mb + 2 * settings.guest_mb + 1024)


def calibrate_once(testbed: Testbed, guest: DistroGuest, names: list[str], settings: Settings,
                   out: Path) -> None:
    """``compare_load_generators`` on the sweep's first guest, once its cache is filled (nginx only:
    it compares wrk's runs with app_load.py's)."""
    calibration = out / CALIBRATION_FILE
    if settings.app != POSTGRESQL and not calibration.exists():
        log(f"guestview: the load generators side by side ({CALIBRATION_FILE})")
        measured = compare_load_generators(testbed, guest, len(names), settings)
        calibration.write_text(json.dumps(measured, indent=1) + "\n")
        log(f"guestview: {json.dumps(measured)}")


MethodResult = tuple[MethodRun, list[Second], list[tuple[float, int]]]
"""A method's run, its seconds and its guest's disk samples."""


def run_method(testbed: Testbed, method: str, names: list[str], settings: Settings,
               baseline: MethodRun | None, out: Path, expected: dict[str, str]) -> MethodResult:
    """``measure_on_new_guests``, again from a new boot (up to TRIPLE_FAULT_RETRIES times) when
    it failed while Xen logged a guest triple fault (nested SVM under TCG, testbed/README.md)."""
    return again_after_triple_faults(
        testbed, lambda: measure_on_new_guests(testbed, method, names, settings, baseline, out, expected),
        retries=TRIPLE_FAULT_RETRIES)


def measure_on_new_guests(testbed: Testbed, method: str, names: list[str], settings: Settings,
                          baseline: MethodRun | None, out: Path, expected: dict[str, str]) -> MethodResult:
    """``method`` on a guest of its own: booted, its cache filled, measured (again, on a new boot,
    after a migration whose receiver met the hotplug timeout), checked and destroyed."""
    sample = names[:: max(1, len(names) // SAMPLE_FILES)]
    for attempt in range(1, HOTPLUG_ATTEMPTS + 1):
        guest = fresh_guest(testbed, settings)
        fill_s = fill_cache(guest, settings)
        nitems = load_items(guest, settings, names)
        calibrate_once(testbed, guest, names, settings, out)
        try:
            run, seconds, disk = measure(testbed, guest, method, nitems, settings, baseline, out, fill_s)
        except HotplugTimedOut as timed_out:
            if attempt == HOTPLUG_ATTEMPTS:
                raise
            log(f"guestview: {method}: the receiver's disk hotplug timed out (try {attempt}), "
                f"the guest resumed at the sender; measuring again on a new boot:\n{timed_out}")
            check_guest(testbed, guest, expected, sample, f"{method}'s failed migration", settings, nitems)
            retire_guest(guest)
            continue
        check_guest(testbed, guest, expected, sample, method, settings, nitems)
        retire_guest(guest)
        return run, seconds, disk
    raise AssertionError("unreachable: the last attempt returns or raises")


def main() -> int:
    settings = Settings.from_env()
    config = testbed_config(settings)
    out = output_dir(settings)
    runs_path = out / "runs.csv"
    runs = read_runs(runs_path, MethodRun)
    todo = [method for method in settings.methods if method not in {run.method for run in runs}]
    if todo and BASELINE not in {run.method for run in runs} and todo[0] != BASELINE:
        raise SystemExit("guestview: the baseline runs first: the others' lost and slowed requests need it")
    started = time.monotonic()
    cold_age = (f"softpage.ko's {COLD_AGE_PARAMETER} {settings.cold_age_ms}; "
                if settings.cold_age_ms is not None else "")
    header = (f"The guest's view of a migration, {time.strftime('%Y-%m-%d')}: Debian "
              f"{settings.release} {settings.guest_type.upper()} guest ({settings.guest_mb} MiB, 1 vCPU, "
              f"{settings.app}, a new boot per method), "
              f"{describe_disk_rate(settings.disk_rate)}; a keep-alive client in dom0 "
              f"({settings.connections} connections, {HOT_FRACTION:.0%} hot set); {cold_age}"
              f"Xen {settings.xen_version} ({config.platform.release} dom0) under QEMU TCG on this machine "
              f"({os.cpu_count()} cores); one run per method.")
    calibrate = settings.app != POSTGRESQL and not (out / CALIBRATION_FILE).exists()
    if todo or calibrate:
        with booted_testbed(config, Path(tempfile.mkdtemp(prefix="softpage-guestview-"))) as testbed:
            install_dom0_tools(testbed)
            info = testbed.payload_info()
            if info.get(f"distro_kmod_{settings.release}") != "built":
                raise SystemExit(f"guestview: the payload has no {settings.release} guest with softpage: "
                                 f"{info}")
            expected = read_app_checksums(testbed.app_checksums())
            names = app_file_names(expected)
            baseline = next((run for run in runs if run.method == BASELINE), None)
            if not todo:
                guest = fresh_guest(testbed, settings)
                fill_cache(guest, settings)
                calibrate_once(testbed, guest, names, settings, out)
                retire_guest(guest)
            for method in todo:
                run, seconds, disk = run_method(testbed, method, names, settings, baseline, out, expected)
                if method == BASELINE:
                    baseline = run
                runs.append(run)
                append_csv(runs_path, [asdict(run)])
                append_csv(out / "samples.csv", [{"method": method, **asdict(second)} for second in seconds])
                append_csv(out / "disk.csv", [{"method": method, "at": at, "read_bytes": read}
                                              for at, read in disk])
                log(f"guestview: {method}: cache filled in {run.cache_fill_s} s, "
                    f"{run.throughput_before:.1f} req/s before, back to 90% {run.recovered_s} s after the "
                    f"resume, lost {run.lost}, migration {run.wall_s} s, downtime {run.downtime_s} s, "
                    f"load {run.load_1m:.1f}")
    if not runs:
        log(f"results in {out} ({time.monotonic() - started:.0f} s): {CALIBRATION_FILE} alone")
        return 0
    seconds_by_method, disk_by_method = load_series(out)
    ordered = sorted(runs, key=lambda run: ALL_METHODS.index(run.method))
    text = table(ordered, header, settings.slow_ms)
    (out / "table.md").write_text(text)
    plot(ordered, seconds_by_method, disk_by_method, out / "timeline.png", settings.slow_ms)
    log("\n" + text)
    log(f"results in {out} ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
