# SPDX-License-Identifier: GPL-2.0-or-later
"""The generic block layer: port of QEMU's block.c, block/io.c and the
request checks of block/block-backend.c.

One request path serves every driver (``file``, ``null-co``, ``null-aio``,
``blkdebug`` and the user's own, all registered with :func:`bdrv_register`):

1. **Checks first, nothing written when they fail** (``blk_check_byte_request``,
   ``bdrv_check_qiov_request``): a closed device gives ``-ENOMEDIUM``,
   negative offsets and lengths and requests past the end give ``-EIO``,
   writes, discards and write-zeroes on a read-only device ``-EPERM``.
   Wrong *types* (a str offset, a non-QEMUIOVector, a read-only buffer to
   read into) are programming errors and raise ``TypeError``/``ValueError``.
2. **In-flight tracking** (``bdrv_inc_in_flight``): every request counts
   until it finished; ``bdrv_aio_*`` requests until their completion callback
   has run.  :func:`bdrv_drain` and closing wait for the count to reach 0.
3. **Alignment** (``bdrv_co_preadv_part``/``bdrv_co_pwritev_part``): a request
   that is not aligned to ``bs.bl.request_alignment`` is padded to it --
   reads through a bounce buffer for the head and tail, writes by
   read-modify-write.  A padded write is *serialising*: it waits for every
   overlapping request in flight, and every overlapping request that comes
   later waits for it (QEMU's tracked requests, ``bdrv_make_request_serialising``,
   ``bdrv_wait_serialising_requests``).  Without that, two unaligned writes
   sharing a block would each write back the other's stale bytes.
4. **Limits**: requests are split at ``bs.bl.max_transfer``; reads past the
   end of the image (only possible through padding) are zero-filled.
5. **Accounting** (block/accounting.c): every user request is counted in
   ``bs.acct``; :func:`bdrv_get_stats` returns a frozen snapshot.

Synchronous calls (``bdrv_pread``, ``bdrv_pwrite``, ``bdrv_flush``, ...) run
the coroutine and ``aio_poll`` the device's context until it is done -- QEMU's
``BDRV_POLL_WHILE``.  That works from inside a completion callback too (a
nested event loop); inside a coroutine they call the coroutine version
directly.  Callback requests (``bdrv_aio_*``, QEMU's ``blk_aio_prwv``) never
call back before they returned; on the coroutine path they cannot be
cancelled once started (as in QEMU, cancelling waits for the real result).

Threads: a BlockDriverState belongs to its AioContext's home thread (the main
context for everything :func:`bdrv_open` returns); every function here runs
there.  None of the fields need locks for that reason.

Deviations from QEMU, on purpose:

* There is no separate BlockBackend: the BlockBackend checks (bounds,
  read-only, accounting) are applied by the ``bdrv_*`` functions a user calls.
  Drivers calling ``bdrv_co_*`` on their child go through the same checks.
* Lengths are exact bytes, not rounded up to 512-byte sectors.  A padded write
  never grows the image: if the padding reached past the end, the image is
  truncated back afterwards.
* No format probing: without a ``driver`` option, a filename opens with the
  ``file`` driver (raw).
* FUA emulated by a flush bumps the write generation first, so the flush is
  never skipped as "nothing written since the last flush".
* Errors from ``bdrv_open`` are Python exceptions (``ValueError`` for bad
  options, ``OSError`` with ``filename`` for files) carrying QEMU's messages.
* The direct path: ``bdrv_aio_preadv``/``bdrv_aio_pwritev`` give a request
  that needs nothing from steps 3-4 (aligned, inside the device, no flags,
  nothing serialising in flight) and comes from the home thread straight to
  the driver's ``bdrv_aio_preadv``/``bdrv_aio_pwritev`` callback, without a
  coroutine (in Python the coroutine, its wake-up and the completion BH are
  most of such a request's cost).  Steps 1, 2 and 5 and the tracking of
  step 3 still apply; cancellation goes to the driver's AIOCB.  A driver
  may decline (return None); the request then takes the coroutine path.
* Callback requests that finished before their submit returned are
  delivered by one re-entrant BH per context, in order, instead of a
  oneshot BH each (:class:`_DeferredCompletions`).
"""

from __future__ import annotations

import collections
import errno
import os
import time
from typing import Any, Callable, Collection, Optional

from .. import coroutine as _co
from .._tls import _local as _tls_local
from ..coroutine._core import _coroutine_new as _co_create, _enter as _co_enter
from ..aio import (
    AioContext,
    aio_bh_new_full,
    aio_bh_schedule_oneshot,
    aio_bh_schedule_oneshot_full,
    aio_context_add_cleanup,
    qemu_bh_cancel,
    qemu_bh_delete,
    qemu_bh_schedule,
    aio_wait_while,
    qemu_get_aio_context,
)
from ..aiocb import AIOCBInfo, BlockAIOCB, qemu_aio_unref
from ..iov import (
    QEMUIOVector,
    qemu_iovec_init_buf,
    qemu_iovec_init_extended,
    qemu_iovec_init_slice,
    qemu_memalign,
    qemu_try_memalign,
    qemu_vfree,
)
from .._sys.mem import PAGE_SIZE
from .accounting import (
    BLOCK_ACCT_FLUSH,
    BLOCK_ACCT_READ,
    BLOCK_ACCT_UNMAP,
    BLOCK_ACCT_WRITE,
    BlockAcctStats,
    BlockDeviceStats,
    block_acct_invalid,
    block_acct_snapshot,
    _account_request,
)

__all__ = [
    # open flags (include/block/block-common.h)
    "BDRV_O_RDWR", "BDRV_O_RESIZE", "BDRV_O_NOCACHE", "BDRV_O_NATIVE_AIO",
    "BDRV_O_NO_FLUSH", "BDRV_O_UNMAP", "BDRV_O_PROTOCOL", "BDRV_O_IO_URING",
    # request flags
    "BDRV_REQ_COPY_ON_READ", "BDRV_REQ_ZERO_WRITE", "BDRV_REQ_MAY_UNMAP", "BDRV_REQ_FUA",
    "BDRV_REQ_SERIALISING", "BDRV_REQ_NO_FALLBACK", "BDRV_REQ_MASK",
    "BDRV_MAX_LENGTH", "BDRV_REQUEST_MAX_BYTES",
    "PREALLOC_MODE_OFF", "PREALLOC_MODE_METADATA", "PREALLOC_MODE_FALLOC", "PREALLOC_MODE_FULL",
    "BlockDriver", "BlockDriverState", "BlockLimits",
    "bdrv_register", "bdrv_unregister", "bdrv_find_format", "bdrv_list_formats",
    "bdrv_open", "bdrv_open_child", "bdrv_ref", "bdrv_unref", "bdrv_close",
    "bdrv_get_aio_context", "bdrv_getlength", "bdrv_is_read_only",
    "bdrv_co_preadv", "bdrv_co_preadv_part", "bdrv_co_pwritev", "bdrv_co_pwritev_part",
    "bdrv_co_pread", "bdrv_co_pwrite",
    "bdrv_co_flush", "bdrv_co_pdiscard", "bdrv_co_pwrite_zeroes", "bdrv_co_truncate",
    "bdrv_pread", "bdrv_pwrite", "bdrv_flush", "bdrv_pdiscard", "bdrv_pwrite_zeroes",
    "bdrv_truncate",
    "bdrv_aio_preadv", "bdrv_aio_pwritev", "bdrv_aio_flush", "bdrv_aio_pdiscard",
    "bdrv_drain", "bdrv_drained_begin", "bdrv_drained_end",
    "bdrv_io_plug", "bdrv_io_unplug",
    "bdrv_inc_in_flight", "bdrv_dec_in_flight",
    "bdrv_get_stats",
    # block status (include/block/block-common.h, block/io.c)
    "BDRV_BLOCK_DATA", "BDRV_BLOCK_ZERO", "BDRV_BLOCK_OFFSET_VALID", "BDRV_BLOCK_RAW",
    "BDRV_BLOCK_ALLOCATED", "BDRV_BLOCK_EOF", "BDRV_BLOCK_RECURSE",
    "bdrv_co_block_status", "bdrv_block_status", "bdrv_co_is_allocated", "bdrv_is_allocated",
    # moving a device between contexts (block.c)
    "bdrv_try_change_aio_context",
    "qemu_blockalign", "qemu_try_blockalign", "bdrv_opt_mem_align", "bdrv_min_mem_align",
    "bdrv_qiov_is_aligned",
]

# --------------------------------------------------------------------------
# Constants (values as in QEMU's include/block/block-common.h)

BDRV_O_RDWR = 0x0002
BDRV_O_RESIZE = 0x0004
BDRV_O_NOCACHE = 0x0020        # cache.direct=on: O_DIRECT
BDRV_O_NATIVE_AIO = 0x0080     # aio=native
BDRV_O_NO_FLUSH = 0x0200       # cache.no-flush=on: flushes return at once
BDRV_O_UNMAP = 0x4000          # discard=unmap: pass discards down
BDRV_O_PROTOCOL = 0x8000
BDRV_O_IO_URING = 0x40000      # aio=io_uring

BDRV_REQ_COPY_ON_READ = 0x1
BDRV_REQ_ZERO_WRITE = 0x2
BDRV_REQ_MAY_UNMAP = 0x4
BDRV_REQ_FUA = 0x10
BDRV_REQ_SERIALISING = 0x80
BDRV_REQ_NO_FALLBACK = 0x100
BDRV_REQ_MASK = 0xfff

# Block status flags, QEMU's values.  DATA: reads come from the device's
# storage (``map`` says where when OFFSET_VALID); ZERO: reads return zeros;
# OFFSET_VALID: ``map`` is an offset into ``file``; RAW: a filter's answer,
# "ask ``file`` at ``map``" (never returned to callers); ALLOCATED: this
# layer decides the content (DATA or ZERO); EOF: the range reaches the end of
# the device; RECURSE: a format driver asks the generic layer to look at
# ``file`` too, to find zeros below data.
BDRV_BLOCK_DATA = 0x01
BDRV_BLOCK_ZERO = 0x02
BDRV_BLOCK_OFFSET_VALID = 0x04
BDRV_BLOCK_RAW = 0x08
BDRV_BLOCK_ALLOCATED = 0x10
BDRV_BLOCK_EOF = 0x20
BDRV_BLOCK_RECURSE = 0x40

_INT64_MAX = (1 << 63) - 1
_INT_MAX = (1 << 31) - 1
BDRV_MAX_ALIGNMENT = 1 << 30
BDRV_MAX_LENGTH = _INT64_MAX - (_INT64_MAX % BDRV_MAX_ALIGNMENT)
# QEMU: BDRV_REQUEST_MAX_SECTORS << BDRV_SECTOR_BITS with INT_MAX sectors bound.
BDRV_REQUEST_MAX_BYTES = (_INT_MAX >> 9) << 9

PREALLOC_MODE_OFF = 0
PREALLOC_MODE_METADATA = 1
PREALLOC_MODE_FALLOC = 2
PREALLOC_MODE_FULL = 3

# Bounce buffer size when write-zeroes falls back to writing zeros (QEMU
# uses up to 16 MiB; 1 MiB keeps Python's memory use modest).
_ZERO_BOUNCE_MAX = 1 << 20

_NOT_DONE = object()

_monotonic_ns = time.monotonic_ns
# BlockAcctType values as plain ints, for indexing the counters.
_ACCT_READ, _ACCT_WRITE = int(BLOCK_ACCT_READ), int(BLOCK_ACCT_WRITE)

# Tracked request types (BdrvTrackedRequestType)
_TRACKED_READ, _TRACKED_WRITE, _TRACKED_DISCARD, _TRACKED_TRUNCATE = 1, 2, 3, 4

# Generic options handled by bdrv_open itself (bdrv_runtime_opts and
# update_flags_from_options); everything else belongs to the driver.
_GENERIC_OPTS = ("driver", "read-only", "cache.direct", "cache.no-flush", "discard",
                 "node-name")


# --------------------------------------------------------------------------
# Drivers

class BlockDriver:
    """QEMU's ``BlockDriver``: a format name and QEMU-named callbacks.

    Every callback takes the device first and is optional (``None``); the
    generic layer checks bounds and read-only before calling any of them.
    ``bdrv_co_*`` and ``bdrv_aio_*`` ones run in a coroutine of the device's
    context and return 0 or ``-errno``.

    ``bdrv_open(bs, options, flags)``        consume (``pop``) the options it
        knows from the dict; leftovers are refused by name.  Return 0/None or
        ``-errno``, or raise.  (``bdrv_file_open`` is accepted as an alias.)
    ``bdrv_close(bs)``                       called exactly once, after drain.
    ``bdrv_co_preadv(bs, offset, bytes, qiov, flags)``, ``bdrv_co_pwritev``
        (also the ``_part`` variants with ``qiov_offset`` after ``qiov``).
    ``bdrv_aio_preadv(bs, offset, bytes, qiov, flags, cb, opaque)`` /
        ``bdrv_aio_pwritev`` / ``bdrv_aio_flush(bs, cb, opaque)``: callback
        drivers; the generic layer turns them into coroutine calls.
    ``bdrv_co_flush(bs)``, ``bdrv_co_flush_to_os(bs)``, ``bdrv_co_flush_to_disk(bs)``
    ``bdrv_co_pdiscard(bs, offset, bytes)``, ``bdrv_co_pwrite_zeroes(bs, offset, bytes, flags)``
    ``bdrv_co_truncate(bs, offset, exact, prealloc, flags)``
    ``bdrv_getlength(bs) -> int`` (bytes or ``-errno``); without it the
        length is ``bs.total_bytes`` as set by ``bdrv_open``.
    ``bdrv_refresh_limits(bs)``: fill ``bs.bl`` (a :class:`BlockLimits`).
    ``bdrv_attach_aio_context(bs, ctx)``, ``bdrv_detach_aio_context(bs)``,
    ``bdrv_io_plug(bs)``, ``bdrv_io_unplug(bs)``, ``bdrv_drain_begin(bs)``,
    ``bdrv_drain_end(bs)``.
    ``bdrv_co_block_status(bs, want_zero, offset, bytes) -> (ret, pnum, map, file)``
        (or a negative errno): the ``BDRV_BLOCK_*`` flags of the ``pnum``
        bytes at ``offset``; ``offset``/``bytes`` are aligned to
        ``request_alignment`` and ``pnum`` must be a non-zero multiple of it.
        Without it a device is all data (QEMU's default).

    Plain attributes: ``format_name``, ``protocol_name``, ``runtime_opts``
    (option names the driver accepts, checked before it is opened; None = the
    driver checks itself), ``has_variable_length`` (length asked every time),
    ``is_filter``.

    A subclass may define the callbacks as methods instead (then they get
    ``self`` first, as usual in Python).
    """

    _CALLBACKS = (
        "bdrv_open", "bdrv_file_open", "bdrv_close",
        "bdrv_co_preadv", "bdrv_co_preadv_part", "bdrv_co_pwritev", "bdrv_co_pwritev_part",
        "bdrv_aio_preadv", "bdrv_aio_pwritev", "bdrv_aio_flush",
        "bdrv_co_flush", "bdrv_co_flush_to_os", "bdrv_co_flush_to_disk",
        "bdrv_co_pdiscard", "bdrv_co_pwrite_zeroes", "bdrv_co_truncate",
        "bdrv_getlength", "bdrv_refresh_limits",
        "bdrv_attach_aio_context", "bdrv_detach_aio_context",
        "bdrv_io_plug", "bdrv_io_unplug", "bdrv_drain_begin", "bdrv_drain_end",
        "bdrv_co_block_status",
    )
    _ATTRS = ("format_name", "protocol_name", "runtime_opts", "has_variable_length",
              "is_filter")

    format_name: Optional[str] = None
    protocol_name: Optional[str] = None
    runtime_opts: Optional[Collection[str]] = None
    has_variable_length: bool = False
    is_filter: bool = False

    bdrv_open: Optional[Callable[..., Any]] = None
    bdrv_file_open: Optional[Callable[..., Any]] = None
    bdrv_close: Optional[Callable[..., Any]] = None
    bdrv_co_preadv: Optional[Callable[..., int]] = None
    bdrv_co_preadv_part: Optional[Callable[..., int]] = None
    bdrv_co_pwritev: Optional[Callable[..., int]] = None
    bdrv_co_pwritev_part: Optional[Callable[..., int]] = None
    bdrv_aio_preadv: Optional[Callable[..., Any]] = None
    bdrv_aio_pwritev: Optional[Callable[..., Any]] = None
    bdrv_aio_flush: Optional[Callable[..., Any]] = None
    bdrv_co_flush: Optional[Callable[..., int]] = None
    bdrv_co_flush_to_os: Optional[Callable[..., int]] = None
    bdrv_co_flush_to_disk: Optional[Callable[..., int]] = None
    bdrv_co_pdiscard: Optional[Callable[..., int]] = None
    bdrv_co_pwrite_zeroes: Optional[Callable[..., int]] = None
    bdrv_co_truncate: Optional[Callable[..., int]] = None
    bdrv_getlength: Optional[Callable[..., int]] = None
    bdrv_refresh_limits: Optional[Callable[..., Any]] = None
    bdrv_attach_aio_context: Optional[Callable[..., Any]] = None
    bdrv_detach_aio_context: Optional[Callable[..., Any]] = None
    bdrv_io_plug: Optional[Callable[..., Any]] = None
    bdrv_io_unplug: Optional[Callable[..., Any]] = None
    bdrv_drain_begin: Optional[Callable[..., Any]] = None
    bdrv_drain_end: Optional[Callable[..., Any]] = None
    bdrv_co_block_status: Optional[Callable[..., Any]] = None

    def __init__(self, format_name: Optional[str] = None, **attrs: Any) -> None:
        if format_name is not None:
            self.format_name = format_name
        for k, v in attrs.items():
            if k not in self._CALLBACKS and k not in self._ATTRS:
                raise TypeError(f"BlockDriver: unknown attribute {k!r} (callbacks are "
                                f"QEMU-named, e.g. 'bdrv_co_preadv')")
            if k in self._CALLBACKS and v is not None and not callable(v):
                raise TypeError(f"BlockDriver: {k} must be callable, got {type(v).__name__}")
            setattr(self, k, v)

    def __repr__(self) -> str:
        return f"<BlockDriver {self.format_name!r}>"


