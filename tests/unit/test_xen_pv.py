"""softpage.xen.pv on made-up machine memory: the walk to a 64-bit PV guest's linear p2m, the
reverse lookup, and page-table normalisation (mfn -> pfn), against what libxenguest does."""

from __future__ import annotations

import numpy as np
import pytest

from softpage.errors import BackendError
from softpage.xen.pv import (
    INVALID_MFN,
    L1TAB,
    L2TAB,
    L4TAB,
    PAGE_SIZE,
    XEN_SLOTS_L4,
    GuestP2m,
    PageTableError,
    normalise_pagetable,
    read_p2m,
)

MAX_MFN = 0x10_0000
PRESENT_RW_USER = 0x7
NX = 1 << 63


def guest_mfn(pfn: int) -> int:
    """Scrambled but one-to-one, as a real guest's frames are."""
    return 0x8_0000 + (pfn * 7919) % 0x4_0000


class Machine:
    """Machine frames by number; unset frames read as zeroes."""

    def __init__(self) -> None:
        self.frames: dict[int, np.ndarray] = {}
        self.next_table = 0x2000

    def table(self) -> tuple[int, np.ndarray]:
        mfn, self.next_table = self.next_table, self.next_table + 1
        self.frames[mfn] = np.zeros(512, dtype=np.uint64)
        return mfn, self.frames[mfn]

    def map_frames(self, mfns: np.ndarray) -> bytes:
        return b"".join(self.frames.get(int(mfn), np.zeros(512, np.uint64)).tobytes() for mfn in mfns)


def pte(mfn: int, flags: int = PRESENT_RW_USER) -> int:
    return (mfn << 12) | flags


def build_guest(nr_pfns: int, p2m_vaddr: int, p2m_first_pfn: int) -> tuple[Machine, int, np.ndarray]:
    """A guest of ``nr_pfns`` whose p2m lives in its pfns from ``p2m_first_pfn`` on, mapped at
    ``p2m_vaddr`` by a four-level page table; returns the machine, p2m_cr3 and the p2m."""
    machine = Machine()
    p2m = np.array([guest_mfn(pfn) for pfn in range(nr_pfns)], dtype=np.uint64)
    nr_frames = (nr_pfns + 511) // 512
    l4_mfn, l4 = machine.table()
    for frame in range(nr_frames):
        leaf_mfn = int(p2m[p2m_first_pfn + frame])
        entries = np.full(512, INVALID_MFN, dtype=np.uint64)
        chunk = p2m[frame * 512:(frame + 1) * 512]
        entries[:chunk.size] = chunk
        machine.frames[leaf_mfn] = entries
        vaddr = p2m_vaddr + frame * PAGE_SIZE
        table = l4
        for level, shift in ((4, 39), (3, 30), (2, 21)):
            index = (vaddr >> shift) & 511
            if table[index] == 0:
                mfn, _ = machine.table()
                table[index] = pte(mfn)
            table = machine.frames[int(table[index]) >> 12 & 0xFF_FFFF_FFFF]
            del level
        table[(vaddr >> 12) & 511] = pte(leaf_mfn, PRESENT_RW_USER) | NX
    return machine, l4_mfn << 12, p2m


def test_the_walk_finds_a_p2m_that_crosses_an_l1_table() -> None:
    # Starts two frames before the end of an L1 table: the walk needs two L1 tables.
    vaddr = (5 << 39) | (7 << 30) | (9 << 21) | (510 << 12)
    machine, cr3, p2m = build_guest(2000, vaddr, p2m_first_pfn=100)
    found = read_p2m(machine.map_frames, cr3, vaddr, max_pfn=1999, generation=4, max_mfn=MAX_MFN)
    assert np.array_equal(found.mfns, p2m)
    assert found.max_pfn == 1999
    assert found.frame_pfns.tolist() == [100, 101, 102, 103]
    assert found.generation == 4


