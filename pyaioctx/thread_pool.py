# SPDX-License-Identifier: GPL-2.0-or-later
"""The worker thread pool: port of QEMU's util/thread-pool.c.

A pool belongs to one AioContext (``aio_get_thread_pool`` creates it lazily).
Work items are ``func(arg) -> int`` calls that run on worker threads; their
results come back through a bottom half, so every completion callback runs in
the thread that polls the pool's context, never in a worker and never inside
the function that submitted or cancelled the request.

Request life cycle (``ThreadState``)::

    QUEUED --(worker picks it up, under pool lock)--> ACTIVE --(worker)--> DONE
    QUEUED --(cancel, under pool lock)-------------------------------------> DONE

Only a request that is still queued can be cancelled; it then completes with
``-ECANCELED``.  A request that already runs is never interrupted and
completes with its real result.  Either way the callback runs exactly once.

Workers are created lazily, up to ``max_threads`` (default 64, as QEMU),
and above ``min_threads`` they exit after ``idle_timeout`` seconds without
work (QEMU: 10 s).  Like QEMU, the first worker of a burst is created from a
BH in the pool's home thread (``spawn_thread_bh_fn``); each new worker then
creates the next one, so the submitter never pays for thread creation in a
loop.

Where the Python port differs from QEMU, and why:

* Idle workers park on a lock of their own (a LIFO stack of parked workers)
  rather than on one condition variable.  ``threading.Condition`` allocates a
  lock on every ``wait()``; a per-worker lock allocates nothing, and waking
  the most recently parked worker lets the others reach their idle timeout.
* Requests of functions declared with :func:`thread_pool_set_batchable`
  (short, bounded, never waiting for another request: the file driver's
  reads and writes) do not each wake a worker.  Workers that were just woken
  or created, or that run such a request, will come back to the queue soon,
  so another worker is woken only when the queue holds more than
  ``pool.batch`` (THREAD_POOL_BATCH = 2) requests per such worker.  Under
  the GIL a wake-up costs the submitter a futex wake and a likely
  preemption while holding the GIL; QEMU's one wake-up per request made a
  fifth of the event loop's GIL time at queue depth 32.  Other requests
  keep QEMU's policy, and a worker that picks one up stops vouching for the
  batchable requests behind it (waking or creating a replacement), so a
  long request can never leave a batchable one stranded.
* A cancelled request is not unlinked from the request queue (a deque has
  no O(1) removal); it is marked DONE and a worker that pops it skips it.
* Finished requests are handed to the completion BH through a deque rather
  than found by walking the list of all requests, so completing n requests
  costs O(n), not O(n^2).  The BH still reschedules itself before each
  callback and cancels itself afterwards, exactly as QEMU does.
* ``thread_pool_free`` (run by the context's last ``aio_context_unref``)
  polls the context until every submitted request has called back instead of
  asserting that none is in flight; then it stops and joins every worker, so
  no thread the pool created outlives it.
* A worker function that raises fails its request with ``-EIO``; one that
  returns a non-int fails it with ``-EINVAL``.  Both are logged with a
  traceback on the ``pyaioctx.thread_pool`` logger.
"""

from __future__ import annotations

import collections
import enum
import errno
import itertools
import logging
import os
import threading
from typing import Any, Callable, Optional

from .aio import (
    BH_SCHEDULED,
    AioContext,
    aio_bh_new_full,
    aio_context_add_cleanup,
    aio_poll,
    qemu_bh_cancel,
    qemu_bh_delete,
    qemu_bh_schedule,
)
from .aiocb import AIOCBInfo, BlockAIOCB, BlockCompletionFunc
from ._tls import _local as _tls_local

__all__ = [
    "ThreadPool",
    "ThreadPoolElement",
    "ThreadPoolFunc",
    "ThreadState",
    "THREAD_QUEUED",
    "THREAD_ACTIVE",
    "THREAD_DONE",
    "THREAD_POOL_DEFAULT_MIN",
    "THREAD_POOL_DEFAULT_MAX",
    "THREAD_POOL_IDLE_TIMEOUT",
    "aio_get_thread_pool",
    "thread_pool_new",
    "thread_pool_free",
    "thread_pool_submit_aio",
    "thread_pool_submit_co",
    "thread_pool_submit",
    "thread_pool_update_params",
    "thread_pool_set_batchable",
    "thread_pool_set_sched_batch",
    "THREAD_POOL_BATCH",
]

