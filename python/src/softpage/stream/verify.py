"""Checks beyond syntax: what a stream will do to a stock 4.17 receiver.

``verify-stream-v2`` (and ``softpage.stream.reader``) only check syntax. The
xalloc experiment (shared/research/xalloc-experiment/README.md) showed the
two mistakes that syntax cannot see and a receiver accepts silently:

* a RAM pfn never named in the stream stays unpopulated: restore "succeeds"
  and the guest breaks when it first touches the page (experiment 3);
* an XALLOC for a pfn that already went out with data is a no-op: the
  destination keeps the old content (experiment 5), so a sender must never
  use XALLOC to mean "zero now".

:func:`check_stream` parses a stream strictly, restores it into a
``RestoreModel`` and reports both, with counts for a summary.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from softpage.pfnset import PfnArray, PfnSet
from softpage.stream import records as wire
from softpage.stream.reader import Layer, PageData, read_records
from softpage.stream.receiver import RestoreModel


@dataclass
class StreamReport:
    record_counts: Counter[str] = field(default_factory=Counter)
    """Records by class name (``PageData``, ``HvmContext``...)."""
    entries_by_type: Counter[str] = field(default_factory=Counter)
    """PAGE_DATA entries by page type name (``NOTAB``, ``XALLOC``...)."""
    populated: int = 0
    xalloc_after_data: int = 0
    """XALLOC entries naming a pfn that already had data: no-ops on the receiver."""
    unpopulated_ram_pfns: PfnArray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    """RAM pfns (when the caller said which pfns are RAM) left unpopulated."""

    @property
    def restorable(self) -> bool:
        """No RAM pfn left behind (the other findings are informational)."""
        return not len(self.unpopulated_ram_pfns)


def check_stream(
    read: Callable[[int], bytes],
    start: Layer = Layer.XL,
    ram_pfns: PfnSet | None = None,
) -> tuple[StreamReport, RestoreModel]:
    """Parse and restore the stream from ``read``; ``StreamError`` if either
    the syntax or the 4.17 restore rules are broken. ``ram_pfns``: the source's
    RAM, to find pfns the stream never populated."""
    report = StreamReport()
    model = RestoreModel()
    had_data = np.zeros(0, dtype=np.bool_)
    for record in read_records(read, start):
        report.record_counts[type(record).__name__] += 1
        if isinstance(record, PageData):
            stream_types = record.stream_types()
            for stream_type, count in zip(*np.unique(stream_types, return_counts=True), strict=True):
                report.entries_by_type[wire.PAGE_TYPE_NAMES[wire.PageType(int(stream_type))]] += int(count)
            pfns = record.pfns.astype(np.int64)
            if int(pfns.max()) >= len(had_data):
                grown = np.zeros(max(2 * len(had_data), int(pfns.max()) + 1), dtype=np.bool_)
                grown[: len(had_data)] = had_data
                had_data = grown
            report.xalloc_after_data += int(
                np.count_nonzero(had_data[pfns[stream_types == wire.PageType.XALLOC]])
            )
            had_data[pfns[record.data_mask()]] = True
        model.apply(record)
    model.complete()
    report.populated = model.nr_populated
    if ram_pfns is not None:
        populated = model.populated_pfns()
        populated = populated[populated < ram_pfns.nr_pfns]
        report.unpopulated_ram_pfns = (ram_pfns - PfnSet.from_pfns(ram_pfns.nr_pfns, populated)).to_pfns()
    return report, model
