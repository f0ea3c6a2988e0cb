"""make bench keeps every run on disk as it lands, and continues an interrupted sweep from it."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.bench import xen_bench


def run(method: str, repetition: int, **changes: object) -> xen_bench.Run:
    measured = xen_bench.Run(
        anon_mb=200, cache_mb=600, method=method, repetition=repetition, wall_s=81.5,
        downtime_s=None, suspended_s=None, sender_cpu_s=12.25, stream_bytes=3 << 20, pages_data=700,
        pages_xalloc=65000,
        rounds=None, guest_scan_ms=None, guest_drop_ms=None, guest_final_scan_ms=None,
        early_drop_s=None,
    )
    return dataclasses.replace(measured, **changes)  # type: ignore[arg-type]


def test_appended_runs_load_back_equal(tmp_path: Path) -> None:
    path = tmp_path / "runs.csv"
    pruned = run("prune", 0, downtime_s=0.75, rounds=3, guest_scan_ms=9.5, guest_drop_ms=125.0,
                 guest_final_scan_ms=30.5, suspended_s=0.5, early_drop_s=3.25)
    written = [run("stock", 0), pruned]
    for each in written:
        xen_bench.append_run(path, each)
    assert xen_bench.load_runs(path) == written
    assert path.read_text().count("anon_mb") == 1  # one header line


def test_runs_of_another_bench_version_are_not_continued(tmp_path: Path) -> None:
    path = tmp_path / "runs.csv"
    xen_bench.append_run(path, run("stock", 0))
    lines = path.read_text().splitlines()
    # the first column gone: not an older sweep (those lack only trailing columns with defaults)
    path.write_text("\n".join(line.split(",", 1)[1] for line in lines) + "\n")
    with pytest.raises(SystemExit, match="another version of the bench"):
        xen_bench.load_runs(path)


def test_an_older_sweep_without_the_newest_columns_is_continued(tmp_path: Path) -> None:
    path = tmp_path / "runs.csv"
    xen_bench.append_run(path, run("stock", 0))
    lines = path.read_text().splitlines()
    path.write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n")  # the last one gone
    assert xen_bench.load_runs(path) == [run("stock", 0)]


def test_dom0_cpu_is_compared_with_stock() -> None:
    rows = xen_bench.summarise([run("stock", 0, dom0_cpu_s=40.0), run("prune", 0, dom0_cpu_s=10.0)])
    pruned = next(row for row in rows if row["method"] == "prune")
    assert (pruned["dom0_cpu_s"], pruned["dom0_cpu_s_vs_stock"]) == (10.0, 0.25)
    assert "| 10.0 | 0.25 |" in xen_bench.markdown(rows, "# table")


def test_no_file_means_no_runs(tmp_path: Path) -> None:
    assert xen_bench.load_runs(tmp_path / "runs.csv") == []


def test_a_sweep_continues_only_with_the_same_guest_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOFTPAGE_BENCH_OUT", str(tmp_path / "sweep"))
    assert xen_bench.output_dir(1024) == tmp_path / "sweep"
    assert xen_bench.output_dir(1024) == tmp_path / "sweep"
    with pytest.raises(SystemExit, match="1024 MiB guest, not 2048 MiB"):
        xen_bench.output_dir(2048)


def test_softpage_round_records_are_kept_per_run(tmp_path: Path) -> None:
    records = [{"round": 1, "pages_data": 5}, {"totals": True, "migration_s": 9.5}]
    xen_bench.keep_round_stats(tmp_path, run("prune", 2, anon_mb=400), {"stats": records})
    xen_bench.keep_round_stats(tmp_path, run("stock", 2), {})  # stock keeps no records
    kept = tmp_path / "stats" / "400-prune-2.jsonl"
    assert [json.loads(line) for line in kept.read_text().splitlines()] == records
    assert [path.name for path in (tmp_path / "stats").iterdir()] == ["400-prune-2.jsonl"]


@pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox (the guest's shell) is not installed")
def test_warming_the_cache_reads_the_files_the_workload_cached(tmp_path: Path) -> None:
    """As load_manifest in testbed/guest/workload.c: whole files in MANIFEST order until the
    wanted bytes are reached."""
    (tmp_path / "MANIFEST").write_text("a 4096 1f\nb 8192 2f\nc 4096 3f\n")
    for name, size in (("a", 4096), ("b", 8192), ("c", 4096)):
        (tmp_path / name).write_bytes(bytes(size))
    command = xen_bench.warm_cache_command(10000, "WARM-1", str(tmp_path))
    done = subprocess.run(["busybox", "sh", "-c", command], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "WARM-1 read=12288"



def test_bench_guest_caches_what_its_memory_and_data_disk_allow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOFTPAGE_DATA_MB", "2048")
    assert xen_bench.bench_guest("g", 2048, 0).cache_mb == 2048 - xen_bench.KERNEL_AND_WORKLOAD_MB
    assert xen_bench.bench_guest("g", 2048, 1600).cache_mb == 288
    assert xen_bench.bench_guest("g", 2048, 2000).cache_mb == 0
    monkeypatch.setenv("SOFTPAGE_DATA_MB", "500")
    assert xen_bench.bench_guest("g", 2048, 0).cache_mb == 500
