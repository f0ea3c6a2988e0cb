"""The harness's exceptions: everything it raises is a ``TestbedError``."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from softpage_testbed.agent import CommandResult


class TestbedError(RuntimeError):
    """The testbed could not be built, booted or driven."""

    __test__ = False  # not a pytest test class, despite the name


class Dom0BootStalled(TestbedError):
    """dom0's boot wrote nothing to the serial console for ``DOM0_BOOT_STALL_S``."""

    __test__ = False


class GuestTripleFault(TestbedError):
    """A test failed while Xen logged a guest triple fault: nested SVM under TCG does this now
    and then (in early boot as well as in user space, with or without softpage involved). The e2e
    run reruns such a test up to twice (pytest-rerunfailures, --only-rerun GuestTripleFault)."""



class Dom0Hung(TestbedError):
    """dom0 stopped answering while a command ran. Seen once under TCG (2026-11-30, in CI): dom0's
    CPU0 soft-locked in smp_call_function_single, waiting for an IPI to CPU1 that never completed,
    and the whole testbed froze. The test fails at once instead of at its command's timeout, the
    next test gets a fresh boot, and the run reruns this one up to twice (--only-rerun Dom0Hung)."""


class CommandFailed(TestbedError):
    def __init__(self, command: str, result: CommandResult) -> None:
        super().__init__(
            f"dom0 command {command!r} exited {result.rc}"
            f"{' (' + result.error + ')' if result.error else ''}\n"
            f"stdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-2000:]}"
        )
        self.result = result
