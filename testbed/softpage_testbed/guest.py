"""A test guest: its xl configuration (``GuestSpec``) and, once running, what its console says
(``Guest``). Guests print to their console, which xenconsoled logs to
``/var/log/xen/console/guest-NAME*.log`` (a migration adds ``NAME--incoming``): heartbeats, boot
markers and workload verdicts are read from there."""

from __future__ import annotations

import dataclasses
import re
import shlex
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from softpage_testbed.errors import TestbedError

if TYPE_CHECKING:
    from softpage_testbed.host import Testbed

T = TypeVar("T")

CONSOLE_LOG_DIR = "/var/log/xen/console"
HEARTBEAT_RE = re.compile(r"HEARTBEAT (\d+)")
VERIFY_RE = re.compile(r"WORKLOAD VERIFY (ok|FAIL) seq=(\d+)(.*)")
READY_RE = re.compile(r"WORKLOAD READY (.*)")
BOOT_MARKER = "GUEST-INIT booted"
STOPPED_CHECK_S = 10.0
COUNT_BYTES = "/opt/softpage/bin/count-bytes"
"""The payload's pipe that counts a stream's bytes into a file (testbed/dom0/count-bytes)."""
GUEST_KERNELS = ("6.1", "6.12")
"""The guest kernels of the payload (testbed/payload.sh): Debian 12's and Debian 13's."""
DEFAULT_GUEST_KERNEL = "6.1"
"""How often a wait on a guest's console also asks Xen whether the guest still runs."""


KEPT_FOR_THE_LOGS = ('on_crash = "preserve"', 'on_reboot = "preserve"')
"""A test guest never reboots on purpose: a crashed or rebooting one is kept for the logs instead
of xl restarting it behind the test's back."""
HVM_CONFIG = (
    'device_model_version = "qemu-xen"',
    # no display: QEMU's VGA and VNC server cost TCG time and nothing reads them
    'vga = "none"',
    "vnc = 0",
    'serial = "none"',
)
"""What an HVM test guest adds to its configuration."""
HVM_KERNEL_ARGS = ("pci=lastbus=0",)
"""An HVM guest's kernel probes for peer host bridges on all 256 PCI buses through port 0xcf8,
each access a round trip to QEMU in dom0: about 80 s under TCG (xenctx, 2026-12-05). QEMU's
i440fx machine has bus 0 only."""


def counting_receiver(counter: str) -> str:
    """Stock ``xl migrate-receive`` behind a pipe that leaves the stream's size in ``counter``:
    the receiver command for ``xl migrate -s ""``."""
    return f"python3 {COUNT_BYTES} {counter} | xl migrate-receive"


