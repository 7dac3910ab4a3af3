# SPDX-License-Identifier: GPL-2.0-or-later
"""io_uring kernel ABI: structs, constants, and a minimal ring.

This is the liburing subset that QEMU's ``block/io_uring.c`` uses, written
against the raw system calls (``io_uring_setup``, ``io_uring_enter``,
``io_uring_register``) through :mod:`ctypes`; there is no liburing.

Some facts about io_uring that this module relies on
----------------------------------------------------

* ``io_uring_setup(entries, params)`` returns a file descriptor (always
  ``O_CLOEXEC``) and fills ``params`` with the offsets of the fields inside
  three shared mappings: the SQ ring, the CQ ring and the SQE array.  Since
  Linux 5.4 (``IORING_FEAT_SINGLE_MMAP``) the SQ and CQ rings share one
  mapping.
* ``sq_entries`` is rounded up to a power of two; ``cq_entries`` is twice
  that by default.  Ring indexes are free-running ``u32`` counters, masked
  with ``ring_mask`` to find a slot, so every subtraction wraps at 2**32.
* The SQ ring holds an *indirection array* of SQE indexes.  We fill it
  once with the identity mapping, as recent liburing does, so that
  submitting is nothing but a store of the SQ tail.
* Without ``IORING_SETUP_SQPOLL`` the kernel reads the SQ ring only inside
  ``io_uring_enter``, in the submitting thread.  Completions, on the other
  hand, are posted from whichever CPU finishes the I/O (interrupt context,
  io-wq worker, task work), concurrently with us reading the CQ ring.
* The CQ ring can be consumed without a system call: read the tail, read the
  entries between head and tail, store the new head.  That is what
  :meth:`Ring.cq_peek`, :meth:`Ring.cqe_at` and :meth:`Ring.cq_advance` do.
* ``cqe.res`` is **signed**: a negative errno on failure.
* If the CQ ring fills up, kernels with ``IORING_FEAT_NODROP`` (5.5+) park
  completions in an overflow list and set ``IORING_SQ_CQ_OVERFLOW``; only an
  ``io_uring_enter(..., IORING_ENTER_GETEVENTS)`` moves them to the ring.
  ``io_uring_enter`` may then fail with ``EBUSY`` (older kernels) or
  ``EAGAIN``; the caller reaps and retries.

Memory ordering, and what CPython + ctypes give us
-------------------------------------------------

The kernel publishes a CQE by writing it and then storing the CQ tail with
release semantics (``smp_store_release``); it reads our CQ head with acquire
semantics before reusing a slot.  For the SQ ring it reads our SQ tail with
``smp_load_acquire`` and stores its SQ head with release.  In C, liburing
pairs these with ``io_uring_smp_load_acquire`` / ``io_uring_smp_store_release``.

Python has no atomics and ctypes has no barrier, so this module does plain
aligned 32-bit loads and stores (``memoryview`` items of format ``"I"``,
which CPython reads and writes with a single ``memcpy`` of 4 bytes; every
compiler turns that into one aligned load or store, so a field is never
seen torn).  The code is still *structured* as acquire/release: the tail is
loaded before any entry it covers is read, and the head is stored only after
the entries it releases have been copied into Python objects.  Each step is
a separate C-level call in the interpreter, so no compiler can reorder them.

* On x86-64 (TSO) that is enough: the hardware never reorders a load with an
  earlier load, or a store with an earlier store or load, so plain
  loads/stores already have acquire/release semantics.
* On weakly ordered architectures (aarch64, riscv64, ppc64) the CPU itself
  may reorder.  The risks are (1) a CQE load executing before the CQ tail
  load that made it visible, so we read a stale entry, and (2) our CQ head
  store becoming visible before our loads of the entries it releases
  complete, so the kernel overwrites an entry we are still reading.  On the
  SQ side there is no risk without SQPOLL, because the kernel reads the SQ
  tail in our own thread after the ``io_uring_enter`` system call.  In
  practice the hundreds of interpreter instructions and dependent branches
  between the tail load and the entry loads make (1) improbable and (2)
  cannot happen on cores that retire stores in order, but neither is
  guaranteed by the architecture.  :data:`STRONGLY_ORDERED` says which case
  we are in, so a caller can choose to confirm completions with
  ``io_uring_enter(GETEVENTS)`` (whose in-kernel acquire orders our later
  loads) on a weakly ordered machine.
"""

from __future__ import annotations

import ctypes
import errno
import mmap as _mmapmod
import os
import platform
import struct
import sys
from collections.abc import Iterator
from ctypes import c_int32, c_uint8, c_uint16, c_uint32, c_uint64

from .libc import NR, libc

