"""softpage's save helper against a fake libxl: the protocol of libxl_save_msgs_gen.pl, a pruned
save of a simulated guest through it, the failure paths, and the executable's error boundary."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from softpage.categories import CacheMode
from softpage.cli import save_helper as save_helper_cli
from softpage.errors import BackendError, MigrationError, SoftpageError
from softpage.options import DriverOptions
from softpage.savehelper import protocol
from softpage.savehelper.helper import (
    STOCK_HELPER_TEMPLATE,
    ToolstackChannel,
    complete,
    completion_for,
    log_level_for,
    save_for_libxl,
    stock_helper_path,
)
from softpage.savehelper.protocol import HelperProtocolError, LogLevel, SaveRequest
from softpage.sim.backend import SimBackend
from softpage.sim.experiment import GuestShape, boot_guest
from softpage.sim.guest import PageKind
from softpage.stream.reader import Layer
from softpage.stream.receiver import RestoreModel

SMALL = GuestShape(memory_mib=4, kernel_mib=1, min_free_mib=1)
LIBXL_SAVE_CBFLAGS = protocol.MESSAGES["suspend"].cbflag | protocol.MESSAGES["switch_qemu_logdirty"].cbflag
"""What libxl__domain_save passes for a plain stream: suspend and switch_qemu_logdirty."""


# -- the protocol ------------------------------------------------------------------------------------
def test_message_numbers_and_cbflags_are_those_libxl_generates() -> None:
    # libxl_save_msgs_gen.pl numbers @msgs from 1; CBFLAGS has bit (1 << msgnum) per 'x' message.
    numbers = {name: message.number for name, message in protocol.MESSAGES.items()}
    assert numbers == {"log": 1, "progress": 2, "suspend": 3, "postcopy": 4, "checkpoint": 5,
                       "wait_checkpoint": 6, "switch_qemu_logdirty": 7, "static_data_done": 8,
                       "restore_results": 9, "complete": 10}
    assert LIBXL_SAVE_CBFLAGS == 0x88
    assert protocol.MESSAGES["log"].cbflag == 0 and not protocol.MESSAGES["log"].needs_reply
    assert protocol.MESSAGES["complete"].needs_reply and protocol.MESSAGES["suspend"].needs_reply


def test_a_log_message_is_marshalled_as_the_generated_stub_does() -> None:
    # helper_stub_log: uint16 msgnum, uint32 level, uint32 errnoval, STRING context, STRING text;
    # STRING is a uint32 length counting the NUL, then the bytes.
    data = protocol.encode("log", 8, 5, "ctx", "hi")
    body = (b"\x01\x00" + b"\x08\x00\x00\x00" + b"\x05\x00\x00\x00" + b"\x04\x00\x00\x00ctx\x00"
            + b"\x03\x00\x00\x00hi\x00")
    assert data == len(body).to_bytes(2, "little") + body
    assert protocol.decode(body).values == {"level": 8, "errnoval": 5, "context": "ctx", "formatted": "hi"}


ARGUMENT_VALUES = {
    "int": st.integers(-(2**31), 2**31 - 1),
    "unsigned": st.integers(0, 2**32 - 1),
    "uint32_t": st.integers(0, 2**32 - 1),
    "unsigned long": st.integers(0, 2**64 - 1),
    "xen_pfn_t": st.integers(0, 2**64 - 1),
    protocol.STRING: st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                             max_size=200),
}


@st.composite
def messages(draw: st.DrawFn) -> tuple[str, list[int | str]]:
    name = draw(st.sampled_from(sorted(protocol.MESSAGES)))
    values = [draw(ARGUMENT_VALUES[c_type]) for c_type, _ in protocol.MESSAGES[name].args]
    return name, values


@given(messages())
def test_every_message_decodes_to_what_was_encoded(message: tuple[str, list[int | str]]) -> None:
    name, values = message
    bodies, rest = protocol.split_messages(protocol.encode(name, *values))
    assert rest == b"" and len(bodies) == 1
    decoded = protocol.decode(bodies[0])
    assert decoded.message.name == name
    assert list(decoded.values.values()) == values


@given(messages(), st.data())
def test_a_cut_or_padded_body_is_rejected(message: tuple[str, list[int | str]], data: st.DataObject) -> None:
    body = protocol.encode(*[message[0], *message[1]])[2:]
    cut = data.draw(st.integers(0, len(body) - 1))
    with pytest.raises(HelperProtocolError):
        protocol.decode(body[:cut])
    with pytest.raises(HelperProtocolError):
        protocol.decode(body + b"\0")


@pytest.mark.parametrize("body", [b"\x00\x00", b"\x0b\x00", b"\x01\x00" + bytes(8) + b"\x00\x00\x00\x00",
                                  b"\x01\x00" + bytes(8) + b"\x02\x00\x00\x00ab" + b"\x01\x00\x00\x00\x00"])
def test_unknown_numbers_empty_and_unterminated_strings_are_rejected(body: bytes) -> None:
    with pytest.raises(HelperProtocolError):
        protocol.decode(body)


def test_encode_refuses_what_libxl_could_not_read() -> None:
    with pytest.raises(HelperProtocolError, match="does not fit"):
        protocol.encode("complete", 2**31, 0)
    with pytest.raises(HelperProtocolError, match="expected 2 arguments"):
        protocol.encode("complete", 0)
    with pytest.raises(HelperProtocolError, match="under 64 KiB"):
        protocol.encode("log", 1, 0, "c", "x" * 70_000)
    fitted = protocol.fit_string("é" * 40_000, 1000)
    assert len(fitted.encode()) <= 1000 and fitted.endswith("[...]")


def test_the_save_command_line_is_libxls() -> None:
    # libxl__xc_domain_save: argnums domid, xcflags, cbflags, checkpointed_stream after the two fds.
    request = protocol.parse_save_arguments(["15", "-1", "3", "1", "136", "0"])
    assert request == SaveRequest(io_fd=15, back_fd=-1, domid=3, xcflags=1, cbflags=136, stream_type=0)
    assert request.live and request.offers("suspend") and request.offers("switch_qemu_logdirty")
    assert not request.offers("checkpoint")
    assert not protocol.parse_save_arguments(["4", "-1", "3", "0", "8", "0"]).live
    with pytest.raises(HelperProtocolError, match="expected IO_FD BACK_FD DOMID"):
        protocol.parse_save_arguments(["15", "-1", "3", "0", "0", "0", "0", "1", "136"])
    with pytest.raises(HelperProtocolError, match="DOMID: expected a decimal number"):
        protocol.parse_save_arguments(["15", "-1", "guest", "1", "136", "0"])


# -- a fake libxl --------------------------------------------------------------------------------------
@dataclass
class FakeLibxl:
    """libxl's side of the pipes (``libxl_save_callout.c``): reads each message, records it, and
    answers the callbacks: ``suspend`` by suspending the simulated guest as libxl would."""

    backend: SimBackend
    suspend_answer: int = 1
    suspends: bool = True
    """False: answer ``suspend_answer`` without suspending, as libxl 4.17-4.20 answers 1 when the
    guest did not acknowledge its request in time."""
    logdirty_answer: int = 0
    received: list[tuple[str, dict[str, int | str]]] = field(default_factory=list)
    close_before: str | None = None

    def __post_init__(self) -> None:
        self._to_helper_r, self._to_helper_w = os.pipe()
        self._from_helper_r, self._from_helper_w = os.pipe()
        self.channel = ToolstackChannel(self._to_helper_r, self._from_helper_w)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        with os.fdopen(self._from_helper_r, "rb", buffering=0) as messages_in:
            while header := _read_exactly(messages_in, 2):
                decoded = protocol.decode(_read_exactly(messages_in, protocol.LENGTH.unpack(header)[0]))
                name = decoded.message.name
                self.received.append((name, decoded.values))
                if name == self.close_before:
                    os.close(self._to_helper_w)
                    return
                if not decoded.message.needs_reply:
                    continue
                answer = 0
                if name == "suspend":
                    answer = self.suspend_answer
                    if answer and self.suspends:
                        self.backend.suspend()
                elif name == "switch_qemu_logdirty":
                    answer = self.logdirty_answer
                os.write(self._to_helper_w, protocol.REPLY.pack(answer))

    def names(self) -> list[str]:
        return [name for name, _ in self.received]

    def finish(self) -> None:
        os.close(self._from_helper_w)
        self._thread.join(10)
        assert not self._thread.is_alive()


def _read_exactly(stream: object, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))  # type: ignore[attr-defined]
        if not chunk:
            return data
        data += chunk
    return data


def run_save(libxl: FakeLibxl, live: bool = True,
             options: DriverOptions | None = None) -> tuple[object, RestoreModel]:
    """``save_for_libxl`` of the fake's guest into a file; the stream restored by the stock
    receiver's model."""
    with tempfile.TemporaryFile() as image:
        request = SaveRequest(io_fd=image.fileno(), back_fd=-1, domid=libxl.backend.domid,
                              xcflags=protocol.XCFLAGS_LIVE if live else 0, cbflags=LIBXL_SAVE_CBFLAGS,
                              stream_type=protocol.XC_STREAM_PLAIN)
        result: object
        try:
            result = save_for_libxl(request, libxl.channel, libxl.backend, options or DriverOptions())
        except SoftpageError as error:
            result = error
        image.seek(0)
        model = RestoreModel()
        if result is not None and not isinstance(result, BaseException):
            model.sink(Layer.LIBXC).writev([image.read()])
            model.complete()
    return result, model


