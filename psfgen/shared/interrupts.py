"""Ctrl-C that reaches a long loop even when Python swallowed it.

Python raises KeyboardInterrupt wherever the main thread is when SIGINT arrives. Inside a finalizer (a ``__del__``,
a weakref callback) it cannot propagate: Python prints "Exception ignored in ..." and goes on, and a run that should
stop finishes instead. ``recorded`` remembers every SIGINT while it is active, so a loop can stop at its next
iteration (``raise_if_seen``) whatever happened to the exception.
"""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def recorded():
    """Within the block, SIGINT raises KeyboardInterrupt as Python's own handler does and is also recorded; yields
    the list of signals seen. Where Python's handler is not in place (SIGINT ignored, another handler, not the main
    thread) nothing changes and the list stays empty."""
    seen: list[int] = []
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield seen
        return

    def handler(signum, frame):
        seen.append(signum)
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, handler)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def raise_if_seen(seen: list[int]) -> None:
    """KeyboardInterrupt if ``recorded`` saw a SIGINT: one that a finalizer swallowed still stops the loop."""
    if seen:
        raise KeyboardInterrupt
