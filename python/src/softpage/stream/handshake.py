"""The sender side of the ``xl migrate`` protocol, as Xen 4.17 speaks it.

Source: tools/xl/xl.h (the messages) and tools/xl/xl_migrate.c
(``migrate_domain`` on the sender, ``migrate_receive`` on the receiver), both
unchanged from RELEASE-4.17.5 to RELEASE-4.17.7. The exchange, on one
connection (``xl migrate`` runs ``ssh HOST xl migrate-receive`` and talks to
its stdin/stdout)::

    receiver -> sender   RECEIVER_BANNER        written with sizeof()-1: no NUL
    sender -> receiver   xl save-file header + config, then the libxl stream
    receiver -> sender   RECEIVER_READY         sizeof(): with its NUL
    sender -> receiver   PERMISSION_TO_GO       with its NUL
    receiver -> sender   UNPAUSE_REPORT         with its NUL
    receiver -> sender   one status byte: 0 = "domain is running"; else -rc
    only if status != 0:
    receiver -> sender   PERMISSION_TO_GO       "permission to sender to have
                                                domain back", after destroying
                                                its copy

What the sender must do on each failure so the guest stays on the source
(``migrate_domain``'s labels ``failed_suspend``, ``failed_resume``,
``failed_badly``):

1. No banner (EOF, wrong bytes, timeout): nothing was sent. Close the
   connection and give up; the guest was never suspended.
2. The stream fails before the guest is suspended: close the sending side
   (the receiver's restore sees EOF, fails and exits without a domain), turn
   log-dirty off; the guest never stopped running.
3. The guest does not suspend in time (xl: ``ERROR_GUEST_TIMEDOUT`` ->
   ``failed_suspend``): xl closes the connection and does not resume;
   softpage's driver calls ``backend.resume()``, which is a no-op for a
   domain that is still running and undoes a late suspend.
4. Any failure after the suspend and up to and including RECEIVER_READY (the
   final stream, EOF, wrong bytes, timeout): close the sending side and
   resume the source (``libxl_domain_resume(suspend_cancel=1)``, our
   ``backend.resume()``). Safe: the receiver never unpauses without GO.
   :func:`expect_receiver_ready` raises ``MigrationError`` for these.
5. Between READY and GO, xl renames the source to ``NAME--migratedaway``;
   if that fails it still resumes (as 4).
6. GO is the point of no return. If writing it fails, or the report or
   status does not arrive intact, the receiver may or may not have unpaused
   its copy: xl prints "Domain state is now undefined", leaves the source
   suspended and renamed, and neither resumes nor destroys anything.
   :func:`hand_over` returns ``Handover(UNDEFINED)`` for all of these; the
   caller must do the same (report loudly, touch nothing).
7. Status 0: the destination runs the guest; destroy the source.
8. Status != 0: the receiver destroys its copy and then sends
   PERMISSION_TO_GO back. Only once that arrives may the sender rename the
   source back and resume it (``SOURCE_MAY_RESUME``); without it, the state
   is UNDEFINED as in 6.

xl itself blocks without timeouts; this module adds them. A timeout before
GO is case 4; a timeout after GO is UNDEFINED, never "resume".
"""

from __future__ import annotations

import array
import contextlib
import enum
import fcntl
import os
import select
import stat
import subprocess
import termios
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from softpage.errors import MigrationError

if TYPE_CHECKING:
    from typing_extensions import Buffer

RECEIVER_BANNER = b"xl migration receiver ready, send binary domain data.\n"
"""``migrate_receiver_banner``; sent as ``sizeof - 1`` bytes (no NUL)."""
RECEIVER_READY = b"domain received, ready to unpause\0"
"""``migrate_receiver_ready``; sent as ``sizeof`` bytes (NUL included)."""
PERMISSION_TO_GO = b"domain is yours, you are cleared to unpause\0"
"""``migrate_permission_to_go``; both directions, NUL included."""
UNPAUSE_REPORT = b"my copy unpause results are as follows\0"
"""``migrate_report``; NUL included, followed by one status byte."""

