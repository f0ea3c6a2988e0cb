"""A model of the Xen tool libraries for testing softpage.xen without Xen.

``FakeXen`` stands in for the ``lib`` of ``softpage._xen``: same function
names and argument conventions (cdata pointers in and out, -1 and errno on
failure), backed by a small in-memory domain. ``fake_binding()`` pairs it
with a real cffi ``FFI`` declaring the types the API layer allocates, so the
marshalling code in softpage.xen (ffi.new, from_buffer, buffer, errno) runs
for real. It models what the contract promises, not Xen's internals:
log-dirty marks pages the fake guest writes, CLEAN resets, getpageframeinfo3
refuses more than 1024 PFNs, foreign maps fail per page with -errno for
PFNs that are not RAM, suspend is a shutdown with reason 2.
"""

from __future__ import annotations

import errno
import functools
from dataclasses import dataclass, field
from typing import Any

import cffi
import numpy as np

from softpage.abi import PAGE_SIZE
from softpage.xen._binding import XenBinding

XTAB = 0xF << 28
SHADOW_OP_OFF, SHADOW_OP_ENABLE_LOGDIRTY, SHADOW_OP_CLEAN, SHADOW_OP_PEEK = 0, 2, 11, 12
DOMINF_HVM_GUEST, DOMINF_SHUTDOWN = 1 << 1, 1 << 2
SHUTDOWN_SUSPEND = 2

FAKE_CDEF = """
typedef unsigned long xen_pfn_t;
struct xc_hypercall_buffer {
    void *hbuf; struct xc_hypercall_buffer *param_shadow; int dir; void *ubuf; size_t sz;
};
typedef struct xc_hypercall_buffer xc_hypercall_buffer_t;
typedef struct { uint32_t fault_count; uint32_t dirty_count; } xc_shadow_op_stats_t;
struct xen_arch_domainconfig { uint32_t emulation_flags; uint32_t misc_flags; };
typedef struct {
    uint16_t domain; uint32_t flags; uint64_t tot_pages; uint64_t max_pages;
    uint32_t nr_online_vcpus; uint32_t max_vcpu_id; uint64_t shared_info_frame;
    struct xen_arch_domainconfig arch_config;
} xc_domaininfo_t;
typedef struct { uint32_t leaf, subleaf; uint32_t a, b, c, d; } xen_cpuid_leaf_t;
typedef struct { uint32_t idx; uint32_t flags; uint64_t val; } xen_msr_entry_t;
"""


@dataclass
class FakeDomain:
    domid: int
    nr_pfns: int
    """RAM is PFNs [0, nr_pfns); p2m_size is nr_pfns + len(holes_above)."""
    hvm: bool = True
    emulation_flags: int = 0x1  # LAPIC only: PVH
    max_vcpu_id: int = 1
    extra_xtab_pfns: int = 16
    memory: bytearray = field(default_factory=bytearray)
    shutdown_reason: int | None = None
    logdirty: bool = False
    guest_width: int = 8
    """Bytes in a PV guest's unsigned long."""
    dirty: set[int] = field(default_factory=set)
    hvm_context: bytes = b"HVMCTX" * 50
    hvm_params: dict[int, int] = field(default_factory=lambda: {1: 0xFEFFF, 17: 0xFEFFE, 9: 0})
    tsc: tuple[int, int, int, int] = (0, 2_000_000, 123_456_789, 1)
    cpuid: list[tuple[int, ...]] = field(default_factory=lambda: [(0, 0xFFFFFFFF, 13, 1, 2, 3)])
    msrs: list[tuple[int, int, int]] = field(default_factory=lambda: [(0xCE, 0, 1)])

    def __post_init__(self) -> None:
        if not self.memory:
            self.memory = bytearray(self.nr_pfns * PAGE_SIZE)

    @property
    def p2m_size(self) -> int:
        return self.nr_pfns + self.extra_xtab_pfns

    def guest_write(self, pfn: int, data: bytes) -> None:
        """The guest writes a page: contents change, and log-dirty sees it."""
        if self.shutdown_reason is not None:
            raise AssertionError("a suspended guest does not write")
        self.memory[pfn * PAGE_SIZE : pfn * PAGE_SIZE + len(data)] = data
        if self.logdirty:
            self.dirty.add(pfn)


