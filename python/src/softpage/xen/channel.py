"""``XenSoftPageChannel``: the dom0 side of docs/spec/guest-protocol.md.

Everything the guest publishes (xenstore keys, the header, the list pages) is
untrusted. The geometry is checked before anything beyond the header page is
mapped, and bounded by the domain's own size, so a lying guest can make dom0
map at most ``1 + 64 + 4 * ceil(p2m_size / 32768)`` pages (``p2m_size`` being bounded in
turn by what the domain can own, ``softpage.xen.backend.p2m_size_limit``: about 9 MiB of
mappings for a 64 GiB guest) and never crash it: any failure while connecting gives no
channel and a reason the caller logs (the migration then runs as plain precopy).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import numpy as np

from softpage import abi
from softpage.backend import DropOutcome
from softpage.categories import CacheMode
from softpage.errors import BackendError
from softpage.xen.ctrl import DomainState
from softpage.xenstore import XenStore

PROTOCOL_VERSION = str(abi.VERSION)
READY = abi.XS_STATE_READY
FEATURE_DROP = "1"
"""``feature-drop`` when the guest answers ``drop``; any other value, or none, means it does not."""
FEATURE_CACHE_COLD = "1"
"""``feature-cache-cold`` when the guest honours ``prune-cache``; anything else: it does not."""
MAX_U32 = (1 << 32) - 1
POLL_INTERVALS = (0.001, 0.005, 0.02, 0.05)
"""Seconds between header polls while waiting: quick at first (the guest
usually answers within a scan), then gentle on a 2-core dom0."""
DROP_POLL_INTERVALS = (0.01, 0.02, 0.05, 0.1)
"""Seconds between reads of ``dropped``: a drop takes up to seconds, and every
xenstore read is a round trip to xenstored, slow in an emulated dom0."""
STATE_CHECK_INTERVAL = 0.5
"""Seconds between checks, while waiting on the guest, that its domain still runs: a guest that
crashed answers nothing, and the wait then ends at once with the reason, not at its timeout."""
TORN_RETRIES = 8
"""Copies ``read_current`` tries before giving up on a guest mid-publish."""

ResultT = TypeVar("ResultT")


def softpage_home(domid: int) -> str:
    return f"/local/domain/{domid}/{abi.XS_DIR}"


ARMED = abi.XS_ARMED
"""The key under ``softpage_home`` that arms the guest: "1" before the first request, "0" on
cancel (docs/spec/guest-protocol.md)."""


class PageMapping(Protocol):
    """A read-only mapping of granted pages (``gnttab.GrantMapping``)."""

    view: memoryview

    def unmap(self) -> None: ...


class GrantMapper(Protocol):
    def map_readonly(self, domid: int, refs: list[int]) -> PageMapping: ...

    def close(self) -> None: ...


class EventNotifier(Protocol):
    def bind_interdomain(self, domid: int, remote_port: int) -> int: ...

    def notify(self, local_port: int) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ChannelKeys:
    """The guest's xenstore keys, parsed."""

    header_gref: int
    event_channel: int


def parse_u32(text: str | None, key: str, minimum: int = 0) -> int:
    """A decimal u32 the guest wrote; ``BackendError`` naming the key otherwise."""
    if text is None:
        raise BackendError(f"{key}: expected a decimal number, the key is absent")
    stripped = text.strip()
    if not stripped.isdigit() or not stripped.isascii():
        raise BackendError(f"{key}: expected a decimal number, got {text[:32]!r}")
    value = int(stripped)
    if not minimum <= value <= MAX_U32:
        raise BackendError(f"{key}: expected {minimum}..{MAX_U32}, got {value}")
    return value


def read_keys(store: XenStore, domid: int) -> ChannelKeys | None:
    """None if the guest has no module (``state`` absent); ``BackendError`` if
    the keys are there but unusable."""
    home = softpage_home(domid)
    state = store.read(f"{home}/{abi.XS_STATE}")
    if state is None:
        return None
    if state != READY:
        raise BackendError(f"{home}/{abi.XS_STATE}: expected {READY!r}, got {state[:32]!r}")
    version = store.read(f"{home}/{abi.XS_VERSION}")
    if version != PROTOCOL_VERSION:
        raise BackendError(f"{home}/{abi.XS_VERSION}: expected {PROTOCOL_VERSION!r}, got {version!r}")
    header_gref = f"{home}/{abi.XS_HEADER_GREF}"
    event_channel = f"{home}/{abi.XS_EVENT_CHANNEL}"
    return ChannelKeys(
        header_gref=parse_u32(store.read(header_gref), header_gref),
        event_channel=parse_u32(store.read(event_channel), event_channel, minimum=1),
    )


