"""``softpage resume DOMAIN``: bring back a source domain a dead sender left suspended.

    softpage resume DOMAIN

DOMAIN is the guest's name, its ``NAME--migratedaway`` name, or its domain id. See
``softpage.recovery`` for what it does and when it refuses (exit 1, nothing changed).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from softpage.xenstore import PyxsStore


def register(subparsers: Any) -> None:
    resume = subparsers.add_parser(
        "resume",
        help="resume a source domain that an interrupted migration left suspended",
        description="Resume DOMAIN, left suspended (and perhaps renamed NAME--migratedaway) by a "
        "migration whose sender died: rename it back, resume it, disarm its guest. Refused while a "
        "copy of the guest runs on this host. After a migration to another host, check there first.",
    )
    resume.add_argument("domain", metavar="DOMAIN",
                        help="the guest's name, its NAME--migratedaway name, or its domain id")
    resume.set_defaults(func=run_resume)


def run_resume(args: argparse.Namespace) -> int:
    # Imported here: the Xen bindings need libxenctrl, which only dom0 has.
    from softpage.recovery import resume_source
    from softpage.xen.ctrl import XenCtrl

    with PyxsStore() as store, XenCtrl.open() as ctrl:
        report = resume_source(args.domain, store, ctrl)
    done = [f"renamed back from {report.renamed_from!r}"] if report.renamed_from else []
    done.append("resumed" if report.resumed else "was not suspended")
    if report.disarmed:
        done.append("disarmed")
    print(f"softpage: {report.name!r} (domain {report.domid}): {', '.join(done)}", file=sys.stderr)
    for leftover in report.leftovers:
        print(f"softpage: left over: {leftover}", file=sys.stderr)
    return 0