@dataclasses.dataclass(frozen=True)
class GuestSpec:
    """A test guest: kernel and busybox initramfs from the payload, workload parameters on its
    kernel command line (read by testbed/guest/init)."""

    name: str = "guest"
    guest_type: str = "pvh"  # "pvh", "pv" or "hvm"
    """An HVM guest boots the same kernel and initramfs through QEMU (qemu-system-xen in dom0,
    libxl's direct kernel boot: hvmloader, SeaBIOS, then Linux), with no VGA, no emulated disk and
    the PV console as hvc0, so its console log is xenconsoled's as for the other types."""
    memory_mb: int = 256
    vcpus: int = 1
    anon_mb: int = 64
    cache_mb: int = 0
    dirty_rate: int = 100  # pages/s
    verify_every_s: int = 0  # 0: verify only when asked
    load_kmod: bool = True  # insmod softpage.ko when the payload has one
    kmod_args: tuple[str, ...] = ()
    data_disk: bool = True
    tsc_mode: str = "native"
    """xl.cfg tsc_mode. QEMU's CPU has no invariant TSC, so Xen's "default" would intercept every
    guest RDTSC; under TCG's nested SVM such exits now and then end in a guest triple fault."""
    extra_config: tuple[str, ...] = ()  # more xl.cfg lines, verbatim
    kernel_args: tuple[str, ...] = ()
    """Guest kernel options users set, e.g. ``init_on_free=1``, ``page_poison=1``."""
    kernel: str = DEFAULT_GUEST_KERNEL
    """The guest's Linux series, one of ``GUEST_KERNELS``: its kernel, modules and softpage.ko."""

    @property
    def boot_timeout_s(self) -> float:
        """How long ``xl create`` to the first heartbeat may take. An HVM guest's kernel and
        initramfs come through QEMU's fw_cfg I/O port, a ``rep insb`` from port 0x511 in SeaBIOS's
        linuxboot ROM (Xen's QEMU has no fw_cfg DMA): 10.8 MB at 65-70 KB/s under TCG, seen with
        xenctx on 2026-12-05, so its boot alone is about 3 minutes."""
        return 1200.0 if self.guest_type == "hvm" else 300.0

    @property
    def data_disk_vdev(self) -> str:
        """The data disk's virtual device. An HVM guest's QEMU would emulate xvda-xvdd as IDE
        disks too, and refuses a read-only one (libxl_dm.c): from xvde on a disk is PV only."""
        return "xvde" if self.guest_type == "hvm" else "xvdb"

    @property
    def kernel_file(self) -> str:
        """A PVH or PV guest boots its kernel as an ELF file (``vmlinux``, testbed/guest/vmlinux-of):
        from the bzImage libxenguest would decompress 66 MB of xz in dom0 on every ``xl create``,
        which took ``xl create`` 9.5-9.9 s against 4.2-4.4 s under TCG (2026-12-07). An HVM guest's
        kernel goes through SeaBIOS's linuxboot, which needs the bzImage."""
        return "vmlinuz" if self.guest_type == "hvm" else "vmlinux"

    def kernel_command_line(self) -> str:
        words = [
            "console=hvc0",
            "loglevel=4",
            *(HVM_KERNEL_ARGS if self.guest_type == "hvm" else ()),
            *self.kernel_args,
            f"sp_anon_mb={self.anon_mb}",
            f"sp_cache_mb={self.cache_mb}",
            f"sp_dirty_rate={self.dirty_rate}",
            f"sp_verify_every={self.verify_every_s}",
            f"sp_kmod={1 if self.load_kmod else 0}",
            f"sp_data_disk={self.data_disk_vdev}",
        ]
        words += [f"sp_kmod_arg={arg}" for arg in self.kmod_args]
        return " ".join(words)

    def xl_config(self, data_disk_device: str) -> str:
        # The backend named (backendtype=phy), not left to libxl: libvirt's xen-xl import makes an
        # unnamed one a QEMU qdisk backend, which a PV guest's disk then never gets (2026-12-06).
        disk = f"format=raw,vdev={self.data_disk_vdev},access=ro,backendtype=phy,target={data_disk_device}"
        disks = f"['{disk}']" if self.data_disk else "[]"
        boot = f"/opt/softpage/guest/{self.kernel}"
        return xl_config_text(
            self.name, self.guest_type, f"{boot}/{self.kernel_file}", f"{boot}/initrd.cpio.gz",
            self.kernel_command_line(), self.memory_mb, self.vcpus, self.tsc_mode, "[]", disks,
            (*(HVM_CONFIG if self.guest_type == "hvm" else ()), *self.extra_config))


def xl_config_text(name: str, guest_type: str, kernel: str, ramdisk: str, command_line: str, memory_mb: int,
                   vcpus: int, tsc_mode: str, vif: str, disk: str, more: tuple[str, ...]) -> str:
    """The xl.cfg of a test guest (busybox or distro): direct kernel boot, fixed memory, kept
    for the logs when it crashes or reboots, then ``more`` lines verbatim."""
    lines = [
        f'name = "{name}"',
        f'type = "{guest_type}"',
        f'kernel = "{kernel}"',
        f'ramdisk = "{ramdisk}"',
        f'extra = "{command_line}"',
        f"memory = {memory_mb}",
        f"maxmem = {memory_mb}",
        f"vcpus = {vcpus}",
        f'tsc_mode = "{tsc_mode}"',
        f"vif = {vif}",
        f"disk = {disk}",
        *KEPT_FOR_THE_LOGS,
        *more,
    ]
    return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    ok: bool
    seq: int
    fields: dict[str, str]
    line: str



