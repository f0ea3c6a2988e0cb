"""Every wire format of the Xen 4.17 migration stream, declared once.

Three layers, outermost first, as ``xl save`` writes them and ``xl migrate``
sends them after its handshake:

1. the xl save-file header (tools/xl/xl.h ``struct save_file_header``,
   written by ``save_domain_core_writeconfig`` in tools/xl/xl_saverestore.c);
2. the libxl stream (docs/specs/libxl-migration-stream.pandoc, Revision 2;
   tools/libs/light/libxl_sr_stream_format.h);
3. inside libxl's LIBXC_CONTEXT record, the libxc stream
   (docs/specs/libxc-migration-stream.pandoc, Revision 3;
   tools/libs/guest/xg_sr_stream_format.h).

"Native" byte order in the specs is the domain's; this project handles x86
only, so native means little-endian and every ``Struct`` below spells it out.
"""

from __future__ import annotations

import enum
import struct
from types import MappingProxyType

import numpy as np
import numpy.typing as npt

# The stream's pages are Xen's (XC_PAGE_SHIFT, tools/include/xenctrl.h); softpage.abi owns their size.
from softpage.abi import PAGE_SIZE

# -- xl save-file header (tools/xl/xl.h) ---------------------------------------

XL_MAGIC = b"Xen saved domain, xl format\n \0 \r"
"""``savefileheader_magic[32]``: 32 bytes, the embedded NUL included."""

XL_HEADER = struct.Struct("<32sIIII")
"""``struct save_file_header``: magic, byteorder, mandatory_flags,
optional_flags, optional_data_len; "all uint32_ts are in domain's byte order"."""

XL_BYTEORDER = 0x01020304
"""``SAVEFILE_BYTEORDER_VALUE``."""

XL_MANDATORY_FLAG_JSON = 1 << 0
XL_MANDATORY_FLAG_STREAMV2 = 1 << 1
XL_MANDATORY_FLAGS_KNOWN = XL_MANDATORY_FLAG_JSON | XL_MANDATORY_FLAG_STREAMV2
"""``XL_MANDATORY_FLAG_ALL``: a restorer rejects any other mandatory bit."""

XL_CONFIG_LENGTH = struct.Struct("<I")
"""The optional data: ``u32 config_len`` then ``config_len`` bytes of config.
xl counts the config's trailing NUL in ``config_len`` (``strlen + 1`` in
``save_domain_core_begin``) and parses it as a C string on restore."""

# -- libxl stream (libxl-migration-stream.pandoc) ------------------------------

LIBXL_HEADER = struct.Struct(">QII")
"""Stream header, big-endian: ident, version, options."""

LIBXL_IDENT = 0x4C6962786C466D74  # "LibxlFmt"
LIBXL_VERSION = 2
LIBXL_OPT_BIG_ENDIAN = 1 << 0
LIBXL_OPT_LEGACY = 1 << 1
LIBXL_OPTS_KNOWN = LIBXL_OPT_BIG_ENDIAN | LIBXL_OPT_LEGACY

LIBXL_RECORD_HEADER = struct.Struct("<II")
"""``libxl__sr_rec_hdr``: type, length; the body is zero-padded to 8 octets."""

LIBXL_EMULATOR_HEADER = struct.Struct("<II")
"""``libxl__sr_emulator_hdr``: emulator id, index; starts EMULATOR_* bodies."""

LIBXL_CHECKPOINT_STATE = struct.Struct("<I")


class LibxlRecordType(enum.IntEnum):
    """``REC_TYPE_*`` of libxl_sr_stream_format.h."""

    END = 0x0
    LIBXC_CONTEXT = 0x1
    EMULATOR_XENSTORE_DATA = 0x2
    EMULATOR_CONTEXT = 0x3
    CHECKPOINT_END = 0x4
    CHECKPOINT_STATE = 0x5


LIBXL_RECORD_NAMES = MappingProxyType({
    LibxlRecordType.END: "End",
    LibxlRecordType.LIBXC_CONTEXT: "Libxc context",
    LibxlRecordType.EMULATOR_XENSTORE_DATA: "Emulator xenstore data",
    LibxlRecordType.EMULATOR_CONTEXT: "Emulator context",
    LibxlRecordType.CHECKPOINT_END: "Checkpoint end",
    LibxlRecordType.CHECKPOINT_STATE: "Checkpoint state",
})


class EmulatorId(enum.IntEnum):
    UNKNOWN = 0
    QEMU_TRADITIONAL = 1
    QEMU_UPSTREAM = 2


# -- libxc stream (libxc-migration-stream.pandoc) ------------------------------

LIBXC_IMAGE_HEADER = struct.Struct(">QIIHHI")
"""``struct xc_sr_ihdr``, big-endian: marker, id, version, options, _res1, _res2."""

IHDR_MARKER = 0xFFFF_FFFF_FFFF_FFFF
IHDR_ID = 0x58454E46  # "XENF"
IHDR_VERSION = 3
"""What 4.17's ``write_headers`` (xg_sr_save.c) emits; restorers accept 2..3."""
IHDR_VERSIONS_ACCEPTED = (2, 3)
IHDR_OPT_BIG_ENDIAN = 1 << 0
IHDR_OPTS_KNOWN = IHDR_OPT_BIG_ENDIAN

