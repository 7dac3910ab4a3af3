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


class IOThread:
    """QEMU's IOThread: a thread whose current context is ``ctx`` and which
    polls it until stopped.  An exception raised in it is re-raised by
    ``stop``.  ``ident`` is its OS thread id, ``lt`` its logical thread."""

    def __init__(self, name: str = "test-iothread", wait_s: float = 10.0) -> None:
        from pyaioctx import _tls, aio_context_new, qemu_set_current_aio_context

        self.ctx = aio_context_new()
        self.wait_s = wait_s
        self.stopping = False
        self.error: BaseException | None = None
        self.ident = 0
        self.lt = None
        ready = threading.Event()

        def run() -> None:
            qemu_set_current_aio_context(self.ctx)
            self.ident = threading.get_ident()
            self.lt = _tls.current()
            ready.set()
            try:
                while not self.stopping:
                    aio_poll(self.ctx, True)
            except BaseException as e:  # noqa: BLE001 - reported by stop()
                self.error = e
            finally:
                qemu_set_current_aio_context(None)

        self.thread = threading.Thread(target=run, name=name)
        self.thread.start()
        assert ready.wait(wait_s), "the iothread did not start"

    def run_bh(self, fn):
        """Run ``fn()`` in a BH of the iothread and return its result (or
        re-raise its exception)."""
        from pyaioctx import aio_bh_schedule_oneshot

        box: list = []
        done = threading.Event()

        def bh(_) -> None:
            try:
                box.append(fn())
            except BaseException as e:  # noqa: BLE001 - re-raised below
                box.append(e)
            done.set()

        aio_bh_schedule_oneshot(self.ctx, bh, None)
        assert done.wait(self.wait_s), "the iothread did not run the BH"
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def stop(self) -> None:
        from pyaioctx import aio_context_unref

        self.stopping = True
        aio_notify(self.ctx)
        self.thread.join(self.wait_s)
        assert not self.thread.is_alive(), "the iothread did not stop"
        aio_context_unref(self.ctx)
        if self.error is not None:
            raise self.error


def timer_runs_during_endless_chain(ctx: AioContext, submit, total: int = 20000,
                                    depth: int = 8) -> tuple[int, int]:
    """Keep ``depth`` requests in flight through ``submit(cb)`` (an engine
    whose requests complete as fast as their callbacks resubmit them) until
    ``total`` completed, with a 1 ms timer armed meanwhile.

    Returns (completions when the timer ran, total); the first is -1 if the
    timer never ran.  An engine whose completion walk never yields to the
    event loop runs the whole chain before the timer.
    """
    from pyaioctx import (QEMU_CLOCK_REALTIME, SCALE_NS, aio_timer_new, qemu_clock_get_ns,
                          timer_free, timer_mod_ns)

    state = {"done": 0, "at_timer": -1}

    def cb(_opaque, ret: int) -> None:
        assert ret == 0
        state["done"] += 1
        if state["done"] + depth <= total:
            submit(cb)

    def on_timer(_opaque) -> None:
        state["at_timer"] = state["done"]

    t = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS, on_timer, None)
    for _ in range(depth):
        submit(cb)
    timer_mod_ns(t, qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + 1_000_000)
    for _ in range(10 ** 6):
        if state["done"] == total:
            break
        aio_poll(ctx, True)
    timer_free(t)
    assert state["done"] == total, "the chain did not finish"
    return state["at_timer"], total
