"""libxenevtchn: interdomain event channels seen from dom0 (needs xen-evtchn)."""

from __future__ import annotations

import select
from typing import Any

from softpage.xen._binding import LibraryHandle, XenBinding


class EventChannels(LibraryHandle):
    """An open ``xenevtchn_handle`` and the ports bound through it; ``close`` unbinds every
    port still bound first."""

    LIBRARY = "xenevtchn handle"
    OPEN = "xenevtchn_open"
    CLOSE = "xenevtchn_close"

    def __init__(self, binding: XenBinding, handle: Any) -> None:
        super().__init__(binding, handle)
        self._bound: set[int] = set()

    def _release(self, handle: Any) -> None:
        for port in sorted(self._bound):
            self.binding.lib.xenevtchn_unbind(handle, port)
        self._bound.clear()
        super()._release(handle)

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
