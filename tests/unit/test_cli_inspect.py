"""``softpage inspect``, driven through the real entry point ``softpage.cli.main.main``."""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import pytest

from softpage import bitmap
from softpage.cli import inspect
from softpage.cli.main import main
from softpage.pfnset import PfnSet
from softpage.snapshot import SnapshotState, SoftSnapshot

NR_PFNS = 4000
P2M_SIZE = 4096


def make_snapshot(universe: int = NR_PFNS) -> SoftSnapshot:
    def members(pfns: range) -> PfnSet:
        return PfnSet.from_pfns(universe, pfns)

    return SoftSnapshot(
        state=SnapshotState.FINAL,
        generation=42,
        request_id=7,
        flags=0x5,
        guest_nr_pfns=NR_PFNS,
        scan_ns=2_500_000,
        free=members(range(0, 640)),  # cells 0-9 at 64 PFNs a cell
        cache=members(range(640, 1280)),  # cells 10-19
        slab=members(range(1280, 1312)),  # half of cell 20: a tie with in use, won by slab
        held=members(range(2048, 2560)),  # cells 32-39
    )


@pytest.fixture
def dump_path(tmp_path: Path) -> Path:
    path = tmp_path / "snapshot.dump"
    with path.open("wb") as dump_file:
        bitmap.dump(make_snapshot(), dump_file)
    return path


