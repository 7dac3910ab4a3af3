# SPDX-License-Identifier: GPL-2.0-or-later
"""Clocks and timers: port of QEMU's util/qemu-timer.c (the AioContext part).

Each AioContext owns a timer-list group: one list (a heap) of active timers
per clock.  ``aio_poll`` sleeps no longer than the group's nearest deadline and
runs the expired timers after dispatching handlers.

A discussion about time (why the structures look like this):

* Timers are kept in a binary heap (``heapq``) of ``(expire_ns, seq,
  timer)`` tuples: arming and firing are O(log n) whatever order timers are
  armed in (a sorted list costs a memmove of the whole list per insert in
  the unlucky order).  QEMU uses a sorted linked list, which in Python would
  be slower for every size that matters.  ``seq`` is unique, so the timer
  object is never compared, and it breaks ties so timers with the same
  expiry fire in the order they were armed, like QEMU's insert-after-equal
  rule.
* As curio's time queue observes, most timeouts are cancelled or moved
  before they fire.  Deleting a timer therefore only marks its heap entry
  dead (O(1)); dead entries are dropped when they reach the top, or all at
  once when they outnumber the live ones.
* ``timer_mod`` may be called from any thread (QEMU takes
  ``active_timers_lock``); when the new timer becomes the list head the
  owning context is notified so a blocked ``aio_poll`` recomputes its
  deadline.
* The virtual clock does not run by itself: pyaioctx has no guest CPU.  It
  starts at 0 and moves only through :func:`qemu_clock_advance_virtual_time`
  (the helper QEMU's qtest uses), which makes timer tests deterministic.
  ``QEMU_CLOCK_VIRTUAL_RT`` follows the realtime clock, as it does in QEMU
  when icount is off.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
import weakref
from typing import Any, Callable, Optional

__all__ = [
    "QEMU_CLOCK_REALTIME",
    "QEMU_CLOCK_VIRTUAL",
    "QEMU_CLOCK_HOST",
    "QEMU_CLOCK_VIRTUAL_RT",
    "QEMU_CLOCK_MAX",
    "SCALE_NS",
    "SCALE_US",
    "SCALE_MS",
    "QEMUTimer",
    "QEMUTimerList",
    "QEMUTimerListGroup",
    "qemu_clock_get_ns",
    "qemu_clock_get_us",
    "qemu_clock_get_ms",
    "qemu_clock_advance_virtual_time",
    "qemu_clock_enable",
    "qemu_clock_is_enabled",
    "timer_init",
    "timer_init_full",
    "timer_mod",
    "timer_mod_ns",
    "timer_mod_anticipate",
    "timer_mod_anticipate_ns",
    "timer_del",
    "timer_deinit",
    "timer_free",
    "timer_pending",
    "timer_expired",
    "timer_expire_time_ns",
    "qemu_soonest_timeout",
]

QEMU_CLOCK_REALTIME = 0
QEMU_CLOCK_VIRTUAL = 1
QEMU_CLOCK_HOST = 2
QEMU_CLOCK_VIRTUAL_RT = 3
QEMU_CLOCK_MAX = 4

SCALE_MS = 1_000_000
SCALE_US = 1_000
SCALE_NS = 1

_CLOCK_NAMES = ("realtime", "virtual", "host", "virtual_rt")

_virtual_ns = 0
_virtual_lock = threading.Lock()
_clock_enabled = [True] * QEMU_CLOCK_MAX
# Timer lists per clock, so advancing or enabling a clock can notify them.
_lists_by_clock: list[weakref.WeakSet] = [weakref.WeakSet() for _ in range(QEMU_CLOCK_MAX)]

_monotonic_ns = time.monotonic_ns
_time_ns = time.time_ns


def _virtual() -> int:
    return _virtual_ns


# Indexable by clock type; the hot path calls _CLOCKS[type]().
_CLOCKS: tuple[Callable[[], int], ...] = (_monotonic_ns, _virtual, _time_ns, _monotonic_ns)


def _check_clock(type: int) -> int:
    if type.__class__ is not int and not isinstance(type, int):
        raise TypeError(f"clock type must be an int (QEMU_CLOCK_*), got {type.__class__.__name__}")
    if not 0 <= type < QEMU_CLOCK_MAX:
        raise ValueError(f"unknown clock type {type}; use QEMU_CLOCK_REALTIME/VIRTUAL/HOST/VIRTUAL_RT")
    return type


def qemu_clock_get_ns(type: int) -> int:
    """Port of ``qemu_clock_get_ns``: the clock's current value in ns."""
    return _CLOCKS[_check_clock(type)]()


