# SPDX-License-Identifier: GPL-2.0-or-later
"""Coroutines and the AioContext: the /aio/coroutine/... cases of QEMU's
tests/unit/test-aio.c, aio_co_schedule / aio_co_wake across threads and
from BHs, and qemu_co_sleep_ns.  Parametrized over both coroutine backends.
"""

from __future__ import annotations

import threading
import time

import pytest
from helpers import IOThread

import pyaioctx
from pyaioctx import _tls
import pyaioctx.coroutine as C
from pyaioctx import (
    QEMU_CLOCK_REALTIME,
    QEMU_CLOCK_VIRTUAL,
    CoMutex,
    CoroutineError,
    NotInCoroutineError,
    aio_bh_schedule_oneshot,
    aio_co_enter,
    aio_co_schedule,
    aio_co_wake,
    aio_context_new,
    aio_context_unref,
    aio_notify,
    aio_poll,
    qemu_clock_advance_virtual_time,
    qemu_clock_get_ns,
    qemu_co_sleep_ns,
    qemu_coroutine_create,
    qemu_coroutine_enter,
    qemu_coroutine_yield,
    qemu_get_current_aio_context,
    qemu_init_main_loop,
    qemu_set_current_aio_context,
)

WAIT_S = 5.0


@pytest.fixture
def ctx():
    return qemu_init_main_loop()