class ConsoleGuest:
    """A running guest, found by name (a migrated guest keeps its name), read through its console
    log and typed into through its console. ``Guest`` is the busybox test guest; the distro guests
    are ``softpage_testbed.distro.DistroGuest``."""

    def __init__(self, testbed: Testbed, name: str) -> None:
        self.testbed = testbed
        self.name = name

    def wait_until_up(self, timeout_s: float) -> bool:
        """True once the guest is up (what that means is the guest kind's); False if the domain
        shut down before (a triple fault under TCG), TestbedError on timeout."""
        raise NotImplementedError

    def console_log(self) -> str:
        """Every console line this guest printed since it was created, across migrations."""
        # a migrated guest's lines continue in guest-NAME--incoming.log; ls -tr keeps them in order
        result = self.testbed.run(
            f"cd {CONSOLE_LOG_DIR} && ls -tr guest-{self.name}.log guest-{self.name}--*.log 2>/dev/null"
            " | xargs -r cat", timeout_s=60)
        return result.stdout.replace("\r", "")

    def xl_state(self) -> str:
        """The state column of `xl list NAME` (``-b----``, ``---sc-``), "" when Xen does not list
        the domain."""
        return self.testbed.run(f"xl list {shlex.quote(self.name)} | awk 'NR == 2 {{print $5}}'",
                                timeout_s=60).stdout.strip()

    def stopped(self) -> bool:
        """True when Xen lists the domain as crashed or shut down (a triple fault under TCG turns
        into a preserved crash); False while it runs, is paused, or is not listed at all."""
        state = self.xl_state()
        return "s" in state or "c" in state

    def _wait(self, found: Callable[[], T | None], timeout_s: float, what: str,
              timed_out: Callable[[], str], poll_s: float = 1.0) -> T:
        """Poll ``found`` until it returns a value. TestbedError after timeout_s (``timed_out()``
        says what was missing), or as soon as Xen shows the guest crashed or shut down: asked every
        STOPPED_CHECK_S, so a dead guest fails the wait then, not at its timeout."""
        last_check = time.monotonic()
        deadline = last_check + timeout_s
        while True:
            value = found()
            if value is not None:
                return value
            if time.monotonic() > deadline:
                raise TestbedError(f"guest {self.name}: {timed_out()}; "
                                   f"console tail:\n{self.console_log()[-3000:]}")
            if time.monotonic() - last_check >= STOPPED_CHECK_S:
                if self.stopped():
                    raise TestbedError(f"guest {self.name} crashed or shut down while the harness waited "
                                       f"for {what}; console tail:\n{self.console_log()[-3000:]}")
                last_check = time.monotonic()
            time.sleep(poll_s)

    def _wait_booted(self, booted: Callable[[], bool], timeout_s: float, missing: str, poll_s: float) -> bool:
        """True once ``booted()``; False if the domain shut down first (crashed, or a triple fault
        turned into a preserved reboot: the caller may boot it again). TestbedError after
        timeout_s, ``missing`` saying what did not come."""
        deadline = time.monotonic() + timeout_s
        while not booted():
            if self.stopped():
                return False
            if time.monotonic() > deadline:
                raise TestbedError(f"guest {self.name}: {missing} within {timeout_s:.0f} s; "
                                   f"console tail:\n{self.console_log()[-3000:]}")
            time.sleep(poll_s)
        return True

    def wait_for(self, pattern: str, timeout_s: float = 120, poll_s: float = 1.0) -> re.Match[str]:
        """Wait until a console line matches the regex; returns the LAST match."""
        compiled = re.compile(pattern)

        def last_match() -> re.Match[str] | None:
            matches = list(compiled.finditer(self.console_log()))
            return matches[-1] if matches else None

        return self._wait(last_match, timeout_s, repr(pattern),
                          lambda: f"no console line matching {pattern!r} within {timeout_s:.0f} s", poll_s)

    def console_command(self, command: str) -> None:
        """Type a command into the guest's shell on its console (the pty xenconsoled serves)."""
        self.testbed.run(
            f"domid=$(xl domid {shlex.quote(self.name)}) && "
            "tty=$(xenstore-read /local/domain/$domid/console/tty) && "
            f"printf '%s\\n' {shlex.quote(command)} > \"$tty\"", timeout_s=60, check=True)

    def save_restore(self, timeout_s: float = 900) -> dict[str, float]:
        """Stock ``xl save`` then ``xl restore``; returns wall times and the image size."""
        image = f"/var/lib/xen/save-{self.name}.img"
        saved = self.testbed.run(["xl", "save", self.name, image], timeout_s=timeout_s, check=True)
        size = int(self.testbed.run(["stat", "-c", "%s", image], check=True).stdout)
        restored = self.testbed.run(["xl", "restore", image], timeout_s=timeout_s, check=True)
        self.testbed.run(["rm", "-f", image])
        return {"save_s": saved.wall_s, "restore_s": restored.wall_s, "image_bytes": float(size)}

    def migrate_localhost(self, timeout_s: float = 900) -> dict[str, float]:
        """Stock ``xl migrate`` to this same host (no ssh: ``-s ""`` runs the receiver command
        itself); returns the wall time and the bytes of the migration stream."""
        counter = f"/tmp/migrate-{self.name}.bytes"
        result = self.testbed.run(["xl", "migrate", "-s", "", self.name, counting_receiver(counter)],
                                  timeout_s=timeout_s, check=True)
        sent = self.testbed.run(["cat", counter], check=True).stdout.strip()
        return {"migrate_s": result.wall_s, "stream_bytes": float(sent or 0)}

    def destroy(self) -> None:
        self.testbed.run(["xl", "destroy", self.name], timeout_s=120)


