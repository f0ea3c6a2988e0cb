"""``softpage inspect``: look at a guest's soft-page snapshot (crit-style subcommands).

::

    softpage inspect info   --file DUMP [--p2m-size N]
    softpage inspect show   --file DUMP [--p2m-size N] [--width N] [--rows N] [--png OUT]
    softpage inspect decode --file DUMP [--p2m-size N]        (JSON: header and PFN ranges)

``--file -`` reads standard input. A dump file is exactly the octets
``SoftPageChannel.read`` returns (``softpage.bitmap.dump`` writes one).

Every view goes through ``inspect_snapshot(args, raw)``, which takes the raw
snapshot octets, so the live form (``softpage inspect DOM``: the raw octets
from ``SoftPageChannel.read_current()`` of a running domain, with the
domain's ``p2m_size``) adds a source and calls the same function; the
source arguments are in one group (``add_source_arguments``) for it to join.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

from softpage import abi, bitmap
from softpage.bitmap import BytesLike
from softpage.categories import PRUNABLE, Category
from softpage.errors import BitmapError, GuestProtocolError
from softpage.pfnset import PfnSet
from softpage.snapshot import SoftSnapshot

DEFAULT_WIDTH = 64
DEFAULT_ROWS = 32
PAGES_PER_MIB = (1 << 20) // abi.PAGE_SIZE


@dataclass(frozen=True)
class MapClass:
    symbol: str
    label: str
    color: str


# Index order is also the tie-break order of a run's majority vote: a run
# half held and half in use shows as held, the thing worth seeing.
MAP_CLASSES = (
    MapClass("H", "held by the module (FINAL)", "#d62728"),
    MapClass(".", "free", "#2ca02c"),
    MapClass("c", "clean page cache", "#1f77b4"),
    MapClass("s", "reclaimable slab", "#9467bd"),
    MapClass("#", "in use (not reported soft)", "#7f7f7f"),
    MapClass("~", "beyond the guest's nr_pfns", "#f3e9c6"),
)
_CLASS_OF_CATEGORY = ((Category.HELD, 0), (Category.FREE, 1), (Category.CACHE, 2), (Category.SLAB, 3))
_IN_USE = 4
_UNCOVERED = 5


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    inspect_parser = subparsers.add_parser(
        "inspect",
        help="show a guest's soft-page snapshot",
        description="Decode and show a soft-page snapshot (docs/spec/bitmap-page.md).",
    )
    views = inspect_parser.add_subparsers(dest="view", metavar="VIEW", required=True)

    info = views.add_parser("info", help="header fields and counts per category")
    add_source_arguments(info)
    info.set_defaults(func=_run_from_source, render=render_info)

    show = views.add_parser("show", help="a map of memory by category (text, optionally PNG)")
    add_source_arguments(show)
    show.add_argument("--width", type=_bounded_int(8, 1024), default=DEFAULT_WIDTH,
                      help=f"characters per map line (default {DEFAULT_WIDTH})")
    show.add_argument("--rows", type=_bounded_int(1, 4096), default=DEFAULT_ROWS,
                      help=f"at most this many map lines (default {DEFAULT_ROWS})")
    show.add_argument("--png", type=Path, metavar="OUT", help="also draw the map to a PNG file")
    show.set_defaults(func=_run_from_source, render=render_show)

    decode = views.add_parser("decode", help="the snapshot as JSON, each category as PFN ranges")
    add_source_arguments(decode)
    decode.set_defaults(func=_run_from_source, render=render_decode)


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the snapshot comes from: exactly one of the ``source`` options.

    The live form joins the group (e.g. ``--domain DOM``) and gets a branch
    in ``_run_from_source``; everything after the raw octets is shared.
    """
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", metavar="DUMP", help="a snapshot dump file, '-' for standard input")
    source.add_argument("--domain", metavar="DOM",
                        help="ask a running guest (name or id) for a fresh report; run in dom0")
    parser.add_argument("--no-request", action="store_true",
                        help="with --domain: show what the guest last published, without asking")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                        help="with --domain: how long to wait for the report (default 10)")
    parser.add_argument("--p2m-size", type=_bounded_int(1, 1 << 40), metavar="N",
                        help="widen the sets to N PFNs and check nr_pfns against it "
                        "(default: the snapshot's own nr_pfns)")


def _run_from_source(args: argparse.Namespace) -> int:
    if args.domain is not None:
        return inspect_snapshot(args, _read_live(args))
    return inspect_snapshot(args, read_dump(args.file))


def _read_live(args: argparse.Namespace) -> bytes:
    """The pages a running guest publishes, through the same channel a migration uses."""
    from softpage import toolstack  # dom0 only, like the bindings below
    from softpage.xen.backend import XenBackend

    domid = toolstack.domain_id(args.domain)
    backend = XenBackend(domid)
    try:
        channel = backend.soft_channel()
        if channel is None:
            reason = backend.channel_reason
            raise GuestProtocolError(f"domain {args.domain} publishes no soft pages: {reason}")
        if args.no_request:
            raw = channel.read_current()
        else:
            # A fresh report, asked for exactly as a migration round asks.
            request_id = time.time_ns()
            channel.request(request_id)
            raw = channel.read(request_id, args.timeout)
        if raw is None:
            raise GuestProtocolError(
                f"domain {args.domain}: no consistent report"
                + ("" if args.no_request else f" answering request {request_id} within {args.timeout:g} s")
            )
        if args.p2m_size is None:
            args.p2m_size = backend.describe().p2m_size
        return raw
    finally:
        backend.cleanup()


