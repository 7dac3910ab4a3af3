# SPDX-License-Identifier: GPL-2.0-or-later
"""The AioContext: port of QEMU's util/async.c and util/aio-posix.c.

Design principles (read these before changing anything here):

1. ``aio_poll`` is the only place where BHs, fd handlers and timers of a
   context are *called*.  It runs in the context's home thread; it may be
   called recursively from any callback it runs (a "nested" event loop), and
   every structure below is built so that nesting neither loses nor repeats
   work.
2. Scheduling work is cheap and thread-safe: ``qemu_bh_schedule``,
   ``aio_notify``, ``event_notifier_set`` and ``timer_mod`` may be called from
   any thread and wake a blocked ``aio_poll``.
3. ``aio_poll`` never drops a lock its caller holds: ``aio_context_acquire``
   is a plain recursive lock that the loop does not touch.
4. Progress means "a user callback ran".  Consuming the context's own
   ``aio_notify`` wake-up, or running an idle BH, is not progress.

Bottom halves.  A BH is queued at most once (``BH_PENDING``).  Each
``aio_bh_poll`` moves the queue into a *slice* and pushes it on the context's
slice list; it then drains slices from the oldest.  A BH scheduled while the
slice runs lands in the fresh queue and waits for the next ``aio_bh_poll``.
A nested ``aio_poll`` from inside a BH drains the remaining BHs of the outer
slices too, and never re-enters the running callback (its flags were
cleared when it was dequeued, so it runs again only if rescheduled).

Threads and fields.  Each AioContext field below says who may touch it.
"""

from __future__ import annotations

import collections
from collections import deque as _deque
import enum
import logging
import os
import threading
import time
from typing import Any, Callable, Optional

from . import _tls
from ._tls import _local as _tls_local
from .event_notifier import (
    EventNotifier,
    event_notifier_cleanup,
    event_notifier_get_fd,
    event_notifier_init,
    event_notifier_set,
    event_notifier_test_and_clear,
)
from .fdmon import EV_READ, EV_WRITE, FDMon, FDMonPoll, fdmon_new
from .timer import (
    QEMU_CLOCK_REALTIME,
    QEMUTimer,
    QEMUTimerListGroup,
    timer_init_full,
)

__all__ = [
    "AioContext",
    "QEMUBH",
    "BHFlag",
    "aio_context_new",
    "aio_context_ref",
    "aio_context_unref",
    "aio_context_acquire",
    "aio_context_release",
    "aio_context_set_poll_params",
    "aio_context_set_aio_params",
    "aio_poll",
    "aio_notify",
    "aio_bh_new",
    "aio_bh_new_full",
    "aio_bh_schedule_oneshot",
    "aio_bh_schedule_oneshot_full",
    "aio_bh_poll",
    "qemu_bh_schedule",
    "qemu_bh_schedule_idle",
    "qemu_bh_cancel",
    "qemu_bh_delete",
    "aio_set_fd_handler",
    "aio_set_event_notifier",
    "aio_disable_external",
    "aio_enable_external",
    "aio_compute_timeout",
    "aio_timer_init",
    "aio_timer_new",
    "aio_context_in_iothread",
    "in_aio_context_home_thread",
    "qemu_init_main_loop",
    "qemu_get_aio_context",
    "qemu_get_current_aio_context",
    "qemu_set_current_aio_context",
    "aio_wait_while",
    "AIO_WAIT_WHILE",
    "aio_wait_bh_oneshot",
    "aio_wait_kick",
]

log = logging.getLogger("pyaioctx.aio")


class BHFlag(enum.IntFlag):
    """QEMU's BH state bits (util/async.c)."""

    PENDING = 1 << 0  # already enqueued and waiting for aio_bh_poll()
    SCHEDULED = 1 << 1  # invoke the callback
    DELETED = 1 << 2  # delete without invoking callback
    ONESHOT = 1 << 3  # delete after invoking callback
    IDLE = 1 << 4  # schedule periodically when the event loop is idle


# Plain ints on the hot path: IntFlag arithmetic is ~20x slower.
BH_PENDING = 1
BH_SCHEDULED = 2
BH_DELETED = 4
BH_ONESHOT = 8
BH_IDLE = 16
_BH_DEQUEUE_MASK = ~(BH_PENDING | BH_SCHEDULED | BH_IDLE)

#: Idle BHs cap the poll timeout at this (QEMU: 10 ms).
IDLE_BH_TIMEOUT_NS = 10_000_000


class QEMUBH:
    """A bottom half (QEMU's ``QEMUBH``).  Create with :func:`aio_bh_new`.

    ``flags`` is read-modify-written only under ``ctx._bh_lock`` (any thread).
    ``name`` defaults to the callback's ``__qualname__`` and names the BH in
    leak reports.
    """

    __slots__ = ("ctx", "cb", "opaque", "name", "flags", "__weakref__")

    def __init__(self, ctx: "AioContext", cb: Callable[[Any], None], opaque: Any,
                 name: str, flags: int = 0) -> None:
        self.ctx = ctx
        self.cb = cb
        self.opaque = opaque
        self.name = name
        self.flags = flags

    # Pythonic face -------------------------------------------------------
    def schedule(self) -> None:
        qemu_bh_schedule(self)

    def schedule_idle(self) -> None:
        qemu_bh_schedule_idle(self)

    def cancel(self) -> None:
        qemu_bh_cancel(self)

    def delete(self) -> None:
        qemu_bh_delete(self)

    @property
    def scheduled(self) -> bool:
        return bool(self.flags & BH_SCHEDULED)

    def __repr__(self) -> str:
        return f"<QEMUBH {self.name!r} flags={BHFlag(self.flags)!s}>"


