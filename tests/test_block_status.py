# SPDX-License-Identifier: GPL-2.0-or-later
"""Block status (port of QEMU's ``bdrv_co_block_status`` in block/io.c and
the drivers' ``bdrv_co_block_status`` callbacks).

The file driver answers from ``lseek(SEEK_DATA/SEEK_HOLE)``: on a sparse
file holes are ``ZERO``, the rest ``DATA``, and both are allocated;
``null-co`` is zeros with ``read-zeroes`` and unallocated without; blkdebug
asks its image; a driver without the callback is all data.  Flag values are
QEMU's.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest

import pyaioctx as q
from pyaioctx.block import (
    BDRV_BLOCK_ALLOCATED,
    BDRV_BLOCK_DATA,
    BDRV_BLOCK_EOF,
    BDRV_BLOCK_OFFSET_VALID,
    BDRV_BLOCK_RAW,
    BDRV_BLOCK_RECURSE,
    BDRV_BLOCK_ZERO,
    BDRV_O_RDWR,
    BlockDriver,
    bdrv_block_status,
    bdrv_co_block_status,
    bdrv_is_allocated,
    bdrv_open,
    bdrv_pdiscard,
    bdrv_register,
    bdrv_unref,
    bdrv_unregister,
)
from test_block_fixtures import AioBackend, aio_backend, open_image  # noqa: F401

MIB = 1 << 20
DATA_ALLOC = BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED | BDRV_BLOCK_OFFSET_VALID
ZERO_ALLOC = BDRV_BLOCK_ZERO | BDRV_BLOCK_ALLOCATED | BDRV_BLOCK_OFFSET_VALID


def test_flag_values_are_qemus() -> None:
    assert (BDRV_BLOCK_DATA, BDRV_BLOCK_ZERO, BDRV_BLOCK_OFFSET_VALID, BDRV_BLOCK_RAW,
            BDRV_BLOCK_ALLOCATED, BDRV_BLOCK_EOF, BDRV_BLOCK_RECURSE) == \
        (0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40)
    assert q.BDRV_BLOCK_DATA == 1 and q.bdrv_block_status is bdrv_block_status


def make_sparse(path: os.PathLike) -> list[tuple[int, int]]:
    """A 4 MiB file with data at [64k, 128k) and [2M, 2M+8k); holes elsewhere.
    Returns the data ranges."""
    with open(path, "wb") as f:
        f.truncate(4 * MIB)
        f.seek(64 * 1024)
        f.write(b"\x11" * 65536)
        f.seek(2 * MIB)
        f.write(b"\x22" * 8192)
    return [(65536, 65536), (2 * MIB, 8192)]


def holes_supported(path: os.PathLike) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_DATA) == 65536
    except OSError:
        return False
    finally:
        os.close(fd)


def walk(bs: Any, want_zero: bool = True) -> list[tuple[int, int, int]]:
    """(offset, pnum, flags) for the whole device, one query per extent."""
    out = []
    length = q.bdrv_getlength(bs)
    off = 0

    def co(_: Any) -> None:
        nonlocal off
        while off < length:
            ret, pnum, map, file = bdrv_co_block_status(bs, want_zero, off, length - off)
            assert ret >= 0 and pnum > 0
            if ret & BDRV_BLOCK_OFFSET_VALID:
                assert map == off and file is not None
            out.append((off, pnum, ret))
            off += pnum

    q.qemu_coroutine_enter(q.qemu_coroutine_create(co, None))
    q.aio_wait_while(q.qemu_get_aio_context(), lambda: off < length)
    return out


def test_file_sparse_map(aio_backend: AioBackend, disk_dir) -> None:
    """Every I/O backend answers the same: holes are ZERO, data is DATA, both
    allocated, at the same offset of the file; the last extent has EOF."""
    q.qemu_init_main_loop()
    img = disk_dir / "sparse.img"
    make_sparse(img)
    if not holes_supported(img):
        pytest.skip("this file system does not report holes through SEEK_DATA")
    bs = open_image(img, aio_backend)
    try:
        assert walk(bs) == [
            (0, 65536, ZERO_ALLOC),
            (65536, 65536, DATA_ALLOC),
            (131072, 2 * MIB - 131072, ZERO_ALLOC),
            (2 * MIB, 8192, DATA_ALLOC),
            (2 * MIB + 8192, 2 * MIB - 8192, ZERO_ALLOC | BDRV_BLOCK_EOF),
        ]
        # An allocation query does not look for holes: all data.
        assert walk(bs, want_zero=False) == [(0, 4 * MIB, DATA_ALLOC | BDRV_BLOCK_EOF)]
        assert bdrv_is_allocated(bs, 0, 4 * MIB) == (1, 4 * MIB)
        # Queries inside an extent stop at the caller's range or the extent's end.
        assert bdrv_block_status(bs, 70000, 1000)[:3] == (DATA_ALLOC, 1000, 70000)
        assert bdrv_block_status(bs, 100, 1 << 30)[:3] == (ZERO_ALLOC, 65436, 100)
    finally:
        bdrv_unref(bs)


def test_file_discard_makes_hole(disk_dir) -> None:
    q.qemu_init_main_loop()
    img = disk_dir / "sparse.img"
    make_sparse(img)
    if not holes_supported(img):
        pytest.skip("this file system does not report holes through SEEK_DATA")
    with bdrv_open(str(img), {"discard": "unmap"}, BDRV_O_RDWR) as bs:
        assert bs.block_status(65536, 4096)[0] == DATA_ALLOC
        assert bdrv_pdiscard(bs, 65536, 65536) == 0
        assert bs.block_status(0, 4 * MIB)[:2] == (ZERO_ALLOC, 2 * MIB)
        bs.write(0, b"x" * 4096)
        assert bs.block_status(0, 4 * MIB)[0] == DATA_ALLOC


def test_file_unaligned_eof(disk_dir) -> None:
    """Data ending mid-block at the end of the file: with O_DIRECT answers
    are whole blocks, cut back to the device's length, with EOF."""
    q.qemu_init_main_loop()
    img = disk_dir / "odd.img"
    img.write_bytes(b"\x01" * 5000)
    with bdrv_open(str(img), {"cache.direct": True}, 0) as bs:
        ret, pnum, map, file = bdrv_block_status(bs, 0, 1 << 20)
        assert (ret, pnum, map, file) == (DATA_ALLOC | BDRV_BLOCK_EOF, 5000, 0, bs)
        ret, pnum, _, _ = bdrv_block_status(bs, 4500, 100)
        assert (ret, pnum) == (DATA_ALLOC, 100)


