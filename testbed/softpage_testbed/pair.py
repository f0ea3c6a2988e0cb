"""Two testbed hosts joined by a link, as live migration between two machines needs them.

Each host is a ``Testbed`` (its own QEMU, Xen and dom0) with one more NIC: a virtio-net device
on a QEMU ``-netdev dgram`` UDP socket on 127.0.0.1 whose peer is the other QEMU's port. Frames
go from one QEMU process to the other over loopback and nowhere else: no tap, no bridge, no
route off this machine. testbed/dom0/link-hosts names the two dom0s (``host-a``,
``host-b``), their addresses on the link and their NICs' MACs; dom0's ``softpage-link`` unit
brings the link up when the kernel command line names the host. sshd runs in both dom0s with the
same host key and root key (made once per cache, testbed/build.sh), so ``ssh host-b`` works from
host-a and back without a prompt, and ``xl migrate guest host-b`` / ``softpage migrate guest
host-b`` run as users run them.

The data disk: both hosts attach the same cached ``data.img`` read-only; guests name it by its
serial (``/dev/disk/by-id/virtio-sp-data``), which resolves on both, whatever device name each
dom0 gave it.

The link can be shaped (``LinkShape``: a rate and a one-way delay, by ``tc ... netem`` on both
ends' egress), so that the wire and not TCG limits a migration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from softpage_testbed.errors import TestbedError
from softpage_testbed.host import (
    DATA_DISK_SERIAL,
    LINK_LOOPBACK,
    REPO_DIR,
    LinkEnd,
    Testbed,
    TestbedConfig,
    build_payload,
    build_testbed,
    remove_disk_images,
)

LINK_HOSTS_FILE = REPO_DIR / "testbed" / "dom0" / "link-hosts"
SHARED_DATA_DISK = f"/dev/disk/by-id/virtio-{DATA_DISK_SERIAL}"
"""The data disk as a guest's xl config names it on a pair: the same path on both hosts."""
LINK_UP_TIMEOUT_S = 180.0
QUEUE_S = 0.1
"""The link's queue beyond its delay line, in seconds of the shaped rate (``LinkShape``)."""
MIN_QUEUE_PACKETS = 64
FRAME_BYTES = 1514
_RATE_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


@dataclasses.dataclass(frozen=True)
class LinkHost:
    """One line of testbed/dom0/link-hosts."""

    name: str
    address: str
    """With its prefix length, e.g. ``10.99.0.1/24``."""
    mac: str

    @property
    def ip(self) -> str:
        return self.address.split("/", 1)[0]


@dataclasses.dataclass(frozen=True)
class LinkPlan:
    device: str
    """The link NIC's name in dom0."""
    hosts: tuple[LinkHost, LinkHost]


def read_link_hosts(path: Path = LINK_HOSTS_FILE) -> LinkPlan:
    device = ""
    hosts: list[LinkHost] = []
    for line in path.read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "device" and len(words) == 2:
            device = words[1]
        elif len(words) == 3:
            hosts.append(LinkHost(*words))
        else:
            raise TestbedError(f"{path}: expected 'device NAME' or 'NAME ADDRESS/PREFIX MAC', got {line!r}")
    if not device or len(hosts) != 2:
        raise TestbedError(f"{path}: expected a device line and two hosts, got {device!r}, {hosts}")
    return LinkPlan(device, (hosts[0], hosts[1]))


