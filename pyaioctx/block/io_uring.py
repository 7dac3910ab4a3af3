# SPDX-License-Identifier: GPL-2.0-or-later
"""Linux io_uring: port of QEMU's block/io_uring.c (the QEMU 5.0-8.x design).

The driver has the same shape as :mod:`pyaioctx.block.linux_aio`, on
purpose, as in QEMU: a ``LuringState`` owns one ring and a batching queue
(QEMU's ``LuringQueue`` is field for field the ``LaioQueue``, so the class
is shared), submission goes through ``ioq_submit``, and completions are
processed by a re-entrant walk that a bottom half can continue:

* **The batching queue.**  Requests are prepared (QEMU keeps a private copy
  of the SQE in the request; here: the operation, fd, offset and iovec
  array) and appended to ``io_q.pending``.  ``ioq_submit`` copies as many
  as fit into free SQEs and calls ``io_uring_enter``.  While plugged
  (``luring_io_plug``) requests are held until the last unplug, or until
  they would fill the SQ ring (or ``aio_max_batch`` of them are queued, when
  the context sets one).  ``in_queue`` counts requests the kernel has not
  consumed yet, ``in_flight`` those it consumed and has not completed.
* **Completion through an eventfd.**  The eventfd is registered with the
  ring (``IORING_REGISTER_EVENTFD``) and with the AioContext.  The CQ ring is
  read without a system call; the ``io_poll`` handler only compares the CQ
  head and tail, so adaptive polling costs no syscall either.
* **The re-entrant completion walk.**  A completion callback may run a
  nested ``aio_poll()``.  So the walk (1) schedules its BH before calling
  out, so a nested event loop continues the walk; (2) releases each CQE
  before acting on it, so a nested walk never sees it again; (3) changes
  the counters one request at a time.  Without (1) a callback that waits
  for another request in a nested event loop would hang: the eventfd was
  already read, and nothing else would look at the ring.

Results: 0 when the full length was transferred, ``-errno`` otherwise.  As
QEMU: a read that returns fewer bytes than asked is resubmitted for the
remainder (``luring_resubmit_short_read``; buffered files can do that), a
read that returns 0 is at EOF and the rest is zero-filled, a short write is
``-ENOSPC``, and ``-EAGAIN`` / ``-EINTR`` completions are resubmitted.

Deviations from QEMU, each for a reason given where it is implemented:

* in-flight requests are capped at the CQ ring size (pre-5.5 kernels drop
  completions that do not fit);
* requests that completion callbacks submit are queued while the walk runs
  and submitted together after it (an implicit plug; QEMU submits each at
  once unless the caller plugged);
* a submit the kernel refuses with nothing in flight is retried from a
  timer, not in a loop; a request that keeps completing with ``-EAGAIN``
  (a non-blocking fd) stops being resubmitted after ``MAX_EAGAIN_RETRIES``;
* an unknown request type is ``-EIO`` (QEMU aborts);
* ``luring_submit`` (a callback-style, cancellable request) is an addition;
* ``luring_cleanup`` completes what is still queued or in flight instead of
  relying on the caller having drained.

OS facts this module relies on:

* ``io_uring_setup`` fails with ``ENOSYS`` before Linux 5.1 (or without
  CONFIG_IO_URING), with ``EPERM`` when ``kernel.io_uring_disabled`` or a
  seccomp filter forbids it, and with ``ENOMEM`` when the rings do not fit
  in ``RLIMIT_MEMLOCK`` (kernels before 5.12 charge them there).
* The kernel consumes SQEs in order and ``io_uring_enter`` returns how many
  it consumed; the rest stay in the SQ ring for the next call.  A request
  it consumed always produces exactly one CQE, errors included (bad fd:
  ``-EBADF``; misaligned O_DIRECT buffer: ``-EINVAL``).
* A registered eventfd is signalled after every CQE is posted; reading the
  ring may therefore find CQEs whose signal is still to come, or a signal
  whose CQEs were already consumed.  Both are harmless: the handler always
  drains the ring, and an empty drain does nothing.
* ``IORING_OP_ASYNC_CANCEL`` (5.5) gets its own CQE (0, ``-ENOENT`` or
  ``-EALREADY``); the target then completes with ``-ECANCELED`` or
  ``-EINTR`` if it was stopped, or with its real result otherwise.  A read
  on an empty pipe is stoppable; regular-file I/O that already started
  usually is not.
* Reads of cached data complete inside ``io_uring_enter`` itself, so a CQE
  can be ready when the submit call returns.
"""

from __future__ import annotations

import collections
import errno
import os
from typing import Any, Callable, Optional

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
from ..coroutine import qemu_in_coroutine as _in_coroutine
from ..coroutine._core import (
    _lt_and_self,
    _require_coroutine,
    _wake_unless_entered,
    _yield_running,
)
from ..event_notifier import (
    EventNotifier,
    event_notifier_cleanup,
    event_notifier_get_fd,
    event_notifier_init,
    event_notifier_test_and_clear,
)
from ..iov import QEMUIOVector
from .._sys import io_uring_abi
from .linux_aio import LaioQueue
from .raw_aio import QEMU_AIO_FLUSH, QEMU_AIO_READ, QEMU_AIO_WRITE

__all__ = [
    "MAX_ENTRIES",
    "MAX_EAGAIN_RETRIES",
    "LuringQueue",
    "LuringAIOCB",
    "LuringState",
    "luring_init",
    "luring_cleanup",
    "luring_attach_aio_context",
    "luring_detach_aio_context",
    "luring_co_submit",
    "luring_co_submit_direct",
    "luring_submit",
    "luring_io_plug",
    "luring_io_unplug",
    "luring_probe",
    "aio_setup_linux_io_uring",
    "aio_get_linux_io_uring",
]

