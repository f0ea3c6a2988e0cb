"""SIGINT, SIGTERM and SIGHUP at each step of ``softpage migrate``, to a fake ``xl
migrate-receive``: before the handover the source is renamed back and resumed and the interrupt
raised again; from the GO message on, the signals wait until the source was destroyed or
resumed. Never both copies running, never neither."""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import numpy.typing as npt
import pytest

from softpage.backend import PageBatch
from softpage.errors import MigrationError
from softpage.interrupts import INTERRUPTING_SIGNALS, held_signals, raise_on_signals
from softpage.options import DriverOptions
from softpage.pfnset import PfnArray
from softpage.sender import MigrateResult, migrate_domain
from softpage.sim.backend import SimBackend, SimFaults
from softpage.sim.experiment import boot_guest
from softpage.stream.receiver import RestoreModel
from tests.unit.stream_builders import CONFIG, fake_migrate_receive
from tests.unit.test_sender import SMALL, SocketReceiver

SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]


@pytest.fixture(autouse=True)
def signal_handlers() -> Iterator[None]:
    """As ``softpage``'s main() sets them; the test process's own come back afterwards."""
    saved = {signum: signal.getsignal(signum) for signum in INTERRUPTING_SIGNALS}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise_on_signals()
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def send_self(signum: int) -> None:
    """The signal, delivered (and its handler run) before this returns."""
    os.kill(os.getpid(), signum)
    signal.sigtimedwait([], 0)  # a bytecode boundary in the main thread: the handler has run


class SignallingReceiver(SocketReceiver):
    """Sends ``signum`` to this process at ``step``: "ready" (the sender waits for the receiver's
    ready message, the stream sent) or "go" (right after the GO message went out)."""

    def __init__(self, end: socket.socket, signum: int, step: str) -> None:
        super().__init__(end)
        self.signum, self.step = signum, step
        self.streamed = False
        self.signalled = False
        read, write = self.read, self.write

        def reading(max_bytes: int, timeout: float) -> bytes:
            if self.step == "ready" and self.streamed and not self.signalled:
                self.signalled = True
                send_self(self.signum)
            return read(max_bytes, timeout)

        def writing(data: bytes) -> None:
            write(data)
            if self.step == "go" and not self.signalled:
                self.signalled = True
                send_self(self.signum)

        self.read, self.write = reading, writing

    def writev(self, buffers: Sequence[bytes]) -> int:
        self.streamed = True
        return super().writev(buffers)


class SignalInFinalRound(SimBackend):
    """Sends ``signum`` to this process while it reads pages with the guest suspended."""

    signum: int = signal.SIGTERM
    signalled = False

    def read_pages(self, pfns: PfnArray, types: npt.NDArray[np.uint32]) -> PageBatch:
        if self.suspended and not self.signalled:
            self.signalled = True
            send_self(self.signum)
        return super().read_pages(pfns, types)


Outcome = "MigrateResult | BaseException"


def migrate(
    backend: SimBackend,
    make_receiver: Callable[[socket.socket], SocketReceiver],
    status: int = 0,
    rename_hook: Callable[[], None] | None = None,
) -> tuple[MigrateResult | BaseException, list[tuple[str, str]], list[str], list[str]]:
    """Migrate to a fake receiver whose copy exits with ``status``; the outcome, the renames,
    whether the source was destroyed, and the log."""
    sender_end, receiver_end = socket.socketpair()
    receiver = threading.Thread(target=fake_migrate_receive, args=(receiver_end, status, RestoreModel()))
    receiver.start()
    renames: list[tuple[str, str]] = []
    destroyed: list[str] = []
    log: list[str] = []

    def rename(old: str, new: str) -> None:
        renames.append((old, new))
        if rename_hook is not None and len(renames) == 1:
            rename_hook()

    try:
        outcome: MigrateResult | BaseException = migrate_domain(
            backend, make_receiver(sender_end), CONFIG, "guest", rename, DriverOptions(), log.append,
            destroy_source=lambda: destroyed.append("guest--migratedaway"))
    except (KeyboardInterrupt, MigrationError) as error:
        outcome = error
    finally:
        sender_end.close()
        receiver.join(10)
    return outcome, renames, destroyed, log


def backend() -> SimBackend:
    return SimBackend(boot_guest(SMALL, 1, seed=5))


@pytest.mark.parametrize("signum", SIGNALS)
def test_a_signal_during_the_final_round_resumes_the_source(signum: int) -> None:
    source = SignalInFinalRound(boot_guest(SMALL, 1, seed=5))
    source.signum = signum
    outcome, renames, destroyed, log = migrate(source, SocketReceiver)
    assert source.signalled
    assert isinstance(outcome, KeyboardInterrupt)
    assert source.guest.running and not destroyed and renames == []
    assert not source.guest.armed
    assert "migration sender: interrupted; 'guest' runs on the source" in log


@pytest.mark.parametrize("signum", SIGNALS)
def test_a_signal_while_waiting_for_the_receiver_resumes_the_source(signum: int) -> None:
    source = backend()
    outcome, renames, destroyed, log = migrate(source, lambda end: SignallingReceiver(end, signum, "ready"))
    assert isinstance(outcome, KeyboardInterrupt)
    assert source.guest.running and not destroyed and renames == []
    assert "migration sender: Resumed OK." in log


@pytest.mark.parametrize("signum", SIGNALS)
def test_a_signal_during_the_rename_renames_back_and_resumes(signum: int) -> None:
    source = backend()
    outcome, renames, destroyed, _log = migrate(source, SocketReceiver, rename_hook=lambda: send_self(signum))
    assert isinstance(outcome, KeyboardInterrupt)
    assert renames == [("guest", "guest--migratedaway"), ("guest--migratedaway", "guest")]
    assert source.guest.running and not destroyed


@pytest.mark.parametrize("signum", SIGNALS)
def test_a_signal_after_go_waits_for_the_handover_and_destroys_the_source(signum: int) -> None:
    source = backend()
    outcome, renames, destroyed, _log = migrate(source, lambda end: SignallingReceiver(end, signum, "go"))
    assert isinstance(outcome, MigrateResult)
    assert outcome.held_signals == (signum,)
    assert destroyed == ["guest--migratedaway"] and not source.guest.running
    assert renames == [("guest", "guest--migratedaway")]


def test_a_signal_after_go_with_the_guest_given_back_resumes_the_source() -> None:
    source = backend()
    outcome, renames, destroyed, _log = migrate(
        source, lambda end: SignallingReceiver(end, signal.SIGHUP, "go"), status=5)
    assert isinstance(outcome, MigrationError) and "resumed at sender" in str(outcome)
    assert source.guest.running and not destroyed
    assert renames[-1] == ("guest--migratedaway", "guest")


def test_a_source_that_cannot_be_resumed_after_an_interrupt_names_softpage_resume() -> None:
    source = SimBackend(boot_guest(SMALL, 1, seed=5), faults=SimFaults(resume_fails=True))
    outcome, _renames, destroyed, _log = migrate(
        source, lambda end: SignallingReceiver(end, signal.SIGTERM, "ready"))
    assert isinstance(outcome, MigrationError)
    assert "left suspended" in str(outcome) and "`softpage resume guest`" in str(outcome)
    assert not source.guest.running and not destroyed


def test_held_signals_are_noted_and_the_handlers_come_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with held_signals() as arrived:
        send_self(signal.SIGTERM)
        send_self(signal.SIGINT)
    assert arrived == [signal.SIGTERM, signal.SIGINT]
    assert signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(KeyboardInterrupt, match="SIGHUP"):
        send_self(signal.SIGHUP)
