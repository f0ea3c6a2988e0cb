"""``SimBackend`` and ``SimSoftChannel``: the backend contract on a ``SimGuest``.

The driver cannot tell them from the Xen backend: same call order, same
errors (``BackendError``, ``GuestProtocolError``), bitmaps in the real binary
format. Timeouts never sleep: a report that is not there is simply missing.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from softpage import abi
from softpage.abi import PAGE_SIZE
from softpage.backend import (
    DomainInfo,
    DropOutcome,
    EndOfCheckpoint,
    GuestType,
    PageBatch,
    SoftPageChannel,
    StaticInfo,
    TscInfo,
)
from softpage.categories import CacheMode
from softpage.errors import BackendError, GuestProtocolError
from softpage.pfnset import PfnArray, PfnSet
from softpage.sim.guest import PageKind, SimGuest, pfnset_from_mask
from softpage.stream.records import PageType

WORDS_PER_PAGE = PAGE_SIZE // 8
CPUID_LEAF = struct.Struct("<6I")
MSR_ENTRY = struct.Struct("<IIQ")

ReadHook = Callable[[SimGuest, PfnArray], None]
"""Guest activity while a batch is being read (the guest keeps running)."""


@dataclass
class SimFaults:
    """Failures to inject, for the driver's error paths."""

    suspend_fails: bool = False
    suspend_unacknowledged: bool = False
    """The guest never acknowledges the suspend request (GuestProtocolError)."""
    read_fails_after: int | None = None
    """``read_pages`` raises ``OSError(EIO)`` after this many successful calls."""
    resume_fails: bool = False


class SimSoftChannel:
    """``SoftPageChannel`` over the guest's published bytes."""

    def __init__(self, guest: SimGuest) -> None:
        self.guest = guest
        self.requests: list[int] = []
        self.drops: list[int] = []
        """The ``drop`` ids written, in order (none to a guest without ``feature-drop``)."""

    def arm(self, armed: bool) -> None:
        self.guest.armed = armed

    def request(self, request_id: int) -> None:
        self.requests.append(request_id)
        self.guest.answer_request(request_id)

    def request_final(self, request_id: int) -> None:
        self.requests.append(request_id)
        self.guest.request_value = request_id

    def prune_cache(self, mode: CacheMode) -> bool:
        if not (self.guest.module_loaded and self.guest.knows_prune_cache):
            return False
        self.guest.prune_cache = mode
        return True

    def drop_caches(self, drop_id: int, timeout: float) -> DropOutcome:
        if not self.guest.feature_drop:
            return DropOutcome.UNSUPPORTED
        self.drops.append(drop_id)
        self.guest.answer_drop(drop_id)
        return DropOutcome.DONE if self.guest.dropped == drop_id else DropOutcome.TIMED_OUT

    def read(self, request_id: int, timeout: float) -> bytes | None:
        published = self.guest.published
        if published is None or len(published) < abi.HEADER.size:
            return None
        generation = abi.GENERATION.unpack_from(published, abi.GENERATION_OFFSET)[0]
        shown_request = abi.REQUEST_ID.unpack_from(published, abi.REQUEST_ID_OFFSET)[0]
        if generation % 2 or shown_request != request_id:
            return None
        return bytes(published)

    def read_current(self) -> bytes | None:
        return None if self.guest.published is None else bytes(self.guest.published)