class BlockLimits:
    """QEMU's ``BlockLimits`` (the fields the generic layer uses).

    ``request_alignment``  offsets and lengths the driver accepts (power of 2)
    ``max_transfer``       largest single request, 0 = unlimited
    ``min_mem_alignment``  buffer address alignment the driver needs
    ``opt_mem_alignment``  buffer alignment that is fast (bounce buffers use it)
    ``pdiscard_alignment``, ``max_pdiscard``, ``pwrite_zeroes_alignment``,
    ``max_pwrite_zeroes``: as in QEMU, 0 = no constraint.
    """

    __slots__ = ("request_alignment", "max_transfer", "min_mem_alignment",
                 "opt_mem_alignment", "pdiscard_alignment", "max_pdiscard",
                 "pwrite_zeroes_alignment", "max_pwrite_zeroes", "opt_transfer")

    def __init__(self) -> None:
        self.request_alignment = 1
        self.max_transfer = 0
        self.min_mem_alignment = 1
        self.opt_mem_alignment = PAGE_SIZE
        self.pdiscard_alignment = 0
        self.max_pdiscard = 0
        self.pwrite_zeroes_alignment = 0
        self.max_pwrite_zeroes = 0
        self.opt_transfer = 0

    def __repr__(self) -> str:
        return ("<BlockLimits " + " ".join(f"{k}={getattr(self, k)}" for k in self.__slots__) + ">")


_drivers: dict[str, BlockDriver] = {}


def bdrv_register(drv: BlockDriver) -> None:
    """Port of ``bdrv_register``: make ``drv`` openable by its ``format_name``.

    Registering the same object twice is a no-op; another driver with a name
    already taken is refused (QEMU would silently shadow it).
    """
    if not isinstance(drv, BlockDriver):
        raise TypeError(f"bdrv_register: expected a BlockDriver, got {type(drv).__name__}")
    name = drv.format_name
    if not isinstance(name, str) or not name:
        raise ValueError("bdrv_register: the driver needs a non-empty format_name")
    if not (drv.bdrv_open or drv.bdrv_file_open):
        raise ValueError(f"bdrv_register: driver '{name}' has no bdrv_open callback")
    old = _drivers.get(name)
    if old is drv:
        return
    if old is not None:
        raise ValueError(f"bdrv_register: a driver named '{name}' is already registered")
    _drivers[name] = drv


def bdrv_unregister(drv: BlockDriver) -> None:
    """Remove a driver registered with :func:`bdrv_register` (pyaioctx
    extension; QEMU drivers live as long as the process).  Open devices keep
    working."""
    if _drivers.get(getattr(drv, "format_name", None)) is drv:
        del _drivers[drv.format_name]  # type: ignore[arg-type]


def bdrv_find_format(format_name: str) -> Optional[BlockDriver]:
    """Port of ``bdrv_find_format``."""
    return _drivers.get(format_name)


def bdrv_list_formats() -> list[str]:
    """Names of the registered drivers (QEMU: ``bdrv_iterate_format``)."""
    return sorted(_drivers)


# --------------------------------------------------------------------------
# BlockDriverState

class _TrackedRequest:
    """QEMU's ``BdrvTrackedRequest``.  Home thread only.

    ``wait_queue`` is created by the first request that waits for this one:
    almost no request is ever waited for, and a CoQueue per request would
    be the most expensive part of tracking it.
    """

    __slots__ = ("bs", "offset", "bytes", "type", "serialising", "overlap_offset",
                 "overlap_bytes", "wait_queue", "waiting_for", "co")

    def __init__(self, bs: "BlockDriverState", offset: int, bytes: int, type: int,
                 co: Any = None) -> None:
        self.bs = bs
        self.offset = offset
        self.bytes = bytes
        self.type = type
        self.serialising = False
        self.overlap_offset = offset
        self.overlap_bytes = bytes
        self.wait_queue: Optional[_co.CoQueue] = None
        self.waiting_for: Optional[_TrackedRequest] = None
        self.co = co if co is not None else _co.qemu_coroutine_self()


class BlockDriverState:
    """QEMU's ``BlockDriverState``: one open device.

    Made by :func:`bdrv_open`, never directly.  Fields (home thread only):

    ``drv``          the BlockDriver (None once closed)
    ``opaque``       the driver's own state (drivers set it in bdrv_open)
    ``filename``, ``node_name``, ``options`` (what bdrv_open was given)
    ``open_flags``   BDRV_O_* after options were applied
    ``read_only``    True unless opened with BDRV_O_RDWR / read-only=off
    ``bl``           :class:`BlockLimits`
    ``file``         the primary child (a BlockDriverState) or None
    ``children``     every child opened with :func:`bdrv_open_child`
    ``in_flight``    requests not yet completed (for bdrv_drain)
    ``total_bytes``  cached length (refreshed after truncate)
    ``acct``         live :class:`BlockAcctStats`
    ``supported_write_flags`` / ``supported_zero_flags``: BDRV_REQ_* the
                     driver handles itself; the others are emulated.

    Pythonic face: ``read``, ``write``, ``flush``, ``discard``,
    ``write_zeroes``, ``truncate``, ``length``, ``drain``, ``close``,
    ``stats()``, ``set_aio_context(ctx)``, ``block_status(offset, length)``,
    and ``with bdrv_open(...) as bs:`` (drains and closes).
    """

    # Slots: CPython keeps at most 30 attributes of a plain instance in its
    # fast layout, and every request reads several of these.  __dict__
    # stays for attributes a driver or a user adds.
    __slots__ = ("drv", "opaque", "filename", "node_name", "options", "open_flags", "read_only",
                 "aio_context", "bl", "file", "children", "parent", "refcnt", "in_flight",
                 "cb_depth", "tracked_requests", "serialising_in_flight", "_co_direct_free",
                 "write_gen", "flushed_gen", "active_flush_req", "flush_queue", "io_plugged",
                 "io_plug_disabled", "quiesce_counter", "total_bytes", "acct",
                 "supported_write_flags", "supported_zero_flags", "has_variable_length", "closed",
                 "_co_direct_read", "_co_direct_write", "__dict__", "__weakref__")

    def __init__(self, drv: BlockDriver, flags: int, ctx: AioContext) -> None:
        self.drv: Optional[BlockDriver] = drv
        self.opaque: Any = None
        self.filename: Optional[str] = None
        self.node_name: Optional[str] = None
        self.options: dict = {}
        self.open_flags = flags
        self.read_only = not (flags & BDRV_O_RDWR)
        self.aio_context = ctx
        self.bl = BlockLimits()
        self.file: Optional[BlockDriverState] = None
        self.children: list[BlockDriverState] = []
        self.parent: Optional[BlockDriverState] = None
        self.refcnt = 1
        self.in_flight = 0
        self.cb_depth = 0            # completion callbacks running right now
        # Requests in flight, in submission order; a dict (used as an
        # ordered set) so that ending one is O(1) at any queue depth.
        self.tracked_requests: dict[_TrackedRequest, None] = {}
        self.serialising_in_flight = 0
        # The coroutine direct path's tracked requests, recycled (see
        # _CoDirectReq); home thread only.
        self._co_direct_free: collections.deque[_CoDirectReq] = collections.deque()
        self.write_gen = 0
        self.flushed_gen = 0
        self.active_flush_req = False
        self.flush_queue = _co.CoQueue()
        self.io_plugged = 0
        self.io_plug_disabled = 0
        self.quiesce_counter = 0
        self.total_bytes = 0
        self.acct = BlockAcctStats()
        self.supported_write_flags = 0
        self.supported_zero_flags = 0
        self.has_variable_length = drv.has_variable_length
        self.closed = False
        # The driver callbacks the coroutine direct path may call, or None:
        # the per-device half of its conditions (see _make_bdrv_co_rw),
        # settled by bdrv_open once the device is open and cleared by close.
        self._co_direct_read: Optional[Callable[..., Any]] = None
        self._co_direct_write: Optional[Callable[..., Any]] = None

    # -- Pythonic face -----------------------------------------------------
    @property
    def length(self) -> int:
        """``bdrv_getlength``; raises OSError on error."""
        return _raise_on_error(bdrv_getlength(self), "getlength", self)

    def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset``; raises OSError on error."""
        buf = bytearray(length if isinstance(length, int) and length > 0 else 0)
        _raise_on_error(bdrv_pread(self, offset, length, buf), "read", self)
        return bytes(buf)

    def write(self, offset: int, data: Any) -> None:
        """Write all of ``data`` (any bytes-like) at ``offset``; raises OSError."""
        n = memoryview(data).nbytes
        _raise_on_error(bdrv_pwrite(self, offset, n, data), "write", self)

    def flush(self) -> None:
        _raise_on_error(bdrv_flush(self), "flush", self)

    def discard(self, offset: int, length: int) -> None:
        _raise_on_error(bdrv_pdiscard(self, offset, length), "discard", self)

    def write_zeroes(self, offset: int, length: int, flags: int = 0) -> None:
        _raise_on_error(bdrv_pwrite_zeroes(self, offset, length, flags), "write_zeroes", self)

    def truncate(self, length: int) -> None:
        _raise_on_error(bdrv_truncate(self, length), "truncate", self)

    def drain(self) -> None:
        bdrv_drain(self)

    def set_aio_context(self, ctx: AioContext) -> None:
        """:func:`bdrv_try_change_aio_context`; raises OSError on failure."""
        _raise_on_error(bdrv_try_change_aio_context(self, ctx), "set_aio_context", self)

    def block_status(self, offset: int, length: int) -> tuple[int, int, int, Any]:
        """:func:`bdrv_block_status`: ``(flags, pnum, map, file)``; raises
        OSError on error."""
        r = bdrv_block_status(self, offset, length)
        _raise_on_error(r[0], "block_status", self)
        return r

    def close(self) -> None:
        """Drop the caller's reference (``bdrv_unref``); idempotent."""
        if not self.closed and self.refcnt > 0:
            bdrv_unref(self)

    def stats(self) -> BlockDeviceStats:
        return bdrv_get_stats(self)

    def __enter__(self) -> "BlockDriverState":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        name = self.drv.format_name if self.drv else "closed"
        return (f"<BlockDriverState {name} {self.filename or self.node_name or ''!s}"
                f"{' ro' if self.read_only else ''} in_flight={self.in_flight}>")


def _raise_on_error(ret: int, what: str, bs: BlockDriverState) -> int:
    if ret < 0:
        raise OSError(-ret, f"{what} on {bs!r}: {os.strerror(-ret)}", bs.filename)
    return ret


def _check_bs(bs: object, fn: str) -> BlockDriverState:
    if not isinstance(bs, BlockDriverState):
        raise TypeError(f"{fn}: expected a BlockDriverState, got {type(bs).__name__}")
    return bs


def _check_int(v: object, fn: str, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(v).__name__}")
    return v


def _check_qiov(qiov: object, fn: str) -> QEMUIOVector:
    if not isinstance(qiov, QEMUIOVector):
        raise TypeError(f"{fn}: qiov must be a QEMUIOVector, got {type(qiov).__name__}")
    return qiov


def _require_co(fn: str) -> None:
    if not _co.qemu_in_coroutine():
        raise _co.NotInCoroutineError(f"{fn} must be called from a coroutine "
                                      f"(use the synchronous or bdrv_aio_* variant)")


def bdrv_get_aio_context(bs: BlockDriverState) -> AioContext:
    """Port of ``bdrv_get_aio_context``."""
    return _check_bs(bs, "bdrv_get_aio_context").aio_context


def bdrv_is_read_only(bs: BlockDriverState) -> bool:
    """Port of ``bdrv_is_read_only``."""
    return _check_bs(bs, "bdrv_is_read_only").read_only


def bdrv_get_stats(bs: BlockDriverState) -> BlockDeviceStats:
    """A frozen snapshot of the device's accounting (QEMU's ``query-blockstats``)."""
    return block_acct_snapshot(_check_bs(bs, "bdrv_get_stats").acct)


def bdrv_inc_in_flight(bs: BlockDriverState) -> None:
    """Port of ``bdrv_inc_in_flight``."""
    bs.in_flight += 1


def bdrv_dec_in_flight(bs: BlockDriverState) -> None:
    """Port of ``bdrv_dec_in_flight``.  Waiters re-check when the event loop
    they poll returns (the request completed in this thread's aio_poll)."""
    if bs.in_flight <= 0:
        raise RuntimeError(f"bdrv_dec_in_flight: {bs!r} has no request in flight")
    bs.in_flight -= 1


# --------------------------------------------------------------------------
# Memory alignment helpers (block/io.c)

def bdrv_opt_mem_align(bs: BlockDriverState) -> int:
    """Port of ``bdrv_opt_mem_align``."""
    if bs is None or bs.drv is None:
        return max(4096, PAGE_SIZE)
    return bs.bl.opt_mem_alignment


