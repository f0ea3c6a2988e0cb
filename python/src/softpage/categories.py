"""The soft-page categories of a guest report, apart from everything else so that the command
line can name them without loading the numeric machinery (numpy takes seconds to import in an
emulated dom0)."""

from __future__ import annotations

import enum

from softpage import abi


class Category(enum.IntEnum):
    """Bitmap categories; values are SOFTPAGE_CAT_* of guest_kmod/uapi/softpage_abi.h."""

    FREE = 0
    CACHE = 1
    SLAB = 2
    HELD = 3


PRUNABLE = (Category.FREE, Category.CACHE, Category.SLAB)
"""The categories a user may choose to prune in precopy rounds (``--prune``)."""


class CacheMode(enum.Enum):
    """Which page cache the guest reports soft and drops at suspend (``--prune cache=MODE``);
    the values are what dom0 writes to the guest's ``prune-cache`` key."""

    COLD = abi.XS_PRUNE_CACHE_COLD
    """Only the cache the guest has not used recently (docs/design.md, "Keep the hot cache"):
    the hot part is sent and stays cached on the destination."""
    ALL = abi.XS_PRUNE_CACHE_ALL
    """All clean, unmapped page cache, and reclaimable slab dropped at suspend (before issue 21)."""
