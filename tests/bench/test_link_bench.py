"""The pure parts of the bench across the link (tests/bench/link_bench.py): the neighbour's
throughput lines, the clock offset between two dom0s, the link counters, the summary and the
targets of issue 19."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
from pathlib import Path

import pytest

from softpage_testbed import LinkShape
from tests.bench.dom0.clock_offset import best_offset
from tests.bench.dom0.tap import Timeline
from tests.bench.link_bench import (
    LINK_METHODS,
    TIMELINE_BYTES,
    TIMELINE_PAGES,
    TIMELINE_WAITED,
    LinkRun,
    cores_taken,
    cross_host_interval,
    downtime_parts,
    link_delta,
    live_state,
    markdown,
    migration_timeout_s,
    rewrite_readme,
    spin_rate,
    step_methods,
    summarise,
    targets,
    throughput_loss,
    timeline_at,
    to_link_run,
    transport_buffer_bytes,
    write_readme,
)
from tests.bench.xen_bench import REPO, Run, append_run, read_runs, to_run


def test_spin_rate_counts_whole_lines_only() -> None:
    text = ("AD SPIN seq=3 pages=999999 seconds=0.001\n"  # cut at the slice's start
            "WORKLOAD SPIN seq=4 pages=1000 seconds=1.000\r\n"
            "HEARTBEAT 7 up=12.0\n"
            "WORKLOAD SPIN seq=5 pages=3000 seconds=1.000\n"
            "WORKLOAD SPIN seq=6 pages=77")  # cut at the slice's end
    assert spin_rate(text) == pytest.approx(2000.0)


def test_spin_rate_without_lines_is_none() -> None:
    assert spin_rate("") is None
    assert spin_rate("HEARTBEAT 1 up=3.0\n") is None


def test_workload_spin_prints_what_the_bench_parses(tmp_path: Path) -> None:
    """workload.c owns the line format; the bench's parser must read what it prints."""
    binary = tmp_path / "workload"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(binary),
                    str(REPO / "testbed/guest/workload.c")], check=True)
    spin = subprocess.Popen([str(binary), "spin", "--mb", "4"], stdout=subprocess.PIPE, text=True)
    try:
        assert spin.stdout is not None
        lines = [spin.stdout.readline() for _ in range(3)]
    finally:
        spin.kill()
        spin.wait()
    assert lines[0] == "WORKLOAD SPIN READY mb=4\n"
    rate = spin_rate("".join(lines[1:]))
    assert rate is not None and rate > 0
    usage = subprocess.run([str(binary), "spin", "--mb", "0"], capture_output=True, text=True, check=False)
    assert usage.returncode == 2, usage


def test_throughput_loss() -> None:
    assert throughput_loss(1000.0, 750.0) == pytest.approx(0.25)
    assert throughput_loss(1000.0, 1100.0) == pytest.approx(-0.1)
    assert throughput_loss(None, 10.0) is None
    assert throughput_loss(0.0, 10.0) is None
    assert throughput_loss(10.0, None) is None


def test_best_offset_takes_the_shortest_round_trip() -> None:
    # host-b's clock runs 100 s ahead; the second probe queued 0.4 s on its way back
    samples = [(10.0, 110.05, 10.1), (20.0, 120.01, 20.42), (30.0, 130.02, 30.04)]
    offset, rtt = best_offset(samples)
    assert rtt == pytest.approx(0.04)
    assert offset == pytest.approx(100.0)


def test_best_offset_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="at least one"):
        best_offset([])
    with pytest.raises(ValueError, match="after its probe"):
        best_offset([(5.0, 1.0, 4.0)])


def test_cross_host_interval_applies_the_mean_offset() -> None:
    # suspend requested at 50 on host-a; running at 1052.5 on host-b, whose clock is 1000 ahead
    # (999.8 before, 1000.2 after)
    assert cross_host_interval(50.0, 1052.5, 999.8, 1000.2) == pytest.approx(2.5)
    assert cross_host_interval(None, 1052.5, 0.0, 0.0) is None
    assert cross_host_interval(50.0, None, 0.0, 0.0) is None


