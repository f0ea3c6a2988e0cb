"""One boot of the Xen-in-QEMU testbed (``make testbed``, built by testbed/build.sh into
``SOFTPAGE_TESTBED_CACHE``): QEMU, Xen and a Debian dom0 under TCG, driven through the dom0 agent.
The serial console (Xen + dom0 kernel) is only logged, to ``<work_dir>/serial.log``. The CURRENT
checkout reaches dom0 as a payload disk built by ``testbed/build.sh payload``."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import itertools
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from softpage_testbed.agent import AGENT_PORT_NAME, LIVENESS_TIMEOUT_S, AgentClient, CommandResult
from softpage_testbed.distro import (
    DISTRO_RELEASES,
    DistroGuest,
    DistroGuestSpec,
    ensure_guest_bridge,
)
from softpage_testbed.errors import CommandFailed, Dom0BootStalled, Dom0Hung, TestbedError
from softpage_testbed.guest import CONSOLE_LOG_DIR, ConsoleGuest, Guest, GuestSpec

T = TypeVar("T")
G = TypeVar("G", bound=ConsoleGuest)

REPO_DIR = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_DIR / "testbed" / "build.sh"

XEN_PVH_VERSION = "4.17.7"
"""Current bookworm-security hypervisor: PVH/HVM live migration (HAP log-dirty)."""
XEN_PV_VERSION = "4.17.5"
"""Pinned bookworm point release: still has shadow paging, so PV guests live-migrate too."""
XEN_TRIXIE_VERSION = "4.20.4"
"""Debian 13's hypervisor (trixie-security, 4.20.4+63): built without shadow paging as well, so
PVH/HVM guests live-migrate and PV guests can only be saved and restored."""


@dataclasses.dataclass(frozen=True)
class HostPlatform:
    """One dom0 release of the testbed, as testbed/build.sh lays it out in the cache."""

    release: str
    """Debian's code name: ``bookworm`` (Debian 12) or ``trixie`` (Debian 13)."""
    dom0_image: str
    rootfs: str
    """The cached rootfs whose /boot holds dom0's initramfs."""
    dom0_kernel: str
    xen: str
    """Paths relative to the cache."""
    pv_live_migration: bool = False
    """Whether this Xen live-migrates PV guests: their log-dirty mode needs shadow paging, which
    only the pinned 4.17.5 is built with (docs/platforms.md)."""


HOST_PLATFORMS = {
    XEN_PVH_VERSION: HostPlatform(
        "bookworm", "dom0.img", "rootfs", "boot/vmlinuz", f"boot/xen-{XEN_PVH_VERSION}"),
    XEN_PV_VERSION: HostPlatform(
        "bookworm", "dom0.img", "rootfs", "boot/vmlinuz", f"boot/xen-{XEN_PV_VERSION}",
        pv_live_migration=True),
    XEN_TRIXIE_VERSION: HostPlatform(
        "trixie", "dom0-trixie.img", "rootfs-trixie", "boot/trixie/vmlinuz", "boot/trixie/xen"),
}
"""Each hypervisor the testbed boots, with the dom0 it boots: Xen's version picks the host."""

PAYLOAD_DISK_SERIAL = "sp-payload"
DATA_DISK_SERIAL = "sp-data"
SCRATCH_DISK_SERIAL = "sp-scratch"
APP_DATA_DISK_SERIAL = "sp-app-data"
APP_DATA_IMAGE = "app-data.img"
APP_DATA_CHECKSUMS = "app-data.sha256"
"""In the cache (testbed/build.sh stage app_data): the distro guests' application files, and
their SHA256SUMS."""
DATA_MANIFEST = "data.manifest"
"""In the cache (stage data): the data disk's files, one line ``NAME BYTES HASH`` each."""
DISTRO_DISK_IMAGE = "distro-{release}.img"
"""A distro guest's root disk, beside the payload (testbed/payload.sh)."""
SCRATCH_MOUNT = "/mnt/scratch"
# Serial-console text that means the boot will never complete: fail at once, not at the timeout.
FATAL_BOOT_PATTERNS = (r"Kernel panic", r"\(XEN\) Panic on CPU", r"\(XEN\) \*\*\*\* Dom0 crashed")

