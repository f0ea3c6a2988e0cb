"""Fixtures for the real-Xen e2e tests (``@pytest.mark.e2e``). See tests/e2e/README.md.

Fixtures:
  ``xen_pvh_testbed``  a booted testbed, once per PVH host: Xen 4.17.7 on Debian 12 and Xen 4.20.4
                       on Debian 13 (PVH/HVM guests live-migrate; PV guests can only be
                       saved/restored: neither hypervisor has shadow paging).
  ``xen_pv_testbed``   a booted testbed on Xen 4.17.5 (Debian 12; PV guests live-migrate as well).
  ``guest_kernel``     a test that takes it runs once per guest kernel (``GUEST_KERNELS``: Debian
                       12's 6.1, Debian 13's 6.12) and starts its guests with it.
  ``testbed_pool``     the session object behind both: it boots one hypervisor at a time (TCG
                       on 2 cores cannot afford two) and reuses a boot across tests.
  ``pair_pool``        the same for two hosts at once (``TestbedPair``), after every single-host
                       test; ``pv_pair`` (both Xen 4.17.5) is one, test_two_hosts.py has the others.

Each test starts with no guests; the fixtures destroy what a test created. When a test fails,
the serial log, ``xl dmesg``, dom0 dmesg and /var/log/xen are kept under
``$SOFTPAGE_E2E_LOG_DIR`` (default results/e2e-logs/) in a directory named after the test.
e2e tests using these fixtures skip only when a testbed cannot exist here (not root, no QEMU).

The matrix: ``SOFTPAGE_E2E_MATRIX=full`` (``make test-matrix``) runs every test on every host and
guest kernel it takes. Otherwise (``make test``, which must fit CI) a test runs on Xen 4.20.4 only
when marked ``every_host``, with the 6.12 guest only when marked ``every_kernel`` (a test marked
both: 4.20.4 with 6.12, and 4.17.7 with 6.1), there alone when marked ``on_debian13`` (4.20.4, with
6.12 if it takes a kernel), never when marked ``matrix_only``; everything else runs on Xen 4.17.7
with the 6.1 guest.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from softpage_testbed import (
    DEFAULT_GUEST_KERNEL,
    GUEST_KERNELS,
    REPO_DIR,
    XEN_PV_VERSION,
    XEN_PVH_VERSION,
    XEN_TRIXIE_VERSION,
    Dom0Hung,
    GuestTripleFault,
    LinkShape,
    Testbed,
    TestbedConfig,
    TestbedError,
    TestbedPair,
    build_payload,
    build_testbed,
)
from tests.e2e.helpers import in_full_matrix

PV_TESTBED_FIXTURE = "xen_pv_testbed"
DISTRO_GUESTS = pytest.StashKey[bool]()
"""Whether a selected test boots a distro guest (marked ``distro_guests``): the payload then
carries their disks."""


class TestbedPool:
    """At most one booted testbed at a time; the payload (current checkout) is built once."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, work_dir: Path, distro_guests: bool = True) -> None:
        self.work_dir = work_dir
        self.distro_guests = distro_guests
        """Whether the payload carries the distro guests' disks: only a session that boots one
        (a test marked ``distro_guests``) needs them."""
        self.current: Testbed | None = None
        self.payload_info: dict[str, str] = {}
        self._payload: Path | None = None

    def get(self, xen_version: str, cpu_model: str | None = None) -> Testbed:
        """A boot of ``xen_version`` with QEMU's ``cpu_model`` (None: TestbedConfig's default)."""
        config = TestbedConfig.from_env(xen_version)
        if cpu_model is not None:
            config = dataclasses.replace(config, cpu_model=cpu_model)
        if self.current is not None:
            if self.current.config == config and self.current.alive():
                return self.current
            self.current.shutdown()
            self.current = None
        boot_dir = self.work_dir / f"xen-{xen_version}-{time.strftime('%H%M%S')}"
        testbed = Testbed(config, self.payload(), boot_dir)
        testbed.boot()
        self.current = testbed
        return testbed

    def payload(self) -> Path:
        """The session's payload disk (the current checkout), built on first use."""
        if self._payload is None:
            build_testbed()
            self._payload = self.work_dir / "payload.img"
            self.payload_info = build_payload(self._payload, self.distro_guests)
        return self._payload

    def close(self) -> None:
        if self.current is not None:
            self.current.shutdown()
            self.current = None


def testbed_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "the Xen testbed needs root (debootstrap, chroot, mount)"
    if shutil.which("apt-get") is None:
        return "the Xen testbed is built from Debian packages; this host has no apt-get"
    return None


PVH_HOSTS = (XEN_PVH_VERSION, XEN_TRIXIE_VERSION)
TESTBED_CPU_MARKER = "testbed_cpu"
"""``@pytest.mark.testbed_cpu(model)``: the test's host boots with QEMU's ``-cpu model``
(softpage_testbed.LIBVIRT_CPU_MODEL for libvirt) instead of TestbedConfig's default."""


