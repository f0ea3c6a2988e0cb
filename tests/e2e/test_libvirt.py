"""libvirt's libxl driver with softpage's save helper, as an admin enables it: the Debian package
installed and /etc/default/softpage uncommented, libvirtd restarted (the package's drop-in gives it
that file as its environment), then `virsh save` of a PV guest with the module prunes and `virsh
restore` brings it back intact.

The host boots with QEMU's kvm64 CPU (softpage_testbed.LIBVIRT_CPU_MODEL): with the testbed's
default AMD CPU libvirtd finds no model in its CPU map for Xen's and does not start. On that Intel
CPU under SVM, Linux PVH and HVM guests do not boot, so the guest is PV (saved and restored, not
live-migrated: Xen 4.17.7 has no shadow paging).

libvirt and libxl are Debian's, unchanged. libvirt writes its own header (its magic, a version,
the domain's XML) before libxl's stream: Xen's verify-stream-v2 reads the stream after it.
`virsh migrate --live` needs a second host (issue 19). Runs SOFTPAGE_E2E_HELPER_REPEAT times, in
`make test-matrix` only.
"""

from __future__ import annotations

import os
import shlex

import pytest

from softpage_testbed import LIBVIRT_CPU_MODEL, VIRSH, CommandResult, Testbed
from tests.e2e.helpers import (
    INSTALLED_HELPER,
    installed_package,
    save_and_restore_repeatedly,
    start_guest,
    verify_stream_v2,
)

pytestmark = pytest.mark.e2e

REPEAT = int(os.environ.get("SOFTPAGE_E2E_HELPER_REPEAT", "1"))
LIBVIRT_HEADER_BYTES = 64
"""libvirt's ``libxlSavefileHeader`` (src/libxl/libxl_domain.h): a 16-byte magic, the version,
the XML's length (native u32s) and padding to 64 bytes; the XML follows, then libxl's stream."""
STRIP_LIBVIRT_HEADER = (
    f"import struct, sys; image = open(sys.argv[1], 'rb'); header = image.read({LIBVIRT_HEADER_BYTES}); "
    "assert header.startswith(b'libvirt-xml\\n'), header[:16]; "
    f"image.seek({LIBVIRT_HEADER_BYTES} + struct.unpack_from('=II', header, 16)[1]); "
    "open(sys.argv[2], 'wb').write(image.read())"
)
"""``python3 -c`` in dom0: libxl's stream of libvirt's save image ``argv[1]``, into ``argv[2]``."""


DAEMON_LOG = ("systemctl status libvirtd --no-pager; journalctl -u libvirtd --no-pager | tail -40; "
              "tail -40 /var/log/libvirt/libxl/libxl-driver.log")
"""What libvirtd said, for a failure to reach it."""


def virsh(testbed: Testbed, *arguments: str) -> CommandResult:
    return testbed.run(f"{VIRSH} {shlex.join(arguments)}", timeout_s=900)


def verify_libvirt_image(testbed: Testbed, image: str) -> CommandResult:
    stream = f"{image}.libxl"
    testbed.run(["python3", "-c", STRIP_LIBVIRT_HEADER, image, stream], check=True)
    try:
        return verify_stream_v2(testbed, stream, "-v", image_format="libxl")
    finally:
        testbed.run(["rm", "-f", stream])


@pytest.mark.matrix_only  # make test has the installed package with xl (test_debian_packages)
@pytest.mark.testbed_cpu(LIBVIRT_CPU_MODEL)
def test_virsh_save_and_restore_prune_through_the_installed_helper(xen_pvh_testbed: Testbed) -> None:
    testbed = xen_pvh_testbed
    with installed_package(testbed):
        drop_ins = testbed.run(["systemctl", "show", "libvirtd", "-p", "DropInPaths"], check=True).stdout
        assert "softpage.conf" in drop_ins, f"systemd does not know the package's drop-in: {drop_ins}"
        testbed.run("systemctl restart libvirtd", timeout_s=300)
        connected = testbed.run(f"for i in $(seq 60); do {VIRSH} version && exit 0; sleep 2; done; exit 1",
                                timeout_s=300)
        environment = testbed.run("tr '\\0' '\\n' < /proc/$(pidof libvirtd)/environ")
        daemon_log = testbed.run(DAEMON_LOG, timeout_s=120).stdout
        assert connected.ok, (connected.stdout + connected.stderr)[-2000:] + daemon_log
        assert f"LIBXL_SAVE_HELPER={INSTALLED_HELPER}" in environment.stdout.splitlines(), (
            environment.stdout + daemon_log)
        guest = start_guest(testbed, "virsh-guest", guest_type="pv", toolstack="virsh")
        try:
            save_and_restore_repeatedly(
                testbed, guest, "x86 PV",
                lambda testbed, guest, image: virsh(testbed, "save", guest.name, image),
                lambda testbed, image: virsh(testbed, "restore", image), REPEAT,
                verify=verify_libvirt_image)
        finally:
            testbed.run(["xl", "destroy", guest.name], timeout_s=120)
            testbed.run("systemctl stop libvirtd", timeout_s=120)
