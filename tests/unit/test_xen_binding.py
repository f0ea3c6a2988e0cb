"""softpage.xen._binding: the one place errno becomes OSError; the build stamp."""

from __future__ import annotations

import errno

import pytest

from softpage.errors import BackendError
from softpage.xen import _binding, ctrl
from softpage.xen._binding import EXPECTED_BINDING_ABI, LibraryHandle, check_stamp, describe_call, errno_error
from softpage.xen.ctrl import XenCtrl
from softpage.xen.evtchn import EventChannels
from softpage.xen.foreignmemory import ForeignMemory
from softpage.xen.gnttab import GrantTable
from tests.xen_fakes import FakeDomain, fake_binding


def test_errno_error_names_call_domain_and_pfn() -> None:
    error = errno_error(errno.EFAULT, "xenforeignmemory_map", domid=5, pfn=0x1234)
    assert isinstance(error, OSError)
    assert error.errno == errno.EFAULT
    assert error.strerror == "Bad address"
    assert error.filename == "xenforeignmemory_map dom 5 pfn 0x1234"


def test_negative_errno_from_per_page_errors_is_folded() -> None:
    assert errno_error(-errno.ENOENT, "map").errno == errno.ENOENT


def test_zero_errno_is_reported_as_eio_not_success() -> None:
    assert errno_error(0, "xc_interface_open").errno == errno.EIO


def test_describe_call_leaves_out_what_is_unknown() -> None:
    assert describe_call("xc_version") == "xc_version"
    assert describe_call("xc_domain_resume", domid=3) == "xc_domain_resume dom 3"


def test_check_rc_and_check_ptr_read_errno_only_on_failure() -> None:
    binding, _lib = fake_binding([])
    binding.ffi.errno = errno.EPERM
    assert binding.check_rc(7, "call") == 7
    pointer = binding.ffi.new("int *")
    assert binding.check_ptr(pointer, "call") is pointer
    with pytest.raises(PermissionError) as raised:
        binding.check_rc(-1, "xc_shadow_control", domid=4)
    assert raised.value.filename == "xc_shadow_control dom 4"
    with pytest.raises(OSError, match="xengnttab_open"):
        binding.check_ptr(binding.ffi.NULL, "xengnttab_open")


def test_failed_open_raises_oserror_from_errno() -> None:
    binding, lib = fake_binding([FakeDomain(domid=1, nr_pfns=8)])
    lib.fail["xc_interface_open"] = errno.EACCES
    with pytest.raises(PermissionError, match="xc_interface_open"):
        ctrl.XenCtrl.open(binding)


def test_stale_module_is_refused() -> None:
    check_stamp(EXPECTED_BINDING_ABI, "0" * 64)
    with pytest.raises(BackendError, match="stale"):
        check_stamp(EXPECTED_BINDING_ABI + 1, "f" * 64)


def test_missing_module_is_a_backend_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_binding, "COMPILED_MODULE", "softpage._no_such_module")
    _binding.load_binding.cache_clear()
    try:
        with pytest.raises(BackendError, match="libxen-dev"):
            _binding.load_binding()
    finally:
        _binding.load_binding.cache_clear()


