"""MemoryStore behaviour beyond the shared contract (tests/contract/test_xenstore_contract.py)."""

from __future__ import annotations

import queue
import threading

import pytest

from softpage.errors import BackendError
from softpage.xenstore import (
    MAX_PENDING_WATCH_EVENTS,
    MemoryStore,
    WatchEvents,
    XenStoreOps,
    check_path,
    run_transaction,
)


def test_special_watch_paths_fire_only_when_fired() -> None:
    store = MemoryStore()
    with store.watch("@releaseDomain") as release, store.watch("/local") as local:
        assert release.wait(0.1) == "@releaseDomain"
        assert local.wait(0.1) == "/local"
        store.write("/local/domain/1/name", "guest")
        assert release.wait(0.05) is None
        store.fire("@releaseDomain")
        assert release.wait(0.1) == "@releaseDomain"
    with pytest.raises(BackendError):
        store.fire("/local")


def test_write_from_another_thread_wakes_a_waiter() -> None:
    store = MemoryStore({"/local/domain/7/control/shutdown": ""})
    with store.watch("/local/domain/7/control/shutdown") as watch:
        assert watch.wait(0.1) is not None
        writer = threading.Timer(0.05, store.write, ("/local/domain/7/control/shutdown", "suspend"))
        writer.start()
        assert watch.wait(2.0) == "/local/domain/7/control/shutdown"
        writer.join()


def test_initial_nodes_and_snapshot() -> None:
    store = MemoryStore({"/a/b": "1"})
    assert store.snapshot() == {"/": "", "/a": "", "/a/b": "1"}


def test_wait_on_closed_watch_is_an_error() -> None:
    store = MemoryStore()
    watch = store.watch("/x")
    watch.close()
    with pytest.raises(BackendError):
        watch.wait(0)


def test_transaction_cannot_be_used_after_commit() -> None:
    store = MemoryStore()
    transaction = store.transaction()
    transaction.write("/x", "1")
    assert transaction.commit()
    with pytest.raises(BackendError):
        transaction.read("/x")


def test_transaction_rm_commit_fires_watch() -> None:
    store = MemoryStore({"/d/x": "1"})
    with store.watch("/d/x") as watch:
        assert watch.wait(0.1) == "/d/x"
        with store.transaction() as transaction:
            transaction.rm("/d/x")
            assert watch.wait(0.05) is None
            assert transaction.commit()
        assert watch.wait(0.1) == "/d/x"
    assert store.read("/d/x") is None


def test_run_transaction_gives_up_on_endless_conflicts() -> None:
    store = MemoryStore({"/n": "0"})

    def always_raced(ops: XenStoreOps) -> None:
        ops.read("/n")
        store.write("/n", "raced")

    with pytest.raises(BackendError, match="3 attempts"):
        run_transaction(store, always_raced, attempts=3)


@pytest.mark.parametrize("path", ["/", "/local/domain/0", "/a-b_c/1.2"])
def test_valid_paths(path: str) -> None:
    assert check_path(path) == path


@pytest.mark.parametrize("path", ["", "x", "/a/", "//a", "/a b", "/a\0b", "/é", "@releaseDomain"])
def test_invalid_paths(path: str) -> None:
    with pytest.raises(BackendError):
        check_path(path)


def test_special_paths_only_for_watches() -> None:
    assert check_path("@introduceDomain", watch=True) == "@introduceDomain"


def test_a_watch_keeps_each_pending_path_once_and_a_bounded_number_of_paths() -> None:
    store = MemoryStore()
    control = "/local/domain/9/control"
    with store.watch(control) as watch:
        for count in range(10_000):  # a guest rewriting its own key in a loop
            store.write(f"{control}/shutdown", str(count))
        assert watch.pending() == 2  # the registration's event and the key's
        for count in range(10_000):  # a guest creating keys of ever new names
            store.write(f"{control}/key{count}", "x")
        assert watch.pending() == MAX_PENDING_WATCH_EVENTS
        events = []
        while (event := watch.wait(0)) is not None:
            events.append(event)
        assert events[:3] == [control, f"{control}/shutdown", f"{control}/key0"]
        assert len(events) == MAX_PENDING_WATCH_EVENTS
        store.write(f"{control}/shutdown", "again")  # the queue drained: changes come again
        assert watch.wait(1) == f"{control}/shutdown"


def test_watch_events_put_never_blocks_and_get_times_out() -> None:
    events: WatchEvents[str] = WatchEvents(capacity=2)
    for event in ("a", "b", "a", "c", "d"):
        events.put(event)
    assert (events.qsize(), events.dropped) == (2, 2)
    assert [events.get(0), events.get(0)] == ["a", "b"]
    with pytest.raises(queue.Empty):
        events.get(0.01)
