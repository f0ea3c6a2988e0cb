"""Runs in dom0 between a migration sender and `xl migrate-receive`: copies stdin to stdout and
counts what the stream carries (the same for stock xl and softpage), then writes a JSON summary.

    tap.py SUMMARY.json      (stdin: the sender's stream; stdout: the receiver)

Beside the counts, on this dom0's ``time.monotonic()`` clock (the one measure.py and
clock_offset.py use): ``end_at``, when the chunk that completed the stream's END record was read,
and ``timeline``, a sample at most every SAMPLE_S seconds of [moment, bytes read, seconds spent
so far waiting for the receiver to take what was read, pages with data read]. A stream that
arrives late because the receiver was slow shows as waits here; one that arrives late because of
the link does not. The bench reads off the timeline what reached this host after the sender's
suspend request, for stock xl as for softpage (whose rounds the stream does not mark).
"""

from __future__ import annotations

import json
import os
import sys
import time

from softpage.stream.reader import PageData, StreamFeeder
from softpage.stream.records import PageType

CHUNK = 1 << 20
SAMPLE_S = 0.05
"""At 2 MB/s (16 Mbit/s) a sample's bytes are 100 KB, about 25 pages: the error of a count read
off the timeline between two samples. Stock's 2 GiB migration at that rate writes about 30,000."""


def main() -> int:
    counts = {"page_records": 0, "pages_data": 0, "pages_xalloc": 0, "xtab": 0}
    timeline: list[list[float]] = []
    end_at: float | None = None
    receiver_wait_s = 0.0

    def on_record(record: object) -> None:
        if isinstance(record, PageData):
            types = record.stream_types()
            counts["page_records"] += 1
            counts["pages_data"] += int(record.data_mask().sum())
            counts["pages_xalloc"] += int((types == PageType.XALLOC).sum())
            counts["xtab"] += int((types == PageType.XTAB).sum())

    feeder = StreamFeeder(on_record)
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    stream_bytes = 0
    try:
        while chunk := os.read(stdin, CHUNK):
            read_at = time.monotonic()
            stream_bytes += len(chunk)
            view = memoryview(chunk)
            while len(view):
                view = view[os.write(stdout, view):]
            receiver_wait_s += time.monotonic() - read_at
            if not feeder.done:
                feeder.feed(chunk)
                if feeder.done:
                    end_at = read_at
            if not timeline or read_at - timeline[-1][0] >= SAMPLE_S:
                timeline.append([read_at, stream_bytes, receiver_wait_s, counts["pages_data"]])
    finally:
        timeline.append([time.monotonic(), stream_bytes, receiver_wait_s, counts["pages_data"]])
        with open(sys.argv[1], "w", encoding="utf-8") as summary:
            json.dump({"stream_bytes": stream_bytes, **counts, "end_at": end_at, "timeline": timeline},
                      summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
