"""The bitmap-page ABI, as docs/spec/bitmap-page.md defines it, in pure Python.

Every layout is declared once here as a ``struct.Struct`` with an explicit
little-endian byte order; the C owner of the same layout is
guest_kmod/uapi/softpage_abi.h. Dom0 may run without a C compiler, so nothing
here needs the compiled ``softpage._abi`` module; tests/unit/test_abi.py
checks every constant, size and field offset below against it.

``compiled_abi()`` is the one way to reach ``softpage._abi`` (tests and
tools that want the compiler's view); it refuses a module built for another
package version, as pyca/cryptography does.
"""

from __future__ import annotations

import importlib
import struct
from dataclasses import dataclass
from types import ModuleType
from typing import Final

import softpage

# -- constants (spec section 2, "Constants") ----------------------------------
MAGIC: Final = 0x47505353
"""``SOFTPAGE_MAGIC``: the octets "SSPG" in memory order."""
VERSION: Final = 1
PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT
"""The guest's page and Xen's (``XC_PAGE_SHIFT`` in xenctrl.h): one owner for every module."""
PFNS_PER_FRAME: Final = PAGE_SIZE * 8
"""Bits in one bitmap page."""
REFS_PER_LIST_FRAME: Final = PAGE_SIZE // 4
"""uint32_t grant references in one list page."""
MAX_LIST_FRAMES: Final = 64

CAT_FREE: Final = 0
CAT_CACHE: Final = 1
CAT_SLAB: Final = 2
CAT_HELD: Final = 3
NR_CATEGORIES: Final = 4

STATE_EMPTY: Final = 0
STATE_SNAPSHOT: Final = 1
STATE_FINAL: Final = 2
KNOWN_STATES: Final = frozenset({STATE_EMPTY, STATE_SNAPSHOT, STATE_FINAL})

FLAG_INIT_ON_FREE: Final = 0x1
FLAG_PAGE_POISON: Final = 0x2
FLAG_HOLD_SHORT: Final = 0x4
FLAG_HELD_REINIT: Final = 0x8
FLAGS_KNOWN: Final = 0xF
FLAG_NAMES: Final = (
    (FLAG_INIT_ON_FREE, "init_on_free"),
    (FLAG_PAGE_POISON, "page_poison"),
    (FLAG_HOLD_SHORT, "hold_short"),
    (FLAG_HELD_REINIT, "held_reinit"),
)
FREE_CONTENTS_FLAGS: Final = FLAG_INIT_ON_FREE | FLAG_PAGE_POISON
"""The guest's allocator trusts what a free page holds (zero, or the poison pattern)."""

# -- xenstore keys (docs/spec/guest-protocol.md, "Xenstore keys"; SOFTPAGE_XS_* of the header) --
XS_DIR: Final = "data/softpage"
"""The guest's directory, under its own home ``/local/domain/<domid>``."""
XS_VERSION: Final = "version"
XS_HEADER_GREF: Final = "header-gref"
XS_EVENT_CHANNEL: Final = "event-channel"
XS_STATE: Final = "state"
XS_REQUEST: Final = "request"
XS_ARMED: Final = "armed"
XS_FEATURE_DROP: Final = "feature-drop"
XS_DROP: Final = "drop"
XS_DROPPED: Final = "dropped"
XS_FEATURE_CACHE_COLD: Final = "feature-cache-cold"
"""``1``: the guest knows ``prune-cache``; absent: it reports and drops all clean cache."""
XS_PRUNE_CACHE: Final = "prune-cache"
"""Written by dom0: which page cache the guest reports soft and drops (``cold`` or ``all``)."""
XS_STATE_READY: Final = "ready"
XS_PRUNE_CACHE_COLD: Final = "cold"
XS_PRUNE_CACHE_ALL: Final = "all"

# -- limits (spec section 12, "Limits") -------------------------------------------
MAX_BITMAP_FRAMES: Final = MAX_LIST_FRAMES * REFS_PER_LIST_FRAME
"""Bitmap pages the list pages can name at most (all categories)."""
MAX_FRAMES_PER_CATEGORY: Final = MAX_BITMAP_FRAMES // NR_CATEGORIES
MAX_NR_PFNS: Final = MAX_FRAMES_PER_CATEGORY * PFNS_PER_FRAME
"""The largest ``nr_pfns`` a valid header can carry (2 TiB of 4 KiB pages)."""

# -- layouts (spec sections 4 to 7; the C owner is softpage_abi.h) ---------------
HEADER: Final = struct.Struct("<IHHIIQQQII4QQ21Q64I")
"""``struct softpage_header`` (spec section 4, "Header"): 512 octets at the start of the header page."""

HEADER_FIELDS: Final[tuple[tuple[str, int, int], ...]] = (
    # (name, offset, number of elements): the field table of spec section 4, in order.
    ("magic", 0, 1),
    ("version", 4, 1),
    ("header_size", 6, 1),
    ("flags", 8, 1),
    ("state", 12, 1),
    ("generation", 16, 1),
    ("request_id", 24, 1),
    ("nr_pfns", 32, 1),
    ("frames_per_category", 40, 1),
    ("nr_list_frames", 44, 1),
    ("count", 48, NR_CATEGORIES),
    ("scan_ns", 80, 1),
    ("reserved", 88, 21),
    ("list_gref", 256, MAX_LIST_FRAMES),
)


