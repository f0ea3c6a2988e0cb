"""The guests' disk rate, without booting anything: SOFTPAGE_DISK_RATE is read as documented, QEMU
throttles exactly the drives that serve guests' data, and every figure names the rate."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from softpage_testbed import (
    DISK_RATE_ENV,
    Testbed,
    TestbedConfig,
    TestbedError,
    describe_disk_rate,
    parse_disk_rate,
)
from tests.unit.test_testbed_pair import argument_after, fake_cache


@pytest.mark.parametrize(("text", "expected"), [
    ("", None), ("0", None), ("  ", None), ("20M", 20 << 20), ("20MiB/s", 20 << 20), ("512k", 512 << 10),
    ("1G", 1 << 30), ("3000000", 3_000_000),
])
def test_rates_parse_with_qemus_binary_suffixes(text: str, expected: int | None) -> None:
    assert parse_disk_rate(text) == expected


@pytest.mark.parametrize("text", ["fast", "20 MB per second", "-1M", "2.5M"])
def test_a_rate_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(TestbedError, match=DISK_RATE_ENV):
        parse_disk_rate(text)


def test_the_rate_is_named_in_the_units_a_reader_expects() -> None:
    assert describe_disk_rate(None) == "disk unthrottled"
    assert describe_disk_rate(20 << 20) == "disk 20 MiB/s"
    assert describe_disk_rate(2_000_000) == "disk 1.91 MiB/s"
    assert describe_disk_rate(512 << 10) == "disk 512 KiB/s"
    assert describe_disk_rate(100) == "disk 100 B/s"


def test_from_env_reads_the_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISK_RATE_ENV, "8M")
    assert TestbedConfig.from_env("4.17.7").disk_rate == 8 << 20
    monkeypatch.delenv(DISK_RATE_ENV)
    assert TestbedConfig.from_env("4.17.7").disk_rate is None


def drives(tmp_path: Path, rate: int | None) -> dict[str, str]:
    """QEMU's -drive options by drive id (dom0's root has none: ``root``), with a cache that has
    the application's disk and a payload beside a Debian 12 distro disk."""
    cache = fake_cache(tmp_path)
    (cache / "app-data.img").write_bytes(b"")
    (tmp_path / "distro-bookworm.img").write_bytes(b"")
    config = dataclasses.replace(TestbedConfig(cache_dir=cache), disk_rate=rate)
    command = Testbed(config, tmp_path / "payload.img", tmp_path).qemu_command()
    options = {}
    for drive in argument_after(command, "-drive"):
        fields = dict(field.split("=", 1) for field in drive.split(","))
        options[fields.get("id", "root")] = drive
    return options


def test_only_the_guests_disks_are_throttled(tmp_path: Path) -> None:
    options = drives(tmp_path, 20 << 20)
    assert sorted(options) == ["app-data", "data", "distro-bookworm", "payload", "root"]
    for drive in ("app-data", "data", "distro-bookworm"):
        assert options[drive].endswith(f",throttling.bps-total={20 << 20}"), options[drive]
    for drive in ("payload", "root"):
        assert "throttling" not in options[drive], options[drive]


def test_unthrottled_adds_nothing(tmp_path: Path) -> None:
    assert not any("throttling" in drive for drive in drives(tmp_path, None).values())
