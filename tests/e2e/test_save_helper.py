"""Stock `xl` with softpage's save helper on the real testbed: `LIBXL_SAVE_HELPER=softpage-save-helper
xl migrate` and `xl save` prune a PVH guest with the module, a guest without it goes plain, the
images pass Xen's verify-stream-v2, and the faults leave the guest running on the source.

xl and libxl are Debian's, unchanged: only the helper they run is softpage's. Each kind runs
SOFTPAGE_E2E_HELPER_REPEAT times on one guest: once in `make test` (which has the time for no
more), 3 times for the proof recorded in results/; "survived" as in test_softpage_migrate.
`make test` runs them on Xen 4.17.7 only, and leaves the guest without the module (the driver's
plain fallback, which test_softpage_migrate covers there), the HVM guest (whose boot alone
takes minutes) and, of the faults, the paused guest to `make test-matrix`.
"""

from __future__ import annotations

import functools
import os
import shlex
import sys

import pytest

from softpage_testbed import CommandResult, Guest, Testbed, TestbedError, retry_after_triple_faults
from tests.e2e.helpers import (
    RECEIVER,
    STATS,
    STEP_RETRIES,
    assert_pruned_through_the_helper,
    assert_survived,
    domid,
    in_full_matrix,
    read_stats,
    save_and_restore_repeatedly,
    start_guest,
    stream_bytes,
    verify_stream_v2,
    wait_for_module,
)

pytestmark = pytest.mark.e2e

REPEAT = int(os.environ.get("SOFTPAGE_E2E_HELPER_REPEAT", "1"))
HELPER = "/opt/softpage/py/bin/softpage-save-helper"
"""The console script of the testbed's build of the package (pip --target)."""


def xl_with_helper(testbed: Testbed, *arguments: str, options: str = "",
                   timeout_s: float = 900) -> CommandResult:
    """``xl ARGUMENTS`` with softpage's save helper and ``--stats STATS OPTIONS`` for it."""
    environment = {"LIBXL_SAVE_HELPER": HELPER, "SOFTPAGE_SAVE_HELPER_OPTIONS": f"--stats {STATS} {options}"}
    command = " ".join(f"{key}={shlex.quote(value)}" for key, value in environment.items())
    return testbed.run(f"rm -f {STATS}; {command} xl {shlex.join(arguments)}", timeout_s=timeout_s)


def migrate_through_the_helper(testbed: Testbed, guest: Guest, attempt: int
                               ) -> tuple[int, CommandResult, list[dict[str, object]], dict[str, object]]:
    """``xl migrate`` of ``guest`` to localhost through the helper, which must succeed: the guest's
    heartbeat before it, xl's result and the helper's stats (rounds, totals)."""
    heartbeat = guest.heartbeat()
    result = xl_with_helper(testbed, "migrate", "-s", "", guest.name, RECEIVER)
    assert result.ok, f"migration {attempt}: {result.stderr[-3000:]}"
    rounds, totals = read_stats(testbed)
    return heartbeat, result, rounds, totals


# make test: the installed package's helper through xl migrate, same checks (test_debian_packages).
@pytest.mark.matrix_only
def test_xl_migrate_with_the_helper_prunes_and_the_guest_survives(xen_pvh_testbed: Testbed) -> None:
    guest = start_guest(xen_pvh_testbed, "helper-mig")
    for attempt in range(REPEAT):
        source_domid = domid(guest)
        heartbeat, result, rounds, totals = migrate_through_the_helper(xen_pvh_testbed, guest, attempt)
        assert "Migration successful." in result.stderr
        assert rounds[0]["snapshot_used"], rounds
        assert_pruned_through_the_helper(xen_pvh_testbed, result, rounds, totals, attempt)
        assert_survived(guest, heartbeat)
        assert domid(guest) != source_domid
        assert wait_for_module(guest) == "ready"


@pytest.mark.matrix_only
def test_xl_migrate_with_the_helper_sends_a_guest_without_the_module_plain(xen_pvh_testbed: Testbed) -> None:
    guest = start_guest(xen_pvh_testbed, "helper-plain", load_kmod=False)
    for attempt in range(REPEAT):
        heartbeat, result, _, totals = migrate_through_the_helper(xen_pvh_testbed, guest, attempt)
        assert "publishes no soft pages" in result.stderr, result.stderr[-3000:]
        assert totals["pages_xalloc"] == 0 and totals["pages_skipped"] == 0, (attempt, totals)
        assert_survived(guest, heartbeat)