def bdrv_min_mem_align(bs: BlockDriverState) -> int:
    """Port of ``bdrv_min_mem_align``."""
    if bs is None or bs.drv is None:
        return max(4096, PAGE_SIZE)
    return bs.bl.min_mem_alignment


def qemu_blockalign(bs: Optional[BlockDriverState], size: int) -> Any:
    """Port of ``qemu_blockalign``: a buffer aligned for ``bs`` (see qemu_memalign)."""
    return qemu_memalign(bdrv_opt_mem_align(bs), size)  # type: ignore[arg-type]


def qemu_try_blockalign(bs: Optional[BlockDriverState], size: int) -> Any:
    """Port of ``qemu_try_blockalign``: None when out of memory."""
    return qemu_try_memalign(bdrv_opt_mem_align(bs), size)  # type: ignore[arg-type]


def bdrv_qiov_is_aligned(bs: BlockDriverState, qiov: QEMUIOVector) -> bool:
    """Port of ``bdrv_qiov_is_aligned``: every base and length is a multiple
    of the device's minimum memory alignment."""
    align = bdrv_min_mem_align(bs)
    if align <= 1:
        return True
    mask = align - 1
    # Straight from the vector's own bookkeeping (entry addresses and
    # views), not via entries(): this runs on every request of an O_DIRECT
    # device.
    for addr, view in zip(qiov._addrs, qiov._views):
        if (addr & mask) or (len(view) & mask):
            return False
    return True


# --------------------------------------------------------------------------
# Opening and closing (block.c)

def _parse_bool(opts: dict, key: str) -> Optional[bool]:
    if key not in opts:
        return None
    v = opts.pop(key)
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("on", "off", "true", "false", "yes", "no"):
        return v.lower() in ("on", "true", "yes")
    raise ValueError(f"Parameter '{key}' expects a boolean (True/False or 'on'/'off'), "
                     f"got {v!r}")


def _update_flags_from_options(flags: int, opts: dict) -> int:
    # Port of update_flags_from_options + bdrv_parse_discard_flags: an option
    # that is present overrides the corresponding flag.
    v = _parse_bool(opts, "cache.direct")
    if v is not None:
        flags = (flags | BDRV_O_NOCACHE) if v else (flags & ~BDRV_O_NOCACHE)
    v = _parse_bool(opts, "cache.no-flush")
    if v is not None:
        flags = (flags | BDRV_O_NO_FLUSH) if v else (flags & ~BDRV_O_NO_FLUSH)
    v = _parse_bool(opts, "read-only")
    if v is not None:
        flags = (flags & ~BDRV_O_RDWR) if v else (flags | BDRV_O_RDWR)
    if "discard" in opts:
        d = opts.pop("discard")
        if d in ("off", "ignore", False):
            flags &= ~BDRV_O_UNMAP
        elif d in ("on", "unmap", True):
            flags |= BDRV_O_UNMAP
        else:
            raise ValueError(f"Invalid discard option {d!r} (expected 'ignore'/'off' "
                             f"or 'unmap'/'on')")
    return flags


def bdrv_open(filename: Any = None, options: Optional[dict] = None, flags: int = 0,
              _parent: Optional[BlockDriverState] = None) -> BlockDriverState:
    """Port of ``bdrv_open``: open a device and return it.

    ``options`` is one flat dict with QEMU's keys (``driver``, ``read-only``,
    ``cache.direct``, ``cache.no-flush``, ``discard``, ``node-name`` and the
    driver's own, e.g. ``filename``/``aio`` for ``file``).  Options override
    the matching ``BDRV_O_*`` flags.  Without ``BDRV_O_RDWR`` (or
    ``read-only: False``) the device is read-only, as in QEMU.  Without a
    ``driver``, a filename opens with ``file``.

    Raises ``ValueError`` for an unknown driver or option (naming it) and bad
    option values, ``OSError`` (with ``filename``) when the file cannot be
    opened; a failed open leaves nothing open.  The device lives in the main
    context.
    """
    if options is not None and not isinstance(options, dict):
        raise TypeError(f"bdrv_open: options must be a dict, got {type(options).__name__}")
    flags = _check_int(flags, "bdrv_open", "flags")
    opts = dict(options or {})
    if filename is not None:
        try:
            filename = os.fspath(filename)
        except TypeError:
            raise TypeError(f"bdrv_open: filename must be a str or path, got "
                            f"{type(filename).__name__}") from None
        if "filename" in opts and opts["filename"] != filename:
            raise ValueError(f"bdrv_open: filename given twice ({filename!r} and "
                             f"options['filename']={opts['filename']!r})")
        opts["filename"] = filename
    given = dict(opts)
    flags = _update_flags_from_options(flags, opts)
    driver = opts.pop("driver", None)
    node_name = opts.pop("node-name", None)
    if driver is None:
        if "filename" not in opts:
            raise ValueError("bdrv_open: no 'driver' option and no filename to open")
        driver = "file"
    if not isinstance(driver, str):
        raise TypeError(f"bdrv_open: 'driver' must be a str, got {type(driver).__name__}")
    drv = _drivers.get(driver)
    if drv is None:
        raise ValueError(f"Unknown driver '{driver}' (known: {', '.join(bdrv_list_formats())})")
    kind = "protocol" if drv.protocol_name else "format"
    if drv.runtime_opts is not None:
        for key in sorted(opts):
            if key not in drv.runtime_opts:
                raise ValueError(f"Block {kind} '{driver}' doesn't support the option '{key}'")

    ctx = _parent.aio_context if _parent is not None else qemu_get_aio_context()
    bs = BlockDriverState(drv, flags, ctx)
    bs.filename = opts.get("filename") if isinstance(opts.get("filename"), str) else None
    bs.node_name = node_name
    bs.options = given
    bs.parent = _parent
    if not (drv.bdrv_co_preadv or drv.bdrv_co_preadv_part or drv.bdrv_aio_preadv):
        bs.bl.request_alignment = 512  # QEMU: sector-based drivers
    open_fn = drv.bdrv_open or drv.bdrv_file_open
    opened = False
    try:
        ret = open_fn(bs, opts, flags)  # type: ignore[misc]
        opened = True
        if ret is not None:
            _check_int(ret, f"driver '{driver}' bdrv_open", "the return value")
            if ret < 0:
                raise OSError(-ret, f"Could not open '{bs.filename or driver}': "
                                    f"{os.strerror(-ret)}", bs.filename)
        for key in sorted(opts):
            raise ValueError(f"Block {kind} '{driver}' doesn't support the option '{key}'")
        _refresh_limits(bs)
        length = _refresh_total_bytes(bs)
        if length < 0:
            raise OSError(-length, f"Could not get the length of '{bs.filename or driver}': "
                                   f"{os.strerror(-length)}", bs.filename)
        _refresh_co_direct(bs)
    except BaseException:
        # A failed open leaves nothing behind: the driver's close releases
        # what its open took, and children are dropped.
        try:
            if opened and drv.bdrv_close is not None:
                drv.bdrv_close(bs)
        finally:
            for child in bs.children:
                bdrv_unref(child)
            bs.children = []
            bs.file = None
            bs.drv = None
            bs.closed = True
            bs._co_direct_read = bs._co_direct_write = None
            bs.refcnt = 0
        raise
    return bs


def _refresh_co_direct(bs: BlockDriverState) -> None:
    # The coroutine direct path's per-device conditions: a driver without
    # _part callbacks, an open top-level device of fixed length, and for
    # writes a writable one.  None of them changes while the device is open.
    drv = bs.drv
    ok = (drv is not None and not bs.closed and bs.parent is None
          and not bs.has_variable_length)
    bs._co_direct_read = (drv.bdrv_co_preadv  # type: ignore[union-attr]
                          if ok and drv.bdrv_co_preadv_part is None else None)  # type: ignore[union-attr]
    bs._co_direct_write = (drv.bdrv_co_pwritev  # type: ignore[union-attr]
                           if ok and drv.bdrv_co_pwritev_part is None and not bs.read_only
                           else None)


def _refresh_limits(bs: BlockDriverState) -> None:
    # Port of bdrv_refresh_limits: children first, then inherit the memory
    # alignment of the primary child, then ask the driver.
    if bs.file is not None:
        fbl = bs.file.bl
        bs.bl.min_mem_alignment = max(bs.bl.min_mem_alignment, fbl.min_mem_alignment)
        bs.bl.opt_mem_alignment = max(bs.bl.opt_mem_alignment, fbl.opt_mem_alignment)
        bs.bl.max_transfer = fbl.max_transfer
    if bs.drv is not None and bs.drv.bdrv_refresh_limits is not None:
        bs.drv.bdrv_refresh_limits(bs)
    ra = bs.bl.request_alignment
    if not isinstance(ra, int) or ra < 1 or ra & (ra - 1) or ra > BDRV_MAX_ALIGNMENT:
        raise ValueError(f"request_alignment {ra!r} of '{bs.drv.format_name}' is not a "  # type: ignore[union-attr]
                         f"power of two between 1 and {BDRV_MAX_ALIGNMENT}")


def _refresh_total_bytes(bs: BlockDriverState) -> int:
    # Port of refresh_total_sectors, in bytes.
    drv = bs.drv
    if drv is None:
        return -errno.ENOMEDIUM
    if drv.bdrv_getlength is None:
        return bs.total_bytes
    n = drv.bdrv_getlength(bs)
    _check_int(n, f"driver '{drv.format_name}' bdrv_getlength", "the return value")
    if n >= 0:
        bs.total_bytes = n
    return n


def bdrv_open_child(bs: BlockDriverState, options: Any, flags: Optional[int] = None) -> BlockDriverState:
    """Port of ``bdrv_open_child`` for a driver's primary child (``bs.file``).

    ``options`` is a full option dict (or a filename, opened with ``file``).
    The child inherits the parent's flags (read-only, cache.direct,
    cache.no-flush, aio) unless its options say otherwise; discards are
    always allowed below the top (QEMU: "our block drivers take care to send
    flushes and respect unmap policy").
    """
    _check_bs(bs, "bdrv_open_child")
    if isinstance(options, (str, os.PathLike)):
        options = {"driver": "file", "filename": os.fspath(options)}
    if not isinstance(options, dict):
        raise TypeError(f"bdrv_open_child: child options must be a dict, got {type(options).__name__}")
    if flags is None:
        flags = bs.open_flags
    flags |= BDRV_O_UNMAP
    child = bdrv_open(None, options, flags, _parent=bs)
    bs.children.append(child)
    if bs.file is None:
        bs.file = child
    return child


def bdrv_ref(bs: BlockDriverState) -> None:
    """Port of ``bdrv_ref``."""
    _check_bs(bs, "bdrv_ref")
    if bs.closed:
        raise ValueError(f"bdrv_ref: {bs!r} is closed")
    bs.refcnt += 1


def bdrv_unref(bs: Optional[BlockDriverState]) -> None:
    """Port of ``bdrv_unref``: drop a reference; the last one drains the
    device and closes it (``bdrv_close`` called exactly once)."""
    if bs is None:
        return
    _check_bs(bs, "bdrv_unref")
    if bs.refcnt <= 0:
        raise ValueError(f"bdrv_unref: {bs!r} has no reference left (already closed)")
    bs.refcnt -= 1
    if bs.refcnt == 0:
        _bdrv_close(bs)


def bdrv_close(bs: BlockDriverState) -> None:
    """Close the device now, whatever its reference count (QEMU's
    ``bdrv_close`` is internal; here it is public and idempotent).  Drains
    first, then calls the driver's ``bdrv_close`` once and drops children."""
    _check_bs(bs, "bdrv_close")
    if bs.closed:
        return
    bs.refcnt = 0
    _bdrv_close(bs)


def _bdrv_close(bs: BlockDriverState) -> None:
    if bs.closed:
        return
    bdrv_drain(bs)
    drv = bs.drv
    bs.closed = True  # no new request from here on (-ENOMEDIUM)
    bs._co_direct_read = bs._co_direct_write = None
    try:
        if bs.io_plugged and drv is not None and drv.bdrv_io_unplug is not None \
                and not bs.io_plug_disabled:
            drv.bdrv_io_unplug(bs)
        bs.io_plugged = 0
        if drv is not None and drv.bdrv_close is not None:
            drv.bdrv_close(bs)
    finally:
        bs.drv = None
        bs._co_direct_free.clear()  # each of them refers to bs
        children, bs.children, bs.file = bs.children, [], None
        for child in children:
            if not child.closed:
                bdrv_unref(child)


def bdrv_getlength(bs: BlockDriverState) -> int:
    """Port of ``bdrv_getlength``: length in bytes, or ``-errno``
    (``-ENOMEDIUM`` once closed)."""
    _check_bs(bs, "bdrv_getlength")
    if bs.drv is None or bs.closed:
        return -errno.ENOMEDIUM
    if bs.has_variable_length:
        return _refresh_total_bytes(bs)
    return bs.total_bytes


# --------------------------------------------------------------------------
# Tracked requests and serialisation (block/io.c)

def _tracked_request_begin(bs: BlockDriverState, offset: int, bytes: int, type: int) -> _TrackedRequest:
    req = _TrackedRequest(bs, offset, bytes, type)
    bs.tracked_requests[req] = None
    return req


def _tracked_request_end(req: _TrackedRequest) -> None:
    del req.bs.tracked_requests[req]
    _tracked_request_end_slow(req)


def _tracked_request_end_slow(req: _TrackedRequest) -> None:
    # The part of _tracked_request_end that only a serialising or waited-for
    # request needs, after it left bs.tracked_requests.
    if req.serialising:
        req.bs.serialising_in_flight -= 1
    if req.wait_queue is not None:
        _co.qemu_co_queue_restart_all(req.wait_queue)


def _overlaps(req: _TrackedRequest, offset: int, bytes: int) -> bool:
    if offset >= req.overlap_offset + req.overlap_bytes:
        return False
    if req.overlap_offset >= offset + bytes:
        return False
    return True


def _find_conflicting_request(self: _TrackedRequest) -> Optional[_TrackedRequest]:
    for req in self.bs.tracked_requests:
        if req is self or (not req.serialising and not self.serialising):
            continue
        if _overlaps(req, self.overlap_offset, self.overlap_bytes):
            if req.co is _co.qemu_coroutine_self():
                # QEMU asserts: a request waiting for itself is a deadlock
                # (a driver issuing a nested request on its own device).
                raise RuntimeError(f"request on {self.bs!r} would wait for itself")
            # If the request is already (indirectly) waiting for us, or will
            # wait for us as soon as it wakes up, just go on instead of
            # deadlocking.
            if req.waiting_for is None:
                return req
    return None


def _wait_serialising_requests(self: _TrackedRequest) -> bool:
    if not self.bs.serialising_in_flight:
        return False
    waited = False
    while True:
        req = _find_conflicting_request(self)
        if req is None:
            return waited
        self.waiting_for = req
        if req.wait_queue is None:
            req.wait_queue = _co.CoQueue()
        _co.qemu_co_queue_wait(req.wait_queue, None)
        self.waiting_for = None
        waited = True


