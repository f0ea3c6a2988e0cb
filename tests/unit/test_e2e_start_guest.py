"""tests/e2e/helpers.start_guest (through boot_until_ready, which test_kmod_e2e's guests share)
boots a guest again when it triple-faulted between its first heartbeat and its workload's start,
and only then (fakes of the testbed and its guests)."""

from __future__ import annotations

import pytest

from softpage_testbed import GuestSpec, TestbedError, VerifyResult
from tests.e2e import helpers


class FakeGuest:
    def __init__(self, testbed: FakeTestbed, dies: bool) -> None:
        self.testbed = testbed
        self.dies = dies

    def wait_for_workload_ready(self) -> dict[str, str]:
        if self.dies:
            if self.testbed.fault_on_death:
                self.testbed.faults += 1
            raise TestbedError("guest crashed or shut down while the harness waited for WORKLOAD READY")
        return {}

    def stopped(self) -> bool:
        return self.dies

    def verify(self) -> VerifyResult:
        return VerifyResult(ok=True, seq=1, fields={}, line="WORKLOAD VERIFY ok seq=1")


class FakeTestbed:
    """Guests die while ``deaths`` lasts; a death counts as a triple fault if ``fault_on_death``."""

    def __init__(self, deaths: int, fault_on_death: bool = True) -> None:
        self.deaths = deaths
        self.fault_on_death = fault_on_death
        self.faults = 0
        self.created: list[str] = []
        self.commands: list[list[str]] = []

    def triple_faults(self) -> int:
        return self.faults

    def create_guest(self, spec: GuestSpec, toolstack: str = "xl") -> FakeGuest:
        self.created.append(spec.name)
        dies = len(self.created) <= self.deaths
        return FakeGuest(self, dies)

    def run(self, argv: list[str], timeout_s: float = 0) -> None:
        self.commands.append(argv)


def test_a_guest_that_triple_faulted_before_its_workload_was_ready_is_booted_again() -> None:
    testbed = FakeTestbed(deaths=2)
    guest = helpers.start_guest(testbed, "g", load_kmod=False)  # type: ignore[arg-type]
    assert not guest.dies  # type: ignore[attr-defined]
    assert testbed.created == ["g"] * 3
    assert testbed.commands == [["xl", "destroy", "g"]] * 2


def test_the_boots_stop_at_their_limit_and_the_last_failure_stands() -> None:
    testbed = FakeTestbed(deaths=helpers.START_ATTEMPTS)
    with pytest.raises(TestbedError, match="WORKLOAD READY"):
        helpers.start_guest(testbed, "g", load_kmod=False)  # type: ignore[arg-type]
    assert len(testbed.created) == helpers.START_ATTEMPTS


def test_a_guest_that_died_without_a_triple_fault_fails_the_test() -> None:
    testbed = FakeTestbed(deaths=1, fault_on_death=False)
    with pytest.raises(TestbedError):
        helpers.start_guest(testbed, "g", load_kmod=False)  # type: ignore[arg-type]
    assert testbed.created == ["g"]
