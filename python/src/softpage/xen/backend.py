"""``XenBackend``: ``softpage.backend.MigrationBackend`` on a live Xen 4.17 domain.

Supported: PVH guests (HVM-type stream, ``gfn == pfn``, no device model), the
type the testbed can live-migrate (HAP log-dirty), and 64-bit PV guests
(``softpage.xen.pvdomain``: the guest's p2m for types and mappings, page
tables rewritten in pfns, X86_PV_INFO, P2M_FRAMES, SHARED_INFO and the vCPU
records). PV live migration needs shadow paging, which Debian's 4.17.7
hypervisor is built without; a non-live save works there. HVM guests with a
device model need QEMU's side (``switch_qemu_logdirty``, the device-model save
file as EMULATOR_CONTEXT and its xenstore data), which libxl has: they are
accepted only when libxl runs the save (``device_model_by_libxl``: the save
helper), and refused in ``describe()`` otherwise. Their memory and
HVM_CONTEXT/HVM_PARAMS paths are PVH's.

The libxl ordering is kept: log-dirty on before any page is read, pages read
read-only through one foreign mapping per ``read_pages`` call (written to the
stream straight from it, as xc_domain_save does), suspend by the
xenstore handshake, FINAL harvest with the domain suspended.
"""

from __future__ import annotations

import dataclasses
import errno
from typing import Any

import numpy as np
import numpy.typing as npt

from softpage.backend import DomainInfo, EndOfCheckpoint, GuestType, PageBatch, StaticInfo
from softpage.errors import BackendError
from softpage.pfnset import PfnArray, PfnSet
from softpage.xen._binding import XenBinding, load_binding
from softpage.xen.channel import XenSoftPageChannel
from softpage.xen.ctrl import DirtyLog, DomainState, XenCtrl
from softpage.xen.evtchn import EventChannels
from softpage.xen.foreignmemory import ForeignMapping, ForeignMemory
from softpage.xen.gnttab import GrantTable
from softpage.xen.pvdomain import PvDomain
from softpage.xen.suspend import SuspendTimeouts, resume_guest, suspend_guest
from softpage.xenstore import PyxsStore, XenStore

BELOW_4GIB_PFNS = 1 << 20
"""PFNs below 4 GiB. A PVH/HVM domain's maximum GPFN may exceed its page count by this much
without the guest doing anything: libxl stops its low RAM at the MMIO hole and puts the rest
above 4 GiB (``highmem`` starts at PFN 0x100000, tools/libs/guest/xg_dom_x86.c), and the magic
pages sit right below ``X86_HVM_END_SPECIAL_REGION`` (PFN 0xff000, tools/include/xenguest.h),
so even a 256 MiB PVH guest has a maximum GPFN near 0xfefff."""
P2M_SLACK_PFNS = 1 << 18
"""1 GiB of PFNs above that for frames a well-behaved guest maps beyond its RAM: Linux places
its grant-table frames and other foreign mappings in free physical ranges of 128 MiB sections
(drivers/xen/unpopulated-alloc.c), and memory hot-added by its balloon driver after the last
RAM section; none of them can take more than max_pages beyond the RAM."""

SUPPORTED_TYPES = (GuestType.PVH, GuestType.PV)
UNSUPPORTED_REASONS = {
    GuestType.HVM: "an HVM guest's device model (QEMU's state and log-dirty mode) is saved by libxl: "
                   "use xl migrate or xl save with LIBXL_SAVE_HELPER=softpage-save-helper",
}


