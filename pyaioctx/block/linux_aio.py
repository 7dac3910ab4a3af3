# SPDX-License-Identifier: GPL-2.0-or-later
"""Linux native AIO: port of QEMU's block/linux-aio.c.

The seed is QEMU 2.8's driver; the later QEMU fixes that fix real bugs are
folded in and marked where they apply.  What it keeps, exactly:

* **The batching queue** (``LaioQueue``).  Requests are appended to
  ``pending``; ``ioq_submit`` hands a prefix of at most
  ``MAX_EVENTS - in_flight`` iocbs to one ``io_submit``.  ``-EAGAIN`` leaves
  the rest queued (``blocked``) until a completion makes room; any other
  error fails the *first* request and retries the rest; a partial submit
  keeps the unaccepted tail queued.  While plugged (``laio_io_plug``)
  requests are held until the last unplug, or until ``MAX_EVENTS`` are in
  flight or queued (or ``aio_max_batch`` are queued, when the context sets
  one with ``aio_context_set_aio_params``).
* **The syscall-free completion ring.**  Every iocb asks the kernel to
  signal one eventfd (``IOCB_FLAG_RESFD``); completions are then read from
  the kernel's user-space ``aio_ring`` with ``peek``/``commit`` -- no
  ``io_getevents`` call.  The memory-ordering argument is in
  :class:`pyaioctx._sys.aio_abi.AioRing`: the kernel publishes ``tail``
  after the event (smp_wmb in aio_complete); we load ``tail`` before the
  events it covers (on x86, TSO keeps loads in order; QEMU's smp_rmb) and
  store ``head`` only after copying the events out.  On CPUs where that
  cannot be guaranteed from Python the driver falls back to
  ``io_getevents`` with a zero timeout.
* **The re-entrant completion bottom half.**  A completion callback may run
  a nested ``aio_poll()``.  So the completion walk (1) reschedules its BH
  before calling out, so a nested event loop sees the pending completions,
  (2) keeps its cursor (``event_idx``/``event_max``) in the state object, so
  a nested walk continues the same batch and the outer walk stops when the
  nested one consumed it, and (3) changes the counters one event at a time.
  Deviation: what the callbacks submit is handed to the kernel between
  batches of completions and once half a queue is waiting, not only when
  the walk ends, and the outermost walk yields to the event loop after
  ``max_in_flight`` completions (see :func:`_walk_ring`).

OS facts this module relies on:

* Regular-file I/O through io_submit cannot be cancelled: ``io_cancel``
  returns ``-EINVAL`` (kernels before 4.19 could also return ``-EAGAIN``);
  the request then completes normally.  Queued, unsubmitted requests are
  ours to cancel.
* With O_DIRECT, a misaligned buffer, offset or length makes ``io_submit``
  fail the first iocb with ``-EINVAL``; a bad fd fails it with ``-EBADF``.
  Both complete that request with the error; the rest are retried.
* ``io_submit`` on a buffered fd may block in the kernel (it is synchronous
  there); that is why QEMU requires ``cache.direct=on`` for ``aio=native``.
* ``IOCB_CMD_FDSYNC`` is supported by the kernel only since Linux 4.18;
  :func:`laio_has_fdsync` probes it (QEMU's ``laio_has_fdsync``).
"""

from __future__ import annotations

import collections
import ctypes
import errno
import itertools
import operator
import os
import struct
from typing import Any, Optional

from ..aio import (
    AioContext,
    aio_bh_new_full,
    aio_bh_schedule_oneshot_full,
    aio_context_add_cleanup,
    aio_set_event_notifier,
    qemu_bh_cancel,
    qemu_bh_delete,
    qemu_bh_schedule,
)
from ..aiocb import AIOCBInfo, BlockAIOCB, qemu_aio_unref
from ..coroutine import qemu_coroutine_self as _coroutine_self
from ..coroutine import qemu_coroutine_yield as _coroutine_yield
from ..coroutine import qemu_in_coroutine as _in_coroutine
from ..coroutine._core import COROUTINE_YIELD as _COROUTINE_YIELD
from ..coroutine._core import _SUSPENDED, _RUNNING, _enter, _greenlet_here, _leader
from ..coroutine._core import _require_coroutine, _wake_unless_entered
from ..event_notifier import (
    EventNotifier,
    event_notifier_cleanup,
    event_notifier_get_fd,
    event_notifier_init,
    event_notifier_test_and_clear,
)
from ..iov import QEMUIOVector
from .._sys import aio_abi
from .._tls import _local as _tls_local
from .raw_aio import BDRV_SECTOR_SIZE, QEMU_AIO_FLUSH, QEMU_AIO_READ, QEMU_AIO_WRITE

__all__ = [
    "MAX_EVENTS",
    "DEFAULT_MAX_BATCH",
    "LaioQueue",
    "LinuxAioState",
    "laio_init",
    "laio_cleanup",
    "laio_attach_aio_context",
    "laio_detach_aio_context",
    "laio_co_submit",
    "laio_co_submit_direct",
    "laio_submit",
    "laio_io_plug",
    "laio_io_unplug",
    "laio_has_fdsync",
    "laio_probe",
    "aio_setup_linux_aio",
    "aio_get_linux_aio",
]

#: Queue size per LinuxAioState (the seed's ``MAX_EVENTS``): io_setup size
#: and the most requests in flight at once.  Kept modest on purpose:
#: fs.aio-max-nr is a machine-wide budget.
MAX_EVENTS = 128
#: Later QEMU's default batch size (``DEFAULT_MAX_BATCH``).  Here batching
#: beyond the seed's rule is opt-in: see :func:`_max_batch`.
DEFAULT_MAX_BATCH = 32

_EINPROGRESS = -errno.EINPROGRESS
_ECANCELED = -errno.ECANCELED
_ENOSPC = -errno.ENOSPC
_EAGAIN = -errno.EAGAIN

_CMD_PREADV = aio_abi.IOCB_CMD_PREADV
_CMD_PWRITEV = aio_abi.IOCB_CMD_PWRITEV
_CMD_FDSYNC = aio_abi.IOCB_CMD_FDSYNC
_FLAG_RESFD = aio_abi.IOCB_FLAG_RESFD
_iocb_prep = aio_abi.iocb_prep
# aio_abi.iocb_prep's store, for the submit path (None: use iocb_prep).
_iocb_pack = aio_abi._IOCB_STRUCT.pack_into if aio_abi._LITTLE else None
_io_submit = aio_abi.io_submit
# The per-request part of an iocb, from aio_lio_opcode to aio_offset (byte
# 16 to 48): opcode, reqprio, fd, buf, nbytes, offset.  Six values instead
# of the struct's fourteen (little-endian hosts, as _iocb_pack).
_IOCB_REQ_OFFSET = 16
_iocb_req_pack = struct.Struct("=HhIQQq").pack_into if _iocb_pack is not None else None
_islice = itertools.islice
_get_iocb_addr = operator.attrgetter("iocb_addr")
_addressof = ctypes.addressof