def _make_request_serialising(req: _TrackedRequest, align: int) -> bool:
    start = req.offset - req.offset % align
    end = -(-(req.offset + req.bytes) // align) * align
    if not req.serialising:
        req.bs.serialising_in_flight += 1
        req.serialising = True
    lo = min(req.overlap_offset, start)
    hi = max(req.overlap_offset + req.overlap_bytes, end)
    req.overlap_offset = lo
    req.overlap_bytes = hi - lo
    return _wait_serialising_requests(req)


# --------------------------------------------------------------------------
# Request checks (blk_check_byte_request, bdrv_check_qiov_request)

def _check_request(bs: BlockDriverState, offset: int, bytes: int, write: bool,
                   max_bytes: int = BDRV_REQUEST_MAX_BYTES) -> int:
    if bs.drv is None or bs.closed:
        return -errno.ENOMEDIUM
    if write and bs.read_only:
        return -errno.EPERM
    if offset < 0 or bytes < 0 or bytes > max_bytes or offset > BDRV_MAX_LENGTH - bytes:
        return -errno.EIO
    if bs.parent is not None:
        # A child node is only reached through its parent, whose request was
        # checked already; like QEMU's BDS-level checks, let padding reach
        # past the end (reads there are zeros).
        return 0
    # bdrv_getlength, inlined (the device is known to be open here).
    length = _refresh_total_bytes(bs) if bs.has_variable_length else bs.total_bytes
    if length < 0:
        return length
    if offset > length or length - offset < bytes:
        return -errno.EIO
    return 0


def _check_qiov_args(fn: str, offset: Any, bytes: Any, qiov: Any, qiov_offset: int,
                     flags: Any, for_read: bool) -> None:
    _check_int(offset, fn, "offset")
    _check_int(bytes, fn, "bytes")
    _check_int(flags, fn, "flags")
    _check_qiov(qiov, fn)
    if bytes > 0 and qiov_offset + bytes > qiov.size:
        raise ValueError(f"{fn}: the qiov holds {qiov.size - qiov_offset} bytes, "
                         f"the request needs {bytes}")
    if for_read and qiov.readonly and bytes > 0:
        raise TypeError(f"{fn}: cannot read into a read-only qiov")


# --------------------------------------------------------------------------
# Driver calls (bdrv_driver_preadv / bdrv_driver_pwritev)

def _co_io_em_complete(state: list, ret: int) -> None:
    # Port of bdrv_co_io_em_complete.  state = [ret, coroutine, yielded].
    state[0] = ret
    if state[2]:
        _co.aio_co_wake(state[1])


def _co_io_em(submit: Callable[[Callable, Any], Any]) -> int:
    # Run a callback-style driver request from a coroutine.  The guard on
    # "yielded" tolerates a driver that calls back before returning.
    state: list = [_NOT_DONE, _co.qemu_coroutine_self(), False]
    acb = submit(_co_io_em_complete, state)
    if acb is None:
        return -errno.EIO
    if state[0] is _NOT_DONE:
        state[2] = True
        _co.qemu_coroutine_yield()
    return state[0]


def _ret(drv: BlockDriver, cb: str, ret: Any) -> int:
    if ret.__class__ is int:
        return ret
    if isinstance(ret, bool) or not isinstance(ret, int):
        raise TypeError(f"driver '{drv.format_name}' {cb} returned {ret!r}; expected 0 or -errno")
    return ret


def _slice(qiov: QEMUIOVector, qiov_offset: int, bytes: int) -> QEMUIOVector:
    if qiov_offset == 0 and qiov.size == bytes:
        return qiov
    local = QEMUIOVector()
    qemu_iovec_init_slice(local, qiov, qiov_offset, bytes)
    return local


def _driver_preadv(bs: BlockDriverState, offset: int, bytes: int, qiov: QEMUIOVector,
                   qiov_offset: int, flags: int) -> int:
    drv = bs.drv
    if drv is None:
        return -errno.ENOMEDIUM
    if drv.bdrv_co_preadv_part is not None:
        return _ret(drv, "bdrv_co_preadv_part",
                    drv.bdrv_co_preadv_part(bs, offset, bytes, qiov, qiov_offset, flags))
    q = _slice(qiov, qiov_offset, bytes)
    if drv.bdrv_co_preadv is not None:
        return _ret(drv, "bdrv_co_preadv", drv.bdrv_co_preadv(bs, offset, bytes, q, flags))
    if drv.bdrv_aio_preadv is not None:
        return _ret(drv, "bdrv_aio_preadv", _co_io_em(
            lambda cb, st: drv.bdrv_aio_preadv(bs, offset, bytes, q, flags, cb, st)))
    return -errno.ENOTSUP


def _driver_pwritev(bs: BlockDriverState, offset: int, bytes: int, qiov: QEMUIOVector,
                    qiov_offset: int, flags: int) -> int:
    drv = bs.drv
    if drv is None:
        return -errno.ENOMEDIUM
    emulate_fua = bool(flags & BDRV_REQ_FUA) and not (bs.supported_write_flags & BDRV_REQ_FUA)
    flags &= bs.supported_write_flags
    if drv.bdrv_co_pwritev_part is not None:
        ret = _ret(drv, "bdrv_co_pwritev_part",
                   drv.bdrv_co_pwritev_part(bs, offset, bytes, qiov, qiov_offset, flags))
    else:
        q = _slice(qiov, qiov_offset, bytes)
        if drv.bdrv_co_pwritev is not None:
            ret = _ret(drv, "bdrv_co_pwritev", drv.bdrv_co_pwritev(bs, offset, bytes, q, flags))
        elif drv.bdrv_aio_pwritev is not None:
            ret = _ret(drv, "bdrv_aio_pwritev", _co_io_em(
                lambda cb, st: drv.bdrv_aio_pwritev(bs, offset, bytes, q, flags, cb, st)))
        else:
            ret = -errno.ENOTSUP
    if ret == 0 and emulate_fua:
        # Deviation: count the write before the flush so it is not skipped.
        bs.write_gen += 1
        ret = _co_flush(bs)
    return ret


def _max_transfer(bs: BlockDriverState, align: int) -> int:
    mt = bs.bl.max_transfer or _INT_MAX
    mt = min(mt, _INT_MAX)
    return max(align, mt - mt % align)


def _aligned_preadv(bs: BlockDriverState, req: _TrackedRequest, offset: int, bytes: int,
                    align: int, qiov: QEMUIOVector, qiov_offset: int, flags: int) -> int:
    # Port of bdrv_aligned_preadv.
    if bs.serialising_in_flight:
        _wait_serialising_requests(req)
    # bdrv_getlength, inlined: this runs for every read.
    if bs.drv is None or bs.closed:
        return -errno.ENOMEDIUM
    total = _refresh_total_bytes(bs) if bs.has_variable_length else bs.total_bytes
    if total < 0:
        return total
    # _max_transfer, inlined.
    max_transfer = bs.bl.max_transfer or _INT_MAX
    if max_transfer > _INT_MAX:
        max_transfer = _INT_MAX
    max_transfer -= max_transfer % align
    if max_transfer < align:
        max_transfer = align
    if bytes <= max_transfer and offset + bytes <= total:
        # The common case: one driver call.  A driver with a plain
        # bdrv_co_preadv given the caller's whole qiov is called directly.
        drv = bs.drv
        fn = drv.bdrv_co_preadv
        if (fn is not None and qiov_offset == 0 and qiov.size == bytes
                and drv.bdrv_co_preadv_part is None):
            ret = fn(bs, offset, bytes, qiov, flags)
            return ret if ret.__class__ is int else _ret(drv, "bdrv_co_preadv", ret)
        return _driver_preadv(bs, offset, bytes, qiov, qiov_offset, flags)
    max_bytes = -(-max(0, total - offset) // align) * align
    if bytes <= max_bytes and bytes <= max_transfer:
        return _driver_preadv(bs, offset, bytes, qiov, qiov_offset, flags)
    remaining = bytes
    while remaining:
        done = bytes - remaining
        if max_bytes:
            num = min(remaining, max_bytes, max_transfer)
            ret = _driver_preadv(bs, offset + done, num, qiov, qiov_offset + done, flags)
            max_bytes -= num
        else:
            # Past the end of the image: reads as zeros.
            num = remaining
            qiov.memset(qiov_offset + done, 0, num)
            ret = 0
        if ret < 0:
            return ret
        remaining -= num
    return 0


def _write_req_finish(bs: BlockDriverState, offset: int, bytes: int, ret: int) -> None:
    # Port of bdrv_co_write_req_finish: every write, successful or not,
    # makes the next flush do real work.
    bs.write_gen += 1
    if ret == 0:
        end = offset + bytes
        if end > bs.total_bytes:
            # Only a child node can be written past its end (its parent's
            # padding); the parent shrinks it back afterwards.
            bs.total_bytes = end


def _aligned_pwritev(bs: BlockDriverState, req: _TrackedRequest, offset: int, bytes: int,
                     align: int, qiov: Optional[QEMUIOVector], qiov_offset: int,
                     flags: int) -> int:
    # Port of bdrv_aligned_pwritev.
    if bs.drv is None:
        return -errno.ENOMEDIUM
    if bs.serialising_in_flight:
        _wait_serialising_requests(req)
    max_transfer = bs.bl.max_transfer or _INT_MAX   # _max_transfer, inlined
    if max_transfer > _INT_MAX:
        max_transfer = _INT_MAX
    max_transfer -= max_transfer % align
    if max_transfer < align:
        max_transfer = align
    if flags & BDRV_REQ_ZERO_WRITE:
        ret = _do_pwrite_zeroes(bs, offset, bytes, flags)
    elif bytes <= max_transfer:
        ret = _driver_pwritev(bs, offset, bytes, qiov, qiov_offset, flags)  # type: ignore[arg-type]
    else:
        ret = 0
        remaining = bytes
        while remaining:
            done = bytes - remaining
            num = min(remaining, max_transfer)
            local_flags = flags
            if num < remaining and not (bs.supported_write_flags & BDRV_REQ_FUA):
                # FUA emulated by a flush only needs the last chunk's flush.
                local_flags &= ~BDRV_REQ_FUA
            ret = _driver_pwritev(bs, offset + done, num, qiov, qiov_offset + done, local_flags)  # type: ignore[arg-type]
            if ret < 0:
                break
            remaining -= num
    _write_req_finish(bs, offset, bytes, ret)
    return ret


class _Padding:
    """QEMU's ``BdrvRequestPadding``."""

    __slots__ = ("buf", "buf_len", "head", "tail", "merge_reads", "tail_off", "align")

    def __init__(self, bs: BlockDriverState, offset: int, bytes: int) -> None:
        align = bs.bl.request_alignment
        self.align = align
        self.head = offset & (align - 1)
        tail = (offset + bytes) & (align - 1)
        self.tail = align - tail if tail else 0
        total = self.head + bytes + self.tail
        self.buf_len = 2 * align if (total > align and self.head and self.tail) else align
        self.buf = qemu_blockalign(bs, self.buf_len)
        self.merge_reads = total == self.buf_len
        self.tail_off = self.buf_len - align  # where the tail block sits in buf

    def free(self) -> None:
        qemu_vfree(self.buf)


def _init_padding(bs: BlockDriverState, offset: int, bytes: int) -> Optional[_Padding]:
    align = bs.bl.request_alignment
    if align <= 1 or not bytes:
        return None
    if not (offset & (align - 1)) and not ((offset + bytes) & (align - 1)):
        return None
    return _Padding(bs, offset, bytes)


def _padded_qiov(pad: _Padding, qiov: QEMUIOVector, qiov_offset: int, bytes: int) -> QEMUIOVector:
    q = QEMUIOVector()
    mv = memoryview(pad.buf).cast("B")
    qemu_iovec_init_extended(q, mv, pad.head, qiov, qiov_offset, bytes,
                             mv[pad.buf_len - pad.tail:], pad.tail)
    return q


def _padding_rmw_read(bs: BlockDriverState, req: _TrackedRequest, pad: _Padding,
                      zero_middle: bool) -> int:
    # Port of bdrv_padding_rmw_read: fetch the head and tail blocks that the
    # padded write will rewrite.
    align = pad.align
    mv = memoryview(pad.buf).cast("B")
    if pad.head or pad.merge_reads:
        n = pad.buf_len if pad.merge_reads else align
        q = QEMUIOVector()
        qemu_iovec_init_buf(q, mv[:n])
        ret = _aligned_preadv(bs, req, req.overlap_offset, n, align, q, 0, 0)
        if ret < 0:
            return ret
    if pad.tail and not pad.merge_reads:
        q = QEMUIOVector()
        qemu_iovec_init_buf(q, mv[pad.tail_off:pad.tail_off + align])
        ret = _aligned_preadv(bs, req, req.overlap_offset + req.overlap_bytes - align,
                              align, align, q, 0, 0)
        if ret < 0:
            return ret
    if zero_middle:
        mv[pad.head:pad.buf_len - pad.tail] = bytes(pad.buf_len - pad.head - pad.tail)
    return 0


def _shrink_back(bs: BlockDriverState, length: int) -> None:
    # A padded write whose last block reached past the end of the image grew
    # the file; put the length back (the image never grows by writing).
    drv = bs.drv
    if drv is None or drv.bdrv_co_truncate is None:
        return
    if _refresh_total_bytes(bs) > length:
        drv.bdrv_co_truncate(bs, length, True, PREALLOC_MODE_OFF, 0)
        _refresh_total_bytes(bs)


# --------------------------------------------------------------------------
# Coroutine API: reads and writes

def _co_preadv_part(bs: BlockDriverState, offset: int, bytes: int, qiov: QEMUIOVector,
                    qiov_offset: int, flags: int) -> int:
    # Port of bdrv_co_preadv_part (after the checks).
    if bytes == 0:
        return 0
    align = bs.bl.request_alignment
    if align > 1 and (offset | bytes) & (align - 1):
        return _co_preadv_padded(bs, offset, bytes, qiov, qiov_offset, flags)
    # Aligned: no padding, no bounce buffer; still tracked, because a
    # serialising request that comes later must wait for this one.
    bs.in_flight += 1
    try:
        co = _tls_local.lt.co
    except AttributeError:
        co = None
    req = _TrackedRequest(bs, offset, bytes, _TRACKED_READ, co)
    bs.tracked_requests[req] = None
    try:
        return _aligned_preadv(bs, req, offset, bytes, align, qiov, qiov_offset, flags)
    finally:
        # _tracked_request_end and bdrv_dec_in_flight, inlined
        del bs.tracked_requests[req]
        if req.wait_queue is not None or req.serialising:
            _tracked_request_end_slow(req)
        bs.in_flight -= 1


def _co_preadv_padded(bs: BlockDriverState, offset: int, bytes: int, qiov: QEMUIOVector,
                      qiov_offset: int, flags: int) -> int:
    # _co_preadv_part for a request that needs padding to the alignment.
    bdrv_inc_in_flight(bs)
    pad = None
    try:
        pad = _init_padding(bs, offset, bytes)
        if pad is not None:
            q = _padded_qiov(pad, qiov, qiov_offset, bytes)
            off, n, qo = offset - pad.head, pad.head + bytes + pad.tail, 0
        else:
            q, off, n, qo = qiov, offset, bytes, qiov_offset
        req = _tracked_request_begin(bs, off, n, _TRACKED_READ)
        try:
            return _aligned_preadv(bs, req, off, n, bs.bl.request_alignment, q, qo, flags)
        finally:
            _tracked_request_end(req)
            if pad is not None:
                q.destroy()
    finally:
        if pad is not None:
            pad.free()
        bdrv_dec_in_flight(bs)


def _co_pwritev_part(bs: BlockDriverState, offset: int, bytes: int, qiov: Optional[QEMUIOVector],
                     qiov_offset: int, flags: int) -> int:
    # Port of bdrv_co_pwritev_part (after the checks).
    if bytes == 0:
        return 0
    align = bs.bl.request_alignment
    if not flags & BDRV_REQ_ZERO_WRITE and (align == 1 or not (offset | bytes) & (align - 1)):
        # Aligned: no read-modify-write, nothing to serialise against
        # unless another request is serialising.
        bs.in_flight += 1
        try:
            co = _tls_local.lt.co
        except AttributeError:
            co = None
        req = _TrackedRequest(bs, offset, bytes, _TRACKED_WRITE, co)
        bs.tracked_requests[req] = None
        try:
            return _aligned_pwritev(bs, req, offset, bytes, align, qiov, qiov_offset, flags)
        finally:
            # _tracked_request_end and bdrv_dec_in_flight, inlined
            del bs.tracked_requests[req]
            if req.wait_queue is not None or req.serialising:
                _tracked_request_end_slow(req)
            bs.in_flight -= 1
    bdrv_inc_in_flight(bs)
    pad = None
    try:
        length_before = bdrv_getlength(bs)
        pad = _init_padding(bs, offset, bytes)
        off = offset - pad.head if pad else offset
        n = (pad.head + bytes + pad.tail) if pad else bytes
        req = _tracked_request_begin(bs, offset, bytes, _TRACKED_WRITE)
        try:
            if flags & BDRV_REQ_ZERO_WRITE:
                ret = _co_do_zero_pwritev(bs, req, offset, bytes, flags, pad)
            elif pad is not None:
                _make_request_serialising(req, align)
                ret = _padding_rmw_read(bs, req, pad, False)
                if ret == 0:
                    q = _padded_qiov(pad, qiov, qiov_offset, bytes)  # type: ignore[arg-type]
                    try:
                        ret = _aligned_pwritev(bs, req, off, n, align, q, 0, flags)
                    finally:
                        q.destroy()
            else:
                ret = _aligned_pwritev(bs, req, offset, bytes, align, qiov, qiov_offset, flags)
            if pad is not None and off + n > length_before >= 0:
                _shrink_back(bs, length_before)
            return ret
        finally:
            _tracked_request_end(req)
    finally:
        if pad is not None:
            pad.free()
        bdrv_dec_in_flight(bs)


def _co_do_zero_pwritev(bs: BlockDriverState, req: _TrackedRequest, offset: int, bytes: int,
                        flags: int, pad: Optional[_Padding]) -> int:
    # Port of bdrv_co_do_zero_pwritev: unaligned head and tail by
    # read-modify-write of zeros, the aligned middle as a write-zeroes.
    align = bs.bl.request_alignment
    ret = 0
    if pad is not None:
        _make_request_serialising(req, align)
        ret = _padding_rmw_read(bs, req, pad, True)
        if ret < 0:
            return ret
        mv = memoryview(pad.buf).cast("B")
        if pad.head or pad.merge_reads:
            aligned_offset = offset & ~(align - 1)
            n = pad.buf_len if pad.merge_reads else align
            q = QEMUIOVector()
            qemu_iovec_init_buf(q, mv[:n])
            ret = _aligned_pwritev(bs, req, aligned_offset, n, align, q, 0,
                                   flags & ~BDRV_REQ_ZERO_WRITE)
            if ret < 0 or pad.merge_reads:
                return ret
            offset += n - pad.head
            bytes -= n - pad.head
    if bytes >= align:
        aligned_bytes = bytes & ~(align - 1)
        ret = _aligned_pwritev(bs, req, offset, aligned_bytes, align, None, 0, flags)
        if ret < 0:
            return ret
        bytes -= aligned_bytes
        offset += aligned_bytes
    if bytes:
        q = QEMUIOVector()
        qemu_iovec_init_buf(q, memoryview(pad.buf).cast("B")[pad.tail_off:pad.tail_off + align])  # type: ignore[union-attr]
        ret = _aligned_pwritev(bs, req, offset, align, align, q, 0, flags & ~BDRV_REQ_ZERO_WRITE)
    return ret


def _do_pwrite_zeroes(bs: BlockDriverState, offset: int, bytes: int, flags: int) -> int:
    # Port of bdrv_co_do_pwrite_zeroes for an aligned range: ask the driver,
    # fall back to writing a zeroed buffer unless BDRV_REQ_NO_FALLBACK.
    drv = bs.drv
    if drv is None:
        return -errno.ENOMEDIUM
    if not (bs.open_flags & BDRV_O_UNMAP):
        flags &= ~BDRV_REQ_MAY_UNMAP
    align = max(bs.bl.pwrite_zeroes_alignment, bs.bl.request_alignment)
    mz = bs.bl.max_pwrite_zeroes or _INT64_MAX
    mz = max(align, mz - mz % align)
    buf = None
    try:
        while bytes > 0:
            num = min(bytes, mz)
            ret = -errno.ENOTSUP
            if drv.bdrv_co_pwrite_zeroes is not None:
                zflags = flags & bs.supported_zero_flags & ~BDRV_REQ_FUA
                ret = _ret(drv, "bdrv_co_pwrite_zeroes", drv.bdrv_co_pwrite_zeroes(bs, offset, num, zflags))
                if ret == 0 and flags & BDRV_REQ_FUA:
                    bs.write_gen += 1
                    ret = _co_flush(bs)
            if ret == -errno.ENOTSUP and not (flags & BDRV_REQ_NO_FALLBACK):
                # Fall back to bounce buffer writes of zeros.
                chunk_max = min(_ZERO_BOUNCE_MAX, _max_transfer(bs, bs.bl.request_alignment))
                if buf is None:
                    buf = qemu_blockalign(bs, min(num, chunk_max))
                    zmv = memoryview(buf).cast("B")
                    zmv[:] = bytes(zmv.nbytes)  # heap-aligned memory is not zeroed
                done = 0
                ret = 0
                while done < num:
                    k = min(num - done, zmv.nbytes)
                    q = QEMUIOVector()
                    qemu_iovec_init_buf(q, zmv[:k])
                    ret = _driver_pwritev(bs, offset + done, k, q, 0, flags & BDRV_REQ_FUA)
                    if ret < 0:
                        break
                    done += k
            if ret < 0:
                return ret
            offset += num
            bytes -= num
        return 0
    finally:
        if buf is not None:
            qemu_vfree(buf)


def _account(bs: BlockDriverState, type: int, nbytes: int, fn: Callable[[], int],
             end: int = 0) -> int:
    acct = bs.acct
    start = _monotonic_ns()
    try:
        ret = fn()
    except BaseException:
        _account_request(acct, type, nbytes, start, True)
        raise
    _account_request(acct, type, nbytes, start, ret < 0)
    if ret >= 0 and end > acct.wr_highest_offset:
        acct.wr_highest_offset = end  # the caller's range, not the padding
    return ret


def _preadv_checked(bs: BlockDriverState, offset: int, bytes: int, qiov: QEMUIOVector,
                    qiov_offset: int, flags: int) -> int:
    # bdrv_co_preadv_part once the argument types are known to be right:
    # the request checks, accounting and the read.  Every read goes through
    # here exactly once (bdrv_co_preadv* and bdrv_aio_preadv on the
    # coroutine path).
    if (bs.parent is not None or bs.has_variable_length or bs.closed or bs.drv is None
            or offset < 0 or bytes < 0 or bytes > BDRV_REQUEST_MAX_BYTES
            or offset + bytes > bs.total_bytes):
        # Not the common case (_check_request's fast answer, inlined): ask.
        ret = _check_request(bs, offset, bytes, False)
        if ret < 0:
            block_acct_invalid(bs.acct, BLOCK_ACCT_READ)
            return ret
    start = _monotonic_ns()
    try:
        ret = _co_preadv_part(bs, offset, bytes, qiov, qiov_offset, flags)
    except BaseException:
        _account_request(bs.acct, _ACCT_READ, bytes, start, True)
        raise
    if ret < 0:
        _account_request(bs.acct, _ACCT_READ, bytes, start, True)
    else:
        # _account_request for a success, inlined.
        stats = bs.acct
        now = _monotonic_ns()
        stats.nr_bytes[_ACCT_READ] += bytes
        stats.nr_ops[_ACCT_READ] += 1
        stats.total_time_ns[_ACCT_READ] += now - start
        stats.last_access_time_ns = now
    return ret


def _pwritev_checked(bs: BlockDriverState, offset: int, bytes: int,
                     qiov: Optional[QEMUIOVector], qiov_offset: int, flags: int) -> int:
    # The write counterpart of _preadv_checked.
    ret = _check_request(bs, offset, bytes, True)
    if ret < 0:
        block_acct_invalid(bs.acct, BLOCK_ACCT_WRITE)
        return ret
    acct = bs.acct
    start = _monotonic_ns()
    try:
        ret = _co_pwritev_part(bs, offset, bytes, qiov, qiov_offset, flags)
    except BaseException:
        _account_request(acct, _ACCT_WRITE, bytes, start, True)
        raise
    if ret < 0:
        _account_request(acct, _ACCT_WRITE, bytes, start, True)
    else:
        _account_request(acct, _ACCT_WRITE, bytes, start, False)
        end = offset + bytes
        if end > acct.wr_highest_offset:
            acct.wr_highest_offset = end  # the caller's range, not the padding
    return ret


def _check_rw_args(fn: str, bs: Any, offset: Any, bytes: Any, qiov: Any, qiov_offset: Any,
                   flags: Any, for_read: bool) -> None:
    # The full checks of bdrv_co_preadv_part/pwritev_part, in their order;
    # only reached when a fast exact-type check failed, so it either raises
    # or accepts a subclass.
    _check_bs(bs, fn)
    _require_co(fn)
    _check_int(qiov_offset, fn, "qiov_offset")
    _check_qiov_args(fn, offset, bytes, qiov, qiov_offset, flags, for_read)


def bdrv_co_preadv_part(bs: BlockDriverState, offset: int, bytes: int, qiov: QEMUIOVector,
                        qiov_offset: int, flags: int = 0) -> int:
    """Port of ``bdrv_co_preadv_part``: read ``bytes`` at ``offset`` into
    ``qiov`` starting at ``qiov_offset``.  Coroutine only; 0 or -errno."""
    if (bs.__class__ is not BlockDriverState or offset.__class__ is not int
            or bytes.__class__ is not int or qiov.__class__ is not QEMUIOVector
            or qiov_offset.__class__ is not int or flags.__class__ is not int):
        _check_rw_args("bdrv_co_preadv", bs, offset, bytes, qiov, qiov_offset, flags, True)
    else:
        try:
            in_co = _tls_local.lt.co is not None
        except AttributeError:
            in_co = False
        if not in_co or (bytes > 0 and (qiov_offset + bytes > qiov.size or qiov.readonly)):
            _check_rw_args("bdrv_co_preadv", bs, offset, bytes, qiov, qiov_offset, flags, True)
    return _preadv_checked(bs, offset, bytes, qiov, qiov_offset, flags)


def bdrv_co_pwritev_part(bs: BlockDriverState, offset: int, bytes: int, qiov: QEMUIOVector,
                         qiov_offset: int, flags: int = 0) -> int:
    """Port of ``bdrv_co_pwritev_part``.  Coroutine only; 0 or -errno."""
    if (bs.__class__ is not BlockDriverState or offset.__class__ is not int
            or bytes.__class__ is not int or qiov.__class__ is not QEMUIOVector
            or qiov_offset.__class__ is not int or flags.__class__ is not int):
        if flags.__class__ is int and flags & BDRV_REQ_ZERO_WRITE and qiov is None:
            qiov = QEMUIOVector()
        _check_rw_args("bdrv_co_pwritev", bs, offset, bytes, qiov, qiov_offset, flags, False)
    else:
        try:
            in_co = _tls_local.lt.co is not None
        except AttributeError:
            in_co = False
        if not in_co or (bytes > 0 and qiov_offset + bytes > qiov.size):
            _check_rw_args("bdrv_co_pwritev", bs, offset, bytes, qiov, qiov_offset, flags, False)
    return _pwritev_checked(bs, offset, bytes, qiov, qiov_offset, flags)


class _DirectTracked:
    """_TrackedRequest's interface for a request of a direct path (the
    callback one's _DirectAIOCB, the coroutine one's _CoDirectReq): such a
    request is never serialising and never waits -- a direct path is only
    taken while no serialising request is in flight, and the request
    reaches the driver without yielding first -- so those fields are
    constants and its overlap is its own range."""

    __slots__ = ()

    serialising = False
    waiting_for = None

    @property
    def overlap_offset(self) -> int:
        return self.offset  # type: ignore[attr-defined,no-any-return]

    @property
    def overlap_bytes(self) -> int:
        return self.bytes  # type: ignore[attr-defined,no-any-return]


class _CoDirectReq(_DirectTracked):
    """The tracked request of a coroutine request on the direct path (see
    _make_bdrv_co_rw).  Home thread only.

    Recycled through ``bs._co_direct_free``: once a request has left
    ``bs.tracked_requests`` and woken its waiters, nothing reads it any
    more (a woken waiter scans ``tracked_requests`` again; the
    ``waiting_for`` it still holds is only compared with None).  ``bs`` is
    set once; ``wait_queue`` is None again when it goes back."""

    __slots__ = ("bs", "offset", "bytes", "type", "wait_queue", "co")


# Longer requests take the general path, which splits at max_transfer.
# One below 1 GiB: a one-digit int compares faster in CPython.
_CO_DIRECT_MAX = (1 << 30) - 1


def _make_bdrv_co_rw(is_read: bool, name: str, doc: str) -> Callable[..., int]:
    # bdrv_co_preadv / bdrv_co_pwritev: one body, the direction bound in a
    # closure, with the coroutine direct path inline.
    #
    # The direct path: a request that bdrv_co_preadv_part would hand to the
    # driver's bdrv_co_preadv unchanged -- the caller's whole qiov, aligned,
    # inside the device, no flags, no serialising request in flight, a fixed
    # length, from a coroutine of the device's context -- is handed to it
    # here, with the general path's bookkeeping inlined in the same order:
    # in-flight count, tracked request (a later serialising request waits
    # for it), the driver call, write generation, accounting.  Each helper
    # of the general path is a Python call, and together they were half
    # the CPU time of such a request.  Everything else takes the general
    # path (bdrv_co_preadv_part / bdrv_co_pwritev_part).
    tracked_type = _TRACKED_READ if is_read else _TRACKED_WRITE
    acct_type = _ACCT_READ if is_read else _ACCT_WRITE
    general = bdrv_co_preadv_part if is_read else bdrv_co_pwritev_part
    cb_name = "bdrv_co_preadv" if is_read else "bdrv_co_pwritev"
    new_req = _CoDirectReq

    def co_rw(bs: BlockDriverState, offset: int, bytes: int, qiov: QEMUIOVector,
              flags: int = 0) -> int:
        # Every condition is a short jump to the general path: CPython 3.11
        # specializes a compare only when a short jump follows it, and a
        # test in front of the whole direct path would jump over all of it.
        if not (bs.__class__ is BlockDriverState and offset.__class__ is int
                and bytes.__class__ is int and qiov.__class__ is QEMUIOVector
                and flags.__class__ is int and not flags):
            return general(bs, offset, bytes, qiov, 0, flags)
        if is_read:
            fn = None if qiov.readonly else bs._co_direct_read
        else:
            fn = bs._co_direct_write
        if fn is None:
            return general(bs, offset, bytes, qiov, 0, flags)
        # The per-request half of the conditions.
        mt = bs.bl.max_transfer
        if not (not bs.serialising_in_flight
                and bytes == qiov.size and 0 < bytes <= _CO_DIRECT_MAX
                and not (mt and bytes > mt) and offset >= 0
                and not (offset | bytes) & (bs.bl.request_alignment - 1)
                and (end := offset + bytes) <= bs.total_bytes):
            return general(bs, offset, bytes, qiov, 0, flags)
        try:
            lt = _tls_local.lt
        except AttributeError:
            lt = None
        if lt is None or lt.co is None or lt.ctx is not bs.aio_context:
            return general(bs, offset, bytes, qiov, 0, flags)
        free = bs._co_direct_free
        if free:
            req = free.pop()
        else:
            req = new_req()
            req.bs = bs
            req.wait_queue = None
        req.offset = offset
        req.bytes = bytes
        req.type = tracked_type
        req.co = lt.co
        bs.in_flight += 1
        tracked = bs.tracked_requests
        tracked[req] = None
        start = _monotonic_ns()
        try:
            ret = fn(bs, offset, bytes, qiov, 0)
            if ret.__class__ is not int:
                ret = _ret(bs.drv, cb_name, ret)
        except BaseException:
            del tracked[req]
            if req.wait_queue is not None:
                _tracked_request_end_slow(req)  # type: ignore[arg-type]
            bs.in_flight -= 1
            _account_request(bs.acct, acct_type, bytes, start, True)
            raise
        if not is_read:
            bs.write_gen += 1  # _write_req_finish
        del tracked[req]
        if req.wait_queue is not None:
            _tracked_request_end_slow(req)  # type: ignore[arg-type]
            req.wait_queue = None
        req.co = None
        free.append(req)
        bs.in_flight -= 1
        # _account_request, inlined.
        stats = bs.acct
        now = _monotonic_ns()
        if ret < 0:
            stats.failed_ops[acct_type] += 1
            if stats.account_failed:
                stats.total_time_ns[acct_type] += now - start
                stats.last_access_time_ns = now
        else:
            stats.nr_bytes[acct_type] += bytes
            stats.nr_ops[acct_type] += 1
            stats.total_time_ns[acct_type] += now - start
            stats.last_access_time_ns = now
            if not is_read and end > stats.wr_highest_offset:
                stats.wr_highest_offset = end
        return ret

    co_rw.__name__ = co_rw.__qualname__ = name
    co_rw.__doc__ = doc
    return co_rw


bdrv_co_preadv = _make_bdrv_co_rw(True, "bdrv_co_preadv", """\
Port of ``bdrv_co_preadv``.  Coroutine only; returns 0 or -errno.

Simple requests take a direct path to the driver's ``bdrv_co_preadv``
(the same checks, tracking and accounting, without the general path's
helper calls); see ``_make_bdrv_co_rw``.""")
bdrv_co_pwritev = _make_bdrv_co_rw(False, "bdrv_co_pwritev", """\
Port of ``bdrv_co_pwritev``.  Coroutine only; returns 0 or -errno.
Simple requests take the direct path of :func:`bdrv_co_preadv`.""")


def bdrv_co_pread(bs: BlockDriverState, offset: int, bytes: int, buf: Any, flags: int = 0) -> int:
    """Port of ``bdrv_co_pread``: into any writable buffer."""
    qiov = _buf_qiov("bdrv_co_pread", bytes, buf, True)
    return bdrv_co_preadv(bs, offset, bytes, qiov, flags)


def bdrv_co_pwrite(bs: BlockDriverState, offset: int, bytes: int, buf: Any, flags: int = 0) -> int:
    """Port of ``bdrv_co_pwrite``: from any buffer (read-only ones included)."""
    qiov = _buf_qiov("bdrv_co_pwrite", bytes, buf, False)
    return bdrv_co_pwritev(bs, offset, bytes, qiov, flags)


def bdrv_co_pwrite_zeroes(bs: BlockDriverState, offset: int, bytes: int, flags: int = 0) -> int:
    """Port of ``bdrv_co_pwrite_zeroes``: zero a range (``BDRV_REQ_MAY_UNMAP``
    may deallocate it when opened with discard=unmap; ``BDRV_REQ_NO_FALLBACK``
    returns -ENOTSUP instead of writing zeros).  Coroutine only."""
    fn = "bdrv_co_pwrite_zeroes"
    _check_bs(bs, fn)
    _require_co(fn)
    _check_int(offset, fn, "offset")
    _check_int(bytes, fn, "bytes")
    _check_int(flags, fn, "flags")
    ret = _check_request(bs, offset, bytes, True, BDRV_MAX_LENGTH)
    if ret < 0:
        block_acct_invalid(bs.acct, BLOCK_ACCT_WRITE)
        return ret
    flags = (flags | BDRV_REQ_ZERO_WRITE) & ~BDRV_REQ_COPY_ON_READ
    return _account(bs, BLOCK_ACCT_WRITE, bytes,
                    lambda: _co_pwritev_part(bs, offset, bytes, None, 0, flags),
                    offset + bytes)


# --------------------------------------------------------------------------
# Flush, discard, truncate

def _co_flush(bs: BlockDriverState) -> int:
    # Port of bdrv_co_flush.
    if bs.drv is None or bs.closed or bs.read_only:
        return 0
    bdrv_inc_in_flight(bs)
    ret = 0
    try:
        current_gen = bs.write_gen
        # Wait until any previous flush is complete.
        while bs.active_flush_req:
            _co.qemu_co_queue_wait(bs.flush_queue, None)
        bs.active_flush_req = True
        try:
            drv = bs.drv
            if drv is None:
                ret = -errno.ENOMEDIUM
            elif drv.bdrv_co_flush is not None:
                # Write back all layers by one driver call.
                ret = _ret(drv, "bdrv_co_flush", drv.bdrv_co_flush(bs))
            else:
                if drv.bdrv_co_flush_to_os is not None:
                    ret = _ret(drv, "bdrv_co_flush_to_os", drv.bdrv_co_flush_to_os(bs))
                # cache.no-flush: don't force data to the disk; and nothing to
                # do if no write happened since the last successful flush.
                if ret == 0 and not (bs.open_flags & BDRV_O_NO_FLUSH) \
                        and bs.flushed_gen != current_gen:
                    if drv.bdrv_co_flush_to_disk is not None:
                        ret = _ret(drv, "bdrv_co_flush_to_disk", drv.bdrv_co_flush_to_disk(bs))
                    elif drv.bdrv_aio_flush is not None:
                        ret = _ret(drv, "bdrv_aio_flush", _co_io_em(
                            lambda cb, st: drv.bdrv_aio_flush(bs, cb, st)))
                if ret == 0:
                    # Then the layers below.
                    for child in list(bs.children):
                        r = _co_flush(child)
                        if ret == 0:
                            ret = r
            if ret == 0:
                bs.flushed_gen = current_gen
        finally:
            bs.active_flush_req = False
            _co.qemu_co_queue_next(bs.flush_queue)
        return ret
    finally:
        bdrv_dec_in_flight(bs)


def bdrv_co_flush(bs: BlockDriverState) -> int:
    """Port of ``bdrv_co_flush``: make every completed write durable.
    Coroutine only; 0 or -errno.  Returns 0 at once on a read-only device,
    with cache.no-flush, or when nothing was written since the last flush."""
    _check_bs(bs, "bdrv_co_flush")
    _require_co("bdrv_co_flush")
    if bs.drv is None or bs.closed:
        block_acct_invalid(bs.acct, BLOCK_ACCT_FLUSH)
        return -errno.ENOMEDIUM
    return _account(bs, BLOCK_ACCT_FLUSH, 0, lambda: _co_flush(bs))


def bdrv_co_pdiscard(bs: BlockDriverState, offset: int, bytes: int) -> int:
    """Port of ``bdrv_co_pdiscard``.  Discard is advisory: it does nothing
    unless the device was opened with ``discard: "unmap"`` (BDRV_O_UNMAP),
    and a driver's -ENOTSUP counts as success.  Coroutine only."""
    fn = "bdrv_co_pdiscard"
    _check_bs(bs, fn)
    _require_co(fn)
    _check_int(offset, fn, "offset")
    _check_int(bytes, fn, "bytes")
    ret = _check_request(bs, offset, bytes, True, BDRV_MAX_LENGTH)
    if ret < 0:
        block_acct_invalid(bs.acct, BLOCK_ACCT_UNMAP)
        return ret
    return _account(bs, BLOCK_ACCT_UNMAP, bytes, lambda: _co_pdiscard(bs, offset, bytes))


def _co_pdiscard(bs: BlockDriverState, offset: int, bytes: int) -> int:
    drv = bs.drv
    if not (bs.open_flags & BDRV_O_UNMAP) or bytes == 0:
        return 0
    if drv is None or drv.bdrv_co_pdiscard is None:
        return 0
    # Discard is advisory, but some devices coalesce unaligned requests, so
    # everything is passed down, fragmented at alignment boundaries (QEMU).
    ra = bs.bl.request_alignment
    align = max(bs.bl.pdiscard_alignment, ra)
    head = offset % align
    tail = (offset + bytes) % align
    mp = bs.bl.max_pdiscard or _INT64_MAX
    max_pdiscard = max(align, mp - mp % align)
    bdrv_inc_in_flight(bs)
    req = _tracked_request_begin(bs, offset, bytes, _TRACKED_DISCARD)
    try:
        _wait_serialising_requests(req)
        ret = 0
        while bytes > 0:
            num = bytes
            if head:
                # Small requests to get to an alignment boundary.
                num = min(bytes, align - head)
                if num % ra:
                    num %= ra
                head = (head + num) % align
            elif tail:
                if num > align:
                    num -= tail  # shorten to the last aligned cluster
                elif tail % ra and tail > ra:
                    tail %= ra
                    num -= tail
            num = min(num, max_pdiscard)
            if bs.drv is None:
                ret = -errno.ENOMEDIUM
                break
            ret = _ret(drv, "bdrv_co_pdiscard", drv.bdrv_co_pdiscard(bs, offset, num))
            if ret and ret != -errno.ENOTSUP:
                break
            ret = 0
            offset += num
            bytes -= num
        _write_req_finish(bs, offset, 0, ret)
        return ret
    finally:
        _tracked_request_end(req)
        bdrv_dec_in_flight(bs)


def bdrv_co_truncate(bs: BlockDriverState, offset: int, exact: bool = False,
                     prealloc: int = PREALLOC_MODE_OFF, flags: int = 0) -> int:
    """Port of ``bdrv_co_truncate``: resize the image to ``offset`` bytes.

    -EINVAL for a negative size, -EFBIG beyond BDRV_MAX_LENGTH, -EACCES on a
    read-only device (QEMU's "Image is read-only"), -ENOTSUP if the driver
    cannot resize.  Serialised against every request at or past the smaller
    of the old and new size.  Coroutine only.
    """
    fn = "bdrv_co_truncate"
    _check_bs(bs, fn)
    _require_co(fn)
    _check_int(offset, fn, "offset")
    _check_int(prealloc, fn, "prealloc")
    _check_int(flags, fn, "flags")
    drv = bs.drv
    if drv is None or bs.closed:
        return -errno.ENOMEDIUM
    if offset < 0:
        return -errno.EINVAL
    if offset > BDRV_MAX_LENGTH:
        return -errno.EFBIG
    if bs.read_only:
        return -errno.EACCES
    if drv.bdrv_co_truncate is None:
        return -errno.ENOTSUP
    old = bdrv_getlength(bs)
    if old < 0:
        return old
    bdrv_inc_in_flight(bs)
    start = min(old, offset)
    req = _tracked_request_begin(bs, start, _INT64_MAX - start, _TRACKED_TRUNCATE)
    try:
        _make_request_serialising(req, 1)
        ret = _ret(drv, "bdrv_co_truncate", drv.bdrv_co_truncate(bs, offset, bool(exact), prealloc, flags))
        if bs.drv is not None:
            r = _refresh_total_bytes(bs)
            if ret == 0 and r < 0:
                ret = r
            if drv.bdrv_getlength is None and ret == 0:
                bs.total_bytes = offset
        bs.write_gen += 1
        return ret
    finally:
        _tracked_request_end(req)
        bdrv_dec_in_flight(bs)


# --------------------------------------------------------------------------
# Synchronous wrappers (BDRV_POLL_WHILE / bdrv_poll_co)

def _poll_co(bs: BlockDriverState, fn: Callable[[], int]) -> int:
    # In a coroutine: call directly.  Otherwise run a coroutine and poll the
    # device's context until it is done; this also works nested inside a
    # completion callback, because completion handlers re-arm themselves.
    if _co.qemu_in_coroutine():
        return fn()
    result: list = [_NOT_DONE]

    def entry(_: Any) -> None:
        result[0] = fn()

    co = _co.qemu_coroutine_create(entry, None)
    ctx = bs.aio_context
    _co.aio_co_enter(ctx, co)
    aio_wait_while(ctx, lambda: result[0] is _NOT_DONE)
    return result[0]


def _buf_qiov(fn: str, bytes: Any, buf: Any, writable: bool) -> QEMUIOVector:
    _check_int(bytes, fn, "bytes")
    try:
        n = memoryview(buf).nbytes
    except TypeError:
        raise TypeError(f"{fn}: buf must be a bytes-like object, got {type(buf).__name__}") from None
    qiov = QEMUIOVector()
    if bytes < 0:
        return qiov  # the request check reports -EIO
    if bytes > n:
        raise ValueError(f"{fn}: buf holds {n} bytes, the request needs {bytes}")
    qemu_iovec_init_buf(qiov, buf, bytes, writable=writable)
    return qiov


def bdrv_pread(bs: BlockDriverState, offset: int, bytes: int, buf: Any) -> int:
    """Port of ``bdrv_pread``: read into any writable buffer at any address.
    Returns 0 or -errno.  Polls the device's context until done (or calls the
    coroutine version directly inside a coroutine)."""
    _check_bs(bs, "bdrv_pread")
    qiov = _buf_qiov("bdrv_pread", bytes, buf, True)
    return _poll_co(bs, lambda: bdrv_co_preadv(bs, offset, bytes, qiov, 0))


def bdrv_pwrite(bs: BlockDriverState, offset: int, bytes: int, buf: Any, flags: int = 0) -> int:
    """Port of ``bdrv_pwrite``: write from any buffer (bytes included).
    Returns 0 or -errno."""
    _check_bs(bs, "bdrv_pwrite")
    qiov = _buf_qiov("bdrv_pwrite", bytes, buf, False)
    return _poll_co(bs, lambda: bdrv_co_pwritev(bs, offset, bytes, qiov, flags))


def bdrv_flush(bs: BlockDriverState) -> int:
    """Port of ``bdrv_flush``: 0 or -errno."""
    _check_bs(bs, "bdrv_flush")
    return _poll_co(bs, lambda: bdrv_co_flush(bs))


def bdrv_pdiscard(bs: BlockDriverState, offset: int, bytes: int) -> int:
    """Port of ``bdrv_pdiscard``: 0 or -errno."""
    _check_bs(bs, "bdrv_pdiscard")
    return _poll_co(bs, lambda: bdrv_co_pdiscard(bs, offset, bytes))


def bdrv_pwrite_zeroes(bs: BlockDriverState, offset: int, bytes: int, flags: int = 0) -> int:
    """Port of ``bdrv_pwrite_zeroes``: 0 or -errno."""
    _check_bs(bs, "bdrv_pwrite_zeroes")
    return _poll_co(bs, lambda: bdrv_co_pwrite_zeroes(bs, offset, bytes, flags))


def bdrv_truncate(bs: BlockDriverState, offset: int, exact: bool = False,
                  prealloc: int = PREALLOC_MODE_OFF, flags: int = 0) -> int:
    """Synchronous :func:`bdrv_co_truncate` (QEMU's generated wrapper)."""
    _check_bs(bs, "bdrv_truncate")
    return _poll_co(bs, lambda: bdrv_co_truncate(bs, offset, exact, prealloc, flags))


# --------------------------------------------------------------------------
# Callback API (blk_aio_prwv, blk_aio_complete)

class BlkAioEmAIOCB(BlockAIOCB):
    """QEMU's ``BlkAioEmAIOCB``: a coroutine request with a callback.

    Reads and writes carry their arguments in the AIOCB itself (QEMU's
    ``BlkRwCo``: ``offset``, ``qiov``, ``flags``); other requests carry the
    call to make in ``fn``.
    """

    __slots__ = ("ret", "has_returned", "fn", "offset", "qiov", "flags")

    def __init__(self, aiocb_info: AIOCBInfo, bs: Any, cb: Any, opaque: Any) -> None:
        # BlockAIOCB.__init__, inlined: one object per request.
        self.aiocb_info = aiocb_info
        self.bs = bs
        self.cb = cb
        self.opaque = opaque
        self.refcnt = 1
        self.ret = _NOT_DONE
        self.has_returned = False
        self.fn = None
        self.qiov = None


def _blk_aio_get_aio_context(acb: BlockAIOCB) -> AioContext:
    return acb.bs.aio_context


_blk_aio_em_aiocb_info = AIOCBInfo(BlkAioEmAIOCB, None, _blk_aio_get_aio_context, "blk_aio")


def _blk_aio_complete(acb: BlkAioEmAIOCB) -> None:
    # The callback runs exactly once, only after the submit call returned;
    # the request stays in flight until it has run.
    if not acb.has_returned:
        return
    bs = acb.bs
    bs.cb_depth += 1
    try:
        cb = acb.cb
        if cb is not None:
            cb(acb.opaque, acb.ret)
    finally:
        bs.cb_depth -= 1
        if bs.in_flight > 0:
            bs.in_flight -= 1
        else:
            bdrv_dec_in_flight(bs)  # raises
        # qemu_aio_unref, inlined (a freed AIOCB still raises).
        if acb.refcnt > 0:
            acb.refcnt -= 1
        else:
            qemu_aio_unref(acb)


class _DeferredCompletions:
    """Callback requests that finished before their submit returned, for
    one AioContext; the home thread only.

    QEMU delivers each with its own oneshot BH (blk_aio_complete_bh).  One
    BH per context with a queue gives the same order and the same "not
    before the submit returned" rule for a fraction of the cost (a BH
    object per request is most of what a synchronous request costs in
    Python).  The BH is re-entrant like the Linux AIO completion BH: it
    stays scheduled while it runs, so a callback that runs a nested
    aio_poll finds the rest of the queue delivered there.  Each run
    delivers only what was queued when it started -- what those callbacks
    complete waits for the next aio_bh_poll, as new oneshot BHs would.
    """

    __slots__ = ("bh", "queue")

    def __init__(self, ctx: AioContext) -> None:
        self.queue: collections.deque = collections.deque()
        self.bh = aio_bh_new_full(ctx, _deferred_completions_bh, self, "blk_aio_complete")


def _deferred_completions_bh(dc: _DeferredCompletions) -> None:
    queue = dc.queue
    bh = dc.bh
    qemu_bh_schedule(bh)
    n = len(queue)
    try:
        while n > 0 and queue:
            n -= 1
            acb = queue.popleft()
            if acb.__class__ is _DirectAIOCB:
                _direct_done(acb, acb.ret)
            else:
                _blk_aio_complete(acb)
    finally:
        if not queue:
            qemu_bh_cancel(bh)


def _deferred_completions_cleanup(ctx: AioContext) -> None:
    dc = ctx.blk_completions
    if dc is not None:
        ctx.blk_completions = None
        qemu_bh_delete(dc.bh)


def _defer_completion(ctx: AioContext, acb: BlockAIOCB) -> None:
    # Deliver acb's completion from a BH of ctx (home thread only).
    dc = ctx.blk_completions
    if dc is None:
        dc = ctx.blk_completions = _DeferredCompletions(ctx)
        aio_context_add_cleanup(ctx, _deferred_completions_cleanup)
    queue = dc.queue
    if not queue:
        qemu_bh_schedule(dc.bh)
    queue.append(acb)


def _blk_aio_entry(acb: BlkAioEmAIOCB) -> None:
    acb.ret = acb.fn()
    acb.fn = None
    _blk_aio_complete(acb)


def _blk_aio_read_entry(acb: BlkAioEmAIOCB) -> None:
    # Port of blk_aio_read_entry; the arguments were checked at submit.
    qiov = acb.qiov
    acb.ret = bdrv_co_preadv(acb.bs, acb.offset, qiov.size, qiov, acb.flags)
    acb.qiov = None
    if acb.has_returned:  # else the submit schedules the completion BH
        _blk_aio_complete(acb)


def _blk_aio_write_entry(acb: BlkAioEmAIOCB) -> None:
    # Port of blk_aio_write_entry.
    qiov = acb.qiov
    acb.ret = bdrv_co_pwritev(acb.bs, acb.offset, qiov.size, qiov, acb.flags)
    acb.qiov = None
    if acb.has_returned:  # else the submit schedules the completion BH
        _blk_aio_complete(acb)


def _blk_aio_start(bs: BlockDriverState, acb: BlkAioEmAIOCB, entry: Callable[[Any], None],
                   name: str) -> BlockAIOCB:
    # Port of blk_aio_prwv after the AIOCB is filled in: the coroutine runs
    # the request right away; if it finished without yielding, the callback
    # still waits for a BH, so it never runs before the submit returned.
    bs.in_flight += 1  # bdrv_inc_in_flight
    ctx = bs.aio_context
    co = _co_create(entry, acb, name)
    try:
        # aio_co_enter: the common case (the home thread, outside any
        # coroutine) enters directly.
        try:
            lt = _tls_local.lt
        except AttributeError:
            lt = None
        if lt is not None and lt.ctx is ctx and lt.co is None:
            _co_enter(lt, ctx, co)
        else:
            _co.aio_co_enter(ctx, co)
    finally:
        acb.has_returned = True
    if acb.ret is not _NOT_DONE:
        if lt is not None and lt.ctx is ctx:
            _defer_completion(ctx, acb)
        else:
            aio_bh_schedule_oneshot_full(ctx, _blk_aio_complete, acb, "blk_aio_complete")
    return acb


def _blk_aio_prwv(fn: str, bs: BlockDriverState, call: Callable[[], int],
                  cb: Any, opaque: Any) -> BlockAIOCB:
    if cb is not None and not callable(cb):
        raise TypeError(f"{fn}: cb must be callable, got {type(cb).__name__}")
    acb = BlkAioEmAIOCB(_blk_aio_em_aiocb_info, bs, cb, opaque)
    acb.fn = call
    return _blk_aio_start(bs, acb, _blk_aio_entry, "_blk_aio_entry")


# --------------------------------------------------------------------------
# The direct path: a callback request that needs nothing from the generic
# layer goes straight to the driver's bdrv_aio_preadv/pwritev.
#
# QEMU always runs blk_aio_preadv through a coroutine (blk_aio_prwv ->
# bdrv_co_preadv -> the driver); in C that costs next to nothing.  In Python
# the coroutine, its wake-up and the completion BH are most of a request's
# CPU time, so a request the coroutine path would hand to the driver
# unchanged skips them: aligned to request_alignment, inside the device, no
# flags, no serialising request in flight (so nothing to wait for), the
# device's length fixed, submitted from the home thread of its context.
# Everything the coroutine path does for such a request still happens, in
# the same order: in-flight count, tracked request (so a later serialising
# request waits for this one), accounting, write generation, the callback
# never before the submit returned, and exactly once.


class _DirectAIOCB(BlockAIOCB, _DirectTracked):
    """A request on the direct path: the AIOCB its caller gets and, at the
    same time, its tracked request (it has _TrackedRequest's fields, so
    serialising requests find it in ``bs.tracked_requests``).

    ``inner`` is the driver's AIOCB (cancellation goes there); ``ret`` is
    ``_NOT_DONE`` until the driver called back.  Home thread only.
    """

    __slots__ = ("offset", "bytes", "type", "wait_queue", "inner", "start", "has_returned",
                 "ret")

    co = None  # it belongs to no coroutine


def _direct_cancel_async(acb: _DirectAIOCB) -> None:
    inner = acb.inner
    if acb.ret is _NOT_DONE and inner is not None and inner.refcnt > 0:
        cancel = inner.aiocb_info.cancel_async
        if cancel is not None:
            cancel(inner)


_direct_aiocb_info = AIOCBInfo(_DirectAIOCB, _direct_cancel_async, _blk_aio_get_aio_context,
                               "blk_aio_direct")


def _direct_done(acb: _DirectAIOCB, ret: int) -> None:
    # The driver's completion callback.  A driver may call back before its
    # submit returned (Linux AIO reaps right after io_submit); the caller's
    # callback then waits for a BH, as blk_aio_prwv's does.
    acb.ret = ret
    if not acb.has_returned:
        return
    # The tail of bdrv_co_preadv/pwritev (tracked request end, accounting
    # as _account_request, bdrv_co_write_req_finish), then blk_aio_complete.
    bs = acb.bs
    del bs.tracked_requests[acb]
    stats = bs.acct
    now = _monotonic_ns()
    if acb.type == _TRACKED_WRITE:
        t = _ACCT_WRITE
        bs.write_gen += 1
        if ret >= 0:
            end = acb.offset + acb.bytes
            if end > stats.wr_highest_offset:
                stats.wr_highest_offset = end
    else:
        t = _ACCT_READ
    if ret < 0:
        stats.failed_ops[t] += 1
        if stats.account_failed:
            stats.total_time_ns[t] += now - acb.start
            stats.last_access_time_ns = now
    else:
        stats.nr_bytes[t] += acb.bytes
        stats.nr_ops[t] += 1
        stats.total_time_ns[t] += now - acb.start
        stats.last_access_time_ns = now
    if acb.wait_queue is not None:
        # _tracked_request_end_slow outside a coroutine: serialising
        # requests that waited for this one go on now.
        _co.qemu_co_enter_all(acb.wait_queue)
    bs.cb_depth += 1
    try:
        cb = acb.cb
        if cb is not None:
            cb(acb.opaque, ret)
    finally:
        bs.cb_depth -= 1
        bs.in_flight -= 1
        acb.inner = None
        if acb.refcnt > 0:
            acb.refcnt -= 1
        else:
            qemu_aio_unref(acb)


def _direct_finish(acb: _DirectAIOCB) -> None:
    # The completion BH of a request the driver finished before its submit
    # returned.
    _direct_done(acb, acb.ret)


def _make_blk_aio_rw(is_read: bool, name: str, doc: str) -> Callable[..., BlockAIOCB]:
    # bdrv_aio_preadv / bdrv_aio_pwritev: one body, the direction bound in a
    # closure, with the direct path inline (it runs for every request, and
    # a helper function would cost it a Python call).
    tracked_type = _TRACKED_READ if is_read else _TRACKED_WRITE
    entry = _blk_aio_read_entry if is_read else _blk_aio_write_entry
    entry_name = entry.__name__

    def blk_aio_rw(bs: BlockDriverState, offset: int, qiov: QEMUIOVector, flags: int,
                   cb: Any, opaque: Any) -> BlockAIOCB:
        if (bs.__class__ is not BlockDriverState or offset.__class__ is not int
                or qiov.__class__ is not QEMUIOVector or flags.__class__ is not int):
            _check_bs(bs, name)
            _check_qiov_args(name, offset, 0, qiov, 0, flags, is_read)
        if is_read and qiov.readonly:
            raise TypeError(f"{name}: cannot read into a read-only qiov")
        if cb is not None and not callable(cb):
            raise TypeError(f"{name}: cb must be callable, got {type(cb).__name__}")
        drv = bs.drv
        home = False
        if drv is not None and not flags:
            submit = drv.bdrv_aio_preadv if is_read else (
                None if bs.read_only else drv.bdrv_aio_pwritev)
            if submit is not None:
                nbytes = qiov.size
                mt = bs.bl.max_transfer
                # The direct path (see above): aligned, in bounds, nothing
                # serialising, a fixed length, the home thread.
                if (not bs.serialising_in_flight and not bs.has_variable_length
                        and nbytes > 0 and offset >= 0
                        and not (offset | nbytes) & (bs.bl.request_alignment - 1)
                        and offset + nbytes <= bs.total_bytes and not (mt and nbytes > mt)):
                    try:
                        home = _tls_local.lt.ctx is bs.aio_context
                    except AttributeError:  # a thread that never ran QEMU code
                        pass
            if home:
                acb = _DirectAIOCB.__new__(_DirectAIOCB)
                acb.aiocb_info = _direct_aiocb_info
                acb.bs = bs
                acb.cb = cb
                acb.opaque = opaque
                acb.refcnt = 1
                acb.offset = offset
                acb.bytes = nbytes
                acb.type = tracked_type
                acb.wait_queue = None  # acb.inner is set once the submit returned
                acb.has_returned = False
                acb.ret = _NOT_DONE
                bs.tracked_requests[acb] = None  # type: ignore[index]
                bs.in_flight += 1
                acb.start = _monotonic_ns()
                try:
                    inner = submit(bs, offset, nbytes, qiov, 0, _direct_done, acb)
                except BaseException:
                    if acb.ret is _NOT_DONE:
                        del bs.tracked_requests[acb]  # type: ignore[arg-type]
                        bs.in_flight -= 1
                    raise
                if inner is not None:
                    acb.inner = inner
                    acb.has_returned = True
                    if acb.ret is not _NOT_DONE:
                        # The direct path runs in the home thread.
                        _defer_completion(bs.aio_context, acb)
                    return acb
                # The driver declined: nothing happened, the coroutine path
                # takes the request.
                if acb.ret is not _NOT_DONE:
                    raise RuntimeError(f"driver '{drv.format_name}' declined a request "
                                       "it had already completed")
                del bs.tracked_requests[acb]  # type: ignore[arg-type]
                bs.in_flight -= 1
        acb = BlkAioEmAIOCB(_blk_aio_em_aiocb_info, bs, cb, opaque)
        acb.offset = offset
        acb.qiov = qiov
        acb.flags = flags
        return _blk_aio_start(bs, acb, entry, entry_name)

    blk_aio_rw.__name__ = blk_aio_rw.__qualname__ = name
    blk_aio_rw.__doc__ = doc
    return blk_aio_rw


bdrv_aio_preadv = _make_blk_aio_rw(True, "bdrv_aio_preadv", """\
Port of ``blk_aio_preadv``: read ``qiov.size`` bytes at ``offset``,
then ``cb(opaque, ret)`` once (never before this returns).  Wrong types
raise at once; refused requests call back with -errno.

Deviation: a driver with ``bdrv_aio_preadv`` gets simple requests
(aligned, in bounds, no flags, nothing serialising) directly, without a
coroutine; see the module docstring.""")
bdrv_aio_pwritev = _make_blk_aio_rw(False, "bdrv_aio_pwritev", """\
Port of ``blk_aio_pwritev`` (with the direct path of
:func:`bdrv_aio_preadv`).""")


def bdrv_aio_flush(bs: BlockDriverState, cb: Any, opaque: Any) -> BlockAIOCB:
    """Port of ``blk_aio_flush``."""
    _check_bs(bs, "bdrv_aio_flush")
    return _blk_aio_prwv("bdrv_aio_flush", bs, lambda: bdrv_co_flush(bs), cb, opaque)


def bdrv_aio_pdiscard(bs: BlockDriverState, offset: int, bytes: int, cb: Any,
                      opaque: Any) -> BlockAIOCB:
    """Port of ``blk_aio_pdiscard``."""
    fn = "bdrv_aio_pdiscard"
    _check_bs(bs, fn)
    _check_int(offset, fn, "offset")
    _check_int(bytes, fn, "bytes")
    return _blk_aio_prwv(fn, bs, lambda: bdrv_co_pdiscard(bs, offset, bytes), cb, opaque)


# --------------------------------------------------------------------------
# Drain and plug (block/io.c)

def _io_unplugged_begin(bs: BlockDriverState) -> None:
    for child in bs.children:
        _io_unplugged_begin(child)
    bs.io_plug_disabled += 1
    if bs.io_plug_disabled == 1 and bs.io_plugged > 0:
        drv = bs.drv
        if drv is not None and drv.bdrv_io_unplug is not None:
            drv.bdrv_io_unplug(bs)


def _io_unplugged_end(bs: BlockDriverState) -> None:
    for child in bs.children:
        _io_unplugged_end(child)
    bs.io_plug_disabled -= 1
    if bs.io_plug_disabled == 0 and bs.io_plugged > 0:
        drv = bs.drv
        if drv is not None and drv.bdrv_io_plug is not None:
            drv.bdrv_io_plug(bs)


def _drain_poll(bs: BlockDriverState) -> bool:
    # A completion callback that drains (or closes) its own device must not
    # wait for itself: its request is still counted while it runs.
    if bs.in_flight - bs.cb_depth > 0:
        return True
    return any(_drain_poll(c) for c in bs.children)


def bdrv_drained_begin(bs: BlockDriverState) -> None:
    """Port of ``bdrv_drained_begin``: wait until no request is in flight.

    Plugged requests are submitted first (QEMU's ``bdrv_io_unplugged_begin``),
    otherwise they could never complete.  New requests are not held back
    (pyaioctx has no BlockBackend queue).
    """
    _check_bs(bs, "bdrv_drained_begin")
    if _co.qemu_in_coroutine():
        _co_yield_to_drain(bs, True)
        return
    bs.quiesce_counter += 1
    _io_unplugged_begin(bs)
    drv = bs.drv
    if drv is not None and drv.bdrv_drain_begin is not None:
        drv.bdrv_drain_begin(bs)
    aio_wait_while(bs.aio_context, lambda: _drain_poll(bs))


def bdrv_drained_end(bs: BlockDriverState) -> None:
    """Port of ``bdrv_drained_end``."""
    _check_bs(bs, "bdrv_drained_end")
    if bs.quiesce_counter <= 0:
        raise RuntimeError(f"bdrv_drained_end: {bs!r} is not drained")
    if _co.qemu_in_coroutine():
        _co_yield_to_drain(bs, False)
        return
    drv = bs.drv
    if drv is not None and drv.bdrv_drain_end is not None:
        drv.bdrv_drain_end(bs)
    _io_unplugged_end(bs)
    bs.quiesce_counter -= 1


def _co_yield_to_drain(bs: BlockDriverState, begin: bool) -> None:
    # Port of bdrv_co_yield_to_drain: polling inside a coroutine is not
    # allowed, so a BH outside it does the work and wakes us afterwards.
    co = _co.qemu_coroutine_self()
    err: list = []

    def bh(_: Any) -> None:
        try:
            if begin:
                bdrv_drained_begin(bs)
            else:
                bdrv_drained_end(bs)
        except BaseException as e:  # re-raised in the coroutine
            err.append(e)
        _co.aio_co_wake(co)

    aio_bh_schedule_oneshot(bs.aio_context, bh, None)
    _co.qemu_coroutine_yield()
    if err:
        raise err[0]


def bdrv_drain(bs: BlockDriverState) -> None:
    """Port of ``bdrv_drain``: wait for every request in flight on ``bs`` and
    its children (``bdrv_aio_*`` ones until their callback ran).  Callable
    from a coroutine; a no-op on a closed device."""
    _check_bs(bs, "bdrv_drain")
    if bs.closed:
        return
    bdrv_drained_begin(bs)
    bdrv_drained_end(bs)


def bdrv_io_plug(bs: BlockDriverState) -> None:
    """Port of ``bdrv_io_plug``: hold requests back to submit them in a batch
    at the matching :func:`bdrv_io_unplug`.  Nests; same thread as unplug."""
    _check_bs(bs, "bdrv_io_plug")
    for child in bs.children:
        bdrv_io_plug(child)
    bs.io_plugged += 1
    if bs.io_plugged == 1 and bs.io_plug_disabled == 0:
        drv = bs.drv
        if drv is not None and drv.bdrv_io_plug is not None:
            drv.bdrv_io_plug(bs)


def bdrv_io_unplug(bs: BlockDriverState) -> None:
    """Port of ``bdrv_io_unplug``.  Unplugging more than plugged raises."""
    _check_bs(bs, "bdrv_io_unplug")
    if bs.io_plugged <= 0:
        raise RuntimeError(f"bdrv_io_unplug: {bs!r} is not plugged")
    bs.io_plugged -= 1
    if bs.io_plugged == 0 and bs.io_plug_disabled == 0:
        drv = bs.drv
        if drv is not None and drv.bdrv_io_unplug is not None:
            drv.bdrv_io_unplug(bs)
    for child in bs.children:
        bdrv_io_unplug(child)


# --------------------------------------------------------------------------
# Block status (block/io.c)

def _driver_block_status(bs: BlockDriverState, want_zero: bool, offset: int,
                         bytes: int) -> tuple[int, int, int, Optional[BlockDriverState]]:
    # Calls the driver's callback and checks its answer, which may be a bare
    # negative errno or the (ret, pnum, map, file) tuple.
    drv = bs.drv
    assert drv is not None and drv.bdrv_co_block_status is not None
    r = drv.bdrv_co_block_status(bs, want_zero, offset, bytes)
    if r.__class__ is int:
        if r >= 0:
            raise TypeError(f"driver '{drv.format_name}' bdrv_co_block_status returned {r!r}; "
                            f"expected (ret, pnum, map, file) or -errno")
        return r, 0, 0, None
    if not isinstance(r, tuple) or len(r) != 4:
        raise TypeError(f"driver '{drv.format_name}' bdrv_co_block_status returned {r!r}; "
                        f"expected (ret, pnum, map, file) or -errno")
    ret, pnum, map, file = r
    _ret(drv, "bdrv_co_block_status", ret)
    if ret < 0:
        return ret, 0, 0, None
    _check_int(pnum, f"driver '{drv.format_name}' bdrv_co_block_status", "pnum")
    return ret, pnum, map, file


def bdrv_co_block_status(bs: BlockDriverState, want_zero: bool, offset: int,
                         bytes: int) -> tuple[int, int, int, Optional[BlockDriverState]]:
    """Port of ``bdrv_co_block_status`` (block/io.c): what the ``pnum`` bytes
    at ``offset`` look like.

    Returns ``(ret, pnum, map, file)``: ``ret`` is a set of ``BDRV_BLOCK_*``
    flags or ``-errno``; the first ``pnum`` bytes (at most ``bytes``, 0 only
    at or past the end) all have that status; with ``BDRV_BLOCK_OFFSET_VALID``
    they are stored at offset ``map`` of ``file`` (the node that holds them).

    ``want_zero=False`` asks only "is it allocated?", which lets drivers
    answer cheaply (the file driver then skips SEEK_DATA/SEEK_HOLE and says
    DATA); ``want_zero=True`` asks for zeros and holes as precisely as the
    driver can tell.  Drivers without the callback are all data
    (``DATA|ALLOCATED``, plus ``OFFSET_VALID`` for protocol drivers); a filter
    without it (``is_filter`` with a ``file``) answers for its child.  Runs in
    a coroutine; see :func:`bdrv_block_status` for the synchronous form.
    """
    fn = "bdrv_co_block_status"
    _check_bs(bs, fn)
    _check_int(offset, fn, "offset")
    _check_int(bytes, fn, "bytes")
    _require_co(fn)
    if bs.drv is None or bs.closed:
        return -errno.ENOMEDIUM, 0, 0, None
    if offset < 0 or bytes < 0:
        return -errno.EINVAL, 0, 0, None
    want_zero = bool(want_zero)
    total_size = bdrv_getlength(bs)
    if total_size < 0:
        return total_size, 0, 0, None
    if offset >= total_size:
        return BDRV_BLOCK_EOF, 0, 0, None
    if not bytes:
        return 0, 0, 0, None
    bytes = min(bytes, total_size - offset)
    drv = bs.drv
    filtered = bs.file if drv.is_filter else None

    if drv.bdrv_co_block_status is None and filtered is None:
        # QEMU's default: a driver that cannot tell has everything allocated
        # as data; a protocol driver's data lives at the same offset in it.
        ret = BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED
        if offset + bytes == total_size:
            ret |= BDRV_BLOCK_EOF
        if drv.protocol_name:
            ret |= BDRV_BLOCK_OFFSET_VALID
        return ret, bytes, offset, bs

    bdrv_inc_in_flight(bs)
    try:
        # Drivers only see ranges aligned to request_alignment, as for I/O;
        # the answer is then cut back to the caller's range.
        align = bs.bl.request_alignment
        aligned_offset = offset - offset % align
        aligned_end = -(-(offset + bytes) // align) * align
        if drv.bdrv_co_block_status is not None:
            ret, pnum, local_map, local_file = _driver_block_status(
                bs, want_zero, aligned_offset, aligned_end - aligned_offset)
        else:
            ret, pnum = BDRV_BLOCK_RAW | BDRV_BLOCK_OFFSET_VALID, aligned_end - aligned_offset
            local_map, local_file = aligned_offset, filtered
        if ret < 0:
            return ret, 0, 0, None
        if pnum <= 0 or pnum % align or align <= offset - aligned_offset:
            raise ValueError(f"driver '{drv.format_name}' bdrv_co_block_status returned "
                             f"pnum={pnum}; expected a positive multiple of {align}")
        pnum -= offset - aligned_offset
        pnum = min(pnum, bytes)
        if ret & BDRV_BLOCK_OFFSET_VALID:
            local_map += offset - aligned_offset

        if ret & BDRV_BLOCK_RAW:
            # A filter: the answer is its child's, at the mapped offset.
            if not (ret & BDRV_BLOCK_OFFSET_VALID) or local_file is None:
                raise ValueError(f"driver '{drv.format_name}' returned BDRV_BLOCK_RAW "
                                 f"without OFFSET_VALID and a file")
            ret, pnum, local_map, local_file = bdrv_co_block_status(
                local_file, want_zero, local_map, pnum)
        else:
            if ret & (BDRV_BLOCK_DATA | BDRV_BLOCK_ZERO):
                ret |= BDRV_BLOCK_ALLOCATED
            if (want_zero and ret & BDRV_BLOCK_RECURSE and local_file is not None
                    and local_file is not bs and ret & BDRV_BLOCK_DATA
                    and not ret & BDRV_BLOCK_ZERO and ret & BDRV_BLOCK_OFFSET_VALID):
                # Data in a format layer may still be a hole in the file
                # below it: then it reads as zeros.
                ret2, file_pnum, _, _ = bdrv_co_block_status(local_file, want_zero,
                                                             local_map, pnum)
                if ret2 >= 0:
                    if ret2 & BDRV_BLOCK_EOF and (not file_pnum or ret2 & BDRV_BLOCK_ZERO):
                        # Past the end of the file: zeros.
                        ret |= BDRV_BLOCK_ZERO
                    else:
                        pnum = file_pnum
                        ret |= ret2 & BDRV_BLOCK_ZERO
    finally:
        bdrv_dec_in_flight(bs)
    if ret >= 0 and offset + pnum == total_size:
        ret |= BDRV_BLOCK_EOF
    if ret < 0:
        return ret, 0, 0, None
    return ret, pnum, local_map, local_file


def bdrv_block_status(bs: BlockDriverState, offset: int,
                      bytes: int) -> tuple[int, int, int, Optional[BlockDriverState]]:
    """Port of ``bdrv_block_status``: :func:`bdrv_co_block_status` with
    ``want_zero=True``, run to completion (QEMU's generated wrapper polls the
    device's context; inside a coroutine it calls directly)."""
    _check_bs(bs, "bdrv_block_status")
    return _poll_co(bs, lambda: bdrv_co_block_status(bs, True, offset, bytes))  # type: ignore[return-value]


def bdrv_co_is_allocated(bs: BlockDriverState, offset: int, bytes: int) -> tuple[int, int]:
    """Port of ``bdrv_co_is_allocated``: ``(1, pnum)`` when the first
    ``pnum`` bytes are allocated in this layer, ``(0, pnum)`` when they are
    not, ``(-errno, 0)`` on error.  Asks with ``want_zero=False``."""
    ret, pnum, _, _ = bdrv_co_block_status(bs, False, offset, bytes)
    if ret < 0:
        return ret, 0
    return (1 if ret & BDRV_BLOCK_ALLOCATED else 0), pnum


def bdrv_is_allocated(bs: BlockDriverState, offset: int, bytes: int) -> tuple[int, int]:
    """Port of ``bdrv_is_allocated``: synchronous :func:`bdrv_co_is_allocated`."""
    _check_bs(bs, "bdrv_is_allocated")
    return _poll_co(bs, lambda: bdrv_co_is_allocated(bs, offset, bytes))  # type: ignore[return-value]


# --------------------------------------------------------------------------
# Moving a device to another AioContext (block.c)

def _subtree(bs: BlockDriverState) -> list[BlockDriverState]:
    # Children before their parent: that is the order in which QEMU's
    # transaction commits the nodes (the recursion adds a node after its
    # neighbours), so a parent's attach hook finds its children attached.
    out: list[BlockDriverState] = []
    for child in bs.children:
        out.extend(_subtree(child))
    out.append(bs)
    return out


def bdrv_try_change_aio_context(bs: BlockDriverState, ctx: AioContext) -> int:
    """Port of ``bdrv_try_change_aio_context`` (block.c): move ``bs`` and
    every node connected to it (its parent, a blkdebug's image, ...) to
    ``ctx``.  Returns 0, or ``-errno`` (``-ENOMEDIUM`` for a closed device).

    As in QEMU: the graph is drained first; then each node's driver gets
    ``bdrv_detach_aio_context(bs)`` while the node still lives in the old
    context (QEMU's ``bdrv_detach_aio_context``), the node's ``aio_context``
    changes, and the driver gets ``bdrv_attach_aio_context(bs, ctx)``
    (``bdrv_attach_aio_context``); then the drained section ends.  From then
    on requests run, and complete, in ``ctx``'s home thread -- an iothread
    that polls ``ctx``.

    Call it from the thread that owns the device now, outside coroutines
    (QEMU: global state code), with no new request submitted until it
    returns -- there is no BlockBackend here to queue them.  Pythonic form:
    ``bs.set_aio_context(ctx)``.
    """
    fn = "bdrv_try_change_aio_context"
    _check_bs(bs, fn)
    if not isinstance(ctx, AioContext):
        raise TypeError(f"{fn}: ctx must be an AioContext, got {type(ctx).__name__}")
    if ctx.closed:
        raise ValueError(f"{fn}: {ctx!r} is closed")
    if _co.qemu_in_coroutine():
        raise RuntimeError(f"{fn} must not be called from a coroutine (it drains and polls)")
    if bs.closed or bs.drv is None:
        return -errno.ENOMEDIUM
    # A node cannot live in another context than its parent: the whole tree
    # moves, starting at its root (QEMU walks parents and children alike).
    root = bs
    while root.parent is not None:
        root = root.parent
    if root.aio_context is ctx:
        return 0
    nodes = _subtree(root)
    bdrv_drained_begin(root)
    try:
        for node in nodes:
            drv = node.drv
            if drv is not None and drv.bdrv_detach_aio_context is not None:
                drv.bdrv_detach_aio_context(node)
        for node in nodes:
            node.aio_context = ctx
            drv = node.drv
            if drv is not None and drv.bdrv_attach_aio_context is not None:
                drv.bdrv_attach_aio_context(node, ctx)
    finally:
        bdrv_drained_end(root)
    return 0
