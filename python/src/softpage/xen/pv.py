"""PV guests: the guest's own p2m, mfn <-> pfn, and page-table normalisation.

A PV guest sees machine frames: its page tables hold mfns and its p2m (pfn ->
mfn) lives in its own memory. The stream speaks pfns only, so the sender maps
that p2m, translates every mfn it meets back to a pfn, and rewrites page-table
pages on the way out, as tools/libs/guest/xg_sr_save_x86_pv.c (Xen 4.17) does:
``map_p2m_list``, ``normalise_pagetable``. Only 64-bit guests with a virtually
mapped p2m (``arch.p2m_cr3`` set, what Linux publishes) are handled; a 32-bit
guest or the old three-level p2m tree is refused with the reason.

Nothing here talks to Xen: the caller passes a ``MapFrames`` that returns the
contents of machine frames, so the walk and the rewriting are tested on
made-up memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from softpage.abi import PAGE_SHIFT, PAGE_SIZE
from softpage.errors import BackendError
from softpage.pfnset import PfnArray

PTES_PER_PAGE = PAGE_SIZE // 8
GUEST_WIDTH = 8
"""Bytes in a guest ``unsigned long``: 64-bit guests only."""
PT_LEVELS = 4

# tools/libs/guest/xg_sr_common_x86_pv.h: Xen's range, inclusive (the guest's own mappings
# start right above it, the L4 slot after the last one cleared).
HYPERVISOR_VIRT_START_X86_64 = 0xFFFF800000000000
HYPERVISOR_VIRT_END_X86_64 = 0xFFFF87FFFFFFFFFF
L4_PAGETABLE_SHIFT_X86_64 = 39
PTE_PRESENT = 1 << 0
PTE_PSE = 1 << 7
PTE_FRAME_MASK = 0x000FFFFFFFFFF000
"""``pte_to_frame()``: bits 51..12 of a PTE."""
VADDR_MASK_X86_64 = 0x0000FFFFFFFFFFFF
INVALID_MFN = (1 << 64) - 1

# Page-table levels, as softpage.stream.records.pagetable_levels gives them
L1TAB, L2TAB, L3TAB, L4TAB = 1, 2, 3, 4

XEN_SLOTS_L4 = range(
    (HYPERVISOR_VIRT_START_X86_64 >> L4_PAGETABLE_SHIFT_X86_64) & 511,
    ((HYPERVISOR_VIRT_END_X86_64 >> L4_PAGETABLE_SHIFT_X86_64) & 511) + 1,
)
"""L4 slots that hold Xen's own mappings: zeroed in the stream, Xen rebuilds them."""

MapFrames = Callable[[npt.NDArray[np.uint64]], bytes]
"""Returns the contents of the given machine frames, PAGE_SIZE each, in order."""


class PageTableError(BackendError):
    """A page table that cannot be expressed in pfns right now (the guest may be changing it)."""


def is_canonical(vaddr: int) -> bool:
    """A 64-bit virtual address whose bits 63..47 are all equal."""
    top = vaddr >> 47
    return top == 0 or top == (1 << 17) - 1


