# SPDX-License-Identifier: GPL-2.0-or-later
"""CoMutex, CoQueue, CoRwlock: the /locking/... cases of QEMU's
tests/unit/test-coroutine.c plus fairness, misuse and the Pythonic face.
Parametrized over both coroutine backends."""

from __future__ import annotations

import threading

import pytest

import pyaioctx.coroutine as C
from pyaioctx.coroutine import (
    CoMutex,
    CoQueue,
    CoroutineError,
    CoRwlock,
    NotInCoroutineError,
    qemu_co_enter_next,
    qemu_co_mutex_init,
    qemu_co_mutex_lock,
    qemu_co_mutex_unlock,
    qemu_co_queue_empty,
    qemu_co_queue_init,
    qemu_co_queue_next,
    qemu_co_queue_restart_all,
    qemu_co_queue_wait,
    qemu_co_rwlock_downgrade,
    qemu_co_rwlock_init,
    qemu_co_rwlock_rdlock,
    qemu_co_rwlock_unlock,
    qemu_co_rwlock_upgrade,
    qemu_co_rwlock_wrlock,
    qemu_coroutine_create,
    qemu_coroutine_enter,
    qemu_coroutine_yield,
)


def run(entry, opaque=None):
    co = qemu_coroutine_create(entry, opaque)
    qemu_coroutine_enter(co)
    return co


# --------------------------------------------------------------------------
# CoMutex

class _State:
    locked = False
    done = 0


def _do_test_co_mutex(entry, opaque):
    st = _State()
    c1 = qemu_coroutine_create(entry, (opaque, st))
    c2 = qemu_coroutine_create(entry, (opaque, st))
    qemu_coroutine_enter(c1)
    assert st.locked
    qemu_coroutine_enter(c2)
    # Unlock queues c2; it then starts automatically when c1 terminates.
    qemu_coroutine_enter(c1)
    assert st.done == 1
    assert st.locked
    qemu_coroutine_enter(c2)
    assert st.done == 2
    assert not st.locked


def _mutex_fn(arg):
    m, st = arg
    qemu_co_mutex_lock(m)
    assert not st.locked
    st.locked = True
    qemu_coroutine_yield()
    st.locked = False
    qemu_co_mutex_unlock(m)
    st.done += 1


def _lockable_fn(arg):
    m, st = arg
    with m:
        assert not st.locked
        st.locked = True
        qemu_coroutine_yield()
        st.locked = False
    st.done += 1


def test_co_mutex(co_backend):
    """/locking/co-mutex."""
    m = CoMutex()
    qemu_co_mutex_init(m)
    _do_test_co_mutex(_mutex_fn, m)
    assert not m.locked


def test_co_mutex_lockable(co_backend):
    """/locking/co-mutex/lockable: the same through ``with mutex:``."""
    m = CoMutex()
    _do_test_co_mutex(_lockable_fn, m)
    assert not m.locked


def test_co_mutex_fifo_fairness(co_backend):
    """Waiters get the mutex in arrival order, by direct hand-off: a
    coroutine arriving after an unlock does not barge ahead of waiters."""
    m = CoMutex()
    order = []

    def worker(name):
        m.lock()
        order.append(name)
        qemu_coroutine_yield()
        m.unlock()

    cos = {n: qemu_coroutine_create(worker, n) for n in "abcd"}
    for n in "abcd":
        qemu_coroutine_enter(cos[n])
    assert order == ["a"]
    qemu_coroutine_enter(cos["a"])  # unlock hands over to b, which runs next
    assert order == ["a", "b"] and m.holder is cos["b"]
    late = run(worker, "late")  # arrives now: queued behind c and d
    assert order == ["a", "b"]
    for n in "bcd":
        qemu_coroutine_enter(cos[n])
    qemu_coroutine_enter(late)
    assert order == ["a", "b", "c", "d", "late"]
    assert not m.locked and all(c.terminated for c in cos.values()) and late.terminated


def test_co_mutex_unlock_not_held_raises(co_backend):
    m = CoMutex()
    errors = []

    def bad_unlock(_):
        try:
            qemu_co_mutex_unlock(m)
        except CoroutineError as e:
            errors.append(str(e))

    run(bad_unlock)
    assert "does not hold" in errors[0] and "nobody" in errors[0]

    holder = run(lambda _: (m.lock(), qemu_coroutine_yield(), m.unlock()))
    run(bad_unlock)
    assert "held by coroutine" in errors[1]
    qemu_coroutine_enter(holder)
    assert not m.locked


