"""A link and sender cost model: time from what the driver actually sent.

The time of a batch is its wire bytes over the bandwidth, plus a CPU cost per
data page (foreign map and copy on the sender) and per PAGE_DATA record
(hypercalls, ``writev``). ``SimClock`` adds the batches up and lets guest
work run for the same simulated time, so a slower round sees more pages
dirtied, as on a real host.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from softpage.errors import BackendError

GIGABIT_ETHERNET_MBIT_S = 940.0
"""TCP goodput of a 1 GbE link."""


@dataclass(frozen=True)
class LinkModel:
    bandwidth_mbit_s: float = GIGABIT_ETHERNET_MBIT_S
    page_cpu_us: float = 1.5
    """Sender CPU per page sent with data."""
    entry_cpu_us: float = 0.05
    """Sender CPU per entry (data or XALLOC): type lookup and planning."""
    record_overhead_us: float = 25.0
    """Fixed cost of one PAGE_DATA record."""
    round_overhead_ms: float = 2.0
    """Per round: the dirty-log harvest and the snapshot request round trip."""
    suspend_resume_ms: float = 80.0
    """Downtime outside the final round: suspend handshake, resume on the destination."""
    setup_s: float = 0.3
    """Before the first page: the xl handshake and domain creation on the destination."""

    def __post_init__(self) -> None:
        if self.bandwidth_mbit_s <= 0:
            raise BackendError(f"bandwidth: expected > 0 Mbit/s, got {self.bandwidth_mbit_s}")
        for name in ("page_cpu_us", "entry_cpu_us", "record_overhead_us", "round_overhead_ms",
                     "suspend_resume_ms", "setup_s"):
            if getattr(self, name) < 0:
                raise BackendError(f"{name}: expected >= 0, got {getattr(self, name)}")

    def batch_seconds(self, wire_bytes: int, records: int, entries: int, data_pages: int) -> float:
        return (
            wire_bytes * 8 / (self.bandwidth_mbit_s * 1e6)
            + data_pages * self.page_cpu_us * 1e-6
            + entries * self.entry_cpu_us * 1e-6
            + records * self.record_overhead_us * 1e-6
        )


GuestTime = Callable[[float], None]
"""Guest work for a span of simulated seconds."""


class SimClock:
    """Simulated seconds since the migration started."""

    def __init__(self, link: LinkModel, guest_time: GuestTime | None = None) -> None:
        self.link = link
        self.guest_time = guest_time
        self.now = 0.0

    def advance(self, seconds: float, guest_runs: bool = True) -> None:
        self.now += seconds
        if guest_runs and self.guest_time is not None and seconds > 0:
            self.guest_time(seconds)

    def transfer(self, wire_bytes: int, records: int, entries: int, data_pages: int) -> None:
        self.advance(self.link.batch_seconds(wire_bytes, records, entries, data_pages))
