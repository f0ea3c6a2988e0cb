"""``softpage resume``: what a dead sender left behind, brought back or refused, on an
in-memory xenstore and a model of the domains' states."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from softpage.cli.main import build_parser
from softpage.errors import BackendError
from softpage.recovery import Receiver, ResumeRefused, migrate_receivers, resume_source
from softpage.xen.channel import ARMED, softpage_home
from softpage.xen.ctrl import (
    SHUTDOWN_SUSPEND,
    XEN_DOMINF_PAUSED,
    XEN_DOMINF_SHUTDOWN,
    XEN_DOMINF_SHUTDOWN_SHIFT,
    DomainState,
)
from softpage.xenstore import MemoryStore

UUID = "6f1c1d2e-0000-4000-8000-00000000000{}"
SUSPENDED = XEN_DOMINF_SHUTDOWN | (SHUTDOWN_SUSPEND << XEN_DOMINF_SHUTDOWN_SHIFT)
RUNNING = 0
PAUSED = XEN_DOMINF_PAUSED


class FakeCtrl:
    """``recovery.Resumable``: each domain's flags; a resume clears the suspend."""

    def __init__(self, flags: dict[int, int]) -> None:
        self.flags = flags
        self.resumed: list[tuple[int, bool]] = []

    def domain_state(self, domid: int) -> DomainState:
        return DomainState(domid=domid, flags=self.flags[domid], tot_pages=0, max_pages=0,
                           nr_online_vcpus=1, max_vcpu_id=0, emulation_flags=0)

    def resume(self, domid: int, fast: bool = True) -> None:
        self.resumed.append((domid, fast))
        self.flags[domid] = RUNNING


def host(*domains: tuple[int, str, int], armed: str | None = "1") -> tuple[MemoryStore, FakeCtrl]:
    """A host with ``(domid, name, flags)`` domains; the first one's guest has the module."""
    store = MemoryStore()
    for domid, name, _flags in domains:
        store.write(f"/local/domain/{domid}/name", name)
        store.write(f"/local/domain/{domid}/vm", f"/vm/{UUID.format(domid)}")
        store.write(f"/vm/{UUID.format(domid)}/name", name)
    if armed is not None:
        store.write(f"{softpage_home(domains[0][0])}/{ARMED}", armed)
    return store, FakeCtrl({domid: flags for domid, _name, flags in domains})


def no_receivers() -> list[Receiver]:
    return []


@pytest.mark.parametrize("spec", ["guest", "guest--migratedaway", "7"])
def test_a_source_left_suspended_and_renamed_is_renamed_back_resumed_and_disarmed(spec: str) -> None:
    store, ctrl = host((7, "guest--migratedaway", SUSPENDED))
    report = resume_source(spec, store, ctrl, no_receivers)
    assert (report.domid, report.name, report.renamed_from) == (7, "guest", "guest--migratedaway")
    assert report.resumed and report.disarmed and report.leftovers == []
    assert ctrl.resumed == [(7, True)] and store.resumed_domains == [7]
    assert store.read("/local/domain/7/name") == store.read(f"/vm/{UUID.format(7)}/name") == "guest"
    assert store.read(f"{softpage_home(7)}/{ARMED}") == "0"


def test_a_source_suspended_before_the_rename_is_resumed_and_the_unstarted_copy_named() -> None:
    store, ctrl = host((7, "guest", SUSPENDED), (9, "guest--incoming", PAUSED))
    report = resume_source("guest", store, ctrl, no_receivers)
    assert report.resumed and report.renamed_from is None
    assert ctrl.resumed == [(7, True)]
    assert report.leftovers == [
        "'guest--incoming' (domain 9), the migration's unstarted copy: `xl destroy 9`"]


def test_a_guest_that_never_suspended_is_only_disarmed() -> None:
    store, ctrl = host((7, "guest", RUNNING))
    report = resume_source("guest", store, ctrl, no_receivers)
    assert not report.resumed and report.disarmed and ctrl.resumed == []