DOM0_BOOT_STALL_S = 300.0
"""A dom0 boot whose serial console stays silent this long has hung: seen once under TCG
(2026-12-01), dom0's kernel stopped after "clocksource: Switched to clocksource xen" and wrote
nothing more for 15 minutes. A whole boot writes to the console every few seconds and takes
about 3 minutes."""
DOM0_BOOT_ATTEMPTS = 2
BOOT_ATTEMPTS = 4
"""Tries at booting a fresh guest: nested SVM under TCG occasionally triple-faults a PVH guest
in early kernel boot, before anything of softpage runs (2026-11-30, idle host: 4 of about 30
domain starts, each 10-16 s in). With four tries a run of ~25 guest creations loses one in
about one run of a hundred, and the test is then rerun (GuestTripleFault)."""
VIRSH = "virsh -q -c xen:///system"
"""libvirt's client, connected to the libxl driver of dom0's libvirtd."""
LIBVIRT_CPU_MODEL = "kvm64,+svm,+npt"
"""QEMU's CPU for the boots that run libvirtd (``TestbedConfig.cpu_model``, set by the libvirt
tests). libvirt's libxl driver names the host CPU after a model of its CPU map whose features Xen's
physinfo hw_cap all has, and does not start without one ("Cannot find suitable CPU model for given
data"). Xen clears SEP on AMD CPUs (SYSENTER is unusable in long mode there) and did not report VME
(measured with Opteron_G2, whose CPUID has it), and every model of libvirt 9.0's map lists one of
the two, so no AMD model can work: qemu64 and Opteron_G2 both failed. QEMU's kvm64 is an Intel CPU
(family 15), with SEP kept: libvirt names it qemu64, and SVM and NPT still give Xen HVM with HAP.
Its limit: a Linux HVM or PVH guest triple-faults in verify_cpu, on Intel's MSR_IA32_MISC_ENABLE
(0x1a0) under SVM (family 6 model 6 avoids that MSR but the guest powered off after 0.5 s), so
these boots run PV guests. Measured on Xen 4.17.7, 2026-12-06."""
HOTPLUG_TIMEOUT_MESSAGE = "because of timeout"  # libxl_aoutils.c async_exec_timeout
TRIPLE_FAULT_RE = re.compile(rb"\(XEN\) \[[ \d.]+\] d\d+v\d+ Triple fault")
LINK_LOOPBACK = "127.0.0.1"
"""Where two-host links run: this machine's loopback, never a real network."""
DISK_RATE_ENV = "SOFTPAGE_DISK_RATE"
"""The guests' disks' bandwidth, e.g. ``20M`` (MiB/s; K and G too, QEMU's binary suffixes);
unset, empty or ``0``: unthrottled."""
RATE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
GUEST_DISK_DRIVES = ("data", "app-data", "distro-")
"""QEMU drive ids (or their prefix) that serve guests' data through blkback, so that QEMU's
throttling is the only rate limit on them: dom0 hands them to guests as ``phy:``, which bypasses
dom0's page cache, and only this machine's page cache is left under them. Not dom0's root, the
payload or the scratch disk: dom0's own reads are not what a guest pays."""


def parse_disk_rate(text: str) -> int | None:
    """``20M`` -> 20971520 bytes per second; ``""`` or ``0`` -> None (unthrottled)."""
    if not text.strip():
        return None
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(?:i?B)?(?:/s)?\s*", text, re.IGNORECASE)
    if match is None:
        raise TestbedError(f"{DISK_RATE_ENV}={text!r}: expected a number of bytes per second with "
                           f"an optional K, M or G (binary), e.g. 20M")
    rate = int(match.group(1)) * RATE_SUFFIXES[match.group(2).upper()]
    return rate or None


def describe_disk_rate(bytes_per_s: int | None) -> str:
    """How every figure names the guests' disk speed: ``disk 20 MiB/s`` or ``disk unthrottled``."""
    if bytes_per_s is None:
        return "disk unthrottled"
    for suffix, unit in (("GiB/s", 1 << 30), ("MiB/s", 1 << 20), ("KiB/s", 1 << 10)):
        if bytes_per_s >= unit:
            return f"disk {bytes_per_s / unit:.3g} {suffix}"
    return f"disk {bytes_per_s} B/s"


@dataclasses.dataclass(frozen=True)
class LinkEnd:
    """This host's end of a two-host link (softpage_testbed/pair.py): a virtio NIC whose frames
    QEMU sends as UDP datagrams on 127.0.0.1 to the other QEMU's port, so that they go from one
    QEMU to the other and nowhere else. (UNIX datagram sockets would block a sender whose peer
    reads nothing, a dom0 whose NIC is down: both QEMUs froze in sendto, 2026-12-05.)"""

    host: str
    """The dom0's name on the link (testbed/dom0/link-hosts), given to dom0 as ``softpage.host=``."""
    mac: str
    port: int
    """This QEMU's UDP port on 127.0.0.1."""
    peer_port: int
    """The other QEMU's: frames sent while it is not there are lost, as on an unplugged cable."""


