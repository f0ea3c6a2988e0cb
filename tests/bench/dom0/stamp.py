"""Runs in dom0: copies standard input to a log file, each line prefixed with the monotonic clock,
so that a receiver's and a sender's logs share one time line.

    COMMAND 2>&1 | stamp.py LOG
"""

from __future__ import annotations

import sys
import time


def main() -> int:
    with open(sys.argv[1], "a", encoding="utf-8", buffering=1) as log:
        for line in sys.stdin.buffer:
            log.write(f"{time.monotonic():.3f} {line.decode(errors='replace').rstrip()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
