"""The signals that interrupt a command, and holding them over the steps that must not be cut.

``softpage`` treats SIGTERM and SIGHUP (a dropped ssh session) as SIGINT: each raises
``KeyboardInterrupt`` in the main thread (``raise_on_signals``), so one cleanup path serves all
three. Some steps must not be cut in the middle, e.g. waiting for the receiver's report after it
was given permission to start its copy, where resuming the source could leave the guest running
twice: ``held_signals`` defers the three over such a step and says which arrived.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

INTERRUPTING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def raise_on_signals() -> None:
    """SIGTERM and SIGHUP raise ``KeyboardInterrupt``, as SIGINT does. Main thread only."""
    for signum in INTERRUPTING_SIGNALS:
        if signum != signal.SIGINT:
            signal.signal(signum, _raise_interrupt)


@contextmanager
def held_signals() -> Iterator[list[signal.Signals]]:
    """Defer SIGINT, SIGTERM and SIGHUP over the block: the list it gives fills with those that
    arrived, and the handlers before it come back after it. Outside the main thread, where no
    handler can be set, nothing is held and the list stays empty."""
    received: list[signal.Signals] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def note(signum: int, frame: FrameType | None) -> None:
        received.append(signal.Signals(signum))

    previous = {signum: signal.signal(signum, note) for signum in INTERRUPTING_SIGNALS}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def signal_names(signals: list[signal.Signals]) -> str:
    return ", ".join(dict.fromkeys(received.name for received in signals))
