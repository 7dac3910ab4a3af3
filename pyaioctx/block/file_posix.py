# SPDX-License-Identifier: GPL-2.0-or-later
"""The ``file`` driver: port of QEMU's block/file-posix.c (regular files and
block devices).

Options (QEMU's): ``filename`` (required), ``aio`` = ``threads`` (default) |
``native`` | ``io_uring``; plus the generic ones handled by
``bdrv_open`` (``cache.direct``, ``cache.no-flush``, ``read-only``,
``discard``).

I/O engines, chosen once at open, never silently:

* ``threads``: every request is a function run by the context's thread pool
  (``os.preadv``/``os.pwritev`` on the request's memoryviews, ``fdatasync``,
  ``fallocate``, ``ftruncate``).  Works on any POSIX system.
* ``native``: Linux AIO (``laio_co_submit``).  As in QEMU it requires
  ``cache.direct=on`` -- io_submit on a buffered fd is synchronous, so
  without O_DIRECT it would block the event loop.  Flushes still go to the
  thread pool (the kernel's AIO fsync is not generally available).
* ``io_uring``: ``luring_co_submit`` from :mod:`pyaioctx.block.io_uring`,
  when that module is available; otherwise opening fails with
  "io_uring is not available: <reason>".

Some facts this driver relies on:

* O_DIRECT needs the file offset, the length and the buffer address aligned.
  The alignment is probed as QEMU's ``raw_probe_alignment`` does: read at
  offset 0 with lengths 1, 512, 1024, 2048, 4096 from an aligned buffer, then
  with buffer offsets 1, 512, ... -- EINVAL means "not aligned enough".  A
  length of 1 working (an empty file, or no O_DIRECT) gives the conservative
  maximum.  The generic layer pads requests to ``bs.bl.request_alignment``;
  this driver bounces buffers that miss ``bs.bl.min_mem_alignment``
  (QEMU_AIO_MISALIGNED) through an aligned buffer in the worker.
* tmpfs (and some FUSE file systems) refuse O_DIRECT at open with EINVAL; the
  error then names ``cache.direct``.
* Linux transfers at most 0x7ffff000 bytes per call; ``max_transfer`` is
  capped at 1 GiB so no single call is ever cut short by that.
* One short-I/O rule on every engine: a short read is the end of the file
  and zero-filled; a write that makes no progress is ``-ENOSPC``.  (QEMU's
  thread path returns ``-EINVAL`` for a short vectored write.)
* ``fallocate(PUNCH_HOLE|KEEP_SIZE)`` discards; ``ZERO_RANGE`` writes zeros;
  either may be unsupported (``-ENOTSUP``), then the generic layer falls back.
* Block status comes from ``lseek(SEEK_DATA/SEEK_HOLE)`` (QEMU's
  ``find_allocation``): holes read as zeros, everything else is data.
* The Linux AIO and io_uring engines belong to an AioContext (one per
  context, registered with it).  Moving the device to another context
  (``bdrv_try_change_aio_context``) switches to the new context's engine,
  set up in that context's home thread; the thread pool is always the one
  of the device's current context.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
from typing import Any, Callable, Optional

from ..aio import AioContext, _context_has_other_home, aio_wait_bh_oneshot
from ..iov import QEMUIOVector, qemu_memalign, qemu_vfree
from ..aiocb import AIOCBInfo, BlockAIOCB
from ..thread_pool import (aio_get_thread_pool, thread_pool_set_batchable,
                           thread_pool_submit_aio, thread_pool_submit_co)
from .._sys.libc import fallocate as _sys_fallocate
from .._sys.mem import PAGE_SIZE
from .block import (
    BDRV_O_NATIVE_AIO,
    BDRV_O_IO_URING,
    BDRV_O_NOCACHE,
    BDRV_O_RDWR,
    BDRV_BLOCK_DATA,
    BDRV_BLOCK_OFFSET_VALID,
    BDRV_BLOCK_ZERO,
    BDRV_REQ_MAY_UNMAP,
    BDRV_REQ_NO_FALLBACK,
    PREALLOC_MODE_FALLOC,
    PREALLOC_MODE_FULL,
    PREALLOC_MODE_OFF,
    BlockDriver,
    BlockDriverState,
    bdrv_get_aio_context,
    bdrv_qiov_is_aligned,
    bdrv_register,
)
from .raw_aio import QEMU_AIO_FLUSH, QEMU_AIO_READ, QEMU_AIO_WRITE

__all__ = ["bdrv_file", "BDRVRawState", "raw_probe_alignment", "aio_engine_available"]

log = logging.getLogger("pyaioctx.block")

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_BLKSSZGET = 0x1268
_BLKDISCARD = 0x1277
_BLKZEROOUT = 0x127F
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
_MAX_TRANSFER = 1 << 30
_MAX_BLOCKSIZE = 4096
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)
_os_preadv = os.preadv

def _do_fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    # Port of do_fallocate + translate_err: 0 or -errno, with "not supported"
    # in all its spellings mapped to -ENOTSUP.
    ret = _sys_fallocate(fd, mode, offset, length)
    if ret == 0:
        return 0
    err = -ret
    if err in (errno.ENODEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTTY):
        return -errno.ENOTSUP
    return -err


# --------------------------------------------------------------------------
# I/O engines

class _Engine:
    """One Linux I/O engine (Linux AIO, io_uring): how to set it up for a
    context and how to submit to it.  The thread pool is the fallback and
    needs no entry."""

    def __init__(self, name: str, setup: Any, co_submit: Any, co_submit_direct: Any,
                 submit: Any, plug: Any, unplug: Any, flush: bool, ctx_attr: str) -> None:
        self.name = name
        self.ctx_attr = ctx_attr    # where the context keeps its state, once set up
        self.setup = setup          # setup(ctx) -> state, raises OSError
        self.co_submit = co_submit  # co_submit(bs, state, fd, offset, qiov, type) -> int
        # The same for a read or write with arguments already checked.
        self.co_submit_direct = co_submit_direct
        # submit(bs, state, fd, offset, qiov, type, cb, opaque) -> AIOCB or
        # None: the callback form, arguments already checked.
        self.submit = submit
        self.plug = plug            # plug(bs, state)
        self.unplug = unplug
        self.flush = flush          # engine handles QEMU_AIO_FLUSH itself


def _load_engine(aio: str) -> _Engine:
    """The engine for ``aio=native|io_uring``; raises ValueError saying why
    it is unavailable."""
    if aio == "native":
        try:
            from . import linux_aio as m
            return _Engine("native", m.aio_setup_linux_aio, m.laio_co_submit,
                           m.laio_co_submit_direct, m.laio_submit_direct,
                           m.laio_io_plug, m.laio_io_unplug, False, "linux_aio")
        except (ImportError, AttributeError) as e:
            raise ValueError(f"aio=native is not available: {e}") from e
    try:
        from . import io_uring as m  # type: ignore[attr-defined]
        return _Engine("io_uring", m.aio_setup_linux_io_uring, m.luring_co_submit,
                       m.luring_co_submit_direct, m.luring_submit_direct,
                       m.luring_io_plug, m.luring_io_unplug, True, "linux_io_uring")
    except (ImportError, AttributeError) as e:
        raise ValueError(f"io_uring is not available: {e}") from e


def aio_engine_available(aio: str) -> tuple[bool, str]:
    """``(ok, reason)``: can ``aio=<aio>`` be used in the main context?
    Never raises; used by the test suite to skip with the probe's reason."""
    if aio == "threads":
        return True, "thread pool"
    if aio not in ("native", "io_uring"):
        return False, f"unknown aio mode {aio!r}"
    try:
        eng = _load_engine(aio)
        from ..aio import qemu_get_aio_context
        eng.setup(qemu_get_aio_context())
    except (ValueError, OSError, RuntimeError) as e:
        return False, str(e)
    return True, eng.name


