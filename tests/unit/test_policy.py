"""The precopy policy: libxenguest's simple_precopy_policy, alone and as the driver uses it."""

from __future__ import annotations

import pytest

from softpage.driver import send_domain
from softpage.options import DriverOptions
from softpage.policy import (
    SPP_MAX_ITERATIONS,
    SPP_TARGET_DIRTY_COUNT,
    Decision,
    PrecopyPolicy,
    PrecopyStats,
)
from softpage.sim.backend import SimBackend
from softpage.sim.destination import DirectSink
from softpage.sim.experiment import GuestShape, boot_guest
from softpage.sim.guest import SimGuest

SMALL = GuestShape(memory_mib=4, kernel_mib=1, min_free_mib=1)


def test_libxenguest_defaults() -> None:
    assert SPP_MAX_ITERATIONS == 5
    assert SPP_TARGET_DIRTY_COUNT == 50
    assert PrecopyPolicy() == PrecopyPolicy(max_iterations=5, target_dirty_count=50)


@pytest.mark.parametrize(
    ("iteration", "dirty_count", "decision"),
    [
        (1, -1, Decision.CONTINUE_PRECOPY),
        (1, 50, Decision.CONTINUE_PRECOPY),
        (1, 49, Decision.STOP_AND_COPY),
        (1, 0, Decision.STOP_AND_COPY),
        (4, 100_000, Decision.CONTINUE_PRECOPY),
        (4, -1, Decision.CONTINUE_PRECOPY),
        (5, -1, Decision.STOP_AND_COPY),
        (5, 100_000, Decision.STOP_AND_COPY),
        (6, 100_000, Decision.STOP_AND_COPY),
    ],
)
def test_decide(iteration: int, dirty_count: int, decision: Decision) -> None:
    assert PrecopyPolicy().decide(PrecopyStats(iteration, 0, dirty_count)) is decision


def test_custom_thresholds() -> None:
    policy = PrecopyPolicy(max_iterations=2, target_dirty_count=10)
    assert policy.decide(PrecopyStats(1, 0, 10)) is Decision.CONTINUE_PRECOPY
    assert policy.decide(PrecopyStats(1, 0, 9)) is Decision.STOP_AND_COPY
    assert policy.decide(PrecopyStats(2, 0, 1000)) is Decision.STOP_AND_COPY


@pytest.mark.parametrize(("max_iterations", "target"), [(0, 50), (5, -1)])
def test_invalid_thresholds(max_iterations: int, target: int) -> None:
    with pytest.raises(ValueError, match=r"must be >= [01], got"):
        PrecopyPolicy(max_iterations=max_iterations, target_dirty_count=target)


def live_rounds(guest: SimGuest, backend: SimBackend, options: DriverOptions) -> list[str]:
    stats = send_domain(backend, DirectSink(), options, lambda message: None)
    return [round_stats.kind for round_stats in stats.rounds]


def test_a_busy_guest_gets_at_most_five_live_rounds() -> None:
    guest = boot_guest(SMALL, user_alloc_mib=1, seed=3)
    backend = SimBackend(guest, read_hook=lambda guest, pfns: guest.dirty_in_use(200))
    # no after-drop round: the first drop left no reported cold cache for an early drop
    assert live_rounds(guest, backend, DriverOptions()) == ["live"] * 5 + ["final"]


def test_a_quiet_guest_stops_after_the_harvest_falls_below_fifty() -> None:
    guest = boot_guest(SMALL, user_alloc_mib=1, seed=3)
    # 49 pages written during round 1: the harvest is below the target, they
    # go out in one more live round (as libxenguest does), then stop-and-copy.
    written = []

    def write_once(guest: SimGuest, pfns: object) -> None:
        if not written:
            written.append(guest.dirty_in_use(SPP_TARGET_DIRTY_COUNT - 1))

    backend = SimBackend(guest, read_hook=write_once)
    assert live_rounds(guest, backend, DriverOptions()) == ["live", "live", "final"]
    assert written == [49]


def test_fifty_dirty_pages_are_not_enough_to_stop() -> None:
    guest = boot_guest(SMALL, user_alloc_mib=1, seed=3)
    writes = [SPP_TARGET_DIRTY_COUNT]

    def write_once(guest: SimGuest, pfns: object) -> None:
        if writes:
            guest.dirty_in_use(writes.pop())

    backend = SimBackend(guest, read_hook=write_once)
    assert live_rounds(guest, backend, DriverOptions()) == ["live", "live", "live", "final"]


def test_the_policy_is_replaceable() -> None:
    guest = boot_guest(SMALL, user_alloc_mib=1, seed=3)
    backend = SimBackend(guest, read_hook=lambda guest, pfns: guest.dirty_in_use(200))
    options = DriverOptions(policy=PrecopyPolicy(max_iterations=2))
    assert live_rounds(guest, backend, options) == ["live", "live", "final"]


def test_not_live_means_one_final_round() -> None:
    guest = boot_guest(SMALL, user_alloc_mib=1, seed=3)
    assert live_rounds(guest, SimBackend(guest), DriverOptions(live=False)) == ["final"]