class Guest(ConsoleGuest):
    """A running busybox test guest (``GuestSpec``): heartbeats, boot markers and workload verdicts
    on its console."""

    def __init__(self, testbed: Testbed, spec: GuestSpec) -> None:
        super().__init__(testbed, spec.name)
        self.spec = spec

    def wait_until_up(self, timeout_s: float) -> bool:
        return self.wait_for_first_heartbeat(timeout_s)

    def heartbeat(self) -> int:
        """The highest heartbeat counter printed so far (-1 before the first)."""
        return max((int(n) for n in HEARTBEAT_RE.findall(self.console_log())), default=-1)

    def boot_count(self) -> int:
        return self.console_log().count(BOOT_MARKER)

    def wait_for_first_heartbeat(self, timeout_s: float) -> bool:
        """True at the first heartbeat; False if the domain shut down (crashed, or a triple fault
        turned into a preserved reboot) before it. TestbedError on timeout."""
        return self._wait_booted(lambda: self.heartbeat() >= 0, timeout_s, "no heartbeat", poll_s=1)

    def wait_for_heartbeat(self, at_least: int, timeout_s: float = 120) -> int:
        def beat_reached() -> int | None:
            beat = self.heartbeat()
            return beat if beat >= at_least else None

        return self._wait(beat_reached, timeout_s, f"heartbeat {at_least}",
                          lambda: f"heartbeat {self.heartbeat()}, expected >= {at_least} within "
                                  f"{timeout_s:.0f} s")

    def wait_for_workload_ready(self, timeout_s: float = 300) -> dict[str, str]:
        match = self.wait_for(r"WORKLOAD (READY|ERROR) (.*)", timeout_s)
        if match.group(1) == "ERROR":
            raise TestbedError(f"guest {self.name}: workload failed: {match.group(0)}")
        return dict(re.findall(r"(\w+)=(\S+)", match.group(2)))

    def verify(self, timeout_s: float = 300) -> VerifyResult:
        """Ask the workload to check all its memory and files now; returns its verdict."""
        previous = max((int(seq) for _, seq, _ in VERIFY_RE.findall(self.console_log())), default=0)
        self.console_command("kill -USR1 $(cat /run/workload.pid)")

        def new_verdict() -> VerifyResult | None:
            for match in VERIFY_RE.finditer(self.console_log()):
                if int(match.group(2)) > previous:
                    return VerifyResult(ok=match.group(1) == "ok", seq=int(match.group(2)),
                                        fields=dict(re.findall(r"(\w+)=(\S+)", match.group(3))),
                                        line=match.group(0))
            return None

        return self._wait(new_verdict, timeout_s, "WORKLOAD VERIFY",
                          lambda: f"no WORKLOAD VERIFY after {timeout_s:.0f} s")

    def workload_files(self, first: int, count: int, mode: str, timeout_s: float = 600) -> dict[str, float]:
        """``workload files /data FIRST COUNT MODE`` in the guest's shell: for the data disk's
        files FIRST..FIRST+COUNT-1, ``pages`` and how many are in the page cache (``resident``,
        mincore); with ``check`` it then reads them all against the manifest (``bad`` files, and
        ``read_s``: what re-reading them costs the guest now)."""
        pattern = re.compile(rf"WORKLOAD FILES first={first} count={count} (.*)")
        seen = len(pattern.findall(self.console_log()))
        self.console_command(f"workload files /data {first} {count} {mode}")

        def answer() -> str | None:
            found = pattern.findall(self.console_log())
            return found[seen] if len(found) > seen else None

        line = self._wait(answer, timeout_s, "WORKLOAD FILES",
                          lambda: f"no WORKLOAD FILES first={first} after {timeout_s:.0f} s")
        return {key: float(value) for key, value in re.findall(r"(\w+)=(\S+)", line)}