#: io_uring ring size (QEMU's ``MAX_ENTRIES``): SQ entries; the kernel
#: makes the CQ ring twice as large.
MAX_ENTRIES = 128
#: How many times in a row a request completing with -EAGAIN is resubmitted
#: before -EAGAIN is reported (QEMU: forever).
MAX_EAGAIN_RETRIES = 16

#: QEMU's ``LuringQueue`` is ``LaioQueue`` field for field; one class serves both.
LuringQueue = LaioQueue

_EINPROGRESS = -errno.EINPROGRESS
_ECANCELED = -errno.ECANCELED
_ENOSPC = -errno.ENOSPC
_EAGAIN = -errno.EAGAIN
_EINTR = -errno.EINTR
_U64 = 0xFFFFFFFFFFFFFFFF

_OP_READV = io_uring_abi.IORING_OP_READV
_OP_WRITEV = io_uring_abi.IORING_OP_WRITEV
_OP_FSYNC = io_uring_abi.IORING_OP_FSYNC
_SQ_CQ_OVERFLOW = io_uring_abi.IORING_SQ_CQ_OVERFLOW
_STRONGLY_ORDERED = io_uring_abi.STRONGLY_ORDERED


class LuringAIOCB(BlockAIOCB):
    """One request (QEMU's ``LuringAIOCB``).

    ``ret`` is ``-EINPROGRESS`` until decided; ``co`` is the coroutine to
    wake (coroutine path) or None (callback path).  QEMU's embedded SQE is
    ``op``/``fd``/``offset``/``iov_addr``/``niov``/``datasync``; ``offset``,
    ``iov_addr`` and ``niov`` move forward on a short-read resubmission.
    ``user_data`` names the request's SQE of the current submission.
    """

    __slots__ = ("co", "state", "ret", "qiov", "is_read", "total_read", "resubmit_qiov",
                 "op", "fd", "offset", "iov_addr", "niov", "datasync", "user_data",
                 "cancelled", "eagain", "done")

    def __init__(self, aiocb_info: AIOCBInfo, bs: Any, cb: Any, opaque: Any) -> None:
        BlockAIOCB.__init__(self, aiocb_info, bs, cb, opaque)
        self.co = None
        self.state: Optional[LuringState] = None
        self.ret = _EINPROGRESS
        self.qiov: Optional[QEMUIOVector] = None
        self.is_read = False
        # Buffered reads may require resubmission, see _resubmit_short_read.
        self.total_read = 0
        self.resubmit_qiov: Optional[QEMUIOVector] = None
        self.op = 0
        self.fd = -1
        self.offset = 0
        self.iov_addr = 0
        self.niov = 0
        self.datasync = True
        self.user_data = 0
        self.cancelled = False
        self.eagain = 0
        self.done = False


class _CancelEntry:
    """An ``IORING_OP_ASYNC_CANCEL`` on its way to (or inside) the kernel."""

    __slots__ = ("target", "user_data")

    def __init__(self, target: int) -> None:
        self.target = target
        self.user_data = 0


class _LuringNotifier(EventNotifier):
    __slots__ = ("owner",)


def _luring_get_aio_context(acb: BlockAIOCB) -> AioContext:
    return acb.state.aio_context  # type: ignore[attr-defined]


class LuringState:
    """A ring plus its queue (QEMU's ``LuringState``).

    ``ring``          the :class:`pyaioctx._sys.io_uring_abi.Ring`.
    ``io_q``          the :class:`LuringQueue` (``in_queue``, ``in_flight``,
                      ``plugged``, ``blocked``, ``pending``).
    ``e``             eventfd the ring signals (IORING_REGISTER_EVENTFD),
                      registered with the attached AioContext.
    ``completion_bh`` the re-entrant completion BH.
    ``submit_calls``  io_uring_enter calls made to submit; ``getevents_calls``
                      those made only to fetch completions; ``resubmits``
                      requests put back in the queue (short read, -EAGAIN,
                      -EINTR).  For tests and benchmarks.
    Every field: the attached context's home thread only.
    """

    def __init__(self, entries: int = MAX_ENTRIES) -> None:
        self.aio_context: Optional[AioContext] = None
        self.completion_bh = None
        self.io_q = LuringQueue()
        self.closed = False
        self.submit_calls = 0
        self.getevents_calls = 0
        self.resubmits = 0
        # SQEs handed to the ring and not yet consumed by the kernel, in SQ
        # order (requests and cancels); io_uring_enter consumes a prefix.
        self._in_sq: collections.deque = collections.deque()
        # Cancels waiting for a free SQE, and cancels the kernel holds.
        self._cancel_q: collections.deque = collections.deque()
        self.cancels_in_flight = 0
        # user_data -> request or cancel, for everything with an SQE.
        self._by_id: dict[int, Any] = {}
        self._next_id = 1
        # Depth of completion walks on the stack; see ioq_submit.
        self._walk_depth = 0
        # Requests the callbacks of the outermost walk queue before they are
        # submitted without waiting for the walk to end (_process_completions).
        self.walk_split = 1
        self._retry_timer: Any = None
        self._retry_ms = 1
        try:
            self.ring = io_uring_abi.Ring(entries)
        except OSError as e:
            raise OSError(e.errno, _setup_error(e.errno, entries)) from None
        self.sq_entries = self.ring.sq_entries
        self.cq_entries = self.ring.cq_entries
        # The completion handlers find the state through their notifier
        # (C's container_of).
        self.e = _LuringNotifier()
        self.e.owner = self
        ret = event_notifier_init(self.e, False)
        if ret < 0:
            self.ring.close()
            raise OSError(-ret, f"luring_init: cannot create eventfd: {os.strerror(-ret)}")
        self.efd = event_notifier_get_fd(self.e)
        ret = self.ring.register_eventfd(self.efd)
        if ret < 0:
            event_notifier_cleanup(self.e)
            self.ring.close()
            raise OSError(-ret, "luring_init: IORING_REGISTER_EVENTFD failed: "
                                f"{os.strerror(-ret)}")

    def __repr__(self) -> str:
        return (f"<LuringState ring_fd={self.ring.fd} sq={self.sq_entries} "
                f"cq={self.cq_entries} {self.io_q!r}>")