class SimBackend:
    """``MigrationBackend`` for a ``SimGuest``.

    ``read_hook`` runs after each ``read_pages`` batch was copied, while the
    guest is running: what it writes was read too early and shows in the next
    harvest, as on a real host.
    """

    def __init__(
        self,
        guest: SimGuest,
        domid: int = 7,
        name: str = "simguest",
        guest_type: GuestType = GuestType.PVH,
        faults: SimFaults | None = None,
        read_hook: ReadHook | None = None,
    ) -> None:
        self.guest = guest
        self.domid = domid
        self.name = name
        self.guest_type = guest_type
        self.faults = faults if faults is not None else SimFaults()
        self.read_hook = read_hook
        self.calls: list[str] = []
        self.suspended = False
        self.suspended_tokens: npt.NDArray[np.uint64] | None = None
        """The guest's contents when it was suspended (for the oracle)."""
        self.suspended_held: PfnSet | None = None
        self._logdirty = False
        self._reads = 0
        self._page_buffer = np.zeros((0, WORDS_PER_PAGE), dtype=np.uint64)
        self.channel = SimSoftChannel(guest)

    def describe(self) -> DomainInfo:
        self.calls.append("describe")
        return DomainInfo(
            domid=self.domid,
            name=self.name,
            guest_type=self.guest_type,
            p2m_size=self.guest.p2m_size,
            max_memkb=int(np.count_nonzero(self.guest.ram)) * PAGE_SIZE // 1024,
            nr_vcpus=1,
            xen_version=(4, 17),
        )

    def static_info(self) -> StaticInfo:
        self.calls.append("static_info")
        cpuid = CPUID_LEAF.pack(0, 0xFFFFFFFF, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69)
        msr = MSR_ENTRY.pack(0xCE, 0, 0)
        return StaticInfo(cpuid_policy=cpuid, msr_policy=msr)

    def enable_logdirty(self) -> None:
        self.calls.append("enable_logdirty")
        self._logdirty = True
        self.guest.logdirty = True
        self.guest.dirty[:] = False

    def harvest_dirty(self, final: bool) -> PfnSet:
        self.calls.append("harvest_dirty(final)" if final else "harvest_dirty")
        if not self._logdirty:
            raise BackendError("harvest_dirty: expected log-dirty mode, got it off")
        if final and not self.suspended:
            raise BackendError("harvest_dirty(final=True): expected a suspended domain")
        return pfnset_from_mask(self.guest.harvest())

    def page_types(self, pfns: PfnArray) -> npt.NDArray[np.uint32]:
        kinds = self.guest.kind[self._indexes("page_types", pfns)]
        return np.where(kinds == PageKind.HOLE, np.uint32(PageType.XTAB.pfinfo), np.uint32(0)).astype(
            np.uint32
        )

    def read_pages(self, pfns: PfnArray, types: npt.NDArray[np.uint32]) -> PageBatch:
        if self.faults.read_fails_after is not None and self._reads >= self.faults.read_fails_after:
            raise OSError(5, f"read_pages: simulated I/O error on domain {self.domid}")
        indexes = self._indexes("read_pages", pfns)
        if indexes.size and (self.guest.kind[indexes] == PageKind.HOLE).any():
            raise BackendError("read_pages: expected RAM PFNs, got an XTAB one")
        self._reads += 1
        # The view stays valid until the next call, so one buffer is reused;
        # words past the first two are always zero.
        if self._page_buffer.shape[0] < indexes.size:
            self._page_buffer = np.zeros((indexes.size, WORDS_PER_PAGE), dtype=np.uint64)
        pages = self._page_buffer[: indexes.size]
        pages[:, 0] = self.guest.tokens[indexes]
        pages[:, 1] = pfns
        view = pages.reshape(-1).view(np.uint8).data
        if self.read_hook is not None and self.guest.running:
            self.read_hook(self.guest, pfns)
        return PageBatch(view)

    def _indexes(self, call: str, pfns: PfnArray) -> npt.NDArray[np.intp]:
        indexes = np.asarray(pfns, dtype=np.uint64)
        if indexes.size and int(indexes.max()) >= self.guest.p2m_size:
            raise BackendError(
                f"{call}: expected PFNs below {self.guest.p2m_size} (domain {self.domid}), "
                f"got {int(indexes.max())}"
            )
        return indexes.astype(np.intp)

    def suspend(self) -> None:
        self.calls.append("suspend")
        if self.faults.suspend_fails:
            raise BackendError(f"domain {self.domid}: simulated suspend failure")
        self.guest.freeze()
        if self.faults.suspend_unacknowledged:
            raise GuestProtocolError(f"domain {self.domid} did not acknowledge the suspend request")
        self.guest.running = False
        self.suspended = True
        self.suspended_tokens = self.guest.tokens.copy()
        self.suspended_held = pfnset_from_mask(self.guest.kind == PageKind.HELD)

    def adopt_suspend(self) -> None:
        """As ``XenBackend.adopt_suspend``: the test's toolstack suspended the guest."""
        self.calls.append("adopt_suspend")
        if not self.suspended:
            raise BackendError(f"domain {self.domid}: the toolstack reported it suspended, but it is not "
                               "suspended")

    def end_of_checkpoint(self) -> EndOfCheckpoint:
        self.calls.append("end_of_checkpoint")
        if not self.suspended:
            raise BackendError("end_of_checkpoint: expected a suspended domain")
        return EndOfCheckpoint(
            tsc=TscInfo(mode=0, khz=2_000_000, nsec=123_456_789, incarnation=1),
            hvm_context=b"SIMHVMCX" + bytes(56),
            # HVM_PARAM_STORE_PFN, _STORE_EVTCHN, _CONSOLE_PFN, _CONSOLE_EVTCHN
            hvm_params=((1, self.guest.p2m_size - 1), (2, 1), (17, self.guest.p2m_size - 2), (18, 2)),
        )

    def resume(self) -> None:
        self.calls.append("resume")
        if self.faults.resume_fails:
            raise BackendError(f"domain {self.domid}: simulated resume failure")
        # The freeze callback may have run even if the suspend then failed.
        if self.guest.frozen:
            self.guest.thaw()
        self.guest.running = True
        self.suspended = False

    def soft_channel(self) -> SoftPageChannel | None:
        self.calls.append("soft_channel")
        return self.channel if self.guest.module_loaded else None

    def cleanup(self) -> None:
        self.calls.append("cleanup")
        self._logdirty = False
        self.guest.logdirty = False