def test_link_delta() -> None:
    assert link_delta((100, 200), (1100, 260)) == (1000, 60)
    with pytest.raises(ValueError, match="growing"):
        link_delta((100, 200), (50, 260))


def run(method: str, repetition: int, scale: float, loss: float | None = 0.5) -> LinkRun:
    return LinkRun(
        anon_mb=0, cache_mb=96, method=method, repetition=repetition, wall_s=100.0 * scale,
        downtime_s=2.0, suspended_s=1.5, pages_data=int(60000 * scale), pages_xalloc=0,
        stream_bytes=int(250e6 * scale), wire_bytes=int(260e6 * scale), wire_a_tx=int(258e6 * scale),
        wire_a_rx=int(2e6 * scale), wire_b_tx=int(2e6 * scale), wire_b_rx=int(258e6 * scale),
        dom0_cpu_a_s=80.0 * scale, dom0_cpu_b_s=60.0 * scale, receiver_wall_s=100.0 * scale,
        rounds=None, early_drop_s=None, neighbour_without=1000.0,
        neighbour_during=None if loss is None else 1000.0 * (1 - loss * scale),
        neighbour_loss=None if loss is None else loss * scale, clock_offset_s=10.0, clock_drift_s=0.001,
        clock_rtt_s=0.01, load_1min=5.0)


def test_summary_ratios_and_targets() -> None:
    runs = [run("stock", r, 1.0) for r in range(3)]
    runs += [run("no-prune", r, 1.0 + 0.01 * r) for r in range(3)]  # median 1.01
    runs += [run("prune", r, s) for r, s in enumerate((0.05, 0.07, 0.5))]  # median 0.07
    rows = summarise(runs)
    assert [row["method"] for row in rows] == list(LINK_METHODS)
    prune = rows[2]
    assert prune["runs"] == 3
    assert prune["wall_s_vs_stock"] == pytest.approx(0.07)
    assert prune["neighbour_loss_vs_stock"] == pytest.approx(0.07)
    # the work lost: the share of the rate times the time, both 0.07x stock's
    assert prune["neighbour_work_lost_vs_stock"] == pytest.approx(0.07 * 0.07)
    assert prune["downtime_s_vs_stock"] == pytest.approx(1.0)
    verdicts = {(method, field): (ratio, met) for method, field, ratio, _limit, met in targets(rows)}
    assert verdicts[("prune", "pages_data")][1] is True
    assert verdicts[("prune", "downtime_s")][1] is True
    assert verdicts[("no-prune", "wall_s")] == (pytest.approx(1.01), True)
    table = markdown(rows, targets(rows))
    assert "MISSED" not in table and "prune wire_bytes: 0.07 (target <= 0.08): met" in table


def test_a_missed_or_unmeasured_target_is_not_met() -> None:
    runs = [run("stock", 0, 1.0, loss=None), run("prune", 0, 0.5, loss=None)]
    verdicts = {(method, field): met for method, field, _ratio, _limit, met in targets(summarise(runs))}
    assert verdicts[("prune", "wall_s")] is False  # 0.5 > 0.25
    assert verdicts[("prune", "neighbour_loss")] is False  # not measured
    table = markdown(summarise(runs), targets(summarise(runs)))
    assert "prune wall_s: 0.50 (target <= 0.25): MISSED" in table
    assert "prune neighbour_loss: - (target <= 0.3): not measured" in table


def test_targets_only_at_the_asked_step() -> None:
    runs = [dataclasses.replace(run("stock", 0, 1.0), anon_mb=64),
            dataclasses.replace(run("prune", 0, 0.05), anon_mb=64)]
    assert targets(summarise(runs)) == []
    assert "none measured yet" in markdown(summarise(runs), [])



