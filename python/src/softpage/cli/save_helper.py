"""``softpage-save-helper``: libxl's save helper with soft-page pruning.

    LIBXL_SAVE_HELPER=/usr/lib/softpage/softpage-save-helper xl migrate GUEST HOST

libxl runs it as it runs ``libxl-save-helper``. ``--save-domain IO_FD BACK_FD DOMID XCFLAGS
CBFLAGS STREAM_TYPE`` of a plain stream is softpage's (``softpage.savehelper.helper``); every
other command line (``--restore-domain``, Remus and COLO streams, ``xl migrate --debug``) runs the
stock helper of the same Xen in its place, unchanged.

Options: ``SOFTPAGE_SAVE_HELPER_OPTIONS``, the driver options of ``softpage migrate`` in one
string (``--no-prune``, ``--prune free,cache``, ``--stats FILE``, ``--drop-timeout SECONDS``, ...).
``SOFTPAGE_STOCK_SAVE_HELPER`` names the stock helper if the toolstack's libxenlight does not.

The helper's stdout is libxl's message pipe: it is moved off fd 1 first, and fd 1 becomes a copy
of stderr, so nothing printed can corrupt it. Messages and errors go to libxl's log, which xl
prints on its stderr (at INFO and above by default; per-round lines at DETAIL, ``xl -v``).
Exit status, as the stock helper's: 0 once ``complete`` was acknowledged, whatever the save's
result (libxl has it from ``complete``); 1 if libxl could not be told.
"""

from __future__ import annotations

import argparse
import glob
import os
import shlex
import sys
import sysconfig
import time
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

from softpage.cli.migrate import add_driver_options, driver_options, round_line, summary, write_stats
from softpage.errors import SoftpageError
from softpage.interrupts import raise_on_signals
from softpage.options import DriverOptions
from softpage.savehelper import protocol
from softpage.savehelper.protocol import LogLevel

if TYPE_CHECKING:
    from softpage.driver import Progress, RoundStats
    from softpage.savehelper.helper import ToolstackChannel

OPTIONS_VARIABLE = "SOFTPAGE_SAVE_HELPER_OPTIONS"
STOCK_VARIABLE = "SOFTPAGE_STOCK_SAVE_HELPER"
PROGRAM = "softpage-save-helper"
DEBIAN_LIBDIR = "/usr/lib/softpage"
"""Where Debian's package installs the helper (debian/softpage.install)."""


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    request = _softpages_request(arguments)
    if request is None:
        _run_stock(arguments)
    # From here on libxl reads fd 1 as messages.
    messages_fd = os.dup(1)
    os.dup2(2, 1)
    from softpage.savehelper.helper import NO_ERRNO, ToolstackChannel

    toolstack = ToolstackChannel(0, messages_fd)
    raise_on_signals()
    error: BaseException | None = None
    try:
        _save(request, toolstack)
    except (KeyboardInterrupt, SoftpageError, OSError) as failure:
        error = failure
        toolstack.log(LogLevel.ERROR, f"save failed: {failure or 'interrupted'}",
                      failure.errno or NO_ERRNO if isinstance(failure, OSError) else NO_ERRNO)
    except Exception as bug:
        error = bug
        traceback.print_exc()
        toolstack.log(LogLevel.CRITICAL, f"save failed: {bug!r}; this is a bug in softpage, please report it")
    from softpage.savehelper.helper import complete, completion_for

    try:
        complete(toolstack, completion_for(error))
    except (SoftpageError, OSError) as lost:
        print(f"{PROGRAM}: could not report the save's end to libxl: {lost}", file=sys.stderr)
        _name_the_way_back(request.domid)
        return 1
    return 0


