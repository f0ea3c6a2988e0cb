"""softpage as libxl's save helper: the pages are softpage's, the guest's lifecycle is libxl's.

libxl starts its save helper for the libxc part of every save and migration it makes (``xl save``,
``xl migrate``, libvirt's libxl driver), and lets it be replaced by ``LIBXL_SAVE_HELPER``.
``save_for_libxl`` does what ``xc_domain_save`` does inside the stock helper, with softpage's
driver, planner and guest cooperation:

* libxl suspends the guest: the driver's ``suspend()`` is the helper's ``suspend`` callback, which
  libxl answers once the guest has suspended (and, for an HVM guest, its device model with it);
* the device model's log-dirty mode is switched on before the first round and off at the end
  (``switch_qemu_logdirty``, as ``x86_hvm_setup`` and ``x86_hvm_cleanup`` do);
* a failed save leaves the guest to libxl, which resumes it (xl's ``failed_resume``), device model
  included; the helper resumes nothing itself, as ``xc_domain_save`` does not;
* the end is reported with ``complete``.

Everything the helper does not support (restores, checkpointed streams) goes to the stock helper
(``softpage.cli.save_helper``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import numpy.typing as npt

from softpage.backend import (
    DomainInfo,
    EndOfCheckpoint,
    GuestType,
    MigrationBackend,
    PageBatch,
    SoftPageChannel,
    StaticInfo,
)
from softpage.driver import Progress
from softpage.errors import BackendError, SoftpageError
from softpage.options import DriverOptions
from softpage.pfnset import PfnArray, PfnSet
from softpage.savehelper import protocol
from softpage.savehelper.protocol import HelperProtocolError, LogLevel, SaveRequest
from softpage.sender import SendResult, save_libxc_stream

NO_ERRNO = -1
"""``errnoval`` of a log line that reports no system error: xentoollog prints ``: strerror`` after
every other value, ``: Success`` for 0."""
HELPER_CONTEXT = "softpage-save-helper"
"""The context of the helper's log messages: libxl prints it before each (xl: "CONTEXT: ...")."""


class ToolstackChannel:
    """The helper's end of the protocol: messages out on ``out_fd`` (the helper's stdout), the
    callbacks' return values in on ``in_fd`` (its stdin). Safe to use from several threads: a
    message and the reply it waits for are one exchange."""

    def __init__(self, in_fd: int, out_fd: int) -> None:
        self._in_fd = in_fd
        self._out_fd = out_fd
        self._lock = threading.RLock()

    def log(self, level: int, message: str, errnoval: int = NO_ERRNO) -> None:
        """A line in libxl's log. A toolstack gone away is noticed at the next callback."""
        room = protocol.MAX_BODY - 64 - len(HELPER_CONTEXT)
        with contextlib.suppress(OSError):
            # The wire's errnoval is a uint32_t carrying a C int (helper_stub_log), -1 included.
            self._send(protocol.encode("log", level, errnoval & 0xFFFF_FFFF, HELPER_CONTEXT,
                                       protocol.fit_string(message, room)))

    def call(self, name: str, *values: int) -> int:
        """Callback ``name``; its return value."""
        message = protocol.MESSAGES[name]
        if not message.needs_reply:
            raise HelperProtocolError(f"{name}: a message without a reply is not a call")
        with self._lock:
            self._send(protocol.encode(name, *values))
            return self._reply(name)

    def _send(self, data: bytes) -> None:
        with self._lock:
            view = memoryview(data)
            while view:
                view = view[os.write(self._out_fd, view):]

    def _reply(self, name: str) -> int:
        data = b""
        while len(data) < protocol.REPLY.size:
            chunk = os.read(self._in_fd, protocol.REPLY.size - len(data))
            if not chunk:
                raise HelperProtocolError(f"{name}: the toolstack closed the helper's stdin before replying")
            data += chunk
        value: int = protocol.REPLY.unpack(data)[0]
        return value