def test_to_link_run_adds_the_cross_host_measures() -> None:
    base = Run(anon_mb=0, cache_mb=96, method="prune", repetition=1, wall_s=50.0, downtime_s=3.0,
               suspended_s=2.5, sender_cpu_s=None, stream_bytes=40_000_000, pages_data=9000,
               pages_xalloc=50000, rounds=4, guest_scan_ms=None, guest_drop_ms=None,
               guest_final_scan_ms=None, early_drop_s=0.5, dom0_cpu_s=20.0)
    extra: dict[str, float | int | None] = {
        "wire_a_tx": 41_000_000, "wire_a_rx": 900_000, "wire_b_tx": 900_000, "wire_b_rx": 41_000_000,
        "dom0_cpu_b_s": 15.0, "receiver_wall_s": 49.0, "neighbour_without": 800.0,
        "neighbour_during": 600.0, "clock_offset_s": 12.5, "clock_drift_s": 0.002, "clock_rtt_s": 0.02}
    link_run = to_link_run(base, extra)
    assert link_run.wire_bytes == 41_900_000
    assert link_run.dom0_cpu_a_s == 20.0 and link_run.dom0_cpu_b_s == 15.0
    assert link_run.neighbour_loss == pytest.approx(0.25)
    assert (link_run.downtime_s, link_run.pages_data, link_run.rounds) == (3.0, 9000, 4)
    assert link_run.clock_rtt_s == 0.02
    unmeasured = to_link_run(base, {**extra, "neighbour_during": None, "dom0_cpu_b_s": None})
    assert unmeasured.neighbour_loss is None and unmeasured.dom0_cpu_b_s is None
    assert link_run.qemu_cores_a is None  # not in extra: an older run
    cores = to_link_run(base, {**extra, "qemu_cores_a": 1.2, "qemu_cores_b": 0.7})
    assert (cores.qemu_cores_a, cores.qemu_cores_b) == (1.2, 0.7)


def test_softpages_final_round_comes_from_its_stats_and_shows_in_the_downtime_table() -> None:
    send = {"wall_s": 100.0, "downtime_s": 3.0, "suspended_s": 2.5, "dom0_cpu_s": 20.0, "cpu_s": 30.0}
    tap = {"stream_bytes": 40_000_000, "pages_data": 9000, "pages_xalloc": 50000}
    stats = [{"round": 1, "kind": "live", "pages_data": 8000},
             {"round": 2, "kind": "after-drop", "pages_data": 900},
             {"round": 3, "kind": "final", "pages_data": 100}, {"totals": True, "guest_drop_s": 0.5}]
    pruned = to_run(0, 96, "prune", 0, {"send": send, "recv": {"cpu_s": 10.0}, "tap": tap, "stats": stats})
    assert (pruned.rounds, pruned.final_pages_data, pruned.early_drop_s) == (3, 100, 0.5)
    stock = to_run(0, 96, "stock", 0, {"send": send, "recv": {}, "tap": tap})
    assert stock.final_pages_data is None
    runs = [dataclasses.replace(run("stock", 0, 1.0), final_pages_data=None),
            dataclasses.replace(run("prune", 0, 0.2), final_pages_data=100)]
    table = markdown(summarise(runs), targets(summarise(runs)))
    assert "| END to running | final round, pages with data |" in table
    downtime_rows = table.split("Where the downtime goes")[1].splitlines()
    assert "| 0 | prune | 2.00 | - | 0.50 | - | - | - | - | 100 |" in downtime_rows
    assert "| 0 | stock | 2.00 | - | 0.50 | - | - | - | - | - |" in downtime_rows


def test_cores_taken_is_cpu_seconds_over_wall_time() -> None:
    assert cores_taken([10.0, 5.0], [25.0, 12.5], 10.0) == [1.5, 0.75]
    assert cores_taken([None, 5.0], [25.0, None], 10.0) == [None, None]
    assert cores_taken([1.0], [2.0], 0.0) == [None]


def test_the_qemu_cores_table_only_when_measured() -> None:
    older = [run("stock", 0, 1.0), run("prune", 0, 0.2)]
    assert "Where the neighbour's rate goes" not in markdown(summarise(older), targets(summarise(older)))
    newer = [dataclasses.replace(link_run, qemu_cores_a=1.1, qemu_cores_b=0.9) for link_run in older]
    table = markdown(summarise(newer), targets(summarise(newer)))
    assert "| 0 | prune | 0.10 | 1.10 | 0.90 |" in table


