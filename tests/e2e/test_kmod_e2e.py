"""softpage.ko on real Xen: it publishes what guest-protocol.md says, the bitmaps agree with
/proc/kpageflags, the armed suspend drops caches and publishes its free pages as FINAL's HELD set
from the last instant before the suspend, and the guest stays
healthy (and the module re-publishes under the new domid) across xl save/restore and xl migrate.

dom0 reads the guest's pages with its own small grant-mapping reader (tests/e2e/kmod_probe.py,
shipped to dom0 as a script), independent of the softpage package's decoder, so these tests
also cross-check the dom0 library's reading of the same ABI.
"""

from __future__ import annotations

import dataclasses
import gzip
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from softpage import abi
from softpage_testbed import REPO_DIR, Guest, GuestSpec, Testbed, TestbedConfig
from tests.e2e.helpers import MODULE_STATS, boot_until_ready, softpage_home
from tests.e2e.kmod_probe import early_drop, probe

pytestmark = pytest.mark.e2e

GUEST = GuestSpec(name="kmod", guest_type="pvh", memory_mb=256, anon_mb=64, cache_mb=32)
INSTALLER = REPO_DIR / "dom0_tools" / "softpage-guest-install"
INSTALLER_PATH = "/root/softpage-guest-install"
STATE_EMPTY, STATE_SNAPSHOT, STATE_FINAL = abi.STATE_EMPTY, abi.STATE_SNAPSHOT, abi.STATE_FINAL
FREE, CACHE, SLAB, HELD = abi.CAT_FREE, abi.CAT_CACHE, abi.CAT_SLAB, abi.CAT_HELD
# The guest keeps allocating and freeing pages (the workload, heartbeats, the shell's processes)
# while it is counted: the module's counts must lie between the guest kernel's counts taken just
# before its scan and just after, give or take this much. (One kpageflags walk after the scan
# alone drifted 756 pages from it on a 6.12 guest in CI, 2026-12-06; see free_pages.)
COUNT_TOLERANCE_PAGES = 512


def guest_line(guest: Guest, command: str, timeout_s: float = 180) -> str:
    """Run ``command`` in the guest shell; return its output joined onto one line. The marker is
    split in the typed text so the shell's echo of the command line cannot match it."""
    tag = uuid.uuid4().hex[:12]
    guest.console_command(f'echo "KMOD""OUT-{tag} $({command} | tr "\\n" " ") KMODEND"')
    return guest.wait_for(rf"KMODOUT-{tag} (.*) KMODEND", timeout_s).group(1)


def ram_end_pfn(guest: Guest) -> int:
    """One past the last PFN of the guest's populated zones (start_pfn + spanned of each zone
    with present pages), from its /proc/zoneinfo."""
    awk = ("awk '/^Node/ {present = 0; spanned = 0} $1 == \"present\" {present = $2} "
           "$1 == \"spanned\" {spanned = $2} "
           "$1 == \"start_pfn:\" && present > 0 && $2 + spanned > end {end = $2 + spanned} "
           "END {print \"end=\" end + 0}' /proc/zoneinfo")
    found = re.search(r"end=(\d+)", guest_line(guest, awk))
    assert found and int(found.group(1)) > 0, "no populated zone in the guest's /proc/zoneinfo"
    return int(found.group(1))


def guest_stats(guest: Guest) -> dict[str, int]:
    line = guest_line(guest, f"cd {MODULE_STATS} && grep -H . *")
    return {name: int(value) for name, value in re.findall(r"(\w+):(-?\d+)", line)}


