"""``softpage migrate`` and ``softpage save``: ``xl migrate`` / ``xl save`` with pruning.

    softpage migrate [-s SSHCOMMAND] [-D] [--no-prune | --prune LIST] [--stats FILE]
                     [--drop-timeout SECONDS] DOMAIN HOST
    softpage save [-c] [-p] [--no-prune | --prune LIST] [--stats FILE]
                  [--drop-timeout SECONDS] DOMAIN FILE

The receiving side is stock xl: ``xl migrate-receive`` (started as ``ssh HOST
xl migrate-receive``, or the ``HOST`` command itself with ``-s ""``) and
``xl restore FILE``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import os
import shlex
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from softpage import toolstack
from softpage.categories import PRUNABLE, CacheMode, Category
from softpage.errors import SoftpageError
from softpage.interrupts import held_signals, signal_names
from softpage.options import DriverOptions
from softpage.policy import SPP_MAX_ITERATIONS, SPP_TARGET_DIRTY_COUNT, PrecopyPolicy
from softpage.stream.handshake import ReceiverProcess
from softpage.xenstore import PyxsStore

if TYPE_CHECKING:
    from softpage.driver import MigrationStats, RoundStats

# The sender, the driver and the Xen bindings (numpy, cffi) are imported where they are used:
# in an emulated dom0 they take seconds to load. `softpage migrate` and `save` start loading them
# in a thread while `xl list -l` runs, and `migrate` starts the receiver before it needs them,
# so that its start-up (ssh, xl migrate-receive) runs meanwhile.
SENDER_MODULES = ("softpage.sender", "softpage.xen.backend")


def _load_sender_meanwhile() -> None:
    """Import SENDER_MODULES in a background thread. The later imports wait for it through the
    module locks; an import that fails here fails again there, with its error."""

    def load() -> None:
        for module in SENDER_MODULES:
            try:
                importlib.import_module(module)
            except BaseException:
                return

    threading.Thread(target=load, name="softpage-import", daemon=True).start()

MIB = 1024 * 1024


def register(subparsers: Any) -> None:
    migrate = subparsers.add_parser(
        "migrate",
        help="live-migrate a domain to a stock `xl migrate-receive`, skipping soft pages",
        description="Live-migrate DOMAIN to HOST like `xl migrate`, sending the pages the guest "
        "reports soft as XALLOC entries without data.",
    )
    migrate.add_argument("-s", dest="ssh_command", default="ssh", metavar="SSHCOMMAND",
                         help='command that reaches HOST (default "ssh"); with -s "" HOST is '
                         "itself the receiver command, e.g. \"xl migrate-receive\" for localhost")
    migrate.add_argument("-D", dest="preserve_domid", action="store_true",
                         help="preserve the domain id")
    migrate.add_argument("domain", metavar="DOMAIN", help="domain name or id")
    migrate.add_argument("host", metavar="HOST")
    add_driver_options(migrate)
    _add_suspend_timeout(migrate)
    migrate.set_defaults(func=run_migrate)

    save = subparsers.add_parser(
        "save",
        help="save a domain to a file `xl restore` reads, skipping soft pages",
        description="Save DOMAIN to FILE like `xl save`; stock `xl restore FILE` brings it back.",
    )
    save.add_argument("-c", dest="checkpoint", action="store_true",
                      help="leave the domain running after the save")
    save.add_argument("-p", dest="leave_paused", action="store_true",
                      help="leave the domain paused after the save")
    save.add_argument("domain", metavar="DOMAIN", help="domain name or id")
    save.add_argument("file", metavar="FILE")
    add_driver_options(save)
    _add_suspend_timeout(save)
    save.set_defaults(func=run_save)


def add_driver_options(parser: argparse.ArgumentParser) -> None:
    """What the driver is asked to do, for ``softpage migrate``/``save`` and the save helper."""
    pruning = parser.add_mutually_exclusive_group()
    pruning.add_argument("--no-prune", action="store_true", help="send every page (plain precopy)")
    pruning.add_argument("--prune", type=_prune_list, default=DEFAULT_PRUNE, metavar="LIST",
                         help="soft categories to skip, comma-separated from free,cache,slab; "
                         "cache=cold (the same as cache) skips and drops only the page cache the "
                         "guest has not used recently, cache=all all of it as before "
                         "(default: free,cache=cold,slab)")
    parser.add_argument("--stats", metavar="FILE",
                        help="write one JSON record per round and a totals record (JSON lines)")
    parser.add_argument("--max-iters", type=int, default=SPP_MAX_ITERATIONS, metavar="N",
                        help=f"live rounds at most (default {SPP_MAX_ITERATIONS}, as xl)")
    parser.add_argument("--dirty-target", type=int, default=SPP_TARGET_DIRTY_COUNT, metavar="N",
                        help=f"stop and copy below N dirty pages (default {SPP_TARGET_DIRTY_COUNT}, as xl)")
    parser.add_argument("--snapshot-timeout", type=float, default=DriverOptions.snapshot_timeout,
                        metavar="SECONDS", help="how long to wait for each soft-page report, per GiB of "
                        f"the guest's memory (at least one GiB; default {DriverOptions.snapshot_timeout:g})")
    parser.add_argument("--drop-timeout", type=float, default=DriverOptions.drop_timeout, metavar="SECONDS",
                        help="how long the guest may take to drop its caches while it still runs, right "
                        "before the suspend, per GiB of the guest's memory (at least one GiB; default "
                        f"{DriverOptions.drop_timeout:g}; 0: no early drop, "
                        "the guest drops them at suspend, in the downtime)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-round progress")


def _add_suspend_timeout(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suspend-timeout", type=float, default=60.0, metavar="SECONDS",
                        help="how long the guest may take to acknowledge and to suspend (default 60, "
                        "as libxl)")


@dataclass(frozen=True)
class PruneChoice:
    """What ``--prune LIST`` asks for."""

    categories: tuple[Category, ...]
    cache: CacheMode


DEFAULT_PRUNE = PruneChoice(PRUNABLE, DriverOptions.cache)


def _prune_list(text: str) -> PruneChoice:
    chosen = []
    cache_modes = []
    for item in (item.strip() for item in text.split(",")):
        if not item:
            continue
        name, equals, mode = item.partition("=")
        name = name.strip().upper()
        if name not in {category.name for category in PRUNABLE}:
            raise argparse.ArgumentTypeError(
                f"unknown category {name.lower()!r}: choose from free,cache,slab"
            )
        if equals:
            if name != Category.CACHE.name:
                raise argparse.ArgumentTypeError(
                    f"{item!r}: only cache takes a mode (cache=cold or cache=all)"
                )
            try:
                cache_modes.append(CacheMode(mode.strip()))
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{item!r}: expected cache=cold or cache=all, got mode {mode.strip()!r}"
                ) from None
        chosen.append(Category[name])
    if not chosen:
        raise argparse.ArgumentTypeError("expected at least one category")
    if len(set(cache_modes)) > 1:
        raise argparse.ArgumentTypeError(f"{text!r}: cache=cold and cache=all both given")
    return PruneChoice(tuple(dict.fromkeys(chosen)), cache_modes[0] if cache_modes else DriverOptions.cache)


def driver_options(args: argparse.Namespace, live: bool) -> DriverOptions:
    return DriverOptions(
        prune=() if args.no_prune else args.prune.categories,
        cache=args.prune.cache,
        policy=PrecopyPolicy(max_iterations=args.max_iters, target_dirty_count=args.dirty_target),
        snapshot_timeout=args.snapshot_timeout,
        drop_timeout=args.drop_timeout,
        live=live,
    )


def _backend(args: argparse.Namespace, domid: int) -> Any:
    # Imported here: the Xen bindings need libxenctrl, which only dom0 has.
    from softpage.xen.backend import XenBackend
    from softpage.xen.suspend import SuspendTimeouts

    timeouts = SuspendTimeouts(ack=args.suspend_timeout, suspended=args.suspend_timeout)
    return XenBackend(domid, suspend_timeouts=timeouts)


def helper_options(args: argparse.Namespace) -> str:
    """The driver options of ``args`` as SOFTPAGE_SAVE_HELPER_OPTIONS says them to the helper."""
    categories = ",".join(f"{category.name.lower()}={args.prune.cache.value}" if category is Category.CACHE
                          else category.name.lower() for category in args.prune.categories)
    words = ["--no-prune"] if args.no_prune else ["--prune", categories]
    if args.stats:
        words += ["--stats", args.stats]
    words += ["--max-iters", str(args.max_iters), "--dirty-target", str(args.dirty_target),
              "--snapshot-timeout", f"{args.snapshot_timeout:g}", "--drop-timeout", f"{args.drop_timeout:g}"]
    if args.quiet:
        words.append("-q")
    return shlex.join(words)


def run_through_libxl(args: argparse.Namespace, domain: toolstack.ListedDomain,
                      xl_arguments: list[str]) -> NoReturn:
    """An HVM guest: libxl saves QEMU's state and switches its log-dirty mode, so ``xl`` runs
    the migration or save with softpage's save helper, which prunes as this command would (one
    sender). ``xl``'s exit status is this command's; libxl's own suspend timeout applies."""
    from softpage.cli import save_helper
    from softpage.savehelper.protocol import HELPER_VARIABLE

    helper = save_helper.executable()
    environment = {**os.environ, HELPER_VARIABLE: helper,
                   save_helper.OPTIONS_VARIABLE: helper_options(args)}
    command = [toolstack.XL, *xl_arguments]
    _print_quietly(f"softpage: {domain.name} is an HVM guest, whose device model libxl saves: running "
                   f"{HELPER_VARIABLE}={helper} {shlex.join(command)}", sys.stderr)
    sys.stderr.flush()
    try:
        os.execvpe(toolstack.XL, command, environment)
    except OSError as error:
        raise SoftpageError(f"cannot run {toolstack.XL}: {error}") from error


