"""SoftSnapshot: one decoded, validated soft-page report from the guest.

Produced only by ``softpage.bitmap.decode`` (which checks the untrusted bytes
against docs/spec/bitmap-page.md); consumed by the round planner.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from softpage import abi
from softpage.categories import Category
from softpage.pfnset import PfnSet


class SnapshotState(enum.IntEnum):
    """Values are SOFTPAGE_STATE_*."""

    EMPTY = 0
    SNAPSHOT = 1
    FINAL = 2


@dataclass(frozen=True)
class SoftSnapshot:
    """A consistent soft-page report. Every set has the universe ``p2m_size``
    of the domain it was decoded for (PFNs past the guest's ``nr_pfns`` are
    never members)."""

    state: SnapshotState
    generation: int
    request_id: int
    flags: int
    guest_nr_pfns: int
    scan_ns: int
    free: PfnSet
    cache: PfnSet
    slab: PfnSet
    held: PfnSet

    @property
    def held_contents_kept(self) -> bool:
        """Whether HELD pages hold, once the guest runs again, what its allocator trusts a free
        page to hold. False only for a guest whose allocator trusts free pages' contents
        (``init_on_free``: zero; page poisoning: the pattern) and whose module does not rewrite
        HELD pages at resume (no ``FLAG_HELD_REINIT``): a HELD page arrives with the last data
        sent for it or as the frame Xen populated for its XALLOC entry, neither of which need
        be that (docs/spec/guest-protocol.md, "What a HELD page holds")."""
        relies_on_contents = bool(self.flags & abi.FREE_CONTENTS_FLAGS)
        return not relies_on_contents or bool(self.flags & abi.FLAG_HELD_REINIT)

    def category(self, category: Category) -> PfnSet:
        return (self.free, self.cache, self.slab, self.held)[category]

    def soft(self, categories: tuple[Category, ...]) -> PfnSet:
        """The union of the chosen categories."""
        result = PfnSet.empty(self.free.nr_pfns)
        for category in categories:
            result |= self.category(category)
        return result
