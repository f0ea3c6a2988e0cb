"""``softpage simulate``: the SonicMigration experiment on the simulator.

::

    softpage simulate [--memory-mib 2048] [--steps 0,250,...,2000] [--png OUT] [--csv OUT]
                      [--bandwidth-mbit 940] [--page-cpu-us 1.5] [--record-overhead-us 25] ...

A guest whose page cache fills its memory is migrated twice per user
allocation, with plain precopy and with soft-page pruning, through the real
driver, planner and policy on ``softpage.sim`` (not a formula). Migration
time, downtime and bytes come from the link model applied to what the driver
actually sent; every run is checked against the source (the safety
invariant) before it is reported.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from softpage.errors import MigrationError
from softpage.sim.experiment import (
    PAPER_PAGE_REDUCTION,
    PAPER_TIME_REDUCTION,
    GuestShape,
    MigrationOutcome,
    SweepPoint,
    sweep,
)
from softpage.sim.link import GIGABIT_ETHERNET_MBIT_S, LinkModel
from softpage.sim.workload import Workload

DEFAULT_STEPS = "0,250,500,750,1000,1250,1500,1750,2000"
TABLE_COLUMNS = (
    # (heading, width): numbers are right-aligned under their heading, as xl list does.
    ("User MB", 8),
    ("Pages precopy", 14),
    ("Pages pruned", 13),
    ("Fewer", 7),
    ("XALLOC", 8),
    ("Time precopy", 13),
    ("Time pruned", 12),
    ("Shorter", 8),
    ("Down pre", 9),
    ("Down pruned", 12),
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "simulate",
        help="plain precopy vs soft-page pruning on the simulator (SonicMigration's experiment)",
        description="Migrate a simulated guest whose page cache fills memory, with plain precopy and "
        "with soft-page pruning, for each user allocation, through the real driver and planner; "
        "report pages, migration time and downtime from a link model.",
    )
    guest = parser.add_argument_group("guest")
    guest.add_argument("--memory-mib", type=_positive_int, default=2048, help="guest memory (default 2048)")
    guest.add_argument("--steps", type=_steps, default=DEFAULT_STEPS, metavar="MB,MB,...",
                       help=f"user allocations to sweep (default {DEFAULT_STEPS})")
    guest.add_argument("--kernel-mib", type=_non_negative_int, default=GuestShape.kernel_mib,
                       help=f"unreclaimable kernel memory (default {GuestShape.kernel_mib})")
    guest.add_argument("--min-free-mib", type=_non_negative_int, default=GuestShape.min_free_mib,
                       help=f"free memory the page cache leaves (default {GuestShape.min_free_mib})")
    guest.add_argument("--dirty-rate", type=_non_negative_float, default=2000.0, metavar="PAGES_PER_S",
                       help="pages in use written per second during the migration (default 2000)")
    guest.add_argument("--churn-rate", type=_non_negative_float, default=200.0, metavar="PAGES_PER_S",
                       help="user pages freed and reallocated per second (default 200)")
    guest.add_argument("--seed", type=int, default=1, help="random seed of the guest model (default 1)")
    link = parser.add_argument_group("link model")
    defaults = LinkModel()
    link.add_argument("--bandwidth-mbit", type=_positive_float, default=GIGABIT_ETHERNET_MBIT_S,
                      help=f"goodput in Mbit/s (default {GIGABIT_ETHERNET_MBIT_S:g}, 1 GbE)")
    link.add_argument("--page-cpu-us", type=_non_negative_float, default=defaults.page_cpu_us,
                      help=f"sender CPU per data page, us (default {defaults.page_cpu_us:g})")
    link.add_argument("--entry-cpu-us", type=_non_negative_float, default=defaults.entry_cpu_us,
                      help=f"sender CPU per PAGE_DATA entry, us (default {defaults.entry_cpu_us:g})")
    link.add_argument("--record-overhead-us", type=_non_negative_float, default=defaults.record_overhead_us,
                      help=f"cost of one PAGE_DATA record, us (default {defaults.record_overhead_us:g})")
    link.add_argument("--round-overhead-ms", type=_non_negative_float, default=defaults.round_overhead_ms,
                      help=f"harvest and report round trip, ms (default {defaults.round_overhead_ms:g})")
    link.add_argument("--suspend-resume-ms", type=_non_negative_float, default=defaults.suspend_resume_ms,
                      help=f"downtime outside the final round, ms (default {defaults.suspend_resume_ms:g})")
    link.add_argument("--setup-s", type=_non_negative_float, default=defaults.setup_s,
                      help=f"handshake and destination setup, s (default {defaults.setup_s:g})")
    output = parser.add_argument_group("output")
    output.add_argument("--csv", type=Path, metavar="OUT", help="also write every run to a CSV file")
    output.add_argument("--png", type=Path, metavar="OUT", help="also plot pages and time to a PNG file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    shape = GuestShape(
        memory_mib=args.memory_mib,
        kernel_mib=args.kernel_mib,
        min_free_mib=args.min_free_mib,
    )
    link = LinkModel(
        bandwidth_mbit_s=args.bandwidth_mbit,
        page_cpu_us=args.page_cpu_us,
        entry_cpu_us=args.entry_cpu_us,
        record_overhead_us=args.record_overhead_us,
        round_overhead_ms=args.round_overhead_ms,
        suspend_resume_ms=args.suspend_resume_ms,
        setup_s=args.setup_s,
    )
    workload = Workload(dirty_pages_per_s=args.dirty_rate, churn_pages_per_s=args.churn_rate)
    out = sys.stdout
    print(f"Guest: {shape.memory_mib} MiB, page cache fills memory; link {link.bandwidth_mbit_s:g} Mbit/s; "
          f"guest writes {args.dirty_rate:g} pages/s", file=out)
    print(_table_header(), file=out)
    points = sweep(shape, args.steps, link, workload, seed=args.seed,
                   on_point=lambda point: print(_table_row(point), file=out, flush=True))
    _check_correct(points)
    print(file=out)
    _print_reference(points, out)
    if args.csv is not None:
        write_csv(points, args.csv)
    if args.png is not None:
        write_png(points, args.png, shape, link)
    return 0


# -- output ------------------------------------------------------------------------
def _table_header() -> str:
    return "".join(heading.rjust(width) if index else heading.ljust(width)
                   for index, (heading, width) in enumerate(TABLE_COLUMNS))


def _table_row(point: SweepPoint) -> str:
    precopy, pruned = point.precopy, point.pruned
    cells = (
        str(point.user_alloc_mib),
        str(precopy.pages_data),
        str(pruned.pages_data),
        f"{point.page_reduction:.1%}",
        str(pruned.pages_xalloc),
        f"{precopy.migration_s:.2f}s",
        f"{pruned.migration_s:.2f}s",
        f"{point.time_reduction:.1%}",
        f"{precopy.downtime_s * 1e3:.0f}ms",
        f"{pruned.downtime_s * 1e3:.0f}ms",
    )
    return "".join(cell.rjust(width) if index else cell.ljust(width)
                   for index, (cell, (_heading, width)) in enumerate(zip(cells, TABLE_COLUMNS, strict=True)))


def _print_reference(points: Sequence[SweepPoint], out: TextIO) -> None:
    first = points[0]
    print(f"SonicMigration (paper), 0 MB user allocation: {PAPER_TIME_REDUCTION:.1%} shorter migration, "
          f"{PAPER_PAGE_REDUCTION:.1%} fewer pages", file=out)
    print(f"simulated, {first.user_alloc_mib} MB user allocation: {first.time_reduction:.1%} shorter "
          f"migration, {first.page_reduction:.1%} fewer pages", file=out)


def _check_correct(points: Sequence[SweepPoint]) -> None:
    for point in points:
        for outcome in (point.precopy, point.pruned):
            if not outcome.correct:
                mode = "pruned" if outcome.pruned else "plain precopy"
                raise MigrationError(
                    f"simulated {mode} migration at {point.user_alloc_mib} MB left the destination wrong: "
                    f"{outcome.mismatched_pages} pages differ, {outcome.unpopulated_ram} RAM PFNs "
                    f"unpopulated, {outcome.populated_holes} holes populated"
                )


CSV_FIELDS = ("user_alloc_mib", "mode", "pages_data", "pages_xalloc", "wire_bytes", "migration_s",
              "downtime_s", "rounds")


def write_csv(points: Sequence[SweepPoint], path: Path) -> None:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(CSV_FIELDS)
        for point in points:
            for outcome in (point.precopy, point.pruned):
                writer.writerow(_csv_row(point.user_alloc_mib, outcome))


def _csv_row(user_alloc_mib: int, outcome: MigrationOutcome) -> list[str]:
    return [
        str(user_alloc_mib),
        "pruned" if outcome.pruned else "precopy",
        str(outcome.pages_data),
        str(outcome.pages_xalloc),
        str(outcome.wire_bytes),
        f"{outcome.migration_s:.6f}",
        f"{outcome.downtime_s:.6f}",
        str(len(outcome.rounds)),
    ]


def write_png(points: Sequence[SweepPoint], path: Path, shape: GuestShape, link: LinkModel) -> None:
    """Pages sent and migration time against the user allocation; matplotlib only here."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise OSError(f"--png needs matplotlib (pip install 'softpage[plot]'): {error}") from error
    allocations = [point.user_alloc_mib for point in points]
    figure = Figure(figsize=(10, 4), layout="constrained")
    pages_axes, time_axes = figure.subplots(1, 2)
    for label, attribute, marker in (("plain precopy", "precopy", "o"), ("soft-page pruning", "pruned", "s")):
        outcomes: list[MigrationOutcome] = [getattr(point, attribute) for point in points]
        pages_axes.plot(allocations, [outcome.pages_data for outcome in outcomes], marker=marker, label=label)
        time_axes.plot(allocations, [outcome.migration_s for outcome in outcomes], marker=marker, label=label)
    pages_axes.set(xlabel="user allocation (MB)", ylabel="pages sent with data", ylim=(0, None))
    time_axes.set(xlabel="user allocation (MB)", ylabel="migration time (s)", ylim=(0, None))
    for axes in (pages_axes, time_axes):
        axes.grid(True, alpha=0.3)
        axes.legend()
    figure.suptitle(f"{shape.memory_mib} MiB guest, page cache fills memory, "
                    f"{link.bandwidth_mbit_s:g} Mbit/s (simulated)")
    figure.savefig(path, format="png")


# -- argument types ----------------------------------------------------------------
def _steps(text: str) -> list[int]:
    try:
        steps = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated MB values, got {text!r}") from None
    if not steps or any(step < 0 for step in steps):
        raise argparse.ArgumentTypeError(f"expected one or more MB values >= 0, got {text!r}")
    return steps


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a value > 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a value >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a value > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a value >= 0, got {text}")
    return value
