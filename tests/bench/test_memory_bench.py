"""dom0's memory per PFN (memory_bench.py), in `make bench`: the sender for a 64 GiB domain holds
a few bits a PFN plus bounded buffers, and a domain with a hostile GFN is refused holding nothing.

Each case runs in a child process of its own; the figures are printed. The budgets are generous
(the box is shared): the measured figures are in results/memory-*/.
"""

from __future__ import annotations

import pytest

from tests.bench import memory_bench

pytestmark = pytest.mark.slow

BYTES_PER_PFN_BUDGET = 6.0
"""At 2^24 PFNs, everything the migration held (fixed buffers included), over p2m_size."""
REFUSAL_BUDGET_BYTES = 4 << 20


def test_sender_memory_per_pfn_for_64_gib_and_for_a_hostile_gfn(capsys: pytest.CaptureFixture[str]) -> None:
    guest = memory_bench.measure("64gib", memory_bench.DEFAULT_PFNS, memory_bench.DEFAULT_HOSTILE_GFN)
    hostile = memory_bench.measure("hostile", memory_bench.DEFAULT_PFNS, memory_bench.DEFAULT_HOSTILE_GFN)
    with capsys.disabled():
        for result in (guest, hostile):
            print(f"\n{result['case']}: p2m_size {result['p2m_size']:,}: {result['outcome']}; the run held "
                  f"{result['migration_peak_bytes'] / 2**20:.1f} MiB at its peak, "
                  f"{result['bytes_per_pfn']:.3g} bytes/PFN")
    assert guest["outcome"].startswith("migrated")
    assert guest["bytes_per_pfn"] <= BYTES_PER_PFN_BUDGET, guest
    assert hostile["outcome"].startswith("refused"), hostile
    assert hostile["migration_peak_bytes"] <= REFUSAL_BUDGET_BYTES, hostile