def _setup_error(err: int, entries: int) -> str:
    """Say why io_uring_setup failed and what to do about it."""
    msg = f"failed to init linux io_uring ring: io_uring_setup({entries}): {os.strerror(err)}"
    if err == errno.ENOSYS:
        msg += ("; this kernel has no io_uring (needs Linux >= 5.1 built with "
                "CONFIG_IO_URING): use aio=native or aio=threads")
    elif err == errno.EPERM:
        try:
            with open("/proc/sys/kernel/io_uring_disabled") as f:
                disabled = f.read().strip()
        except OSError:
            disabled = None
        if disabled in ("1", "2"):
            msg += (f"; io_uring is restricted by sysctl kernel.io_uring_disabled={disabled} "
                    "(1: only kernel.io_uring_group or CAP_SYS_ADMIN, 2: nobody)")
        else:
            msg += ("; blocked by a seccomp filter (e.g. a container runtime's default "
                    "profile) or a security module")
        msg += ": use aio=native or aio=threads"
    elif err == errno.ENOMEM:
        try:
            import resource
            soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
            lim = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"
        except Exception:  # pragma: no cover - resource is always there on Linux
            lim = "unknown"
        msg += (f"; kernels before 5.12 charge the rings to RLIMIT_MEMLOCK (soft limit "
                f"{lim}): raise it (ulimit -l), or use aio=native or aio=threads")
    return msg


def luring_probe() -> tuple[bool, str]:
    """Is io_uring usable here?  ``(ok, reason)``; never raises.

    pyaioctx addition (QEMU decides at build time): the block layer uses it
    to refuse ``aio=io_uring`` with the reason, never to pick io_uring by
    itself.
    """
    return io_uring_abi.probe()


# --------------------------------------------------------------------------
# Completion processing


def _luring_resubmit(s: LuringState, luringcb: LuringAIOCB) -> None:
    """Port of ``luring_resubmit``: put the request back at the queue's tail.

    The caller makes sure ioq_submit runs later: every walk is followed by
    a submit of the queue, or by the BH that does it (see ioq_submit).
    """
    s.io_q.pending.append(luringcb)
    s.io_q.in_queue += 1
    s.resubmits += 1


def _resubmit_short_read(s: LuringState, luringcb: LuringAIOCB, nread: int) -> None:
    """Port of ``luring_resubmit_short_read``: read the remainder.

    Short reads are rare but happen on buffered files.  The resubmitted SQE
    reads into the tail of the caller's vector (pointers only, no copy) at
    the advanced offset.  ``nread`` > 0, so every round makes progress.
    """
    qiov = luringcb.qiov
    # Update read position
    luringcb.total_read += nread
    remaining = qiov.size - luringcb.total_read
    # Shorten qiov: a fresh vector each time (QEMU resets and refills one;
    # here the old iovec array may still be referenced by nothing, so
    # dropping it is as cheap).
    rq = QEMUIOVector()
    rq.concat(qiov, luringcb.total_read, remaining)
    luringcb.resubmit_qiov = rq
    # Update the request's SQE image
    luringcb.offset += nread
    luringcb.iov_addr = rq.iov_address
    luringcb.niov = rq.niov
    _luring_resubmit(s, luringcb)


def _luring_finish(luringcb: LuringAIOCB) -> None:
    """The end of a request: wake its coroutine or call its callback, once."""
    luringcb.done = True
    # The buffers are never touched again.
    luringcb.qiov = None
    luringcb.resubmit_qiov = None
    co = luringcb.co
    if co is not None:
        # If the coroutine is already entered it must be in ioq_submit()
        # and will notice luringcb.ret has been filled in when it checks.
        # Coroutines cannot be entered recursively so avoid doing that!
        _wake_unless_entered(co)
    else:
        luringcb.cb(luringcb.opaque, luringcb.ret)
        qemu_aio_unref(luringcb)


def _luring_complete(s: LuringState, luringcb: LuringAIOCB, ret: int) -> None:
    """One CQE for ``luringcb`` with result ``ret``: finish or resubmit.

    The body of QEMU's completion loop.  Resubmissions: -EINTR / -EAGAIN
    ("not expected but known to happen sometimes with Linux SCSI") and a
    short read of a non-zero length.  A request whose cancel was sent never
    goes back to the kernel: -EINTR / -EAGAIN / a short read of it are
    reported as -ECANCELED.
    """
    if ret < 0:
        if ret == _EINTR or ret == _EAGAIN:
            if luringcb.cancelled:
                ret = _ECANCELED
            elif ret == _EINTR or luringcb.eagain < MAX_EAGAIN_RETRIES:
                # -EAGAIN without end would be a busy loop on a non-blocking
                # fd; after MAX_EAGAIN_RETRIES tries it is reported.
                if ret == _EAGAIN:
                    luringcb.eagain += 1
                _luring_resubmit(s, luringcb)
                return
    elif luringcb.qiov is None:
        pass  # flush: res is 0
    else:
        qiov = luringcb.qiov
        # total_read is non-zero only for resubmitted read requests
        total_bytes = ret + luringcb.total_read
        if total_bytes == qiov.size:
            ret = 0
        elif luringcb.is_read:
            # Short read
            if ret > 0:
                if luringcb.cancelled:
                    ret = _ECANCELED
                else:
                    luringcb.eagain = 0
                    _resubmit_short_read(s, luringcb, ret)
                    return
            else:
                # EOF: pad with zeroes
                qiov.memset(total_bytes, 0, qiov.size - total_bytes)
                ret = 0
        else:
            # Short write
            ret = _ENOSPC
    luringcb.ret = ret
    _luring_finish(luringcb)


