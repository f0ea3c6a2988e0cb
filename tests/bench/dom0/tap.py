"""Runs in dom0 between a migration sender and `xl migrate-receive`: copies stdin to stdout and
counts what the stream carries (the same for stock xl and softpage), then writes a JSON summary.

    tap.py SUMMARY.json      (stdin: the sender's stream; stdout: the receiver)
"""

from __future__ import annotations

import json
import os
import sys

from softpage.stream.reader import PageData, StreamFeeder
from softpage.stream.records import PageType

CHUNK = 1 << 20


def main() -> int:
    counts = {"stream_bytes": 0, "page_records": 0, "pages_data": 0, "pages_xalloc": 0, "xtab": 0}

    def on_record(record: object) -> None:
        if isinstance(record, PageData):
            types = record.stream_types()
            counts["page_records"] += 1
            counts["pages_data"] += int(record.data_mask().sum())
            counts["pages_xalloc"] += int((types == PageType.XALLOC).sum())
            counts["xtab"] += int((types == PageType.XTAB).sum())

    feeder = StreamFeeder(on_record)
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    try:
        while chunk := os.read(stdin, CHUNK):
            counts["stream_bytes"] += len(chunk)
            view = memoryview(chunk)
            while len(view):
                view = view[os.write(stdout, view):]
            if not feeder.done:
                feeder.feed(chunk)
    finally:
        with open(sys.argv[1], "w", encoding="utf-8") as summary:
            json.dump(counts, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
