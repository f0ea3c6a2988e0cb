"""A strict parser of xl / libxl / libxc migration streams.

Modelled on Xen's tools/python/xen/migration/verify.py: every field the spec
fixes is checked, reserved fields must be zero, records are dispatched
through one table per layer, and every error says "expected X, got Y".

The parser itself does no I/O (``StreamParser``): it says how many bytes it
needs next and turns exactly that many into at most one record. Two drivers
sit on it: :func:`read_records` pulls from an injected ``read`` callable, and
:class:`StreamFeeder` accepts pushed bytes (a ``StreamWriter`` sink), so a
destination model can follow a stream while it is being written.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, Union

import numpy as np
import numpy.typing as npt

from softpage.abi import PAGE_SHIFT, PAGE_SIZE
from softpage.backend import TscInfo
from softpage.errors import StreamError
from softpage.pfnset import PfnArray
from softpage.stream import records as wire

if TYPE_CHECKING:
    from typing_extensions import Buffer

# -- the typed records ---------------------------------------------------------


@dataclass(frozen=True)
class XlHeader:
    mandatory_flags: int
    optional_flags: int
    config: bytes | None
    """The saved domain config as stored (xl includes a trailing NUL), or None."""


@dataclass(frozen=True)
class LibxlHeader:
    version: int
    options: int


@dataclass(frozen=True)
class LibxcContext:
    """libxl LIBXC_CONTEXT: a libxc stream follows inline."""


@dataclass(frozen=True)
class EmulatorRecord:
    record_type: wire.LibxlRecordType
    """EMULATOR_XENSTORE_DATA or EMULATOR_CONTEXT."""
    emulator_id: wire.EmulatorId
    index: int
    data: bytes


@dataclass(frozen=True)
class CheckpointEnd:
    """libxl CHECKPOINT_END (Remus/COLO)."""


@dataclass(frozen=True)
class CheckpointState:
    state: int


@dataclass(frozen=True)
class LibxlEnd:
    """libxl END: the last record of the whole stream."""


@dataclass(frozen=True)
class ImageHeader:
    version: int
    options: int


@dataclass(frozen=True)
class DomainHeader:
    domain_type: wire.DomainType
    page_shift: int
    xen_version: tuple[int, int]


@dataclass(frozen=True, eq=False)
class PageData:
    """One PAGE_DATA record.

    ``types`` holds ``XEN_DOMCTL_PFINFO_*`` values (stream type << 28), the
    unit ``MigrationBackend.page_types()`` uses; ``data`` holds one page per
    entry whose type carries data, in entry order.
    """

    pfns: PfnArray
    types: npt.NDArray[np.uint32]
    data: memoryview

    def stream_types(self) -> npt.NDArray[np.uint32]:
        return self.types >> np.uint32(wire.PFINFO_SHIFT)

    def data_mask(self) -> npt.NDArray[np.bool_]:
        return wire.data_type_mask(self.stream_types())

    def page(self, data_index: int) -> memoryview:
        return self.data[data_index * PAGE_SIZE : (data_index + 1) * PAGE_SIZE]


@dataclass(frozen=True)
class X86PvInfo:
    guest_width: int
    pt_levels: int


@dataclass(frozen=True)
class X86PvP2mFrames:
    start_pfn: int
    end_pfn: int
    p2m_pfns: tuple[int, ...]


@dataclass(frozen=True)
class X86PvVcpu:
    record_type: wire.LibxcRecordType
    vcpu_id: int
    context: bytes


@dataclass(frozen=True)
class SharedInfo:
    data: bytes


@dataclass(frozen=True)
class X86TscInfo:
    tsc: TscInfo


@dataclass(frozen=True)
class HvmContext:
    blob: bytes


@dataclass(frozen=True)
class HvmParams:
    params: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class X86CpuidPolicy:
    leaves: bytes


@dataclass(frozen=True)
class X86MsrPolicy:
    entries: bytes


@dataclass(frozen=True)
class StaticDataEnd:
    pass


@dataclass(frozen=True)
class VerifyRecord:
    """libxc VERIFY: the receiver compares instead of copying from here on."""


@dataclass(frozen=True)
class CheckpointRecord:
    """libxc CHECKPOINT (Remus/COLO)."""


@dataclass(frozen=True)
class LibxcEnd:
    pass


Record = Union[  # noqa: UP007 (a long alias reads better as Union[...])
    XlHeader,
    LibxlHeader,
    LibxcContext,
    EmulatorRecord,
    CheckpointEnd,
    CheckpointState,
    LibxlEnd,
    ImageHeader,
    DomainHeader,
    PageData,
    X86PvInfo,
    X86PvP2mFrames,
    X86PvVcpu,
    SharedInfo,
    X86TscInfo,
    HvmContext,
    HvmParams,
    X86CpuidPolicy,
    X86MsrPolicy,
    StaticDataEnd,
    VerifyRecord,
    CheckpointRecord,
    LibxcEnd,
]


class Layer(enum.Enum):
    """Where a stream starts (``verify-stream-v2 -f``)."""

    XL = "xl"
    LIBXL = "libxl"
    LIBXC = "libxc"


# -- per-record body parsers (libxc) -------------------------------------------


def _expect_empty(name: str, body: memoryview) -> None:
    if len(body):
        raise StreamError(f"{name}: expected length 0, got {len(body)}")


def _parse_page_data(body: memoryview, image_version: int) -> PageData:
    header_size = wire.PAGE_DATA_HEADER.size
    if len(body) < header_size:
        raise StreamError(f"PAGE_DATA: expected at least {header_size} bytes, got {len(body)}")
    count, reserved = wire.PAGE_DATA_HEADER.unpack_from(body)
    if count < 1:
        raise StreamError("PAGE_DATA: expected count >= 1, got 0")
    if reserved:
        raise StreamError(f"PAGE_DATA: expected _res1 == 0, got {reserved:#x}")
    words_end = header_size + 8 * count
    if len(body) < words_end:
        raise StreamError(f"PAGE_DATA: expected {count} pfn words, got a {len(body)}-byte record")
    words = np.frombuffer(body[header_size:words_end], dtype="<u8").astype(np.uint64)
    reserved_bits = words & np.uint64(wire.PAGE_DATA_RESERVED_MASK)
    if reserved_bits.any():
        index = int(np.flatnonzero(reserved_bits)[0])
        raise StreamError(
            f"PAGE_DATA: expected reserved bits 59..52 clear, got pfn[{index}] = {int(words[index]):#018x}"
        )
    stream_types = (words >> np.uint64(wire.PAGE_DATA_TYPE_SHIFT)).astype(np.uint32)
    known = wire.known_type_mask(stream_types)
    if not known.all():
        index = int(np.flatnonzero(~known)[0])
        raise StreamError(
            f"PAGE_DATA: expected a known page type, got {int(stream_types[index]):#x} in pfn[{index}]"
        )
    pages_of_data = int(np.count_nonzero(wire.data_type_mask(stream_types)))
    expected = words_end + pages_of_data * PAGE_SIZE
    if len(body) != expected:
        raise StreamError(
            f"PAGE_DATA: expected {header_size} + {8 * count} + {pages_of_data * PAGE_SIZE} "
            f"= {expected} bytes, got {len(body)}"
        )
    return PageData(
        pfns=words & np.uint64(wire.PAGE_DATA_PFN_MASK),
        types=stream_types << np.uint32(wire.PFINFO_SHIFT),
        data=body[words_end:],
    )


def _parse_x86_pv_info(body: memoryview) -> X86PvInfo:
    if len(body) != wire.X86_PV_INFO.size:
        raise StreamError(f"X86_PV_INFO: expected {wire.X86_PV_INFO.size} bytes, got {len(body)}")
    width, levels, reserved16, reserved32 = wire.X86_PV_INFO.unpack(body)
    if width not in (4, 8):
        raise StreamError(f"X86_PV_INFO: expected guest width 4 or 8, got {width}")
    if levels not in (3, 4):
        raise StreamError(f"X86_PV_INFO: expected 3 or 4 page-table levels, got {levels}")
    if reserved16 or reserved32:
        raise StreamError("X86_PV_INFO: expected reserved bytes zero, got non-zero")
    return X86PvInfo(width, levels)


def _parse_x86_pv_p2m_frames(body: memoryview) -> X86PvP2mFrames:
    header_size = wire.X86_PV_P2M_FRAMES_HEADER.size
    if len(body) < header_size or len(body) % 8:
        raise StreamError(f"X86_PV_P2M_FRAMES: expected 8 + 8*n bytes, got {len(body)}")
    start, end = wire.X86_PV_P2M_FRAMES_HEADER.unpack_from(body)
    frames = np.frombuffer(body[header_size:], dtype="<u8")
    return X86PvP2mFrames(start, end, tuple(int(pfn) for pfn in frames))


def _vcpu_parser(record_type: wire.LibxcRecordType) -> Callable[[memoryview], X86PvVcpu]:
    name = wire.LIBXC_RECORD_NAMES[record_type]

    def parse(body: memoryview) -> X86PvVcpu:
        header_size = wire.X86_PV_VCPU_HEADER.size
        if len(body) < header_size:
            raise StreamError(f"{name}: expected at least {header_size} bytes, got {len(body)}")
        vcpu_id, reserved = wire.X86_PV_VCPU_HEADER.unpack_from(body)
        if reserved:
            raise StreamError(f"{name}: expected _res1 == 0, got {reserved:#x}")
        return X86PvVcpu(record_type, vcpu_id, bytes(body[header_size:]))

    return parse


def _parse_shared_info(body: memoryview) -> SharedInfo:
    if len(body) != wire.SHARED_INFO_SIZE:
        raise StreamError(f"SHARED_INFO: expected {wire.SHARED_INFO_SIZE} bytes, got {len(body)}")
    return SharedInfo(bytes(body))


def _parse_tsc_info(body: memoryview) -> X86TscInfo:
    if len(body) != wire.X86_TSC_INFO.size:
        raise StreamError(f"X86_TSC_INFO: expected {wire.X86_TSC_INFO.size} bytes, got {len(body)}")
    mode, khz, nsec, incarnation, reserved = wire.X86_TSC_INFO.unpack(body)
    if reserved:
        raise StreamError(f"X86_TSC_INFO: expected _res1 == 0, got {reserved:#x}")
    return X86TscInfo(TscInfo(mode=mode, khz=khz, nsec=nsec, incarnation=incarnation))


def _parse_hvm_context(body: memoryview) -> HvmContext:
    if not len(body):
        raise StreamError("HVM_CONTEXT: expected a non-empty blob, got 0 bytes")
    return HvmContext(bytes(body))


def _parse_hvm_params(body: memoryview) -> HvmParams:
    header_size = wire.HVM_PARAMS_HEADER.size
    if len(body) < header_size:
        raise StreamError(f"HVM_PARAMS: expected at least {header_size} bytes, got {len(body)}")
    count, reserved = wire.HVM_PARAMS_HEADER.unpack_from(body)
    if reserved:
        raise StreamError(f"HVM_PARAMS: expected _res1 == 0, got {reserved:#x}")
    expected = header_size + count * wire.HVM_PARAMS_ENTRY.size
    if len(body) != expected:
        raise StreamError(f"HVM_PARAMS: expected {expected} bytes for {count} entries, got {len(body)}")
    params = tuple(
        wire.HVM_PARAMS_ENTRY.unpack_from(body, header_size + i * wire.HVM_PARAMS_ENTRY.size)
        for i in range(count)
    )
    return HvmParams(params)


def _policy_body(name: str, body: memoryview, entry_size: int, image_version: int) -> bytes:
    if image_version < 3:
        raise StreamError(f"{name}: expected only in a v3 stream, got one in v{image_version}")
    if not len(body) or len(body) % entry_size:
        raise StreamError(f"{name}: expected a non-zero multiple of {entry_size} bytes, got {len(body)}")
    return bytes(body)


def _parse_static_data_end(body: memoryview, image_version: int) -> StaticDataEnd:
    if image_version < 3:
        raise StreamError(f"STATIC_DATA_END: expected only in a v3 stream, got one in v{image_version}")
    _expect_empty("STATIC_DATA_END", body)
    return StaticDataEnd()


def _rejected(name: str, why: str) -> Callable[[memoryview, int], Record]:
    def reject(body: memoryview, image_version: int) -> Record:
        raise StreamError(f"{name}: {why}")

    return reject


def _ignoring_version(parse: Callable[[memoryview], Record]) -> Callable[[memoryview, int], Record]:
    return lambda body, image_version: parse(body)


def _empty(name: str, record: Record) -> Callable[[memoryview, int], Record]:
    def parse(body: memoryview, image_version: int) -> Record:
        _expect_empty(name, body)
        return record

    return parse


_T = wire.LibxcRecordType
LIBXC_PARSERS: Mapping[int, Callable[[memoryview, int], Record]] = MappingProxyType({
    _T.END: _empty("END", LibxcEnd()),
    _T.PAGE_DATA: _parse_page_data,
    _T.X86_PV_INFO: _ignoring_version(_parse_x86_pv_info),
    _T.X86_PV_P2M_FRAMES: _ignoring_version(_parse_x86_pv_p2m_frames),
    _T.X86_PV_VCPU_BASIC: _ignoring_version(_vcpu_parser(_T.X86_PV_VCPU_BASIC)),
    _T.X86_PV_VCPU_EXTENDED: _ignoring_version(_vcpu_parser(_T.X86_PV_VCPU_EXTENDED)),
    _T.X86_PV_VCPU_XSAVE: _ignoring_version(_vcpu_parser(_T.X86_PV_VCPU_XSAVE)),
    _T.X86_PV_VCPU_MSRS: _ignoring_version(_vcpu_parser(_T.X86_PV_VCPU_MSRS)),
    _T.SHARED_INFO: _ignoring_version(_parse_shared_info),
    _T.X86_TSC_INFO: _ignoring_version(_parse_tsc_info),
    _T.HVM_CONTEXT: _ignoring_version(_parse_hvm_context),
    _T.HVM_PARAMS: _ignoring_version(_parse_hvm_params),
    _T.TOOLSTACK: _rejected("TOOLSTACK", "expected no deprecated TOOLSTACK record, got one"),
    _T.VERIFY: _empty("VERIFY", VerifyRecord()),
    _T.CHECKPOINT: _empty("CHECKPOINT", CheckpointRecord()),
    _T.CHECKPOINT_DIRTY_PFN_LIST: _rejected(
        "CHECKPOINT_DIRTY_PFN_LIST", "expected only on the COLO back channel, got one in the stream"
    ),
    _T.STATIC_DATA_END: _parse_static_data_end,
    _T.X86_CPUID_POLICY: lambda body, version: X86CpuidPolicy(
        _policy_body("X86_CPUID_POLICY", body, wire.X86_CPUID_LEAF_SIZE, version)
    ),
    _T.X86_MSR_POLICY: lambda body, version: X86MsrPolicy(
        _policy_body("X86_MSR_POLICY", body, wire.X86_MSR_ENTRY_SIZE, version)
    ),
})
"""libxc record type -> body parser(body, image version)."""


# -- per-record body parsers (libxl) -------------------------------------------


def _emulator_parser(record_type: wire.LibxlRecordType) -> Callable[[memoryview], Record]:
    name = wire.LIBXL_RECORD_NAMES[record_type]

    def parse(body: memoryview) -> Record:
        header_size = wire.LIBXL_EMULATOR_HEADER.size
        if len(body) < header_size:
            raise StreamError(f"{name}: expected at least {header_size} bytes, got {len(body)}")
        emulator_id, index = wire.LIBXL_EMULATOR_HEADER.unpack_from(body)
        if emulator_id not in wire.EmulatorId.__members__.values():
            raise StreamError(f"{name}: expected a known emulator id, got {emulator_id}")
        data = bytes(body[header_size:])
        if record_type == wire.LibxlRecordType.EMULATOR_XENSTORE_DATA and data and data[-1] != 0:
            raise StreamError(f"{name}: expected NUL-terminated key/value pairs, got {data[-1:]!r} last")
        return EmulatorRecord(record_type, wire.EmulatorId(emulator_id), index, data)

    return parse


def _parse_checkpoint_state(body: memoryview) -> Record:
    if len(body) != wire.LIBXL_CHECKPOINT_STATE.size:
        raise StreamError(f"CHECKPOINT_STATE: expected 4 bytes, got {len(body)}")
    return CheckpointState(wire.LIBXL_CHECKPOINT_STATE.unpack(body)[0])


def _libxl_empty(name: str, record: Record) -> Callable[[memoryview], Record]:
    def parse(body: memoryview) -> Record:
        _expect_empty(name, body)
        return record

    return parse


_L = wire.LibxlRecordType
LIBXL_PARSERS: Mapping[int, Callable[[memoryview], Record]] = MappingProxyType({
    _L.END: _libxl_empty("libxl END", LibxlEnd()),
    _L.LIBXC_CONTEXT: _libxl_empty("LIBXC_CONTEXT", LibxcContext()),
    _L.EMULATOR_XENSTORE_DATA: _emulator_parser(_L.EMULATOR_XENSTORE_DATA),
    _L.EMULATOR_CONTEXT: _emulator_parser(_L.EMULATOR_CONTEXT),
    _L.CHECKPOINT_END: _libxl_empty("CHECKPOINT_END", CheckpointEnd()),
    _L.CHECKPOINT_STATE: _parse_checkpoint_state,
})
"""libxl record type -> body parser(body)."""


# -- the sans-I/O state machine -------------------------------------------------

_Step = Callable[[memoryview], Union[Record, None]]  # noqa: UP007 (evaluated at run time)


class StreamParser:
    """Turns a stream into records without doing I/O.

    Ask ``bytes_needed``, hand exactly that many bytes to ``consume``; it
    returns the record they completed, if any. ``done`` turns true after the
    stream's last END (libxl END, or libxc END for a bare libxc stream).
    Bytes after that are not the stream's (``xl migrate`` carries its
    handshake on the same connection) and are never asked for.
    """

    def __init__(self, start: Layer = Layer.XL) -> None:
        self._start = start
        self._image_version = wire.IHDR_VERSION
        self._inside_libxl = start is not Layer.LIBXC
        self._pending_type = 0
        self._pending_length = 0
        self._xl_flags = (0, 0)
        self._need = 0
        self._step: _Step | None = None
        self.offset = 0
        """Stream offset of the next byte to consume (for error messages)."""
        if start is Layer.XL:
            self._expect(wire.XL_HEADER.size, self._xl_header)
        elif start is Layer.LIBXL:
            self._expect(wire.LIBXL_HEADER.size, self._libxl_header)
        else:
            self._expect(wire.LIBXC_IMAGE_HEADER.size, self._image_header)

    @property
    def bytes_needed(self) -> int:
        return self._need

    @property
    def done(self) -> bool:
        return self._step is None

    def consume(self, chunk: Buffer) -> Record | None:
        view = memoryview(chunk).cast("B")
        if self._step is None:
            raise StreamError(f"expected nothing after the stream's END, got {len(view)} more bytes")
        if len(view) != self._need:
            raise StreamError(f"expected {self._need} bytes at offset {self.offset}, got {len(view)}")
        step = self._step
        try:
            record = step(view)
        except StreamError as error:
            raise StreamError(f"at stream offset {self.offset}: {error}") from None
        self.offset += len(view)
        return record

    # -- steps ------------------------------------------------------------
    def _expect(self, size: int, step: _Step | None) -> None:
        self._need = size
        self._step = step

    def _xl_header(self, view: memoryview) -> Record | None:
        magic, byteorder, mandatory, optional, optional_length = wire.XL_HEADER.unpack(view)
        if magic != wire.XL_MAGIC:
            raise StreamError(f"xl header: expected magic {wire.XL_MAGIC!r}, got {magic!r}")
        if byteorder != wire.XL_BYTEORDER:
            raise StreamError(
                f"xl header: expected byteorder {wire.XL_BYTEORDER:#010x}, got {byteorder:#010x}"
            )
        if mandatory & ~wire.XL_MANDATORY_FLAGS_KNOWN:
            raise StreamError(
                f"xl header: expected mandatory flags within {wire.XL_MANDATORY_FLAGS_KNOWN:#x}, "
                f"got {mandatory:#x}"
            )
        if not mandatory & wire.XL_MANDATORY_FLAG_STREAMV2:
            raise StreamError(f"xl header: expected the STREAMv2 flag, got mandatory flags {mandatory:#x}")
        if optional:
            raise StreamError(f"xl header: expected optional flags 0, got {optional:#x}")
        self._xl_flags = (mandatory, optional)
        if optional_length == 0:
            self._expect(wire.LIBXL_HEADER.size, self._libxl_header)
            return XlHeader(mandatory, optional, None)
        self._expect(optional_length, self._xl_optional_data)
        return None

    def _xl_optional_data(self, view: memoryview) -> Record | None:
        length_size = wire.XL_CONFIG_LENGTH.size
        if len(view) < length_size:
            raise StreamError(f"xl header: expected a {length_size}-byte config length, got {len(view)}")
        (config_length,) = wire.XL_CONFIG_LENGTH.unpack_from(view)
        if length_size + config_length != len(view):
            raise StreamError(
                f"xl header: expected {length_size} + {config_length} bytes of optional data, got {len(view)}"
            )
        self._expect(wire.LIBXL_HEADER.size, self._libxl_header)
        mandatory, optional = self._xl_flags
        return XlHeader(mandatory, optional, bytes(view[length_size:]))

    def _libxl_header(self, view: memoryview) -> Record | None:
        ident, version, options = wire.LIBXL_HEADER.unpack(view)
        if ident != wire.LIBXL_IDENT:
            raise StreamError(f"libxl header: expected ident {wire.LIBXL_IDENT:#x}, got {ident:#x}")
        if version != wire.LIBXL_VERSION:
            raise StreamError(f"libxl header: expected version {wire.LIBXL_VERSION}, got {version}")
        if options & ~wire.LIBXL_OPTS_KNOWN:
            raise StreamError(
                f"libxl header: expected options within {wire.LIBXL_OPTS_KNOWN:#x}, got {options:#x}"
            )
        if options & wire.LIBXL_OPT_BIG_ENDIAN:
            raise StreamError("libxl header: expected a little-endian stream, got the big-endian option")
        self._expect(wire.LIBXL_RECORD_HEADER.size, self._libxl_record_header)
        return LibxlHeader(version, options)

    def _libxl_record_header(self, view: memoryview) -> Record | None:
        record_type, length = wire.LIBXL_RECORD_HEADER.unpack(view)
        if record_type not in LIBXL_PARSERS:
            raise StreamError(f"libxl record: expected a known type, got {record_type:#x}")
        if length > wire.RECORD_LENGTH_MAX:
            raise StreamError(f"libxl record: expected length <= {wire.RECORD_LENGTH_MAX}, got {length}")
        self._pending_type, self._pending_length = record_type, length
        if length == 0:
            return self._libxl_record_done(view[:0])
        self._expect(wire.padded_length(length), self._libxl_record_body)
        return None

    def _libxl_record_body(self, view: memoryview) -> Record | None:
        return self._libxl_record_done(self._strip_padding(view))

    def _libxl_record_done(self, body: memoryview) -> Record | None:
        record = LIBXL_PARSERS[self._pending_type](body)
        if isinstance(record, LibxlEnd):
            self._expect(0, None)
        elif isinstance(record, LibxcContext):
            self._expect(wire.LIBXC_IMAGE_HEADER.size, self._image_header)
        else:
            self._expect(wire.LIBXL_RECORD_HEADER.size, self._libxl_record_header)
        return record

    def _image_header(self, view: memoryview) -> Record | None:
        marker, ident, version, options, reserved1, reserved2 = wire.LIBXC_IMAGE_HEADER.unpack(view)
        if marker != wire.IHDR_MARKER:
            raise StreamError(f"image header: expected marker {wire.IHDR_MARKER:#x}, got {marker:#x}")
        if ident != wire.IHDR_ID:
            raise StreamError(f"image header: expected id {wire.IHDR_ID:#x}, got {ident:#x}")
        if version not in wire.IHDR_VERSIONS_ACCEPTED:
            raise StreamError(f"image header: expected version 2 or 3, got {version}")
        if options & ~wire.IHDR_OPTS_KNOWN:
            raise StreamError(
                f"image header: expected options within {wire.IHDR_OPTS_KNOWN:#x}, got {options:#x}"
            )
        if options & wire.IHDR_OPT_BIG_ENDIAN:
            raise StreamError("image header: expected a little-endian stream, got the big-endian option")
        if reserved1 or reserved2:
            raise StreamError(f"image header: expected reserved fields 0, got {reserved1:#x}/{reserved2:#x}")
        self._image_version = version
        self._expect(wire.LIBXC_DOMAIN_HEADER.size, self._domain_header)
        return ImageHeader(version, options)

    def _domain_header(self, view: memoryview) -> Record | None:
        domain_type, page_shift, reserved, major, minor = wire.LIBXC_DOMAIN_HEADER.unpack(view)
        if domain_type not in wire.DomainType.__members__.values():
            raise StreamError(f"domain header: expected type 1 (PV) or 2 (HVM), got {domain_type:#x}")
        if page_shift != PAGE_SHIFT:
            raise StreamError(f"domain header: expected page shift {PAGE_SHIFT}, got {page_shift}")
        if reserved:
            raise StreamError(f"domain header: expected _res1 == 0, got {reserved:#x}")
        self._expect(wire.LIBXC_RECORD_HEADER.size, self._libxc_record_header)
        return DomainHeader(wire.DomainType(domain_type), page_shift, (major, minor))

    def _libxc_record_header(self, view: memoryview) -> Record | None:
        record_type, length = wire.LIBXC_RECORD_HEADER.unpack(view)
        if record_type not in LIBXC_PARSERS:
            raise StreamError(f"libxc record: expected a known type, got {record_type:#x}")
        if length > wire.RECORD_LENGTH_MAX:
            raise StreamError(f"libxc record: expected length <= {wire.RECORD_LENGTH_MAX}, got {length}")
        self._pending_type, self._pending_length = record_type, length
        if length == 0:
            return self._libxc_record_done(view[:0])
        self._expect(wire.padded_length(length), self._libxc_record_body)
        return None

    def _libxc_record_body(self, view: memoryview) -> Record | None:
        return self._libxc_record_done(self._strip_padding(view))

    def _libxc_record_done(self, body: memoryview) -> Record | None:
        record = LIBXC_PARSERS[self._pending_type](body, self._image_version)
        if not isinstance(record, LibxcEnd):
            self._expect(wire.LIBXC_RECORD_HEADER.size, self._libxc_record_header)
        elif self._inside_libxl:
            self._expect(wire.LIBXL_RECORD_HEADER.size, self._libxl_record_header)
        else:
            self._expect(0, None)
        return record

    def _strip_padding(self, view: memoryview) -> memoryview:
        padding = view[self._pending_length :]
        if any(padding):
            raise StreamError(f"record padding: expected zero bytes, got {bytes(padding).hex()}")
        return view[: self._pending_length]


# -- drivers ---------------------------------------------------------------------


READ_CHUNK_MAX: Final = 16 << 20
"""The most ``read_records`` asks ``read`` for at once. A buffered file's ``read(n)``
allocates n bytes before it meets the end of the file, and n comes from the
stream (an xl header's optional data length is any 32-bit number): asking for
at most this much bounds the memory to the bytes the stream really has, plus
16 MiB. A PAGE_DATA record of 1024 pages still arrives in one piece."""


def _read_exactly(read: Callable[[int], bytes], size: int, offset: int) -> bytes:
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        chunk = read(min(remaining, READ_CHUNK_MAX))
        if not chunk:
            got = size - remaining
            raise StreamError(f"expected {size} bytes at stream offset {offset}, got {got} before EOF")
        chunks.append(chunk)
        remaining -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def read_records(read: Callable[[int], bytes], start: Layer = Layer.XL) -> Iterator[Record]:
    """Parse a whole stream from ``read(n)`` (a file's ``read``, say),
    yielding each record. Stops after the last END without reading further.

    Records hold views of the bytes ``read`` returned; nothing is copied twice.
    """
    parser = StreamParser(start)
    while not parser.done:
        record = parser.consume(_read_exactly(read, parser.bytes_needed, parser.offset))
        if record is not None:
            yield record


def parse_stream(data: Buffer, start: Layer = Layer.XL) -> list[Record]:
    """All records of an in-memory stream; trailing bytes are an error."""
    view = memoryview(data).cast("B")
    parser = StreamParser(start)
    parsed: list[Record] = []
    position = 0
    while not parser.done:
        need = parser.bytes_needed
        if position + need > len(view):
            raise StreamError(
                f"expected {need} bytes at stream offset {position}, "
                f"got {len(view) - position} before the end"
            )
        record = parser.consume(view[position : position + need])
        position += need
        if record is not None:
            parsed.append(record)
    if position != len(view):
        raise StreamError(
            f"expected the stream to end at offset {position}, got {len(view) - position} more bytes"
        )
    return parsed


class StreamFeeder:
    """Push-mode driver: a ``writev``-shaped sink that parses what it is given
    and hands each completed record to ``on_record``.

    Use it as a :class:`~softpage.stream.writer.StreamWriter` sink to follow
    a stream while it is written (the simulator's destination).
    """

    def __init__(self, on_record: Callable[[Record], None], start: Layer = Layer.XL) -> None:
        self._parser = StreamParser(start)
        self._on_record = on_record
        self._pending = bytearray()

    @property
    def done(self) -> bool:
        return self._parser.done

    def writev(self, buffers: Sequence[Buffer]) -> int:
        total = 0
        for buffer in buffers:
            total += self.feed(buffer)
        return total

    def feed(self, data: Buffer) -> int:
        """Accept ``data`` (all of it) and parse every record it completes."""
        view = memoryview(data).cast("B")
        accepted = len(view)
        while len(view) and not self._parser.done:
            need = self._parser.bytes_needed - len(self._pending)
            if not self._pending and len(view) >= need:
                # The common case for large PAGE_DATA writes: no copy at all.
                chunk: Buffer = view[:need]
            else:
                self._pending += view[:need]
                if len(self._pending) < self._parser.bytes_needed:
                    return accepted
                chunk = bytes(self._pending)
                self._pending.clear()
            view = view[need:]
            record = self._parser.consume(chunk)
            if record is not None:
                self._on_record(record)
        if len(view):
            raise StreamError(f"expected nothing after the stream's END, got {len(view)} more bytes")
        return accepted