def test_a_pruned_live_save_through_libxl_restores_the_guests_hard_pages() -> None:
    guest = boot_guest(SMALL, 1, seed=5)
    backend = SimBackend(guest)
    libxl = FakeLibxl(backend)
    result, model = run_save(libxl)
    complete(libxl.channel, completion_for(None))
    libxl.finish()
    stats = result.stats  # type: ignore[attr-defined]
    assert stats.pages_xalloc >= guest.count(PageKind.CACHE)
    assert backend.suspended and "resume" not in backend.calls
    # libxl suspended the guest (the fake's backend.suspend()); the helper checked and took it over.
    assert backend.calls.index("suspend") < backend.calls.index("adopt_suspend")
    # The device model's log-dirty mode around the rounds, libxl's suspend between, then complete.
    names = libxl.names()
    calls = [name for name in names if name != "log"]
    assert calls == ["switch_qemu_logdirty", "suspend", "switch_qemu_logdirty", "complete"]
    switches = [values["enable"] for name, values in libxl.received if name == "switch_qemu_logdirty"]
    assert switches == [1, 0]
    assert dict(libxl.received)["complete"] == {"retval": 0, "errnoval": 0}
    # Every hard page came through a stream the stock receiver's rules accept.
    ram = guest.ram.copy()
    held = backend.suspended_held
    assert held is not None and backend.suspended_tokens is not None
    ram[held.to_pfns().astype(np.intp)] = False
    pfns = np.flatnonzero(ram).astype(np.uint64)
    restored = np.ascontiguousarray(model.pages(pfns)[:, :8]).view("<u8").reshape(-1)
    assert np.array_equal(restored, backend.suspended_tokens[ram])