# --------------------------------------------------------------------------
# Driver state

class BDRVRawState:
    """QEMU's ``BDRVRawState``.

    ``fd``, ``open_flags`` and the engine are set at open (home thread).
    ``has_write_zeroes`` / ``has_discard`` / ``has_fallocate`` are cleared by
    workers when the file system says "not supported" (a plain bool store;
    the worst a race does is one extra -ENOTSUP attempt).
    """

    def __init__(self) -> None:
        self.fd = -1
        self.filename = ""
        self.open_flags = 0
        self.needs_alignment = False
        self.buf_align = 1
        self.is_blockdev = False
        self.aio = "threads"
        self.engine: Optional[_Engine] = None
        self.aio_state: Any = None   # the engine's per-context state
        self.has_discard = True
        self.has_write_zeroes = True
        self.has_fallocate = True
        # Reads may first try preadv2(RWF_NOWAIT) in the calling thread (see
        # _read_nowait); set at open for buffered fds on the thread pool,
        # cleared when the kernel or file system does not support it.
        self.try_nowait = False


class _RawAIOCB:
    """QEMU's ``RawPosixAIOData``: everything a worker needs, captured in
    the home thread (the worker never touches the QEMUIOVector itself)."""

    __slots__ = ("s", "fd", "offset", "nbytes", "views", "bounce_align", "type", "flags",
                 "prealloc")

    def __init__(self, s: BDRVRawState, offset: int, nbytes: int, type: int) -> None:
        self.s = s
        self.fd = s.fd
        self.offset = offset
        self.nbytes = nbytes
        self.type = type
        self.views: tuple = ()
        self.bounce_align = 0
        self.flags = 0
        self.prealloc = PREALLOC_MODE_OFF


