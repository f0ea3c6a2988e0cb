"""libxenctrl and libxenguest, the parts a migration sender needs.

``XenCtrl`` owns one ``xc_interface`` handle. ``DirtyLog`` owns the
hypercall buffer the log-dirty bitmap lands in; it is allocated once for the
domain's ``p2m_size`` and reused by every round, as ``xc_domain_save`` does
with ``ctx->save.dirty_bitmap_hbuf``.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from softpage.abi import PAGE_SIZE
from softpage.backend import GuestType, StaticInfo, TscInfo
from softpage.errors import BackendError
from softpage.pfnset import PfnArray, PfnSet
from softpage.xen._binding import LibraryHandle, XenBinding, errno_error

# xen/include/public/domctl.h, struct xen_domctl_getdomaininfo (interface 0x15).
XEN_DOMINF_DYING = 1 << 0
XEN_DOMINF_HVM_GUEST = 1 << 1
XEN_DOMINF_SHUTDOWN = 1 << 2
XEN_DOMINF_PAUSED = 1 << 3
XEN_DOMINF_RUNNING = 1 << 5
XEN_DOMINF_HAP = 1 << 8
XEN_DOMINF_SHUTDOWN_MASK = 255
XEN_DOMINF_SHUTDOWN_SHIFT = 16
# xen/include/public/arch-x86/xen.h: only a full HVM guest emulates the PIT.
XEN_X86_EMU_PIT = 1 << 8
# xen/include/public/sched.h
SHUTDOWN_POWEROFF = 0
SHUTDOWN_REBOOT = 1
SHUTDOWN_SUSPEND = 2
SHUTDOWN_CRASH = 3
SHUTDOWN_WATCHDOG = 4
SHUTDOWN_SOFT_RESET = 5
SHUTDOWN_REASONS = {SHUTDOWN_POWEROFF: "poweroff", SHUTDOWN_REBOOT: "reboot", SHUTDOWN_SUSPEND: "suspend",
                    SHUTDOWN_CRASH: "crash", SHUTDOWN_WATCHDOG: "watchdog", SHUTDOWN_SOFT_RESET: "soft_reset"}
"""The names of ``SHUTDOWN_*``, by value."""

# xen/include/public/domctl.h, XEN_DOMCTL_shadow_op
XEN_DOMCTL_SHADOW_OP_OFF = 0
XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY = 2
XEN_DOMCTL_SHADOW_OP_CLEAN = 11
XEN_DOMCTL_SHADOW_OP_PEEK = 12
XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL = 1 << 0

# xen/include/public/domctl.h, XEN_DOMCTL_getpageframeinfo3
XEN_DOMCTL_PFINFO_LTAB_MASK = 0xF << 28
XEN_DOMCTL_PFINFO_LPINTAB = 1 << 31
XEN_DOMCTL_PFINFO_XTAB = 0xF << 28
PFN_TYPE_BATCH = 1024
"""getpageframeinfo3 takes at most 1024 PFNs per call (xen/arch/x86/domctl.c)."""

# The HVM params write_hvm_params() saves, in its order
# (tools/libs/guest/xg_sr_save_x86_hvm.c, Xen 4.17); xen/include/public/hvm/params.h.
STREAM_HVM_PARAMS = (
    ("STORE_PFN", 1),
    ("IOREQ_PFN", 5),
    ("BUFIOREQ_PFN", 6),
    ("PAGING_RING_PFN", 27),
    ("MONITOR_RING_PFN", 28),
    ("SHARING_RING_PFN", 29),
    ("VM86_TSS_SIZED", 37),
    ("CONSOLE_PFN", 17),
    ("ACPI_IOPORTS_LOCATION", 19),
    ("VIRIDIAN", 9),
    ("IDENT_PT", 12),
    ("VM_GENERATION_ID_ADDR", 34),
    ("IOREQ_SERVER_PFN", 32),
    ("NR_IOREQ_SERVER_PAGES", 33),
    ("X87_FIP_WIDTH", 36),
    ("MCA_CAP", 38),
)

XENVER_VERSION = 0


@dataclass(frozen=True)
class DomainState:
    """One ``xc_domain_getinfolist`` entry, decoded."""

    domid: int
    flags: int
    tot_pages: int
    max_pages: int
    nr_online_vcpus: int
    max_vcpu_id: int
    emulation_flags: int
    shared_info_frame: int = 0
    """The mfn of a PV guest's shared info page."""

    @property
    def dying(self) -> bool:
        return bool(self.flags & XEN_DOMINF_DYING)

    @property
    def paused(self) -> bool:
        return bool(self.flags & XEN_DOMINF_PAUSED)

    @property
    def shutdown(self) -> bool:
        return bool(self.flags & XEN_DOMINF_SHUTDOWN)

    @property
    def shutdown_reason(self) -> int | None:
        """``SHUTDOWN_*`` if the domain has shut down, else None."""
        if not self.shutdown:
            return None
        return (self.flags >> XEN_DOMINF_SHUTDOWN_SHIFT) & XEN_DOMINF_SHUTDOWN_MASK

    @property
    def suspended(self) -> bool:
        """Shut down with reason suspend: what ``suspend_domain()`` checks."""
        return self.shutdown_reason == SHUTDOWN_SUSPEND

    @property
    def gone(self) -> str | None:
        """Why this domain will not answer a request any more: dying, or shut down for a
        reason other than suspend; None while it runs (or is suspended, which is dom0's doing)."""
        if self.dying:
            return "is dying"
        reason = self.shutdown_reason
        if reason is None or reason == SHUTDOWN_SUSPEND:
            return None
        name = SHUTDOWN_REASONS.get(reason, str(reason))
        # hvm_triple_fault() shuts an HVM or PVH guest down with HVM_PARAM_TRIPLE_FAULT_REASON:
        # reboot unless the toolstack changed it (hvm_domain_initialise; Xen 4.17's log on the
        # testbed: "Triple fault - invoking HVM shutdown action 1").
        triple = reason in (SHUTDOWN_REBOOT, SHUTDOWN_CRASH) and self.flags & XEN_DOMINF_HVM_GUEST
        hint = " or a triple fault: `xl dmesg` says which" if triple else ""
        return f"shut down (reason {name}{hint})"

    @property
    def guest_type(self) -> GuestType:
        if not self.flags & XEN_DOMINF_HVM_GUEST:
            return GuestType.PV
        # Xen accepts an HVM domain only with the full emulation set and a
        # PVH one only without the legacy timers; the PIT tells them apart.
        return GuestType.HVM if self.emulation_flags & XEN_X86_EMU_PIT else GuestType.PVH

    @property
    def nr_vcpus(self) -> int:
        """VCPUs the stream describes: ``max_vcpu_id + 1``, as libxl counts them."""
        return self.max_vcpu_id + 1


