"""The precopy stop decision: a pure, replaceable policy.

The default reproduces libxenguest's ``simple_precopy_policy``
(tools/libs/guest/xg_sr_save.c), which every stock ``xl migrate`` uses: stop
after ``SPP_MAX_ITERATIONS`` live rounds, or as soon as fewer than
``SPP_TARGET_DIRTY_COUNT`` pages are dirty. It is called with the same
``precopy_stats`` at the same points as there, so that a softpage migration and
a stock one run the same number of rounds on the same workload.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

SPP_MAX_ITERATIONS = 5
"""libxenguest's default cap on live rounds."""
SPP_TARGET_DIRTY_COUNT = 50
"""libxenguest's default: stop-and-copy once fewer pages than this are dirty."""


class Decision(enum.Enum):
    CONTINUE_PRECOPY = "continue"
    STOP_AND_COPY = "stop"


@dataclass(frozen=True)
class PrecopyStats:
    """``struct precopy_stats``: what the policy may look at."""

    iteration: int
    """Live rounds completed so far."""
    total_written: int
    """Pages named in the stream so far."""
    dirty_count: int
    """Pages dirty now, or -1 when not yet harvested (the second call of a round)."""


@dataclass(frozen=True)
class PrecopyPolicy:
    """Stop after ``max_iterations`` rounds or below ``target_dirty_count`` dirty pages."""

    max_iterations: int = SPP_MAX_ITERATIONS
    target_dirty_count: int = SPP_TARGET_DIRTY_COUNT

    def __post_init__(self) -> None:
        if self.max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1, got {self.max_iterations}")
        if self.target_dirty_count < 0:
            raise ValueError(f"target_dirty_count must be >= 0, got {self.target_dirty_count}")

    def decide(self, stats: PrecopyStats) -> Decision:
        if 0 <= stats.dirty_count < self.target_dirty_count:
            return Decision.STOP_AND_COPY
        if stats.iteration >= self.max_iterations:
            return Decision.STOP_AND_COPY
        return Decision.CONTINUE_PRECOPY