@pytest.mark.parametrize("buffer", [[], ["--buffer", "65536"]])
def test_tcp_pipe_carries_the_stream_and_the_answers(buffer: list[str]) -> None:
    """tcp_pipe.py on this machine's loopback: the stream one way, the receiver's answer back."""
    tool = str(REPO / "tests/bench/dom0/tcp_pipe.py")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    receiver = subprocess.Popen(["python3", tool, "serve", *buffer, str(port), "30", "--", "sh", "-c",
                                 'echo "received $(wc -c) bytes"'])
    try:
        sender = subprocess.run(["python3", tool, "connect", *buffer, "127.0.0.1", str(port)],
                                input=bytes(3 << 20), capture_output=True, timeout=60, check=True)
        assert sender.stdout.decode().split() == ["received", str(3 << 20), "bytes"]
        assert receiver.wait(timeout=30) == 0
    finally:
        receiver.kill()


def test_tcp_pipe_sizes_both_kernel_buffers() -> None:
    from tests.bench.dom0.tcp_pipe import size_buffers
    with socket.socket() as connection:
        autotuned = connection.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        size_buffers(connection, None)
        assert connection.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == autotuned
        size_buffers(connection, 100_000)
        # Linux doubles what it is given (socket(7))
        assert connection.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 200_000
        assert connection.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 200_000


def test_the_transport_buffers_are_seconds_of_the_shaped_rate() -> None:
    assert transport_buffer_bytes(LinkShape("16mbit", 5), 0.25) == 500_000
    assert transport_buffer_bytes(LinkShape("1mbit", 5), 0.25) == 64 << 10  # at least 64 KiB
    assert transport_buffer_bytes(LinkShape("16mbit", 5), 0) is None
    assert transport_buffer_bytes(None, 0.25) is None


def test_timeline_at_interpolates_the_taps_timeline() -> None:
    timeline = [[10.0, 0, 0.0, 0], [11.0, 1 << 20, 0.5, 200], [13.0, 2 << 20, 0.5, 400],
                [14.0, 3 << 20, 1.5, 600]]
    assert timeline_at(timeline, 9.0, TIMELINE_WAITED) == 0.0
    assert timeline_at(timeline, 10.5, TIMELINE_WAITED) == pytest.approx(0.25)
    assert timeline_at(timeline, 12.0, TIMELINE_WAITED) == pytest.approx(0.5)
    assert timeline_at(timeline, 13.5, TIMELINE_WAITED) == pytest.approx(1.0)
    assert timeline_at(timeline, 20.0, TIMELINE_WAITED) == pytest.approx(1.5)
    assert timeline_at(timeline, 12.0, TIMELINE_BYTES) == pytest.approx(1.5 * (1 << 20))
    assert timeline_at(timeline, 13.5, TIMELINE_PAGES) == pytest.approx(500)
    assert timeline_at([], 1.0, TIMELINE_WAITED) == 0.0
    # a sample of an older tap has no pages
    assert timeline_at([[10.0, 0, 0.0], [11.0, 1, 0.5]], 10.5, TIMELINE_PAGES) is None


def test_the_downtime_splits_at_the_streams_end_on_host_b() -> None:
    # host-b's clock is 100 s ahead of host-a's; the suspend at 50 (a) = 150 (b)
    tap = {"end_at": 156.0, "timeline": [[140.0, 0, 0.0, 0], [150.0, 1000, 1.0, 100],
                                         [156.0, 5096, 4.0, 101]]}
    parts = downtime_parts(50.0, tap, 160.5, 100.0, 100.0)
    assert parts == {"stream_end_s": pytest.approx(6.0), "receiver_wait_s": pytest.approx(3.0),
                     "restore_s": pytest.approx(4.5), "after_suspend_bytes": pytest.approx(4096),
                     "after_suspend_pages": pytest.approx(1)}
    older_tap = {"end_at": 156.0, "timeline": [[140.0, 0, 0.0], [150.0, 1, 1.0], [156.0, 2, 4.0]]}
    assert downtime_parts(50.0, older_tap, 160.5, 100.0, 100.0)["after_suspend_pages"] is None
    assert downtime_parts(50.0, {"end_at": None}, 160.5, 100.0, 100.0)["restore_s"] is None
    assert downtime_parts(None, tap, 160.5, 100.0, 100.0)["stream_end_s"] is None