def test_bounds_and_errors(disk_dir) -> None:
    q.qemu_init_main_loop()
    img = disk_dir / "d.img"
    img.write_bytes(b"\x01" * 8192)
    bs = bdrv_open(str(img), {}, 0)
    assert bdrv_block_status(bs, 8192, 512) == (BDRV_BLOCK_EOF, 0, 0, None)
    assert bdrv_block_status(bs, 1 << 40, 512)[:2] == (BDRV_BLOCK_EOF, 0)
    assert bdrv_block_status(bs, 0, 0) == (0, 0, 0, None)
    assert bdrv_block_status(bs, -1, 512)[0] == -errno.EINVAL
    assert bdrv_block_status(bs, 0, -1)[0] == -errno.EINVAL
    with pytest.raises(TypeError, match="offset"):
        bdrv_block_status(bs, "0", 512)  # type: ignore[arg-type]
    with pytest.raises(q.NotInCoroutineError):
        bdrv_co_block_status(bs, True, 0, 512)
    bdrv_unref(bs)
    assert bdrv_block_status(bs, 0, 512)[0] == -errno.ENOMEDIUM
    with pytest.raises(OSError):
        bs.block_status(0, 512)


@pytest.mark.parametrize("driver", ["null-co", "null-aio"])
def test_null(driver: str) -> None:
    """QEMU's null_co_block_status: ZERO with read-zeroes, otherwise neither
    data nor zero -- not allocated."""
    q.qemu_init_main_loop()
    with bdrv_open(None, {"driver": driver, "size": MIB}, 0) as bs:
        assert bdrv_block_status(bs, 0, 2 * MIB)[:3] == (BDRV_BLOCK_OFFSET_VALID | BDRV_BLOCK_EOF,
                                                         MIB, 0)
        assert bdrv_is_allocated(bs, 4096, 4096) == (0, 4096)
    with bdrv_open(None, {"driver": driver, "size": MIB, "read-zeroes": True}, 0) as bs:
        assert bdrv_block_status(bs, 4096, 4096)[:3] == (ZERO_ALLOC, 4096, 4096)
        assert bdrv_is_allocated(bs, 0, MIB) == (1, MIB)