log = logging.getLogger("pyaioctx.thread_pool")

ThreadPoolFunc = Callable[[Any], int]

#: QEMU's defaults for ``thread-pool-min`` / ``thread-pool-max``.
THREAD_POOL_DEFAULT_MIN = 0
THREAD_POOL_DEFAULT_MAX = 64
#: Seconds an idle worker above ``min_threads`` waits before exiting (QEMU: 10 s).
THREAD_POOL_IDLE_TIMEOUT = 10.0
#: Queued batchable requests per worker before another worker is woken
#: (see :func:`thread_pool_set_batchable`).
THREAD_POOL_BATCH = 2

# Functions registered with thread_pool_set_batchable.  Read without a lock
# on every submit; only ever grows.
_batchable: set = set()


def thread_pool_set_batchable(func: ThreadPoolFunc) -> ThreadPoolFunc:
    """Declare that ``func`` always returns after a short, bounded time and
    never waits for another request of any pool (a read or write of a local
    file is the example).  Returns func, so it can serve as a decorator.

    Requests of such functions are batched: a worker that is woken, new, or
    running one of them is trusted to come back to the queue soon, so a new
    batchable request wakes another worker only when the queue holds more
    than ``pool.batch`` requests per such worker.  QEMU wakes a worker for
    every request; under the GIL each wake-up of a parked thread costs the
    submitting thread a futex wake and usually a preemption *while it holds
    the GIL*, which measured as a fifth of the event loop's time at queue
    depth 32 (see benchmarks/RESULTS.md, "Thread pool").  Other functions
    keep QEMU's policy, so a request that blocks for long, or waits for a
    later request, still gets a worker of its own.
    """
    if not callable(func):
        raise TypeError(f"thread pool function must be callable, got {type(func).__name__}")
    _batchable.add(func)
    return func


class ThreadState(enum.IntEnum):
    """QEMU's ``enum ThreadState``.

    Moving a request out of QUEUED is protected by the pool lock (a worker
    taking it, or a cancel).  After that only the worker thread writes the
    state.  The worker writes ``ret`` before ``state``; the completion BH
    reads ``state`` before ``ret`` (QEMU's smp_wmb/smp_rmb pair -- under the
    GIL, program order is enough).
    """

    QUEUED = 0  # in the request queue, not picked up yet
    ACTIVE = 1  # a worker is running func(arg)
    DONE = 2  # ret is final; waiting for the completion BH


THREAD_QUEUED = ThreadState.QUEUED
THREAD_ACTIVE = ThreadState.ACTIVE
THREAD_DONE = ThreadState.DONE


class ThreadPoolElement(BlockAIOCB):
    """QEMU's ``ThreadPoolElement``: the AIOCB of one pool request.

    ``pool``, ``func``, ``arg``   set at submit, then read-only.
    ``state``, ``ret``            see ``ThreadState`` for who may write them.
    The BlockAIOCB fields (``cb``, ``opaque``, ``refcnt``) belong to the
    pool's home thread.
    """

    __slots__ = ("pool", "func", "arg", "state", "ret")

    def __init__(self, pool: "ThreadPool", func: ThreadPoolFunc, arg: Any,
                 cb: Optional[BlockCompletionFunc], opaque: Any) -> None:
        # BlockAIOCB.__init__ inlined: this runs once per request.
        self.aiocb_info = _thread_pool_aiocb_info
        self.bs = None
        self.cb = cb
        self.opaque = opaque
        self.refcnt = 1
        self.pool = pool
        self.func = func
        self.arg = arg
        self.state = THREAD_QUEUED
        self.ret = -errno.EINPROGRESS

    def __repr__(self) -> str:
        return (f"<ThreadPoolElement {_func_name(self.func)} "
                f"{ThreadState(self.state).name} ret={self.ret}>")


def _func_name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or repr(func)


class _Worker:
    """A worker thread's parking spot.

    ``wake`` is held while the worker runs; a parked worker blocks acquiring
    it, and whoever pops the worker off ``pool._idle`` releases it -- always
    under the pool lock, so a worker that timed out and then finds itself
    popped can take the pending wake-up without blocking.
    """

    __slots__ = ("wake", "thread")

    def __init__(self) -> None:
        self.wake = threading.Lock()
        self.wake.acquire()
        self.thread: Optional[threading.Thread] = None


