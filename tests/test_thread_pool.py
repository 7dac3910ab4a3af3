# SPDX-License-Identifier: GPL-2.0-or-later
"""Tests for pyaioctx.thread_pool: QEMU's tests/unit/test-thread-pool.c, plus
nesting, shutdown, stress, error reporting and worker life-cycle cases.

The first six tests keep QEMU's names (/thread-pool/submit, ...) and its
bookkeeping: ``active`` counts outstanding callbacks; ``n`` is 0 (never
started), 1 (long job running), 3 (long job finished) or 4 (cancelled
before it started).
"""

from __future__ import annotations

import errno
import logging
import os
import random
import threading
import time
from typing import Any, Optional

import pytest

import pyaioctx.coroutine

from pyaioctx import (
    THREAD_ACTIVE,
    THREAD_DONE,
    THREAD_QUEUED,
    AioContext,
    BlockAIOCB,
    ThreadPool,
    ThreadState,
    aio_context_new,
    aio_context_unref,
    aio_get_thread_pool,
    aio_notify,
    aio_poll,
    bdrv_aio_cancel,
    bdrv_aio_cancel_async,
    qemu_get_current_aio_context,
    qemu_set_current_aio_context,
    thread_pool_free,
    thread_pool_new,
    thread_pool_submit,
    thread_pool_submit_aio,
    thread_pool_submit_co,
    thread_pool_update_params,
)
from pyaioctx.thread_pool import (THREAD_POOL_BATCH, thread_pool_set_batchable,
                                  thread_pool_set_sched_batch)

# QEMU's test sleeps 2 s in long_cb and waits 1 s for workers to start;
# scaled down to keep each test well under the per-test time budget.
LONG_JOB_S = 0.6
START_WAIT_S = 0.3

_atomic = threading.Lock()


class WorkerTestData:
    """QEMU's ``WorkerTestData``; ``n`` is changed with the atomic helpers."""

    __slots__ = ("aiocb", "n", "ret")

    def __init__(self) -> None:
        self.aiocb: Optional[BlockAIOCB] = None
        self.n = 0
        self.ret = -errno.EINPROGRESS

    def fetch_inc(self) -> int:
        with _atomic:
            old = self.n
            self.n = old + 1
            return old

    def cmpxchg(self, old: int, new: int) -> int:
        with _atomic:
            cur = self.n
            if cur == old:
                self.n = new
            return cur

    def or_(self, bits: int) -> None:
        with _atomic:
            self.n |= bits


class _State:
    active = 0


state = _State()


def worker_cb(data: WorkerTestData) -> int:
    return data.fetch_inc()


def long_cb(data: WorkerTestData) -> int:
    if data.cmpxchg(0, 1) == 0:
        time.sleep(LONG_JOB_S)
        data.or_(2)
    return 0


def done_cb(data: WorkerTestData, ret: int) -> None:
    assert data.ret in (-errno.EINPROGRESS, -errno.ECANCELED)
    data.ret = ret
    data.aiocb = None
    # Callbacks are serialized, so no need for atomic ops.
    state.active -= 1


def _worker_threads(ctx: AioContext) -> list[threading.Thread]:
    prefix = f"{ctx.name}/worker-"
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


