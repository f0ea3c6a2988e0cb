"""``PvDomain``: what ``XenBackend`` does differently for a PV guest.

As ``x86_pv_setup`` and friends in tools/libs/guest/xg_sr_save_x86_pv.c (Xen
4.17): the shared info page and the guest's own p2m are read once at setup;
pfns become mfns for page types and mappings; page tables are rewritten in
pfns on the way out; the end of the stream carries the shared info page and
each online vCPU's state with its mfns (suspend record, GDT frames, cr3, the
user page table in cr1) turned into pfns. The p2m must not change while the
guest is migrated: its generation counter is checked before the final round.
"""

from __future__ import annotations

import struct

import numpy as np
import numpy.typing as npt

from softpage.abi import PAGE_SHIFT, PAGE_SIZE
from softpage.backend import PageBatch, PvStaticInfo, PvVcpuState
from softpage.errors import BackendError
from softpage.pfnset import PfnArray
from softpage.stream.records import PFINFO_SHIFT, pagetable_levels
from softpage.xen.ctrl import XEN_DOMCTL_PFINFO_XTAB, DomainState, XenCtrl
from softpage.xen.foreignmemory import ForeignMemory
from softpage.xen.pv import (
    GUEST_WIDTH,
    INVALID_MFN,
    PT_LEVELS,
    GuestP2m,
    PageTableError,
    normalise_pagetable,
    read_p2m,
)

U64 = struct.Struct("<Q")
VCPU_STATE_KINDS = ("extended", "xsave", "msrs")