class LaioQueue:
    """The submission queue (QEMU's ``LaioQueue``); io_uring's mirrors it.

    All fields: the home thread of the attached AioContext only.

    ``plugged``   nesting count of io_plug; while >0 submissions are held.
    ``in_queue``  requests in ``pending`` (not yet accepted by the kernel).
    ``in_flight`` requests the kernel accepted and has not completed.
    ``blocked``   the last submit hit -EAGAIN (or left requests queued);
                  only a completion retries.
    ``pending``   the queued requests, oldest first.
    """

    __slots__ = ("plugged", "in_queue", "in_flight", "blocked", "pending")

    def __init__(self) -> None:
        self.plugged = 0
        self.in_queue = 0
        self.in_flight = 0
        self.blocked = False
        self.pending: collections.deque = collections.deque()

    def __repr__(self) -> str:
        return (f"<LaioQueue plugged={self.plugged} in_queue={self.in_queue} "
                f"in_flight={self.in_flight} blocked={self.blocked}>")


class QemuLaiocb(BlockAIOCB):
    """One request (QEMU's ``struct qemu_laiocb``).

    ``ret`` is ``-EINPROGRESS`` until the kernel (or a failed submit, or a
    cancel of a queued request) decides it; ``co`` is the coroutine to wake
    (coroutine path) or None (callback path).
    """

    __slots__ = ("co", "state", "iocb", "iocb_addr", "ret", "nbytes", "qiov", "is_read",
                 "done")

    def __init__(self, aiocb_info: AIOCBInfo, bs: Any, cb: Any, opaque: Any) -> None:
        # BlockAIOCB.__init__, inlined: one object per request.
        self.aiocb_info = aiocb_info
        self.bs = bs
        self.cb = cb
        self.opaque = opaque
        self.refcnt = 1
        self.co = None
        self.state: Optional[LinuxAioState] = None
        self.iocb = None
        self.iocb_addr = 0
        self.ret = _EINPROGRESS
        self.nbytes = 0
        self.qiov: Optional[QEMUIOVector] = None
        self.is_read = False
        self.done = False


class _LaioNotifier(EventNotifier):
    __slots__ = ("owner",)


def _laio_get_aio_context(acb: BlockAIOCB) -> AioContext:
    return acb.state.aio_context  # type: ignore[attr-defined]


class LinuxAioState:
    """A kernel AIO context plus its queue (QEMU's ``LinuxAioState``).

    ``ctx_id``       the kernel's aio_context_t (address of its ring).
    ``e``            eventfd every iocb signals; registered with the
                     attached AioContext.
    ``io_q``         the :class:`LaioQueue`.
    ``completion_bh`` the re-entrant completion BH.
    ``event_idx``/``event_max`` the completion walk's cursor, kept here so
                     nested walks share it.
    ``ring``         user-space view of the completion ring.
    ``stats``        counters of syscalls made (submit calls, getevents
                     calls), for tests and benchmarks.
    ``max_in_flight`` requests handed to the kernel at most (default:
                     ``nr_events``, the seed's MAX_EVENTS rule).
    Every field: the attached context's home thread only.
    """

    def __init__(self, nr_events: int = MAX_EVENTS, max_in_flight: int | None = None) -> None:
        if not isinstance(nr_events, int) or nr_events <= 0:
            raise ValueError(f"nr_events must be a positive int, got {nr_events!r}")
        self.aio_context: Optional[AioContext] = None
        self.completion_bh = None
        self.event_idx = 0
        self.event_max = 0
        # Completion walks running (nested ones included).
        self.walk_depth = 0
        # Requests queued by the callbacks of the outermost walk that are
        # submitted at once, without waiting for the walk to end: half of
        # what the kernel held when the walk began (see _process_completions).
        self.walk_split = 1
        self.io_q = LaioQueue()
        self.nr_events = nr_events
        self.max_in_flight = max_in_flight or nr_events
        self.closed = False
        # The completion handlers find the state through their notifier
        # (C's container_of).
        self.e = _LaioNotifier()
        self.e.owner = self
        ret = event_notifier_init(self.e, False)
        if ret < 0:
            raise OSError(-ret, f"laio_init: cannot create eventfd: {os.strerror(-ret)}")
        self.efd = event_notifier_get_fd(self.e)
        ret, ctx_id = aio_abi.io_setup(nr_events)
        if ret < 0:
            event_notifier_cleanup(self.e)
            raise OSError(-ret, _io_setup_error(-ret, nr_events))
        self.ctx_id = ctx_id
        self.ring = aio_abi.AioRing(ctx_id)
        self.use_ring = self.ring.usable
        # Fallback path: events copied out by io_getevents (non-TSO CPUs).
        self._events = aio_abi.io_event_array(max(nr_events, self.max_in_flight))
        self._events_u64 = memoryview(self._events).cast("B").cast("Q")
        self._events_s64 = memoryview(self._events).cast("B").cast("q")
        self._iocbpp = aio_abi.iocb_ptr_array(self.max_in_flight)
        self._iocbpp_addr = _addressof(self._iocbpp)
        # The iocb structs, by slot number; a slot's number is its iocb's
        # aio_data, which the kernel hands back in the io_event, and C's
        # container_of becomes _owner[slot].  Small ints, not the structs'
        # addresses: no address object made per request, and the lookup is
        # a list index instead of a dict of 47-bit keys.  Slots are never
        # freed; there are as many as requests were ever prepared at once.
        self._iocbs: list = []
        self._iocb_addrs: list[int] = []
        # Slot -> the request that holds it, from its preparation until its
        # slot is freed (completion, failed submit, cancellation).
        self._owner: list[Optional[QemuLaiocb]] = []
        # The requests of the ring's events from its head on, looked up by
        # a walk (_walk_ring); the first s.event_idx of them are done.
        # Shared by nested walks.
        self._walk_batch: list[QemuLaiocb] = []
        # Free slots: no ctypes allocation per request.  The fields that
        # are the same for every request of this state (aio_data = the
        # slot, the eventfd flag and fd) are written once, by _new_iocb;
        # laio_submit_direct then writes only the request's own.
        # A deque: a list that shrinks and grows by a walk's batch pays for
        # a realloc each time.
        self._free_iocbs: collections.deque[int] = collections.deque(
            reversed([_new_iocb(self) for _ in range(self.max_in_flight)]))
        # Free list of the coroutine path's QemuLaiocbs (laio_co_submit_direct):
        # such a request is never handed to anyone, so once its coroutine
        # has read the result nothing refers to it any more.  Holds at most
        # as many as were ever waiting at once; they keep no references.
        self._free_co_laiocbs: collections.deque[QemuLaiocb] = collections.deque()
        self.submit_calls = 0
        self.getevents_calls = 0

    def __repr__(self) -> str:
        return (f"<LinuxAioState ctx=0x{self.ctx_id:x} {self.io_q!r} "
                f"ring={'user-space' if self.use_ring else 'io_getevents'}>")


