"""The guest's-view bench's arithmetic (guestview_bench.py), without a testbed: what counts as
back to 90%, the throughput of seconds with gaps between them, where the guest's pause is, and
wrk's records as the bench reads them."""

from __future__ import annotations

from pathlib import Path

from tests.bench.guestview_bench import (
    MethodRun,
    Second,
    longest_pause,
    plot,
    rate_over,
    recovered_after,
    table,
    to_seconds,
)


def second(start: float, requests: int, length: float = 1.0, slow: int = 0) -> Second:
    return Second(start, start + length, requests, 0, 1.0, 2.0, 3.0, slow)


def test_rate_counts_the_gaps_between_wrk_runs() -> None:
    seconds = [second(0.0, 100, 0.8), second(1.0, 100, 0.8)]
    assert rate_over(seconds) == 200 / 1.8
    assert rate_over([]) == 0.0


def test_back_to_90_percent_needs_three_seconds_in_a_row_after_the_resume() -> None:
    # 100 req/s before; the resume at 10.0; one good second at 11, a dip at 12, then good from 13.
    rates = {9: 100, 10: 0, 11: 95, 12: 50, 13: 91, 14: 92, 15: 100}
    seconds = [second(float(at), requests) for at, requests in rates.items()]
    assert recovered_after(seconds, resume=10.0, before=100.0) == 3.0
    # a second that started before the resume does not count, however good
    assert recovered_after(seconds, resume=9.5, before=100.0) == 3.5
    assert recovered_after(seconds[:-1], resume=10.0, before=100.0) is None


def test_the_resume_is_the_first_disk_sample_after_the_longest_pause() -> None:
    samples = [(0.0, 0), (0.5, 0), (1.0, 10), (4.2, 10), (4.7, 90), (5.2, 95)]
    assert longest_pause(samples) == 3


def test_wrk_records_become_seconds_from_the_migration_start() -> None:
    records: list[dict[str, object]] = [
        {"run": 0, "start": 100.0, "end": 101.1, "rc": 0,
         "wrk": {"requests": 50, "duration_us": 1000000, "errors_connect": 0, "errors_timeout": 2,
                 "latency_p50_us": 1500, "latency_p99_us": 90000, "latency_max_us": 120000, "slow": 3}},
        {"run": 1, "start": 101.2, "end": 102.3, "rc": 0,
         "wrk": {"requests": 0, "duration_us": 1000000, "errors_connect": 4, "latency_p50_us": 0,
                 "latency_p99_us": 0, "latency_max_us": 0, "slow": 0}},
        {"run": 2, "start": 102.4, "end": 103.5, "rc": 1, "stderr": "unable to connect"},
    ]
    first, idle, failed = to_seconds(records, origin=101.0)
    assert (first.start, first.requests, first.errors, first.p99_ms, first.slow) == (-1.0, 50, 2, 90.0, 3)
    assert (idle.requests, idle.errors, idle.p50_ms) == (0, 4, None)
    assert (failed.requests, failed.errors) == (0, 1)


def test_table_and_plot_of_a_baseline_and_a_migration(tmp_path: Path) -> None:
    baseline = MethodRun("baseline", 1.0, 300, 300, 100.0, None, 60.0, 6000, None, 5, None, 0, 0.9, None,
                         0, None)
    migrated = MethodRun("cache=all", 1.0, 300, 20, 100.0, 12.0, 80.0, 5000, 3000.0, 400, 393.3, 7, 0.9,
                         200 << 20, 210 << 20, 3.1, 40.0, 3.5, 30000, 200000, 130 << 20, 38.0, 36.5)
    text = table([baseline, migrated], "header", slow_ms=100)
    assert ("| cache=all | 100.0 | 12.0 | 5000 | 80.0 | 3000 | 3000 | 400 | 393 | 7 | 200.0 | 300 / 20 |"
            in text)
    seconds = {"baseline": [second(float(at), 100) for at in range(-20, 60)],
               "cache=all": [second(float(at), 0 if 36 <= at < 40 else 100) for at in range(-20, 100)]}
    disk = {"cache=all": [(38.0 + at / 2, at << 20) for at in range(40)]}
    plot([baseline, migrated], seconds, disk, tmp_path / "timeline.png", slow_ms=100)
    assert (tmp_path / "timeline.png").stat().st_size > 10_000