def test_co_mutex_recursive_lock_raises(co_backend):
    m = CoMutex()
    errors = []

    def twice(_):
        with m:
            try:
                m.lock()
            except CoroutineError as e:
                errors.append(str(e))

    run(twice)
    assert "already holds" in errors[0] and not m.locked


def test_terminating_with_mutex_held_raises(co_backend):
    """QEMU asserts !locks_held at termination; we raise, naming the coroutine."""
    m = CoMutex()

    def leaky(_):
        m.lock()

    with pytest.raises(CoroutineError, match="coroutine .*leaky.* terminated holding 1 lock"):
        run(leaky)


# --------------------------------------------------------------------------
# Coroutine-only functions outside a coroutine

@pytest.mark.parametrize("fn,make", [
    (qemu_co_mutex_lock, CoMutex),
    (qemu_co_mutex_unlock, CoMutex),
    (qemu_co_queue_wait, CoQueue),
    (qemu_co_queue_next, CoQueue),
    (qemu_co_queue_restart_all, CoQueue),
    (qemu_co_rwlock_rdlock, CoRwlock),
    (qemu_co_rwlock_wrlock, CoRwlock),
    (qemu_co_rwlock_unlock, CoRwlock),
    (qemu_co_rwlock_upgrade, CoRwlock),
    (qemu_co_rwlock_downgrade, CoRwlock),
], ids=lambda x: getattr(x, "__name__", ""))
def test_coroutine_only_outside_coroutine_raises(fn, make):
    with pytest.raises(NotInCoroutineError, match=fn.__name__):
        fn(make())


@pytest.mark.parametrize("fn", [qemu_co_mutex_lock, qemu_co_queue_init, qemu_co_rwlock_init,
                                qemu_co_queue_empty])
def test_wrong_lock_type_raises(fn):
    with pytest.raises(TypeError, match="expected a Co"):
        fn(object())


def test_co_queue_wait_rejects_bad_lock(co_backend):
    errors = []

    def body(_):
        try:
            qemu_co_queue_wait(CoQueue(), 42)
        except TypeError as e:
            errors.append(str(e))

    run(body)
    assert "CoMutex" in errors[0]


# --------------------------------------------------------------------------
# CoQueue

def test_co_queue_next_and_restart_all(co_backend):
    q = CoQueue()
    qemu_co_queue_init(q)
    woke = []

    def waiter(n):
        qemu_co_queue_wait(q, None)
        woke.append(n)

    waiters = [run(waiter, i) for i in range(4)]
    assert not qemu_co_queue_empty(q) and len(q) == 4
    results = []

    def waker(_):
        results.append(qemu_co_queue_next(q))  # wakes 0 after we yield
        qemu_coroutine_yield()
        qemu_co_queue_restart_all(q)
        results.append(qemu_co_queue_next(q))

    w = run(waker)
    assert woke == [0] and results == [True]
    qemu_coroutine_enter(w)
    assert woke == [0, 1, 2, 3] and results == [True, False]
    assert q.empty() and all(c.terminated for c in waiters)


def test_co_queue_wait_releases_mutex(co_backend):
    """The lock passed to qemu_co_queue_wait is free while waiting and held
    again on return (the producer/consumer pattern)."""
    m = CoMutex()
    q = CoQueue()
    items = []
    got = []

    def consumer(_):
        with m:
            while not items:
                q.wait(m)
                assert m.holder is C.qemu_coroutine_self()
            got.append(items.pop(0))

    def producer(v):
        with m:
            items.append(v)
            q.next()

    c = run(consumer)
    assert not m.locked and not c.terminated
    run(producer, "x")
    assert got == ["x"] and c.terminated and not m.locked


def test_co_queue_wait_with_thread_lock(co_backend):
    """A plain thread lock (QEMU's QemuMutex) is a valid lockable too."""
    lk = threading.Lock()
    q = CoQueue()

    def body(_):
        lk.acquire()
        q.wait(lk)
        assert lk.locked()
        lk.release()

    co = run(body)
    assert not lk.locked()
    assert qemu_co_enter_next(q) is True
    assert co.terminated and qemu_co_enter_next(q) is False