def _io_setup_error(err: int, nr: int) -> str:
    msg = f"io_setup({nr}) failed: {os.strerror(err)}"
    if err == errno.EAGAIN:
        def rd(name: str) -> str:
            try:
                with open(f"/proc/sys/fs/{name}") as f:
                    return f.read().strip()
            except OSError:
                return "?"
        msg += (f"; the machine-wide AIO budget is exhausted (fs.aio-nr {rd('aio-nr')} of "
                f"fs.aio-max-nr {rd('aio-max-nr')}): raise it with "
                "'sysctl fs.aio-max-nr=1048576', close other AIO users, or use aio=threads")
    elif err == errno.ENOSYS:
        msg += "; this kernel was built without Linux AIO (CONFIG_AIO): use aio=threads"
    elif err == errno.ENOMEM:
        msg += "; out of kernel memory for the AIO ring"
    return msg


def laio_probe() -> tuple[bool, str]:
    """Is Linux AIO usable here?  ``(ok, reason)``; never raises."""
    return aio_abi.probe()


# --------------------------------------------------------------------------
# Completion processing


def _process_completion(laiocb: QemuLaiocb) -> None:
    """Port of ``qemu_laio_process_completion``: finish one request.

    Full length -> 0; a short read means EOF, so the rest of the vector is
    zero-filled and the result is 0; a short write -> -ENOSPC.
    """
    ret = laiocb.ret
    if ret != _ECANCELED:
        if ret == laiocb.nbytes:
            ret = 0
        elif ret >= 0:
            # Short reads mean EOF, pad with zeros.
            if laiocb.is_read:
                qiov = laiocb.qiov
                qiov.memset(ret, 0, qiov.size - ret)
                ret = 0
            else:
                ret = _ENOSPC
    laiocb.ret = ret
    laiocb.done = True
    laiocb.qiov = None  # the buffer is never touched again
    co = laiocb.co
    if co is not None:
        # If the coroutine is already entered it is still inside
        # laio_co_submit (completion during ioq_submit) and will notice
        # laiocb.ret when it checks; coroutines cannot be entered
        # recursively, so don't (QEMU's fix for Launchpad #1362635).
        _wake_unless_entered(co)
    else:
        laiocb.cb(laiocb.opaque, ret)
        # qemu_aio_unref, inlined (it raises on a freed AIOCB).
        if laiocb.refcnt > 0:
            laiocb.refcnt -= 1
        else:
            qemu_aio_unref(laiocb)


def _process_completions(s: LinuxAioState) -> None:
    """Port of ``qemu_laio_process_completions``: the re-entrant walk."""
    bh = s.completion_bh
    # Reschedule so nested event loops see currently pending completions.
    qemu_bh_schedule(bh)
    if not s.walk_depth:
        # Submit in halves.  Devices that serve their queue in batches (many
        # virtual disks) complete a whole submitted batch at once; if the
        # callbacks' new requests all waited for the end of the walk, the
        # device would idle while the walk runs, and the requests would stay
        # in lock-step waves of the full queue depth.  Handing over the
        # first half as soon as it is queued keeps the device busy and
        # still submits in batches.  (In C the walk is short enough for
        # QEMU to wait for its end.)
        s.walk_split = (s.io_q.in_flight + 1) // 2 or 1
    s.walk_depth += 1
    try:
        if s.use_ring:
            more = _walk_ring(s)
        else:
            _process_completions_syscall(s)
            more = False
    finally:
        s.walk_depth -= 1
    if not more:
        qemu_bh_cancel(bh)
    # else: the walk stopped with completions left in the ring; the BH
    # stays scheduled and continues after the event loop's other work.
    # If we are nested we have to notify the level above that we are done
    # by setting event_max to zero; the upper level then leaves its own
    # loop.  If we are the last, all counters dropped to zero.
    s.event_max = 0
    s.event_idx = 0
    # Later QEMU's defer_call_end: what the callbacks of this walk submitted
    # goes to the kernel now, in one io_submit.  Not earlier: a walk that
    # submitted between batches would find the new completions at its next
    # peek and, on a device faster than the callbacks, never end -- the
    # event loop (timers, other fds) starved for the whole run.  Not from a
    # nested walk either: the outer one submits when it is done.
    io_q = s.io_q
    if not s.walk_depth and io_q.pending and not io_q.plugged and not io_q.blocked:
        _ioq_submit(s)


