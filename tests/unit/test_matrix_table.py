"""`make test-matrix`'s table from a JUnit XML as pytest writes it."""

from __future__ import annotations

from tests.tools import matrix_table

XML = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="5">
<testcase classname="tests.e2e.test_softpage_migrate"
  name="test_prunes[xen-4.17.7-linux-6.1]" time="100.4">
  <properties>
  <property name="xen_host" value="4.17.7"/><property name="guest_kernel" value="6.1"/></properties>
</testcase>
<testcase classname="tests.e2e.test_softpage_migrate"
  name="test_prunes[xen-4.20.4-linux-6.12]" time="120.0">
  <properties>
  <property name="xen_host" value="4.20.4"/><property name="guest_kernel" value="6.12"/></properties>
  <failure message="boom">trace</failure>
</testcase>
<testcase classname="tests.e2e.test_free_page_contents"
  name="test_free[xen-4.20.4-init_on_free=1-linux-6.1]" time="60">
  <properties>
  <property name="xen_host" value="4.20.4"/><property name="guest_kernel" value="6.1"/></properties>
  <skipped message="no"/>
</testcase>
<testcase classname="tests.e2e.test_kmod_e2e" name="test_pv_on_4_17_5" time="30">
  <properties>
  <property name="xen_host" value="4.17.5"/><property name="guest_kernel" value="6.1"/></properties>
</testcase>
<testcase classname="tests.e2e.test_kmod_e2e" name="test_refuses_outside_xen" time="9">
  <properties>
  <property name="xen_host" value="none"/><property name="guest_kernel" value="none"/></properties>
</testcase>
</testsuite></testsuites>
"""


def test_rows_are_tests_and_columns_host_and_guest_kernel() -> None:
    text = matrix_table.table(matrix_table.outcomes(XML))
    lines = text.splitlines()
    assert lines[0] == ("| test | no Xen | Xen 4.17.5 (Debian 12), Linux 6.1 guest | Xen 4.17.7 (Debian 12), "
                        "Linux 6.1 guest | Xen 4.20.4 (Debian 13), Linux 6.1 guest | Xen 4.20.4 (Debian 13), "
                        "Linux 6.12 guest |")
    assert "| test_softpage_migrate::test_prunes | - | - | pass (100 s) | - | FAIL (120 s) |" in lines
    # The matrix parts leave the id; other parameters stay.
    # A test skipped wherever it ran gets a line of its own, not a row.
    assert not any(line.startswith("| test_free_page_contents") for line in lines)
    skipped = "Skipped wherever they were collected (1): test_free_page_contents::test_free[init_on_free=1]."
    assert skipped in lines
    assert "| test_kmod_e2e::test_refuses_outside_xen | pass (9 s) | - | - | - | - |" in lines
    assert lines[-1] == "3 pass, 1 FAIL, 0 error, 1 skip; 5 minutes of tests"


def test_usage_error_without_one_file() -> None:
    assert matrix_table.main(["matrix_table"]) == 2
