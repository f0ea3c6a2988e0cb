"""libxl's save-helper protocol: the messages, their encoding, the helper's command line.

libxl runs its save helper as ``getenv("LIBXL_SAVE_HELPER") ?: LIBEXEC_BIN "/libxl-save-helper"``
(tools/libs/light/libxl_save_callout.c, ``run_helper``) and talks to it over the helper's stdin
and stdout. The messages are generated from the table ``@msgs`` in
tools/libs/light/libxl_save_msgs_gen.pl; the helper's side is libxl_save_helper.c. The three
files have no diff from RELEASE-4.17.0 to RELEASE-4.20.4, so one table serves Debian 12's Xen
4.17 and Debian 13's 4.20.

The wire (libxl_save_helper.c, "The helper talks on stdin and stdout, in binary in machine
endianness"):

* helper to toolstack: ``uint16_t`` body length, then the body: ``uint16_t`` message number
  (1-based position in ``@msgs``), then the arguments in order. Integers in their C size on
  x86_64; ``STRING`` is a ``uint32_t`` length counting the terminating NUL, then the bytes and
  the NUL. A body is shorter than 64 KiB (``helper_transmitmsg`` asserts ``len < 64*1024``).
* toolstack to helper: one C ``int``, the callback's return value, and only for the messages
  that need one (flags ``W``: synchronous, ``A``: asynchronous in libxl).

This module does no I/O: it encodes and decodes, for the helper (``softpage.savehelper.helper``)
and for the tests' fake libxl.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from softpage.errors import SoftpageError


class HelperProtocolError(SoftpageError):
    """A save-helper message or command line is malformed (expected X, got Y)."""


# C types as libxl_save_msgs_gen.pl marshals them on x86_64 (native order, no padding).
_C_TYPES = {
    "int": struct.Struct("=i"),
    "unsigned": struct.Struct("=I"),
    "uint16_t": struct.Struct("=H"),
    "uint32_t": struct.Struct("=I"),
    "unsigned long": struct.Struct("=Q"),
    "xen_pfn_t": struct.Struct("=Q"),
}
STRING = "STRING"
LENGTH = _C_TYPES["uint16_t"]
"""The length before each body, and the message number that starts it."""
REPLY = _C_TYPES["int"]
"""A callback's return value, from the toolstack to the helper."""
MAX_BODY = 64 * 1024 - 1
"""``helper_transmitmsg``: ``assert(len_in < 64*1024)``."""


@dataclass(frozen=True)
class Message:
    number: int
    """1-based position in ``@msgs``: the message's number on the wire, and its bit in CBFLAGS."""
    name: str
    flags: str
    """``s`` save, ``r`` restore, ``c`` a callback in libxl's struct, ``x`` its presence is passed
    in CBFLAGS, ``W`` synchronous reply, ``A`` asynchronous reply."""
    args: tuple[tuple[str, str], ...]
    """(C type, name) in wire order."""

    @property
    def needs_reply(self) -> bool:
        return "W" in self.flags or "A" in self.flags

    @property
    def cbflag(self) -> int:
        """Its bit in CBFLAGS (``libxl__srm_callout_enumcallbacks_*``: ``1u << msgnum``); 0 for a
        message that is always there."""
        return 1 << self.number if "x" in self.flags else 0


def _table(*rows: tuple[str, str, Sequence[tuple[str, str]]]) -> dict[str, Message]:
    return {name: Message(number, name, flags, tuple(args))
            for number, (flags, name, args) in enumerate(rows, start=1)}


MESSAGES = _table(
    ("sr", "log", [("uint32_t", "level"), ("uint32_t", "errnoval"), (STRING, "context"),
                   (STRING, "formatted")]),
    ("sr", "progress", [(STRING, "context"), (STRING, "doing_what"), ("unsigned long", "done"),
                        ("unsigned long", "total")]),
    ("srcxA", "suspend", []),
    ("srcxA", "postcopy", []),
    ("srcxA", "checkpoint", []),
    ("srcxA", "wait_checkpoint", []),
    ("scxA", "switch_qemu_logdirty", [("uint32_t", "domid"), ("unsigned", "enable")]),
    ("rcxW", "static_data_done", [("unsigned", "missing")]),
    ("rcx", "restore_results", [("xen_pfn_t", "store_gfn"), ("xen_pfn_t", "console_gfn")]),
    ("srW", "complete", [("int", "retval"), ("int", "errnoval")]),
)
"""``@msgs`` of libxl_save_msgs_gen.pl, in its order."""
BY_NUMBER = {message.number: message for message in MESSAGES.values()}


class LogLevel:
    """``xentoollog_level`` (tools/include/xentoollog.h): the ``level`` of a ``log`` message."""

    DEBUG = 1
    VERBOSE = 2
    DETAIL = 3
    PROGRESS = 4
    INFO = 5
    NOTICE = 6
    WARN = 7
    ERROR = 8
    CRITICAL = 9