def _walk_ring(s: LinuxAioState) -> bool:
    """The walk over the user-space ring (the seed's peek/commit loop).

    It ends when the ring is empty.  What the callbacks of one batch (one
    peek) submitted goes to the kernel before the next batch is walked, as
    in the seed, where a callback's request was submitted at once: on a
    device that completes requests as fast as the callbacks run, the ring
    is never empty for long, and holding every new request until the walk
    ends would let the device run dry (measured: each QD-32 walk ran until
    all 32 requests had completed, so the disk saw waves of 32 and did a
    third less work).  The outermost walk also stops after ``max_in_flight``
    completions and returns True with the ring not yet empty; the caller
    then leaves the completion BH scheduled, so timers and other handlers
    run between walks on a device faster than the callbacks.
    """
    ring = s.ring
    u64 = ring.u64
    s64 = ring.s64
    # AioRing.commit / AioRing.peek, inlined (same loads, same order).
    hdr = ring._hdr
    nr = ring.nr
    owner = s._owner
    free = s._free_iocbs
    io_q = s.io_q
    # Completions the outermost walk may still process (nested walks run
    # until the ring is empty: their caller waits for something).
    budget = s.max_in_flight if s.walk_depth == 1 else None
    batch = s._walk_batch
    # This thread's coroutine state, for every wake of this walk; and, at
    # its first wake, the greenlet this walk runs in (_greenlet_here),
    # which does not change while it runs: a callback returns before the
    # next event.
    lt = getattr(_tls_local, "lt", None)
    ctx = s.aio_context
    current: Any = None
    while True:
        idx = s.event_idx
        if idx:
            hdr[2] = (hdr[2] + idx) % nr
            s.event_idx = 0
            del batch[:idx]
            if budget is not None:
                budget -= idx
            if io_q.pending and not io_q.plugged and not io_q.blocked:
                _ioq_submit(s)
        head = hdr[2] % nr
        tail = hdr[3] % nr  # loaded before the events it covers
        n = tail - head if tail >= head else nr - head
        s.event_max = n
        if not n:
            return False
        if budget is not None and budget <= 0:
            return True
        # The batch's requests, looked up in one sweep rather than one
        # event at a time between callbacks, where every lookup waited for
        # its own cache misses (the ring was written from the CPU that took
        # the interrupt; the requests are ~max_in_flight submits old).  The
        # kernel does not touch events between head and tail until head
        # moves, so these are the ring's values.  A nested walk continues
        # from the same s._walk_batch, so a request is looked up once.
        # (s.event_idx is 0 here: both start at head.)  An event's aio_data
        # is its request's slot.
        base = head * 4
        have = len(batch)
        if have + 1 == n:
            batch.append(owner[u64[base + 4 * have]])
        elif have < n:
            batch.extend(map(owner.__getitem__, u64[base + 4 * have:base + 4 * n:4].tolist()))
        idx = 0
        # CPython 3.11 specializes a compare only when a short jump follows
        # it: every jump over a long block (this loop's test at its top,
        # the full-transfer test below) is written as a short one.
        while True:
            if idx >= s.event_max:
                break
            laiocb = batch[idx]
            ret = s64[base + 4 * idx + 2]  # its cache line came with aio_data
            slot = laiocb.iocb
            free.append(slot)
            owner[slot] = None
            laiocb.iocb = None
            # Change counters one-by-one because we can be nested: a
            # callback's nested aio_poll continues this batch from
            # s.event_idx, so it is current before every callback and
            # re-read after it.
            io_q.in_flight -= 1
            s.event_idx = idx = idx + 1
            if ret != laiocb.nbytes:
                laiocb.ret = ret
                _process_completion(laiocb)
                idx = s.event_idx
                continue
            # _process_completion's common case, inlined: a full transfer.
            laiocb.ret = 0
            laiocb.done = True
            laiocb.qiov = None
            co = laiocb.co
            if co is None:
                laiocb.cb(laiocb.opaque, 0)
                if laiocb.refcnt > 0:
                    laiocb.refcnt -= 1
                else:
                    qemu_aio_unref(laiocb)
            else:
                if current is None:
                    current = _greenlet_here(lt, ctx)
                if (co._ret is current and co.caller is None and lt.co is None
                        and co.ctx is ctx and co._state == _SUSPENDED
                        and co.scheduled is None):
                    # _wake_unless_entered's common case, inlined: a
                    # suspended greenlet coroutine, parked by this
                    # greenlet, woken from outside any coroutine in its
                    # own context.  Switching from this walk's frame,
                    # not from a helper's, also spares greenlet a new
                    # frame object for every wake.
                    co.caller = lt.leader or _leader(lt)
                    co._state = _RUNNING
                    lt.co = co
                    ret = co._impl.switch()
                    lt.co = None
                    if ret is _COROUTINE_YIELD and not co.co_queue_wakeup:
                        co._state = _SUSPENDED
                    else:
                        _enter(lt, ctx, co, ret)
                else:
                    _wake_unless_entered(co, lt)
            idx = s.event_idx


def _process_completions_syscall(s: LinuxAioState) -> None:
    """The seed's walk over an io_getevents-filled array (ordered fallback).

    The batch lives in ``s._events``; a nested walk continues it, and only
    when it is exhausted is the array refilled.
    """
    u64 = s._events_u64
    s64 = s._events_s64
    owner = s._owner
    free = s._free_iocbs
    io_q = s.io_q
    while True:
        if s.event_idx >= s.event_max:
            s.getevents_calls += 1
            n = aio_abi.io_getevents_nowait(s.ctx_id, len(s._events), s._events)
            s.event_idx = 0
            s.event_max = n if n > 0 else 0
            if not s.event_max:
                break
        while s.event_idx < s.event_max:
            b = 4 * s.event_idx
            slot = u64[b]
            laiocb = owner[slot]
            owner[slot] = None
            laiocb.ret = s64[b + 2]
            free.append(slot)
            laiocb.iocb = None
            io_q.in_flight -= 1
            s.event_idx += 1
            _process_completion(laiocb)


def _process_completions_and_submit(s: LinuxAioState) -> None:
    """Port of ``qemu_laio_process_completions_and_submit``."""
    _process_completions(s)
    io_q = s.io_q
    if not io_q.plugged and io_q.pending:
        # No reaping walk from here: the eventfd brings us back for the
        # completions of what this submits (see ioq_submit).
        _ioq_submit(s)


def _completion_bh(s: LinuxAioState) -> None:
    """Port of ``qemu_laio_completion_bh``."""
    _process_completions_and_submit(s)


def _completion_cb(e: EventNotifier) -> Optional[bool]:
    """Port of ``qemu_laio_completion_cb``: the eventfd fired.

    The ring is drained whatever the eventfd read returned: a wake-up that
    reads zero while completions wait in the ring must not be ignored (a
    hang seen in other AIO wrappers).  Peeking the ring costs no syscall.
    """
    s = e.owner  # type: ignore[attr-defined]
    event_notifier_test_and_clear(e)
    if s.use_ring:
        hdr = s.ring._hdr
        io_q = s.io_q
        if hdr[2] == hdr[3] and (io_q.plugged or not io_q.pending):
            # A stale signal: its completions were already reaped (by the
            # BH, by the poll handler or right after io_submit).  Returning
            # False tells aio_poll this was no progress.
            return False
    _process_completions_and_submit(s)
    return None


def _poll_cb(e: EventNotifier) -> bool:
    """Port of ``qemu_laio_poll_cb``: completions waiting in the ring?"""
    s = e.owner  # type: ignore[attr-defined]
    if s.use_ring:
        ring = s.ring
        hdr = ring._hdr
        return hdr[2] != hdr[3]
    return s.event_idx < s.event_max


def _poll_ready(e: EventNotifier) -> None:
    """Port of ``qemu_laio_poll_ready``."""
    _process_completions_and_submit(e.owner)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------
# Submission