class AdoptingBackend(MigrationBackend, Protocol):
    """A backend that can take over a domain the toolstack suspended (``XenBackend``, ``SimBackend``)."""

    def adopt_suspend(self) -> None:
        """Check that the domain is suspended, and treat it as such from here on."""


class LibxlBackend:
    """A ``MigrationBackend`` whose domain's lifecycle is libxl's: the suspend goes through the
    toolstack, the device model's log-dirty mode too, and ``resume()`` is left to libxl. Every
    other operation is ``inner``'s."""

    def __init__(self, inner: AdoptingBackend, toolstack: ToolstackChannel, request: SaveRequest) -> None:
        self.inner = inner
        self.toolstack = toolstack
        self.request = request
        self._qemu_logdirty = False

    def describe(self) -> DomainInfo:
        return self.inner.describe()

    def static_info(self) -> StaticInfo:
        return self.inner.static_info()

    def enable_logdirty(self) -> None:
        """The device model's log-dirty mode first, then Xen's, the order of ``x86_hvm_setup``
        and ``send_domain_memory_live``: pages the device model writes are in the dirty log from
        the first round on. libxl answers at once for a PVH guest (no device model)."""
        if self.describe().guest_type is not GuestType.PV:
            self._switch_qemu_logdirty(True)
        self.inner.enable_logdirty()

    def harvest_dirty(self, final: bool) -> PfnSet:
        return self.inner.harvest_dirty(final)

    def page_types(self, pfns: PfnArray) -> npt.NDArray[np.uint32]:
        return self.inner.page_types(pfns)

    def read_pages(self, pfns: PfnArray, types: npt.NDArray[np.uint32]) -> PageBatch:
        return self.inner.read_pages(pfns, types)

    def suspend(self) -> None:
        """libxl's ``suspend`` callback (``checked_request`` made sure libxl offers it): 1 once the
        guest (and its device model) is suspended, 0 if it could not be (libxl logged why)."""
        if self.toolstack.call("suspend") == 0:
            raise BackendError(f"libxl could not suspend domain {self.request.domid} "
                               "(its log above says why)")
        self.inner.adopt_suspend()

    def end_of_checkpoint(self) -> EndOfCheckpoint:
        return self.inner.end_of_checkpoint()

    def resume(self) -> None:
        """Nothing: after a failed save libxl resumes the guest and its device model
        (``libxl_domain_resume``, xl's ``failed_resume``), and a second resume here could race it."""

    def soft_channel(self) -> SoftPageChannel | None:
        return self.inner.soft_channel()

    def cleanup(self) -> None:
        """Xen's log-dirty off (``inner``), then the device model's, as ``x86_hvm_cleanup``; the
        first error is raised after both."""
        errors: list[Exception] = []
        steps = [self.inner.cleanup]
        if self._qemu_logdirty:
            steps.append(lambda: self._switch_qemu_logdirty(False))
        for step in steps:
            try:
                step()
            except (SoftpageError, OSError) as error:
                errors.append(error)
        if errors:
            raise errors[0]

    def _switch_qemu_logdirty(self, enable: bool) -> None:
        if self.toolstack.call("switch_qemu_logdirty", self.request.domid, int(enable)) != 0:
            raise BackendError(f"libxl could not switch the device model's log-dirty mode "
                               f"{'on' if enable else 'off'} for domain {self.request.domid}")
        self._qemu_logdirty = enable


@dataclass(frozen=True)
class Completion:
    """What ``complete`` tells libxl: ``xc_domain_save``'s return value and errno."""

    retval: int
    errnoval: int


def completion_for(error: BaseException | None) -> Completion:
    """0 for success; -1 and the error's errno (EINTR for an interrupt, else EIO) for a failure."""
    if error is None:
        return Completion(0, 0)
    if isinstance(error, KeyboardInterrupt):
        return Completion(-1, errno.EINTR)
    code = error.errno if isinstance(error, OSError) and error.errno else errno.EIO
    return Completion(-1, code)