@pytest.mark.matrix_only  # make test: the helper's live migration; save is its one-round case
def test_xl_save_with_the_helper_then_stock_xl_restore(xen_pvh_testbed: Testbed) -> None:
    """`xl save` is not live: one round, with the guest suspended by libxl. The restore runs with
    the variable still set: the helper hands --restore-domain to the stock one."""
    guest = start_guest(xen_pvh_testbed, "helper-save")
    save_and_restore_repeatedly(
        xen_pvh_testbed, guest, "x86 HVM",
        lambda testbed, guest, image: xl_with_helper(testbed, "save", guest.name, image),
        lambda testbed, image: xl_with_helper(testbed, "restore", image), REPEAT)


@pytest.mark.matrix_only  # its boot alone takes 5-15 minutes under TCG (GuestSpec.boot_timeout_s)
def test_an_hvm_guest_migrates_and_saves_through_the_helper(xen_pvh_testbed: Testbed) -> None:
    """An HVM guest with QEMU as its device model (qemu-system-xen in dom0): libxl switches QEMU's
    log-dirty mode at the helper's request and writes QEMU's state after the helper's stream, as
    EMULATOR_CONTEXT. The guest's kernel, initramfs and workload are the PVH guests'."""
    guest = start_guest(xen_pvh_testbed, "helper-hvm", guest_type="hvm")
    assert device_model_runs(guest), "no device model runs for the HVM guest"
    for attempt in range(REPEAT):
        heartbeat, result, rounds, totals = migrate_through_the_helper(xen_pvh_testbed, guest, attempt)
        print(f"HVM migration {attempt} through the helper: {totals['pages_data']} pages with data, "
              f"{totals['pages_xalloc']} XALLOC, {len(rounds)} rounds, a stream of "
              f"{stream_bytes(xen_pvh_testbed)} bytes", file=sys.stderr)
        assert_pruned_through_the_helper(xen_pvh_testbed, result, rounds, totals, attempt)
        assert_survived(guest, heartbeat)
        assert wait_for_module(guest) == "ready"
        assert device_model_runs(guest), "the migrated HVM guest has no device model"
    save_and_restore_repeatedly(
        xen_pvh_testbed, guest, "x86 HVM",
        lambda testbed, guest, image: xl_with_helper(testbed, "save", guest.name, image),
        lambda testbed, image: xl_with_helper(testbed, "restore", image), REPEAT,
        verify=verify_hvm_image)


def device_model_runs(guest: Guest) -> bool:
    """QEMU runs in dom0 for the guest's current domain (libxl passes ``-xen-domid DOMID``)."""
    return guest.testbed.run(f"pgrep -f -- '-xen-domid {domid(guest)} '").ok


def verify_hvm_image(testbed: Testbed, image: str) -> CommandResult:
    """verify-stream-v2 on an HVM guest's image, which must carry QEMU's state."""
    verified = verify_stream_v2(testbed, image, "-v")
    if verified.ok and "Libxl Record: Emulator context" not in verified.stdout:
        raise AssertionError(f"no device model state in the image:\n{verified.stdout[-2000:]}")
    return verified


def cut_receiver(after_bytes: int) -> str:
    """A stock receiver whose stream stops after its first bytes, as over a cut link."""
    return f"head -c {after_bytes} | xl migrate-receive"


def migrate_and_kill(testbed: Testbed, guest: Guest, signal_name: str, target: str) -> CommandResult:
    """``xl migrate`` with the helper, and ``kill -SIGNAL`` of ``target`` (a ``pkill -f`` pattern)
    once the receiver has created its copy and the stream's pages flow."""
    incoming = f"{guest.name}--incoming"
    killer = (f"until xl domid {incoming} >/dev/null 2>&1; do sleep 0.2; done; sleep 1; "
              f"pkill -{signal_name} -f {shlex.quote(target)}")
    return testbed.run(
        f"({killer}) & LIBXL_SAVE_HELPER={HELPER} xl migrate -s '' {guest.name} {shlex.quote(RECEIVER)}; "
        "echo rc=$?; wait", timeout_s=900)


