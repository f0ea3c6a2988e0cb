"""One XenStore contract, two stores: MemoryStore everywhere, PyxsStore in dom0.

Fixture ``xenstore`` yields ``(store, root)``: a store and an empty scratch
directory to work under. The ``pyxs`` parameter is an e2e test: it needs a
running xenstored (the testbed's dom0) and is skipped elsewhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from softpage.errors import BackendError
from softpage.xenstore import DEFAULT_SOCKET, MemoryStore, PyxsStore, XenStore, XenStoreOps, run_transaction

SHORT = 0.2
"""Seconds to wait for an event that must not come."""
LONG = 5.0
"""Seconds to wait for an event that must come (xenstored in a TCG guest is slow)."""


@pytest.fixture(params=["memory", pytest.param("pyxs", marks=pytest.mark.e2e)])
def xenstore(request: pytest.FixtureRequest) -> Iterator[tuple[XenStore, str]]:
    root = f"/local/domain/0/data/softpage-contract-{os.getpid()}"
    store: XenStore
    if request.param == "memory":
        store = MemoryStore()
    else:
        if not os.path.exists(DEFAULT_SOCKET):
            pytest.skip(f"no xenstored socket at {DEFAULT_SOCKET} (run inside the testbed dom0)")
        store = PyxsStore()
    store.rm(root)
    try:
        yield store, root
    finally:
        store.rm(root)
        store.close()


def drain(watch_wait: object, limit: int = 20) -> None:
    for _ in range(limit):
        if watch_wait(SHORT) is None:  # type: ignore[operator]
            return


def test_read_of_absent_node_is_none(xenstore: tuple[XenStore, str]) -> None:
    store, root = xenstore
    assert store.read(f"{root}/missing") is None
    assert store.list(f"{root}/missing") == []


def test_write_creates_parents_and_reads_back(xenstore: tuple[XenStore, str]) -> None:
    store, root = xenstore
    store.write(f"{root}/a/b/c", "value 1")
    assert store.read(f"{root}/a/b/c") == "value 1"
    assert store.read(f"{root}/a/b") == ""
    assert store.list(f"{root}/a") == ["b"]
    store.write(f"{root}/a/b/c", "")
    assert store.read(f"{root}/a/b/c") == ""


def test_list_names_children_sorted(xenstore: tuple[XenStore, str]) -> None:
    store, root = xenstore
    for name in ("zeta", "alpha", "mid"):
        store.write(f"{root}/dir/{name}", name)
    store.write(f"{root}/dir/mid/grandchild", "x")
    assert store.list(f"{root}/dir") == ["alpha", "mid", "zeta"]


def test_rm_removes_subtree_and_tolerates_absence(xenstore: tuple[XenStore, str]) -> None:
    store, root = xenstore
    store.write(f"{root}/t/x/y", "1")
    store.write(f"{root}/t/z", "2")
    store.rm(f"{root}/t/x")
    assert store.read(f"{root}/t/x/y") is None
    assert store.read(f"{root}/t/x") is None
    assert store.list(f"{root}/t") == ["z"]
    store.rm(f"{root}/t/x")
    store.rm(f"{root}/never/was")


def test_relative_paths_are_refused(xenstore: tuple[XenStore, str]) -> None:
    store, _root = xenstore
    for bad in ("local/domain/0", "/local//domain", "/local/domain/", ""):
        with pytest.raises(BackendError):
            store.read(bad)


def test_values_must_be_plain_ascii(xenstore: tuple[XenStore, str]) -> None:
    store, root = xenstore
    for bad in ("caf\u00e9", "a\0b"):
        with pytest.raises(BackendError):
            store.write(f"{root}/v", bad)
    assert store.read(f"{root}/v") is None


def test_watch_fires_at_registration_then_on_changes_below(xenstore: tuple[XenStore, str]) -> None:
    store, root = xenstore
    store.write(f"{root}/w", "0")
    with store.watch(f"{root}/w") as watch:
        assert watch.wait(LONG) == f"{root}/w"
        drain(watch.wait)
        assert watch.wait(SHORT) is None
        store.write(f"{root}/w/child", "1")
        assert watch.wait(LONG) == f"{root}/w/child"
        drain(watch.wait)
        store.write(f"{root}/elsewhere", "1")
        assert watch.wait(SHORT) is None
        store.rm(root)
        assert watch.wait(LONG) is not None


def test_closed_watch_stops_delivering(xenstore: tuple[XenStore, str]) -> None:
    store, root = xenstore
    watch = store.watch(f"{root}/c")
    assert watch.wait(LONG) == f"{root}/c"
    watch.close()
    watch.close()
    store.write(f"{root}/c", "after close")
    assert store.read(f"{root}/c") == "after close"


def test_transaction_is_isolated_until_commit(xenstore: tuple[XenStore, str]) -> None:
    store, root = xenstore
    store.write(f"{root}/tx/seen", "old")
    with store.transaction() as transaction:
        assert transaction.read(f"{root}/tx/seen") == "old"
        transaction.write(f"{root}/tx/new", "new")
        assert transaction.read(f"{root}/tx/new") == "new"
        assert store.read(f"{root}/tx/new") is None
        assert transaction.commit() is True
    assert store.read(f"{root}/tx/new") == "new"


def test_conflicting_transaction_commits_nothing(xenstore: tuple[XenStore, str]) -> None:
    store, root = xenstore
    store.write(f"{root}/cf/shutdown", "suspend")
    with store.transaction() as transaction:
        assert transaction.read(f"{root}/cf/shutdown") == "suspend"
        store.write(f"{root}/cf/shutdown", "")  # the guest acks meanwhile
        transaction.rm(f"{root}/cf/shutdown")
        transaction.write(f"{root}/cf/other", "x")
        assert transaction.commit() is False
    assert store.read(f"{root}/cf/shutdown") == ""
    assert store.read(f"{root}/cf/other") is None


def test_aborted_transaction_changes_nothing(xenstore: tuple[XenStore, str]) -> None:
    store, root = xenstore
    with store.transaction() as transaction:
        transaction.write(f"{root}/ab/x", "1")
    assert store.read(f"{root}/ab/x") is None


def test_run_transaction_retries_after_a_conflict(xenstore: tuple[XenStore, str]) -> None:
    store, root = xenstore
    store.write(f"{root}/rt/counter", "0")
    attempts: list[int] = []

    def increment(ops: XenStoreOps) -> int:
        value = int(ops.read(f"{root}/rt/counter") or "0")
        if not attempts:
            store.write(f"{root}/rt/counter", "10")  # a concurrent writer, once
        attempts.append(value)
        ops.write(f"{root}/rt/counter", str(value + 1))
        return value + 1

    assert run_transaction(store, increment) == 11
    assert attempts == [0, 10]
    assert store.read(f"{root}/rt/counter") == "11"