PAIR_FIXTURES = ("pvh_pair", "upgrade_pair", "pv_pair")
"""tests/e2e/test_two_hosts.py: two hosts at once, booted after every single-host test."""
PAIR = "pair"


def _host_of(item: pytest.Item) -> str:
    if any(name in getattr(item, "fixturenames", ()) for name in PAIR_FIXTURES):
        return PAIR
    callspec = getattr(item, "callspec", None)
    if callspec is not None and "xen_pvh_testbed" in callspec.params:
        return str(callspec.params["xen_pvh_testbed"])
    if PV_TESTBED_FIXTURE in getattr(item, "fixturenames", ()):
        return XEN_PV_VERSION
    return XEN_PVH_VERSION


def _in_ci_selection(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec is not None else {}
    new_host = params.get("xen_pvh_testbed", XEN_PVH_VERSION) != XEN_PVH_VERSION
    new_kernel = params.get("guest_kernel", DEFAULT_GUEST_KERNEL) != DEFAULT_GUEST_KERNEL
    if item.get_closest_marker("matrix_only") is not None:
        return False
    if item.get_closest_marker("on_debian13") is not None:
        return new_host and (new_kernel or "guest_kernel" not in params)
    every_host = item.get_closest_marker("every_host") is not None
    every_kernel = item.get_closest_marker("every_kernel") is not None
    if new_host and not every_host:
        return False
    if new_kernel and not every_kernel:
        return False
    # A test marked for both runs with both new (Debian 13's Xen and kernel) beside both old; the
    # two mixed cells are the matrix's.
    return not (every_host and every_kernel and new_host != new_kernel)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not in_full_matrix():
        deselected = [item for item in items if not _in_ci_selection(item)]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if _in_ci_selection(item)]
    config.stash[DISTRO_GUESTS] = any(item.get_closest_marker("distro_guests") for item in items)
    for item in items:
        # For `make test-matrix`'s table (tests/tools/matrix_table.py), through the JUnit XML.
        fixtures = getattr(item, "fixturenames", ())
        uses_xen = "xen_pvh_testbed" in fixtures or PV_TESTBED_FIXTURE in fixtures
        params = item.callspec.params if hasattr(item, "callspec") else {}
        kernel = str(params.get("guest_kernel", DEFAULT_GUEST_KERNEL))
        if uses_xen or _host_of(item) == PAIR:
            host = _host_of(item)
        else:
            # A test that boots its hosts itself from the pool (the rolling upgrade) spans them.
            host, kernel = ("several", kernel) if "testbed_pool" in fixtures else ("none", "none")
        item.user_properties.append(("xen_host", host))
        item.user_properties.append(("guest_kernel", kernel))
    # One hypervisor after the other (4.17.7, then 4.17.5, then 4.20.4, then the two-host
    # pairs): each switch is a reboot.
    order = (XEN_PVH_VERSION, XEN_PV_VERSION, XEN_TRIXIE_VERSION, PAIR)
    # Within a host, the tests that ask for another CPU come last: one more boot, not one per test.
    items.sort(key=lambda item: (order.index(_host_of(item)) if _host_of(item) in order else len(order),
                                 _cpu_model_of(item) or ""))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Name a failure after the testbed flake behind it, so that the run (--only-rerun) repeats
    the test once: GuestTripleFault when Xen logged a guest triple fault during the test,
    Dom0Hung when dom0 stopped answering. Every other failure stands."""
    testbeds = [testbed for value in getattr(item, "funcargs", {}).values()
                for testbed in ((value,) if isinstance(value, Testbed) else getattr(value, "testbeds", ()))
                if isinstance(testbed, Testbed)]
    before = [testbed.triple_faults() for testbed in testbeds]
    try:
        return (yield)
    except Dom0Hung:
        raise
    except Exception as failure:
        if any(testbed.hung for testbed in testbeds):
            raise Dom0Hung(f"dom0 stopped answering during this test; it failed with: {failure}") from failure
        if any(testbed.triple_faults() > count for testbed, count in zip(testbeds, before, strict=True)):
            raise GuestTripleFault(
                f"a guest triple-faulted during this test (nested SVM under TCG); it failed with: {failure}"
            ) from failure
        raise


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    setattr(item, f"softpage_report_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def testbed_pool(request: pytest.FixtureRequest) -> Iterator[TestbedPool]:
    reason = testbed_unavailable_reason()
    if reason:
        pytest.skip(reason)
    work_dir = Path(tempfile.mkdtemp(prefix="softpage-e2e-"))
    pool = TestbedPool(work_dir, distro_guests=request.config.stash.get(DISTRO_GUESTS, True))
    try:
        yield pool
    finally:
        pool.close()
        shutil.rmtree(work_dir, ignore_errors=True)


def log_dir_for(item: pytest.Item) -> Path:
    base = Path(os.environ.get("SOFTPAGE_E2E_LOG_DIR") or REPO_DIR / "results" / "e2e-logs")
    return base / time.strftime("%Y%m%d-%H%M%S") / re.sub(r"[^\w.-]+", "_", item.nodeid)


def _cpu_model_of(item: pytest.Item) -> str | None:
    """The QEMU CPU a test's ``testbed_cpu`` marker asks for (None: the default)."""
    marker = item.get_closest_marker(TESTBED_CPU_MARKER)
    return str(marker.args[0]) if marker is not None else None


