"""softpage.sender.migrate_domain: a whole migration of a simulated guest to a fake
`xl migrate-receive`, the source renamed as xl renames it and the downtime's steps recorded."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Sequence

import pytest

from softpage import sender
from softpage.errors import BackendError, MigrationError
from softpage.options import DriverOptions
from softpage.sender import MigrateResult, StreamLeftOpen, migrate_domain
from softpage.sim.backend import SimBackend
from softpage.sim.experiment import GuestShape, boot_guest
from softpage.stream.handshake import RECEIVER_BANNER, FdChannel
from softpage.stream.receiver import RestoreModel
from softpage.stream.writer import StreamWriter
from tests.unit.stream_builders import CONFIG, ByteSink, fake_migrate_receive

SMALL = GuestShape(memory_mib=4, kernel_mib=1, min_free_mib=1)


class SocketReceiver:
    """``sender.ReceiverConnection`` over one end of a socket pair."""

    def __init__(self, end: socket.socket) -> None:
        self._end = end
        channel = FdChannel(end.fileno(), end.fileno())
        self.read, self.write = channel.read, channel.write

    def writev(self, buffers: Sequence[bytes]) -> int:
        return FdChannel(self._end.fileno(), self._end.fileno()).writev(buffers)

    def close_sending_side(self) -> None:
        self._end.shutdown(socket.SHUT_WR)


def migrate(status: int) -> tuple[MigrateResult | MigrationError, list[tuple[str, str]], SimBackend]:
    """Migrate a small simulated guest to a fake receiver whose copy exits with ``status``."""
    backend = SimBackend(boot_guest(SMALL, 1, seed=5))
    sender_end, receiver_end = socket.socketpair()
    receiver = threading.Thread(target=fake_migrate_receive, args=(receiver_end, status, RestoreModel()))
    receiver.start()
    renames: list[tuple[str, str]] = []
    try:
        result: MigrateResult | MigrationError = migrate_domain(
            backend, SocketReceiver(sender_end), CONFIG, "guest",
            lambda old, new: renames.append((old, new)), DriverOptions(), lambda message: None)
    except MigrationError as error:
        result = error
    finally:
        sender_end.close()
        receiver.join(10)
    return result, renames, backend


def test_a_migration_renames_the_source_away_and_times_the_downtime() -> None:
    result, renames, _backend = migrate(0)
    assert isinstance(result, MigrateResult)
    assert renames == [("guest", "guest--migratedaway")]
    steps = result.send.stats.downtime_steps
    assert list(steps) == ["suspended", "final_harvest", "final_report", "final_round", "stream_end",
                           "receiver_ready", "renamed", "destination_running"]
    assert list(steps.values()) == sorted(steps.values())
    assert steps["destination_running"] <= result.downtime_s + 0.001


def test_a_copy_that_fails_to_start_gets_the_source_renamed_back_and_resumed() -> None:
    result, renames, backend = migrate(5)
    assert isinstance(result, MigrationError) and "resumed at sender" in str(result)
    assert renames == [("guest", "guest--migratedaway"), ("guest--migratedaway", "guest")]
    assert backend.guest.running


def test_the_source_is_not_resumed_after_a_successful_handover() -> None:
    result, _renames, backend = migrate(0)
    assert isinstance(result, MigrateResult)
    assert not backend.guest.running


class VanishingReceiver(SocketReceiver):
    """A receiver that takes ``limit`` bytes of the stream, then is gone (EPIPE)."""

    def __init__(self, end: socket.socket, limit: int) -> None:
        super().__init__(end)
        self.limit = limit
        self.taken = 0

    def writev(self, buffers: Sequence[bytes]) -> int:
        if self.taken >= self.limit:
            raise BrokenPipeError(32, "Broken pipe")
        offered = sum(len(memoryview(buffer).cast("B")) for buffer in buffers)
        self.taken += offered
        return offered


def test_a_receiver_gone_in_the_middle_of_the_stream_leaves_the_source_running() -> None:
    backend = SimBackend(boot_guest(SMALL, 1, seed=5))
    sender_end, receiver_end = socket.socketpair()
    receiver_end.sendall(RECEIVER_BANNER)
    try:
        with pytest.raises(MigrationError) as failed:
            migrate_domain(backend, VanishingReceiver(sender_end, limit=1 << 20), CONFIG, "guest",
                           lambda old, new: None, DriverOptions(), lambda message: None)
    finally:
        sender_end.close()
        receiver_end.close()
    assert "Broken pipe" in str(failed.value)
    assert backend.guest.running


class NoLogDirtyBackend(SimBackend):
    """A domain whose log-dirty cannot be enabled (a PV guest without shadow paging)."""

    def enable_logdirty(self) -> None:
        raise BackendError("no log-dirty for PV guests on this hypervisor")


class RecordingReceiver:
    """Takes the stream slowly (``delay`` per writev, or not at all until ``release``) and
    records when the sender closed its side."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.received = bytearray()
        self.writes_after_close = 0
        self.received_at_close: int | None = None
        self.release = threading.Event()
        self.release.set()

    def read(self, max_bytes: int, timeout: float) -> bytes:
        return RECEIVER_BANNER

    def write(self, data: bytes) -> None:
        pass

    def writev(self, buffers: Sequence[bytes]) -> int:
        self.release.wait(timeout=10)
        time.sleep(self.delay)
        if self.received_at_close is not None:
            self.writes_after_close += 1
        taken = b"".join(bytes(memoryview(buffer).cast("B")) for buffer in buffers)
        self.received += taken
        return len(taken)

    def close_sending_side(self) -> None:
        self.received_at_close = len(self.received)


def stream_headers(backend: SimBackend) -> bytes:
    """What a sender writes before log-dirty is enabled: everything up to STATIC_DATA_END."""
    sink = ByteSink()
    domain = backend.describe()
    StreamWriter(sink.writev).begin(CONFIG, domain.guest_type, domain.xen_version, backend.static_info())
    return bytes(sink.buffer)


def test_a_failed_migration_sends_what_was_written_before_it_closes_the_stream() -> None:
    backend = NoLogDirtyBackend(boot_guest(SMALL, 1, seed=5))
    receiver = RecordingReceiver(delay=0.05)
    with pytest.raises(MigrationError, match="no log-dirty"):
        migrate_domain(backend, receiver, CONFIG, "guest", lambda old, new: None, DriverOptions(),
                       lambda message: None)
    # The receiver must fail where it did when every write went out at once, and nothing may
    # be written to the connection once it is closed.
    assert receiver.received_at_close == len(stream_headers(backend))
    assert bytes(receiver.received) == stream_headers(backend)
    assert receiver.writes_after_close == 0
    assert backend.guest.running


def test_a_stream_stuck_on_its_receiver_is_left_open(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sender, "FAILED_STREAM_FLUSH_S", 0.2)
    backend = NoLogDirtyBackend(boot_guest(SMALL, 1, seed=5))
    receiver = RecordingReceiver()
    receiver.release.clear()
    with pytest.raises(StreamLeftOpen, match=r"no log-dirty.*still blocked"):
        migrate_domain(backend, receiver, CONFIG, "guest", lambda old, new: None, DriverOptions(),
                       lambda message: None)
    assert receiver.received_at_close is None
    receiver.release.set()