def p2m_size_limit(max_pages: int) -> int:
    """The largest ``p2m_size`` dom0 accepts for a domain of ``max_pages`` pages.

    ``p2m_size`` is ``xc_domain_maximum_gpfn() + 1``: for PVH and HVM the highest GFN the
    guest ever had mapped (``p2m->max_mapped_pfn``, ``domain_get_maximum_gpfn`` in
    xen/arch/x86/mm.c, Xen 4.17), which a guest raises by mapping one frame at a huge GFN
    (``XENMEM_add_to_physmap``, ``XENMEM_populate_physmap``); for PV the ``arch.max_pfn`` the guest
    writes in its shared info. Every per-PFN structure of the sender is sized by it (a bit a PFN
    in each of about sixteen bitmaps, and the PV p2m), so it is bounded by what the domain can
    really own: its pages, the 4 GiB the PVH/HVM memory map may skip (``BELOW_4GIB_PFNS``) and
    ``P2M_SLACK_PFNS``. A 64 GiB guest (2^24 pages) may then reach 18.1 M PFNs, about 40 MiB of
    dom0's memory (tests/bench/memory_bench.py). A guest beyond the limit is refused before
    anything is allocated.
    """
    return max_pages + BELOW_4GIB_PFNS + P2M_SLACK_PFNS


def check_p2m_size(domid: int, p2m_size: int, max_pages: int) -> None:
    """``BackendError`` if ``p2m_size`` is beyond ``p2m_size_limit(max_pages)``."""
    limit = p2m_size_limit(max_pages)
    if p2m_size > limit:
        raise BackendError(
            f"dom {domid}: its highest guest frame number is {p2m_size - 1:#x}, expected at most "
            f"{limit - 1:#x} for a domain of {max_pages} pages (its pages, 4 GiB for the MMIO hole, "
            f"1 GiB of slack): the guest mapped a frame far beyond its memory; not migrating it, "
            "it keeps running"
        )


def check_pfns(pfns: PfnArray, p2m_size: int, what: str) -> npt.NDArray[np.uint64]:
    """``pfns`` as a contiguous uint64 array, all inside ``[0, p2m_size)``."""
    array = np.ascontiguousarray(pfns, dtype=np.uint64)
    if array.ndim != 1:
        raise BackendError(f"{what}: expected a 1-D PFN array, got shape {array.shape}")
    if array.size and int(array.max()) >= p2m_size:
        raise BackendError(
            f"{what}: PFN {int(array.max()):#x} is outside the domain (p2m_size {p2m_size:#x})"
        )
    return array