def _max_batch(s: LinuxAioState) -> int:
    """How many queued requests force a submit while plugged.

    The seed: ``MAX_EVENTS`` (counting requests in flight).  Later QEMU
    caps batches at ``aio_max_batch`` (``aio_context_set_aio_params``); that
    cap applies here when a context sets one.
    """
    ctx = s.aio_context
    cap = ctx.aio_max_batch if ctx is not None else 0
    room = s.max_in_flight - s.io_q.in_flight
    if cap and cap < room:
        return cap
    return room


def ioq_submit(s: LinuxAioState) -> None:
    """Port of ``ioq_submit``: hand queued requests to the kernel, then (as
    later QEMU) reap what already completed -- unless that would run inside
    a completion walk or a coroutine (see below)."""
    _ioq_submit(s)
    if s.io_q.in_flight and not s.walk_depth and not _in_coroutine():
        # Later QEMU: try to complete something right away.  Even if every
        # request completed, requests may remain queued; the eventfd is
        # still set, so the completion handler will submit them shortly --
        # do not loop here (that could hang).
        # Not from inside a completion walk (a callback that submits): the
        # running walk peeks the ring again as soon as the callback
        # returns, so nothing waits longer, and reaping here would nest one
        # walk per completion.
        # Not from inside a coroutine (laio_co_submit): the coroutines this
        # walk woke would be queued behind the submitting one and run depth
        # first, each submitting and reaping again, while coroutines queued
        # earlier -- new requests of the same caller -- waited for the whole
        # chain to end (seen as requests not even submitted for over a
        # second, QD 32 on a fast disk).  The event loop's completion
        # handler enters woken coroutines one at a time, in ring order.
        _process_completions(s)


def _ioq_submit(s: LinuxAioState) -> None:
    # The submission loop of ioq_submit, without reaping afterwards.
    io_q = s.io_q
    pending = io_q.pending
    iocbpp = s._iocbpp
    nr_events = s.max_in_flight
    while pending:
        if io_q.in_flight >= nr_events:
            break
        room = nr_events - io_q.in_flight
        n = len(pending)
        # A batch's iocb pointers are gathered in C (islice, map, slice
        # assignment): per request it is the largest part of this loop.
        # A single request (queue depth 1) skips building the list.
        if n == 1:
            iocbpp[0] = pending[0].iocb_addr
        else:
            if n > room:
                n = room
                iocbpp[:n] = list(map(_get_iocb_addr, _islice(pending, n)))
            else:
                iocbpp[:n] = list(map(_get_iocb_addr, pending))
        s.submit_calls += 1
        ret = _io_submit(s.ctx_id, n, s._iocbpp_addr)
        if ret == _EAGAIN:
            break
        if ret < 0:
            # Fail the first request, retry the rest.
            laiocb = pending.popleft()
            io_q.in_queue -= 1
            _free_slot(s, laiocb)
            laiocb.ret = ret
            _process_completion(laiocb)
            if not pending:
                break
            continue
        io_q.in_flight += ret
        io_q.in_queue -= ret
        # The kernel accepted a prefix; the rest stays queued.
        if ret == len(pending):
            pending.clear()
            break
        for _ in range(ret):
            pending.popleft()
        if ret != n or not pending:
            break
    io_q.blocked = io_q.in_queue > 0


def _new_iocb(s: LinuxAioState) -> int:
    # A new slot for state s (see LinuxAioState._iocbs): its iocb, with the
    # fields that never change between its requests already written.
    slot = len(s._iocbs)
    icb = aio_abi.iocb()
    if _iocb_pack is not None:
        _iocb_pack(icb, 0, slot, 0, 0, 0, 0, 0, 0, 0, 0, 0, _FLAG_RESFD, s.efd)
    s._iocbs.append(icb)
    s._iocb_addrs.append(_addressof(icb))
    s._owner.append(None)
    return slot


def _take_slot(s: LinuxAioState, laiocb: QemuLaiocb) -> Any:
    # A free slot for laiocb (the hot paths inline this); returns its iocb.
    free = s._free_iocbs
    slot = free.pop() if free else _new_iocb(s)
    laiocb.iocb = slot
    laiocb.iocb_addr = s._iocb_addrs[slot]
    s._owner[slot] = laiocb
    return s._iocbs[slot]


def _free_slot(s: LinuxAioState, laiocb: QemuLaiocb) -> None:
    # laiocb's slot back to the free list (the walks inline this).
    slot = laiocb.iocb
    s._owner[slot] = None
    s._free_iocbs.append(slot)
    laiocb.iocb = None


def _laio_do_submit(s: LinuxAioState, fd: int, laiocb: QemuLaiocb, offset: int, type: int) -> int:
    """Port of ``laio_do_submit``: prepare the iocb and queue it."""
    qiov = laiocb.qiov
    if type == QEMU_AIO_WRITE:
        op = _CMD_PWRITEV
    elif type == QEMU_AIO_READ:
        op = _CMD_PREADV
    elif type == QEMU_AIO_FLUSH:
        op = _CMD_FDSYNC
    else:
        # Currently the Linux kernel does not support other operations.
        return -errno.EIO
    cb = _take_slot(s, laiocb)
    slot = laiocb.iocb
    if _iocb_pack is None:  # pragma: no cover - big-endian hosts
        if qiov is not None:
            _iocb_prep(cb, op, fd, qiov._iov_addr, qiov.niov, offset, slot, _FLAG_RESFD, s.efd)
        else:
            _iocb_prep(cb, op, fd, 0, 0, 0, slot, _FLAG_RESFD, s.efd)
    elif qiov is not None:
        # aio_abi.iocb_prep, inlined (every field in one store; the fd is
        # the kernel's u32, so a negative one gets the kernel's -EBADF).
        _iocb_pack(cb, 0, slot, 0, 0, op, 0, fd & 0xFFFFFFFF, qiov._iov_addr, qiov.niov,
                   offset, 0, _FLAG_RESFD, s.efd)
    else:
        _iocb_pack(cb, 0, slot, 0, 0, op, 0, fd & 0xFFFFFFFF, 0, 0, 0, 0, _FLAG_RESFD, s.efd)
    io_q = s.io_q
    io_q.pending.append(laiocb)
    io_q.in_queue += 1
    if not io_q.blocked:
        if io_q.plugged:
            if io_q.in_queue >= _max_batch(s):
                ioq_submit(s)
        elif s.walk_depth:
            # Submitted by a completion callback: the running walk submits
            # it between two batches or when it ends -- earlier once half a
            # queue (walk_split) or aio_max_batch (when the context sets
            # one) is waiting.  Should the callback block in a nested
            # aio_poll first, the completion BH submits it.
            cap = s.aio_context.aio_max_batch
            if io_q.in_queue >= s.walk_split or (cap and io_q.in_queue >= cap):
                ioq_submit(s)
            elif io_q.in_queue == 1:
                qemu_bh_schedule(s.completion_bh)
        else:
            ioq_submit(s)
    return 0


