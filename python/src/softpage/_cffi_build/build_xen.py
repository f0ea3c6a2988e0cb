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

BINDING_ABI = 2
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

PV_HELPERS = r"""
/*
 * PV vCPU state, as write_one_vcpu_*() in tools/libs/guest/xg_sr_save_x86_pv.c
 * (Xen 4.17) get it.  The domctls take hypercall buffers, whose macros cffi
 * cannot call, so these wrappers do it in C.  Each returns 0 and sets *size
 * (0: no such state for this vCPU), or -1 with errno set.  A buffer too small
 * for the state fails with ENOBUFS and *size set to what is needed.
 */
static const size_t SOFTPAGE_PV_VCPU_CONTEXT_SIZE = sizeof(vcpu_guest_context_x86_64_t);
static const size_t SOFTPAGE_PV_VCPU_RDX_OFFSET =
    offsetof(vcpu_guest_context_x86_64_t, user_regs.rdx);
static const size_t SOFTPAGE_PV_VCPU_GDT_FRAMES_OFFSET =
    offsetof(vcpu_guest_context_x86_64_t, gdt_frames);
static const size_t SOFTPAGE_PV_VCPU_GDT_ENTS_OFFSET =
    offsetof(vcpu_guest_context_x86_64_t, gdt_ents);
static const size_t SOFTPAGE_PV_VCPU_CTRLREG_OFFSET =
    offsetof(vcpu_guest_context_x86_64_t, ctrlreg);
static const size_t SOFTPAGE_SHINFO_MAX_PFN_OFFSET = offsetof(shared_info_t, arch.max_pfn);
static const size_t SOFTPAGE_SHINFO_P2M_CR3_OFFSET = offsetof(shared_info_t, arch.p2m_cr3);
static const size_t SOFTPAGE_SHINFO_P2M_VADDR_OFFSET = offsetof(shared_info_t, arch.p2m_vaddr);
static const size_t SOFTPAGE_SHINFO_P2M_GENERATION_OFFSET =
    offsetof(shared_info_t, arch.p2m_generation);

static int softpage_pv_vcpu_online(xc_interface *xch, uint32_t domid, uint32_t vcpu)
{
    xc_vcpuinfo_t info;

    if ( xc_vcpu_getinfo(xch, domid, vcpu, &info) )
        return -1;
    return info.online;
}

static int softpage_pv_vcpu_context(xc_interface *xch, uint32_t domid, uint32_t vcpu,
                                    uint8_t *buf, size_t *size)
{
    vcpu_guest_context_any_t context;

    if ( *size < sizeof(context.x64) )
    {
        *size = sizeof(context.x64);
        errno = ENOBUFS;
        return -1;
    }
    if ( xc_vcpu_getcontext(xch, domid, vcpu, &context) )
        return -1;
    memcpy(buf, &context.x64, sizeof(context.x64));
    *size = sizeof(context.x64);
    return 0;
}

static int softpage_pv_vcpu_extended(xc_interface *xch, uint32_t domid, uint32_t vcpu,
                                     uint8_t *buf, size_t *size)
{
    struct xen_domctl domctl = {
        .cmd = XEN_DOMCTL_get_ext_vcpucontext,
        .domain = domid,
        .u.ext_vcpucontext.vcpu = vcpu,
    };

    if ( xc_domctl(xch, &domctl) < 0 )
        return -1;
    if ( domctl.u.ext_vcpucontext.size > *size )
    {
        *size = domctl.u.ext_vcpucontext.size;
        errno = ENOBUFS;
        return -1;
    }
    *size = domctl.u.ext_vcpucontext.size;
    memcpy(buf, &domctl.u.ext_vcpucontext, *size);
    return 0;
}

static int softpage_pv_vcpu_xsave(xc_interface *xch, uint32_t domid, uint32_t vcpu,
                                  uint8_t *buf, size_t *size)
{
    DECLARE_HYPERCALL_BUFFER(void, buffer);
    struct xen_domctl domctl = {
        .cmd = XEN_DOMCTL_getvcpuextstate,
        .domain = domid,
        .u.vcpuextstate.vcpu = vcpu,
    };
    int rc = -1;

    if ( xc_domctl(xch, &domctl) < 0 )
        return -1;
    if ( !domctl.u.vcpuextstate.xfeature_mask )
    {
        *size = 0;
        return 0;
    }
    if ( domctl.u.vcpuextstate.size > *size )
    {
        *size = domctl.u.vcpuextstate.size;
        errno = ENOBUFS;
        return -1;
    }
    buffer = xc_hypercall_buffer_alloc(xch, buffer, domctl.u.vcpuextstate.size);
    if ( !buffer )
        return -1;
    set_xen_guest_handle(domctl.u.vcpuextstate.buffer, buffer);
    if ( xc_domctl(xch, &domctl) >= 0 )
    {
        *size = domctl.u.vcpuextstate.size;
        memcpy(buf, buffer, *size);
        rc = 0;
    }
    xc_hypercall_buffer_free(xch, buffer);
    return rc;
}

static int softpage_pv_vcpu_msrs(xc_interface *xch, uint32_t domid, uint32_t vcpu,
                                 uint8_t *buf, size_t *size)
{
    DECLARE_HYPERCALL_BUFFER(void, buffer);
    struct xen_domctl domctl = {
        .cmd = XEN_DOMCTL_get_vcpu_msrs,
        .domain = domid,
        .u.vcpu_msrs.vcpu = vcpu,
    };
    size_t bytes;
    int rc = -1;

    if ( xc_domctl(xch, &domctl) < 0 )
        return -1;
    bytes = domctl.u.vcpu_msrs.msr_count * sizeof(xen_domctl_vcpu_msr_t);
    if ( bytes == 0 )
    {
        *size = 0;
        return 0;
    }
    if ( bytes > *size )
    {
        *size = bytes;
        errno = ENOBUFS;
        return -1;
    }
    buffer = xc_hypercall_buffer_alloc(xch, buffer, bytes);
    if ( !buffer )
        return -1;
    set_xen_guest_handle(domctl.u.vcpu_msrs.msrs, buffer);
    if ( xc_domctl(xch, &domctl) >= 0 )
    {
        *size = domctl.u.vcpu_msrs.msr_count * sizeof(xen_domctl_vcpu_msr_t);
        memcpy(buf, buffer, *size);
        rc = 0;
    }
    xc_hypercall_buffer_free(xch, buffer);
    return rc;
}
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
        + "#include <errno.h>\n#include <stddef.h>\n#include <string.h>\n"
        + PV_HELPERS
        + f"#define SOFTPAGE_XEN_BINDING_ABI {BINDING_ABI}\n"
        + f'static const char *const SOFTPAGE_XEN_CDEF_SHA256 = "{digest}";\n',
        libraries=LIBRARIES,
        depends=[str(cdef_path)],
    )
    return ffi


ffi = build_ffi()

if __name__ == "__main__":
    ffi.compile(tmpdir=str(Path(__file__).resolve().parents[2]), verbose=True)