def test_info_shows_header_and_counts(dump_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "info", "--file", str(dump_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "magic        0x47505353 (SSPG)" in out
    assert "state        FINAL" in out
    assert "generation   42" in out
    assert "request_id   7" in out
    assert "flags        0x5 (init_on_free, hold_short)" in out
    assert "nr_pfns      4000 (15.6 MiB)" in out
    assert "p2m_size     4000" in out
    assert "scan_ns      2500000 (2.500 ms)" in out
    rows = {line.split()[0]: line.split()[1:] for line in out if line[:1].isalpha()}
    assert rows["free"] == ["640", "2.5", "16.0%"]
    assert rows["cache"] == ["640", "2.5", "16.0%"]
    assert rows["slab"] == ["32", "0.1", "0.8%"]
    assert rows["held"] == ["512", "2.0", "12.8%"]
    assert rows["soft"] == ["(free+cache+slab)", "1312", "5.1", "32.8%"]


def test_info_widens_to_a_given_p2m_size(dump_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "info", "--file", str(dump_path), "--p2m-size", str(P2M_SIZE)]) == 0
    assert f"p2m_size     {P2M_SIZE}" in capsys.readouterr().out.splitlines()


def test_file_dash_reads_standard_input(
    dump_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_stdin = io.TextIOWrapper(io.BytesIO(dump_path.read_bytes()))
    monkeypatch.setattr(sys, "stdin", fake_stdin)
    assert main(["inspect", "info", "--file", "-"]) == 0
    assert "state        FINAL" in capsys.readouterr().out.splitlines()


def test_show_draws_a_map_with_a_legend(dump_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = ["--file", str(dump_path), "--p2m-size", str(P2M_SIZE)]
    assert main(["inspect", "show", *source, "--width", "16", "--rows", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("1 character = 64 PFNs (256 KiB)")
    map_lines = [line for line in out if line[:3] in {"000", "400", "800", "c00"}]
    assert map_lines == [
        "000 ..........cccccc",
        "400 ccccs###########",
        "800 HHHHHHHH########",
        "c00 ###############~",  # cell 62 is half covered: a tie, won by in use
    ]
    assert "  H  held by the module (FINAL)   512 pages, 2.0 MiB" in out
    assert "  ~  beyond the guest's nr_pfns" in out


def test_show_writes_a_png(dump_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    picture = tmp_path / "map.png"
    assert main(["inspect", "show", "--file", str(dump_path), "--png", str(picture)]) == 0
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "1 character" in capsys.readouterr().out


def test_a_corrupt_dump_is_one_line_on_stderr_and_exit_1(
    dump_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = bytearray(dump_path.read_bytes())
    data[0] ^= 0xFF
    dump_path.write_bytes(bytes(data))
    assert main(["inspect", "info", "--file", str(dump_path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "softpage: error: magic: expected 0x47505353, got 0x475053ac\n"


def test_a_p2m_size_below_nr_pfns_is_rejected(dump_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "show", "--file", str(dump_path), "--p2m-size", "100"]) == 1
    assert "nr_pfns: expected at most 100" in capsys.readouterr().err


def test_a_missing_file_is_an_operational_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "info", "--file", str(tmp_path / "absent")]) == 1
    assert capsys.readouterr().err.startswith("softpage: error: [Errno 2]")


def test_an_oversized_input_is_refused_without_reading_it_all(
    dump_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bitmap, "MAX_SNAPSHOT_SIZE", 100)
    assert main(["inspect", "info", "--file", str(dump_path)]) == 1
    assert "snapshot length: expected at most 100 octets" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["inspect"],
        ["inspect", "info"],
        ["inspect", "show", "--file", "x", "--width", "0"],
        ["inspect", "info", "--file", "x", "--p2m-size", "lots"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_inspect_snapshot_is_the_seam_for_other_sources(capsys: pytest.CaptureFixture[str]) -> None:
    # What the live form does: raw octets from a channel, the domain's p2m size.
    raw = bitmap.encode(make_snapshot())
    args = argparse.Namespace(p2m_size=P2M_SIZE, render=inspect.render_info)
    assert inspect.inspect_snapshot(args, memoryview(raw)) == 0
    assert f"p2m_size     {P2M_SIZE}" in capsys.readouterr().out.splitlines()


@pytest.mark.parametrize(
    ("p2m_size", "width", "rows", "expected"),
    [(1, 64, 32, 1), (2048, 64, 32, 1), (2049, 64, 32, 2), (4096, 16, 4, 64), (4097, 16, 4, 128),
     (16 * 1024 * 1024, 64, 32, 8192)],
)
def test_cell_size_is_the_smallest_power_of_two_that_fits(
    p2m_size: int, width: int, rows: int, expected: int
) -> None:
    assert inspect.cell_size(p2m_size, width, rows) == expected


def test_held_wins_a_tie_with_in_use() -> None:
    universe = 128
    half_held = SoftSnapshot(
        SnapshotState.FINAL, 2, 1, 0, universe, 0,
        PfnSet.empty(universe), PfnSet.empty(universe), PfnSet.empty(universe),
        PfnSet.from_pfns(universe, range(32)),
    )
    assert inspect.classify_cells(half_held, 64).tolist() == [0, 4]


def test_decode_prints_json_with_pfn_ranges(dump_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "decode", "--file", str(dump_path), "--p2m-size", str(P2M_SIZE)]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document == {
        "state": "FINAL",
        "generation": 42,
        "request_id": 7,
        "flags": ["init_on_free", "hold_short"],
        "nr_pfns": NR_PFNS,
        "p2m_size": P2M_SIZE,
        "scan_ns": 2_500_000,
        "categories": {
            "free": {"count": 640, "ranges": [[0, 640]]},
            "cache": {"count": 640, "ranges": [[640, 1280]]},
            "slab": {"count": 32, "ranges": [[1280, 1312]]},
            "held": {"count": 512, "ranges": [[2048, 2560]]},
        },
    }


@pytest.mark.parametrize(
    ("pfns", "ranges"),
    [([], []), ([5], [[5, 6]]), ([0, 1, 2, 7, 9, 10, 99], [[0, 3], [7, 8], [9, 11], [99, 100]])],
)
def test_pfn_ranges(pfns: list[int], ranges: list[list[int]]) -> None:
    assert inspect.pfn_ranges(PfnSet.from_pfns(100, pfns)) == ranges