@dataclasses.dataclass(frozen=True)
class TestbedConfig:
    """Everything that varies between boots. ``from_env`` reads the documented variables."""

    __test__ = False  # not a pytest test class, despite the name

    xen_version: str = XEN_PVH_VERSION
    qemu_mem_mb: int = 3072
    dom0_mem_mb: int = 1024
    cpus: int = 2
    # qemu64 + SVM/NPT is what Xen's own CI uses under TCG; richer models (-cpu max) crash PV dom0
    # or corrupt dom0 userspace heaps (see testbed/README.md).
    cpu_model: str = "qemu64,+svm,+npt"
    boot_timeout_s: float = 900.0
    scratch_image: Path | None = None
    """A writable ext4 image dom0 mounts at ``SCRATCH_MOUNT``: what one boot leaves for the next
    (a save image carried from a Debian 12 host to a Debian 13 one)."""
    link: LinkEnd | None = None
    """One end of a link to another testbed (``TestbedPair``); None: no NIC at all."""
    disk_rate: int | None = None
    """Bytes per second, reads and writes together, that QEMU serves each of the guests' disks
    (``GUEST_DISK_DRIVES``) at: its ``throttling.bps-total``. None (the default): unthrottled, as
    every figure before 2026-12-06 was measured, and as fast as this machine's page cache."""
    cache_dir: Path = dataclasses.field(
        default_factory=lambda: Path(
            os.environ.get("SOFTPAGE_TESTBED_CACHE")
            or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "softpage" / "testbed"
        )
    )

    @property
    def platform(self) -> HostPlatform:
        if self.xen_version not in HOST_PLATFORMS:
            known = ", ".join(HOST_PLATFORMS)
            raise TestbedError(f"no testbed host boots Xen {self.xen_version}; known: {known}")
        return HOST_PLATFORMS[self.xen_version]

    @classmethod
    def from_env(cls, xen_version: str) -> TestbedConfig:
        return cls(
            xen_version=xen_version,
            qemu_mem_mb=int(os.environ.get("SOFTPAGE_QEMU_MEM_MB", "3072")),
            dom0_mem_mb=int(os.environ.get("SOFTPAGE_DOM0_MEM_MB", "1024")),
            disk_rate=parse_disk_rate(os.environ.get(DISK_RATE_ENV, "")),
        )

    @property
    def guest_disk_options(self) -> str:
        """What every guest disk's -drive adds: QEMU's throttle (a leaky bucket that lets a burst of
        a tenth of a second through), or nothing."""
        return "" if self.disk_rate is None else f",throttling.bps-total={self.disk_rate}"