class AioHandler:
    """A registered fd (QEMU's ``AioHandler``).  Home thread only.

    Handlers are immutable once registered; changing the callbacks replaces
    the node, and a replaced or removed node is marked ``deleted`` so a
    dispatch loop holding a stale reference skips it.
    """

    __slots__ = ("fd", "io_read", "io_write", "io_poll", "io_poll_ready", "opaque",
                 "is_external", "events", "deleted", "poll_ns", "in_poll_list")

    def __init__(self, fd: int, io_read, io_write, io_poll, io_poll_ready, opaque,
                 is_external: bool) -> None:
        self.fd = fd
        self.io_read = io_read
        self.io_write = io_write
        self.io_poll = io_poll
        self.io_poll_ready = io_poll_ready
        self.opaque = opaque
        self.is_external = is_external
        self.events = (EV_READ if io_read else 0) | (EV_WRITE if io_write else 0)
        self.deleted = False
        self.poll_ns = 0  # adaptive polling time (QEMU's AioPolledEvent)
        self.in_poll_list = False


def _check_cb(cb: object, what: str, allow_none: bool = True) -> None:
    if cb is None:
        if not allow_none:
            raise TypeError(f"{what} must be callable, got None")
        return
    if not callable(cb):
        raise TypeError(f"{what} must be callable or None, got {type(cb).__name__}")


def _cb_name(cb: Any) -> str:
    return getattr(cb, "__qualname__", None) or repr(cb)


class AioContext:
    """An event loop (QEMU's ``AioContext``).

    Fields and who may touch them:

    ``_bh_list``       BHs queued since the last aio_bh_poll; any thread,
                       under ``_bh_lock``.
    ``_bh_slices``     slices being drained by (possibly nested) aio_bh_poll;
                       home thread only.
    ``notify_me``      >0 while aio_poll may block; written by the home
                       thread, read from any thread (aio_notify).
    ``notified``       set by aio_notify from any thread, cleared by the
                       home thread (aio_notify_accept).
    ``_handlers``      fd -> AioHandler; home thread only (like QEMU, fd
                       handlers are registered in the context's thread or
                       while it is not polling).
    ``_poll_list``     handlers that have become ready once and have
                       io_poll (QEMU's poll_aio_handlers); home thread only.
    ``poll_disable_cnt`` number of handlers without io_poll; home thread.
    ``tlg``            timer lists; timers may be armed from any thread.
    ``_lock``          the recursive lock of aio_context_acquire/release.
    """

    # Slots: CPython keeps at most 30 attributes of a plain instance in its
    # fast layout, and every request reads context fields.  __dict__ stays
    # for attributes added later.
    __slots__ = ("_bh_list", "_bh_lock", "_bh_slices", "_cleanup_hooks", "_handlers", "_home",
                 "_live_bhs", "_lock", "_poll_depth", "_poll_list", "_poll_owner", "_refcnt",
                 "aio_max_batch", "blk_completions", "closed", "co_schedule_bh",
                 "external_disable_cnt", "fdmon", "linux_aio", "linux_io_uring", "name",
                 "notified", "notifier", "notify_me", "poll_disable_cnt", "poll_grow",
                 "poll_max_ns", "poll_shrink", "scheduled_coroutines", "thread_pool", "tlg",
                 "__dict__", "__weakref__")

    def __init__(self, fdmon: str | None = None, name: str | None = None) -> None:
        self.name = name or f"aio-context-{id(self):x}"
        self._bh_lock = threading.Lock()
        self._bh_list: collections.deque[QEMUBH] = collections.deque()
        self._bh_slices: collections.deque[collections.deque[QEMUBH]] = collections.deque()
        self._live_bhs: set[QEMUBH] = set()  # created, not yet deleted (leak check)
        self.notify_me = 0
        self.notified = False
        self._handlers: dict[int, AioHandler] = {}
        self._poll_list: list[AioHandler] = []
        self.poll_disable_cnt = 0
        self.external_disable_cnt = 0
        self.poll_max_ns = 0
        self.poll_grow = 0
        self.poll_shrink = 0
        self.aio_max_batch = 0
        self._lock = threading.RLock()
        self._refcnt = 1
        self.closed = False
        self._poll_depth = 0
        self._poll_owner: Optional[_tls.LogicalThread] = None
        # Lazily created per-context services (QEMU's aio_get_thread_pool,
        # aio_setup_linux_aio, aio_setup_linux_io_uring).
        self.thread_pool: Any = None
        self.linux_aio: Any = None
        self.linux_io_uring: Any = None
        self.blk_completions: Any = None  # the block layer's deferred completions
        self._cleanup_hooks: list[Callable[["AioContext"], None]] = []
        self.fdmon: FDMon = fdmon_new(fdmon)
        self.tlg = QEMUTimerListGroup(self._timer_notify)
        # Coroutines scheduled with aio_co_schedule; any thread appends, the
        # home thread drains in co_schedule_bh.
        self.scheduled_coroutines: collections.deque = collections.deque()
        self._home: Optional[_tls.LogicalThread] = None
        self.notifier = _ContextNotifier(self)
        ret = event_notifier_init(self.notifier, False)
        if ret < 0:
            self.fdmon.close()
            raise OSError(-ret, f"cannot create the AioContext notifier: {os.strerror(-ret)}")
        aio_set_event_notifier(self, self.notifier, False, _notifier_cb,
                               _notifier_poll, _notifier_poll_ready)
        self.co_schedule_bh = aio_bh_new_full(self, _co_schedule_bh_cb, self, "co_schedule_bh")

    # Properties ----------------------------------------------------------
    @property
    def fdmon_name(self) -> str:
        return self.fdmon.name

    @property
    def poll_ns(self) -> int:
        """Current adaptive polling time: the longest of the polled handlers'."""
        return max((n.poll_ns for n in self._poll_list), default=0)

    def _timer_notify(self) -> None:
        aio_notify(self)

    # Pythonic face -------------------------------------------------------
    def bh_new(self, cb: Callable[[Any], None], opaque: Any = None,
               name: str | None = None) -> QEMUBH:
        return aio_bh_new_full(self, cb, opaque, name)

    def bh_schedule_oneshot(self, cb: Callable[[Any], None], opaque: Any = None,
                            name: str | None = None) -> None:
        aio_bh_schedule_oneshot_full(self, cb, opaque, name)

    def poll(self, blocking: bool = True) -> bool:
        return aio_poll(self, blocking)

    def notify(self) -> None:
        aio_notify(self)

    def set_fd_handler(self, fd: int, io_read=None, io_write=None, io_poll=None,
                       io_poll_ready=None, opaque=None, is_external: bool = False) -> None:
        aio_set_fd_handler(self, fd, is_external, io_read, io_write, io_poll,
                           io_poll_ready, opaque)

    def timer_new(self, type: int, scale: int, cb: Callable[[Any], None],
                  opaque: Any = None) -> QEMUTimer:
        return aio_timer_new(self, type, scale, cb, opaque)

    def wait_while(self, cond: Callable[[], bool]) -> None:
        aio_wait_while(self, cond)

    def acquire(self) -> None:
        aio_context_acquire(self)

    def release(self) -> None:
        aio_context_release(self)

    def __enter__(self) -> "AioContext":
        aio_context_acquire(self)
        return self

    def __exit__(self, *exc: object) -> None:
        aio_context_release(self)

    def close(self) -> None:
        """Drop the caller's reference (``aio_context_unref``)."""
        aio_context_unref(self)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fdmon={self.fdmon.name}"
        return f"<AioContext {self.name!r} {state}>"


