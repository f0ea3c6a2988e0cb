"""A guest that raised its maximum GPFN far beyond its memory cannot make dom0 allocate for it.

``xc_domain_maximum_gpfn`` of a PVH guest is the highest GFN it ever had mapped, and a guest
raises it with one ``XENMEM_populate_physmap`` (or ``add_to_physmap``) at a huge GFN. Here dom0
makes that very hypercall on the guest's behalf (libxenctrl's
``xc_domain_populate_physmap_exact``, one page of the guest's own allowance), which leaves the
domain exactly as the guest would have left it, without a guest module written for the purpose.
``softpage migrate`` must then refuse with one line and exit 1 before it allocates anything or
touches the guest; the guest keeps running and passes its checks, no domain is left behind on
the receiving side, and the refused command's peak RSS is reported (and bounded).
"""

from __future__ import annotations

import json

import pytest

from softpage_testbed import Testbed
from tests.e2e.helpers import LOCALHOST_RECEIVER, assert_survived, domid, start_guest

pytestmark = pytest.mark.e2e

HOSTILE_GFNS = (1 << 36, (1 << 36) - 1, 1 << 32, (1 << 28) - 1)
"""Tried in order: the first the hypervisor accepts (the p2m's width depends on the paging
mode and the CPU's physical address bits, 40 under QEMU TCG)."""
REFUSED_PEAK_LIMIT_KIB = 64 << 10
"""The refused command's largest process stays below this: it holds no per-PFN state (the
sender's modules alone took 31952 KiB on the testbed; a walk of 2^36 PFNs would take GiBs)."""

DOM0_FACTS = """
import json, sys
from softpage.xen.backend import p2m_size_limit
from softpage.xen.ctrl import XenCtrl
domid = int(sys.argv[1])
with XenCtrl.open() as ctrl:
    state = ctrl.domain_state(domid)
    print(json.dumps({"max_gpfn": ctrl.maximum_gpfn(domid), "max_pages": state.max_pages,
                      "tot_pages": state.tot_pages, "limit": p2m_size_limit(state.max_pages)}))
"""

MAP_HIGH_FRAME = """
import ctypes, ctypes.util, json, sys
libxc = ctypes.CDLL(ctypes.util.find_library("xenctrl"), use_errno=True)
libxc.xc_interface_open.restype = ctypes.c_void_p
handle = ctypes.c_void_p(libxc.xc_interface_open(None, None, 0))
domid = int(sys.argv[1])
results = []
for gfn in map(int, sys.argv[2:]):
    frame = ctypes.c_ulong(gfn)
    rc = libxc.xc_domain_populate_physmap_exact(handle, ctypes.c_uint32(domid), ctypes.c_ulong(1),
                                                ctypes.c_uint(0), ctypes.c_uint(0), ctypes.byref(frame))
    results.append({"gfn": gfn, "rc": rc, "errno": ctypes.get_errno()})
    if rc == 0:
        break
print(json.dumps(results))
"""

PEAK_RSS = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:])
print("peak_rss_kib", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(done.returncode)
"""


def dom0_facts(testbed: Testbed, guest_domid: int) -> dict[str, int]:
    result = testbed.run(["python3", "-c", DOM0_FACTS, str(guest_domid)], check=True)
    facts: dict[str, int] = json.loads(result.stdout)
    return facts


def peak_rss_kib(stderr: str) -> int:
    lines = [line for line in stderr.splitlines() if line.startswith("peak_rss_kib ")]
    assert lines, stderr
    return int(lines[-1].split()[1])


def test_a_guest_that_mapped_a_frame_at_a_huge_gfn_is_refused_and_keeps_running(
    xen_pvh_testbed: Testbed,
) -> None:
    testbed = xen_pvh_testbed
    guest = start_guest(testbed, "sp-hostile-gfn")
    source_domid = domid(guest)
    legitimate = dom0_facts(testbed, source_domid)
    print(f"\nPVH guest as libxl laid it out: {legitimate}")
    assert legitimate["max_gpfn"] + 1 <= legitimate["limit"], legitimate

    mapped = json.loads(testbed.run(["python3", "-c", MAP_HIGH_FRAME, str(source_domid),
                                     *map(str, HOSTILE_GFNS)], check=True).stdout)
    print(f"populate_physmap at a huge GFN: {mapped}")
    assert mapped[-1]["rc"] == 0, f"the hypervisor accepted none of {HOSTILE_GFNS}: {mapped}"
    hostile = dom0_facts(testbed, source_domid)
    print(f"after: {hostile}")
    assert hostile["max_gpfn"] == mapped[-1]["gfn"] and hostile["max_gpfn"] + 1 > hostile["limit"]

    heartbeat = guest.heartbeat()
    domains_before = sorted(testbed.domains())
    baseline = testbed.run(["python3", "-c", PEAK_RSS, "python3", "-c",
                            "import softpage.driver, softpage.xen.backend"], check=True)
    refused = testbed.run(["python3", "-c", PEAK_RSS, "python3", "-m", "softpage", "migrate", "-s", "",
                           guest.name, LOCALHOST_RECEIVER], timeout_s=600)
    # The receiver runs on this host and shares stderr: it reports the stream cut before its
    # header ("migration target: ...", "libxl: error: ...", "xl: fatal error: ...").
    errors = [line for line in refused.stderr.splitlines()
              if not line.startswith(("peak_rss_kib ", "migration target:", "libxl:", "xl:"))]
    print(f"refused: rc {refused.rc}, {errors}; peak RSS {peak_rss_kib(refused.stderr)} KiB "
          f"(the sender's modules alone: {peak_rss_kib(baseline.stderr)} KiB)")
    assert refused.rc == 1, (refused.rc, refused.stderr)
    assert len(errors) == 1 and errors[0].startswith("softpage: error: "), errors
    assert f"{hostile['max_gpfn']:#x}" in errors[0] and "keeps running" in errors[0], errors
    assert peak_rss_kib(refused.stderr) < REFUSED_PEAK_LIMIT_KIB
    assert domid(guest) == source_domid
    assert sorted(testbed.domains()) == domains_before, "the receiving side left a domain behind"
    assert_survived(guest, heartbeat)