def test_blkdebug_passes_through(disk_dir) -> None:
    q.qemu_init_main_loop()
    img = disk_dir / "sparse.img"
    make_sparse(img)
    if not holes_supported(img):
        pytest.skip("this file system does not report holes through SEEK_DATA")
    bs = bdrv_open(None, {"driver": "blkdebug", "image": {"driver": "file", "filename": str(img)},
                          "inject-error": [{"event": "read_aio", "iotype": "block-status",
                                            "errno": "EIO", "once": True},
                                           {"event": "read_aio", "iotype": "read", "errno": 5}]},
                   0)
    try:
        assert bdrv_block_status(bs, 0, MIB)[0] == -errno.EIO  # the block-status rule, once
        ret, pnum, map, file = bdrv_block_status(bs, 0, MIB)
        assert (ret, pnum, map, file) == (ZERO_ALLOC, 65536, 0, bs.file)
        assert bdrv_block_status(bs, 65536, MIB)[:2] == (DATA_ALLOC, 65536)
        assert bs.file is not None and walk(bs) == walk(bs.file)
        assert bdrv_is_allocated(bs, 0, MIB) == (1, MIB)  # read rules do not apply
    finally:
        bdrv_unref(bs)


def _ram_driver(name: str, block_status: Any = None, protocol: bool = False) -> BlockDriver:
    def open_(bs: Any, options: dict, flags: int) -> int:
        bs.opaque = bytearray(options.pop("size", 65536))
        return 0

    return BlockDriver(format_name=name, protocol_name=name if protocol else None,
                       bdrv_open=open_, bdrv_getlength=lambda bs: len(bs.opaque),
                       bdrv_co_preadv=lambda bs, o, n, qiov, f: 0,
                       bdrv_co_block_status=block_status)


def test_driver_without_callback_is_data() -> None:
    """QEMU's default: DATA|ALLOCATED for the whole range (OFFSET_VALID only
    for protocol drivers)."""
    q.qemu_init_main_loop()
    for name, protocol in (("bs-ram-fmt", False), ("bs-ram-proto", True)):
        drv = _ram_driver(name, protocol=protocol)
        bdrv_register(drv)
        try:
            with bdrv_open(None, {"driver": name}, 0) as bs:
                ret, pnum, map, file = bdrv_block_status(bs, 100, 1 << 20)
                want = BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED | BDRV_BLOCK_EOF
                if protocol:
                    want |= BDRV_BLOCK_OFFSET_VALID
                assert (ret, pnum, map, file) == (want, 65436, 100, bs)
        finally:
            bdrv_unregister(drv)


def test_user_driver_callback() -> None:
    """A driver's answer: aligned ranges in, pnum cut back to the request,
    ALLOCATED added for DATA/ZERO, nothing for neither; errors pass through;
    a bad pnum is the driver's bug and raises."""
    q.qemu_init_main_loop()
    calls: list = []

    def status(bs: Any, want_zero: bool, offset: int, bytes: int) -> Any:
        calls.append((want_zero, offset, bytes))
        if offset >= 32768:
            return -errno.EIO
        if offset == 8192:
            return 0, 4096, 0, None            # unallocated, e.g. a backing file's part
        if offset == 12288:
            return 1000, 4096, 0, None         # a bad answer: not a multiple of 512 ... below
        return BDRV_BLOCK_DATA, 8192 - offset % 8192, offset, bs

    drv = _ram_driver("bs-ram-cb", status)

    def limits(bs: Any) -> None:
        bs.bl.request_alignment = 512

    drv.bdrv_refresh_limits = limits
    bdrv_register(drv)
    try:
        with bdrv_open(None, {"driver": "bs-ram-cb"}, 0) as bs:
            # Without OFFSET_VALID the map is not adjusted (nor meaningful).
            assert bdrv_block_status(bs, 100, 50)[:2] == (BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED, 50)
            assert calls[-1] == (True, 0, 512)
            assert bdrv_block_status(bs, 1000, 1 << 20)[:2] == \
                (BDRV_BLOCK_DATA | BDRV_BLOCK_ALLOCATED, 8192 - 1000)
            assert bdrv_is_allocated(bs, 8192, 8192) == (0, 4096)
            assert bdrv_block_status(bs, 32768, 512)[0] == -errno.EIO

            def bad(bs: Any, want_zero: bool, offset: int, bytes: int) -> Any:
                return BDRV_BLOCK_DATA, 100, offset, bs
            drv.bdrv_co_block_status = bad
            with pytest.raises(ValueError, match="pnum"):
                bdrv_block_status(bs, 0, 512)
            drv.bdrv_co_block_status = lambda bs, w, o, n: "data"
            with pytest.raises(TypeError, match="bdrv_co_block_status"):
                bdrv_block_status(bs, 0, 512)
    finally:
        bdrv_unregister(drv)