@dataclass(frozen=True)
class Geometry:
    """The fixed shape of the guest's publication, from a checked header."""

    nr_pfns: int
    frames_per_category: int
    list_grefs: tuple[int, ...]

    @property
    def nr_bitmap_frames(self) -> int:
        return abi.NR_CATEGORIES * self.frames_per_category


def check_geometry(header_page: bytes | memoryview, p2m_size: int) -> Geometry:
    """Validate the header fields that decide how much dom0 maps, bounded by
    the domain's ``p2m_size``; ``BackendError`` says which one is wrong."""
    header = abi.unpack_header(header_page)
    if header.magic != abi.MAGIC:
        raise BackendError(f"header magic: expected {abi.MAGIC:#010x}, got {header.magic:#010x}")
    if header.version != abi.VERSION:
        raise BackendError(f"header version: expected {abi.VERSION}, got {header.version}")
    if header.header_size != abi.HEADER.size:
        raise BackendError(f"header_size: expected {abi.HEADER.size}, got {header.header_size}")
    if not 1 <= header.nr_pfns <= p2m_size:
        raise BackendError(f"nr_pfns: expected 1..{p2m_size} (the domain's p2m size), got {header.nr_pfns}")
    frames = abi.frames_per_category(header.nr_pfns)
    if header.frames_per_category != frames:
        raise BackendError(
            f"frames_per_category: expected {frames} for nr_pfns {header.nr_pfns}, "
            f"got {header.frames_per_category}"
        )
    list_frames = abi.nr_list_frames(frames)
    if header.nr_list_frames != list_frames or list_frames > abi.MAX_LIST_FRAMES:
        raise BackendError(
            f"nr_list_frames: expected {list_frames} (at most {abi.MAX_LIST_FRAMES}), "
            f"got {header.nr_list_frames}"
        )
    return Geometry(
        nr_pfns=header.nr_pfns,
        frames_per_category=frames,
        list_grefs=tuple(header.list_gref[:list_frames]),
    )


def bitmap_grefs(list_pages: bytes | memoryview, geometry: Geometry) -> list[int]:
    """The bitmap grant refs, category-major, from the copied list pages."""
    refs = np.frombuffer(list_pages, dtype="<u4")[: geometry.nr_bitmap_frames]
    if refs.size != geometry.nr_bitmap_frames:
        raise BackendError(f"list pages name {refs.size} bitmap refs, expected {geometry.nr_bitmap_frames}")
    return [int(ref) for ref in refs]


def _generation(header_view: memoryview) -> int:
    return int(abi.GENERATION.unpack_from(header_view, abi.GENERATION_OFFSET)[0])


def _request_id(header_view: memoryview) -> int:
    return int(abi.REQUEST_ID.unpack_from(header_view, abi.REQUEST_ID_OFFSET)[0])


