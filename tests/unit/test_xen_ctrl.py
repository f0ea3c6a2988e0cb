"""softpage.xen.ctrl and foreignmemory on the FakeXen model (tests/xen_fakes.py)."""

from __future__ import annotations

import errno
import struct

import numpy as np
import pytest

from softpage.backend import GuestType
from softpage.errors import BackendError
from softpage.pfnset import PfnSet
from softpage.xen.ctrl import (
    DomainState,
    XenCtrl,
    dirty_bitmap_pages,
    pfn_type_batches,
)
from softpage.xen.foreignmemory import ForeignMemory
from tests.xen_fakes import PAGE_SIZE, XTAB, FakeDomain, fake_binding


def open_ctrl(domain: FakeDomain) -> tuple[XenCtrl, object]:
    binding, lib = fake_binding([domain])
    return XenCtrl.open(binding), lib


@pytest.mark.parametrize(
    ("p2m_size", "pages"),
    [(0, 1), (1, 1), (64, 1), (32768, 1), (32769, 2), (1_044_480, 32), (16 << 20, 512)],
)
def test_dirty_bitmap_pages(p2m_size: int, pages: int) -> None:
    assert dirty_bitmap_pages(p2m_size) == pages


def test_dirty_bitmap_pages_rejects_negative() -> None:
    with pytest.raises(BackendError):
        dirty_bitmap_pages(-1)


def test_pfn_type_batches_cover_exactly_in_1024s() -> None:
    assert pfn_type_batches(0) == []
    assert pfn_type_batches(1024) == [(0, 1024)]
    assert pfn_type_batches(2500) == [(0, 1024), (1024, 2048), (2048, 2500)]


@pytest.mark.parametrize(
    ("flags", "emulation", "expected"),
    [(0, 0, GuestType.PV), (1 << 1, 0x1, GuestType.PVH), (1 << 1, 0x7FF, GuestType.HVM)],
)
def test_guest_type_from_flags(flags: int, emulation: int, expected: GuestType) -> None:
    state = DomainState(1, flags, 10, 10, 1, 0, emulation)
    assert state.guest_type is expected


def test_shutdown_reason_decoding() -> None:
    running = DomainState(1, 1 << 5, 10, 10, 2, 1, 0)
    assert running.shutdown_reason is None and not running.suspended
    suspended = DomainState(1, (1 << 2) | (2 << 16), 10, 10, 2, 1, 0)
    assert suspended.shutdown_reason == 2 and suspended.suspended
    crashed = DomainState(1, (1 << 2) | (3 << 16), 10, 10, 2, 1, 0)
    assert crashed.shutdown_reason == 3 and not crashed.suspended
    assert running.nr_vcpus == 2


def test_gone_says_why_a_domain_will_not_answer() -> None:
    hvm = 1 << 1
    assert DomainState(1, 1 << 5, 10, 10, 1, 0, 0).gone is None  # running
    assert DomainState(1, (1 << 2) | (2 << 16), 10, 10, 1, 0, 0).gone is None  # suspended by dom0
    assert DomainState(1, 1, 10, 10, 1, 0, 0).gone == "is dying"
    assert DomainState(1, (1 << 2) | (0 << 16), 10, 10, 1, 0, 0).gone == "shut down (reason poweroff)"
    assert DomainState(1, (1 << 2) | (1 << 16), 10, 10, 1, 0, 0).gone == "shut down (reason reboot)"  # PV
    assert DomainState(1, hvm | (1 << 2) | (1 << 16), 10, 10, 1, 0, 0).gone == (
        "shut down (reason reboot or a triple fault: `xl dmesg` says which)")
    assert DomainState(1, hvm | (1 << 2) | (9 << 16), 10, 10, 1, 0, 0).gone == "shut down (reason 9)"


def test_domain_state_and_sizes() -> None:
    xc, _lib = open_ctrl(FakeDomain(domid=3, nr_pfns=100, max_vcpu_id=3))
    state = xc.domain_state(3)
    assert (state.domid, state.tot_pages, state.nr_vcpus, state.guest_type) == (3, 100, 4, GuestType.PVH)
    assert xc.maximum_gpfn(3) == 115
    assert xc.xen_version() == (4, 17)