# --------------------------------------------------------------------------
# The context's own notifier (aio_context_notifier_cb & co).

def _notifier_cb(e: EventNotifier) -> None:
    event_notifier_test_and_clear(e)


def _notifier_poll(e: "_ContextNotifier") -> bool:
    # Returns true if aio_notify() was called (e.g. a BH was scheduled).
    # No ordering needed: aio_notify_accept synchronises with producers.
    return e.ctx.notified


def _notifier_poll_ready(e: EventNotifier) -> None:
    pass  # we only wanted to kick the event loop


class _ContextNotifier(EventNotifier):
    """The context's own notifier; knows its context (QEMU's container_of)."""

    __slots__ = ("ctx",)

    def __init__(self, ctx: "AioContext") -> None:
        super().__init__()
        self.ctx = ctx


def _co_schedule_bh_cb(ctx: AioContext) -> None:
    """Port of ``co_schedule_bh_cb``: enter coroutines queued by aio_co_schedule."""
    from .coroutine import _co_schedule_bh_run  # lazy: coroutines import aio

    _co_schedule_bh_run(ctx)


# --------------------------------------------------------------------------
# Lifecycle

def _check_ctx(ctx: object) -> AioContext:
    if ctx.__class__ is not AioContext and not isinstance(ctx, AioContext):
        raise TypeError(f"expected an AioContext, got {type(ctx).__name__}")
    if ctx.closed:  # type: ignore[attr-defined]
        raise RuntimeError(f"{ctx!r}: AioContext is closed")
    return ctx  # type: ignore[return-value]


def aio_context_new(fdmon: str | None = None) -> AioContext:
    """Port of ``aio_context_new``.  Raises OSError if no fd can be created.

    ``fdmon`` selects the fd monitor ("epoll" or "poll"); default: the
    ``PYAIOCTX_FDMON`` environment variable, else the best available.
    """
    return AioContext(fdmon)


def aio_context_ref(ctx: AioContext) -> None:
    """Port of ``aio_context_ref``."""
    _check_ctx(ctx)._refcnt += 1


def aio_context_unref(ctx: AioContext) -> None:
    """Port of ``aio_context_unref``; the last unref finalises the context.

    Finalising (QEMU's ``aio_ctx_finalize``) tears down the per-context
    services (thread pool, Linux AIO, io_uring), the co_schedule BH and the
    notifier, and closes every fd the context created.  A BH that was created
    with ``aio_bh_new`` and never deleted is a leak: after cleaning up,
    ``RuntimeError("BH 'name' leaked ...")`` names it (QEMU aborts).
    """
    _check_ctx(ctx)
    ctx._refcnt -= 1
    if ctx._refcnt > 0:
        return
    _finalize(ctx)


def _finalize(ctx: AioContext) -> None:
    for hook in reversed(ctx._cleanup_hooks):
        hook(ctx)
    ctx._cleanup_hooks.clear()
    qemu_bh_delete(ctx.co_schedule_bh)
    # As QEMU's aio_ctx_finalize: a BH that was never deleted is a leak --
    # something may still expect it to run.  That covers BHs made with
    # aio_bh_new and not deleted, and oneshot BHs still waiting to run.
    with ctx._bh_lock:
        queued = [bh for lst in (ctx._bh_list, *ctx._bh_slices) for bh in lst]
    leaked = sorted({bh.name for bh in ctx._live_bhs if not bh.flags & BH_DELETED}
                    | {bh.name for bh in queued
                       if bh.flags & BH_ONESHOT and bh.flags & BH_SCHEDULED})
    aio_set_event_notifier(ctx, ctx.notifier, False, None)
    for node in list(ctx._handlers.values()):
        ctx.fdmon.update(node.fd, node.events, 0)
    ctx._handlers.clear()
    ctx._poll_list.clear()
    ctx.fdmon.close()
    event_notifier_cleanup(ctx.notifier)
    ctx.closed = True
    for tl in ctx.tlg.tl:
        tl.clear()
    if leaked:
        raise RuntimeError(
            "BH " + ", ".join(repr(n) for n in leaked)
            + " leaked, aio_bh_new() without qemu_bh_delete()?"
        )


def aio_context_acquire(ctx: AioContext) -> None:
    """Port of ``aio_context_acquire``: a recursive lock.  Any thread."""
    _check_ctx(ctx)._lock.acquire()


def aio_context_release(ctx: AioContext) -> None:
    """Port of ``aio_context_release``.  Raises RuntimeError if not held."""
    if not isinstance(ctx, AioContext):
        raise TypeError(f"expected an AioContext, got {type(ctx).__name__}")
    ctx._lock.release()


