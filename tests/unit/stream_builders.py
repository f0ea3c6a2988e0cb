"""Helpers the stream unit tests share: a byte-collecting sink, a small
complete PVH stream and a fake ``xl migrate-receive``."""

from __future__ import annotations

import socket
from collections.abc import Sequence

import numpy as np

from softpage.abi import PAGE_SIZE
from softpage.backend import EndOfCheckpoint, GuestType, StaticInfo, TscInfo
from softpage.stream.handshake import PERMISSION_TO_GO, RECEIVER_BANNER, RECEIVER_READY, UNPAUSE_REPORT
from softpage.stream.reader import read_records
from softpage.stream.receiver import RestoreModel
from softpage.stream.writer import StreamWriter

NOTAB = 0x0000_0000
XALLOC = 0xE000_0000
XTAB = 0xF000_0000
BROKEN = 0xD000_0000
STATIC = StaticInfo(cpuid_policy=bytes(range(48)), msr_policy=bytes(range(32)))
TSC = TscInfo(mode=0, khz=2_000_000, nsec=123, incarnation=1)
END = EndOfCheckpoint(TSC, b"hvm-context-blob", ((1, 2), (5, 6)))
CONFIG = b'{"c_info":{"type":"pvh","name":"guest"}}'


class ByteSink:
    """writev-shaped; optionally accepts at most ``limit`` bytes per call."""

    def __init__(self, limit: int | None = None) -> None:
        self.buffer = bytearray()
        self.limit = limit
        self.calls = 0
        self.most_buffers = 0

    def writev(self, buffers: Sequence[object]) -> int:
        self.calls += 1
        self.most_buffers = max(self.most_buffers, len(buffers))
        room = self.limit if self.limit is not None else 1 << 62
        written = 0
        for buffer in buffers:
            view = memoryview(buffer).cast("B")  # type: ignore[arg-type]
            take = view[: room - written]
            self.buffer += take
            written += len(take)
            if written == room:
                break
        return written


def page_of(pfn: int, generation: int = 0) -> bytes:
    """A page whose content names its pfn and generation."""
    return (pfn.to_bytes(8, "little") + generation.to_bytes(8, "little")) * (PAGE_SIZE // 16)


Entry = tuple[int, int, "bytes | None"]


def build_stream(batches: Sequence[Sequence[Entry]], sink: ByteSink | None = None) -> bytes:
    """A complete xl stream whose memory is ``batches`` of (pfn, type, data)."""
    sink = sink or ByteSink()
    writer = StreamWriter(sink.writev)
    writer.begin(CONFIG, GuestType.PVH, (4, 17), STATIC)
    for batch in batches:
        pfns = np.array([pfn for pfn, _, _ in batch], dtype=np.uint64)
        types = np.array([page_type for _, page_type, _ in batch], dtype=np.uint32)
        data = b"".join(content for _, _, content in batch if content is not None)
        writer.write_pages(pfns, types, data)
    writer.finish(END)
    return bytes(sink.buffer)


def fake_migrate_receive(connection: socket.socket, status: int, model: RestoreModel) -> None:
    """migrate_receive() of xl_migrate.c, with RestoreModel as create_domain()."""
    reader_file = connection.makefile("rb")
    connection.sendall(RECEIVER_BANNER)
    try:
        model.apply_all(read_records(reader_file.read))
        model.complete()
    except Exception:
        connection.close()  # create_domain failed: xl exits without a word
        return
    try:
        connection.sendall(RECEIVER_READY)
        if reader_file.read(len(PERMISSION_TO_GO)) != PERMISSION_TO_GO:
            return
        connection.sendall(UNPAUSE_REPORT + bytes([status & 0xFF]))
        if status:
            connection.sendall(PERMISSION_TO_GO)
    except OSError:
        return  # the sender is gone: xl dies of SIGPIPE
    finally:
        connection.close()
