"""A simulated guest: memory, the kernel's page bookkeeping, and the softpage module.

Every PFN has a *kind* (what the guest kernel uses it for) and a *content
token*: a 64-bit value that stands for the page's bytes. Every write gives
the page a token never used before, so two pages hold the same content only if
one was copied from the other; ``SimBackend.read_pages`` puts the token and the
PFN in the first two words of the page it returns.

The module side follows docs/spec/guest-protocol.md: a request is answered by
a scan published in the real binary format (``bitmap.encode``). Right before
the suspend request dom0 may ask for an early drop: an armed module drops
clean cache and reclaimable slab while the guest still runs, and answers.
With ``prune-cache = cold`` it reports only the clean cache the guest does not
use (``hot`` marks the rest) and drops only what it reported and is still
cold, and no slab.
At an armed suspend the module drops them (again) in ``.freeze``; its
syscore suspend callback, the guest's last step before the suspend hypercall,
then publishes FINAL with every page free at that instant as HELD. Nothing can
allocate between that scan and the suspend, so held pages stay untouched until
the guest runs again. ``ReportBehaviour``, ``DropBehaviour`` and
``FinalBehaviour`` make it misbehave the ways a real guest can (late, lagging,
lying, malformed, silent, older).

Everything is vectorised over numpy arrays: a 2 GiB guest (524,288 PFNs) is
one ``uint64`` and one ``uint8`` array, and no operation loops over pages in
Python.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from softpage import abi, bitmap
from softpage.categories import CacheMode
from softpage.errors import BackendError
from softpage.pfnset import PfnArray, PfnSet
from softpage.snapshot import SnapshotState, SoftSnapshot

Mask = npt.NDArray[np.bool_]
Indexes = npt.NDArray[np.intp]

STRUCT_PAGES_PER_MEMMAP_PAGE = 64
"""A struct page is 64 bytes: one 4 KiB page of the kernel's memmap describes 64 PFNs."""
GuestActivity = Callable[["SimGuest"], None]
"""Guest work run at a point where a real guest would keep running (a hook)."""


class PageKind(enum.IntEnum):
    """What the guest kernel uses a PFN for."""

    HOLE = 0
    """Not RAM: typed XTAB, never named in the stream."""
    KERNEL = 1
    """Unreclaimable kernel memory."""
    FREE = 2
    CACHE = 3
    """Clean page cache (reported soft; dropped at freeze unless pinned)."""
    CACHE_DIRTY = 4
    """Page cache with unwritten changes: not soft."""
    SLAB = 5
    """Reclaimable slab."""
    ANON = 6
    """User allocations."""
    HELD = 7
    """Free at the module's last scan before the suspend, published as HELD:
    untouched until the guest runs again (thaw or restore)."""


class FreeContents(enum.Enum):
    """What the guest's allocator trusts a free page to hold: its boot options.

    The value is the content token every page gets when the kernel frees it, or None when the
    kernel writes nothing on free and trusts nothing (it zeroes on allocation where it must).
    """

    ANY = None
    """Neither option: a free page's content never matters."""
    ZERO = 0
    """``init_on_free=1``: freeing zeroes the page, and allocations, ``__GFP_ZERO`` ones
    included, trust it to be zero. Zero content is token 0, what a fresh page on the
    destination reads."""
    POISON = 0xAAAA_AAAA_AAAA_AAAA
    """``page_poison=1``: freeing fills the page with ``PAGE_POISON`` (0xaa), and allocation
    checks the pattern."""

    @property
    def flags(self) -> int:
        """The header flag the module publishes for it."""
        if self is FreeContents.ZERO:
            return abi.FLAG_INIT_ON_FREE
        if self is FreeContents.POISON:
            return abi.FLAG_PAGE_POISON
        return 0


class ReportBehaviour(enum.Enum):
    """How the module answers the next precopy request."""

    PROMPT = "prompt"
    """Scan after reading the request, publish with its id (the protocol)."""
    SILENT = "silent"
    """Publish nothing: dom0's read times out."""
    LAGGING = "lagging"
    """Publish the previous scan's sets under the new request id (a guest bug)."""
    OLD_REQUEST = "old-request"
    """Publish a fresh scan labelled with the previous request id."""
    LYING = "lying"
    """Answer the request but also call some in-use pages soft."""
    MALFORMED = "malformed"
    """Answer the request with bytes that break a decoder rule."""
    TORN = "torn"
    """Leave the generation odd (a writer that never finished)."""


