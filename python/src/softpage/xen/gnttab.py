"""libxengnttab: read-only mappings of pages a domain granted to dom0."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from softpage.abi import PAGE_SIZE
from softpage.errors import BackendError
from softpage.xen._binding import LibraryHandle


class GrantMapping:
    """Granted pages mapped contiguously, read-only; ``view`` is zero-copy and
    released by ``unmap()``."""

    def __init__(self, owner: GrantTable, address: Any, nr_pages: int, domid: int) -> None:
        self._owner = owner
        self._address: Any = address
        self.nr_pages = nr_pages
        self.domid = domid
        self.view: memoryview = memoryview(owner.binding.ffi.buffer(address, nr_pages * PAGE_SIZE))

    def unmap(self) -> None:
        """Idempotent. Refused, with the pages left mapped, while an export of
        ``view`` is alive (a numpy array over it, say): leaking a mapping is
        better than a pointer into unmapped memory. Memoryview *slices* are
        not exports and cannot be detected; callers drop them first."""
        if self._address is None:
            return
        try:
            self.view.release()
        except BufferError:
            raise BackendError(
                f"dom {self.domid}: a buffer over a grant mapping is still in use; mapping kept"
            ) from None
        address, self._address = self._address, None
        self._owner.binding.check_rc(
            self._owner.binding.lib.xengnttab_unmap(self._owner.handle, address, self.nr_pages),
            "xengnttab_unmap",
            self.domid,
        )

    def __enter__(self) -> GrantMapping:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.unmap()


class GrantTable(LibraryHandle):
    """An open ``xengnttab_handle`` (needs xen-gntdev in dom0)."""

    LIBRARY = "xengnttab handle"
    OPEN = "xengnttab_open"
    CLOSE = "xengnttab_close"

    def map_readonly(self, domid: int, refs: Sequence[int]) -> GrantMapping:
        """Map grant ``refs`` of ``domid`` in one call (all or nothing)."""
        if not refs:
            raise BackendError(f"dom {domid}: asked to map no grants")
        ffi, lib = self.binding.ffi, self.binding.lib
        ref_array = np.asarray(refs, dtype=np.uint32)
        address = lib.xengnttab_map_domain_grant_refs(
            self.handle, ref_array.size, domid, ffi.from_buffer("uint32_t[]", ref_array), lib.PROT_READ
        )
        self.binding.check_ptr(
            address, f"xengnttab_map_domain_grant_refs(first ref {int(ref_array[0])})", domid
        )
        return GrantMapping(self, address, int(ref_array.size), domid)