__all__ = [
    # structs
    "io_sqring_offsets",
    "io_cqring_offsets",
    "io_uring_params",
    "io_uring_sqe",
    "io_uring_cqe",
    "io_uring_probe",
    "io_uring_probe_op",
    # constants
    "IORING_OP_NOP",
    "IORING_OP_READV",
    "IORING_OP_WRITEV",
    "IORING_OP_FSYNC",
    "IORING_OP_POLL_ADD",
    "IORING_OP_ASYNC_CANCEL",
    "IORING_OP_READ",
    "IORING_OP_WRITE",
    "IORING_FSYNC_DATASYNC",
    "IOSQE_FIXED_FILE",
    "IOSQE_IO_DRAIN",
    "IOSQE_IO_LINK",
    "IOSQE_IO_HARDLINK",
    "IOSQE_ASYNC",
    "IORING_SETUP_IOPOLL",
    "IORING_SETUP_SQPOLL",
    "IORING_SETUP_SQ_AFF",
    "IORING_SETUP_CQSIZE",
    "IORING_SETUP_CLAMP",
    "IORING_SETUP_SQE128",
    "IORING_SETUP_CQE32",
    "IORING_SETUP_NO_SQARRAY",
    "IORING_ENTER_GETEVENTS",
    "IORING_ENTER_SQ_WAKEUP",
    "IORING_ENTER_SQ_WAIT",
    "IORING_SQ_NEED_WAKEUP",
    "IORING_SQ_CQ_OVERFLOW",
    "IORING_SQ_TASKRUN",
    "IORING_CQ_EVENTFD_DISABLED",
    "IORING_FEAT_SINGLE_MMAP",
    "IORING_FEAT_NODROP",
    "IORING_FEAT_SUBMIT_STABLE",
    "IORING_FEAT_FAST_POLL",
    "IORING_FEAT_NATIVE_WORKERS",
    "IORING_OFF_SQ_RING",
    "IORING_OFF_CQ_RING",
    "IORING_OFF_SQES",
    "IORING_REGISTER_EVENTFD",
    "IORING_UNREGISTER_EVENTFD",
    "IORING_REGISTER_EVENTFD_ASYNC",
    "IORING_REGISTER_PROBE",
    "IO_URING_OP_SUPPORTED",
    "STRONGLY_ORDERED",
    # API
    "Ring",
    "probe",
]

# --------------------------------------------------------------------------
# Structs (include/uapi/linux/io_uring.h).  All fields are fixed-width, so
# the natural ctypes layout matches the kernel's on every 64- and 32-bit ABI.
# --------------------------------------------------------------------------


class io_sqring_offsets(ctypes.Structure):
    """Offsets of the SQ ring fields inside the SQ ring mapping (40 bytes)."""

    _fields_ = [
        ("head", c_uint32),
        ("tail", c_uint32),
        ("ring_mask", c_uint32),
        ("ring_entries", c_uint32),
        ("flags", c_uint32),
        ("dropped", c_uint32),
        ("array", c_uint32),
        ("resv1", c_uint32),
        ("user_addr", c_uint64),  # resv2 before 6.5 (IORING_SETUP_NO_MMAP)
    ]


class io_cqring_offsets(ctypes.Structure):
    """Offsets of the CQ ring fields inside the CQ ring mapping (40 bytes)."""

    _fields_ = [
        ("head", c_uint32),
        ("tail", c_uint32),
        ("ring_mask", c_uint32),
        ("ring_entries", c_uint32),
        ("overflow", c_uint32),
        ("cqes", c_uint32),
        ("flags", c_uint32),  # resv before 5.8
        ("resv1", c_uint32),
        ("user_addr", c_uint64),
    ]


class io_uring_params(ctypes.Structure):
    """Argument of ``io_uring_setup``; the kernel fills it in (120 bytes)."""

    _fields_ = [
        ("sq_entries", c_uint32),
        ("cq_entries", c_uint32),
        ("flags", c_uint32),
        ("sq_thread_cpu", c_uint32),
        ("sq_thread_idle", c_uint32),
        ("features", c_uint32),
        ("wq_fd", c_uint32),
        ("resv", c_uint32 * 3),
        ("sq_off", io_sqring_offsets),
        ("cq_off", io_cqring_offsets),
    ]


class _sqe_op_flags(ctypes.Union):
    # The per-opcode flags word.  rw_flags is __kernel_rwf_t (int) in the
    # header; it is a bit set, so unsigned is the useful view from Python.
    _fields_ = [
        ("rw_flags", c_uint32),
        ("fsync_flags", c_uint32),
        ("poll32_events", c_uint32),
        ("sync_range_flags", c_uint32),
        ("msg_flags", c_uint32),
        ("timeout_flags", c_uint32),
        ("cancel_flags", c_uint32),
        ("open_flags", c_uint32),
    ]


class io_uring_sqe(ctypes.Structure):
    """Submission queue entry (64 bytes).

    The unions of the C header are flattened to their first member except
    for the flags word, which is reachable under every name QEMU uses
    (``rw_flags``, ``fsync_flags``, ``cancel_flags`` ...).
    """

    _anonymous_ = ("_u_flags",)
    _fields_ = [
        ("opcode", c_uint8),
        ("flags", c_uint8),  # IOSQE_*
        ("ioprio", c_uint16),
        ("fd", c_int32),
        ("off", c_uint64),  # union with addr2
        ("addr", c_uint64),  # union with splice_off_in
        ("len", c_uint32),
        ("_u_flags", _sqe_op_flags),
        ("user_data", c_uint64),
        ("buf_index", c_uint16),  # union with buf_group
        ("personality", c_uint16),
        ("splice_fd_in", c_int32),  # union with file_index
        ("addr3", c_uint64),
        ("__pad2", c_uint64),
    ]


