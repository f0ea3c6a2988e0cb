"""The sink's drain waits until the receiver took what the connection holds."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import pytest

from softpage import sender
from softpage.sender import XlStreamSink
from softpage.stream.handshake import unsent_bytes
from softpage.stream.writer import StreamWriter


def test_unsent_bytes_of_a_pipe_a_socket_and_a_file(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, b"x" * 1000)
    assert unsent_bytes(write_end) == 1000
    os.read(read_end, 400)
    assert unsent_bytes(write_end) == 600
    mine, theirs = socket.socketpair()
    mine.send(b"y" * 500)
    assert unsent_bytes(mine.fileno()) > 0
    theirs.recv(500)
    assert unsent_bytes(mine.fileno()) == 0
    with open(tmp_path / "save", "wb") as save:
        save.write(b"z" * 100)
        assert unsent_bytes(save.fileno()) == 0
    for fd in (read_end, write_end):
        os.close(fd)
    mine.close()
    theirs.close()


def test_drain_returns_once_the_reader_took_the_pipe(monkeypatch: pytest.MonkeyPatch) -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, b"x" * 3000)
    sink = XlStreamSink(StreamWriter(lambda buffers: 0), None, unsent=lambda: unsent_bytes(write_end))

    def reader() -> None:
        for _ in range(3):
            time.sleep(0.1)
            os.read(read_end, 1000)

    thread = threading.Thread(target=reader)
    started = time.monotonic()
    thread.start()
    sink.drain()
    assert time.monotonic() - started >= 0.29 and unsent_bytes(write_end) == 0
    thread.join()
    # a reader that stopped taking: drain gives up once nothing moved for UNSENT_STALL_S
    monkeypatch.setattr(sender, "UNSENT_STALL_S", 0.2)
    os.write(write_end, b"x" * 10)
    started = time.monotonic()
    sink.drain()
    assert 0.2 <= time.monotonic() - started < 2.0 and unsent_bytes(write_end) == 10
    os.close(read_end)
    os.close(write_end)