def _name_the_way_back(domid: int) -> None:
    """libxl is gone (xl killed): nobody will resume a guest it suspended. xl never sent its
    receiver GO (that needs our ``complete``), so the source is the guest's only copy."""
    try:
        from softpage.xen.ctrl import XenCtrl

        with XenCtrl.open() as ctrl:
            suspended = ctrl.domain_state(domid).suspended
    except (SoftpageError, OSError) as error:
        print(f"{PROGRAM}: cannot tell whether domain {domid} is left suspended: {error}", file=sys.stderr)
        return
    if suspended:
        print(f"{PROGRAM}: domain {domid} is left suspended; once its receiver has exited, "
              f"`softpage resume {domid}` brings it back", file=sys.stderr)


def executable() -> str:
    """Where this helper is installed: Debian's package puts it off PATH, in /usr/lib/softpage;
    pip puts it beside the interpreter's scripts, or in ``bin/`` of a ``--target`` directory."""
    import softpage

    candidates = [
        os.path.join(DEBIAN_LIBDIR, PROGRAM),
        os.path.join(sysconfig.get_path("scripts"), PROGRAM),
        os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(softpage.__file__))), "bin", PROGRAM),
    ]
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return candidate
    raise SoftpageError(f"{PROGRAM} is not installed (looked for {', '.join(candidates)})")


def _softpages_request(arguments: list[str]) -> protocol.SaveRequest | None:
    """The save softpage takes: live or not, of a plain stream, without libxc's debug verify
    pass; None for every other command line."""
    if not arguments or arguments[0] != protocol.SAVE_MODE:
        return None
    try:
        request = protocol.parse_save_arguments(arguments[1:])
    except protocol.HelperProtocolError:
        return None  # the stock helper asserts on what it cannot read, as before
    if request.stream_type != protocol.XC_STREAM_PLAIN or request.xcflags & protocol.XCFLAGS_DEBUG:
        return None
    return request


def _run_stock(arguments: list[str]) -> NoReturn:
    """Become the stock helper, with the same arguments and file descriptors."""
    from softpage.savehelper.helper import stock_helper_path

    path = os.environ.get(STOCK_VARIABLE)
    try:
        if not path:
            path = stock_helper_path(_parent_maps(), sorted(glob.glob(
                "/usr/lib/xen-*/bin/libxl-save-helper")))
        os.execv(path, [path, *arguments])
    except (SoftpageError, OSError) as error:
        print(f"{PROGRAM}: cannot run the stock save helper: {error}", file=sys.stderr)
        sys.exit(1)


def _parent_maps() -> str:
    try:
        with open(f"/proc/{os.getppid()}/maps", encoding="utf-8", errors="replace") as maps:
            return maps.read()
    except OSError:
        return ""


def _options(live: bool) -> tuple[argparse.Namespace, DriverOptions]:
    parser = argparse.ArgumentParser(prog=f"{OPTIONS_VARIABLE}=", add_help=False, exit_on_error=False)
    add_driver_options(parser)
    text = os.environ.get(OPTIONS_VARIABLE, "")
    try:
        args = parser.parse_args(shlex.split(text))
    except (argparse.ArgumentError, ValueError) as error:
        raise SoftpageError(f"{OPTIONS_VARIABLE}={text!r}: {error}") from None
    return args, driver_options(args, live)


def _save(request: protocol.SaveRequest, toolstack: ToolstackChannel) -> None:
    from softpage.savehelper.helper import save_for_libxl
    from softpage.xen.backend import XenBackend

    args, options = _options(request.live)
    started = time.monotonic()
    backend = XenBackend(request.domid, device_model_by_libxl=True)
    progress = None if args.quiet else _progress(toolstack)
    result = save_for_libxl(request, toolstack, backend, options, progress)
    elapsed = time.monotonic() - started
    stats = result.stats
    write_stats(args.stats, stats, result.stream_bytes, elapsed, None, None)
    toolstack.log(LogLevel.INFO, summary(stats, result.stream_bytes, elapsed, None))


def _progress(toolstack: ToolstackChannel) -> Progress:
    """A line per round in libxl's log, at DETAIL: ``xl -v`` shows them."""

    def report(round_stats: RoundStats) -> None:
        toolstack.log(LogLevel.DETAIL, round_line(round_stats))

    return report


if __name__ == "__main__":
    sys.exit(main())