def aio_context_set_poll_params(ctx: AioContext, max_ns: int, grow: int, shrink: int) -> None:
    """Port of ``aio_context_set_poll_params``: adaptive busy-polling knobs.

    ``max_ns`` 0 disables polling.  Resets every handler's poll time.  Any
    thread: a stale value being used once is harmless (as in QEMU).
    """
    _check_ctx(ctx)
    for name, v in (("max_ns", max_ns), ("grow", grow), ("shrink", shrink)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"aio_context_set_poll_params: {name} must be a non-negative int, got {v!r}")
    for node in list(ctx._handlers.values()):
        node.poll_ns = 0
    ctx.poll_max_ns = max_ns
    ctx.poll_grow = grow
    ctx.poll_shrink = shrink
    aio_notify(ctx)


def aio_context_set_aio_params(ctx: AioContext, max_batch: int) -> None:
    """Port of ``aio_context_set_aio_params``: Linux AIO / io_uring batch cap (0 = default)."""
    _check_ctx(ctx)
    if not isinstance(max_batch, int) or max_batch < 0:
        raise ValueError(f"max_batch must be a non-negative int, got {max_batch!r}")
    ctx.aio_max_batch = max_batch
    aio_notify(ctx)


def aio_context_add_cleanup(ctx: AioContext, hook: Callable[[AioContext], None]) -> None:
    """Register a finaliser for a lazily created per-context service."""
    ctx._cleanup_hooks.append(hook)


# --------------------------------------------------------------------------
# Notification

def aio_notify(ctx: AioContext) -> None:
    """Port of ``aio_notify``: make a blocked (or about to block) aio_poll return.

    Any thread.  ``notified`` is written before ``notify_me`` is read; the
    home thread writes ``notify_me`` before reading ``notified`` (and before
    computing its timeout), so one of the two sides always sees the other.
    Under the GIL these plain attribute accesses are sequentially consistent,
    which is the pairing QEMU gets from its smp_mb()s.
    """
    ctx.notified = True
    if ctx.notify_me:
        event_notifier_set(ctx.notifier)


def _aio_notify_accept(ctx: AioContext) -> None:
    ctx.notified = False


# --------------------------------------------------------------------------
# Bottom halves

def aio_bh_new_full(ctx: AioContext, cb: Callable[[Any], None], opaque: Any,
                    name: str | None = None) -> QEMUBH:
    """Port of ``aio_bh_new_full``: a BH named ``name`` (default: cb's qualname)."""
    _check_ctx(ctx)
    _check_cb(cb, "BH callback", allow_none=False)
    bh = QEMUBH(ctx, cb, opaque, name or _cb_name(cb))
    ctx._live_bhs.add(bh)
    return bh


def aio_bh_new(ctx: AioContext, cb: Callable[[Any], None], opaque: Any = None,
               name: str | None = None) -> QEMUBH:
    """Port of ``aio_bh_new``: create a BH; schedule it with qemu_bh_schedule."""
    return aio_bh_new_full(ctx, cb, opaque, name)


def _bh_enqueue(bh: QEMUBH, new_flags: int) -> None:
    """Port of ``aio_bh_enqueue``.  Called concurrently from any thread."""
    ctx = bh.ctx
    lock = ctx._bh_lock
    lock.acquire()
    old = bh.flags
    if old & BH_DELETED and not new_flags & BH_DELETED:
        lock.release()
        raise RuntimeError(f"BH {bh.name!r} has been deleted; it cannot be scheduled")
    # The flag update and the enqueue must be one atomic step against the
    # dequeue in aio_bh_poll, or a BH could end up PENDING but in no list.
    bh.flags = old | BH_PENDING | new_flags
    if not old & BH_PENDING:
        ctx._bh_list.append(bh)
    lock.release()
    # aio_notify inlined: this is the hot path of every BH.
    ctx.notified = True
    if ctx.notify_me:
        event_notifier_set(ctx.notifier)


def aio_bh_schedule_oneshot_full(ctx: AioContext, cb: Callable[[Any], None], opaque: Any,
                                 name: str | None = None) -> None:
    """Port of ``aio_bh_schedule_oneshot_full``: run cb(opaque) once, then free."""
    # Every completion of a block-layer callback request comes through
    # here: exact-type checks first, and _bh_enqueue inlined.
    if ctx.__class__ is not AioContext or ctx.closed:
        _check_ctx(ctx)
    if cb is None or not callable(cb):
        _check_cb(cb, "BH callback", allow_none=False)
    bh = QEMUBH(ctx, cb, opaque, name or _cb_name(cb), BH_PENDING | BH_SCHEDULED | BH_ONESHOT)
    # A new BH is in no list and cannot be deleted yet, so _bh_enqueue
    # reduces to the append (under the lock, against aio_bh_poll taking
    # the list) and the notification.
    lock = ctx._bh_lock
    lock.acquire()
    ctx._bh_list.append(bh)
    lock.release()
    ctx.notified = True
    if ctx.notify_me:
        event_notifier_set(ctx.notifier)


def aio_bh_schedule_oneshot(ctx: AioContext, cb: Callable[[Any], None], opaque: Any = None) -> None:
    """Port of ``aio_bh_schedule_oneshot``.  Any thread."""
    aio_bh_schedule_oneshot_full(ctx, cb, opaque)


def qemu_bh_schedule(bh: QEMUBH) -> None:
    """Port of ``qemu_bh_schedule``.  Any thread; wakes the context.

    Raises RuntimeError naming the BH if it was deleted.
    """
    try:
        _bh_enqueue(bh, BH_SCHEDULED)
    except AttributeError:
        raise TypeError(f"expected a QEMUBH, got {type(bh).__name__}") from None


def qemu_bh_schedule_idle(bh: QEMUBH) -> None:
    """Port of ``qemu_bh_schedule_idle``: run when idle, at least every 10 ms."""
    if not isinstance(bh, QEMUBH):
        raise TypeError(f"expected a QEMUBH, got {type(bh).__name__}")
    _bh_enqueue(bh, BH_SCHEDULED | BH_IDLE)


def qemu_bh_cancel(bh: QEMUBH) -> None:
    """Port of ``qemu_bh_cancel``: the callback will not run (unless rescheduled)."""
    if not isinstance(bh, QEMUBH):
        raise TypeError(f"expected a QEMUBH, got {type(bh).__name__}")
    with bh.ctx._bh_lock:
        bh.flags &= ~BH_SCHEDULED


