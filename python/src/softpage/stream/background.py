"""BackgroundWritev: a ``WritevFn`` that hands its buffers to a writer thread and returns.

The stock receiver reads one record, then populates, maps and copies it before it reads the
next (``process_page_data`` in tools/libs/guest/xg_sr_restore.c). A sender that writes in its
own thread waits for every record: at 0 MB user allocation that wait was 11-13 s of a 19-22 s
first round (bench-20261201-092101, ``write_s``), while the sender's own page types, reads and
batching (about 8 s) had to wait their turn. With the writes in a thread the two overlap.

Each call copies its buffers into one ``bytes`` object: the caller's page data is a view of a
foreign mapping that dies at its next read (``MigrationBackend.read_pages``). The copy is what
lets the sender run ahead; ``max_queued_bytes`` bounds how far. ``drain()`` waits until the
receiver has taken everything (the driver calls it before it suspends the guest, so that none of
the backlog becomes downtime). A write error (the receiver went away) is raised by the next call
or by ``drain()``, as ``OSError`` with the same errno.

Whoever owns the file descriptor behind ``writev`` must not close it before ``join()`` returned
True: the thread would write to whatever file gets that descriptor number next.
"""

from __future__ import annotations

import collections
import errno
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from softpage.stream.writer import WritevFn, write_all

if TYPE_CHECKING:
    from typing_extensions import Buffer

DEFAULT_MAX_QUEUED_BYTES = 64 << 20
"""How far the sender may run ahead of the receiver: 16 PAGE_DATA records of 1024 pages with data, or
several seconds of the stock receiver's populating at 0 MB (XALLOC entries are 8 bytes each)."""


class BackgroundWritev:
    """Use as ``StreamWriter(BackgroundWritev(receiver.writev))``; ``close()`` when done."""

    def __init__(self, writev: WritevFn, max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES) -> None:
        if max_queued_bytes <= 0:
            raise ValueError(f"max_queued_bytes: expected > 0, got {max_queued_bytes}")
        self._writev = writev
        self._max_queued_bytes = max_queued_bytes
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued_bytes = 0
        self._error: OSError | None = None
        self._closing = False
        self._changed = threading.Condition()
        # A daemon: a receiver that stops reading must not keep the process alive after the
        # sender gave up on it (the sender then leaves the connection open: StreamLeftOpen).
        self._thread = threading.Thread(target=self._write_queued, name="stream-writer", daemon=True)
        self._thread.start()

    def __call__(self, buffers: Sequence[Buffer]) -> int:
        record = b"".join(buffers)
        if not record:
            return 0
        with self._changed:
            self._raise_if_failed()
            if self._closing:
                raise OSError(errno.EPIPE, "stream writer: written to after close()")
            # One record larger than the bound still goes out, alone.
            while self._queue and self._queued_bytes + len(record) > self._max_queued_bytes:
                self._changed.wait()
                self._raise_if_failed()
            self._queue.append(record)
            self._queued_bytes += len(record)
            self._changed.notify_all()
        return len(record)

    def drain(self) -> None:
        """Return once every byte offered so far was written; raise the write error if one failed."""
        with self._changed:
            while self._queue and self._error is None:
                self._changed.wait()
            self._raise_if_failed()

    def close(self) -> None:
        """Stop the thread once the queue is written (or a write failed). Idempotent; does not
        wait for a receiver that stopped reading, and raises nothing: ``drain()`` reports errors."""
        with self._changed:
            self._closing = True
            self._changed.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """After ``close()``: wait up to ``timeout`` seconds (None: for ever) for the thread to
        end, that is, for the queue to be written or a write to fail. True if it ended: only
        then may the file descriptor behind ``writev`` be closed."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def queued_bytes(self) -> int:
        with self._changed:
            return self._queued_bytes

    def _raise_if_failed(self) -> None:
        error = self._error
        if error is not None:
            raise OSError(error.errno, f"stream writer: {error.strerror or error}") from error

    def _write_queued(self) -> None:
        while True:
            with self._changed:
                while not self._queue and not self._closing:
                    self._changed.wait()
                if not self._queue:
                    return
                record = self._queue[0]
            try:
                write_all(self._writev, [record])
            except OSError as error:
                with self._changed:
                    self._error = error
                    self._changed.notify_all()
                return
            with self._changed:
                self._queue.popleft()
                self._queued_bytes -= len(record)
                self._changed.notify_all()
