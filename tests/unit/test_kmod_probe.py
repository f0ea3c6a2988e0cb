"""tests/e2e/kmod_probe.py: the e2e tests' own reader of what softpage.ko publishes decodes what
softpage.bitmap encodes, through a fake grant table (header page, one list page, bitmap pages),
and the script shipped to dom0 carries softpage.abi's layout."""

from __future__ import annotations

import pytest

from softpage import abi, bitmap
from softpage.pfnset import PfnSet
from softpage.snapshot import SnapshotState, SoftSnapshot
from tests.e2e import kmod_probe

NR_PFNS = 40_000  # two bitmap pages per category, the second one partly beyond nr_pfns
HEADER_REF, LIST_REF, FIRST_BITMAP_REF = 7, 8, 100


def snapshot() -> SoftSnapshot:
    def members(*pfns: int) -> PfnSet:
        return PfnSet.from_pfns(NR_PFNS, list(pfns))

    return SoftSnapshot(
        state=SnapshotState.FINAL, generation=10, request_id=42, flags=abi.FLAG_INIT_ON_FREE,
        guest_nr_pfns=NR_PFNS, scan_ns=123_456, free=members(0, 1, 32_768, NR_PFNS - 1),
        cache=members(3, 5000), slab=members(39_000), held=members(8, 9, 10),
    )


def grant_table(published: bytes, frames_per_category: int) -> dict[int, bytes]:
    """The pages a guest grants for ``published`` (``bitmap.encode``'s header page, then the
    bitmap pages), with one list page naming the bitmap pages' refs."""
    page = abi.PAGE_SIZE
    bitmaps = [published[page * (1 + index): page * (2 + index)]
               for index in range(abi.NR_CATEGORIES * frames_per_category)]
    refs = [FIRST_BITMAP_REF + index for index in range(len(bitmaps))]
    list_page = abi.LIST_FRAME.pack(*refs, *([0] * (abi.REFS_PER_LIST_FRAME - len(refs))))
    return {HEADER_REF: published[:page], LIST_REF: list_page,
            **{ref: data for ref, data in zip(refs, bitmaps, strict=True)}}


@pytest.fixture
def granted(monkeypatch: pytest.MonkeyPatch) -> dict[int, bytes]:
    frames_per_category = abi.frames_per_category(NR_PFNS)
    table = grant_table(bitmap.encode(snapshot(), list_grefs=[LIST_REF]), frames_per_category)

    def map_and_copy(domid: int, refs: list[int]) -> bytes:
        assert domid == 5
        return b"".join(table[ref] for ref in refs)

    monkeypatch.setattr(kmod_probe, "_dom0_map_and_copy", map_and_copy)
    return table


def test_the_probe_decodes_what_the_library_encodes(granted: dict[int, bytes]) -> None:
    decoded = kmod_probe._dom0_snapshot(5, HEADER_REF)
    expected = snapshot()
    counts = [expected.free.count(), expected.cache.count(), expected.slab.count(), expected.held.count()]
    assert decoded["state"] == abi.STATE_FINAL and decoded["request_id"] == 42
    assert decoded["generation"] == 10 and decoded["flags"] == abi.FLAG_INIT_ON_FREE
    assert decoded["nr_pfns"] == NR_PFNS and decoded["scan_ns"] == 123_456
    assert decoded["frames_per_category"] == 2 and decoded["nr_list_frames"] == 1
    assert decoded["count"] == counts and decoded["popcount"] == counts
    assert decoded["bits_beyond_nr_pfns"] == 0
    assert decoded["reserved_nonzero"] == 0 and decoded["list_tail_nonzero"] == 0


def test_the_probe_sees_reserved_words_and_bits_beyond_nr_pfns(granted: dict[int, bytes]) -> None:
    header = bytearray(granted[HEADER_REF])
    header[abi.HEADER_FIELDS[12][1]] = 1  # the first reserved word
    granted[HEADER_REF] = bytes(header)
    last_free_page = bytearray(granted[FIRST_BITMAP_REF + 1])
    last_free_page[-1] = 0x80  # PFN 65535 of FREE: beyond nr_pfns
    granted[FIRST_BITMAP_REF + 1] = bytes(last_free_page)
    decoded = kmod_probe._dom0_snapshot(5, HEADER_REF)
    assert decoded["reserved_nonzero"] == 1 and decoded["bits_beyond_nr_pfns"] == 1


def test_the_probe_refuses_another_header(granted: dict[int, bytes]) -> None:
    granted[HEADER_REF] = abi.HEADER.pack(*[0] * len(abi.HEADER.unpack(bytes(abi.HEADER.size)))) \
        + bytes(abi.PAGE_SIZE - abi.HEADER.size)
    with pytest.raises(ValueError, match="bad header: magic 0x0"):
        kmod_probe._dom0_snapshot(5, HEADER_REF)


def test_the_dom0_script_carries_the_abi() -> None:
    script = kmod_probe.probe_script()
    namespace: dict[str, object] = {}
    exec(compile(script.replace("_dom0_main(sys.argv[1:])", ""), "kmod_probe", "exec"), namespace)
    assert namespace["SOFTPAGE_HEADER"] == abi.HEADER.format
    assert namespace["SOFTPAGE_HEADER_SIZE"] == abi.HEADER.size == 512
    assert namespace["SOFTPAGE_FIELD"] == {"magic": 0, "version": 1, "header_size": 2, "flags": 3, "state": 4,
                                           "generation": 5, "request_id": 6, "nr_pfns": 7,
                                           "frames_per_category": 8, "nr_list_frames": 9, "count": 10,
                                           "scan_ns": 14, "reserved": 15, "list_gref": 36}
    assert namespace["SOFTPAGE_DIR"] == abi.XS_DIR
    assert namespace["SOFTPAGE_KEYS"] == kmod_probe.SOFTPAGE_KEYS
    assert abi.XS_PRUNE_CACHE in kmod_probe.SOFTPAGE_KEYS
