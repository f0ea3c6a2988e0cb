"""What the e2e tests that run softpage in dom0 share: a guest with the module loaded and about
half its memory soft, softpage's command line and its --stats, and the checks that a guest
survived (heartbeat moves on, no reboot, the workload's full check passes)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator

from softpage import abi
from softpage.abi import PAGE_SIZE
from softpage.options import DriverOptions
from softpage.stream.records import LIBXC_RECORD_HEADER, MAX_BATCH_SIZE, PAGE_DATA_HEADER
from softpage_testbed import (
    CONSOLE_LOG_DIR,
    CommandResult,
    ConsoleGuest,
    Guest,
    GuestSpec,
    Testbed,
    TestbedError,
    TestbedPair,
    counting_receiver,
)

# 256 MiB with 48 MiB of anonymous memory and 64 MiB of page cache: about half the guest is
# free or clean cache, which is what pruning must skip.
PRUNE_GUEST = {"memory_mb": 256, "anon_mb": 48, "cache_mb": 64, "dirty_rate": 200}
STATS = "/tmp/softpage-stats.json"
LOCALHOST_RECEIVER = "xl migrate-receive"
MATRIX_VARIABLE, FULL_MATRIX = "SOFTPAGE_E2E_MATRIX", "full"
"""``SOFTPAGE_E2E_MATRIX=full``: the run is ``make test-matrix`` (tests/e2e/conftest.py)."""
STEP_RETRIES = 2
"""How often a step of a long test runs again on a fresh guest after a guest triple fault
(``retry_after_triple_faults``): as often as the Makefile's ``--reruns`` runs a whole test."""
START_ATTEMPTS = 3
"""How often ``boot_until_ready`` boots a guest that triple-faulted before its workload was ready."""


def in_full_matrix() -> bool:
    return os.environ.get(MATRIX_VARIABLE, "") == FULL_MATRIX


def softpage(testbed: Testbed, *arguments: str, timeout_s: float = 900) -> CommandResult:
    return testbed.run(["python3", "-m", "softpage", *arguments], timeout_s=timeout_s)


def verify_stream_v2(testbed: Testbed, image: str, *options: str, image_format: str = "xl") -> CommandResult:
    """Xen's own stream verifier, from the host's xen-utils (4.17 or 4.20), on an ``xl`` image
    (or, with ``image_format="libxl"``, a bare libxl stream)."""
    return testbed.run(
        "tools=$(ls -d /usr/lib/xen-4.* | tail -1); "
        f"PYTHONPATH=$tools/lib/python $tools/bin/verify-stream-v2 {' '.join(options)} "
        f"-f {image_format} -i {image}",
        timeout_s=900,
    )


def read_stats(testbed: Testbed) -> tuple[list[dict[str, object]], dict[str, object]]:
    records = [json.loads(line) for line in testbed.run(["cat", STATS], check=True).stdout.splitlines()]
    return records[:-1], records[-1]


def assert_early_drop_as_decided(rounds: list[dict[str, object]], totals: dict[str, object]) -> None:
    """The early drop came where it pays (docs/design.md, "The early drop"): always with
    ``cache=all``; with ``cache=cold`` only if enough reported cold cache was left
    (``cold_cache_left``), and then what the drop wrote went out in one more live round."""
    left = totals["cold_cache_left"]
    asked = totals["cache_mode"] != "cold" or int(left) >= DriverOptions().early_drop_min_cache_pages  # type: ignore[call-overload]
    kinds = [record["kind"] for record in rounds]
    outcome = totals["guest_drop_outcome"]
    if asked:
        assert outcome == "done" and kinds[-2:] == ["after-drop", "final"], (kinds, totals)
    else:
        assert outcome is None and "after-drop" not in kinds, (kinds, totals)


def domid(guest: ConsoleGuest) -> int:
    return int(guest.testbed.run(["xl", "domid", guest.name], check=True).stdout)


def softpage_home(guest: ConsoleGuest) -> str:
    """The guest module's xenstore directory (docs/spec/guest-protocol.md)."""
    return f"/local/domain/{domid(guest)}/{abi.XS_DIR}"


def module_state(guest: ConsoleGuest) -> str:
    path = f"{softpage_home(guest)}/{abi.XS_STATE}"
    return guest.testbed.run(["xenstore-read", path]).stdout.strip()