def _process_completions(s: LuringState, clear: bool = False) -> int:
    """Port of ``luring_process_completions``: the re-entrant walk.

    Request completion callbacks can run a nested event loop.  Schedule the
    BH so the nested loop "sees" the remaining completed requests and
    processes them; without this, callbacks that wait for other requests in
    a nested event loop would hang forever (the eventfd was already read).

    The eventfd is consumed *after* the ring is drained, when the walk
    reaped something (or ``clear``: the eventfd fired), and the ring is
    checked again after that.  Most completions are posted by task work
    that runs when our own thread leaves a system call -- the eventfd read
    included -- so clearing first would leave a count for CQEs this walk
    then reaps, and a later ``aio_poll(ctx, False)`` would report progress
    that is not there.  Clearing after, then re-checking, loses no wake-up:
    a CQE posted before the re-check is reaped, one posted after it sets
    the eventfd again.  QEMU polls the ring fd instead, which has no such
    count.

    Returns how many CQEs this walk reaped.
    """
    bh = s.completion_bh
    qemu_bh_schedule(bh)
    ring = s.ring
    by_id = s._by_id
    io_q = s.io_q
    if not _STRONGLY_ORDERED:
        # io_uring_enter(GETEVENTS) orders our later CQE loads after the
        # kernel's stores (see io_uring_abi's module docstring).
        s.getevents_calls += 1
        ring.get_events(0)
    e = s.e
    reaped = total = 0
    # Completions the outermost walk may still process before it leaves
    # the rest to the BH (nested walks run until the ring is empty).
    budget = s.cq_entries if s._walk_depth == 0 else None
    if budget is not None:
        # Submit in halves (linux_aio._process_completions says why).
        s.walk_split = (io_q.in_flight + 1) // 2 or 1
    more = False
    s._walk_depth += 1
    try:
        while True:
            # One batch: the CQEs ready now.  What their callbacks queued is
            # submitted before the next batch, so the device is kept busy
            # while a long walk runs (the Linux AIO walk's rule, see
            # linux_aio._walk_ring).
            batch = ring.cq_peek()
            if batch and io_q.in_queue > 0 and not io_q.plugged and not io_q.blocked:
                ioq_submit(s)
            if budget is not None:
                if budget <= 0 and batch:
                    more = True
                    break
                budget -= batch
            # reap() releases each CQE before yielding it, and rereads the
            # head every time: a nested walk continues where we are.
            for user_data, res, _flags in ring.reap():
                reaped += 1
                ent = by_id.pop(user_data, None)
                if ent is None:
                    continue  # pragma: no cover - every SQE we make is registered
                if ent.__class__ is _CancelEntry:
                    s.cancels_in_flight -= 1
                    continue
                # Change counters one-by-one because we can be nested.
                io_q.in_flight -= 1
                _luring_complete(s, ent, res)
                batch -= 1
                if batch <= 0 and ring.cq_peek():
                    break  # end of the batch: submit, then the next one
            else:
                batch = 0
            if batch <= 0 and ring.cq_peek():
                continue
            if ring.sq_flags() & _SQ_CQ_OVERFLOW:
                # Completions parked in the kernel's overflow list reach the
                # ring only through io_uring_enter(GETEVENTS).
                s.getevents_calls += 1
                ring.get_events(0)
                if ring.cq_peek():
                    continue
            if reaped or clear:
                event_notifier_test_and_clear(e)
                total += reaped
                reaped = 0
                clear = False
                if ring.cq_peek():
                    continue
            break
    finally:
        s._walk_depth -= 1
    if not more:
        qemu_bh_cancel(bh)
    # else: CQEs are left in the ring; the BH, still scheduled, continues
    # after the event loop's other work.
    return total + reaped


def _process_completions_and_submit(s: LuringState, clear: bool = False) -> None:
    """Port of ``luring_process_completions_and_submit``."""
    _process_completions(s, clear)
    io_q = s.io_q
    if not io_q.plugged and io_q.in_queue > 0:
        ioq_submit(s)
    elif s._cancel_q:
        _submit_cancels(s)


def _completion_bh(s: LuringState) -> None:
    """Port of ``qemu_luring_completion_bh``."""
    _process_completions_and_submit(s)


def _completion_cb(e: EventNotifier) -> None:
    """Port of ``qemu_luring_completion_cb``: the eventfd fired.

    The ring is drained, then the eventfd is consumed (see
    :func:`_process_completions` for why in that order); a wake-up that
    finds the ring empty still consumes it, or the level-triggered eventfd
    would fire again at once.
    """
    _process_completions_and_submit(e.owner, True)  # type: ignore[attr-defined]