def _pool_submit(bs: BlockDriverState, func: Any, acb: _RawAIOCB) -> int:
    return thread_pool_submit_co(aio_get_thread_pool(bdrv_get_aio_context(bs)), func, acb)


# --------------------------------------------------------------------------
# Worker functions (run in the thread pool; return 0 or -errno)

def _advance(views: list, n: int) -> list:
    while n and views:
        v = views[0]
        if n >= len(v):
            n -= len(v)
            views.pop(0)
        else:
            views[0] = v[n:]
            n = 0
    return views


# A read or write of the image returns in bounded time and never waits for
# another request, so the pool may batch these (fewer worker wake-ups).
@thread_pool_set_batchable
def _handle_aiocb_rw(acb: _RawAIOCB) -> int:
    # Port of handle_aiocb_rw (+ _vector / _linear).
    fd, offset, nbytes = acb.fd, acb.offset, acb.nbytes
    is_read = bool(acb.type & QEMU_AIO_READ)
    if acb.bounce_align:
        # QEMU_AIO_MISALIGNED: O_DIRECT with a buffer it cannot use, or more
        # iovecs than preadv takes.  Go through one aligned buffer.
        buf = qemu_memalign(acb.bounce_align, max(nbytes, 1))
        try:
            mv = memoryview(buf).cast("B")[:nbytes]
            if is_read:
                ret = _rw_loop(fd, offset, [mv], True, nbytes)
                if ret == 0:
                    pos = 0
                    for v in acb.views:
                        v[:] = mv[pos:pos + len(v)]
                        pos += len(v)
            else:
                pos = 0
                for v in acb.views:
                    mv[pos:pos + len(v)] = v
                    pos += len(v)
                ret = _rw_loop(fd, offset, [mv], False, nbytes)
            mv.release()
            return ret
        finally:
            qemu_vfree(buf)
    return _rw_loop(fd, offset, list(acb.views), is_read, nbytes)


def _rw_loop(fd: int, offset: int, views: list, is_read: bool, nbytes: int) -> int:
    done = 0
    while done < nbytes:
        try:
            if is_read:
                n = os.preadv(fd, views, offset + done)
            else:
                n = os.pwritev(fd, views, offset + done)
        except OSError as e:
            return -(e.errno or errno.EIO)
        if n == 0 or (is_read and n < nbytes - done):
            if not is_read:
                return -errno.ENOSPC
            # End of file: the rest reads as zeros.
            _advance(views, n)
            for v in views:
                v[:] = bytes(len(v))
            return 0
        done += n
        _advance(views, n)
    return 0


def _handle_aiocb_flush(acb: _RawAIOCB) -> int:
    # Port of handle_aiocb_flush (qemu_fdatasync).
    try:
        os.fdatasync(acb.fd)
    except OSError as e:
        return -(e.errno or errno.EIO)
    return 0


def _handle_aiocb_discard(acb: _RawAIOCB) -> int:
    # Port of handle_aiocb_discard.
    s = acb.s
    if not s.has_discard:
        return -errno.ENOTSUP
    if s.is_blockdev:
        try:
            fcntl.ioctl(acb.fd, _BLKDISCARD, struct.pack("QQ", acb.offset, acb.nbytes))
            return 0
        except OSError as e:
            ret = -(e.errno or errno.EIO)
            if e.errno in (errno.ENODEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTTY):
                ret = -errno.ENOTSUP
    else:
        ret = _do_fallocate(acb.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                            acb.offset, acb.nbytes)
    if ret == -errno.ENOTSUP:
        s.has_discard = False
    return ret


def _handle_aiocb_write_zeroes(acb: _RawAIOCB) -> int:
    # Port of handle_aiocb_write_zeroes.
    s = acb.s
    if s.is_blockdev:
        if s.has_write_zeroes:
            ret = _do_fallocate(acb.fd, _FALLOC_FL_ZERO_RANGE, acb.offset, acb.nbytes)
            if ret == 0 or ret != -errno.ENOTSUP:
                return ret
        if acb.flags & BDRV_REQ_NO_FALLBACK:
            # BLKZEROOUT may write zeros the slow way: not allowed here.
            return -errno.ENOTSUP
        try:
            fcntl.ioctl(acb.fd, _BLKZEROOUT, struct.pack("QQ", acb.offset, acb.nbytes))
            return 0
        except OSError as e:
            if e.errno in (errno.ENODEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTTY):
                s.has_write_zeroes = False
                return -errno.ENOTSUP
            return -(e.errno or errno.EIO)
    if s.has_write_zeroes:
        ret = _do_fallocate(acb.fd, _FALLOC_FL_ZERO_RANGE, acb.offset, acb.nbytes)
        if ret == -errno.ENOTSUP:
            s.has_write_zeroes = False
        elif ret == 0 or ret != -errno.EINVAL:
            return ret
        # EINVAL: some file systems dislike unaligned ranges despite the man
        # page; try the other ways (QEMU does the same).
    if s.has_discard and s.has_fallocate:
        ret = _do_fallocate(acb.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                            acb.offset, acb.nbytes)
        if ret == 0:
            # Reallocate the punched range so it stays allocated.
            ret = _do_fallocate(acb.fd, 0, acb.offset, acb.nbytes)
            if ret == 0 or ret != -errno.ENOTSUP:
                return ret
            s.has_fallocate = False
        elif ret == -errno.EINVAL:
            return -errno.ENOTSUP  # let the generic layer write zeros
        elif ret != -errno.ENOTSUP:
            return ret
        else:
            s.has_discard = False
    return -errno.ENOTSUP


