"""The soft-page categories of a guest report, apart from everything else so that the command
line can name them without loading the numeric machinery (numpy takes seconds to import in an
emulated dom0)."""

from __future__ import annotations

import enum


class Category(enum.IntEnum):
    """Bitmap categories; values are SOFTPAGE_CAT_* of guest_kmod/uapi/softpage_abi.h."""

    FREE = 0
    CACHE = 1
    SLAB = 2
    HELD = 3


PRUNABLE = (Category.FREE, Category.CACHE, Category.SLAB)
"""The categories a user may choose to prune in precopy rounds (``--prune``)."""
