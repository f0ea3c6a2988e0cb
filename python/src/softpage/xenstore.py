"""A small XenStore interface, its pyxs implementation and an in-memory twin.

softpage needs only a handful of xenstore operations (the guest protocol keys
of docs/spec/guest-protocol.md and libxl's ``control/shutdown`` suspend
handshake), so it codes against ``XenStore`` below rather than against pyxs,
which is unmaintained since 2019 and speaks ``bytes``:

* ``PyxsStore``: the real store through xenstored's unix socket (dom0 only:
  watches are refused over /dev/xen/xenbus);
* ``MemoryStore``: the same semantics in memory, for unit tests and the
  simulator.

Semantics both implementations follow (and tests/contract checks):

* paths are absolute (``/local/domain/5/control/shutdown``); watches may also
  name the special paths ``@releaseDomain`` and ``@introduceDomain``;
* values are text: written as 7-bit ASCII without NUL (pyxs refuses anything
  else), read back with undecodable bytes replaced (guest-written values are
  untrusted and parsed by the caller);
* ``write`` creates missing parents with empty values; ``rm`` removes a
  subtree and is not an error on an absent node; ``read`` of an absent node
  is ``None``; ``list`` of an absent node is ``[]``;
* a watch fires once as soon as it is registered (xenstored does the same,
  so "wait for the next change" code never misses a change that raced with
  the registration) and then for every change at or below its path, and when
  an ancestor is removed;
* a watch keeps at most ``MAX_PENDING_WATCH_EVENTS`` events until they are waited for, each
  path once: a path already pending is not queued again, and beyond that many distinct paths
  the rest are dropped. A guest can write the keys it owns (its ``control/shutdown`` among
  them) as fast as xenstored lets it, and dom0 must not queue all of that. Nothing is lost:
  whoever waits re-reads what it waits on after each wake-up, and a full queue wakes it;
* a transaction sees the store as it was when it began plus its own changes;
  ``commit()`` returns False, applying nothing, if a node it read, wrote,
  removed or listed was changed by anyone else in the meantime.
"""

from __future__ import annotations

import copy
import errno as errno_codes
import itertools
import os
import queue
import threading
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from softpage.errors import BackendError

DEFAULT_SOCKET = "/run/xenstored/socket"
SPECIAL_WATCH_PATHS = ("@releaseDomain", "@introduceDomain")
MAX_PENDING_WATCH_EVENTS = 64
"""Distinct events one watch keeps until they are waited for (see the module docstring)."""

ResultT = TypeVar("ResultT")
EventT = TypeVar("EventT", bound=Hashable)


class XenStoreOps(Protocol):
    """Node operations, on the store or inside a transaction."""

    def read(self, path: str) -> str | None:
        """The value at ``path``, or None if there is no such node."""
        ...

    def write(self, path: str, value: str) -> None:
        """Set ``path`` to ``value``, creating missing parents."""
        ...

    def rm(self, path: str) -> None:
        """Remove ``path`` and everything below it; absent is not an error."""
        ...

    def list(self, path: str) -> list[str]:
        """Names of the children of ``path`` (not full paths); [] if absent."""
        ...


class XenStoreTransaction(XenStoreOps, Protocol):
    def commit(self) -> bool:
        """Apply the changes; False (nothing applied) on a conflict. Ends the transaction."""
        ...

    def abort(self) -> None:
        """Drop the changes and end the transaction; a no-op once ended."""
        ...

    def __enter__(self) -> XenStoreTransaction: ...

    def __exit__(self, *exc_info: object) -> None:
        """Abort unless committed."""
        ...


class XenStoreWatch(Protocol):
    def wait(self, timeout: float) -> str | None:
        """The path of the next event, or None after ``timeout`` seconds."""
        ...

    def close(self) -> None:
        """Unregister; idempotent."""
        ...

    def __enter__(self) -> XenStoreWatch: ...

    def __exit__(self, *exc_info: object) -> None: ...


class XenStore(XenStoreOps, Protocol):
    def transaction(self) -> XenStoreTransaction: ...

    def watch(self, path: str) -> XenStoreWatch: ...

    def resume_domain(self, domid: int) -> None:
        """``XS_RESUME``: xenstored forgets that the domain shut down, so its next
        shutdown fires ``@releaseDomain`` again (``libxl_domain_resume`` does it
        after ``xc_domain_resume``)."""
        ...

    def close(self) -> None: ...


def run_transaction(
    store: XenStore, body: Callable[[XenStoreOps], ResultT], attempts: int = 16
) -> ResultT:
    """Run ``body`` in a transaction, retrying it on conflict (as libxl does)."""
    for _attempt in range(attempts):
        with store.transaction() as transaction:
            result = body(transaction)
            if transaction.commit():
                return result
    raise BackendError(f"xenstore transaction still conflicting after {attempts} attempts")


