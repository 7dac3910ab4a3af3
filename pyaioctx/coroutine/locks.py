# SPDX-License-Identifier: GPL-2.0-or-later
"""Coroutine queues and locks: port of util/qemu-coroutine-lock.c.

* :class:`CoQueue` -- a FIFO of coroutines waiting for an event.
* :class:`CoMutex` -- a mutex whose waiters yield instead of blocking the
  thread.  Unlock hands the mutex straight to the oldest waiter (FIFO, no
  barging), and wakes it with ``aio_co_wake``: a waiter of the same context
  is queued to run after the unlocking coroutine yields or terminates, a
  waiter of another context is scheduled in its own thread.
* :class:`CoRwlock` -- QEMU's ticket-based reader/writer lock (readers and
  writers are served in arrival order; a queued writer blocks later readers).

QEMU's CoMutex is lock-free so that coroutines of different threads can
share it; here a tiny ``threading.Lock`` (``_guard``) makes each state
change atomic, which gives the same guarantees.  There is no lost wake-up:
a waiter queues itself under ``_guard`` and then yields; if an unlock in
another thread picks it in between, ``aio_co_wake`` *schedules* it in the
waiter's own context, whose home thread is the one running the waiter --
so the enter happens only after the yield (QEMU's argument too).

Deviations from QEMU (which asserts): unlocking a CoMutex the calling
coroutine does not hold, locking one it already holds, and unbalanced
CoRwlock operations raise CoroutineError; the coroutine-only functions
raise NotInCoroutineError outside a coroutine.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Iterator, Optional, Union
from contextlib import contextmanager

from ._core import (
    Coroutine,
    CoroutineError,
    _require_coroutine,
    aio_co_wake,
    qemu_coroutine_yield,
)

__all__ = [
    "CoMutex", "CoQueue", "CoRwlock",
    "qemu_co_mutex_init", "qemu_co_mutex_lock", "qemu_co_mutex_unlock",
    "qemu_co_mutex_assert_locked",
    "qemu_co_queue_init", "qemu_co_queue_wait", "qemu_co_queue_next",
    "qemu_co_queue_restart_all", "qemu_co_queue_empty",
    "qemu_co_enter_next", "qemu_co_enter_all",
    "qemu_co_rwlock_init", "qemu_co_rwlock_rdlock", "qemu_co_rwlock_wrlock",
    "qemu_co_rwlock_upgrade", "qemu_co_rwlock_downgrade", "qemu_co_rwlock_unlock",
]


# --------------------------------------------------------------------------
# CoMutex

class CoMutex:
    """Port of ``CoMutex``.  ``with mutex:`` locks it inside a coroutine.

    ``holder``    the coroutine owning the mutex, None when free; changed
                  only under ``_guard`` (lock, and unlock's hand-off).
    ``ctx``       the holder's AioContext (QEMU keeps it for its spinning
                  heuristic; informational here); under ``_guard``.
    ``_waiters``  coroutines waiting, oldest first; under ``_guard``.
    """

    __slots__ = ("holder", "ctx", "_waiters", "_guard")

    def __init__(self) -> None:
        qemu_co_mutex_init(self)

    def lock(self) -> None:
        qemu_co_mutex_lock(self)

    def unlock(self) -> None:
        qemu_co_mutex_unlock(self)

    @property
    def locked(self) -> bool:
        return self.holder is not None

    def __enter__(self) -> "CoMutex":
        qemu_co_mutex_lock(self)
        return self

    def __exit__(self, *exc: object) -> None:
        qemu_co_mutex_unlock(self)

    def __repr__(self) -> str:
        h = self.holder
        return (f"<CoMutex {'held by ' + repr(h.name) if h is not None else 'free'}"
                f", {len(self._waiters)} waiting>")


def _check_mutex(m: object, fn: str) -> CoMutex:
    if not isinstance(m, CoMutex):
        raise TypeError(f"{fn}: expected a CoMutex, got {type(m).__name__}")
    return m


def qemu_co_mutex_init(mutex: CoMutex) -> None:
    """Port of ``qemu_co_mutex_init``: (re)initialise an unlocked mutex."""
    _check_mutex(mutex, "qemu_co_mutex_init")
    mutex.holder = None
    mutex.ctx = None
    mutex._waiters = collections.deque()
    mutex._guard = threading.Lock()


def qemu_co_mutex_lock(mutex: CoMutex) -> None:
    """Port of ``qemu_co_mutex_lock``.  Coroutine only; yields while contended."""
    _check_mutex(mutex, "qemu_co_mutex_lock")
    self = _require_coroutine("qemu_co_mutex_lock")
    with mutex._guard:
        holder = mutex.holder
        if holder is None:
            mutex.holder = self
            mutex.ctx = self.ctx
            self.locks_held += 1
            return
        if holder is self:
            raise CoroutineError(
                f"qemu_co_mutex_lock: coroutine {self.name!r} already holds this CoMutex "
                "(it is not recursive)")
        mutex._waiters.append(self)
    # Unlock hands the mutex over (holder = self) before waking us; loop in
    # case somebody else enters us early.
    while True:
        qemu_coroutine_yield()
        if mutex.holder is self:
            break
    self.locks_held += 1


def qemu_co_mutex_unlock(mutex: CoMutex) -> None:
    """Port of ``qemu_co_mutex_unlock``: hand the mutex to the oldest waiter.

    Coroutine only.  Raises CoroutineError if the calling coroutine does not
    hold the mutex.
    """
    _check_mutex(mutex, "qemu_co_mutex_unlock")
    self = _require_coroutine("qemu_co_mutex_unlock")
    with mutex._guard:
        holder = mutex.holder
        if holder is not self:
            who = "nobody" if holder is None else f"coroutine {holder.name!r}"
            raise CoroutineError(
                f"qemu_co_mutex_unlock: coroutine {self.name!r} does not hold this "
                f"CoMutex (held by {who})")
        self.locks_held -= 1
        if mutex._waiters:
            nxt: Optional[Coroutine] = mutex._waiters.popleft()
            mutex.holder = nxt
            mutex.ctx = nxt.ctx  # type: ignore[union-attr]
        else:
            nxt = None
            mutex.holder = None
            mutex.ctx = None
    if nxt is not None:
        aio_co_wake(nxt)


def qemu_co_mutex_assert_locked(mutex: CoMutex) -> None:
    """Port of ``qemu_co_mutex_assert_locked``: raise unless the running
    coroutine holds ``mutex``."""
    self = _require_coroutine("qemu_co_mutex_assert_locked")
    if _check_mutex(mutex, "qemu_co_mutex_assert_locked").holder is not self:
        raise CoroutineError(f"coroutine {self.name!r} does not hold {mutex!r}")


# --------------------------------------------------------------------------
# CoQueue

Lockable = Union[CoMutex, Any, None]


def _lockable(lock: object, fn: str) -> tuple[Any, Any]:
    """(unlock, lock) callables for QEMU's QemuLockable: a CoMutex, None, or
    a thread lock with acquire/release (QemuMutex)."""
    if lock is None:
        return None, None
    if isinstance(lock, CoMutex):
        return lock.unlock, lock.lock
    acq = getattr(lock, "acquire", None)
    rel = getattr(lock, "release", None)
    if callable(acq) and callable(rel):
        return rel, acq
    raise TypeError(f"{fn}: lock must be a CoMutex, a thread lock or None, "
                    f"got {type(lock).__name__}")


class CoQueue:
    """Port of ``CoQueue``.

    ``entries``  waiting coroutines, oldest first.  Like QEMU's, the queue
                 itself is not thread-safe: users protect it with the lock
                 they pass to ``wait`` (or use it from one thread).
    """

    __slots__ = ("entries",)

    def __init__(self) -> None:
        qemu_co_queue_init(self)

    def wait(self, lock: Lockable = None) -> None:
        qemu_co_queue_wait(self, lock)

    def next(self) -> bool:
        return qemu_co_queue_next(self)

    def restart_all(self) -> None:
        qemu_co_queue_restart_all(self)

    def enter_next(self, lock: Lockable = None) -> bool:
        return qemu_co_enter_next(self, lock)

    def enter_all(self, lock: Lockable = None) -> None:
        qemu_co_enter_all(self, lock)

    def empty(self) -> bool:
        return qemu_co_queue_empty(self)

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"<CoQueue {len(self.entries)} waiting>"


def _check_queue(q: object, fn: str) -> CoQueue:
    if not isinstance(q, CoQueue):
        raise TypeError(f"{fn}: expected a CoQueue, got {type(q).__name__}")
    return q


def qemu_co_queue_init(queue: CoQueue) -> None:
    """Port of ``qemu_co_queue_init``."""
    _check_queue(queue, "qemu_co_queue_init").entries = collections.deque()


def qemu_co_queue_wait(queue: CoQueue, lock: Lockable = None) -> None:
    """Port of ``qemu_co_queue_wait``: wait until woken by next/restart_all.

    ``lock`` (a CoMutex, a thread lock, or None) is released while waiting
    and re-taken before returning.  Coroutine only.
    """
    _check_queue(queue, "qemu_co_queue_wait")
    unlock, relock = _lockable(lock, "qemu_co_queue_wait")
    self = _require_coroutine("qemu_co_queue_wait")
    queue.entries.append(self)
    if unlock is not None:
        unlock()
    # No race: a waker in another thread goes through aio_co_schedule, which
    # can enter us only after this yield.
    qemu_coroutine_yield()
    if relock is not None:
        relock()


def _do_restart(queue: CoQueue, single: bool) -> bool:
    entries = queue.entries
    if not entries:
        return False
    while entries:
        aio_co_wake(entries.popleft())
        if single:
            break
    return True


def qemu_co_queue_next(queue: CoQueue) -> bool:
    """Port of ``qemu_co_queue_next``: wake the oldest waiter; False if none.
    Coroutine only (use ``qemu_co_enter_next`` outside)."""
    _check_queue(queue, "qemu_co_queue_next")
    _require_coroutine("qemu_co_queue_next")
    return _do_restart(queue, True)


def qemu_co_queue_restart_all(queue: CoQueue) -> None:
    """Port of ``qemu_co_queue_restart_all``: wake every waiter.  Coroutine only."""
    _check_queue(queue, "qemu_co_queue_restart_all")
    _require_coroutine("qemu_co_queue_restart_all")
    _do_restart(queue, False)


def qemu_co_enter_next(queue: CoQueue, lock: Lockable = None) -> bool:
    """Port of ``qemu_co_enter_next``: wake the oldest waiter from anywhere,
    dropping ``lock`` around the wake-up.  False if the queue was empty."""
    _check_queue(queue, "qemu_co_enter_next")
    unlock, relock = _lockable(lock, "qemu_co_enter_next")
    if not queue.entries:
        return False
    nxt = queue.entries.popleft()
    if unlock is not None:
        unlock()
    try:
        aio_co_wake(nxt)
    finally:
        if relock is not None:
            relock()
    return True


def qemu_co_enter_all(queue: CoQueue, lock: Lockable = None) -> None:
    """Port of ``qemu_co_enter_all``: ``qemu_co_enter_next`` until empty."""
    while qemu_co_enter_next(queue, lock):
        pass


def qemu_co_queue_empty(queue: CoQueue) -> bool:
    """Port of ``qemu_co_queue_empty``."""
    return not _check_queue(queue, "qemu_co_queue_empty").entries


# --------------------------------------------------------------------------
# CoRwlock

class CoRwlock:
    """Port of ``CoRwlock`` (the ticket-based implementation).

    ``owners``   >0: that many readers hold it; -1: a writer holds it; 0: free.
    ``tickets``  (is_read, coroutine) waiting, in arrival order.
    Both are protected by the internal CoMutex ``mutex``.
    """

    __slots__ = ("mutex", "owners", "tickets")

    def __init__(self) -> None:
        qemu_co_rwlock_init(self)

    def rdlock(self) -> None:
        qemu_co_rwlock_rdlock(self)

    def wrlock(self) -> None:
        qemu_co_rwlock_wrlock(self)

    def upgrade(self) -> None:
        qemu_co_rwlock_upgrade(self)

    def downgrade(self) -> None:
        qemu_co_rwlock_downgrade(self)

    def unlock(self) -> None:
        qemu_co_rwlock_unlock(self)

    @contextmanager
    def reader(self) -> Iterator["CoRwlock"]:
        """``with rw.reader():`` -- rdlock ... unlock."""
        qemu_co_rwlock_rdlock(self)
        try:
            yield self
        finally:
            qemu_co_rwlock_unlock(self)

    @contextmanager
    def writer(self) -> Iterator["CoRwlock"]:
        """``with rw.writer():`` -- wrlock ... unlock."""
        qemu_co_rwlock_wrlock(self)
        try:
            yield self
        finally:
            qemu_co_rwlock_unlock(self)

    def __repr__(self) -> str:
        o = self.owners
        state = "free" if o == 0 else "write-locked" if o < 0 else f"{o} reader(s)"
        return f"<CoRwlock {state}, {len(self.tickets)} waiting>"


def _check_rw(lock: object, fn: str) -> CoRwlock:
    if not isinstance(lock, CoRwlock):
        raise TypeError(f"{fn}: expected a CoRwlock, got {type(lock).__name__}")
    return lock


def qemu_co_rwlock_init(lock: CoRwlock) -> None:
    """Port of ``qemu_co_rwlock_init``."""
    _check_rw(lock, "qemu_co_rwlock_init")
    lock.mutex = CoMutex()
    lock.owners = 0
    lock.tickets = collections.deque()


def _maybe_wake_one(lock: CoRwlock) -> None:
    """Port of ``qemu_co_rwlock_maybe_wake_one``; releases ``lock.mutex``.

    Ownership is given to the woken coroutine here (owners updated before
    the wake), so no rdlock/wrlock can sneak in between unlock and wake.
    """
    co: Optional[Coroutine] = None
    if lock.tickets:
        is_read, waiter = lock.tickets[0]
        if is_read:
            if lock.owners >= 0:
                lock.owners += 1
                co = waiter
        elif lock.owners == 0:
            lock.owners = -1
            co = waiter
    if co is not None:
        lock.tickets.popleft()
        qemu_co_mutex_unlock(lock.mutex)
        aio_co_wake(co)
    else:
        qemu_co_mutex_unlock(lock.mutex)


def qemu_co_rwlock_rdlock(lock: CoRwlock) -> None:
    """Port of ``qemu_co_rwlock_rdlock``.  Coroutine only."""
    _check_rw(lock, "qemu_co_rwlock_rdlock")
    self = _require_coroutine("qemu_co_rwlock_rdlock")
    qemu_co_mutex_lock(lock.mutex)
    # For fairness, wait if a writer is in line.
    if lock.owners == 0 or (lock.owners > 0 and not lock.tickets):
        lock.owners += 1
        qemu_co_mutex_unlock(lock.mutex)
    else:
        lock.tickets.append((True, self))
        qemu_co_mutex_unlock(lock.mutex)
        qemu_coroutine_yield()
        assert lock.owners >= 1
        # Possibly wake another reader, which will wake the next in line.
        qemu_co_mutex_lock(lock.mutex)
        _maybe_wake_one(lock)
    self.locks_held += 1


def qemu_co_rwlock_unlock(lock: CoRwlock) -> None:
    """Port of ``qemu_co_rwlock_unlock``: release a read or write lock.
    Coroutine only; raises CoroutineError if the lock is not held."""
    _check_rw(lock, "qemu_co_rwlock_unlock")
    self = _require_coroutine("qemu_co_rwlock_unlock")
    qemu_co_mutex_lock(lock.mutex)
    if lock.owners > 0:
        lock.owners -= 1
    elif lock.owners == -1:
        lock.owners = 0
    else:
        qemu_co_mutex_unlock(lock.mutex)
        raise CoroutineError("qemu_co_rwlock_unlock: the CoRwlock is not locked")
    self.locks_held -= 1
    _maybe_wake_one(lock)


def qemu_co_rwlock_downgrade(lock: CoRwlock) -> None:
    """Port of ``qemu_co_rwlock_downgrade``: write lock -> read lock.
    Coroutine only."""
    _check_rw(lock, "qemu_co_rwlock_downgrade")
    _require_coroutine("qemu_co_rwlock_downgrade")
    qemu_co_mutex_lock(lock.mutex)
    if lock.owners != -1:
        qemu_co_mutex_unlock(lock.mutex)
        raise CoroutineError("qemu_co_rwlock_downgrade: the CoRwlock is not write-locked")
    lock.owners = 1
    # Possibly wake another reader, which will wake the next in line.
    _maybe_wake_one(lock)


def qemu_co_rwlock_wrlock(lock: CoRwlock) -> None:
    """Port of ``qemu_co_rwlock_wrlock``.  Coroutine only."""
    _check_rw(lock, "qemu_co_rwlock_wrlock")
    self = _require_coroutine("qemu_co_rwlock_wrlock")
    qemu_co_mutex_lock(lock.mutex)
    if lock.owners == 0:
        lock.owners = -1
        qemu_co_mutex_unlock(lock.mutex)
    else:
        lock.tickets.append((False, self))
        qemu_co_mutex_unlock(lock.mutex)
        qemu_coroutine_yield()
        assert lock.owners == -1
    self.locks_held += 1


def qemu_co_rwlock_upgrade(lock: CoRwlock) -> None:
    """Port of ``qemu_co_rwlock_upgrade``: read lock -> write lock, waiting
    (behind writers already in line) for the other readers to leave.
    Coroutine only."""
    _check_rw(lock, "qemu_co_rwlock_upgrade")
    self = _require_coroutine("qemu_co_rwlock_upgrade")
    qemu_co_mutex_lock(lock.mutex)
    if lock.owners <= 0:
        qemu_co_mutex_unlock(lock.mutex)
        raise CoroutineError("qemu_co_rwlock_upgrade: the CoRwlock is not read-locked")
    # For fairness, wait if a writer is in line.
    if lock.owners == 1 and not lock.tickets:
        lock.owners = -1
        qemu_co_mutex_unlock(lock.mutex)
    else:
        lock.owners -= 1
        lock.tickets.append((False, self))
        _maybe_wake_one(lock)
        qemu_coroutine_yield()
        assert lock.owners == -1