@dataclass(frozen=True)
class GuestP2m:
    """A 64-bit PV guest's p2m, read once while setting up, as libxenguest does."""

    mfns: npt.NDArray[np.uint64]
    """``mfns[pfn]``: the guest's frame for ``pfn``; INVALID_MFN where it has none."""
    frame_pfns: npt.NDArray[np.uint64]
    """The pfns of the frames that hold the p2m itself: the X86_PV_P2M_FRAMES record."""
    generation: int
    """``arch.p2m_generation`` when it was read: a change means the guest rewrote its p2m."""
    _order: npt.NDArray[np.intp]
    _sorted_mfns: npt.NDArray[np.uint64]

    @property
    def max_pfn(self) -> int:
        return int(self.mfns.size) - 1

    @classmethod
    def from_mfns(cls, mfns: npt.NDArray[np.uint64], frame_mfns: npt.NDArray[np.uint64],
                  generation: int) -> GuestP2m:
        """Index ``mfns`` for the reverse lookup and find the p2m frames' own pfns."""
        mfns = np.ascontiguousarray(mfns, dtype=np.uint64)
        order = np.argsort(mfns, kind="stable")
        sorted_mfns = mfns[order]
        valid = sorted_mfns != np.uint64(INVALID_MFN)
        if np.any(valid[1:] & (sorted_mfns[1:] == sorted_mfns[:-1])):
            duplicate = int(sorted_mfns[1:][valid[1:] & (sorted_mfns[1:] == sorted_mfns[:-1])][0])
            raise BackendError(f"PV p2m maps machine frame {duplicate:#x} at two pfns")
        p2m = cls(mfns, np.empty(0, np.uint64), generation, order, sorted_mfns)
        frame_pfns, known = p2m.pfns_of(frame_mfns)
        if not known.all():
            bad = int(np.asarray(frame_mfns, dtype=np.uint64)[~known][0])
            raise BackendError(f"PV p2m frame at mfn {bad:#x} is not one of the guest's own frames")
        return cls(mfns, frame_pfns, generation, order, sorted_mfns)

    def mfns_of(self, pfns: PfnArray) -> npt.NDArray[np.uint64]:
        return self.mfns[np.asarray(pfns, dtype=np.intp)]

    def pfns_of(self, mfns: npt.NDArray[np.uint64]) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.bool_]]:
        """The pfn of each machine frame and whether it is the guest's (``mfn_in_pseudophysmap``)."""
        mfns = np.asarray(mfns, dtype=np.uint64)
        slots = np.searchsorted(self._sorted_mfns, mfns)
        slots = np.minimum(slots, self._sorted_mfns.size - 1)
        known = (self._sorted_mfns[slots] == mfns) & (mfns != np.uint64(INVALID_MFN))
        pfns = np.where(known, self._order[slots], 0).astype(np.uint64)
        return pfns, known