def _check_submit_args(s: object, fd: object, offset: object, qiov: object, type: object,
                       func: str) -> None:
    if not isinstance(s, LinuxAioState):
        raise TypeError(f"{func}: expected a LinuxAioState, got {s.__class__.__name__}")
    if s.closed:
        raise RuntimeError(f"{func}: LinuxAioState was cleaned up")
    if s.aio_context is None:
        raise RuntimeError(f"{func}: LinuxAioState is not attached to an AioContext "
                           "(laio_attach_aio_context)")
    if fd.__class__ is not int:
        raise TypeError(f"{func}: fd must be an int, got {fd.__class__.__name__}")
    if offset.__class__ is not int:
        raise TypeError(f"{func}: offset must be an int, got {offset.__class__.__name__}")
    if offset < 0:  # type: ignore[operator]
        raise ValueError(f"{func}: negative offset {offset}")
    if type == QEMU_AIO_FLUSH:
        return
    if type not in (QEMU_AIO_READ, QEMU_AIO_WRITE):
        return  # refused with -EIO by _laio_do_submit, as QEMU does
    if not isinstance(qiov, QEMUIOVector):
        raise TypeError(f"{func}: qiov must be a QEMUIOVector, got {qiov.__class__.__name__}")
    if type == QEMU_AIO_READ and qiov.readonly:
        raise ValueError(f"{func}: cannot read into a read-only buffer")


_info = AIOCBInfo(QemuLaiocb, None, _laio_get_aio_context, name="linux-aio")
_new_laiocb = QemuLaiocb.__new__


def laio_co_submit(bs: Any, s: LinuxAioState, fd: int, offset: int,
                   qiov: Optional[QEMUIOVector], type: int) -> int:
    """Port of ``laio_co_submit``: submit and yield until done; 0 or -errno.

    Must run in a coroutine whose context is ``s``'s.  The result may be
    known before the coroutine would yield (a failed submit, or a completion
    reaped right after io_submit); then it returns without yielding.
    """
    if not _in_coroutine():
        raise RuntimeError("laio_co_submit must be called from a coroutine")
    _check_submit_args(s, fd, offset, qiov, type, "laio_co_submit")
    laiocb = QemuLaiocb(_info, bs, None, None)
    laiocb.co = _coroutine_self()
    laiocb.state = s
    laiocb.nbytes = qiov.size if qiov is not None else 0
    laiocb.is_read = type == QEMU_AIO_READ
    laiocb.qiov = qiov
    ret = _laio_do_submit(s, fd, laiocb, offset, type)
    if ret < 0:
        return ret
    if laiocb.ret == _EINPROGRESS:
        _coroutine_yield()
    return laiocb.ret


def laio_co_submit_direct(bs: Any, s: LinuxAioState, fd: int, offset: int,
                          qiov: QEMUIOVector, type: int) -> int:
    """:func:`laio_co_submit` (pyaioctx addition: QEMU's file driver calls
    laio_co_submit itself) for a read or write whose arguments the caller
    checked already (the file driver's coroutine path): same result,
    without the checks or helper calls.  Every request of the coroutine
    path runs through here, so QemuLaiocb.__init__ and _laio_do_submit are
    inlined, as in :func:`laio_submit_direct`; the queueing rules are
    _laio_do_submit's.

    Still refuses to run outside a coroutine (NotInCoroutineError), before
    anything is queued: it has to yield.  ``fd`` must be an open
    descriptor (the public functions also take a negative one, which the
    kernel refuses with -EBADF).
    """
    # coroutine._core._lt_and_self, inlined.
    try:
        lt = _tls_local.lt
    except AttributeError:
        lt = None
    co = lt.co if lt is not None else None
    if co is None:
        _require_coroutine("laio_co_submit")  # raises
    # is_read from the branch: a compare whose result is stored, not
    # jumped on, is never specialized by CPython 3.11.
    if type == QEMU_AIO_READ:
        op = _CMD_PREADV
        is_read = True
    elif type == QEMU_AIO_WRITE:
        op = _CMD_PWRITEV
        is_read = False
    else:
        return laio_co_submit(bs, s, fd, offset, qiov, type)
    if _iocb_pack is None:  # pragma: no cover - big-endian hosts
        return laio_co_submit(bs, s, fd, offset, qiov, type)
    # A recycled request has the fields that are the same for all of them
    # already.
    free_co = s._free_co_laiocbs
    if free_co:
        laiocb = free_co.pop()
    else:
        laiocb = _new_laiocb(QemuLaiocb)
        laiocb.aiocb_info = _info
        laiocb.cb = None
        laiocb.opaque = None
        laiocb.refcnt = 1
        laiocb.state = s
    laiocb.bs = bs
    laiocb.co = co
    laiocb.ret = _EINPROGRESS
    laiocb.nbytes = qiov.size
    laiocb.qiov = qiov
    laiocb.is_read = is_read
    laiocb.done = False
    # _take_slot, inlined.
    free = s._free_iocbs
    slot = free.pop() if free else _new_iocb(s)
    laiocb.iocb = slot
    laiocb.iocb_addr = s._iocb_addrs[slot]
    s._owner[slot] = laiocb
    _iocb_req_pack(s._iocbs[slot], _IOCB_REQ_OFFSET, op, 0, fd, qiov._iov_addr, qiov.niov,
                   offset)
    io_q = s.io_q
    io_q.pending.append(laiocb)
    io_q.in_queue += 1
    if not io_q.blocked:
        if io_q.plugged:
            if io_q.in_queue >= _max_batch(s):
                ioq_submit(s)
        elif s.walk_depth:
            # Woken by a completion walk, as almost every request of a
            # coroutine at queue depth > 1 is: the walk submits the batch
            # (see _laio_do_submit).
            cap = s.aio_context.aio_max_batch
            if io_q.in_queue >= s.walk_split or (cap and io_q.in_queue >= cap):
                ioq_submit(s)
            elif io_q.in_queue == 1:
                qemu_bh_schedule(s.completion_bh)
        else:
            ioq_submit(s)
    if laiocb.ret == _EINPROGRESS:
        # qemu_coroutine_yield (as _yield_running), inlined: this
        # thread's state and the running coroutine are in hand already.
        co.caller = None
        backend = co._backend
        if backend.greenlet_current is not None:
            co._ret.switch(_COROUTINE_YIELD)
        else:
            backend.yield_(lt, co)
    ret = laiocb.ret
    if laiocb.done:
        # Completed (the walk, a failed submit or cleanup set ``done`` and
        # dropped the qiov and iocb): recycle it, holding nothing.
        laiocb.bs = None
        laiocb.co = None
        free_co.append(laiocb)
    return ret


