"""libxenevtchn: interdomain event channels seen from dom0 (needs xen-evtchn)."""

from __future__ import annotations

import select
from typing import Any

from softpage.errors import BackendError
from softpage.xen._binding import XenBinding, load_binding


class EventChannels:
    """An open ``xenevtchn_handle`` and the ports bound through it."""

    def __init__(self, binding: XenBinding, handle: Any) -> None:
        self.binding = binding
        self._handle: Any = handle
        self._bound: set[int] = set()

    @classmethod
    def open(cls, binding: XenBinding | None = None) -> EventChannels:
        binding = binding or load_binding()
        handle = binding.lib.xenevtchn_open(binding.ffi.NULL, 0)
        binding.check_ptr(handle, "xenevtchn_open")
        return cls(binding, handle)

    @property
    def handle(self) -> Any:
        if self._handle is None:
            raise BackendError("xenevtchn handle used after close()")
        return self._handle

    def close(self) -> None:
        """Unbind every port still bound, then close; idempotent."""
        if self._handle is None:
            return
        for port in sorted(self._bound):
            self.binding.lib.xenevtchn_unbind(self._handle, port)
        self._bound.clear()
        handle, self._handle = self._handle, None
        self.binding.lib.xenevtchn_close(handle)

    def __enter__(self) -> EventChannels:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        """Connect to the guest's unbound ``remote_port``; return the local port."""
        local_port = self.binding.check_rc(
            self.binding.lib.xenevtchn_bind_interdomain(self.handle, domid, remote_port),
            f"xenevtchn_bind_interdomain(remote port {remote_port})",
            domid,
        )
        self._bound.add(local_port)
        return local_port

    def notify(self, local_port: int) -> None:
        self.binding.check_rc(
            self.binding.lib.xenevtchn_notify(self.handle, local_port), f"xenevtchn_notify(port {local_port})"
        )

    def unbind(self, local_port: int) -> None:
        self._bound.discard(local_port)
        self.binding.check_rc(
            self.binding.lib.xenevtchn_unbind(self.handle, local_port), f"xenevtchn_unbind(port {local_port})"
        )

    def wait(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` s for an event; return its port (unmasked
        again), or None on timeout."""
        fd = self.binding.check_rc(self.binding.lib.xenevtchn_fd(self.handle), "xenevtchn_fd")
        readable, _, _ = select.select([fd], [], [], max(0.0, timeout))
        if not readable:
            return None
        port = self.binding.check_rc(self.binding.lib.xenevtchn_pending(self.handle), "xenevtchn_pending")
        self.binding.check_rc(
            self.binding.lib.xenevtchn_unmask(self.handle, port), f"xenevtchn_unmask(port {port})"
        )
        return port
