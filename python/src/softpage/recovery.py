"""``softpage resume``: bring back a source domain that a dead sender left suspended.

A ``softpage migrate`` (or stock ``xl migrate``) killed after the suspend leaves the source
suspended, perhaps renamed ``NAME--migratedaway``, its guest still armed, and on the
destination perhaps an ``xl migrate-receive`` and its ``NAME--incoming`` copy. xl 4.17 has no
command that resumes such a domain. ``resume_source`` does what the sender's own failure path
does (``sender._resume_source``): rename back, resume with suspend-cancel, and disarm, but only
once it is sure no copy of the guest runs on this host, and it names the leftovers it sees.

It sees only this host: after a migration to another host, the destination must be checked
first (``xl list`` there), as after xl's "Domain state is now undefined".
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from softpage import toolstack
from softpage.errors import BackendError, SoftpageError
from softpage.toolstack import INCOMING_SUFFIX, MIGRATED_AWAY_SUFFIX
from softpage.xen.channel import ARMED, softpage_home
from softpage.xen.ctrl import DomainState
from softpage.xen.suspend import Resumable, resume_guest
from softpage.xenstore import XenStore

RECEIVER_COMMAND = ("xl", "migrate-receive")


class ResumeRefused(SoftpageError):
    """Resuming the source could leave the guest running twice: nothing was changed."""


@dataclass(frozen=True)
class Receiver:
    """An ``xl migrate-receive`` process on this host."""

    pid: int
    command: str
    monitor: bool = False
    """It is the domain-monitoring daemon ``xl migrate-receive`` forks once its copy exists
    (``do_daemonize``: its output goes to a log file), not the process that talks to the sender
    and may still start the copy; it waits for the copy's end and exits with it."""


@dataclass
class ResumeReport:
    domid: int
    name: str
    """The name the domain has now."""
    renamed_from: str | None = None
    resumed: bool = False
    """It was suspended and was resumed."""
    disarmed: bool = False
    leftovers: list[str] = field(default_factory=list)
    """What is left for the operator to remove, each with the command that does."""


def domain_names(store: XenStore) -> dict[int, str]:
    """Every domain's name from xenstore (``/local/domain/<domid>/name``), as libxl reads it."""
    names = {}
    for entry in store.list("/local/domain"):
        if entry.isdigit():
            name = store.read(f"/local/domain/{entry}/name")
            if name is not None:
                names[int(entry)] = name
    return names


def migrate_receivers(proc: str = "/proc") -> list[Receiver]:
    """The ``xl migrate-receive`` processes running here, from their command lines."""
    found = []
    for entry in os.listdir(proc):
        if not entry.isdigit():
            continue
        try:
            with open(os.path.join(proc, entry, "cmdline"), "rb") as cmdline:
                words = [word.decode(errors="replace") for word in cmdline.read().split(b"\0") if word]
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if len(words) >= 2 and os.path.basename(words[0]) == RECEIVER_COMMAND[0] \
                and words[1] == RECEIVER_COMMAND[1]:
            found.append(Receiver(int(entry), " ".join(words), _writes_to_a_file(proc, entry)))
    return found


def _writes_to_a_file(proc: str, pid: str) -> bool:
    """Its standard output is a file: the receiver's own goes to the sender (a pipe, or a socket
    under ssh), its monitoring daemon's to ``/var/log/xen/xl-NAME.log``."""
    try:
        target = os.readlink(os.path.join(proc, pid, "fd", "1"))
    except OSError:
        return False
    return target.startswith("/")


def _find_source(spec: str, names: dict[int, str]) -> tuple[int, str]:
    """The domain ``spec`` names: a domid, ``NAME--migratedaway``, or ``NAME`` (whose
    ``--migratedaway`` source, if there is one, is the one meant)."""
    if spec.isdigit():
        if int(spec) not in names:
            raise BackendError(f"no domain {spec}")
        return int(spec), names[int(spec)]
    for wanted in (spec if spec.endswith(MIGRATED_AWAY_SUFFIX) else spec + MIGRATED_AWAY_SUFFIX, spec):
        matches = [domid for domid, name in names.items() if name == wanted]
        if matches:
            return matches[0], wanted
    raise BackendError(f"no domain named {spec!r} or {spec + MIGRATED_AWAY_SUFFIX!r}")


def _runs(state: DomainState) -> bool:
    """Scheduled or runnable: not paused, not shut down (suspended), not dying."""
    return not (state.paused or state.shutdown or state.dying)


def resume_source(
    spec: str,
    store: XenStore,
    ctrl: Resumable,
    receivers: Callable[[], list[Receiver]] = migrate_receivers,
) -> ResumeReport:
    """Bring the source domain ``spec`` back: rename it back to its name, resume it if it is
    suspended, and write ``armed = 0`` if the guest has the key.

    ``ResumeRefused`` (nothing changed) if another domain of the guest's name, or its
    ``--incoming`` copy, runs: the destination owns the guest, and the source is to be destroyed;
    also while an ``xl migrate-receive`` runs here beside an incoming copy, which it may still
    start (not its monitoring daemon, which never does); and if another domain, not running,
    has taken the guest's name."""
    names = domain_names(store)
    domid, name = _find_source(spec, names)
    base = name.removesuffix(MIGRATED_AWAY_SUFFIX)
    incoming = base + INCOMING_SUFFIX
    others = {other: other_name for other, other_name in names.items()
              if other != domid and other_name in (base, incoming)}
    running = [other for other in others if _runs(ctrl.domain_state(other))]
    if running:
        copy = running[0]
        raise ResumeRefused(
            f"{others[copy]!r} (domain {copy}) runs: the migration's destination owns the guest, so "
            f"{name!r} (domain {domid}) is not resumed; `xl destroy {domid}` removes it")
    alive = receivers()
    talking = [receiver for receiver in alive if not receiver.monitor]
    if talking and incoming in others.values():
        pids = ", ".join(str(receiver.pid) for receiver in talking)
        raise ResumeRefused(
            f"an xl migrate-receive (pid {pids}) still runs beside {incoming!r}, which it may still "
            f"start: wait for it to exit (or `kill {pids}`), then run `softpage resume {spec}` again")
    if base in others.values():
        taken_by = next(other for other, other_name in others.items() if other_name == base)
        raise ResumeRefused(
            f"another domain, {taken_by}, is named {base!r} and is not running: if it is the "
            f"migration's copy, `xl destroy {taken_by}` removes it; {name!r} was not resumed")
    report = ResumeReport(domid=domid, name=name)
    if name != base:
        uuid = (store.read(f"/local/domain/{domid}/vm") or "").removeprefix("/vm/")
        toolstack.rename(store, domid, uuid, name, base)
        report.name, report.renamed_from = base, name
    # Disarmed first, as the sender's failure path does: nothing the guest does on its way
    # back may take the migration as still under way.
    armed_key = f"{softpage_home(domid)}/{ARMED}"
    if store.read(armed_key) not in (None, "0"):
        store.write(armed_key, "0")
        report.disarmed = True
    report.resumed = resume_guest(ctrl, store, domid)
    for other, other_name in others.items():
        report.leftovers.append(f"{other_name!r} (domain {other}), the migration's unstarted copy: "
                                f"`xl destroy {other}`")
    for receiver in alive:
        if receiver.monitor:
            report.leftovers.append(f"xl migrate-receive (pid {receiver.pid}), a copy's monitor: it "
                                    "exits when that copy is destroyed")
        else:
            report.leftovers.append(f"xl migrate-receive (pid {receiver.pid}): `kill {receiver.pid}`")
    return report