def _poll_cb(e: EventNotifier) -> bool:
    """Port of ``qemu_luring_poll_cb``: CQEs ready?  No system call."""
    return e.owner.ring.cq_peek() != 0  # type: ignore[attr-defined]


def _poll_ready(e: EventNotifier) -> None:
    """Port of ``qemu_luring_poll_ready``."""
    _process_completions_and_submit(e.owner)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------
# Submission


def _max_batch(s: LuringState) -> int:
    """How many queued requests force a submit while plugged: a full SQ ring,
    or the context's ``aio_max_batch`` when it sets a smaller one."""
    ctx = s.aio_context
    cap = ctx.aio_max_batch if ctx is not None else 0
    if cap and cap < s.sq_entries:
        return cap
    return s.sq_entries


def _fill_sqes(s: LuringState, with_requests: bool) -> None:
    """Copy queued cancels (and requests) into free SQEs, oldest first.

    Stops when the SQ ring is full, and when everything handed to the
    kernel would fill the CQ ring: kernels before 5.5 drop completions that
    do not fit, later ones park them in a slow overflow list (QEMU has no
    such cap).
    """
    ring = s.ring
    io_q = s.io_q
    in_sq = s._in_sq
    by_id = s._by_id
    cancel_q = s._cancel_q
    pending = io_q.pending
    room = s.cq_entries - io_q.in_flight - s.cancels_in_flight - len(in_sq)
    while room > 0:
        if cancel_q:
            i = ring.get_sqe()
            if i is None:
                return
            ent = cancel_q.popleft()
            ud = s._next_id
            s._next_id = (ud + 1) & _U64 or 1
            ring.prep_cancel(i, ent.target, ud)
        elif with_requests and pending:
            i = ring.get_sqe()
            if i is None:
                return
            ent = pending.popleft()
            ud = s._next_id
            s._next_id = (ud + 1) & _U64 or 1
            op = ent.op
            if op == _OP_READV:
                ring.prep_readv(i, ent.fd, ent.iov_addr, ent.niov, ent.offset, ud)
            elif op == _OP_WRITEV:
                ring.prep_writev(i, ent.fd, ent.iov_addr, ent.niov, ent.offset, ud)
            else:
                ring.prep_fsync(i, ent.fd, ent.datasync, ud)
        else:
            return
        ent.user_data = ud
        by_id[ud] = ent
        in_sq.append(ent)
        room -= 1


def _ring_submit(s: LuringState) -> int:
    """One ``io_uring_enter``; account for the prefix the kernel consumed.

    Returns what the kernel returned (count or ``-errno``).  -EINTR is
    retried at once (nothing was consumed, no signal handler here cares).
    """
    ring = s.ring
    while True:
        s.submit_calls += 1
        ret = ring.submit()
        if ret != _EINTR:
            break
    if ret > 0:
        in_sq = s._in_sq
        io_q = s.io_q
        for _ in range(ret):
            ent = in_sq.popleft()
            if ent.__class__ is _CancelEntry:
                s.cancels_in_flight += 1
            else:
                io_q.in_flight += 1
                io_q.in_queue -= 1
    return ret


def ioq_submit(s: LuringState) -> int:
    """Port of ``ioq_submit``: hand queued requests to the kernel.

    Returns the last io_uring_enter result.  Afterwards ``blocked`` says
    whether requests remain queued; a completion submits them later.
    When the kernel refuses (-EAGAIN, -EBUSY, ...) with nothing in flight,
    no completion would come: a timer retries instead of a busy loop (QEMU
    loops on -EAGAIN).
    """
    io_q = s.io_q
    ret = 0
    while io_q.in_queue > 0 or s._cancel_q:
        # Try to fetch sqes from the ring for requests waiting in the queue
        _fill_sqes(s, True)
        if not s._in_sq:
            break  # CQ ring budget used up: wait for completions
        ret = _ring_submit(s)
        # Prevent infinite loop if submission is refused
        if ret <= 0:
            if io_q.in_flight == 0 and s.cancels_in_flight == 0:
                _arm_retry(s)
            break
    io_q.blocked = io_q.in_queue > 0

    if io_q.in_flight and s._walk_depth == 0 and not _in_coroutine():
        # We can try to complete something just right away if there are
        # still requests in flight.  Not from inside a completion walk (a
        # callback that submits): the walk on the stack picks the new CQEs
        # up itself, and reaping here would recurse once per request.
        # Not from inside a coroutine (luring_co_submit): the coroutines it
        # woke would run depth first after the submitting one, each
        # submitting and reaping again, while coroutines queued earlier
        # waited for the whole chain (requests delayed by over a second at
        # QD 32); the event loop's handler enters them in ring order.
        if _process_completions(s) and io_q.in_queue > 0 and not io_q.plugged:
            # The callbacks queued (or resubmitted) requests, or made room
            # for queued ones.  Submitting them here could go on for as
            # long as completions are ready at once (cached reads), so the
            # BH does it in the next event-loop iteration; no completion
            # may be left to do it (the eventfd was consumed).
            qemu_bh_schedule(s.completion_bh)
    return ret


def _submit_cancels(s: LuringState) -> None:
    """Send queued cancels (and SQEs a refused submit left in the ring)
    without submitting plugged requests and without running completions."""
    _fill_sqes(s, False)
    if s._in_sq:
        ret = _ring_submit(s)
        if ret <= 0 and s.io_q.in_flight == 0 and s.cancels_in_flight == 0:
            _arm_retry(s)