class DropBehaviour(enum.Enum):
    """How the module answers dom0's early drop."""

    PROMPT = "prompt"
    """Drop if armed, then answer ``dropped`` with the id (the protocol)."""
    SILENT = "silent"
    """Advertise ``feature-drop`` but never drop nor answer: dom0's wait times out."""
    OLD_MODULE = "old-module"
    """A module from before the early drop: no ``feature-drop``, so dom0 does not ask."""


class FinalBehaviour(enum.Enum):
    """How the module behaves at an armed suspend."""

    PROMPT = "prompt"
    SILENT = "silent"
    """Drop caches but publish nothing (the FINAL read times out)."""
    STALE_REQUEST = "stale-request"
    """Publish FINAL labelled with an older request id."""
    LYING = "lying"
    """Claim in-use pages as held besides the really held ones."""
    MALFORMED = "malformed"


@dataclass(frozen=True)
class FinalReport:
    """What the guest published at suspend, as the oracle needs it."""

    request_id: int
    claimed_held: PfnSet
    well_formed: bool
    """The bytes decode (FINAL state, even generation, every rule kept)."""


_MALFORMATIONS = ("magic", "count", "stray-bit", "reserved", "flags")


class SimGuest:
    """Guest memory and kernel bookkeeping for one simulated domain."""

    def __init__(
        self,
        p2m_size: int,
        holes: PfnArray | None = None,
        seed: int = 0,
        free_contents: FreeContents = FreeContents.ANY,
    ) -> None:
        if p2m_size < 1:
            raise BackendError(f"p2m_size: expected at least 1, got {p2m_size}")
        self.p2m_size = p2m_size
        self.free_contents = free_contents
        self.rng = np.random.default_rng(seed)
        self.kind = np.full(p2m_size, PageKind.FREE, dtype=np.uint8)
        if holes is not None and holes.size:
            self.kind[holes.astype(np.intp)] = PageKind.HOLE
        self.pinned = np.zeros(p2m_size, dtype=bool)
        """Clean cache that is mapped or locked and cannot be dropped."""
        self.hot = np.zeros(p2m_size, dtype=bool)
        """Clean cache the guest used recently: not cold (``prune-cache = cold`` keeps it)."""
        # Distinct non-zero boot contents: a fresh destination page (zero)
        # never equals a source page by accident.
        self.tokens = np.arange(1, p2m_size + 1, dtype=np.uint64)
        self._next_token = p2m_size + 1
        if free_contents.value is not None:
            # The kernel frees its boot memory through the same path: zeroed or poisoned.
            self.tokens[self.kind == PageKind.FREE] = free_contents.value
        self.dirty = np.zeros(p2m_size, dtype=bool)
        self.logdirty = False
        self.running = True
        self.writes = 0
        # The module.
        self.module_loaded = True
        self.module_reinits_held = True
        """The module rewrites HELD pages at resume and says so (``FLAG_HELD_REINIT``); False is
        a module from before that, which dom0 must not trust with HELD in such a guest."""
        self.armed = False
        self.frozen = False
        """The armed suspend ran (``freeze``) and ``thaw`` has not yet."""
        self.request_value = 0
        self.generation = 0
        self.published: bytes | None = None
        self.dropped = 0
        """The newest early drop id the module answered (its ``dropped`` key)."""
        self.knows_prune_cache = True
        """The module advertises ``feature-cache-cold``; False is a module from before it, which
        reports and drops all clean cache whatever dom0 asks."""
        self.prune_cache = CacheMode.ALL
        """The ``prune-cache`` key, as the module creates it."""
        self.reported_cache = np.zeros(p2m_size, dtype=bool)
        """Every CACHE PFN reported since the module was last disarmed: all a cold drop may drop."""
        self.report_behaviour = ReportBehaviour.PROMPT
        self.drop_behaviour = DropBehaviour.PROMPT
        self.final_behaviour = FinalBehaviour.PROMPT
        self.after_scan: GuestActivity | None = None
        """Runs after a scan and before its publication: pages reported soft
        are reallocated and written meanwhile."""
        self.after_drop: GuestActivity | None = None
        """Runs after an early drop was asked for, before the suspend request: the
        guest reads files back and writes while dom0 gets on with the suspend."""
        self.after_freeze: GuestActivity | None = None
        """Runs after the FINAL report, before the domain is suspended: the
        kernel's own late writes on the rest of the suspend path."""
        self.scan_ns_per_pfn = 2
        self.final_report: FinalReport | None = None
        self._previous_scan: tuple[Mask, Mask, Mask] | None = None
        self._previous_request = 0

    # -- views ------------------------------------------------------------
    @property
    def ram(self) -> Mask:
        ram: Mask = self.kind != PageKind.HOLE
        return ram

    def count(self, kind: PageKind) -> int:
        return int(np.count_nonzero(self.kind == kind))

    def pfns_of(self, kind: PageKind) -> PfnArray:
        return np.flatnonzero(self.kind == kind).astype(np.uint64)

    # -- memory -----------------------------------------------------------
    def write(self, pfns: npt.NDArray[np.integer], token: int | None = None) -> None:
        """Give each PFN new contents (``token`` for all of them, or each a token never used
        before); logged if log-dirty is on."""
        if not self.running:
            raise BackendError("the simulated guest is suspended: it cannot write")
        indexes = np.asarray(pfns, dtype=np.intp)
        if indexes.size == 0:
            return
        if (self.kind[indexes] == PageKind.HOLE).any():
            raise BackendError("a guest write to a PFN that is not RAM")
        if token is not None:
            self.tokens[indexes] = np.uint64(token)
        else:
            fresh = np.arange(self._next_token, self._next_token + indexes.size, dtype=np.uint64)
            self.tokens[indexes] = fresh
            self._next_token += indexes.size
        self.writes += indexes.size
        if self.logdirty:
            self.dirty[indexes] = True

    def harvest(self) -> Mask:
        """The dirty log, and clear it."""
        dirty: Mask = self.dirty.copy()
        self.dirty[:] = False
        return dirty

    def _pick(self, wanted: Callable[[Indexes], Mask], count: int) -> Indexes:
        """Up to ``count`` distinct PFNs, uniformly among those ``wanted`` accepts, ascending.

        Small picks sample PFNs at random and keep the wanted ones, so guest
        work during a round costs in proportion to the pages it touches, not
        to the guest's size; large ones (or rare kinds) scan every PFN.
        """
        if count <= 0:
            return np.zeros(0, dtype=np.intp)
        draws = 4 * count
        while draws < self.p2m_size // 4:
            sample = self.rng.integers(0, self.p2m_size, size=draws)
            hits = np.sort(sample[wanted(sample)])
            hits = hits[np.concatenate(([True], hits[1:] != hits[:-1]))] if hits.size else hits
            if hits.size >= count:
                return np.sort(self.rng.choice(hits, size=count, replace=False))
            draws *= 8
        candidates = np.flatnonzero(wanted(np.arange(self.p2m_size)))
        if count >= candidates.size:
            return candidates
        return np.sort(self.rng.choice(candidates, size=count, replace=False))

    def _of_kind(self, *kinds: PageKind) -> Callable[[Indexes], Mask]:
        def wanted(pfns: Indexes) -> Mask:
            found: Mask = np.isin(self.kind[pfns], np.array(kinds, dtype=np.uint8))
            return found

        return wanted

    @property
    def cold_wanted(self) -> bool:
        """The module applies ``prune-cache = cold``."""
        return self.knows_prune_cache and self.prune_cache is CacheMode.COLD

    def _droppable(self, pfns: Indexes) -> Mask:
        """Clean cache that is not mapped or locked."""
        droppable: Mask = (self.kind[pfns] == PageKind.CACHE) & ~self.pinned[pfns]
        return droppable

    # -- kernel activity ----------------------------------------------------
    def allocate_anon(self, count: int) -> int:
        """User allocation: free pages first, then reclaim clean cache and slab; written."""
        if not self.running or count <= 0:
            return 0
        pages = self._pick(self._of_kind(PageKind.FREE), count)
        short = count - pages.size
        if short > 0:
            def reclaimable(pfns: Indexes) -> Mask:
                found: Mask = self._droppable(pfns) | (self.kind[pfns] == PageKind.SLAB)
                return found

            pages = np.concatenate((pages, self._pick(reclaimable, short)))
        self.kind[pages] = PageKind.ANON
        self.write(pages)
        return int(pages.size)

    def free_anon(self, count: int) -> int:
        """Processes exit: their pages go back to the buddy allocator, with stale contents unless
        the kernel zeroes or poisons what it frees."""
        return self._move(PageKind.ANON, PageKind.FREE, count, write=False)

    def fill_cache(self, count: int) -> int:
        """Read files: free pages become clean page cache holding the file data."""
        return self._move(PageKind.FREE, PageKind.CACHE, count, write=True)

    def dirty_cache(self, count: int) -> int:
        """Write to cached files: clean cache becomes dirty cache."""
        return self._move(PageKind.CACHE, PageKind.CACHE_DIRTY, count, write=True)

    def write_back(self, count: int) -> int:
        """Writeback: dirty cache becomes clean again; the page itself is not written."""
        return self._move(PageKind.CACHE_DIRTY, PageKind.CACHE, count, write=False)

    def grow_slab(self, count: int) -> int:
        return self._move(PageKind.FREE, PageKind.SLAB, count, write=True)

    def shrink_slab(self, count: int) -> int:
        return self._move(PageKind.SLAB, PageKind.FREE, count, write=False)

    def pin_cache(self, count: int) -> int:
        """mmap or mlock clean cache: it cannot be dropped at freeze."""
        if not self.running or count <= 0:
            return 0
        pages = self._pick(self._droppable, count)
        self.pinned[pages] = True
        return int(pages.size)

    def use_cache(self, count: int) -> int:
        """Read cached files again: clean cache becomes hot (read, not written)."""
        if not self.running or count <= 0:
            return 0
        pages = self._pick(self._of_kind(PageKind.CACHE), count)
        self.hot[pages] = True
        return int(pages.size)

    def cool_cache(self, count: int) -> int:
        """Hot cache goes unused long enough to be cold again."""
        if not self.running or count <= 0:
            return 0

        def hot(pfns: Indexes) -> Mask:
            found: Mask = (self.kind[pfns] == PageKind.CACHE) & self.hot[pfns]
            return found

        pages = self._pick(hot, count)
        self.hot[pages] = False
        return int(pages.size)

    def drop_cache(self, count: int) -> int:
        """Reclaim clean, unpinned cache (written only by a kernel that zeroes or poisons what it frees)."""
        if not self.running or count <= 0:
            return 0
        pages = self._pick(self._droppable, count)
        self._free(pages)
        return int(pages.size)

    def dirty_in_use(self, count: int) -> int:
        """Write ``count`` random pages in use (user, kernel and dirty-cache memory)."""
        if not self.running or count <= 0:
            return 0
        pages = self._pick(self._of_kind(PageKind.ANON, PageKind.KERNEL, PageKind.CACHE_DIRTY), count)
        self.write(pages)
        return int(pages.size)

    def churn(self, count: int) -> int:
        """Free and reallocate: pages reported free come back written."""
        freed = self.free_anon(count)
        return freed + self.allocate_anon(count)

    def _move(self, source: PageKind, target: PageKind, count: int, write: bool) -> int:
        if not self.running or count <= 0:
            return 0
        pages = self._pick(self._of_kind(source), count)
        if target is PageKind.FREE:
            self._free(pages)
            return int(pages.size)
        self.kind[pages] = target
        self.pinned[pages] = False
        self.hot[pages] = False
        if write:
            self.write(pages)
        return int(pages.size)

    def _free(self, pages: Indexes) -> None:
        """Give pages back to the buddy allocator, as ``free_pages_prepare`` does: zeroed with
        ``init_on_free``, poisoned with page poisoning (a write, so logged), untouched otherwise."""
        self.kind[pages] = PageKind.FREE
        self.pinned[pages] = False
        self.hot[pages] = False
        if self.free_contents.value is not None:
            self.write(pages, token=self.free_contents.value)

    # -- the module: precopy reports ------------------------------------------
    def scan(self) -> tuple[Mask, Mask, Mask]:
        """The module's walk: free, clean cache (pinned or not; only the cold part with
        ``prune-cache = cold``), reclaimable slab."""
        cache: Mask = self.kind == PageKind.CACHE
        if self.cold_wanted:
            cache = cache & ~self.hot
        return self.kind == PageKind.FREE, cache, self.kind == PageKind.SLAB

    def answer_request(self, request_id: int) -> None:
        """The module read ``request = request_id`` after a notify."""
        self.request_value = request_id
        if not self.module_loaded or self.report_behaviour is ReportBehaviour.SILENT:
            return
        free, cache, slab = self.scan()
        if self.after_scan is not None:
            self.after_scan(self)
        behaviour = self.report_behaviour
        published_id = request_id
        if behaviour is ReportBehaviour.LAGGING and self._previous_scan is not None:
            free, cache, slab = self._previous_scan
        elif behaviour is ReportBehaviour.OLD_REQUEST:
            published_id = self._previous_request
        elif behaviour is ReportBehaviour.LYING:
            in_use = self._of_kind(PageKind.ANON, PageKind.KERNEL)
            lie = np.zeros(self.p2m_size, dtype=bool)
            lie[self._pick(in_use, max(1, self.count(PageKind.ANON) // 4))] = True
            free = free | lie
        self._previous_scan = self.scan()
        self._previous_request = request_id
        self.reported_cache |= cache
        snapshot = self._snapshot(SnapshotState.SNAPSHOT, published_id, free, cache, slab, None)
        self._publish(
            snapshot,
            malformed=behaviour is ReportBehaviour.MALFORMED,
            torn=behaviour is ReportBehaviour.TORN,
        )

    # -- the module: drops -------------------------------------------------
    @property
    def feature_drop(self) -> bool:
        """The module advertises ``feature-drop = 1``."""
        return self.module_loaded and self.drop_behaviour is not DropBehaviour.OLD_MODULE

    def answer_drop(self, drop_id: int) -> None:
        """The module read ``drop = drop_id`` after its watch fired, then ``after_drop`` runs.

        A running guest answers an id larger than the last one it answered:
        it drops if armed, and writes ``dropped`` either way. Once frozen it
        answers nothing.
        """
        if not self.running or self.frozen:
            return
        if self.module_loaded and self.drop_behaviour is DropBehaviour.PROMPT and drop_id > self.dropped:
            if self.armed:
                self.drop_reclaimable()
            self.dropped = drop_id
        if self.after_drop is not None:
            self.after_drop(self)

    def drop_reclaimable(self) -> None:
        """The module's drop (``drop_caches``): clean, unpinned cache and
        reclaimable slab become free, their contents unwritten; the kernel
        writes the struct pages that describe them (its memmap). With
        ``prune-cache = cold`` only the clean, unpinned cache it reported and that is still cold,
        and no slab."""
        droppable: Mask = (self.kind == PageKind.CACHE) & ~self.pinned
        if self.cold_wanted:
            droppable &= ~self.hot & self.reported_cache
        else:
            droppable |= self.kind == PageKind.SLAB
        freed = np.flatnonzero(droppable)
        self._free(freed)
        self._write_memmap(freed)

    def _write_memmap(self, freed: Indexes) -> None:
        """The kernel pages holding the struct pages of ``freed`` (64 bytes each, so one memmap
        page per 64 PFNs), stood in for by the guest's KERNEL pages in PFN order."""
        kernel = self.pfns_of(PageKind.KERNEL)
        if freed.size == 0 or kernel.size == 0:
            return
        self.write(kernel[np.unique(freed // STRUCT_PAGES_PER_MEMMAP_PAGE) % kernel.size])

    # -- the module: suspend -------------------------------------------------
    def freeze(self) -> None:
        """The module at an armed suspend, both of its steps back to back.

        ``dev_pm_ops.freeze`` (user space is frozen, the kernel still runs)
        drops clean, unpinned cache and reclaimable slab (``drop_reclaimable``).
        The syscore suspend callback (one CPU, interrupts off, the last step
        before the suspend hypercall) then publishes FINAL with every free page
        as HELD.
        """
        if not self.module_loaded or not self.armed:
            return
        self.frozen = True
        self.drop_reclaimable()
        self.kind[self.kind == PageKind.FREE] = PageKind.HELD
        held = self.kind == PageKind.HELD
        behaviour = self.final_behaviour
        if behaviour is FinalBehaviour.SILENT:
            self.final_report = None
            if self.after_freeze is not None:
                self.after_freeze(self)
            return
        request_id = self.request_value
        if behaviour is FinalBehaviour.STALE_REQUEST:
            request_id = self._previous_request
        if behaviour is FinalBehaviour.LYING:
            held = held.copy()
            lie_count = max(1, self.count(PageKind.ANON) // 4)
            held[self._pick(self._of_kind(PageKind.ANON, PageKind.KERNEL), lie_count)] = True
        free_now, cache_now, slab_now = self.scan()
        snapshot = self._snapshot(SnapshotState.FINAL, request_id, free_now, cache_now, slab_now, held)
        malformed = behaviour is FinalBehaviour.MALFORMED
        self._publish(snapshot, malformed=malformed, torn=False)
        self.final_report = FinalReport(request_id, snapshot.held, well_formed=not malformed)
        if self.after_freeze is not None:
            self.after_freeze(self)

    def thaw(self) -> None:
        """``.thaw``: the suspend was cancelled; held pages may be allocated again, and the module disarms."""
        self.frozen = False
        self.kind[self.kind == PageKind.HELD] = PageKind.FREE
        self.armed = False
        self.reported_cache[:] = False
        if self.module_loaded:
            empty = np.zeros(self.p2m_size, dtype=bool)
            snapshot = self._snapshot(SnapshotState.EMPTY, self.request_value, empty, empty, empty, None)
            self._publish(snapshot, malformed=False, torn=False)

    def reinit_held(self, pfns: PfnArray, contents: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
        """The module's syscore resume callback on the destination, before anything can allocate:
        ``contents`` are the tokens the destination holds for ``pfns``; returned with every page
        of the HELD set the module published rewritten to what the allocator trusts a free page
        to hold. A module without it, a guest that trusts nothing, or a suspend that published
        no FINAL changes nothing."""
        token = self.free_contents.value
        if not self.module_reinits_held or token is None or self.final_report is None:
            return contents
        held = mask_from_pfnset(self.final_report.claimed_held)[np.asarray(pfns, dtype=np.intp)]
        return np.where(held, np.uint64(token), contents).astype(np.uint64)

    @property
    def module_flags(self) -> int:
        """The header flags the module publishes."""
        flags = self.free_contents.flags
        return flags | abi.FLAG_HELD_REINIT if self.module_reinits_held else flags

    # -- publication -----------------------------------------------------------
    def _snapshot(
        self,
        state: SnapshotState,
        request_id: int,
        free: Mask,
        cache: Mask,
        slab: Mask,
        held: Mask | None,
    ) -> SoftSnapshot:
        empty = PfnSet.empty(self.p2m_size)
        self.generation += 2
        return SoftSnapshot(
            state=state,
            generation=self.generation,
            request_id=request_id,
            flags=self.module_flags,
            guest_nr_pfns=self.p2m_size,
            scan_ns=self.scan_ns_per_pfn * self.p2m_size,
            free=pfnset_from_mask(free),
            cache=pfnset_from_mask(cache),
            slab=pfnset_from_mask(slab),
            held=pfnset_from_mask(held) if held is not None else empty,
        )

    def _publish(self, snapshot: SoftSnapshot, malformed: bool, torn: bool) -> None:
        octets = bytearray(bitmap.encode(snapshot))
        if malformed:
            corrupt(octets, str(self.rng.choice(_MALFORMATIONS)))
        if torn:
            struct.pack_into("<Q", octets, abi.GENERATION_OFFSET, snapshot.generation + 1)
        self.published = bytes(octets)


def corrupt(octets: bytearray, how: str) -> None:
    """Break one decoder rule in an encoded snapshot, keeping ``request_id`` and generation."""
    header = abi.unpack_header(octets)
    if how == "magic":
        struct.pack_into("<I", octets, 0, header.magic ^ 0xFF)
    elif how == "count":
        struct.pack_into("<Q", octets, 48, header.count[0] + 1)
    elif how == "stray-bit":
        # The last bit of the FREE bitmap is beyond nr_pfns unless nr_pfns fills the pages.
        last = abi.PAGE_SIZE * (1 + header.frames_per_category) - 1
        if header.nr_pfns % abi.PFNS_PER_FRAME:
            octets[last] |= 0x80
        else:
            struct.pack_into("<I", octets, 0, header.magic ^ 0xFF)
    elif how == "reserved":
        struct.pack_into("<Q", octets, 88, 1)
    elif how == "flags":
        struct.pack_into("<I", octets, 8, header.flags | 0x8000)
    else:
        raise BackendError(f"unknown malformation {how!r}")


def pfnset_from_mask(mask: Mask) -> PfnSet:
    """A ``PfnSet`` with the members ``mask`` marks, without unpacking PFNs."""
    nr_words = -(-mask.size // 64)
    padded = np.zeros(nr_words * 64, dtype=bool)
    padded[: mask.size] = mask
    words = np.packbits(padded, bitorder="little").view("<u8").astype(np.uint64)
    return PfnSet(mask.size, words)


def mask_from_pfnset(pfns: PfnSet) -> Mask:
    bits = np.unpackbits(pfns.words.astype("<u8").view(np.uint8), bitorder="little")
    return bits[: pfns.nr_pfns].astype(bool)