def qemu_bh_delete(bh: QEMUBH) -> None:
    """Port of ``qemu_bh_delete``: safe from the BH's own callback."""
    if not isinstance(bh, QEMUBH):
        raise TypeError(f"expected a QEMUBH, got {type(bh).__name__}")
    if bh.flags & BH_DELETED:
        return
    ctx = bh.ctx
    if ctx.closed:
        bh.flags |= BH_DELETED
        return
    _bh_enqueue(bh, BH_DELETED)
    ctx._live_bhs.discard(bh)


def aio_bh_poll(ctx: AioContext) -> int:
    """Port of ``aio_bh_poll``: run scheduled BHs; non-zero if a non-idle BH ran.

    Home thread.  See the module docstring for the slice rules.
    """
    lock = ctx._bh_lock
    acquire = lock.acquire
    release = lock.release
    slices = ctx._bh_slices
    acquire()
    if ctx._bh_list:
        slices.append(ctx._bh_list)
        ctx._bh_list = _deque()
    elif not slices:
        release()
        return 0
    release()
    ret = 0
    while slices:
        s = slices[0]
        # A slice is only touched by the home thread once detached; the
        # lock guards the flag read-modify-write against a concurrent
        # qemu_bh_schedule (which would otherwise see PENDING and not
        # requeue, leaving the BH pending in no list).
        while s:
            bh = s.popleft()
            acquire()
            flags = bh.flags
            bh.flags = flags & _BH_DEQUEUE_MASK
            release()
            if flags & 6 == BH_SCHEDULED:  # SCHEDULED and not DELETED
                if not flags & BH_IDLE:
                    ret = 1
                bh.cb(bh.opaque)
        # A nested aio_bh_poll drains every slice before returning, so the
        # empty slice is ours to drop unless a nested call already did.
        if slices and slices[0] is s:
            slices.popleft()
    return ret


def aio_compute_timeout(ctx: AioContext) -> int:
    """Port of ``aio_compute_timeout``: ns aio_poll may block (-1: forever)."""
    # Fast path: the most recently queued BH is an ordinary scheduled one.
    # deque indexing is atomic, so no lock is needed just to peek.
    lst = ctx._bh_list
    if lst:
        try:
            f = lst[-1].flags
        except IndexError:
            f = 0
        if f & (BH_SCHEDULED | BH_DELETED | BH_IDLE) == BH_SCHEDULED:
            return 0
    timeout = -1
    with ctx._bh_lock:
        for lst in (ctx._bh_list, *ctx._bh_slices):
            for bh in lst:
                f = bh.flags
                if f & BH_SCHEDULED and not f & BH_DELETED:
                    if f & BH_IDLE:
                        # idle bottom halves will be polled at least every 10ms
                        timeout = IDLE_BH_TIMEOUT_NS
                    else:
                        # non-idle bottom halves will be executed immediately
                        return 0
    deadline = ctx.tlg.deadline_ns()
    if deadline == 0:
        return 0
    if timeout < 0 or (0 <= deadline < timeout):
        return deadline
    return timeout


# --------------------------------------------------------------------------
# fd handlers

def aio_set_fd_handler(ctx: AioContext, fd: int, is_external: bool,
                       io_read: Optional[Callable[[Any], None]],
                       io_write: Optional[Callable[[Any], None]],
                       io_poll: Optional[Callable[[Any], bool]] = None,
                       io_poll_ready: Optional[Callable[[Any], None]] = None,
                       opaque: Any = None) -> None:
    """Port of ``aio_set_fd_handler``: watch ``fd``; all-None handlers remove it.

    Handlers are called as ``io_read(opaque)`` etc. in the home thread.
    ``io_poll(opaque) -> bool`` is busy-polled before blocking when adaptive
    polling is on; when it returns True, ``io_poll_ready(opaque)`` runs.
    ``is_external`` handlers are skipped while ``aio_disable_external`` is in
    effect.  Raises ValueError for a negative fd and OSError (EBADF) for an fd
    the monitor cannot watch.
    """
    _check_ctx(ctx)
    if fd.__class__ is not int:
        if hasattr(fd, "fileno"):
            fd = fd.fileno()
        if not isinstance(fd, int):
            raise TypeError(f"fd must be an int or have fileno(), got {type(fd).__name__}")
    if fd < 0:
        raise ValueError(f"invalid file descriptor {fd}")
    _check_cb(io_read, "io_read")
    _check_cb(io_write, "io_write")
    _check_cb(io_poll, "io_poll")
    _check_cb(io_poll_ready, "io_poll_ready")
    if io_poll and not io_poll_ready:
        io_poll = None  # polling only makes sense if there is a handler

    old = ctx._handlers.get(fd)
    if not io_read and not io_write and not io_poll:
        if old is None:
            return
        ctx.fdmon.update(fd, old.events, 0)
        del ctx._handlers[fd]
        _retire_node(ctx, old)
        if not old.io_poll:
            ctx.poll_disable_cnt -= 1
    else:
        node = AioHandler(fd, io_read, io_write, io_poll, io_poll_ready, opaque,
                          bool(is_external))
        try:
            ctx.fdmon.update(fd, old.events if old else 0, node.events)
        except FileNotFoundError:
            # epoll_ctl(MOD) on an fd that was closed and reused: re-add.
            ctx.fdmon.update(fd, 0, node.events)
        ctx._handlers[fd] = node
        ctx.poll_disable_cnt += (not io_poll) - (bool(old) and not old.io_poll)
        if old is not None:
            node.poll_ns = old.poll_ns
            was_polled = old.in_poll_list
            _retire_node(ctx, old)
            if was_polled and node.io_poll:
                node.in_poll_list = True
                ctx._poll_list.append(node)
    aio_notify(ctx)


def _retire_node(ctx: AioContext, node: AioHandler) -> None:
    node.deleted = True
    if node.in_poll_list:
        node.in_poll_list = False
        try:
            ctx._poll_list.remove(node)
        except ValueError:
            pass


