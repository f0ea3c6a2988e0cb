"""XenSoftPageChannel against FakeSoftPageGuest (grants on FakeXen, keys in MemoryStore)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from softpage import abi, bitmap
from softpage.backend import DropOutcome
from softpage.categories import CacheMode
from softpage.errors import BackendError
from softpage.pfnset import PfnSet
from softpage.snapshot import SnapshotState, SoftSnapshot
from softpage.xen.channel import XenSoftPageChannel, check_geometry, parse_u32, read_keys
from softpage.xen.ctrl import (
    XEN_DOMINF_HVM_GUEST,
    XEN_DOMINF_SHUTDOWN,
    XEN_DOMINF_SHUTDOWN_SHIFT,
    DomainState,
)
from softpage.xen.evtchn import EventChannels
from softpage.xen.gnttab import GrantTable
from softpage.xenstore import MemoryStore
from tests.xen_fakes import PAGE_SIZE, FakeDomain, FakeSoftPageGuest, FakeXen, fake_binding

DOMID = 4
NR_PFNS = 70_000  # three bitmap pages per category
P2M_SIZE = NR_PFNS + 16
HOME = f"/local/domain/{DOMID}/data/softpage"


def connect(
    lib: FakeXen, binding: object, store: MemoryStore, p2m_size: int = P2M_SIZE
) -> tuple[XenSoftPageChannel | None, str | None]:
    return XenSoftPageChannel.connect(
        DOMID,
        store,
        p2m_size,
        GrantTable.open(binding),  # type: ignore[arg-type]
        EventChannels.open(binding),  # type: ignore[arg-type]
    )


@pytest.fixture
def world() -> tuple[FakeXen, object, MemoryStore, FakeSoftPageGuest]:
    binding, lib = fake_binding([FakeDomain(domid=DOMID, nr_pfns=8)])
    store = MemoryStore()
    guest = FakeSoftPageGuest(lib, store, DOMID, NR_PFNS)
    return lib, binding, store, guest


def snapshot(
    request_id: int, free_pfns: list[int], state: SnapshotState = SnapshotState.SNAPSHOT
) -> SoftSnapshot:
    empty = PfnSet.empty(NR_PFNS)
    return SoftSnapshot(
        state=state,
        generation=0,
        request_id=request_id,
        flags=0,
        guest_nr_pfns=NR_PFNS,
        scan_ns=1000,
        free=PfnSet.from_pfns(NR_PFNS, free_pfns),
        cache=empty,
        slab=empty,
        held=empty,
    )


def test_no_module_means_no_channel_and_a_reason(world: tuple) -> None:
    lib, binding, _store, _guest = world
    handles = lib.open_handles
    channel, reason = connect(lib, binding, MemoryStore())
    assert channel is None and reason is not None and "state absent" in reason
    assert lib.open_handles == handles  # gnttab and evtchn handles closed again


def test_request_read_round_trip_decodes(world: tuple) -> None:
    lib, binding, store, guest = world
    channel, reason = connect(lib, binding, store)
    assert channel is not None and reason is None
    channel.arm(True)
    assert store.read(f"{HOME}/armed") == "1"
    channel.request(5)
    assert store.read(f"{HOME}/request") == "5" and len(lib.notified) == 1
    expected = guest.publish(snapshot(5, [0, 1, 40_000, NR_PFNS - 1]))
    copy = channel.read(5, timeout=1.0)
    assert copy == expected
    assert len(copy) == PAGE_SIZE * (1 + 4 * 3)
    decoded = bitmap.decode(copy, P2M_SIZE)
    assert decoded.request_id == 5 and sorted(decoded.free.to_pfns().tolist()) == [0, 1, 40_000, NR_PFNS - 1]
    channel.request_final(6)
    assert store.read(f"{HOME}/request") == "6" and len(lib.notified) == 1


def fake_time(
    on_sleep: Callable[[], None] = lambda: None,
) -> tuple[Callable[[], float], Callable[[float], None]]:
    now = [0.0]

    def clock() -> float:
        return now[0]

    def sleep(seconds: float) -> None:
        now[0] += seconds
        on_sleep()

    return clock, sleep


def test_read_times_out_on_another_request_id(world: tuple) -> None:
    lib, binding, store, guest = world
    channel, _ = connect(lib, binding, store)
    assert channel is not None
    channel._clock, channel._sleep = fake_time()
    guest.publish(snapshot(4, [1]))
    assert channel.read(5, timeout=0.5) is None


def test_read_waits_out_an_odd_generation(world: tuple) -> None:
    lib, binding, store, guest = world
    channel, _ = connect(lib, binding, store)
    assert channel is not None
    expected = guest.publish(snapshot(7, [3]))
    guest.begin_write()  # mid-publish: odd generation
    sleeps: list[int] = []

    def finish_after_two_polls() -> None:
        sleeps.append(1)
        if len(sleeps) == 2:
            guest.generation += 1
            guest.pages[16:24] = guest.generation.to_bytes(8, "little")

    channel._clock, channel._sleep = fake_time(finish_after_two_polls)
    copy = channel.read(7, timeout=1.0)
    assert copy is not None and len(sleeps) == 2
    assert copy[24:] == expected[24:]
    assert bitmap.decode(copy, P2M_SIZE).generation == guest.generation


def test_read_current_gives_up_on_a_guest_stuck_mid_publish(world: tuple) -> None:
    lib, binding, store, guest = world
    channel, _ = connect(lib, binding, store)
    assert channel is not None
    assert channel.read_current() is not None
    guest.begin_write()
    channel._clock, channel._sleep = fake_time()
    assert channel.read_current() is None


# -- the early drop ------------------------------------------------------------
DROP_ID = 1_700_000_000_000_000_000


def recording_time(
    on_sleep: Callable[[int], None] = lambda polls: None,
) -> tuple[Callable[[], float], Callable[[float], None], list[float]]:
    """``fake_time`` that also keeps every sleep; ``on_sleep`` gets how many there were so far."""
    sleeps: list[float] = []
    clock, advance = fake_time(lambda: on_sleep(len(sleeps)))

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        advance(seconds)

    return clock, sleep, sleeps


@pytest.mark.parametrize("feature", [None, "0", "2", " 1", "yes"])
def test_drop_without_feature_drop_is_unsupported_and_writes_nothing(
    world: tuple, feature: str | None
) -> None:
    lib, binding, store, _guest = world
    channel, _ = connect(lib, binding, store)
    assert channel is not None
    if feature is not None:
        store.write(f"{HOME}/feature-drop", feature)
    channel._clock, channel._sleep, sleeps = recording_time()
    before = store.snapshot()
    assert channel.drop_caches(DROP_ID, timeout=1.0) is DropOutcome.UNSUPPORTED
    assert store.snapshot() == before and sleeps == []


def test_drop_is_done_when_the_guest_answers_the_id(world: tuple) -> None:
    lib, binding, store, _guest = world
    channel, _ = connect(lib, binding, store)
    assert channel is not None
    store.write(f"{HOME}/feature-drop", "1")
    store.write(f"{HOME}/dropped", str(DROP_ID - 1))  # an earlier drop's answer

    def answer_after_five_polls(polls: int) -> None:
        assert store.read(f"{HOME}/drop") == str(DROP_ID)
        if polls == 5:
            store.write(f"{HOME}/dropped", str(DROP_ID))

    channel._clock, channel._sleep, sleeps = recording_time(answer_after_five_polls)
    assert channel.drop_caches(DROP_ID, timeout=30.0) is DropOutcome.DONE
    assert len(sleeps) == 5
    assert sleeps[0] == pytest.approx(0.01) and sleeps == sorted(sleeps) and max(sleeps) == pytest.approx(0.1)


def test_drop_times_out_without_an_answer(world: tuple) -> None:
    lib, binding, store, _guest = world
    channel, _ = connect(lib, binding, store)
    assert channel is not None
    store.write(f"{HOME}/feature-drop", "1")
    channel._clock, channel._sleep, sleeps = recording_time()
    assert channel.drop_caches(DROP_ID, timeout=2.0) is DropOutcome.TIMED_OUT
    assert store.read(f"{HOME}/drop") == str(DROP_ID)
    assert sum(sleeps) == pytest.approx(2.0) and max(sleeps) == pytest.approx(0.1)
    assert len(sleeps) < 30  # backed off: about 20 polls in two seconds, not 200


def test_a_guest_that_crashed_ends_the_wait_at_once_with_the_reason(world: tuple) -> None:
    """Its domain shut down (an HVM or PVH triple fault: reason reboot) during a drop: a
    BackendError within a state check (0.5 s), not a timeout after the whole wait; a report
    wait ends the same way. A suspended domain is no reason (dom0 suspended it)."""
    _lib, binding, store, _guest = world
    states = [DomainState(DOMID, XEN_DOMINF_HVM_GUEST, 100, 100, 1, 0, 0)]
    channel, _ = XenSoftPageChannel.connect(DOMID, store, P2M_SIZE, GrantTable.open(binding),
                                            EventChannels.open(binding), lambda: states[-1])
    assert channel is not None
    store.write(f"{HOME}/feature-drop", "1")

    def crash_after_a_second(_polls: int) -> None:
        if clock() >= 1.0 and len(states) == 1:
            reboot = XEN_DOMINF_HVM_GUEST | XEN_DOMINF_SHUTDOWN | (1 << XEN_DOMINF_SHUTDOWN_SHIFT)
            states.append(dataclasses.replace(states[0], flags=reboot))

    clock, channel._sleep, sleeps = recording_time(crash_after_a_second)
    channel._clock = clock
    with pytest.raises(BackendError, match=r"dom 4 shut down \(reason reboot or a triple fault"):
        channel.drop_caches(DROP_ID, timeout=60.0)
    assert sum(sleeps) <= 1.6
    with pytest.raises(BackendError, match="shut down"):
        channel.read(7, timeout=60.0)
    suspend = XEN_DOMINF_HVM_GUEST | XEN_DOMINF_SHUTDOWN | (2 << XEN_DOMINF_SHUTDOWN_SHIFT)
    states.append(dataclasses.replace(states[0], flags=suspend))
    assert channel.read(8, timeout=2.0) is None  # suspended: the wait runs its course


@pytest.mark.parametrize(
    "dropped", [f"{DROP_ID} ", f"0{DROP_ID}", f"{DROP_ID}0", str(DROP_ID - 1), "", "-1", "garbage"]
)
def test_a_malformed_or_other_dropped_value_is_not_an_answer(world: tuple, dropped: str) -> None:
    lib, binding, store, _guest = world
    channel, _ = connect(lib, binding, store)
    assert channel is not None
    store.write(f"{HOME}/feature-drop", "1")
    store.write(f"{HOME}/dropped", dropped)
    channel._clock, channel._sleep, _sleeps = recording_time()
    assert channel.drop_caches(DROP_ID, timeout=0.5) is DropOutcome.TIMED_OUT


def test_close_unmaps_and_closes_everything_once(world: tuple) -> None:
    lib, binding, store, _guest = world
    handles = lib.open_handles
    channel, _ = connect(lib, binding, store)
    assert channel is not None and lib.live_mappings and lib.bound_ports
    channel.close()
    channel.close()
    assert not lib.live_mappings and not lib.bound_ports and lib.open_handles == handles
    with pytest.raises(BackendError, match="after close"):
        channel.read_current()


def lie(guest: FakeSoftPageGuest, offset: int, value: int, size: int) -> None:
    guest.pages[offset : offset + size] = value.to_bytes(size, "little")


@pytest.mark.parametrize(
    ("offset", "size", "value", "complaint"),
    [
        (0, 4, 0xDEADBEEF, "magic"),
        (4, 2, 2, "version"),
        (6, 2, 256, "header_size"),
        (32, 8, P2M_SIZE + 1, "nr_pfns"),
        (32, 8, 1 << 40, "nr_pfns"),
        (32, 8, 0, "nr_pfns"),
        (40, 4, 4000, "frames_per_category"),
        (44, 4, 64, "nr_list_frames"),
    ],
)
def test_lying_header_maps_nothing_more(
    world: tuple, offset: int, size: int, value: int, complaint: str
) -> None:
    lib, binding, store, guest = world
    lie(guest, offset, value, size)
    handles = lib.open_handles
    channel, reason = connect(lib, binding, store)
    assert channel is None and reason is not None and complaint in reason
    assert [call for call in lib.calls if call[0] == "grant-map"] == [("grant-map", 1)]
    assert not lib.live_mappings and lib.open_handles == handles


@pytest.mark.parametrize(
    ("key", "value", "complaint"),
    [
        ("state", "loading", "state"),
        ("version", "2", "version"),
        ("header-gref", "-1", "header-gref"),
        ("header-gref", "4294967296", "header-gref"),
        ("header-gref", "12abc", "header-gref"),
        ("event-channel", "0", "event-channel"),
    ],
)
def test_bad_keys_give_a_reason(world: tuple, key: str, value: str, complaint: str) -> None:
    lib, binding, store, _guest = world
    store.write(f"{HOME}/{key}", value)
    channel, reason = connect(lib, binding, store)
    assert channel is None and reason is not None and complaint in reason
    assert not lib.live_mappings


def test_unknown_grant_is_a_reason_not_a_crash(world: tuple) -> None:
    lib, binding, store, _guest = world
    store.write(f"{HOME}/header-gref", "9999")
    channel, reason = connect(lib, binding, store)
    assert channel is None and reason is not None and "xengnttab_map_domain_grant_refs" in reason


def test_failed_event_channel_bind_unmaps_the_grants(world: tuple) -> None:
    lib, binding, store, _guest = world
    lib.fail["xenevtchn_bind_interdomain"] = 22
    channel, reason = connect(lib, binding, store)
    assert channel is None and reason is not None and "xenevtchn_bind_interdomain" in reason
    assert not lib.live_mappings


OFFSETS = {name: offset for name, offset, _elements in abi.HEADER_FIELDS}


def grant_pages_mapped(lib: FakeXen) -> list[int]:
    return [call[1] for call in lib.calls if call[0] == "grant-map"]


def test_the_most_a_header_can_make_dom0_map_is_bounded_by_the_p2m_size() -> None:
    """A guest as large as the domain allows: 1 + list pages + 4 * ceil(p2m_size / 32768)."""
    binding, lib = fake_binding([FakeDomain(domid=DOMID, nr_pfns=8)])
    store = MemoryStore()
    FakeSoftPageGuest(lib, store, DOMID, P2M_SIZE)
    channel, reason = connect(lib, binding, store)
    assert channel is not None, reason
    frames = abi.frames_per_category(P2M_SIZE)
    assert grant_pages_mapped(lib) == [1, abi.nr_list_frames(frames), abi.NR_CATEGORIES * frames]
    channel.close()


@pytest.mark.parametrize("nr_pfns", [abi.MAX_NR_PFNS + 1, 1 << 40])
def test_a_consistent_header_beyond_the_abi_maps_only_the_header(world: tuple, nr_pfns: int) -> None:
    """Sizes that agree with each other but need more than SOFTPAGE_MAX_LIST_FRAMES list pages:
    refused after the header page, even for a domain whose p2m would allow them."""
    lib, binding, store, guest = world
    frames = abi.frames_per_category(nr_pfns)
    lie(guest, OFFSETS["nr_pfns"], nr_pfns, 8)
    lie(guest, OFFSETS["frames_per_category"], frames, 4)
    lie(guest, OFFSETS["nr_list_frames"], abi.nr_list_frames(frames), 4)
    channel, reason = connect(lib, binding, store, p2m_size=nr_pfns)
    assert channel is None and reason is not None and "nr_list_frames" in reason, reason
    assert grant_pages_mapped(lib) == [1]
    assert not lib.live_mappings


def test_guest_bigger_than_the_domain_is_refused() -> None:
    binding, lib = fake_binding([FakeDomain(domid=DOMID, nr_pfns=8)])
    store = MemoryStore()
    FakeSoftPageGuest(lib, store, DOMID, NR_PFNS)
    channel, reason = connect(lib, binding, store, p2m_size=NR_PFNS - 1)
    assert channel is None and reason is not None and "nr_pfns" in reason


def test_parse_u32_and_read_keys() -> None:
    assert parse_u32(" 42\n", "k") == 42
    with pytest.raises(BackendError, match="absent"):
        parse_u32(None, "k")
    with pytest.raises(BackendError):
        parse_u32("٣", "k")  # a non-ASCII digit
    assert read_keys(MemoryStore(), 3) is None


def test_check_geometry_accepts_what_the_guest_model_publishes() -> None:
    empty = PfnSet.empty(NR_PFNS)
    encoded = bitmap.encode(
        SoftSnapshot(SnapshotState.EMPTY, 0, 0, 0, NR_PFNS, 0, empty, empty, empty, empty), list_grefs=[9]
    )
    geometry = check_geometry(encoded[: abi.HEADER.size], P2M_SIZE)
    assert (geometry.nr_pfns, geometry.frames_per_category, geometry.list_grefs) == (NR_PFNS, 3, (9,))
    assert geometry.nr_bitmap_frames == 12


@pytest.mark.parametrize("mode", list(CacheMode))
def test_prune_cache_is_written_to_a_guest_that_knows_it(world: tuple, mode: CacheMode) -> None:
    lib, binding, store, _guest = world
    channel, _ = connect(lib, binding, store)
    assert channel is not None
    store.write(f"{HOME}/feature-cache-cold", "1")
    store.write(f"{HOME}/prune-cache", "all")
    assert channel.prune_cache(mode) is True
    assert store.read(f"{HOME}/prune-cache") == mode.value


@pytest.mark.parametrize("feature", [None, "0", "yes", "1 "])
def test_prune_cache_without_the_feature_writes_nothing(world: tuple, feature: str | None) -> None:
    lib, binding, store, _guest = world
    channel, _ = connect(lib, binding, store)
    assert channel is not None
    if feature is not None:
        store.write(f"{HOME}/feature-cache-cold", feature)
    before = store.snapshot()
    assert channel.prune_cache(CacheMode.COLD) is False
    assert store.snapshot() == before
