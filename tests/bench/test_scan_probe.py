"""The tap's PFN list and scan_probe's classes of the final round's pages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.bench.scan_probe import kind_of
from tests.unit.stream_builders import NOTAB, XALLOC, build_stream, page_of

TAP = Path(__file__).parent / "dom0" / "tap.py"


def test_tap_lists_the_pfns_each_record_carried_data_for(tmp_path: Path) -> None:
    stream = build_stream([[(1, NOTAB, page_of(1)), (2, XALLOC, None), (3, NOTAB, page_of(3))],
                           [(4, XALLOC, None)], [(5, NOTAB, page_of(5))]])
    summary, pfns = tmp_path / "tap.json", tmp_path / "pfns.txt"
    copied = subprocess.run([sys.executable, str(TAP), str(summary), str(pfns)], input=stream,
                            capture_output=True, check=True)
    assert copied.stdout == stream
    lines = [line.split() for line in pfns.read_text().splitlines()]
    assert [line[1:] for line in lines] == [["1", "3"], ["5"]]
    end_at = json.loads(summary.read_text())["end_at"]
    assert all(float(line[0]) <= end_at for line in lines)
    # without a second argument, no list
    subprocess.run([sys.executable, str(TAP), str(summary)], input=stream, capture_output=True, check=True)
    assert json.loads(summary.read_text())["pages_data"] == 3


def test_kind_of_takes_the_first_class_a_page_has() -> None:
    kernel_data = [(100, 199)]
    assert kind_of(1 << 7 | 1 << 5, kernel_data, 5) == "slab"
    assert kind_of(1 << 12 | 1 << 5, kernel_data, 5) == "anon"
    assert kind_of(1 << 26, kernel_data, 5) == "pgtable"
    assert kind_of(1 << 32, kernel_data, 150) == "reserved-kernel-data"
    assert kind_of(1 << 32, kernel_data, 250) == "reserved"
    assert kind_of(1 << 5, kernel_data, 5) == "lru"
    assert kind_of(0, kernel_data, 5) == "other"