ReadFn = Callable[[int, float], bytes]
"""``read(max_bytes, timeout)``: up to ``max_bytes`` from the receiver,
waiting at most ``timeout`` seconds; ``b""`` at EOF; ``TimeoutError`` if
nothing arrived in time; ``OSError`` for anything else."""
WriteFn = Callable[[bytes], None]
"""``write(data)``: all of ``data`` to the receiver, or ``OSError``."""
Clock = Callable[[], float]


@dataclass(frozen=True)
class HandshakeTimeouts:
    """Seconds to wait for each receiver message."""

    banner: float = 30.0
    ready: float = 300.0
    """After the stream's END the receiver completes the restore and, for
    HVM, starts the device model before answering."""
    report: float = 120.0
    permission_to_resume: float = 120.0


class HandoverOutcome(enum.Enum):
    DESTINATION_RUNNING = "destination-running"
    """Status 0: destroy the source domain."""
    SOURCE_MAY_RESUME = "source-may-resume"
    """The receiver failed to start its copy, destroyed it and gave the
    domain back: rename back and resume the source."""
    UNDEFINED = "undefined"
    """GO was (perhaps) sent and then the exchange broke: the destination may
    be running the guest. Do not resume and do not destroy the source."""


@dataclass(frozen=True)
class Handover:
    outcome: HandoverOutcome
    status: int | None
    """The receiver's status byte as xl prints it (a signed char, ``-rc``)."""
    detail: str


def expect_banner(read: ReadFn, timeout: float, clock: Clock = time.monotonic) -> None:
    """Wait for the receiver's banner. ``MigrationError``: give up (case 1)."""
    _expect_message(read, RECEIVER_BANNER, "the receiver banner", timeout, clock)


def expect_receiver_ready(read: ReadFn, timeout: float, clock: Clock = time.monotonic) -> None:
    """After the whole stream: wait for "domain received, ready to unpause".
    ``MigrationError``: close the connection and resume the source (case 4)."""
    _expect_message(read, RECEIVER_READY, "the ready message", timeout, clock)


def hand_over(
    read: ReadFn,
    write: WriteFn,
    timeouts: HandshakeTimeouts,
    clock: Clock = time.monotonic,
) -> Handover:
    """Send GO and learn how the receiver's unpause went (cases 6-8).

    Never raises for a receiver-side problem: after GO every failure is an
    outcome the caller must act on, not an exception that might be mistaken
    for "the guest is still on the source".
    """
    try:
        write(PERMISSION_TO_GO)
    except OSError as error:
        return Handover(HandoverOutcome.UNDEFINED, None, f"writing the GO message failed: {error}")
    try:
        _expect_message(read, UNPAUSE_REPORT, "the unpause report", timeouts.report, clock)
        status_byte = _read_exactly(read, 1, "the unpause status", timeouts.report, clock)
        status = int.from_bytes(status_byte, "little", signed=True)
    except MigrationError as error:
        return Handover(HandoverOutcome.UNDEFINED, None, f"after GO: {error}")
    if status == 0:
        return Handover(HandoverOutcome.DESTINATION_RUNNING, 0, "target reports successful startup")
    try:
        what = "permission for the sender to resume"
        _expect_message(read, PERMISSION_TO_GO, what, timeouts.permission_to_resume, clock)
    except MigrationError as error:
        detail = f"target reports startup failure ({status}); {error}"
        return Handover(HandoverOutcome.UNDEFINED, status, detail)
    return Handover(
        HandoverOutcome.SOURCE_MAY_RESUME,
        status,
        f"target reports startup failure (status code {status}) and gave the domain back",
    )


# -- transports -----------------------------------------------------------------