def _handle_aiocb_write_zeroes_unmap(acb: _RawAIOCB) -> int:
    # Port of handle_aiocb_write_zeroes_unmap: punching a hole both zeroes
    # and deallocates; fall back to plain write-zeroes otherwise.
    s = acb.s
    if not s.is_blockdev:
        ret = _do_fallocate(acb.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                            acb.offset, acb.nbytes)
        if ret not in (-errno.ENOTSUP, -errno.EINVAL):
            return ret
    return _handle_aiocb_write_zeroes(acb)


def _handle_aiocb_truncate(acb: _RawAIOCB) -> int:
    # Port of handle_aiocb_truncate.
    fd, offset = acb.fd, acb.offset
    try:
        cur = os.fstat(fd).st_size
        if acb.prealloc == PREALLOC_MODE_FALLOC and offset > cur:
            os.posix_fallocate(fd, cur, offset - cur)
        elif acb.prealloc == PREALLOC_MODE_FULL and offset > cur:
            os.ftruncate(fd, offset)
            chunk = bytes(min(1 << 20, offset - cur))
            pos = cur
            while pos < offset:
                k = min(len(chunk), offset - pos)
                n = os.pwrite(fd, chunk[:k], pos)
                if n <= 0:
                    return -errno.ENOSPC
                pos += n
        os.ftruncate(fd, offset)
    except OSError as e:
        return -(e.errno or errno.EIO)
    return 0


# --------------------------------------------------------------------------
# Alignment probe

def _is_io_aligned(fd: int, view: memoryview) -> bool:
    # Port of raw_is_io_aligned: only EINVAL means "misaligned".
    try:
        os.preadv(fd, [view], 0)
    except OSError as e:
        return e.errno != errno.EINVAL
    return True


def raw_probe_alignment(bs: BlockDriverState, fd: int) -> None:
    """Port of ``raw_probe_alignment``: set ``bs.bl.request_alignment`` and
    the driver's buffer alignment for O_DIRECT.  Raises OSError(EINVAL) when
    no alignment works (QEMU: "Could not find working O_DIRECT alignment")."""
    s: BDRVRawState = bs.opaque
    if not s.needs_alignment:
        bs.bl.request_alignment = 1
        s.buf_align = 1
        return
    bs.bl.request_alignment = 0
    s.buf_align = 0
    if s.is_blockdev:
        # The logical block size, when the device tells it.
        try:
            b = fcntl.ioctl(fd, _BLKSSZGET, struct.pack("i", 0))
            sz = struct.unpack("i", b)[0]
            if sz > 0:
                bs.bl.request_alignment = sz
        except OSError:
            pass
    max_align = max(_MAX_BLOCKSIZE, PAGE_SIZE)
    buf = qemu_memalign(max_align, 2 * max_align)
    try:
        mv = memoryview(buf).cast("B")
        if not bs.bl.request_alignment:
            for align in (1, 512, 1024, 2048, 4096):
                if _is_io_aligned(fd, mv[:align]):
                    bs.bl.request_alignment = align if align != 1 else max_align
                    break
        if not s.buf_align:
            for align in (1, 512, 1024, 2048, 4096):
                if _is_io_aligned(fd, mv[align:align + max_align]):
                    s.buf_align = align if align != 1 else bs.bl.request_alignment
                    break
        mv.release()
    finally:
        qemu_vfree(buf)
    if not s.buf_align or not bs.bl.request_alignment:
        raise OSError(errno.EINVAL, f"Could not find working O_DIRECT alignment for "
                                    f"'{s.filename}'; try cache.direct=off", s.filename)


# --------------------------------------------------------------------------
# Driver callbacks

_RUNTIME_OPTS = ("filename", "aio")