class ThreadPool:
    """QEMU's ``ThreadPool``.  Create with :func:`aio_get_thread_pool`.

    Fields and who may touch them:

    ``ctx``, ``completion_bh``, ``new_thread_bh``  fixed at creation.
    ``_lock``           the pool lock (QEMU's ``pool->lock``).
    ``_requests``       queued requests (may hold cancelled ones, which
                        workers skip); under ``_lock``.
    ``_idle``           parked workers, most recent last; under ``_lock``.
    ``cur_threads``     workers that exist or are about to; under ``_lock``.
    ``new_threads``     backlog of workers still to create; under ``_lock``.
    ``pending_threads`` created but not running yet; under ``_lock``.
    ``_cover``          workers that will look at the queue soon: woken or
                        created and not parked since, or running a
                        batchable request; under ``_lock``.
    ``batch``           queued batchable requests per ``_cover`` worker
                        before another worker is woken; read under
                        ``_lock``.
    ``min_threads``, ``max_threads``  under ``_lock``.
    ``_threads``        every worker thread started and not yet joined;
                        under ``_lock``.
    ``_submitted``      requests submitted; under ``_lock``.
    ``_completed``      requests whose completion the BH delivered; home
                        thread only.  In flight = submitted - completed.
    ``_done``           finished requests not yet delivered: workers and
                        cancel append (deque.append is atomic), only the
                        completion BH pops.
    ``_idle_timeout``   seconds (``idle_timeout``); any thread, read when a
                        worker parks.
    ``closed``          set by thread_pool_free; home thread.
    """

    def __init__(self, ctx: AioContext) -> None:
        if not isinstance(ctx, AioContext):
            raise TypeError(f"expected an AioContext, got {type(ctx).__name__}")
        self.ctx = ctx
        self.name = f"{ctx.name}/thread-pool"
        self._lock = threading.Lock()
        self._worker_stopped = threading.Condition(self._lock)
        self._requests: collections.deque[ThreadPoolElement] = collections.deque()
        self._idle: list[_Worker] = []
        self._done: collections.deque[ThreadPoolElement] = collections.deque()
        self._threads: set[threading.Thread] = set()
        self._thread_ids = itertools.count(1)
        self.cur_threads = 0
        self._cover = 0
        self.batch = THREAD_POOL_BATCH
        self.new_threads = 0
        self.pending_threads = 0
        self.min_threads = THREAD_POOL_DEFAULT_MIN
        self.max_threads = THREAD_POOL_DEFAULT_MAX
        self._submitted = 0
        self._completed = 0
        self._idle_timeout = THREAD_POOL_IDLE_TIMEOUT
        # Workers run under SCHED_BATCH (thread_pool_set_sched_batch).
        # Written under the lock; a starting worker reads it once.
        self.sched_batch = False
        self._sched_set = False  # thread_pool_set_sched_batch was ever called
        self.closed = False
        self.completion_bh = aio_bh_new_full(ctx, _thread_pool_completion_bh, self,
                                             "thread_pool_completion_bh")
        self.new_thread_bh = aio_bh_new_full(ctx, _spawn_thread_bh_fn, self,
                                             "spawn_thread_bh_fn")

    @property
    def idle_timeout(self) -> float:
        """Seconds an idle worker above ``min_threads`` waits for work before
        exiting (QEMU hard-codes 10 s).  A new value applies from the next
        time a worker goes idle."""
        return self._idle_timeout

    @idle_timeout.setter
    def idle_timeout(self, seconds: float) -> None:
        if seconds.__class__ is bool or not isinstance(seconds, (int, float)):
            raise TypeError(f"idle_timeout must be a number of seconds, got {type(seconds).__name__}")
        if not seconds > 0:
            raise ValueError(f"idle_timeout must be > 0 seconds, got {seconds!r}")
        self._idle_timeout = float(seconds)

    # Introspection ------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """Requests submitted whose completion callback has not run yet."""
        return self._submitted - self._completed

    @property
    def idle_threads(self) -> int:
        """Workers currently parked waiting for work."""
        return len(self._idle)

    # Pythonic face ------------------------------------------------------
    def submit_aio(self, func: ThreadPoolFunc, arg: Any = None,
                   cb: Optional[BlockCompletionFunc] = None,
                   opaque: Any = None) -> ThreadPoolElement:
        return thread_pool_submit_aio(self, func, arg, cb, opaque)

    def submit(self, func: ThreadPoolFunc, arg: Any = None) -> None:
        thread_pool_submit(self, func, arg)

    def submit_co(self, func: ThreadPoolFunc, arg: Any = None) -> int:
        return thread_pool_submit_co(self, func, arg)

    def set_params(self, min_threads: int, max_threads: int) -> None:
        """Set the worker limits directly (no QEMU equivalent; see
        :func:`thread_pool_update_params` for the QEMU-style call)."""
        _set_params(self, min_threads, max_threads)

    def update_params(self, ctx: Optional[AioContext] = None) -> None:
        thread_pool_update_params(self, ctx if ctx is not None else self.ctx)

    def free(self) -> None:
        thread_pool_free(self)

    def __repr__(self) -> str:
        state = "closed" if self.closed else (
            f"threads={self.cur_threads} idle={len(self._idle)} "
            f"in_flight={self.in_flight}")
        return f"<ThreadPool {self.name!r} {state}>"