def inspect_snapshot(args: argparse.Namespace, raw: BytesLike) -> int:
    """Decode ``raw`` (a snapshot, from any source) and print the chosen view."""
    snapshot = bitmap.loads(raw, args.p2m_size)
    render: Callable[[SoftSnapshot, argparse.Namespace], str] = args.render
    print(render(snapshot, args), end="")
    return 0


def read_dump(path: str) -> bytes:
    """A dump's octets, read no further than the largest valid snapshot."""
    if path == "-":
        return _read_bounded(sys.stdin.buffer)
    with open(path, "rb") as dump_file:
        return _read_bounded(dump_file)


def _read_bounded(stream: BinaryIO) -> bytes:
    data = stream.read(bitmap.MAX_SNAPSHOT_SIZE + 1)
    if len(data) > bitmap.MAX_SNAPSHOT_SIZE:
        raise BitmapError(f"snapshot length: expected at most {bitmap.MAX_SNAPSHOT_SIZE} octets, got more")
    return data


# -- info -------------------------------------------------------------------------
def render_info(snapshot: SoftSnapshot, _args: argparse.Namespace) -> str:
    p2m_size = snapshot.free.nr_pfns
    flags = ", ".join(abi.flag_names(snapshot.flags)) or "none"
    lines = [
        f"magic        {abi.MAGIC:#010x} (SSPG)",
        f"version      {abi.VERSION}",
        f"state        {snapshot.state.name}",
        f"generation   {snapshot.generation}",
        f"request_id   {snapshot.request_id}",
        f"flags        {snapshot.flags:#x} ({flags})",
        f"nr_pfns      {snapshot.guest_nr_pfns} ({_mib(snapshot.guest_nr_pfns)} MiB)",
        f"p2m_size     {p2m_size}",
        f"scan_ns      {snapshot.scan_ns} ({snapshot.scan_ns / 1e6:.3f} ms)",
        "",
        f"{'category':<28} {'pages':>12} {'MiB':>12} {'of nr_pfns':>10}",
    ]
    rows = [(category.name.lower(), snapshot.category(category).count()) for category in Category]
    rows.append(("soft (free+cache+slab)", snapshot.soft(PRUNABLE).count()))
    for label, pages in rows:
        share = 100.0 * pages / snapshot.guest_nr_pfns
        lines.append(f"{label:<28} {pages:>12} {_mib(pages):>12} {share:>9.1f}%")
    return "\n".join(lines) + "\n"


def _mib(pages: int) -> str:
    return f"{pages / PAGES_PER_MIB:.1f}"


# -- decode -----------------------------------------------------------------------
def render_decode(snapshot: SoftSnapshot, _args: argparse.Namespace) -> str:
    """JSON for scripts; ranges are ``[first, last + 1)``, the way the stream batches PFNs."""
    document = {
        "state": snapshot.state.name,
        "generation": snapshot.generation,
        "request_id": snapshot.request_id,
        "flags": abi.flag_names(snapshot.flags),
        "nr_pfns": snapshot.guest_nr_pfns,
        "p2m_size": snapshot.free.nr_pfns,
        "scan_ns": snapshot.scan_ns,
        "categories": {
            category.name.lower(): {
                "count": snapshot.category(category).count(),
                "ranges": pfn_ranges(snapshot.category(category)),
            }
            for category in Category
        },
    }
    return json.dumps(document) + "\n"


def pfn_ranges(members: PfnSet) -> list[list[int]]:
    """Maximal runs of consecutive members as ``[start, end)`` pairs, in order."""
    pfns = members.to_pfns().astype(np.int64)
    if pfns.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(pfns) != 1) + 1
    starts = np.concatenate(([pfns[0]], pfns[breaks]))
    ends = np.concatenate((pfns[breaks - 1], [pfns[-1]])) + 1
    return [[int(start), int(end)] for start, end in zip(starts, ends, strict=True)]


# -- show -------------------------------------------------------------------------
def render_show(snapshot: SoftSnapshot, args: argparse.Namespace) -> str:
    width: int = args.width
    rows: int = args.rows
    pfns_per_cell = cell_size(snapshot.free.nr_pfns, width, rows)
    cells = classify_cells(snapshot, pfns_per_cell)
    if args.png is not None:
        write_png(cells, width, args.png, title=_map_title(snapshot, pfns_per_cell))
    return format_map(snapshot, cells, width, pfns_per_cell)