def test_faults_through_the_helper_leave_the_guest_running_on_the_source(xen_pvh_testbed: Testbed) -> None:
    guest = start_guest(xen_pvh_testbed, "helper-fault")
    # make test leaves the guest that cannot answer to the matrix (libxl waits out its own suspend
    # timeout): test_failed_migrations_leave_the_guest_running_on_the_source pauses one there.
    faults = [receiver_gone, guest_cannot_answer, helper_told_to_stop, xl_killed]
    if not in_full_matrix():
        faults.remove(guest_cannot_answer)
    for fault in faults:
        # A fault during which the guest triple-faulted (TCG's nested SVM, testbed/README.md)
        # is tried again on a fresh guest, up to twice, instead of the whole test.
        guest, _ = retry_after_triple_faults(
            xen_pvh_testbed, guest, fault, functools.partial(start_guest, xen_pvh_testbed, "helper-fault"),
            errors=(TestbedError, AssertionError), retries=STEP_RETRIES)


def receiver_gone(guest: Guest) -> None:
    """The receiver gone in the first round: the helper's write fails, libxl never suspended the
    guest, xl reports the failure, and the module is disarmed again."""
    testbed = guest.testbed
    heartbeat = guest.heartbeat()
    result = xl_with_helper(testbed, "migrate", "-s", "", guest.name, cut_receiver(16 << 20))
    assert not result.ok
    assert "Migration failed" in result.stderr, result.stderr[-3000:]
    assert_alone_and_running(guest, heartbeat)


def guest_cannot_answer(guest: Guest) -> None:
    """A guest that cannot answer (paused): no reports (plain rounds), no early drop, and no ack
    of libxl's suspend request, which libxl gives up on after its own timeout. xl then says the
    guest was not suspended, and leaves it as it is."""
    testbed = guest.testbed
    testbed.run(["xl", "pause", guest.name], check=True)
    unanswered = xl_with_helper(testbed, "migrate", "-s", "", guest.name, RECEIVER,
                                options="--snapshot-timeout 1 --drop-timeout 2")
    assert not unanswered.ok
    assert "failed to suspend at sender" in unanswered.stderr, unanswered.stderr[-3000:]
    # libxl answers its suspend callback with success all the same: Xen's word decides, as in
    # xc_domain_save.
    assert "guest didn't acknowledge suspend" in unanswered.stderr, unanswered.stderr[-3000:]
    assert "but Xen shows it not suspended" in unanswered.stderr, unanswered.stderr[-3000:]
    testbed.run(["xl", "unpause", guest.name], check=True)
    assert_alone_and_running(guest, guest.heartbeat())


def helper_told_to_stop(guest: Guest) -> None:
    """The helper told to stop, as libxl does when its operation is aborted (SIGTERM)."""
    heartbeat = guest.heartbeat()
    stopped = migrate_and_kill(guest.testbed, guest, "TERM", "[s]oftpage-save-helper --save-domain")
    assert "rc=0" not in stopped.stdout, stopped.stdout + stopped.stderr[-3000:]
    assert_alone_and_running(guest, heartbeat)


def xl_killed(guest: Guest) -> None:
    """xl itself killed in the middle of the stream: the helper loses its toolstack, and finds out
    at the suspend callback at the latest; nothing suspended the guest."""
    testbed = guest.testbed
    heartbeat = guest.heartbeat()
    killed = migrate_and_kill(testbed, guest, "KILL", f"[x]l migrate -s  {guest.name}")
    assert "rc=0" not in killed.stdout, killed.stdout + killed.stderr[-3000:]
    testbed.run(f"for i in $(seq 60); do xl domid {guest.name}--incoming >/dev/null 2>&1 || break; "
                "sleep 1; done")
    assert_alone_and_running(guest, heartbeat)


def assert_alone_and_running(guest: Guest, heartbeat: int) -> None:
    """One copy, running under its own name, nothing half-restored beside it."""
    domains = guest.testbed.domains()
    assert [name for name in domains if name.startswith(guest.name)] == [guest.name], domains
    assert_survived(guest, heartbeat)
    assert wait_for_module(guest) == "ready"