def qemu_clock_get_us(type: int) -> int:
    """Port of ``qemu_clock_get_us``."""
    return qemu_clock_get_ns(type) // SCALE_US


def qemu_clock_get_ms(type: int) -> int:
    """Port of ``qemu_clock_get_ms``."""
    return qemu_clock_get_ns(type) // SCALE_MS


def _notify_clock(type: int) -> None:
    for tl in list(_lists_by_clock[type]):
        tl.notify()


def qemu_clock_advance_virtual_time(dest: int) -> int:
    """Move the virtual clock forward to ``dest`` ns (QEMU's qtest helper).

    The clock never goes backwards.  Every context with virtual-clock timers
    is notified; the expired timers run on that context's next ``aio_poll``
    in its home thread.  Returns the clock's new value.
    """
    global _virtual_ns
    with _virtual_lock:
        if dest > _virtual_ns:
            _virtual_ns = int(dest)
        now = _virtual_ns
    _notify_clock(QEMU_CLOCK_VIRTUAL)
    return now


def qemu_clock_enable(type: int, enabled: bool) -> None:
    """Port of ``qemu_clock_enable``: a disabled clock's timers do not run."""
    _check_clock(type)
    _clock_enabled[type] = bool(enabled)
    _notify_clock(type)


def qemu_clock_is_enabled(type: int) -> bool:
    """Port of ``qemu_clock_is_enabled``."""
    return _clock_enabled[_check_clock(type)]


def qemu_soonest_timeout(a: int, b: int) -> int:
    """Port of ``qemu_soonest_timeout``: min where -1 means infinity."""
    return a if (a & 0xFFFFFFFFFFFFFFFF) < (b & 0xFFFFFFFFFFFFFFFF) else b


class QEMUTimerList:
    """Active timers of one clock in one AioContext (QEMU's QEMUTimerList).

    ``_active``  a binary heap of ``(expire_ns, seq, timer)``; an entry is
                 live only while ``timer._key is entry`` (deleting or
                 re-arming a timer leaves its old entry behind, dead, to be
                 dropped when it reaches the top or when dead entries
                 outnumber live ones).  Any thread, under ``_lock``.
    ``_dead``    number of dead entries in the heap; under ``_lock``.
    ``notify``   called when the earliest expiry moves earlier (aio_notify).
    """

    __slots__ = ("clock_type", "_active", "_dead", "_lock", "_notify_cb", "__weakref__")

    def __init__(self, clock_type: int, notify_cb: Callable[[], None]) -> None:
        self.clock_type = clock_type
        self._active: list[tuple[int, int, QEMUTimer]] = []
        self._dead = 0
        self._lock = threading.Lock()
        self._notify_cb = notify_cb
        _lists_by_clock[clock_type].add(self)

    def notify(self) -> None:
        self._notify_cb()

    def has_timers(self) -> bool:
        return len(self._active) > self._dead

    def _head_locked(self) -> Optional[tuple[int, int, "QEMUTimer"]]:
        active = self._active
        while active:
            entry = active[0]
            if entry[2]._key is entry:
                return entry
            heapq.heappop(active)
            self._dead -= 1
        return None

    def deadline_ns(self) -> int:
        """Port of ``timerlist_deadline_ns``: ns until the first expiry, -1 if none."""
        if not self._active or not _clock_enabled[self.clock_type]:
            return -1
        with self._lock:
            head = self._head_locked()
        if head is None:
            return -1
        delta = head[0] - _CLOCKS[self.clock_type]()
        return delta if delta > 0 else 0

    def run_timers(self) -> bool:
        """Port of ``timerlist_run_timers``: run expired timers; True if any ran.

        Each timer is unlinked before its callback runs, and the lock is not
        held during the callback, so callbacks may re-arm or delete any timer
        (including their own, and others that are also due).
        """
        active = self._active
        if not active or not _clock_enabled[self.clock_type]:
            return False
        now = _CLOCKS[self.clock_type]()
        progress = False
        lock = self._lock
        acquire = lock.acquire
        release = lock.release
        heappop = heapq.heappop
        while True:
            # One timer at a time, re-checking the head under the lock: a
            # callback may delete or re-arm timers that are also due.
            acquire()
            head = self._head_locked()
            if head is None or head[0] > now:
                release()
                break
            heappop(active)
            ts = head[2]
            ts._key = None
            ts.expire_time = -1
            release()
            ts.cb(ts.opaque)
            progress = True
        return progress

    def _insert_locked(self, ts: "QEMUTimer", expire_ns: int) -> bool:
        key = (expire_ns, next(_seq), ts)
        ts._key = key
        ts.expire_time = expire_ns
        active = self._active
        heapq.heappush(active, key)
        return active[0] is key  # the new head: the deadline moved earlier

    def _remove_locked(self, ts: "QEMUTimer") -> None:
        if ts._key is None:
            return
        ts._key = None
        ts.expire_time = -1
        self._dead += 1
        active = self._active
        # Most timers are deleted or re-armed before they fire; compact
        # once the dead outnumber the live so the heap stays O(live).
        if self._dead > 64 and self._dead * 2 > len(active):
            live = [e for e in active if e[2]._key is e]
            heapq.heapify(live)
            active[:] = live
            self._dead = 0

    def live_timers(self) -> list["QEMUTimer"]:
        """The pending timers, earliest first (a snapshot)."""
        with self._lock:
            return [e[2] for e in sorted(self._active) if e[2]._key is e]

    def clear(self) -> None:
        """Disarm every timer (the context is being finalised)."""
        with self._lock:
            for e in self._active:
                if e[2]._key is e:
                    e[2]._key = None
                    e[2].expire_time = -1
            self._active.clear()
            self._dead = 0


