"""``softpage migrate`` / ``save`` options and statistics that need no Xen: ``--drop-timeout``,
``--prune`` and its cache mode."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from softpage.backend import DropOutcome
from softpage.categories import CacheMode, Category
from softpage.cli.main import _modules_needed, build_parser
from softpage.cli.migrate import (
    DEFAULT_PRUNE,
    Timeline,
    _totals,
    driver_options,
    summary,
)
from softpage.driver import MigrationStats
from softpage.options import DriverOptions


@pytest.mark.parametrize(
    ("argv", "live"),
    [(["migrate", "guest", "host"], True), (["save", "guest", "guest.save"], False)],
)
def test_drop_timeout_reaches_thedriver_options(argv: list[str], live: bool) -> None:
    parser = build_parser(argv)
    default = driver_options(parser.parse_args(argv), live)
    assert default.drop_timeout == DriverOptions().drop_timeout == 30.0
    command, *rest = argv
    off = driver_options(parser.parse_args([command, "--drop-timeout", "0", *rest]), live)
    assert off.drop_timeout == 0.0 and off.live is live


def test_totals_andsummary_report_the_early_drop() -> None:
    stats = MigrationStats(domid=3, guest_drop_s=4.2512, guest_drop_outcome=DropOutcome.TIMED_OUT)
    totals = json.loads(json.dumps(_totals(stats, 0, 10.0, 0.5)))
    assert (totals["guest_drop_s"], totals["guest_drop_outcome"]) == (4.251, "timed-out")
    assert totals["downtime_s"] == 0.5
    assert "downtime 0.50 s, early cache drop 4.25 s" in summary(stats, 0, 10.0, 0.5)


def test_totals_say_where_the_time_outside_the_migration_went() -> None:
    totals = _totals(MigrationStats(domid=3), 0, 10.0, None, Timeline(startup_s=2.34567, destroy_s=0.5))
    assert (totals["startup_s"], totals["destroy_s"]) == (2.346, 0.5)
    probe = ("import time; time.sleep(0.3); "
             "from softpage.cli.migrate import _process_age_s; print(_process_age_s())")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    age = float(done.stdout)
    assert 0.3 <= age < 30


def test_totals_andsummary_without_an_early_drop() -> None:
    stats = MigrationStats(domid=3)
    totals = _totals(stats, 0, 10.0, None)
    assert totals["guest_drop_s"] is None and totals["guest_drop_outcome"] is None
    assert "early cache drop" not in summary(stats, 0, 10.0, None)


def test_a_named_subcommand_loads_only_its_own_module() -> None:
    # the other modules import numpy, which costs seconds in an emulated dom0
    assert _modules_needed(["--debug", "migrate", "-s", "", "guest", "host"]) == ["softpage.cli.migrate"]
    assert _modules_needed(["save", "guest", "file"]) == ["softpage.cli.migrate"]
    everything = ["softpage.cli.inspect", "softpage.cli.simulate", "softpage.cli.migrate",
                  "softpage.cli.resume"]
    assert _modules_needed(["--help"]) == _modules_needed(["nonsense"]) == everything


def test_softpage_migrate_starts_without_numpy() -> None:
    probe = ("import sys; from softpage.cli.main import build_parser; build_parser(['migrate']); "
             "print('numpy' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_the_sender_loads_in_the_background() -> None:
    probe = ("import sys, threading; from softpage.cli.migrate import _load_sender_meanwhile; "
             "_load_sender_meanwhile(); "
             "[t.join(60) for t in threading.enumerate() if t.name == 'softpage-import']; "
             "print('softpage.sender' in sys.modules, 'numpy' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["True", "True"]



# -- --prune cache=cold|all ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("prune", "categories", "cache"),
    [
        (None, (Category.FREE, Category.CACHE, Category.SLAB), CacheMode.COLD),
        ("free,cache,slab", (Category.FREE, Category.CACHE, Category.SLAB), CacheMode.COLD),
        ("cache=cold", (Category.CACHE,), CacheMode.COLD),
        ("cache=all", (Category.CACHE,), CacheMode.ALL),
        ("free, cache=all ,slab", (Category.FREE, Category.CACHE, Category.SLAB), CacheMode.ALL),
        ("cache=all,cache", (Category.CACHE,), CacheMode.ALL),
        ("free", (Category.FREE,), CacheMode.COLD),
    ],
)
def test_prune_names_the_categories_and_the_cache_mode(
    prune: str | None, categories: tuple[Category, ...], cache: CacheMode
) -> None:
    argv = ["migrate", "guest", "host"] if prune is None else ["migrate", "--prune", prune, "guest", "host"]
    options = driver_options(build_parser(argv).parse_args(argv), True)
    assert (options.prune, options.cache) == (categories, cache)


def test_the_default_is_cache_cold() -> None:
    assert DriverOptions().cache is CacheMode.COLD
    assert DEFAULT_PRUNE.cache is CacheMode.COLD


@pytest.mark.parametrize(
    ("prune", "message"),
    [
        ("cache=warm", "expected cache=cold or cache=all, got mode 'warm'"),
        ("free=cold", "only cache takes a mode"),
        ("cache=cold,cache=all", "cache=cold and cache=all both given"),
        ("hot", "unknown category 'hot'"),
        (",", "expected at least one category"),
    ],
)
def test_a_bad_prune_list_is_a_usage_error(
    prune: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["migrate", "--prune", prune, "guest", "host"]
    with pytest.raises(SystemExit) as exited:
        build_parser(argv).parse_args(argv)
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_totals_report_the_cache_mode() -> None:
    assert _totals(MigrationStats(domid=3), 0, 1.0, None)["cache_mode"] is None
    stats = MigrationStats(domid=3, cache_mode=CacheMode.COLD)
    assert json.loads(json.dumps(_totals(stats, 0, 1.0, None)))["cache_mode"] == "cold"
