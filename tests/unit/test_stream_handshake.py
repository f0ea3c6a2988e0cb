"""The sender side of the xl migrate handshake against fake receivers."""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from softpage.backend import GuestType
from softpage.errors import MigrationError
from softpage.stream import handshake
from softpage.stream.handshake import (
    PERMISSION_TO_GO,
    RECEIVER_BANNER,
    RECEIVER_READY,
    STREAM_PIPE_BYTES,
    UNPAUSE_REPORT,
    FdChannel,
    HandoverOutcome,
    HandshakeTimeouts,
    ReceiverProcess,
    expect_banner,
    expect_receiver_ready,
    hand_over,
)
from softpage.stream.receiver import RestoreModel
from softpage.stream.writer import StreamWriter
from tests.unit.stream_builders import CONFIG, END, STATIC, fake_migrate_receive, page_of

TIMEOUTS = HandshakeTimeouts(banner=2.0, ready=5.0, report=2.0, permission_to_resume=2.0)
SRC = Path(__file__).resolve().parents[2] / "python" / "src"


class Scripted:
    """A receiver that replays ``chunks`` (bytes, or an exception to raise)."""

    def __init__(self, *chunks: bytes | BaseException) -> None:
        self.chunks = list(chunks)
        self.written = bytearray()
        self.fail_writes = False

    def read(self, max_bytes: int, timeout: float) -> bytes:
        if not self.chunks:
            return b""
        chunk = self.chunks.pop(0)
        if isinstance(chunk, BaseException):
            raise chunk
        if len(chunk) > max_bytes:
            self.chunks.insert(0, chunk[max_bytes:])
        return chunk[:max_bytes]

    def write(self, data: bytes) -> None:
        if self.fail_writes:
            raise BrokenPipeError(32, "Broken pipe")
        self.written += data


def test_messages_are_xl_h_strings_with_xl_migrate_c_lengths() -> None:
    # migrate_receive() writes the banner with sizeof()-1 and the rest with sizeof().
    assert RECEIVER_BANNER == b"xl migration receiver ready, send binary domain data.\n"
    assert RECEIVER_READY == b"domain received, ready to unpause" + b"\0"
    assert PERMISSION_TO_GO == b"domain is yours, you are cleared to unpause" + b"\0"
    assert UNPAUSE_REPORT == b"my copy unpause results are as follows" + b"\0"


def test_banner_and_ready_arrive_in_pieces() -> None:
    receiver = Scripted(*[RECEIVER_BANNER[i : i + 5] for i in range(0, len(RECEIVER_BANNER), 5)])
    expect_banner(receiver.read, 1.0)
    expect_receiver_ready(Scripted(RECEIVER_READY[:3], RECEIVER_READY[3:]).read, 1.0)


@pytest.mark.parametrize(
    ("chunks", "message"),
    [
        ((b"xl migration receiver ready, send binary domain DATA.\n",), "expected the receiver banner"),
        ((RECEIVER_BANNER[:10],), "got EOF after b'xl migrati'"),
        ((RECEIVER_BANNER[:10], TimeoutError()), r"within 1\.0 s, got b'xl migrati'"),
        ((ConnectionResetError(104, "reset"),), "reading the receiver banner from the receiver failed"),
    ],
)
def test_banner_failures_raise_migration_error(
    chunks: tuple[bytes | BaseException, ...], message: str
) -> None:
    with pytest.raises(MigrationError, match=message):
        expect_banner(Scripted(*chunks).read, 1.0)


def test_ready_without_its_nul_is_not_ready() -> None:
    with pytest.raises(MigrationError, match="got EOF"):
        expect_receiver_ready(Scripted(RECEIVER_READY[:-1]).read, 1.0)


def test_deadline_covers_the_whole_message_not_each_read() -> None:
    now = [0.0]

    def clock() -> float:
        return now[0]

    def slow_read(max_bytes: int, timeout: float) -> bytes:
        now[0] += 0.4
        return RECEIVER_READY[:1]

    with pytest.raises(MigrationError, match=r"within 1\.0 s"):
        expect_receiver_ready(slow_read, 1.0, clock)


def test_hand_over_success_sends_go_with_its_nul() -> None:
    receiver = Scripted(UNPAUSE_REPORT, b"\0")
    result = hand_over(receiver.read, receiver.write, TIMEOUTS)
    assert result.outcome is HandoverOutcome.DESTINATION_RUNNING
    assert result.status == 0
    assert bytes(receiver.written) == PERMISSION_TO_GO


def test_hand_over_target_failure_with_permission_lets_the_source_resume() -> None:
    receiver = Scripted(UNPAUSE_REPORT, bytes([256 - 3]), PERMISSION_TO_GO)
    result = hand_over(receiver.read, receiver.write, TIMEOUTS)
    assert result.outcome is HandoverOutcome.SOURCE_MAY_RESUME
    assert result.status == -3  # rc_buf = -rc, a signed char


@pytest.mark.parametrize(
    "chunks",
    [
        (),  # receiver died after GO
        (UNPAUSE_REPORT,),  # no status byte
        (b"my copy unpause results are as FOLLOWS\0", b"\0"),
        (UNPAUSE_REPORT, TimeoutError()),
        (UNPAUSE_REPORT, b"\x01"),  # failure, but no permission to resume
        (UNPAUSE_REPORT, b"\x01", PERMISSION_TO_GO[:-1]),
    ],
)
def test_hand_over_failures_after_go_are_undefined(chunks: tuple[bytes | BaseException, ...]) -> None:
    receiver = Scripted(*chunks)
    result = hand_over(receiver.read, receiver.write, TIMEOUTS)
    assert result.outcome is HandoverOutcome.UNDEFINED, result