def test_a_save_that_is_not_live_suspends_first_and_leaves_the_dirty_log_alone() -> None:
    backend = SimBackend(boot_guest(SMALL, 1, seed=6))
    libxl = FakeLibxl(backend)
    result, _model = run_save(libxl, live=False)
    libxl.finish()
    assert not isinstance(result, BaseException)
    assert [name for name in libxl.names() if name != "log"] == ["suspend"]
    assert "enable_logdirty" not in backend.calls


def test_a_suspend_libxl_could_not_make_fails_the_save_and_leaves_the_resume_to_libxl() -> None:
    guest = boot_guest(SMALL, 1, seed=7)
    backend = SimBackend(guest)
    libxl = FakeLibxl(backend, suspend_answer=0)
    result, _model = run_save(libxl)
    libxl.finish()
    assert isinstance(result, MigrationError) and "libxl could not suspend" in str(result)
    assert "resume" not in backend.calls and "cleanup" in backend.calls
    assert not guest.armed
    switches = [values["enable"] for name, values in libxl.received if name == "switch_qemu_logdirty"]
    assert switches == [1, 0]


def test_a_suspend_libxl_reports_but_xen_does_not_show_fails_the_save() -> None:
    guest = boot_guest(SMALL, 1, seed=10)
    backend = SimBackend(guest)
    libxl = FakeLibxl(backend, suspends=False)
    result, _model = run_save(libxl)
    libxl.finish()
    assert isinstance(result, MigrationError) and "it is not suspended" in str(result)
    assert guest.running and "resume" not in backend.calls and not guest.armed


