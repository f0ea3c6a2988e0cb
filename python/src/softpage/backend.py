"""The source-side backend contract: one ops table, two implementations.

Modelled on ``struct xc_sr_save_ops`` (tools/libs/guest/xg_sr_common.h). The
migration driver (``softpage.driver``) talks only to these protocols; it never
imports the Xen backend. ``softpage.sim`` implements them on simulated memory,
``softpage.xen.backend`` on a real domain through libxenctrl & co. One contract
test suite (tests/contract/) runs against both.

Call order, as the driver makes it::

    describe()                                   once, first
    static_info()                                once
    enable_logdirty()                            once, before any page is read
    { harvest_dirty(final=False) | page_types() | read_pages() }*   precopy rounds
    suspend()                                    once; on failure the driver calls resume()
    harvest_dirty(final=True), page_types(), read_pages(), end_of_checkpoint()
    resume()                                     only if the migration is abandoned
    cleanup()                                    exactly once, on success or failure

The guest's soft-page channel is a separate protocol, ``SoftPageChannel``:
a backend for a guest without the module simply returns ``None`` from
``soft_channel()``. The driver uses it between the calls above: ``prune_cache``
then ``arm`` after ``enable_logdirty``, ``request``/``read`` in each precopy round, and, right
before ``suspend()``, ``drop_caches`` then ``request_final``; ``read`` of the
final request once suspended.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from softpage.categories import CacheMode
from softpage.pfnset import PfnArray, PfnSet


class GuestType(enum.Enum):
    """Guest types, as the libxc domain header distinguishes them (PVH is HVM)."""

    PV = "pv"
    PVH = "pvh"
    HVM = "hvm"


@dataclass(frozen=True)
class DomainInfo:
    """What the driver needs to know about the source domain."""

    domid: int
    name: str
    guest_type: GuestType
    p2m_size: int
    """PFNs ``[0, p2m_size)`` are walked: ``xc_domain_maximum_gpfn() + 1``."""
    max_memkb: int
    nr_vcpus: int
    xen_version: tuple[int, int]


@dataclass(frozen=True)
class PvStaticInfo:
    """What a PV stream says about the guest before its memory: X86_PV_INFO and, right after
    STATIC_DATA_END, X86_PV_P2M_FRAMES."""

    guest_width: int
    """Bytes in the guest's ``unsigned long``: 8 (64-bit guests only)."""
    pt_levels: int
    p2m_end_pfn: int
    """The highest pfn the guest's p2m covers (``max_pfn``)."""
    p2m_frame_pfns: tuple[int, ...]
    """The pfns of the frames holding the guest's p2m, in p2m order."""


@dataclass(frozen=True)
class StaticInfo:
    """The records that precede memory in the libxc stream (v3 'static data')."""

    cpuid_policy: bytes
    """``xen_cpuid_leaf_t[]`` as ``xc_cpu_policy_serialise`` gives it."""
    msr_policy: bytes
    """``xen_msr_entry_t[]``."""
    pv: PvStaticInfo | None = None
    """Set for PV guests only."""


@dataclass(frozen=True)
class PageBatch:
    """What ``read_pages`` gives back."""

    data: memoryview
    """The pages read, ``PAGE_SIZE`` each, in the order asked for, less the deferred ones."""
    deferred: npt.NDArray[np.bool_] | None = None
    """Per PFN asked for: True where the page could not be read in this round (a PV page
    table the guest is rewriting); it must be sent later. None: every page was read."""

    def deferred_count(self) -> int:
        return 0 if self.deferred is None else int(np.count_nonzero(self.deferred))


@dataclass(frozen=True)
class TscInfo:
    """What ``xc_domain_get_tsc_info`` reports; the stream's X86_TSC_INFO record."""

    mode: int
    khz: int
    """0 in ``TSC_MODE_NEVER_EMULATE``: Xen reports no frequency for a TSC it never emulates."""
    nsec: int
    incarnation: int


TSC_MODE_NEVER_EMULATE = 2
"""Xen's tsc mode for xl's ``tsc_mode = "native"`` (xen/arch/x86/include/asm/time.h)."""


@dataclass(frozen=True)
class PvVcpuState:
    """One online vCPU of a PV guest: the blobs of its X86_PV_VCPU_* records, mfns already
    turned into pfns; an empty blob means no record (no such state)."""

    vcpu_id: int
    basic: bytes
    extended: bytes = b""
    xsave: bytes = b""
    msrs: bytes = b""


@dataclass(frozen=True)
class EndOfCheckpoint:
    """The records that follow memory, read with the guest suspended: HVM_CONTEXT and
    HVM_PARAMS for HVM and PVH guests, SHARED_INFO and the vCPU records for PV ones."""

    tsc: TscInfo
    hvm_context: bytes = b""
    hvm_params: Sequence[tuple[int, int]] = field(default_factory=tuple)
    pv_shared_info: bytes = b""
    pv_vcpus: Sequence[PvVcpuState] = field(default_factory=tuple)


