"""StreamWriter: writes an xl / libxl / libxc v3 migration stream for an
HVM or PVH guest, in the order Xen 4.17's own saver does.

The order (``save()`` in tools/libs/guest/xg_sr_save.c, libxl_stream_write.c,
``save_domain_core_writeconfig`` in tools/xl/xl_saverestore.c)::

    xl_header(config_json)            xl save-file header + config
    libxl_header()                    "LibxlFmt" v2
    libxl_libxc_context()             LIBXC_CONTEXT; the libxc stream follows inline
    libxc_headers(type, version)      image header (v3) + domain header
    static_data(StaticInfo)           X86_CPUID_POLICY, X86_MSR_POLICY, STATIC_DATA_END
    { write_pages() | add_page() | flush() }*     PAGE_DATA records
    end_of_checkpoint(EndOfCheckpoint)            X86_TSC_INFO, HVM_CONTEXT, HVM_PARAMS
    libxc_end()                       libxc END
    libxl_end()                       libxl END (PVH has no emulator records)

``begin()`` and ``finish()`` bundle the steps before and after memory. Any
call out of this order raises ``StreamError``: a driver bug must not turn
into a stream that a stock receiver rejects half-way through a migration.

Page batching follows ``add_to_batch`` / ``flush_batch`` / ``write_batch``
of xg_sr_save.c: at most ``MAX_BATCH_SIZE`` (1024) pfns per PAGE_DATA record,
and each record goes out in one ``writev`` (header and pfn words in one
buffer built with numpy, page data as the caller's memoryviews: no copy).
"""

from __future__ import annotations

import enum
import errno
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from softpage.abi import PAGE_SHIFT, PAGE_SIZE
from softpage.backend import EndOfCheckpoint, GuestType, StaticInfo
from softpage.errors import StreamError
from softpage.stream import records as wire

if TYPE_CHECKING:
    from typing_extensions import Buffer

WritevFn = Callable[[Sequence["Buffer"]], int]
"""``os.writev``-shaped: write the buffers in order, return how many bytes
were written (possibly fewer than offered, never zero for a non-empty list)."""

IOV_MAX = 1024
"""Linux's limit on buffers per ``writev`` call (``UIO_MAXIOV``)."""

_TYPE_LOW_BITS = np.uint32((1 << wire.PFINFO_SHIFT) - 1)


class _Stage(enum.IntEnum):
    """How far the stream has got; each method moves it forward."""

    START = 0
    XL_HEADER = 1
    LIBXL_HEADER = 2
    LIBXC_CONTEXT = 3
    LIBXC_HEADERS = 4
    MEMORY = 5
    END_OF_CHECKPOINT = 6
    LIBXC_END = 7
    LIBXL_END = 8


@dataclass
class WriterStats:
    """What went out so far."""

    bytes_written: int = 0
    page_records: int = 0
    page_entries: int = 0
    data_pages: int = 0
    xalloc_entries: int = 0