def test_driver_lines_reach_libxl_with_their_level_and_without_its_prefix() -> None:
    assert log_level_for("warning: domain 1: no report") == (LogLevel.WARN, "domain 1: no report")
    assert log_level_for("error: could not resume") == (LogLevel.ERROR, "could not resume")
    assert log_level_for("round 1: soft pages not used") == (LogLevel.INFO, "round 1: soft pages not used")


def test_a_device_model_that_cannot_track_writes_stops_the_save_before_any_page() -> None:
    backend = SimBackend(boot_guest(SMALL, 1, seed=8))
    libxl = FakeLibxl(backend, logdirty_answer=-1)
    result, _model = run_save(libxl)
    libxl.finish()
    assert isinstance(result, MigrationError) and "log-dirty mode on" in str(result)
    assert "read_pages" not in " ".join(backend.calls)
    assert [name for name in libxl.names() if name != "log"] == ["switch_qemu_logdirty"]


def test_a_toolstack_gone_before_replying_is_an_error_not_a_hang() -> None:
    backend = SimBackend(boot_guest(SMALL, 1, seed=9))
    libxl = FakeLibxl(backend, close_before="suspend")
    with pytest.raises(HelperProtocolError, match="closed the helper's stdin"):
        libxl.channel.call("suspend")
    libxl.finish()


def test_completion_carries_the_failures_errno() -> None:
    assert completion_for(None).retval == 0
    assert completion_for(KeyboardInterrupt()).errnoval == errno.EINTR
    assert completion_for(BrokenPipeError(errno.EPIPE, "gone")).errnoval == errno.EPIPE
    assert completion_for(BackendError("x")) == completion_for(OSError())


# -- which stock helper ------------------------------------------------------------------------------
MAPS = "7f0-7f1 r-xp 00000000 fe:01 123 /usr/lib/x86_64-linux-gnu/libxenlight.so.4.20.0\n"


def test_the_stock_helper_is_the_one_of_the_toolstacks_libxenlight() -> None:
    helpers = [STOCK_HELPER_TEMPLATE.format(version=v) for v in ("4.17", "4.20")]
    assert stock_helper_path(MAPS, helpers) == helpers[1]
    assert stock_helper_path("", helpers[:1]) == helpers[0]
    with pytest.raises(BackendError, match=r"libxenlight 4\.20, but .*xen-4\.20.* is not installed"):
        stock_helper_path(MAPS, helpers[:1])
    with pytest.raises(BackendError, match="SOFTPAGE_STOCK_SAVE_HELPER"):
        stock_helper_path("", helpers)


# -- the executable --------------------------------------------------------------------------------
Received = list[tuple[str, dict[str, int | str]]]


def run_helper(arguments: list[str], environment: dict[str, str],
               answer: Callable[[str], int] = lambda name: 0) -> tuple[int, Received, str]:
    """``softpage-save-helper`` as libxl runs it: messages on its stdout, replies on its stdin."""
    process = subprocess.Popen([sys.executable, "-m", "softpage.cli.save_helper", *arguments],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, **environment})
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None
    received = []
    while header := process.stdout.read(2):
        decoded = protocol.decode(process.stdout.read(protocol.LENGTH.unpack(header)[0]))
        received.append((decoded.message.name, decoded.values))
        if decoded.message.needs_reply:
            process.stdin.write(protocol.REPLY.pack(answer(decoded.message.name)))
            process.stdin.flush()
    stderr = process.stderr.read().decode()
    return process.wait(30), received, stderr


@pytest.mark.parametrize("arguments", [
    ["--restore-domain", "4", "5", "3", "1", "0", "2", "0", "0", "0"],
    ["--save-domain", "4", "5", "3", "1", str(0x78 | 0x88), "1"],  # Remus
    ["--save-domain", "4", "-1", "3", str(protocol.XCFLAGS_LIVE | protocol.XCFLAGS_DEBUG), "136", "0"],
])
def test_every_other_mode_runs_the_stock_helper_unchanged(arguments: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "softpage.cli.save_helper", *arguments],
                            capture_output=True, text=True,
                            env={**os.environ, "SOFTPAGE_STOCK_SAVE_HELPER": "/bin/echo"})
    assert (result.returncode, result.stdout) == (0, " ".join(arguments) + "\n")