def encode(name: str, *values: int | str) -> bytes:
    """One message from the helper, length prefix included."""
    message = MESSAGES[name]
    if len(values) != len(message.args):
        raise HelperProtocolError(f"{name}: expected {len(message.args)} arguments, got {len(values)}")
    body = bytearray(LENGTH.pack(message.number))
    for (c_type, arg_name), value in zip(message.args, values, strict=True):
        if c_type == STRING:
            if not isinstance(value, str):
                raise HelperProtocolError(f"{name}.{arg_name}: expected a string, got {value!r}")
            text = value.encode("utf-8", "replace") + b"\0"
            body += _C_TYPES["uint32_t"].pack(len(text)) + text
        else:
            if not isinstance(value, int):
                raise HelperProtocolError(f"{name}.{arg_name}: expected an integer, got {value!r}")
            try:
                body += _C_TYPES[c_type].pack(value)
            except struct.error as error:
                raise HelperProtocolError(f"{name}.{arg_name}: {value} does not fit a {c_type}") from error
    if len(body) > MAX_BODY:
        raise HelperProtocolError(f"{name}: expected a body under 64 KiB, got {len(body)} bytes")
    return LENGTH.pack(len(body)) + bytes(body)


def fit_string(text: str, room: int) -> str:
    """``text`` cut so that its UTF-8 takes at most ``room`` bytes (a long log line would not fit a
    message); the cut is marked."""
    data = text.encode("utf-8", "replace")
    if len(data) <= room:
        return text
    marker = " [...]"
    return data[: max(0, room - len(marker))].decode("utf-8", "ignore") + marker


@dataclass(frozen=True)
class Decoded:
    message: Message
    values: dict[str, int | str]


def decode(body: bytes) -> Decoded:
    """One body (without its length prefix), as ``libxl__srm_callout_received_*`` reads it: every
    argument present, strings NUL-terminated, nothing left over."""
    view = memoryview(body)
    number = _take(view, 0, LENGTH, "message number")
    message = BY_NUMBER.get(number)
    if message is None:
        raise HelperProtocolError(f"expected a message number in 1..{len(BY_NUMBER)}, got {number}")
    offset = LENGTH.size
    values: dict[str, int | str] = {}
    for c_type, arg_name in message.args:
        what = f"{message.name}.{arg_name}"
        if c_type == STRING:
            size = _take(view, offset, _C_TYPES["uint32_t"], what)
            offset += _C_TYPES["uint32_t"].size
            text = bytes(view[offset: offset + size])
            if size == 0 or len(text) != size or not text.endswith(b"\0"):
                raise HelperProtocolError(f"{what}: expected a NUL-terminated string of {size} bytes")
            values[arg_name] = text[:-1].decode("utf-8", "replace")
            offset += size
        else:
            values[arg_name] = _take(view, offset, _C_TYPES[c_type], what)
            offset += _C_TYPES[c_type].size
    if offset != len(view):
        raise HelperProtocolError(f"{message.name}: expected {offset} bytes, got {len(view)}")
    return Decoded(message, values)


def _take(view: memoryview, offset: int, c_type: struct.Struct, what: str) -> int:
    if len(view) - offset < c_type.size:
        raise HelperProtocolError(f"{what}: expected {c_type.size} bytes, got {max(0, len(view) - offset)}")
    value: int = c_type.unpack_from(view, offset)[0]
    return value


def split_messages(data: bytes) -> tuple[list[bytes], bytes]:
    """The whole bodies in ``data`` (a recorded helper stdout) and the incomplete rest."""
    bodies = []
    offset = 0
    while len(data) - offset >= LENGTH.size:
        size = LENGTH.unpack_from(data, offset)[0]
        if len(data) - offset - LENGTH.size < size:
            break
        bodies.append(data[offset + LENGTH.size: offset + LENGTH.size + size])
        offset += LENGTH.size + size
    return bodies, data[offset:]


# -- the command line ------------------------------------------------------------------------------
HELPER_VARIABLE = "LIBXL_SAVE_HELPER"
"""The variable libxl reads for its save helper's path (libxl_save_callout.c)."""
SAVE_MODE = "--save-domain"
RESTORE_MODE = "--restore-domain"
XCFLAGS_LIVE = 1 << 0
XCFLAGS_DEBUG = 1 << 1
"""tools/include/xenguest.h."""
XC_STREAM_PLAIN = 0
"""``xc_stream_type_t``: 1 and 2 are Remus and COLO checkpointed streams."""


@dataclass(frozen=True)
class SaveRequest:
    """``--save-domain IO_FD BACK_FD DOMID XCFLAGS CBFLAGS STREAM_TYPE``, as
    ``libxl__xc_domain_save`` passes it (``argnums``: domid, xcflags, cbflags, checkpointed_stream)."""

    io_fd: int
    back_fd: int
    domid: int
    xcflags: int
    cbflags: int
    stream_type: int

    @property
    def live(self) -> bool:
        return bool(self.xcflags & XCFLAGS_LIVE)

    def offers(self, name: str) -> bool:
        """Whether libxl provides callback ``name`` (its bit in CBFLAGS)."""
        return bool(self.cbflags & MESSAGES[name].cbflag)


def parse_save_arguments(argv: Sequence[str]) -> SaveRequest:
    """The arguments after ``--save-domain``."""
    names = ("IO_FD", "BACK_FD", "DOMID", "XCFLAGS", "CBFLAGS", "STREAM_TYPE")
    if len(argv) != len(names):
        raise HelperProtocolError(f"{SAVE_MODE}: expected {' '.join(names)}, "
                                  f"got {' '.join(argv) or 'nothing'}")
    numbers = []
    for name, text in zip(names, argv, strict=True):
        try:
            numbers.append(int(text, 10))
        except ValueError:
            raise HelperProtocolError(f"{SAVE_MODE}: {name}: expected a decimal number, "
                                      f"got {text!r}") from None
    return SaveRequest(*numbers)