def check_path(path: str, watch: bool = False) -> str:
    """Return ``path`` if it is a valid absolute path (or a special watch path)."""
    if watch and path in SPECIAL_WATCH_PATHS:
        return path
    if (
        not path.startswith("/")
        or (path != "/" and path.endswith("/"))
        or "//" in path
        or not path.isascii()
        or any(character in path for character in "\0 ")
    ):
        raise BackendError(f"expected an absolute xenstore path, got {path!r}")
    return path


def check_value(value: str) -> str:
    """Return ``value`` if both stores can write it: 7-bit ASCII, no NUL."""
    if not value.isascii() or "\0" in value:
        raise BackendError(f"expected a 7-bit ASCII xenstore value without NUL, got {value[:32]!r}")
    return value


def _parent(path: str) -> str:
    head = path.rsplit("/", 1)[0]
    return head or "/"


def _is_at_or_below(path: str, top: str) -> bool:
    return path == top or top == "/" or path.startswith(top + "/")


# -- in memory -----------------------------------------------------------------


class WatchEvents(Generic[EventT]):
    """A watch's pending events: bounded and coalescing (the module docstring says why).
    ``put`` never blocks; ``get`` is ``queue.Queue.get`` with a timeout."""

    def __init__(self, capacity: int = MAX_PENDING_WATCH_EVENTS) -> None:
        self._pending: dict[EventT, None] = {}
        self._capacity = capacity
        self._ready = threading.Condition()
        self.dropped = 0
        """Events neither queued nor already pending: the queue was full."""

    def put(self, event: EventT) -> None:
        with self._ready:
            if event in self._pending:
                return
            if len(self._pending) >= self._capacity:
                self.dropped += 1
                return
            self._pending[event] = None
            self._ready.notify()

    def get(self, timeout: float) -> EventT:
        """The oldest pending event; ``queue.Empty`` if none came within ``timeout`` seconds."""
        with self._ready:
            if not self._ready.wait_for(lambda: bool(self._pending), timeout=max(0.0, timeout)):
                raise queue.Empty
            event = next(iter(self._pending))
            del self._pending[event]
            return event

    def qsize(self) -> int:
        with self._ready:
            return len(self._pending)


class _MemoryWatch:
    def __init__(self, store: MemoryStore, path: str) -> None:
        self._store = store
        self.path = path
        self._events: WatchEvents[str] = WatchEvents()
        self._closed = False

    def deliver(self, path: str) -> None:
        self._events.put(path)

    def pending(self) -> int:
        """Events queued and not yet waited for (never more than MAX_PENDING_WATCH_EVENTS)."""
        return self._events.qsize()

    def wait(self, timeout: float) -> str | None:
        if self._closed:
            raise BackendError(f"wait on a closed watch of {self.path}")
        try:
            return self._events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._store._unwatch(self)

    def __enter__(self) -> _MemoryWatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _MemoryTransaction:
    def __init__(self, store: MemoryStore, nodes: dict[str, str], start_generation: int) -> None:
        self._store = store
        self._nodes = nodes
        self.start_generation = start_generation
        self.touched: set[str] = set()
        self.change = _Change()
        self._ended = False

    def _check_open(self) -> None:
        if self._ended:
            raise BackendError("xenstore transaction used after commit() or abort()")

    def read(self, path: str) -> str | None:
        self._check_open()
        self.touched.add(check_path(path))
        return self._nodes.get(path)

    def write(self, path: str, value: str) -> None:
        self._check_open()
        self.change.merge(_write_node(self._nodes, check_path(path), check_value(value)))

    def rm(self, path: str) -> None:
        self._check_open()
        self.touched.add(check_path(path))
        self.change.merge(_remove_node(self._nodes, path))

    def list(self, path: str) -> list[str]:
        self._check_open()
        self.touched.add(check_path(path))
        return _children(self._nodes, path)

    def commit(self) -> bool:
        self._check_open()
        self._ended = True
        return self._store._commit(self)

    def abort(self) -> None:
        self._ended = True

    @property
    def nodes(self) -> dict[str, str]:
        return self._nodes

    def __enter__(self) -> _MemoryTransaction:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.abort()


@dataclass
class _Change:
    """What one operation did: ``nodes`` were created, changed or removed
    (watches at or above them fire), ``removed_roots`` were removed with their
    subtrees (watches below them fire too), and ``parents`` gained or lost a
    child (only transactions that listed them conflict)."""

    nodes: list[str] = field(default_factory=list)
    removed_roots: list[str] = field(default_factory=list)
    parents: list[str] = field(default_factory=list)

    def merge(self, other: _Change) -> None:
        self.nodes += other.nodes
        self.removed_roots += other.removed_roots
        self.parents += other.parents

    def all_paths(self) -> set[str]:
        return {*self.nodes, *self.removed_roots, *self.parents}