def poll_until(ctx, cond, timeout=WAIT_S):
    """aio_poll(ctx) until cond() holds; raise on timeout (never spin forever)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        aio_poll(ctx, False) or time.sleep(0.0005)


@pytest.fixture
def iothread():
    t = IOThread()
    yield t
    t.stop()


def wait_event(ev: threading.Event) -> None:
    if not ev.wait(WAIT_S):
        raise TimeoutError("event not set")


# --------------------------------------------------------------------------
# test-aio.c

def test_queue_chaining(co_backend, ctx):
    """/aio/coroutine/queue-chaining: two coroutines wake each other with
    aio_co_enter 25,000 times; the calls chain (co_queue_wakeup), never nest."""
    class Chain:
        other = None
        i = 0
        max = 25_000

    depth = []

    def chain(d):
        import inspect
        depth.append(len(inspect.stack(0)))
        d.i = 0
        while d.i < d.max:
            aio_co_enter(ctx, d.other)   # queue up the other coroutine...
            qemu_coroutine_yield()       # ...and give control to it
            d.i += 1

    data_a, data_b = Chain(), Chain()
    data_b.other = qemu_coroutine_create(chain, data_a)
    data_a.other = qemu_coroutine_create(chain, data_b)
    qemu_coroutine_enter(data_b.other)
    assert data_a.i == data_a.max
    assert data_b.i == data_b.max - 1
    # Allow the second coroutine to terminate
    qemu_coroutine_enter(data_a.other)
    assert data_b.i == data_b.max
    assert len(depth) == 2 and depth[0] == depth[1]


def test_worker_thread_co_enter(co_backend, ctx):
    """/aio/coroutine/worker-thread-co-enter: aio_co_enter from a worker
    thread (whose current context is not the main one) schedules the
    coroutine in the main context; it runs in the main (logical) thread."""
    main_lt = _tls.current()
    main_ident = threading.get_ident()
    seen = []

    def co_check_current_thread(_):
        seen.append((_tls.current() is main_lt, qemu_get_current_aio_context() is ctx,
                     threading.get_ident() == main_ident))

    co = qemu_coroutine_create(co_check_current_thread, None)
    worker = threading.Thread(target=aio_co_enter, args=(pyaioctx.qemu_get_aio_context(), co))
    worker.start()
    worker.join(WAIT_S)
    assert aio_poll(ctx, True)
    assert not aio_poll(ctx, False)
    # Same logical thread always; same OS thread with greenlet (the thread
    # backend runs every coroutine on a pooled thread of its own).
    assert seen == [(True, True, co_backend == "greenlet")]


def test_aio_co_schedule_into_iothread(co_backend, ctx, iothread):
    """aio_co_schedule from a plain thread runs the coroutine in the
    iothread; aio_co_wake from anywhere resumes it there (co.ctx)."""
    seen = []
    step = threading.Event()

    def body(_):
        seen.append((_tls.current() is iothread.lt, qemu_get_current_aio_context() is iothread.ctx))
        step.set()
        qemu_coroutine_yield()
        seen.append((_tls.current() is iothread.lt, qemu_get_current_aio_context() is iothread.ctx))
        step.set()

    co = qemu_coroutine_create(body, None)
    t = threading.Thread(target=aio_co_schedule, args=(iothread.ctx, co))
    t.start()
    t.join(WAIT_S)
    wait_event(step)
    step.clear()
    assert co.ctx is iothread.ctx
    for _ in range(200):  # wait until it has yielded
        if not co.entered:
            break
        time.sleep(0.005)
    aio_co_wake(co)  # from the main thread: scheduled in the iothread
    wait_event(step)
    for _ in range(200):
        if co.terminated:
            break
        time.sleep(0.005)
    assert seen == [(True, True), (True, True)] and co.terminated


def test_aio_co_wake_from_bh(co_backend, ctx):
    """A BH wakes a yielded coroutine with aio_co_wake (the completion
    pattern of every block driver)."""
    log = []

    def body(_):
        log.append("submit")
        aio_bh_schedule_oneshot(ctx, lambda co: (log.append("bh"), aio_co_wake(co)),
                                C.qemu_coroutine_self())
        qemu_coroutine_yield()
        log.append("completed")

    co = qemu_coroutine_create(body, None)
    qemu_coroutine_enter(co)
    assert log == ["submit"]
    assert aio_poll(ctx, True)
    assert log == ["submit", "bh", "completed"] and co.terminated


@pytest.mark.parametrize("pass_lt", [False, True], ids=["reads-lt", "lt-given"])
def test_engine_wake_matches_aio_co_wake(co_backend, ctx, pass_lt):
    """The I/O engines' completion wake (``if not qemu_coroutine_entered:
    aio_co_wake``, as one call): a coroutine that yields again, one that
    wakes another before yielding (that one runs next, before the BH's
    caller goes on), one that terminates, an entered coroutine (left
    alone), and a wake from inside a coroutine (queued until it yields).
    The same whether the wake reads the thread's state itself or is handed
    it, as a completion walk does."""
    from pyaioctx._tls import current
    from pyaioctx.coroutine._core import _wake_unless_entered as _wake
    lt = current() if pass_lt else None
    log = []

    def _wake_unless_entered(co):
        _wake(co, lt)

    def sleeper(name):
        log.append(f"{name} start")
        qemu_coroutine_yield()
        log.append(f"{name} woke")
        if name == "a":
            aio_co_enter(ctx, b)  # b runs as soon as a yields
            qemu_coroutine_yield()
            log.append("a again")
        elif name == "c":
            _wake(C.qemu_coroutine_self())  # entered: ignored
            _wake(d)  # from a coroutine: after c ends
            log.append("c ends")

    a, b, c, d = (qemu_coroutine_create(sleeper, n) for n in "abcd")
    for co in (a, b, c, d):
        qemu_coroutine_enter(co)
    del log[:]
    _wake_unless_entered(a)
    assert log == ["a woke", "b woke"] and not a.terminated and b.terminated
    _wake_unless_entered(a)
    assert log[2:] == ["a again"] and a.terminated
    _wake_unless_entered(c)
    assert log[3:] == ["c woke", "c ends", "d woke"] and c.terminated and d.terminated
    with pytest.raises(CoroutineError, match="terminated"):
        _wake_unless_entered(a)


def test_engine_wake_of_coroutine_last_entered_by_another(co_backend, ctx):
    """The engines' wake of a coroutine whose last enterer was another
    coroutine (with greenlet: its parent is that coroutine's greenlet, not
    the leader's): it runs, and its next yield comes back to the waker."""
    from pyaioctx.coroutine._core import _wake_unless_entered
    log = []

    def inner(_):
        log.append("inner start")
        qemu_coroutine_yield()
        log.append("inner woke")
        qemu_coroutine_yield()
        log.append("inner woke again")

    e = qemu_coroutine_create(inner, None)
    qemu_coroutine_enter(qemu_coroutine_create(lambda _: qemu_coroutine_enter(e), None))
    assert log == ["inner start"] and not e.terminated
    _wake_unless_entered(e)
    assert log == ["inner start", "inner woke"] and not e.entered
    _wake_unless_entered(e)
    assert log[2:] == ["inner woke again"] and e.terminated


def test_greenlet_here_names_the_loop_greenlet_or_false(co_backend, ctx, iothread):
    """The greenlet a completion loop runs in, for its inlined wakes: the
    calling greenlet, the same inside and outside a coroutine's own stack;
    False for the thread backend, for a thread without coroutine state, and
    for a loop outside the context's home thread."""
    from pyaioctx.coroutine._core import _greenlet_here
    lt = _tls.current()
    here = _greenlet_here(lt, ctx)
    if co_backend == "greenlet":
        import greenlet
        assert here is greenlet.getcurrent()
        inside = []
        qemu_coroutine_enter(qemu_coroutine_create(
            lambda _: inside.append(_greenlet_here(_tls.current(), ctx)), None))
        assert inside[0] is not here and inside[0] is not False
    else:
        assert here is False
    assert _greenlet_here(None, ctx) is False
    other = []
    iothread.run_bh(lambda: other.append(_greenlet_here(_tls.current(), ctx)))
    assert other == [False]


def test_engine_wake_from_other_thread_schedules(co_backend, ctx, iothread):
    """The engines' wake from a thread whose context is not the
    coroutine's schedules it there, as aio_co_wake does."""
    from pyaioctx.coroutine._core import _wake_unless_entered
    log = []

    def body(_):
        qemu_coroutine_yield()
        log.append(qemu_get_current_aio_context() is ctx)

    co = qemu_coroutine_create(body, None)
    qemu_coroutine_enter(co)
    iothread.run_bh(lambda: _wake_unless_entered(co))
    assert log == []
    poll_until(ctx, lambda: log)
    assert log == [True]


def test_aio_co_schedule_twice_raises(co_backend, ctx):
    co = qemu_coroutine_create(lambda _: None, None)
    aio_co_schedule(ctx, co)
    with pytest.raises(CoroutineError, match="already scheduled in 'aio_co_schedule'"):
        aio_co_schedule(ctx, co)
    with pytest.raises(CoroutineError, match="coroutine"):
        qemu_coroutine_enter(co)  # scheduled: entering it now would run it twice
    assert aio_poll(ctx, True)
    assert co.terminated


def test_aio_co_schedule_many_from_threads(co_backend, ctx):
    """Coroutines scheduled concurrently from several threads all run once,
    in the main thread."""
    ran = []
    main_lt = _tls.current()

    def body(n):
        assert _tls.current() is main_lt
        ran.append(n)

    cos = [qemu_coroutine_create(body, i) for i in range(200)]
    threads = [threading.Thread(target=lambda part: [aio_co_schedule(ctx, c) for c in part],
                                args=(cos[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    poll_until(ctx, lambda: len(ran) == 200)
    assert sorted(ran) == list(range(200))


def test_exception_out_of_aio_poll_keeps_rest_of_batch(co_backend, ctx):
    """A scheduled coroutine's exception propagates out of aio_poll; the
    coroutines scheduled with it still run on the next aio_poll."""
    ran = []

    def boom(_):
        raise OSError(5, "injected")

    cos = [qemu_coroutine_create(ran.append, 1), qemu_coroutine_create(boom, None),
           qemu_coroutine_create(ran.append, 2)]
    for co in cos:
        aio_co_schedule(ctx, co)
    with pytest.raises(OSError, match="injected"):
        aio_poll(ctx, True)
    assert ran == [1]
    poll_until(ctx, lambda: ran == [1, 2])


def test_aio_co_enter_other_context_schedules(co_backend, ctx, iothread):
    """aio_co_enter for another thread's context never runs the coroutine here."""
    ran = threading.Event()
    where = []

    def body(_):
        where.append(qemu_get_current_aio_context())
        ran.set()

    def starter(_):
        aio_co_enter(iothread.ctx, qemu_coroutine_create(body, None))
        where.append("starter done")

    qemu_coroutine_enter(qemu_coroutine_create(starter, None))
    wait_event(ran)
    # The iothread may run the coroutine before or after the starter goes
    # on; what matters is that it ran there, in the iothread's context.
    assert sorted(where, key=str) == sorted(["starter done", iothread.ctx], key=str)


def test_co_mutex_across_threads(co_backend, ctx, iothread):
    """A CoMutex shared by coroutines of two threads: mutual exclusion and
    hand-off through aio_co_wake -> aio_co_schedule."""
    m = CoMutex()
    inside = [0]
    counts = {"main": 0, "io": 0}
    done = threading.Event()
    n = 100

    def worker(who):
        for _ in range(n):
            with m:
                inside[0] += 1
                assert inside[0] == 1
                qemu_co_sleep_ns(QEMU_CLOCK_REALTIME, 0)  # yield with the lock held
                inside[0] -= 1
                counts[who] += 1
        if who == "io":
            done.set()

    aio_co_schedule(iothread.ctx, qemu_coroutine_create(worker, "io"))
    main_co = qemu_coroutine_create(worker, "main")
    qemu_coroutine_enter(main_co)
    poll_until(ctx, lambda: main_co.terminated)
    wait_event(done)
    assert counts == {"main": n, "io": n} and not m.locked


def test_aio_co_reschedule_self(co_backend, ctx, iothread):
    """aio_co_reschedule_self moves a not-yet-moved coroutine to the
    iothread (thread backend); greenlet refuses to change OS thread."""
    log = []
    done = threading.Event()

    def body(_):
        log.append(qemu_get_current_aio_context() is ctx)
        C.aio_co_reschedule_self(iothread.ctx)
        log.append(qemu_get_current_aio_context() is iothread.ctx)
        done.set()

    co = qemu_coroutine_create(body, None)
    qemu_coroutine_enter(co)
    aio_poll(ctx, True)  # the BH schedules it into the iothread
    if co_backend == "thread":
        wait_event(done)
        assert log == [True, True]
    else:
        for _ in range(400):
            if iothread.error is not None:
                break
            time.sleep(0.005)
        err, iothread.error = iothread.error, None
        assert isinstance(err, CoroutineError) and "thread" in str(err)
        assert log == [True]


# --------------------------------------------------------------------------
# qemu_co_sleep_ns

def test_co_sleep_virtual_clock(co_backend, ctx):
    """qemu_co_sleep_ns on QEMU_CLOCK_VIRTUAL wakes only when the virtual
    clock passes the deadline."""
    log = []

    def sleeper(_):
        log.append("sleep")
        qemu_co_sleep_ns(QEMU_CLOCK_VIRTUAL, 1_000_000)
        log.append("woke")

    co = qemu_coroutine_create(sleeper, None)
    qemu_coroutine_enter(co)
    assert log == ["sleep"]
    assert co.state == C.CoroutineState.SUSPENDED
    while aio_poll(ctx, False):
        pass
    assert log == ["sleep"]
    with pytest.raises(CoroutineError, match="scheduled in 'qemu_co_sleep_ns'"):
        qemu_coroutine_enter(co)  # a stray enter must not cut the sleep short
    now = qemu_clock_get_ns(QEMU_CLOCK_VIRTUAL)
    qemu_clock_advance_virtual_time(now + 999_999)
    aio_poll(ctx, False)
    assert log == ["sleep"]
    qemu_clock_advance_virtual_time(now + 1_000_000)
    assert aio_poll(ctx, False)
    assert log == ["sleep", "woke"] and co.terminated


def test_co_sleep_realtime_clock(co_backend, ctx):
    """qemu_co_sleep_ns on QEMU_CLOCK_REALTIME sleeps at least that long
    (generous bound: only the lower one is checked strictly)."""
    t = []

    def sleeper(_):
        t.append(time.monotonic())
        qemu_co_sleep_ns(QEMU_CLOCK_REALTIME, 20_000_000)
        t.append(time.monotonic())

    co = qemu_coroutine_create(sleeper, None)
    qemu_coroutine_enter(co)
    deadline = time.monotonic() + WAIT_S
    while not co.terminated:
        assert time.monotonic() < deadline
        aio_poll(ctx, True)
    assert 0.019 <= t[1] - t[0] < 2.0


def test_co_sleep_bad_input(co_backend, ctx):
    with pytest.raises(NotInCoroutineError, match="qemu_co_sleep_ns"):
        qemu_co_sleep_ns(QEMU_CLOCK_REALTIME, 1)
    errors = []

    def body(_):
        for args in ((QEMU_CLOCK_REALTIME, "1"), (QEMU_CLOCK_REALTIME, 1.5), (99, 1)):
            try:
                qemu_co_sleep_ns(*args)
            except (TypeError, ValueError) as e:
                errors.append(type(e).__name__)

    qemu_coroutine_enter(qemu_coroutine_create(body, None))
    assert len(errors) == 3


def test_co_sleep_wakeable(co_backend, ctx):
    """qemu_co_sleep_ns_wakeable + qemu_co_sleep_wake: an early wake-up."""
    w = C.QemuCoSleep()
    log = []

    def sleeper(_):
        C.qemu_co_sleep_ns_wakeable(w, QEMU_CLOCK_VIRTUAL, 10**15)
        log.append("woke")

    co = qemu_coroutine_create(sleeper, None)
    qemu_coroutine_enter(co)
    aio_bh_schedule_oneshot(ctx, lambda _: C.qemu_co_sleep_wake(w), None)
    aio_poll(ctx, True)
    assert log == ["woke"] and co.terminated
    C.qemu_co_sleep_wake(w)  # nobody sleeps: no-op