def raw_open(bs: BlockDriverState, options: dict, flags: int) -> int:
    """Port of ``raw_open`` / ``raw_open_common``."""
    s = BDRVRawState()
    bs.opaque = s
    filename = options.pop("filename", None)
    if not isinstance(filename, str) or not filename:
        raise ValueError("The 'file' block driver requires a file name (option 'filename')")
    s.filename = filename
    default = "native" if flags & BDRV_O_NATIVE_AIO else (
        "io_uring" if flags & BDRV_O_IO_URING else "threads")
    aio = options.pop("aio", default)
    if aio not in ("threads", "native", "io_uring"):
        raise ValueError(f"Parameter 'aio' does not accept value {aio!r} "
                         f"(expected 'threads', 'native' or 'io_uring')")
    s.aio = aio
    if aio == "native" and not (flags & BDRV_O_NOCACHE):
        raise ValueError("aio=native was specified, but it requires cache.direct=on, "
                         "which was not specified.")
    engine = None
    if aio != "threads":
        engine = _load_engine(aio)
        try:
            s.aio_state = engine.setup(bdrv_get_aio_context(bs))
        except (OSError, RuntimeError) as e:
            what = "native AIO" if aio == "native" else "io_uring"
            raise ValueError(f"Unable to use {what}: {e}") from e
    s.engine = engine

    oflags = os.O_CLOEXEC | (os.O_RDWR if flags & BDRV_O_RDWR else os.O_RDONLY)
    if flags & BDRV_O_NOCACHE:
        if not hasattr(os, "O_DIRECT"):
            raise ValueError("cache.direct=on is not supported on this platform")
        oflags |= os.O_DIRECT
    s.open_flags = oflags
    try:
        fd = os.open(filename, oflags)
    except OSError as e:
        msg = f"Could not open '{filename}': {os.strerror(e.errno or errno.EIO)}"
        if e.errno == errno.EINVAL and oflags & getattr(os, "O_DIRECT", 0):
            msg += (" (cache.direct=on needs O_DIRECT, which this file system refuses;"
                    " use cache.direct=off)")
        raise type(e)(e.errno, msg, filename) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            s.is_blockdev = True
            bs.has_variable_length = True  # QEMU's host_device asks every time
        elif not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"'{filename}' is not a regular file or block device",
                          filename)
        s.needs_alignment = bool(oflags & getattr(os, "O_DIRECT", 0))
        s.try_nowait = engine is None and not s.needs_alignment and _RWF_NOWAIT != 0
        s.fd = fd
    except BaseException:
        os.close(fd)
        raise
    bs.supported_zero_flags = BDRV_REQ_MAY_UNMAP | BDRV_REQ_NO_FALLBACK
    return 0


def raw_close(bs: BlockDriverState) -> None:
    """Port of ``raw_close``."""
    s: BDRVRawState = bs.opaque
    if s is not None and s.fd >= 0:
        fd, s.fd = s.fd, -1
        os.close(fd)


def raw_refresh_limits(bs: BlockDriverState) -> None:
    """Port of ``raw_refresh_limits``."""
    s: BDRVRawState = bs.opaque
    raw_probe_alignment(bs, s.fd)
    bs.bl.min_mem_alignment = s.buf_align
    bs.bl.opt_mem_alignment = max(s.buf_align, PAGE_SIZE)
    bs.bl.max_transfer = _MAX_TRANSFER


def raw_getlength(bs: BlockDriverState) -> int:
    """Port of ``raw_getlength``."""
    s: BDRVRawState = bs.opaque
    try:
        if s.is_blockdev:
            return os.lseek(s.fd, 0, os.SEEK_END)
        return os.fstat(s.fd).st_size
    except OSError as e:
        return -(e.errno or errno.EIO)


def _read_nowait(s: BDRVRawState, offset: int, qiov: QEMUIOVector) -> bool:
    """Serve a buffered read from the page cache in the calling thread.

    Not in QEMU, whose thread pool takes every request.  Under the GIL a
    hand-off to a worker and back costs tens of microseconds, while a read
    the page cache can serve takes a few; ``preadv2(RWF_NOWAIT)`` serves it
    only if it can do so without blocking.  True when the whole request was
    read; False when it would block, was short (end of file, or partly
    cached) or failed -- then the pool does the request as always, so
    every result and error is the pool's.
    """
    try:
        n = _os_preadv(s.fd, qiov._views, offset, _RWF_NOWAIT)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            s.try_nowait = False  # never supported here: stop trying
        return False
    return n == qiov.size


# Returned by raw_aio_preadv for a request it completed in place: it can be
# neither cancelled nor waited for any more (no reference left).
_done_aiocb = BlockAIOCB(AIOCBInfo(BlockAIOCB, None, None, "raw-nowait"), None, None, None)
_done_aiocb.refcnt = 0


