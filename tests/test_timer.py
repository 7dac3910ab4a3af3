# SPDX-License-Identifier: GPL-2.0-or-later
"""Timer tests (QEMU's util/qemu-timer.c, include/qemu/timer.h, and the
timer side of aio_poll).

Most cases use QEMU_CLOCK_VIRTUAL, which here never moves on its own: it
moves only through qemu_clock_advance_virtual_time(dest_ns), which notifies
the contexts that have virtual timers; their expired timers run on the next
aio_poll.  The virtual clock is process-wide and only goes forward, so every
case works relative to its current value.  A few cases use the real clocks
(REALTIME, HOST) with generous bounds.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
from helpers import drain, poll_until, watchdog

from pyaioctx import (
    QEMU_CLOCK_HOST,
    QEMU_CLOCK_REALTIME,
    QEMU_CLOCK_VIRTUAL,
    SCALE_MS,
    SCALE_NS,
    SCALE_US,
    AioContext,
    QEMUTimer,
    aio_context_unref,
    aio_notify,
    aio_poll,
    aio_set_fd_handler,
    aio_timer_init,
    aio_timer_new,
    qemu_clock_get_ms,
    qemu_clock_get_ns,
    qemu_clock_get_us,
    qemu_set_current_aio_context,
    timer_del,
    timer_expire_time_ns,
    timer_expired,
    timer_free,
    timer_mod,
    timer_mod_anticipate,
    timer_mod_ns,
    timer_pending,
)
import pyaioctx

qemu_clock_advance_virtual_time = pyaioctx.qemu_clock_advance_virtual_time

FDMONS = ["epoll", "poll"]


@pytest.fixture(params=FDMONS)
def ctx(request):
    c = AioContext(fdmon=request.param)
    yield c
    if not c.closed:
        aio_context_unref(c)


@pytest.fixture
def vctx():
    """A fresh context for virtual-clock cases (fd monitor irrelevant)."""
    c = AioContext()
    yield c
    if not c.closed:
        aio_context_unref(c)


def vnow() -> int:
    return qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL)


# --------------------------------------------------------------------------
# Clocks


def test_scale_constants():
    """SCALE_* are the ns multipliers of QEMU."""
    assert (SCALE_NS, SCALE_US, SCALE_MS) == (1, 1000, 1000000)


def test_realtime_clock_is_monotonic_and_advances():
    """QEMU_CLOCK_REALTIME never goes back and follows real time."""
    a = qemu_clock_get_ns(QEMU_CLOCK_REALTIME)
    b = qemu_clock_get_ns(QEMU_CLOCK_REALTIME)
    assert b >= a
    time.sleep(0.02)
    c = qemu_clock_get_ns(QEMU_CLOCK_REALTIME)
    assert 15 * SCALE_MS <= c - b < 5_000 * SCALE_MS


def test_host_clock_is_wall_time():
    """QEMU_CLOCK_HOST is the wall clock."""
    assert abs(qemu_clock_get_ns(QEMU_CLOCK_HOST) - time.time_ns()) < 2 * 10**9


def test_clock_get_ms_us_scale():
    """qemu_clock_get_ms/us are the ns value divided by the scale."""
    base = vnow()
    assert qemu_clock_get_ms(QEMU_CLOCK_VIRTUAL) == base // SCALE_MS
    assert qemu_clock_get_us(QEMU_CLOCK_VIRTUAL) == base // SCALE_US
    before = qemu_clock_get_ns(QEMU_CLOCK_REALTIME)
    ms = qemu_clock_get_ms(QEMU_CLOCK_REALTIME)
    us = qemu_clock_get_us(QEMU_CLOCK_REALTIME)
    after = qemu_clock_get_ns(QEMU_CLOCK_REALTIME)
    assert before // SCALE_MS <= ms <= after // SCALE_MS
    assert before // SCALE_US <= us <= after // SCALE_US


def test_virtual_clock_moves_only_when_advanced():
    """The virtual clock stands still until advanced, then reads the target."""
    base = vnow()
    time.sleep(0.01)
    assert vnow() == base
    qemu_clock_advance_virtual_time(base + 12345)
    assert vnow() == base + 12345
    qemu_clock_advance_virtual_time(base)  # never backwards
    assert vnow() == base + 12345


def test_bad_clock_type_raises():
    """An unknown clock type is refused."""
    with pytest.raises((ValueError, TypeError)):
        qemu_clock_get_ns(99)


# --------------------------------------------------------------------------
# Virtual clock: deterministic timer semantics


def test_virtual_timer_fires_at_deadline(vctx):
    """A timer runs on the first aio_poll after the clock reaches its expiry,
    not before, and only once."""
    got = []
    ts = aio_timer_new(vctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, got.append, "op")
    base = vnow()
    timer_mod_ns(ts, base + 1000)
    assert timer_pending(ts)
    drain(vctx)
    qemu_clock_advance_virtual_time(base + 999)
    assert not aio_poll(vctx, False)
    assert got == []
    qemu_clock_advance_virtual_time(base + 1000)
    assert got == []  # runs in aio_poll, not in the advancing call
    assert aio_poll(vctx, False)
    assert got == ["op"]
    assert not timer_pending(ts)
    qemu_clock_advance_virtual_time(base + 5000)
    assert not aio_poll(vctx, False)
    assert got == ["op"]


def test_virtual_timer_blocking_poll_after_advance(vctx):
    """Once the clock has passed a timer's expiry, aio_poll(ctx, True) runs
    it without blocking."""
    got = []
    ts = aio_timer_new(vctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, got.append, 1)
    base = vnow()
    timer_mod_ns(ts, base + 10**12)
    qemu_clock_advance_virtual_time(base + 10**12)
    with watchdog(vctx, 5.0) as wd:
        assert aio_poll(vctx, True)
    assert not wd["fired"]
    assert got == [1]


def test_expiry_order_preserved(vctx):
    """Expired timers run in expiry order; equal expiries run in the order
    they were armed."""
    order = []
    base = vnow()
    spec = [("c", 300), ("a", 100), ("b1", 150), ("b2", 150), ("d", 300), ("b3", 150)]
    timers = []
    for name, delta in spec:
        ts = aio_timer_new(vctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, order.append, name)
        timer_mod_ns(ts, base + delta)
        timers.append(ts)
    qemu_clock_advance_virtual_time(base + 1000)
    assert aio_poll(vctx, False)
    assert order == ["a", "b1", "b2", "b3", "c", "d"]


def test_expiry_over_several_advances(vctx):
    """Advancing step by step runs exactly the timers that became due."""
    order = []
    base = vnow()
    for name, delta in (("t1", 100), ("t2", 200), ("t3", 300)):
        timer_mod_ns(aio_timer_new(vctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, order.append, name),
                     base + delta)
    for step, expected in ((150, ["t1"]), (250, ["t1", "t2"]), (299, ["t1", "t2"]),
                           (300, ["t1", "t2", "t3"])):
        qemu_clock_advance_virtual_time(base + step)
        aio_poll(vctx, False)
        assert order == expected, step


def test_rearm_from_callback(vctx):
    """A callback may re-arm its own timer (QEMU's timer_test_cb)."""
    state = {"n": 0, "pending_in_cb": []}
    ts = QEMUTimer()

    def cb(_) -> None:
        state["n"] += 1
        # removed from the list before the call
        state["pending_in_cb"].append(timer_pending(ts))
        if state["n"] < 3:
            timer_mod_ns(ts, vnow() + 100)

    aio_timer_init(vctx, ts, QEMU_CLOCK_VIRTUAL, SCALE_NS, cb, None)
    base = vnow()
    timer_mod_ns(ts, base + 100)
    for i in range(1, 4):
        qemu_clock_advance_virtual_time(base + 100 * i)
        assert aio_poll(vctx, False)
        assert state["n"] == i
        assert timer_pending(ts) == (i < 3)
    qemu_clock_advance_virtual_time(base + 1000)
    assert not aio_poll(vctx, False)
    assert state["n"] == 3
    assert state["pending_in_cb"] == [False, False, False]


def test_timer_armed_in_callback_already_due_runs_same_pass(vctx):
    """A timer armed by a callback with an expiry already reached runs in the
    same timer pass (timerlist_run_timers re-reads the list head)."""
    order = []
    base = vnow()
    late = aio_timer_new(vctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, order.append, "late")

    def first(_) -> None:
        order.append("first")
        timer_mod_ns(late, base + 150)

    timer_mod_ns(aio_timer_new(vctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, first, None), base + 100)
    qemu_clock_advance_virtual_time(base + 300)
    assert aio_poll(vctx, False)
    assert order == ["first", "late"]


def test_timer_del_from_other_callback(vctx):
    """A timer deleted by an earlier timer's callback in the same pass does
    not run."""
    order = []
    base = vnow()
    victim = aio_timer_new(vctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, order.append, "victim")

    def killer(_) -> None:
        order.append("killer")
        timer_del(victim)

    timer_mod_ns(aio_timer_new(vctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, killer, None), base + 100)
    timer_mod_ns(victim, base + 200)
    qemu_clock_advance_virtual_time(base + 300)
    assert aio_poll(vctx, False)
    assert order == ["killer"]
    assert not timer_pending(victim)


def test_timer_del_and_free(vctx):
    """timer_del and timer_free stop a pending timer; timer_del of an idle
    timer is harmless; timer_free(None) is accepted as in C."""
    got = []
    base = vnow()
    a = aio_timer_new(vctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, got.append, "a")
    b = aio_timer_new(vctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, got.append, "b")
    timer_mod_ns(a, base + 10)
    timer_mod_ns(b, base + 10)
    timer_del(a)
    timer_del(a)
    assert not timer_pending(a)
    timer_free(b)
    timer_free(None)
    qemu_clock_advance_virtual_time(base + 100)
    assert not aio_poll(vctx, False)
    assert got == []


def test_timer_mod_moves_pending_timer(vctx):
    """timer_mod on a pending timer replaces its expiry (later or earlier)."""
    got = []
    base = vnow()
    ts = aio_timer_new(vctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, got.append, "x")
    timer_mod_ns(ts, base + 100)
    timer_mod_ns(ts, base + 500)
    qemu_clock_advance_virtual_time(base + 200)
    assert not aio_poll(vctx, False)
    assert got == []
    timer_mod_ns(ts, base + 150)  # now in the past: due at once
    assert aio_poll(vctx, False)
    assert got == ["x"]


def test_timer_in_the_past_runs_next_poll(vctx):
    """A timer armed in the past (even at a negative time) runs on the next
    aio_poll."""
    got = []
    ts = aio_timer_new(vctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, got.append, 1)
    timer_mod_ns(ts, -5)
    assert timer_pending(ts)
    assert timer_expire_time_ns(ts) == 0  # clamped like QEMU's MAX(expire, 0)
    assert aio_poll(vctx, False)
    assert got == [1]


@pytest.mark.parametrize("scale", [SCALE_NS, SCALE_US, SCALE_MS])
def test_timer_mod_scale_and_expire_time_ns(vctx, scale):
    """timer_mod takes the timer's scale; timer_expire_time_ns returns
    expire * scale, and -1 when not pending."""
    got = []
    ts = aio_timer_new(vctx, QEMU_CLOCK_VIRTUAL, scale, got.append, scale)
    assert timer_expire_time_ns(ts) == -1
    base_units = vnow() // scale + 1
    timer_mod(ts, base_units + 7)
    assert timer_expire_time_ns(ts) == (base_units + 7) * scale
    assert not timer_expired(ts, base_units + 6)
    assert timer_expired(ts, base_units + 7)
    qemu_clock_advance_virtual_time((base_units + 7) * scale - 1)
    assert not aio_poll(vctx, False)
    qemu_clock_advance_virtual_time((base_units + 7) * scale)
    assert aio_poll(vctx, False)
    assert got == [scale]
    assert timer_expire_time_ns(ts) == -1


def test_timer_mod_anticipate(vctx):
    """timer_mod_anticipate only ever moves a pending timer earlier, and
    arms an idle one."""
    base = vnow()
    ts = aio_timer_new(vctx, QEMU_CLOCK_VIRTUAL, SCALE_US, lambda _: None, None)
    base_us = base // SCALE_US + 1
    timer_mod_anticipate(ts, base_us + 50)
    assert timer_expire_time_ns(ts) == (base_us + 50) * SCALE_US
    timer_mod_anticipate(ts, base_us + 80)
    assert timer_expire_time_ns(ts) == (base_us + 50) * SCALE_US
    timer_mod_anticipate(ts, base_us + 20)
    assert timer_expire_time_ns(ts) == (base_us + 20) * SCALE_US
    timer_del(ts)


def test_advance_wakes_blocked_iothread():
    """qemu_clock_advance_virtual_time notifies a context blocked in
    aio_poll(ctx, True) in its iothread; the timer runs there."""
    ctx = AioContext()
    got = []
    started = threading.Event()
    stop = [False]
    errors = []
    base = vnow()
    far = base + 10**12  # 1000 s of virtual time: the iothread must not wait for it

    def cb(_) -> None:
        got.append(threading.get_ident())

    ts = aio_timer_new(ctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, cb, None)

    def iothread() -> None:
        try:
            qemu_set_current_aio_context(ctx)
            timer_mod_ns(ts, far)
            started.set()
            while not stop[0]:
                aio_poll(ctx, True)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
            started.set()

    t = threading.Thread(target=iothread, daemon=True)
    t.start()
    try:
        assert started.wait(5)
        time.sleep(0.05)  # let it block
        qemu_clock_advance_virtual_time(far)
        deadline = time.monotonic() + 3
        while not got and time.monotonic() < deadline:
            time.sleep(0.005)
        assert got == [t.ident]
    finally:
        stop[0] = True
        aio_notify(ctx)
        t.join(5)
        assert not t.is_alive()
        timer_del(ts)
        aio_context_unref(ctx)
    assert not errors


def test_timer_bad_input(vctx):
    """Non-callable callbacks and uninitialised timers are refused."""
    with pytest.raises(TypeError):
        aio_timer_new(vctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, "not callable", None)
    with pytest.raises((RuntimeError, ValueError, TypeError)):
        timer_mod(QEMUTimer(), 5)
    with pytest.raises(TypeError):
        timer_mod("not a timer", 5)


# --------------------------------------------------------------------------
# Real clocks


@pytest.mark.parametrize("clock", [QEMU_CLOCK_REALTIME, QEMU_CLOCK_HOST])
def test_real_clock_timer_fires(ctx, clock):
    """REALTIME and HOST timers run after their deadline from a blocking
    aio_poll, within a generous bound."""
    fired = []
    ts = aio_timer_new(ctx, clock, SCALE_MS,
                       lambda _: fired.append(qemu_clock_get_ns(clock)), None)
    expire_ms = qemu_clock_get_ms(clock) + 30
    timer_mod(ts, expire_ms)
    t0 = time.monotonic()
    poll_until(ctx, lambda: fired)
    assert fired[0] >= expire_ms * SCALE_MS
    assert time.monotonic() - t0 < 2.0
    assert not timer_pending(ts)


def test_blocking_poll_never_sleeps_past_deadline(ctx):
    """aio_poll(ctx, True) with an fd that never fires returns by the timer
    deadline: the timer, not the fd, ends the wait, and on time."""
    import os

    r, w = os.pipe()
    fired = []
    ts = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS,
                       lambda _: fired.append(qemu_clock_get_ns(QEMU_CLOCK_REALTIME)), None)
    try:
        aio_set_fd_handler(ctx, r, False, lambda _: None, None)
        drain(ctx)
        for delay_ms in (20, 80):
            fired.clear()
            expire = qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + delay_ms * SCALE_MS
            timer_mod_ns(ts, expire)
            drain(ctx)
            t0 = time.monotonic()
            polls = poll_until(ctx, lambda: fired)
            elapsed = time.monotonic() - t0
            assert fired[0] >= expire
            assert polls <= 3
            assert elapsed < delay_ms / 1000 + 1.0
    finally:
        timer_del(ts)
        aio_set_fd_handler(ctx, r, False, None, None)
        os.close(r)
        os.close(w)