def free_udp_ports(count: int) -> tuple[int, ...]:
    """Ports on 127.0.0.1 that nothing uses now, for QEMU to bind (a port taken meanwhile makes
    QEMU fail at start, loudly)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                   for _ in range(count)]
        for udp in sockets:
            udp.bind((LINK_LOOPBACK, 0))
        return tuple(int(udp.getsockname()[1]) for udp in sockets)


@dataclasses.dataclass(frozen=True)
class LinkShape:
    """What ``tc ... netem`` makes of the link on each host's egress: every packet waits
    ``delay_ms`` (one way: the round trip is twice that) and leaves at most at ``rate``."""

    rate: str
    """tc's notation: ``100mbit``, ``20mbit``."""
    delay_ms: float = 0.0

    @classmethod
    def from_env(cls) -> LinkShape | None:
        """SOFTPAGE_LINK_RATE (e.g. ``100mbit``; unset or empty: unshaped) and
        SOFTPAGE_LINK_DELAY (milliseconds, default 0)."""
        rate = os.environ.get("SOFTPAGE_LINK_RATE", "")
        if not rate:
            return None
        return cls(rate, float(os.environ.get("SOFTPAGE_LINK_DELAY", "0") or 0))

    def bits_per_s(self) -> float:
        """The rate in bits per second, from tc's bit notation (``bit``, ``kbit``, ``mbit``,
        ``gbit``; SI prefixes, as tc reads them)."""
        match = re.fullmatch(r"([0-9.]+)(bit|kbit|mbit|gbit)", self.rate.strip().lower())
        if not match:
            raise TestbedError(f"link rate {self.rate!r}: expected a number and bit, kbit, mbit "
                               "or gbit (tc's notation), e.g. 100mbit")
        return float(match.group(1)) * _RATE_UNITS[match.group(2)]

    def queue_packets(self) -> int:
        """netem's queue (``limit``, in packets): what the delay line holds at the full rate
        plus QUEUE_S of backlog, as a router's buffer is sized in time. A fixed packet count
        would scale wrong: 10,000 frames are 0.12 s at 1 Gbit/s but 15 s at 8 Mbit/s, and TCP
        fills whatever queue there is, so a migration's last data would wait in it during the
        downtime."""
        bytes_per_s = self.bits_per_s() / 8
        held_s = self.delay_ms / 1000 + QUEUE_S
        return max(MIN_QUEUE_PACKETS, math.ceil(bytes_per_s * held_s / FRAME_BYTES))

    def tc_arguments(self) -> str:
        return f"netem rate {self.rate} delay {self.delay_ms:g}ms limit {self.queue_packets()}"


