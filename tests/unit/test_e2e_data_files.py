"""The data disk's file sizes come from the cache's manifest (testbed/build.sh stage data), which
the e2e tests count pages of: not from a copy of workload.c's file size."""

from __future__ import annotations

from pathlib import Path

import pytest

from softpage.abi import PAGE_SIZE
from softpage_testbed import Testbed, TestbedConfig
from tests.e2e.helpers import data_file_pages


def manifest_testbed(tmp_path: Path, text: str) -> Testbed:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "data.manifest").write_text(text)
    return Testbed(TestbedConfig(cache_dir=cache), tmp_path / "payload.img", tmp_path)


def test_pages_of_a_range_of_data_files(tmp_path: Path) -> None:
    testbed = manifest_testbed(tmp_path, "data-000 16777216 3d800ea4961a2098\n"
                                              "data-001 16777216 2dcfbdcb22ade2c3\n"
                                              "data-002 5000 cecd6c6b3d3d1475\n")
    assert testbed.data_file_sizes() == {"data-000": 16 << 20, "data-001": 16 << 20, "data-002": 5000}
    assert data_file_pages(testbed, 0, 2) == 2 * (16 << 20) // PAGE_SIZE
    assert data_file_pages(testbed, 1, 2) == (16 << 20) // PAGE_SIZE + 2  # a partial page counts
    with pytest.raises(AssertionError, match="has 3 files, not 4"):
        data_file_pages(testbed, 2, 2)