LIBXC_DOMAIN_HEADER = struct.Struct("<IHHII")
"""``struct xc_sr_dhdr``: type, page_shift, _res1, xen_major, xen_minor."""


class DomainType(enum.IntEnum):
    """``DHDR_TYPE_*``; a PVH guest is saved as X86_HVM."""

    X86_PV = 1
    X86_HVM = 2


LIBXC_RECORD_HEADER = struct.Struct("<II")
"""``struct xc_sr_rhdr``: type, length; the body is zero-padded to 8 octets."""

RECORD_ALIGN = 8  # 1 << REC_ALIGN_ORDER
RECORD_LENGTH_MAX = 128 << 20  # REC_LENGTH_MAX
RECORD_TYPE_OPTIONAL = 0x8000_0000  # REC_TYPE_OPTIONAL: a restorer may skip it


class LibxcRecordType(enum.IntEnum):
    """``REC_TYPE_*`` of xg_sr_stream_format.h."""

    END = 0x00
    PAGE_DATA = 0x01
    X86_PV_INFO = 0x02
    X86_PV_P2M_FRAMES = 0x03
    X86_PV_VCPU_BASIC = 0x04
    X86_PV_VCPU_EXTENDED = 0x05
    X86_PV_VCPU_XSAVE = 0x06
    SHARED_INFO = 0x07
    X86_TSC_INFO = 0x08
    HVM_CONTEXT = 0x09
    HVM_PARAMS = 0x0A
    TOOLSTACK = 0x0B
    X86_PV_VCPU_MSRS = 0x0C
    VERIFY = 0x0D
    CHECKPOINT = 0x0E
    CHECKPOINT_DIRTY_PFN_LIST = 0x0F
    STATIC_DATA_END = 0x10
    X86_CPUID_POLICY = 0x11
    X86_MSR_POLICY = 0x12


LIBXC_RECORD_NAMES = MappingProxyType({
    LibxcRecordType.END: "End",
    LibxcRecordType.PAGE_DATA: "Page data",
    LibxcRecordType.X86_PV_INFO: "x86 PV info",
    LibxcRecordType.X86_PV_P2M_FRAMES: "x86 PV P2M frames",
    LibxcRecordType.X86_PV_VCPU_BASIC: "x86 PV vcpu basic",
    LibxcRecordType.X86_PV_VCPU_EXTENDED: "x86 PV vcpu extended",
    LibxcRecordType.X86_PV_VCPU_XSAVE: "x86 PV vcpu xsave",
    LibxcRecordType.SHARED_INFO: "Shared info",
    LibxcRecordType.X86_TSC_INFO: "TSC info",
    LibxcRecordType.HVM_CONTEXT: "HVM context",
    LibxcRecordType.HVM_PARAMS: "HVM params",
    LibxcRecordType.TOOLSTACK: "Toolstack",
    LibxcRecordType.X86_PV_VCPU_MSRS: "x86 PV vcpu msrs",
    LibxcRecordType.VERIFY: "Verify",
    LibxcRecordType.CHECKPOINT: "Checkpoint",
    LibxcRecordType.CHECKPOINT_DIRTY_PFN_LIST: "Checkpoint dirty pfn list",
    LibxcRecordType.STATIC_DATA_END: "Static data end",
    LibxcRecordType.X86_CPUID_POLICY: "x86 CPUID policy",
    LibxcRecordType.X86_MSR_POLICY: "x86 MSR policy",
})

# PAGE_DATA: header, then count pfn words, then one page per entry with data.
PAGE_DATA_HEADER = struct.Struct("<II")
"""``struct xc_sr_rec_page_data_header``: count, _res1."""
PAGE_DATA_PFN_MASK = 0x000F_FFFF_FFFF_FFFF
PAGE_DATA_RESERVED_MASK = 0x0FF0_0000_0000_0000
"""Bits 59..52 of a pfn word; the spec reserves them (must be zero)."""
PAGE_DATA_TYPE_MASK = 0xF000_0000_0000_0000
PAGE_DATA_TYPE_SHIFT = 60
MAX_BATCH_SIZE = 1024
"""pfns per PAGE_DATA record, as ``MAX_BATCH_SIZE`` in xg_sr_common.h."""

PFINFO_SHIFT = 28
"""``XEN_DOMCTL_PFINFO_LTAB_SHIFT``: a stream type is the domctl type ``>> 28``,
and a pfn word is ``(domctl_type << 32) | pfn`` (xg_sr_save.c ``write_batch``)."""


PAGETABLE_LEVEL_MASK = 0x7
"""``XEN_DOMCTL_PFINFO_LTABTYPE_MASK >> 28``: a stream type's page-table level bits."""