def laio_submit(bs: Any, s: LinuxAioState, fd: int, sector_num: int, qiov: QEMUIOVector,
                nb_sectors: int, cb: Any, opaque: Any, type: int) -> Optional[BlockAIOCB]:
    """Port of ``laio_submit``: callback-style request; returns its AIOCB.

    ``cb(opaque, ret)`` runs exactly once in the context's home thread; it
    may run before this returns (QEMU reaps right after io_submit).  Returns
    None, as QEMU, when the request type is not supported.
    """
    if not callable(cb):
        raise TypeError(f"laio_submit: cb must be callable, got {cb.__class__.__name__}")
    if sector_num.__class__ is not int or nb_sectors.__class__ is not int:
        raise TypeError("laio_submit: sector_num and nb_sectors must be ints")
    offset = sector_num * BDRV_SECTOR_SIZE
    _check_submit_args(s, fd, offset, qiov, type, "laio_submit")
    # qemu_aio_get(_info, ...) without its re-checks (cb was checked above).
    laiocb = QemuLaiocb(_info, bs, cb, opaque)
    laiocb.state = s
    laiocb.nbytes = nb_sectors * BDRV_SECTOR_SIZE
    laiocb.ret = _EINPROGRESS
    laiocb.is_read = type == QEMU_AIO_READ
    laiocb.qiov = qiov
    # Hold a reference across the submit: the request may complete (and
    # drop its own reference) before we return it.
    laiocb.refcnt += 1
    ret = _laio_do_submit(s, fd, laiocb, offset, type)
    laiocb.refcnt -= 1
    if ret < 0:
        qemu_aio_unref(laiocb)
        return None
    return laiocb


def laio_submit_direct(bs: Any, s: LinuxAioState, fd: int, offset: int, qiov: QEMUIOVector,
                       type: int, cb: Any, opaque: Any) -> Optional[BlockAIOCB]:
    """:func:`laio_submit` with a byte offset and without its argument
    checks, for callers that made them already (the block layer's direct
    path).  Same completion rules; None when the request is refused.

    This is every request's hot path, so QemuLaiocb.__init__ and, for reads
    and writes, _laio_do_submit are inlined here; the queueing rules are
    _laio_do_submit's.  ``fd`` must be an open descriptor, as for
    :func:`laio_co_submit_direct`.
    """
    # is_read from the branch (see laio_co_submit_direct).
    if type == QEMU_AIO_READ:
        op = _CMD_PREADV
        is_read = True
    elif type == QEMU_AIO_WRITE:
        op = _CMD_PWRITEV
        is_read = False
    else:
        op = 0
        is_read = False
    laiocb = _new_laiocb(QemuLaiocb)
    laiocb.aiocb_info = _info
    laiocb.bs = bs
    laiocb.cb = cb
    laiocb.opaque = opaque
    laiocb.refcnt = 1
    laiocb.co = None
    laiocb.state = s
    laiocb.ret = _EINPROGRESS
    laiocb.nbytes = qiov.size
    laiocb.qiov = qiov
    laiocb.is_read = is_read
    laiocb.done = False
    if not op or _iocb_pack is None:  # pragma: no cover - big-endian hosts
        laiocb.iocb = None
        laiocb.refcnt = 2  # held across the submit, as in laio_submit
        ret = _laio_do_submit(s, fd, laiocb, offset, type)
        laiocb.refcnt -= 1
        if ret < 0:
            qemu_aio_unref(laiocb)
            return None
        return laiocb
    # _take_slot, inlined.  The state's constant fields are in place
    # (_new_iocb); write the rest.
    free = s._free_iocbs
    slot = free.pop() if free else _new_iocb(s)
    laiocb.iocb = slot
    laiocb.iocb_addr = s._iocb_addrs[slot]
    s._owner[slot] = laiocb
    _iocb_req_pack(s._iocbs[slot], _IOCB_REQ_OFFSET, op, 0, fd, qiov._iov_addr, qiov.niov,
                   offset)
    io_q = s.io_q
    io_q.pending.append(laiocb)
    io_q.in_queue += 1
    if not io_q.blocked:
        if io_q.plugged:
            if io_q.in_queue >= _max_batch(s):
                laiocb.refcnt = 2  # it may complete inside ioq_submit
                ioq_submit(s)
                laiocb.refcnt -= 1
        elif s.walk_depth:
            cap = s.aio_context.aio_max_batch
            if io_q.in_queue >= s.walk_split or (cap and io_q.in_queue >= cap):
                ioq_submit(s)  # no reaping inside a walk: it cannot complete here
            elif io_q.in_queue == 1:
                qemu_bh_schedule(s.completion_bh)
        else:
            laiocb.refcnt = 2
            ioq_submit(s)
            laiocb.refcnt -= 1
    return laiocb


def _laio_cancel(acb: BlockAIOCB) -> None:
    """Port of ``laio_cancel``, made honest.

    A request still in our queue is removed and completes with -ECANCELED
    from a BH (never inside bdrv_aio_cancel_async).  A request the kernel
    holds is passed to io_cancel; for regular files the kernel refuses, and
    the request completes normally with its real result.  Either way the
    callback runs exactly once.
    """
    laiocb: QemuLaiocb = acb  # type: ignore[assignment]
    if laiocb.done or laiocb.ret != _EINPROGRESS:
        return
    s = laiocb.state
    io_q = s.io_q
    try:
        io_q.pending.remove(laiocb)
    except ValueError:
        pass
    else:
        io_q.in_queue -= 1
        io_q.blocked = io_q.in_queue > 0 and io_q.blocked
        _free_slot(s, laiocb)
        laiocb.ret = _ECANCELED
        aio_bh_schedule_oneshot_full(s.aio_context, _process_completion, laiocb, "laio-cancel")
        return
    ev = aio_abi.io_event()
    ret = aio_abi.io_cancel(s.ctx_id, laiocb.iocb_addr, _addressof(ev))
    if ret == 0:
        # Pre-4.19 kernels finish a cancelled iocb synchronously and never
        # post it to the ring.
        _free_slot(s, laiocb)
        io_q.in_flight -= 1
        laiocb.ret = _ECANCELED
        aio_bh_schedule_oneshot_full(s.aio_context, _process_completion, laiocb, "laio-cancel")
    # -EINPROGRESS: the cancellation result arrives through the ring.
    # Anything else: not cancellable; it completes normally.