def dirty_bitmap_pages(p2m_size: int) -> int:
    """Pages of hypercall buffer for a log-dirty bitmap of ``p2m_size`` bits.

    Whole 64-bit words, as Xen copies ``unsigned long`` chunks and PfnSet
    keeps words; at least one page so an empty domain still gets a valid
    buffer.
    """
    if p2m_size < 0:
        raise BackendError(f"p2m_size must be >= 0, got {p2m_size}")
    nbytes = (p2m_size + 63) // 64 * 8
    return max(1, (nbytes + PAGE_SIZE - 1) // PAGE_SIZE)


def pfn_type_batches(count: int, batch: int = PFN_TYPE_BATCH) -> list[tuple[int, int]]:
    """``(start, stop)`` slices of at most ``batch`` PFNs covering ``count``."""
    return [(start, min(start + batch, count)) for start in range(0, count, batch)]


class DirtyLog:
    """The log-dirty bitmap hypercall buffer of one domain, reused across rounds."""

    def __init__(self, ctrl: XenCtrl, domid: int, p2m_size: int) -> None:
        self._ctrl = ctrl
        self.domid = domid
        self.p2m_size = p2m_size
        self.nr_pages = dirty_bitmap_pages(p2m_size)
        ffi, lib = ctrl.binding.ffi, ctrl.binding.lib
        # HYPERCALL_BUFFER_INIT_NO_BOUNCE: no bounce copy, hbuf filled by alloc.
        self._hbuf = ffi.new("xc_hypercall_buffer_t *")
        self._hbuf.hbuf = ffi.NULL
        self._hbuf.param_shadow = ffi.NULL
        self._hbuf.dir = 0
        self._hbuf.sz = 0
        self._hbuf.ubuf = ffi.cast("void *", -1)
        memory = lib.xc__hypercall_buffer_alloc_pages(ctrl.handle, self._hbuf, self.nr_pages)
        ctrl.binding.check_ptr(memory, "xc_hypercall_buffer_alloc_pages", domid)
        self._memory: Any = memory
        np.frombuffer(ffi.buffer(memory, self.nr_pages * PAGE_SIZE), dtype=np.uint8)[:] = 0

    def clean(self, final: bool) -> tuple[PfnSet, int]:
        """``XEN_DOMCTL_SHADOW_OP_CLEAN``: the dirty set and Xen's dirty count; resets the log."""
        mode = XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL if final else 0
        return self._control(XEN_DOMCTL_SHADOW_OP_CLEAN, mode)

    def peek(self) -> tuple[PfnSet, int]:
        """``XEN_DOMCTL_SHADOW_OP_PEEK``: the dirty set without resetting the log."""
        return self._control(XEN_DOMCTL_SHADOW_OP_PEEK, 0)

    def _control(self, op: int, mode: int) -> tuple[PfnSet, int]:
        if self._memory is None:
            raise BackendError(f"dom {self.domid}: log-dirty buffer already freed")
        binding = self._ctrl.binding
        ffi, lib = binding.ffi, binding.lib
        stats = ffi.new("xc_shadow_op_stats_t *")
        rc = lib.xc_logdirty_control(
            self._ctrl.handle, self.domid, op, self._hbuf, self.p2m_size, mode, stats
        )
        binding.check_rc(rc, "xc_logdirty_control", self.domid)
        nbytes = (self.p2m_size + 63) // 64 * 8
        dirty = PfnSet.from_bytes(self.p2m_size, ffi.buffer(self._memory, nbytes))
        return dirty, int(stats.dirty_count)

    def free(self) -> None:
        """Release the buffer; idempotent."""
        if self._memory is None:
            return
        self._ctrl.binding.lib.xc__hypercall_buffer_free_pages(self._ctrl.handle, self._hbuf, self.nr_pages)
        self._memory = None


class XenCtrl(LibraryHandle):
    """An open ``xc_interface``. Use as a context manager or call ``close()``."""

    LIBRARY = "xc_interface"
    OPEN = "xc_interface_open"
    CLOSE = "xc_interface_close"

    def __init__(self, binding: XenBinding, handle: Any) -> None:
        super().__init__(binding, handle)
        self._type_scratch = np.zeros(PFN_TYPE_BATCH, dtype=np.uint64)

    @classmethod
    def _open_raw(cls, binding: XenBinding) -> Any:
        return binding.lib.xc_interface_open(binding.ffi.NULL, binding.ffi.NULL, 0)

    # -- facts -----------------------------------------------------------
    def xen_version(self) -> tuple[int, int]:
        """``(major, minor)`` of the running hypervisor (``XENVER_version``)."""
        packed = self.binding.check_rc(
            self.binding.lib.xc_version(self.handle, XENVER_VERSION, self.binding.ffi.NULL),
            "xc_version",
        )
        return packed >> 16, packed & 0xFFFF

    def domain_state(self, domid: int) -> DomainState:
        info = self.binding.ffi.new("xc_domaininfo_t *")
        found = self.binding.check_rc(
            self.binding.lib.xc_domain_getinfolist(self.handle, domid, 1, info),
            "xc_domain_getinfolist",
            domid,
        )
        # getinfolist returns the next domain up when ``domid`` does not exist.
        if found != 1 or info.domain != domid:
            raise errno_error(errno.ESRCH, "xc_domain_getinfolist", domid)
        return DomainState(
            domid=int(info.domain),
            flags=int(info.flags),
            tot_pages=int(info.tot_pages),
            max_pages=int(info.max_pages),
            nr_online_vcpus=int(info.nr_online_vcpus),
            max_vcpu_id=int(info.max_vcpu_id),
            emulation_flags=int(info.arch_config.emulation_flags),
            shared_info_frame=int(info.shared_info_frame),
        )

    def maximum_gpfn(self, domid: int) -> int:
        gpfn = self.binding.ffi.new("xen_pfn_t *")
        self.binding.check_rc(
            self.binding.lib.xc_domain_maximum_gpfn(self.handle, domid, gpfn),
            "xc_domain_maximum_gpfn",
            domid,
        )
        return int(gpfn[0])

    # -- log-dirty -------------------------------------------------------
    def shadow_control(self, domid: int, op: int) -> None:
        self.binding.check_rc(
            self.binding.lib.xc_shadow_control(self.handle, domid, op, self.binding.ffi.NULL, 0),
            f"xc_shadow_control(op {op})",
            domid,
        )

    def enable_logdirty(self, domid: int) -> None:
        """As ``enable_logdirty()`` in xg_sr_save.c: if enabling fails (log-dirty
        already on, e.g. VRAM tracking), turn it off and try once more. If that
        fails too, the first error is the one that says why (EOPNOTSUPP: a PV
        guest on a hypervisor without shadow paging, whose OFF then fails with
        EINVAL)."""
        try:
            self.shadow_control(domid, XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY)
        except OSError as first:
            try:
                self.shadow_control(domid, XEN_DOMCTL_SHADOW_OP_OFF)
                self.shadow_control(domid, XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY)
            except OSError:
                raise first from None

    def disable_logdirty(self, domid: int) -> None:
        self.shadow_control(domid, XEN_DOMCTL_SHADOW_OP_OFF)

    def dirty_log(self, domid: int, p2m_size: int) -> DirtyLog:
        return DirtyLog(self, domid, p2m_size)

    # -- pages -----------------------------------------------------------
    def page_types(self, domid: int, pfns: PfnArray) -> npt.NDArray[np.uint32]:
        """``XEN_DOMCTL_PFINFO_*`` of each frame (a GFN for HVM/PVH, an MFN for PV), 1024 per
        hypercall."""
        pfns = np.ascontiguousarray(pfns, dtype=np.uint64)
        types = np.empty(pfns.size, dtype=np.uint32)
        scratch = self._type_scratch
        pointer = self.binding.ffi.from_buffer("xen_pfn_t[]", scratch)
        for start, stop in pfn_type_batches(pfns.size):
            count = stop - start
            scratch[:count] = pfns[start:stop]
            self.binding.check_rc(
                self.binding.lib.xc_get_pfn_type_batch(self.handle, domid, count, pointer),
                "xc_get_pfn_type_batch",
                domid,
                int(pfns[start]),
            )
            # Xen writes the type alone into each word; keep only its defined bits.
            types[start:stop] = scratch[:count] & np.uint64(
                XEN_DOMCTL_PFINFO_LTAB_MASK | XEN_DOMCTL_PFINFO_LPINTAB
            )
        return types

    # -- end of checkpoint -----------------------------------------------
    def hvm_context(self, domid: int) -> bytes:
        """The ``HVM_CONTEXT`` blob: size query, then fetch (write_hvm_context)."""
        ffi, lib = self.binding.ffi, self.binding.lib
        size = self.binding.check_rc(
            lib.xc_domain_hvm_getcontext(self.handle, domid, ffi.NULL, 0),
            "xc_domain_hvm_getcontext(size)",
            domid,
        )
        buffer = ffi.new("uint8_t[]", size)
        length = self.binding.check_rc(
            lib.xc_domain_hvm_getcontext(self.handle, domid, buffer, size),
            "xc_domain_hvm_getcontext",
            domid,
        )
        return bytes(ffi.buffer(buffer, length))

    def hvm_param(self, domid: int, index: int) -> int:
        value = self.binding.ffi.new("uint64_t *")
        self.binding.check_rc(
            self.binding.lib.xc_hvm_param_get(self.handle, domid, index, value),
            f"xc_hvm_param_get({index})",
            domid,
        )
        return int(value[0])

    def stream_hvm_params(self, domid: int) -> list[tuple[int, int]]:
        """``(index, value)`` for the non-zero params of ``STREAM_HVM_PARAMS``,
        exactly what write_hvm_params() puts in the HVM_PARAMS record."""
        params = [(index, self.hvm_param(domid, index)) for _name, index in STREAM_HVM_PARAMS]
        return [(index, value) for index, value in params if value != 0]

    def tsc_info(self, domid: int) -> TscInfo:
        ffi = self.binding.ffi
        mode, nsec = ffi.new("uint32_t *"), ffi.new("uint64_t *")
        khz, incarnation = ffi.new("uint32_t *"), ffi.new("uint32_t *")
        self.binding.check_rc(
            self.binding.lib.xc_domain_get_tsc_info(self.handle, domid, mode, nsec, khz, incarnation),
            "xc_domain_get_tsc_info",
            domid,
        )
        return TscInfo(mode=int(mode[0]), khz=int(khz[0]), nsec=int(nsec[0]), incarnation=int(incarnation[0]))

    def cpu_policy(self, domid: int) -> StaticInfo:
        """CPUID and MSR policy records, as write_x86_cpu_policy_records() makes them."""
        ffi, lib = self.binding.ffi, self.binding.lib
        nr_leaves, nr_msrs = ffi.new("uint32_t *"), ffi.new("uint32_t *")
        self.binding.check_rc(
            lib.xc_cpu_policy_get_size(self.handle, nr_leaves, nr_msrs), "xc_cpu_policy_get_size"
        )
        leaves = ffi.new("xen_cpuid_leaf_t[]", max(1, nr_leaves[0]))
        msrs = ffi.new("xen_msr_entry_t[]", max(1, nr_msrs[0]))
        policy = self.binding.check_ptr(lib.xc_cpu_policy_init(), "xc_cpu_policy_init", domid)
        try:
            self.binding.check_rc(
                lib.xc_cpu_policy_get_domain(self.handle, domid, policy), "xc_cpu_policy_get_domain", domid
            )
            self.binding.check_rc(
                lib.xc_cpu_policy_serialise(self.handle, policy, leaves, nr_leaves, msrs, nr_msrs),
                "xc_cpu_policy_serialise",
                domid,
            )
        finally:
            lib.xc_cpu_policy_destroy(policy)
        return StaticInfo(
            cpuid_policy=bytes(ffi.buffer(leaves, nr_leaves[0] * ffi.sizeof("xen_cpuid_leaf_t"))),
            msr_policy=bytes(ffi.buffer(msrs, nr_msrs[0] * ffi.sizeof("xen_msr_entry_t"))),
        )

    # -- PV guests --------------------------------------------------------
    def guest_width(self, domid: int) -> int:
        """Bytes in the PV guest's ``unsigned long`` (4 or 8)."""
        width = self.binding.ffi.new("unsigned int *")
        self.binding.check_rc(
            self.binding.lib.xc_domain_get_guest_width(self.handle, domid, width),
            "xc_domain_get_guest_width",
            domid,
        )
        return int(width[0])

    def maximum_ram_page(self) -> int:
        """The highest machine frame of the host (``XENMEM_maximum_ram_page``)."""
        mfn = self.binding.ffi.new("unsigned long *")
        self.binding.check_rc(
            self.binding.lib.xc_maximum_ram_page(self.handle, mfn), "xc_maximum_ram_page"
        )
        return int(mfn[0])

    def pv_vcpu_online(self, domid: int, vcpu: int) -> bool:
        online = self.binding.check_rc(
            self.binding.lib.softpage_pv_vcpu_online(self.handle, domid, vcpu),
            f"xc_vcpu_getinfo(vcpu {vcpu})",
            domid,
        )
        return bool(online)

    def pv_vcpu_state(self, domid: int, vcpu: int, kind: str) -> bytes:
        """One of a PV vCPU's blobs, as Xen gives it: ``kind`` is "basic"
        (``vcpu_guest_context_x86_64_t``), "extended", "xsave" or "msrs"; b"" when
        the vCPU has no such state."""
        ffi, lib = self.binding.ffi, self.binding.lib
        function = {
            "basic": lib.softpage_pv_vcpu_context,
            "extended": lib.softpage_pv_vcpu_extended,
            "xsave": lib.softpage_pv_vcpu_xsave,
            "msrs": lib.softpage_pv_vcpu_msrs,
        }[kind]
        capacity = max(PAGE_SIZE, int(lib.SOFTPAGE_PV_VCPU_CONTEXT_SIZE))
        size = ffi.new("size_t *")
        for _attempt in range(2):
            buffer = ffi.new("uint8_t[]", capacity)
            size[0] = capacity
            if function(self.handle, domid, vcpu, buffer, size) == 0:
                return bytes(ffi.buffer(buffer, size[0]))
            if ffi.errno != errno.ENOBUFS:
                break
            capacity = int(size[0])  # the state is bigger than guessed: once more, big enough
        raise errno_error(ffi.errno, f"get vcpu{vcpu} {kind} state", domid)

    # -- life cycle ------------------------------------------------------
    def shutdown(self, domid: int, reason: int) -> None:
        self.binding.check_rc(
            self.binding.lib.xc_domain_shutdown(self.handle, domid, reason), "xc_domain_shutdown", domid
        )

    def resume(self, domid: int, fast: bool = True) -> None:
        """``xc_domain_resume``; ``fast`` is the cooperative suspend-cancel
        resume Linux guests support (the guest sees ``.thaw``)."""
        self.binding.check_rc(
            self.binding.lib.xc_domain_resume(self.handle, domid, 1 if fast else 0),
            "xc_domain_resume",
            domid,
        )