def test_the_walk_trims_a_p2m_whose_last_l2_entries_share_one_frame() -> None:
    """Linux maps the unused tail of its p2m to one shared "missing" table; libxenguest then
    lowers max_pfn to what the distinct entries cover."""
    vaddr = (5 << 39) | (7 << 30)
    machine, cr3, p2m = build_guest(512 * 512, vaddr, p2m_first_pfn=600)  # exactly one L1 table
    l2 = machine.frames[int(machine.frames[int(machine.frames[cr3 >> 12][5]) >> 12][7]) >> 12]
    shared_l1 = int(l2[0]) >> 12
    l2[1:4] = [pte(shared_l1 + 0x500)] * 3  # three more L2 entries, all naming one table
    found = read_p2m(machine.map_frames, cr3, vaddr, max_pfn=4 * 512 * 512 - 1, generation=0,
                     max_mfn=MAX_MFN)
    assert found.max_pfn == 512 * 512 - 1
    assert np.array_equal(found.mfns, p2m)


@pytest.mark.parametrize(
    ("cr3", "vaddr", "message"),
    [
        (0, 0x10_0000_0000, "no virtually mapped p2m"),
        ((MAX_MFN + 1) << 12, 0x10_0000_0000, "bad p2m_cr3"),
        (0x2000 << 12, 0xFFFF_8000_0000_0000, "bad virtual p2m range"),
        (0x2000 << 12, 0x0000_8000_0000_0000, "bad virtual p2m range"),
    ],
)
def test_the_walk_refuses_what_it_cannot_use(cr3: int, vaddr: int, message: str) -> None:
    with pytest.raises(BackendError, match=message):
        read_p2m(Machine().map_frames, cr3, vaddr, max_pfn=100, generation=0, max_mfn=MAX_MFN)


def test_a_p2m_entry_beyond_the_host_is_refused() -> None:
    vaddr = (5 << 39) | (7 << 30)
    machine, cr3, _ = build_guest(1000, vaddr, p2m_first_pfn=10)
    l4 = machine.frames[cr3 >> 12]
    l4[5] = pte(MAX_MFN + 7)
    with pytest.raises(BackendError, match=r"bad mfn .* at level 4"):
        read_p2m(machine.map_frames, cr3, vaddr, max_pfn=999, generation=0, max_mfn=MAX_MFN)


def small_p2m() -> GuestP2m:
    mfns = np.array([guest_mfn(pfn) for pfn in range(64)] + [INVALID_MFN], dtype=np.uint64)
    return GuestP2m.from_mfns(mfns, mfns[:1], generation=0)


def test_the_reverse_lookup_knows_only_the_guests_frames() -> None:
    p2m = small_p2m()
    pfns, known = p2m.pfns_of(np.array([guest_mfn(9), 0x1234, guest_mfn(0), INVALID_MFN], dtype=np.uint64))
    assert known.tolist() == [True, False, True, False]
    assert pfns[known].tolist() == [9, 0]


def test_a_p2m_naming_one_frame_twice_is_refused() -> None:
    mfns = np.array([guest_mfn(1), guest_mfn(2), guest_mfn(1)], dtype=np.uint64)
    with pytest.raises(BackendError, match="two pfns"):
        GuestP2m.from_mfns(mfns, mfns[:1], generation=0)


def test_normalising_an_l1_swaps_mfns_for_pfns_and_keeps_the_flags() -> None:
    p2m = small_p2m()
    table = np.zeros(512, dtype=np.uint64)
    table[0] = pte(guest_mfn(5)) | NX
    table[1] = pte(guest_mfn(63), 0x1)
    table[2] = 0x0000_0000_0012_3000  # not present: left as it is
    out = np.frombuffer(normalise_pagetable(table.tobytes(), L1TAB, p2m, strict=True), dtype=np.uint64)
    assert int(out[0]) == pte(5) | NX
    assert int(out[1]) == pte(63, 0x1)
    assert int(out[2]) == 0x0012_3000
    assert not out[3:].any()