def _map_title(snapshot: SoftSnapshot, pfns_per_cell: int) -> str:
    return (
        f"state {snapshot.state.name}, generation {snapshot.generation}, "
        f"nr_pfns {snapshot.guest_nr_pfns}; 1 cell = {pfns_per_cell} PFNs"
    )


def cell_size(p2m_size: int, width: int, rows: int) -> int:
    """PFNs per map cell: the smallest power of two that fits the map in ``rows`` lines."""
    wanted = -(-p2m_size // (width * rows))
    return 1 << max(wanted - 1, 0).bit_length()


def classify_cells(snapshot: SoftSnapshot, pfns_per_cell: int) -> npt.NDArray[np.int8]:
    """The ``MAP_CLASSES`` index of each cell: the class most of its PFNs are in."""
    p2m_size = snapshot.free.nr_pfns
    nr_cells = -(-p2m_size // pfns_per_cell)
    votes = np.zeros((len(MAP_CLASSES), nr_cells), dtype=np.int64)
    for category, class_index in _CLASS_OF_CATEGORY:
        votes[class_index] = _members_per_cell(snapshot.category(category), pfns_per_cell, nr_cells)
    pfn_starts = np.arange(nr_cells, dtype=np.int64) * pfns_per_cell
    covered = np.clip(snapshot.guest_nr_pfns - pfn_starts, 0, pfns_per_cell)
    in_map = np.clip(p2m_size - pfn_starts, 0, pfns_per_cell)
    # A guest may report a page in two categories; in use is what no category claims.
    votes[_IN_USE] = np.maximum(covered - votes[: _IN_USE].sum(axis=0), 0)
    votes[_UNCOVERED] = in_map - covered
    winners: npt.NDArray[np.int8] = np.argmax(votes, axis=0).astype(np.int8)
    return winners


def _members_per_cell(members: PfnSet, pfns_per_cell: int, nr_cells: int) -> npt.NDArray[np.int64]:
    bits = np.unpackbits(members.words.view(np.uint8), bitorder="little")
    padded = np.zeros(nr_cells * pfns_per_cell, dtype=np.uint8)
    usable = min(bits.size, padded.size)
    padded[:usable] = bits[:usable]
    per_cell: npt.NDArray[np.int64] = padded.reshape(nr_cells, pfns_per_cell).sum(axis=1, dtype=np.int64)
    return per_cell


def format_map(snapshot: SoftSnapshot, cells: npt.NDArray[np.int8], width: int, pfns_per_cell: int) -> str:
    p2m_size = snapshot.free.nr_pfns
    symbols = np.array([map_class.symbol for map_class in MAP_CLASSES])[cells]
    address_digits = max(len(f"{p2m_size - 1:x}"), 1)
    lines = [
        f"state {snapshot.state.name}, generation {snapshot.generation}, request_id {snapshot.request_id}, "
        f"nr_pfns {snapshot.guest_nr_pfns}, p2m_size {p2m_size}",
        f"1 character = {pfns_per_cell} PFNs ({pfns_per_cell * abi.PAGE_SIZE // 1024} KiB), "
        "showing the class most of them are in",
        "",
    ]
    for start in range(0, cells.size, width):
        first_pfn = start * pfns_per_cell
        lines.append(f"{first_pfn:0{address_digits}x} {''.join(symbols[start : start + width])}")
    lines.append("")
    counts = {index: snapshot.category(category).count() for category, index in _CLASS_OF_CATEGORY}
    for index, map_class in enumerate(MAP_CLASSES):
        pages = counts.get(index)
        detail = f"{pages} pages, {_mib(pages)} MiB" if pages is not None else ""
        lines.append(f"  {map_class.symbol}  {map_class.label:<28} {detail}".rstrip())
    return "\n".join(lines) + "\n"


def write_png(cells: npt.NDArray[np.int8], width: int, path: Path, title: str) -> None:
    """Draw the cell map; matplotlib is imported only here (dom0 may not have it)."""
    try:
        from matplotlib.colors import ListedColormap
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as error:
        raise OSError(f"--png needs matplotlib (pip install 'softpage[plot]'): {error}") from error
    nr_rows = -(-cells.size // width)
    grid = np.full(nr_rows * width, -1, dtype=np.int16)
    grid[: cells.size] = cells
    image = np.ma.masked_less(grid.reshape(nr_rows, width), 0)
    colormap = ListedColormap([map_class.color for map_class in MAP_CLASSES])
    figure = Figure(figsize=(8, 2 + 6 * nr_rows / width), layout="constrained")
    axes = figure.add_subplot()
    axes.imshow(image, cmap=colormap, vmin=-0.5, vmax=len(MAP_CLASSES) - 0.5,
                interpolation="nearest", aspect="auto")
    axes.set_axis_off()
    axes.set_title(title, fontsize="small")
    handles = [Patch(facecolor=map_class.color, edgecolor="black", label=map_class.label)
               for map_class in MAP_CLASSES]
    figure.legend(handles=handles, loc="outside lower center", ncols=3, fontsize="small")
    figure.savefig(path, format="png")


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {low}..{high}, got {value}")
        return value

    return parse
