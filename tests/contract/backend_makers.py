"""Implementations under the backend contract (see conftest.py): the ``GuestControl``
protocol, ``BackendUnderTest``, and one maker per implementation."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pytest

from softpage.backend import MigrationBackend
from softpage.pfnset import PfnArray


class GuestControl(Protocol):
    ram_pfns: PfnArray
    """A few PFNs that are guest RAM (not XTAB)."""
    has_soft_module: bool
    """True if the guest publishes the soft-page channel."""

    def write(self, pfns: PfnArray) -> dict[int, bytes] | None:
        """Make the guest write these pages now; return each page's new
        contents, or None if this implementation cannot direct guest writes."""
        ...

    def serve_soft_request(self, request_id: int) -> None:
        """Let the guest answer ``request_id`` (a no-op where it does so itself)."""
        ...


@dataclass
class BackendUnderTest:
    backend: MigrationBackend
    guest: GuestControl


# -- fake Xen: XenBackend on the FakeXen model of the tool libraries --------------
class FakeXenGuest:
    def __init__(self, domain: object, soft_guest: object) -> None:
        from tests.xen_fakes import FakeDomain, FakeSoftPageGuest

        assert isinstance(domain, FakeDomain) and isinstance(soft_guest, FakeSoftPageGuest)
        self.domain, self.soft_guest = domain, soft_guest
        self.ram_pfns = np.arange(0, domain.nr_pfns, 97, dtype=np.uint64)
        self.has_soft_module = True
        self._writes = 0

    def write(self, pfns: PfnArray) -> dict[int, bytes]:
        written = {}
        for pfn in (int(pfn) for pfn in pfns):
            self._writes += 1
            page = (self._writes.to_bytes(4, "little") + pfn.to_bytes(8, "little")) * 341 + b"\xa5" * 4
            self.domain.guest_write(pfn, page)
            written[pfn] = page
        return written

    def serve_soft_request(self, request_id: int) -> None:
        from softpage.pfnset import PfnSet
        from softpage.snapshot import SnapshotState, SoftSnapshot

        nr_pfns = self.soft_guest.nr_pfns
        free = PfnSet.from_pfns(nr_pfns, range(nr_pfns // 2, nr_pfns))
        empty = PfnSet.empty(nr_pfns)
        self.soft_guest.publish(
            SoftSnapshot(SnapshotState.SNAPSHOT, 0, request_id, 0, nr_pfns, 5, free, empty, empty, empty)
        )


@contextlib.contextmanager
def make_fake_xen() -> Iterator[BackendUnderTest]:
    from softpage.xen.backend import XenBackend
    from softpage.xen.suspend import SuspendTimeouts
    from softpage.xenstore import MemoryStore
    from tests.xen_fakes import FakeDomain, FakeSoftPageGuest, SuspendResponder, fake_binding

    domain = FakeDomain(domid=5, nr_pfns=4096)
    binding, lib = fake_binding([domain])
    store = MemoryStore({"/local/domain/5/name": "contract-guest", "/local/domain/5/control/shutdown": ""})
    soft_guest = FakeSoftPageGuest(lib, store, domain.domid, domain.nr_pfns)
    responder = SuspendResponder(store, domain)
    backend = XenBackend(5, store=store, binding=binding, suspend_timeouts=SuspendTimeouts(5.0, 5.0))
    try:
        yield BackendUnderTest(backend, FakeXenGuest(domain, soft_guest))
    finally:
        responder.stop()
        store.close()


# -- real Xen (inside the testbed's dom0) ---------------------------------------------
class RealXenGuest:
    """A live guest: it writes what it likes, so ``write`` cannot be directed."""

    def __init__(self, has_soft_module: bool) -> None:
        self.ram_pfns = np.arange(0, 64 * 1024, 997, dtype=np.uint64)  # the low 256 MiB is RAM
        self.has_soft_module = has_soft_module

    def write(self, pfns: PfnArray) -> None:
        return None

    def serve_soft_request(self, request_id: int) -> None:
        return None  # softpage.ko answers by itself


@contextlib.contextmanager
def make_real_xen() -> Iterator[BackendUnderTest]:
    domid = os.environ.get("SOFTPAGE_CONTRACT_DOMID")
    if not domid:
        pytest.skip("real-Xen contract runs in the testbed dom0 (SOFTPAGE_CONTRACT_DOMID unset)")
    from softpage.xen.backend import XenBackend

    backend = XenBackend(int(domid))
    has_module = os.environ.get("SOFTPAGE_CONTRACT_SOFT_MODULE", "0") == "1"
    yield BackendUnderTest(backend, RealXenGuest(has_module))


class SimGuestControl:
    def __init__(self, backend: object) -> None:
        from softpage.sim.backend import SimBackend

        assert isinstance(backend, SimBackend)
        self.backend = backend
        self.ram_pfns = np.flatnonzero(backend.guest.ram).astype(np.uint64)[::7].copy()
        self.has_soft_module = backend.guest.module_loaded

    def write(self, pfns: PfnArray) -> dict[int, bytes]:
        from softpage.abi import PAGE_SIZE

        self.backend.guest.write(pfns)
        words = np.zeros((pfns.size, PAGE_SIZE // 8), dtype=np.uint64)
        words[:, 0] = self.backend.guest.tokens[pfns.astype(np.intp)]
        words[:, 1] = pfns
        return {int(pfn): words[index].tobytes() for index, pfn in enumerate(pfns)}

    def serve_soft_request(self, request_id: int) -> None:
        return None


@contextlib.contextmanager
def make_sim() -> Iterator[BackendUnderTest]:
    from softpage.sim.backend import SimBackend
    from softpage.sim.experiment import GuestShape, boot_guest

    shape = GuestShape(memory_mib=4, kernel_mib=1, min_free_mib=1)
    guest = boot_guest(shape, 1, seed=3)
    backend = SimBackend(guest)
    yield BackendUnderTest(backend, SimGuestControl(backend))