class io_uring_cqe(ctypes.Structure):
    """Completion queue entry (16 bytes); ``res`` is signed (``-errno``)."""

    _fields_ = [
        ("user_data", c_uint64),
        ("res", c_int32),
        ("flags", c_uint32),
    ]


class io_uring_probe_op(ctypes.Structure):
    """One opcode's entry in the reply to ``IORING_REGISTER_PROBE``."""

    _fields_ = [
        ("op", c_uint8),
        ("resv", c_uint8),
        ("flags", c_uint16),  # IO_URING_OP_SUPPORTED
        ("resv2", c_uint32),
    ]


_PROBE_OPS = 256


class io_uring_probe(ctypes.Structure):
    """Reply to ``IORING_REGISTER_PROBE`` (header + room for 256 opcodes)."""

    _fields_ = [
        ("last_op", c_uint8),
        ("ops_len", c_uint8),
        ("resv", c_uint16),
        ("resv2", c_uint32 * 3),
        ("ops", io_uring_probe_op * _PROBE_OPS),
    ]


# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------

IORING_OP_NOP = 0
IORING_OP_READV = 1
IORING_OP_WRITEV = 2
IORING_OP_FSYNC = 3
IORING_OP_POLL_ADD = 6
IORING_OP_ASYNC_CANCEL = 14  # Linux 5.5
IORING_OP_READ = 22  # Linux 5.6
IORING_OP_WRITE = 23  # Linux 5.6

IORING_FSYNC_DATASYNC = 1 << 0

# sqe->flags
IOSQE_FIXED_FILE = 1 << 0
IOSQE_IO_DRAIN = 1 << 1
IOSQE_IO_LINK = 1 << 2
IOSQE_IO_HARDLINK = 1 << 3
IOSQE_ASYNC = 1 << 4

# io_uring_setup() flags
IORING_SETUP_IOPOLL = 1 << 0
IORING_SETUP_SQPOLL = 1 << 1
IORING_SETUP_SQ_AFF = 1 << 2
IORING_SETUP_CQSIZE = 1 << 3
IORING_SETUP_CLAMP = 1 << 4
IORING_SETUP_SQE128 = 1 << 10
IORING_SETUP_CQE32 = 1 << 11
IORING_SETUP_NO_SQARRAY = 1 << 16

# io_uring_enter() flags
IORING_ENTER_GETEVENTS = 1 << 0
IORING_ENTER_SQ_WAKEUP = 1 << 1
IORING_ENTER_SQ_WAIT = 1 << 2

# sq_ring->flags
IORING_SQ_NEED_WAKEUP = 1 << 0
IORING_SQ_CQ_OVERFLOW = 1 << 1
IORING_SQ_TASKRUN = 1 << 2

# cq_ring->flags
IORING_CQ_EVENTFD_DISABLED = 1 << 0

# params->features
IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_FEAT_NODROP = 1 << 1
IORING_FEAT_SUBMIT_STABLE = 1 << 2
IORING_FEAT_FAST_POLL = 1 << 5
IORING_FEAT_NATIVE_WORKERS = 1 << 9

# mmap offsets
IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000

# io_uring_register() opcodes
IORING_REGISTER_EVENTFD = 4
IORING_UNREGISTER_EVENTFD = 5
IORING_REGISTER_EVENTFD_ASYNC = 7
IORING_REGISTER_PROBE = 8  # Linux 5.6

IO_URING_OP_SUPPORTED = 1 << 0

#: True where plain loads/stores already have acquire/release semantics
#: (x86 TSO); see the module docstring for what that means on other machines.
STRONGLY_ORDERED: bool = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")

_U32 = 0xFFFFFFFF

# One SQE / CQE as packed by struct: a single pack_into / unpack_from call
# per entry, which is several times cheaper than setting ctypes fields one
# by one.  The formats are checked against the ctypes structs at import.
_SQE = struct.Struct("=BBHiQQIIQHHiQQ")
_CQE = struct.Struct("=QiI")
assert _SQE.size == 64 and _CQE.size == 16

# --------------------------------------------------------------------------
# System calls.  Private function objects (``libc[name]`` makes a fresh one)
# so that setting argtypes here cannot change how other modules call
# ``libc.syscall``.  glibc's syscall() takes its arguments in registers the
# same way whether the caller treats it as variadic or not (it is assembly
# on x86-64; variadic and fixed calls share one convention on Linux aarch64).
# --------------------------------------------------------------------------

_IS_LINUX = sys.platform.startswith("linux")

if _IS_LINUX and libc is not None:
    _sys_setup = libc["syscall"]
    _sys_setup.restype = ctypes.c_long
    _sys_setup.argtypes = (ctypes.c_long, ctypes.c_uint, ctypes.c_void_p)

    _sys_enter = libc["syscall"]
    _sys_enter.restype = ctypes.c_long
    _sys_enter.argtypes = (
        ctypes.c_long,  # nr
        ctypes.c_int,  # fd
        ctypes.c_uint,  # to_submit
        ctypes.c_uint,  # min_complete
        ctypes.c_uint,  # flags
        ctypes.c_void_p,  # sigset
        ctypes.c_size_t,  # sigsz
    )

    _sys_register = libc["syscall"]
    _sys_register.restype = ctypes.c_long
    _sys_register.argtypes = (
        ctypes.c_long,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_void_p,
        ctypes.c_uint,
    )

    _libc_mmap = libc["mmap"]
    _libc_mmap.restype = ctypes.c_void_p
    _libc_mmap.argtypes = (
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,  # off_t; 64-bit on the 64-bit ABIs we have numbers for
    )

    _munmap = libc["munmap"]
    _munmap.restype = ctypes.c_int
    _munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
