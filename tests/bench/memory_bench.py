#!/usr/bin/env python3
"""dom0's memory per PFN: the sender's peak RSS for a 64 GiB guest, and for a hostile GFN.

Each case runs in a child process of its own. The child builds what dom0 would already hold
before a migration starts (the interpreter, numpy, the sender's modules, the guest's encoded
reports, one batch of page contents), then resets its peak RSS (``/proc/self/clear_refs``, 5)
and runs the sender; it reports its resident set before (``VmRSS``) and its peak after
(``VmHWM``). The difference is what the migration itself held, and is divided by the domain's
``p2m_size``.

``64gib``: the real driver, planner, soft-page decoder and stream writer (into /dev/null,
through the writer thread) on a PVH-shaped domain of ``--pfns`` PFNs (default 2^24: 64 GiB;
a 256 MiB MMIO hole at 3.75 GiB, RAM everywhere else). A dom0 testbed cannot host such a guest,
so the backend is a stand-in that holds what ``XenBackend`` holds: the log-dirty bitmap
(1 bit a PFN, a copy per harvest as ``DirtyLog.clean`` makes it), one mapped batch of pages,
and the report as copied out of the grants (``XenSoftPageChannel._consistent_copy``). The
guest reports the top half of its RAM free and every fourth page below it as cache, and writes
1/32, then 1/256 of its pages, then 40 pages between rounds: three live rounds, an after-drop
round and the final one with the free half held.

``hostile``: ``XenBackend`` on the fake libxenctrl of tests/xen_fakes.py, for a 256 MiB domain
whose maximum GPFN the guest raised to ``--hostile-gfn`` (default 2^36) by mapping one frame
there. The child's address space is capped at 2 GiB above its size after setup, so that a sender
without a bound fails with ``MemoryError`` instead of taking the machine.

    .venv/bin/python -m tests.bench.memory_bench [--pfns N] [--hostile-gfn GFN] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

DEFAULT_PFNS = 1 << 24
DEFAULT_HOSTILE_GFN = 1 << 36
HOSTILE_RAM_PFNS = 1 << 16
"""The hostile domain's RAM: 256 MiB."""
PVH_HOLE = (0xF0000, 0x100000)
"""The 64 GiB domain's MMIO hole: PFNs [3.75 GiB, 4 GiB), as libxl lays out a PVH guest's."""
ADDRESS_SPACE_HEADROOM = 2 << 30
LIVE_DIRTY_SHIFTS = (5, 8)
"""The guest writes 1/2^5, then 1/2^8 of its pages between live rounds."""
LATE_DIRTY_PAGES = 40
"""Then fewer than libxenguest's 50: the precopy policy stops."""


# -- measuring ------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    gc.collect()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")


