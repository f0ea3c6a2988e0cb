"""``softpage simulate`` through the CLI entry point."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from softpage.cli.main import main

SMALL_GUEST = ["--memory-mib", "16", "--kernel-mib", "2", "--min-free-mib", "1"]


def test_table_reference_numbers_csv_and_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv_path, png_path = tmp_path / "sweep.csv", tmp_path / "sweep.png"
    outputs = ["--csv", str(csv_path), "--png", str(png_path)]
    status = main(["simulate", *SMALL_GUEST, "--steps", "0,6,12", *outputs])
    out = capsys.readouterr().out
    assert status == 0
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("User MB"))
    rows = [line for line in lines if line[:1].isdigit()]
    assert [row.split()[0] for row in rows] == ["0", "6", "12"]
    # xl-style: every row as wide as the header, numbers right-aligned under it.
    assert all(len(row) == len(header) for row in rows)
    assert "68.3% shorter migration, 83.9% fewer pages" in out
    assert "simulated, 0 MB user allocation:" in out

    with csv_path.open() as file:
        records = list(csv.DictReader(file))
    assert [(record["user_alloc_mib"], record["mode"]) for record in records] == [
        (step, mode) for step in ("0", "6", "12") for mode in ("precopy", "pruned")
    ]
    by_mode = {(record["user_alloc_mib"], record["mode"]): record for record in records}
    # Pruning sends fewer pages with data, and the saving shrinks as user memory grows.
    savings = [
        int(by_mode[(step, "precopy")]["pages_data"]) - int(by_mode[(step, "pruned")]["pages_data"])
        for step in ("0", "6", "12")
    ]
    assert savings[0] > savings[1] > savings[2] > 0
    assert int(by_mode[("0", "precopy")]["pages_xalloc"]) == 0
    assert float(by_mode[("0", "pruned")]["migration_s"]) < float(by_mode[("0", "precopy")]["migration_s"])
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_slower_link_means_longer_migrations(tmp_path: Path) -> None:
    times = []
    for bandwidth in ("1000", "100"):
        csv_path = tmp_path / f"{bandwidth}.csv"
        assert main(["simulate", *SMALL_GUEST, "--steps", "0", "--bandwidth-mbit", bandwidth,
                     "--csv", str(csv_path)]) == 0
        with csv_path.open() as file:
            times.append(float(next(csv.DictReader(file))["migration_s"]))
    assert times[1] > 3 * times[0]


def test_an_allocation_that_does_not_fit_is_an_operational_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", *SMALL_GUEST, "--steps", "100"]) == 1
    assert "softpage: error: user allocation: expected at most" in capsys.readouterr().err


@pytest.mark.parametrize("steps", ["", "a,b", "-5"])
def test_bad_steps_are_a_usage_error(steps: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--steps", steps])
    assert exit_info.value.code == 2
