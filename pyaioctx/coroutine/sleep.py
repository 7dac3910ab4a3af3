# SPDX-License-Identifier: GPL-2.0-or-later
"""Coroutine sleep: port of util/qemu-coroutine-sleep.c."""

from __future__ import annotations

from typing import Optional

from ..aio import aio_timer_init
from ..timer import SCALE_NS, QEMUTimer, qemu_clock_get_ns, timer_del, timer_mod
from ._core import (
    Coroutine,
    CoroutineError,
    _current_lt,
    _require_coroutine,
    _schedule_mark,
    _sched_lock,
    aio_co_wake,
    qemu_coroutine_yield,
)

__all__ = ["QemuCoSleep", "qemu_co_sleep", "qemu_co_sleep_wake",
           "qemu_co_sleep_ns_wakeable", "qemu_co_sleep_ns"]

_SCHEDULED = "qemu_co_sleep_ns"


def _type_name(x: object) -> str:
    return type(x).__name__


class QemuCoSleep:
    """Port of ``QemuCoSleep``: lets another party wake a sleeping coroutine.

    ``to_wake`` is the sleeping coroutine, None when nobody sleeps; set by
    the sleeper, cleared by the waker (home thread of the sleeper's context).
    """

    __slots__ = ("to_wake",)

    def __init__(self) -> None:
        self.to_wake: Optional[Coroutine] = None


def qemu_co_sleep_wake(w: QemuCoSleep) -> None:
    """Port of ``qemu_co_sleep_wake``: wake the coroutine sleeping on ``w``
    (no-op if none).  Call it from the sleeper's home thread."""
    co = w.to_wake
    w.to_wake = None
    if co is not None:
        with _sched_lock:
            if co.scheduled != _SCHEDULED:
                raise CoroutineError(
                    f"qemu_co_sleep_wake: coroutine {co.name!r} is not sleeping "
                    f"(scheduled={co.scheduled!r})")
            co.scheduled = None
        aio_co_wake(co)


def _co_sleep_cb(w: QemuCoSleep) -> None:
    qemu_co_sleep_wake(w)


def qemu_co_sleep(w: QemuCoSleep) -> None:
    """Port of ``qemu_co_sleep``: yield until ``qemu_co_sleep_wake(w)``.  Coroutine only."""
    if not isinstance(w, QemuCoSleep):
        raise TypeError(f"qemu_co_sleep: expected a QemuCoSleep, got {type(w).__name__}")
    co = _require_coroutine("qemu_co_sleep")
    # Marking the coroutine scheduled makes any stray enter raise instead
    # of resuming the sleeper early.
    _schedule_mark(co, _SCHEDULED)
    w.to_wake = co
    qemu_coroutine_yield()
    # w.to_wake is cleared before the coroutine is resumed.
    assert w.to_wake is None


def qemu_co_sleep_ns_wakeable(w: QemuCoSleep, type: int, ns: int) -> None:
    """Port of ``qemu_co_sleep_ns_wakeable``: sleep ``ns`` on clock ``type``
    unless woken earlier through ``w``.  Coroutine only; the thread must have
    an AioContext (the timer fires there)."""
    if not isinstance(ns, int) or isinstance(ns, bool):
        raise TypeError(f"qemu_co_sleep_ns: ns must be an int, got {_type_name(ns)}")
    _require_coroutine("qemu_co_sleep_ns")
    ctx = _current_lt().ctx
    if ctx is None:
        raise CoroutineError("qemu_co_sleep_ns: the current thread has no AioContext "
                             "(call qemu_init_main_loop or qemu_set_current_aio_context)")
    ts = QEMUTimer()
    aio_timer_init(ctx, ts, type, SCALE_NS, _co_sleep_cb, w)
    timer_mod(ts, qemu_clock_get_ns(type) + ns)
    # The timer fires in this context's thread, i.e. only after the yield
    # in qemu_co_sleep: no race between timer_mod and the sleep.
    try:
        qemu_co_sleep(w)
    finally:
        timer_del(ts)


def qemu_co_sleep_ns(type: int, ns: int) -> None:
    """Port of ``qemu_co_sleep_ns``: yield for ``ns`` nanoseconds of clock
    ``type`` (QEMU_CLOCK_REALTIME, QEMU_CLOCK_VIRTUAL, ...).  Coroutine only."""
    qemu_co_sleep_ns_wakeable(QemuCoSleep(), type, ns)