# --------------------------------------------------------------------------
# Workers

def _set_sched_batch(tid: int, on: bool) -> None:
    # tid 0 is the calling thread; on Linux the policy is per thread.
    os.sched_setscheduler(tid, os.SCHED_BATCH if on else os.SCHED_OTHER, os.sched_param(0))


def thread_pool_set_sched_batch(pool: ThreadPool, on: bool) -> None:
    """Run ``pool``'s worker threads under Linux's ``SCHED_BATCH`` policy
    (``on``) or the default ``SCHED_OTHER``.  A pyaioctx extension: QEMU has
    no such setting, because its workers do not share a lock with the event
    loop.

    Why: a worker whose I/O finished is woken by the kernel and, under
    ``SCHED_OTHER``, often preempts the event-loop thread on its CPU -- only
    to find the GIL held and block again, so each request costs extra
    context switches.  ``SCHED_BATCH`` (same priority, no wake-up
    preemption) lets the event loop run until it blocks, and the woken
    workers then take the GIL one after another.  Measured with every
    thread on one CPU (``pyaioctx bench --affinity auto``): 2.5 context
    switches per request became 1.5, and ``-i threads -t none`` ran 10-25 %
    faster at depth 32 and 128.  It does not change priorities, so it
    cannot starve other threads.

    Applies at once to running workers and to workers started later.
    Raises OSError (ENOTSUP) where the platform has no SCHED_BATCH.
    """
    if not isinstance(pool, ThreadPool):
        raise TypeError(f"thread_pool_set_sched_batch: expected a ThreadPool, got "
                        f"{type(pool).__name__}")
    if not hasattr(os, "SCHED_BATCH") or not hasattr(os, "sched_setscheduler"):
        raise OSError(errno.ENOTSUP, "thread_pool_set_sched_batch: SCHED_BATCH is not "
                      "available on this platform")
    on = bool(on)
    with pool._lock:
        pool.sched_batch = on
        pool._sched_set = True
        threads = [t for t in pool._threads if t.is_alive()]
    for t in threads:
        tid = t.native_id
        if tid is not None:
            try:
                _set_sched_batch(tid, on)
            except ProcessLookupError:
                pass  # the worker exited meanwhile


