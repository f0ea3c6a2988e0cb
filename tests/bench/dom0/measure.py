"""Runs in dom0: runs one migration command, and measures it the same way whatever the sender.

    measure.py SOURCE_DOMID SUMMARY.json -- COMMAND...
    measure.py - SUMMARY.json -- COMMAND...       (no downtime watch: for the receiver side)
    measure.py incoming SUMMARY.json -- COMMAND...
        (the receiver side on another host: only ``running_at``, the first poll where a domain
        created after the start runs unpaused; tests/bench/link_bench.py relates it to the
        sender's moments through the offset between the two dom0s' clocks)

Wall time; CPU time of the command's process tree (user + system, from the rusage of waited-for
children; the receiver's share is measured by its own wrapper and subtracted by the caller);
dom0's CPU time, all of it, while the command ran (``dom0_cpu_s``: the busy time of every dom0
vCPU in /proc/stat, sender, receiver, tap and these watchers together, the same for any sender);
two downtimes, both ending at the first poll where another domain (the incoming copy) runs
unpaused:
* ``downtime_s`` starts when the sender asks the guest to suspend (the xenstore write of
  ``control/shutdown``, seen through a watch). From then on the guest's user space is frozen,
  so this is the interruption the guest's users see, whatever the guest does before it
  suspends (softpage.ko drops its caches then).
* ``suspended_s`` starts at the first poll where Xen shows the source shut down for suspend.
The moments themselves, on dom0's monotonic clock (``time.monotonic()``), go beside as
``started_at``, ``ended_at``, ``requested_at``, ``suspended_at`` and ``running_at``: what a time
line of the guest's service (tests/bench/guestview_bench.py) is aligned on.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time

from softpage.xen.ctrl import XenCtrl
from softpage.xenstore import PyxsStore

POLL_S = 0.02
WATCHED_NEW_DOMAINS = 8
FIRST_WATCH_EVENT_S = 10.0
"""xenstored fires a new watch once as soon as it is set; that event is not a write."""


def watch_suspend_request(source: int, stop: threading.Event, result: dict[str, float | None]) -> None:
    """The time of the first write to the source's control/shutdown: only the sender's suspend
    request writes it during a migration (the guest's acknowledgement comes after)."""
    path = f"/local/domain/{source}/control/shutdown"
    with PyxsStore() as store, store.watch(path) as watch:
        watch.wait(FIRST_WATCH_EVENT_S)
        while not stop.is_set():
            if watch.wait(0.5) is not None:
                result["requested_at"] = time.monotonic()
                return


def watch_incoming(source: int, stop: threading.Event, result: dict[str, float | None]) -> None:
    with XenCtrl.open() as ctrl:
        while not stop.is_set():
            now = time.monotonic()
            try:
                if result["suspended_at"] is None and ctrl.domain_state(source).suspended:
                    result["suspended_at"] = now
            except OSError:
                pass  # the source is gone (destroyed after the handover)
            if result["suspended_at"] is not None and runs_above(ctrl, source):
                result["running_at"] = now
                return
            time.sleep(POLL_S)


def runs_above(ctrl: XenCtrl, newest: int) -> bool:
    """Whether one of the next domains created after ``newest`` runs unpaused."""
    for domid in range(newest + 1, newest + 1 + WATCHED_NEW_DOMAINS):
        try:
            state = ctrl.domain_state(domid)
        except OSError:
            continue
        if not state.paused and not state.shutdown and not state.dying:
            return True
    return False


def newest_domid() -> int:
    """The highest domid that exists now (``xl list``): Xen gives a new domain a higher one."""
    listing = subprocess.run(["xl", "list"], capture_output=True, text=True, check=True).stdout
    return max(int(line.split()[1]) for line in listing.splitlines()[1:] if line.strip())


def watch_new_domain(newest: int, stop: threading.Event, result: dict[str, float | None]) -> None:
    """The first poll where a domain above ``newest`` (the incoming copy) runs unpaused."""
    with XenCtrl.open() as ctrl:
        while not stop.is_set():
            now = time.monotonic()
            if runs_above(ctrl, newest):
                result["running_at"] = now
                return
            time.sleep(POLL_S)


def downtimes(times: dict[str, float | None]) -> dict[str, float | None]:
    running = times["running_at"]

    def since(start: float | None) -> float | None:
        return running - start if running is not None and start is not None else None

    return {"downtime_s": since(times["requested_at"]), "suspended_s": since(times["suspended_at"])}


def dom0_busy_s() -> float:
    """The CPU time all of dom0's vCPUs have spent busy since boot: /proc/stat's user, nice,
    system, irq and softirq (not idle, iowait or steal)."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = stat.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(value) for value in fields[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    source, summary_path, separator, *command = sys.argv[1:]
    if separator != "--" or not command:
        print("usage: measure.py SOURCE_DOMID|-|incoming SUMMARY.json -- COMMAND...", file=sys.stderr)
        return 2
    times: dict[str, float | None] = {"requested_at": None, "suspended_at": None, "running_at": None}
    stop = threading.Event()
    watchers = []
    if source == "incoming":
        watcher = threading.Thread(target=watch_new_domain, args=(newest_domid(), stop, times), daemon=True)
        watcher.start()
        watchers.append(watcher)
    elif source != "-":
        for target in (watch_suspend_request, watch_incoming):
            watcher = threading.Thread(target=target, args=(int(source), stop, times), daemon=True)
            watcher.start()
            watchers.append(watcher)
    started = time.monotonic()
    busy_before = dom0_busy_s()
    completed = subprocess.run(command, check=False)
    wall = time.monotonic() - started
    dom0_cpu = dom0_busy_s() - busy_before
    if any(watcher.is_alive() for watcher in watchers):
        time.sleep(1.0)  # let the watchers see the incoming copy start if they have not yet
    stop.set()
    for watcher in watchers:
        watcher.join(timeout=5)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    measured = downtimes(times) if source not in ("-", "incoming") else {}
    moments = {"started_at": started, "ended_at": started + wall, "requested_at": times["requested_at"],
               "suspended_at": times["suspended_at"], "running_at": times["running_at"]}
    with open(summary_path, "w", encoding="utf-8") as summary:
        json.dump({"rc": completed.returncode, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
                   "dom0_cpu_s": dom0_cpu, **measured, **moments}, summary)
    return completed.returncode


if __name__ == "__main__":
    sys.exit(main())
