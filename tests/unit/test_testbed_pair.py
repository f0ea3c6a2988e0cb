"""The two-host testbed's plan, without booting anything: link-hosts is read as dom0 reads it,
each host's QEMU gets its own end of one loopback link, a single host gets no NIC at all, and
the link's shape comes from the documented variables."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from softpage_testbed import (
    LINK_LOOPBACK,
    LinkShape,
    Testbed,
    TestbedConfig,
    TestbedError,
    TestbedPair,
    read_link_hosts,
)
from softpage_testbed.host import remove_disk_images


def fake_cache(tmp_path: Path) -> Path:
    boot = tmp_path / "rootfs" / "boot"
    boot.mkdir(parents=True)
    (boot / "initrd.img-6.1.0-57-amd64").write_bytes(b"")
    return tmp_path


def argument_after(command: list[str], flag: str) -> list[str]:
    return [command[index + 1] for index, word in enumerate(command) if word == flag]


def test_link_hosts_names_two_hosts_on_one_subnet() -> None:
    plan = read_link_hosts()
    assert plan.device
    names = [host.name for host in plan.hosts]
    assert names == ["host-a", "host-b"]
    assert len({host.mac for host in plan.hosts}) == 2
    assert plan.hosts[0].address.split("/")[1] == plan.hosts[1].address.split("/")[1]
    assert plan.hosts[0].ip != plan.hosts[1].ip


def test_link_hosts_rejects_a_malformed_line(tmp_path: Path) -> None:
    path = tmp_path / "link-hosts"
    path.write_text("device splink\nhost-a 10.99.0.1/24\n")
    with pytest.raises(TestbedError, match="expected"):
        read_link_hosts(path)


def test_each_host_gets_its_end_of_one_loopback_link(tmp_path: Path) -> None:
    config = TestbedConfig(cache_dir=fake_cache(tmp_path))
    pair = TestbedPair(config, config, tmp_path / "payload.img", tmp_path / "pair")
    ends = [testbed.config.link for testbed in pair.testbeds]
    assert ends[0] is not None and ends[1] is not None
    assert (ends[0].port, ends[0].peer_port) == (ends[1].peer_port, ends[1].port)
    for testbed, host in zip(pair.testbeds, pair.plan.hosts, strict=True):
        command = testbed.qemu_command()
        (netdev,) = argument_after(command, "-netdev")
        assert netdev.startswith("dgram,") and "unix" not in netdev
        assert netdev.count(f"host={LINK_LOOPBACK}") == 2
        assert f"mac={host.mac}" in argument_after(command, "-device")[-1]
        assert f"softpage.host={host.name}" in argument_after(command, "-initrd")[0]
        assert pair.name(testbed) == host.name
    assert pair.peer(pair.a) is pair.b and pair.peer(pair.b) is pair.a


def test_a_single_host_has_no_nic(tmp_path: Path) -> None:
    config = TestbedConfig(cache_dir=fake_cache(tmp_path))
    command = Testbed(config, tmp_path / "payload.img", tmp_path).qemu_command()
    assert "-netdev" not in command
    assert argument_after(command, "-net") == ["none"]
    assert "softpage.host=" not in " ".join(command)


def test_the_ports_are_free_now() -> None:
    from softpage_testbed.pair import free_udp_ports

    for port in free_udp_ports(2):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((LINK_LOOPBACK, port))


def test_link_shape_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOFTPAGE_LINK_RATE", raising=False)
    assert LinkShape.from_env() is None
    monkeypatch.setenv("SOFTPAGE_LINK_RATE", "100mbit")
    monkeypatch.setenv("SOFTPAGE_LINK_DELAY", "2.5")
    shape = LinkShape.from_env()
    assert shape == LinkShape("100mbit", 2.5)
    assert shape is not None and shape.tc_arguments().startswith("netem rate 100mbit delay 2.5ms")


@pytest.mark.parametrize(("rate", "delay_ms", "packets"), [
    ("8mbit", 5, 70),         # 1 MB/s x 0.105 s = 105,000 bytes: 70 frames
    ("1gbit", 50, 12_385),    # 125 MB/s x 0.15 s: the delay line and 0.1 s of backlog
    ("100kbit", 0, 64),       # never fewer than MIN_QUEUE_PACKETS
])
def test_link_queue_is_sized_in_time(rate: str, delay_ms: float, packets: int) -> None:
    shape = LinkShape(rate, delay_ms)
    assert shape.queue_packets() == packets
    assert shape.tc_arguments().endswith(f" limit {packets}")


def test_link_rate_outside_tcs_bit_notation_is_refused() -> None:
    with pytest.raises(TestbedError, match="expected a number and bit"):
        LinkShape("8MB", 5).queue_packets()


def test_a_scripts_disk_images_go_and_its_logs_stay(tmp_path: Path) -> None:
    """booted_testbed / booted_pair leave their logs behind, not gigabytes of images."""
    for name in ("payload.img", "distro-bookworm.img", "host-a/scratch.img", "host-a/serial.log",
                 "host-b/qemu.out"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    remove_disk_images(tmp_path)
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*") if path.is_file()) == [
        "host-a/serial.log", "host-b/qemu.out"]
