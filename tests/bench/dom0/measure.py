"""Runs in dom0: runs one migration command, and measures it the same way whatever the sender.

    measure.py SOURCE_DOMID SUMMARY.json -- COMMAND...
    measure.py - SUMMARY.json -- COMMAND...       (no downtime watch: for the receiver side)

Wall time; CPU time of the command's process tree (user + system, from the rusage of waited-for
children; the receiver's share is measured by its own wrapper and subtracted by the caller);
downtime as Xen sees it: from the first poll where the source domain has shut down for suspend
to the first poll where another domain (the incoming copy) runs unpaused.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import threading
import time

from softpage.xen.ctrl import XenCtrl

POLL_S = 0.02
WATCHED_NEW_DOMAINS = 8


def watch_downtime(source: int, stop: threading.Event, result: dict[str, float | None]) -> None:
    with XenCtrl.open() as ctrl:
        suspended_at = None
        while not stop.is_set():
            now = time.monotonic()
            try:
                source_state = ctrl.domain_state(source)
                if suspended_at is None and source_state.suspended:
                    suspended_at = now
            except OSError:
                pass  # the source is gone (destroyed after the handover)
            if suspended_at is not None:
                for domid in range(source + 1, source + 1 + WATCHED_NEW_DOMAINS):
                    try:
                        state = ctrl.domain_state(domid)
                    except OSError:
                        continue
                    if not state.paused and not state.shutdown and not state.dying:
                        result["downtime_s"] = now - suspended_at
                        return
            time.sleep(POLL_S)


def main() -> int:
    source, summary_path, separator, *command = sys.argv[1:]
    if separator != "--" or not command:
        print("usage: measure.py SOURCE_DOMID SUMMARY.json -- COMMAND...", file=sys.stderr)
        return 2
    downtime: dict[str, float | None] = {"downtime_s": None}
    stop = threading.Event()
    watcher = None
    if source != "-":
        watcher = threading.Thread(target=watch_downtime, args=(int(source), stop, downtime), daemon=True)
        watcher.start()
    started = time.monotonic()
    completed = subprocess.run(command, check=False)
    wall = time.monotonic() - started
    if watcher is not None and watcher.is_alive():
        time.sleep(1.0)  # let the watcher see the incoming copy start if it has not yet
        stop.set()
        watcher.join(timeout=5)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(summary_path, "w", encoding="utf-8") as summary:
        json.dump({"rc": completed.returncode, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
                   **downtime}, summary)
    return completed.returncode


if __name__ == "__main__":
    sys.exit(main())