# --------------------------------------------------------------------------
# CoRwlock

def test_co_rwlock_upgrade(co_backend):
    """/locking/co-rwlock/upgrade: an upgrading sole reader queues behind a
    waiting writer."""
    rw = CoRwlock()
    qemu_co_rwlock_init(rw)
    done = {}

    def yield_upgrade(_):
        qemu_co_rwlock_rdlock(rw)
        qemu_coroutine_yield()
        qemu_co_rwlock_upgrade(rw)
        qemu_co_rwlock_unlock(rw)
        done["c1"] = True

    def wrlock_yield(_):
        qemu_co_rwlock_wrlock(rw)
        qemu_coroutine_yield()
        qemu_co_rwlock_unlock(rw)
        done["c2"] = True

    c1 = qemu_coroutine_create(yield_upgrade, None)
    c2 = qemu_coroutine_create(wrlock_yield, None)
    qemu_coroutine_enter(c1)
    qemu_coroutine_enter(c2)
    qemu_coroutine_enter(c1)  # c1 now goes to sleep
    assert "c1" not in done
    qemu_coroutine_enter(c2)
    assert done == {"c1": True, "c2": True}
    assert rw.owners == 0


def test_co_rwlock_downgrade(co_backend):
    """/locking/co-rwlock/downgrade: no hang with readers and writers waiting
    behind a reader."""
    rw = CoRwlock()
    done = {}

    def rdlock_yield(_):
        qemu_co_rwlock_rdlock(rw)
        qemu_coroutine_yield()
        qemu_co_rwlock_unlock(rw)
        qemu_coroutine_yield()
        done["c1"] = True

    def wrlock_downgrade(_):
        qemu_co_rwlock_wrlock(rw)
        qemu_co_rwlock_downgrade(rw)
        qemu_co_rwlock_unlock(rw)
        done["c2"] = True

    def rdlock(_):
        qemu_co_rwlock_rdlock(rw)
        qemu_co_rwlock_unlock(rw)
        done["c3"] = True

    def wrlock(_):
        qemu_co_rwlock_wrlock(rw)
        qemu_co_rwlock_unlock(rw)
        done["c4"] = True

    cos = [qemu_coroutine_create(f, None) for f in (rdlock_yield, wrlock_downgrade, rdlock, wrlock)]
    for co in cos:
        qemu_coroutine_enter(co)
    qemu_coroutine_enter(cos[0])
    assert done == {"c2": True, "c3": True, "c4": True}
    qemu_coroutine_enter(cos[0])
    assert done["c1"] and rw.owners == 0


def test_co_rwlock_readers_share_writer_excludes(co_backend):
    rw = CoRwlock()
    log = []

    def reader(n):
        with rw.reader():
            log.append(f"r{n}+")
            qemu_coroutine_yield()
            log.append(f"r{n}-")

    def writer(_):
        with rw.writer():
            log.append("w+")
            log.append("w-")

    r1, r2 = run(reader, 1), run(reader, 2)
    w = run(writer)
    r3 = run(reader, 3)  # a writer is in line: r3 waits (fairness)
    assert log == ["r1+", "r2+"] and rw.owners == 2
    qemu_coroutine_enter(r1)
    qemu_coroutine_enter(r2)  # last reader out: writer in, then r3
    assert log == ["r1+", "r2+", "r1-", "r2-", "w+", "w-", "r3+"]
    qemu_coroutine_enter(r3)
    assert all(c.terminated for c in (r1, r2, w, r3)) and rw.owners == 0


def test_co_rwlock_misuse_raises(co_backend):
    rw = CoRwlock()
    errors = []

    def body(_):
        for fn in (qemu_co_rwlock_unlock, qemu_co_rwlock_upgrade, qemu_co_rwlock_downgrade):
            try:
                fn(rw)
            except CoroutineError as e:
                errors.append(str(e))

    run(body)
    assert len(errors) == 3 and "not locked" in errors[0]
    assert "not read-locked" in errors[1] and "not write-locked" in errors[2]
    assert not rw.mutex.locked
