"""The destination side: what a stock 4.17 receiver makes of the PAGE_DATA entries.

``DestinationMemory`` applies the receiver rules of ``process_page_data`` /
``populate_pfns`` (tools/libs/guest/xg_sr_restore.c), as
shared/research/xen-migration-notes.md A2 and the xalloc experiment measured
them:

* an entry whose type populates (NOTAB, L1-L4, XALLOC) populates its PFN if it
  is not populated yet; a freshly populated page reads as zeros;
* an entry with data overwrites the page;
* XALLOC never changes a PFN that is already populated;
* XTAB and BROKEN entries, and PFNs never named, stay unpopulated.

Pages are compared through the content token ``SimBackend.read_pages`` puts in
a page's first word (0 for a fresh page).

``DirectSink`` is a ``PageSink`` that applies each batch straight away and
returns the bytes the PAGE_DATA record would take on the wire, without
serialising it: the fast path for ``softpage simulate``. ``softpage.sim.stream``
has the sink that goes through the real stream writer and reader.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from softpage.abi import PAGE_SIZE
from softpage.backend import DomainInfo, EndOfCheckpoint, StaticInfo
from softpage.errors import StreamError
from softpage.pfnset import PfnArray
from softpage.stream.records import (
    LIBXC_RECORD_HEADER,
    MAX_BATCH_SIZE,
    PAGE_DATA_HEADER,
    PFINFO_SHIFT,
    data_type_mask,
    known_type_mask,
    populate_type_mask,
)

WORDS_PER_PAGE = PAGE_SIZE // 8


class DestinationMemory:
    """The receiving domain's memory, one content token per PFN."""

    def __init__(self, p2m_size: int) -> None:
        self.p2m_size = p2m_size
        self.populated = np.zeros(p2m_size, dtype=bool)
        self.tokens = np.zeros(p2m_size, dtype=np.uint64)
        self.misplaced_pages = 0
        """Data pages whose second word named another PFN (the sender mixed pages up)."""

    def apply(self, pfns: PfnArray, types: npt.NDArray[np.uint32], data: memoryview) -> None:
        """One PAGE_DATA record: ``types`` are ``XEN_DOMCTL_PFINFO_*`` values."""
        stream_types = types >> np.uint32(PFINFO_SHIFT)
        if not known_type_mask(stream_types).all():
            raise StreamError("PAGE_DATA: expected known page types, got an invalid one (5..8)")
        indexes = pfns.astype(np.intp)
        if indexes.size and int(indexes.max()) >= self.p2m_size:
            raise StreamError(f"PAGE_DATA: expected PFNs below {self.p2m_size}, got {int(indexes.max())}")
        has_data = data_type_mask(stream_types)
        expected = int(np.count_nonzero(has_data)) * PAGE_SIZE
        if len(data) != expected:
            raise StreamError(f"PAGE_DATA: expected {expected} bytes of page data, got {len(data)}")
        populate = indexes[populate_type_mask(stream_types)]
        fresh = populate[~self.populated[populate]]
        self.populated[fresh] = True
        self.tokens[fresh] = 0
        if expected:
            words = np.frombuffer(data, dtype=np.uint64).reshape(-1, WORDS_PER_PAGE)
            data_pfns = indexes[has_data]
            self.tokens[data_pfns] = words[:, 0]
            self.misplaced_pages += int(np.count_nonzero(words[:, 1] != data_pfns.astype(np.uint64)))


def page_data_record_bytes(entries: int, data_pages: int) -> int:
    """Octets of the PAGE_DATA records for a batch (split at ``MAX_BATCH_SIZE``)."""
    records = -(-entries // MAX_BATCH_SIZE)
    return records * (LIBXC_RECORD_HEADER.size + PAGE_DATA_HEADER.size) + 8 * entries + PAGE_SIZE * data_pages


@dataclass
class SinkCounters:
    records: int = 0
    entries: int = 0
    data_pages: int = 0
    xalloc_entries: int = 0
    bytes: int = 0


TransferHook = Callable[[int, int, int, int], None]
"""Called after each batch with the (wire bytes, records, entries, data pages) it added."""


class DirectSink:
    """``PageSink`` applying batches to a ``DestinationMemory`` without serialising them."""

    def __init__(self, on_transfer: TransferHook | None = None) -> None:
        self.destination: DestinationMemory | None = None
        self.counters = SinkCounters()
        self.on_transfer = on_transfer
        self.ended = False
        self.end_of_checkpoint: EndOfCheckpoint | None = None

    def begin(self, domain: DomainInfo, static: StaticInfo) -> None:
        if self.destination is not None:
            raise StreamError("begin: expected a new stream, got a second begin")
        self.destination = DestinationMemory(domain.p2m_size)

    def write_pages(self, pfns: PfnArray, types: npt.NDArray[np.uint32], data: memoryview) -> int:
        if self.destination is None or self.ended:
            raise StreamError("write_pages: expected an open stream (after begin, before end)")
        self.destination.apply(pfns, types, data)
        stream_types = types >> np.uint32(PFINFO_SHIFT)
        data_pages = int(np.count_nonzero(data_type_mask(stream_types)))
        records = -(-pfns.size // MAX_BATCH_SIZE)
        written = page_data_record_bytes(pfns.size, data_pages)
        counters = self.counters
        counters.records += records
        counters.entries += pfns.size
        counters.data_pages += data_pages
        counters.xalloc_entries += int(np.count_nonzero(stream_types == 0xE))
        counters.bytes += written
        if self.on_transfer is not None:
            self.on_transfer(written, records, int(pfns.size), data_pages)
        return written

    def drain(self) -> None:
        """Nothing is ever queued: ``write_pages`` applies the pages before it returns."""

    def end(self, end_of_checkpoint: EndOfCheckpoint) -> None:
        if self.destination is None or self.ended:
            raise StreamError("end: expected an open stream")
        self.ended = True
        self.end_of_checkpoint = end_of_checkpoint