def run_migrate(args: argparse.Namespace) -> int:
    _load_sender_meanwhile()
    domain = toolstack.list_domain(args.domain)
    if domain.has_device_model:
        preserve_domid = ["-D"] if args.preserve_domid else []
        return run_through_libxl(args, domain, ["migrate", "-s", args.ssh_command, *preserve_domid,
                                                args.domain, args.host])
    rune = args.host if not args.ssh_command else f"exec {args.ssh_command} {args.host} xl migrate-receive"
    log = _logger(sys.stderr)
    backend = None
    destroy_times: list[float] = []

    def destroy_source() -> None:
        if backend is not None:
            _cleanup(backend, log)  # log-dirty off and the guest's pages unmapped first
        destroying = time.monotonic()
        toolstack.destroy(domain.domid)
        destroy_times.append(time.monotonic() - destroying)

    try:
        # As early as the domain is known to exist: the receiver starts up while we do.
        with ReceiverProcess(["sh", "-c", rune]) as receiver, PyxsStore() as store:
            from softpage.sender import migrate_domain

            backend = _backend(args, domain.domid)
            started = time.monotonic()
            startup = _process_age_s()
            result = migrate_domain(
                backend, _Receiver(receiver), domain.config_json(preserve_domid=args.preserve_domid),
                domain.name, functools.partial(toolstack.rename, store, domain.domid, domain.uuid),
                driver_options(args, live=True), log, None if args.quiet else _progress(sys.stderr),
                destroy_source=destroy_source, unsent=receiver.channel.unsent_bytes,
            )
    finally:
        if backend is not None:
            _cleanup(backend, log)
    timeline = Timeline(startup_s=startup, destroy_s=destroy_times[0])
    stats = result.send.stats
    elapsed = time.monotonic() - started
    write_stats(args.stats, stats, result.send.stream_bytes, elapsed, result.downtime_s, timeline)
    log(summary(stats, result.send.stream_bytes, elapsed, result.downtime_s))
    if result.held_signals:
        log(f"migration sender: {signal_names(list(result.held_signals))} arrived during the handover, "
            "which was finished first: the guest runs on the target")
    log("Migration successful.")
    return 0