def start_guest(testbed: Testbed, name: str, guest_type: str = "pvh", toolstack: str = "xl",
                **overrides: object) -> Guest:
    spec = GuestSpec(name=name, guest_type=guest_type, **{**PRUNE_GUEST, **overrides})  # type: ignore[arg-type]
    guest = boot_until_ready(testbed, spec, toolstack)
    if spec.load_kmod:
        assert re.search(r"GUEST-KMOD loaded", guest.console_log()), guest.console_log()[-2000:]
        guest_ready = wait_for_module(guest)
        assert guest_ready == "ready"
    before = guest.verify()
    assert before.ok, before.line
    return guest


def boot_until_ready(testbed: Testbed, spec: GuestSpec, toolstack: str = "xl") -> Guest:
    """``create_guest``, then its workload's READY line. create_guest boots again a guest that died
    before its first heartbeat; one that triple-faulted (TCG's nested SVM) between it and its
    workload's start is booted again here, at most START_ATTEMPTS times in all, instead of failing
    the test (seen 2026-12-07 on Xen 4.20.4: right after heartbeat 0, before READY)."""
    for attempt in range(1, START_ATTEMPTS + 1):
        faults = testbed.triple_faults()
        guest = testbed.create_guest(spec, toolstack=toolstack)
        try:
            guest.wait_for_workload_ready()
            return guest
        except TestbedError as failure:
            if attempt == START_ATTEMPTS or testbed.triple_faults() == faults or not guest.stopped():
                raise
            print(f"boot_until_ready {spec.name}: the guest triple-faulted before its workload was ready, "
                  f"booting it again ({attempt} of {START_ATTEMPTS - 1}): {str(failure)[:200]}",
                  file=sys.stderr)
            testbed.run(["xl", "destroy", spec.name], timeout_s=120)
    raise AssertionError("unreachable: the last attempt returns or raises")


def wait_for_module(guest: ConsoleGuest) -> str:
    for _ in range(60):
        state = module_state(guest)
        if state:
            return state
        guest.testbed.run(["sleep", "1"])
    return module_state(guest)


def assert_survived(guest: Guest, heartbeat_before: int) -> None:
    guest.wait_for_heartbeat(heartbeat_before + 2, timeout_s=180)
    assert guest.boot_count() == 1, "the guest rebooted"
    assert guest.name in guest.testbed.domains()
    assert not [name for name in guest.testbed.domains() if "--" in name], guest.testbed.domains()
    after = guest.verify()
    assert after.ok, after.line
    assert int(after.fields["anon_pages"]) == PRUNE_GUEST["anon_mb"] * 256


Save = Callable[[Testbed, Guest, str], CommandResult]
"""``save(testbed, guest, image)``: the guest saved to ``image``, with its --stats in STATS."""
Restore = Callable[[Testbed, str], CommandResult]
Verify = Callable[[Testbed, str], CommandResult]
"""``verify(testbed, image)``: Xen's verify-stream-v2 on the image, verbose (``-v``)."""


def verify_xl_image(testbed: Testbed, image: str) -> CommandResult:
    return verify_stream_v2(testbed, image, "-v")


def save_and_restore_repeatedly(testbed: Testbed, guest: Guest, domain_header: str, save: Save,
                                restore: Restore, repeat: int, verify: Verify = verify_xl_image) -> None:
    """``save`` then ``restore``, ``repeat`` times; the first image must pass verify-stream-v2
    with the given domain header. Held pages travel as XALLOC in the one, final round (a save
    is not live): the image is smaller than the guest's memory."""
    image = f"/var/lib/xen/softpage-{guest.name}.img"
    for attempt in range(repeat):
        heartbeat = guest.heartbeat()
        result = save(testbed, guest, image)
        assert result.ok, f"save {attempt}: {result.stderr[-3000:]}"
        assert guest.name not in testbed.domains()
        rounds, totals = read_stats(testbed)
        assert [r["kind"] for r in rounds] == ["final"], rounds
        assert int(totals["pages_xalloc"]) > 2048, (attempt, totals)  # type: ignore[call-overload]
        size = int(testbed.run(["stat", "-c", "%s", image], check=True).stdout)
        print(f"save {attempt + 1} of {repeat}: {result.wall_s:.1f} s, image {size} bytes, helper: {totals}",
              file=sys.stderr)
        assert size < PRUNE_GUEST["memory_mb"] << 20
        if attempt == 0:
            verified = verify(testbed, image)
            assert verified.ok, verified.stdout[-2000:] + verified.stderr[-2000:]
            assert f"Domain Header: {domain_header}" in verified.stdout, verified.stdout[:2000]
        restored = restore(testbed, image)
        assert restored.ok, f"restore {attempt}: {restored.stderr[-3000:]}"
        testbed.run(["rm", "-f", image])
        assert_survived(guest, heartbeat)
        assert wait_for_module(guest) == "ready"


