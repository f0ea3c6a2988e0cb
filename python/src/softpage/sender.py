"""Sending a domain the way ``xl`` does: into a save file, or to ``xl migrate-receive``.

This layer joins the driver (``softpage.driver``) to the xl stream
(``softpage.stream``) and, for migration, to the xl handshake
(``softpage.stream.handshake``). It does no I/O of its own beyond the file
descriptors and callables it is given, and it leaves the source domain either
handed over (the caller destroys it) or running: any failure before the
receiver was told "domain is yours" resumes the domain on the source.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from softpage.backend import DomainInfo, EndOfCheckpoint, MigrationBackend, StaticInfo
from softpage.driver import Log, MigrationStats, Progress, send_domain
from softpage.errors import MigrationError, SoftpageError
from softpage.interrupts import held_signals, signal_names
from softpage.options import DriverOptions
from softpage.pfnset import PfnArray
from softpage.stream import handshake
from softpage.stream.background import BackgroundWritev
from softpage.stream.handshake import Handover, HandoverOutcome, HandshakeTimeouts
from softpage.stream.writer import StreamWriter, WritevFn
from softpage.toolstack import MIGRATED_AWAY_SUFFIX

if TYPE_CHECKING:
    from typing_extensions import Buffer


UNSENT_POLL_S = 0.005
UNSENT_STALL_S = 5.0
"""``drain`` stops waiting for the receiver to take what is left in the connection when that did
not shrink for this long (a receiver that stopped reading fails the next write instead)."""


class XlStreamSink:
    """The driver's ``PageSink`` over a ``StreamWriter`` writing an xl stream (``config_json``
    None: the bare libxc stream of a save helper), through ``background`` if its writes go out
    from a thread (None: they are written when made). ``unsent()``, if given, tells how much of
    what was written the receiver's end of the connection has not taken yet
    (``handshake.unsent_bytes``)."""

    def __init__(
        self, writer: StreamWriter, config_json: bytes | None, background: BackgroundWritev | None = None,
        unsent: Callable[[], int] | None = None,
    ) -> None:
        self.writer = writer
        self.background = background
        self.config_json = config_json
        self.unsent = unsent

    def begin(self, domain: DomainInfo, static: StaticInfo) -> None:
        self.writer.begin(self.config_json, domain.guest_type, domain.xen_version, static)

    def write_pages(self, pfns: PfnArray, types: npt.NDArray[np.uint32], data: memoryview) -> int:
        before = self.writer.bytes_written
        self.writer.write_pages(pfns, types, data)
        return self.writer.bytes_written - before

    def drain(self) -> None:
        """Until the receiver took everything written: out of the writer thread's queue, then out
        of the pipe or socket. The pipe to a receiver command holds 1 MiB
        (``handshake.STREAM_PIPE_BYTES``), half a second of a 16 Mbit/s link: still in it when
        the guest was asked to suspend, it was downtime (link-bench-20261207-132218)."""
        if self.background is not None:
            self.background.drain()
        if self.unsent is None:
            return
        left, changed = self.unsent(), time.monotonic()
        while left > 0 and time.monotonic() - changed < UNSENT_STALL_S:
            time.sleep(UNSENT_POLL_S)
            now_left = self.unsent()
            if now_left != left:
                left, changed = now_left, time.monotonic()

    def end(self, end_of_checkpoint: EndOfCheckpoint) -> None:
        self.writer.finish(end_of_checkpoint)
        self.drain()


FAILED_STREAM_FLUSH_S = 30.0
"""After a failure, how long the stream's writer thread may take to write what the driver had
already handed it, before the caller would close the connection."""


def _send(
    backend: MigrationBackend,
    writev: WritevFn,
    config_json: bytes | None,
    options: DriverOptions,
    log: Log,
    progress: Progress | None,
    unsent: Callable[[], int] | None = None,
) -> SendResult:
    """``send_domain`` into ``writev``, written from a thread; returns once all of it was written.

    On failure, what the driver had written still goes out first, as it did when each write
    went out at once: the receiver then fails at the same point of the stream (a stock
    ``xl migrate-receive`` cut off inside its headers was seen to leave its half-created
    domain behind). ``StreamLeftOpen`` if the thread did not finish in time: the caller must
    then not close the connection.
    """
    background = BackgroundWritev(writev)
    writer = StreamWriter(background)
    try:
        stats = send_domain(backend, XlStreamSink(writer, config_json, background, unsent), options, log,
                            progress)
    except BaseException as error:
        background.close()
        if not background.join(FAILED_STREAM_FLUSH_S):
            raise StreamLeftOpen(f"{error} (the stream's writer is still blocked on the receiver "
                                 f"after {FAILED_STREAM_FLUSH_S:g} s)") from error
        raise
    background.close()
    background.join()
    return SendResult(stats=stats, stream_bytes=writer.bytes_written)


class StreamLeftOpen(MigrationError):
    """The migration failed and its stream's writer thread may still write: the connection to
    the receiver must stay open (it is closed when the process exits)."""


@dataclass(frozen=True)
class SendResult:
    stats: MigrationStats
    stream_bytes: int
    """Every byte of the xl stream, headers included."""


def save_domain(
    backend: MigrationBackend,
    fd: int,
    config_json: bytes,
    options: DriverOptions,
    log: Log,
    progress: Progress | None = None,
) -> SendResult:
    """Write an ``xl restore``-able save file of the backend's domain to ``fd``.

    Returns with the domain suspended; on failure the domain is resumed and
    ``MigrationError`` raised. The caller destroys the domain, or resumes it to
    keep it running (``xl save -c``).
    """
    return _send(backend, lambda buffers: os.writev(fd, buffers), config_json, options, log, progress,
                 lambda: handshake.unsent_bytes(fd))


def save_libxc_stream(
    backend: MigrationBackend,
    fd: int,
    options: DriverOptions,
    log: Log,
    progress: Progress | None = None,
) -> SendResult:
    """Write the backend's domain to ``fd`` as a bare libxc stream: what ``xc_domain_save`` writes
    for libxl's save helper, between libxl's LIBXC_CONTEXT and its next record.

    Returns with the domain suspended. On failure the backend's ``resume()`` was called, as in
    ``save_domain``; under libxl that is the toolstack's to do (``softpage.savehelper``).
    """
    return _send(backend, lambda buffers: os.writev(fd, buffers), None, options, log, progress,
                 lambda: handshake.unsent_bytes(fd))


Rename = Callable[[str, str], None]
"""``rename(old_name, new_name)`` of the source domain (``libxl_domain_rename``: ``toolstack.rename``)."""


class ReceiverConnection(Protocol):
    """The receiver's two directions (``handshake.ReceiverProcess`` gives one)."""

    def read(self, max_bytes: int, timeout: float) -> bytes: ...

    def write(self, data: bytes) -> None: ...

    def writev(self, buffers: Sequence[Buffer]) -> int: ...

    def close_sending_side(self) -> None: ...


