#!/usr/bin/env python3
"""Do the link bench's guests die of the migration, or of the disk reads after it? A control for
issue 19's silent guest deaths, with no migration at all.

In the link sweeps, the 2 GiB PVH guest died (Xen: "Triple fault", no kernel message) most often
while it read its files back from disk after a pruned move had dropped its page cache: the bench's
warm-up before a run, or the full check after one. Every guest-side RIP Xen dumped for those
deaths sits right after a VM exit (a `wrmsr` to the x2APIC's EOI, a `vmmcall`, an interrupted
`rep stos`), like the boot-time deaths with the RIP in Xen's own text that TCG's nested SVM causes.
A disk read is many such exits (each completion an event-channel upcall and an EOI). If that is
the cause, a guest that was never migrated dies as often while it reads the same files back.

The probe boots the link bench's pair and its guest on host-a (the same ``bench_guest`` and
neighbour, host-b idle beside it), then SOFTPAGE_PROBE_REFILLS times (default 6): drops the
guest's page cache (``echo 3 > /proc/sys/vm/drop_caches``) and reads its files back
(``warm_cache``, about 1.9 GiB from its data disk); every SOFTPAGE_PROBE_CHECK_EVERY-th time
(default 3) the workload's full check does the reading, as after a link run. A guest that dies is
replaced by a fresh one, whose boot (it reads the files in as well) is a row of its own. Xen's
triple-fault line and the RIP it dumped are kept, the RIP named from SOFTPAGE_PROBE_SYSTEM_MAP
(the guest kernel's System.map, from Debian's ``linux-image-*-dbg``; optional).

    .venv/bin/python -m tests.bench.refill_probe     (writes results/refill-probe-DATE/)
"""

from __future__ import annotations

import bisect
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from softpage_testbed import XEN_PVH_VERSION, Guest, Testbed, TestbedConfig, TestbedError, booted_pair
from tests.bench.link_bench import (
    NEIGHBOUR_SPIN_MB,
    hand_written_part,
    machine_load,
    size_hosts_for,
    start_neighbour,
)
from tests.bench.xen_bench import (
    REPO,
    bench_guest,
    bench_guest_kernel,
    check_guest,
    output_dir,
    start_guest,
    warm_cache,
)

REFILLS = 6
CHECK_EVERY = 3
GUEST_MB = 2048

TRIPLE_FAULT = re.compile(r"\(XEN\) \[\s*([\d.]+)\] (d\d+)v\d+ Triple fault")
DUMPED_RIP = re.compile(r"RIP:\s+([0-9a-f]{4}):\[<([0-9a-f]+)>\]")


@dataclass
class Refill:
    label: str
    how: str
    seconds: float
    outcome: str
    rip: str = ""


def drop_caches(guest: Guest, token: str) -> None:
    marker = f"PROBE-DROP-{token}"
    guest.console_command(f"sync; echo 3 > /proc/sys/vm/drop_caches; echo {marker} $(cat /proc/loadavg)")
    guest.wait_for(rf"{marker} \d", timeout_s=300)


def symbols(system_map: str) -> tuple[list[int], list[str]]:
    """The text symbols of a System.map, sorted: (addresses, names)."""
    if not system_map:
        return [], []
    entries = sorted((int(address, 16), name) for address, kind, name in
                     (line.split()[:3] for line in Path(system_map).read_text().splitlines())
                     if kind in "tT")
    return [address for address, _name in entries], [name for _address, name in entries]


def name_rip(rip: str, table: tuple[list[int], list[str]]) -> str:
    addresses, names = table
    value = int(rip, 16)
    where = bisect.bisect_right(addresses, value) - 1
    if not addresses or where < 0 or not rip.startswith("ffffffff8"):
        return rip
    return f"{rip} ({names[where]}+{value - addresses[where]:#x})"


def triple_faults(xen_log: str) -> list[tuple[str, str, tuple[str, str] | None]]:
    """Each guest triple fault in ``xl dmesg``'s text: (domain, Xen's uptime, the RIP Xen dumped
    after it as (CS, address), or None without a dump)."""
    found = []
    for fault in TRIPLE_FAULT.finditer(xen_log):
        dumped = DUMPED_RIP.search(xen_log, fault.end(), fault.end() + 2000)
        found.append((fault.group(2), fault.group(1), (dumped.group(1), dumped.group(2)) if dumped else None))
    return found


