"""SoftSnapshot: one decoded, validated soft-page report from the guest.

Produced only by ``softpage.bitmap.decode`` (which checks the untrusted bytes
against docs/spec/bitmap-page.md); consumed by the round planner.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

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

    def category(self, category: Category) -> PfnSet:
        return (self.free, self.cache, self.slab, self.held)[category]

    def soft(self, categories: tuple[Category, ...]) -> PfnSet:
        """The union of the chosen categories."""
        result = PfnSet.empty(self.free.nr_pfns)
        for category in categories:
            result |= self.category(category)
        return result
