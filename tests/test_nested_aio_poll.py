# SPDX-License-Identifier: GPL-2.0-or-later
"""Poll handlers are not re-entrant in nested aio_poll() (QEMU's
tests/unit/test-nested-aio-poll.c, ``/nested-aio-poll``).

Poll handlers are usually level-triggered: they keep firing until the
condition is reset (e.g. a virtqueue becomes empty).  If a poll handler calls
a nested aio_poll() before the condition is reset, infinite recursion occurs.
aio_poll() prevents this by leaving the running poll handler out of nested
aio_poll() calls.  These tests check that this is indeed what happens, and
that the event the nested loop was waiting for is not lost.

The context runs in a thread of its own that made it its current context
(QEMU calls qemu_set_current_aio_context in the test's main thread; the
pytest main thread already belongs to the main context).
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
from helpers import watchdog

from pyaioctx import (
    AioContext,
    EventNotifier,
    aio_context_set_poll_params,
    aio_context_unref,
    aio_notify,
    aio_poll,
    aio_set_event_notifier,
    event_notifier_cleanup,
    event_notifier_init,
    event_notifier_set,
    event_notifier_test_and_clear,
    qemu_set_current_aio_context,
)

FDMONS = ["epoll", "poll"]


def run_in_iothread(ctx: AioContext, fn):
    """Run fn() in a fresh thread whose current context is ``ctx``."""
    out: dict = {}

    def body() -> None:
        try:
            qemu_set_current_aio_context(ctx)
            out["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            out["exc"] = e

    t = threading.Thread(target=body, name="nested-aio-poll", daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "test thread hung"
    if "exc" in out:
        raise out["exc"]
    return out.get("result")


class NestedTestData:
    def __init__(self, ctx: AioContext):
        self.ctx = ctx
        # This is the EventNotifier that drives the test
        self.poll_notifier = EventNotifier()
        # This EventNotifier is only used to wake aio_poll()
        self.dummy_notifier = EventNotifier()
        self.nested = False
        self.errors: list[str] = []
        self.io_read_calls: list[EventNotifier] = []
        self.poll_ready_calls = 0
        self.nested_results: list[bool] = []
        self.wd = {"fired": False}

    def io_read(self, notifier: EventNotifier) -> None:
        self.io_read_calls.append(notifier)
        event_notifier_test_and_clear(notifier)

    @staticmethod
    def io_poll_true(opaque) -> bool:
        return True

    @staticmethod
    def io_poll_false(opaque) -> bool:
        return False

    def io_poll_ready(self, notifier: EventNotifier) -> None:
        if notifier is not self.poll_notifier:
            self.errors.append(f"io_poll_ready called with {notifier!r}")
        if self.nested:
            # Recursion: the nested aio_poll called us again.  Do not recurse
            # further, just report it.
            self.errors.append("io_poll_ready re-entered from a nested aio_poll")
            return
        self.poll_ready_calls += 1
        self.nested = True
        try:
            # Wake the following nested aio_poll() call
            event_notifier_set(self.dummy_notifier)
            # This nested event loop must not call io_poll()/io_poll_ready()
            self.nested_results.append(aio_poll(self.ctx, True))
        finally:
            self.nested = False

    def io_poll_never_ready(self, notifier: EventNotifier) -> None:
        # dummy_notifier never triggers
        self.errors.append("io_poll_ready of the dummy notifier was called")


@pytest.mark.parametrize("fdmon", FDMONS)
def test_nested_aio_poll(fdmon):
    """/nested-aio-poll: an io_poll_ready handler that calls a nested
    aio_poll() is not re-entered by it, the nested loop gets the event it was
    woken for, and polling keeps working afterwards."""
    ctx = AioContext(fdmon=fdmon)
    td = NestedTestData(ctx)

    def body() -> None:
        # Enable polling
        aio_context_set_poll_params(ctx, 1_000_000, 2, 2)

        # Make the event notifier active (set) right away
        assert event_notifier_init(td.poll_notifier, True) == 0
        aio_set_event_notifier(ctx, td.poll_notifier, False,
                               td.io_read, td.io_poll_true, td.io_poll_ready)

        # This event notifier will be used later
        assert event_notifier_init(td.dummy_notifier, False) == 0
        aio_set_event_notifier(ctx, td.dummy_notifier, False,
                               td.io_read, td.io_poll_false, td.io_poll_never_ready)

        with watchdog(ctx, 5.0) as wd:
            td.wd = wd
            # Consume aio_notify().  QEMU skips the fd wait here because
            # every handler can be polled, so io_read() only runs in the next
            # call; pyaioctx may already dispatch it here.  Either way it runs
            # exactly once before polling starts.
            aio_poll(ctx, False)

            # Run the io_read() handler.  This has the side-effect of
            # activating polling in future aio_poll() calls.
            if not td.io_read_calls:
                assert aio_poll(ctx, True)
            assert td.io_read_calls == [td.poll_notifier]
            assert td.poll_ready_calls == 0
            assert ctx.poll_ns > 0, "dispatching a pollable handler must start adaptive polling"

            # The second time around the io_poll()/io_poll_ready() handler runs
            assert aio_poll(ctx, True)
            assert td.poll_ready_calls == 1
            assert td.nested_results == [True]
            assert td.io_read_calls == [td.poll_notifier, td.dummy_notifier]

            # Run io_poll()/io_poll_ready() one more time to show it keeps working
            assert aio_poll(ctx, True)
            assert td.poll_ready_calls == 2
            assert td.nested_results == [True, True]
            assert td.io_read_calls == [td.poll_notifier, td.dummy_notifier, td.dummy_notifier]
        assert not wd["fired"], "aio_poll blocked: the poll handler's event was lost"

        aio_set_event_notifier(ctx, td.dummy_notifier, False, None, None, None)
        aio_set_event_notifier(ctx, td.poll_notifier, False, None, None, None)
        event_notifier_cleanup(td.dummy_notifier)
        event_notifier_cleanup(td.poll_notifier)

    try:
        run_in_iothread(ctx, body)
        assert not td.errors, td.errors
    finally:
        aio_context_unref(ctx)


@pytest.mark.parametrize("fdmon", FDMONS)
def test_nested_aio_poll_many_rounds(fdmon):
    """The nested-poll invariant holds round after round: each aio_poll runs
    io_poll_ready exactly once, never recursively, and each nested loop gets
    its wake-up."""
    ctx = AioContext(fdmon=fdmon)
    td = NestedTestData(ctx)
    rounds = 50

    def body() -> None:
        aio_context_set_poll_params(ctx, 1_000_000, 2, 2)
        event_notifier_init(td.poll_notifier, True)
        aio_set_event_notifier(ctx, td.poll_notifier, False,
                               td.io_read, td.io_poll_true, td.io_poll_ready)
        event_notifier_init(td.dummy_notifier, False)
        aio_set_event_notifier(ctx, td.dummy_notifier, False,
                               td.io_read, td.io_poll_false, td.io_poll_never_ready)
        deadline = time.monotonic() + 10
        with watchdog(ctx, 10.0) as wd:
            while not td.io_read_calls:
                assert time.monotonic() < deadline
                aio_poll(ctx, True)
            for i in range(rounds):
                assert aio_poll(ctx, True)
                assert td.poll_ready_calls == i + 1
        assert not wd["fired"]
        assert td.nested_results == [True] * rounds
        aio_set_event_notifier(ctx, td.dummy_notifier, False, None)
        aio_set_event_notifier(ctx, td.poll_notifier, False, None)
        event_notifier_cleanup(td.dummy_notifier)
        event_notifier_cleanup(td.poll_notifier)

    try:
        run_in_iothread(ctx, body)
        assert not td.errors, td.errors
    finally:
        aio_context_unref(ctx)