def _testbed_for_test(
    request: pytest.FixtureRequest, pool: TestbedPool, xen_version: str
) -> Iterator[Testbed]:
    try:
        testbed = pool.get(xen_version, _cpu_model_of(request.node))
    except TestbedError:
        if pool.current is not None:
            pool.current.collect_logs(log_dir_for(request.node))
        raise
    testbed.destroy_all_guests()
    yield testbed
    failed_reports = [
        report
        for when in ("setup", "call")
        if (report := getattr(request.node, f"softpage_report_{when}", None)) is not None and report.failed
    ]
    if failed_reports:
        log_dir = log_dir_for(request.node)
        testbed.collect_logs(log_dir)
        (log_dir / "failure.txt").write_text("\n\n".join(report.longreprtext for report in failed_reports))
    try:
        testbed.destroy_all_guests()
    except TestbedError:
        pool.close()  # the next test gets a fresh boot


@pytest.fixture(params=PVH_HOSTS, ids=lambda version: f"xen-{version}")
def xen_pvh_testbed(request: pytest.FixtureRequest, testbed_pool: TestbedPool) -> Iterator[Testbed]:
    yield from _testbed_for_test(request, testbed_pool, request.param)


@pytest.fixture(params=GUEST_KERNELS, ids=lambda kernel: f"linux-{kernel}")
def guest_kernel(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def xen_pv_testbed(request: pytest.FixtureRequest, testbed_pool: TestbedPool) -> Iterator[Testbed]:
    yield from _testbed_for_test(request, testbed_pool, XEN_PV_VERSION)


class PairPool:
    """At most one booted pair, kept across tests (and test modules) that ask for the same one."""

    def __init__(self, pool: TestbedPool) -> None:
        self.pool = pool
        self.current: TestbedPair | None = None
        self.key: tuple[str, str, str | None] = ("", "", None)

    def get(self, version_a: str, version_b: str, cpu_model: str | None = None) -> TestbedPair:
        """host-a on ``version_a``, host-b on ``version_b``, both with QEMU's ``cpu_model``
        (None: TestbedConfig's default)."""
        key = (version_a, version_b, cpu_model)
        if self.current is not None:
            if self.key == key and all(tb.alive() for tb in self.current.testbeds):
                return self.current
            self.close()
        self.pool.close()  # the session's single host: no third QEMU
        configs = [TestbedConfig.from_env(version) for version in (version_a, version_b)]
        if cpu_model is not None:
            configs = [dataclasses.replace(config, cpu_model=cpu_model) for config in configs]
        work_dir = self.pool.work_dir / f"pair-{version_a}-{version_b}-{time.strftime('%H%M%S')}"
        pair = TestbedPair(configs[0], configs[1], self.pool.payload(), work_dir, LinkShape.from_env())
        pair.boot()
        self.current, self.key = pair, key
        return pair

    def close(self) -> None:
        if self.current is not None:
            self.current.shutdown()
            self.current = None


@pytest.fixture(scope="session")
def pair_pool(testbed_pool: TestbedPool) -> Iterator[PairPool]:
    pairs = PairPool(testbed_pool)
    try:
        yield pairs
    finally:
        pairs.close()


def pair_for_test(request: pytest.FixtureRequest, pairs: PairPool, version_a: str,
                  version_b: str) -> Iterator[TestbedPair]:
    """The pair (with the CPU of the test's ``testbed_cpu`` marker), its link up and no guests;
    the logs of both hosts kept when the test failed."""
    pair = pairs.get(version_a, version_b, _cpu_model_of(request.node))
    for testbed in pair.testbeds:
        testbed.destroy_all_guests()
        pair.set_link(testbed, up=True)
    yield pair
    reports = [getattr(request.node, f"softpage_report_{when}", None) for when in ("setup", "call")]
    failed = [report for report in reports if report is not None and report.failed]
    if failed:
        log_dir = log_dir_for(request.node)
        for testbed in pair.testbeds:
            testbed.collect_logs(log_dir / pair.name(testbed))
        (log_dir / "failure.txt").write_text("\n\n".join(report.longreprtext for report in failed))
    try:
        for testbed in pair.testbeds:
            pair.set_link(testbed, up=True)
            testbed.destroy_all_guests()
    except TestbedError:
        pairs.close()  # the next test boots a fresh pair


@pytest.fixture
def pv_pair(request: pytest.FixtureRequest, pair_pool: PairPool) -> Iterator[TestbedPair]:
    """host-a and host-b, both Xen 4.17.5 on Debian 12: PV guests live-migrate between them."""
    yield from pair_for_test(request, pair_pool, XEN_PV_VERSION, XEN_PV_VERSION)