def aio_set_event_notifier(ctx: AioContext, notifier: EventNotifier, is_external: bool,
                           io_read: Optional[Callable[[EventNotifier], None]],
                           io_poll: Optional[Callable[[EventNotifier], bool]] = None,
                           io_poll_ready: Optional[Callable[[EventNotifier], None]] = None) -> None:
    """Port of ``aio_set_event_notifier``: handlers get the notifier itself."""
    if not isinstance(notifier, EventNotifier):
        raise TypeError(f"expected an EventNotifier, got {type(notifier).__name__}")
    fd = event_notifier_get_fd(notifier)
    if fd < 0:
        if io_read is None and io_poll is None:
            return
        raise ValueError(f"{notifier!r} is not initialised")
    aio_set_fd_handler(ctx, fd, is_external, io_read, None, io_poll, io_poll_ready, notifier)


def aio_disable_external(ctx: AioContext) -> None:
    """Port of ``aio_disable_external``: nests; external handlers pause."""
    _check_ctx(ctx).external_disable_cnt += 1


def aio_enable_external(ctx: AioContext) -> None:
    """Port of ``aio_enable_external``; kicks the loop when the count hits 0."""
    _check_ctx(ctx)
    if ctx.external_disable_cnt <= 0:
        raise RuntimeError("aio_enable_external without matching aio_disable_external")
    ctx.external_disable_cnt -= 1
    if ctx.external_disable_cnt == 0:
        aio_notify(ctx)


# --------------------------------------------------------------------------
# Threads

def aio_context_in_iothread(ctx: AioContext) -> bool:
    """Port of ``aio_context_in_iothread``: is ``ctx`` the caller's home context?"""
    return _tls.current().ctx is ctx


def in_aio_context_home_thread(ctx: AioContext) -> bool:
    """Port of ``in_aio_context_home_thread``."""
    return _tls.current().ctx is ctx


_main_ctx: Optional[AioContext] = None
_main_lock = threading.Lock()


def qemu_init_main_loop() -> AioContext:
    """Port of ``qemu_init_main_loop``: create the main context (idempotent).

    The calling thread becomes the main context's home thread.
    """
    global _main_ctx
    with _main_lock:
        if _main_ctx is None or _main_ctx.closed:
            _main_ctx = AioContext(name="main")
        ctx = _main_ctx
    lt = _tls.current()
    lt.ctx = ctx
    ctx._home = lt
    return ctx


def qemu_get_aio_context() -> AioContext:
    """Port of ``qemu_get_aio_context``: the main context (created on demand)."""
    ctx = _main_ctx
    if ctx is None or ctx.closed:
        with _main_lock:
            if _main_ctx is None or _main_ctx.closed:
                pass
            else:
                return _main_ctx
        return qemu_init_main_loop()
    return ctx


def qemu_get_current_aio_context() -> Optional[AioContext]:
    """Port of ``qemu_get_current_aio_context``.

    The context of the calling *logical* thread: the one set with
    ``qemu_set_current_aio_context`` (an iothread), the main context in the
    thread that called ``qemu_init_main_loop``, or None in a plain thread.
    Inside a coroutine it answers for the thread that entered it.
    """
    return _tls.current().ctx


def qemu_set_current_aio_context(ctx: Optional[AioContext]) -> None:
    """Port of ``qemu_set_current_aio_context``: make ``ctx`` this thread's home."""
    if ctx is not None and not isinstance(ctx, AioContext):
        raise TypeError(f"expected an AioContext or None, got {type(ctx).__name__}")
    lt = _tls.current()
    lt.ctx = ctx
    if ctx is not None:
        ctx._home = lt


# --------------------------------------------------------------------------
# aio_poll

def _adjust_polling_time(ctx: AioContext, node: AioHandler, block_ns: int) -> None:
    """Port of ``adjust_polling_time``."""
    if block_ns <= node.poll_ns:
        pass  # this is the sweet spot, no adjustment needed
    elif block_ns > ctx.poll_max_ns:
        # We'd have to poll for too long, poll less
        node.poll_ns = node.poll_ns // ctx.poll_shrink if ctx.poll_shrink else 0
    elif node.poll_ns < ctx.poll_max_ns and block_ns < ctx.poll_max_ns:
        # There is room to grow, poll longer
        grow = ctx.poll_grow or 2
        node.poll_ns = node.poll_ns * grow if node.poll_ns else 4000  # start at 4 us
        if node.poll_ns > ctx.poll_max_ns:
            node.poll_ns = ctx.poll_max_ns


def _run_poll_handlers(ctx: AioContext, ready: list, max_ns: int, timeout: int) -> tuple[bool, int]:
    """Port of ``run_poll_handlers``: busy-poll io_poll handlers up to max_ns.

    Returns (progress, remaining timeout).
    """
    clock = time.monotonic_ns
    start = clock()
    ext_ok = ctx.external_disable_cnt == 0
    notifier = ctx.notifier
    progress = False
    while True:
        for node in list(ctx._poll_list):
            if node.deleted or (node.is_external and not ext_ok):
                continue
            if node.io_poll(node.opaque):
                ready.append((node, 0, True))
                # Polling was successful, exit immediately to adjust the
                # next polling time.
                timeout = 0
                if node.opaque is not notifier:
                    progress = True
        elapsed = clock() - start
        max_ns = qemu_soonest_timeout_ns(timeout, max_ns)
        if elapsed >= max_ns or ctx.poll_disable_cnt:
            break
    if timeout != -1:
        timeout -= min(timeout, elapsed)
    return progress, timeout


def qemu_soonest_timeout_ns(a: int, b: int) -> int:
    if a < 0:
        return b
    if b < 0:
        return a
    return a if a < b else b


