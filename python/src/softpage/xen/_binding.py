"""The thin binding layer over ``softpage._xen`` (the cffi module).

Everything that touches cffi's ``ffi``/``lib`` objects directly goes through
``XenBinding``: loading the compiled module (once per process, on first use),
checking its build stamp, and turning a failed C call into ``OSError`` with
the call, domain and PFN named. The API modules (ctrl, foreignmemory, gnttab,
evtchn) never read ``ffi.errno`` themselves.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from softpage.errors import BackendError

EXPECTED_BINDING_ABI = 2
"""Must equal ``BINDING_ABI`` in softpage/_cffi_build/build_xen.py."""

COMPILED_MODULE = "softpage._xen"


def describe_call(call: str, domid: int | None = None, pfn: int | None = None) -> str:
    """The context string of an ``OSError``: ``"xenforeignmemory_map dom 5 pfn 0x1234"``."""
    parts = [call]
    if domid is not None:
        parts.append(f"dom {domid}")
    if pfn is not None:
        parts.append(f"pfn {pfn:#x}")
    return " ".join(parts)


def errno_error(errno_value: int, call: str, domid: int | None = None, pfn: int | None = None) -> OSError:
    """``OSError`` for a failed call. Negative values (privcmd's per-page
    ``err[]`` entries are ``-errno``) are folded to positive; 0 means the
    library failed without setting errno, reported as EIO so the error is
    never mistaken for success."""
    code = abs(errno_value) or 5  # EIO
    return OSError(code, os.strerror(code), describe_call(call, domid, pfn))


@dataclass(frozen=True)
class XenBinding:
    """The loaded cffi module: ``ffi`` and ``lib`` plus the one errno check."""

    ffi: Any
    lib: Any

    def check_rc(self, rc: int, call: str, domid: int | None = None, pfn: int | None = None) -> int:
        """Return ``rc`` if it is not negative, else raise ``OSError`` from errno."""
        if rc < 0:
            raise errno_error(self.ffi.errno, call, domid, pfn)
        return rc

    def check_ptr(self, pointer: Any, call: str, domid: int | None = None, pfn: int | None = None) -> Any:
        """Return ``pointer`` unless it is NULL, else raise ``OSError`` from errno."""
        if pointer == self.ffi.NULL:
            raise errno_error(self.ffi.errno, call, domid, pfn)
        return pointer


def check_stamp(binding_abi: int, cdef_sha256: str) -> None:
    """Refuse a compiled module built from another version of xen_cdef.h."""
    if binding_abi != EXPECTED_BINDING_ABI:
        raise BackendError(
            f"softpage._xen is stale: expected binding ABI {EXPECTED_BINDING_ABI}, got {binding_abi} "
            f"(cdef {cdef_sha256[:12]}); rebuild it (pip install, or "
            "python softpage/_cffi_build/build_xen.py from python/src)"
        )


@functools.cache
def load_binding() -> XenBinding:
    """Import ``softpage._xen`` on first use and check its stamp.

    Raises ``BackendError`` when the module was not built (no libxen-dev at
    build time) or when the Xen libraries it links cannot be loaded.
    """
    try:
        module = importlib.import_module(COMPILED_MODULE)
    except ImportError as error:
        raise BackendError(
            f"the Xen bindings ({COMPILED_MODULE}) are unavailable: {error}; they are built only "
            "where libxen-dev is installed, and need the Xen 4.17 libraries at run time"
        ) from error
    ffi, lib = module.ffi, module.lib
    check_stamp(int(lib.SOFTPAGE_XEN_BINDING_ABI), ffi.string(lib.SOFTPAGE_XEN_CDEF_SHA256).decode())
    return XenBinding(ffi=ffi, lib=lib)


class LibraryHandle:
    """An open handle of one of Xen's libraries, the part each wrapper shares: ``open``,
    ``handle`` (refused after ``close``), an idempotent ``close`` and the context manager.

    A subclass names its library (``LIBRARY``, as in the errors) and its open and close calls;
    one whose open takes other arguments overrides ``_open_raw``, one that must undo more
    before the close overrides ``_release``.
    """

    LIBRARY: ClassVar[str]
    OPEN: ClassVar[str]
    CLOSE: ClassVar[str]

    def __init__(self, binding: XenBinding, handle: Any) -> None:
        self.binding = binding
        self._handle: Any = handle

    @classmethod
    def _open_raw(cls, binding: XenBinding) -> Any:
        return getattr(binding.lib, cls.OPEN)(binding.ffi.NULL, 0)

    @classmethod
    def open(cls, binding: XenBinding | None = None) -> Self:
        binding = binding or load_binding()
        handle = binding.check_ptr(cls._open_raw(binding), cls.OPEN)
        return cls(binding, handle)

    @property
    def handle(self) -> Any:
        if self._handle is None:
            raise BackendError(f"{self.LIBRARY} used after close()")
        return self._handle

    def _release(self, handle: Any) -> None:
        getattr(self.binding.lib, self.CLOSE)(handle)

    def close(self) -> None:
        """Close the handle; idempotent."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            self._release(handle)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