def _wait_until(cond, timeout: float = 3.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _poll_until(ctx: AioContext, cond, timeout: float = 4.0, what: str = "condition") -> None:
    """aio_poll until cond(); a timer-free guard so a lost wake-up fails fast."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out polling for {what}")
        # Non-blocking polls with a short sleep when idle: never hangs.
        if not aio_poll(ctx, False):
            time.sleep(0.0005)


@pytest.fixture
def ctx():
    c = aio_context_new()
    prev = qemu_get_current_aio_context()
    # As QEMU's test: the pool's context is the current one.
    qemu_set_current_aio_context(c)
    try:
        yield c
    finally:
        qemu_set_current_aio_context(prev)
        if not c.closed:
            aio_context_unref(c)
    assert not _worker_threads(c), "worker threads survived aio_context_unref"


@pytest.fixture
def pool(ctx):
    return aio_get_thread_pool(ctx)


# --------------------------------------------------------------------------
# QEMU's tests/unit/test-thread-pool.c


def test_submit(ctx, pool):
    """/thread-pool/submit: fire-and-forget work runs."""
    data = WorkerTestData()
    thread_pool_submit(pool, worker_cb, data)
    while data.n == 0:
        aio_poll(ctx, True)
    assert data.n == 1


def test_submit_aio(ctx, pool):
    """/thread-pool/submit-aio: the callback gets the worker's return value,
    and never before the first wait."""
    data = WorkerTestData()
    data.aiocb = thread_pool_submit_aio(pool, worker_cb, data, done_cb, data)
    # The callbacks are not called until after the first wait.
    state.active = 1
    assert data.ret == -errno.EINPROGRESS
    while data.ret == -errno.EINPROGRESS:
        aio_poll(ctx, True)
    assert state.active == 0
    assert data.n == 1
    assert data.ret == 0


def test_submit_co(ctx, pool, co_backend):
    """/thread-pool/submit-co, on each coroutine backend: the coroutine
    yields until the work is done and gets the worker's return value."""
    co_api = pyaioctx.coroutine
    data = WorkerTestData()
    got: list[int] = []

    def co_test_cb(data: WorkerTestData) -> None:
        state.active = 1
        data.n = 0
        data.ret = -errno.EINPROGRESS
        got.append(thread_pool_submit_co(pool, worker_cb, data))
        # The test continues in test_submit_co, after qemu_coroutine_enter...
        assert data.n == 1
        data.ret = 0
        state.active -= 1
        # The test continues in test_submit_co, after aio_poll...

    co = co_api.qemu_coroutine_create(co_test_cb, data)
    co_api.qemu_coroutine_enter(co)
    # Back here once the worker has started.
    assert state.active == 1
    assert data.ret == -errno.EINPROGRESS
    # aio_poll will execute the rest of the coroutine.
    while data.ret == -errno.EINPROGRESS:
        aio_poll(ctx, True)
    # Back here after the coroutine has finished.
    assert state.active == 0
    assert data.ret == 0
    assert got == [0]  # worker_cb's return value (the old n)


def test_submit_co_returns_worker_value(ctx, pool, co_backend):
    """Contract detail 8: thread_pool_submit_co returns func's int."""
    co_api = pyaioctx.coroutine
    got: list[int] = []

    def entry(_: Any) -> None:
        got.append(thread_pool_submit_co(pool, lambda x: x * 3, 14))
        got.append(thread_pool_submit_co(pool, _raise, None))

    co_api.qemu_coroutine_enter(co_api.qemu_coroutine_create(entry, None))
    _poll_until(ctx, lambda: len(got) == 2, what="coroutine")
    assert got == [42, -errno.EIO]


def test_submit_co_outside_coroutine(pool):
    with pytest.raises(RuntimeError, match="coroutine"):
        thread_pool_submit_co(pool, worker_cb, WorkerTestData())


def test_submit_many(ctx, pool):
    """/thread-pool/submit-many: more work items than threads."""
    _submit_many(ctx, pool)


def _submit_many(ctx: AioContext, pool: ThreadPool) -> None:
    data = [WorkerTestData() for _ in range(100)]
    # Start more work items than there will be threads.
    for d in data:
        thread_pool_submit_aio(pool, worker_cb, d, done_cb, d)
    state.active = 100
    while state.active > 0:
        aio_poll(ctx, True)
    for d in data:
        assert d.n == 1
        assert d.ret == 0


def _do_test_cancel(ctx: AioContext, pool: ThreadPool, sync: bool) -> None:
    # Start more work items than there will be threads, to ensure the pool
    # is full.
    _submit_many(ctx, pool)

    # Start long running jobs, to ensure we can cancel some.
    data = [WorkerTestData() for _ in range(100)]
    for d in data:
        d.aiocb = thread_pool_submit_aio(pool, long_cb, d, done_cb, d)

    # Starting the threads may be left to a bottom half.  Let it run, but
    # do not waste too much time...
    state.active = 100
    aio_notify(ctx)
    aio_poll(ctx, False)

    # Wait some time for the threads to start, with some sanity testing on
    # the behaviour of the scheduler...
    assert state.active == 100
    time.sleep(START_WAIT_S)
    assert state.active > 50

    # Cancel the jobs that haven't been started yet.
    num_canceled = 0
    for d in data:
        if d.cmpxchg(0, 4) == 0:
            d.ret = -errno.ECANCELED
            if sync:
                bdrv_aio_cancel(d.aiocb)
            else:
                bdrv_aio_cancel_async(d.aiocb)
            num_canceled += 1
    assert state.active > 0
    assert num_canceled < 100

    for d in data:
        if d.aiocb is not None and d.n < 4:
            if sync:
                # Cancelling the others will be a blocking operation.
                bdrv_aio_cancel(d.aiocb)
            else:
                bdrv_aio_cancel_async(d.aiocb)

    # Finish execution and execute any remaining callbacks.
    while state.active > 0:
        aio_poll(ctx, True)
    assert state.active == 0
    for i, d in enumerate(data):
        assert d.aiocb is None
        assert d.n != 0, f"request {i}: callback not cancelled but never started"
        if d.n == 3:
            # Couldn't be cancelled asynchronously, must have completed.
            assert d.ret == 0
        elif d.n == 4:
            # Could be cancelled asynchronously, never started.
            assert d.ret == -errno.ECANCELED
        else:
            pytest.fail(f"request {i}: callback aborted while running (n={d.n})")


def test_cancel(ctx, pool):
    """/thread-pool/cancel: bdrv_aio_cancel blocks until the callback ran."""
    _do_test_cancel(ctx, pool, sync=True)


def test_cancel_async(ctx, pool):
    """/thread-pool/cancel-async: bdrv_aio_cancel_async returns at once."""
    _do_test_cancel(ctx, pool, sync=False)


# --------------------------------------------------------------------------
# Completion delivery


def test_callback_aio_poll_waits_for_sibling_completed_together(ctx, pool):
    """A callback that aio_polls for a request that completed at the same
    time sees it: the completion BH reschedules itself before each callback."""
    barrier = threading.Barrier(2)
    order: list[str] = []

    def work(_: Any) -> int:
        barrier.wait(timeout=3)
        return 0

    def cb(name: str, ret: int) -> None:
        order.append(name)
        if len(order) == 1:
            other = "b" if name == "a" else "a"
            # Non-blocking polls: without the re-arm this fails, not hangs.
            _poll_until(ctx, lambda: other in order, timeout=2,
                        what="the sibling's completion in a nested aio_poll")

    thread_pool_submit_aio(pool, work, None, cb, "a")
    thread_pool_submit_aio(pool, work, None, cb, "b")
    aio_poll(ctx, False)  # run the BH that starts the workers
    # Make sure both are DONE before the completion BH gets to run.
    _wait_until(lambda: pool._done and len(pool._done) == 2, what="both workers")
    _poll_until(ctx, lambda: len(order) == 2)
    assert sorted(order) == ["a", "b"]


def test_callback_aio_poll_waits_for_later_sibling(ctx, pool):
    """A callback may block in aio_poll until a request submitted earlier,
    still running, completes."""
    release = threading.Event()
    seen: list[str] = []

    def slow(_: Any) -> int:
        release.wait(3)
        return 7

    def slow_cb(_: Any, ret: int) -> None:
        seen.append(f"slow={ret}")

    def fast_cb(_: Any, ret: int) -> None:
        seen.append("fast")
        release.set()
        _poll_until(ctx, lambda: len(seen) == 2, what="the slow sibling")

    thread_pool_submit_aio(pool, slow, None, slow_cb, None)
    thread_pool_submit_aio(pool, lambda _: 0, None, fast_cb, None)
    _poll_until(ctx, lambda: len(seen) == 2)
    assert seen == ["fast", "slow=7"]


def test_callbacks_run_in_polling_thread(ctx, pool):
    """Contract detail 8: callbacks run in the thread that polls the context;
    workers are named threads."""
    where: list[tuple[int, str]] = []
    names: list[str] = []

    def work(_: Any) -> int:
        names.append(threading.current_thread().name)
        return 0

    for _ in range(10):
        thread_pool_submit_aio(pool, work, None, lambda o, r: where.append(
            (threading.get_ident(), threading.current_thread().name)), None)
    _poll_until(ctx, lambda: len(where) == 10)
    assert {w[0] for w in where} == {threading.get_ident()}
    assert all(n.startswith(f"{ctx.name}/worker-") for n in names)


def test_callback_exception_propagates_and_rest_still_delivered(ctx, pool):
    """An exception from a completion callback leaves aio_poll; the other
    completions are delivered by the next aio_poll, each exactly once."""
    got: list[int] = []
    barrier = threading.Barrier(3)

    def work(i: int) -> int:
        barrier.wait(timeout=3)
        return i

    def cb(i: int, ret: int) -> None:
        got.append(ret)
        if len(got) == 1:
            raise ValueError("boom")

    for i in range(3):
        thread_pool_submit_aio(pool, work, i, cb, i)
    aio_poll(ctx, False)  # run the BH that starts the workers
    _wait_until(lambda: len(pool._done) == 3, what="workers")
    with pytest.raises(ValueError, match="boom"):
        _poll_until(ctx, lambda: len(got) == 3)
    _poll_until(ctx, lambda: len(got) == 3)
    assert sorted(got) == [0, 1, 2]
    assert pool.in_flight == 0


# --------------------------------------------------------------------------
# Cancellation


def _blocked_pool(pool: ThreadPool, ctx: AioContext) -> threading.Event:
    """One worker, busy until the returned event is set."""
    pool.set_params(0, 1)
    gate = threading.Event()
    started = threading.Event()

    def blocker(_: Any) -> int:
        started.set()
        gate.wait(4)
        return 0

    thread_pool_submit_aio(pool, blocker, None, lambda o, r: None, None)
    _poll_until(ctx, started.is_set, what="the blocking worker")
    return gate


def test_cancel_async_never_calls_back_inside(ctx, pool):
    """bdrv_aio_cancel_async on a queued request returns at once; the
    callback runs later, in aio_poll, exactly once with -ECANCELED, and the
    function never runs.  Cancelling again changes nothing."""
    gate = _blocked_pool(pool, ctx)
    ran: list[int] = []
    calls: list[int] = []
    acb = thread_pool_submit_aio(pool, lambda x: ran.append(x) or 0, 1,
                                 lambda o, r: calls.append(r), None)
    assert acb.state is THREAD_QUEUED
    bdrv_aio_cancel_async(acb)
    assert calls == []
    assert acb.state is THREAD_DONE
    bdrv_aio_cancel_async(acb)
    assert calls == []
    _poll_until(ctx, lambda: calls)
    gate.set()
    _poll_until(ctx, lambda: pool.in_flight == 0)
    assert calls == [-errno.ECANCELED]
    assert ran == []
    # Cancelling a finished, released request is a no-op.
    bdrv_aio_cancel_async(acb)
    bdrv_aio_cancel(acb)
    assert calls == [-errno.ECANCELED]


def test_cancel_running_request_completes_normally(ctx, pool):
    """A running request is never interrupted: bdrv_aio_cancel waits for its
    real result."""
    go = threading.Event()
    started = threading.Event()
    calls: list[int] = []

    def work(_: Any) -> int:
        started.set()
        go.wait(3)
        return 5

    acb = thread_pool_submit_aio(pool, work, None, lambda o, r: calls.append(r), None)
    _poll_until(ctx, started.is_set)
    assert acb.state is THREAD_ACTIVE
    threading.Timer(0.05, go.set).start()
    bdrv_aio_cancel(acb)
    assert calls == [5]
    assert acb.refcnt == 0


def test_cancel_sync_of_queued_request(ctx, pool):
    gate = _blocked_pool(pool, ctx)
    calls: list[int] = []
    acb = thread_pool_submit_aio(pool, lambda _: 0, None, lambda o, r: calls.append(r), None)
    acb.cancel()  # Pythonic face of bdrv_aio_cancel
    assert calls == [-errno.ECANCELED]
    gate.set()
    _poll_until(ctx, lambda: pool.in_flight == 0)
    assert calls == [-errno.ECANCELED]


def test_stress_random_cancels_lose_and_duplicate_nothing(ctx, pool):
    """10,000 requests, a random third cancelled (sync or async) at random
    times: every callback runs exactly once; -ECANCELED only for requests
    whose function never ran, the real result for the others."""
    rng = random.Random(1234)
    n = 10_000
    ran = [0] * n
    calls = [0] * n
    rets: list[Optional[int]] = [None] * n
    acbs: list[Optional[BlockAIOCB]] = [None] * n

    def work(i: int) -> int:
        ran[i] += 1
        if i % 97 == 0:
            time.sleep(0.0005)
        return i & 0xFF

    def cb(i: int, ret: int) -> None:
        calls[i] += 1
        rets[i] = ret

    pool.set_params(0, 8)
    submitted = 0
    while submitted < n or pool.in_flight:
        for _ in range(rng.randint(1, 64)):
            if submitted < n:
                acbs[submitted] = thread_pool_submit_aio(pool, work, submitted, cb, submitted)
                submitted += 1
        for _ in range(rng.randint(0, 24)):
            j = rng.randrange(submitted)
            acb = acbs[j]
            if acb is not None:
                if rng.random() < 0.1:
                    bdrv_aio_cancel(acb)
                else:
                    bdrv_aio_cancel_async(acb)
        aio_poll(ctx, False)
    assert calls == [1] * n
    cancelled = 0
    for i in range(n):
        if rets[i] == -errno.ECANCELED:
            cancelled += 1
            assert ran[i] == 0, f"request {i} ran but reported -ECANCELED"
        else:
            assert ran[i] == 1 and rets[i] == i & 0xFF, f"request {i}: ran={ran[i]} ret={rets[i]}"
    assert 0 < cancelled < n
    assert pool.in_flight == 0


# --------------------------------------------------------------------------
# Worker errors


def _raise(_: Any) -> int:
    raise ZeroDivisionError("worker failed")


def test_worker_exception_is_eio_and_logged(ctx, pool, caplog):
    """A function that raises fails its request with -EIO and logs the
    traceback on the pyaioctx.thread_pool logger."""
    calls: list[int] = []
    with caplog.at_level(logging.ERROR, logger="pyaioctx.thread_pool"):
        thread_pool_submit_aio(pool, _raise, None, lambda o, r: calls.append(r), None)
        _poll_until(ctx, lambda: calls)
    assert calls == [-errno.EIO]
    recs = [r for r in caplog.records if r.name == "pyaioctx.thread_pool"]
    assert len(recs) == 1
    assert recs[0].exc_info and recs[0].exc_info[0] is ZeroDivisionError
    assert "_raise" in recs[0].getMessage()
    assert "ZeroDivisionError" in caplog.text and "worker failed" in caplog.text


def test_worker_non_int_return_is_einval_and_logged(ctx, pool, caplog):
    calls: list[int] = []
    with caplog.at_level(logging.ERROR, logger="pyaioctx.thread_pool"):
        thread_pool_submit_aio(pool, lambda _: "nope", None, lambda o, r: calls.append(r), None)
        thread_pool_submit_aio(pool, lambda _: None, None, lambda o, r: calls.append(r), None)
        _poll_until(ctx, lambda: len(calls) == 2)
    assert calls == [-errno.EINVAL, -errno.EINVAL]
    recs = [r for r in caplog.records if r.name == "pyaioctx.thread_pool"]
    assert len(recs) == 2
    assert all(r.exc_info and r.exc_info[0] is TypeError for r in recs)
    assert "returned str, expected int" in caplog.text


def test_worker_survives_exceptions(ctx, pool, caplog):
    """The worker that ran a failing function keeps serving requests."""
    pool.set_params(0, 1)
    calls: list[int] = []
    with caplog.at_level(logging.CRITICAL, logger="pyaioctx.thread_pool"):
        for i in range(5):
            thread_pool_submit_aio(pool, _raise if i % 2 else (lambda _: 0), None,
                                   lambda o, r: calls.append(r), None)
        _poll_until(ctx, lambda: len(calls) == 5)
    assert calls == [0, -errno.EIO, 0, -errno.EIO, 0]
    assert len(_worker_threads(ctx)) == 1


# --------------------------------------------------------------------------
# Life cycle and parameters


def test_pool_per_context_and_defaults(ctx, pool):
    assert aio_get_thread_pool(ctx) is pool
    assert ctx.thread_pool is pool
    assert pool.min_threads == 0 and pool.max_threads == 64
    assert pool.idle_timeout == 10.0
    other = aio_context_new()
    try:
        assert aio_get_thread_pool(other) is not pool
    finally:
        aio_context_unref(other)
    assert list(ThreadState) == [THREAD_QUEUED, THREAD_ACTIVE, THREAD_DONE]


def test_no_thread_before_work_and_spawned_from_bh(ctx, pool):
    """Like QEMU, the first worker is created by a BH in the home thread."""
    assert _worker_threads(ctx) == []
    calls: list[int] = []
    thread_pool_submit_aio(pool, lambda _: 0, None, lambda o, r: calls.append(r), None)
    time.sleep(0.05)
    assert _worker_threads(ctx) == []  # nobody polled yet
    _poll_until(ctx, lambda: calls)
    assert calls == [0]


def test_shutdown_with_queued_work(ctx, pool):
    """aio_context_unref with work queued and running waits for all of it
    (QEMU's thread_pool_free), runs every callback exactly once, and leaves
    no worker thread behind; the freed pool refuses new work."""
    pool.set_params(0, 2)
    calls = [0] * 50
    rets: list[Optional[int]] = [None] * 50

    def work(i: int) -> int:
        time.sleep(0.001)
        return i

    def cb(i: int, ret: int) -> None:
        calls[i] += 1
        rets[i] = ret

    for i in range(50):
        thread_pool_submit_aio(pool, work, i, cb, i)
    aio_poll(ctx, False)  # start the workers
    assert pool.in_flight > 0
    aio_context_unref(ctx)
    assert calls == [1] * 50
    assert rets == list(range(50))
    assert _worker_threads(ctx) == []
    assert pool.closed and ctx.thread_pool is None
    with pytest.raises(RuntimeError, match="freed"):
        thread_pool_submit_aio(pool, work, 0, cb, 0)


def test_thread_pool_new_and_free(ctx):
    p = thread_pool_new(ctx)
    calls: list[int] = []
    thread_pool_submit_aio(p, lambda _: 1, None, lambda o, r: calls.append(r), None)
    thread_pool_free(p)
    assert calls == [1]
    thread_pool_free(p)  # idempotent
    thread_pool_free(None)
    assert not [t for t in _worker_threads(ctx) if t.is_alive()]


def test_idle_workers_exit_after_timeout(ctx, pool):
    """Workers above min_threads exit after idle_timeout (QEMU: 10 s,
    shortened here), and none remains after unref."""
    pool.idle_timeout = 0.2
    barrier = threading.Barrier(6)
    calls: list[int] = []

    def work(_: Any) -> int:
        barrier.wait(timeout=3)
        return 0

    for _ in range(6):
        thread_pool_submit_aio(pool, work, None, lambda o, r: calls.append(r), None)
    _poll_until(ctx, lambda: len(calls) == 6)
    assert len(_worker_threads(ctx)) >= 6
    _wait_until(lambda: not _worker_threads(ctx), timeout=3, what="idle workers to exit")
    assert pool.cur_threads == 0
    # The pool still works after its workers left.
    thread_pool_submit_aio(pool, lambda _: 9, None, lambda o, r: calls.append(r), None)
    _poll_until(ctx, lambda: len(calls) == 7)
    assert calls[-1] == 9
    aio_context_unref(ctx)
    assert _worker_threads(ctx) == []


def test_min_threads_kept_alive(ctx, pool):
    """min_threads workers are started up front and survive the idle timeout."""
    pool.idle_timeout = 0.1
    pool.set_params(2, 64)
    _poll_until(ctx, lambda: len(_worker_threads(ctx)) == 2, what="min workers")
    barrier = threading.Barrier(5)
    calls: list[int] = []
    for _ in range(5):
        thread_pool_submit_aio(pool, lambda _: barrier.wait(timeout=3) * 0, None,
                               lambda o, r: calls.append(r), None)
    _poll_until(ctx, lambda: len(calls) == 5)
    _wait_until(lambda: len(_worker_threads(ctx)) == 2, what="extra workers to exit")
    time.sleep(0.4)  # several idle timeouts
    assert len(_worker_threads(ctx)) == 2
    assert pool.cur_threads == 2
    aio_context_unref(ctx)
    assert _worker_threads(ctx) == []


def test_update_params_from_context_attributes(ctx, pool):
    """thread_pool_update_params reads ctx.thread_pool_min/max; the pool
    never runs more than max_threads workers at once."""
    ctx.thread_pool_min = 0
    ctx.thread_pool_max = 2
    thread_pool_update_params(pool, ctx)
    assert (pool.min_threads, pool.max_threads) == (0, 2)
    lock = threading.Lock()
    running = [0, 0]  # now, peak
    calls: list[int] = []

    def work(_: Any) -> int:
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        time.sleep(0.005)
        with lock:
            running[0] -= 1
        return 0

    for _ in range(20):
        thread_pool_submit_aio(pool, work, None, lambda o, r: calls.append(r), None)
    _poll_until(ctx, lambda: len(calls) == 20)
    assert running[1] <= 2
    assert len(_worker_threads(ctx)) <= 2
    del ctx.thread_pool_min, ctx.thread_pool_max
    pool.update_params()
    assert (pool.min_threads, pool.max_threads) == (0, 64)


def test_lowering_max_threads_stops_idle_workers(ctx, pool):
    pool.idle_timeout = 5.0
    barrier = threading.Barrier(6)
    calls: list[int] = []
    for _ in range(6):
        thread_pool_submit_aio(pool, lambda _: barrier.wait(timeout=3) * 0, None,
                               lambda o, r: calls.append(r), None)
    _poll_until(ctx, lambda: len(calls) == 6)
    assert len(_worker_threads(ctx)) == 6
    pool.set_params(0, 2)
    _wait_until(lambda: len(_worker_threads(ctx)) <= 2, what="excess workers to exit")


@pytest.mark.parametrize("lo,hi,exc", [
    (-1, 4, ValueError), (5, 4, ValueError), (0, 0, ValueError),
    (1.5, 4, TypeError), (0, "64", TypeError), (True, 4, TypeError),
])
def test_bad_params(pool, lo, hi, exc):
    with pytest.raises(exc):
        pool.set_params(lo, hi)
    assert (pool.min_threads, pool.max_threads) == (0, 64)


def test_bad_types(ctx, pool):
    with pytest.raises(TypeError, match="ThreadPool"):
        thread_pool_submit_aio(object(), worker_cb, None, None, None)
    with pytest.raises(TypeError, match="callable"):
        thread_pool_submit_aio(pool, 42, None, None, None)
    with pytest.raises(TypeError, match="callable"):
        thread_pool_submit_aio(pool, worker_cb, None, "not a cb", None)
    with pytest.raises(TypeError, match="AioContext"):
        aio_get_thread_pool("ctx")
    with pytest.raises(TypeError, match="AioContext"):
        thread_pool_update_params(pool, None)
    assert pool.in_flight == 0


def test_pythonic_face(ctx, pool):
    calls: list[int] = []
    acb = pool.submit_aio(lambda x: x + 1, 1, lambda o, r: calls.append(r))
    pool.submit(lambda _: 0)
    _poll_until(ctx, lambda: pool.in_flight == 0)
    assert calls == [2]
    assert acb.ret == 2 and acb.refcnt == 0
    assert "ThreadPool" in repr(pool) and "ThreadPoolElement" in repr(acb)


def test_idle_timeout_validation(pool):
    for bad, exc in ((0, ValueError), (-1.0, ValueError), ("1", TypeError), (None, TypeError)):
        with pytest.raises(exc):
            pool.idle_timeout = bad
    pool.idle_timeout = 1
    assert pool.idle_timeout == 1.0


def test_freed_context_pool_is_replaced(ctx, pool):
    """Freeing a context's pool by hand detaches it; the next
    aio_get_thread_pool creates a fresh one, freed with the context."""
    pool.free()
    assert ctx.thread_pool is None
    again = aio_get_thread_pool(ctx)
    assert again is not pool and not again.closed
    calls: list[int] = []
    thread_pool_submit_aio(again, lambda _: 4, None, lambda o, r: calls.append(r), None)
    aio_context_unref(ctx)
    assert calls == [4] and again.closed


# --------------------------------------------------------------------------
# Batchable functions (thread_pool_set_batchable)

def _batchable_work(ev: threading.Event) -> int:
    ev.wait(5)
    return 7


thread_pool_set_batchable(_batchable_work)


def _plain_work(ev: threading.Event) -> int:
    ev.wait(5)
    return 7


@pytest.mark.parametrize("func,workers", [(_batchable_work, 4), (_plain_work, 8)])
def test_batchable_requests_share_workers(ctx, pool, func, workers):
    """Eight requests submitted at once: QEMU's policy creates a worker for
    each; batchable ones get one per pool.batch (2) queued requests."""
    assert pool.batch == THREAD_POOL_BATCH == 2
    ev = threading.Event()
    rets: list[int] = []
    for _ in range(8):
        thread_pool_submit_aio(pool, func, ev, lambda o, r: rets.append(r), None)
    assert pool.cur_threads == workers
    ev.set()
    _poll_until(ctx, lambda: len(rets) == 8)
    assert rets == [7] * 8 and pool.in_flight == 0


def test_batchable_request_not_stuck_behind_long_one(ctx, pool):
    """A worker that picks up a non-batchable request stops covering the
    batchable ones queued behind it: they get a worker of their own, so a
    long request waiting for a later batchable one cannot deadlock."""
    ev = threading.Event()
    order: list[str] = []
    thread_pool_submit_aio(pool, _plain_work, ev, lambda o, r: order.append("long"), None)
    setter = thread_pool_set_batchable(lambda e: (e.set(), 0)[1])
    thread_pool_submit_aio(pool, setter, ev, lambda o, r: order.append("short"), None)
    _poll_until(ctx, lambda: len(order) == 2)
    assert order.index("short") < order.index("long")


def test_set_batchable_rejects_non_callable():
    with pytest.raises(TypeError):
        thread_pool_set_batchable(3)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# pyaioctx extension: SCHED_BATCH workers


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="no SCHED_BATCH on this platform")
def test_sched_batch_applies_to_running_and_new_workers(ctx, pool):
    """thread_pool_set_sched_batch switches the policy of the workers that
    run now and of those started later; off restores SCHED_OTHER."""
    policies: list[int] = []
    tids: set[int] = set()
    gate = threading.Event()

    def record(_):
        policies.append(os.sched_getscheduler(0))
        tids.add(threading.get_native_id())
        gate.wait(5)  # hold the worker: the next request needs another
        return 0

    def run(n: int) -> None:
        del policies[:]
        gate.clear()
        for _ in range(n):
            thread_pool_submit(pool, record, None)
        _poll_until(ctx, lambda: len(policies) == n, what="requests")
        gate.set()

    run(4)
    assert set(policies) == {os.SCHED_OTHER}
    before = set(tids)
    thread_pool_set_sched_batch(pool, True)
    assert pool.sched_batch
    for t in _worker_threads(ctx):  # running workers, switched from outside
        assert os.sched_getscheduler(t.native_id) == os.SCHED_BATCH
    tids.clear()
    run(len(before) + 4)  # new workers start, and take the policy themselves
    assert tids - before
    assert set(policies) == {os.SCHED_BATCH}
    thread_pool_set_sched_batch(pool, False)
    run(8)
    assert set(policies) == {os.SCHED_OTHER}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the caller was never touched


def test_sched_batch_bad_input(pool):
    with pytest.raises(TypeError, match="expected a ThreadPool"):
        thread_pool_set_sched_batch(object(), True)  # type: ignore[arg-type]