def _try_poll_mode(ctx: AioContext, ready: list, timeout: int) -> tuple[bool, int, bool]:
    """Port of ``try_poll_mode``: (progress, new timeout, whether it polled)."""
    poll_list = ctx._poll_list
    max_ns = 0
    for node in poll_list:
        if node.poll_ns > max_ns:
            max_ns = node.poll_ns
    max_ns = qemu_soonest_timeout_ns(timeout, max_ns)
    if max_ns and not ctx.poll_disable_cnt:
        progress, timeout = _run_poll_handlers(ctx, ready, max_ns, timeout)
        return progress, timeout, True
    return False, timeout, False


def _dispatch_handler(ctx: AioContext, node: AioHandler, revents: int, poll_ready: bool) -> bool:
    """Port of ``aio_dispatch_handler``.

    Deviation: a read or poll-ready handler that returns ``False`` (exactly)
    did no work, and does not count as progress.  QEMU's handlers return
    void; ours may say "spurious wake-up" -- the Linux AIO and io_uring
    completion handlers do when their eventfd fired for completions that
    had already been reaped from the ring.  Handlers returning None (every
    handler written to QEMU's signature) count as progress, as in QEMU.
    """
    if node.deleted:
        return False
    if node.is_external and ctx.external_disable_cnt:
        return False
    # Start polling handlers when they become ready: activity is likely
    # to continue.
    if not node.in_poll_list and node.io_poll:
        node.in_poll_list = True
        ctx._poll_list.append(node)
    if poll_ready and not revents and node.io_poll_ready:
        # Remove temporarily to avoid infinite loops when io_poll_ready()
        # calls aio_poll() before clearing the condition that made the poll
        # handler become ready.
        if node.in_poll_list:
            node.in_poll_list = False
            ctx._poll_list.remove(node)
        try:
            did = node.io_poll_ready(node.opaque)
        finally:
            if not node.deleted and not node.in_poll_list:
                node.in_poll_list = True
                ctx._poll_list.append(node)
        # aio_notify() does not count as progress
        return did is not False and node.opaque is not ctx.notifier
    progress = False
    if revents & EV_READ and node.io_read:
        # aio_notify() does not count as progress
        if node.io_read(node.opaque) is not False and node.opaque is not ctx.notifier:
            progress = True
    if revents & EV_WRITE and node.io_write and not node.deleted:
        node.io_write(node.opaque)
        progress = True
    return progress


def aio_poll(ctx: AioContext, blocking: bool) -> bool:
    """Port of ``aio_poll``: run one iteration; True if a callback made progress.

    With ``blocking`` it sleeps until an fd handler, an event notifier, a
    timer, a BH or ``aio_notify`` has something, never past the next timer
    deadline.  Runs in the context's home thread; it may be nested inside
    any callback it runs.  Calling it from one thread while another thread is
    inside ``aio_poll`` for the same context raises RuntimeError.
    """
    if ctx.__class__ is not AioContext:
        _check_ctx(ctx)
    if ctx.closed:
        raise RuntimeError(f"{ctx!r}: aio_poll on a closed AioContext")
    try:
        me = _tls_local.lt
    except AttributeError:
        me = _tls.current()
    owner = ctx._poll_owner
    if owner is not None and owner is not me:
        raise RuntimeError(
            f"aio_poll({ctx.name}) called from {me.name!r} while {owner.name!r} "
            "is polling it; aio_poll may only run in the context's home thread"
        )
    ctx._poll_owner = me
    ctx._poll_depth += 1
    try:
        if (not blocking or (ctx._bh_list and aio_compute_timeout(ctx) == 0)) \
                and len(ctx._handlers) == 1 and not ctx._poll_list:
            # Fast path: only the context's own notifier is registered and
            # nothing will block, so there is nothing to wait for -- the
            # general path would make no syscall either.  Same steps, fewer
            # branches: accept notifications, run BHs, run timers.
            ctx.notified = False
            progress = False
            if ctx._bh_list or ctx._bh_slices:
                progress = aio_bh_poll(ctx) != 0
            for tl in ctx.tlg.tl:
                if tl._active and tl.run_timers():
                    progress = True
            return progress
        return _aio_poll(ctx, blocking)
    finally:
        ctx._poll_depth -= 1
        if not ctx._poll_depth:
            ctx._poll_owner = None


def _fdmon_wait(ctx: AioContext, timeout: int) -> list[tuple[int, int]]:
    """Wait on the context's fds; while external clients are disabled, on
    the internal ones only.

    Port of fdmon_epoll_wait's "Fall back while external clients are
    disabled" and of fdmon_poll_wait, which leaves out nodes failing
    aio_node_check.  Both monitors are level-triggered: a readable external
    fd would otherwise end every blocking wait at once without its handler
    being allowed to run, and aio_poll(ctx, True) would return early (and a
    waiting loop would spin) for as long as the drained section lasts.
    """
    if not ctx.external_disable_cnt:
        return ctx.fdmon.wait(timeout)
    internal = FDMonPoll()
    for fd, node in list(ctx._handlers.items()):
        if node.events and not node.is_external:
            internal.update(fd, 0, node.events)
    return internal.wait(timeout)


