"""The guest's-view bench without a testbed: its arithmetic (guestview_bench.py: what counts as
back to 90%, where the guest's pause is, the load generator's lines as the bench reads them) and
its load generator (dom0/app_load.py: the hot set's draw, replies, per-second lines, and a short
run against a server on loopback)."""

from __future__ import annotations

import dataclasses
import functools
import http.server
import itertools
import json
import math
import shlex
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from softpage_testbed.distro import ShellResult
from tests.bench.dom0 import app_load
from tests.bench.guestview_bench import (
    MethodRun,
    PgCluster,
    Second,
    Settings,
    check_postgresql,
    cpu_shares,
    guest_kernel_args,
    load_command,
    longest_pause,
    output_dir,
    parse_disk_samples,
    plot,
    rate_over,
    recovered_after,
    summarise_load,
    table,
    to_seconds,
)
from tests.bench.guestview_bench import testbed_config as config_for_the_bench


def second(start: float, requests: int, length: float = 1.0, slow: int = 0) -> Second:
    return Second(start, start + length, requests, 0, 1.0, 2.0, 3.0, slow)


def test_rate_runs_from_the_first_start_to_the_last_end() -> None:
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


def test_disk_samples_are_bytes_from_sectors_and_other_lines_are_skipped() -> None:
    text = "1733450000.123456 100\nbash: warning\n1733450000.623456 108\n"
    assert parse_disk_samples(text) == [(1733450000.123456, 51200), (1733450000.623456, 55296)]


def test_cpu_shares_are_each_fields_part_of_the_ticks_between_two_lines() -> None:
    first = "cpu  100 0 50 800 10 0 5 35 0 0"
    second = "cpu  160 0 70 820 10 0 15 125 0 0"
    assert cpu_shares(first, second) == {"user": 0.3, "nice": 0.0, "system": 0.1, "idle": 0.1, "iowait": 0.0,
                                         "irq": 0.0, "softirq": 0.05, "steal": 0.45}
    with pytest.raises(ValueError, match="expected /proc/stat's cpu line"):
        cpu_shares("cpu0 1 2 3", second)


def test_load_lines_become_seconds_from_the_migration_start() -> None:
    records: list[dict[str, object]] = [
        {"start": 100.0, "end": 101.0, "requests": 50, "errors": 2, "slow": 3, "p50_ms": 1.5,
         "p99_ms": 90.0, "max_ms": 120.0},
        {"start": 101.0, "end": 102.0, "requests": 0, "errors": 4, "slow": 0},
    ]
    served, idle = to_seconds(records, origin=101.0)
    assert (served.start, served.end, served.requests, served.errors, served.p99_ms, served.slow) == (
        -1.0, 0.0, 50, 2, 90.0, 3)
    assert (idle.requests, idle.errors, idle.p50_ms, idle.max_ms) == (0, 4, None, None)
    assert summarise_load(records) == {"seconds": 2, "requests": 50, "requests_per_s": 25.0,
                                       "worst_p99_ms": 90.0, "errors": 6}


def test_the_hot_set_is_drawn_as_hot_set_lua_draws_it() -> None:
    hot_set = app_load.HotSet(nfiles=4096, hot_fraction=0.25, skew=2.0, seed=7)
    assert hot_set.hot == 1024
    assert (hot_set.index(0.0), hot_set.index(0.5), hot_set.index(0.999999)) == (0, 256, 1023)
    drawn = Counter(hot_set.next_path() for _ in range(20000))
    assert set(drawn) <= {f"/f{index:05d}" for index in range(1024)}
    # skew 2: P(index < hot/4) = P(u < 1/2) = 1/2
    assert 0.47 < sum(count for path, count in drawn.items() if int(path[2:]) < 256) / 20000 < 0.53
    # the same seed, the same sequence in every run; another seed, another
    def draws(seed: int) -> list[str]:
        drawing = app_load.HotSet(nfiles=4096, hot_fraction=0.25, skew=2.0, seed=seed)
        return [drawing.next_path() for _ in range(50)]

    assert draws(7) == draws(7) != draws(8)
    with pytest.raises(ValueError, match="hot_fraction"):
        app_load.HotSet(nfiles=10, hot_fraction=0.0, skew=2.0, seed=1)