def kpageflags_counts(guest: Guest, nr_pfns: int) -> dict[str, int]:
    """Clean-cache pages among the first ``nr_pfns`` of /proc/kpageflags, with the module's
    definition: LRU, not ANON/SWAPBACKED/DIRTY/WRITEBACK/MMAP/LOCKED/UNEVICTABLE."""
    awk = (
        "awk '{f=$1; if (and(f,32) && !and(f,4096) && !and(f,16384) && "
        "!and(f,16) && !and(f,256) && !and(f,2048) && !and(f,1) && !and(f,262144)) c++} "
        'END {print "cache=" c+0 " pfns=" NR}\''
    )
    # Only the PFNs the bitmaps cover: a 6.12 PVH guest lists 2^20 there, 16 times its RAM, and
    # reading them all takes long enough under TCG for the counts to drift.
    kpageflags = f"head -c {nr_pfns * 8} /proc/kpageflags | od -An -v -t u8 -w8"
    line = guest_line(guest, f"{kpageflags} | {awk}", timeout_s=300)
    return {name: int(value) for name, value in re.findall(r"(\w+)=(\d+)", line)}


def free_pages(guest: Guest) -> int:
    """The guest kernel's own count of its free pages, from one read of /proc/zoneinfo: each
    zone's buddy pages ("pages free", NR_FREE_PAGES) and its per-CPU lists' pages (the pagesets'
    "count:"), which NR_FREE_PAGES leaves out.

    Not from a kpageflags walk: that walk takes seconds under TCG while 6.12 drains and refills
    the per-CPU lists, so a page moving between them and the buddy lists is counted twice or not
    at all (CI of 2026-12-06: 682 pages above the walks on 6.12)."""
    awk = ("""awk '$1 == "pages" && $2 == "free" {f += $3} $1 == "count:" {f += $2} """
           """END {print "free=" f+0}' /proc/zoneinfo""")
    found = re.fullmatch(r"free=(\d+)", guest_line(guest, awk).strip())
    assert found, "no free count in the guest's /proc/zoneinfo"
    return int(found.group(1))


def assert_between(count: int, samples: list[int]) -> None:
    """``count``, from the module's scan, within COUNT_TOLERANCE_PAGES of the range the
    guest kernel's own counts taken before and after that scan span."""
    low, high = min(samples) - COUNT_TOLERANCE_PAGES, max(samples) + COUNT_TOLERANCE_PAGES
    assert low <= count <= high, f"module {count}, the kernel's counts before and after {samples}"


def start_guest(testbed: Testbed, spec: GuestSpec = GUEST) -> Guest:
    guest = boot_until_ready(testbed, spec)
    assert guest.wait_for(r"GUEST-KMOD (\w+)").group(1) == "loaded", guest.console_log()[-3000:]
    return guest


def assert_publishing(found: dict[str, Any]) -> None:
    keys = found["keys"]
    assert keys["version"] == "1"
    assert keys["state"] == "ready"
    assert keys["armed"] == "0"
    assert re.fullmatch(r"\d+", keys["header-gref"] or "")
    assert re.fullmatch(r"\d+", keys["event-channel"] or "")
    assert keys["feature-drop"] == "1"
    assert re.fullmatch(r"\d+", keys["dropped"] or "")
    # Created as "all": a dom0 that never writes it gets the module's behaviour before cache=cold.
    assert (keys["feature-cache-cold"], keys["prune-cache"]) == ("1", "all")


