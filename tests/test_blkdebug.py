# SPDX-License-Identifier: GPL-2.0-or-later
"""The blkdebug driver (block/blkdebug.c): injected errors reach exactly the
requests they target; every other request succeeds."""

from __future__ import annotations

import errno

import pytest

from pyaioctx import QEMUIOVector, aio_poll, qemu_get_aio_context
from pyaioctx.block import (
    BDRV_O_RDWR,
    bdrv_aio_preadv,
    bdrv_flush,
    bdrv_open,
    bdrv_pread,
    bdrv_pwrite,
    bdrv_pwrite_zeroes,
    bdrv_pdiscard,
)
from test_block_fixtures import aio_backend, make_image  # noqa: F401

SIZE = 64 * 1024


def _open(path, backend, rules, **extra):
    opts = {"driver": "blkdebug", "image": backend.options(filename=str(path)),
            "inject-error": rules, **extra}
    return bdrv_open(None, opts, BDRV_O_RDWR)


def test_sector_rule_hits_only_covering_reads(disk_dir, aio_backend):
    path = disk_dir / "img"
    data = make_image(path, SIZE)
    rules = [{"event": "read_aio", "iotype": "read", "errno": errno.EIO, "sector": 10}]
    with _open(path, aio_backend, rules) as bs:
        buf = bytearray(512)
        assert bdrv_pread(bs, 10 * 512, 512, buf) == -errno.EIO
        assert bdrv_pread(bs, 9 * 512, 1024, bytearray(1024)) == -errno.EIO
        assert bdrv_pread(bs, 11 * 512, 512, buf) == 0 and buf == data[11 * 512:12 * 512]
        assert bdrv_pread(bs, 0, 5120, bytearray(5120)) == 0
        assert bdrv_pwrite(bs, 10 * 512, 3, b"abc") == 0  # writes are not targeted
        assert bdrv_flush(bs) == 0
        s = bs.stats()
        assert s.failed_rd_operations == 2 and s.rd_operations == 2


def test_once_and_errno_names(disk_dir, aio_backend):
    path = disk_dir / "img"
    make_image(path, SIZE)
    rules = [{"event": "write_aio", "iotype": "write", "errno": "ENOSPC", "once": True},
             {"event": "flush_to_disk", "iotype": "flush", "errno": 5, "immediately": True}]
    with _open(path, aio_backend, rules) as bs:
        assert bdrv_pwrite(bs, 0, 4, b"abcd") == -errno.ENOSPC
        assert bdrv_pwrite(bs, 0, 4, b"abcd") == 0
        assert bdrv_flush(bs) == -errno.EIO
        assert bdrv_pread(bs, 0, 4, bytearray(4)) == 0


def test_several_rules_same_type_all_active(disk_dir, aio_backend):
    path = disk_dir / "img"
    make_image(path, SIZE)
    rules = [{"event": "read_aio", "iotype": "read", "errno": "EIO", "sector": 1},
             {"event": "read_aio", "iotype": "read", "errno": "ENOMEM", "sector": 100}]
    with _open(path, aio_backend, rules) as bs:
        assert bdrv_pread(bs, 512, 1, bytearray(1)) == -errno.EIO
        assert bdrv_pread(bs, 100 * 512, 1, bytearray(1)) == -errno.ENOMEM
        assert bdrv_pread(bs, 50 * 512, 1, bytearray(1)) == 0


def test_zeroes_and_discard_types(disk_dir, aio_backend):
    path = disk_dir / "img"
    make_image(path, SIZE)
    rules = [{"event": "write_aio", "iotype": "write-zeroes", "errno": "EIO"},
             {"event": "write_aio", "iotype": "discard", "errno": "EROFS"}]
    with _open(path, aio_backend, rules, **{"discard": "unmap"}) as bs:
        assert bdrv_pwrite_zeroes(bs, 0, 4096) == -errno.EIO
        assert bdrv_pdiscard(bs, 0, 4096) == -errno.EROFS
        assert bdrv_pwrite(bs, 0, 1, b"x") == 0


def test_aio_error_delivered_once_after_return(disk_dir, aio_backend):
    path = disk_dir / "img"
    make_image(path, SIZE)
    rules = [{"event": "read_aio", "errno": "EIO", "immediately": True}]
    with _open(path, aio_backend, rules) as bs:
        got = []
        bdrv_aio_preadv(bs, 0, QEMUIOVector(bytearray(512)), 0, lambda o, r: got.append(r), None)
        assert got == []
        while not got:
            aio_poll(qemu_get_aio_context(), True)
        assert got == [-errno.EIO]


def test_probability_and_seed_reproducible(disk_dir, aio_backend):
    path = disk_dir / "img"
    make_image(path, SIZE)
    rules = [{"event": "read_aio", "errno": "EIO", "probability": 0.5, "immediately": True}]
    runs = []
    for _ in range(2):
        with _open(path, aio_backend, rules, seed=1234) as bs:
            runs.append([bdrv_pread(bs, 0, 1, bytearray(1)) for _ in range(40)])
    assert runs[0] == runs[1]
    assert 5 < runs[0].count(-errno.EIO) < 35


def test_align_option_gives_rmw(disk_dir, aio_backend):
    """blkdebug's align makes the generic layer pad and RMW even on buffered
    files; data and image length stay right."""
    path = disk_dir / "img"
    model = bytearray(make_image(path, 10000))
    with _open(path, aio_backend, [], align=4096) as bs:
        assert bs.bl.request_alignment == 4096
        assert bdrv_pwrite(bs, 9990, 10, b"0123456789") == 0
        model[9990:] = b"0123456789"
        assert bdrv_pwrite(bs, 4000, 200, b"y" * 200) == 0
        model[4000:4200] = b"y" * 200
        buf = bytearray(10000)
        assert bdrv_pread(bs, 0, 10000, buf) == 0 and buf == model
    assert path.read_bytes() == model


def test_bad_rules(disk_dir, aio_backend):
    path = disk_dir / "img"
    make_image(path, SIZE)
    for rule, msg in [({"iotype": "read"}, "needs an 'event'"),
                      ({"event": "nope"}, "unknown event 'nope'"),
                      ({"event": "read_aio", "iotype": "sideways"}, "unknown iotype"),
                      ({"event": "read_aio", "errno": "EWHAT"}, "unknown errno name"),
                      ({"event": "read_aio", "colour": 1}, "unknown key 'colour'"),
                      ({"event": "read_aio", "probability": 2}, "probability")]:
        with pytest.raises(ValueError, match=msg):
            _open(path, aio_backend, [rule])
    with pytest.raises(ValueError, match="'image'"):
        bdrv_open(None, {"driver": "blkdebug"})
    with pytest.raises(FileNotFoundError):
        bdrv_open(None, {"driver": "blkdebug", "image": {"driver": "file",
                                                          "filename": str(disk_dir / "missing")}})
