"""A Debian guest as a user runs it (systemd, Debian's own kernel, softpage-dkms installed by
apt-get and built by DKMS, nginx serving the application's files) migrated by softpage with
pruning, and checked afterwards as its users would: systemd's state, the module re-published,
nginx answering with the right bytes, and wrk's throughput before and after (issue 21). Debian 12
(Linux 6.1) in `make test`; Debian 13 (Linux 6.12) in the full matrix only.

The guest (testbed/build.sh stages distro_RELEASE and app_data, testbed/payload.sh,
testbed/distro/configure.sh) boots PVH from its own kernel and initramfs with its root disk on
xvda and the application's files (SOFTPAGE_APP_DATA_MB, 64 KiB each) read-only on xvdb, and its
vif on dom0's guest bridge at a fixed address; wrk runs in dom0.
"""

from __future__ import annotations

import re
import sys
import time

import pytest

from softpage_testbed import (
    HOTPLUG_TIMEOUT_MESSAGE,
    DistroGuest,
    DistroGuestSpec,
    Testbed,
    app_file_names,
    fetch_checksums,
    read_app_checksums,
    run_wrk,
)
from softpage_testbed.host import REPO_DIR
from tests.e2e.helpers import (
    LOCALHOST_RECEIVER,
    MODULE_STATS,
    STATS,
    assert_early_drop_as_decided,
    domid,
    read_stats,
    softpage,
    wait_for_module,
)

pytestmark = [pytest.mark.e2e, pytest.mark.distro_guests]

GUEST_MEMORY_MB = 512
WRK_SECONDS = 5
SAMPLE_FILES = 16
"""Files whose bytes dom0 checks through nginx before and after: the first and last of the hot
set and of the rest, and some between."""


def module_version() -> str:
    match = re.search(r'^PACKAGE_VERSION="([^"]+)"$', (REPO_DIR / "guest_kmod" / "dkms.conf").read_text(),
                      re.MULTILINE)
    assert match, "guest_kmod/dkms.conf has no PACKAGE_VERSION"
    return match.group(1)


def guest_stats(guest: DistroGuest) -> dict[str, int]:
    text = guest.check_shell(f"cd {MODULE_STATS} && grep . *")
    return {name: int(value) for name, value in (line.split(":", 1) for line in text.split())}


def meminfo_mb(guest: DistroGuest, field: str) -> int:
    text = guest.check_shell(f"grep '^{field}:' /proc/meminfo")
    return int(text.split()[1]) // 1024


def assert_serves_the_right_bytes(testbed: Testbed, expected: dict[str, str], sample: list[str]) -> None:
    served = fetch_checksums(testbed, sample)
    wrong = {name: served.get(name) for name in sample if served.get(name) != expected[name]}
    assert not wrong, f"nginx served other bytes than the disk holds: {wrong}"