def _die_with_parent() -> None:
    """Runs in the QEMU child before exec: a harness killed outright must not leave QEMU behind."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


def build_testbed() -> None:
    """``testbed/build.sh all``: seconds when the cache is current, ~3 minutes from nothing."""
    completed = subprocess.run([str(BUILD_SCRIPT), "all"], capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise TestbedError(f"testbed build failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-5000:]}")


def build_payload(output: Path, distro_guests: bool = True) -> dict[str, str]:
    """The current checkout as a payload disk; returns its PAYLOAD-INFO (what built, what did not).
    Without ``distro_guests`` it carries no distro guest disks (testbed/payload.sh, 4b)."""
    environment = {**os.environ, "SOFTPAGE_PAYLOAD_DISTRO": "1" if distro_guests else "0"}
    completed = subprocess.run(
        [str(BUILD_SCRIPT), "payload", str(output)], capture_output=True, text=True, check=False,
        env=environment,
    )
    if completed.returncode != 0:
        raise TestbedError(f"payload build failed:\n{completed.stderr[-5000:]}")
    info = dict(re.findall(r"^payload: (\w+)=(.*)$", completed.stderr, re.MULTILINE))
    return info



class Testbed:
    """One boot of QEMU + Xen + dom0. Use ``boot()`` / ``shutdown()`` or the context manager."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, config: TestbedConfig, payload: Path, work_dir: Path) -> None:
        self.config = config
        self.payload = payload
        self.work_dir = work_dir
        self.serial_log = work_dir / "serial.log"
        self._qemu: subprocess.Popen[bytes] | None = None
        self._agent: AgentClient | None = None
        self.data_disk_device = ""
        self.boot_timings: dict[str, float] = {}
        self.disk_rate = config.disk_rate
        """The guests' disks' rate in effect (``set_disk_rate`` changes it): name it beside every time."""
        self.hung = False
        """Set when dom0 stopped answering: every later command of this boot fails at once
        (Dom0Hung); a new boot clears it."""

    # -- lifecycle --------------------------------------------------------------------------

    def qemu_command(self) -> list[str]:
        cache = self.config.cache_dir
        platform = self.config.platform
        dom0_initrd = sorted((cache / platform.rootfs / "boot").glob("initrd.img-*"))
        if not dom0_initrd:
            raise TestbedError(f"no dom0 initramfs under {cache}/{platform.rootfs}/boot: run 'make testbed'")
        xen_args = (
            # bootscrub=false: scrubbing all RAM costs minutes of TCG time and makes every QEMU
            # resident at its full -m on a machine that several testbeds share
            "console=com1 com1=115200,8n1 loglvl=all guest_loglvl=all noreboot console_timestamps=boot "
            "bootscrub=false "
            f"dom0_mem={self.config.dom0_mem_mb}M,max:{self.config.dom0_mem_mb}M "
            f"dom0_max_vcpus={self.config.cpus}"
        )
        # by label: the order in which virtio disks get their names is not the command-line order
        dom0_args = "root=LABEL=softpage-dom0 rw console=hvc0 earlyprintk=xen"
        if self.config.link is not None:
            dom0_args += f" softpage.host={self.config.link.host}"  # read by dom0/softpage-link
        work = self.work_dir
        throttle = self.config.guest_disk_options
        return [
            "qemu-system-x86_64",
            # thread=single is no cure for the nested-SVM flakes (testbed/README.md)
            "-accel", "tcg,thread=multi",
            "-cpu", self.config.cpu_model,
            "-m", str(self.config.qemu_mem_mb),
            "-smp", str(self.config.cpus),
            # no VGA, IDE, floppy or parallel port: each costs dom0 boot time under TCG
            "-nodefaults", "-display", "none", "-no-reboot", "-net", "none",
            "-monitor", f"unix:{work}/monitor.sock,server=on,wait=off",
            "-qmp", f"unix:{work}/qmp.sock,server=on,wait=off",  # the harness's questions to QEMU
            "-chardev",
            f"socket,id=serial0,path={work}/serial.sock,server=on,wait=off,logfile={self.serial_log}",
            "-serial", "chardev:serial0",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,id=agent,path={work}/agent.sock,server=on,wait=off",
            "-device", f"virtserialport,chardev=agent,name={AGENT_PORT_NAME}",
            # -snapshot semantics per disk: dom0 writes never reach the cached image.
            "-drive", f"file={cache}/{platform.dom0_image},format=raw,if=virtio,cache=unsafe,snapshot=on",
            "-drive", f"file={self.payload},format=raw,if=none,id=payload,readonly=on",
            "-device", f"virtio-blk-pci,drive=payload,serial={PAYLOAD_DISK_SERIAL}",
            "-drive", f"file={cache}/data.img,format=raw,if=none,id=data,readonly=on{throttle}",
            "-device", f"virtio-blk-pci,drive=data,serial={DATA_DISK_SERIAL}",
            *self._scratch_drive(),
            *self._link_nic(),
            *self._distro_drives(),
            "-kernel", str(cache / platform.xen),
            "-append", xen_args,
            "-initrd", f"{cache}/{platform.dom0_kernel} {dom0_args},{dom0_initrd[-1]}",
        ]  # fmt: skip

    def _scratch_drive(self) -> list[str]:
        if self.config.scratch_image is None:
            return []
        return ["-drive", f"file={self.config.scratch_image},format=raw,if=none,id=scratch",
                "-device", f"virtio-blk-pci,drive=scratch,serial={SCRATCH_DISK_SERIAL}"]

    def _link_nic(self) -> list[str]:
        link = self.config.link
        if link is None:
            return []
        return ["-netdev", f"dgram,id=link,local.type=inet,local.host={LINK_LOOPBACK},local.port={link.port},"
                f"remote.type=inet,remote.host={LINK_LOOPBACK},remote.port={link.peer_port}",
                "-device", f"virtio-net-pci,netdev=link,mac={link.mac}"]

    def _distro_drives(self) -> list[str]:
        """The application's files (read-only) and each distro guest's root disk (its writes go to
        a QEMU snapshot, never to the payload's copy), when the cache and the payload have them."""
        drives = []
        throttle = self.config.guest_disk_options
        app_data = self.config.cache_dir / APP_DATA_IMAGE
        if app_data.exists():
            drives += ["-drive", f"file={app_data},format=raw,if=none,id=app-data,readonly=on{throttle}",
                       "-device", f"virtio-blk-pci,drive=app-data,serial={APP_DATA_DISK_SERIAL}"]
        for release in DISTRO_RELEASES:
            disk = self.payload.with_name(DISTRO_DISK_IMAGE.format(release=release))
            if disk.exists():
                drive = f"distro-{release}"
                drives += ["-drive", f"file={disk},format=raw,if=none,id={drive},cache=unsafe,snapshot=on"
                                     f"{throttle}",
                           "-device", f"virtio-blk-pci,drive={drive},serial={distro_disk_serial(release)}"]
        return drives

    def boot(self) -> None:
        """Boot QEMU, Xen and dom0 up to a ready ``xl``; a boot that stalls is tried again once
        (``DOM0_BOOT_ATTEMPTS``), its serial log kept beside."""
        for attempt in range(1, DOM0_BOOT_ATTEMPTS + 1):
            try:
                self._boot_once()
                return
            except Dom0BootStalled as stalled:
                self.shutdown()
                if attempt == DOM0_BOOT_ATTEMPTS:
                    raise
                kept = self.serial_log.with_name(f"serial-stalled-{attempt}.log")
                with contextlib.suppress(OSError):
                    self.serial_log.rename(kept)
                print(f"softpage_testbed: {stalled.args[0].splitlines()[0]}; booting again "
                      f"(attempt {attempt + 1} of {DOM0_BOOT_ATTEMPTS}), serial log kept in {kept}",
                      file=sys.stderr, flush=True)

    def _boot_once(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.hung = False  # a new boot: what hung was the one before
        started = time.monotonic()
        qemu_output = (self.work_dir / "qemu.out").open("wb")
        self._qemu = subprocess.Popen(
            self.qemu_command(), stdin=subprocess.DEVNULL, stdout=qemu_output, stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        qemu_output.close()
        try:
            self._wait_for_agent(started)
            self.boot_timings["agent_s"] = round(time.monotonic() - started, 1)
            # xencommons (xenstored, xenconsoled) comes up a little after the agent
            self.run("for i in $(seq 300); do xl list >/dev/null 2>&1 && exit 0; sleep 1; done; exit 1",
                     timeout_s=360, check=True)
            self.boot_timings["xl_ready_s"] = round(time.monotonic() - started, 1)
            self.run("mountpoint -q /opt/softpage && test -f /opt/softpage/PAYLOAD-INFO", check=True)
            # the first disk hotplug after boot is the slowest (cold bash, scripts, xenstore-*)
            self.run("cat /etc/xen/scripts/* /usr/bin/xenstore* > /dev/null; bash -n /etc/xen/scripts/block")
            self.data_disk_device = self.run(
                f"readlink -f /dev/disk/by-id/virtio-{DATA_DISK_SERIAL}", check=True
            ).stdout.strip()
            if self.config.scratch_image is not None:
                self.run(f"mkdir -p {SCRATCH_MOUNT} && mount /dev/disk/by-id/virtio-{SCRATCH_DISK_SERIAL} "
                         f"{SCRATCH_MOUNT}", check=True)
            self.check_disk_rate(self.config.disk_rate)
            print(f"softpage_testbed: Xen {self.config.xen_version} ({self.config.platform.release} dom0) "
                  f"booted: agent after {self.boot_timings['agent_s']} s, xl after "
                  f"{self.boot_timings['xl_ready_s']} s; guests' {describe_disk_rate(self.disk_rate)} "
                  f"(QEMU {self.describe_guest_disk_throttles()})", file=sys.stderr, flush=True)
        except BaseException:
            self.shutdown()
            raise

    def _wait_for_agent(self, started: float) -> None:
        socket_path = self.work_dir / "agent.sock"
        serial_size, serial_grew = -1, started
        while True:
            now = time.monotonic()
            elapsed = now - started
            if elapsed > self.config.boot_timeout_s:
                raise TestbedError(
                    f"dom0 agent not up after {elapsed:.0f} s; serial tail:\n{self.serial_tail()}"
                )
            size = self.serial_log.stat().st_size if self.serial_log.exists() else 0
            if size != serial_size:
                serial_size, serial_grew = size, now
            elif now - serial_grew > DOM0_BOOT_STALL_S:
                raise Dom0BootStalled(
                    f"dom0 boot stalled: no serial output for {now - serial_grew:.0f} s; "
                    f"serial tail:\n{self.serial_tail()}"
                )
            assert self._qemu is not None
            if self._qemu.poll() is not None:
                output = (self.work_dir / "qemu.out").read_text(errors="replace")
                raise TestbedError(f"QEMU exited with {self._qemu.returncode}: {output[-2000:]}\n"
                                   f"serial tail:\n{self.serial_tail()}")
            serial = self.serial_tail(200_000)
            for pattern in FATAL_BOOT_PATTERNS:
                if re.search(pattern, serial):
                    raise TestbedError(f"boot failed ({pattern}); serial tail:\n{self.serial_tail()}")
            if self._agent is None and socket_path.exists():
                with contextlib.suppress(OSError):
                    self._agent = AgentClient(socket_path)
            if self._agent is not None:
                with contextlib.suppress(TestbedError):
                    # short pings: one sent before the agent opened its port may never be answered
                    if self._agent.request({"argv": ["true"]}, timeout_s=5).ok:
                        return
            time.sleep(2)

    # -- QEMU ------------------------------------------------------------------------------

    def qmp(self, command: str, **arguments: object) -> object:
        """One QMP command on a connection of its own; its ``return``, or TestbedError."""
        with socket.socket(socket.AF_UNIX) as connection:
            connection.settimeout(10)
            connection.connect(str(self.work_dir / "qmp.sock"))
            replies = connection.makefile("rwb")
            replies.readline()  # the greeting
            for request in ({"execute": "qmp_capabilities"},
                            {"execute": command, "arguments": arguments}):
                replies.write(json.dumps(request).encode() + b"\n")
                replies.flush()
                while True:
                    reply = json.loads(replies.readline() or b'{"error": "QMP closed"}')
                    if "event" not in reply:
                        break
                if "error" in reply:
                    raise TestbedError(f"QMP {request['execute']}: {reply['error']}")
        return reply["return"]

    def guest_disk_throttles(self) -> dict[str, int]:
        """QEMU's own word on each guest disk's throttle (``query-block``): drive id -> its
        bytes per second (``bps``, reads and writes together), 0 for unthrottled."""
        blocks = self.qmp("query-block")
        assert isinstance(blocks, list)
        return {block["device"]: int(block["inserted"]["bps"]) for block in blocks
                if "inserted" in block and block["device"].startswith(GUEST_DISK_DRIVES)}

    def describe_guest_disk_throttles(self) -> str:
        return ", ".join(f"{drive} bps={bps}" for drive, bps in sorted(self.guest_disk_throttles().items()))

    def check_disk_rate(self, expected: int | None) -> None:
        """Every guest disk throttled at ``expected`` (None: not at all), or TestbedError."""
        throttles = self.guest_disk_throttles()
        wrong = {drive: bps for drive, bps in throttles.items() if bps != (expected or 0)}
        if wrong or "data" not in throttles:
            raise TestbedError(f"guests' disks: expected {describe_disk_rate(expected)}, "
                               f"QEMU has {throttles}")

    def set_disk_rate(self, bytes_per_s: int | None) -> None:
        """Change every guest disk's throttle while the testbed runs (QMP block_set_io_throttle;
        the other limits stay 0, as ``-drive throttling.bps-total`` leaves them)."""
        limits = {name: 0 for name in ("bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr")}
        for drive in self.guest_disk_throttles():
            self.qmp("block_set_io_throttle", device=drive, bps=bytes_per_s or 0, **limits)
        self.disk_rate = bytes_per_s
        self.check_disk_rate(bytes_per_s)

    def qemu_cpu_s(self) -> float | None:
        """CPU seconds this host's QEMU process (all its threads: the vCPUs, I/O, the network)
        has taken from this machine so far, user and system (proc(5): stat's utime and stime,
        fields 14 and 15); None when it does not run. Two hosts on one machine share its cores:
        what one takes, the other's guests lose."""
        if self._qemu is None or self._qemu.poll() is not None:
            return None
        try:
            stat = Path(f"/proc/{self._qemu.pid}/stat").read_text()
        except OSError:
            return None
        after_name = stat.rsplit(")", 1)[1].split()  # from field 3, the state
        return (int(after_name[14 - 3]) + int(after_name[15 - 3])) / os.sysconf("SC_CLK_TCK")

    def alive(self) -> bool:
        if self.hung or self._qemu is None or self._qemu.poll() is not None or self._agent is None:
            return False
        try:
            return self._agent.request({"argv": ["true"]}, timeout_s=20).ok
        except TestbedError:
            return False

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Destroy guests, sync, then stop QEMU (SIGTERM, SIGKILL after ``timeout_s``)."""
        if self._agent is not None:
            with contextlib.suppress(TestbedError):
                self.destroy_all_guests()  # Dom0Hung at once when dom0 hung
                self._agent.request({"argv": ["sync"]}, timeout_s=20)
            self._agent.close()
            self._agent = None
        if self._qemu is None:
            return
        if self._qemu.poll() is None:
            # SIGTERM is QEMU's orderly exit (its disks flushed). The monitor's `quit` from a
            # client that closes at once went unread: every shutdown waited out timeout_s.
            self._qemu.terminate()
            try:
                self._qemu.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._qemu.kill()
                self._qemu.wait(timeout=10)
        self._qemu = None

    def __enter__(self) -> Testbed:
        self.boot()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    # -- dom0 -------------------------------------------------------------------------------

    def run(self, command: str | list[str], timeout_s: float = 600, check: bool = False) -> CommandResult:
        """Run a dom0 command: a string goes to bash -c, a list is exec'd. ``check`` raises
        CommandFailed on a non-zero exit."""
        if self._agent is None:
            raise TestbedError("testbed is not booted")
        if self.hung:
            raise Dom0Hung(f"dom0 hung earlier in this boot; not running {command!r}")
        request: dict[str, object] = {"sh": command} if isinstance(command, str) else {"argv": command}
        try:
            result = self._agent.request(request, timeout_s=timeout_s, still_alive=self._dom0_answers)
        except Dom0Hung:
            self.hung = True
            raise
        if check and not result.ok:
            raise CommandFailed(str(command), result)
        return result

    def _dom0_answers(self) -> bool:
        assert self._agent is not None
        try:
            return self._agent.request({"argv": ["true"]}, timeout_s=LIVENESS_TIMEOUT_S).ok
        except TestbedError:
            return False

    def write_file(self, path: str, content: str) -> None:
        self.run(f"mkdir -p {shlex.quote(os.path.dirname(path))} && cat > {shlex.quote(path)}"
                 f" <<'SOFTPAGE_EOF'\n{content}SOFTPAGE_EOF", check=True)

    def payload_info(self) -> dict[str, str]:
        text = self.run("cat /opt/softpage/PAYLOAD-INFO", check=True).stdout
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def domains(self) -> list[str]:
        listing = self.run("xl list", check=True).stdout.splitlines()[1:]
        return [line.split()[0] for line in listing if line.split()]

    def destroy_all_guests(self) -> None:
        for name in self.domains():
            if name != "Domain-0":
                self.run(["xl", "destroy", name], timeout_s=120)

    def triple_faults(self) -> int:
        """How many guest triple faults Xen has logged on the serial console so far."""
        try:
            return len(TRIPLE_FAULT_RE.findall(self.serial_log.read_bytes()))
        except OSError:
            return 0

    def serial_tail(self, max_bytes: int = 6000) -> str:
        try:
            with self.serial_log.open("rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - max_bytes))
                return log.read().decode("utf-8", "replace")
        except OSError:
            return "(no serial log)"

    def collect_logs(self, destination: Path) -> None:
        """Serial log, ``xl dmesg``, dom0 dmesg and /var/log/xen (guest consoles) into destination."""
        destination.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            shutil.copy(self.serial_log, destination / "serial.log")
        if self._agent is None:
            return
        commands = {
            "xl-dmesg.txt": "xl dmesg",
            "xl-list.txt": "xl list -v",
            "dom0-dmesg.txt": "dmesg",
            "payload-info.txt": "cat /opt/softpage/PAYLOAD-INFO",
        }
        for filename, command in commands.items():
            with contextlib.suppress(TestbedError):
                result = self.run(command, timeout_s=60)
                (destination / filename).write_text(result.stdout + result.stderr)
        with contextlib.suppress(TestbedError, ValueError):
            result = self.run("tar -C /var/log -czf - xen | base64 -w0", timeout_s=120)
            (destination / "var-log-xen.tar.gz").write_bytes(base64.b64decode(result.stdout))

    # -- guests -----------------------------------------------------------------------------

    def create_guest(self, spec: GuestSpec, timeout_s: float | None = None, toolstack: str = "xl") -> Guest:
        """``xl create`` the guest (console logs of an older guest of that name are removed first)
        and wait for its first heartbeat (``spec.boot_timeout_s`` unless given). With
        ``toolstack="virsh"`` libvirt's libxl driver creates it instead, from the same
        configuration (``virsh domxml-from-native xen-xl``)."""
        if timeout_s is None:
            timeout_s = spec.boot_timeout_s
        return self._create(Guest(self, spec), spec.xl_config(self.data_disk_device), timeout_s, toolstack)

    def create_distro_guest(self, spec: DistroGuestSpec, timeout_s: float = 600) -> DistroGuest:
        """``xl create`` a distro guest on dom0's guest bridge and wait until its boot is over."""
        if not self.run(f"test -b /dev/disk/by-id/virtio-{distro_disk_serial(spec.release)}").ok:
            raise TestbedError(f"this boot has no {spec.release} distro guest disk: is the cache's "
                               f"distro-{spec.release}.img built (make testbed) and in the payload?")
        ensure_guest_bridge(self)
        root, app_data = (self.run(f"readlink -f /dev/disk/by-id/virtio-{serial}", check=True).stdout.strip()
                          for serial in (distro_disk_serial(spec.release), APP_DATA_DISK_SERIAL))
        return self._create(DistroGuest(self, spec), spec.xl_config(root, app_data), timeout_s)

    def data_file_sizes(self) -> dict[str, int]:
        """The data disk's files (``data-000``, ...) and their sizes in bytes, as the cache built them."""
        lines = (self.config.cache_dir / DATA_MANIFEST).read_text().splitlines()
        return {name: int(size) for name, size, _hash in (line.split() for line in lines if line.strip())}

    def app_checksums(self) -> str:
        """SHA256SUMS of the distro guests' application files, as the cache built them."""
        return (self.config.cache_dir / APP_DATA_CHECKSUMS).read_text()

    def _create(self, guest: G, config: str, timeout_s: float, toolstack: str = "xl") -> G:
        """``xl create`` a guest (or ``virsh create`` it) and wait until it is up, booting it again
        when it dies first."""
        name = guest.name
        config_path = f"/root/guests/{name}.cfg"
        self.write_file(config_path, config)
        self.run(f"rm -f {CONSOLE_LOG_DIR}/guest-{name}*.log", check=True)
        if toolstack == "xl":
            create = ["xl", "create", config_path]
        elif toolstack == "virsh":
            xml_path = f"/root/guests/{name}.xml"
            self.run(f"{VIRSH} domxml-from-native xen-xl {config_path} > {xml_path}", check=True)
            create = [*VIRSH.split(), "create", xml_path]
        else:
            raise TestbedError(f"no toolstack {toolstack!r}: xl or virsh")
        for attempt in range(1, BOOT_ATTEMPTS + 1):
            result = self.run(create, timeout_s=timeout_s)
            if not result.ok and HOTPLUG_TIMEOUT_MESSAGE in result.stderr:
                # libxl gives the disk hotplug script a fixed 40 s; a dom0 starved of CPU under TCG
                # (first disk after boot, busy host) can miss it. That is the testbed, not the guest:
                # one more try, and the harness says so on stderr.
                print(f"softpage_testbed: xl create {name}: hotplug timeout, retrying once",
                      file=sys.stderr)
                self.run(["xl", "destroy", name], timeout_s=120)
                result = self.run(create, timeout_s=timeout_s)
            if not result.ok:
                raise CommandFailed(" ".join(create), result)
            if guest.wait_until_up(timeout_s):
                return guest
            # Only a guest that died before its first heartbeat is booted again: from then on a
            # dead guest fails the test. The console log of the dead boot is kept beside.
            print(f"softpage_testbed: guest {name} shut down during boot (attempt {attempt} of "
                  f"{BOOT_ATTEMPTS}); console tail:\n{guest.console_log()[-1500:]}", file=sys.stderr)
            self.run(["xl", "destroy", name], timeout_s=120)
            self.run(f"cd {CONSOLE_LOG_DIR} && for f in guest-{name}*.log; do "
                     f"mv \"$f\" \"dead-boot-{attempt}-$f\"; done")
        raise TestbedError(f"guest {name} shut down during boot {BOOT_ATTEMPTS} times")



def distro_disk_serial(release: str) -> str:
    return f"sp-distro-{release}"


def again_after_triple_faults(
    testbed: Testbed, action: Callable[[], T], errors: tuple[type[Exception], ...] = (TestbedError,),
    retries: int = 1,
) -> T:
    """``action()``; each time it fails with one of ``errors`` while Xen logged a new guest
    triple fault (nested SVM under TCG, not softpage: testbed/README.md), destroy every guest and
    run it again, at most ``retries`` times. For an action that starts its own guest; for scripts
    (demo, bench): the e2e suite reruns such a test instead."""
    for attempt in range(retries + 1):
        faults = testbed.triple_faults()
        try:
            return action()
        except errors as failure:
            if testbed.triple_faults() == faults or attempt == retries:
                raise
            print(f"softpage_testbed: a guest triple-faulted ({str(failure)[:200]}); again on a fresh guest "
                  f"({attempt + 1} of {retries})", file=sys.stderr, flush=True)
        testbed.destroy_all_guests()
    raise AssertionError("unreachable: the last attempt returns or raises")


def retry_after_triple_faults(
    testbed: Testbed, guest: Guest, action: Callable[[Guest], T], start_guest: Callable[[], Guest],
    errors: tuple[type[Exception], ...] = (TestbedError,), retries: int = 1,
) -> tuple[Guest, T]:
    """``action(guest)``, then ``action`` on a guest from ``start_guest`` after each triple fault
    (``again_after_triple_faults``). Returns the guest in use afterwards and the action's result."""
    guests = itertools.chain([guest], iter(start_guest, None))

    def on_next_guest() -> tuple[Guest, T]:
        current = next(guests)
        return current, action(current)

    return again_after_triple_faults(testbed, on_next_guest, errors, retries)


def remove_disk_images(work_dir: Path) -> None:
    """The disk images a script's boot made under ``work_dir`` (the payload, copies of the distro
    images, scratch disks: gigabytes), once its hosts are shut down; the logs stay."""
    for image in work_dir.rglob("*.img"):
        image.unlink(missing_ok=True)


@contextlib.contextmanager
def booted_testbed(config: TestbedConfig, work_dir: Path) -> Iterator[Testbed]:
    """Build (cached) + payload + boot, for scripts: ``with booted_testbed(cfg, dir) as tb:``.
    Its disk images under ``work_dir`` are removed afterwards, its logs kept."""
    build_testbed()
    payload = work_dir / "payload.img"
    work_dir.mkdir(parents=True, exist_ok=True)
    build_payload(payload)
    testbed = Testbed(config, payload, work_dir / f"xen-{config.xen_version}")
    try:
        testbed.boot()
        yield testbed
    finally:
        testbed.shutdown()
        remove_disk_images(work_dir)