def test_a_guest_without_the_module_gets_no_armed_key() -> None:
    store, ctrl = host((7, "guest--migratedaway", SUSPENDED), armed=None)
    report = resume_source("guest", store, ctrl, no_receivers)
    assert report.resumed and not report.disarmed
    assert store.read(f"{softpage_home(7)}/{ARMED}") is None


@pytest.mark.parametrize("copy_name", ["guest", "guest--incoming"])
def test_a_running_copy_means_the_destination_owns_the_guest(copy_name: str) -> None:
    store, ctrl = host((7, "guest--migratedaway", SUSPENDED), (9, copy_name, RUNNING))
    before = store.snapshot()
    with pytest.raises(ResumeRefused, match=rf"'{copy_name}' \(domain 9\) runs.*`xl destroy 7`"):
        resume_source("guest", store, ctrl, no_receivers)
    assert ctrl.resumed == [] and store.snapshot() == before


def test_a_receiver_beside_its_incoming_copy_is_waited_for() -> None:
    store, ctrl = host((7, "guest", SUSPENDED), (9, "guest--incoming", PAUSED))
    with pytest.raises(ResumeRefused, match=r"migrate-receive \(pid 4242\).*`kill 4242`"):
        resume_source("guest", store, ctrl, lambda: [Receiver(4242, "xl migrate-receive")])
    assert ctrl.resumed == []


def test_a_copys_monitor_does_not_stop_the_resume() -> None:
    # The receiver died of SIGPIPE before it could destroy its copy; the daemon it forked to
    # monitor the copy lives on until the copy is destroyed.
    store, ctrl = host((7, "guest", SUSPENDED), (9, "guest--incoming", PAUSED))
    report = resume_source("guest", store, ctrl, lambda: [Receiver(4242, "xl migrate-receive", True)])
    assert report.resumed
    assert report.leftovers == [
        "'guest--incoming' (domain 9), the migration's unstarted copy: `xl destroy 9`",
        "xl migrate-receive (pid 4242), a copy's monitor: it exits when that copy is destroyed"]


def test_a_receiver_without_a_copy_is_named_as_a_leftover() -> None:
    store, ctrl = host((7, "guest", SUSPENDED))
    report = resume_source("guest", store, ctrl, lambda: [Receiver(4242, "xl migrate-receive")])
    assert report.resumed
    assert report.leftovers == ["xl migrate-receive (pid 4242): `kill 4242`"]


def test_a_paused_domain_that_took_the_name_is_refused() -> None:
    store, ctrl = host((7, "guest--migratedaway", SUSPENDED), (9, "guest", PAUSED))
    with pytest.raises(ResumeRefused, match="another domain, 9, is named 'guest'"):
        resume_source("guest", store, ctrl, no_receivers)
    assert ctrl.resumed == []


def test_an_unknown_domain_is_an_error() -> None:
    store, ctrl = host((7, "other", RUNNING))
    with pytest.raises(BackendError, match="no domain named 'guest'"):
        resume_source("guest", store, ctrl, no_receivers)
    with pytest.raises(BackendError, match="no domain 8"):
        resume_source("8", store, ctrl, no_receivers)


def test_receivers_are_found_by_their_command_line(tmp_path: Path) -> None:
    for pid, words, output in ((10, [b"/usr/lib/xen-4.17/bin/xl", b"migrate-receive"], "pipe:[77]"),
                               (11, [b"xl", b"list"], "pipe:[78]"),
                               (12, [b"sh", b"-c", b"xl migrate-receive"], "pipe:[79]"),
                               (13, [b"xl", b"migrate-receive"], "/var/log/xen/xl-guest--incoming.log")):
        os.makedirs(tmp_path / str(pid) / "fd")
        (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(words) + b"\0")
        os.symlink(output, tmp_path / str(pid) / "fd" / "1")
    os.mkdir(tmp_path / "self")
    assert sorted(migrate_receivers(str(tmp_path)), key=lambda receiver: receiver.pid) == [
        Receiver(10, "/usr/lib/xen-4.17/bin/xl migrate-receive", monitor=False),
        Receiver(13, "xl migrate-receive", monitor=True)]


def test_resume_is_a_subcommand() -> None:
    assert build_parser(["resume", "guest"]).parse_args(["resume", "guest"]).domain == "guest"
