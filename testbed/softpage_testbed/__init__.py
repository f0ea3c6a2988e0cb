"""Drive the softpage Xen-in-QEMU testbed from the host: boot it, run dom0 commands, make guests.

The testbed (``make testbed``, built by testbed/build.sh into ``SOFTPAGE_TESTBED_CACHE``) is a
Xen 4.17 hypervisor with a Debian dom0 booted under QEMU TCG. The package is stdlib only; the
e2e tests, the benchmarks and the demo import it from the venv ``make setup`` installs it into.
It is split by what it drives:

* ``agent``: dom0 commands go through a virtio-serial port to ``softpage-agent`` (testbed/dom0/),
  one JSON line per request and reply, so exit codes and output are exact.
* ``host``: one boot of QEMU + Xen + dom0 (``Testbed``, ``TestbedConfig``, ``booted_testbed``);
  the serial console (Xen + dom0 kernel) is only logged, to ``<work_dir>/serial.log``. The
  CURRENT checkout reaches dom0 as a payload disk built by ``testbed/build.sh payload``: the
  softpage package on dom0's ``PYTHONPATH`` (``/opt/softpage/py``), the guest kernel and
  initramfs (``/opt/softpage/guest``) with the workload and, when it builds, ``softpage.ko``.
* ``pair``: two hosts joined by a link of their own (``TestbedPair``, ``booted_pair``,
  ``LinkShape``): ``ssh host-b`` from host-a, migrations between them as users run them.
* ``guest``: a test guest (``GuestSpec``, ``Guest``), read through its console log.
* ``errors``: everything the harness raises is a ``TestbedError``.

Typical use (the pytest fixtures in tests/e2e/conftest.py do the booting)::

    guest = testbed.create_guest(GuestSpec(name="g1", guest_type="pvh", memory_mb=256, anon_mb=64))
    guest.wait_for_workload_ready()
    testbed.run(f"xl save {guest.name} /var/lib/xen/g1.img", check=True)
    ...
    assert guest.verify().ok
"""

from softpage_testbed.agent import (
    AGENT_PORT_NAME,
    LIVENESS_PERIOD_S,
    LIVENESS_TIMEOUT_S,
    REPLY_MARGIN_S,
    AgentClient,
    CommandResult,
)
from softpage_testbed.distro import (
    BRIDGE_ADDRESS,
    DISTRO_GUEST_TYPES,
    DISTRO_RELEASES,
    GUEST_ADDRESS,
    GUEST_BRIDGE,
    HOT_FRACTION,
    HOT_SKEW,
    HTTP_PORT,
    UP_RE,
    DistroGuest,
    DistroGuestSpec,
    ShellResult,
    WrkResult,
    app_file_names,
    fetch_checksums,
    read_app_checksums,
    run_wrk,
    wrk_command,
)
from softpage_testbed.errors import CommandFailed, Dom0BootStalled, Dom0Hung, GuestTripleFault, TestbedError
from softpage_testbed.guest import (
    BOOT_MARKER,
    CONSOLE_LOG_DIR,
    DEFAULT_GUEST_KERNEL,
    GUEST_KERNELS,
    HEARTBEAT_RE,
    READY_RE,
    STOPPED_CHECK_S,
    VERIFY_RE,
    ConsoleGuest,
    Guest,
    GuestSpec,
    VerifyResult,
    counting_receiver,
)
from softpage_testbed.host import (
    APP_DATA_DISK_SERIAL,
    BOOT_ATTEMPTS,
    BUILD_SCRIPT,
    DATA_DISK_SERIAL,
    DISK_RATE_ENV,
    DOM0_BOOT_ATTEMPTS,
    DOM0_BOOT_STALL_S,
    FATAL_BOOT_PATTERNS,
    HOST_PLATFORMS,
    HOTPLUG_TIMEOUT_MESSAGE,
    LIBVIRT_CPU_MODEL,
    LINK_LOOPBACK,
    PAYLOAD_DISK_SERIAL,
    REPO_DIR,
    SCRATCH_MOUNT,
    TRIPLE_FAULT_RE,
    VIRSH,
    XEN_PV_VERSION,
    XEN_PVH_VERSION,
    XEN_TRIXIE_VERSION,
    HostPlatform,
    LinkEnd,
    Testbed,
    TestbedConfig,
    again_after_triple_faults,
    booted_testbed,
    build_payload,
    build_testbed,
    describe_disk_rate,
    distro_disk_serial,
    parse_disk_rate,
    retry_after_triple_faults,
)
from softpage_testbed.pair import (
    LINK_HOSTS_FILE,
    SHARED_DATA_DISK,
    LinkHost,
    LinkPlan,
    LinkShape,
    TestbedPair,
    booted_pair,
    read_link_hosts,
)

__all__ = [
    "AGENT_PORT_NAME",
    "APP_DATA_DISK_SERIAL",
    "BOOT_ATTEMPTS",
    "BOOT_MARKER",
    "BRIDGE_ADDRESS",
    "BUILD_SCRIPT",
    "CONSOLE_LOG_DIR",
    "DATA_DISK_SERIAL",
    "DEFAULT_GUEST_KERNEL",
    "DISK_RATE_ENV",
    "DISTRO_GUEST_TYPES",
    "DISTRO_RELEASES",
    "DOM0_BOOT_ATTEMPTS",
    "DOM0_BOOT_STALL_S",
    "FATAL_BOOT_PATTERNS",
    "GUEST_ADDRESS",
    "GUEST_BRIDGE",
    "GUEST_KERNELS",
    "HEARTBEAT_RE",
    "HOST_PLATFORMS",
    "HOTPLUG_TIMEOUT_MESSAGE",
    "HOT_FRACTION",
    "HOT_SKEW",
    "HTTP_PORT",
    "LIBVIRT_CPU_MODEL",
    "LINK_HOSTS_FILE",
    "LINK_LOOPBACK",
    "LIVENESS_PERIOD_S",
    "LIVENESS_TIMEOUT_S",
    "PAYLOAD_DISK_SERIAL",
    "READY_RE",
    "REPLY_MARGIN_S",
    "REPO_DIR",
    "SCRATCH_MOUNT",
    "SHARED_DATA_DISK",
    "STOPPED_CHECK_S",
    "TRIPLE_FAULT_RE",
    "UP_RE",
    "VERIFY_RE",
    "VIRSH",
    "XEN_PVH_VERSION",
    "XEN_PV_VERSION",
    "XEN_TRIXIE_VERSION",
    "AgentClient",
    "CommandFailed",
    "CommandResult",
    "ConsoleGuest",
    "DistroGuest",
    "DistroGuestSpec",
    "Dom0BootStalled",
    "Dom0Hung",
    "Guest",
    "GuestSpec",
    "GuestTripleFault",
    "HostPlatform",
    "LinkEnd",
    "LinkHost",
    "LinkPlan",
    "LinkShape",
    "ShellResult",
    "Testbed",
    "TestbedConfig",
    "TestbedError",
    "TestbedPair",
    "VerifyResult",
    "WrkResult",
    "again_after_triple_faults",
    "app_file_names",
    "booted_pair",
    "booted_testbed",
    "build_payload",
    "build_testbed",
    "counting_receiver",
    "describe_disk_rate",
    "distro_disk_serial",
    "fetch_checksums",
    "parse_disk_rate",
    "read_app_checksums",
    "read_link_hosts",
    "retry_after_triple_faults",
    "run_wrk",
    "wrk_command",
]