# -- against the compiled module, where it was built ----------------------------
def test_compiled_module_stamp_and_constants_match_the_python_side() -> None:
    pytest.importorskip("softpage._xen", reason="softpage._xen not built (no libxen-dev)")
    _binding.load_binding.cache_clear()
    binding = _binding.load_binding()
    lib, ffi = binding.lib, binding.ffi
    assert lib.SOFTPAGE_XEN_BINDING_ABI == EXPECTED_BINDING_ABI
    pairs = {
        "XEN_DOMINF_dying": ctrl.XEN_DOMINF_DYING,
        "XEN_DOMINF_hvm_guest": ctrl.XEN_DOMINF_HVM_GUEST,
        "XEN_DOMINF_shutdown": ctrl.XEN_DOMINF_SHUTDOWN,
        "XEN_DOMINF_paused": ctrl.XEN_DOMINF_PAUSED,
        "XEN_DOMINF_running": ctrl.XEN_DOMINF_RUNNING,
        "XEN_DOMINF_hap": ctrl.XEN_DOMINF_HAP,
        "XEN_DOMINF_shutdownmask": ctrl.XEN_DOMINF_SHUTDOWN_MASK,
        "XEN_DOMINF_shutdownshift": ctrl.XEN_DOMINF_SHUTDOWN_SHIFT,
        "XEN_X86_EMU_PIT": ctrl.XEN_X86_EMU_PIT,
        "SHUTDOWN_suspend": ctrl.SHUTDOWN_SUSPEND,
        "XEN_DOMCTL_SHADOW_OP_OFF": ctrl.XEN_DOMCTL_SHADOW_OP_OFF,
        "XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY": ctrl.XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY,
        "XEN_DOMCTL_SHADOW_OP_CLEAN": ctrl.XEN_DOMCTL_SHADOW_OP_CLEAN,
        "XEN_DOMCTL_SHADOW_OP_PEEK": ctrl.XEN_DOMCTL_SHADOW_OP_PEEK,
        "XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL": ctrl.XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL,
        "XEN_DOMCTL_PFINFO_LTAB_MASK": ctrl.XEN_DOMCTL_PFINFO_LTAB_MASK,
        "XEN_DOMCTL_PFINFO_LPINTAB": ctrl.XEN_DOMCTL_PFINFO_LPINTAB,
        "XEN_DOMCTL_PFINFO_XTAB": ctrl.XEN_DOMCTL_PFINFO_XTAB,
        "XENVER_version": ctrl.XENVER_VERSION,
    }
    for name, python_value in pairs.items():
        assert getattr(lib, name) == python_value, name
    for name, index in ctrl.STREAM_HVM_PARAMS:
        assert getattr(lib, f"HVM_PARAM_{name}") == index, name
    assert ffi.sizeof("xen_cpuid_leaf_t") == 24
    assert ffi.sizeof("xen_msr_entry_t") == 16
    assert ffi.sizeof("xen_pfn_t") == 8
    assert lib.XEN_DOMCTL_INTERFACE_VERSION == 0x15


def test_package_imports_and_fails_cleanly_without_the_compiled_module() -> None:
    """Where libxen-dev was absent at build time, everything imports; asking
    for a real domain is a BackendError, not an ImportError."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "sys.modules['softpage._xen'] = None\n"
        "import softpage.xen.backend, softpage.xen.channel, softpage.xen.suspend, softpage.xenstore\n"
        "from softpage.errors import BackendError\n"
        "try:\n"
        "    softpage.xen.backend.XenBackend(1)\n"
        "except BackendError as error:\n"
        "    print('refused:', error)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    assert completed.stdout.startswith("refused: the Xen bindings (softpage._xen) are unavailable")


@pytest.mark.parametrize("wrapper", [XenCtrl, ForeignMemory, GrantTable, EventChannels],
                         ids=lambda wrapper: wrapper.__name__)
def test_each_library_handle_closes_once_and_refuses_use_after(wrapper: type[LibraryHandle]) -> None:
    binding, lib = fake_binding([FakeDomain(domid=3, nr_pfns=8)])
    with wrapper.open(binding) as opened:
        assert isinstance(opened, wrapper) and lib.open_handles == 1
        assert opened.handle is not None
    assert lib.open_handles == 0
    opened.close()
    assert lib.open_handles == 0
    with pytest.raises(BackendError, match=f"{wrapper.LIBRARY} used after close"):
        opened.handle  # noqa: B018


def test_a_library_that_will_not_open_names_its_call() -> None:
    binding, lib = fake_binding([])
    lib.fail["xengnttab_open"] = errno.ENOENT
    with pytest.raises(OSError, match="xengnttab_open"):
        GrantTable.open(binding)
    assert lib.open_handles == 0


def test_event_channels_unbind_what_they_bound_before_the_close() -> None:
    binding, lib = fake_binding([FakeDomain(domid=3, nr_pfns=8)])
    channels = EventChannels.open(binding)
    ports = {channels.bind_interdomain(3, 7), channels.bind_interdomain(3, 8)}
    assert lib.bound_ports == ports
    channels.close()
    assert lib.bound_ports == set() and lib.open_handles == 0