def test_timer_mod_from_other_thread_wakes_poll(ctx):
    """timer_mod from another thread wakes a context blocked with no
    deadline, which then sleeps until the new deadline and runs the timer."""
    fired = []
    ts = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS,
                       lambda _: fired.append(threading.get_ident()), None)
    drain(ctx)
    armed = []

    def arm() -> None:
        time.sleep(0.05)
        expire = qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + 20 * SCALE_MS
        armed.append(expire)
        timer_mod_ns(ts, expire)

    t = threading.Thread(target=arm)
    t.start()
    try:
        poll_until(ctx, lambda: fired, timeout=5.0)
        assert fired == [threading.get_ident()]
        assert qemu_clock_get_ns(QEMU_CLOCK_REALTIME) >= armed[0]
    finally:
        t.join()
        timer_del(ts)


def test_timer_schedule_realtime_sequence(ctx):
    """QEMU's timer_test_cb pattern on QEMU_CLOCK_REALTIME: a timer re-armed
    from its callback fires max times, each after its own deadline."""
    stamps = []
    state = {"n": 0}
    ts = QEMUTimer()
    period = 15 * SCALE_MS

    def cb(_) -> None:
        state["n"] += 1
        stamps.append(qemu_clock_get_ns(QEMU_CLOCK_REALTIME))
        if state["n"] < 4:
            timer_mod(ts, qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + period)

    aio_timer_init(ctx, ts, QEMU_CLOCK_REALTIME, SCALE_NS, cb, None)
    start = qemu_clock_get_ns(QEMU_CLOCK_REALTIME)
    timer_mod(ts, start + period)
    poll_until(ctx, lambda: state["n"] >= 4)
    drain(ctx)
    assert state["n"] == 4
    gaps = [b - a for a, b in zip([start] + stamps, stamps)]
    assert all(g >= period for g in gaps), gaps
    assert not timer_pending(ts)


def test_rearm_and_delete_many_keep_the_timer_list_bounded(ctx):
    """Deleting or re-arming only marks the old heap entry dead: dead entries
    must never fire, equal expiries fire in arming order, and the list is
    compacted so 10,000 re-arms of 10 timers do not leave 10,000 entries."""
    fired = []
    timers = [aio_timer_new(ctx, QEMU_CLOCK_VIRTUAL, SCALE_NS, fired.append, i) for i in range(10)]
    base = vnow()
    for round_ in range(1000):
        for ts in timers:
            timer_mod_ns(ts, base + 1_000_000 + round_)
    tl = timers[0].timer_list
    assert len(tl._active) < 200, "dead entries were never compacted"
    timer_del(timers[3])
    for ts in timers:
        if ts is not timers[3]:
            timer_mod_ns(ts, base + 5_000)  # all equal: arming order decides
    qemu_clock_advance_virtual_time(base + 5_000)
    drain(ctx)
    assert fired == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert not any(timer_pending(ts) for ts in timers)
    assert not tl.has_timers()
    for ts in timers:
        timer_free(ts)