def _raw_co_prw(bs: BlockDriverState, offset: int, bytes: int, qiov: QEMUIOVector,
                type: int) -> int:
    # Port of raw_co_prw.
    s: BDRVRawState = bs.opaque
    if s.fd < 0:
        return -errno.EBADF
    if s.try_nowait and type == QEMU_AIO_READ and qiov.niov <= _IOV_MAX \
            and _read_nowait(s, offset, qiov):
        return 0
    misaligned = s.needs_alignment and not bdrv_qiov_is_aligned(bs, qiov)
    if not misaligned and s.engine is not None:
        return s.engine.co_submit(bs, s.aio_state, s.fd, offset, qiov, type)
    acb = _RawAIOCB(s, offset, bytes, type)
    acb.views = qiov.views
    if misaligned or qiov.niov > _IOV_MAX:
        acb.bounce_align = max(s.buf_align, PAGE_SIZE)
    return _pool_submit(bs, _handle_aiocb_rw, acb)


def _make_raw_co_prw(type: int, name: str, doc: str) -> Callable[..., int]:
    # raw_co_preadv / raw_co_pwritev: _raw_co_prw with ``type`` bound in a
    # closure and its engine case inline -- one Python call per request
    # between the generic layer and the engine.
    def raw_co_prw(bs: BlockDriverState, offset: int, bytes: int, qiov: QEMUIOVector,
                   flags: int) -> int:
        s: BDRVRawState = bs.opaque
        if s.fd >= 0:
            # bdrv_qiov_is_aligned, from the vector's own record of its
            # alignment (QEMUIOVector._mem_align).
            if not s.needs_alignment or qiov._mem_align >= bs.bl.min_mem_alignment:
                engine = s.engine
                if engine is not None:
                    if s.aio_state is not None:
                        return engine.co_submit_direct(bs, s.aio_state, s.fd, offset, qiov, type)
                elif not (s.try_nowait and type == QEMU_AIO_READ) and qiov.niov <= _IOV_MAX:
                    # The pool, without a bounce buffer (_raw_co_prw's last case).
                    acb = _RawAIOCB(s, offset, bytes, type)
                    acb.views = qiov.views
                    return thread_pool_submit_co(aio_get_thread_pool(bs.aio_context),
                                                 _handle_aiocb_rw, acb)
        return _raw_co_prw(bs, offset, bytes, qiov, type)

    raw_co_prw.__name__ = raw_co_prw.__qualname__ = name
    raw_co_prw.__doc__ = doc
    return raw_co_prw


raw_co_preadv = _make_raw_co_prw(QEMU_AIO_READ, "raw_co_preadv", "Port of ``raw_co_preadv``.")
raw_co_pwritev = _make_raw_co_prw(QEMU_AIO_WRITE, "raw_co_pwritev", "Port of ``raw_co_pwritev``.")


def _raw_aio_pool(bs: BlockDriverState, s: BDRVRawState, offset: int, qiov: QEMUIOVector,
                  type: int, cb: Any, opaque: Any) -> Optional[BlockAIOCB]:
    # raw_aio_preadv/pwritev on the thread pool.
    if qiov.niov > _IOV_MAX:
        return None
    acb = _RawAIOCB(s, offset, qiov.size, type)
    acb.views = qiov.views
    return thread_pool_submit_aio(aio_get_thread_pool(bs.aio_context), _handle_aiocb_rw,
                                  acb, cb, opaque)


def _make_raw_aio_prw(type: int, name: str, doc: str) -> Callable[..., Optional[BlockAIOCB]]:
    # raw_aio_preadv / raw_aio_pwritev: one body, ``type`` bound in a
    # closure (one Python call per request; functools.partial would add its
    # own call, a wrapper function a second frame).
    def raw_aio_prw(bs: BlockDriverState, offset: int, bytes: int, qiov: QEMUIOVector,
                    flags: int, cb: Any, opaque: Any) -> Optional[BlockAIOCB]:
        s: BDRVRawState = bs.opaque
        if s.fd < 0:
            return None
        # bdrv_qiov_is_aligned, from the vector's own record of its alignment.
        if s.needs_alignment and qiov._mem_align < bs.bl.min_mem_alignment:
            return None
        engine = s.engine
        if engine is None:
            if (type == QEMU_AIO_READ and s.try_nowait and qiov.niov <= _IOV_MAX
                    and _read_nowait(s, offset, qiov)):
                cb(opaque, 0)  # the generic layer delivers it after we return
                return _done_aiocb
            return _raw_aio_pool(bs, s, offset, qiov, type, cb, opaque)
        state = s.aio_state
        if state is None:
            return None
        return engine.submit(bs, state, s.fd, offset, qiov, type, cb, opaque)

    raw_aio_prw.__name__ = raw_aio_prw.__qualname__ = name
    raw_aio_prw.__doc__ = doc
    return raw_aio_prw


