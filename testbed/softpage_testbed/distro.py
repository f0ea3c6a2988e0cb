"""A distro guest: a Debian release as a user runs it in a Xen guest (systemd, its own kernel,
softpage-dkms, nginx), booted PVH from its own kernel and initramfs with a root disk and the
application's files as disks, on dom0's guest bridge (testbed/build.sh stages distro_RELEASE and
app_data, testbed/payload.sh, testbed/distro/). Commands reach it through a root shell on its
console; nginx serves the application's files over the bridge, and ``run_wrk`` loads it from dom0.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import time
from typing import TYPE_CHECKING

from softpage_testbed.errors import TestbedError
from softpage_testbed.guest import ConsoleGuest, xl_config_text

if TYPE_CHECKING:
    from softpage_testbed.host import Testbed

DISTRO_RELEASES = ("bookworm", "trixie")
"""Debian releases with a distro guest (testbed/build.sh distro_guest_packages): 12 with Linux 6.1,
13 with Linux 6.12."""
DISTRO_PAYLOAD_DIR = "/opt/softpage/distro"
"""In dom0: RELEASE/vmlinuz and RELEASE/initrd.img of each distro guest, and hot-set.lua."""
GUEST_BRIDGE = "xenbr0"
BRIDGE_ADDRESS = "10.98.0.1"
GUEST_ADDRESS = "10.98.0.2"
GUEST_PREFIX_LEN = 24
"""dom0's guest bridge: no NIC on it, only the addresses the testbed gives (dom0 and a guest)."""
GUEST_MAC = "00:16:3e:62:00:02"
HTTP_PORT = 80
"""nginx's port in the guest; named, since dom0 has no /etc/services for wrk to resolve "http"."""
UP_RE = re.compile(r"SOFTPAGE-GUEST-UP (.*)")
"""The console line testbed/distro/configure.sh's softpage-guest-up.service prints once the boot
is over: ``system=`` systemctl is-system-running's verdict, ``softpage=`` the loaded module's
version, ``nginx=`` systemctl is-active nginx."""
APP_FILE_PREFIX = "f"
"""The application's files are f00000, f00001, ... (testbed/build.sh stage_app_data)."""
HOT_FRACTION = 0.25
HOT_SKEW = 2.0
WRK_SEED = 21
"""wrk's requests: the first quarter of the files, the lower-numbered ones more often, the same
sequence in every run (testbed/distro/hot-set.lua)."""
SHELL_PROBE_S = 30.0
"""How long ``wait_until_up`` waits for one answer of the console shell before typing again."""
_SHELL_RESULT = "SPD-{token} rc=(\\d+) out=([A-Za-z0-9+/=]*)"


DISTRO_GUEST_TYPES = ("pvh", "pv")
"""How a distro guest can boot (xl.cfg ``type``): Debian's kernels have both entry points."""


@dataclasses.dataclass(frozen=True)
class DistroGuestSpec:
    """A distro guest: its release (kernel, initramfs and root disk from the payload), memory,
    vCPUs and its vif on dom0's bridge."""

    name: str = "distro"
    release: str = "bookworm"
    guest_type: str = "pvh"
    """"pvh", or "pv": Debian's kernels boot as either. A PV guest runs without SVM, so TCG's
    nested-SVM triple faults (testbed/README.md) never hit it; it live-migrates only on a host
    with ``HostPlatform.pv_live_migration``."""
    memory_mb: int = 512
    vcpus: int = 1
    address: str = GUEST_ADDRESS
    mac: str = GUEST_MAC
    tsc_mode: str = "native"
    """As ``GuestSpec.tsc_mode``: no RDTSC exits, whose nested-SVM handling triple-faults guests."""
    kernel_args: tuple[str, ...] = ()
    extra_config: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.guest_type not in DISTRO_GUEST_TYPES:
            raise ValueError(f"a distro guest boots as one of {', '.join(DISTRO_GUEST_TYPES)}, "
                             f"not {self.guest_type!r}")

    def kernel_command_line(self) -> str:
        # sp_addr: softpage-guest-net.service reads it; net.ifnames=0 keeps netfront's eth0
        return " ".join(["root=/dev/xvda", "rw", "console=hvc0", "loglevel=4", "net.ifnames=0",
                         f"sp_addr={self.address}/{GUEST_PREFIX_LEN}", *self.kernel_args])

    def xl_config(self, root_device: str, app_data_device: str) -> str:
        boot = f"{DISTRO_PAYLOAD_DIR}/{self.release}"
        return xl_config_text(
            self.name, self.guest_type, f"{boot}/vmlinuz", f"{boot}/initrd.img", self.kernel_command_line(),
            self.memory_mb, self.vcpus, self.tsc_mode, f"['bridge={GUEST_BRIDGE},mac={self.mac}']",
            f"['phy:{root_device},xvda,w', 'phy:{app_data_device},xvdb,r']", self.extra_config)


