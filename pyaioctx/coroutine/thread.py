# SPDX-License-Identifier: GPL-2.0-or-later
"""Thread-backed coroutines: the model of QEMU's util/coroutine-gthread.c.

Every coroutine runs on an OS thread of its own, and exactly one thread of
a logical QEMU thread runs at a time: a switch wakes the target thread and
puts the switching thread to sleep until somebody switches back to it.

Hand-off.  coroutine-gthread uses one global mutex + condition variable and
per-coroutine ``runnable`` flags: every switch broadcasts, and every
sleeping coroutine thread wakes up to re-check its flag.  Here each OS
thread owns a binary semaphore (a ``threading.Lock`` created locked:
``release`` posts, ``acquire`` waits), so a switch wakes exactly the one
thread that must run.  The broadcast variant is kept (``handoff="condition"``)
so the benchmark can compare the two.

Why a semaphore per *OS thread* rather than per coroutine: a thread only
ever waits for one thing at a time (to be entered, or for the coroutine it
entered to yield), and the protocol strictly alternates post and wait for a
given thread, so one binary semaphore is enough and a post may even come
before the matching wait.  It also lets any kind of caller -- a plain
thread, a thread-backed coroutine, a greenlet coroutine -- enter a
thread-backed coroutine: the caller just sleeps on its own thread's
semaphore.

Pool.  Coroutine threads are reused, as QEMU reuses coroutine stacks: a
thread whose coroutine terminated parks in an idle list (at most
``pool_max``, QEMU's initial pool size of 64) and runs the next coroutine
entered for the first time.  An idle thread exits after ``idle_timeout``
seconds, or when :meth:`ThreadBackend.cleanup` is called, so nothing is left
behind.  A coroutine holds its thread from its first enter until it
terminates; one that never terminates keeps its thread (as a QEMU coroutine
keeps its stack).

Thread-local state.  A coroutine thread binds itself (``_tls``) to the
logical thread that entered it every time it is woken, so
``qemu_get_current_aio_context()`` and ``qemu_coroutine_self()`` answer for
that logical thread.
"""

from __future__ import annotations

import itertools
import threading
from typing import Any, Callable, Optional

from .. import _tls
from ._core import COROUTINE_TERMINATE, COROUTINE_YIELD, Coroutine, CoroutineAction

__all__ = ["ThreadBackend", "HANDOFFS"]

_tls_local = _tls._local
HANDOFFS = ("lock", "condition")
_ids = itertools.count(1)


class _LockState:
    """Per-OS-thread hand-off state, binary-semaphore flavour.

    ``post`` / ``wait``  release / acquire of a Lock created locked; ``post``
                         is called by whichever thread hands control to this
                         one, ``wait`` only by the owning thread.
    ``action``           the CoroutineAction delivered with the last post;
                         written by the poster before ``post``, read by the
                         owner after ``wait``.
    ``co``               (workers) the coroutine this thread runs, None when
                         idle; written by the enter path before the first
                         post, cleared by the worker at termination.
    ``thread``           (workers) the threading.Thread.
    """

    __slots__ = ("post", "wait", "action", "co", "thread")

    def __init__(self) -> None:
        lock = threading.Lock()
        lock.acquire()
        self.post: Callable[[], None] = lock.release
        self.wait: Callable[..., bool] = lock.acquire
        self.action: CoroutineAction = COROUTINE_YIELD
        self.co: Optional[Coroutine] = None
        self.thread: Optional[threading.Thread] = None


class _CondState:
    """Per-OS-thread hand-off state, coroutine-gthread flavour: one global
    Condition for all threads, broadcast on every switch."""

    __slots__ = ("post", "wait", "action", "co", "thread", "runnable", "_cond")

    def __init__(self, cond: threading.Condition) -> None:
        self._cond = cond
        self.runnable = False
        self.action: CoroutineAction = COROUTINE_YIELD
        self.co: Optional[Coroutine] = None
        self.thread: Optional[threading.Thread] = None
        self.post = self._post
        self.wait = self._wait

    def _post(self) -> None:
        with self._cond:
            self.runnable = True
            self._cond.notify_all()

    def _wait(self, blocking: bool = True, timeout: float = -1) -> bool:
        with self._cond:
            while not self.runnable:
                if not self._cond.wait(None if timeout < 0 else timeout):
                    if not self.runnable:
                        return False
            self.runnable = False
            return True


