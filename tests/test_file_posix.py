# SPDX-License-Identifier: GPL-2.0-or-later
"""The ``file`` driver (block/file-posix.c): opening, alignment probe,
discard, write-zeroes, truncate, and QEMU's errors."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from pyaioctx.block import (
    BDRV_O_NATIVE_AIO,
    BDRV_O_NOCACHE,
    BDRV_O_RDWR,
    BDRV_REQ_MAY_UNMAP,
    BDRV_REQ_NO_FALLBACK,
    bdrv_getlength,
    bdrv_open,
    bdrv_pdiscard,
    bdrv_pread,
    bdrv_pwrite,
    bdrv_pwrite_zeroes,
    bdrv_truncate,
)
from pyaioctx.block.file_posix import aio_engine_available
from test_block_fixtures import aio_backend, make_image, open_image  # noqa: F401


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_alignment_probe(disk_dir, aio_backend):
    """raw_probe_alignment: O_DIRECT gives a power-of-two alignment >= 512;
    buffered I/O needs none."""
    path = disk_dir / "img"
    make_image(path, 65536)
    with open_image(path, aio_backend) as bs:
        ra, ma = bs.bl.request_alignment, bs.bl.min_mem_alignment
        if aio_backend.direct:
            assert ra in (512, 1024, 2048, 4096) and ma in (512, 1024, 2048, 4096)
        else:
            assert ra == 1 and ma == 1
        assert bs.bl.opt_mem_alignment >= ma


def test_empty_file_direct_probe_is_conservative(disk_dir):
    path = disk_dir / "empty"
    path.write_bytes(b"")
    with bdrv_open(str(path), {"cache.direct": True}, BDRV_O_RDWR) as bs:
        assert bs.bl.request_alignment >= 4096
        assert bdrv_getlength(bs) == 0


def test_native_requires_cache_direct(disk_dir):
    path = disk_dir / "img"
    make_image(path, 4096)
    before = _fds()
    msg = "aio=native was specified, but it requires cache.direct=on, which was not specified."
    with pytest.raises(ValueError) as ei:
        bdrv_open(str(path), {"aio": "native"}, BDRV_O_RDWR)
    assert str(ei.value) == msg
    with pytest.raises(ValueError, match="requires cache.direct=on"):
        bdrv_open(str(path), None, BDRV_O_RDWR | BDRV_O_NATIVE_AIO)
    assert _fds() == before


def test_native_via_flags(disk_dir):
    ok, why = aio_engine_available("native")
    if not ok:
        pytest.skip(why)
    path = disk_dir / "img"
    make_image(path, 4096)
    with bdrv_open(str(path), None, BDRV_O_RDWR | BDRV_O_NATIVE_AIO | BDRV_O_NOCACHE) as bs:
        assert bs.opaque.aio == "native"
        assert bdrv_pwrite(bs, 1, 2, b"ab") == 0


def test_default_is_threads(disk_dir):
    path = disk_dir / "img"
    make_image(path, 4096)
    with bdrv_open(str(path)) as bs:
        assert bs.opaque.aio == "threads" and bs.read_only


def test_bad_aio_value(disk_dir):
    path = disk_dir / "img"
    make_image(path, 4096)
    with pytest.raises(ValueError, match="'aio' does not accept value 'fast'"):
        bdrv_open(str(path), {"aio": "fast"})


def test_io_uring_clear_error_when_unavailable(disk_dir):
    ok, why = aio_engine_available("io_uring")
    if ok:
        pytest.skip("io_uring is available here")
    path = disk_dir / "img"
    make_image(path, 4096)
    before = _fds()
    with pytest.raises(ValueError, match="io_uring"):
        bdrv_open(str(path), {"aio": "io_uring"})
    assert _fds() == before


def test_missing_file_names_path_creates_nothing(disk_dir):
    path = disk_dir / "nope" / "missing.img"
    before = _fds()
    with pytest.raises(FileNotFoundError) as ei:
        bdrv_open(str(path), None, BDRV_O_RDWR)
    assert ei.value.filename == str(path) and str(path) in str(ei.value)
    assert not path.exists() and not path.parent.exists()
    assert _fds() == before


def test_directory_refused_no_fd_left(disk_dir):
    before = _fds()
    with pytest.raises(OSError, match="not a regular file or block device"):
        bdrv_open(str(disk_dir), None, 0)
    assert _fds() == before


def test_o_direct_refused_names_cache_direct():
    """tmpfs refuses O_DIRECT: the error says what to change."""
    shm = "/dev/shm"
    if not os.path.isdir(shm):
        pytest.skip("no /dev/shm")
    out = subprocess.run(["stat", "-f", "-c", "%T", shm], capture_output=True, text=True)
    if "tmpfs" not in out.stdout:
        pytest.skip("/dev/shm is not tmpfs")
    path = os.path.join(shm, f"pyaioctx-direct-{os.getpid()}")
    with open(path, "wb") as f:
        f.write(bytes(4096))
    try:
        before = _fds()
        try:
            bs = bdrv_open(path, {"cache.direct": True}, BDRV_O_RDWR)
        except OSError as e:
            assert e.errno == errno.EINVAL and "cache.direct" in str(e) and e.filename == path
        else:  # newer kernels accept O_DIRECT on tmpfs
            bs.close()
        assert _fds() == before
    finally:
        os.unlink(path)


def test_write_zeroes_discard_truncate(disk_dir, aio_backend):
    path = disk_dir / "img"
    model = bytearray(make_image(path, 65536))
    with open_image(path, aio_backend, discard="unmap") as bs:
        assert bdrv_pwrite_zeroes(bs, 100, 5000) == 0
        model[100:5100] = bytes(5000)
        assert bdrv_pwrite_zeroes(bs, 8192, 8192, BDRV_REQ_MAY_UNMAP) == 0
        model[8192:16384] = bytes(8192)
        ret = bdrv_pwrite_zeroes(bs, 20000, 4096, BDRV_REQ_NO_FALLBACK)
        assert ret in (0, -errno.ENOTSUP)
        if ret == 0:
            model[20000:24096] = bytes(4096)
        assert bdrv_pdiscard(bs, 30000, 7000) == 0
        model[30000:37000] = bytes(7000)
        assert bdrv_truncate(bs, 50001) == 0
        del model[50001:]
        assert bdrv_truncate(bs, 70000) == 0
        model.extend(bytes(70000 - 50001))
        assert bdrv_getlength(bs) == 70000
        buf = bytearray(70000)
        assert bdrv_pread(bs, 0, 70000, buf) == 0
        assert buf == model
        # a padded write at the unaligned end never grows the image
        assert bdrv_pwrite(bs, 69999, 1, b"!") == 0
        model[69999] = ord("!")
        assert bdrv_getlength(bs) == 70000
    assert path.read_bytes() == model


def test_discard_ignored_without_unmap(disk_dir, aio_backend):
    path = disk_dir / "img"
    orig = make_image(path, 8192)
    with open_image(path, aio_backend) as bs:
        assert bdrv_pdiscard(bs, 0, 8192) == 0
    assert path.read_bytes() == orig