def read_p2m(map_frames: MapFrames, p2m_cr3: int, p2m_vaddr: int, max_pfn: int,
             generation: int, max_mfn: int) -> GuestP2m:
    """Walk the guest's page tables from ``p2m_cr3`` down to the frames of its linear p2m at
    ``p2m_vaddr`` (``map_p2m_list``), read them, and index the result.

    ``max_pfn`` is ``arch.max_pfn - 1``; it shrinks, as in libxenguest, when the trailing L2
    entries all name the same frame (the guest's shared "all invalid" p2m page).
    """
    if p2m_cr3 == 0:
        raise BackendError("the PV guest publishes no virtually mapped p2m (arch.p2m_cr3 = 0): "
                           "the three-level p2m tree of old kernels is not supported")
    root = p2m_cr3 >> PAGE_SHIFT
    if root == 0 or root > max_mfn:
        raise BackendError(f"bad p2m_cr3 {p2m_cr3:#x}")
    per_frame = PAGE_SIZE // GUEST_WIDTH
    nr_frames = max_pfn // per_frame + 1
    p2m_end = p2m_vaddr + nr_frames * PAGE_SIZE - 1
    if (not is_canonical(p2m_vaddr) or not is_canonical(p2m_end) or p2m_end < p2m_vaddr
            or (p2m_vaddr <= HYPERVISOR_VIRT_END_X86_64 and p2m_end > HYPERVISOR_VIRT_START_X86_64)):
        raise BackendError(f"bad virtual p2m range {p2m_vaddr:#x}-{p2m_end:#x}")

    frames = np.array([root], dtype=np.uint64)
    index_start = index_end = 0
    offset = 0
    for level in range(PT_LEVELS, 0, -1):
        ptes = np.frombuffer(map_frames(frames), dtype=np.uint64)
        shift = level * 9 + 3
        index_start = ((p2m_vaddr - offset) & VADDR_MASK_X86_64) >> shift
        index_end = ((p2m_end - offset) & VADDR_MASK_X86_64) >> shift
        entries = ptes[index_start:index_end + 1]
        if entries.size != index_end - index_start + 1:
            raise BackendError(f"p2m walk at level {level}: entries {index_start}..{index_end} "
                               f"beyond the {frames.size} table frame(s) mapped")
        frames = (entries & np.uint64(PTE_FRAME_MASK)) >> np.uint64(PAGE_SHIFT)
        bad = (frames == 0) | (frames > np.uint64(max_mfn))
        if bad.any():
            where = int(np.argmax(bad)) + index_start
            raise BackendError(f"bad mfn {int(frames[bad][0]):#x} in the p2m walk at level {level}, "
                               f"entry {where}")
        if level == 2:
            # Trailing entries naming one and the same frame are the guest's shared invalid
            # p2m page: the real p2m ends before them (libxenguest's max_pfn check).
            last_change = 0
            for i in range(1, frames.size):
                if frames[i] != frames[i - 1]:
                    last_change = i
            if last_change == frames.size - 1:
                last_change += 1
            trimmed_max_pfn = (last_change << 9) * per_frame - 1
            if trimmed_max_pfn < max_pfn:
                max_pfn = trimmed_max_pfn
                nr_frames = (max_pfn + per_frame) // per_frame
                p2m_end = p2m_vaddr + nr_frames * PAGE_SIZE - 1
                index_end = index_start + last_change
                frames = frames[:last_change + 1]
        offset = p2m_vaddr & ((VADDR_MASK_X86_64 >> shift) << shift)
    leaves = frames[:nr_frames]
    mfns = np.frombuffer(map_frames(leaves), dtype=np.uint64)[:max_pfn + 1].copy()
    return GuestP2m.from_mfns(mfns, leaves, generation)


def normalise_pagetable(page: memoryview | bytes, level: int, p2m: GuestP2m,
                        strict: bool) -> bytes:
    """The page table ``page`` of type L``level`` with every present PTE's mfn replaced by its
    pfn and Xen's L4 slots cleared (``normalise_pagetable``).

    A PTE naming a frame that is not the guest's raises ``PageTableError``: during precopy
    (``strict`` False) that is the guest changing a table under us, and the caller sends the page
    again once the guest is suspended; with the guest suspended (``strict``) it is fatal.
    Superpages in L2-L4 cannot be migrated.
    """
    ptes = np.frombuffer(page, dtype=np.uint64).copy()
    if ptes.size != PTES_PER_PAGE:
        raise BackendError(f"page table of {ptes.size * 8} bytes")
    if level == L4TAB:
        ptes[XEN_SLOTS_L4.start:XEN_SLOTS_L4.stop] = 0
    present = (ptes & np.uint64(PTE_PRESENT)) != 0
    if level > L1TAB and np.any(present & ((ptes & np.uint64(PTE_PSE)) != 0)):
        slot = int(np.argmax(present & ((ptes & np.uint64(PTE_PSE)) != 0)))
        raise BackendError(f"cannot migrate a superpage (L{level}[{slot}] = {int(ptes[slot]):#018x})")
    mfns = (ptes[present] & np.uint64(PTE_FRAME_MASK)) >> np.uint64(PAGE_SHIFT)
    pfns, known = p2m.pfns_of(mfns)
    if not known.all():
        slot = int(np.flatnonzero(present)[int(np.argmin(known))])
        message = f"L{level}[{slot}] names mfn {int(mfns[~known][0]):#x}, not the guest's"
        if strict:
            raise BackendError(message)
        raise PageTableError(message)
    keep = ~np.uint64(PTE_FRAME_MASK)
    ptes[present] = (ptes[present] & keep) | (pfns << np.uint64(PAGE_SHIFT))
    return ptes.tobytes()