class PvDomain:
    """One PV source domain's shared info, p2m and vCPU state."""

    def __init__(self, ctrl: XenCtrl, foreign: ForeignMemory, state: DomainState, p2m_limit: int) -> None:
        """``p2m_limit``: the largest p2m the sender accepts (``backend.p2m_size_limit``); the
        guest writes ``arch.max_pfn`` itself, and the p2m read here takes 24 bytes a PFN."""
        self._ctrl = ctrl
        self._foreign = foreign
        self.domid = state.domid
        self._lib = ctrl.binding.lib
        width = ctrl.guest_width(self.domid)
        if width != GUEST_WIDTH:
            raise BackendError(f"dom {self.domid}: {width * 8}-bit PV guests are not supported (64-bit only)")
        self._shared_info_mfn = state.shared_info_frame
        self._max_mfn = ctrl.maximum_ram_page()
        shared_info = self.shared_info()
        max_pfn = self._field(shared_info, "SOFTPAGE_SHINFO_MAX_PFN_OFFSET") - 1
        if max_pfn < 0:
            raise BackendError(f"dom {self.domid}: the guest published no p2m (arch.max_pfn is 0)")
        if max_pfn + 1 > p2m_limit:
            raise BackendError(
                f"dom {self.domid}: its p2m has {max_pfn + 1} entries (arch.max_pfn), expected at most "
                f"{p2m_limit} for a domain of {state.max_pages} pages: not migrating it, it keeps running")
        self.p2m: GuestP2m = read_p2m(
            self._map_copy,
            p2m_cr3=self._field(shared_info, "SOFTPAGE_SHINFO_P2M_CR3_OFFSET"),
            p2m_vaddr=self._field(shared_info, "SOFTPAGE_SHINFO_P2M_VADDR_OFFSET"),
            max_pfn=max_pfn,
            generation=self._field(shared_info, "SOFTPAGE_SHINFO_P2M_GENERATION_OFFSET"),
            max_mfn=self._max_mfn,
        )

    # -- setup and static data --------------------------------------------
    @property
    def p2m_size(self) -> int:
        return self.p2m.max_pfn + 1

    def static_info(self) -> PvStaticInfo:
        return PvStaticInfo(
            guest_width=GUEST_WIDTH,
            pt_levels=PT_LEVELS,
            p2m_end_pfn=self.p2m.max_pfn,
            p2m_frame_pfns=tuple(int(pfn) for pfn in self.p2m.frame_pfns),
        )

    def shared_info(self) -> bytes:
        return self._map_copy(np.array([self._shared_info_mfn], dtype=np.uint64))

    def check_p2m_unchanged(self) -> None:
        """As ``x86_pv_check_vm_state_p2m_list``: a p2m rewritten during the migration (the guest
        ballooned, say) would make the stream name the wrong frames."""
        generation = self._field(self.shared_info(), "SOFTPAGE_SHINFO_P2M_GENERATION_OFFSET")
        if generation != self.p2m.generation:
            raise BackendError(f"dom {self.domid}: the guest changed its p2m during the migration "
                               f"(generation {self.p2m.generation} -> {generation}); migration aborted")

    # -- pages ------------------------------------------------------------
    def page_types(self, pfns: PfnArray) -> npt.NDArray[np.uint32]:
        """Types of the frames behind ``pfns``; a pfn without a frame (ballooned out) is XTAB."""
        mfns = self.p2m.mfns_of(pfns)
        invalid = (mfns == np.uint64(INVALID_MFN)) | (mfns > np.uint64(self._max_mfn))
        types = self._ctrl.page_types(self.domid, np.where(invalid, 0, mfns).astype(np.uint64))
        return np.where(invalid, np.uint32(XEN_DOMCTL_PFINFO_XTAB), types).astype(np.uint32)

    def mfns_of(self, pfns: PfnArray) -> npt.NDArray[np.uint64]:
        return self.p2m.mfns_of(pfns)

    def normalise(self, pages: memoryview, types: npt.NDArray[np.uint32], strict: bool) -> PageBatch:
        """``pages`` (mapped, in order) with every page table rewritten in pfns. While the guest
        runs (not ``strict``), a table naming a frame that is not the guest's is deferred, as
        libxenguest defers it on EAGAIN; with the guest suspended that is an error."""
        levels = pagetable_levels(types >> np.uint32(PFINFO_SHIFT))
        tables = np.flatnonzero(levels)
        if tables.size == 0:
            return PageBatch(pages)
        out = bytearray(pages)
        deferred = np.zeros(types.size, dtype=np.bool_)
        for index in tables:
            start = int(index) * PAGE_SIZE
            try:
                out[start:start + PAGE_SIZE] = normalise_pagetable(
                    pages[start:start + PAGE_SIZE], int(levels[index]), self.p2m, strict)
            except PageTableError:
                deferred[index] = True
        if not deferred.any():
            return PageBatch(memoryview(out))
        kept = np.frombuffer(out, dtype=np.uint8).reshape(-1, PAGE_SIZE)[~deferred]
        return PageBatch(memoryview(kept.tobytes()), deferred)

    # -- end of checkpoint --------------------------------------------------
    def vcpu_states(self, max_vcpu_id: int) -> tuple[PvVcpuState, ...]:
        """Every online vCPU's records, as ``write_all_vcpu_information``."""
        states = []
        for vcpu in range(max_vcpu_id + 1):
            if not self._ctrl.pv_vcpu_online(self.domid, vcpu):
                continue
            extras = {kind: self._ctrl.pv_vcpu_state(self.domid, vcpu, kind) for kind in VCPU_STATE_KINDS}
            states.append(PvVcpuState(vcpu_id=vcpu, basic=self._basic_context(vcpu), **extras))
        if not states:
            raise BackendError(f"dom {self.domid}: no online vCPU")
        return tuple(states)

    def _basic_context(self, vcpu: int) -> bytes:
        """``write_one_vcpu_basic``: the context with its machine frames turned into pfns."""
        context = bytearray(self._ctrl.pv_vcpu_state(self.domid, vcpu, "basic"))
        lib = self._lib
        if vcpu == 0:
            # The suspend record (start info) travels in rdx of vCPU 0.
            rdx = int(lib.SOFTPAGE_PV_VCPU_RDX_OFFSET)
            U64.pack_into(context, rdx, self._pfn_of(U64.unpack_from(context, rdx)[0], "suspend record"))
        gdt_entries = U64.unpack_from(context, int(lib.SOFTPAGE_PV_VCPU_GDT_ENTS_OFFSET))[0]
        if gdt_entries > int(lib.FIRST_RESERVED_GDT_ENTRY):
            raise BackendError(f"dom {self.domid}: vcpu{vcpu} has {gdt_entries} GDT entries "
                               f"(at most {int(lib.FIRST_RESERVED_GDT_ENTRY)})")
        frames = int(lib.SOFTPAGE_PV_VCPU_GDT_FRAMES_OFFSET)
        for frame in range((gdt_entries + 511) // 512):
            offset = frames + 8 * frame
            mfn = U64.unpack_from(context, offset)[0]
            U64.pack_into(context, offset, self._pfn_of(mfn, f"vcpu{vcpu} GDT frame {frame}"))
        ctrlreg = int(lib.SOFTPAGE_PV_VCPU_CTRLREG_OFFSET)
        cr3 = U64.unpack_from(context, ctrlreg + 3 * 8)[0]
        cr3_pfn = self._pfn_of(cr3 >> PAGE_SHIFT, f"vcpu{vcpu} cr3")
        U64.pack_into(context, ctrlreg + 3 * 8, cr3_pfn << PAGE_SHIFT)
        cr1 = U64.unpack_from(context, ctrlreg + 8)[0]
        if cr1:
            # 64-bit guests keep their user page table in cr1 (bit 0: valid).
            pfn = self._pfn_of(cr1 >> PAGE_SHIFT, f"vcpu{vcpu} cr1")
            U64.pack_into(context, ctrlreg + 8, 1 | (pfn << PAGE_SHIFT))
        return bytes(context)

    # -- helpers ----------------------------------------------------------
    def _pfn_of(self, mfn: int, what: str) -> int:
        pfns, known = self.p2m.pfns_of(np.array([mfn], dtype=np.uint64))
        if not known[0]:
            raise BackendError(f"dom {self.domid}: {what} is mfn {mfn:#x}, not one of the guest's frames")
        return int(pfns[0])

    def _field(self, shared_info: bytes, offset_name: str) -> int:
        return int(U64.unpack_from(shared_info, int(getattr(self._lib, offset_name)))[0])

    def _map_copy(self, mfns: npt.NDArray[np.uint64]) -> bytes:
        with self._foreign.map_readonly(self.domid, mfns) as mapping:
            return bytes(mapping.view)

