"""Runs in dom0 between a migration sender and `xl migrate-receive`: copies stdin to stdout and
counts what the stream carries (the same for stock xl and softpage), then writes a JSON summary.

    tap.py SUMMARY.json [PFNS.txt]   (stdin: the sender's stream; stdout: the receiver)

Beside the counts, on this dom0's ``time.monotonic()`` clock (the one measure.py and
clock_offset.py use): ``end_at``, when the chunk that completed the stream's END record was read,
and ``timeline``, samples of [moment, bytes read, seconds spent so far waiting for the receiver
to take what was read, pages with data read] (``Timeline``). A stream that arrives late because
the receiver was slow shows as waits here; one that arrives late because of the link does not.
The bench reads off the timeline what reached this host after the sender's suspend request, for
stock xl as for softpage (whose rounds the stream does not mark). A page counts when its record
is complete. With PFNS.txt, one line for each PAGE_DATA record with data: the moment its chunk was
read and the PFNs it carried data for (scan_probe classifies those of the final round).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import TextIO

from softpage.stream.reader import PageData, StreamFeeder
from softpage.stream.records import PageType

CHUNK = 1 << 20
SAMPLE_S = 0.05
"""At 2 MB/s (16 Mbit/s) a sample's bytes are 100 KB, about 25 pages: the error of a count read
off the timeline between two samples. Stock's 2 GiB migration at that rate writes about 30,000."""


class Timeline:
    """The samples read off later by interpolating between two neighbours, so that a value in
    between is only ever a stretch of steady reading: a read is sampled when SAMPLE_S passed since
    the last sample; the read before a pause of SAMPLE_S or more is sampled too, so that what came
    before the pause is not spread over it; so is the read that completed the stream's END."""

    def __init__(self) -> None:
        self.samples: list[list[float]] = []
        self._last: list[float] | None = None

    def read(self, sample: list[float], end: bool = False) -> None:
        """``sample``: [moment, cumulative values...] after a read."""
        last = self._last
        if last is not None and sample[0] - last[0] >= SAMPLE_S and self.samples[-1] is not last:
            self.samples.append(last)
        if not self.samples or sample[0] - self.samples[-1][0] >= SAMPLE_S or end:
            self.samples.append(sample)
        self._last = sample

    def close(self, sample: list[float]) -> list[list[float]]:
        """The samples, with the last read's and then ``sample`` (the end of the copy) after them."""
        if self._last is not None and self.samples[-1] is not self._last:
            self.samples.append(self._last)
        self.samples.append(sample)
        return self.samples


def tap(summary_path: str, pfns_out: TextIO | None) -> int:
    counts = {"page_records": 0, "pages_data": 0, "pages_xalloc": 0, "xtab": 0}
    timeline = Timeline()
    end_at: float | None = None
    receiver_wait_s = 0.0
    read_at = 0.0

    def on_record(record: object) -> None:
        if isinstance(record, PageData):
            types = record.stream_types()
            mask = record.data_mask()
            counts["page_records"] += 1
            counts["pages_data"] += int(mask.sum())
            counts["pages_xalloc"] += int((types == PageType.XALLOC).sum())
            counts["xtab"] += int((types == PageType.XTAB).sum())
            if pfns_out is not None and mask.any():
                pfns_out.write(f"{read_at!r} {' '.join(map(str, record.pfns[mask].tolist()))}\n")

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
            ended = False
            if not feeder.done:
                feeder.feed(chunk)
                if feeder.done:
                    end_at, ended = read_at, True
            timeline.read([read_at, stream_bytes, receiver_wait_s, counts["pages_data"]], end=ended)
    finally:
        samples = timeline.close([time.monotonic(), stream_bytes, receiver_wait_s, counts["pages_data"]])
        with open(summary_path, "w", encoding="utf-8") as summary:
            json.dump({"stream_bytes": stream_bytes, **counts, "end_at": end_at, "timeline": samples},
                      summary)
    return 0


def main() -> int:
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w", encoding="ascii") as pfns_out:
            return tap(sys.argv[1], pfns_out)
    return tap(sys.argv[1], None)


if __name__ == "__main__":
    sys.exit(main())
