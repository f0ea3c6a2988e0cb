"""libvirt's libxl driver with softpage's save helper, as an admin enables it: the Debian package
installed and /etc/default/softpage uncommented, libvirtd restarted (the package's drop-in gives it
that file as its environment), then, with a PV guest with the module:

- `virsh save` prunes and `virsh restore` brings the guest back intact, on one host (Xen 4.17.7 and
  4.20.4);
- `virsh migrate --live GUEST xen+ssh://host-b/system` between the two hosts of a Xen 4.17.5 pair
  (``pv_pair``: PV live migration needs shadow paging, which only 4.17.5 has) prunes in the
  source's libvirtd and the guest arrives intact, there and back. The client reaches the
  destination's libvirtd over ssh; the stream itself goes over plain TCP to a port the
  destination's libvirtd opens for it (49152-49216, on the address its hostname resolves to:
  the link's), which the pair's link carries as it is (no firewall in the dom0s).

The hosts boot with QEMU's kvm64 CPU (softpage_testbed.LIBVIRT_CPU_MODEL): with the testbed's
default AMD CPU libvirtd finds no model in its CPU map for Xen's and does not start. On that Intel
CPU under SVM, Linux PVH and HVM guests do not boot, so the guest is PV.

libvirt and libxl are Debian's, unchanged. libvirt writes its own header (its magic, a version,
the domain's XML) before libxl's stream: Xen's verify-stream-v2 reads the stream after it.
Both tests run SOFTPAGE_E2E_HELPER_REPEAT cycles (migrations, alternating direction), in
`make test-matrix` only.
"""
from __future__ import annotations

import os
import shlex
import sys

import pytest