def sample_of(names: list[str], hot: int) -> list[str]:
    step = max(1, len(names) // (SAMPLE_FILES - 4))
    return sorted({names[0], names[hot - 1], names[hot], names[-1], *names[::step]})


# In `make test-matrix` only until it has passed whole on the testbed: on 2026-12-05 no run got
# past the checks after the migration (tests/e2e/README.md), and its boot and cache fill alone
# took 10 minutes under load.
@pytest.mark.matrix_only
@pytest.mark.parametrize("release", ["bookworm", "trixie"])
def test_distro_guest_with_nginx_migrates_pruned_and_serves_after(xen_pvh_testbed: Testbed,
                                                                   release: str) -> None:
    testbed = xen_pvh_testbed
    info = testbed.payload_info()
    assert info.get(f"distro_kmod_{release}") == "built", info
    expected = read_app_checksums(testbed.app_checksums())
    names = app_file_names(expected)
    hot = max(1, len(names) // 4)
    sample = sample_of(names, hot)

    started = time.monotonic()
    guest = testbed.create_distro_guest(DistroGuestSpec(name="nginx-guest", release=release,
                                                        memory_mb=GUEST_MEMORY_MB))
    boot_s = time.monotonic() - started
    up = guest.up_line()
    if up["system"] != "running" or up["nginx"] != "active":
        pytest.fail(f"guest up with {up}: {guest.shell('systemctl --failed --no-legend').output}")
    assert up["softpage"] == module_version(), up
    # The module DKMS built from the package, loaded at boot by modules-load.d, and published.
    path = guest.check_shell("modinfo -n softpage").strip()
    # (compressed as the kernel's own modules are: Debian 13's DKMS makes softpage.ko.xz)
    kernel = re.escape(info[f"distro_kernel_{release}"])
    assert re.fullmatch(rf"/lib/modules/{kernel}/updates/dkms/softpage\.ko(\.xz|\.zst)?", path), path
    nr_pfns = guest_stats(guest)["nr_pfns"]
    assert nr_pfns >= GUEST_MEMORY_MB * 256 * 9 // 10, nr_pfns
    assert wait_for_module(guest) == "ready"

    print(f"distro guest: up {boot_s:.0f} s after xl create", file=sys.stderr)

    # The page cache filled with every file (a sha256sum of them all costs minutes under TCG: the
    # bytes are checked through nginx, on a sample).
    filling = time.monotonic()
    guest.check_shell("cat /srv/app/f* > /dev/null", timeout_s=600)
    print(f"distro guest: cache filled in {time.monotonic() - filling:.0f} s", file=sys.stderr)
    cached_mb = meminfo_mb(guest, "Cached")
    assert cached_mb > len(names) * 64 // 1024 * 3 // 4, cached_mb
    assert_serves_the_right_bytes(testbed, expected, sample)
    before = run_wrk(testbed, len(names), WRK_SECONDS)
    assert before.requests > 0 and before.errors == 0, before
    stats_before = guest_stats(guest)

    source_domid = domid(guest)
    testbed.run(["rm", "-f", STATS])
    migrated = softpage(testbed, "migrate", "-s", "", "--stats", STATS, guest.name, LOCALHOST_RECEIVER)
    if not migrated.ok and HOTPLUG_TIMEOUT_MESSAGE in migrated.stderr:
        # The receiving xl gave the guest's two disks libxl's fixed 40 s of hotplug script and a
        # dom0 starved by TCG under load ran out of it (2026-12-06, load 8-10: both `block add`
        # killed; testbed/README.md). softpage must then have resumed the guest where it was, and
        # the guest must run on there; the migration is tried once more, as the harness retries
        # an `xl create` that met the same timeout.
        assert "resumed at sender" in migrated.stderr, migrated.stderr[-3000:]
        assert domid(guest) == source_domid
        resumed = guest.shell("systemctl is-system-running; systemctl is-active nginx")
        assert resumed.output.split() == ["running", "active"], resumed.output
        print("distro guest: the receiver's disk hotplug timed out; resumed at the sender, running; "
              "migrating again", file=sys.stderr)
        migrated = softpage(testbed, "migrate", "-s", "", "--stats", STATS, guest.name, LOCALHOST_RECEIVER)
    assert migrated.ok, migrated.stderr[-3000:]
    rounds, totals = read_stats(testbed)
    # The cache was most of the guest: far more than 64 MiB must have gone without data.
    assert int(totals["pages_xalloc"]) > 64 * 256, totals  # type: ignore[call-overload]
    assert_early_drop_as_decided(rounds, totals)
    assert domid(guest) != source_domid

    # The same system goes on: no second boot, systemd still running, the module re-published.
    assert len(re.findall(r"SOFTPAGE-GUEST-UP", guest.console_log())) == 1, "the guest rebooted"
    state = guest.shell("systemctl is-system-running; systemctl is-active nginx")
    assert state.output.split() == ["running", "active"], guest.shell("systemctl --failed --no-legend").output
    assert wait_for_module(guest) == "ready"
    # It scanned for dom0 and dropped its cold cache at dom0's request (the first drop, before
    # round 1), in this migration.
    stats_after = guest_stats(guest)
    assert stats_after["scans"] > stats_before["scans"], (stats_before, stats_after)
    assert stats_after["early_drops"] > stats_before["early_drops"], (stats_before, stats_after)
    cached_after_mb = meminfo_mb(guest, "Cached")
    assert_serves_the_right_bytes(testbed, expected, sample)
    after = run_wrk(testbed, len(names), WRK_SECONDS)
    assert after.requests > 0 and after.errors == 0, after
    print(f"distro guest: boot {boot_s:.0f} s, cache {cached_mb} MiB before and {cached_after_mb} MiB "
          f"after the migration ({totals['pages_xalloc']} pages without data, "
          f"migration {totals['migration_s']} s, downtime {totals['downtime_s']} s); "
          f"wrk {before.requests_per_s:.0f} req/s "
          f"before, {after.requests_per_s:.0f} after (p99 {before.latency_p99_ms:.0f} / "
          f"{after.latency_p99_ms:.0f} ms)", file=sys.stderr)