@dataclasses.dataclass(frozen=True)
class ShellResult:
    rc: int
    output: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


class DistroGuest(ConsoleGuest):
    """A running distro guest. It is up when its console says the boot is over
    (``SOFTPAGE-GUEST-UP``); ``shell`` runs commands in the root shell on its console."""

    def __init__(self, testbed: Testbed, spec: DistroGuestSpec) -> None:
        super().__init__(testbed, spec.name)
        self.spec = spec
        self._commands = 0

    def wait_until_up(self, timeout_s: float) -> bool:
        """Up: the boot is over (``UP_RE``) and the console shell answers. The getty may start
        after the boot's last job, and what is typed before it opens the console is lost: the
        shell is asked again until it answers."""
        deadline = time.monotonic() + timeout_s
        if not self._wait_booted(lambda: UP_RE.search(self.console_log()) is not None, timeout_s, "not up",
                                 poll_s=2):
            return False
        while True:
            try:
                self.shell("true", timeout_s=SHELL_PROBE_S)
                return True
            except TestbedError:
                if self.stopped():
                    return False
                if time.monotonic() > deadline:
                    raise

    def up_line(self) -> dict[str, str]:
        """The last boot's verdict (``UP_RE``): ``system``, ``softpage``, ``nginx``."""
        matches = list(UP_RE.finditer(self.console_log()))
        if not matches:
            raise TestbedError(f"guest {self.name}: no SOFTPAGE-GUEST-UP line on its console")
        return dict(re.findall(r"(\w+)=(\S+)", matches[-1].group(1)))

    def shell(self, command: str, timeout_s: float = 120) -> ShellResult:
        """Run a command in the guest's root shell (typed into its console) and return its exit
        code and output (stdout and stderr, carried base64-encoded on one console line, so that
        kernel messages and the shell's echo cannot mix into it)."""
        self._commands += 1
        token = f"{self.name}-{int(time.time())}-{self._commands}"
        self.console_command(f"sp_out=$( ( {command} ) 2>&1 ); "
                             f"echo \"SPD-{token} rc=$? out=$(printf %s \"$sp_out\" | base64 -w0)\"")
        match = self.wait_for(_SHELL_RESULT.format(token=re.escape(token)), timeout_s)
        output = base64.b64decode(match.group(2)).decode("utf-8", "replace")
        return ShellResult(rc=int(match.group(1)), output=output)

    def check_shell(self, command: str, timeout_s: float = 120) -> str:
        result = self.shell(command, timeout_s)
        if not result.ok:
            raise TestbedError(f"guest {self.name}: {command!r} exited {result.rc}: {result.output[-2000:]}")
        return result.output


def ensure_guest_bridge(testbed: Testbed) -> None:
    """dom0's guest bridge (no NIC on it) and the backend the vifs need, once per boot."""
    testbed.run(
        f"modprobe xen-netback && {{ ip link show {GUEST_BRIDGE} >/dev/null 2>&1 || "
        f"{{ ip link add {GUEST_BRIDGE} type bridge && "
        f"ip address add {BRIDGE_ADDRESS}/{GUEST_PREFIX_LEN} dev {GUEST_BRIDGE}; }}; }} && "
        f"ip link set {GUEST_BRIDGE} up", check=True)


