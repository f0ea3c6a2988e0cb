"""softpage.stream.background.BackgroundWritev: writes in order from a thread, copies what it is
given, stays within its bound, and reports a receiver that went away."""

from __future__ import annotations

import errno
import threading
from collections.abc import Sequence

import pytest

from softpage.stream.background import BackgroundWritev


class SlowReceiver:
    """A ``writev`` that takes at most ``chunk`` bytes per call and blocks until released."""

    def __init__(self, chunk: int = 3) -> None:
        self.chunk = chunk
        self.received = bytearray()
        self.release = threading.Event()
        self.release.set()

    def __call__(self, buffers: Sequence[bytes]) -> int:
        self.release.wait(timeout=10)
        taken = bytes(memoryview(buffers[0])[: self.chunk])
        self.received += taken
        return len(taken)


def test_everything_arrives_in_order_through_short_writes() -> None:
    receiver = SlowReceiver(chunk=3)
    background = BackgroundWritev(receiver)
    records = [bytes([n]) * (n + 1) for n in range(40)]
    for record in records:
        assert background([record[:1], record[1:]]) == len(record)
    background.drain()
    background.close()
    assert bytes(receiver.received) == b"".join(records)


def test_the_caller_may_reuse_its_buffer_at_once() -> None:
    receiver = SlowReceiver(chunk=1 << 20)
    receiver.release.clear()
    background = BackgroundWritev(receiver)
    page = bytearray(b"a" * 4096)
    background([memoryview(page)])
    page[:] = b"b" * 4096  # the foreign mapping is gone at the next read
    receiver.release.set()
    background.drain()
    assert bytes(receiver.received) == b"a" * 4096


def test_the_sender_waits_when_the_receiver_is_the_bound_behind() -> None:
    receiver = SlowReceiver(chunk=1 << 20)
    receiver.release.clear()
    background = BackgroundWritev(receiver, max_queued_bytes=10)
    background([b"x" * 6])  # taken by the thread, which now waits for the receiver
    second = threading.Thread(target=background, args=([b"y" * 6],))
    second.start()
    second.join(timeout=0.3)
    third_done = threading.Event()

    def third() -> None:
        background([b"z" * 6])
        third_done.set()

    thread = threading.Thread(target=third)
    thread.start()
    # 6 queued + 6 waiting would pass 10: the third write must wait for the receiver.
    assert not third_done.wait(timeout=0.3)
    assert background.queued_bytes <= 12
    receiver.release.set()
    thread.join(timeout=10)
    second.join(timeout=10)
    background.drain()
    assert sorted(bytes(receiver.received)) == sorted(b"x" * 6 + b"y" * 6 + b"z" * 6)
    assert bytes(receiver.received[:6]) == b"x" * 6


def test_a_record_larger_than_the_bound_goes_out_alone() -> None:
    receiver = SlowReceiver(chunk=1 << 20)
    background = BackgroundWritev(receiver, max_queued_bytes=4)
    background([b"0123456789"])
    background.drain()
    assert bytes(receiver.received) == b"0123456789"


def test_a_receiver_that_went_away_fails_the_next_write_and_the_drain() -> None:
    def broken(buffers: Sequence[bytes]) -> int:
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    background = BackgroundWritev(broken)
    background([b"record"])
    with pytest.raises(OSError) as drained:
        background.drain()
    assert drained.value.errno == errno.EPIPE and "stream writer" in str(drained.value)
    with pytest.raises(OSError) as written:
        background([b"next"])
    assert written.value.errno == errno.EPIPE


def test_a_writev_that_takes_nothing_is_an_error() -> None:
    background = BackgroundWritev(lambda buffers: 0)
    background([b"record"])
    with pytest.raises(OSError) as drained:
        background.drain()
    assert drained.value.errno == errno.EIO


def test_writing_after_close_is_refused() -> None:
    background = BackgroundWritev(SlowReceiver())
    background.close()
    background.close()
    with pytest.raises(OSError):
        background([b"late"])


def test_the_bound_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_queued_bytes"):
        BackgroundWritev(SlowReceiver(), max_queued_bytes=0)


def test_join_says_whether_the_thread_ended() -> None:
    receiver = SlowReceiver(chunk=1 << 20)
    receiver.release.clear()
    background = BackgroundWritev(receiver)
    background([b"stuck"])
    background.close()
    assert not background.join(timeout=0.2)
    receiver.release.set()
    assert background.join(timeout=10)
    assert bytes(receiver.received) == b"stuck"