# itertools.count is atomic under the GIL: a unique tiebreaker per arm.
_seq = itertools.count()


class QEMUTimerListGroup:
    """One timer list per clock (QEMU's QEMUTimerListGroup)."""

    __slots__ = ("tl",)

    def __init__(self, notify_cb: Callable[[], None]) -> None:
        self.tl = tuple(QEMUTimerList(t, notify_cb) for t in range(QEMU_CLOCK_MAX))

    def deadline_ns(self) -> int:
        """Port of ``timerlistgroup_deadline_ns``."""
        deadline = -1
        for tl in self.tl:
            if tl._active:
                d = tl.deadline_ns()
                if d >= 0 and (deadline < 0 or d < deadline):
                    deadline = d
        return deadline

    def run_timers(self) -> bool:
        """Port of ``timerlistgroup_run_timers``."""
        progress = False
        for tl in self.tl:
            if tl._active and tl.run_timers():
                progress = True
        return progress

    def has_timers(self) -> bool:
        return any(tl.has_timers() for tl in self.tl)

    def pending_names(self) -> list[str]:
        return [ts.name for tl in self.tl for ts in tl.live_timers()]


class QEMUTimer:
    """QEMU's ``QEMUTimer``: instantiate, then ``aio_timer_init`` / ``timer_init``.

    ``expire_time`` is in ns (-1 when not pending).  ``name`` defaults to the
    callback's ``__qualname__`` and appears in diagnostics.
    """

    __slots__ = ("timer_list", "cb", "opaque", "scale", "attributes", "expire_time", "name", "_key")

    def __init__(self) -> None:
        self.timer_list: QEMUTimerList | None = None
        self.cb: Callable[[Any], None] | None = None
        self.opaque: Any = None
        self.scale = SCALE_NS
        self.attributes = 0
        self.expire_time = -1
        self.name = "<uninitialized timer>"
        self._key: tuple | None = None

    # Pythonic face -------------------------------------------------------
    def mod(self, expire: int) -> None:
        timer_mod(self, expire)

    def mod_ns(self, expire_ns: int) -> None:
        timer_mod_ns(self, expire_ns)

    def delete(self) -> None:
        timer_del(self)

    @property
    def pending(self) -> bool:
        return self._key is not None

    def __repr__(self) -> str:
        clock = _CLOCK_NAMES[self.timer_list.clock_type] if self.timer_list else "?"
        state = f"expires at {self.expire_time} ns" if self._key else "idle"
        return f"<QEMUTimer {self.name!r} clock={clock} {state}>"


def _check_timer(ts: object) -> QEMUTimer:
    if not isinstance(ts, QEMUTimer):
        raise TypeError(f"expected a QEMUTimer, got {type(ts).__name__}")
    if ts.timer_list is None:
        raise RuntimeError(f"{ts!r} is not initialised (call aio_timer_init first)")
    return ts


