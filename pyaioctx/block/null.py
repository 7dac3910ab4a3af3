# SPDX-License-Identifier: GPL-2.0-or-later
"""The ``null-co`` and ``null-aio`` drivers: port of QEMU's block/null.c.

No data is stored: writes and flushes succeed and are dropped; reads return
zeros only with ``read-zeroes: True`` and otherwise leave the caller's buffer
untouched (QEMU's current default, made for benchmarks where memset would
dominate).  ``null-co`` is a coroutine driver; ``null-aio`` a callback driver
completing through a BH (or a timer when ``latency-ns`` is set), which
exercises the generic layer's callback-driver path.

Options (QEMU's): ``size`` (bytes, default 1 GiB), ``latency-ns`` (default 0),
``read-zeroes`` (default False).  Opened with ``filename=None``.
"""

from __future__ import annotations

from typing import Any

from ..aio import aio_bh_schedule_oneshot, aio_timer_new
from ..aiocb import AIOCBInfo, BlockAIOCB, qemu_aio_get, qemu_aio_unref
from ..coroutine import aio_co_wake, qemu_coroutine_self, qemu_coroutine_yield
from ..iov import QEMUIOVector
from ..timer import QEMU_CLOCK_REALTIME, SCALE_NS, qemu_clock_get_ns, timer_free, timer_mod_ns
from .block import (
    BDRV_BLOCK_OFFSET_VALID,
    BDRV_BLOCK_ZERO,
    BlockDriver,
    BlockDriverState,
    bdrv_get_aio_context,
    bdrv_register,
)

__all__ = ["bdrv_null_co", "bdrv_null_aio", "BDRVNullState", "NULL_DEFAULT_SIZE"]

NULL_DEFAULT_SIZE = 1 << 30
_RUNTIME_OPTS = ("size", "latency-ns", "read-zeroes")


class BDRVNullState:
    """QEMU's ``BDRVNullState``; set at open, read-only afterwards."""

    __slots__ = ("length", "latency_ns", "read_zeroes")

    def __init__(self) -> None:
        self.length = NULL_DEFAULT_SIZE
        self.latency_ns = 0
        self.read_zeroes = False


def _int_opt(options: dict, key: str, default: int) -> int:
    v = options.pop(key, default)
    if isinstance(v, str) and v.isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"Parameter '{key}' expects a non-negative int, got {v!r}")
    return v


def null_open(bs: BlockDriverState, options: dict, flags: int) -> int:
    """Port of ``null_file_open``."""
    s = BDRVNullState()
    s.length = _int_opt(options, "size", NULL_DEFAULT_SIZE)
    s.latency_ns = _int_opt(options, "latency-ns", 0)
    rz = options.pop("read-zeroes", False)
    if isinstance(rz, str) and rz in ("on", "off", "true", "false"):
        rz = rz in ("on", "true")
    if not isinstance(rz, bool):
        raise ValueError(f"Parameter 'read-zeroes' expects a boolean, got {rz!r}")
    s.read_zeroes = rz
    bs.opaque = s
    return 0


def null_getlength(bs: BlockDriverState) -> int:
    """Port of ``null_co_getlength``."""
    return bs.opaque.length


def _null_co_common(bs: BlockDriverState) -> int:
    # QEMU sleeps with qemu_co_sleep_ns in the current context, which there is
    # always the device's; arm the timer on the device's context explicitly
    # so the latency works whichever thread entered the request.
    s: BDRVNullState = bs.opaque
    if s.latency_ns:
        ts = aio_timer_new(bdrv_get_aio_context(bs), QEMU_CLOCK_REALTIME, SCALE_NS,
                           aio_co_wake, qemu_coroutine_self())
        timer_mod_ns(ts, qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + s.latency_ns)
        try:
            qemu_coroutine_yield()
        finally:
            timer_free(ts)
    return 0


def null_co_preadv(bs: BlockDriverState, offset: int, bytes: int, qiov: QEMUIOVector,
                   flags: int) -> int:
    """Port of ``null_co_preadv``."""
    s: BDRVNullState = bs.opaque
    if s.read_zeroes:
        qiov.memset(0, 0, bytes)
    # _null_co_common only when there is a latency to wait for: without one
    # this driver measures the block layer, and a call is a large part of it.
    return _null_co_common(bs) if s.latency_ns else 0


