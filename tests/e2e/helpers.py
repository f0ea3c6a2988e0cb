"""What the e2e tests that run softpage in dom0 share: a guest with the module loaded and about
half its memory soft, softpage's command line and its --stats, and the checks that a guest
survived (heartbeat moves on, no reboot, the workload's full check passes)."""

from __future__ import annotations

import json
import re

from softpage_testbed import CommandResult, Guest, GuestSpec, Testbed

# 256 MiB with 48 MiB of anonymous memory and 64 MiB of page cache: about half the guest is
# free or clean cache, which is what pruning must skip.
PRUNE_GUEST = {"memory_mb": 256, "anon_mb": 48, "cache_mb": 64, "dirty_rate": 200}
STATS = "/tmp/softpage-stats.json"
LOCALHOST_RECEIVER = "xl migrate-receive"


def softpage(testbed: Testbed, *arguments: str, timeout_s: float = 900) -> CommandResult:
    return testbed.run(["python3", "-m", "softpage", *arguments], timeout_s=timeout_s)


def verify_stream_v2(testbed: Testbed, image: str, *options: str) -> CommandResult:
    """Xen's own stream verifier, from the host's xen-utils (4.17 or 4.20), on an ``xl`` image."""
    return testbed.run(
        "tools=$(ls -d /usr/lib/xen-4.* | tail -1); "
        f"PYTHONPATH=$tools/lib/python $tools/bin/verify-stream-v2 {' '.join(options)} -f xl -i {image}",
        timeout_s=900,
    )


def read_stats(testbed: Testbed) -> tuple[list[dict[str, object]], dict[str, object]]:
    records = [json.loads(line) for line in testbed.run(["cat", STATS], check=True).stdout.splitlines()]
    return records[:-1], records[-1]


def domid(guest: Guest) -> int:
    return int(guest.testbed.run(["xl", "domid", guest.name], check=True).stdout)


def module_state(guest: Guest) -> str:
    path = f"/local/domain/{domid(guest)}/data/softpage/state"
    return guest.testbed.run(["xenstore-read", path]).stdout.strip()


def start_guest(testbed: Testbed, name: str, guest_type: str = "pvh", **overrides: object) -> Guest:
    spec = GuestSpec(name=name, guest_type=guest_type, **{**PRUNE_GUEST, **overrides})  # type: ignore[arg-type]
    guest = testbed.create_guest(spec)
    guest.wait_for_workload_ready()
    if spec.load_kmod:
        assert re.search(r"GUEST-KMOD loaded", guest.console_log()), guest.console_log()[-2000:]
        guest_ready = wait_for_module(guest)
        assert guest_ready == "ready"
    before = guest.verify()
    assert before.ok, before.line
    return guest


def wait_for_module(guest: Guest) -> str:
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