else:  # pragma: no cover - non-Linux
    _sys_setup = _sys_enter = _sys_register = _libc_mmap = _munmap = None

_MAP_FAILED = ctypes.c_void_p(-1).value
_U64 = 0xFFFFFFFFFFFFFFFF
# getattr: the mmap module lacks these names off POSIX, and importing this
# module must never fail.
_PROT_RW = getattr(_mmapmod, "PROT_READ", 1) | getattr(_mmapmod, "PROT_WRITE", 2)
# MAP_POPULATE pre-faults the rings so the first completions do not take
# page faults; liburing does the same.
_MAP_FLAGS = getattr(_mmapmod, "MAP_SHARED", 1) | getattr(_mmapmod, "MAP_POPULATE", 0)

_sqe_pack_into = _SQE.pack_into
_cqe_unpack_from = _CQE.unpack_from

# Setup flags that change the size of SQEs/CQEs or drop the indirection
# array; the fixed layouts above would then be wrong.
_UNSUPPORTED_SETUP = IORING_SETUP_SQE128 | IORING_SETUP_CQE32 | IORING_SETUP_NO_SQARRAY


def _u32_view(addr: int, size: int) -> tuple[memoryview, memoryview]:
    """Byte and u32 memoryviews over ``size`` bytes of mapped memory at ``addr``.

    memoryview item access is the cheapest way CPython offers to load or
    store one aligned word of foreign memory (no ctypes object is created).
    """
    raw = memoryview((c_uint8 * size).from_address(addr)).cast("B")
    return raw, raw.cast("I")