def null_co_pwritev(bs: BlockDriverState, offset: int, bytes: int, qiov: QEMUIOVector,
                    flags: int) -> int:
    """Port of ``null_co_pwritev``."""
    return _null_co_common(bs) if bs.opaque.latency_ns else 0


def null_co_flush(bs: BlockDriverState) -> int:
    """Port of ``null_co_flush``."""
    return _null_co_common(bs)


def null_co_block_status(bs: BlockDriverState, want_zero: bool, offset: int,
                         bytes: int) -> tuple[int, int, int, BlockDriverState]:
    """Port of ``null_co_block_status``: with ``read-zeroes`` the device is
    all zeros; otherwise reads return nothing defined, so -- as in QEMU -- it
    is neither data nor zero, i.e. not allocated."""
    ret = BDRV_BLOCK_OFFSET_VALID
    if bs.opaque.read_zeroes:
        ret |= BDRV_BLOCK_ZERO
    return ret, bytes, offset, bs


class NullAIOCB(BlockAIOCB):
    """QEMU's ``NullAIOCB``."""

    __slots__ = ("timer",)


_null_aiocb_info = AIOCBInfo(NullAIOCB, None, None, "null-aio")


def _null_bh_cb(acb: NullAIOCB) -> None:
    # Port of null_bh_cb.
    try:
        acb.cb(acb.opaque, 0)
    finally:
        qemu_aio_unref(acb)


def _null_timer_cb(acb: NullAIOCB) -> None:
    # Port of null_timer_cb.
    timer_free(acb.timer)
    acb.timer = None
    _null_bh_cb(acb)


def _null_aio_common(bs: BlockDriverState, cb: Any, opaque: Any) -> BlockAIOCB:
    # Port of null_aio_common: complete later, never before returning.
    s: BDRVNullState = bs.opaque
    acb = qemu_aio_get(_null_aiocb_info, bs, cb, opaque)
    acb.timer = None
    ctx = bdrv_get_aio_context(bs)
    if s.latency_ns:
        acb.timer = aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS, _null_timer_cb, acb)
        timer_mod_ns(acb.timer, qemu_clock_get_ns(QEMU_CLOCK_REALTIME) + s.latency_ns)
    else:
        aio_bh_schedule_oneshot(ctx, _null_bh_cb, acb)
    return acb


def null_aio_preadv(bs: BlockDriverState, offset: int, bytes: int, qiov: QEMUIOVector,
                    flags: int, cb: Any, opaque: Any) -> BlockAIOCB:
    """Port of ``null_aio_preadv``."""
    if bs.opaque.read_zeroes:
        qiov.memset(0, 0, bytes)
    return _null_aio_common(bs, cb, opaque)


def null_aio_pwritev(bs: BlockDriverState, offset: int, bytes: int, qiov: QEMUIOVector,
                     flags: int, cb: Any, opaque: Any) -> BlockAIOCB:
    """Port of ``null_aio_pwritev``."""
    return _null_aio_common(bs, cb, opaque)


def null_aio_flush(bs: BlockDriverState, cb: Any, opaque: Any) -> BlockAIOCB:
    """Port of ``null_aio_flush``."""
    return _null_aio_common(bs, cb, opaque)


bdrv_null_co = BlockDriver(
    format_name="null-co",
    protocol_name="null-co",
    runtime_opts=_RUNTIME_OPTS,
    bdrv_file_open=null_open,
    bdrv_getlength=null_getlength,
    bdrv_co_preadv=null_co_preadv,
    bdrv_co_pwritev=null_co_pwritev,
    bdrv_co_flush_to_disk=null_co_flush,
    bdrv_co_block_status=null_co_block_status,
)

bdrv_null_aio = BlockDriver(
    format_name="null-aio",
    protocol_name="null-aio",
    runtime_opts=_RUNTIME_OPTS,
    bdrv_file_open=null_open,
    bdrv_getlength=null_getlength,
    bdrv_aio_preadv=null_aio_preadv,
    bdrv_aio_pwritev=null_aio_pwritev,
    bdrv_aio_flush=null_aio_flush,
    bdrv_co_block_status=null_co_block_status,
)

bdrv_register(bdrv_null_co)
bdrv_register(bdrv_null_aio)