class MigrationBackend(Protocol):
    """Source-side operations on one domain. Errors: ``BackendError`` or ``OSError``."""

    def describe(self) -> DomainInfo:
        """Static facts about the domain. Called once, first."""
        ...

    def static_info(self) -> StaticInfo:
        """CPU policy records for the start of the stream."""
        ...

    def enable_logdirty(self) -> None:
        """Start dirty logging. Called once, before the first ``read_pages``.

        After it returns, every guest write to a PFN is reported by the next
        ``harvest_dirty``.
        """
        ...

    def harvest_dirty(self, final: bool) -> PfnSet:
        """Return the PFNs written since the previous harvest (or since
        ``enable_logdirty``) and reset the log (``XEN_DOMCTL_SHADOW_OP_CLEAN``).

        ``final`` is set for the stop-and-copy harvest with the domain
        suspended; it also reports pages the hypervisor has mapped writable.
        The result's universe is ``describe().p2m_size``.
        """
        ...

    def page_types(self, pfns: PfnArray) -> npt.NDArray[np.uint32]:
        """``XEN_DOMCTL_PFINFO_*`` type of each PFN (``>> 28`` gives the stream's
        4-bit type). XTAB means "no RAM here"."""
        ...

    def read_pages(self, pfns: PfnArray, types: npt.NDArray[np.uint32]) -> PageBatch:
        """The contents of ``pfns``, whose ``page_types`` are ``types``, ready for the stream.

        The view is valid until the next ``read_pages`` call; the driver
        writes it out before asking again. PFNs must be RAM (not XTAB).
        A PV backend rewrites page tables (mfns to pfns) and may defer one
        it cannot express in pfns while the guest runs.
        """
        ...

    def suspend(self) -> None:
        """Ask the guest to suspend and wait until the domain is suspended.

        Raises ``GuestProtocolError`` if the guest does not acknowledge in
        time, ``BackendError`` for anything else; in both cases the driver
        then calls ``resume()``.
        """
        ...

    def end_of_checkpoint(self) -> EndOfCheckpoint:
        """TSC info and HVM context/params, read with the domain suspended."""
        ...

    def resume(self) -> None:
        """Undo ``suspend()`` on the source (``xc_domain_resume(fast=1)``);
        a no-op if the domain is running. Used when the migration fails."""
        ...

    def soft_channel(self) -> SoftPageChannel | None:
        """The guest's soft-page channel, or None if the guest has no module."""
        ...

    def cleanup(self) -> None:
        """Turn dirty logging off and release every mapping and handle.

        Called exactly once, after success or after a failure.
        """
        ...


class DropOutcome(enum.Enum):
    """How the guest answered ``SoftPageChannel.drop_caches``."""

    DONE = "done"
    """The guest acknowledged the drop id: it dropped its caches if it was armed."""
    UNSUPPORTED = "unsupported"
    """The guest's module does not advertise ``feature-drop``: nothing was asked."""
    TIMED_OUT = "timed-out"
    """No acknowledgement within the timeout: the guest drops at suspend instead."""


class SoftPageChannel(Protocol):
    """The guest side of docs/spec/guest-protocol.md, seen from dom0.

    Everything it returns is untrusted raw bytes; the caller decodes them with
    ``softpage.bitmap.decode`` which validates everything.
    """

    def arm(self, armed: bool) -> None:
        """Write ``armed`` (1 before the first request, 0 on cancel)."""
        ...

    def request(self, request_id: int) -> None:
        """Write ``request = request_id`` and notify the guest."""
        ...

    def request_final(self, request_id: int) -> None:
        """Write ``request = request_id`` for the suspend-time report, without
        notifying: the guest answers it from its freeze callback."""
        ...

    def prune_cache(self, mode: CacheMode) -> bool:
        """Write ``prune-cache = mode.value``, before ``arm(True)``: the page cache the guest
        reports soft from its next scan on and drops at suspend. False, without writing
        anything, if the guest does not advertise ``feature-cache-cold``: its module reports
        and drops all of its clean cache (``CacheMode.ALL``) whatever dom0 asks."""
        ...

    def drop_caches(self, drop_id: int, timeout: float) -> DropOutcome:
        """Ask the guest to drop its clean page cache and reclaimable slab now, while it
        runs, and wait up to ``timeout`` seconds for its acknowledgement of ``drop_id``.

        ``drop_id`` must be larger than every id used before for this domain (the
        driver passes the final request id): the guest ignores one that is not.
        An armed guest drops, an unarmed one only acknowledges. ``UNSUPPORTED``,
        without writing anything, if the guest does not advertise ``feature-drop``.
        """
        ...

    def read(self, request_id: int, timeout: float) -> bytes | None:
        """Wait up to ``timeout`` seconds for the header to show ``request_id``
        with an even generation, then return a consistent copy: the header
        page followed by the ``4 * frames_per_category`` bitmap pages in
        category-major order (``bitmap.decode``'s input; the list pages are a
        transport detail and are not included). ``None`` on timeout or on a
        torn read that did not settle."""
        ...

    def read_current(self) -> bytes | None:
        """Whatever is published now, without waiting (for ``softpage inspect``)."""
        ...
