"""softpage's Debian package in a Debian 12 dom0, as an admin installs and enables it: `apt install`
of the .deb that `make deb` built (the payload carries it), the save helper switched on by
uncommenting its line in /etc/default/softpage, then stock `xl migrate` of a PVH guest with the
module prunes through the installed helper, with nothing of the checkout's build on the path
(PYTHONPATH unset). (`xl save` through the helper is test_save_helper's.)
"""

from __future__ import annotations

import pytest

from softpage_testbed import CommandResult, Testbed
from tests.e2e.helpers import STATS, assert_survived, read_stats, start_guest, wait_for_module

pytestmark = pytest.mark.e2e

DEBS = "/opt/softpage/debs/bookworm"
INSTALLED_HELPER = "/usr/lib/softpage/softpage-save-helper"
INSTALLED_PACKAGE = "/usr/lib/python3/dist-packages/softpage/__init__.py"
DEFAULTS = "/etc/default/softpage"
ADMIN_ENVIRONMENT = f"set -a; . {DEFAULTS}; set +a; unset PYTHONPATH"
"""What softpage-save-helper(8) tells an admin to do for xl, and no trace of the checkout."""


def as_admin(testbed: Testbed, command: str, timeout_s: float = 900) -> CommandResult:
    return testbed.run(f"{ADMIN_ENVIRONMENT}; {command}", timeout_s=timeout_s)


def test_the_installed_package_prunes_through_xl_once_enabled(xen_pvh_testbed: Testbed) -> None:
    testbed = xen_pvh_testbed
    if testbed.config.platform.release != "bookworm":
        pytest.skip("the payload carries Debian 12's packages only: Debian 13's are not built yet")
    assert testbed.payload_info().get("debs_bookworm", "FAILED") != "FAILED", testbed.payload_info()
    installed = testbed.run(f"apt-get install -y {DEBS}/softpage_*_amd64.deb", timeout_s=600)
    assert installed.ok, installed.stdout[-2000:] + installed.stderr[-2000:]
    try:
        enable_and_migrate(testbed)
    finally:
        # The dom0 is shared with the tests after this one: as it was, package purged.
        testbed.run(["apt-get", "purge", "-y", "softpage"], timeout_s=600)


def enable_and_migrate(testbed: Testbed) -> None:
    # Off until enabled: the package's default leaves libxl's own helper in place.
    assert as_admin(testbed, 'test -z "${LIBXL_SAVE_HELPER:-}"').ok
    enable = ("s/^#LIBXL_SAVE_HELPER=/LIBXL_SAVE_HELPER=/; "
              f"s|^#SOFTPAGE_SAVE_HELPER_OPTIONS=.*|SOFTPAGE_SAVE_HELPER_OPTIONS='--stats {STATS}'|")
    testbed.run(["sed", "-i", enable, DEFAULTS], check=True)
    where = as_admin(testbed, 'echo "$LIBXL_SAVE_HELPER"; '
                              'python3 -c "import softpage; print(softpage.__file__)"')
    assert where.stdout.split() == [INSTALLED_HELPER, INSTALLED_PACKAGE], where

    guest = start_guest(testbed, "deb-guest")
    heartbeat = guest.heartbeat()
    testbed.run(["rm", "-f", STATS])
    migrated = as_admin(testbed, f"xl migrate -s '' {guest.name} 'xl migrate-receive'")
    assert migrated.ok, migrated.stderr[-3000:]
    assert "softpage-save-helper: info: softpage:" in migrated.stderr, migrated.stderr[-3000:]
    _, totals = read_stats(testbed)
    assert int(totals["pages_xalloc"]) > 2048, totals  # type: ignore[call-overload]
    assert_survived(guest, heartbeat)
    assert wait_for_module(guest) == "ready"