raw_aio_preadv = _make_raw_aio_prw(QEMU_AIO_READ, "raw_aio_preadv", """\
The callback form of :func:`raw_co_preadv` (QEMU's file driver has none),
for the generic layer's direct path: the same engine choice, without a
coroutine.  Returns None for a request that needs a bounce buffer, which the
coroutine path then handles.""")
raw_aio_pwritev = _make_raw_aio_prw(QEMU_AIO_WRITE, "raw_aio_pwritev", """\
The write twin of :func:`raw_aio_preadv`.""")


def raw_co_flush_to_disk(bs: BlockDriverState) -> int:
    """Port of ``raw_co_flush_to_disk``: fdatasync (io_uring does it itself)."""
    s: BDRVRawState = bs.opaque
    if s.fd < 0:
        return -errno.EBADF
    if s.engine is not None and s.engine.flush:
        return s.engine.co_submit(bs, s.aio_state, s.fd, 0, None, QEMU_AIO_FLUSH)
    return _pool_submit(bs, _handle_aiocb_flush, _RawAIOCB(s, 0, 0, QEMU_AIO_FLUSH))


def raw_co_pdiscard(bs: BlockDriverState, offset: int, bytes: int) -> int:
    """Port of ``raw_co_pdiscard``."""
    s: BDRVRawState = bs.opaque
    return _pool_submit(bs, _handle_aiocb_discard, _RawAIOCB(s, offset, bytes, 0))


def raw_co_pwrite_zeroes(bs: BlockDriverState, offset: int, bytes: int, flags: int) -> int:
    """Port of ``raw_co_pwrite_zeroes`` / ``raw_do_pwrite_zeroes``."""
    s: BDRVRawState = bs.opaque
    acb = _RawAIOCB(s, offset, bytes, 0)
    acb.flags = flags
    func = _handle_aiocb_write_zeroes_unmap if flags & BDRV_REQ_MAY_UNMAP else _handle_aiocb_write_zeroes
    return _pool_submit(bs, func, acb)


def raw_co_truncate(bs: BlockDriverState, offset: int, exact: bool, prealloc: int,
                    flags: int) -> int:
    """Port of ``raw_co_truncate``.  Block devices cannot grow (-EINVAL) and
    with ``exact`` cannot change size (-ENOTSUP)."""
    s: BDRVRawState = bs.opaque
    if prealloc not in (PREALLOC_MODE_OFF, PREALLOC_MODE_FALLOC, PREALLOC_MODE_FULL):
        return -errno.ENOTSUP
    if s.is_blockdev:
        cur = raw_getlength(bs)
        if cur < 0:
            return cur
        if offset > cur:
            return -errno.EINVAL
        if exact and offset != cur:
            return -errno.ENOTSUP
        return 0
    acb = _RawAIOCB(s, offset, 0, 0)
    acb.prealloc = prealloc
    return _pool_submit(bs, _handle_aiocb_truncate, acb)


def raw_io_plug(bs: BlockDriverState) -> None:
    """Port of ``raw_aio_plug``."""
    s: BDRVRawState = bs.opaque
    if s.engine is not None:
        s.engine.plug(bs, s.aio_state)


def raw_io_unplug(bs: BlockDriverState) -> None:
    """Port of ``raw_aio_unplug``."""
    s: BDRVRawState = bs.opaque
    if s.engine is not None:
        s.engine.unplug(bs, s.aio_state)


def _engine_setup_in_home(engine: _Engine, ctx: AioContext) -> Any:
    # The engine registers its eventfd with the context, and fd handlers
    # belong to the context's home thread: when an iothread runs the
    # context, the setup runs there (QEMU's aio_set_fd_handler takes a lock
    # instead).  A context that has its engine already is just asked for it.
    state = getattr(ctx, engine.ctx_attr, None)
    if state is not None or not _context_has_other_home(ctx):
        return engine.setup(ctx)
    box: list = []

    def in_home(_: Any) -> None:
        # An exception must not escape into the iothread's event loop.
        try:
            box.append(engine.setup(ctx))
        except BaseException as e:  # noqa: BLE001 - re-raised by the caller
            box.append(e)

    aio_wait_bh_oneshot(ctx, in_home, None)
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def raw_aio_detach_aio_context(bs: BlockDriverState) -> None:
    """Port of ``raw_aio_detach_aio_context``: let go of the old context's
    engine.  The engine stays with its context (which frees it), so there is
    nothing to unregister; the device is drained, so nothing is in flight."""
    s: BDRVRawState = bs.opaque
    s.aio_state = None


