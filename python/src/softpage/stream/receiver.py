"""RestoreModel: what a stock Xen 4.17 receiver makes of an HVM/PVH stream.

It applies records exactly as ``xc_domain_restore`` does
(tools/libs/guest/xg_sr_restore.c and xg_sr_restore_x86_hvm.c):

* PAGE_DATA (``handle_page_data`` -> ``process_page_data``): every entry
  whose type populates (NOTAB, L1-L4, XALLOC) and whose pfn is not yet
  populated gets a fresh page (``populate_pfns``); then the entries with data
  are copied in. XTAB and BROKEN touch nothing. So an XALLOC never changes a
  populated pfn's content. A page populated without data reads as whatever
  frame Xen handed out: zeros in the xalloc experiment, but Xen scrubs only
  frames marked for it (boot memory under the default ``bootscrub=idle``, a
  dead domain's frames); ``free_domheap_pages`` (xen/common/page_alloc.c,
  4.17 and 4.20) leaves a frame that a live domain gave back as it was,
  unless Xen runs with ``scrub-domheap``. ``RestoreModel(fresh_fill=...)``
  models such a heap.
* PAGE_DATA before STATIC_DATA_END is refused in a v3 stream ("No
  STATIC_DATA_END seen"); a second STATIC_DATA_END is refused.
* A record the HVM restorer does not handle (the PV ones) fails the restore
  unless its type has the optional bit (``RECORD_NOT_PROCESSED``).
* HVM_CONTEXT is kept and applied at stream completion, so it may come
  before or after HVM_PARAMS; ``complete()`` checks it arrived.

The model is the simulator's and the property tests' destination, so it takes
records one at a time (``apply``), including from a ``StreamWriter`` whose
sink is ``model.sink()``, and stores pages in one growable numpy array.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from softpage.abi import PAGE_SIZE
from softpage.backend import TscInfo
from softpage.errors import StreamError
from softpage.pfnset import PfnArray, PfnSet
from softpage.stream import records as wire
from softpage.stream.reader import (
    CheckpointRecord,
    DomainHeader,
    EmulatorRecord,
    HvmContext,
    HvmParams,
    ImageHeader,
    Layer,
    LibxcContext,
    LibxcEnd,
    LibxlEnd,
    LibxlHeader,
    PageData,
    Record,
    StaticDataEnd,
    StreamFeeder,
    VerifyRecord,
    X86CpuidPolicy,
    X86MsrPolicy,
    X86TscInfo,
    XlHeader,
)

_UNPOPULATED = -1
_INITIAL_PFNS = 32 * 1024 // 4
"""Like ``setup()`` in xg_sr_restore.c: track 32 MiB worth of pfns at first."""


def _next_power_of_two_above(value: int) -> int:
    return 1 << value.bit_length()


class RestoreModel:
    """The destination domain as a 4.17 HVM/PVH restore would build it."""

    def __init__(self, fresh_fill: int = 0) -> None:
        """``fresh_fill``: the byte every page populated without data reads as (0: Xen
        scrubbed the frame; any other value: it did not)."""
        self.fresh_fill = fresh_fill
        self._slot_of_pfn = np.full(_INITIAL_PFNS, _UNPOPULATED, dtype=np.int64)
        self._named = np.zeros(_INITIAL_PFNS, dtype=np.bool_)
        self._pages = np.zeros((0, PAGE_SIZE), dtype=np.uint8)
        self._nr_populated = 0
        self.xl_config: bytes | None = None
        self.image_version: int | None = None
        self.domain: DomainHeader | None = None
        self.cpuid_policy: bytes | None = None
        self.msr_policy: bytes | None = None
        self.static_data_end_seen = False
        self.tsc: TscInfo | None = None
        self.hvm_context: bytes | None = None
        self.hvm_params: dict[int, int] = {}
        self.libxc_end_seen = False
        self.libxl_end_seen = False
        self.emulator_records: list[EmulatorRecord] = []
        self.records_applied = 0

    # -- feeding -----------------------------------------------------------
    def sink(self, start: Layer = Layer.XL) -> StreamFeeder:
        """A ``writev``-shaped sink that parses bytes and applies each record:
        ``StreamWriter(model.sink().writev)``."""
        return StreamFeeder(self.apply, start)

    def apply_all(self, stream_records: Iterable[Record]) -> None:
        for record in stream_records:
            self.apply(record)

    def apply(self, record: Record) -> None:
        """Apply one record; ``StreamError`` where the real restore fails."""
        after_libxc = (LibxlEnd, EmulatorRecord)
        if self.libxl_end_seen or (self.libxc_end_seen and not isinstance(record, after_libxc)):
            raise StreamError(f"restore: expected no libxc record after END, got {type(record).__name__}")
        if isinstance(record, PageData):
            self._apply_page_data(record)
        elif isinstance(record, XlHeader):
            self.xl_config = record.config
        elif isinstance(record, ImageHeader):
            self.image_version = record.version
        elif isinstance(record, DomainHeader):
            if record.domain_type is not wire.DomainType.X86_HVM:
                raise StreamError(f"restore: expected an x86 HVM domain, got {record.domain_type.name}")
            self.domain = record
        elif isinstance(record, StaticDataEnd):
            if self.static_data_end_seen:
                raise StreamError("restore: expected one STATIC_DATA_END, got a second")
            self.static_data_end_seen = True
        elif isinstance(record, X86CpuidPolicy):
            self._expect_static_phase("X86_CPUID_POLICY")
            self.cpuid_policy = record.leaves
        elif isinstance(record, X86MsrPolicy):
            self._expect_static_phase("X86_MSR_POLICY")
            self.msr_policy = record.entries
        elif isinstance(record, X86TscInfo):
            self.tsc = record.tsc
        elif isinstance(record, HvmContext):
            self.hvm_context = record.blob
        elif isinstance(record, HvmParams):
            self.hvm_params.update(record.params)
        elif isinstance(record, LibxcEnd):
            self.libxc_end_seen = True
        elif isinstance(record, LibxlEnd):
            self.libxl_end_seen = True
        elif isinstance(record, EmulatorRecord):
            # libxl hands these to the device model; PVH streams have none.
            self.emulator_records.append(record)
        elif isinstance(record, (LibxlHeader, LibxcContext, VerifyRecord)):
            pass
        elif isinstance(record, CheckpointRecord):
            raise StreamError("restore: expected a plain (not checkpointed) stream, got CHECKPOINT")
        else:
            # X86_PV_*, SHARED_INFO and libxl checkpoint records: the HVM restorer
            # returns RECORD_NOT_PROCESSED and none of them is optional.
            raise StreamError(f"restore: expected a record HVM restore handles, got {type(record).__name__}")
        self.records_applied += 1

    def complete(self) -> None:
        """Check what ``x86_hvm_stream_complete`` needs once END arrived."""
        if not self.libxc_end_seen:
            raise StreamError("restore: expected libxc END, got a truncated stream")
        if self.hvm_context is None:
            raise StreamError("restore: expected an HVM_CONTEXT record, got none")

    # -- the destination memory ---------------------------------------------
    @property
    def nr_populated(self) -> int:
        return self._nr_populated

    def populated_pfns(self) -> PfnArray:
        """Every populated pfn, ascending."""
        return np.flatnonzero(self._slot_of_pfn != _UNPOPULATED).astype(np.uint64)

    def named_pfns(self) -> PfnArray:
        """Every pfn any PAGE_DATA entry named (XTAB and BROKEN included)."""
        return np.flatnonzero(self._named).astype(np.uint64)

    def populated_set(self, nr_pfns: int) -> PfnSet:
        """The populated pfns as a set over ``[0, nr_pfns)``."""
        pfns = self.populated_pfns()
        if len(pfns) and int(pfns[-1]) >= nr_pfns:
            raise StreamError(f"restore: expected pfns below {nr_pfns}, got pfn {int(pfns[-1]):#x} populated")
        return PfnSet.from_pfns(nr_pfns, pfns)

    def is_populated(self, pfn: int) -> bool:
        return pfn < len(self._slot_of_pfn) and bool(self._slot_of_pfn[pfn] != _UNPOPULATED)

    def was_named(self, pfn: int) -> bool:
        return pfn < len(self._named) and bool(self._named[pfn])

    def page(self, pfn: int) -> bytes | None:
        """The content of ``pfn``, or None if it was never populated."""
        if not self.is_populated(pfn):
            return None
        content: bytes = self._pages[self._slot_of_pfn[pfn]].tobytes()
        return content

    def pages(self, pfns: npt.NDArray[np.integer]) -> npt.NDArray[np.uint8]:
        """Contents of populated ``pfns`` as a ``(len(pfns), PAGE_SIZE)`` array."""
        pfn_indices = np.asarray(pfns, dtype=np.int64)
        if len(pfn_indices) and (
            int(pfn_indices.max()) >= len(self._slot_of_pfn)
            or bool((self._slot_of_pfn[pfn_indices] == _UNPOPULATED).any())
        ):
            raise StreamError("restore: expected populated pfns, got at least one unpopulated")
        return self._pages[self._slot_of_pfn[pfn_indices]]

    # -- internals -----------------------------------------------------------
    def _expect_static_phase(self, name: str) -> None:
        if self.static_data_end_seen:
            raise StreamError(f"restore: expected {name} before STATIC_DATA_END, got it after")

    def _apply_page_data(self, record: PageData) -> None:
        if (self.image_version or wire.IHDR_VERSION) >= 3 and not self.static_data_end_seen:
            raise StreamError("restore: expected STATIC_DATA_END before PAGE_DATA, got none")
        pfns = record.pfns.astype(np.int64)
        stream_types = record.stream_types()
        self._grow_to(int(pfns.max()))
        self._named[pfns] = True

        populate = wire.populate_type_mask(stream_types)
        candidates = pfns[populate]
        fresh = np.unique(candidates[self._slot_of_pfn[candidates] == _UNPOPULATED])
        if len(fresh):
            first_slot = self._nr_populated
            self._reserve_slots(first_slot + len(fresh))
            self._slot_of_pfn[fresh] = np.arange(first_slot, first_slot + len(fresh))
            self._pages[first_slot : first_slot + len(fresh)] = self.fresh_fill
            self._nr_populated += len(fresh)

        data_pfns = pfns[wire.data_type_mask(stream_types)]
        if len(data_pfns):
            incoming = np.frombuffer(record.data, dtype=np.uint8).reshape(len(data_pfns), PAGE_SIZE)
            # process_page_data memcpy()s in entry order, so for a pfn named
            # twice in one record the last page wins; keep only that one.
            reversed_unique, reversed_index = np.unique(data_pfns[::-1], return_index=True)
            last_index = len(data_pfns) - 1 - reversed_index
            self._pages[self._slot_of_pfn[reversed_unique]] = incoming[last_index]

    def _grow_to(self, max_pfn: int) -> None:
        if max_pfn < len(self._slot_of_pfn):
            return
        # pfn_set_populated() grows its bitmap to a power of two the same way.
        new_size = _next_power_of_two_above(max_pfn)
        grown_slots = np.full(new_size, _UNPOPULATED, dtype=np.int64)
        grown_slots[: len(self._slot_of_pfn)] = self._slot_of_pfn
        grown_named = np.zeros(new_size, dtype=np.bool_)
        grown_named[: len(self._named)] = self._named
        self._slot_of_pfn, self._named = grown_slots, grown_named

    def _reserve_slots(self, needed: int) -> None:
        if needed <= len(self._pages):
            return
        capacity = max(needed, 2 * len(self._pages), 64)
        grown = np.zeros((capacity, PAGE_SIZE), dtype=np.uint8)
        grown[: self._nr_populated] = self._pages[: self._nr_populated]
        self._pages = grown