_info.cancel_async = _laio_cancel


def laio_io_plug(bs: Any, s: LinuxAioState) -> None:
    """Port of ``laio_io_plug``: hold submissions until the matching unplug."""
    if not isinstance(s, LinuxAioState):
        raise TypeError(f"expected a LinuxAioState, got {s.__class__.__name__}")
    s.io_q.plugged += 1


def laio_io_unplug(bs: Any, s: LinuxAioState) -> None:
    """Port of ``laio_io_unplug``: the last unplug submits what is queued."""
    if not isinstance(s, LinuxAioState):
        raise TypeError(f"expected a LinuxAioState, got {s.__class__.__name__}")
    io_q = s.io_q
    if io_q.plugged <= 0:
        raise RuntimeError("laio_io_unplug without a matching laio_io_plug")
    io_q.plugged -= 1
    if io_q.pending and (io_q.in_queue >= _max_batch(s)
                         or (not io_q.plugged and not io_q.blocked)):
        ioq_submit(s)


# --------------------------------------------------------------------------
# Lifecycle


def laio_init() -> LinuxAioState:
    """Port of ``laio_init``: an eventfd plus ``io_setup(MAX_EVENTS)``.

    Raises OSError with the kernel's errno and a message that says what to
    do (e.g. EAGAIN: fs.aio-max-nr exhausted).
    """
    return LinuxAioState(MAX_EVENTS)


def laio_cleanup(s: LinuxAioState) -> None:
    """Port of ``laio_cleanup``: destroy the kernel context and the eventfd.

    Requests still in flight are waited for and completed first (their
    callbacks run), so nothing is lost; QEMU relies on the caller having
    drained.  Must be detached first.
    """
    if not isinstance(s, LinuxAioState):
        raise TypeError(f"expected a LinuxAioState, got {s.__class__.__name__}")
    if s.closed:
        return
    if s.aio_context is not None and s.completion_bh is not None:
        raise RuntimeError("laio_cleanup: detach the LinuxAioState from its AioContext first")
    _drain_for_cleanup(s)
    s.ring.close()
    ret = aio_abi.io_destroy(s.ctx_id)
    s.closed = True
    event_notifier_cleanup(s.e)
    if ret != 0:
        raise OSError(-ret, f"laio_cleanup: io_destroy failed: {os.strerror(-ret)}")


def _drain_for_cleanup(s: LinuxAioState) -> None:
    io_q = s.io_q
    if s._walk_batch:
        # A walk ended by an exception from a callback: what it finished
        # leaves the ring; what it looked up but did not finish still owns
        # its slot, and io_getevents below returns its event again.
        done = s.event_idx
        if done:
            s.ring._hdr[2] = (s.ring._hdr[2] + done) % s.ring.nr
            s.event_idx = s.event_max = 0
        s._walk_batch.clear()
    # Queued requests were never submitted: they are cancelled.
    while io_q.pending:
        laiocb = io_q.pending.popleft()
        io_q.in_queue -= 1
        _free_slot(s, laiocb)
        laiocb.ret = _ECANCELED
        _process_completion(laiocb)
    while io_q.in_flight > 0:
        n = aio_abi.io_getevents(s.ctx_id, 1, len(s._events), s._events, None)
        if n < 0:
            break
        for i in range(n):
            laiocb = s._owner[s._events_u64[4 * i]]
            _free_slot(s, laiocb)
            laiocb.ret = s._events_s64[4 * i + 2]
            io_q.in_flight -= 1
            _process_completion(laiocb)


def laio_detach_aio_context(s: LinuxAioState, old_context: AioContext) -> None:
    """Port of ``laio_detach_aio_context``."""
    aio_set_event_notifier(old_context, s.e, False, None)
    if s.completion_bh is not None:
        qemu_bh_delete(s.completion_bh)
        s.completion_bh = None
    s.aio_context = None


def laio_attach_aio_context(s: LinuxAioState, new_context: AioContext) -> None:
    """Port of ``laio_attach_aio_context``: completions now run in ``new_context``.

    Completions that arrived while detached are picked up at once (the
    eventfd is still set).
    """
    if not isinstance(s, LinuxAioState):
        raise TypeError(f"expected a LinuxAioState, got {s.__class__.__name__}")
    if s.closed:
        raise RuntimeError("laio_attach_aio_context: LinuxAioState was cleaned up")
    if s.aio_context is not None:
        raise RuntimeError("laio_attach_aio_context: already attached; detach first")
    s.aio_context = new_context
    s.completion_bh = aio_bh_new_full(new_context, _completion_bh, s, "laio-completion")
    aio_set_event_notifier(new_context, s.e, False, _completion_cb, _poll_cb, _poll_ready)


def laio_has_fdsync(fd: int) -> bool:
    """Port of ``laio_has_fdsync``: does the kernel accept IOCB_CMD_FDSYNC on fd?"""
    ret, ctx = aio_abi.io_setup(1)
    if ret < 0:
        return False
    try:
        cb = aio_abi.iocb()
        aio_abi.io_prep_fdsync(cb, fd)
        arr = aio_abi.iocb_ptr_array(1)
        arr[0] = _addressof(cb)
        ret = aio_abi.io_submit(ctx, 1, arr)
        if ret == 1:
            events = aio_abi.io_event_array(1)
            aio_abi.io_getevents(ctx, 1, 1, events, None)
        return ret != -errno.EINVAL
    finally:
        aio_abi.io_destroy(ctx)


def aio_setup_linux_aio(ctx: AioContext) -> LinuxAioState:
    """Port of ``aio_setup_linux_aio``: the context's LinuxAioState, made lazily.

    One Linux AIO context per AioContext; it is cleaned up with the
    AioContext.  Raises OSError (see :func:`laio_init`).
    """
    s = ctx.linux_aio
    if s is None:
        s = laio_init()
        laio_attach_aio_context(s, ctx)
        ctx.linux_aio = s
        aio_context_add_cleanup(ctx, _ctx_cleanup)
    return s


def _ctx_cleanup(ctx: AioContext) -> None:
    s = ctx.linux_aio
    if s is None:
        return
    ctx.linux_aio = None
    if s.aio_context is ctx:
        laio_detach_aio_context(s, ctx)
    laio_cleanup(s)


def aio_get_linux_aio(ctx: AioContext) -> LinuxAioState:
    """Port of ``aio_get_linux_aio``: the state made by aio_setup_linux_aio."""
    s = ctx.linux_aio
    if s is None:
        raise RuntimeError("aio_get_linux_aio: call aio_setup_linux_aio(ctx) first")
    return s