def run_save(args: argparse.Namespace) -> int:
    _load_sender_meanwhile()
    domain = toolstack.list_domain(args.domain)
    if domain.has_device_model:
        return run_through_libxl(args, domain, [
            "save", *(["-c"] if args.checkpoint else []), *(["-p"] if args.leave_paused else []),
            args.domain, args.file])
    config = domain.config_json()
    log = _logger(sys.stderr)
    from softpage.sender import StreamLeftOpen, save_domain

    backend = _backend(args, domain.domid)
    started = time.monotonic()
    startup = _process_age_s()
    try:
        fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        leave_open = False
        try:
            result = save_domain(backend, fd, config, driver_options(args, live=False), log,
                                 None if args.quiet else _progress(sys.stderr))
            os.fsync(fd)
        except StreamLeftOpen:
            # Its writer thread may still write to fd: the process's exit closes it.
            leave_open = True
            raise
        except KeyboardInterrupt:
            # After the stream, before the image is known to be on disk: the guest goes back to
            # running (the driver already resumed it if the interrupt came earlier).
            with held_signals():
                backend.resume()
            log(f"save: interrupted; {domain.name!r} runs")
            raise
        finally:
            if not leave_open:
                os.close(fd)
        # Not cut in the middle: a half-destroyed or suspended-and-kept domain helps nobody.
        with held_signals() as arrived:
            destroying = time.monotonic()
            if args.checkpoint or args.leave_paused:
                backend.resume()
                if args.leave_paused:
                    toolstack.run_xl(["pause", str(domain.domid)])
            else:
                toolstack.destroy(domain.domid)
            timeline = Timeline(startup_s=startup, destroy_s=time.monotonic() - destroying)
        if arrived:
            log(f"save: {signal_names(arrived)} arrived after the image was written, which was "
                "finished first")
    finally:
        _cleanup(backend, log)
    elapsed = time.monotonic() - started
    write_stats(args.stats, result.stats, result.stream_bytes, elapsed, None, timeline)
    print(summary(result.stats, result.stream_bytes, elapsed, None), file=sys.stderr)
    return 0