def _worker_thread(pool: ThreadPool, me: _Worker) -> None:
    """Port of ``worker_thread``: run queued requests until told to exit."""
    lock = pool._lock
    requests = pool._requests
    idle = pool._idle
    done = pool._done
    bh = pool.completion_bh
    wake = me.wake
    queued = THREAD_QUEUED
    active = THREAD_ACTIVE
    finished = THREAD_DONE
    batchable = _batchable
    batch = pool.batch
    # Whether this worker counts in pool._cover: it was just woken or
    # created, or it runs a batchable request, so it will look at the queue
    # again soon.  Only this thread changes it, under the pool lock.
    cover = True

    lock.acquire()
    if pool._sched_set:
        # Read under the lock: see thread_pool_set_sched_batch.  Also when
        # it is off again: a worker started by a SCHED_BATCH worker
        # inherited that policy.
        try:
            _set_sched_batch(0, pool.sched_batch)
        except OSError:  # pragma: no cover - checked by thread_pool_set_sched_batch
            log.warning("%s: cannot set a worker's scheduling policy", pool.name, exc_info=True)
    pool.pending_threads -= 1
    t = _do_spawn_thread(pool)
    if t is not None:
        lock.release()
        _start_thread(pool, t)
        lock.acquire()

    while pool.cur_threads <= pool.max_threads:
        if not requests:
            if cover:
                pool._cover -= 1
            idle.append(me)
            lock.release()
            woken = wake.acquire(True, pool._idle_timeout)
            lock.acquire()
            # Whoever popped us off pool._idle counted us in pool._cover.
            cover = True
            if not woken:
                try:
                    idle.remove(me)
                except ValueError:
                    # Popped (and released) by a waker between our timeout
                    # and retaking the lock: take that wake-up, keep going.
                    wake.acquire()
                else:
                    cover = False
                    if not requests and pool.cur_threads > pool.min_threads:
                        # Timed out + no work to do + no need for warm
                        # threads = exit.
                        break
            # Even if there was some work to do, check that there are not
            # too many worker threads before picking it up.
            continue

        req = requests.popleft()
        if req.state is not queued:
            continue  # cancelled while queued; already handed to the BH
        req.state = active
        if req.func in batchable:
            if not cover:
                pool._cover += 1
                cover = True
        elif cover:
            # A request of unknown length: this worker may not come back
            # soon, so it stops vouching for the batchable requests queued
            # behind it.  Wake a replacement if they are now uncovered.
            pool._cover -= 1
            cover = False
            if requests and len(requests) > batch * pool._cover:
                if idle:
                    pool._cover += 1
                    idle.pop().wake.release()
                elif pool.cur_threads < pool.max_threads:
                    _spawn_thread(pool)
        lock.release()

        try:
            ret = req.func(req.arg)
            if ret.__class__ is not int and not isinstance(ret, int):
                ret = _bad_return(req, ret)
        except BaseException:
            ret = _worker_exception(req)

        req.ret = ret  # write ret before state
        req.state = finished
        done.append(req)
        # The BH, once dequeued for running, drains _done until it is empty
        # *after* cancelling itself; so if it is still marked SCHEDULED it
        # has yet to reach that final check and will see this request.
        # Skipping the redundant schedule spares a lock and an eventfd write.
        if not bh.flags & BH_SCHEDULED:
            qemu_bh_schedule(bh)
        lock.acquire()

    pool.cur_threads -= 1
    if cover:
        pool._cover -= 1
    pool._worker_stopped.notify_all()
    # Wake another worker, in case we consumed a wake-up but decided to exit
    # because cur_threads > max_threads.
    if requests and idle:
        pool._cover += 1
        idle.pop().wake.release()
    lock.release()


def _worker_exception(req: ThreadPoolElement) -> int:
    log.error("thread pool function %s raised; the request fails with -EIO",
              _func_name(req.func), exc_info=True)
    return -errno.EIO


def _bad_return(req: ThreadPoolElement, ret: Any) -> int:
    try:
        raise TypeError(f"thread pool function {_func_name(req.func)} returned "
                        f"{type(ret).__name__}, expected int")
    except TypeError:
        log.error("%s; the request fails with -EINVAL", _func_name(req.func),
                  exc_info=True)
    return -errno.EINVAL


def _do_spawn_thread(pool: ThreadPool) -> Optional[threading.Thread]:
    """Port of ``do_spawn_thread``.  Runs with the pool lock taken.

    Returns the thread to start once the lock is dropped (Thread.start waits
    for the new thread to come up, which need not happen under the lock).
    """
    if not pool.new_threads:
        return None
    pool.new_threads -= 1
    pool.pending_threads += 1
    me = _Worker()
    t = threading.Thread(target=_worker_thread, args=(pool, me),
                         name=f"{pool.ctx.name}/worker-{next(pool._thread_ids)}",
                         daemon=True)
    me.thread = t
    # Forget workers that have exited on their own (idle timeout); the
    # others are joined by thread_pool_free.
    threads = pool._threads
    if len(threads) > 2 * pool.cur_threads + 8:
        for old in [x for x in threads if not x.is_alive()]:
            threads.discard(old)
    threads.add(t)
    return t


def _start_thread(pool: ThreadPool, t: threading.Thread) -> None:
    try:
        t.start()
    except BaseException:
        # Could not create the OS thread: undo its accounting so the pool
        # does not wait for a worker that will never exist.
        with pool._lock:
            pool.pending_threads -= 1
            pool.cur_threads -= 1
            pool._cover -= 1
            pool._threads.discard(t)
            pool._worker_stopped.notify_all()
        log.error("%s: cannot start a worker thread", pool.name, exc_info=True)


