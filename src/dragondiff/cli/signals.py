"""Ctrl-C (SIGINT) and SIGTERM: the command stops with 130 or 143 wherever the signal lands.

The handler remembers the signal and raises where the program is (KeyboardInterrupt, or `Terminated` for SIGTERM),
so that it unwinds as Ctrl-C does and removes its temporary files. That exception can land where Python drops it (a
finalizer, `__del__`, prints "Exception ignored in ..." and goes on), so the signal is also remembered: `check()`
raises it again at the safe points (before each edit, after each sampling step, before an edit's files are put in
place), and `main` exits with the signal's code if it finishes anyway. `deferred()` holds a signal back while an
edit's finished files are renamed into place, so that an edit is either all there or not at all.
"""

from __future__ import annotations

import contextlib
import signal
import threading

_received: int | None = None  # the first signal of this run
_deferring = 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that it unwinds as Ctrl-C does (temporary files removed)."""


def stop_exception(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _handler(signum, frame):
    global _received
    if _received is None:
        _received = signum
    if not _deferring:
        raise stop_exception(_received)


def received() -> int | None:
    """The signal this run received (None: none)."""
    return _received


def check() -> None:
    """A safe point: raise the signal received, if any, again (its first exception may have been dropped)."""
    if _received is not None and not _deferring:
        raise stop_exception(_received)


@contextlib.contextmanager
def deferred():
    """A block a signal does not interrupt (it is raised at the next `check()`, or by `main` at the end)."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1


@contextlib.contextmanager
def handled():
    """SIGINT and SIGTERM handled as above for the block (main thread only; elsewhere Python delivers no
    signals), the previous handlers restored after it. A signal this process was started ignoring (a shell's
    background job ignores SIGINT) stays ignored."""
    global _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received = None
    previous = {sig: signal.signal(sig, _handler) for sig in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