def _arm_retry(s: LuringState) -> None:
    """Retry a refused submit from a timer, backing off up to 100 ms."""
    from ..aio import aio_timer_new
    from ..timer import QEMU_CLOCK_REALTIME, SCALE_MS, qemu_clock_get_ns, timer_mod

    ctx = s.aio_context
    if ctx is None:
        return  # attach picks the queue up again
    if s._retry_timer is None:
        s._retry_timer = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_MS, _retry_cb, s)
    timer_mod(s._retry_timer, qemu_clock_get_ns(QEMU_CLOCK_REALTIME) // SCALE_MS + s._retry_ms)
    s._retry_ms = min(s._retry_ms * 2, 100)


def _retry_cb(s: LuringState) -> None:
    io_q = s.io_q
    in_flight_before = io_q.in_flight
    if io_q.in_queue > 0 or s._cancel_q or s._in_sq:
        ioq_submit(s)
    if io_q.in_flight > in_flight_before:
        s._retry_ms = 1


def _luring_do_submit(fd: int, luringcb: LuringAIOCB, s: LuringState, offset: int,
                      type: int) -> int:
    """Port of ``luring_do_submit``: prepare the request and queue it."""
    qiov = luringcb.qiov
    if type == QEMU_AIO_WRITE:
        luringcb.op = _OP_WRITEV
    elif type == QEMU_AIO_READ:
        luringcb.op = _OP_READV
    elif type == QEMU_AIO_FLUSH:
        luringcb.op = _OP_FSYNC
    else:
        # QEMU aborts on an invalid request type; refuse it instead.
        return -errno.EIO
    luringcb.fd = fd
    luringcb.offset = offset
    if qiov is not None and type != QEMU_AIO_FLUSH:
        luringcb.iov_addr = qiov._iov_addr
        luringcb.niov = qiov.niov
    io_q = s.io_q
    io_q.pending.append(luringcb)
    io_q.in_queue += 1
    # Inside a completion walk the queue is implicitly plugged: what its
    # callbacks queue is submitted between batches of completions, when the
    # walk ends, or once half of what the walk began with is waiting
    # (walk_split) -- one io_uring_enter per batch instead of one per request.
    if not io_q.blocked and ((not io_q.plugged and s._walk_depth == 0)
                             or io_q.in_queue >= _max_batch(s)
                             or (not io_q.plugged and io_q.in_queue >= s.walk_split)):
        ret = ioq_submit(s)
        # A refused submit is not the request's failure: it stays queued.
        return ret if ret > 0 else 0
    return 0


def _check_submit_args(s: object, fd: object, offset: object, qiov: object, type: object,
                       func: str) -> None:
    if s.__class__ is not LuringState and not isinstance(s, LuringState):
        raise TypeError(f"{func}: expected a LuringState, got {s.__class__.__name__}")
    if s.closed:  # type: ignore[attr-defined]
        raise RuntimeError(f"{func}: LuringState was cleaned up")
    if s.aio_context is None:  # type: ignore[attr-defined]
        raise RuntimeError(f"{func}: LuringState is not attached to an AioContext "
                           "(luring_attach_aio_context)")
    if fd.__class__ is not int:
        raise TypeError(f"{func}: fd must be an int, got {fd.__class__.__name__}")
    if offset.__class__ is not int:
        raise TypeError(f"{func}: offset must be an int, got {offset.__class__.__name__}")
    if offset < 0:  # type: ignore[operator]
        raise ValueError(f"{func}: negative offset {offset}")
    if type == QEMU_AIO_FLUSH:
        if qiov is not None:
            raise ValueError(f"{func}: a flush takes qiov=None")
        return
    if type not in (QEMU_AIO_READ, QEMU_AIO_WRITE):
        return  # refused with -EIO by _luring_do_submit
    if qiov.__class__ is not QEMUIOVector and not isinstance(qiov, QEMUIOVector):
        raise TypeError(f"{func}: qiov must be a QEMUIOVector, got {qiov.__class__.__name__}")
    if type == QEMU_AIO_READ and qiov.readonly:  # type: ignore[attr-defined]
        raise ValueError(f"{func}: cannot read into a read-only buffer")


_info = AIOCBInfo(LuringAIOCB, None, _luring_get_aio_context, name="io_uring")


def luring_co_submit(bs: Any, s: LuringState, fd: int, offset: int,
                     qiov: Optional[QEMUIOVector], type: int, *, datasync: bool = True) -> int:
    """Port of ``luring_co_submit``: submit and yield until done; 0 or -errno.

    Must run in a coroutine of ``s``'s context.  ``qiov`` is None for
    ``QEMU_AIO_FLUSH``, which is an fdatasync as in QEMU; ``datasync=False``
    (a pyaioctx addition) makes it a full fsync.  The result may be known
    before the coroutine would yield (a completion reaped right after
    io_uring_enter); then it returns without yielding.
    """
    _require_coroutine("luring_co_submit")
    _check_submit_args(s, fd, offset, qiov, type, "luring_co_submit")
    return luring_co_submit_direct(bs, s, fd, offset, qiov, type, bool(datasync))


def luring_co_submit_direct(bs: Any, s: LuringState, fd: int, offset: int,
                            qiov: Optional[QEMUIOVector], type: int,
                            datasync: bool = True) -> int:
    """:func:`luring_co_submit` (pyaioctx addition) for a caller that
    checked the arguments already (the file driver's coroutine path).  Still refuses to run
    outside a coroutine (NotInCoroutineError), before anything is queued."""
    lt, co = _lt_and_self("luring_co_submit")
    luringcb = LuringAIOCB(_info, bs, None, None)
    luringcb.co = co
    luringcb.state = s
    luringcb.qiov = qiov
    luringcb.is_read = type == QEMU_AIO_READ
    luringcb.datasync = datasync
    ret = _luring_do_submit(fd, luringcb, s, offset, type)
    if ret < 0:
        return ret
    if luringcb.ret == _EINPROGRESS:
        _yield_running(lt, co)  # qemu_coroutine_yield; lt and co are in hand
    return luringcb.ret


def luring_submit(bs: Any, s: LuringState, fd: int, offset: int,
                  qiov: Optional[QEMUIOVector], type: int, cb: Callable[[Any, int], None],
                  opaque: Any, *, datasync: bool = True) -> Optional[BlockAIOCB]:
    """Callback-style request; returns its AIOCB (pyaioctx addition, the
    io_uring twin of ``laio_submit`` with a byte offset).

    ``cb(opaque, ret)`` runs exactly once in the context's home thread; it
    may run before this returns (completions are reaped right after
    io_uring_enter), except when called from inside another request's
    callback.  The AIOCB is cancellable with ``bdrv_aio_cancel[_async]``.
    Returns None when the request type is not supported.
    """
    if not callable(cb):
        raise TypeError(f"luring_submit: cb must be callable, got {cb.__class__.__name__}")
    _check_submit_args(s, fd, offset, qiov, type, "luring_submit")
    return luring_submit_direct(bs, s, fd, offset, qiov, type, cb, opaque, bool(datasync))


def luring_submit_direct(bs: Any, s: LuringState, fd: int, offset: int, qiov: QEMUIOVector,
                         type: int, cb: Callable[[Any, int], None],
                         opaque: Any, datasync: bool = True) -> Optional[BlockAIOCB]:
    """:func:`luring_submit` without its argument checks, for callers that
    made them already (the block layer's direct path)."""
    luringcb = LuringAIOCB(_info, bs, cb, opaque)
    luringcb.state = s
    luringcb.qiov = qiov
    luringcb.is_read = type == QEMU_AIO_READ
    luringcb.datasync = datasync
    # Hold a reference across the submit: the request may complete (and
    # drop its own reference) before we return it.
    luringcb.refcnt = 2
    ret = _luring_do_submit(fd, luringcb, s, offset, type)
    luringcb.refcnt -= 1
    if ret < 0:
        qemu_aio_unref(luringcb)
        return None
    return luringcb


def _luring_cancel_finish(luringcb: LuringAIOCB) -> None:
    _luring_finish(luringcb)


def _luring_cancel(acb: BlockAIOCB) -> None:
    """Cancel a ``luring_submit`` request; its callback still runs exactly once.

    A request still in our queue is removed and completes with -ECANCELED
    from a oneshot BH (never inside bdrv_aio_cancel_async).  A request that
    has an SQE gets an ``IORING_OP_ASYNC_CANCEL``; it then completes through
    the ring, with -ECANCELED if the kernel stopped it or with its real
    result if it was too late.
    """
    luringcb: LuringAIOCB = acb  # type: ignore[assignment]
    if luringcb.done or luringcb.ret != _EINPROGRESS or luringcb.cancelled:
        return
    s = luringcb.state
    io_q = s.io_q
    try:
        io_q.pending.remove(luringcb)
    except ValueError:
        pass
    else:
        io_q.in_queue -= 1
        io_q.blocked = io_q.in_queue > 0 and io_q.blocked
        luringcb.ret = _ECANCELED
        luringcb.cancelled = True
        aio_bh_schedule_oneshot_full(s.aio_context, _luring_cancel_finish, luringcb,
                                     "luring-cancel")
        return
    luringcb.cancelled = True
    s._cancel_q.append(_CancelEntry(luringcb.user_data))
    _submit_cancels(s)


_info.cancel_async = _luring_cancel


def luring_io_plug(bs: Any, s: LuringState) -> None:
    """Port of ``luring_io_plug``: hold submissions until the matching unplug."""
    if not isinstance(s, LuringState):
        raise TypeError(f"expected a LuringState, got {s.__class__.__name__}")
    s.io_q.plugged += 1


def luring_io_unplug(bs: Any, s: LuringState) -> None:
    """Port of ``luring_io_unplug``: the last unplug submits what is queued."""
    if not isinstance(s, LuringState):
        raise TypeError(f"expected a LuringState, got {s.__class__.__name__}")
    io_q = s.io_q
    if io_q.plugged <= 0:
        raise RuntimeError("luring_io_unplug without a matching luring_io_plug")
    io_q.plugged -= 1
    if io_q.plugged == 0 and not io_q.blocked and io_q.in_queue > 0:
        ioq_submit(s)


# --------------------------------------------------------------------------
# Lifecycle


def luring_init(entries: int = MAX_ENTRIES) -> LuringState:
    """Port of ``luring_init``: a ring of ``entries`` SQEs plus its eventfd.

    ``entries`` is a pyaioctx addition (QEMU: always ``MAX_ENTRIES``).
    Raises OSError with the kernel's errno and a message saying why io_uring
    is unavailable and what to do (ENOSYS: old kernel; EPERM: the
    kernel.io_uring_disabled sysctl or a seccomp filter; ENOMEM: locked
    memory limit).
    """
    if entries.__class__ is not int or entries < 1:
        raise ValueError(f"luring_init: entries must be a positive int, got {entries!r}")
    return LuringState(entries)


def luring_cleanup(s: LuringState) -> None:
    """Port of ``luring_cleanup``: close the ring and the eventfd.

    Must be detached first.  QEMU relies on the caller having drained; here
    requests still queued complete with -ECANCELED, requests in flight get
    a cancel and are waited for, so every callback runs exactly once and no
    buffer is used after this returns.
    """
    if not isinstance(s, LuringState):
        raise TypeError(f"expected a LuringState, got {s.__class__.__name__}")
    if s.closed:
        return
    if s.aio_context is not None and s.completion_bh is not None:
        raise RuntimeError("luring_cleanup: detach the LuringState from its AioContext first")
    try:
        _drain_for_cleanup(s)
    finally:
        s.closed = True
        s.ring.unregister_eventfd()
        s.ring.close()
        event_notifier_cleanup(s.e)


def _drain_for_cleanup(s: LuringState) -> None:
    io_q = s.io_q
    # Queued requests were never submitted: they are cancelled.
    while io_q.pending:
        luringcb = io_q.pending.popleft()
        io_q.in_queue -= 1
        luringcb.ret = _ECANCELED
        luringcb.cancelled = True
        _luring_finish(luringcb)
    # Everything with an SQE is asked to stop, then waited for.
    for ent in list(s._by_id.values()):
        if ent.__class__ is LuringAIOCB and not ent.cancelled:
            ent.cancelled = True
            s._cancel_q.append(_CancelEntry(ent.user_data))
    ring = s.ring
    s._walk_depth += 1  # completions below must not try to reap recursively
    try:
        while s._by_id or s._cancel_q:
            _fill_sqes(s, False)
            if s._in_sq:
                _ring_submit(s)
            if not io_q.in_flight and not s.cancels_in_flight:
                # Only SQEs the kernel keeps refusing are left.  They never
                # run once the ring is closed: they are cancelled.
                _cancel_unsubmitted(s)
                break
            s.getevents_calls += 1
            ret = ring.get_events(1)
            if ret < 0 and ret != _EINTR and not ring.cq_peek():
                break  # pragma: no cover - the ring itself is broken
            for user_data, res, _flags in ring.reap():
                ent = s._by_id.pop(user_data, None)
                if ent is None:
                    continue
                if ent.__class__ is _CancelEntry:
                    s.cancels_in_flight -= 1
                    continue
                io_q.in_flight -= 1
                _luring_complete(s, ent, res)
            # A resubmission here would be a cancelled request: none stay.
            while io_q.pending:
                luringcb = io_q.pending.popleft()
                io_q.in_queue -= 1
                luringcb.ret = _ECANCELED
                _luring_finish(luringcb)
    finally:
        s._walk_depth -= 1


def _cancel_unsubmitted(s: LuringState) -> None:
    io_q = s.io_q
    while s._in_sq:
        ent = s._in_sq.popleft()
        s._by_id.pop(ent.user_data, None)
        if ent.__class__ is LuringAIOCB:
            io_q.in_queue -= 1
            ent.ret = _ECANCELED
            _luring_finish(ent)
    s._cancel_q.clear()


def luring_detach_aio_context(s: LuringState, old_context: AioContext) -> None:
    """Port of ``luring_detach_aio_context``."""
    if not isinstance(s, LuringState):
        raise TypeError(f"expected a LuringState, got {s.__class__.__name__}")
    aio_set_event_notifier(old_context, s.e, False, None)
    if s.completion_bh is not None:
        qemu_bh_delete(s.completion_bh)
        s.completion_bh = None
    if s._retry_timer is not None:
        from ..timer import timer_free
        timer_free(s._retry_timer)
        s._retry_timer = None
    s.aio_context = None


def luring_attach_aio_context(s: LuringState, new_context: AioContext) -> None:
    """Port of ``luring_attach_aio_context``: completions now run in ``new_context``.

    Completions that arrived while detached are picked up at once: the
    eventfd is still set.  QEMU polls the ring fd itself; here the ring
    signals an eventfd, which every fd monitor handles the same way.
    """
    if not isinstance(s, LuringState):
        raise TypeError(f"expected a LuringState, got {s.__class__.__name__}")
    if s.closed:
        raise RuntimeError("luring_attach_aio_context: LuringState was cleaned up")
    if s.aio_context is not None:
        raise RuntimeError("luring_attach_aio_context: already attached; detach first")
    s.aio_context = new_context
    s.completion_bh = aio_bh_new_full(new_context, _completion_bh, s, "luring-completion")
    aio_set_event_notifier(new_context, s.e, False, _completion_cb, _poll_cb, _poll_ready)
    if s.io_q.in_queue > 0 or s._cancel_q:
        # A submit refused while detached: try again from the new context.
        qemu_bh_schedule(s.completion_bh)


def aio_setup_linux_io_uring(ctx: AioContext) -> LuringState:
    """Port of ``aio_setup_linux_io_uring``: the context's LuringState, made lazily.

    One ring per AioContext, cleaned up with the AioContext.  Raises OSError
    (see :func:`luring_init`).
    """
    s = ctx.linux_io_uring
    if s is None:
        s = luring_init()
        luring_attach_aio_context(s, ctx)
        ctx.linux_io_uring = s
        aio_context_add_cleanup(ctx, _ctx_cleanup)
    return s


def _ctx_cleanup(ctx: AioContext) -> None:
    s = ctx.linux_io_uring
    if s is None:
        return
    ctx.linux_io_uring = None
    if s.aio_context is ctx:
        luring_detach_aio_context(s, ctx)
    luring_cleanup(s)


def aio_get_linux_io_uring(ctx: AioContext) -> LuringState:
    """Port of ``aio_get_linux_io_uring``: the state made by aio_setup_linux_io_uring."""
    s = ctx.linux_io_uring
    if s is None:
        raise RuntimeError("aio_get_linux_io_uring: call aio_setup_linux_io_uring(ctx) first")
    return s