def test_an_older_sweeps_runs_are_read_and_continued(tmp_path: Path) -> None:
    """A runs.csv written before the downtime's parts: read with those empty, and the next run
    appended under today's columns."""
    path = tmp_path / "runs.csv"
    older = run("stock", 0, 1.0)
    append_run(path, older)
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    newer_columns = len(header) - header.index("stream_end_s")  # all None in ``older``: empty
    assert all(line.endswith("," * newer_columns) for line in lines[1:])
    older_lines = [",".join(header[:-newer_columns]), *(line[:-newer_columns] for line in lines[1:])]
    path.write_text("\n".join(older_lines) + "\n")
    assert read_runs(path, LinkRun) == [older]
    newer = dataclasses.replace(run("prune", 0, 0.2), stream_end_s=6.0, receiver_wait_s=3.0, restore_s=4.5)
    append_run(path, newer)
    assert read_runs(path, LinkRun) == [older, newer]


def test_a_hung_migration_times_out_after_three_guests_at_the_link_rate() -> None:
    # 512 MiB at 40 Mbit/s (5,000,000 bytes/s) is 107.4 s; three times that and the slack
    assert migration_timeout_s(512, LinkShape("40mbit", 5)) == pytest.approx(600 + 3 * 536_870_912 / 5e6)
    assert migration_timeout_s(256, None) == pytest.approx(600 + 3 * 256)  # unshaped: 1 MiB/s


@pytest.mark.parametrize(("state", "live"), [
    ("-b----", True),
    ("r-----", True),
    ("---sc-", False),
    ("--p--d", False),
    ("", False),  # not listed
])
def test_a_crashed_neighbour_is_not_live(state: str, live: bool) -> None:
    assert live_state(state) is live


def test_the_neighbours_work_lost_weighs_the_share_by_the_migrations_time() -> None:
    stock = run("stock", 0, 1.0, loss=0.8)  # 100 s at 200 of 1000 pages/s: 80,000 pages lost
    prune = dataclasses.replace(stock, method="prune", wall_s=30.0,
                                neighbour_during=250.0, neighbour_loss=0.75)
    assert stock.neighbour_work_lost == pytest.approx(80_000)
    assert prune.neighbour_work_lost == pytest.approx(22_500)
    rows = summarise([stock, prune])
    assert rows[1]["neighbour_loss_vs_stock"] == pytest.approx(0.75 / 0.8)  # the rate: 0.94x
    assert rows[1]["neighbour_work_lost_vs_stock"] == pytest.approx(22_500 / 80_000)  # the work: 0.28x
    verdicts = {(method, field): met for method, field, _ratio, _limit, met in targets(rows)}
    assert verdicts[("prune", "neighbour_loss")] is False
    assert verdicts[("prune", "neighbour_work_lost")] is True
    assert run("stock", 0, 1.0, loss=None).neighbour_work_lost is None