def _spawn_thread_bh_fn(pool: ThreadPool) -> None:
    """Port of ``spawn_thread_bh_fn``: create a worker from the home thread."""
    with pool._lock:
        t = _do_spawn_thread(pool)
    if t is not None:
        _start_thread(pool, t)


def _spawn_thread(pool: ThreadPool) -> None:
    """Port of ``spawn_thread``.  Runs with the pool lock taken."""
    pool.cur_threads += 1
    pool._cover += 1
    pool.new_threads += 1
    # If there are threads being created, they will spawn new workers, so we
    # don't spend time creating many threads in a loop holding a mutex.  If
    # there are none, ask the home thread to create one (QEMU does this so
    # the worker inherits the main thread's affinity, not a vcpu's).
    if not pool.pending_threads:
        qemu_bh_schedule(pool.new_thread_bh)


# --------------------------------------------------------------------------
# Completion and cancellation

def _thread_pool_completion_bh(pool: ThreadPool) -> None:
    """Port of ``thread_pool_completion_bh``: deliver finished requests."""
    done = pool._done
    bh = pool.completion_bh
    lt = None  # this thread's coroutine state, read at the first coroutine wake
    while done:
        while done:
            elem = done.popleft()
            pool._completed += 1
            cb = elem.cb
            if cb is None:
                elem.refcnt -= 1
                continue
            # Be scheduled while cb() runs, in case it calls aio_poll() to
            # wait for another request that completed at the same time.
            # QEMU schedules before and cancels after every callback; here
            # the BH stays scheduled from one callback to the next, and is
            # scheduled again only if a nested aio_poll ran it meanwhile
            # (only this thread clears the flag, so reading it without the
            # lock cannot miss that).
            if not bh.flags & BH_SCHEDULED:
                qemu_bh_schedule(bh)
            if cb is _thread_pool_co_cb and elem.opaque.caller is None:
                # _thread_pool_co_cb's usual case, inlined, with this
                # thread's state read once for all the coroutines this BH
                # wakes.
                if lt is None:
                    lt = getattr(_tls_local, "lt", None)
                try:
                    _co_api[2](elem.opaque, lt)  # type: ignore[index]
                finally:
                    elem.refcnt -= 1
                continue
            try:
                cb(elem.opaque, elem.ret)
            except BaseException:
                # The BH stays scheduled, so the rest is delivered by the
                # next aio_bh_poll; the exception propagates out of aio_poll.
                elem.refcnt -= 1
                raise
            elem.refcnt -= 1
        # We can safely cancel the completion BH here regardless of someone
        # else having scheduled it meanwhile, because we check the queue
        # once more anyway (QEMU: goto restart) -- and a worker that saw it
        # scheduled had queued its request before looking.
        qemu_bh_cancel(bh)


def _thread_pool_cancel(acb: BlockAIOCB) -> None:
    """Port of ``thread_pool_cancel`` (the AIOCBInfo ``cancel_async``).

    Only a request that has not started can be cancelled; it completes with
    -ECANCELED through the completion BH (never from inside this call).
    """
    elem: ThreadPoolElement = acb  # type: ignore[assignment]
    pool = elem.pool
    with pool._lock:
        if elem.state is THREAD_QUEUED:
            # Left in pool._requests; the worker that pops it skips it.
            elem.ret = -errno.ECANCELED
            elem.state = THREAD_DONE
            pool._done.append(elem)
            qemu_bh_schedule(pool.completion_bh)


def _thread_pool_get_aio_context(acb: BlockAIOCB) -> AioContext:
    return acb.pool.ctx  # type: ignore[attr-defined]


_thread_pool_aiocb_info = AIOCBInfo(ThreadPoolElement, cancel_async=_thread_pool_cancel,
                                    get_aio_context=_thread_pool_get_aio_context,
                                    name="thread-pool")


# --------------------------------------------------------------------------
# Submission

def _check_pool(pool: object) -> ThreadPool:
    if not isinstance(pool, ThreadPool):
        raise TypeError(f"expected a ThreadPool, got {type(pool).__name__}")
    if pool.closed:
        raise RuntimeError(f"{pool!r}: the thread pool has been freed")
    return pool