def _value_positions() -> dict[str, int]:
    positions, position = {}, 0
    for name, _offset, elements in HEADER_FIELDS:
        positions[name] = position
        position += elements
    return positions


HEADER_VALUE_INDEX: Final[dict[str, int]] = _value_positions()
"""Each header field's index among ``HEADER.unpack``'s flat values (its first, for an array)."""

GENERATION: Final = struct.Struct("<Q")
"""The generation word alone (spec section 9, "Publication"), for sequence-lock readers."""
GENERATION_OFFSET: Final = 16
REQUEST_ID: Final = struct.Struct("<Q")
"""The request id alone (spec section 4, "Header"): the word dom0 polls for the id it wrote."""
REQUEST_ID_OFFSET: Final = 24

LIST_FRAME: Final = struct.Struct(f"<{REFS_PER_LIST_FRAME}I")
"""One list page (spec section 6, "List pages"): grant references of bitmap pages."""


@dataclass(frozen=True)
class Header:
    """``struct softpage_header`` unpacked; array fields are tuples. Not validated.

    Attributes are in ``HEADER_FIELDS`` order and carry the C field names.
    """

    magic: int
    version: int
    header_size: int
    flags: int
    state: int
    generation: int
    request_id: int
    nr_pfns: int
    frames_per_category: int
    nr_list_frames: int
    count: tuple[int, ...]
    scan_ns: int
    reserved: tuple[int, ...]
    list_gref: tuple[int, ...]


def unpack_header(buffer: bytes | bytearray | memoryview) -> Header:
    """Split the first ``HEADER.size`` octets of ``buffer`` into fields.

    Raises ``struct.error`` if ``buffer`` is shorter; callers facing
    untrusted input check the length first (``bitmap.decode`` does).
    """
    flat = HEADER.unpack_from(buffer)
    values: dict[str, int | tuple[int, ...]] = {}
    for name, _offset, elements in HEADER_FIELDS:
        position = HEADER_VALUE_INDEX[name]
        if elements == 1:
            values[name] = flat[position]
        else:
            values[name] = tuple(flat[position : position + elements])
    return Header(**values)  # type: ignore[arg-type]


def pack_header(header: Header) -> bytes:
    """The inverse of ``unpack_header``; raises ``struct.error`` on a value that does not fit."""
    flat: list[int] = []
    for name, _offset, elements in HEADER_FIELDS:
        value = getattr(header, name)
        if isinstance(value, tuple) != (elements > 1) or (elements > 1 and len(value) != elements):
            raise struct.error(f"header field {name}: expected {elements} element(s), got {value!r}")
        if isinstance(value, tuple):
            flat.extend(value)
        else:
            flat.append(value)
    return HEADER.pack(*flat)


def frames_per_category(nr_pfns: int) -> int:
    """Bitmap pages per category for ``nr_pfns`` PFNs: ``ceil(nr_pfns / PFNS_PER_FRAME)``."""
    return -(-nr_pfns // PFNS_PER_FRAME)


def nr_list_frames(frames_per_cat: int) -> int:
    """List pages needed to name every bitmap page: ``ceil(4 * fpc / REFS_PER_LIST_FRAME)``."""
    return -(-(NR_CATEGORIES * frames_per_cat) // REFS_PER_LIST_FRAME)


def snapshot_size(frames_per_cat: int) -> int:
    """Octets of a copied snapshot (``bitmap.decode``'s input): header page and bitmap pages."""
    return PAGE_SIZE * (1 + NR_CATEGORIES * frames_per_cat)


def flag_names(flags: int) -> list[str]:
    """Names of the known bits set in ``flags``; unknown bits as one hex item."""
    names = [name for bit, name in FLAG_NAMES if flags & bit]
    if flags & ~FLAGS_KNOWN:
        names.append(f"unknown:{flags & ~FLAGS_KNOWN:#x}")
    return names


def compiled_abi() -> ModuleType:
    """The compiled ``softpage._abi`` module (``.ffi``, ``.lib``), version-checked.

    Raises ``ImportError`` with a fix-it message if it is missing or was
    built for another package version (a stale ``.so`` in the checkout).
    """
    try:
        compiled = importlib.import_module("softpage._abi")
    except ImportError as error:
        raise ImportError(
            "softpage._abi is not built; run 'pip install -e .' in python/ of the softpage checkout"
        ) from error
    built_for = compiled.ffi.string(compiled.lib.SOFTPAGE_PACKAGE_VERSION).decode("ascii")
    if built_for != softpage.__version__:
        raise ImportError(
            f"softpage._abi was built for softpage {built_for}, but the package is "
            f"{softpage.__version__}: a stale shared object from an older build. "
            "Rebuild it with 'pip install -e .' in python/ of the softpage checkout "
            f"(loaded from {compiled.__file__})"
        )
    return compiled
