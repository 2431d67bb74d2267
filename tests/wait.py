"""The one way tests wait for something another process does: poll an observable
predicate (a log line, an fd count, a process state) until it holds, with a deadline.

Never sleep a fixed time instead: the machine may be loaded (CI runs on 2 cores
shared with QEMU guests), so any fixed sleep is either too short there or wasted
time everywhere else.  A deadline only costs time when something is broken.
"""
from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")

#: Default deadline for an event that is expected to happen (milliseconds on an idle
#: machine).  Generous on purpose: it is only reached when the test fails anyway.
WAIT = 30.0


def wait_for(pred: Callable[[], T], timeout: float = WAIT, *, what: str | Callable[[], str] = "condition",
             interval: float = 0.01, abort: Callable[[], None] | None = None) -> T:
    """Call ``pred()`` until it returns a true value, and return that value.

    ``abort()``, when given, runs after every unsuccessful poll and may raise to give
    up early (e.g. the daemon exited); ``pred`` then gets one more look before the
    error propagates, since what it waits for may have happened just before.  After
    ``timeout`` seconds:
    AssertionError naming ``what`` (a string, or a callable evaluated only then,
    e.g. for a log tail)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if abort is not None:
            try:
                abort()
            except BaseException:
                value = pred()
                if value:
                    return value
                raise
        if time.monotonic() > deadline:
            text = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g}s waiting for {text}")
        time.sleep(interval)