def thread_pool_submit_aio(pool: ThreadPool, func: ThreadPoolFunc, arg: Any,
                           cb: Optional[BlockCompletionFunc],
                           opaque: Any = None) -> ThreadPoolElement:
    """Port of ``thread_pool_submit_aio``: run ``func(arg)`` on a worker.

    ``cb(opaque, ret)`` runs once, later, in the thread that polls the
    pool's context: ``ret`` is func's return value, ``-ECANCELED`` if the
    request was cancelled before it started, ``-EIO`` if func raised,
    ``-EINVAL`` if it returned a non-int.  Call it from the pool's home
    thread (QEMU asserts this; here it is the caller's duty).  Raises
    TypeError for a non-callable func/cb and RuntimeError on a freed pool.
    """
    if pool.__class__ is not ThreadPool or pool.closed:
        _check_pool(pool)
    if not callable(func):
        raise TypeError(f"thread pool function must be callable, got {type(func).__name__}")
    if cb is not None and not callable(cb):
        raise TypeError(f"completion callback must be callable or None, got {type(cb).__name__}")
    req = ThreadPoolElement(pool, func, arg, cb, opaque)
    lock = pool._lock
    lock.acquire()
    pool._submitted += 1
    requests = pool._requests
    requests.append(req)
    # QEMU wakes (or creates) a worker for every request.  A batchable
    # request only gets one if the workers that will look at the queue soon
    # (woken, new, or running batchable requests) have more than ``batch``
    # queued requests each; see ThreadPool.batch for why.
    if func not in _batchable or len(requests) > pool.batch * pool._cover:
        idle = pool._idle
        if idle:
            pool._cover += 1
            idle.pop().wake.release()
        elif pool.cur_threads < pool.max_threads:
            _spawn_thread(pool)
    lock.release()
    return req


def thread_pool_submit(pool: ThreadPool, func: ThreadPoolFunc, arg: Any = None) -> None:
    """Port of ``thread_pool_submit``: fire and forget (no callback)."""
    thread_pool_submit_aio(pool, func, arg, None, None)


_co_api: Optional[tuple] = None


def _coroutine_api() -> tuple:
    global _co_api
    if _co_api is None:
        # Imported lazily: the coroutine package imports the event loop,
        # and the pool must not force a coroutine backend to load.
        from .coroutine import aio_co_wake
        from .coroutine._core import _lt_and_self, _wake_unless_entered, _yield_running
        _co_api = (_yield_running, aio_co_wake, _wake_unless_entered, _lt_and_self)
    return _co_api


def _thread_pool_co_cb(co: Any, ret: int) -> None:
    """Port of ``thread_pool_co_cb``.  ret stays in the element itself."""
    if co.caller is None:
        # aio_co_wake of a coroutine that is not entered: the coroutine
        # package's one-call form of it.
        _co_api[2](co)  # type: ignore[index]
    else:
        # Entered (its context is another thread's, where it has not
        # yielded yet): aio_co_wake schedules it there.
        _co_api[1](co)  # type: ignore[index]


def thread_pool_submit_co(pool: ThreadPool, func: ThreadPoolFunc, arg: Any = None) -> int:
    """Port of ``thread_pool_submit_co``: run func(arg) on a worker, yield
    until it is done, and return its result (or ``-errno`` as for
    :func:`thread_pool_submit_aio`).  Coroutine only: RuntimeError outside
    one (NotInCoroutineError).
    """
    co_yield, _, _, lt_and_self = _co_api or _coroutine_api()
    lt, co = lt_and_self("thread_pool_submit_co")
    req = thread_pool_submit_aio(pool, func, arg, _thread_pool_co_cb, co)
    co_yield(lt, co)  # qemu_coroutine_yield, with this thread's state and co in hand
    return req.ret


# --------------------------------------------------------------------------
# Parameters and life cycle

