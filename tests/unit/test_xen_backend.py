"""XenBackend specifics beyond the contract suite, on the FakeXen model."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from softpage.backend import GuestType
from softpage.errors import BackendError
from softpage.xen.backend import (
    BELOW_4GIB_PFNS,
    P2M_SLACK_PFNS,
    XenBackend,
    check_p2m_size,
    check_pfns,
    p2m_size_limit,
)
from softpage.xenstore import MemoryStore
from tests.xen_fakes import FakeDomain, fake_binding


def read(backend: Any, pfns: Any) -> memoryview:
    """``read_pages`` of plain (NOTAB) pages: their data."""
    return backend.read_pages(pfns, np.zeros(len(pfns), dtype=np.uint32)).data



def make(domain: FakeDomain) -> tuple[XenBackend, object]:
    binding, lib = fake_binding([domain])
    return XenBackend(domain.domid, store=MemoryStore(), binding=binding), lib


@pytest.mark.parametrize(
    ("hvm", "emulation", "width", "refusal"),
    [(True, 0x7FF, 8, "device model .* is saved by libxl: use xl migrate or xl save with LIBXL_SAVE_HELPER"),
     (False, 0, 4, "32-bit PV guests are not supported")],
)
def test_unsupported_guest_types_are_refused_with_what_is_missing(
    hvm: bool, emulation: int, width: int, refusal: str
) -> None:
    domain = FakeDomain(domid=3, nr_pfns=16, hvm=hvm, emulation_flags=emulation, guest_width=width)
    backend, _lib = make(domain)
    with pytest.raises(BackendError, match=refusal):
        backend.describe()
    backend.cleanup()


def test_an_hvm_guest_is_accepted_when_libxl_saves_its_device_model() -> None:
    domain = FakeDomain(domid=3, nr_pfns=16, hvm=True, emulation_flags=0x7FF)
    binding, _lib = fake_binding([domain])
    backend = XenBackend(domain.domid, store=MemoryStore(), binding=binding, device_model_by_libxl=True)
    assert backend.describe().guest_type is GuestType.HVM
    backend.cleanup()


def test_describe_falls_back_to_a_name_and_counts_pages_in_kib() -> None:
    backend, _lib = make(FakeDomain(domid=3, nr_pfns=256, max_vcpu_id=1))
    info = backend.describe()
    assert (info.name, info.max_memkb, info.nr_vcpus, info.p2m_size) == ("domain-3", 1024, 2, 272)
    backend.cleanup()


@pytest.mark.parametrize("domid", [0, -1, 0x7FF0])
def test_dom0_and_special_ids_are_refused(domid: int) -> None:
    binding, _lib = fake_binding([])
    with pytest.raises(BackendError, match="guest domain id"):
        XenBackend(domid, store=MemoryStore(), binding=binding)


def test_failed_open_closes_what_was_opened() -> None:
    binding, lib = fake_binding([FakeDomain(domid=3, nr_pfns=16)])
    lib.fail["xenforeignmemory_open"] = errno.ENOENT
    with pytest.raises(FileNotFoundError):
        XenBackend(3, store=MemoryStore(), binding=binding)
    assert lib.open_handles == 0


def test_cleanup_turns_logdirty_off_frees_and_closes_even_after_an_error() -> None:
    domain = FakeDomain(domid=3, nr_pfns=64)
    backend, lib = make(domain)
    backend.enable_logdirty()
    read(backend, np.arange(4, dtype=np.uint64))
    lib.fail["xc_shadow_control(0)"] = errno.EIO  # turning log-dirty off fails
    with pytest.raises(OSError, match="xc_shadow_control"):
        backend.cleanup()
    assert not lib.hypercall_buffers and not lib.live_mappings and lib.open_handles == 0
    backend.cleanup()  # once only: no second attempt, no error


def test_read_pages_maps_without_copying_and_keeps_one_batch_mapped_at_most() -> None:
    domain = FakeDomain(domid=3, nr_pfns=64)
    backend, lib = make(domain)
    for pfn in range(8):
        domain.guest_write(pfn, bytes([pfn + 1]) * 4096)
    first = read(backend, np.arange(8, dtype=np.uint64))
    assert len(lib.live_mappings) == 1
    assert bytes(first) == bytes(domain.memory[: 8 * 4096])
    second = read(backend, np.arange(4, dtype=np.uint64))
    assert len(lib.live_mappings) == 1  # the first batch was unmapped by the second call
    with pytest.raises(ValueError):
        bytes(first)  # released with its mapping, not a pointer into unmapped memory
    assert len(second) == 4 * 4096
    assert len(read(backend, np.array([], dtype=np.uint64))) == 0
    assert not lib.live_mappings  # an empty batch maps nothing and unmapped the previous one
    read(backend, np.arange(2, dtype=np.uint64))
    backend.cleanup()
    assert not lib.live_mappings


def test_enable_twice_and_end_of_checkpoint_while_running_are_refused() -> None:
    backend, _lib = make(FakeDomain(domid=3, nr_pfns=64))
    backend.enable_logdirty()
    with pytest.raises(BackendError, match="already enabled"):
        backend.enable_logdirty()
    with pytest.raises(BackendError, match="suspended"):
        backend.end_of_checkpoint()
    backend.cleanup()


def test_soft_channel_absent_gives_none_and_a_reason_once() -> None:
    backend, lib = make(FakeDomain(domid=3, nr_pfns=64))
    assert backend.soft_channel() is None
    assert backend.channel_reason is not None and "state absent" in backend.channel_reason
    assert backend.soft_channel() is None
    assert [call for call in lib.calls if call[0] == "xengnttab_open"] == [("xengnttab_open",)]
    backend.cleanup()


def test_check_pfns() -> None:
    assert check_pfns(np.array([0, 9], dtype=np.uint64), 10, "x").tolist() == [0, 9]
    with pytest.raises(BackendError, match="outside"):
        check_pfns(np.array([10], dtype=np.uint64), 10, "x")
    with pytest.raises(BackendError, match="1-D"):
        check_pfns(np.zeros((2, 2), dtype=np.uint64), 10, "x")


def test_resume_undoes_a_suspend_in_the_hypervisor_and_in_xenstored() -> None:
    domain = FakeDomain(domid=5, nr_pfns=64)
    binding, _lib = fake_binding([domain])
    store = MemoryStore()
    backend = XenBackend(domain.domid, store=store, binding=binding)
    backend.resume()  # running: nothing to undo
    assert store.resumed_domains == []
    domain.shutdown_reason = 2  # SHUTDOWN_suspend, as after suspend()
    backend.resume()
    assert domain.shutdown_reason is None
    assert store.resumed_domains == [5]
    backend.cleanup()


HOSTILE_GFN = 1 << 36
UUID = "6f1e0c4a-3c4b-4b9e-9f0e-0a1b2c3d4e5f"


def hostile_domain(domid: int = 3, max_gfn: int = HOSTILE_GFN) -> FakeDomain:
    """A 1 MiB PVH guest that mapped one frame at ``max_gfn`` (FakeDomain's p2m is its RAM and
    ``extra_xtab_pfns`` of holes above it)."""
    return FakeDomain(domid=domid, nr_pfns=256, extra_xtab_pfns=max_gfn + 1 - 256)


def test_p2m_size_limit_allows_the_pvh_layout_and_refuses_beyond_it() -> None:
    # A 256 MiB PVH guest's magic pages end at PFN 0xfefff; 64 GiB with RAM relocated above 4 GiB.
    for max_pages, p2m_size in ((65_792, 0xFF000), (1 << 24, (1 << 24) + BELOW_4GIB_PFNS)):
        check_p2m_size(3, p2m_size, max_pages)
    limit = p2m_size_limit(65_792)
    assert limit == 65_792 + BELOW_4GIB_PFNS + P2M_SLACK_PFNS
    check_p2m_size(3, limit, 65_792)
    with pytest.raises(BackendError, match=r"number is 0x150100, expected at most 0x1500ff"):
        check_p2m_size(3, limit + 1, 65_792)


def test_a_hostile_gfn_is_refused_before_anything_is_allocated() -> None:
    domain = hostile_domain()
    backend, lib = make(domain)
    with pytest.raises(BackendError, match="highest guest frame number is 0x1000000000") as refusal:
        backend.describe()
    assert "\n" not in str(refusal.value) and "keeps running" in str(refusal.value)
    assert not lib.hypercall_buffers and not lib.live_mappings
    assert not any(call[0].startswith("xc_shadow_control") for call in lib.calls)
    backend.cleanup()
    assert domain.shutdown_reason is None and not domain.logdirty and lib.open_handles == 0


def test_the_cli_refuses_a_hostile_gfn_in_one_line_with_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from softpage import toolstack
    from softpage.cli import main as cli_main
    from softpage.cli import migrate as cli_migrate

    domain = hostile_domain(domid=5)
    binding, lib = fake_binding([domain])
    listed = toolstack.ListedDomain(domid=5, name="hostile", uuid=UUID,
                                    config={"c_info": {"name": "hostile"}})
    monkeypatch.setattr(toolstack, "list_domain", lambda _spec: listed)
    monkeypatch.setattr(cli_migrate, "_backend",
                        lambda _args, domid: XenBackend(domid, store=MemoryStore(), binding=binding))
    target = tmp_path / "hostile.save"
    assert cli_main.main(["save", "hostile", str(target)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("softpage: error:") and "0x1000000000" in err[0]
    assert domain.shutdown_reason is None and not domain.logdirty and lib.open_handles == 0
    assert target.stat().st_size == 0  # refused before the stream began
