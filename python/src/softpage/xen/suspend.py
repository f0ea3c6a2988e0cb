"""Suspending a PV/PVH Linux guest the way libxl does.

``tools/libs/light/libxl_dom_suspend.c`` (Xen 4.17), for a guest without a
suspend event channel (Linux 6.1 publishes none):

1. write ``control/shutdown = "suspend"`` and wait (60 s) for the guest to
   acknowledge by rewriting the node: any value other than "suspend" counts
   (``domain_suspend_pvcontrol_acked``);
2. on timeout, in a transaction: if the node still says "suspend", clear it
   (write "") so the guest does not suspend later, and fail; if the guest
   acked in the nick of time, carry on;
3. wait (60 s) for the domain to be shut down with reason
   ``SHUTDOWN_suspend`` (``domain_suspend_common_wait_guest`` watches
   ``@releaseDomain`` and checks ``XEN_DOMINF_shutdown``); here the domain's
   state is also read every ``SUSPENDED_POLL_INTERVAL``, so that a late
   event does not add to the downtime.

Written against ``XenStore`` and a domain-state callable so the simulator and
unit tests drive the same code with ``MemoryStore``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from softpage.errors import BackendError, GuestProtocolError
from softpage.interrupts import held_signals
from softpage.xen.ctrl import DomainState
from softpage.xenstore import XenStore, XenStoreOps, run_transaction

SUSPEND_REQUEST = "suspend"
LIBXL_TIMEOUT = 60.0
"""Seconds libxl allows for the ack and again for the suspend itself."""
STATE_POLL_INTERVAL = 0.5
"""Seconds between domain-state checks even without an @releaseDomain event
(a missed event must not cost the full timeout)."""
SUSPENDED_POLL_INTERVAL = 0.01
"""Seconds between domain-state checks once the guest acknowledged: each is one
getdomaininfo hypercall, and the time from the guest's shutdown to our noticing
it is downtime. Woken by @releaseDomain and otherwise every STATE_POLL_INTERVAL,
the sender noticed the shutdown 0.03-0.8 s (median 0.2 s) after dom0's own
20 ms poll had seen it on the testbed's two hosts (results/link-bench-20261206-* and -20261207-*), 0.01-0.04 s
on one host."""


@dataclass(frozen=True)
class SuspendTimeouts:
    ack: float = LIBXL_TIMEOUT
    suspended: float = LIBXL_TIMEOUT


def shutdown_node(domid: int) -> str:
    return f"/local/domain/{domid}/control/shutdown"


def _acked(value: str | None) -> bool:
    return value != SUSPEND_REQUEST


def suspend_guest(
    store: XenStore,
    domid: int,
    domain_state: Callable[[], DomainState],
    timeouts: SuspendTimeouts = SuspendTimeouts(),
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Ask ``domid`` to suspend and return once it is suspended.

    Raises ``GuestProtocolError`` if the guest does not acknowledge in time
    (the request is withdrawn first), ``BackendError`` if it acknowledges but
    does not suspend in time, or shuts down for another reason.
    """
    node = shutdown_node(domid)
    if domain_state().suspended:
        return
    requested: list[bool] = []
    try:
        _request_and_wait(store, domid, node, domain_state, timeouts, clock, requested)
    except KeyboardInterrupt:
        if not requested:
            raise
        # The caller resumes the guest, which is a no-op unless it is suspended: a guest that
        # acknowledged must be let finish its suspend first, or it would suspend afterwards and
        # stay suspended; one that did not is told not to.
        with held_signals():
            _settle(store, node, domain_state, timeouts, clock)
        raise


def _request_and_wait(
    store: XenStore,
    domid: int,
    node: str,
    domain_state: Callable[[], DomainState],
    timeouts: SuspendTimeouts,
    clock: Callable[[], float],
    requested: list[bool],
) -> None:
    """The libxl steps of ``suspend_guest``; ``requested`` gets an entry once the request may
    have been written."""
    with store.watch("@releaseDomain") as release_watch:
        # Watched only until the guest acknowledges: it may go on writing the node, and those
        # events would only queue up while we wait for the suspend.
        with store.watch(node) as shutdown_watch:
            requested.append(True)
            store.write(node, SUSPEND_REQUEST)
            deadline = clock() + timeouts.ack
            while not _acked(store.read(node)):
                remaining = deadline - clock()
                gone = domain_state().gone
                if gone is not None:
                    # It will never answer: say why now, not after the timeout. The request stays
                    # (a domain that crashed or shut down cannot act on it).
                    raise BackendError(f"dom {domid} {gone} while asked to suspend")
                if remaining <= 0:
                    if not run_transaction(store, lambda ops: _withdraw_request(ops, node)):
                        raise GuestProtocolError(
                            f"dom {domid}: guest did not acknowledge {node} = {SUSPEND_REQUEST!r} "
                            f"within {timeouts.ack:g} s; request withdrawn"
                        )
                    break
                shutdown_watch.wait(min(remaining, STATE_POLL_INTERVAL))

        deadline = clock() + timeouts.suspended
        while True:
            state = domain_state()
            if state.shutdown:
                if state.suspended:
                    return
                raise BackendError(
                    f"dom {domid}: expected shutdown reason suspend (2), got {state.shutdown_reason}"
                )
            remaining = deadline - clock()
            if remaining <= 0:
                raise BackendError(
                    f"dom {domid}: acknowledged the suspend request but was not suspended "
                    f"within {timeouts.suspended:g} s"
                )
            release_watch.wait(min(remaining, SUSPENDED_POLL_INTERVAL))


class Resumable(Protocol):
    """What resuming a domain needs of libxenctrl (``XenCtrl``)."""

    def domain_state(self, domid: int) -> DomainState: ...

    def resume(self, domid: int, fast: bool = True) -> None: ...


def resume_guest(ctrl: Resumable, store: XenStore, domid: int) -> bool:
    """As ``libxl_domain_resume(suspend_cancel=1)``: if ``domid`` is suspended, resume it
    cooperatively (the guest sees a cancelled suspend) in the hypervisor, then in xenstored.
    True if it was suspended; a domain that is not is left as it is."""
    if not ctrl.domain_state(domid).suspended:
        return False
    ctrl.resume(domid, fast=True)
    store.resume_domain(domid)
    return True


def _settle(
    store: XenStore,
    node: str,
    domain_state: Callable[[], DomainState],
    timeouts: SuspendTimeouts,
    clock: Callable[[], float],
) -> None:
    """After an interrupt: withdraw a request the guest has not acknowledged, or wait (at most
    ``timeouts.suspended``) for an acknowledged one to end in a shutdown."""
    if not run_transaction(store, lambda ops: _withdraw_request(ops, node)):
        return
    deadline = clock() + timeouts.suspended
    with store.watch("@releaseDomain") as release_watch:
        while not domain_state().shutdown and clock() < deadline:
            release_watch.wait(min(deadline - clock(), STATE_POLL_INTERVAL))


def _withdraw_request(ops: XenStoreOps, node: str) -> bool:
    """libxl's timeout path: True if the guest acked after all, else clear the node."""
    if _acked(ops.read(node)):
        return True
    ops.write(node, "")
    return False