class PageType(enum.IntEnum):
    """The 4-bit type of a pfn word (``XEN_DOMCTL_PFINFO_*`` >> 28,
    xen/include/public/domctl.h). Values 5..8 are invalid."""

    NOTAB = 0x0
    L1TAB = 0x1
    L2TAB = 0x2
    L3TAB = 0x3
    L4TAB = 0x4
    L1TAB_PINNED = 0x9
    L2TAB_PINNED = 0xA
    L3TAB_PINNED = 0xB
    L4TAB_PINNED = 0xC
    BROKEN = 0xD
    XALLOC = 0xE
    XTAB = 0xF

    @property
    def pfinfo(self) -> int:
        """The ``XEN_DOMCTL_PFINFO_*`` value (what ``page_types()`` returns)."""
        return int(self) << PFINFO_SHIFT


PAGE_TYPE_NAMES = MappingProxyType({
    PageType.NOTAB: "NOTAB",
    PageType.L1TAB: "L1TAB",
    PageType.L2TAB: "L2TAB",
    PageType.L3TAB: "L3TAB",
    PageType.L4TAB: "L4TAB",
    PageType.L1TAB_PINNED: "L1TAB|LPINTAB",
    PageType.L2TAB_PINNED: "L2TAB|LPINTAB",
    PageType.L3TAB_PINNED: "L3TAB|LPINTAB",
    PageType.L4TAB_PINNED: "L4TAB|LPINTAB",
    PageType.BROKEN: "BROKEN",
    PageType.XALLOC: "XALLOC",
    PageType.XTAB: "XTAB",
})


def is_known_page_type(stream_type: int) -> bool:
    """``is_known_page_type()`` of xg_sr_common.h, on the 4-bit value."""
    return stream_type in PAGE_TYPE_NAMES


def page_type_has_data(stream_type: int) -> bool:
    """``page_type_has_stream_data()``: NOTAB and L1-L4 (pinned or not)."""
    return stream_type <= PageType.L4TAB or PageType.L1TAB_PINNED <= stream_type <= PageType.L4TAB_PINNED


def page_type_populates(stream_type: int) -> bool:
    """``page_type_to_populate()``: every type with data, plus XALLOC."""
    return page_type_has_data(stream_type) or stream_type == PageType.XALLOC


def known_type_mask(stream_types: npt.NDArray[np.integer]) -> npt.NDArray[np.bool_]:
    """Vector form of :func:`is_known_page_type` (invalid: 5..8)."""
    return (stream_types <= PageType.L4TAB) | (stream_types >= PageType.L1TAB_PINNED)


def data_type_mask(stream_types: npt.NDArray[np.integer]) -> npt.NDArray[np.bool_]:
    """Vector form of :func:`page_type_has_data`."""
    return (stream_types <= PageType.L4TAB) | (
        (stream_types >= PageType.L1TAB_PINNED) & (stream_types <= PageType.L4TAB_PINNED)
    )


def pagetable_levels(stream_types: npt.NDArray[np.integer]) -> npt.NDArray[np.uint32]:
    """The page-table level of each type: 1-4 for L1-L4, pinned or not
    (``XEN_DOMCTL_PFINFO_LTABTYPE_MASK``), 0 for every other type."""
    levels = np.asarray(stream_types, dtype=np.uint32) & np.uint32(PAGETABLE_LEVEL_MASK)
    return np.where((levels >= PageType.L1TAB) & (levels <= PageType.L4TAB), levels, 0).astype(np.uint32)


def populate_type_mask(stream_types: npt.NDArray[np.integer]) -> npt.NDArray[np.bool_]:
    """Vector form of :func:`page_type_populates`."""
    is_xalloc: npt.NDArray[np.bool_] = stream_types == PageType.XALLOC
    return data_type_mask(stream_types) | is_xalloc


# Fixed-size record bodies.
X86_TSC_INFO = struct.Struct("<IIQII")
"""``struct xc_sr_rec_x86_tsc_info``: mode, khz, nsec, incarnation, _res1."""
HVM_PARAMS_HEADER = struct.Struct("<II")
"""``struct xc_sr_rec_hvm_params``: count, _res1."""
HVM_PARAMS_ENTRY = struct.Struct("<QQ")
"""``struct xc_sr_rec_hvm_params_entry``: index, value."""
X86_PV_INFO = struct.Struct("<BBHI")
"""``struct xc_sr_rec_x86_pv_info``: guest_width, pt_levels, _res[6]."""
X86_PV_P2M_FRAMES_HEADER = struct.Struct("<II")
"""``struct xc_sr_rec_x86_pv_p2m_frames``: start_pfn, end_pfn, then u64 pfns."""
X86_PV_VCPU_HEADER = struct.Struct("<II")
"""``struct xc_sr_rec_x86_pv_vcpu_hdr``: vcpu_id, _res1, then the context."""
X86_CPUID_LEAF_SIZE = 24
"""``xen_cpuid_leaf_t``: leaf, subleaf, a, b, c, d (6 x u32)."""
X86_MSR_ENTRY_SIZE = 16
"""``xen_msr_entry_t``: idx (u32), flags (u32), val (u64)."""
SHARED_INFO_SIZE = PAGE_SIZE


def padded_length(length: int) -> int:
    """A record body's length on the wire: rounded up to ``RECORD_ALIGN``."""
    return (length + RECORD_ALIGN - 1) & ~(RECORD_ALIGN - 1)