def timer_init_full(ts: QEMUTimer, timer_list: QEMUTimerList, scale: int,
                    attributes: int, cb: Callable[[Any], None], opaque: Any,
                    name: str | None = None) -> None:
    """Port of ``timer_init_full`` with an explicit timer list."""
    if not isinstance(ts, QEMUTimer):
        raise TypeError(f"expected a QEMUTimer, got {type(ts).__name__}")
    if not callable(cb):
        raise TypeError(f"timer callback must be callable, got {type(cb).__name__}")
    if not isinstance(scale, int) or scale <= 0:
        raise ValueError(f"timer scale must be a positive int (SCALE_NS/US/MS), got {scale!r}")
    ts.timer_list = timer_list
    ts.cb = cb
    ts.opaque = opaque
    ts.scale = scale
    ts.attributes = attributes
    ts.expire_time = -1
    ts._key = None
    ts.name = name or getattr(cb, "__qualname__", repr(cb))


def timer_init(ts: QEMUTimer, timer_list: QEMUTimerList, scale: int,
               cb: Callable[[Any], None], opaque: Any) -> None:
    """Port of ``timer_init_tl``."""
    timer_init_full(ts, timer_list, scale, 0, cb, opaque)


def timer_mod_ns(ts: QEMUTimer, expire_time: int) -> None:
    """Port of ``timer_mod_ns``: (re)arm at ``expire_time`` ns.  Any thread."""
    _check_timer(ts)
    tl = ts.timer_list
    if expire_time < 0:
        expire_time = 0
    with tl._lock:
        tl._remove_locked(ts)
        rearm = tl._insert_locked(ts, int(expire_time))
    if rearm:
        tl._notify_cb()


def timer_mod(ts: QEMUTimer, expire_time: int) -> None:
    """Port of ``timer_mod``: ``expire_time`` is in the timer's scale."""
    _check_timer(ts)
    timer_mod_ns(ts, expire_time * ts.scale)


def timer_mod_anticipate_ns(ts: QEMUTimer, expire_time: int) -> None:
    """Port of ``timer_mod_anticipate_ns``: only ever move the expiry earlier."""
    _check_timer(ts)
    tl = ts.timer_list
    if expire_time < 0:
        expire_time = 0
    with tl._lock:
        if ts._key is not None and ts.expire_time <= expire_time:
            return
        tl._remove_locked(ts)
        rearm = tl._insert_locked(ts, int(expire_time))
    if rearm:
        tl._notify_cb()


def timer_mod_anticipate(ts: QEMUTimer, expire_time: int) -> None:
    """Port of ``timer_mod_anticipate``."""
    _check_timer(ts)
    timer_mod_anticipate_ns(ts, expire_time * ts.scale)


def timer_del(ts: QEMUTimer) -> None:
    """Port of ``timer_del``: disarm; harmless if not pending.  Any thread."""
    if not isinstance(ts, QEMUTimer):
        raise TypeError(f"expected a QEMUTimer, got {type(ts).__name__}")
    tl = ts.timer_list
    if tl is None or ts._key is None:
        return
    with tl._lock:
        tl._remove_locked(ts)


def timer_deinit(ts: QEMUTimer) -> None:
    """Port of ``timer_deinit``: the timer must not be pending."""
    timer_del(ts)
    ts.timer_list = None


def timer_free(ts: QEMUTimer | None) -> None:
    """Port of ``timer_free``: delete and forget (None is accepted, as in C)."""
    if ts is None:
        return
    timer_del(ts)
    ts.timer_list = None


def timer_pending(ts: QEMUTimer) -> bool:
    """Port of ``timer_pending``."""
    if not isinstance(ts, QEMUTimer):
        raise TypeError(f"expected a QEMUTimer, got {type(ts).__name__}")
    return ts._key is not None


def timer_expired(ts: QEMUTimer, current_time: int) -> bool:
    """Port of ``timer_expired``: ``current_time`` is in the timer's scale."""
    return ts._key is not None and ts.expire_time <= current_time * ts.scale


def timer_expire_time_ns(ts: QEMUTimer) -> int:
    """Port of ``timer_expire_time_ns``: expiry in ns, -1 if not pending."""
    return ts.expire_time if ts._key is not None else -1