class ThreadBackend:
    """Coroutine backend on pooled OS threads (see the module docstring).

    Fields and who may touch them:

    ``_local``     threading.local: the calling OS thread's hand-off state;
                   each thread touches only its own.
    ``_idle``      parked worker states; any thread, under ``_pool_lock``.
    ``_live``      every worker not yet exited; under ``_pool_lock``.
    ``started`` / ``exited``  thread counters; under ``_pool_lock``.
    """

    name = "thread"

    def __init__(self, handoff: str = "lock", pool_max: int = 64,
                 idle_timeout: float = 10.0) -> None:
        if handoff not in HANDOFFS:
            raise ValueError(f"unknown hand-off {handoff!r}; valid: {', '.join(HANDOFFS)}")
        self.handoff = handoff
        self.pool_max = pool_max
        self.idle_timeout = idle_timeout
        self.greenlet_current = None  # not greenlets (see CoroutineBackend)
        self._cond = threading.Condition(threading.Lock())
        self._local = threading.local()
        self._pool_lock = threading.Lock()
        self._idle: list[Any] = []
        self._live: set[Any] = set()
        self.started = 0
        self.exited = 0

    def __repr__(self) -> str:
        return f"<ThreadBackend handoff={self.handoff} pool_max={self.pool_max}>"

    # Hand-off state --------------------------------------------------------
    def _new_state(self) -> Any:
        return _LockState() if self.handoff == "lock" else _CondState(self._cond)

    def _me(self) -> Any:
        try:
            return self._local.st
        except AttributeError:
            st = self._local.st = self._new_state()
            return st

    # Pool ------------------------------------------------------------------
    def _get_worker(self) -> Any:
        with self._pool_lock:
            if self._idle:
                return self._idle.pop()
            w = self._new_state()
            self._live.add(w)
            self.started += 1
        t = threading.Thread(target=self._worker_main, args=(w,),
                             name=f"pyaioctx-co-{next(_ids)}", daemon=True)
        w.thread = t
        t.start()
        return w

    def _worker_main(self, w: Any) -> None:
        self._local.st = w
        wait = w.wait
        try:
            while True:
                if not wait(True, self.idle_timeout):
                    with self._pool_lock:
                        try:
                            self._idle.remove(w)
                            leaving = True
                        except ValueError:
                            leaving = False  # just taken: its post is on the way
                    if leaving:
                        return
                    wait()
                co = w.co
                if co is None:
                    return  # cleanup() asked us to leave
                _tls_local.lt = co._lt
                try:
                    co.entry(co.entry_arg)  # type: ignore[misc]
                except BaseException as e:  # noqa: BLE001 - re-raised by the enterer
                    co._exc = e
                    del e
                ret = co._ret
                co._impl = None
                w.co = None
                co = None
                # Park before waking the caller, so that a coroutine created
                # right after this one terminates finds this thread idle.
                with self._pool_lock:
                    keep = len(self._idle) < self.pool_max
                    if keep:
                        self._idle.append(w)
                try:
                    del _tls_local.lt
                except AttributeError:
                    pass
                ret.action = COROUTINE_TERMINATE
                ret.post()
                if not keep:
                    return
        finally:
            with self._pool_lock:
                self._live.discard(w)
                self.exited += 1

    def cleanup(self) -> int:
        """Stop every idle coroutine thread and wait for it to exit (QEMU's
        ``coroutine_pool_cleanup``).  Returns how many were stopped."""
        with self._pool_lock:
            idle, self._idle = self._idle, []
        for w in idle:
            w.co = None
            w.post()
        for w in idle:
            if w.thread is not None and w.thread is not threading.current_thread():
                w.thread.join()
        return len(idle)

    # CoroutineBackend ------------------------------------------------------
    def enter(self, lt: Any, from_: Coroutine, to: Coroutine) -> CoroutineAction:
        try:
            me = self._local.st
        except AttributeError:
            me = self._me()
        w = to._impl
        if w is None:
            w = self._get_worker()
            w.co = to
            to._impl = w
        # Everything the coroutine's thread reads is written before post().
        to._lt = lt
        to._ret = me
        lt.co = to
        w.post()
        me.wait()
        lt.co = from_ if from_._backend is not None else None
        return me.action

    def yield_(self, lt: Any, co: Coroutine) -> None:
        w = co._impl
        ret = co._ret
        ret.action = COROUTINE_YIELD
        ret.post()
        # From here on the caller runs; we touch nothing until re-entered.
        w.wait()
        _tls_local.lt = co._lt  # the enterer may be another logical thread

    def stats(self) -> dict[str, int]:
        with self._pool_lock:
            return {"threads_started": self.started, "threads_exited": self.exited,
                    "threads_live": len(self._live), "threads_idle": len(self._idle)}