class TestbedPair:
    """host-a and host-b: two booted testbeds and the link between them. ``boot()`` /
    ``shutdown()`` or the context manager; ``a`` and ``b`` are the two ``Testbed``s."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, config_a: TestbedConfig, config_b: TestbedConfig, payload: Path,
                 work_dir: Path, shape: LinkShape | None = None) -> None:
        self.plan = read_link_hosts()
        self.work_dir = work_dir
        self.shape = shape
        host_a, host_b = self.plan.hosts
        ports = free_udp_ports(2)
        self.a = Testbed(dataclasses.replace(config_a, link=LinkEnd(host_a.name, host_a.mac, *ports)),
                         payload, work_dir / host_a.name)
        self.b = Testbed(dataclasses.replace(config_b, link=LinkEnd(host_b.name, host_b.mac, *ports[::-1])),
                         payload, work_dir / host_b.name)

    @property
    def testbeds(self) -> tuple[Testbed, Testbed]:
        return (self.a, self.b)

    def name(self, testbed: Testbed) -> str:
        """The dom0's name on the link: what ``xl migrate`` and ``softpage migrate`` take as HOST."""
        assert testbed.config.link is not None
        return testbed.config.link.host

    def peer(self, testbed: Testbed) -> Testbed:
        return self.b if testbed is self.a else self.a

    # -- lifecycle --------------------------------------------------------------------------

    def boot(self) -> None:
        """Boot host-a, then host-b, then wait until each reaches the other over ssh; apply
        ``shape`` when given. One after the other, from the calling thread: QEMU dies with the
        thread that started it (PR_SET_PDEATHSIG, host.py), and two boots at once on 2 cores of
        TCG take as long as two in a row."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        try:
            for testbed in self.testbeds:
                testbed.boot()
                # the guest's xl config carries this path to the other host in the migration
                testbed.data_disk_device = SHARED_DATA_DISK
            for testbed in self.testbeds:
                self._wait_for_ssh(testbed, self.name(self.peer(testbed)))
            if self.shape is not None:
                self.apply_shape(self.shape)
        except BaseException:
            self.shutdown()
            raise

    def _wait_for_ssh(self, testbed: Testbed, peer: str) -> None:
        started = time.monotonic()
        while True:
            result = testbed.run(["ssh", "-o", "ConnectTimeout=10", peer, "hostname"], timeout_s=120)
            if result.ok and result.stdout.strip() == peer:
                print(f"softpage_testbed: {self.name(testbed)} reaches {peer} over ssh after "
                      f"{time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
                return
            if time.monotonic() - started > LINK_UP_TIMEOUT_S:
                link = testbed.run(f"ip -s link show {self.plan.device}; ip addr; "
                                   "journalctl -b -u softpage-link -u ssh --no-pager | tail -30")
                raise TestbedError(f"{self.name(testbed)} cannot reach {peer} over ssh after "
                                   f"{LINK_UP_TIMEOUT_S:.0f} s: {result.stderr.strip()}\n{link.stdout}")
            time.sleep(3)

    def shutdown(self) -> None:
        for testbed in self.testbeds:
            testbed.shutdown()

    def __enter__(self) -> TestbedPair:
        self.boot()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    # -- the link ---------------------------------------------------------------------------

    def apply_shape(self, shape: LinkShape | None) -> None:
        """Shape both ends' egress (None: unshaped again)."""
        for testbed in self.testbeds:
            if shape is None:
                testbed.run(f"tc qdisc del dev {self.plan.device} root 2>/dev/null || true", check=True)
            else:
                testbed.run(f"tc qdisc replace dev {self.plan.device} root {shape.tc_arguments()}",
                            check=True)
        self.shape = shape

    def set_link(self, testbed: Testbed, up: bool) -> None:
        """``ip link set`` the link NIC of one host down (a cut cable, as its peer sees it) or up."""
        testbed.run(["ip", "link", "set", "dev", self.plan.device, "up" if up else "down"], check=True)

    def received_bytes(self, testbed: Testbed) -> int:
        """What the host's link NIC has received since boot."""
        path = f"/sys/class/net/{self.plan.device}/statistics/rx_bytes"
        return int(testbed.run(["cat", path], check=True).stdout)

    def measure_ssh(self, source: Testbed, mib: int, ssh_options: str = "") -> float:
        """MiB/s of ``dd | ssh [SSH_OPTIONS] PEER 'cat > /dev/null'``: what ssh, as migration uses
        it, carries (``ssh_options``, e.g. ``-c aes128-ctr``: another cipher than ssh's choice)."""
        peer = self.name(self.peer(source))
        result = source.run(f"dd if=/dev/zero bs=1M count={mib} status=none | ssh {ssh_options} {peer} "
                            "'cat > /dev/null'", timeout_s=1200, check=True)
        return mib / result.wall_s

    def measure_tcp(self, source: Testbed, mib: int, port: int = 5201) -> float:
        """MiB/s of a plain TCP stream of ``mib`` MiB from source to its peer (no ssh): what the
        link itself carries. The receiver counts the bytes; a short count fails."""
        destination = self.peer(source)
        received = f"/tmp/link-received-{port}"
        receiver = ("import socket, sys\n"
                    "server = socket.create_server(('', int(sys.argv[1])))\n"
                    "connection, _ = server.accept()\n"
                    "total = 0\n"
                    "while chunk := connection.recv(1 << 20):\n"
                    "    total += len(chunk)\n"
                    "open(sys.argv[2], 'w').write(str(total))\n")
        sender = ("import socket, sys, time\n"
                  "for _ in range(100):\n"
                  "    try:\n"
                  "        connection = socket.create_connection((sys.argv[1], int(sys.argv[2])))\n"
                  "        break\n"
                  "    except ConnectionRefusedError:\n"
                  "        time.sleep(0.2)\n"
                  "block = bytes(1 << 20)\n"
                  "started = time.monotonic()\n"
                  "for _ in range(int(sys.argv[3])):\n"
                  "    connection.sendall(block)\n"
                  "connection.shutdown(socket.SHUT_WR)\n"
                  "connection.recv(1)\n"
                  "print(time.monotonic() - started)\n")
        destination.run(f"rm -f {received}; nohup python3 -c {shlex.quote(receiver)} {port} {received} "
                        "> /dev/null 2>&1 &", check=True)
        result = source.run(["python3", "-c", sender, self.name(destination), str(port), str(mib)],
                            timeout_s=1200, check=True)
        for _ in range(60):
            count = destination.run(f"cat {received} 2>/dev/null").stdout.strip()
            if count:
                break
            time.sleep(1)
        if count != str(mib << 20):
            raise TestbedError(f"the link lost data: {mib << 20} bytes sent, {count or 'nothing'} received")
        seconds = float(result.stdout.strip())
        return mib / seconds


@contextlib.contextmanager
def booted_pair(config_a: TestbedConfig, config_b: TestbedConfig, work_dir: Path,
                shape: LinkShape | None = None) -> Iterator[TestbedPair]:
    """Build (cached) + payload + boot both hosts, for scripts:
    ``with booted_pair(cfg_a, cfg_b, dir) as pair: pair.a.run(...)``. Their disk images under
    ``work_dir`` are removed afterwards, their logs kept."""
    build_testbed()
    work_dir.mkdir(parents=True, exist_ok=True)
    payload = work_dir / "payload.img"
    build_payload(payload)
    pair = TestbedPair(config_a, config_b, payload, work_dir, shape)
    try:
        pair.boot()
        yield pair
    finally:
        pair.shutdown()
        remove_disk_images(work_dir)
