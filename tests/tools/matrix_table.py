"""`make test-matrix`'s table: the e2e suite's JUnit XML as one Markdown table, a row per test and
a column per host and guest kernel.

    python -m tests.tools.matrix_table JUNIT_XML > results/matrix-DATE/README.md

Each test case carries the host it ran on and its guest kernel as JUnit properties (``xen_host``,
``guest_kernel``; tests/e2e/conftest.py records them): Xen 4.17.5 and 4.17.7 on Debian 12, 4.20.4
on Debian 13, ``none`` for a test that boots no Xen, ``several`` for one that boots hosts in
turn. The ``xen-*`` and ``linux-*`` parts of a
parametrized test's id are dropped from its name, the rest stays. Cells: ``pass``, ``FAIL``,
``skip`` or ``error``, with the seconds taken.
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass

MATRIX_PARAMS_RE = re.compile(r"(?:^|-)(?:xen-\d+\.\d+\.\d+|linux-\d+\.\d+)(?=-|$)")
PLATFORM_OF_HOST = {"4.17.5": "Debian 12", "4.17.7": "Debian 12", "4.20.4": "Debian 13"}


@dataclass(frozen=True)
class Outcome:
    test: str
    host: str
    kernel: str
    result: str
    seconds: float


def _name_without_matrix(name: str) -> str:
    """``test_x[xen-4.20.4-linux-6.12-foo]`` -> ``test_x[foo]``."""
    match = re.fullmatch(r"(?P<base>[^\[]+)\[(?P<params>.*)\]", name)
    if match is None:
        return name
    rest = MATRIX_PARAMS_RE.sub("", match.group("params")).strip("-")
    return match.group("base") + (f"[{rest}]" if rest else "")


def outcomes(xml_text: str) -> list[Outcome]:
    root = ElementTree.fromstring(xml_text)
    found = []
    for case in root.iter("testcase"):
        module = case.get("classname", "").rsplit(".", 1)[-1]
        properties = {prop.get("name"): prop.get("value") for prop in case.iter("property")}
        if case.find("failure") is not None:
            result = "FAIL"
        elif case.find("error") is not None:
            result = "error"
        elif case.find("skipped") is not None:
            result = "skip"
        else:
            result = "pass"
        found.append(Outcome(f"{module}::{_name_without_matrix(case.get('name', ''))}",
                             properties.get("xen_host") or "none", properties.get("guest_kernel") or "none",
                             result, float(case.get("time", "0"))))
    return found


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")) if re.fullmatch(r"[\d.]+", text) else ()


def _column_order(column: tuple[str, str]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return _version(column[0]), _version(column[1])


def _column_title(host: str, kernel: str) -> str:
    if host == "none":
        return "no Xen"
    if host == "several":
        return f"several hosts in turn, Linux {kernel} guest"
    return f"Xen {host} ({PLATFORM_OF_HOST.get(host, 'unknown host')}), Linux {kernel} guest"


def table(found: list[Outcome]) -> str:
    columns = sorted({(outcome.host, outcome.kernel) for outcome in found}, key=_column_order)
    rows: dict[str, dict[tuple[str, str], Outcome]] = {}
    for outcome in found:
        rows.setdefault(outcome.test, {})[(outcome.host, outcome.kernel)] = outcome
    header = "| test | " + " | ".join(_column_title(host, kernel) for host, kernel in columns) + " |"
    lines = [header, "|---|" + "---|" * len(columns)]
    # A test that skipped wherever it was collected (the contract suites on the host: they run
    # inside dom0 through test_contract_suites_in_dom0) gets a line below, not a row of skips.
    skipped_everywhere = sorted(test for test, cells in rows.items()
                                if all(outcome.result == "skip" for outcome in cells.values()))
    for test in sorted(set(rows) - set(skipped_everywhere)):
        cells = []
        for column in columns:
            outcome = rows[test].get(column)
            cells.append("-" if outcome is None else f"{outcome.result} ({outcome.seconds:.0f} s)")
        lines.append(f"| {test} | " + " | ".join(cells) + " |")
    counts = {result: sum(1 for outcome in found if outcome.result == result)
              for result in ("pass", "FAIL", "error", "skip")}
    if skipped_everywhere:
        lines.append("")
        lines.append(f"Skipped wherever they were collected ({len(skipped_everywhere)}): "
                     + ", ".join(skipped_everywhere) + ".")
    lines.append("")
    lines.append(", ".join(f"{count} {result}" for result, count in counts.items()) +
                 f"; {sum(outcome.seconds for outcome in found) / 60:.0f} minutes of tests")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m tests.tools.matrix_table JUNIT_XML", file=sys.stderr)
        return 2
    with open(argv[1], encoding="utf-8") as xml_file:
        sys.stdout.write(table(outcomes(xml_file.read())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
