"""softpage's Debian package in a Debian 12 or 13 dom0, as an admin installs and enables it: `apt
install` of the .deb that `make deb` built for that release (the payload carries both: the Debian 13
one built in the trixie rootfs, with its drop-in under /usr/lib/systemd), the save helper switched on by
uncommenting its line in /etc/default/softpage, then stock `xl migrate` of a PVH guest with the
module prunes through the installed helper, with nothing of the checkout's build on the path
(PYTHONPATH unset): soft pages go without data in the stream xl sends (the testbed's byte counter
in front of the receiver). (`xl save` through the helper is test_save_helper's.)
"""

from __future__ import annotations

import shlex

import pytest

from softpage_testbed import Testbed
from tests.e2e.helpers import (
    RECEIVER,
    STATS,
    as_admin,
    assert_pruned_through_the_helper,
    assert_survived,
    installed_package,
    read_stats,
    start_guest,
    wait_for_module,
)

pytestmark = pytest.mark.e2e


# make test: Xen 4.17.7 (Debian 12); the matrix: every host, Debian 13's package on 4.20.4 too.
def test_the_installed_package_prunes_through_xl_once_enabled(xen_pvh_testbed: Testbed) -> None:
    testbed = xen_pvh_testbed
    with installed_package(testbed):
        # The drop-in is where this release's systemd reads units (lib/ or usr/lib/systemd/system).
        drop_ins = testbed.run(["systemctl", "show", "libvirtd", "-p", "DropInPaths"], check=True).stdout
        assert "/libvirtd.service.d/softpage.conf" in drop_ins, drop_ins
        guest = start_guest(testbed, "deb-guest")
        heartbeat = guest.heartbeat()
        testbed.run(["rm", "-f", STATS])
        migrated = as_admin(testbed, f"xl migrate -s '' {guest.name} {shlex.quote(RECEIVER)}")
        assert migrated.ok, migrated.stderr[-3000:]
        assert "Migration successful." in migrated.stderr
        rounds, totals = read_stats(testbed)
        assert rounds[0]["snapshot_used"], rounds
        assert_pruned_through_the_helper(testbed, migrated, rounds, totals, 0)
        assert_survived(guest, heartbeat)
        assert wait_for_module(guest) == "ready"