def test_absent_domain_is_esrch_even_though_getinfolist_returns_the_next_one() -> None:
    xc, _lib = open_ctrl(FakeDomain(domid=9, nr_pfns=8))
    with pytest.raises(ProcessLookupError) as raised:
        xc.domain_state(4)
    assert raised.value.filename == "xc_domain_getinfolist dom 4"


def test_page_types_batches_and_masks() -> None:
    xc, lib = open_ctrl(FakeDomain(domid=2, nr_pfns=2400))
    pfns = np.arange(2500, dtype=np.uint64)
    types = xc.page_types(2, pfns)
    assert types.dtype == np.uint32 and types.size == 2500
    assert not types[:2400].any()
    assert (types[2400:] == XTAB).all()
    batches = [call for call in lib.calls if call[0] == "types"]
    assert batches == [("types", 1024), ("types", 1024), ("types", 452)]


def test_page_types_error_names_the_batch() -> None:
    xc, lib = open_ctrl(FakeDomain(domid=2, nr_pfns=64))
    lib.fail["xc_get_pfn_type_batch"] = errno.EINVAL
    with pytest.raises(OSError) as raised:
        xc.page_types(2, np.array([7, 8], dtype=np.uint64))
    assert raised.value.filename == "xc_get_pfn_type_batch dom 2 pfn 0x7"


def test_dirty_log_clean_peek_final_and_reuse() -> None:
    domain = FakeDomain(domid=1, nr_pfns=70_000)
    xc, lib = open_ctrl(domain)
    xc.enable_logdirty(1)
    log = xc.dirty_log(1, domain.p2m_size)
    assert len(lib.hypercall_buffers) == 1
    for pfn in (0, 63, 64, 32768, 69_999):
        domain.guest_write(pfn, b"x")
    peeked, count = log.peek()
    assert count == 5 and peeked == PfnSet.from_pfns(domain.p2m_size, [0, 63, 64, 32768, 69_999])
    dirty, _ = log.clean(final=False)
    assert dirty == peeked
    again, count = log.clean(final=True)
    assert count == 0 and not again
    assert ("logdirty", 11, 1, domain.p2m_size) in lib.calls
    assert len(lib.hypercall_buffers) == 1
    log.free()
    log.free()
    assert not lib.hypercall_buffers
    with pytest.raises(BackendError, match="freed"):
        log.clean(final=False)


def test_enable_logdirty_retries_after_off_like_libxc() -> None:
    domain = FakeDomain(domid=1, nr_pfns=8)
    xc, lib = open_ctrl(domain)
    domain.logdirty = True  # e.g. VRAM tracking left it on
    xc.enable_logdirty(1)
    shadow_calls = [call for call in lib.calls if call[0].startswith("xc_shadow_control")]
    assert shadow_calls == [("xc_shadow_control(2)",), ("xc_shadow_control(0)",), ("xc_shadow_control(2)",)]


def test_enable_logdirty_reports_why_enabling_failed_not_the_retry() -> None:
    """A PV guest on Xen without shadow paging: ENABLE fails with EOPNOTSUPP, the OFF of the
    retry with EINVAL. The first error says why."""
    xc, lib = open_ctrl(FakeDomain(domid=1, nr_pfns=8, hvm=False))
    lib.fail["xc_shadow_control(2)"] = errno.EOPNOTSUPP
    lib.fail["xc_shadow_control(0)"] = errno.EINVAL
    with pytest.raises(OSError) as raised:
        xc.enable_logdirty(1)
    assert raised.value.errno == errno.EOPNOTSUPP


def test_end_of_checkpoint_pieces() -> None:
    domain = FakeDomain(domid=6, nr_pfns=8)
    xc, _lib = open_ctrl(domain)
    assert xc.hvm_context(6) == domain.hvm_context
    assert xc.stream_hvm_params(6) == [(1, 0xFEFFF), (17, 0xFEFFE)]
    tsc = xc.tsc_info(6)
    mode, khz, nsec, incarnation = domain.tsc
    assert (tsc.mode, tsc.khz, tsc.nsec, tsc.incarnation) == (mode, khz, nsec, incarnation)


