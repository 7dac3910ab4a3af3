# SPDX-License-Identifier: GPL-2.0-or-later
"""The null-co / null-aio drivers (block/null.c)."""

from __future__ import annotations

import errno
import time

import pytest

from pyaioctx import QEMUIOVector, aio_poll, qemu_get_aio_context
from pyaioctx.block import (
    BDRV_O_RDWR,
    bdrv_aio_preadv,
    bdrv_flush,
    bdrv_getlength,
    bdrv_open,
    bdrv_pread,
    bdrv_pwrite,
)

DRIVERS = ["null-co", "null-aio"]


@pytest.mark.parametrize("drv", DRIVERS)
def test_default_size_and_untouched_reads(drv):
    with bdrv_open(None, {"driver": drv}, BDRV_O_RDWR) as bs:
        assert bdrv_getlength(bs) == 1 << 30
        buf = bytearray(b"\xaa" * 4096)
        assert bdrv_pread(bs, 0, 4096, buf) == 0
        assert buf == b"\xaa" * 4096  # read-zeroes defaults to off
        assert bdrv_pwrite(bs, 123, 3, b"abc") == 0
        assert bdrv_flush(bs) == 0
        assert bdrv_pread(bs, 1 << 30, 1, buf) == -errno.EIO


@pytest.mark.parametrize("drv", DRIVERS)
def test_read_zeroes_and_size(drv):
    with bdrv_open(None, {"driver": drv, "size": 8192, "read-zeroes": True}, BDRV_O_RDWR) as bs:
        assert bdrv_getlength(bs) == 8192
        buf = bytearray(b"\xaa" * 100)
        assert bdrv_pread(bs, 8000, 100, buf) == 0 and buf == bytes(100)
        assert bdrv_pwrite(bs, 8100, 100, bytes(100)) == -errno.EIO


@pytest.mark.parametrize("drv", DRIVERS)
def test_latency(drv):
    with bdrv_open(None, {"driver": drv, "latency-ns": 20_000_000}) as bs:
        t = time.monotonic()
        assert bdrv_pread(bs, 0, 512, bytearray(512)) == 0
        assert time.monotonic() - t >= 0.018


@pytest.mark.parametrize("drv", DRIVERS)
def test_aio_callback_after_return(drv):
    with bdrv_open(None, {"driver": drv, "read-zeroes": True}) as bs:
        got = []
        bdrv_aio_preadv(bs, 0, QEMUIOVector(bytearray(b"x" * 10)), 0, lambda o, r: got.append(r), None)
        assert got == []
        while not got:
            aio_poll(qemu_get_aio_context(), True)
        assert got == [0]


def test_bad_options():
    with pytest.raises(ValueError, match="'size'"):
        bdrv_open(None, {"driver": "null-co", "size": -1})
    with pytest.raises(ValueError, match="'read-zeroes'"):
        bdrv_open(None, {"driver": "null-co", "read-zeroes": 3})
    with pytest.raises(ValueError, match="doesn't support the option 'filename'"):
        bdrv_open("x", {"driver": "null-co"})