def _write_node(nodes: dict[str, str], path: str, value: str) -> _Change:
    change = _Change(nodes=[path])
    missing = path
    while missing != "/" and _parent(missing) not in nodes:
        missing = _parent(missing)
        nodes[missing] = ""
        change.nodes.append(missing)
    if path not in nodes:
        change.parents.append(_parent(path))
    nodes[path] = value
    return change


def _remove_node(nodes: dict[str, str], path: str) -> _Change:
    doomed = [name for name in nodes if _is_at_or_below(name, path)]
    for name in doomed:
        del nodes[name]
    if not doomed:
        return _Change()
    return _Change(nodes=doomed, removed_roots=[path], parents=[_parent(path)] if path != "/" else [])


def _children(nodes: dict[str, str], path: str) -> list[str]:
    prefix = "/" if path == "/" else path + "/"
    return sorted(
        name[len(prefix) :] for name in nodes if name.startswith(prefix) and "/" not in name[len(prefix) :]
    )


class MemoryStore:
    """``XenStore`` in memory; thread-safe (a simulated guest may run in
    another thread). No permissions are modelled."""

    def __init__(self, initial: dict[str, str] | None = None) -> None:
        self._lock = threading.Lock()
        self._nodes: dict[str, str] = {"/": ""}
        self._generation = 0
        self._changed_at: dict[str, int] = {}
        self._watches: list[_MemoryWatch] = []
        self.resumed_domains: list[int] = []
        """Every ``resume_domain`` call, in order (xenstored keeps no such list)."""
        for path, value in (initial or {}).items():
            self.write(path, value)

    def resume_domain(self, domid: int) -> None:
        with self._lock:
            self.resumed_domains.append(domid)

    # -- node operations -------------------------------------------------
    def read(self, path: str) -> str | None:
        with self._lock:
            return self._nodes.get(check_path(path))

    def write(self, path: str, value: str) -> None:
        with self._lock:
            self._apply(_write_node(self._nodes, check_path(path), check_value(value)))

    def rm(self, path: str) -> None:
        with self._lock:
            self._apply(_remove_node(self._nodes, check_path(path)))

    def list(self, path: str) -> list[str]:
        with self._lock:
            return _children(self._nodes, check_path(path))

    def snapshot(self) -> dict[str, str]:
        """Every node and its value (for tests and ``softpage simulate``)."""
        with self._lock:
            return dict(self._nodes)

    # -- transactions ----------------------------------------------------
    def transaction(self) -> _MemoryTransaction:
        with self._lock:
            return _MemoryTransaction(self, dict(self._nodes), self._generation)

    def _commit(self, transaction: _MemoryTransaction) -> bool:
        with self._lock:
            if any(
                self._changed_at.get(path, -1) > transaction.start_generation
                for path in transaction.touched | transaction.change.all_paths()
            ):
                return False
            self._nodes = dict(transaction.nodes)
            self._apply(transaction.change)
            return True

    # -- watches ---------------------------------------------------------
    def watch(self, path: str) -> _MemoryWatch:
        watch = _MemoryWatch(self, check_path(path, watch=True))
        with self._lock:
            self._watches.append(watch)
            watch.deliver(path)
        return watch

    def fire(self, special_path: str) -> None:
        """Fire ``@releaseDomain`` or ``@introduceDomain`` (the hypervisor's job
        in a real store; the simulator calls this)."""
        if special_path not in SPECIAL_WATCH_PATHS:
            raise BackendError(f"expected one of {SPECIAL_WATCH_PATHS}, got {special_path!r}")
        with self._lock:
            for watch in self._watches:
                if watch.path == special_path:
                    watch.deliver(special_path)

    def watches(self) -> tuple[tuple[str, int], ...]:
        """``(path, events pending)`` of every open watch, for tests."""
        with self._lock:
            return tuple((watch.path, watch.pending()) for watch in self._watches)

    def _unwatch(self, watch: _MemoryWatch) -> None:
        with self._lock:
            self._watches.remove(watch)

    def close(self) -> None:
        with self._lock:
            watches, self._watches = self._watches, []
        for watch in watches:
            watch._closed = True

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- helpers (lock held) ---------------------------------------------
    def _apply(self, change: _Change) -> None:
        paths = change.all_paths()
        if not paths:
            return
        self._generation += 1
        for path in paths:
            self._changed_at[path] = self._generation
        for watch in self._watches:
            if watch.path in SPECIAL_WATCH_PATHS:
                continue
            fired = next((path for path in change.nodes if _is_at_or_below(path, watch.path)), None)
            if fired is None and any(_is_at_or_below(watch.path, root) for root in change.removed_roots):
                fired = watch.path
            if fired is not None:
                watch.deliver(fired)