def test_normalising_an_l4_clears_xens_slots() -> None:
    p2m = small_p2m()
    table = np.zeros(512, dtype=np.uint64)
    table[XEN_SLOTS_L4.start] = pte(0xDEAD)  # Xen's own mapping: not the guest's frame
    table[XEN_SLOTS_L4.stop - 1] = pte(0xBEEF)
    table[511] = pte(guest_mfn(7))
    out = np.frombuffer(normalise_pagetable(table.tobytes(), L4TAB, p2m, strict=True), dtype=np.uint64)
    assert not out[XEN_SLOTS_L4.start:XEN_SLOTS_L4.stop].any()
    assert int(out[511]) == pte(7)
    assert (XEN_SLOTS_L4.start, XEN_SLOTS_L4.stop) == (256, 272)  # slots 256..271, as libxenguest


def test_a_foreign_frame_defers_a_live_table_and_fails_a_suspended_one() -> None:
    p2m = small_p2m()
    table = np.zeros(512, dtype=np.uint64)
    table[3] = pte(0x1234)
    with pytest.raises(PageTableError, match=r"L1\[3\] names mfn 0x1234"):
        normalise_pagetable(table.tobytes(), L1TAB, p2m, strict=False)
    with pytest.raises(BackendError, match=r"L1\[3\] names mfn 0x1234") as raised:
        normalise_pagetable(table.tobytes(), L1TAB, p2m, strict=True)
    assert not isinstance(raised.value, PageTableError)


def test_a_superpage_cannot_be_migrated() -> None:
    table = np.zeros(512, dtype=np.uint64)
    table[8] = pte(guest_mfn(0), PRESENT_RW_USER | 0x80)
    with pytest.raises(BackendError, match="superpage"):
        normalise_pagetable(table.tobytes(), L2TAB, small_p2m(), strict=False)


class _SharedInfoOnly:
    """Just enough of XenCtrl and ForeignMemory for PvDomain to read a shared info page: any
    other frame it maps (the p2m) is recorded."""

    def __init__(self, max_pfn: int) -> None:
        from types import SimpleNamespace

        self.binding = SimpleNamespace(lib=SimpleNamespace(
            SOFTPAGE_SHINFO_MAX_PFN_OFFSET=8, SOFTPAGE_SHINFO_P2M_CR3_OFFSET=16,
            SOFTPAGE_SHINFO_P2M_VADDR_OFFSET=24, SOFTPAGE_SHINFO_P2M_GENERATION_OFFSET=32))
        self.page = bytearray(PAGE_SIZE)
        self.page[8:16] = (max_pfn + 1).to_bytes(8, "little")  # arch.max_pfn is a count
        self.mapped: list[list[int]] = []

    def guest_width(self, _domid: int) -> int:
        return 8

    def maximum_ram_page(self) -> int:
        return 1 << 20

    def map_readonly(self, _domid: int, mfns: object) -> object:
        from contextlib import nullcontext
        from types import SimpleNamespace

        self.mapped.append([int(mfn) for mfn in mfns])  # type: ignore[attr-defined]
        return nullcontext(SimpleNamespace(view=memoryview(self.page)))


def test_a_pv_guest_with_a_huge_max_pfn_is_refused_before_its_p2m_is_read() -> None:
    from softpage.xen.ctrl import DomainState
    from softpage.xen.pvdomain import PvDomain

    fake = _SharedInfoOnly(max_pfn=(1 << 36) - 1)
    state = DomainState(domid=4, flags=0, tot_pages=65536, max_pages=65792, nr_online_vcpus=1,
                        max_vcpu_id=0, emulation_flags=0, shared_info_frame=77)
    with pytest.raises(BackendError, match=r"p2m has 68719476736 entries .* at most 1376512"):
        PvDomain(fake, fake, state, p2m_limit=1376512)  # type: ignore[arg-type]
    assert fake.mapped == [[77]]  # the shared info page, and nothing of the p2m