@dataclass(frozen=True)
class Timeline:
    """Where a command's time goes besides the migration proper (``migration_s``)."""

    startup_s: float | None
    """From the process's start (the interpreter's own start-up included) to the first step of
    the migration: imports, ``xl list -l``, the receiver's launch, the Xen handles."""
    destroy_s: float
    """``xl destroy`` of the source after a migration, or the resume/destroy after a save."""


def _process_age_s() -> float | None:
    """Seconds since this process started, from /proc/self/stat's start time (in clock ticks
    since boot); None where there is no /proc."""
    try:
        with open("/proc/self/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    started_ticks = int(fields[19])  # field 22 of proc(5); fields[0] is field 3
    return time.clock_gettime(time.CLOCK_BOOTTIME) - started_ticks / os.sysconf("SC_CLK_TCK")


class _Receiver:
    """``sender.ReceiverConnection`` over a ``ReceiverProcess``."""

    def __init__(self, process: ReceiverProcess) -> None:
        self._process = process
        self.read = process.channel.read
        self.write = process.channel.write
        self.writev = process.channel.writev

    def close_sending_side(self) -> None:
        self._process.close_sending_side()


def _cleanup(backend: Any, log: Any) -> None:
    try:
        backend.cleanup()
    except (SoftpageError, OSError) as error:
        log(f"warning: cleanup: {error}")


def _logger(stream: TextIO) -> Any:
    def log(message: str) -> None:
        # After SIGHUP (a dropped ssh session) stderr may be gone: a failed log line must not
        # cut short the resume or the handover it reports on.
        _print_quietly(message, stream)

    return log


def _progress(stream: TextIO) -> Any:
    def report(round_stats: RoundStats) -> None:
        _print_quietly(round_line(round_stats), stream)

    return report


def round_line(round_stats: RoundStats) -> str:
    """One round, as ``softpage migrate`` and the save helper report it."""
    return (f"softpage: round {round_stats.round} ({round_stats.kind}): "
            f"{round_stats.pages_data} pages with data, {round_stats.pages_xalloc} as XALLOC, "
            f"{round_stats.pages_skipped} skipped soft, {round_stats.bytes / MIB:.1f} MiB "
            f"in {round_stats.duration_s:.1f} s{_drain_text(round_stats)}")


def _drain_text(round_stats: RoundStats) -> str:
    """The wait for the receiver to take what the round queued, when it is worth a mention."""
    if round_stats.drain_s < 0.05:
        return ""
    return f", {round_stats.drain_s:.1f} s more until the receiver took it"


def _print_quietly(message: str, stream: TextIO) -> None:
    with contextlib.suppress(OSError):
        print(message, file=stream, flush=True)


def _totals(
    stats: MigrationStats, stream_bytes: int, elapsed: float, downtime: float | None,
    timeline: Timeline | None = None,
) -> dict[str, Any]:
    return {
        "totals": True,
        "domid": stats.domid,
        "rounds": len(stats.rounds),
        "pages_data": stats.pages_data,
        "pages_xalloc": stats.pages_xalloc,
        "pages_skipped": stats.pages_skipped,
        "stream_bytes": stream_bytes,
        "migration_s": round(elapsed, 3),
        "downtime_s": None if downtime is None else round(downtime, 3),
        "guest_drop_s": None if stats.guest_drop_s is None else round(stats.guest_drop_s, 3),
        "guest_drop_outcome": None if stats.guest_drop_outcome is None else stats.guest_drop_outcome.value,
        "first_drop_s": None if stats.first_drop_s is None else round(stats.first_drop_s, 3),
        "first_drop_outcome": None if stats.first_drop_outcome is None else stats.first_drop_outcome.value,
        "cache_mode": None if stats.cache_mode is None else stats.cache_mode.value,
        "cold_cache_left": stats.cold_cache_left,
        "sender_cpu_s": round(stats.sender_cpu_s, 3),
        "drain_s": round(stats.drain_s, 3),
        "startup_s": None if timeline is None or timeline.startup_s is None else round(timeline.startup_s, 3),
        "destroy_s": None if timeline is None else round(timeline.destroy_s, 3),
        "downtime_steps": stats.downtime_steps,
        "warnings": stats.warnings,
    }


def write_stats(path: str | None, stats: MigrationStats, stream_bytes: int, elapsed: float,
                downtime: float | None, timeline: Timeline | None) -> None:
    if path is None:
        return
    with open(path, "w", encoding="utf-8") as out:
        for round_stats in stats.rounds:
            out.write(json.dumps(asdict(round_stats)) + "\n")
        out.write(json.dumps(_totals(stats, stream_bytes, elapsed, downtime, timeline)) + "\n")


def summary(stats: MigrationStats, stream_bytes: int, elapsed: float, downtime: float | None) -> str:
    downtime_text = "" if downtime is None else f", downtime {downtime:.2f} s"
    drop_text = "" if stats.guest_drop_s is None else f", early cache drop {stats.guest_drop_s:.2f} s"
    if stats.first_drop_s is not None:
        drop_text = f", cold cache dropped first {stats.first_drop_s:.2f} s{drop_text}"
    return (
        f"softpage: {len(stats.rounds)} rounds, {stats.pages_data} pages with data, "
        f"{stats.pages_xalloc} as XALLOC, {stats.pages_skipped} skipped soft; "
        f"{stream_bytes / MIB:.1f} MiB in {elapsed:.1f} s{downtime_text}{drop_text}, "
        f"sender CPU {stats.sender_cpu_s:.1f} s"
    )
