# SPDX-License-Identifier: GPL-2.0-or-later
"""Helpers shared by the event-loop tests.

Waits never spin forever: each one is bounded, and a watchdog thread kicks
the context with aio_notify once the bound has passed, so a lost wake-up
becomes an assertion failure instead of a hang.
"""

from __future__ import annotations

import contextlib
import threading
import time

from pyaioctx import AioContext, aio_notify, aio_poll


@contextlib.contextmanager
def watchdog(ctx: AioContext, timeout: float):
    """Kick ``ctx`` with aio_notify once ``timeout`` seconds have passed.

    Yields a dict whose "fired" key tells whether the bound was exceeded.
    """
    stop = threading.Event()
    state = {"fired": False}

    def run() -> None:
        if stop.wait(timeout):
            return
        state["fired"] = True
        while True:
            with contextlib.suppress(Exception):
                aio_notify(ctx)
            if stop.wait(0.02):
                return

    t = threading.Thread(target=run, name="watchdog", daemon=True)
    t.start()
    try:
        yield state
    finally:
        stop.set()
        t.join()


def poll_until(ctx: AioContext, pred, timeout: float = 5.0) -> int:
    """Blocking aio_poll until ``pred()``; returns the number of polls."""
    deadline = time.monotonic() + timeout
    n = 0
    with watchdog(ctx, timeout) as wd:
        while not pred():
            if wd["fired"] or time.monotonic() > deadline:
                raise AssertionError(f"condition not reached within {timeout}s")
            aio_poll(ctx, True)
            n += 1
    return n


def drain(ctx: AioContext, limit: int = 1000) -> int:
    """``do {} while (aio_poll(ctx, false));`` with a bound; returns the count."""
    for i in range(limit):
        if not aio_poll(ctx, False):
            return i
    raise AssertionError(f"aio_poll(ctx, False) still making progress after {limit} calls")
