"""refill_probe's reading of Xen's log and naming of a dumped RIP."""

from __future__ import annotations

from pathlib import Path

from tests.bench.refill_probe import name_rip, symbols, triple_faults

XEN_LOG = """\
(XEN) [ 1896.890091] HVM3 restore: TSC_ADJUST 0
(XEN) [ 1902.878190] d3v0: upcall vector f3
(XEN) [ 1960.507257] d3v0 Triple fault - invoking HVM shutdown action 1
(XEN) [ 1960.507986] *** Dumping Dom3 vcpu#0 state: ***
(XEN) [ 1960.508584] ----[ Xen-4.17.7  x86_64  debug=n  Not tainted ]----
(XEN) [ 1960.509137] CPU:    0
(XEN) [ 1960.509318] RIP:    0010:[<ffffffff819f69b7>]
(XEN) [ 1960.509675] RFLAGS: 0000000000000246   CONTEXT: hvm guest (d3v0)
(XEN) [ 2001.000001] d4v0 Triple fault - invoking HVM shutdown action 1
"""

SYSTEM_MAP = """\
ffffffff81000000 T _text
ffffffff819f69b0 T clear_page_rep
ffffffff819f69c0 T clear_page_orig
ffffffff82000000 D some_data
"""


def test_each_triple_fault_with_the_rip_dumped_after_it() -> None:
    assert triple_faults(XEN_LOG) == [("d3", "1960.507257", ("0010", "ffffffff819f69b7")),
                                      ("d4", "2001.000001", None)]
    assert triple_faults("(XEN) [ 1.0] d1v0: upcall vector f3\n") == []


def test_a_guest_rip_is_named_from_the_system_map(tmp_path: Path) -> None:
    path = tmp_path / "System.map"
    path.write_text(SYSTEM_MAP)
    table = symbols(str(path))
    assert table[1] == ["_text", "clear_page_rep", "clear_page_orig"]
    assert name_rip("ffffffff819f69b7", table) == "ffffffff819f69b7 (clear_page_rep+0x7)"
    # Xen's own text and an unnamed table stay bare
    assert name_rip("ffff82d0402044a5", table) == "ffff82d0402044a5"
    assert name_rip("ffffffff819f69b7", symbols("")) == "ffffffff819f69b7"