@dataclass(frozen=True)
class MigrateResult:
    send: SendResult
    handover: Handover
    downtime_s: float
    """From the suspend request to the receiver's report that its copy runs."""
    held_signals: tuple[signal.Signals, ...] = ()
    """Interrupting signals that arrived during the handover, which was finished first."""


def migrate_domain(
    backend: MigrationBackend,
    receiver: ReceiverConnection,
    config_json: bytes,
    domain_name: str,
    rename: Rename,
    options: DriverOptions,
    log: Log,
    progress: Progress | None = None,
    timeouts: HandshakeTimeouts | None = None,
    destroy_source: Callable[[], None] | None = None,
    unsent: Callable[[], int] | None = None,
) -> MigrateResult:
    """Migrate the backend's domain to an ``xl migrate-receive`` on ``receiver``.

    Follows ``migrate_domain`` of tools/xl/xl_migrate.c step by step; the
    failure cases are those of ``softpage.stream.handshake``. Returns only
    when the destination runs the guest, after ``destroy_source()`` (if given:
    else the caller destroys the source). Raises ``MigrationError`` otherwise:
    with the guest resumed on the source, except for ``HandoverOutcome.UNDEFINED``
    (the message says so), where xl too leaves everything as it is, and for a
    source that cannot be resumed (the message names ``softpage resume``).

    ``KeyboardInterrupt`` (which the CLI raises for SIGTERM and SIGHUP too) takes
    the failure path up to the handover: the source is renamed back and resumed,
    and the interrupt raised again. From the handover's GO message on, those
    signals are held until its outcome was acted on (the source destroyed, or
    resumed if the target gave the guest back): resuming while the target may
    unpause its copy could leave the guest running twice. The receiver's answers
    are bounded by ``timeouts``. ``unsent()``: what the connection still holds
    (``XlStreamSink.drain`` waits for it to empty before each harvest and the suspend).
    """
    timeouts = timeouts or HandshakeTimeouts()
    handshake.expect_banner(receiver.read, timeouts.banner)
    away_name = f"{domain_name}{MIGRATED_AWAY_SUFFIX}"
    streamed = False
    renamed = False
    try:
        sent = _send(backend, receiver.writev, config_json, options, log, progress, unsent)
        streamed = True
        handshake.expect_receiver_ready(receiver.read, timeouts.ready)
        sent.stats.mark_downtime("receiver_ready")
        log("migration sender: Target has acknowledged transfer.")
        # Not cut between the rename and the note that it happened: the rename back needs it.
        with held_signals() as arrived:
            rename(domain_name, away_name)
            renamed = True
        if arrived:
            raise KeyboardInterrupt(signal_names(arrived))
        sent.stats.mark_downtime("renamed")
    except StreamLeftOpen:
        # The driver resumed the source; the stream's writer may still write, so the
        # connection stays open.
        raise
    except BaseException as error:
        with held_signals():
            if streamed:
                _resume_source(backend, receiver, rename if renamed else None, away_name, domain_name, log)
            else:
                # The driver resumed the source unless the interrupt came after its last step.
                receiver.close_sending_side()
                _resume(backend, domain_name)
        if isinstance(error, KeyboardInterrupt):
            log(f"migration sender: interrupted; {domain_name!r} runs on the source")
            raise
        if streamed and isinstance(error, (SoftpageError, OSError)):
            raise MigrationError(f"migration failed, resumed at sender: {error}") from error
        raise
    stats = sent.stats
    log("migration sender: Giving target permission to start.")
    with held_signals() as arrived:
        handover = handshake.hand_over(receiver.read, receiver.write, timeouts)
        if handover.outcome is HandoverOutcome.DESTINATION_RUNNING:
            stats.mark_downtime("destination_running")
            requested_at = stats.suspend_requested_at
            if requested_at is None:
                requested_at = time.monotonic()
            downtime = time.monotonic() - requested_at
            log("migration sender: Target reports successful startup.")
            if destroy_source is not None:
                _destroy_source(destroy_source, away_name)
            return MigrateResult(sent, handover, downtime, tuple(arrived))
        if handover.outcome is HandoverOutcome.SOURCE_MAY_RESUME:
            _resume_source(backend, receiver, rename, away_name, domain_name, log)
            raise MigrationError(f"migration failed at the target: {handover.detail}; resumed at sender")
    raise MigrationError(
        f"{handover.detail}. Domain state is now undefined: the source is left suspended as "
        f"{away_name!r}; check the target before resuming or destroying anything "
        f"(`softpage resume {domain_name}` resumes the source unless a copy runs on this host)"
    )


