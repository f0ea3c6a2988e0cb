"""receiver_timeline.py splits a migration's downtime at the stock receiver's logged milestones."""

from __future__ import annotations

import pytest

from tests.bench import receiver_timeline

# Lines of a stamped `xl -vvv migrate-receive` log of 2026-12-03 (PVH, Xen 4.17.7), shortened.
LOG = """\
93.221 xc: info: Restoring domain
147.823 xc: info: Restore successful
147.834 libxl-save-helper: debug: complete r=0: Success
148.203 libxl: debug: libxl__async_exec_start: forking to execute: /etc/xen/scripts/block add
151.559 libxl: debug: libxl_device.c:1254:device_hotplug: Domain 2:No hotplug script to execute
151.559 libxl: debug: libxl_device.c:1254:device_hotplug: Domain 2:No hotplug script to execute
151.831 migration target: Transfer complete, requesting permission to start domain.
151.886 migration target: Got permission, starting domain.
151.941 migration target: Domain started successsfully.
"""


def test_milestones_are_the_first_matching_line_of_each_in_order() -> None:
    assert receiver_timeline.receiver_milestones(LOG) == {
        "restored": 147.823, "hotplug_started": 148.203, "hotplug_done": 151.559,
        "ready": 151.831, "started": 151.941,
    }


def test_a_milestone_logged_before_the_one_it_follows_is_not_taken() -> None:
    # A "No hotplug script" line from another device before the disk's script ran is not its end.
    early = "140.000 libxl: debug: device_hotplug: Domain 2:No hotplug script to execute\n"
    assert receiver_timeline.receiver_milestones(early + LOG)["hotplug_done"] == 151.559


def test_spans_run_from_the_suspend_request_placed_a_downtime_before_the_start() -> None:
    line = receiver_timeline.timeline(LOG, downtime_s=4.47)
    spans = line.spans()
    assert spans["restored"] == pytest.approx(147.823 - (151.941 - 4.47))
    assert spans["hotplug_done"] == pytest.approx(151.559 - 148.203)
    assert sum(spans.values()) == pytest.approx(4.47)


def test_a_log_without_the_start_is_an_error() -> None:
    with pytest.raises(ValueError, match="Domain started"):
        receiver_timeline.timeline(LOG.replace("Domain started", "Domain failed"), downtime_s=1.0)


def test_table_marks_missing_milestones() -> None:
    partial = receiver_timeline.Timeline(2.0, {"restored": 0.5, "started": 2.0})
    row = receiver_timeline.table([("stock", 0, partial)]).splitlines()[-1]
    assert row == "| stock | 0 | 2.00 | 0.50 | - | - | - | 1.50 |"