def _aio_poll(ctx: AioContext, blocking: bool) -> bool:
    ready: list = []
    poll_max_ns = ctx.poll_max_ns
    start = time.monotonic_ns() if poll_max_ns else 0

    timeout = aio_compute_timeout(ctx) if blocking else 0
    progress = False
    polled = False
    if ctx._poll_list and poll_max_ns:
        progress, timeout, polled = _try_poll_mode(ctx, ready, timeout)

    # aio_notify can skip the eventfd write if everything will be
    # re-evaluated before the next blocking wait.  That is only true once
    # we are past the wait, so announce ourselves before it.
    use_notify_me = timeout != 0
    if use_notify_me:
        ctx.notify_me += 2
        # Don't block if aio_notify() was called.
        if ctx.notified:
            timeout = 0

    # A non-blocking aio_poll needs no syscall when nothing but the
    # context's own notifier is registered (BHs and timers are checked
    # without one), or when a poll round just checked every handler.
    # QEMU skips it whenever no handler lacks io_poll; that would miss fds
    # whose handlers have not yet entered the poll list, so we are stricter.
    handlers = ctx._handlers
    if timeout or ctx.poll_disable_cnt or (
        len(handlers) > 1 and not (polled and len(ctx._poll_list) >= len(handlers))
    ):
        try:
            events = _fdmon_wait(ctx, timeout)
        finally:
            if use_notify_me:
                ctx.notify_me -= 2
        if events:
            if ready:
                # A handler found by polling and by the fd monitor is
                # dispatched once, as an fd event (aio_add_ready_handler).
                seen = {n: i for i, (n, _, _) in enumerate(ready)}
                for fd, bits in events:
                    node = handlers.get(fd)
                    if node is not None:
                        i = seen.get(node)
                        if i is None:
                            ready.append((node, bits & node.events, False))
                        else:
                            ready[i] = (node, bits & node.events, True)
            else:
                for fd, bits in events:
                    node = handlers.get(fd)
                    if node is not None:
                        ready.append((node, bits & node.events, False))
    elif use_notify_me:
        ctx.notify_me -= 2

    ctx.notified = False  # aio_notify_accept

    block_ns = time.monotonic_ns() - start if poll_max_ns else 0

    if ctx._bh_list or ctx._bh_slices:
        if aio_bh_poll(ctx):
            progress = True
    # Dispatch ready handlers.  A nested aio_poll inside a handler has its
    # own ready list; stale nodes (removed or replaced meanwhile) are
    # skipped through node.deleted.
    for node, revents, poll_ready in ready:
        if _dispatch_handler(ctx, node, revents, poll_ready):
            progress = True
        if poll_max_ns and node.in_poll_list:
            _adjust_polling_time(ctx, node, block_ns)

    if ctx.tlg.run_timers():
        progress = True
    return progress


# --------------------------------------------------------------------------
# Timers bound to a context

def aio_timer_init(ctx: AioContext, ts: QEMUTimer, type: int, scale: int,
                   cb: Callable[[Any], None], opaque: Any = None) -> None:
    """Port of ``aio_timer_init``: bind ``ts`` to ``ctx``'s clock ``type``."""
    from .timer import _check_clock

    _check_ctx(ctx)
    timer_init_full(ts, ctx.tlg.tl[_check_clock(type)], scale, 0, cb, opaque)


def aio_timer_new(ctx: AioContext, type: int, scale: int,
                  cb: Callable[[Any], None], opaque: Any = None) -> QEMUTimer:
    """Port of ``aio_timer_new``."""
    ts = QEMUTimer()
    aio_timer_init(ctx, ts, type, scale, cb, opaque)
    return ts


# --------------------------------------------------------------------------
# AIO_WAIT_WHILE and friends (util/aio-wait.c)

def aio_wait_kick() -> None:
    """Port of ``aio_wait_kick``: wake the main loop so waiters re-check."""
    ctx = _main_ctx
    if ctx is not None and not ctx.closed:
        aio_bh_schedule_oneshot_full(ctx, _dummy_bh_cb, None, "aio_wait_kick")


def _dummy_bh_cb(opaque: Any) -> None:
    pass


def aio_wait_while(ctx: Optional[AioContext], cond: Callable[[], bool]) -> bool:
    """QEMU's ``AIO_WAIT_WHILE(ctx, cond)``: poll until ``cond()`` is false.

    ``cond`` is checked before each ``aio_poll`` (so a false condition never
    polls).  In the context's home thread (or when nobody else runs it) this
    polls ``ctx`` blocking.  From another thread -- the main thread waiting
    on an iothread's context, as in QEMU -- it polls the caller's own context
    (or sleeps briefly) while the home thread makes progress.  Returns
    whether it had to wait at all.
    """
    if not callable(cond):
        raise TypeError(f"cond must be callable, got {type(cond).__name__}")
    if ctx is None:
        ctx = qemu_get_aio_context()
    _check_ctx(ctx)
    waited = False
    me = _tls.current()
    home_elsewhere = _context_has_other_home(ctx)
    if not home_elsewhere:
        while cond():
            waited = True
            aio_poll(ctx, True)
        return waited
    # Waiting on another thread's context: let it run and re-check.  QEMU
    # polls the main context here and relies on aio_wait_kick(); we do the
    # same when we are the main thread, and fall back to a short sleep.
    mine = me.ctx
    while cond():
        waited = True
        if mine is not None and not mine.closed and mine is _main_ctx:
            _poll_with_timeout(mine, 1_000_000)
        else:
            time.sleep(0.0005)
    return waited


#: QEMU's macro name, for code ported line by line: ``AIO_WAIT_WHILE(ctx, cond)``
#: with ``cond`` a callable.
AIO_WAIT_WHILE = aio_wait_while


def _poll_with_timeout(ctx: AioContext, ns: int) -> None:
    ts = QEMUTimer()
    timer_init_full(ts, ctx.tlg.tl[QEMU_CLOCK_REALTIME], 1, 0, _dummy_bh_cb, None, "aio_wait_tick")
    from .timer import timer_mod_ns, timer_del

    timer_mod_ns(ts, time.monotonic_ns() + ns)
    try:
        aio_poll(ctx, True)
    finally:
        timer_del(ts)


def _context_has_other_home(ctx: AioContext) -> bool:
    # The context is some other thread's home (an iothread), or is being
    # polled by another logical thread right now: either way we must not
    # poll it ourselves.
    me = _tls.current()
    home = ctx._home
    if home is not None and home is not me:
        return True
    owner = ctx._poll_owner
    return owner is not None and owner is not me


def aio_wait_bh_oneshot(ctx: AioContext, cb: Callable[[Any], None], opaque: Any = None) -> None:
    """Port of ``aio_wait_bh_oneshot``: run cb(opaque) in ``ctx`` and wait for it."""
    _check_ctx(ctx)
    _check_cb(cb, "callback", allow_none=False)
    done = [False]

    def _wrapper(_: Any) -> None:
        try:
            cb(opaque)
        finally:
            done[0] = True
            aio_wait_kick()

    aio_bh_schedule_oneshot_full(ctx, _wrapper, None, _cb_name(cb))
    aio_wait_while(ctx, lambda: not done[0])
