"""``softpage``: the dom0 command.

Each subcommand lives in its own module under ``softpage.cli`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a
callable ``(args) -> int``. This module owns the error boundary:

* 0 ok;
* 1 operational failure: one line ``softpage: error: <msg>`` on stderr
  (the traceback too with ``--debug``);
* 2 usage error (argparse);
* 3 unexpected exception: traceback and "this is a bug";
* 130 interrupted: SIGINT, and SIGTERM and SIGHUP (a dropped ssh session), which
  raise ``KeyboardInterrupt`` as SIGINT does, so each takes the same cleanup path.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import traceback
from collections.abc import Sequence

from softpage import __version__
from softpage.errors import SoftpageError
from softpage.interrupts import raise_on_signals

SUBCOMMAND_MODULES = {
    "inspect": "softpage.cli.inspect",
    "simulate": "softpage.cli.simulate",
    "migrate": "softpage.cli.migrate",
    "save": "softpage.cli.migrate",
    "resume": "softpage.cli.resume",
}
"""Which module registers each subcommand. A command line that names one loads only that module:
the others import numpy, which takes seconds in an emulated dom0."""


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softpage",
        description="Soft-page pruning for Xen live migration.",
    )
    parser.add_argument("--version", action="version", version=f"softpage {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _modules_needed(sys.argv[1:] if argv is None else argv):
        importlib.import_module(name).register(subparsers)
    return parser


def _modules_needed(argv: Sequence[str]) -> list[str]:
    """The module of the subcommand named first on the command line, or every module (for
    ``--help``, a usage error, or an unknown command, which argparse then reports)."""
    for word in argv:
        if not word.startswith("-"):
            if word in SUBCOMMAND_MODULES:
                return [SUBCOMMAND_MODULES[word]]
            break
    return list(dict.fromkeys(SUBCOMMAND_MODULES.values()))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    raise_on_signals()
    try:
        return int(args.func(args))
    except KeyboardInterrupt as interrupt:
        # After SIGHUP stderr may be gone with the terminal: the exit status still tells.
        with contextlib.suppress(OSError):
            print(f"softpage: interrupted{f' ({interrupt})' if str(interrupt) else ''}", file=sys.stderr)
        return 130
    except (SoftpageError, OSError) as error:
        if args.debug:
            traceback.print_exc()
        print(f"softpage: error: {error}", file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        print("softpage: this is a bug, please report it", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