class StreamWriter:
    """Writes one migration stream to ``writev`` (see ``WritevFn``).

    Errors: ``StreamError`` for a call out of order or an entry the stream
    cannot carry; ``OSError`` from the sink, unchanged.
    """

    def __init__(self, writev: WritevFn) -> None:
        self._writev = writev
        self._stage = _Stage.START
        self._inside_libxl = False
        self._pv = False
        """The domain header said X86_PV: PV records before and after memory."""
        self.stats = WriterStats()
        self._batch_pfns: list[int] = []
        self._batch_types: list[int] = []
        self._batch_data: list[memoryview] = []

    @classmethod
    def for_fd(cls, fd: int) -> StreamWriter:
        """A writer on a file descriptor (file, pipe or socket)."""
        return cls(lambda buffers: os.writev(fd, buffers))

    @property
    def bytes_written(self) -> int:
        return self.stats.bytes_written

    # -- convenience ------------------------------------------------------
    def begin(
        self,
        config_json: bytes | None,
        guest_type: GuestType,
        xen_version: tuple[int, int],
        static: StaticInfo,
    ) -> None:
        """Everything before the first page: of an ``xl`` stream, or with ``config_json`` None of
        a bare libxc stream, the part libxl's save helper writes inside libxl's own records."""
        if config_json is not None:
            self.xl_header(config_json)
            self.libxl_header()
            self.libxl_libxc_context()
        self.libxc_headers(guest_type, xen_version)
        self.static_data(static)

    def finish(self, end: EndOfCheckpoint) -> None:
        """Everything after the last page: flush, end of checkpoint, both ENDs."""
        self.end_of_checkpoint(end)
        self.libxc_end()
        if self._inside_libxl:
            self.libxl_end()

    # -- xl ---------------------------------------------------------------
    def xl_header(self, config_json: bytes) -> None:
        """The xl save-file header with the domain config as optional data.

        xl stores the config as a C string (``config_len`` counts the NUL,
        and the restorer parses it with ``libxl_domain_config_from_json``),
        so a missing trailing NUL is added here.
        """
        self._advance({_Stage.START}, _Stage.XL_HEADER, "xl_header")
        if not config_json.strip(b"\0"):
            raise StreamError("xl header: expected a non-empty domain config, got none")
        config = config_json if config_json.endswith(b"\0") else config_json + b"\0"
        optional_data_length = wire.XL_CONFIG_LENGTH.size + len(config)
        header = wire.XL_HEADER.pack(
            wire.XL_MAGIC,
            wire.XL_BYTEORDER,
            wire.XL_MANDATORY_FLAG_STREAMV2 | wire.XL_MANDATORY_FLAG_JSON,
            0,
            optional_data_length,
        )
        self._emit([header + wire.XL_CONFIG_LENGTH.pack(len(config)), config])

    # -- libxl ------------------------------------------------------------
    def libxl_header(self) -> None:
        self._advance({_Stage.START, _Stage.XL_HEADER}, _Stage.LIBXL_HEADER, "libxl_header")
        self._inside_libxl = True
        # libxl_stream_write.c writes options = 0: little-endian, not legacy.
        self._emit([wire.LIBXL_HEADER.pack(wire.LIBXL_IDENT, wire.LIBXL_VERSION, 0)])

    def libxl_libxc_context(self) -> None:
        self._advance({_Stage.LIBXL_HEADER}, _Stage.LIBXC_CONTEXT, "libxl_libxc_context")
        self._emit([wire.LIBXL_RECORD_HEADER.pack(wire.LibxlRecordType.LIBXC_CONTEXT, 0)])

    def libxl_end(self) -> None:
        self._advance({_Stage.LIBXC_END}, _Stage.LIBXL_END, "libxl_end")
        if not self._inside_libxl:
            raise StreamError("libxl END: expected a libxl stream, got a bare libxc stream")
        self._emit([wire.LIBXL_RECORD_HEADER.pack(wire.LibxlRecordType.END, 0)])

    # -- libxc ------------------------------------------------------------
    def libxc_headers(self, guest_type: GuestType, xen_version: tuple[int, int]) -> None:
        """Image header (v3, little-endian) and domain header (X86_PV, or X86_HVM for HVM and
        PVH guests)."""
        self._advance({_Stage.START, _Stage.LIBXC_CONTEXT}, _Stage.LIBXC_HEADERS, "libxc_headers")
        self._pv = guest_type is GuestType.PV
        domain_type = wire.DomainType.X86_PV if self._pv else wire.DomainType.X86_HVM
        major, minor = xen_version
        if not (0 <= major <= 0xFFFF and 0 <= minor <= 0xFFFF):
            raise StreamError(f"domain header: expected a 16-bit Xen version, got {major}.{minor}")
        image = wire.LIBXC_IMAGE_HEADER.pack(wire.IHDR_MARKER, wire.IHDR_ID, wire.IHDR_VERSION, 0, 0, 0)
        domain = wire.LIBXC_DOMAIN_HEADER.pack(domain_type, PAGE_SHIFT, 0, major, minor)
        self._emit([image + domain])

    def static_data(self, static: StaticInfo) -> None:
        """CPUID and MSR policy records, each only when non-empty (as
        ``write_x86_cpu_policy_records`` does), then STATIC_DATA_END. A PV guest's
        X86_PV_INFO comes first and its X86_PV_P2M_FRAMES last, the order of
        ``x86_pv_static_data`` and ``x86_pv_start_of_stream`` (xg_sr_save_x86_pv.c)."""
        self._advance({_Stage.LIBXC_HEADERS}, _Stage.MEMORY, "static_data")
        if self._pv != (static.pv is not None):
            raise StreamError("static data: PV information is for PV guests, and only for them")
        if static.pv is not None:
            self._libxc_record(
                wire.LibxcRecordType.X86_PV_INFO,
                wire.X86_PV_INFO.pack(static.pv.guest_width, static.pv.pt_levels, 0, 0),
            )
        for record_type, blob, entry_size in (
            (wire.LibxcRecordType.X86_CPUID_POLICY, static.cpuid_policy, wire.X86_CPUID_LEAF_SIZE),
            (wire.LibxcRecordType.X86_MSR_POLICY, static.msr_policy, wire.X86_MSR_ENTRY_SIZE),
        ):
            if len(blob) % entry_size:
                name = wire.LIBXC_RECORD_NAMES[record_type]
                raise StreamError(f"{name}: expected a multiple of {entry_size} bytes, got {len(blob)}")
            if blob:
                self._libxc_record(record_type, blob)
        self._libxc_record(wire.LibxcRecordType.STATIC_DATA_END, b"")
        if static.pv is not None:
            frames = np.asarray(static.pv.p2m_frame_pfns, dtype="<u8")
            self._libxc_record(
                wire.LibxcRecordType.X86_PV_P2M_FRAMES,
                wire.X86_PV_P2M_FRAMES_HEADER.pack(0, static.pv.p2m_end_pfn) + frames.tobytes(),
            )

    def end_of_checkpoint(self, end: EndOfCheckpoint) -> None:
        """X86_TSC_INFO, HVM_CONTEXT, HVM_PARAMS, the order of
        ``x86_hvm_end_of_checkpoint`` (xg_sr_save_x86_hvm.c); for a PV guest X86_TSC_INFO,
        SHARED_INFO and each vCPU's records (``x86_pv_end_of_checkpoint``)."""
        self._require({_Stage.MEMORY}, "end_of_checkpoint")
        if self._pv:
            _check_pv_end(end)
        elif not end.hvm_context:
            raise StreamError("HVM_CONTEXT: expected a non-empty blob, got 0 bytes")
        self.flush()
        self._advance({_Stage.MEMORY}, _Stage.END_OF_CHECKPOINT, "end_of_checkpoint")
        tsc = end.tsc
        tsc_info = wire.X86_TSC_INFO.pack(tsc.mode, tsc.khz, tsc.nsec, tsc.incarnation, 0)
        if self._pv:
            self._pv_end_of_checkpoint(end, tsc_info)
            return
        self._libxc_record(wire.LibxcRecordType.X86_TSC_INFO, tsc_info)
        self._libxc_record(wire.LibxcRecordType.HVM_CONTEXT, end.hvm_context)
        params = bytearray(wire.HVM_PARAMS_HEADER.pack(len(end.hvm_params), 0))
        for index, value in end.hvm_params:
            params += wire.HVM_PARAMS_ENTRY.pack(index, value)
        self._libxc_record(wire.LibxcRecordType.HVM_PARAMS, params)

    def _pv_end_of_checkpoint(self, end: EndOfCheckpoint, tsc_info: bytes) -> None:
        self._libxc_record(wire.LibxcRecordType.X86_TSC_INFO, tsc_info)
        self._libxc_record(wire.LibxcRecordType.SHARED_INFO, end.pv_shared_info)
        for vcpu in end.pv_vcpus:
            header = wire.X86_PV_VCPU_HEADER.pack(vcpu.vcpu_id, 0)
            for record_type, blob in (
                (wire.LibxcRecordType.X86_PV_VCPU_BASIC, vcpu.basic),
                (wire.LibxcRecordType.X86_PV_VCPU_EXTENDED, vcpu.extended),
                (wire.LibxcRecordType.X86_PV_VCPU_XSAVE, vcpu.xsave),
                (wire.LibxcRecordType.X86_PV_VCPU_MSRS, vcpu.msrs),
            ):
                if blob:
                    self._libxc_record(record_type, header + blob)

    def libxc_end(self) -> None:
        self._advance({_Stage.END_OF_CHECKPOINT}, _Stage.LIBXC_END, "libxc_end")
        self._libxc_record(wire.LibxcRecordType.END, b"")

    # -- memory -----------------------------------------------------------
    def write_pages(
        self,
        pfns: npt.NDArray[np.unsignedinteger],
        types: npt.NDArray[np.uint32],
        data: Buffer,
    ) -> None:
        """Write entries ``(pfns[i], types[i])`` as PAGE_DATA records.

        ``types`` are ``XEN_DOMCTL_PFINFO_*`` values. ``data`` holds one page
        for each entry whose type carries data (NOTAB, L1-L4), in entry
        order, and nothing for XALLOC, XTAB and BROKEN. Entries queued with
        ``add_page`` go out first.
        """
        self._require({_Stage.MEMORY}, "write_pages")
        pfn_words, stream_types = self._checked_entries(pfns, types)
        data_view = memoryview(data).cast("B")
        has_data = wire.data_type_mask(stream_types)
        pages_before = np.concatenate(([0], np.cumsum(has_data, dtype=np.int64)))
        total_pages = int(pages_before[-1])
        if len(data_view) != total_pages * PAGE_SIZE:
            raise StreamError(
                f"page data: expected {total_pages} pages ({total_pages * PAGE_SIZE} bytes) "
                f"for the entries with data, got {len(data_view)} bytes"
            )
        self.flush()
        words = (types.astype(np.uint64) << np.uint64(32)) | pfn_words
        for start in range(0, len(words), wire.MAX_BATCH_SIZE):
            end = min(start + wire.MAX_BATCH_SIZE, len(words))
            first_page, end_page = int(pages_before[start]), int(pages_before[end])
            page_bytes = data_view[first_page * PAGE_SIZE : end_page * PAGE_SIZE]
            self._page_record(words[start:end], stream_types[start:end], [page_bytes])

    def add_page(self, pfn: int, page_type: int, data: Buffer | None = None) -> None:
        """Queue one entry (``page_type`` a ``XEN_DOMCTL_PFINFO_*`` value);
        a full batch of ``MAX_BATCH_SIZE`` is written at once. ``data`` must
        stay valid until then (or until ``flush``)."""
        self._require({_Stage.MEMORY}, "add_page")
        self._checked_entries(np.array([pfn], dtype=np.uint64), np.array([page_type], dtype=np.uint32))
        has_data = wire.page_type_has_data(page_type >> wire.PFINFO_SHIFT)
        if has_data:
            if data is None:
                raise StreamError(f"pfn {pfn:#x}: expected a page of data for its type, got none")
            view = memoryview(data).cast("B")
            if len(view) != PAGE_SIZE:
                raise StreamError(f"pfn {pfn:#x}: expected {PAGE_SIZE} bytes of data, got {len(view)}")
            self._batch_data.append(view)
        elif data is not None:
            name = wire.PAGE_TYPE_NAMES[wire.PageType(page_type >> wire.PFINFO_SHIFT)]
            raise StreamError(f"pfn {pfn:#x}: expected no data for type {name}, got {len(memoryview(data))}")
        self._batch_pfns.append(pfn)
        self._batch_types.append(page_type)
        if len(self._batch_pfns) == wire.MAX_BATCH_SIZE:
            self.flush()

    def flush(self) -> None:
        """Write the entries queued by ``add_page`` as one PAGE_DATA record."""
        if not self._batch_pfns:
            return
        types = np.array(self._batch_types, dtype=np.uint32)
        words = (types.astype(np.uint64) << np.uint64(32)) | np.array(self._batch_pfns, dtype=np.uint64)
        data = self._batch_data
        self._batch_pfns, self._batch_types, self._batch_data = [], [], []
        self._page_record(words, types >> np.uint32(wire.PFINFO_SHIFT), data)

    # -- internals --------------------------------------------------------
    def _checked_entries(
        self, pfns: npt.NDArray[np.unsignedinteger], types: npt.NDArray[np.uint32]
    ) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint32]]:
        if pfns.ndim != 1 or types.shape != pfns.shape:
            raise StreamError(
                f"page entries: expected equal 1-d pfn and type arrays, got {pfns.shape}/{types.shape}"
            )
        if pfns.dtype.kind not in "ui" or types.dtype != np.uint32:
            raise StreamError(
                f"page entries: expected integer pfns and uint32 types, got {pfns.dtype}/{types.dtype}"
            )
        if not len(pfns):
            raise StreamError("page entries: expected at least one entry, got 0")
        if pfns.dtype.kind == "i" and int(pfns.min()) < 0:
            raise StreamError(f"page entries: expected pfns >= 0, got {int(pfns.min())}")
        pfn_words = pfns.astype(np.uint64)
        if int(pfn_words.max()) > wire.PAGE_DATA_PFN_MASK:
            raise StreamError(
                f"page entries: expected pfns <= {wire.PAGE_DATA_PFN_MASK:#x}, got {int(pfn_words.max()):#x}"
            )
        low_bits = types & _TYPE_LOW_BITS
        if low_bits.any():
            index = int(np.flatnonzero(low_bits)[0])
            raise StreamError(
                f"page entries: expected XEN_DOMCTL_PFINFO_* values, got {int(types[index]):#x} for pfn "
                f"{int(pfn_words[index]):#x}"
            )
        stream_types = types >> np.uint32(wire.PFINFO_SHIFT)
        known = wire.known_type_mask(stream_types)
        if not known.all():
            index = int(np.flatnonzero(~known)[0])
            raise StreamError(
                f"page entries: expected a known page type, got {int(types[index]):#x} for pfn "
                f"{int(pfn_words[index]):#x}"
            )
        return pfn_words, stream_types

    def _page_record(
        self,
        words: npt.NDArray[np.uint64],
        stream_types: npt.NDArray[np.uint32],
        data: Sequence[Buffer],
    ) -> None:
        count = len(words)
        data_pages = int(np.count_nonzero(wire.data_type_mask(stream_types)))
        length = wire.PAGE_DATA_HEADER.size + 8 * count + data_pages * PAGE_SIZE
        # Record header {u32 type, u32 length} and PAGE_DATA header
        # {u32 count, u32 _res1} read as little-endian u64 words are
        # type | length << 32 and count; with the pfn words they make one buffer.
        head = np.empty(2 + count, dtype="<u8")
        head[0] = int(wire.LibxcRecordType.PAGE_DATA) | (length << 32)
        head[1] = count
        head[2:] = words
        self._emit([head.data, *data])
        self.stats.page_records += 1
        self.stats.page_entries += count
        self.stats.data_pages += data_pages
        self.stats.xalloc_entries += int(np.count_nonzero(stream_types == wire.PageType.XALLOC))

    def _libxc_record(self, record_type: wire.LibxcRecordType, body: Buffer) -> None:
        length = len(memoryview(body).cast("B"))
        padding = bytes(wire.padded_length(length) - length)
        self._emit([wire.LIBXC_RECORD_HEADER.pack(record_type, length), body, padding])

    def _require(self, allowed: set[_Stage], what: str) -> None:
        if self._stage not in allowed:
            expected = " or ".join(sorted(stage.name for stage in allowed))
            raise StreamError(
                f"stream order: {what}() expected after {expected}, got it after {self._stage.name}"
            )

    def _advance(self, allowed: set[_Stage], to: _Stage, what: str) -> None:
        self._require(allowed, what)
        self._stage = to

    def _emit(self, buffers: Sequence[Buffer]) -> None:
        self.stats.bytes_written += write_all(self._writev, buffers)