def unsent_bytes(fd: int) -> int:
    """What was written to ``fd`` and its reader has not taken yet: a pipe's content (FIONREAD,
    which Linux answers on either end), a socket's send queue (TIOCOUTQ); 0 for a file."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISFIFO(mode):
        request = termios.FIONREAD
    elif stat.S_ISSOCK(mode):
        request = termios.TIOCOUTQ
    else:
        return 0
    count = array.array("i", [0])
    fcntl.ioctl(fd, request, count, True)
    return count[0]


class FdChannel:
    """The two ends of a receiver connection: ``send_fd`` carries the stream
    and GO, ``recv_fd`` the receiver's messages (xl's ``send_fd``/``recv_fd``).

    ``read``/``write`` fit ``ReadFn``/``WriteFn``; ``writev`` fits
    ``StreamWriter``. The fds stay owned by the caller.
    """

    def __init__(self, send_fd: int, recv_fd: int) -> None:
        self.send_fd = send_fd
        self.recv_fd = recv_fd

    def read(self, max_bytes: int, timeout: float) -> bytes:
        readable, _, _ = select.select([self.recv_fd], [], [], max(timeout, 0.0))
        if not readable:
            raise TimeoutError(f"nothing from the receiver within {timeout:.1f} s")
        return os.read(self.recv_fd, max_bytes)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while len(view):
            view = view[os.write(self.send_fd, view) :]

    def writev(self, buffers: Sequence[Buffer]) -> int:
        return os.writev(self.send_fd, buffers)

    def unsent_bytes(self) -> int:
        return unsent_bytes(self.send_fd)


STREAM_PIPE_BYTES = 1 << 20
"""Capacity asked for the pipe that carries the stream to the receiver command (``F_SETPIPE_SZ``,
as CRIU does for its page pipes): with Linux's default 64 KiB the sender blocks and the reader
wakes 256 times per 16 MiB batch, each a context switch, which a PV dom0 pays in hypercalls;
1 MiB is also the unprivileged limit (/proc/sys/fs/pipe-max-size)."""


class ReceiverProcess:
    """A receiver reached through a command, as ``xl migrate`` does with
    ``ssh HOST xl migrate-receive``: its stdin gets the stream, its stdout
    carries the messages back. Use as a context manager."""

    def __init__(self, argv: Sequence[str]) -> None:
        try:
            self._process = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        except OSError as error:
            raise MigrationError(f"could not start the migration receiver {list(argv)}: {error}") from error
        assert self._process.stdin is not None and self._process.stdout is not None
        # Refused over a lowered pipe-max-size or the user's pipe quota: the default pipe works too.
        with contextlib.suppress(OSError):
            fcntl.fcntl(self._process.stdin.fileno(), fcntl.F_SETPIPE_SZ, STREAM_PIPE_BYTES)
        self.channel = FdChannel(self._process.stdin.fileno(), self._process.stdout.fileno())

    def close_sending_side(self) -> None:
        """EOF for the receiver: what xl does before resuming (cases 2-4)."""
        if self._process.stdin is not None and not self._process.stdin.closed:
            self._process.stdin.close()

    def close(self, timeout: float = 2.0) -> int | None:
        """Close both ends and reap the command (xl waits 2 s for it too);
        returns its exit status, or None if it had to be killed."""
        self.close_sending_side()
        if self._process.stdout is not None:
            self._process.stdout.close()
        try:
            return self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
            return None

    def __enter__(self) -> ReceiverProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- internals --------------------------------------------------------------------


def _expect_message(read: ReadFn, expected: bytes, what: str, timeout: float, clock: Clock) -> None:
    received = _read_exactly(read, len(expected), what, timeout, clock)
    if received != expected:
        raise MigrationError(f"expected {what} {expected!r} from the receiver, got {received!r}")


def _read_exactly(read: ReadFn, size: int, what: str, timeout: float, clock: Clock) -> bytes:
    deadline = clock() + timeout
    received = bytearray()
    while len(received) < size:
        remaining = deadline - clock()
        timed_out = f"expected {what} within {timeout:.1f} s, got {bytes(received)!r} before the timeout"
        if remaining <= 0:
            raise MigrationError(timed_out)
        try:
            chunk = read(size - len(received), remaining)
        except TimeoutError:
            raise MigrationError(timed_out) from None
        except OSError as error:
            raise MigrationError(f"reading {what} from the receiver failed: {error}") from error
        if not chunk:
            raise MigrationError(f"expected {what}, got EOF after {bytes(received)!r}")
        received += chunk
    return bytes(received)
