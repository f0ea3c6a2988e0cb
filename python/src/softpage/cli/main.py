"""``softpage``: the dom0 command.

Each subcommand lives in its own module under ``softpage.cli`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a
callable ``(args) -> int``. This module owns the error boundary:

* 0 ok;
* 1 operational failure: one line ``softpage: error: <msg>`` on stderr
  (the traceback too with ``--debug``);
* 2 usage error (argparse);
* 3 unexpected exception: traceback and "this is a bug";
* 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence

from softpage import __version__
from softpage.errors import SoftpageError

SUBCOMMAND_MODULES = (
    "softpage.cli.inspect",
    "softpage.cli.simulate",
    "softpage.cli.migrate",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softpage",
        description="Soft-page pruning for Xen live migration.",
    )
    parser.add_argument("--version", action="version", version=f"softpage {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("softpage: interrupted", file=sys.stderr)
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
