"""Decode and encode guest soft-page snapshots (docs/spec/bitmap-page.md).

A snapshot is what ``SoftPageChannel.read`` copies out of the granted pages,
and a dump file holds exactly one snapshot::

    SNAPSHOT     ::= HEADER_PAGE BITMAPS
    HEADER_PAGE  ::= HEADER ZERO{4096 - 512}
    HEADER       ::= struct softpage_header          512 octets, little-endian (abi.HEADER)
    BITMAPS      ::= BITMAP(FREE) BITMAP(CACHE) BITMAP(SLAB) BITMAP(HELD)
    BITMAP(cat)  ::= PAGE{frames_per_category}       PFN p is bit p of the concatenation
    PAGE         ::= OCTET{4096}                     bit n is bit (n % 8) of octet (n // 8)

    frames_per_category = ceil(nr_pfns / 32768); bits at or beyond nr_pfns are zero;
    count[cat] = number of bits set in BITMAP(cat); HELD is empty unless state = FINAL.

The list pages of the spec are a transport detail of the channel and are not
part of a snapshot; only their number, ``nr_list_frames``, and the unused
``list_gref`` entries are checked here.

Everything in a snapshot comes from the guest and is untrusted: ``decode``
checks rules R1 to R19 of the spec (section 11), in that order, and raises
``BitmapError`` ("<field>: expected X, got Y") for the first one broken. It
allocates only in proportion to the caller's ``p2m_size`` and to the input's
own length, and only once the header's sizes have been checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import BinaryIO, Final

import numpy as np
import numpy.typing as npt

from softpage import abi
from softpage.categories import Category
from softpage.errors import BitmapError
from softpage.pfnset import PfnSet
from softpage.snapshot import SnapshotState, SoftSnapshot

BytesLike = bytes | bytearray | memoryview
Octets = npt.NDArray[np.uint8]

MAX_SNAPSHOT_SIZE: Final = abi.PAGE_SIZE * (1 + abi.MAX_BITMAP_FRAMES)
"""The longest valid snapshot (64 list pages' worth of bitmap pages), 256 MiB + 4 KiB."""

_U64_LIMIT: Final = 1 << 64


# -- decoding -------------------------------------------------------------------
def decode(data: BytesLike, p2m_size: int) -> SoftSnapshot:
    """Validate a snapshot and return it with every set widened to ``p2m_size`` PFNs.

    ``p2m_size`` is dom0's own knowledge of the domain (trusted); the guest's
    ``nr_pfns`` must not exceed it. Raises ``BitmapError`` on any violation.
    """
    octets = np.frombuffer(data, dtype=np.uint8)
    if octets.size < abi.PAGE_SIZE:
        raise BitmapError(f"snapshot length: expected at least {abi.PAGE_SIZE} octets, got {octets.size}")
    header = abi.unpack_header(octets[: abi.HEADER.size].tobytes())
    _check_header(header, p2m_size)
    _check_zero_after_header(octets[abi.HEADER.size : abi.PAGE_SIZE])

    frames_per_cat = header.frames_per_category
    expected_size = abi.snapshot_size(frames_per_cat)
    if octets.size != expected_size:
        raise BitmapError(
            f"snapshot length: expected {expected_size} octets (header page and "
            f"{abi.NR_CATEGORIES} x {frames_per_cat} bitmap pages), got {octets.size}"
        )
    bitmaps = octets[abi.PAGE_SIZE :].reshape(abi.NR_CATEGORIES, frames_per_cat * abi.PAGE_SIZE)
    for category in Category:
        _check_no_bits_beyond(category, bitmaps[category], header.nr_pfns)
    free, cache, slab, held = (
        _decode_category(category, bitmaps[category], header, p2m_size) for category in Category
    )
    if header.state != abi.STATE_FINAL and held:
        raise BitmapError(
            f"held bitmap: expected empty outside state FINAL, got {held.count()} PFNs "
            f"in state {SnapshotState(header.state).name}"
        )
    return SoftSnapshot(
        state=SnapshotState(header.state),
        generation=header.generation,
        request_id=header.request_id,
        flags=header.flags,
        guest_nr_pfns=header.nr_pfns,
        scan_ns=header.scan_ns,
        free=free,
        cache=cache,
        slab=slab,
        held=held,
    )


def _check_header(header: abi.Header, p2m_size: int) -> None:
    """R2 to R14, in the spec's order; the sizes are bounded before anything is allocated."""
    if header.magic != abi.MAGIC:
        raise BitmapError(f"magic: expected {abi.MAGIC:#010x}, got {header.magic:#010x}")
    if header.version != abi.VERSION:
        raise BitmapError(f"version: expected {abi.VERSION} (the only one supported), got {header.version}")
    if header.header_size != abi.HEADER.size:
        raise BitmapError(f"header_size: expected {abi.HEADER.size}, got {header.header_size}")
    if header.flags & ~abi.FLAGS_KNOWN:
        raise BitmapError(
            f"flags: expected only bits of {abi.FLAGS_KNOWN:#x}, got {header.flags:#x} "
            f"(unknown {header.flags & ~abi.FLAGS_KNOWN:#x})"
        )
    if header.state not in abi.KNOWN_STATES:
        raise BitmapError(f"state: expected one of {sorted(abi.KNOWN_STATES)}, got {header.state}")
    if header.generation % 2:
        raise BitmapError(
            f"generation: expected an even value (a stable snapshot), got {header.generation} "
            "(odd: the guest was writing, the copy is torn)"
        )
    for index, value in enumerate(header.reserved):
        if value:
            raise BitmapError(f"reserved[{index}]: expected 0, got {value:#x}")
    if header.nr_pfns == 0:
        raise BitmapError("nr_pfns: expected at least 1, got 0")
    if header.nr_pfns > p2m_size:
        raise BitmapError(
            f"nr_pfns: expected at most {p2m_size} (the domain's p2m size), got {header.nr_pfns}"
        )
    if header.nr_list_frames > abi.MAX_LIST_FRAMES:
        raise BitmapError(
            f"nr_list_frames: expected at most {abi.MAX_LIST_FRAMES}, got {header.nr_list_frames}"
        )
    expected_frames = abi.frames_per_category(header.nr_pfns)
    if header.frames_per_category != expected_frames:
        raise BitmapError(
            f"frames_per_category: expected {expected_frames} for nr_pfns {header.nr_pfns}, "
            f"got {header.frames_per_category}"
        )
    expected_list_frames = abi.nr_list_frames(expected_frames)
    if header.nr_list_frames != expected_list_frames:
        raise BitmapError(
            f"nr_list_frames: expected {expected_list_frames} for frames_per_category "
            f"{expected_frames}, got {header.nr_list_frames}"
        )
    for index in range(header.nr_list_frames, abi.MAX_LIST_FRAMES):
        if header.list_gref[index]:
            raise BitmapError(
                f"list_gref[{index}]: expected 0 (beyond nr_list_frames {header.nr_list_frames}), "
                f"got {header.list_gref[index]}"
            )


def _check_zero_after_header(tail: Octets) -> None:
    """R15."""
    if tail.any():
        first = int(np.argmax(tail != 0))
        raise BitmapError(
            f"header page octet {abi.HEADER.size + first}: expected 0 after the header, "
            f"got {int(tail[first]):#04x}"
        )


def _check_no_bits_beyond(category: Category, bitmap: Octets, nr_pfns: int) -> None:
    """R17."""
    stray = _first_set_bit_from(bitmap, nr_pfns)
    if stray is not None:
        name = category.name.lower()
        raise BitmapError(f"{name} bitmap: expected no bits at or beyond nr_pfns {nr_pfns}, got PFN {stray}")


def _decode_category(category: Category, bitmap: Octets, header: abi.Header, p2m_size: int) -> PfnSet:
    """The category's set in the universe ``p2m_size``, checked against its ``count`` (R18)."""
    # Every set bit is below nr_pfns <= p2m_size, so the used octets fit the wider set.
    used_octets = (header.nr_pfns + 7) // 8
    widened = np.zeros(-(-p2m_size // 64) * 8, dtype=np.uint8)
    widened[:used_octets] = bitmap[:used_octets]
    members = PfnSet(p2m_size, widened.view(np.dtype("<u8")).astype(np.uint64))
    claimed = header.count[category]
    actual = members.count()
    if claimed != actual:
        raise BitmapError(
            f"count[{int(category)}] ({category.name.lower()}): expected {actual} (bits set), got {claimed}"
        )
    return members


def _first_set_bit_from(octets: Octets, start_bit: int) -> int | None:
    """The lowest set bit numbered ``start_bit`` or more, in little-endian bit order."""
    first_octet = start_bit // 8
    if first_octet >= octets.size:
        return None
    partial = int(octets[first_octet]) & (0xFF << (start_bit % 8)) & 0xFF
    if partial:
        return first_octet * 8 + _lowest_bit(partial)
    rest = octets[first_octet + 1 :]
    if not rest.any():
        return None
    index = first_octet + 1 + int(np.argmax(rest != 0))
    return index * 8 + _lowest_bit(int(octets[index]))


def _lowest_bit(value: int) -> int:
    return (value & -value).bit_length() - 1


# -- encoding -------------------------------------------------------------------
def encode(snapshot: SoftSnapshot, list_grefs: Sequence[int] = ()) -> bytes:
    """The snapshot octets a guest would publish for ``snapshot``; ``decode``'s inverse.

    ``count[]`` and the sizes are derived from the sets. ``list_grefs`` fills
    ``list_gref[]`` (a guest model's grant references; zeros if omitted) and
    may not be longer than ``nr_list_frames``. Raises ``BitmapError`` if the
    result would break a decoder rule, so whatever this returns decodes.
    """
    nr_pfns = snapshot.guest_nr_pfns
    frames_per_cat = abi.frames_per_category(nr_pfns)
    list_frames = abi.nr_list_frames(frames_per_cat)
    _check_encodable(snapshot, list_frames, list_grefs)

    category_sets = [snapshot.category(category) for category in Category]
    header = abi.Header(
        magic=abi.MAGIC,
        version=abi.VERSION,
        header_size=abi.HEADER.size,
        flags=snapshot.flags,
        state=int(snapshot.state),
        generation=snapshot.generation,
        request_id=snapshot.request_id,
        nr_pfns=nr_pfns,
        frames_per_category=frames_per_cat,
        nr_list_frames=list_frames,
        count=tuple(members.count() for members in category_sets),
        scan_ns=snapshot.scan_ns,
        reserved=(0,) * 21,
        list_gref=tuple(list_grefs) + (0,) * (abi.MAX_LIST_FRAMES - len(list_grefs)),
    )
    pages = np.zeros(abi.snapshot_size(frames_per_cat), dtype=np.uint8)
    pages[: abi.HEADER.size] = np.frombuffer(abi.pack_header(header), dtype=np.uint8)
    bitmaps = pages[abi.PAGE_SIZE :].reshape(abi.NR_CATEGORIES, frames_per_cat * abi.PAGE_SIZE)
    used_octets = (nr_pfns + 7) // 8
    for index, members in enumerate(category_sets):
        packed = np.frombuffer(members.to_bytes(), dtype=np.uint8)[:used_octets]
        bitmaps[index, : packed.size] = packed
    return pages.tobytes()


def _check_encodable(snapshot: SoftSnapshot, list_frames: int, list_grefs: Sequence[int]) -> None:
    nr_pfns = snapshot.guest_nr_pfns
    if not 1 <= nr_pfns <= abi.MAX_NR_PFNS:
        raise BitmapError(f"guest_nr_pfns: expected 1..{abi.MAX_NR_PFNS}, got {nr_pfns}")
    if snapshot.generation % 2 or not 0 <= snapshot.generation < _U64_LIMIT:
        raise BitmapError(f"generation: expected an even 64-bit value, got {snapshot.generation}")
    for field_name in ("request_id", "scan_ns"):
        value = getattr(snapshot, field_name)
        if not 0 <= value < _U64_LIMIT:
            raise BitmapError(f"{field_name}: expected a 64-bit value, got {value}")
    if snapshot.flags & ~abi.FLAGS_KNOWN or snapshot.flags < 0:
        raise BitmapError(f"flags: expected only bits of {abi.FLAGS_KNOWN:#x}, got {snapshot.flags:#x}")
    if len(list_grefs) > list_frames:
        raise BitmapError(
            f"list_grefs: expected at most {list_frames} (nr_list_frames), got {len(list_grefs)}"
        )
    for index, gref in enumerate(list_grefs):
        if not 0 <= gref < 1 << 32:
            raise BitmapError(f"list_grefs[{index}]: expected a 32-bit grant reference, got {gref}")
    for category in Category:
        members = snapshot.category(category)
        stray = _first_set_bit_from(np.frombuffer(members.to_bytes(), dtype=np.uint8), nr_pfns)
        if stray is not None:
            raise BitmapError(
                f"{category.name.lower()} set: expected PFNs below guest_nr_pfns {nr_pfns}, got {stray}"
            )
    if snapshot.state != SnapshotState.FINAL and snapshot.held:
        raise BitmapError(f"held set: expected empty outside state FINAL, got {snapshot.held.count()} PFNs")


# -- dump files -------------------------------------------------------------------
def loads(data: BytesLike, p2m_size: int | None = None) -> SoftSnapshot:
    """Decode a dump; ``p2m_size`` defaults to the dump's own ``nr_pfns``."""
    if p2m_size is None:
        p2m_size = _claimed_nr_pfns(data)
    return decode(data, p2m_size)


def load(file: BinaryIO, p2m_size: int | None = None) -> SoftSnapshot:
    """Read and decode a dump from a binary file; never reads more than one valid snapshot can need."""
    data = file.read(MAX_SNAPSHOT_SIZE + 1)
    if len(data) > MAX_SNAPSHOT_SIZE:
        raise BitmapError(f"snapshot length: expected at most {MAX_SNAPSHOT_SIZE} octets, got more")
    return loads(data, p2m_size)


def dumps(snapshot: SoftSnapshot, list_grefs: Sequence[int] = ()) -> bytes:
    """The dump of ``snapshot``: exactly ``encode``'s octets."""
    return encode(snapshot, list_grefs)


def dump(snapshot: SoftSnapshot, file: BinaryIO, list_grefs: Sequence[int] = ()) -> None:
    file.write(dumps(snapshot, list_grefs))


def _claimed_nr_pfns(data: BytesLike) -> int:
    """The header's ``nr_pfns`` if there is a header; ``decode`` rejects a short input itself."""
    view = memoryview(data).cast("B")
    if view.nbytes < abi.HEADER.size:
        return 0
    return abi.unpack_header(view[: abi.HEADER.size]).nr_pfns
