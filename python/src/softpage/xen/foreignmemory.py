"""libxenforeignmemory: read-only batched mappings of a domain's pages."""

from __future__ import annotations

from typing import Any

import numpy as np

from softpage.abi import PAGE_SIZE
from softpage.errors import BackendError
from softpage.pfnset import PfnArray
from softpage.xen._binding import LibraryHandle, errno_error


class ForeignMapping:
    """``len(pfns)`` pages mapped contiguously, read-only.

    ``view`` is a zero-copy memoryview of the mapping, valid until
    ``unmap()``; unmapping releases it, so a use after that raises
    ``ValueError`` instead of touching unmapped memory (views sliced from it
    are the caller's to drop first).
    """

    def __init__(self, owner: ForeignMemory, address: Any, nr_pages: int, domid: int) -> None:
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
                f"dom {self.domid}: a buffer over a foreign mapping is still in use; mapping kept"
            ) from None
        address, self._address = self._address, None
        self._owner.unmap_raw(address, self.nr_pages, self.domid)

    def __enter__(self) -> ForeignMapping:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.unmap()


class ForeignMemory(LibraryHandle):
    """An open ``xenforeignmemory_handle``."""

    LIBRARY = "xenforeignmemory handle"
    OPEN = "xenforeignmemory_open"
    CLOSE = "xenforeignmemory_close"

    def map_readonly(self, domid: int, pfns: PfnArray) -> ForeignMapping:
        """Map ``pfns`` (GFNs) of ``domid`` in one call, PROT_READ.

        Every page must map: if any does not, the whole mapping is undone and
        ``OSError`` names the first failing PFN and how many failed.
        """
        ffi, lib = self.binding.ffi, self.binding.lib
        gfns = np.ascontiguousarray(pfns, dtype=np.uint64)
        if gfns.size == 0:
            raise BackendError(f"dom {domid}: asked to map no pages")
        errors = np.zeros(gfns.size, dtype=np.intc)
        address = lib.xenforeignmemory_map(
            self.handle,
            domid,
            lib.PROT_READ,
            gfns.size,
            ffi.from_buffer("xen_pfn_t[]", gfns),
            ffi.from_buffer("int[]", errors),
        )
        self.binding.check_ptr(address, "xenforeignmemory_map", domid, int(gfns[0]))
        failed = np.flatnonzero(errors)
        if failed.size:
            self.unmap_raw(address, gfns.size, domid)
            first = int(failed[0])
            error = errno_error(
                int(errors[first]),
                f"xenforeignmemory_map ({failed.size} of {gfns.size} pages failed, first)",
                domid,
                int(gfns[first]),
            )
            raise error
        return ForeignMapping(self, address, int(gfns.size), domid)

    def unmap_raw(self, address: Any, nr_pages: int, domid: int) -> None:
        self.binding.check_rc(
            self.binding.lib.xenforeignmemory_unmap(self.handle, address, nr_pages),
            "xenforeignmemory_unmap",
            domid,
        )
