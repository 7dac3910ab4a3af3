# SPDX-License-Identifier: GPL-2.0-or-later
"""``python -m pyaioctx`` / ``pyaioctx demo``: a short, real tour of the event loop.

It runs a bottom half, a timer, an event notifier set from another thread and
a nested ``aio_poll`` on a fresh AioContext, printing each step as it
happens.  Exit status 0 means every step was observed.
"""

from __future__ import annotations

import sys
import threading
import time

import pyaioctx as q


def main(argv: "list[str] | None" = None) -> int:
    """Run the tour (``argv`` is accepted for the CLI and ignored)."""
    ctx = q.qemu_init_main_loop()
    t0 = time.monotonic()
    seen: list[str] = []

    def say(what: str) -> None:
        seen.append(what)
        print(f"[{(time.monotonic() - t0) * 1000:7.2f} ms] {what}")

    # 1. A bottom half: scheduled now, run by the next aio_poll.
    bh = q.aio_bh_new(ctx, lambda _: say("bottom half ran"), None, name="demo-bh")
    q.qemu_bh_schedule(bh)
    say("scheduled a bottom half")
    q.aio_poll(ctx, False)

    # 2. A timer 20 ms from now; aio_poll(ctx, True) sleeps until then.
    timer = q.aio_timer_new(ctx, q.QEMU_CLOCK_REALTIME, q.SCALE_MS,
                            lambda _: say("timer fired"), None)
    q.timer_mod(timer, q.qemu_clock_get_ms(q.QEMU_CLOCK_REALTIME) + 20)
    say("armed a 20 ms timer")
    while q.timer_pending(timer):
        q.aio_poll(ctx, True)

    # 3. An event notifier set from another OS thread wakes a blocked aio_poll.
    e = q.EventNotifier()
    q.event_notifier_init(e, False)

    got = [False]

    def on_event(n: q.EventNotifier) -> None:
        q.event_notifier_test_and_clear(n)
        got[0] = True
        say(f"event notifier read in {threading.current_thread().name}")

    q.aio_set_event_notifier(ctx, e, False, on_event)
    threading.Thread(target=lambda: (time.sleep(0.01), q.event_notifier_set(e)),
                     name="setter").start()
    say("blocking in aio_poll until another thread sets the notifier")
    while not got[0]:
        q.aio_poll(ctx, True)

    # 4. A nested aio_poll: a BH waits, inside its callback, for another BH.
    inner_done = [False]
    inner = q.aio_bh_new(ctx, lambda _: (inner_done.__setitem__(0, True),
                                         say("inner BH ran inside the nested aio_poll")),
                         None, name="inner")

    def outer_cb(_: object) -> None:
        say("outer BH runs; scheduling inner BH and polling for it (nested)")
        q.qemu_bh_schedule(inner)
        while not inner_done[0]:
            q.aio_poll(ctx, True)
        say("outer BH resumes after the nested aio_poll")

    outer = q.aio_bh_new(ctx, outer_cb, None, name="outer")
    q.qemu_bh_schedule(outer)
    q.aio_poll(ctx, True)

    q.aio_set_event_notifier(ctx, e, False, None)
    q.event_notifier_cleanup(e)
    q.timer_free(timer)
    for b in (bh, inner, outer):
        q.qemu_bh_delete(b)
    q.aio_poll(ctx, False)
    expected = 9
    ok = len(seen) >= expected
    print("all steps observed" if ok else f"only {len(seen)} of {expected} steps observed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