STREAM_RECORDS_SLACK = 1 << 20
"""What a live xl stream carries besides its PAGE_DATA records, at most: xl's header and JSON
config, libxl's and libxc's headers and records, the vCPU, HVM and emulator contexts."""


def assert_stream_carries_only_data_pages(size: int, rounds: list[dict[str, object]],
                                          totals: dict[str, object]) -> None:
    """A live stream of ``size`` bytes (what its receiver read) against its sender's stats: the
    data of the ``pages_data`` pages counted with data, resent dirty pages included, is in it,
    and nothing beyond their and the XALLOC entries' pfn words, the batches' headers and the other
    records: the pages sent as XALLOC went without data. (Smaller than the guest's memory, as a
    save image is, it need not be: on a loaded host every slow round resends what the guest
    dirtied meanwhile.)"""
    data_pages = int(totals["pages_data"])  # type: ignore[call-overload]
    entries = data_pages + int(totals["pages_xalloc"])  # type: ignore[call-overload]
    batches = -(-entries // MAX_BATCH_SIZE) + len(rounds)
    data = data_pages * PAGE_SIZE
    pfn_words = entries * 8  # a u64 per entry
    most = (data + pfn_words + batches * (LIBXC_RECORD_HEADER.size + PAGE_DATA_HEADER.size)
            + STREAM_RECORDS_SLACK)
    assert data <= size <= most, (f"stream of {size} bytes; the sender counted {data_pages} pages "
                                  f"with data ({data} bytes) and {entries} entries: at most {most}")


STREAM_COUNTER = "/tmp/helper-stream.bytes"
RECEIVER = counting_receiver(STREAM_COUNTER)
"""``xl migrate-receive`` on this host, the stream's size left in STREAM_COUNTER."""


def stream_bytes(testbed: Testbed) -> int:
    return int(testbed.run(["cat", STREAM_COUNTER], check=True).stdout.strip() or 0)


def assert_pruned_through_the_helper(testbed: Testbed, result: CommandResult, rounds: list[dict[str, object]],
                                     totals: dict[str, object], attempt: int) -> None:
    """``xl migrate`` to RECEIVER went through softpage's save helper, which pruned: xl printed
    its summary, soft pages went as XALLOC and the guest dropped its caches at the suspend."""
    # xl prints the helper's summary from libxl's log (INFO is shown by default).
    assert "softpage-save-helper: info: softpage:" in result.stderr, result.stderr[-3000:]
    assert int(totals["pages_xalloc"]) > 2048, (attempt, totals)  # type: ignore[call-overload]
    assert rounds[-1]["kind"] == "final", (attempt, rounds, totals)
    assert_early_drop_as_decided(rounds, totals)
    # The whole xl stream (xl's and libxl's records around the helper's) holds the data of the
    # pages the helper counted with data and no more: the soft pages went without data.
    assert_stream_carries_only_data_pages(stream_bytes(testbed), rounds, totals)


# -- two hosts (TestbedPair) --------------------------------------------------------------------

def forget_console_logs(pair: TestbedPair, name: str) -> None:
    for testbed in pair.testbeds:
        testbed.run(f"rm -f {CONSOLE_LOG_DIR}/guest-{name}*.log", check=True)


def boots_seen(testbed: Testbed, spec: GuestSpec) -> int:
    """How often this host's console logs saw the guest boot (0 where it only ever arrived)."""
    return Guest(testbed, spec).boot_count()


def assert_arrived(source: Testbed, destination: Testbed, spec: GuestSpec, heartbeat_before: int,
                   boots_before: int) -> Guest:
    """The guest left ``source`` and runs on ``destination``, intact and not rebooted."""
    assert spec.name not in source.domains(), source.domains()
    guest = Guest(destination, spec)
    guest.wait_for_heartbeat(heartbeat_before + 2, timeout_s=180)
    assert boots_seen(destination, spec) == boots_before, "the guest booted again on the destination"
    assert not [name for name in destination.domains() if "--" in name], destination.domains()
    after = guest.verify()
    assert after.ok, after.line
    assert int(after.fields["anon_pages"]) == spec.anon_mb * 256
    return guest


def assert_pruned(testbed: Testbed) -> dict[str, object]:
    rounds, totals = read_stats(testbed)
    # Free memory and clean cache of the 256 MiB guest: far more than 8 MiB go without data.
    assert int(totals["pages_xalloc"]) > 2048, totals  # type: ignore[call-overload]
    assert rounds[-1]["kind"] == "final", rounds
    return totals


DEBS = "/opt/softpage/debs"
"""The payload's Debian packages, one directory per dom0 release (testbed/payload.sh)."""
INSTALLED_HELPER = "/usr/lib/softpage/softpage-save-helper"
INSTALLED_PACKAGE = "/usr/lib/python3/dist-packages/softpage/__init__.py"
DEFAULTS = "/etc/default/softpage"
ADMIN_ENVIRONMENT = f"set -a; . {DEFAULTS}; set +a; unset PYTHONPATH"
"""What softpage-save-helper(8) tells an admin to do for xl, and no trace of the checkout."""


def as_admin(testbed: Testbed, command: str, timeout_s: float = 900) -> CommandResult:
    return testbed.run(f"{ADMIN_ENVIRONMENT}; {command}", timeout_s=timeout_s)


@contextlib.contextmanager
def installed_package(testbed: Testbed) -> Iterator[None]:
    """softpage's Debian package installed with apt from the payload, as an admin installs it,
    and the save helper enabled (with ``--stats STATS``) by uncommenting its lines in
    /etc/default/softpage; purged afterwards, for the tests that share the dom0."""
    release = testbed.config.platform.release
    assert testbed.payload_info().get(f"debs_{release}", "FAILED") != "FAILED", testbed.payload_info()
    installed = testbed.run(f"apt-get install -y {DEBS}/{release}/softpage_*_amd64.deb", timeout_s=600)
    assert installed.ok, installed.stdout[-2000:] + installed.stderr[-2000:]
    try:
        # Off until enabled: the package's default leaves libxl's own helper in place.
        assert as_admin(testbed, 'test -z "${LIBXL_SAVE_HELPER:-}"').ok
        enable = ("s/^#LIBXL_SAVE_HELPER=/LIBXL_SAVE_HELPER=/; "
                  f"s|^#SOFTPAGE_SAVE_HELPER_OPTIONS=.*|SOFTPAGE_SAVE_HELPER_OPTIONS='--stats {STATS}'|")
        testbed.run(["sed", "-i", enable, DEFAULTS], check=True)
        where = as_admin(testbed, 'echo "$LIBXL_SAVE_HELPER"; '
                                  'python3 -c "import softpage; print(softpage.__file__)"')
        assert where.stdout.split() == [INSTALLED_HELPER, INSTALLED_PACKAGE], where
        yield
    finally:
        testbed.run(["apt-get", "purge", "-y", "softpage"], timeout_s=600)


MODULE_STATS = "/sys/devices/platform/softpage/stats"
"""softpage.ko's counters in the guest (guest_kmod/README.md, "Counters")."""


def wait_for_count(guest: Guest, pattern: str, count: int, timeout_s: float = 300) -> list[re.Match[str]]:
    """Until the guest's console shows ``pattern`` at least ``count`` times; all the matches."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = list(re.finditer(pattern, guest.console_log()))
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(found)} of {count} lines {pattern!r}: {guest.console_log()[-3000:]}")
        time.sleep(1)


def guest_output(guest: Guest, marker: str, command: str) -> str:
    """Run ``command`` in the guest's shell; its output on one console line after ``marker``."""
    # The split marker keeps the echoed command line from matching the answer.
    head, tail = marker[:2], marker[2:]
    seen = len(re.findall(rf"^{marker} ", guest.console_log(), re.MULTILINE))
    guest.console_command(f'echo "{head}""{tail} $({command} | tr "\\n" " ")"')
    return wait_for_count(guest, rf"(?m)^{marker} (.*)$", seen + 1, timeout_s=120)[-1].group(1)


def module_stats(guest: Guest, *names: str) -> dict[str, int]:
    paths = " ".join(f"{MODULE_STATS}/{name}" for name in names)
    values = guest_output(guest, "MODSTATS", f"cat {paths}").split()
    return dict(zip(names, (int(value) for value in values), strict=True))


def data_file_pages(testbed: Testbed, first: int, count: int) -> int:
    """Pages of ``count`` data disk files from the ``first``-th on (the order ``workload files``
    takes them in), from the cache's manifest."""
    sizes = list(testbed.data_file_sizes().values())
    assert first + count <= len(sizes), f"the data disk has {len(sizes)} files, not {first + count}"
    return sum(-(-size // PAGE_SIZE) for size in sizes[first:first + count])
