"""Baselines on the real testbed: stock xl save/restore and stock xl migrate keep a guest alive
with all its memory and page cache intact. Later features are compared against these.

A guest "survived" when: its heartbeat moves on after the operation, it printed its boot marker
only once (no reboot), and the workload's full check (every anonymous byte, every cached file
against the manifest) passes afterwards. The workload keeps dirtying pages throughout, so a
migration that lost a dirty page fails the check.
"""

from __future__ import annotations

import pytest

from softpage_testbed import Guest, GuestSpec, Testbed
from tests.e2e.helpers import boot_until_ready

pytestmark = pytest.mark.e2e

# Stock baselines run without softpage.ko: they are what the module is compared against.
BASELINE_GUEST = {"memory_mb": 256, "anon_mb": 64, "cache_mb": 48, "dirty_rate": 200}


def start_guest(testbed: Testbed, name: str, guest_type: str) -> Guest:
    spec = GuestSpec(name=name, guest_type=guest_type, load_kmod=False, **BASELINE_GUEST)
    guest = boot_until_ready(testbed, spec)
    guest.wait_for(r"GUEST-KMOD (skipped|absent)")
    ready = guest.wait_for_workload_ready()
    assert int(ready["anon_pages"]) == BASELINE_GUEST["anon_mb"] * 256
    assert int(ready["cache_bytes"]) >= BASELINE_GUEST["cache_mb"] << 20
    before = guest.verify()
    assert before.ok, before.line
    return guest


def assert_survived(guest: Guest, heartbeat_before: int) -> None:
    guest.wait_for_heartbeat(heartbeat_before + 2, timeout_s=120)
    assert guest.boot_count() == 1, "the guest rebooted"
    assert guest.name in guest.testbed.domains()
    after = guest.verify()
    assert after.ok, after.line
    assert int(after.fields["anon_pages"]) == BASELINE_GUEST["anon_mb"] * 256


def test_agent_reports_exit_codes_and_output(xen_pvh_testbed: Testbed) -> None:
    result = xen_pvh_testbed.run("echo out; echo err >&2; exit 7")
    assert (result.rc, result.stdout, result.stderr) == (7, "out\n", "err\n")
    assert xen_pvh_testbed.run(["python3", "-c", "import softpage, numpy; print(numpy.__version__)"]).ok


def assert_saves_restores_and_migrates(guest: Guest) -> None:
    """One guest through stock xl save + xl restore, then stock xl migrate to localhost."""
    heartbeat = guest.heartbeat()
    timings = guest.save_restore()
    assert timings["image_bytes"] > BASELINE_GUEST["anon_mb"] << 20
    assert_survived(guest, heartbeat)

    heartbeat = guest.heartbeat()
    migration = guest.migrate_localhost()
    assert migration["stream_bytes"] > BASELINE_GUEST["anon_mb"] << 20
    assert_survived(guest, heartbeat)


# matrix_only: make test's own stock runs are test_kmod_e2e's stock migration and save/restore and
# test_softpage_migrate's stock restores, each with the same full check.
@pytest.mark.matrix_only
def test_pvh_save_restore_then_live_migration_localhost(xen_pvh_testbed: Testbed) -> None:
    assert_saves_restores_and_migrates(start_guest(xen_pvh_testbed, "pvh-base", "pvh"))


@pytest.mark.matrix_only  # make test: no PV live migration (4.17.5's boot); softpage's PV save on 4.17.7
def test_pv_save_restore_then_live_migration_localhost(xen_pv_testbed: Testbed) -> None:
    assert_saves_restores_and_migrates(start_guest(xen_pv_testbed, "pv-base", "pv"))