def complete(toolstack: ToolstackChannel, completion: Completion) -> None:
    """The last message: libxl takes the result, replies, and expects the helper to exit."""
    toolstack.call("complete", completion.retval, completion.errnoval)


def checked_request(request: SaveRequest, describe: Callable[[], DomainInfo]) -> None:
    """What ``xc_domain_save`` asserts of its callbacks, as errors: a plain stream, libxl's
    suspend, and for an HVM-type guest the device model's log-dirty switch."""
    if request.stream_type != protocol.XC_STREAM_PLAIN:
        raise HelperProtocolError(f"stream type {request.stream_type}: only plain streams are softpage's "
                                  "(checkpointed ones go to the stock helper)")
    if not request.offers("suspend"):
        raise HelperProtocolError(f"CBFLAGS {request.cbflags:#x}: expected libxl's suspend callback")
    if describe().guest_type is not GuestType.PV and not request.offers("switch_qemu_logdirty"):
        raise HelperProtocolError(f"CBFLAGS {request.cbflags:#x}: expected libxl's switch_qemu_logdirty "
                                  "callback for an HVM-type guest")


LEVEL_PREFIXES = (("error: ", LogLevel.ERROR), ("warning: ", LogLevel.WARN))
"""How the driver's log lines say what they are; libxl's logger prints the level itself."""


def log_level_for(message: str) -> tuple[int, str]:
    """A driver log line's level, and the line without the prefix that said so."""
    for prefix, level in LEVEL_PREFIXES:
        if message.startswith(prefix):
            return level, message.removeprefix(prefix)
    return LogLevel.INFO, message


def save_for_libxl(
    request: SaveRequest,
    toolstack: ToolstackChannel,
    inner: AdoptingBackend,
    options: DriverOptions,
    progress: Progress | None = None,
) -> SendResult:
    """The libxc stream of ``request.domid`` to ``request.io_fd``, live if libxl asked for it
    (``XCFLAGS_LIVE``: ``xl migrate``; ``xl save`` is not). Returns with the guest suspended by
    libxl; raises on failure, leaving the guest to libxl. The backend is cleaned up either way
    (a failed clean-up is a warning in libxl's log, as ``xc_domain_save`` ignores its own)."""
    backend = LibxlBackend(inner, toolstack, request)

    def log(message: str) -> None:
        toolstack.log(*log_level_for(message))

    try:
        checked_request(request, backend.describe)
        return save_libxc_stream(backend, request.io_fd, replace(options, live=request.live), log, progress)
    finally:
        try:
            backend.cleanup()
        except (SoftpageError, OSError) as error:
            toolstack.log(LogLevel.WARN, f"cleanup: {error}")


LIBXENLIGHT = "libxenlight.so."
STOCK_HELPER_TEMPLATE = "/usr/lib/xen-{version}/bin/libxl-save-helper"
"""Debian's ``LIBEXEC_BIN`` (xen-utils-X.Y) and the helper in it."""


def stock_helper_path(parent_maps: str, installed: list[str]) -> str:
    """The stock ``libxl-save-helper`` of the libxl that started us: Debian installs each Xen's
    tools under /usr/lib/xen-X.Y/bin (libxl's ``LIBEXEC_BIN``), and the parent's mapped
    ``libxenlight.so.X.Y`` says which. Without that, the only one installed.

    ``parent_maps`` is the parent's /proc/PID/maps; ``installed`` the helpers that exist."""
    for line in parent_maps.splitlines():
        name = line.rsplit("/", 1)[-1]
        if name.startswith(LIBXENLIGHT):
            version = ".".join(name[len(LIBXENLIGHT):].split(".")[:2])
            wanted = STOCK_HELPER_TEMPLATE.format(version=version)
            if wanted in installed:
                return wanted
            raise BackendError(f"the toolstack uses libxenlight {version}, but {wanted} is not installed")
    if len(installed) == 1:
        return installed[0]
    raise BackendError("cannot tell which stock save helper to run: "
                       f"{', '.join(installed) or 'none installed'}"
                       " (set SOFTPAGE_STOCK_SAVE_HELPER)")
