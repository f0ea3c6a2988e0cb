"""MemoryStore behaviour beyond the shared contract (tests/contract/test_xenstore_contract.py)."""

from __future__ import annotations

import threading

import pytest

from softpage.errors import BackendError
from softpage.xenstore import MemoryStore, XenStoreOps, check_path, run_transaction


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