def _destroy_source(destroy_source: Callable[[], None], away_name: str) -> None:
    try:
        destroy_source()
    except (SoftpageError, OSError) as error:
        raise MigrationError(f"the guest runs on the target, but destroying the source failed: {error}; "
                             f"`xl destroy {away_name}` removes it") from error


def _resume_source(
    backend: MigrationBackend,
    receiver: ReceiverConnection,
    rename: Rename | None,
    away_name: str,
    domain_name: str,
    log: Log,
) -> None:
    receiver.close_sending_side()
    if rename is not None:
        try:
            rename(away_name, domain_name)
        except (SoftpageError, OSError) as error:
            log(f"warning: could not rename {away_name!r} back to {domain_name!r}: {error}")
    log("migration sender: Trying to resume at our end.")
    _resume(backend, domain_name)
    log("migration sender: Resumed OK.")


def _resume(backend: MigrationBackend, domain_name: str) -> None:
    """``backend.resume()`` (a no-op for a running domain); ``MigrationError`` naming the command
    that brings the guest back if it fails."""
    try:
        backend.resume()
    except (SoftpageError, OSError) as error:
        raise MigrationError(f"could not resume {domain_name!r} on the source, which is left suspended: "
                             f"{error}; `softpage resume {domain_name}` retries") from error
