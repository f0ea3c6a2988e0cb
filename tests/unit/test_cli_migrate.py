"""``softpage migrate`` / ``save`` options and statistics that need no Xen: ``--drop-timeout``,
``--prune`` and its cache mode, and what an HVM guest is handed to (``xl`` with the save helper)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import softpage
from softpage import toolstack
from softpage.backend import DropOutcome
from softpage.categories import CacheMode, Category
from softpage.cli import save_helper
from softpage.cli.main import _modules_needed, build_parser
from softpage.cli.migrate import (
    DEFAULT_PRUNE,
    Timeline,
    _totals,
    driver_options,
    helper_options,
    summary,
)
from softpage.driver import MigrationStats
from softpage.errors import SoftpageError
from softpage.options import DriverOptions
from softpage.toolstack import ListedDomain


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


def test_totals_andsummary_report_the_first_drop() -> None:
    stats = MigrationStats(domid=3, first_drop_s=20.8049, first_drop_outcome=DropOutcome.DONE,
                           guest_drop_s=1.5, guest_drop_outcome=DropOutcome.DONE)
    totals = json.loads(json.dumps(_totals(stats, 0, 10.0, 0.5)))
    assert (totals["first_drop_s"], totals["first_drop_outcome"]) == (20.805, "done")
    assert "cold cache dropped first 20.80 s, early cache drop 1.50 s" in summary(stats, 0, 10.0, 0.5)


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
    assert totals["first_drop_s"] is None and totals["first_drop_outcome"] is None
    assert "early cache drop" not in summary(stats, 0, 10.0, None)
    assert "dropped first" not in summary(stats, 0, 10.0, None)


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



@pytest.mark.parametrize(
    "options",
    [[], ["--no-prune"], ["--prune", "cache,free", "--stats", "/tmp/a b.json", "-q"],
     ["--prune", "cache=all,slab"],
     ["--drop-timeout", "0", "--max-iters", "3", "--dirty-target", "17", "--snapshot-timeout", "2.5"]],
)
def test_an_hvm_guests_options_reach_the_save_helper_unchanged(
    options: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ``softpage migrate`` hands to ``xl`` + the helper for an HVM guest is what the helper
    parses back into the same driver options."""
    argv = ["migrate", *options, "guest", "host"]
    args = build_parser(argv).parse_args(argv)
    monkeypatch.setenv(save_helper.OPTIONS_VARIABLE, helper_options(args))
    helper_args, helper_driver_options = save_helper._options(live=True)
    assert helper_driver_options == driver_options(args, live=True)
    assert (helper_args.stats, helper_args.quiet) == (args.stats, args.quiet)


@pytest.mark.parametrize(
    ("argv", "xl_arguments"),
    [(["migrate", "-s", "", "hvm1", "xl migrate-receive"],
      ["migrate", "-s", "", "hvm1", "xl migrate-receive"]),
     (["migrate", "-D", "hvm1", "host-b"], ["migrate", "-s", "ssh", "-D", "hvm1", "host-b"]),
     (["save", "-c", "hvm1", "/tmp/img"], ["save", "-c", "hvm1", "/tmp/img"])],
)
def test_an_hvm_guest_goes_to_xl_with_softpages_save_helper(
    argv: list[str], xl_arguments: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    helper = tmp_path / save_helper.PROGRAM
    helper.write_text("#!/bin/sh\n")
    helper.chmod(0o755)
    monkeypatch.setattr(save_helper, "DEBIAN_LIBDIR", str(tmp_path))
    listed = ListedDomain(domid=5, name="hvm1", uuid="0" * 8 + "-0000-0000-0000-" + "0" * 12,
                          config={"c_info": {"type": "hvm", "name": "hvm1"}})
    monkeypatch.setattr(toolstack, "list_domain", lambda spec: listed)
    exec_calls: list[tuple[str, list[str], dict[str, str]]] = []

    def fake_exec(file: str, command: list[str], environment: dict[str, str]) -> None:
        exec_calls.append((file, command, environment))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execvpe", fake_exec)
    args = build_parser(argv).parse_args(argv)
    with pytest.raises(SystemExit):
        args.func(args)
    [(file, command, environment)] = exec_calls
    assert (file, command) == ("xl", ["xl", *xl_arguments])
    assert environment["LIBXL_SAVE_HELPER"] == str(helper)
    assert environment[save_helper.OPTIONS_VARIABLE].startswith("--prune free,cache=cold,slab")
    assert "hvm1 is an HVM guest" in capsys.readouterr().err


def test_no_installed_save_helper_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(save_helper, "DEBIAN_LIBDIR", str(tmp_path))
    monkeypatch.setattr(sysconfig, "get_path", lambda name: str(tmp_path))
    monkeypatch.setattr(softpage, "__file__", str(tmp_path / "a" / "softpage" / "__init__.py"))
    with pytest.raises(SoftpageError, match="softpage-save-helper is not installed"):
        save_helper.executable()
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