def test_a_save_that_cannot_start_is_reported_to_libxl_with_complete() -> None:
    code, received, _stderr = run_helper(["--save-domain", "1", "-1", "3", "1", "136", "0"],
                                         {"SOFTPAGE_SAVE_HELPER_OPTIONS": "--prune bogus"})
    assert code == 0
    names = [name for name, _ in received]
    assert names == ["log", "complete"]
    assert received[0][1]["level"] == LogLevel.ERROR and "bogus" in str(received[0][1]["formatted"])
    assert received[0][1]["errnoval"] == 0xFFFF_FFFF  # -1: no ": strerror" after the line
    assert received[1][1] == {"retval": -1, "errnoval": errno.EIO}


def test_a_helper_whose_libxl_is_gone_exits_with_an_error() -> None:
    arguments = ["--save-domain", "1", "-1", "3", "1", "136", "0"]
    process = subprocess.run([sys.executable, "-m", "softpage.cli.save_helper", *arguments],
                             stdin=subprocess.DEVNULL, capture_output=True,
                             env={**os.environ, "SOFTPAGE_SAVE_HELPER_OPTIONS": "--prune bogus"})
    assert process.returncode == 1
    assert b"could not report the save's end to libxl" in process.stderr


# -- exchanges recorded between Debian's libxl and its stock helper ----------------------------------
RECORDED = Path(__file__).resolve().parents[1] / "data" / "save-helper"
"""tests/tools/record_helper_exchange.py wrote these on the testbed (Xen 4.17.7 and 4.20.4)."""


def recorded(mode: str) -> list[Path]:
    return sorted(RECORDED.glob(f"*-{mode}.out"))


@pytest.mark.parametrize("out", recorded("save-domain") + recorded("restore-domain"),
                         ids=lambda path: path.stem)
def test_a_recorded_stock_helper_speaks_exactly_this_protocol(out: Path) -> None:
    """Every message the stock helper sent decodes, and encodes back to the same bytes; libxl's
    replies on its stdin are one int per message that needs one."""
    data = out.read_bytes()
    bodies, rest = protocol.split_messages(data)
    assert rest == b"" and bodies
    decoded = [protocol.decode(body) for body in bodies]
    encoded = b"".join(protocol.encode(d.message.name, *d.values.values()) for d in decoded)
    assert encoded == data
    names = [d.message.name for d in decoded]
    # After complete the stock helper still logs (xc_interface_close's debug lines), which libxl no
    # longer reads: it stops at complete.
    last = names.index("complete")
    assert decoded[last].values["retval"] == 0 and set(names[last + 1:]) <= {"log"}
    # A log line without an errno carries -1, as softpage's helper sends it (NO_ERRNO).
    assert any(d.values.get("errnoval") == 0xFFFF_FFFF for d in decoded)
    replies = out.with_suffix(".in").read_bytes()
    assert len(replies) == protocol.REPLY.size * sum(d.message.needs_reply for d in decoded)
    if out.stem.endswith("save-domain"):
        assert "suspend" in names and "restore_results" not in names
        switches = [d.values["enable"] for d in decoded if d.message.name == "switch_qemu_logdirty"]
        assert switches == [1, 0]  # a PVH guest: libxl answers at once, but is asked all the same
    else:
        assert "restore_results" in names and "suspend" not in names


@pytest.mark.parametrize(
    ("text", "cache"),
    [("", CacheMode.COLD), ("--prune cache=all", CacheMode.ALL), ("--prune free,cache=cold", CacheMode.COLD)],
)
def test_the_options_variable_chooses_the_cache_mode(
    monkeypatch: pytest.MonkeyPatch, text: str, cache: CacheMode
) -> None:
    monkeypatch.setenv(save_helper_cli.OPTIONS_VARIABLE, text)
    _args, options = save_helper_cli._options(live=True)
    assert options.cache is cache


def test_a_bad_cache_mode_in_the_options_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(save_helper_cli.OPTIONS_VARIABLE, "--prune cache=warm")
    with pytest.raises(SoftpageError, match="cache=warm"):
        save_helper_cli._options(live=True)