def raw_aio_attach_aio_context(bs: BlockDriverState, new_context: AioContext) -> None:
    """Port of ``raw_aio_attach_aio_context``: use ``new_context``'s Linux
    AIO or io_uring engine (``aio_setup_linux_aio`` /
    ``aio_setup_linux_io_uring``), made in its home thread if needed.  As in
    QEMU, an engine that cannot be set up there is reported and the device
    falls back to the thread pool.  The ``threads`` engine needs nothing:
    requests always use the pool of the device's current context."""
    s: BDRVRawState = bs.opaque
    if s.engine is None:
        return
    try:
        s.aio_state = _engine_setup_in_home(s.engine, new_context)
    except (OSError, RuntimeError) as e:
        what = "native AIO" if s.engine.name == "native" else "linux io_uring"
        log.error("Unable to use %s, falling back to thread pool: %s", what, e)
        s.engine = None
        s.aio_state = None
        s.try_nowait = not s.needs_alignment and _RWF_NOWAIT != 0


# --------------------------------------------------------------------------
# Block status

def _find_allocation(fd: int, start: int) -> tuple[int, int, int]:
    """Port of ``find_allocation``: ``(0, data, hole)`` where ``start`` is
    in data up to ``hole`` (``data == start``) or in a hole up to ``data``
    (``hole == start``); or ``(-errno, 0, 0)``: ``-ENXIO`` means a hole up
    to the end of the file, ``-EBUSY`` that lseek contradicted itself.

    SEEK_DATA from ``start`` gives the next data at or after it: beyond
    ``start`` means we are in a hole; at ``start`` we are in data and
    SEEK_HOLE finds where it ends (every file ends with an implicit hole).
    """
    try:
        offs = os.lseek(fd, start, os.SEEK_DATA)
    except OSError as e:
        return -(e.errno or errno.EIO), 0, 0
    if offs < start:
        return -errno.EIO, 0, 0  # a broken file system
    if offs > start:
        return 0, offs, start
    try:
        offs = os.lseek(fd, start, os.SEEK_HOLE)
    except OSError as e:
        return -(e.errno or errno.EIO), 0, 0
    if offs < start:
        return -errno.EIO, 0, 0
    if offs > start:
        return 0, start, offs
    # Data and a hole at the same offset: the file changed between the two
    # calls.
    return -errno.EBUSY, 0, 0


def raw_co_block_status(bs: BlockDriverState, want_zero: bool, offset: int,
                        bytes: int) -> tuple[int, int, int, BlockDriverState]:
    """Port of ``raw_co_block_status``: holes are ``ZERO``, the rest
    ``DATA``, always at the same offset of this file (``OFFSET_VALID``).
    Without ``want_zero`` (an allocation query) everything is data, without
    a syscall."""
    s: BDRVRawState = bs.opaque
    if s.fd < 0:
        return -errno.EBADF, 0, 0, bs
    if not want_zero:
        return BDRV_BLOCK_DATA | BDRV_BLOCK_OFFSET_VALID, bytes, offset, bs
    # lseek is a metadata lookup, cheap enough for the event loop (QEMU
    # calls it in the coroutine too).
    ret, data, hole = _find_allocation(s.fd, offset)
    if ret == -errno.ENXIO:
        # A hole up to the end of the file.
        pnum, ret = bytes, BDRV_BLOCK_ZERO
    elif ret < 0:
        # No information (no SEEK_DATA here, or lseek failed): say data,
        # which is never wrong.
        pnum, ret = bytes, BDRV_BLOCK_DATA
    elif data == offset:
        # In data up to the next hole, which may be the end of the file in
        # the middle of a block: answers are whole blocks, so round up.
        pnum = hole - offset
        align = bs.bl.request_alignment
        if pnum % align:
            pnum += align - pnum % align
        ret = BDRV_BLOCK_DATA
    else:
        pnum = data - offset
        ret = BDRV_BLOCK_ZERO
    return ret | BDRV_BLOCK_OFFSET_VALID, pnum, offset, bs


bdrv_file = BlockDriver(
    format_name="file",
    protocol_name="file",
    runtime_opts=_RUNTIME_OPTS,
    bdrv_file_open=raw_open,
    bdrv_close=raw_close,
    bdrv_refresh_limits=raw_refresh_limits,
    bdrv_getlength=raw_getlength,
    bdrv_co_preadv=raw_co_preadv,
    bdrv_co_pwritev=raw_co_pwritev,
    bdrv_aio_preadv=raw_aio_preadv,
    bdrv_aio_pwritev=raw_aio_pwritev,
    bdrv_co_flush_to_disk=raw_co_flush_to_disk,
    bdrv_co_pdiscard=raw_co_pdiscard,
    bdrv_co_pwrite_zeroes=raw_co_pwrite_zeroes,
    bdrv_co_truncate=raw_co_truncate,
    bdrv_io_plug=raw_io_plug,
    bdrv_io_unplug=raw_io_unplug,
    bdrv_attach_aio_context=raw_aio_attach_aio_context,
    bdrv_detach_aio_context=raw_aio_detach_aio_context,
    bdrv_co_block_status=raw_co_block_status,
)
bdrv_register(bdrv_file)