def assert_well_formed(snapshot: dict[str, Any]) -> None:
    assert snapshot["popcount"] == snapshot["count"]
    assert snapshot["bits_beyond_nr_pfns"] == 0
    assert snapshot["reserved_nonzero"] == 0
    assert snapshot["list_tail_nonzero"] == 0
    assert snapshot["frames_per_category"] == -(-snapshot["nr_pfns"] // 32768)
    assert snapshot["nr_list_frames"] == -(-4 * snapshot["frames_per_category"] // 1024)
    assert snapshot["generation"] % 2 == 0


def assert_healthy(guest: Guest, heartbeat_before: int) -> None:
    guest.wait_for_heartbeat(heartbeat_before + 2, timeout_s=180)
    assert guest.boot_count() == 1, "the guest rebooted"
    verdict = guest.verify()
    assert verdict.ok, verdict.line


@pytest.mark.every_host
@pytest.mark.every_kernel
def test_publishes_answers_requests_and_agrees_with_kpageflags(xen_pvh_testbed: Testbed,
                                                              guest_kernel: str) -> None:
    guest = start_guest(xen_pvh_testbed, dataclasses.replace(GUEST, kernel=guest_kernel))
    loaded = probe(xen_pvh_testbed, guest, "read")
    assert_publishing(loaded)
    assert loaded["keys"]["request"] == "0"
    assert loaded["snapshot"]["state"] == STATE_EMPTY
    assert_well_formed(loaded["snapshot"])

    before = kpageflags_counts(guest, loaded["snapshot"]["nr_pfns"])
    free_before = free_pages(guest)
    answered = probe(xen_pvh_testbed, guest, "request", "5")
    free_after = free_pages(guest)
    snapshot = answered["snapshot"]
    after = kpageflags_counts(guest, snapshot["nr_pfns"])
    assert_well_formed(snapshot)
    assert (snapshot["state"], snapshot["request_id"]) == (STATE_SNAPSHOT, 5)
    assert snapshot["generation"] > loaded["snapshot"]["generation"]
    # Debian: neither init_on_free nor page poisoning; the module rewrites HELD pages when needed.
    assert snapshot["flags"] == abi.FLAG_HELD_REINIT
    # The bitmaps cover exactly the guest's RAM: up to the end of its last populated zone, as the
    # kernel reports its zones. (/proc/kpageflags covers [0, max_pfn), which ends there too on
    # 6.1; a 256 MiB PVH guest on 6.12 counts 2^20 PFNs there, found by the matrix.)
    assert snapshot["nr_pfns"] == ram_end_pfn(guest)
    assert before["pfns"] == after["pfns"] == snapshot["nr_pfns"]
    assert snapshot["count"][SLAB] == 0  # documented: slab is only reported once freed
    assert snapshot["count"][HELD] == 0
    print(f"free: module {snapshot['count'][FREE]}, kernel {free_before}, {free_after}; "
          f"cache: module {snapshot['count'][CACHE]}, kpageflags {before['cache']}, {after['cache']}")
    assert_between(snapshot["count"][FREE], [free_before, free_after])
    assert_between(snapshot["count"][CACHE], [walk["cache"] for walk in (before, after)])
    # the workload's 32 MiB of data files are clean, unmapped page cache
    assert snapshot["count"][CACHE] >= GUEST.cache_mb * 256 * 9 // 10
    assert snapshot["scan_ns"] > 0

    stats = guest_stats(guest)
    assert stats["last_request_id"] == 5
    assert stats["nr_pfns"] == snapshot["nr_pfns"]
    assert stats["scans"] >= 1

    # The installer's dom0-side check agrees, before and after an unload.
    xen_pvh_testbed.write_file(INSTALLER_PATH, INSTALLER.read_text())
    verify = ["bash", INSTALLER_PATH, "--verify", guest.name, "--timeout", "0"]
    verified = xen_pvh_testbed.run(verify)
    assert verified.rc == 0, verified.stderr
    assert "data/softpage/state = ready" in verified.stdout

    # Unloading removes every key; loading again publishes afresh.
    guest_line(guest, "rmmod softpage; echo rc=$?")
    assert all(value is None for value in probe(xen_pvh_testbed, guest, "keys")["keys"].values())
    unloaded = xen_pvh_testbed.run(verify)
    assert unloaded.rc == 1
    assert "state is 'absent'" in unloaded.stderr
    guest_line(guest, "insmod /softpage.ko; echo rc=$?")
    reloaded = probe(xen_pvh_testbed, guest, "request", "6")
    assert_publishing(reloaded)
    assert (reloaded["snapshot"]["state"], reloaded["snapshot"]["request_id"]) == (
        STATE_SNAPSHOT,
        6,
    )
    assert_well_formed(reloaded["snapshot"])


def arm_for_final(testbed: Testbed, guest: Guest, final_request: int) -> None:
    base = softpage_home(guest)
    testbed.run(f"xenstore-write {base}/{abi.XS_ARMED} 1 {base}/{abi.XS_REQUEST} {final_request}", check=True)


def test_armed_suspend_publishes_final_and_thaw_releases(xen_pvh_testbed: Testbed, guest_kernel: str) -> None:
    guest = start_guest(xen_pvh_testbed, dataclasses.replace(GUEST, kernel=guest_kernel))
    before = probe(xen_pvh_testbed, guest, "request", "10")["snapshot"]
    heartbeat = guest.heartbeat()
    arm_for_final(xen_pvh_testbed, guest, 11)
    # xl save -p: the domain suspends (.freeze runs), is saved, then stays paused before it
    # resumes, so the FINAL snapshot can be read while nothing in the guest runs.
    xen_pvh_testbed.run(
        ["xl", "save", "-p", guest.name, "/var/lib/xen/kmod-final.img"], timeout_s=900, check=True
    )
    xen_pvh_testbed.run(["rm", "-f", "/var/lib/xen/kmod-final.img"])
    final = probe(xen_pvh_testbed, guest, "read")["snapshot"]
    assert_well_formed(final)
    assert (final["state"], final["request_id"]) == (STATE_FINAL, 11)
    # FINAL names the free pages as HELD: the free memory of before plus the dropped cache
    assert final["count"][HELD] >= before["count"][FREE] * 8 // 10 + before["count"][CACHE] // 2
    # The final walk writes HELD alone (each page it wrote would be sent in the final round):
    # FREE stays as the last SNAPSHOT published it.
    assert final["count"][FREE] > 0

    xen_pvh_testbed.run(["xl", "unpause", guest.name], check=True)
    assert_healthy(guest, heartbeat)
    thawed = probe(xen_pvh_testbed, guest, "read")
    assert thawed["keys"]["armed"] == "0"
    assert thawed["snapshot"]["state"] == STATE_EMPTY
    assert thawed["snapshot"]["count"] == [0, 0, 0, 0]
    stats = guest_stats(guest)
    assert (stats["freezes"], stats["thaws"], stats["restores"]) == (1, 1, 0)
    assert stats["held_pages"] == final["count"][HELD]
    assert stats["dropped_cache_pages"] > 0
    assert stats["final_scan_ns"] > 0
    # the pages stayed free: nothing was allocated to hold them
    after = probe(xen_pvh_testbed, guest, "request", "12")["snapshot"]
    assert after["count"][FREE] > final["count"][HELD] // 2


def suspend_paused_and_unpause(testbed: Testbed, guest: Guest) -> dict[str, Any]:
    """An armed suspend (``xl save -p``) whose FINAL is read while the guest stays paused."""
    testbed.run(["xl", "save", "-p", guest.name, "/var/lib/xen/kmod-final.img"], timeout_s=900, check=True)
    testbed.run(["rm", "-f", "/var/lib/xen/kmod-final.img"])
    final: dict[str, Any] = probe(testbed, guest, "read")["snapshot"]
    testbed.run(["xl", "unpause", guest.name], check=True)
    return final


def test_freeze_drops_again_only_what_was_read_back_since_the_early_drop(xen_pvh_testbed: Testbed) -> None:
    guest = start_guest(xen_pvh_testbed)
    heartbeat = guest.heartbeat()
    arm_for_final(xen_pvh_testbed, guest, 31)
    early_drop(xen_pvh_testbed, guest, 30)
    final = suspend_paused_and_unpause(xen_pvh_testbed, guest)
    assert (final["state"], final["request_id"]) == (STATE_FINAL, 31)
    stats = guest_stats(guest)
    assert (stats["early_drops"], stats["freezes"], stats["freeze_drops_skipped"]) == (1, 1, 1)
    assert (stats["drop_ns"], stats["dropped_cache_pages"]) == (0, 0)
    assert final["count"][HELD] == stats["held_pages"] > 0
    # the early drop is in the guest's kernel log, with what it dropped and how long it took
    logged = guest_line(guest, "dmesg | grep 'softpage: early drop 30:'")
    assert re.search(r"early drop 30: dropped \d+ cache and \d+ slab pages in \d+ ms", logged), logged
    assert_healthy(guest, heartbeat)  # its verify reads the data files back into the cache

    # 32 MiB of files read back after the early drop: over freeze_drop_min_pages, so dropped.
    heartbeat = guest.heartbeat()
    arm_for_final(xen_pvh_testbed, guest, 33)
    early_drop(xen_pvh_testbed, guest, 32)
    guest_line(guest, "cat /data/data-* > /dev/null; echo read")
    final = suspend_paused_and_unpause(xen_pvh_testbed, guest)
    assert (final["state"], final["request_id"]) == (STATE_FINAL, 33)
    stats = guest_stats(guest)
    assert (stats["early_drops"], stats["freezes"], stats["freeze_drops_skipped"]) == (2, 2, 1)
    assert stats["dropped_cache_pages"] >= 1024 and stats["drop_ns"] > 0
    assert_healthy(guest, heartbeat)


def test_armed_save_restore_republishes_under_new_domid(xen_pvh_testbed: Testbed) -> None:
    guest = start_guest(xen_pvh_testbed)
    heartbeat = guest.heartbeat()
    old = probe(xen_pvh_testbed, guest, "request", "20")
    arm_for_final(xen_pvh_testbed, guest, 21)
    guest.save_restore()
    restored = probe(xen_pvh_testbed, guest, "read")
    assert restored["domid"] != old["domid"]
    assert_publishing(restored)
    assert restored["keys"]["request"] == "0"
    assert restored["snapshot"]["state"] == STATE_EMPTY
    answered = probe(xen_pvh_testbed, guest, "request", "1")["snapshot"]
    assert_well_formed(answered)
    assert (answered["state"], answered["request_id"]) == (STATE_SNAPSHOT, 1)
    # the pages free at suspend are free on the destination
    assert answered["count"][FREE] >= old["snapshot"]["count"][FREE] // 2
    assert_healthy(guest, heartbeat)
    stats = guest_stats(guest)
    assert (stats["freezes"], stats["restores"]) == (1, 1)


def assert_stock_migration_republishes(testbed: Testbed, spec: GuestSpec, request: str) -> None:
    """An unarmed module stays out of a stock `xl migrate`'s way and re-publishes afterwards."""
    guest = start_guest(testbed, spec)
    heartbeat = guest.heartbeat()
    old = probe(testbed, guest, "request", request)
    assert_publishing(old)
    guest.migrate_localhost()
    moved = probe(testbed, guest, "request", "1")
    assert moved["domid"] != old["domid"]
    assert_publishing(moved)
    assert_well_formed(moved["snapshot"])
    assert (moved["snapshot"]["state"], moved["snapshot"]["request_id"]) == (STATE_SNAPSHOT, 1)
    assert_healthy(guest, heartbeat)
    stats = guest_stats(guest)
    assert (stats["freezes"], stats["restores"]) == (0, 1)  # armed=0: freeze stays out of the way


def test_stock_migration_republishes_under_new_domid(xen_pvh_testbed: Testbed) -> None:
    assert_stock_migration_republishes(xen_pvh_testbed, GUEST, "30")


# make test: the PV module re-publishes after softpage's PV save and a stock restore
# (test_softpage_migrate.py's test_pv_guest_cannot_migrate_live_here_but_saves_pruned).
@pytest.mark.matrix_only
def test_pv_guest_publishes_and_republishes_after_save_restore(xen_pvh_testbed: Testbed) -> None:
    """PV: grants name machine frames, which change across a restore; the module re-grants.
    (Xen 4.17.7 has no PV log-dirty, so save/restore, armed, is the PV resume path here.)"""
    spec = dataclasses.replace(GUEST, name="kmod-pv", guest_type="pv")
    guest = start_guest(xen_pvh_testbed, spec)
    heartbeat = guest.heartbeat()
    old = probe(xen_pvh_testbed, guest, "request", "40")
    assert_publishing(old)
    assert_well_formed(old["snapshot"])
    assert old["snapshot"]["count"][FREE] > 0
    assert old["snapshot"]["count"][CACHE] >= spec.cache_mb * 256 * 9 // 10
    arm_for_final(xen_pvh_testbed, guest, 41)
    guest.save_restore()
    restored = probe(xen_pvh_testbed, guest, "request", "1")
    assert restored["domid"] != old["domid"]
    assert_publishing(restored)
    assert_well_formed(restored["snapshot"])
    assert (restored["snapshot"]["state"], restored["snapshot"]["request_id"]) == (
        STATE_SNAPSHOT,
        1,
    )
    assert_healthy(guest, heartbeat)
    stats = guest_stats(guest)
    assert (stats["freezes"], stats["restores"]) == (1, 1)
    assert stats["held_pages"] > 0


@pytest.mark.matrix_only  # make test: the PV module re-publishes after a save/restore on 4.17.7
def test_pv_stock_live_migration_republishes_on_xen_4_17_5(xen_pv_testbed: Testbed) -> None:
    """PV live migration needs shadow log-dirty: the pinned 4.17.5 hypervisor. The module
    re-grants its pages (machine frames for PV) under the new domain."""
    spec = dataclasses.replace(GUEST, name="kmod-pv-mig", guest_type="pv")
    assert_stock_migration_republishes(xen_pv_testbed, spec, "50")


def test_refuses_to_load_outside_xen(tmp_path: Path) -> None:
    """The same Debian kernel booted by QEMU without Xen: insmod fails with ENODEV and says why."""
    kernel = TestbedConfig().cache_dir / "boot" / "vmlinuz"
    busybox = shutil.which("busybox")
    headers = sorted(Path("/usr/src").glob("linux-headers-6.1.*-amd64"))
    if not kernel.exists() or busybox is None or not headers or shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs the testbed's guest kernel (make testbed), busybox, 6.1 headers, QEMU")
    build = tmp_path / "kmod"
    shutil.copytree(REPO_DIR / "guest_kmod", build, ignore=shutil.ignore_patterns("*.o", "*.ko"))
    subprocess.run(
        ["make", "-s", "-C", str(build), f"KDIR={headers[-1]}", "modules"],
        check=True,
        capture_output=True,
        timeout=600,
    )
    root = tmp_path / "initramfs"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    shutil.copy2(build / "softpage.ko", root / "softpage.ko")
    init = root / "init"
    init.write_text(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\nmount -t proc proc /proc\n"
        "insmod /softpage.ko; echo KMOD-INSMOD-RC=$?\ndmesg | grep softpage:\n"
        "lsmod | grep -c ^softpage | sed s/^/KMOD-LOADED=/\npoweroff -f\n"
    )
    init.chmod(0o755)
    (root / "proc").mkdir()
    cpio = subprocess.run(
        "find . | cpio -o -H newc --quiet",
        shell=True,
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout
    initrd = tmp_path / "initrd.gz"
    initrd.write_bytes(gzip.compress(cpio))
    console = subprocess.run(
        [
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-m",
            "256",
            "-nographic",
            "-no-reboot",
            "-kernel",
            str(kernel),
            "-initrd",
            str(initrd),
            "-append",
            "console=ttyS0 loglevel=3 panic=-1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        stdin=subprocess.DEVNULL,
    ).stdout
    assert "KMOD-INSMOD-RC=1" in console, console[-3000:]
    assert "softpage: not running in a Xen guest; refusing to load" in console
    assert "KMOD-LOADED=0" in console