class XenSoftPageChannel:
    """``softpage.backend.SoftPageChannel`` over grants, xenstore and an event channel."""

    def __init__(
        self,
        domid: int,
        store: XenStore,
        header: PageMapping,
        bitmaps: PageMapping,
        events: EventNotifier,
        local_port: int,
        close_handles: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        domain_state: Callable[[], DomainState] | None = None,
    ) -> None:
        self.domid = domid
        self._store = store
        self._home = softpage_home(domid)
        self._header: PageMapping | None = header
        self._bitmaps: PageMapping | None = bitmaps
        self._events = events
        self._local_port = local_port
        self._close_handles = close_handles
        self._clock = clock
        self._sleep = sleep
        self._domain_state = domain_state

    @classmethod
    def connect(
        cls,
        domid: int,
        store: XenStore,
        p2m_size: int,
        grants: GrantMapper,
        events: EventNotifier,
        domain_state: Callable[[], DomainState] | None = None,
    ) -> tuple[XenSoftPageChannel | None, str | None]:
        """``(channel, None)``, or ``(None, reason)`` when the guest has no usable
        channel. On failure ``grants`` and ``events`` are closed; on success
        the channel owns them. ``domain_state``, when given, ends a wait on the guest as soon
        as its domain has crashed or shut down (``DomainState.gone``)."""
        header: PageMapping | None = None
        bitmaps: PageMapping | None = None

        def close_handles() -> None:
            grants.close()
            events.close()

        try:
            keys = read_keys(store, domid)
            if keys is None:
                close_handles()
                return None, f"dom {domid}: no softpage module ({softpage_home(domid)}/state absent)"
            header = grants.map_readonly(domid, [keys.header_gref])
            geometry = check_geometry(bytes(header.view[: abi.HEADER.size]), p2m_size)
            list_mapping = grants.map_readonly(domid, list(geometry.list_grefs))
            try:
                refs = bitmap_grefs(bytes(list_mapping.view), geometry)
            finally:
                list_mapping.unmap()
            bitmaps = grants.map_readonly(domid, refs)
            local_port = events.bind_interdomain(domid, keys.event_channel)
        except (BackendError, OSError) as error:
            # Already failing: the reason returned below is the one that matters.
            with contextlib.suppress(BackendError, OSError):
                for mapping in (bitmaps, header):
                    if mapping is not None:
                        mapping.unmap()
            with contextlib.suppress(BackendError, OSError):
                close_handles()
            return None, f"dom {domid}: soft-page channel unusable: {error}"
        return cls(domid, store, header, bitmaps, events, local_port, close_handles,
                   domain_state=domain_state), None

    # -- SoftPageChannel ---------------------------------------------------
    def arm(self, armed: bool) -> None:
        self._store.write(f"{self._home}/{ARMED}", "1" if armed else "0")

    def request(self, request_id: int) -> None:
        self._store.write(f"{self._home}/{abi.XS_REQUEST}", str(request_id))
        self._events.notify(self._local_port)

    def request_final(self, request_id: int) -> None:
        self._store.write(f"{self._home}/{abi.XS_REQUEST}", str(request_id))

    def prune_cache(self, mode: CacheMode) -> bool:
        if self._store.read(f"{self._home}/{abi.XS_FEATURE_CACHE_COLD}") != FEATURE_CACHE_COLD:
            return False
        self._store.write(f"{self._home}/{abi.XS_PRUNE_CACHE}", mode.value)
        return True

    def drop_caches(self, drop_id: int, timeout: float) -> DropOutcome:
        if self._store.read(f"{self._home}/{abi.XS_FEATURE_DROP}") != FEATURE_DROP:
            return DropOutcome.UNSUPPORTED
        answer = str(drop_id)
        self._store.write(f"{self._home}/{abi.XS_DROP}", answer)

        def acknowledged() -> DropOutcome | None:
            # Anything else, malformed included, means "not answered yet".
            return DropOutcome.DONE if self._store.read(f"{self._home}/{abi.XS_DROPPED}") == answer else None

        outcome = self._poll(acknowledged, timeout, DROP_POLL_INTERVALS)
        return DropOutcome.TIMED_OUT if outcome is None else outcome

    def read(self, request_id: int, timeout: float) -> bytes | None:
        header, _bitmaps = self._mappings()

        def answered() -> bytes | None:
            if _request_id(header.view) != request_id:
                return None
            copy = self._consistent_copy()
            return copy if copy is not None and _request_id(memoryview(copy)) == request_id else None

        return self._poll(answered, timeout, POLL_INTERVALS)

    def read_current(self) -> bytes | None:
        for _attempt in range(TORN_RETRIES):
            copy = self._consistent_copy()
            if copy is not None:
                return copy
            self._sleep(POLL_INTERVALS[0])
        return None

    # -- life cycle ----------------------------------------------------------
    def close(self) -> None:
        """Unmap and unbind; idempotent. The first error is raised after every step ran."""
        errors: list[Exception] = []
        for mapping in (self._bitmaps, self._header):
            if mapping is not None:
                try:
                    mapping.unmap()
                except (BackendError, OSError) as error:
                    errors.append(error)
        if self._header is None and self._bitmaps is None:
            return
        self._header = self._bitmaps = None
        try:
            self._close_handles()
        except (BackendError, OSError) as error:
            errors.append(error)
        if errors:
            raise errors[0]

    # -- helpers ---------------------------------------------------------------
    def _mappings(self) -> tuple[PageMapping, PageMapping]:
        if self._header is None or self._bitmaps is None:
            raise BackendError(f"dom {self.domid}: soft-page channel used after close()")
        return self._header, self._bitmaps

    def _poll(
        self, attempt: Callable[[], ResultT | None], timeout: float, intervals: tuple[float, ...]
    ) -> ResultT | None:
        """``attempt()`` until it returns something other than None, sleeping ``intervals``
        in between (the last one repeats); None once ``timeout`` seconds have passed."""
        started = self._clock()
        deadline, next_check = started + timeout, started + STATE_CHECK_INTERVAL
        tries = 0
        while (result := attempt()) is None:
            now = self._clock()
            remaining = deadline - now
            if self._domain_state is not None and now >= next_check:
                next_check = now + STATE_CHECK_INTERVAL
                gone = self._domain_state().gone
                if gone is not None:
                    raise BackendError(f"dom {self.domid} {gone} while dom0 waited for its softpage module")
            if remaining <= 0:
                return None
            self._sleep(min(remaining, intervals[min(tries, len(intervals) - 1)]))
            tries += 1
        return result

    def _consistent_copy(self) -> bytes | None:
        """Header page + bitmap pages under the generation seqlock, or None if torn."""
        header, bitmaps = self._mappings()
        before = _generation(header.view)
        if before % 2:
            return None
        copy = bytes(header.view) + bytes(bitmaps.view)
        if _generation(header.view) != before or _generation(memoryview(copy)) != before:
            return None
        return copy
