"""The MigrationBackend + SoftPageChannel contract (softpage/backend.py), for every
implementation in conftest.BACKEND_MAKERS. Each test states one promise the
migration driver relies on."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from softpage import bitmap
from softpage.abi import PAGE_SIZE
from softpage.backend import TSC_MODE_NEVER_EMULATE, DropOutcome, GuestType
from softpage.errors import BackendError
from softpage.pfnset import PfnSet
from tests.contract.backend_makers import BackendUnderTest

Factory = Callable[[], contextlib.AbstractContextManager[BackendUnderTest]]
PFINFO_TYPE_SHIFT = 28
STREAM_TYPES_WITH_DATA = {0, 1, 2, 3, 4, 9, 10, 11, 12}
SOFT_READ_TIMEOUT = 30.0


def read(backend: Any, pfns: Any) -> memoryview:
    """``read_pages`` of plain (NOTAB) pages: their data."""
    return backend.read_pages(pfns, np.zeros(len(pfns), dtype=np.uint32)).data



@pytest.fixture
def under_test(backend_factory: Factory) -> Iterator[BackendUnderTest]:
    with backend_factory() as subject:
        try:
            yield subject
        finally:
            subject.backend.cleanup()


def ram_pfns(subject: BackendUnderTest) -> np.ndarray:
    candidates = subject.guest.ram_pfns
    types = subject.backend.page_types(candidates)
    ram = candidates[(types >> PFINFO_TYPE_SHIFT) != 0xF]
    assert ram.size, "the guest control named no RAM PFN"
    return ram


def test_describe_is_sane_and_stable(under_test: BackendUnderTest) -> None:
    info = under_test.backend.describe()
    assert info.p2m_size > 0
    assert info.nr_vcpus >= 1
    assert info.max_memkb > 0
    assert isinstance(info.guest_type, GuestType)
    assert info.xen_version[0] >= 4
    assert under_test.backend.describe() == info


def test_static_info_is_whole_policy_records(under_test: BackendUnderTest) -> None:
    static = under_test.backend.static_info()
    assert static.cpuid_policy and len(static.cpuid_policy) % 24 == 0
    assert len(static.msr_policy) % 16 == 0


def test_harvest_before_enable_is_refused(under_test: BackendUnderTest) -> None:
    with pytest.raises(BackendError):
        under_test.backend.harvest_dirty(final=False)


def test_harvest_covers_the_p2m_and_resets(under_test: BackendUnderTest) -> None:
    backend = under_test.backend
    p2m_size = backend.describe().p2m_size
    backend.enable_logdirty()
    first = backend.harvest_dirty(final=False)
    assert isinstance(first, PfnSet) and first.nr_pfns == p2m_size
    pfns = ram_pfns(under_test)[:8]
    if under_test.guest.write(pfns) is None:
        pytest.skip("this guest cannot be told which pages to write")
    dirty = backend.harvest_dirty(final=False)
    assert PfnSet.from_pfns(p2m_size, pfns).issubset(dirty)
    assert PfnSet.from_pfns(p2m_size, pfns).isdisjoint(backend.harvest_dirty(final=False))


def test_page_types_per_pfn(under_test: BackendUnderTest) -> None:
    backend = under_test.backend
    ram = ram_pfns(under_test)
    types = backend.page_types(ram)
    assert types.dtype == np.uint32 and types.shape == ram.shape
    assert {int(value) >> PFINFO_TYPE_SHIFT for value in types} <= STREAM_TYPES_WITH_DATA
    assert backend.page_types(np.array([], dtype=np.uint64)).size == 0


def test_pfns_outside_the_domain_are_refused(under_test: BackendUnderTest) -> None:
    backend = under_test.backend
    outside = np.array([backend.describe().p2m_size], dtype=np.uint64)
    with pytest.raises(BackendError):
        backend.page_types(outside)
    with pytest.raises(BackendError):
        read(backend, outside)


def test_read_pages_returns_current_contents_in_order(under_test: BackendUnderTest) -> None:
    backend = under_test.backend
    ram = ram_pfns(under_test)[:5][::-1].copy()
    pages = read(backend, ram)
    assert len(pages) == ram.size * PAGE_SIZE
    assert len(read(backend, np.array([], dtype=np.uint64))) == 0
    written = under_test.guest.write(ram)
    if written is None:
        return
    pages = read(backend, ram)
    for index, pfn in enumerate(ram):
        assert bytes(pages[index * PAGE_SIZE : (index + 1) * PAGE_SIZE]) == written[int(pfn)]


def test_suspend_final_round_and_resume(under_test: BackendUnderTest) -> None:
    backend = under_test.backend
    backend.enable_logdirty()
    backend.harvest_dirty(final=False)
    backend.resume()  # running: a no-op
    backend.suspend()
    final = backend.harvest_dirty(final=True)
    assert final.nr_pfns == backend.describe().p2m_size
    checkpoint = backend.end_of_checkpoint()
    assert (checkpoint.tsc.khz > 0) != (checkpoint.tsc.mode == TSC_MODE_NEVER_EMULATE), checkpoint.tsc
    if backend.describe().guest_type in (GuestType.PVH, GuestType.HVM):
        assert checkpoint.hvm_context
        assert all(value != 0 for _index, value in checkpoint.hvm_params)
    pages = read(backend, ram_pfns(under_test)[:2])
    assert len(pages) == 2 * PAGE_SIZE
    backend.resume()
    backend.resume()


def test_a_suspend_is_adopted_only_when_the_domain_is_suspended(under_test: BackendUnderTest) -> None:
    """``adopt_suspend`` (the save helper's check after libxl's suspend callback) refuses a domain
    that runs, and takes over one that is suspended."""
    backend = under_test.backend
    with pytest.raises(BackendError, match="reported it suspended"):
        backend.adopt_suspend()
    backend.suspend()  # here the backend's own suspend stands in for the toolstack's
    backend.adopt_suspend()
    backend.resume()


def test_cleanup_twice_is_harmless(under_test: BackendUnderTest) -> None:
    backend = under_test.backend
    backend.enable_logdirty()
    read(backend, ram_pfns(under_test)[:1])
    backend.cleanup()
    backend.cleanup()


def test_soft_channel_answers_a_request(under_test: BackendUnderTest) -> None:
    backend = under_test.backend
    channel = backend.soft_channel()
    if not under_test.guest.has_soft_module:
        assert channel is None
        return
    assert channel is not None
    p2m_size = backend.describe().p2m_size
    backend.enable_logdirty()
    channel.arm(True)
    channel.request(41)
    under_test.guest.serve_soft_request(41)
    raw = channel.read(41, timeout=SOFT_READ_TIMEOUT)
    assert raw is not None
    snapshot = bitmap.decode(raw, p2m_size)
    assert snapshot.request_id == 41
    assert channel.read(40_000, timeout=0.2) is None
    assert channel.read_current() is not None
    channel.arm(False)
    assert backend.soft_channel() is channel


def test_soft_channel_drop_is_answered_or_not_offered(under_test: BackendUnderTest) -> None:
    """A cooperating guest acknowledges an early drop (unarmed, without dropping),
    unless its module does not offer one."""
    channel = under_test.backend.soft_channel()
    if channel is None:
        return
    # Larger than any id used before for this domain, as the driver's ids are.
    outcome = channel.drop_caches(time.time_ns(), timeout=SOFT_READ_TIMEOUT)
    assert outcome in (DropOutcome.DONE, DropOutcome.UNSUPPORTED)