# -- the 64 GiB case ------------------------------------------------------------------------
class BenchBackend:
    """``MigrationBackend`` that holds per PFN what ``XenBackend`` holds, and nothing else."""

    def __init__(self, p2m_size: int) -> None:
        import numpy as np

        from softpage import abi, bitmap
        from softpage.driver import READ_BATCH_PFNS
        from softpage.pfnset import PfnSet
        from softpage.snapshot import SnapshotState, SoftSnapshot

        self.np = np
        self.p2m_size = p2m_size
        hole_start, hole_end = PVH_HOLE if p2m_size > PVH_HOLE[1] else (p2m_size, p2m_size)
        self.hole = (hole_start, hole_end)
        ram = PfnSet.full(p2m_size)
        ram.words[hole_start // 64 : hole_end // 64] = 0
        top_half = PfnSet.full(p2m_size)
        top_half.words[: top_half.words.size // 2] = 0
        free = ram & top_half
        cache = PfnSet(p2m_size, ram.words & ~top_half.words & np.uint64(0x1111_1111_1111_1111))
        empty = PfnSet.empty(p2m_size)

        def report(state: SnapshotState, held: PfnSet) -> bytearray:
            return bytearray(bitmap.encode(SoftSnapshot(
                state=state, generation=2, request_id=0, flags=0, guest_nr_pfns=p2m_size,
                scan_ns=1000, free=free, cache=cache, slab=empty, held=held)))

        self.reports = {"snapshot": report(SnapshotState.SNAPSHOT, empty),
                        "final": report(SnapshotState.FINAL, free)}
        self.request_id_offset = dict((name, offset) for name, offset, _ in abi.HEADER_FIELDS)["request_id"]
        rng = np.random.default_rng(7)
        self.dirty_logs: list[bytes] = []
        for shift in LIVE_DIRTY_SHIFTS:
            words = rng.integers(0, 2**64, size=ram.words.size, dtype=np.uint64)
            for _ in range(shift - 1):
                words &= rng.integers(0, 2**64, size=ram.words.size, dtype=np.uint64)
            self.dirty_logs.append((words & ram.words).tobytes())
        late = rng.choice(hole_start, size=LATE_DIRTY_PAGES, replace=False)
        self.dirty_logs.append(PfnSet.from_pfns(p2m_size, late).to_bytes())
        # One batch mapped at a time, as XenBackend.read_pages maps it: resident before we start.
        self.pages = np.full(READ_BATCH_PFNS * abi.PAGE_SIZE, 0x5A, dtype=np.uint8)
        self.harvests = 0
        self.dirty_log_buffer = bytearray()
        self.request_ids: dict[str, int] = {}

    def describe(self) -> Any:
        from softpage.backend import DomainInfo, GuestType

        return DomainInfo(domid=7, name="bench64g", guest_type=GuestType.PVH, p2m_size=self.p2m_size,
                          max_memkb=(self.p2m_size - (self.hole[1] - self.hole[0])) * 4, nr_vcpus=1,
                          xen_version=(4, 17))

    def static_info(self) -> Any:
        from softpage.backend import StaticInfo

        return StaticInfo(cpuid_policy=struct.pack("<6I", 0, 0xFFFFFFFF, 0xD, 1, 2, 3),
                          msr_policy=struct.pack("<IIQ", 0xCE, 0, 0))

    def enable_logdirty(self) -> None:
        # XenBackend's DirtyLog: the hypercall buffer Xen copies the bitmap into, for the whole run.
        self.dirty_log_buffer = bytearray(len(self.dirty_logs[0]))

    def harvest_dirty(self, final: bool) -> Any:
        from softpage.pfnset import PfnSet

        self.dirty_log_buffer[:] = self.dirty_logs[min(self.harvests, len(self.dirty_logs) - 1)]
        self.harvests += 1
        return PfnSet.from_bytes(self.p2m_size, self.dirty_log_buffer)

    def page_types(self, pfns: Any) -> Any:
        np = self.np
        from softpage.xen.ctrl import XEN_DOMCTL_PFINFO_XTAB

        in_hole = (pfns >= np.uint64(self.hole[0])) & (pfns < np.uint64(self.hole[1]))
        return np.where(in_hole, np.uint32(XEN_DOMCTL_PFINFO_XTAB), np.uint32(0)).astype(np.uint32)

    def read_pages(self, pfns: Any, types: Any) -> Any:
        from softpage.backend import PageBatch

        return PageBatch(memoryview(self.pages)[: pfns.size * 4096])

    def suspend(self) -> None:
        pass

    def end_of_checkpoint(self) -> Any:
        from softpage.backend import EndOfCheckpoint, TscInfo

        return EndOfCheckpoint(tsc=TscInfo(mode=0, khz=2_000_000, nsec=1, incarnation=1),
                               hvm_context=b"BENCHCTX" + bytes(56), hvm_params=((1, 0xFEFFF),))

    def resume(self) -> None:
        pass

    def soft_channel(self) -> Any:
        return self

    def cleanup(self) -> None:
        pass

    # -- SoftPageChannel -------------------------------------------------------------------
    def arm(self, armed: bool) -> None:
        pass

    def request(self, request_id: int) -> None:
        self.request_ids["snapshot"] = request_id

    def request_final(self, request_id: int) -> None:
        self.request_ids["final"] = request_id

    def prune_cache(self, mode: Any) -> bool:
        return True

    def drop_caches(self, drop_id: int, timeout: float) -> Any:
        from softpage.backend import DropOutcome

        return DropOutcome.DONE

    def read(self, request_id: int, timeout: float) -> bytes | None:
        kind = "final" if self.request_ids.get("final") == request_id else "snapshot"
        published = self.reports[kind]
        struct.pack_into("<Q", published, self.request_id_offset, request_id)
        return bytes(published)  # the copy out of the grants

    def read_current(self) -> bytes | None:
        return bytes(self.reports["snapshot"])


def run_64gib(p2m_size: int) -> dict[str, Any]:
    from softpage.driver import send_domain
    from softpage.options import DriverOptions
    from softpage.sender import XlStreamSink
    from softpage.stream.background import BackgroundWritev
    from softpage.stream.writer import StreamWriter

    backend = BenchBackend(p2m_size)
    devnull = os.open(os.devnull, os.O_WRONLY)
    background = BackgroundWritev(lambda buffers: os.writev(devnull, buffers))
    sink = XlStreamSink(StreamWriter(background), b"{}", background)
    _reset_peak()
    before = _status_kib("VmRSS")
    started = time.monotonic()
    stats = send_domain(backend, sink, DriverOptions(), log=lambda _message: None)
    background.close()
    background.join()
    seconds = time.monotonic() - started
    peak = _status_kib("VmHWM")
    return {
        "case": "64gib", "p2m_size": p2m_size, "outcome": f"migrated in {len(stats.rounds)} rounds",
        "pages_data": stats.pages_data, "pages_xalloc": stats.pages_xalloc,
        "rss_before_kib": before, "peak_kib": peak, "seconds": round(seconds, 1),
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


# -- the hostile case -----------------------------------------------------------------------
def run_hostile(hostile_gfn: int) -> dict[str, Any]:
    from softpage.driver import send_domain
    from softpage.errors import MigrationError
    from softpage.options import DriverOptions
    from softpage.sender import XlStreamSink
    from softpage.stream.background import BackgroundWritev
    from softpage.stream.writer import StreamWriter
    from softpage.xen.backend import XenBackend
    from softpage.xenstore import MemoryStore
    from tests.xen_fakes import FakeDomain, fake_binding

    domid = 9
    domain = FakeDomain(domid=domid, nr_pfns=HOSTILE_RAM_PFNS,
                        extra_xtab_pfns=hostile_gfn + 1 - HOSTILE_RAM_PFNS)
    binding, _lib = fake_binding([domain])
    store = MemoryStore({f"/local/domain/{domid}/name": "hostile"})
    backend = XenBackend(domid, store=store, binding=binding)  # type: ignore[arg-type]
    devnull = os.open(os.devnull, os.O_WRONLY)
    background = BackgroundWritev(lambda buffers: os.writev(devnull, buffers))
    sink = XlStreamSink(StreamWriter(background), b"{}", background)
    _reset_peak()
    before = _status_kib("VmRSS")
    cap = _status_kib("VmSize") * 1024 + ADDRESS_SPACE_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))
    started = time.monotonic()
    try:
        send_domain(backend, sink, DriverOptions(), log=lambda _message: None)
        outcome = "migrated (not refused)"
    except MigrationError as error:
        outcome = f"refused: {error}"
    except MemoryError:
        outcome = "MemoryError (address space capped at 2 GiB above the start)"
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        background.close()
        background.join()
        backend.cleanup()
    seconds = time.monotonic() - started
    return {
        "case": "hostile", "p2m_size": hostile_gfn + 1, "outcome": outcome,
        "rss_before_kib": before, "peak_kib": _status_kib("VmHWM"), "seconds": round(seconds, 1),
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


# -- the parent -----------------------------------------------------------------------------
def measure(case: str, pfns: int, hostile_gfn: int) -> dict[str, Any]:
    """One case in a child process of its own; its JSON result, with bytes per PFN added."""
    child = subprocess.run(
        [sys.executable, "-m", "tests.bench.memory_bench", "--child", case, "--pfns", str(pfns),
         "--hostile-gfn", str(hostile_gfn)],
        capture_output=True, text=True, check=False, cwd=REPO)
    if child.returncode != 0:
        raise RuntimeError(f"{case}: the child failed ({child.returncode}): {child.stderr.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    held = (result["peak_kib"] - result["rss_before_kib"]) * 1024
    result["migration_peak_bytes"] = held
    result["bytes_per_pfn"] = held / result["p2m_size"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pfns", type=int, default=DEFAULT_PFNS)
    parser.add_argument("--hostile-gfn", type=int, default=DEFAULT_HOSTILE_GFN)
    parser.add_argument("--case", choices=("64gib", "hostile"), action="append")
    parser.add_argument("--json", action="store_true", help="one JSON object a case")
    parser.add_argument("--child", choices=("64gib", "hostile"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "64gib":
        print(json.dumps(run_64gib(args.pfns)))
        return 0
    if args.child == "hostile":
        print(json.dumps(run_hostile(args.hostile_gfn)))
        return 0
    for case in args.case or ("64gib", "hostile"):
        result = measure(case, args.pfns, args.hostile_gfn)
        if args.json:
            print(json.dumps(result))
            continue
        print(f"{case}: p2m_size {result['p2m_size']:,} PFNs: {result['outcome']}")
        print(f"  resident before {result['rss_before_kib'] / 1024:.1f} MiB, peak "
              f"{result['peak_kib'] / 1024:.1f} MiB: the migration held "
              f"{result['migration_peak_bytes'] / 2**20:.1f} MiB more, "
              f"{result['bytes_per_pfn']:.3f} bytes/PFN ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
