# SPDX-License-Identifier: GPL-2.0-or-later
"""The kernel's Linux native AIO ABI, reached through ``syscall()``.

Mirrors ``<linux/aio_abi.h>`` (struct iocb, struct io_event, the IOCB_CMD_*
opcodes) plus the user-visible completion ring that ``fs/aio.c`` maps at the
address io_setup() hands back, and thin wrappers for the five io_* syscalls.

Some facts about Linux AIO this module relies on:

* The wrappers call the raw syscalls (no libaio.so).  A raw ``syscall()``
  returns -1 and sets errno; the wrappers turn that into ``-errno`` so callers
  see QEMU's convention.  They never raise.
* ``io_setup(nr, &ctx)`` requires ``ctx == 0`` on entry, otherwise it fails
  with EINVAL.  :func:`io_setup` always passes a freshly zeroed ``c_ulong``.
* ``aio_context_t`` is the user-space address of a ``struct aio_ring``.  The
  ring stays mapped until ``io_destroy``; touching it afterwards is a SIGSEGV,
  so :class:`AioRing` must be closed before the context is destroyed.
* ``io_event.res`` and ``res2`` are *signed* 64-bit values in the kernel
  (libaio declares them unsigned, which contradicts the kernel ABI).  A failed
  request completes with ``res == -errno`` (e.g. -EINVAL for a misaligned
  O_DIRECT buffer); bad arguments that the kernel can see at submit time (a bad
  fd, an unknown opcode) make ``io_submit`` itself fail for that iocb.
* ``io_submit`` accepts a prefix: it returns how many iocbs it queued; if the
  very first one is refused it returns ``-errno`` for that one.
* ``io_cancel`` only works for the few iocb types that have a cancel method
  (regular file I/O has none: -EINVAL).  Since Linux 4.19 a successful cancel
  returns -EINPROGRESS and the completion still arrives through the ring.
* ``io_destroy`` waits for every in-flight request of the context.
* Each context counts against ``/proc/sys/fs/aio-max-nr``; when the system-wide
  total ``aio-nr`` would exceed it, ``io_setup`` fails with EAGAIN.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import os
import platform
import struct
import sys
from typing import NamedTuple, Optional

from .libc import NR, libc

__all__ = [
    "IOCB_CMD_PREAD",
    "IOCB_CMD_PWRITE",
    "IOCB_CMD_FSYNC",
    "IOCB_CMD_FDSYNC",
    "IOCB_CMD_POLL",
    "IOCB_CMD_NOOP",
    "IOCB_CMD_PREADV",
    "IOCB_CMD_PWRITEV",
    "IOCB_FLAG_RESFD",
    "IOCB_FLAG_IOPRIO",
    "RWF_HIPRI",
    "RWF_DSYNC",
    "RWF_SYNC",
    "RWF_NOWAIT",
    "RWF_APPEND",
    "AIO_RING_MAGIC",
    "AIO_RING_COMPAT_FEATURES",
    "AIO_RING_INCOMPAT_FEATURES",
    "iocb",
    "io_event",
    "aio_ring",
    "iovec",
    "timespec",
    "IoEvent",
    "AIO_AVAILABLE",
    "io_setup",
    "io_destroy",
    "io_submit",
    "io_getevents",
    "io_getevents_nowait",
    "io_cancel",
    "io_event_ret",
    "iocb_prep",
    "io_prep_pread",
    "io_prep_pwrite",
    "io_prep_preadv",
    "io_prep_pwritev",
    "io_prep_fsync",
    "io_prep_fdsync",
    "io_set_eventfd",
    "iocb_address",
    "iocb_ptr_array",
    "io_event_array",
    "AioRing",
    "probe",
]

# --- constants (include/uapi/linux/aio_abi.h, include/uapi/linux/fs.h) ------

IOCB_CMD_PREAD = 0
IOCB_CMD_PWRITE = 1
IOCB_CMD_FSYNC = 2
IOCB_CMD_FDSYNC = 3
IOCB_CMD_POLL = 5
IOCB_CMD_NOOP = 6
IOCB_CMD_PREADV = 7
IOCB_CMD_PWRITEV = 8

#: aio_resfd is valid: the kernel signals that eventfd on completion.
IOCB_FLAG_RESFD = 1 << 0
#: aio_reqprio is valid.
IOCB_FLAG_IOPRIO = 1 << 1

# Per-request flags for aio_rw_flags (same values as preadv2/pwritev2).
RWF_HIPRI = 0x01
RWF_DSYNC = 0x02
RWF_SYNC = 0x04
RWF_NOWAIT = 0x08
RWF_APPEND = 0x10

AIO_RING_MAGIC = 0xA10A10A1
AIO_RING_COMPAT_FEATURES = 1
AIO_RING_INCOMPAT_FEATURES = 0

_LITTLE = sys.byteorder == "little"

# --- structures --------------------------------------------------------------


class iocb(ctypes.Structure):
    """``struct iocb`` (64 bytes on every architecture).

    The kernel declares ``aio_key``/``aio_rw_flags`` through its PADDED()
    macro, which swaps the two 32-bit halves on big-endian machines so that
    the pair always overlays one 64-bit slot the same way.
    """

    _fields_ = [
        ("aio_data", ctypes.c_uint64),
        *(
            [("aio_key", ctypes.c_uint32), ("aio_rw_flags", ctypes.c_int32)]
            if _LITTLE
            else [("aio_rw_flags", ctypes.c_int32), ("aio_key", ctypes.c_uint32)]
        ),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    ]


class io_event(ctypes.Structure):
    """``struct io_event``: ``res``/``res2`` are signed, as in the kernel."""

    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


class aio_ring(ctypes.Structure):
    """Header of the completion ring (fs/aio.c; there is no uapi header)."""

    _fields_ = [
        ("id", ctypes.c_uint),  # kernel internal index number
        ("nr", ctypes.c_uint),  # number of io_events
        ("head", ctypes.c_uint),  # written by user space or by the kernel
        ("tail", ctypes.c_uint),
        ("magic", ctypes.c_uint),
        ("compat_features", ctypes.c_uint),
        ("incompat_features", ctypes.c_uint),
        ("header_length", ctypes.c_uint),  # sizeof(struct aio_ring)
    ]


class iovec(ctypes.Structure):
    """``struct iovec``."""

    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class IoEvent(NamedTuple):
    """A completion copied out of the ring (plain ints, safe to keep)."""

    data: int
    obj: int
    res: int
    res2: int


# struct.pack_into layout of struct iocb: one call fills all 64 bytes, several
# times cheaper than twelve ctypes attribute stores on the submit path.
_IOCB_STRUCT = struct.Struct("=QIiHhIQQqQII" if _LITTLE else "=QiIHhIQQqQII")
assert _IOCB_STRUCT.size == ctypes.sizeof(iocb) == 64

#: True when this machine has the io_* syscall numbers and a usable libc.
AIO_AVAILABLE: bool = bool(NR.get("io_setup") is not None and libc is not None and hasattr(libc, "syscall"))

_get_errno = ctypes.get_errno
_addressof = ctypes.addressof


def _syscall_fn(*argtypes: type) -> Optional[ctypes._CFuncPtr]:  # type: ignore[name-defined]
    # libc["syscall"] returns a *new* function object each time (attribute
    # access would return the shared, cached one).  Each wrapper gets its own
    # so its argtypes cannot clash with other users of libc.syscall: without
    # argtypes ctypes passes Python ints as C int, truncating pointers and
    # 64-bit values.
    if not AIO_AVAILABLE:
        return None
    fn = libc["syscall"]
    fn.restype = ctypes.c_long
    fn.argtypes = [ctypes.c_long, *argtypes]
    return fn


_c_ulong_p = ctypes.POINTER(ctypes.c_ulong)
_sys_io_setup = _syscall_fn(ctypes.c_uint, _c_ulong_p)
_sys_io_destroy = _syscall_fn(ctypes.c_ulong)
_sys_io_submit = _syscall_fn(ctypes.c_ulong, ctypes.c_long, ctypes.c_void_p)
_sys_io_getevents = _syscall_fn(ctypes.c_ulong, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)
_sys_io_cancel = _syscall_fn(ctypes.c_ulong, ctypes.c_void_p, ctypes.c_void_p)

_NR_SETUP = NR.get("io_setup", -1)
_NR_DESTROY = NR.get("io_destroy", -1)
_NR_SUBMIT = NR.get("io_submit", -1)
_NR_GETEVENTS = NR.get("io_getevents", -1)
_NR_CANCEL = NR.get("io_cancel", -1)

_ENOSYS = -_errno.ENOSYS
_EINTR = -_errno.EINTR

# Shared zero timeout for the non-blocking fallback; never written after this.
_ZERO_TS = timespec(0, 0)
_ZERO_TS_ADDR = _addressof(_ZERO_TS)


# --- syscall wrappers (never raise; 0/n on success, -errno on failure) ------


def io_setup(nr_events: int) -> tuple[int, int]:
    """``io_setup(nr_events, &ctx)`` -> ``(0, ctx_id)`` or ``(-errno, 0)``."""
    if _sys_io_setup is None:
        return _ENOSYS, 0
    if nr_events <= 0 or nr_events > 0xFFFFFFFF:
        return -_errno.EINVAL, 0
    # Must be zero on entry or the kernel refuses with EINVAL.
    ctx = ctypes.c_ulong(0)
    ret = _sys_io_setup(_NR_SETUP, nr_events, ctypes.byref(ctx))
    if ret < 0:
        return -_get_errno(), 0
    return 0, ctx.value


def io_destroy(ctx: int) -> int:
    """``io_destroy(ctx)`` -> 0 or -errno.  Blocks until in-flight I/O ends."""
    if _sys_io_destroy is None:
        return _ENOSYS
    ret = _sys_io_destroy(_NR_DESTROY, ctx)
    if ret < 0:
        return -_get_errno()
    return ret


def io_submit(ctx: int, nr: int, iocbpp: object) -> int:
    """``io_submit(ctx, nr, iocbpp)`` -> number queued, or -errno.

    *iocbpp* is an array of iocb addresses (see :func:`iocb_ptr_array`) or an
    int address of one.
    """
    if _sys_io_submit is None:
        return _ENOSYS
    ret = _sys_io_submit(_NR_SUBMIT, ctx, nr, iocbpp)
    if ret < 0:
        return -_get_errno()
    return ret


def io_getevents(ctx: int, min_nr: int, nr: int, events: object, timeout_ns: Optional[int] = None) -> int:
    """``io_getevents`` -> number of events stored in *events*, or -errno.

    *events* is an ``io_event`` array (see :func:`io_event_array`).
    ``timeout_ns=None`` blocks until *min_nr* events arrived; 0 polls.  An
    interrupted wait (EINTR) reports 0 events: the caller simply polls again.
    """
    if _sys_io_getevents is None:
        return _ENOSYS
    if timeout_ns is None:
        ts = None
    elif timeout_ns <= 0:
        ts = _ZERO_TS_ADDR
    else:
        ts = ctypes.byref(timespec(timeout_ns // 1_000_000_000, timeout_ns % 1_000_000_000))
    ret = _sys_io_getevents(_NR_GETEVENTS, ctx, min_nr, nr, events, ts)
    if ret < 0:
        ret = -_get_errno()
        return 0 if ret == _EINTR else ret
    return ret


def io_getevents_nowait(ctx: int, nr: int, events: object) -> int:
    """Reap up to *nr* completions without blocking (zero timeout).

    This is the ordered fallback for :class:`AioRing`: the syscall reads the
    ring under the kernel's own lock and barriers.
    """
    if _sys_io_getevents is None:
        return _ENOSYS
    ret = _sys_io_getevents(_NR_GETEVENTS, ctx, 0, nr, events, _ZERO_TS_ADDR)
    if ret < 0:
        ret = -_get_errno()
        return 0 if ret == _EINTR else ret
    return ret


def io_cancel(ctx: int, iocb_ptr: object, event_ptr: object) -> int:
    """``io_cancel(ctx, iocb, result)`` -> 0 or -errno.

    Regular file I/O cannot be cancelled (-EINVAL, or -EAGAIN on old kernels).
    Since Linux 4.19 success is reported as -EINPROGRESS and the event is
    delivered through the ring, not through *event_ptr*.
    """
    if _sys_io_cancel is None:
        return _ENOSYS
    ret = _sys_io_cancel(_NR_CANCEL, ctx, iocb_ptr, event_ptr)
    if ret < 0:
        return -_get_errno()
    return ret


# --- iocb helpers (libaio's io_prep_* inlines, in our own words) ------------


def io_event_ret(ev: io_event) -> int:
    """The request's result: bytes transferred or -errno.

    QEMU glues ``res2`` into the upper half because libaio's fields are
    ``unsigned long`` (32 bits on 32-bit hosts).  Our ``res`` is the kernel's
    signed 64-bit field, so it is the whole answer.
    """
    return ev.res


def iocb_address(cb: iocb) -> int:
    """Address of *cb*; the value the kernel reports back as ``io_event.obj``."""
    return _addressof(cb)


def iocb_prep(
    cb: iocb,
    opcode: int,
    fd: int,
    buf: int,
    nbytes: int,
    offset: int,
    data: int = 0,
    flags: int = 0,
    resfd: int = 0,
    rw_flags: int = 0,
    reqprio: int = 0,
) -> None:
    """Fill every field of *cb* in one store (unused fields zeroed).

    *buf* is an address (of the data, or of an iovec array for the vectored
    opcodes, in which case *nbytes* is the iovec count).
    """
    # The kernel's fd fields are u32: -1 must arrive as 0xffffffff (EBADF),
    # not make struct refuse it.
    fd &= 0xFFFFFFFF
    resfd &= 0xFFFFFFFF
    if _LITTLE:
        _IOCB_STRUCT.pack_into(cb, 0, data, 0, rw_flags, opcode, reqprio, fd, buf, nbytes, offset, 0, flags, resfd)
    else:  # pragma: no cover - big-endian hosts
        _IOCB_STRUCT.pack_into(cb, 0, data, rw_flags, 0, opcode, reqprio, fd, buf, nbytes, offset, 0, flags, resfd)


def io_prep_pread(cb: iocb, fd: int, buf: int, count: int, offset: int, data: int = 0) -> None:
    iocb_prep(cb, IOCB_CMD_PREAD, fd, buf, count, offset, data)


def io_prep_pwrite(cb: iocb, fd: int, buf: int, count: int, offset: int, data: int = 0) -> None:
    iocb_prep(cb, IOCB_CMD_PWRITE, fd, buf, count, offset, data)


def io_prep_preadv(cb: iocb, fd: int, iov: int, iovcnt: int, offset: int, data: int = 0) -> None:
    """*iov* is the address of an iovec array (``QEMUIOVector.iov_address``)."""
    iocb_prep(cb, IOCB_CMD_PREADV, fd, iov, iovcnt, offset, data)


def io_prep_pwritev(cb: iocb, fd: int, iov: int, iovcnt: int, offset: int, data: int = 0) -> None:
    iocb_prep(cb, IOCB_CMD_PWRITEV, fd, iov, iovcnt, offset, data)


def io_prep_fsync(cb: iocb, fd: int, data: int = 0) -> None:
    iocb_prep(cb, IOCB_CMD_FSYNC, fd, 0, 0, 0, data)


def io_prep_fdsync(cb: iocb, fd: int, data: int = 0) -> None:
    iocb_prep(cb, IOCB_CMD_FDSYNC, fd, 0, 0, 0, data)


def io_set_eventfd(cb: iocb, efd: int) -> None:
    """Ask the kernel to signal eventfd *efd* when *cb* completes."""
    cb.aio_flags |= IOCB_FLAG_RESFD
    cb.aio_resfd = efd


def iocb_ptr_array(n: int) -> ctypes.Array:
    """A zeroed array of *n* iocb addresses, the ``iocbpp`` of io_submit."""
    return (ctypes.c_void_p * n)()


def io_event_array(n: int) -> ctypes.Array:
    """A zeroed array of *n* ``io_event`` for io_getevents."""
    return (io_event * n)()


# --- the user-space completion ring ------------------------------------------

# Loads are ordered with other loads only on TSO machines.  See AioRing.
_TSO_MACHINES = frozenset({"x86_64", "amd64", "i386", "i486", "i586", "i686", "x86"})
_MACHINE_IS_TSO = platform.machine().lower() in _TSO_MACHINES

_HDR_LEN = ctypes.sizeof(aio_ring)
_EVENT_LEN = ctypes.sizeof(io_event)
_EV_WORDS = _EVENT_LEN // 8  # 4 64-bit words per io_event


class AioRing:
    """Syscall-free access to a context's completion ring (QEMU's
    ``io_getevents_peek`` / ``io_getevents_commit``).

    Memory ordering.  The kernel's aio_complete() writes the io_event into
    the ring, issues smp_wmb(), then publishes the new ``tail``.  A reader
    must load ``tail`` before the events it covers; QEMU puts smp_rmb()
    between the two.  ctypes offers no read barrier, so this class relies on:

    * x86 / x86-64 are TSO: the CPU never lets a later load pass an earlier
      one, so program order is enough at the hardware level;
    * CPython cannot let the *compiler* reorder the loads either: ``tail`` and
      each event field are read by separate C calls dispatched by the
      interpreter, with opaque calls and branches in between.

    On weakly ordered CPUs (arm64, POWER, RISC-V) an event load may be
    satisfied before the ``tail`` load, returning a stale slot; nothing we can
    do from Python is a guaranteed load-load fence there.  On those machines
    :attr:`usable` is False and callers must use the ordered fallback,
    :meth:`getevents_nowait` (io_getevents with a zero timeout), which reads
    the same ring inside the kernel with proper barriers.  ``force=True``
    overrides the CPU check (never the header checks).

    Writing ``head`` after processing is safe on TSO too: stores are not
    reordered with earlier loads, so the kernel cannot reuse a slot before we
    finished copying it out.  Don't interleave peek/commit with
    io_getevents() on the same context in the middle of a batch: both move
    ``head``.

    The ring lives inside the kernel's mapping for the context; call
    :meth:`close` *before* io_destroy(), after which any access would fault.

    Events are exposed three ways, fastest first: the flat views :attr:`u64`
    and :attr:`s64` (event *i* occupies words ``4*i .. 4*i+3``: data, obj,
    res, res2; read ``res`` from ``s64``), :meth:`res_at` / :meth:`obj_at` /
    :meth:`data_at`, and :meth:`event_at` returning an :class:`IoEvent`.
    """

    __slots__ = ("ctx", "nr", "usable", "header_ok", "reason", "u64", "s64", "_hdr", "_events")

    def __init__(self, ctx: int, force: bool = False) -> None:
        self.ctx = ctx
        self.nr = 0
        self.usable = False
        self.header_ok = False
        self.reason = ""
        self.u64: Optional[memoryview] = None
        self.s64: Optional[memoryview] = None
        self._hdr: Optional[memoryview] = None
        self._events = None
        if not ctx:
            self.reason = "no AIO context"
            return
        hdr = aio_ring.from_address(ctx)
        # Same checks as libev's ev_linuxaio.c: an unknown layout means the
        # kernel wants us to use the syscall.
        if hdr.magic != AIO_RING_MAGIC:
            self.reason = "ring magic 0x%08x != 0x%08x" % (hdr.magic, AIO_RING_MAGIC)
            return
        if hdr.incompat_features != AIO_RING_INCOMPAT_FEATURES:
            self.reason = "ring incompat_features=%d" % hdr.incompat_features
            return
        if hdr.header_length != _HDR_LEN:
            self.reason = "ring header_length=%d != %d" % (hdr.header_length, _HDR_LEN)
            return
        nr = hdr.nr
        if nr == 0:
            self.reason = "ring has no slots"
            return
        self.nr = nr
        self.header_ok = True
        # Header as eight u32 words: [id, nr, head, tail, magic, ...].
        self._hdr = memoryview((ctypes.c_uint * 8).from_address(ctx)).cast("B").cast("I")
        self._events = (io_event * nr).from_address(ctx + _HDR_LEN)
        raw = memoryview(self._events).cast("B")
        self.u64 = raw.cast("Q")
        self.s64 = raw.cast("q")
        if _MACHINE_IS_TSO or force:
            self.usable = True
            self.reason = "ok"
        else:
            self.reason = "weakly ordered CPU (%s): use io_getevents" % platform.machine()

    def close(self) -> None:
        """Drop every view of the ring (before io_destroy unmaps it)."""
        for v in (self.u64, self.s64, self._hdr):
            if v is not None:
                v.release()
        self.u64 = self.s64 = self._hdr = None
        self._events = None
        self.usable = False
        self.header_ok = False
        if self.reason == "ok":
            self.reason = "closed"

    # The three methods below are the hot path: no validation beyond what
    # the header check already did.

    def peek(self) -> tuple[int, int]:
        """``(head, n)``: events ``head .. head+n-1`` are complete.

        Only the contiguous run up to the end of the ring is reported; after
        :meth:`commit` a second peek returns the wrapped part.
        """
        hdr = self._hdr
        nr = self.nr
        head = hdr[2] % nr  # the kernel sanitises the same way
        tail = hdr[3] % nr  # tail first (see the class docstring)
        return head, (tail - head if tail >= head else nr - head)

    def commit(self, n: int) -> None:
        """Give *n* consumed slots back to the kernel (advance ``head``)."""
        if n:
            hdr = self._hdr
            hdr[2] = (hdr[2] + n) % self.nr

    def advance_and_peek(self, n: int) -> tuple[int, int]:
        """:meth:`commit` then :meth:`peek` (QEMU's io_getevents_advance_and_peek)."""
        if n:
            self.commit(n)
        return self.peek()

    def has_events(self) -> bool:
        """Cheap poll check: is any completion waiting (head != tail)?"""
        hdr = self._hdr
        return hdr[2] != hdr[3]

    def available(self) -> int:
        """Total completed, unconsumed events (both parts of a wrap)."""
        hdr = self._hdr
        nr = self.nr
        return (hdr[3] % nr - hdr[2] % nr) % nr

    def event_at(self, i: int) -> IoEvent:
        """Copy of ring slot *i* (0 <= i < nr)."""
        if not 0 <= i < self.nr:
            raise IndexError("ring slot %d out of range 0..%d" % (i, self.nr - 1))
        b = i * _EV_WORDS
        u = self.u64
        s = self.s64
        return IoEvent(u[b], u[b + 1], s[b + 2], s[b + 3])

    def obj_at(self, i: int) -> int:
        return self.u64[i * _EV_WORDS + 1]

    def data_at(self, i: int) -> int:
        return self.u64[i * _EV_WORDS]

    def res_at(self, i: int) -> int:
        return self.s64[i * _EV_WORDS + 2]

    def getevents_nowait(self, events: object, nr: int) -> int:
        """Ordered fallback: io_getevents with a zero timeout."""
        return io_getevents_nowait(self.ctx, nr, events)

    def __repr__(self) -> str:
        return "AioRing(ctx=0x%x, nr=%d, usable=%s, reason=%r)" % (self.ctx, self.nr, self.usable, self.reason)


# --- availability probe ------------------------------------------------------


def _read_proc(name: str) -> str:
    try:
        with open("/proc/sys/fs/" + name) as f:
            return f.read().strip()
    except OSError:
        return "?"


def probe() -> tuple[bool, str]:
    """Does Linux native AIO work here?  ``(available, reason)``; never raises."""
    try:
        if not sys.platform.startswith("linux"):
            return False, "Linux AIO needs Linux (this is %s)" % sys.platform
        if not AIO_AVAILABLE:
            return False, "no io_* syscall numbers known for machine %r" % platform.machine()
        ret, ctx = io_setup(1)
        if ret < 0:
            err = -ret
            reason = "io_setup failed: %s (%s); /proc/sys/fs/aio-nr=%s, aio-max-nr=%s" % (
                _errno.errorcode.get(err, str(err)),
                os.strerror(err),
                _read_proc("aio-nr"),
                _read_proc("aio-max-nr"),
            )
            if err == _errno.ENOSYS:
                reason += " (kernel without CONFIG_AIO, or blocked by a seccomp filter)"
            elif err == _errno.EAGAIN:
                reason += " (system-wide AIO context limit reached)"
            return False, reason
        try:
            ring = AioRing(ctx)
            ring_state = "ring usable" if ring.usable else "ring not usable: " + ring.reason
            ring.close()
        finally:
            io_destroy(ctx)
        return True, "Linux AIO available (%s)" % ring_state
    except Exception as e:  # pragma: no cover - defensive: probes never raise
        return False, "probe failed: %s: %s" % (type(e).__name__, e)