def test_replies_need_a_status_line_and_a_length() -> None:
    head = app_load.parse_head(b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 65536")
    assert head == app_load.ReplyHead(200, 65536, keep_alive=True)
    closing = app_load.parse_head(b"HTTP/1.1 404 Not Found\r\nContent-Length: 153\r\nConnection: close")
    assert closing == app_load.ReplyHead(404, 153, keep_alive=False)
    assert not app_load.parse_head(b"HTTP/1.0 200 OK\r\nContent-Length: 1").keep_alive
    with pytest.raises(ValueError, match=r"expected an HTTP/1\.x status line"):
        app_load.parse_head(b"SSH-2.0-OpenSSH")
    with pytest.raises(ValueError, match="expected a Content-Length"):
        app_load.parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked")


def test_a_second_reports_nearest_rank_percentiles_and_the_slow_requests() -> None:
    interval = app_load.Interval(10.0, 11.0, [i / 1000 for i in range(1, 201)], errors=1)
    line = interval.record(slow_s=0.150)
    assert (line["requests"], line["errors"], line["slow"]) == (200, 1, 50)
    assert line["p50_ms"] == pytest.approx(100.0)
    assert line["p99_ms"] == pytest.approx(198.0)
    assert line["max_ms"] == pytest.approx(200.0)
    assert app_load.Interval(11.0, 12.0).record(slow_s=0.1) == {
        "start": 11.0, "end": 12.0, "requests": 0, "errors": 0, "slow": 0}
    assert app_load.percentile([5.0], 0.99) == 5.0
    assert app_load.percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[int]:
    """A keep-alive HTTP/1.1 server on loopback with 16 files f00000..f00015 of 4 KiB."""
    for index in range(16):
        (tmp_path / f"f{index:05d}").write_bytes(bytes([index]) * 4096)

    class Handler(http.server.SimpleHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Handler, directory=str(tmp_path)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_the_client_keeps_its_connections_and_writes_a_line_a_second(tmp_path: Path,
                                                                      file_server: int) -> None:
    out = tmp_path / "load.jsonl"
    hot_set = app_load.HotSet(nfiles=64, hot_fraction=0.25, skew=2.0, seed=3)
    clients = [app_load.Connection(("127.0.0.1", file_server), hot_set) for _ in range(2)]
    app_load.run(str(out), str(tmp_path / "stop"), 2.5, clients, slow_s=0.5)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 3
    assert all(math.isclose(b["start"], a["end"]) for a, b in itertools.pairwise(lines))
    assert all(line["requests"] > 10 and line["errors"] == 0 for line in lines)
    assert all(0 < line["p50_ms"] <= line["p99_ms"] <= line["max_ms"] for line in lines)


def test_a_refused_connection_is_an_error_and_tried_again(tmp_path: Path) -> None:
    out = tmp_path / "load.jsonl"
    (tmp_path / "stop").touch()  # stops after the first second
    hot_set = app_load.HotSet(nfiles=4, hot_fraction=1.0, skew=1.0, seed=1)
    app_load.run(str(out), str(tmp_path / "stop"), 60, [app_load.Connection(("127.0.0.1", 9), hot_set)],
                  slow_s=0.1)
    [line] = [json.loads(line) for line in out.read_text().splitlines()]
    # tried at 0 and again RECONNECT_S after each refusal
    assert line["requests"] == 0
    assert line["errors"] == math.ceil(app_load.INTERVAL_S / app_load.RECONNECT_S)


def test_table_and_plot_of_a_baseline_and_a_migration(tmp_path: Path) -> None:
    baseline = MethodRun("baseline", 1.0, 300, 300, 100.0, None, 60.0, 6000, None, 5, None, 0, None,
                         0, None, 40, 250, 3.0)
    migrated = MethodRun("cache=all", 1.0, 300, 20, 100.0, 12.0, 80.0, 5000, 3000.0, 400, 393.3, 7,
                         200 << 20, 210 << 20, 3.1, 60, 230, 4.5, 40.0, 3.5, 30000, 200000, 130 << 20,
                         38.0, 36.5)
    text = table([baseline, migrated], "header", slow_ms=100)
    # the sender returned 2 s after the resume, the source destroyed
    assert ("| cache=all | 100.0 | 12.0 | 2.0 | 5000 | 80.0 | 3000 | 3000 | 400 | 393 | 7 | 200.0 | 300 / 20 "
            "| 60 / 230 | 40.0 | 3.50 | 30000 | 200000 | 130.0 | 4.5 |" in text)
    assert "| baseline | 100.0 | - | - | 6000 |" in text
    seconds = {"baseline": [second(float(at), 100) for at in range(-20, 60)],
               "cache=all": [second(float(at), 0 if 36 <= at < 40 else 100) for at in range(-20, 100)]}
    disk = {"cache=all": [(38.0 + at / 2, at << 20) for at in range(40)]}
    plot([baseline, migrated], seconds, disk, tmp_path / "timeline.png", slow_ms=100)
    assert (tmp_path / "timeline.png").stat().st_size > 10_000


def test_a_pv_guest_is_asked_for_by_name_and_needs_a_host_that_live_migrates_pv(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOFTPAGE_QEMU_MEM_MB", raising=False)
    monkeypatch.setenv("SOFTPAGE_GUESTVIEW_GUEST_TYPE", "pv")
    monkeypatch.setenv("SOFTPAGE_GUESTVIEW_GUEST_MB", "2048")
    monkeypatch.setenv("SOFTPAGE_BENCH_XEN", "4.17.7")
    with pytest.raises(SystemExit, match=r"does not live-migrate PV guests.*SOFTPAGE_BENCH_XEN=4\.17\.5"):
        config_for_the_bench(Settings.from_env())
    monkeypatch.setenv("SOFTPAGE_BENCH_XEN", "4.17.5")
    settings = Settings.from_env()
    assert settings.guest_type == "pv"
    assert config_for_the_bench(settings).qemu_mem_mb == 1024 + 2 * 2048 + 1024


def test_a_guest_type_debians_kernels_do_not_boot_as_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOFTPAGE_GUESTVIEW_GUEST_TYPE", "hvm")
    with pytest.raises(SystemExit, match="SOFTPAGE_GUESTVIEW_GUEST_TYPE: 'hvm'; expected one of pvh, pv"):
        Settings.from_env()


def test_a_cold_age_goes_to_the_module_through_the_guests_kernel_command_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOFTPAGE_GUESTVIEW_COLD_AGE_MS", raising=False)
    assert guest_kernel_args(Settings.from_env()) == ()
    monkeypatch.setenv("SOFTPAGE_GUESTVIEW_COLD_AGE_MS", "120000")
    settings = Settings.from_env()
    assert settings.cold_age_ms == 120000
    assert guest_kernel_args(settings) == ("softpage.cold_age_ms=120000",)


def test_a_sweep_from_before_the_guest_type_and_cold_age_continues_as_pvh_with_the_modules_age(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("SOFTPAGE_GUESTVIEW_GUEST_TYPE", "SOFTPAGE_GUESTVIEW_COLD_AGE_MS", "SOFTPAGE_GUESTVIEW_APP"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SOFTPAGE_GUESTVIEW_OUT", str(tmp_path))
    settings = Settings.from_env()
    older = {key: value for key, value in dataclasses.asdict(settings).items()
             if key not in ("methods", "guest_type", "cold_age_ms", "app")}
    (tmp_path / "settings.json").write_text(json.dumps(older))
    assert output_dir(settings) == tmp_path
    monkeypatch.setenv("SOFTPAGE_GUESTVIEW_GUEST_TYPE", "pv")
    with pytest.raises(SystemExit, match="holds a sweep with other settings"):
        output_dir(Settings.from_env())


def test_the_load_asks_nginx_for_files_or_postgresql_for_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOFTPAGE_GUESTVIEW_APP", raising=False)
    monkeypatch.delenv("SOFTPAGE_GUESTVIEW_RELEASE", raising=False)
    nginx = shlex.split(load_command(24576, Settings.from_env(), "/tmp/out", "/tmp/stop", 100.0))
    assert nginx[2:5] == ["http", "10.98.0.2", "80"] and nginx[8] == "24576" and len(nginx) == 14
    monkeypatch.setenv("SOFTPAGE_GUESTVIEW_APP", "postgresql")
    postgresql = shlex.split(load_command(10_000_000, Settings.from_env(), "/tmp/out", "/tmp/stop", 100.0))
    assert postgresql[2:5] == ["postgresql", "10.98.0.2", "5432"] and postgresql[8] == "10000000"
    assert postgresql[-2:] == ["bench", "postgres"]
    monkeypatch.setenv("SOFTPAGE_GUESTVIEW_RELEASE", "trixie")
    with pytest.raises(SystemExit, match="only the Debian 12"):
        Settings.from_env()
    monkeypatch.setenv("SOFTPAGE_GUESTVIEW_APP", "redis")
    with pytest.raises(SystemExit, match="expected one of nginx, postgresql"):
        Settings.from_env()


PG_LISTING = ("15  main    5432 down   postgres /var/lib/postgresql/15/main "
              "/var/log/postgresql/postgresql-15-main.log\n")
"""``pg_lsclusters --no-header`` in the Debian 12 guest, its cluster stopped."""


class FakePostgresGuest:
    """A distro guest whose shell answers ``check_postgresql``'s commands."""

    def __init__(self, state: str, answer: str) -> None:
        self.state, self.answer = state, answer
        self.commands: list[str] = []

    def shell(self, command: str, timeout_s: float = 120) -> ShellResult:
        self.commands.append(command)
        return ShellResult(rc=0, output=self.state)

    def check_shell(self, command: str, timeout_s: float = 120) -> str:
        self.commands.append(command)
        return PG_LISTING if command.startswith("pg_lsclusters") else self.answer


def test_the_postgresql_cluster_is_the_one_pg_lsclusters_names() -> None:
    cluster = PgCluster.parse(PG_LISTING)
    assert cluster == PgCluster("15", "main", "/var/lib/postgresql/15/main")
    assert cluster.unit == "postgresql@15-main"
    trixie = PgCluster.parse("17  main    5432 online postgres /var/lib/postgresql/17/main "
                             "/var/log/postgresql/postgresql-17-main.log\n")
    assert (trixie.unit, trixie.data) == ("postgresql@17-main", "/var/lib/postgresql/17/main")
    for listing in ("", PG_LISTING + PG_LISTING.replace("main", "other"), "15 main\n"):
        with pytest.raises(SystemExit, match="expected one PostgreSQL cluster"):
            PgCluster.parse(listing)


def test_postgresql_is_checked_on_rows_spread_over_the_table() -> None:
    good = FakePostgresGuest("running\nactive\n", "26|0\n10000\n")
    check_postgresql(good, 10_000_000, "stock")  # type: ignore[arg-type]
    assert "systemctl is-active postgresql@15-main" in good.commands[1]
    query = good.commands[-1]
    assert "su postgres -c" in query and "psql -tAc" in query and " bench" in query
    # a row every 24th of the table (25 of them), the last one, and 10,000 from the middle
    assert "aid IN (1, 416667, " in query and ", 10000000)" in query
    assert "BETWEEN 5000000 AND 5009999" in query
    with pytest.raises(SystemExit, match="not pgbench's"):
        check_postgresql(FakePostgresGuest("running\nactive\n", "25|0\n10000\n"),  # type: ignore[arg-type]
                         10_000_000, "stock")
    with pytest.raises(SystemExit, match="systemd/PostgreSQL say"):
        check_postgresql(FakePostgresGuest("degraded\nactive\n", ""),  # type: ignore[arg-type]
                         10_000_000, "stock")