# -- pyxs ----------------------------------------------------------------------


def _encode(text: str) -> bytes:
    return text.encode("utf-8")


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _store_error(error: Exception, operation: str, path: str) -> OSError:
    """pyxs raises ``PyXSError(errno)``; turn it into ``OSError`` naming the path."""
    code = error.args[0] if error.args and isinstance(error.args[0], int) else errno_codes.EIO
    return OSError(code, os.strerror(code), f"xenstore {operation} {path}")


class _PyxsOps:
    """Node operations over one pyxs ``Client`` (the store's, or a transaction's copy)."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def read(self, path: str) -> str | None:
        from pyxs.exceptions import PyXSError

        try:
            return _decode(self._client.read(_encode(check_path(path))))
        except PyXSError as error:
            if error.args and error.args[0] == errno_codes.ENOENT:
                return None
            raise _store_error(error, "read", path) from error

    def write(self, path: str, value: str) -> None:
        from pyxs.exceptions import PyXSError

        try:
            self._client.write(_encode(check_path(path)), _encode(check_value(value)))
        except PyXSError as error:
            raise _store_error(error, "write", path) from error

    def rm(self, path: str) -> None:
        from pyxs.exceptions import PyXSError

        try:
            self._client.delete(_encode(check_path(path)))
        except PyXSError as error:
            # xenstored refuses RM when the parent is missing too; absent is absent.
            if error.args and error.args[0] == errno_codes.ENOENT:
                return
            raise _store_error(error, "rm", path) from error

    def list(self, path: str) -> list[str]:
        from pyxs.exceptions import PyXSError

        try:
            return sorted(_decode(name) for name in self._client.list(_encode(check_path(path))))
        except PyXSError as error:
            if error.args and error.args[0] == errno_codes.ENOENT:
                return []
            raise _store_error(error, "list", path) from error


class _PyxsTransaction(_PyxsOps):
    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self._ended = False

    def commit(self) -> bool:
        from pyxs.exceptions import PyXSError

        if self._ended:
            raise BackendError("xenstore transaction used after commit() or abort()")
        self._ended = True
        try:
            return bool(self._client.commit())
        except PyXSError as error:
            raise _store_error(error, "commit", "") from error

    def abort(self) -> None:
        if not self._ended:
            self._ended = True
            self._client.rollback()

    def __enter__(self) -> _PyxsTransaction:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.abort()


class _PyxsWatch:
    def __init__(self, client: Any, path: str, token: bytes) -> None:
        self.path = path
        self._token = token
        self._monitor = client.monitor()
        # pyxs's router thread puts every event into ``monitor.events``, an unbounded
        # queue.Queue: ours bounds and coalesces them (pyxs 0.4.x, pinned by tests/contract).
        self._monitor.events = WatchEvents()
        self._monitor.watch(_encode(path), token)

    def wait(self, timeout: float) -> str | None:
        # Monitor.wait() blocks forever; its queue is where the router puts
        # this token's events (pyxs 0.4.x, pinned by tests/contract).
        try:
            path, _token = self._monitor.events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        return _decode(path)

    def close(self) -> None:
        if self._monitor is not None:
            monitor, self._monitor = self._monitor, None
            monitor.close()

    def __enter__(self) -> _PyxsWatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class PyxsStore(_PyxsOps):
    """``XenStore`` over xenstored's unix socket, through pyxs (dom0 only)."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET) -> None:
        try:
            from pyxs.client import Client
        except ImportError as error:
            raise BackendError("pyxs is not installed (apt install python3-pyxs)") from error
        client = Client(unix_socket_path=socket_path)
        try:
            client.connect()
        except Exception as error:  # pyxs raises its own ConnectionError or OSError
            raise BackendError(f"cannot connect to xenstored at {socket_path}: {error}") from error
        super().__init__(client)
        self._tokens: Iterator[int] = itertools.count()

    def transaction(self) -> _PyxsTransaction:
        from pyxs.exceptions import PyXSError

        # One client has at most one transaction; a copy shares the router.
        client = copy.copy(self._client)
        try:
            client.transaction()
        except PyXSError as error:
            raise _store_error(error, "transaction", "") from error
        return _PyxsTransaction(client)

    def watch(self, path: str) -> _PyxsWatch:
        token = f"softpage-{os.getpid()}-{id(self):x}-{next(self._tokens)}".encode()
        return _PyxsWatch(self._client, check_path(path, watch=True), token)

    def resume_domain(self, domid: int) -> None:
        from pyxs.exceptions import PyXSError

        try:
            self._client.resume_domain(domid)
        except PyXSError as error:
            raise _store_error(error, "resume_domain", str(domid)) from error

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> PyxsStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
