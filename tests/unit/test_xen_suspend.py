"""The libxl suspend handshake (softpage.xen.suspend) on MemoryStore with a scripted guest."""

from __future__ import annotations

import dataclasses
import signal
import threading
import time

import pytest

from softpage.errors import BackendError, GuestProtocolError
from softpage.xen.ctrl import DomainState
from softpage.xen.suspend import (
    SUSPEND_REQUEST,
    SuspendTimeouts,
    _withdraw_request,
    shutdown_node,
    suspend_guest,
)
from softpage.xenstore import MemoryStore

DOMID = 9
NODE = shutdown_node(DOMID)
QUICK = SuspendTimeouts(ack=0.3, suspended=0.3)


class ScriptedGuest:
    """Acks ``control/shutdown`` like Linux's shutdown_handler (writes ""), then
    shuts down with ``reason`` after ``delay`` seconds; or never acks."""

    def __init__(
        self, store: MemoryStore, ack: bool = True, reason: int | None = 2, delay: float = 0.05
    ) -> None:
        self.store, self.ack, self.reason, self.delay = store, ack, reason, delay
        self.shutdown_reason: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self.store.watch(NODE) as watch:
            while not self._stop.is_set():
                watch.wait(0.02)
                if self.store.read(NODE) == "suspend" and self.ack:
                    self.store.write(NODE, "")
                    if self.reason is not None:
                        time.sleep(self.delay)
                        self.shutdown_reason = self.reason
                        self.store.fire("@releaseDomain")
                    return

    def state(self) -> DomainState:
        flags = 0 if self.shutdown_reason is None else (1 << 2) | (self.shutdown_reason << 16)
        return DomainState(DOMID, flags | (1 << 1), 100, 100, 1, 0, 1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


def test_acked_and_suspended() -> None:
    store = MemoryStore({NODE: ""})
    guest = ScriptedGuest(store)
    suspend_guest(store, DOMID, guest.state, QUICK)
    assert guest.state().suspended and store.read(NODE) == ""
    guest.stop()


def test_no_ack_withdraws_the_request_and_blames_the_guest() -> None:
    store = MemoryStore({NODE: ""})
    guest = ScriptedGuest(store, ack=False)
    started = time.monotonic()
    with pytest.raises(GuestProtocolError, match="did not acknowledge"):
        suspend_guest(store, DOMID, guest.state, QUICK)
    assert 0.25 < time.monotonic() - started < 2.0
    assert store.read(NODE) == ""  # a late guest will not suspend after all
    guest.stop()


def test_acked_but_never_suspended_is_a_backend_error() -> None:
    store = MemoryStore({NODE: ""})
    guest = ScriptedGuest(store, reason=None)
    with pytest.raises(BackendError, match="not suspended within"):
        suspend_guest(store, DOMID, guest.state, QUICK)
    guest.stop()


def test_shutdown_for_another_reason_is_reported() -> None:
    store = MemoryStore({NODE: ""})
    guest = ScriptedGuest(store, reason=3)
    with pytest.raises(BackendError, match="got 3"):
        suspend_guest(store, DOMID, guest.state, QUICK)
    guest.stop()


def test_a_guest_that_shuts_down_instead_of_acknowledging_is_reported_at_once() -> None:
    """A PVH guest that triple-faulted (Xen shuts it down with reason reboot) never acknowledges:
    the reason within a state poll, not "did not acknowledge" after the whole ack timeout."""
    store = MemoryStore({NODE: ""})
    states = [DomainState(DOMID, 1 << 1, 100, 100, 1, 0, 1)]

    def state() -> DomainState:
        if store.read(NODE) == "suspend" and len(states) == 1:
            states.append(dataclasses.replace(states[0], flags=(1 << 1) | (1 << 2) | (1 << 16)))
        return states[-1]

    started = time.monotonic()
    gone = r"dom 9 shut down \(reason reboot or a triple fault.*while asked to suspend"
    with pytest.raises(BackendError, match=gone):
        suspend_guest(store, DOMID, state, SuspendTimeouts(ack=30, suspended=30))
    assert time.monotonic() - started < 2.0


def test_already_suspended_writes_nothing() -> None:
    store = MemoryStore()
    suspended = DomainState(DOMID, (1 << 2) | (2 << 16), 1, 1, 1, 0, 1)
    suspend_guest(store, DOMID, lambda: suspended, QUICK)
    assert store.read(NODE) is None


def test_withdraw_keeps_a_nick_of_time_ack() -> None:
    store = MemoryStore({NODE: "suspend"})
    with store.transaction() as transaction:
        assert _withdraw_request(transaction, NODE) is False
        assert transaction.read(NODE) == ""
    acked = MemoryStore({NODE: ""})
    with acked.transaction() as transaction:
        assert _withdraw_request(transaction, NODE) is True
        assert transaction.read(NODE) == ""


def test_suspension_is_noticed_without_a_release_event() -> None:
    """A missed or late @releaseDomain costs at most the poll interval after the ack, not the
    timeout, and not the half second of the checks while waiting for the ack: it is downtime."""
    store = MemoryStore({NODE: ""})
    guest = ScriptedGuest(store, delay=0.0)
    guest.reason = None  # never fires @releaseDomain
    timer = threading.Timer(0.1, lambda: setattr(guest, "shutdown_reason", 2))
    started = time.monotonic()
    timer.start()
    suspend_guest(store, DOMID, guest.state, SuspendTimeouts(ack=1.0, suspended=5.0))
    assert guest.state().suspended
    assert time.monotonic() - started < 0.35  # 0.1 s, and a poll of 0.01 s: not 0.5 s
    timer.join()
    guest.stop()


class FloodingGuest(ScriptedGuest):
    """Acks, then rewrites ``control/shutdown`` and keys of new names below it ``writes`` times
    each before it suspends, noting the most events any of dom0's watches held meanwhile."""

    def __init__(self, store: MemoryStore, writes: int) -> None:
        self.writes = writes
        self.most_pending = 0
        self.node_unwatched_after_ack = False
        super().__init__(store)

    def _run(self) -> None:
        with self.store.watch(NODE) as watch:
            while self.store.read(NODE) != "suspend":
                watch.wait(0.02)
        # From here on every watch of the store is dom0's.
        self.store.write(NODE, "")
        deadline = time.monotonic() + 5
        while any(path == NODE for path, _ in self.store.watches()) and time.monotonic() < deadline:
            time.sleep(0.01)
        self.node_unwatched_after_ack = all(path != NODE for path, _ in self.store.watches())
        for count in range(self.writes):
            self.store.write(NODE, f"flood {count}")
            self.store.write(f"{NODE}/flood{count}", "x")
            self.most_pending = max([self.most_pending, *(pending for _, pending in self.store.watches())])
        self.shutdown_reason = 2
        self.store.fire("@releaseDomain")


def test_a_guest_writing_its_keys_in_a_loop_cannot_make_dom0_queue_events() -> None:
    store = MemoryStore({NODE: ""})
    guest = FloodingGuest(store, writes=5_000)
    suspend_guest(store, DOMID, guest.state, SuspendTimeouts(ack=10, suspended=30))
    guest.stop()
    assert guest.state().suspended
    # The node is no longer watched once acknowledged; @releaseDomain holds at most one event.
    assert guest.node_unwatched_after_ack
    assert guest.most_pending <= 1
    assert store.watches() == ()


def test_an_interrupt_before_the_ack_withdraws_the_request() -> None:
    # Python's own SIGINT handler, whatever this process inherited: a shell starts a background
    # job (`make test &`) with SIGINT ignored, and Python then leaves it so.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    store = MemoryStore({NODE: ""})
    guest = ScriptedGuest(store, ack=False)
    interrupt = threading.Timer(0.1, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    interrupt.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            suspend_guest(store, DOMID, guest.state, SuspendTimeouts(ack=5, suspended=5))
    finally:
        interrupt.join()
        signal.signal(signal.SIGINT, previous)
    assert store.read(NODE) == ""  # a late guest will not suspend after all
    guest.stop()


def test_an_interrupt_after_the_ack_waits_for_the_suspend_so_that_a_resume_finds_it() -> None:
    store = MemoryStore({NODE: ""})
    guest = ScriptedGuest(store, delay=0.2)
    calls = []
    requested, interrupted = [], []

    def state() -> DomainState:
        calls.append(guest.state())
        if store.read(NODE) == SUSPEND_REQUEST:
            requested.append(True)
        elif requested and not interrupted:  # the first look after the ack
            interrupted.append(True)
            raise KeyboardInterrupt
        return calls[-1]

    with pytest.raises(KeyboardInterrupt):
        suspend_guest(store, DOMID, state, SuspendTimeouts(ack=5, suspended=5))
    assert calls[-1].suspended
    guest.stop()
