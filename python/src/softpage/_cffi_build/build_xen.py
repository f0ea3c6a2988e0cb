"""Build script for ``softpage._xen`` (build time only; never imported at run time).

setuptools runs this through cffi's ``cffi_modules`` hook (python/setup.py adds
it only where /usr/include/xenctrl.h exists, i.e. where libxen-dev is
installed). For a checkout without pip: ``cd python/src && python
softpage/_cffi_build/build_xen.py`` drops ``softpage/_xen*.so`` next to the
sources.

API mode: the generated C includes the real libxen-dev headers, so the C
compiler checks every constant, struct field offset and function signature of
xen_cdef.h against the installed Xen 4.17 headers. The one private symbol we
need, ``xc_get_pfn_type_batch`` (tools/libs/ctrl/xc_private.h; exported from
libxenctrl.so because its version script is ``global: *``), gets its
prototype here.

Two values are stamped into the module and checked by
``softpage.xen._binding`` when it loads:

* ``SOFTPAGE_XEN_BINDING_ABI``: bumped whenever xen_cdef.h changes in a way
  the Python layer depends on, so a stale ``.so`` in an editable checkout is
  refused instead of misbehaving;
* ``SOFTPAGE_XEN_CDEF_SHA256``: the digest of the cdef text, for error messages.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cffi import FFI

BINDING_ABI = 1
"""Must equal softpage.xen._binding.EXPECTED_BINDING_ABI."""

LIBRARIES = ["xenctrl", "xenguest", "xenforeignmemory", "xengnttab", "xenevtchn", "xentoollog"]

HEADERS = (
    "sys/mman.h",
    "xenctrl.h",
    "xenguest.h",
    "xenforeignmemory.h",
    "xengnttab.h",
    "xenevtchn.h",
    "xen/hvm/params.h",
)

PRIVATE_PROTOTYPES = """\
/* tools/libs/ctrl/xc_private.h (Xen 4.17): not in the public headers. */
int xc_get_pfn_type_batch(xc_interface *xch, uint32_t dom, unsigned int num, xen_pfn_t *arr);
"""


def build_ffi() -> FFI:
    build_dir = Path(__file__).resolve().parent
    cdef_path = build_dir / "xen_cdef.h"
    cdef = cdef_path.read_text(encoding="ascii")
    digest = hashlib.sha256(cdef.encode("ascii")).hexdigest()

    ffi = FFI()
    ffi.cdef(cdef)
    ffi.cdef("static const char *const SOFTPAGE_XEN_CDEF_SHA256;\n")
    includes = "".join(f"#include <{header}>\n" for header in HEADERS)
    ffi.set_source(
        "softpage._xen",
        includes
        + PRIVATE_PROTOTYPES
        + f"#define SOFTPAGE_XEN_BINDING_ABI {BINDING_ABI}\n"
        + f'static const char *const SOFTPAGE_XEN_CDEF_SHA256 = "{digest}";\n',
        libraries=LIBRARIES,
        depends=[str(cdef_path)],
    )
    return ffi


ffi = build_ffi()

if __name__ == "__main__":
    ffi.compile(tmpdir=str(Path(__file__).resolve().parents[2]), verbose=True)