def test_cpu_policy_serialised_as_stream_records() -> None:
    domain = FakeDomain(domid=6, nr_pfns=8)
    xc, lib = open_ctrl(domain)
    handles_before = lib.open_handles
    policy = xc.cpu_policy(6)
    assert struct.unpack("<6I", policy.cpuid_policy) == domain.cpuid[0]
    assert struct.unpack("<IIQ", policy.msr_policy) == domain.msrs[0]
    assert lib.open_handles == handles_before


def test_cpu_policy_is_destroyed_on_failure() -> None:
    xc, lib = open_ctrl(FakeDomain(domid=6, nr_pfns=8))
    handles_before = lib.open_handles
    lib.fail["xc_cpu_policy_get_domain"] = errno.EPERM
    with pytest.raises(PermissionError):
        xc.cpu_policy(6)
    assert lib.open_handles == handles_before


def test_resume_is_fast_and_close_is_idempotent() -> None:
    domain = FakeDomain(domid=6, nr_pfns=8, shutdown_reason=2)
    xc, lib = open_ctrl(domain)
    xc.resume(6)
    assert ("resume", 6, 1) in lib.calls and domain.shutdown_reason is None
    xc.close()
    xc.close()
    assert lib.open_handles == 0
    with pytest.raises(BackendError, match="after close"):
        xc.xen_version()


# -- foreign memory --------------------------------------------------------------
def test_map_readonly_returns_the_pages_in_order() -> None:
    domain = FakeDomain(domid=2, nr_pfns=32)
    for pfn in range(32):
        domain.memory[pfn * PAGE_SIZE : (pfn + 1) * PAGE_SIZE] = bytes([pfn]) * PAGE_SIZE
    binding, lib = fake_binding([domain])
    with ForeignMemory.open(binding) as foreign:
        mapping = foreign.map_readonly(2, np.array([5, 1, 31], dtype=np.uint64))
        view = mapping.view
        assert len(view) == 3 * PAGE_SIZE
        assert (view[0], view[PAGE_SIZE], view[2 * PAGE_SIZE]) == (5, 1, 31)
        assert [call for call in lib.calls if call[0] == "map"] == [("map", 3)]
        mapping.unmap()
        mapping.unmap()
        assert not lib.live_mappings
        with pytest.raises(ValueError):
            _ = view[0]
    assert lib.open_handles == 0


def test_map_failure_names_the_first_bad_pfn_and_unmaps() -> None:
    binding, lib = fake_binding([FakeDomain(domid=2, nr_pfns=32)])
    foreign = ForeignMemory.open(binding)
    with pytest.raises(OSError) as raised:
        foreign.map_readonly(2, np.array([3, 40, 41, 4], dtype=np.uint64))
    assert raised.value.errno == errno.EFAULT
    assert "2 of 4 pages failed" in raised.value.filename and raised.value.filename.endswith("pfn 0x28")
    assert not lib.live_mappings


def test_map_of_nothing_is_refused() -> None:
    binding, _lib = fake_binding([FakeDomain(domid=2, nr_pfns=32)])
    with pytest.raises(BackendError):
        ForeignMemory.open(binding).map_readonly(2, np.array([], dtype=np.uint64))


def test_unmap_under_a_live_buffer_export_keeps_the_mapping() -> None:
    binding, lib = fake_binding([FakeDomain(domid=2, nr_pfns=32)])
    mapping = ForeignMemory.open(binding).map_readonly(2, np.array([1], dtype=np.uint64))
    exported = binding.ffi.from_buffer(mapping.view)  # holds a PEP 3118 export
    with pytest.raises(BackendError, match="still in use; mapping kept"):
        mapping.unmap()
    assert len(lib.live_mappings) == 1
    assert exported[0] == b"\0"  # still mapped, still readable
    binding.ffi.release(exported)
    mapping.unmap()
    assert not lib.live_mappings