def test_hand_over_with_a_broken_connection_is_undefined() -> None:
    receiver = Scripted(UNPAUSE_REPORT, b"\0")
    receiver.fail_writes = True
    result = hand_over(receiver.read, receiver.write, TIMEOUTS)
    assert result.outcome is HandoverOutcome.UNDEFINED
    assert "GO message" in result.detail


# -- a whole migration over a socket, against a fake xl migrate-receive ---------


def migrate_over_socket(
    status: int, write_stream: Callable[[StreamWriter], None]
) -> tuple[object, RestoreModel]:
    sender_end, receiver_end = socket.socketpair()
    model = RestoreModel()
    receiver = threading.Thread(target=fake_migrate_receive, args=(receiver_end, status, model))
    receiver.start()
    try:
        channel = FdChannel(sender_end.fileno(), sender_end.fileno())
        expect_banner(channel.read, TIMEOUTS.banner)
        write_stream(StreamWriter(channel.writev))
        expect_receiver_ready(channel.read, TIMEOUTS.ready)
        result: object = hand_over(channel.read, channel.write, TIMEOUTS)
    except MigrationError as error:
        result = error
    finally:
        sender_end.close()
        receiver.join(10)
    return result, model


def complete_stream(writer: StreamWriter) -> None:
    writer.begin(CONFIG, GuestType.PVH, (4, 17), STATIC)
    writer.add_page(1, 0, page_of(1))
    writer.add_page(2, 0xE000_0000)
    writer.finish(END)


def test_full_exchange_with_a_fake_receiver_succeeds() -> None:
    result, model = migrate_over_socket(0, complete_stream)
    assert isinstance(result, handshake.Handover)
    assert result.outcome is HandoverOutcome.DESTINATION_RUNNING
    assert model.page(1) == page_of(1) and model.is_populated(2)


def test_full_exchange_where_the_target_fails_to_unpause() -> None:
    result, _ = migrate_over_socket(5, complete_stream)
    assert isinstance(result, handshake.Handover)
    assert result.outcome is HandoverOutcome.SOURCE_MAY_RESUME and result.status == 5


def test_restore_failure_before_ready_is_a_migration_error() -> None:
    sender_end, receiver_end = socket.socketpair()
    model = RestoreModel()
    receiver = threading.Thread(target=fake_migrate_receive, args=(receiver_end, 0, model))
    receiver.start()
    channel = FdChannel(sender_end.fileno(), sender_end.fileno())
    expect_banner(channel.read, TIMEOUTS.banner)
    writer = StreamWriter(channel.writev)
    writer.begin(CONFIG, GuestType.PVH, (4, 17), STATIC)
    writer.add_page(1, 0, page_of(1))
    writer.flush()
    sender_end.shutdown(socket.SHUT_WR)  # the sender gives up mid-stream (cases 2 and 4)
    with pytest.raises(MigrationError, match="expected the ready message, got EOF"):
        expect_receiver_ready(channel.read, TIMEOUTS.ready)
    sender_end.close()
    receiver.join(10)


def test_channel_read_times_out() -> None:
    sender_end, receiver_end = socket.socketpair()
    try:
        channel = FdChannel(sender_end.fileno(), sender_end.fileno())
        with pytest.raises(MigrationError, match=r"within 0\.1 s"):
            expect_banner(channel.read, 0.1)
    finally:
        sender_end.close()
        receiver_end.close()


FAKE_RECEIVER_COMMAND = textwrap.dedent(
    """
    import os, sys
    from softpage.stream.handshake import RECEIVER_BANNER, RECEIVER_READY, PERMISSION_TO_GO, UNPAUSE_REPORT
    from softpage.stream.reader import read_records
    from softpage.stream.receiver import RestoreModel
    out = sys.stdout.buffer
    out.write(RECEIVER_BANNER); out.flush()
    model = RestoreModel()
    model.apply_all(read_records(sys.stdin.buffer.read))
    model.complete()
    out.write(RECEIVER_READY); out.flush()
    assert sys.stdin.buffer.read(len(PERMISSION_TO_GO)) == PERMISSION_TO_GO
    out.write(UNPAUSE_REPORT + b"\\0"); out.flush()
    sys.exit(0 if model.page(1) is not None else 3)
    """
)


def test_receiver_process_runs_a_command_like_xl_migrate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    with ReceiverProcess([sys.executable, "-c", FAKE_RECEIVER_COMMAND]) as receiver:
        channel = receiver.channel
        expect_banner(channel.read, 10.0)
        complete_stream(StreamWriter(channel.writev))
        expect_receiver_ready(channel.read, 10.0)
        result = hand_over(channel.read, channel.write, TIMEOUTS)
        assert result.outcome is HandoverOutcome.DESTINATION_RUNNING
        assert receiver.close() == 0  # the fake exits 3 if page 1 did not arrive


def test_the_stream_pipe_to_the_receiver_command_is_enlarged() -> None:
    with ReceiverProcess(["cat"]) as receiver:
        size = fcntl.fcntl(receiver.channel.send_fd, fcntl.F_GETPIPE_SZ)
    assert size == STREAM_PIPE_BYTES


def test_receiver_process_that_cannot_start_is_a_migration_error() -> None:
    with pytest.raises(MigrationError, match="could not start"):
        ReceiverProcess(["/nonexistent/xl", "migrate-receive"])