def write_all(writev: WritevFn, buffers: Sequence[Buffer]) -> int:
    """Write every byte of ``buffers`` through ``writev``, however short its writes, at most
    ``IOV_MAX`` buffers a call; returns the bytes written. ``OSError`` (EIO) for a sink that
    accepts nothing."""
    views = [view for view in (memoryview(buffer).cast("B") for buffer in buffers) if len(view)]
    total = 0
    first = 0
    while first < len(views):
        offered = views[first : first + IOV_MAX]
        written = writev(offered)
        if written <= 0:
            raise OSError(errno.EIO, f"stream sink accepted {written} of {sum(map(len, offered))} bytes")
        total += written
        while written:
            if written >= len(views[first]):
                written -= len(views[first])
                first += 1
            else:
                views[first] = views[first][written:]
                written = 0
    return total


def _check_pv_end(end: EndOfCheckpoint) -> None:
    if len(end.pv_shared_info) != wire.SHARED_INFO_SIZE:
        raise StreamError(
            f"SHARED_INFO: expected {wire.SHARED_INFO_SIZE} bytes, got {len(end.pv_shared_info)}"
        )
    if not end.pv_vcpus or any(not vcpu.basic for vcpu in end.pv_vcpus):
        raise StreamError("X86_PV_VCPU_BASIC: expected one for every online vCPU, got none")