def test_rewrite_readme_keeps_the_header_and_the_hand_written_part(tmp_path: Path) -> None:
    for repetition in range(2):
        for method, scale in (("stock", 1.0), ("prune", 0.2)):
            append_run(tmp_path / "runs.csv", run(method, repetition, scale))
    (tmp_path / "notes.txt").write_text("07:00:00 the neighbour was gone or dead\n")
    (tmp_path / "README.md").write_text("# header\n\nthe bench's words\n\n## Medians\n\nold table\n"
                                        "\n## What this run is (written by hand after it)\n\nhuman words\n")
    rewrite_readme(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("# header\n\nthe bench's words\n\n## Medians\n\n| user MB")
    assert "old table" not in text and "work lost, M pages" in text
    assert "- 07:00:00 the neighbour was gone or dead" in text and "## Failed runs" in text
    assert text.endswith("## What this run is (written by hand after it)\n\nhuman words\n")


def test_a_continued_sweep_keeps_the_hand_written_part(tmp_path: Path) -> None:
    """The bench writes its summary after every run: a continued sweep's README keeps what was
    written by hand after an earlier session, under a new header and table."""
    (tmp_path / "README.md").write_text("# old header\n\n## Medians\n\nold table\n"
                                        "\n## What this run is (written by hand after it)\n\nhuman words\n")
    write_readme(tmp_path, "# new header", [run("stock", 0, 1.0), run("prune", 0, 0.2)], [], [])
    text = (tmp_path / "README.md").read_text()
    assert text.startswith("# new header\n\n## Medians\n\n| user MB") and "old" not in text
    assert text.endswith("## Notes\n\n- none\n\n"
                         "## What this run is (written by hand after it)\n\nhuman words\n")
    write_readme(tmp_path, "# newer header", [run("stock", 0, 1.0)], [], [])
    assert (tmp_path / "README.md").read_text().count("human words") == 1


def test_a_continuation_may_leave_stock_out_once_the_sweep_has_it() -> None:
    assert step_methods("prune", [], 0) == ("stock", "prune")
    assert step_methods("prune", [run("stock", 0, 1.0)], 0) == ("prune",)
    other_step = dataclasses.replace(run("stock", 0, 1.0), anon_mb=64)
    assert step_methods("prune", [other_step], 0) == ("stock", "prune")
    assert step_methods("prune,no-prune,stock", [], 0) == LINK_METHODS
    with pytest.raises(SystemExit, match="unknown cache=all"):
        step_methods("cache=all", [], 0)


def test_the_taps_timeline_keeps_the_read_before_a_pause_and_the_end() -> None:
    timeline = Timeline()
    for moment, total in ((0.0, 1), (0.01, 2), (0.06, 3), (0.07, 4)):
        timeline.read([moment, total])
    timeline.read([1.0, 5])  # after a pause: the read at 0.07 is kept before it
    timeline.read([1.01, 6], end=True)  # the END: kept though within SAMPLE_S
    timeline.read([1.02, 7])
    assert timeline.close([5.0, 7]) == [[0.0, 1], [0.06, 3], [0.07, 4], [1.0, 5], [1.01, 6], [1.02, 7],
                                        [5.0, 7]]
    # read off at the END it is exact; within the pause it is off by one read at most (without the
    # sample at 0.07, 0.5 s would read 3 + 2 x 0.47: the read at 0.07 spread over the pause)
    samples = [[moment, total, 0.0, total] for moment, total in timeline.samples]
    assert timeline_at(samples, 1.01, TIMELINE_PAGES) == 6
    value = timeline_at(samples, 0.5, TIMELINE_PAGES)
    assert value is not None and 4 <= value < 5


def test_the_guests_own_suspend_is_the_downtime_before_xen_shows_it_suspended() -> None:
    runs = [dataclasses.replace(run("stock", r, 1.0), downtime_s=13.0 + r, suspended_s=12.8 + r)
            for r in range(3)]
    runs += [dataclasses.replace(run("no-prune", 0, 1.0), downtime_s=17.3, suspended_s=16.6),
             dataclasses.replace(run("no-prune", 1, 1.0), downtime_s=17.3, suspended_s=None)]  # not seen
    assert runs[0].guest_suspend_s == pytest.approx(0.2)
    assert runs[4].guest_suspend_s is None
    rows = summarise(runs)
    assert rows[0]["guest_suspend_s"] == pytest.approx(0.2)
    assert rows[1]["guest_suspend_s"] == pytest.approx(0.7)  # the run that has both ends only
    table = markdown(rows, targets(rows))
    assert "| of it, the guest's suspend |" in table
    assert "| 0 | no-prune | 17.30 | - | 0.70 | - |" in table  # downtime 17.3 (the median of one)