def fetch_checksums(testbed: Testbed, names: list[str], address: str = GUEST_ADDRESS,
                    timeout_s: float = 300) -> dict[str, str]:
    """sha256 of each named file as the guest's nginx serves it, fetched by dom0 over the bridge."""
    script = (
        "import hashlib, sys, urllib.request\n"
        "for name in sys.argv[2:]:\n"
        "    with urllib.request.urlopen(f'http://{sys.argv[1]}/{name}', timeout=60) as reply:\n"
        "        print(name, hashlib.sha256(reply.read()).hexdigest())\n"
    )
    result = testbed.run(["python3", "-c", script, address, *names], timeout_s=timeout_s, check=True)
    return dict(line.split() for line in result.stdout.splitlines())


@dataclasses.dataclass(frozen=True)
class WrkResult:
    """What wrk's run said (testbed/distro/hot-set.lua's JSON line)."""

    requests: int
    duration_s: float
    errors: int
    latency_p50_ms: float
    latency_p99_ms: float
    latency_max_ms: float = 0.0

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.duration_s

    @classmethod
    def from_output(cls, stdout: str) -> WrkResult:
        """The result in wrk's output: the last line that is hot-set.lua's JSON."""
        summary = json.loads(next(line for line in reversed(stdout.splitlines()) if line.startswith("{")))
        return cls.from_summary(summary)

    @classmethod
    def from_summary(cls, summary: dict[str, int]) -> WrkResult:
        errors = sum(int(summary[key]) for key in summary if key.startswith("errors_"))
        return cls(requests=int(summary["requests"]), duration_s=summary["duration_us"] / 1e6,
                   errors=errors, latency_p50_ms=summary["latency_p50_us"] / 1e3,
                   latency_p99_ms=summary["latency_p99_us"] / 1e3,
                   latency_max_ms=summary["latency_max_us"] / 1e3)


def wrk_command(nfiles: int, duration_s: int = 5, connections: int = 4, address: str = GUEST_ADDRESS,
                hot_fraction: float = HOT_FRACTION, skew: float = HOT_SKEW,
                seed: int = WRK_SEED) -> list[str]:
    """wrk in dom0 against the guest's nginx, one thread, for ``duration_s``: requests drawn from
    the hot fraction of the application's ``nfiles`` files (the guest's-view bench's load,
    tests/bench/dom0/app_load.py, draws them the same way)."""
    return ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--timeout", "10s",
            "-s", f"{DISTRO_PAYLOAD_DIR}/hot-set.lua", f"http://{address}:{HTTP_PORT}/", "--",
            str(nfiles), str(hot_fraction), str(skew), str(seed)]


def run_wrk(testbed: Testbed, nfiles: int, duration_s: int = 5, connections: int = 4,
            address: str = GUEST_ADDRESS, hot_fraction: float = HOT_FRACTION,
            skew: float = HOT_SKEW, seed: int = WRK_SEED) -> WrkResult:
    """One run of ``wrk_command`` in dom0."""
    command = wrk_command(nfiles, duration_s, connections, address, hot_fraction, skew, seed)
    result = testbed.run(command, timeout_s=duration_s + 120, check=True)
    return WrkResult.from_output(result.stdout)


def app_file_names(checksums: dict[str, str]) -> list[str]:
    """The application's files in order, from its SHA256SUMS (``read_app_checksums``)."""
    return sorted(name for name in checksums if name.startswith(APP_FILE_PREFIX))


def read_app_checksums(text: str) -> dict[str, str]:
    """SHA256SUMS (``sha256sum`` output) -> {file name: hex digest}."""
    return {name: digest for digest, name in (line.split() for line in text.splitlines() if line.strip())}