def last_triple_fault(testbed: Testbed, seen: int, table: tuple[list[int], list[str]]) -> tuple[int, str]:
    """How many triple faults Xen's log holds now, and the newest one (domain, time, RIP named
    from ``table``) if there are more than ``seen``."""
    faults = triple_faults(testbed.run("xl dmesg", timeout_s=120).stdout)
    if len(faults) <= seen:
        return len(faults), ""
    domain, uptime, rip = faults[-1]
    named = f"{rip[0]}:{name_rip(rip[1], table)}" if rip else "no dump"
    return len(faults), f"{domain} at Xen {uptime} s, RIP {named}"


def write_readme(out: Path, header: str, refills: list[Refill]) -> None:
    rows = "".join(f"| {r.label} | {r.how} | {r.seconds:.1f} | {r.outcome} | {r.rip or '-'} |\n"
                   for r in refills)
    died = sum(1 for r in refills if r.outcome != "ok")
    text = (f"{header}\n\n| refill | how | s | outcome | Xen's triple fault |\n|---|---|---:|---|---|\n"
            f"{rows}\n{died} of {len(refills)} reads of the files (boots included) ended in the guest's "
            f"death.\n")
    readme = out / "README.md"
    readme.write_text(text + hand_written_part(readme))


def main() -> int:
    refill_count = int(os.environ.get("SOFTPAGE_PROBE_REFILLS", str(REFILLS)))
    check_every = int(os.environ.get("SOFTPAGE_PROBE_CHECK_EVERY", str(CHECK_EVERY)))
    guest_mb = int(os.environ.get("SOFTPAGE_BENCH_GUEST_MB", str(GUEST_MB)))
    table = symbols(os.environ.get("SOFTPAGE_PROBE_SYSTEM_MAP", ""))
    xen_version = os.environ.get("SOFTPAGE_BENCH_XEN", XEN_PVH_VERSION)
    size_hosts_for(guest_mb)  # as the link bench sizes its hosts
    out = output_dir(guest_mb, prefix="refill-probe")
    config = TestbedConfig.from_env(xen_version)
    refills: list[Refill] = []
    started = time.monotonic()
    with booted_pair(config, config, Path(tempfile.mkdtemp(prefix="softpage-refill-probe-"))) as pair:
        header = (f"# Page-cache refills without a migration (control for issue 19's guest deaths), "
                  f"{time.strftime('%Y-%m-%d %H:%M')} UTC\n\n`tests/bench/refill_probe.py`: the link "
                  f"bench's pair (Xen {xen_version} on both hosts, host-b idle), its {guest_mb} MiB PVH "
                  f"guest on Linux {bench_guest_kernel()} and its PV neighbour spinning on host-a; "
                  f"{refill_count} times: drop the guest's page cache, read its files back (the workload's "
                  f"full check instead every {check_every} refills). Load at start "
                  f"`{machine_load()}`.")
        neighbour = start_neighbour(pair.a, NEIGHBOUR_SPIN_MB)
        spec = bench_guest("refill0", guest_mb, 0)
        faults_seen, _ = last_triple_fault(pair.a, 0, table)
        guest: Guest | None = None
        number = boots = 0
        while number < refill_count and boots <= refill_count:
            began = time.monotonic()
            if guest is None:  # a boot reads the files in too: a row of its own
                boots += 1
                label, how = f"boot {boots}", "boot (reads the files in)"
            else:
                number += 1
                label = str(number)
                how = "full check" if check_every and number % check_every == 0 else "read back"
            try:
                if guest is None:
                    guest = start_guest(pair.a, spec)
                elif how == "full check":
                    drop_caches(guest, label)
                    check_guest(guest, f"refill {number}")
                else:
                    drop_caches(guest, label)
                    warm_cache(guest, f"refill-{number}")
                outcome, rip = "ok", ""
            except (RuntimeError, TestbedError) as error:
                faults_seen, rip = last_triple_fault(pair.a, faults_seen, table)
                outcome = f"died: {type(error).__name__}"
                pair.a.run(f"xl destroy {spec.name}", timeout_s=300)
                guest = None
            refills.append(Refill(label, how, time.monotonic() - began, outcome, rip))
            print(f"refill_probe: {refills[-1]}", file=sys.stderr, flush=True)
            write_readme(out, header, refills)
        if guest is not None:
            guest.destroy()
        neighbour.destroy()
    print(f"results in {out.relative_to(REPO) if out.is_relative_to(REPO) else out} "
          f"({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