def _set_params(pool: ThreadPool, min_threads: Any, max_threads: Any) -> None:
    for what, v in (("min", min_threads), ("max", max_threads)):
        if v.__class__ is bool or not isinstance(v, int):
            raise TypeError(f"thread pool {what} must be an int, got {type(v).__name__}")
    if min_threads < 0:
        raise ValueError(f"thread pool min must be >= 0, got {min_threads}")
    if max_threads < 1:
        raise ValueError(f"thread pool max must be >= 1, got {max_threads}")
    if min_threads > max_threads:
        raise ValueError(f"thread pool min ({min_threads}) must not exceed "
                         f"max ({max_threads})")
    _check_pool(pool)
    with pool._lock:
        pool.min_threads = min_threads
        pool.max_threads = max_threads
        # We either have to:
        #  - increase the number of threads until over min_threads, or
        #  - wake workers so that they exit, until under max_threads, or
        #  - do nothing: the pool manages itself between the two.
        for _ in range(pool.cur_threads, min_threads):
            _spawn_thread(pool)
        excess = pool.cur_threads - max_threads
        idle = pool._idle
        while excess > 0 and idle:
            pool._cover += 1
            idle.pop().wake.release()
            excess -= 1


def thread_pool_update_params(pool: ThreadPool, ctx: AioContext) -> None:
    """Port of ``thread_pool_update_params``: apply ``ctx.thread_pool_min``
    and ``ctx.thread_pool_max`` (0 and 64 when the context has none).

    Raises TypeError / ValueError for limits that are not ints with
    0 <= min <= max and max >= 1 (QEMU refuses them when they are set).
    """
    if not isinstance(ctx, AioContext):
        raise TypeError(f"expected an AioContext, got {type(ctx).__name__}")
    _set_params(pool,
                getattr(ctx, "thread_pool_min", THREAD_POOL_DEFAULT_MIN),
                getattr(ctx, "thread_pool_max", THREAD_POOL_DEFAULT_MAX))


def thread_pool_new(ctx: AioContext) -> ThreadPool:
    """Port of ``thread_pool_new``.  Prefer :func:`aio_get_thread_pool`,
    which also frees the pool with its context."""
    pool = ThreadPool(ctx)
    try:
        thread_pool_update_params(pool, ctx)
    except BaseException:
        qemu_bh_delete(pool.completion_bh)
        qemu_bh_delete(pool.new_thread_bh)
        raise
    return pool


def thread_pool_free(pool: Optional[ThreadPool]) -> None:
    """Port of ``thread_pool_free``: wait for work in flight, stop workers.

    Deviation: QEMU asserts that no request is in flight; here the pool's
    context is polled (so this must run where it may be polled) until every
    request has called back.  Then every worker is told to exit and joined,
    and the pool's BHs are deleted.  Idempotent; None is ignored.
    """
    if pool is None or pool.closed:
        return
    if not isinstance(pool, ThreadPool):
        raise TypeError(f"expected a ThreadPool, got {type(pool).__name__}")
    ctx = pool.ctx
    while pool._submitted != pool._completed:
        aio_poll(ctx, True)
    pool.closed = True
    with pool._lock:
        # Stop new threads from spawning.
        qemu_bh_delete(pool.new_thread_bh)
        pool.cur_threads -= pool.new_threads
        pool._cover -= pool.new_threads
        pool.new_threads = 0
        # Wait for the worker threads to terminate.
        pool.max_threads = 0
        idle = pool._idle
        while idle:
            pool._cover += 1
            idle.pop().wake.release()
        while pool.cur_threads > 0:
            pool._worker_stopped.wait()
        threads = list(pool._threads)
        pool._threads.clear()
        pool._requests.clear()
    me = threading.current_thread()
    for t in threads:
        if t is not me and t.ident is not None:
            t.join()
    qemu_bh_delete(pool.completion_bh)
    if ctx.thread_pool is pool:
        ctx.thread_pool = None


_pool_create_lock = threading.Lock()


def _free_context_pool(ctx: AioContext) -> None:
    thread_pool_free(ctx.thread_pool)


def aio_get_thread_pool(ctx: AioContext) -> ThreadPool:
    """Port of ``aio_get_thread_pool``: the context's pool, created on first
    use and freed by the context's last ``aio_context_unref``."""
    pool = ctx.thread_pool if ctx.__class__ is AioContext else None
    if pool is not None:
        return pool
    if not isinstance(ctx, AioContext):
        raise TypeError(f"expected an AioContext, got {type(ctx).__name__}")
    if ctx.closed:
        raise RuntimeError(f"{ctx!r}: AioContext is closed")
    with _pool_create_lock:
        if ctx.thread_pool is None:
            ctx.thread_pool = thread_pool_new(ctx)
            if _free_context_pool not in ctx._cleanup_hooks:
                aio_context_add_cleanup(ctx, _free_context_pool)
        return ctx.thread_pool