class Ring:
    """One io_uring instance: the SQ ring, the CQ ring and the SQE array.

    ``Ring(entries)`` calls ``io_uring_setup`` and maps the rings; it raises
    :class:`OSError` carrying the kernel's errno when that fails, leaving no
    fd or mapping behind.  All ring indexes used by the hot path are computed
    once here, so :meth:`get_sqe`, the ``prep_*`` methods, :meth:`submit`,
    :meth:`cq_peek`, :meth:`cqe_at` and :meth:`cq_advance` allocate nothing
    but the small ints and tuples they return.

    ``entries`` is rounded up to a power of two by the kernel; ``flags``
    are ``IORING_SETUP_*`` bits (``SQE128``, ``CQE32`` and ``NO_SQARRAY``
    are refused because the layouts here assume 64-byte SQEs, 16-byte CQEs
    and an SQ index array); ``cq_entries`` asks for a CQ ring of that size
    (``IORING_SETUP_CQSIZE``); ``sq_thread_idle`` is the SQPOLL thread's idle
    time in milliseconds.

    Not thread-safe: one owner (QEMU: the AioContext that the LuringState is
    attached to) drives submission and completion.  SQE indexes returned by
    :meth:`get_sqe` stay valid until the next :meth:`submit`; objects returned
    by :meth:`sqe` must not be used after :meth:`close` (they point into
    memory that is unmapped then).
    """

    def __init__(
        self,
        entries: int,
        flags: int = 0,
        *,
        cq_entries: int | None = None,
        sq_thread_idle: int = 0,
    ) -> None:
        # Everything close() looks at exists before the first thing that
        # can fail, so a half-built ring is torn down completely.
        self._fd = -1
        self._maps: list[tuple[int, int]] = []
        self._views: list[memoryview] = []
        self._sqe_array: ctypes.Array | None = None

        if not _IS_LINUX or _sys_setup is None or "io_uring_setup" not in NR:
            raise OSError(errno.ENOSYS, "io_uring is not available on this platform/architecture")
        if flags & _UNSUPPORTED_SETUP:
            raise ValueError(f"io_uring setup flags 0x{flags & _UNSUPPORTED_SETUP:x} are not supported")
        if not isinstance(entries, int) or entries < 1:
            raise ValueError(f"io_uring entries must be a positive int, got {entries!r}")

        p = io_uring_params()
        p.flags = flags
        p.sq_thread_idle = sq_thread_idle
        if cq_entries is not None:
            p.flags |= IORING_SETUP_CQSIZE
            p.cq_entries = cq_entries
        fd = _sys_setup(NR["io_uring_setup"], entries, ctypes.addressof(p))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"io_uring_setup({entries}) failed: {os.strerror(err)}")
        self._fd = fd
        try:
            self._setup_maps(p)
        except BaseException:
            self.close()
            raise

    # -- setup -----------------------------------------------------------

    def _map(self, size: int, offset: int) -> int:
        addr = _libc_mmap(None, size, _PROT_RW, _MAP_FLAGS, self._fd, offset)
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of io_uring region 0x{offset:x} failed: {os.strerror(err)}")
        self._maps.append((addr, size))
        return addr

    def _setup_maps(self, p: io_uring_params) -> None:
        self._params = p
        self._setup_flags = p.flags
        self._features = p.features
        self._sq_entries = p.sq_entries
        self._cq_entries = p.cq_entries
        self._sqpoll = bool(p.flags & IORING_SETUP_SQPOLL)
        so, co = p.sq_off, p.cq_off

        sq_size = so.array + p.sq_entries * 4
        cq_size = co.cqes + p.cq_entries * _CQE.size
        single = bool(p.features & IORING_FEAT_SINGLE_MMAP)
        if single:
            sq_size = cq_size = max(sq_size, cq_size)
        sq_ptr = self._map(sq_size, IORING_OFF_SQ_RING)
        cq_ptr = sq_ptr if single else self._map(cq_size, IORING_OFF_CQ_RING)
        sqes_size = p.sq_entries * _SQE.size
        sqes_ptr = self._map(sqes_size, IORING_OFF_SQES)

        sq_raw, sq32 = _u32_view(sq_ptr, sq_size)
        if single:
            cq_raw, cq32 = sq_raw, sq32
        else:
            cq_raw, cq32 = _u32_view(cq_ptr, cq_size)
        sqes_raw = memoryview((c_uint8 * sqes_size).from_address(sqes_ptr)).cast("B")
        # Derived views first, so close() can release them in order.
        self._views = [sq32, cq32, sq_raw, cq_raw, sqes_raw]

        self._sq32 = sq32
        self._cq32 = cq32
        self._cq_raw = cq_raw
        self._sqes_raw = sqes_raw
        self._sqe_array = (io_uring_sqe * p.sq_entries).from_address(sqes_ptr)

        # u32 indexes of the ring fields (all offsets are 4-byte aligned).
        self._sq_khead = so.head // 4
        self._sq_ktail = so.tail // 4
        self._sq_kflags = so.flags // 4
        self._sq_kdropped = so.dropped // 4
        self._cq_khead = co.head // 4
        self._cq_ktail = co.tail // 4
        self._cq_koverflow = co.overflow // 4
        self._cq_kflags = co.flags // 4
        self._cqes_off = co.cqes
        self._sq_mask = sq32[so.ring_mask // 4]
        self._cq_mask = cq32[co.ring_mask // 4]

        # Identity SQ index array: slot i of the array always names SQE i,
        # so publishing SQEs is a single store of the SQ tail.  SQEs are
        # handed out in tail order, so array[tail & mask] == tail & mask is
        # exactly the SQE prepared.
        base = so.array // 4
        for i in range(p.sq_entries):
            sq32[base + i] = i
        # Our private SQ tail: SQEs up to here are prepared; the kernel's
        # tail is advanced to it by submit().
        self._sqe_tail = sq32[self._sq_ktail]
        self._nr_enter = NR["io_uring_enter"]
        self._nr_register = NR["io_uring_register"]

    # -- information ------------------------------------------------------

    @property
    def fd(self) -> int:
        """The ring's file descriptor (-1 once closed); poll it for POLLIN."""
        return self._fd

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._fd < 0

    @property
    def sq_entries(self) -> int:
        """Number of SQEs (``entries`` rounded up to a power of two)."""
        return self._sq_entries

    @property
    def cq_entries(self) -> int:
        """Number of CQ ring slots (twice ``sq_entries`` unless asked otherwise)."""
        return self._cq_entries

    @property
    def features(self) -> int:
        """``IORING_FEAT_*`` bits the kernel reported."""
        return self._features

    @property
    def setup_flags(self) -> int:
        """``IORING_SETUP_*`` bits the ring was created with."""
        return self._setup_flags

    def sq_flags(self) -> int:
        """Current SQ ring flags (``IORING_SQ_NEED_WAKEUP``, ``IORING_SQ_CQ_OVERFLOW`` ...)."""
        return self._sq32[self._sq_kflags]

    def sq_dropped(self) -> int:
        """Kernel counter of invalid SQEs it skipped."""
        return self._sq32[self._sq_kdropped]

    def cq_overflow(self) -> int:
        """Kernel counter of completions that did not fit in the CQ ring."""
        return self._cq32[self._cq_koverflow]

    # -- submission -------------------------------------------------------

    def get_sqe(self) -> int | None:
        """Reserve the next free SQE and return its index, or None if the SQ ring is full.

        A reserved SQE is submitted by the next :meth:`submit`, so it must
        be filled (``prep_*``) before that.
        """
        tail = self._sqe_tail
        # Load of the kernel's SQ head (it stores it with release once the
        # SQEs before it are consumed); slots between head and our tail are
        # still the kernel's.
        if ((tail - self._sq32[self._sq_khead]) & _U32) >= self._sq_entries:
            return None
        self._sqe_tail = (tail + 1) & _U32
        return tail & self._sq_mask

    def sqe(self, i: int) -> io_uring_sqe:
        """A ctypes view of SQE ``i`` (for inspection or unusual fields).

        The view aliases ring memory: do not keep it past :meth:`close`.
        """
        if self._sqe_array is None:
            raise ValueError("io_uring ring is closed")
        return self._sqe_array[i]

    def prep_rw(
        self,
        op: int,
        sqe: int,
        fd: int,
        addr: int,
        length: int,
        offset: int,
        user_data: int,
        rw_flags: int = 0,
        sqe_flags: int = 0,
    ) -> None:
        """Fill SQE ``sqe`` as liburing's ``io_uring_prep_rw``: every field is written.

        ``offset`` -1 means "current file position" (``IORING_FEAT_RW_CUR_POS``).
        """
        # One pack_into writes all 64 bytes, so no stale field of a previous
        # request survives (liburing clears them the same way).
        _sqe_pack_into(
            self._sqes_raw, sqe << 6,
            op, sqe_flags, 0, fd, offset & _U64, addr, length, rw_flags,
            user_data, 0, 0, 0, 0, 0,
        )  # fmt: skip

    def prep_readv(self, sqe: int, fd: int, iov_addr: int, nr_vecs: int, offset: int, user_data: int) -> None:
        """``preadv(fd, iov_addr, nr_vecs, offset)``; ``iov_addr`` is the address of a ``struct iovec`` array."""
        _sqe_pack_into(
            self._sqes_raw, sqe << 6,
            IORING_OP_READV, 0, 0, fd, offset & _U64, iov_addr, nr_vecs, 0,
            user_data, 0, 0, 0, 0, 0,
        )  # fmt: skip

    def prep_writev(self, sqe: int, fd: int, iov_addr: int, nr_vecs: int, offset: int, user_data: int) -> None:
        """``pwritev(fd, iov_addr, nr_vecs, offset)``; the iovec array must live until completion."""
        _sqe_pack_into(
            self._sqes_raw, sqe << 6,
            IORING_OP_WRITEV, 0, 0, fd, offset & _U64, iov_addr, nr_vecs, 0,
            user_data, 0, 0, 0, 0, 0,
        )  # fmt: skip

    def prep_read(self, sqe: int, fd: int, buf_addr: int, nbytes: int, offset: int, user_data: int) -> None:
        """``pread(fd, buf_addr, nbytes, offset)`` (``IORING_OP_READ``, Linux 5.6)."""
        self.prep_rw(IORING_OP_READ, sqe, fd, buf_addr, nbytes, offset, user_data)

    def prep_write(self, sqe: int, fd: int, buf_addr: int, nbytes: int, offset: int, user_data: int) -> None:
        """``pwrite(fd, buf_addr, nbytes, offset)`` (``IORING_OP_WRITE``, Linux 5.6)."""
        self.prep_rw(IORING_OP_WRITE, sqe, fd, buf_addr, nbytes, offset, user_data)

    def prep_fsync(self, sqe: int, fd: int, datasync: bool, user_data: int) -> None:
        """``fsync(fd)``, or ``fdatasync(fd)`` when ``datasync`` (QEMU always uses datasync)."""
        _sqe_pack_into(
            self._sqes_raw, sqe << 6,
            IORING_OP_FSYNC, 0, 0, fd, 0, 0, 0,
            IORING_FSYNC_DATASYNC if datasync else 0,
            user_data, 0, 0, 0, 0, 0,
        )  # fmt: skip

    def prep_cancel(self, sqe: int, target_user_data: int, user_data: int) -> None:
        """Cancel the in-flight request whose ``user_data`` is ``target_user_data``.

        Its own CQE has ``res`` 0 (cancelled), ``-ENOENT`` (no such request)
        or ``-EALREADY`` (already running; it may still complete normally).
        The cancelled request gets its own CQE, usually ``-ECANCELED`` or
        ``-EINTR``.
        """
        _sqe_pack_into(
            self._sqes_raw, sqe << 6,
            IORING_OP_ASYNC_CANCEL, 0, 0, -1, 0, target_user_data & _U64, 0, 0,
            user_data, 0, 0, 0, 0, 0,
        )  # fmt: skip

    def prep_nop(self, sqe: int, user_data: int) -> None:
        """A request that completes at once with ``res`` 0."""
        _sqe_pack_into(
            self._sqes_raw, sqe << 6,
            IORING_OP_NOP, 0, 0, -1, 0, 0, 0, 0,
            user_data, 0, 0, 0, 0, 0,
        )  # fmt: skip

    def sq_pending(self) -> int:
        """SQEs reserved with :meth:`get_sqe` that the kernel has not consumed yet."""
        return (self._sqe_tail - self._sq32[self._sq_khead]) & _U32

    def sq_space_left(self) -> int:
        """How many more SQEs :meth:`get_sqe` can hand out before a submit."""
        return self._sq_entries - self.sq_pending()

    def submit(self, wait_nr: int = 0) -> int:
        """Publish the prepared SQEs and enter the kernel; return how many it consumed.

        With ``wait_nr`` > 0 also wait until that many CQEs are ready.
        Returns ``-errno`` instead of raising: ``-EINTR`` (a signal arrived
        while waiting), ``-EAGAIN`` / ``-EBUSY`` (out of resources, or the
        CQ ring overflowed: reap completions, then retry) are for the caller
        to decide, as in QEMU's ``ioq_submit``.  SQEs the kernel did not
        consume stay queued for the next call.
        """
        sq32 = self._sq32
        tail = self._sqe_tail
        # Store-release of the SQ tail: the SQE contents were written before
        # (program order; see the module docstring), the kernel loads the
        # tail with acquire semantics inside io_uring_enter.
        sq32[self._sq_ktail] = tail
        to_submit = (tail - sq32[self._sq_khead]) & _U32
        enter_flags = 0
        kflags = sq32[self._sq_kflags]
        if wait_nr or kflags & (IORING_SQ_CQ_OVERFLOW | IORING_SQ_TASKRUN):
            # Also flushes overflowed completions back into the CQ ring.
            enter_flags = IORING_ENTER_GETEVENTS
        if self._sqpoll:
            # The kernel thread picks the SQEs up by itself; only wake it
            # when it went to sleep.
            if kflags & IORING_SQ_NEED_WAKEUP:
                enter_flags |= IORING_ENTER_SQ_WAKEUP
            if not enter_flags:
                return to_submit
        elif not to_submit and not enter_flags:
            return 0
        ret = _sys_enter(self._nr_enter, self._fd, to_submit, wait_nr, enter_flags, None, 0)
        if ret < 0:
            return -ctypes.get_errno()
        return ret

    def get_events(self, min_complete: int = 0) -> int:
        """``io_uring_enter(GETEVENTS)`` without submitting; 0 or ``-errno``.

        Flushes overflowed CQEs into the ring and, with ``min_complete`` > 0,
        waits for that many completions.
        """
        ret = _sys_enter(self._nr_enter, self._fd, 0, min_complete, IORING_ENTER_GETEVENTS, None, 0)
        if ret < 0:
            return -ctypes.get_errno()
        return ret

    # -- completion ---------------------------------------------------------

    def cq_peek(self) -> int:
        """Number of CQEs ready to be read, without a system call."""
        cq32 = self._cq32
        # Load-acquire of the CQ tail first (the kernel stored it with
        # release after writing the CQEs); the head is ours alone.
        tail = cq32[self._cq_ktail]
        return (tail - cq32[self._cq_khead]) & _U32

    def cq_head(self) -> int:
        """The CQ head: index (unmasked) of the oldest unconsumed CQE."""
        return self._cq32[self._cq_khead]

    def cqe_at(self, head: int) -> tuple[int, int, int]:
        """``(user_data, res, flags)`` of the CQE at unmasked ring index ``head``.

        Only meaningful for ``cq_head() <= head < cq_head() + cq_peek()``,
        and only until :meth:`cq_advance` releases it.  ``res`` is signed.
        """
        return _cqe_unpack_from(self._cq_raw, self._cqes_off + ((head & self._cq_mask) << 4))

    def peek_cqe(self) -> tuple[int, int, int] | None:
        """The oldest ready CQE as ``(user_data, res, flags)``, or None; it is not consumed."""
        cq32 = self._cq32
        head = cq32[self._cq_khead]
        if head == cq32[self._cq_ktail]:
            return None
        return _cqe_unpack_from(self._cq_raw, self._cqes_off + ((head & self._cq_mask) << 4))

    def cq_advance(self, n: int = 1) -> None:
        """Release ``n`` CQEs to the kernel (liburing's ``io_uring_cq_advance``).

        The store of the new head is the "release": the CQEs were already
        copied out by :meth:`cqe_at` / :meth:`peek_cqe`.
        """
        cq32 = self._cq32
        i = self._cq_khead
        cq32[i] = (cq32[i] + n) & _U32

    def reap(self) -> Iterator[tuple[int, int, int]]:
        """Yield ready CQEs one at a time, each released *before* it is yielded.

        Like QEMU's ``io_uring_peek_cqe`` + ``io_uring_cqe_seen`` loop: a
        consumer that runs a nested event loop from inside the iteration,
        which reaps too, never sees the same completion twice.
        """
        cq32 = self._cq32
        kh, kt = self._cq_khead, self._cq_ktail
        raw, off, mask = self._cq_raw, self._cqes_off, self._cq_mask
        while True:
            head = cq32[kh]
            if head == cq32[kt]:
                return
            cqe = _cqe_unpack_from(raw, off + ((head & mask) << 4))
            cq32[kh] = (head + 1) & _U32
            yield cqe

    # -- registration -------------------------------------------------------

    def register_eventfd(self, fd: int, async_only: bool = False) -> int:
        """Have the kernel signal eventfd ``fd`` on every completion; 0 or ``-errno``.

        ``async_only`` (``IORING_REGISTER_EVENTFD_ASYNC``, 5.6) signals only
        for completions that did not happen inline during submission.
        """
        val = c_int32(fd)
        op = IORING_REGISTER_EVENTFD_ASYNC if async_only else IORING_REGISTER_EVENTFD
        ret = _sys_register(self._nr_register, self._fd, op, ctypes.addressof(val), 1)
        if ret < 0:
            return -ctypes.get_errno()
        return 0

    def unregister_eventfd(self) -> int:
        """Undo :meth:`register_eventfd`; 0 or ``-errno`` (``-ENXIO`` if none)."""
        ret = _sys_register(self._nr_register, self._fd, IORING_UNREGISTER_EVENTFD, None, 0)
        if ret < 0:
            return -ctypes.get_errno()
        return 0

    def probe_ops(self) -> frozenset[int] | int:
        """Opcodes this kernel supports (``IORING_REGISTER_PROBE``), or ``-errno``.

        ``-EINVAL`` means Linux 5.1-5.5, which cannot tell.
        """
        pr = io_uring_probe()
        ret = _sys_register(self._nr_register, self._fd, IORING_REGISTER_PROBE, ctypes.addressof(pr), _PROBE_OPS)
        if ret < 0:
            return -ctypes.get_errno()
        n = min(pr.ops_len, _PROBE_OPS)
        return frozenset(pr.ops[i].op for i in range(n) if pr.ops[i].flags & IO_URING_OP_SUPPORTED)

    # -- teardown -------------------------------------------------------------

    def close(self) -> None:
        """Unmap the rings and close the fd.  Idempotent.

        In-flight requests are cancelled by the kernel when the last
        reference to the ring goes away; buffers they point to must stay
        valid until then (QEMU drains before ``luring_cleanup``).
        """
        self._sqe_array = None
        views, self._views = self._views, []
        for v in views:
            try:
                v.release()
            except (BufferError, ValueError):  # pragma: no cover - exported view
                pass
        # The hot-path attributes go too, so a use after close raises
        # (AttributeError) instead of touching unmapped memory.
        for name in ("_sq32", "_cq32", "_cq_raw", "_sqes_raw"):
            self.__dict__.pop(name, None)
        maps, self._maps = self._maps, []
        for addr, size in maps:
            _munmap(addr, size)
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Ring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Safety net only; owners call close() explicitly.
        if getattr(self, "_fd", -1) >= 0:
            try:
                self.close()
            except Exception:  # pragma: no cover - interpreter shutdown
                pass

    def __repr__(self) -> str:
        if self._fd < 0:
            return "<io_uring Ring closed>"
        return (
            f"<io_uring Ring fd={self._fd} sq={self._sq_entries} cq={self._cq_entries} "
            f"features=0x{self._features:x}>"
        )


# --------------------------------------------------------------------------
# Availability probe
# --------------------------------------------------------------------------

_REQUIRED_OPS = {
    IORING_OP_READV: "READV",
    IORING_OP_WRITEV: "WRITEV",
    IORING_OP_FSYNC: "FSYNC",
}


def _read_disabled_sysctl() -> int | None:
    # Linux 6.6+: 0 = anyone may create rings, 1 = only members of
    # kernel.io_uring_group or CAP_SYS_ADMIN, 2 = nobody.
    try:
        with open("/proc/sys/kernel/io_uring_disabled") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _memlock_limit() -> str:
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        return "unlimited" if soft == resource.RLIM_INFINITY else f"{soft} bytes"
    except Exception:  # pragma: no cover
        return "unknown"


def _probe() -> tuple[bool, str]:
    if not _IS_LINUX:
        return False, f"io_uring is Linux-only (this is {sys.platform})"
    if libc is None or _sys_setup is None:
        return False, "libc could not be loaded"
    missing = [n for n in ("io_uring_setup", "io_uring_enter", "io_uring_register") if n not in NR]
    if missing:
        return False, f"io_uring syscall numbers unknown for architecture {platform.machine()!r}"
    disabled = _read_disabled_sysctl()
    if disabled == 2:
        return False, "io_uring is disabled by sysctl kernel.io_uring_disabled=2"
    try:
        ring = Ring(4)
    except OSError as e:
        err = e.errno
        if err == errno.ENOSYS:
            return False, "kernel has no io_uring (needs Linux >= 5.1 built with CONFIG_IO_URING)"
        if err == errno.EPERM:
            if disabled == 1:
                return False, (
                    "io_uring restricted by sysctl kernel.io_uring_disabled=1: only members of "
                    "kernel.io_uring_group or CAP_SYS_ADMIN may create rings"
                )
            return False, (
                "io_uring_setup refused with EPERM: blocked by a seccomp filter "
                "(e.g. a container runtime's default profile) or a security module"
            )
        if err == errno.ENOMEM:
            return False, (
                "io_uring_setup failed with ENOMEM: kernels before 5.12 charge rings to "
                f"RLIMIT_MEMLOCK (soft limit {_memlock_limit()}); raise it (ulimit -l)"
            )
        return False, f"io_uring_setup failed: {errno.errorcode.get(err, err)} ({e.strerror})"
    try:
        ops = ring.probe_ops()
        if isinstance(ops, frozenset):
            lacking = [name for op, name in _REQUIRED_OPS.items() if op not in ops]
            if lacking:
                return False, f"io_uring lacks required opcodes: {', '.join(lacking)}"
        # One NOP round trip: a seccomp filter may allow setup but not enter.
        i = ring.get_sqe()
        assert i is not None
        ring.prep_nop(i, 0x5A5A)
        ret = ring.submit(1)
        if ret < 0:
            return False, f"io_uring_enter failed: {errno.errorcode.get(-ret, -ret)} ({os.strerror(-ret)})"
        cqe = ring.peek_cqe()
        if cqe is None or cqe[0] != 0x5A5A or cqe[1] != 0:
            return False, f"io_uring NOP round trip returned {cqe!r}"
        ring.cq_advance(1)
    finally:
        ring.close()
    note = "" if isinstance(ops, frozenset) else " (Linux 5.1-5.5: no opcode probe)"
    return True, f"io_uring available (features 0x{ring.features:x}){note}"


def probe() -> tuple[bool, str]:
    """Tell whether io_uring is usable here: ``(available, reason)``.

    Creates a small ring and runs one NOP through it.  Never raises; on a
    non-Linux system or an unknown architecture it simply says why not.
    """
    try:
        return _probe()
    except Exception as e:  # pragma: no cover - defensive: probes never raise
        return False, f"io_uring probe failed: {e!r}"