from softpage_testbed import LIBVIRT_CPU_MODEL, VIRSH, CommandResult, Guest, Testbed, TestbedPair
from tests.e2e.helpers import (
    INSTALLED_HELPER,
    STATS,
    assert_arrived,
    assert_pruned,
    boots_seen,
    forget_console_logs,
    installed_package,
    save_and_restore_repeatedly,
    start_guest,
    verify_stream_v2,
    wait_for_module,
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


LIBXL_DRIVER_LOG = "/var/log/libvirt/libxl/libxl-driver.log"
"""libxl's log in libvirtd: where the save helper's messages go (softpage-save-helper(8))."""
DAEMON_LOG = ("systemctl status libvirtd --no-pager; journalctl -u libvirtd --no-pager | tail -40; "
              f"tail -40 {LIBXL_DRIVER_LOG}")
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


def start_libvirtd(testbed: Testbed) -> None:
    """libvirtd restarted as an admin does after enabling the helper, answering, with the helper
    in its environment (the package's drop-in gives it /etc/default/softpage)."""
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


@pytest.mark.matrix_only  # make test has the installed package with xl (test_debian_packages)
@pytest.mark.testbed_cpu(LIBVIRT_CPU_MODEL)
def test_virsh_save_and_restore_prune_through_the_installed_helper(xen_pvh_testbed: Testbed) -> None:
    testbed = xen_pvh_testbed
    with installed_package(testbed):
        start_libvirtd(testbed)
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


# -- virsh migrate --live between the two hosts of a Xen 4.17.5 pair -----------------------------

MIGRATION_PORTS = range(49152, 49216 + 1)
"""Where the destination's libvirtd listens for the migration stream (one port per incoming
migration, plain TCP): libvirt's LIBXL_MIGRATION_PORT_MIN / _MAX (src/libxl/libxl_conf.h),
compiled in; libxl.conf has no setting for them in libvirt 9.0."""
LIBVIRTD_CONF = "/etc/libvirt/libvirtd.conf"
HELPER_LOG_LEVEL = "log_level = 2"
"""libvirtd's default (3, warnings) also filters libxl's log, where the helper writes its summary
at INFO: with 2 it is in LIBXL_DRIVER_LOG."""
CONNECTIONS = "/tmp/libvirt-migration-connections"
WATCH_CONNECTIONS = (f"while :; do ss -Htn state established >> {CONNECTIONS}; sleep 0.5; done")
"""On the destination during a migration: every established TCP connection, twice a second."""


def migration_connections(destination: Testbed, source_ip: str) -> set[int]:
    """The local ports of ``destination`` in ``MIGRATION_PORTS`` that ``source_ip`` was
    connected to while ``WATCH_CONNECTIONS`` ran (``ss -Htn``: "RECV-Q SEND-Q LOCAL PEER")."""
    ports = set()
    for line in destination.run(["cat", CONNECTIONS], check=True).stdout.splitlines():
        words = line.split()
        if len(words) < 4:
            continue
        local_port, peer_ip = int(words[2].rsplit(":", 1)[1]), words[3].rsplit(":", 1)[0]
        if local_port in MIGRATION_PORTS and peer_ip == source_ip:
            ports.add(local_port)
    return ports


def virsh_migrate_live(pair: TestbedPair, guest: Guest) -> Guest:
    """``virsh migrate --live`` of ``guest`` to the other host, as an admin runs it (the
    destination's libvirtd reached over ssh); returns the guest there. Prints the command's wall
    time, the bytes the destination's link NIC received meanwhile and the helper's totals."""
    source, destination = guest.testbed, pair.peer(guest.testbed)
    source.run(["rm", "-f", STATS], check=True)
    heartbeat, boots = guest.heartbeat(), boots_seen(destination, guest.spec)
    received = pair.received_bytes(destination)
    destination.run(f"rm -f {CONNECTIONS}; nohup sh -c {shlex.quote(WATCH_CONNECTIONS)} > /dev/null 2>&1 & "
                    "echo $! > /tmp/libvirt-migration-watch", check=True)
    try:
        migrated = virsh(source, "migrate", "--live", "--verbose", guest.name,
                         f"xen+ssh://{pair.name(destination)}/system")
    finally:
        destination.run("kill $(cat /tmp/libvirt-migration-watch)")
    wire_bytes = pair.received_bytes(destination) - received
    assert migrated.ok, (f"virsh migrate: {migrated.stderr[-3000:]}\n"
                         + source.run(DAEMON_LOG, timeout_s=120).stdout
                         + destination.run(DAEMON_LOG, timeout_s=120).stdout)
    arrived = assert_arrived(source, destination, guest.spec, heartbeat, boots)
    totals = assert_pruned(source)
    assert wait_for_module(arrived) == "ready"
    # The stream went over libvirt's own port, not ssh: from the source's link address to a port
    # of the destination's libvirtd.
    source_ip = source.run(["getent", "hosts", pair.name(source)], check=True).stdout.split()[0]
    ports = migration_connections(destination, source_ip)
    assert ports, destination.run(["cat", CONNECTIONS]).stdout[-2000:]
    # The helper ran in the source's libvirtd and said so in libxl's log there.
    libxl_log = source.run(["tail", "-20", LIBXL_DRIVER_LOG], check=True).stdout
    summary = f"{totals['pages_data']} pages with data, {totals['pages_xalloc']} as XALLOC"
    assert summary in libxl_log, libxl_log
    print(f"virsh migrate --live {pair.name(source)} -> {pair.name(destination)}: {migrated.wall_s:.1f} s, "
          f"{wire_bytes} bytes on the link, libvirt port {sorted(ports)}, helper: {totals}", file=sys.stderr)
    return arrived


@pytest.mark.matrix_only
@pytest.mark.testbed_cpu(LIBVIRT_CPU_MODEL)
def test_virsh_migrate_live_between_two_hosts_prunes_through_the_helper(pv_pair: TestbedPair) -> None:
    """`virsh migrate --live GUEST xen+ssh://host-b/system` of a PV guest with the module, there
    and back (SOFTPAGE_E2E_HELPER_REPEAT migrations, alternating), libvirtd on both hosts with the
    helper enabled: each arrives intact and re-publishes, the source's helper pruned."""
    pair = pv_pair
    name = "virsh-live"
    forget_console_logs(pair, name)
    with installed_package(pair.a), installed_package(pair.b):
        try:
            for testbed in pair.testbeds:
                # libvirtd makes the log (and its directory) at its first start
                testbed.run(f"echo '{HELPER_LOG_LEVEL}' >> {LIBVIRTD_CONF}; rm -f {LIBXL_DRIVER_LOG}",
                            check=True)
                start_libvirtd(testbed)
            guest = start_guest(pair.a, name, guest_type="pv", toolstack="virsh")
            for _ in range(REPEAT):
                guest = virsh_migrate_live(pair, guest)
        finally:
            for testbed in pair.testbeds:
                testbed.run("systemctl stop libvirtd", timeout_s=120)
                testbed.run(["sed", "-i", f"/^{HELPER_LOG_LEVEL}$/d", LIBVIRTD_CONF])