class FakeXen:
    """The ``lib`` half: functions named and called like libxenctrl & co."""

    PROT_READ = 1

    def __init__(self, ffi: cffi.FFI, domains: list[FakeDomain]) -> None:
        self.ffi = ffi
        self.domains = {domain.domid: domain for domain in domains}
        self.calls: list[tuple[Any, ...]] = []
        self.fail: dict[str, int] = {}
        """call name -> errno to fail it with (once per entry)."""
        self.open_handles = 0
        self.live_mappings: dict[int, int] = {}
        self.grants: dict[tuple[int, int], tuple[bytearray, int]] = {}
        """(domid, ref) -> (backing bytearray, page index): pages a guest granted."""
        self.hypercall_buffers: dict[int, Any] = {}
        self.bound_ports: set[int] = set()
        self.notified: list[int] = []
        self._keep: dict[int, Any] = {}
        self._next_port = 40

    # -- plumbing ----------------------------------------------------------
    def _failing(self, name: str) -> bool:
        self.calls.append((name,))
        code = self.fail.pop(name, None)
        if code is None:
            return False
        self.ffi.errno = code
        return True

    def _handle(self) -> Any:
        self.open_handles += 1
        return self.ffi.new("int *")

    def _domain(self, domid: int) -> FakeDomain | None:
        domain = self.domains.get(int(domid))
        if domain is None:
            self.ffi.errno = errno.ESRCH
        return domain

    # -- libxenctrl ----------------------------------------------------------
    def xc_interface_open(self, _logger: Any, _dombuild_logger: Any, _flags: int) -> Any:
        return self.ffi.NULL if self._failing("xc_interface_open") else self._handle()

    def xc_interface_close(self, _handle: Any) -> int:
        self.open_handles -= 1
        return 0

    def xc_version(self, _handle: Any, _cmd: int, _arg: Any) -> int:
        return (4 << 16) | 17

    def xc_domain_getinfolist(self, _handle: Any, first: int, count: int, info: Any) -> int:
        if self._failing("xc_domain_getinfolist"):
            return -1
        candidates = sorted(domid for domid in self.domains if domid >= first)
        if not candidates:
            return 0
        domain = self.domains[candidates[0]]
        info.domain = domain.domid
        flags = DOMINF_HVM_GUEST if domain.hvm else 0
        if domain.shutdown_reason is not None:
            flags |= DOMINF_SHUTDOWN | (domain.shutdown_reason << 16)
        info.flags = flags
        info.tot_pages = domain.nr_pfns
        info.max_pages = domain.nr_pfns
        info.nr_online_vcpus = domain.max_vcpu_id + 1
        info.max_vcpu_id = domain.max_vcpu_id
        info.arch_config.emulation_flags = domain.emulation_flags
        return 1

    def xc_domain_get_guest_width(self, _handle: Any, domid: int, width: Any) -> int:
        domain = self._domain(domid)
        if domain is None:
            return -1
        width[0] = domain.guest_width
        return 0

    def xc_domain_maximum_gpfn(self, _handle: Any, domid: int, gpfn: Any) -> int:
        domain = self._domain(domid)
        if domain is None:
            return -1
        gpfn[0] = domain.p2m_size - 1
        return 0

    def xc_shadow_control(self, _handle: Any, domid: int, op: int, _mb: Any, _mode: int) -> int:
        domain = self._domain(domid)
        if domain is None or self._failing(f"xc_shadow_control({op})"):
            return -1
        if op == SHADOW_OP_ENABLE_LOGDIRTY:
            if domain.logdirty:
                self.ffi.errno = errno.EINVAL
                return -1
            domain.logdirty = True
            domain.dirty.clear()
        elif op == SHADOW_OP_OFF:
            domain.logdirty = False
        return 0

    def xc__hypercall_buffer_alloc_pages(self, _handle: Any, hbuf: Any, nr_pages: int) -> Any:
        memory = self.ffi.new("char[]", nr_pages * PAGE_SIZE)
        hbuf.hbuf = memory
        self.hypercall_buffers[int(self.ffi.cast("uintptr_t", memory))] = memory
        return memory

    def xc__hypercall_buffer_free_pages(self, _handle: Any, hbuf: Any, _nr_pages: int) -> None:
        del self.hypercall_buffers[int(self.ffi.cast("uintptr_t", hbuf.hbuf))]

    def xc_logdirty_control(
        self, _handle: Any, domid: int, op: int, hbuf: Any, pages: int, mode: int, stats: Any
    ) -> int:
        domain = self._domain(domid)
        if domain is None or self._failing("xc_logdirty_control"):
            return -1
        if not domain.logdirty:
            self.ffi.errno = errno.EINVAL
            return -1
        self.calls.append(("logdirty", op, mode, pages))
        bits = np.zeros((pages + 63) // 64 * 64, dtype=np.uint8)
        bits[sorted(domain.dirty)] = 1
        packed = np.packbits(bits, bitorder="little").tobytes()
        self.ffi.memmove(hbuf.hbuf, packed, len(packed))
        stats.dirty_count = len(domain.dirty)
        if op == SHADOW_OP_CLEAN:
            domain.dirty.clear()
        return pages

    def xc_get_pfn_type_batch(self, _handle: Any, domid: int, count: int, array: Any) -> int:
        domain = self._domain(domid)
        if domain is None or self._failing("xc_get_pfn_type_batch"):
            return -1
        if count > 1024:
            self.ffi.errno = errno.E2BIG
            return -1
        self.calls.append(("types", count))
        for index in range(count):
            array[index] = 0 if array[index] < domain.nr_pfns else XTAB
        return 0

    def xc_domain_hvm_getcontext(self, _handle: Any, domid: int, buffer: Any, size: int) -> int:
        domain = self._domain(domid)
        if domain is None:
            return -1
        if buffer == self.ffi.NULL:
            return len(domain.hvm_context)
        if size < len(domain.hvm_context):
            self.ffi.errno = errno.ENOSPC
            return -1
        self.ffi.memmove(buffer, domain.hvm_context, len(domain.hvm_context))
        return len(domain.hvm_context)

    def xc_hvm_param_get(self, _handle: Any, domid: int, index: int, value: Any) -> int:
        domain = self._domain(domid)
        if domain is None:
            return -1
        value[0] = domain.hvm_params.get(int(index), 0)
        return 0

    def xc_domain_get_tsc_info(
        self, _handle: Any, domid: int, mode: Any, nsec: Any, khz: Any, incarnation: Any
    ) -> int:
        domain = self._domain(domid)
        if domain is None:
            return -1
        mode[0], khz[0], nsec[0], incarnation[0] = domain.tsc
        return 0

    def xc_cpu_policy_get_size(self, _handle: Any, nr_leaves: Any, nr_msrs: Any) -> int:
        nr_leaves[0], nr_msrs[0] = 8, 4
        return 0

    def xc_cpu_policy_init(self) -> Any:
        return self._handle()

    def xc_cpu_policy_destroy(self, _policy: Any) -> None:
        self.open_handles -= 1

    def xc_cpu_policy_get_domain(self, _handle: Any, domid: int, _policy: Any) -> int:
        if self._domain(domid) is None or self._failing("xc_cpu_policy_get_domain"):
            return -1
        self._policy_domid = int(domid)
        return 0

    def xc_cpu_policy_serialise(
        self, _handle: Any, _policy: Any, leaves: Any, nr_leaves: Any, msrs: Any, nr_msrs: Any
    ) -> int:
        domain = self.domains[self._policy_domid]
        for index, leaf in enumerate(domain.cpuid):
            leaves[index].leaf, leaves[index].subleaf = leaf[0], leaf[1]
            leaves[index].a, leaves[index].b, leaves[index].c, leaves[index].d = leaf[2:]
        for index, (msr_index, flags, value) in enumerate(domain.msrs):
            msrs[index].idx, msrs[index].flags, msrs[index].val = msr_index, flags, value
        nr_leaves[0], nr_msrs[0] = len(domain.cpuid), len(domain.msrs)
        return 0

    def xc_domain_shutdown(self, _handle: Any, domid: int, reason: int) -> int:
        domain = self._domain(domid)
        if domain is None:
            return -1
        domain.shutdown_reason = int(reason)
        return 0

    def xc_domain_resume(self, _handle: Any, domid: int, fast: int) -> int:
        domain = self._domain(domid)
        if domain is None or self._failing("xc_domain_resume"):
            return -1
        self.calls.append(("resume", int(domid), int(fast)))
        domain.shutdown_reason = None
        return 0

    # -- libxenforeignmemory --------------------------------------------------
    def xenforeignmemory_open(self, _logger: Any, _flags: int) -> Any:
        return self.ffi.NULL if self._failing("xenforeignmemory_open") else self._handle()

    def xenforeignmemory_close(self, _handle: Any) -> int:
        self.open_handles -= 1
        return 0

    def xenforeignmemory_map(
        self, _handle: Any, domid: int, prot: int, count: int, pfns: Any, errors: Any
    ) -> Any:
        domain = self._domain(domid)
        if domain is None:
            return self.ffi.NULL
        if prot != self.PROT_READ:
            raise AssertionError(f"softpage maps read-only, got prot {prot}")
        self.calls.append(("map", int(count)))
        mapping = self.ffi.new("char[]", count * PAGE_SIZE)
        for index in range(count):
            pfn = int(pfns[index])
            if pfn >= domain.nr_pfns:
                errors[index] = -errno.EFAULT
                continue
            errors[index] = 0
            self.ffi.memmove(
                mapping + index * PAGE_SIZE,
                bytes(domain.memory[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE]),
                PAGE_SIZE,
            )
        self._remember(mapping, count)
        return mapping

    def xenforeignmemory_unmap(self, _handle: Any, address: Any, count: int) -> int:
        return self._forget(address, count)

    # -- libxengnttab -----------------------------------------------------------
    def xengnttab_open(self, _logger: Any, _flags: int) -> Any:
        return self.ffi.NULL if self._failing("xengnttab_open") else self._handle()

    def xengnttab_close(self, _handle: Any) -> int:
        self.open_handles -= 1
        return 0

    def xengnttab_map_domain_grant_refs(
        self, _handle: Any, count: int, domid: int, refs: Any, prot: int
    ) -> Any:
        if prot != self.PROT_READ:
            raise AssertionError(f"softpage maps grants read-only, got prot {prot}")
        self.calls.append(("grant-map", int(count)))
        pages = [self.grants.get((int(domid), int(refs[index]))) for index in range(count)]
        if any(page is None for page in pages):
            self.ffi.errno = errno.EINVAL
            return self.ffi.NULL
        backing, first = pages[0]  # type: ignore[misc]
        # Live mapping when the refs name consecutive pages of one backing store
        # (the fake guest allocates them that way), so seqlock tests see updates.
        if all(page == (backing, first + index) for index, page in enumerate(pages)):
            view = memoryview(backing)[first * PAGE_SIZE : (first + count) * PAGE_SIZE]
            mapping = self.ffi.from_buffer("char[]", view)
        else:
            mapping = self.ffi.new("char[]", count * PAGE_SIZE)
            for index, (store, page) in enumerate(pages):  # type: ignore[misc]
                self.ffi.memmove(
                    mapping + index * PAGE_SIZE,
                    bytes(store[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]),
                    PAGE_SIZE,
                )
        self._remember(mapping, count)
        return mapping

    def xengnttab_unmap(self, _handle: Any, address: Any, count: int) -> int:
        return self._forget(address, count)

    # -- libxenevtchn -----------------------------------------------------------
    def xenevtchn_open(self, _logger: Any, _flags: int) -> Any:
        return self.ffi.NULL if self._failing("xenevtchn_open") else self._handle()

    def xenevtchn_close(self, _handle: Any) -> int:
        self.open_handles -= 1
        return 0

    def xenevtchn_bind_interdomain(self, _handle: Any, domid: int, remote_port: int) -> int:
        if self._domain(domid) is None or self._failing("xenevtchn_bind_interdomain"):
            return -1
        self._next_port += 1
        self.bound_ports.add(self._next_port)
        return self._next_port

    def xenevtchn_notify(self, _handle: Any, port: int) -> int:
        if int(port) not in self.bound_ports:
            self.ffi.errno = errno.EINVAL
            return -1
        self.notified.append(int(port))
        return 0

    def xenevtchn_unbind(self, _handle: Any, port: int) -> int:
        self.bound_ports.discard(int(port))
        return 0

    # -- mappings ------------------------------------------------------------------
    def _remember(self, mapping: Any, count: int) -> None:
        address = int(self.ffi.cast("uintptr_t", mapping))
        self.live_mappings[address] = count
        self._keep[address] = mapping

    def _forget(self, address: Any, count: int) -> int:
        key = int(self.ffi.cast("uintptr_t", address))
        if self.live_mappings.pop(key, None) != count:
            self.ffi.errno = errno.EINVAL
            return -1
        del self._keep[key]
        return 0


@functools.cache
def _fake_ffi() -> cffi.FFI:
    """Parsing the cdef takes a third of a second; one FFI serves every test."""
    ffi = cffi.FFI()
    ffi.cdef(FAKE_CDEF)
    return ffi


def fake_binding(domains: list[FakeDomain]) -> tuple[XenBinding, FakeXen]:
    ffi = _fake_ffi()
    lib = FakeXen(ffi, domains)
    return XenBinding(ffi=ffi, lib=lib), lib


class FakeSoftPageGuest:
    """The guest module's side of docs/spec/guest-protocol.md, on FakeXen grants
    and a MemoryStore: one header page, the list pages, then the bitmap pages,
    granted with consecutive refs starting at ``first_ref``."""

    def __init__(
        self, lib: FakeXen, store: Any, domid: int, nr_pfns: int, first_ref: int = 100, port: int = 7
    ) -> None:
        from softpage import abi

        self.lib, self.store, self.domid, self.nr_pfns = lib, store, domid, nr_pfns
        self.frames_per_category = abi.frames_per_category(nr_pfns)
        self.nr_list_frames = abi.nr_list_frames(self.frames_per_category)
        nr_bitmaps = abi.NR_CATEGORIES * self.frames_per_category
        self.pages = bytearray((1 + self.nr_list_frames + nr_bitmaps) * PAGE_SIZE)
        self.header_ref = first_ref
        self.list_refs = [first_ref + 1 + index for index in range(self.nr_list_frames)]
        self.bitmap_refs = [first_ref + 1 + self.nr_list_frames + index for index in range(nr_bitmaps)]
        for page, ref in enumerate([self.header_ref, *self.list_refs, *self.bitmap_refs]):
            lib.grants[(domid, ref)] = (self.pages, page)
        refs = np.zeros(self.nr_list_frames * PAGE_SIZE // 4, dtype="<u4")
        refs[:nr_bitmaps] = self.bitmap_refs
        self.pages[PAGE_SIZE : (1 + self.nr_list_frames) * PAGE_SIZE] = refs.tobytes()
        self.generation = 0
        self.publish_empty()
        home = f"/local/domain/{domid}/data/softpage"
        for key, value in (
            ("version", "1"),
            ("header-gref", str(self.header_ref)),
            ("event-channel", str(port)),
            ("request", "0"),
            ("armed", "0"),
            ("state", "ready"),
        ):
            store.write(f"{home}/{key}", value)

    def publish_empty(self) -> None:
        from softpage.pfnset import PfnSet
        from softpage.snapshot import SnapshotState, SoftSnapshot

        empty = PfnSet.empty(self.nr_pfns)
        self.publish(
            SoftSnapshot(
                state=SnapshotState.EMPTY,
                generation=0,
                request_id=0,
                flags=0,
                guest_nr_pfns=self.nr_pfns,
                scan_ns=0,
                free=empty,
                cache=empty,
                slab=empty,
                held=empty,
            )
        )

    def begin_write(self) -> None:
        """Make the generation odd, as the guest does before touching the bitmaps."""
        self.generation += 1
        self.pages[16:24] = self.generation.to_bytes(8, "little")

    def publish(self, snapshot: Any) -> bytes:
        """Publish ``snapshot`` under the seqlock (its generation replaced); return the expected copy."""
        from dataclasses import replace

        from softpage import bitmap

        if self.generation % 2 == 0:
            self.begin_write()
        encoded = bytearray(
            bitmap.encode(replace(snapshot, generation=self.generation + 1), list_grefs=self.list_refs)
        )
        header, bitmaps = encoded[:PAGE_SIZE], encoded[PAGE_SIZE:]
        bitmap_start = (1 + self.nr_list_frames) * PAGE_SIZE
        self.pages[bitmap_start : bitmap_start + len(bitmaps)] = bitmaps
        self.pages[24:PAGE_SIZE] = header[24:]
        self.pages[0:16] = header[0:16]
        self.generation += 1
        self.pages[16:24] = self.generation.to_bytes(8, "little")
        return bytes(encoded)


class SuspendResponder:
    """The guest kernel's shutdown_handler for a FakeDomain: acks
    ``control/shutdown = suspend`` by writing "" and suspends the domain
    (shutdown reason 2, then @releaseDomain), as Linux and Xen do."""

    def __init__(self, store: Any, domain: FakeDomain) -> None:
        import threading

        self.store, self.domain = store, domain
        self.node = f"/local/domain/{domain.domid}/control/shutdown"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-guest-suspend", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self.store.watch(self.node) as watch:
            while not self._stop.is_set():
                watch.wait(0.02)
                if self.store.read(self.node) == "suspend":
                    self.store.write(self.node, "")
                    self.domain.shutdown_reason = SHUTDOWN_SUSPEND
                    self.store.fire("@releaseDomain")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