class XenBackend:
    """One source domain. Opens its handles on construction; ``cleanup()`` closes them."""

    def __init__(
        self,
        domid: int,
        store: XenStore | None = None,
        suspend_timeouts: SuspendTimeouts | None = None,
        binding: XenBinding | None = None,
        device_model_by_libxl: bool = False,
    ) -> None:
        """``device_model_by_libxl``: libxl saves the device model's state and switches its
        log-dirty mode around this sender (the save helper), so HVM guests are accepted."""
        if domid <= 0 or domid >= 0x7FF0:
            raise BackendError(f"expected a guest domain id in 1..{0x7FEF}, got {domid}")
        self.domid = domid
        self._binding = binding or load_binding()
        self._supported_types = SUPPORTED_TYPES + ((GuestType.HVM,) if device_model_by_libxl else ())
        self._suspend_timeouts = suspend_timeouts or SuspendTimeouts()
        self._ctrl = XenCtrl.open(self._binding)
        self._foreign: ForeignMemory | None = None
        self._store: XenStore | None = None
        self._owns_store = store is None
        try:
            self._foreign = ForeignMemory.open(self._binding)
            self._store = store if store is not None else PyxsStore()
        except BaseException:
            self._close_handles()
            raise
        self._info: DomainInfo | None = None
        self._pv: PvDomain | None = None
        self._suspended = False
        self._dirty_log: DirtyLog | None = None
        self._logdirty_enabled = False
        self._pages_mapped: ForeignMapping | None = None
        self._channel: XenSoftPageChannel | None = None
        self._channel_opened = False
        self.channel_reason: str | None = None
        """Why ``soft_channel()`` returned None, for the caller's log."""
        self._cleaned_up = False

    # -- MigrationBackend ------------------------------------------------
    def describe(self) -> DomainInfo:
        if self._info is not None:
            return self._info
        state = self.domain_state()
        if state.dying:
            raise BackendError(f"dom {self.domid} is dying")
        guest_type = state.guest_type
        if guest_type not in self._supported_types:
            raise BackendError(f"dom {self.domid}: {UNSUPPORTED_REASONS[guest_type]}")
        name = self._xenstore().read(f"/local/domain/{self.domid}/name") or f"domain-{self.domid}"
        if guest_type is GuestType.PV:
            self._pv = PvDomain(self._ctrl, self._foreign_memory(), state,
                                p2m_size_limit(state.max_pages))
            p2m_size = self._pv.p2m_size
        else:
            p2m_size = self._ctrl.maximum_gpfn(self.domid) + 1
            check_p2m_size(self.domid, p2m_size, state.max_pages)
        self._info = DomainInfo(
            domid=self.domid,
            name=name,
            guest_type=guest_type,
            p2m_size=p2m_size,
            max_memkb=state.max_pages * 4,
            nr_vcpus=state.nr_vcpus,
            xen_version=self._ctrl.xen_version(),
        )
        return self._info

    def static_info(self) -> StaticInfo:
        policy = self._ctrl.cpu_policy(self.domid)
        self.describe()
        if self._pv is None:
            return policy
        return dataclasses.replace(policy, pv=self._pv.static_info())

    def enable_logdirty(self) -> None:
        info = self.describe()
        if self._logdirty_enabled:
            raise BackendError(f"dom {self.domid}: log-dirty already enabled")
        if self._dirty_log is None:
            self._dirty_log = self._ctrl.dirty_log(self.domid, info.p2m_size)
        try:
            self._ctrl.enable_logdirty(self.domid)
        except OSError as error:
            if info.guest_type is GuestType.PV and error.errno == errno.EOPNOTSUPP:
                raise BackendError(
                    f"dom {self.domid}: this hypervisor has no log-dirty for PV guests (built without "
                    "shadow paging, as Debian's 4.17.7): PV guests cannot be migrated live here; "
                    "a non-live save works") from error
            raise
        self._logdirty_enabled = True

    def harvest_dirty(self, final: bool) -> PfnSet:
        if not self._logdirty_enabled or self._dirty_log is None:
            raise BackendError(f"dom {self.domid}: harvest_dirty before enable_logdirty")
        dirty, _xen_dirty_count = self._dirty_log.clean(final)
        if self._pv is not None:
            self._pv.check_p2m_unchanged()
        return dirty

    def page_types(self, pfns: PfnArray) -> npt.NDArray[np.uint32]:
        checked = check_pfns(pfns, self.describe().p2m_size, "page_types")
        if self._pv is not None:
            return self._pv.page_types(checked)
        return self._ctrl.page_types(self.domid, checked)

    def read_pages(self, pfns: PfnArray, types: npt.NDArray[np.uint32]) -> PageBatch:
        """One foreign map call for the batch; the view is the mapping itself, no
        copy (1 ms per 1024 pages natively, far more under TCG). The mapping
        lives until the next call or ``cleanup()``, which unmap it: that is the
        interface's "valid until the next call", and it holds one batch mapped
        at most. The driver writes each batch out before it reads the next.
        A PV guest's pages are mapped by mfn and its page tables copied and
        rewritten in pfns (deferred while the guest runs if it is changing one)."""
        self._unmap_pages()
        checked = check_pfns(pfns, self.describe().p2m_size, "read_pages")
        if checked.size == 0:
            return PageBatch(memoryview(b""))
        frames = checked if self._pv is None else self._pv.mfns_of(checked)
        self._pages_mapped = self._foreign_memory().map_readonly(self.domid, frames)
        if self._pv is None:
            return PageBatch(self._pages_mapped.view)
        return self._pv.normalise(self._pages_mapped.view, np.asarray(types, dtype=np.uint32),
                                  strict=self._suspended)

    def suspend(self) -> None:
        suspend_guest(self._xenstore(), self.domid, self.domain_state, self._suspend_timeouts)
        self._suspended = True

    def adopt_suspend(self) -> None:
        """The domain was suspended by the toolstack (libxl, for the save helper): check that Xen
        agrees, as ``xc_domain_save`` does after its suspend callback, and treat it as suspended."""
        if not self.domain_state().suspended:
            # libxl 4.17-4.20 answers its suspend callback with success when the guest did not
            # acknowledge the request in time (domain_suspend_common_pvcontrol_suspending).
            raise BackendError(f"dom {self.domid}: the toolstack reported it suspended, but Xen shows it "
                               "not suspended (libxl does so when the guest did not acknowledge the request)")
        self._suspended = True

    def end_of_checkpoint(self) -> EndOfCheckpoint:
        state = self.domain_state()
        if not state.suspended:
            raise BackendError(f"dom {self.domid}: end_of_checkpoint needs the domain suspended")
        if self._pv is not None:
            self._pv.check_p2m_unchanged()
            return EndOfCheckpoint(
                tsc=self._ctrl.tsc_info(self.domid),
                pv_shared_info=self._pv.shared_info(),
                pv_vcpus=self._pv.vcpu_states(state.max_vcpu_id),
            )
        return EndOfCheckpoint(
            tsc=self._ctrl.tsc_info(self.domid),
            hvm_context=self._ctrl.hvm_context(self.domid),
            hvm_params=tuple(self._ctrl.stream_hvm_params(self.domid)),
        )

    def resume(self) -> None:
        """As ``libxl_domain_resume(suspend_cancel=1)``: the hypervisor, then xenstored."""
        resume_guest(self._ctrl, self._xenstore(), self.domid)
        self._suspended = False

    def soft_channel(self) -> XenSoftPageChannel | None:
        """Connect once; later calls return the same channel (or None again)."""
        if self._channel_opened:
            return self._channel
        self._channel_opened = True
        grants = GrantTable.open(self._binding)
        try:
            events = EventChannels.open(self._binding)
        except BaseException:
            grants.close()
            raise
        self._channel, self.channel_reason = XenSoftPageChannel.connect(
            self.domid, self._xenstore(), self.describe().p2m_size, grants, events, self.domain_state
        )
        return self._channel

    def cleanup(self) -> None:
        """Log-dirty off, unmap, close; does its work once. Every step runs;
        the first error is raised at the end."""
        if self._cleaned_up:
            return
        self._cleaned_up = True
        errors: list[Exception] = []
        steps: list[Any] = [self._close_channel, self._unmap_pages]
        if self._logdirty_enabled:
            steps.append(lambda: self._ctrl.disable_logdirty(self.domid))
        steps.append(self._free_dirty_log)
        steps.append(self._close_handles)
        for step in steps:
            try:
                step()
            except (BackendError, OSError) as error:
                errors.append(error)
        self._logdirty_enabled = False
        if errors:
            raise errors[0]

    # -- extras for the driver and tests -----------------------------------
    def domain_state(self) -> DomainState:
        return self._ctrl.domain_state(self.domid)

    def peek_dirty(self) -> PfnSet:
        """The dirty set so far without resetting the log (``SHADOW_OP_PEEK``)."""
        if not self._logdirty_enabled or self._dirty_log is None:
            raise BackendError(f"dom {self.domid}: peek_dirty before enable_logdirty")
        return self._dirty_log.peek()[0]

    # -- helpers -----------------------------------------------------------
    def _xenstore(self) -> XenStore:
        if self._store is None:
            raise BackendError(f"dom {self.domid}: backend used after cleanup()")
        return self._store

    def _foreign_memory(self) -> ForeignMemory:
        if self._foreign is None:
            raise BackendError(f"dom {self.domid}: backend used after cleanup()")
        return self._foreign

    def _close_channel(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            channel.close()

    def _unmap_pages(self) -> None:
        if self._pages_mapped is not None:
            mapping, self._pages_mapped = self._pages_mapped, None
            mapping.unmap()

    def _free_dirty_log(self) -> None:
        if self._dirty_log is not None:
            dirty_log, self._dirty_log = self._dirty_log, None
            dirty_log.free()

    def _close_handles(self) -> None:
        if self._foreign is not None:
            foreign, self._foreign = self._foreign, None
            foreign.close()
        if self._store is not None:
            store, self._store = self._store, None
            if self._owns_store:
                store.close()
        self._ctrl.close()

