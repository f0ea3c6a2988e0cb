"""The rolling upgrade: a guest saved by ``softpage save`` on a Debian 12 host (Xen 4.17.7) is
restored by stock ``xl restore`` on a Debian 13 host (Xen 4.20.4), intact. That is how an admin
moves guests off a host being upgraded when live migration between the two is not at hand.
The other way (a guest saved on 4.20.4 restored on 4.17.7) is what a roll-back needs: Xen 4.17.7
refuses the HVM context 4.20.4 writes, softpage's image and stock xl's alike; the test holds
that (matrix only).

Two boots of the testbed, one after the other (two at once would not fit 2 cores of TCG), with a
scratch disk carried from the first to the second. The image is first checked by the
destination's own ``verify-stream-v2``; the guest is restored with a config written on the new
host (its data disk may have another device name there), then its workload must pass its full
check.
"""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import pytest

from softpage_testbed import (
    SCRATCH_MOUNT,
    XEN_PVH_VERSION,
    XEN_TRIXIE_VERSION,
    Guest,
    Testbed,
    TestbedConfig,
)
from tests.e2e.conftest import TestbedPool
from tests.e2e.helpers import read_stats, softpage, start_guest, verify_stream_v2, wait_for_module

pytestmark = pytest.mark.e2e

SCRATCH_MB = 1024
IMAGE = f"{SCRATCH_MOUNT}/upgrade-guest.img"
STOCK_IMAGE = f"{SCRATCH_MOUNT}/upgrade-guest-stock.img"


def boot_with_scratch(pool: TestbedPool, xen_version: str, scratch: Path, work_dir: Path) -> Testbed:
    config = dataclasses.replace(TestbedConfig.from_env(xen_version), scratch_image=scratch)
    testbed = Testbed(config, pool.payload(), work_dir / f"xen-{xen_version}")
    testbed.boot()
    return testbed


# Both ways matrix only: the two boots with a scratch disk of their own cost about 4 minutes of
# make test's 60 (2026-12-06).
@pytest.mark.matrix_only
@pytest.mark.parametrize(("source", "destination"), [
    (XEN_PVH_VERSION, XEN_TRIXIE_VERSION),
    (XEN_TRIXIE_VERSION, XEN_PVH_VERSION),
], ids=["upgrade-4.17.7-to-4.20.4", "downgrade-4.20.4-to-4.17.7"])
def test_softpage_save_on_one_xen_then_stock_restore_on_the_other(
    testbed_pool: TestbedPool, tmp_path: Path, source: str, destination: str
) -> None:
    upgrade = source == XEN_PVH_VERSION
    testbed_pool.close()  # one QEMU at a time
    scratch = tmp_path / "scratch.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "sp-scratch", str(scratch), f"{SCRATCH_MB}M"], check=True)

    old = boot_with_scratch(testbed_pool, source, scratch, tmp_path)
    try:
        guest = start_guest(old, "sp-upgrade")
        spec = guest.spec
        if not upgrade:
            # Stock xl's own image of the same guest (-c: the guest runs on), to tell what Xen
            # refuses from what softpage's stream does.
            old.run(["xl", "save", "-c", guest.name, STOCK_IMAGE], timeout_s=900, check=True)
        saved = softpage(old, "save", "--stats", "/tmp/softpage-stats.json", guest.name, IMAGE)
        assert saved.ok, saved.stderr
        _, totals = read_stats(old)
        assert int(totals["pages_xalloc"]) > 2048, totals  # type: ignore[call-overload]
        old.run(f"sync && umount {SCRATCH_MOUNT}", check=True)
    finally:
        old.shutdown()

    new = boot_with_scratch(testbed_pool, destination, scratch, tmp_path)
    try:
        running = new.run("xl info | awk '$1 == \"xen_version\" {print $3}'", check=True).stdout.strip()
        assert running.startswith(destination.rsplit(".", 1)[0]), running
        verified = verify_stream_v2(new, IMAGE)
        assert verified.ok, verified.stdout[-2000:] + verified.stderr[-2000:]
        config_path = f"/root/guests/{spec.name}.cfg"
        new.write_file(config_path, spec.xl_config(new.data_disk_device))
        restored = new.run(["xl", "restore", config_path, IMAGE], timeout_s=900)
        if not upgrade:
            # Xen 4.17.7 takes no HVM context from 4.20 (measured): stock xl's image is refused
            # the same way: a guest that ran on 4.20.4 goes back to 4.17.7 by neither.
            stock = new.run(["xl", "restore", config_path, STOCK_IMAGE], timeout_s=900)
            for result in (restored, stock):
                assert not result.ok and "Unable to restore HVM context" in result.stderr, result.stderr
            return
        assert restored.ok, restored.stderr
        guest = Guest(new, spec)
        heartbeat = guest.wait_for_heartbeat(1, timeout_s=180)
        guest.wait_for_heartbeat(heartbeat + 2, timeout_s=180)
        verdict = guest.verify()
        assert verdict.ok, verdict.line
        # The module re-published under the destination's Xen after the restore.
        assert wait_for_module(guest) == "ready"
    finally:
        new.shutdown()
