# SPDX-License-Identifier: GPL-2.0-or-later
"""The Linux AIO ABI layer: struct layouts, syscall wrappers, the user ring.

Layout tests run everywhere; the rest need a working io_setup and are skipped
with the probe's reason otherwise.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time

import pytest

from pyaioctx._sys import aio_abi as A
from pyaioctx._sys.mem import buffer_address, qemu_memalign, qemu_vfree
from pyaioctx.iov import QEMUIOVector

BLK = 4096
DEADLINE = 5.0


# --- ABI layout --------------------------------------------------------------


def test_iocb_layout_matches_kernel():
    assert ctypes.sizeof(A.iocb) == 64
    offsets = {
        "aio_data": 0,
        "aio_lio_opcode": 16,
        "aio_reqprio": 18,
        "aio_fildes": 20,
        "aio_buf": 24,
        "aio_nbytes": 32,
        "aio_offset": 40,
        "aio_reserved2": 48,
        "aio_flags": 56,
        "aio_resfd": 60,
    }
    for name, off in offsets.items():
        assert getattr(A.iocb, name).offset == off, name
    # PADDED(aio_key, aio_rw_flags): key first on little-endian.
    import sys

    key, rw = (8, 12) if sys.byteorder == "little" else (12, 8)
    assert A.iocb.aio_key.offset == key
    assert A.iocb.aio_rw_flags.offset == rw


def test_io_event_layout_and_signed_res():
    assert ctypes.sizeof(A.io_event) == 32
    assert [A.io_event.data.offset, A.io_event.obj.offset, A.io_event.res.offset, A.io_event.res2.offset] == [
        0,
        8,
        16,
        24,
    ]
    ev = A.io_event()
    ctypes.memmove(ctypes.addressof(ev) + 16, (-errno.EINVAL).to_bytes(8, "little", signed=True), 8)
    if __import__("sys").byteorder == "little":
        assert ev.res == -errno.EINVAL
        assert A.io_event_ret(ev) == -errno.EINVAL


def test_ring_header_and_iovec_layout():
    assert ctypes.sizeof(A.aio_ring) == 32
    assert A.aio_ring.magic.offset == 16
    assert A.aio_ring.header_length.offset == 28
    assert A.AIO_RING_MAGIC == 0xA10A10A1
    assert ctypes.sizeof(A.iovec) == 2 * ctypes.sizeof(ctypes.c_void_p)


def test_constants():
    assert (A.IOCB_CMD_PREAD, A.IOCB_CMD_PWRITE, A.IOCB_CMD_FSYNC, A.IOCB_CMD_FDSYNC) == (0, 1, 2, 3)
    assert (A.IOCB_CMD_NOOP, A.IOCB_CMD_PREADV, A.IOCB_CMD_PWRITEV) == (6, 7, 8)
    assert A.IOCB_FLAG_RESFD == 1


def test_iocb_prep_fills_every_field():
    cb = A.iocb()
    ctypes.memset(ctypes.addressof(cb), 0xFF, 64)
    A.iocb_prep(cb, A.IOCB_CMD_PWRITEV, 7, 0x1234_5678_9ABC, 3, 3 << 31, data=0xDEAD_BEEF_0000_0001)
    assert cb.aio_lio_opcode == A.IOCB_CMD_PWRITEV
    assert cb.aio_fildes == 7
    assert cb.aio_buf == 0x1234_5678_9ABC
    assert cb.aio_nbytes == 3
    assert cb.aio_offset == 3 << 31  # > 2 GiB survives
    assert cb.aio_data == 0xDEAD_BEEF_0000_0001
    assert cb.aio_flags == cb.aio_resfd == cb.aio_reserved2 == cb.aio_key == cb.aio_rw_flags == 0
    A.io_set_eventfd(cb, 9)
    assert cb.aio_flags == A.IOCB_FLAG_RESFD and cb.aio_resfd == 9
    A.io_prep_pread(cb, -1, 0, 0, 0)
    assert cb.aio_fildes == 0xFFFFFFFF and cb.aio_flags == 0


def test_probe_never_raises():
    ok, reason = A.probe()
    assert isinstance(ok, bool) and isinstance(reason, str) and reason


def test_wrappers_report_errno_not_exceptions():
    if not A.AIO_AVAILABLE:
        assert A.io_setup(1)[0] == -errno.ENOSYS
        return
    assert A.io_setup(0) == (-errno.EINVAL, 0)
    assert A.io_destroy(0) == -errno.EINVAL
    assert A.io_submit(0, 0, None) == -errno.EINVAL
    assert A.io_getevents(0, 0, 1, A.io_event_array(1), 0) == -errno.EINVAL


def test_ring_rejects_bad_header():
    mem = (ctypes.c_uint * 64)()
    base = ctypes.addressof(mem)
    r = A.AioRing(base)
    assert not r.usable and "magic" in r.reason
    mem[1] = 4
    mem[4] = A.AIO_RING_MAGIC
    mem[6] = 1  # incompat_features
    mem[7] = 32
    r = A.AioRing(base)
    assert not r.usable and "incompat" in r.reason
    mem[6] = 0
    mem[7] = 40
    r = A.AioRing(base)
    assert not r.usable and "header_length" in r.reason
    mem[7] = 32
    r = A.AioRing(base)
    assert r.header_ok
    r.close()


def test_ring_refuses_weakly_ordered_cpu(monkeypatch):
    mem = (ctypes.c_uint * 64)()
    mem[1], mem[4], mem[7] = 4, A.AIO_RING_MAGIC, 32
    monkeypatch.setattr(A, "_MACHINE_IS_TSO", False)
    r = A.AioRing(ctypes.addressof(mem))
    assert r.header_ok and not r.usable and "io_getevents" in r.reason
    assert A.AioRing(ctypes.addressof(mem), force=True).usable


# --- live tests ----------------------------------------------------------------


@pytest.fixture
def aio_ctx():
    ok, reason = A.probe()
    if not ok:
        pytest.skip(reason)
    ret, ctx = A.io_setup(128)
    assert ret == 0 and ctx != 0
    yield ctx
    assert A.io_destroy(ctx) == 0


def _open_direct(path, flags):
    try:
        return os.open(path, flags | os.O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:
            pytest.skip("O_DIRECT not supported on %s" % path)
        raise


def _pattern(n, seed=0):
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def _submit_one(ctx, cb):
    pp = A.iocb_ptr_array(1)
    pp[0] = A.iocb_address(cb)
    return A.io_submit(ctx, 1, pp)


def _wait_events(ctx, n):
    events = A.io_event_array(n)
    got = 0
    out = []
    deadline = time.monotonic() + DEADLINE
    while got < n:
        r = A.io_getevents(ctx, 1, n - got, events, 1_000_000_000)
        assert r >= 0, os.strerror(-r)
        out.extend(A.IoEvent(events[i].data, events[i].obj, events[i].res, events[i].res2) for i in range(r))
        got += r
        if time.monotonic() > deadline:
            raise TimeoutError("only %d of %d AIO completions" % (got, n))
    return out


def test_io_setup_distinct_contexts():
    ok, reason = A.probe()
    if not ok:
        pytest.skip(reason)
    r1, c1 = A.io_setup(4)
    r2, c2 = A.io_setup(4)
    try:
        assert r1 == r2 == 0
        assert c1 and c2 and c1 != c2
    finally:
        A.io_destroy(c1)
        A.io_destroy(c2)


def test_odirect_read_roundtrip(aio_ctx, disk_dir):
    path = disk_dir / "img"
    data = _pattern(4 * BLK)
    path.write_bytes(data)
    fd = _open_direct(path, os.O_RDONLY)
    buf = qemu_memalign(BLK, 2 * BLK)
    try:
        cb = A.iocb()
        A.io_prep_pread(cb, fd, buf.address, 2 * BLK, BLK, data=42)
        assert _submit_one(aio_ctx, cb) == 1
        (ev,) = _wait_events(aio_ctx, 1)
        assert ev.data == 42
        assert ev.obj == A.iocb_address(cb)
        assert ev.res == 2 * BLK and ev.res2 == 0
        assert bytes(buf) == data[BLK : 3 * BLK]
    finally:
        os.close(fd)
        qemu_vfree(buf)


def test_preadv_with_qiov(aio_ctx, disk_dir):
    path = disk_dir / "img"
    data = _pattern(4 * BLK, 3)
    path.write_bytes(data)
    fd = _open_direct(path, os.O_RDONLY)
    a, b = qemu_memalign(BLK, BLK), qemu_memalign(BLK, 2 * BLK)
    qiov = QEMUIOVector(a, b)
    try:
        cb = A.iocb()
        A.io_prep_preadv(cb, fd, qiov.iov_address, qiov.niov, 0)
        assert _submit_one(aio_ctx, cb) == 1
        (ev,) = _wait_events(aio_ctx, 1)
        assert ev.res == 3 * BLK
        assert qiov.to_bytes() == data[: 3 * BLK]
    finally:
        os.close(fd)
        qiov.destroy()
        qemu_vfree(a)
        qemu_vfree(b)


def test_offset_beyond_2gib(aio_ctx, disk_dir):
    """64-bit offsets reach the kernel intact (a sparse file, 5 GiB + 4 KiB)."""
    path = disk_dir / "sparse"
    off = (5 << 30) + BLK
    with open(path, "wb") as f:
        f.truncate(off + 2 * BLK)
    fd = _open_direct(path, os.O_RDWR)
    buf = qemu_memalign(BLK, BLK)
    try:
        buf[:] = _pattern(BLK, 9)
        cb = A.iocb()
        A.io_prep_pwrite(cb, fd, buf.address, BLK, off)
        assert _submit_one(aio_ctx, cb) == 1
        (ev,) = _wait_events(aio_ctx, 1)
        assert ev.res == BLK
        # Check through a buffered fd: os.pread's buffer is not aligned.
        with open(path, "rb") as f:
            assert os.pread(f.fileno(), BLK, off) == _pattern(BLK, 9)
            assert os.pread(f.fileno(), BLK, off - BLK) == bytes(BLK)
            assert os.pread(f.fileno(), BLK, off % (1 << 32)) == bytes(BLK)  # no truncation to 32 bits

        buf[:] = bytes(BLK)
        A.io_prep_pread(cb, fd, buf.address, BLK, off)
        assert _submit_one(aio_ctx, cb) == 1
        (ev,) = _wait_events(aio_ctx, 1)
        assert ev.res == BLK and bytes(buf) == _pattern(BLK, 9)
    finally:
        os.close(fd)
        qemu_vfree(buf)


def test_misaligned_odirect_buffer_completes_with_einval(aio_ctx, disk_dir):
    path = disk_dir / "img"
    path.write_bytes(_pattern(2 * BLK))
    fd = _open_direct(path, os.O_RDONLY)
    buf = qemu_memalign(BLK, 2 * BLK)
    try:
        cb = A.iocb()
        A.io_prep_pread(cb, fd, buf.address + 1, BLK, 0)
        r = _submit_one(aio_ctx, cb)
        if r == 1:
            (ev,) = _wait_events(aio_ctx, 1)
            assert ev.res == -errno.EINVAL
        else:  # some kernels refuse at submit time
            assert r == -errno.EINVAL
    finally:
        os.close(fd)
        qemu_vfree(buf)


def test_bad_fd_fails_submit_with_ebadf(aio_ctx):
    buf = bytearray(BLK)
    cb = A.iocb()
    A.io_prep_pread(cb, -1, buffer_address(buf), BLK, 0)
    assert _submit_one(aio_ctx, cb) == -errno.EBADF


def test_ring_peek_commit_without_syscall(aio_ctx, disk_dir):
    ring = A.AioRing(aio_ctx)
    if not ring.usable:
        pytest.skip(ring.reason)
    path = disk_dir / "img"
    path.write_bytes(_pattern(BLK, 5))
    fd = _open_direct(path, os.O_RDONLY)
    buf = qemu_memalign(BLK, BLK)
    try:
        assert ring.peek()[1] == 0
        cb = A.iocb()
        A.io_prep_pread(cb, fd, buf.address, BLK, 0, data=7)
        assert _submit_one(aio_ctx, cb) == 1
        deadline = time.monotonic() + DEADLINE
        while True:
            head, n = ring.peek()
            if n:
                break
            assert time.monotonic() < deadline, "completion never reached the ring"
            time.sleep(0.0005)
        assert n == 1 and ring.has_events() and ring.available() == 1
        ev = ring.event_at(head)
        assert ev.obj == A.iocb_address(cb) == ring.obj_at(head)
        assert ev.data == 7 == ring.data_at(head)
        assert ev.res == BLK == ring.res_at(head)
        assert bytes(buf) == _pattern(BLK, 5)
        ring.commit(n)
        assert ring.peek() == ((head + 1) % ring.nr, 0) and not ring.has_events()
        # The syscall sees the same ring: nothing left to reap.
        assert A.io_getevents_nowait(aio_ctx, 4, A.io_event_array(4)) == 0
    finally:
        ring.close()
        os.close(fd)
        qemu_vfree(buf)


def test_ring_wraps_and_peek_is_contiguous(aio_ctx, disk_dir):
    """Several laps around the ring: peek never reports past the end of the
    ring, commit wraps head, and every completion is seen exactly once."""
    ring = A.AioRing(aio_ctx)
    if not ring.usable:
        pytest.skip(ring.reason)
    path = disk_dir / "small"
    path.write_bytes(_pattern(512, 1))
    fd = os.open(path, os.O_RDONLY)  # buffered: completes inside io_submit
    batch = 50
    bufs = [bytearray(512) for _ in range(batch)]
    cbs = [A.iocb() for _ in range(batch)]
    pp = A.iocb_ptr_array(batch)
    for i, cb in enumerate(cbs):
        A.io_prep_pread(cb, fd, buffer_address(bufs[i]), 512, 0, data=i)
        pp[i] = A.iocb_address(cb)
    seen_split = False
    try:
        for _lap in range((3 * ring.nr) // batch + 1):
            assert A.io_submit(aio_ctx, batch, pp) == batch
            got = []
            deadline = time.monotonic() + DEADLINE
            while len(got) < batch:
                head, n = ring.peek()
                assert head + n <= ring.nr
                if n and head + n == ring.nr and ring.available() > n:
                    seen_split = True
                for i in range(head, head + n):
                    got.append(ring.data_at(i))
                    assert ring.res_at(i) == 512
                ring.commit(n)
                if not n:
                    assert time.monotonic() < deadline
                    time.sleep(0.0002)
            assert sorted(got) == list(range(batch))
        assert seen_split or ring.nr % batch == 0
    finally:
        ring.close()
        os.close(fd)


def test_getevents_fallback_and_cancel(aio_ctx, disk_dir):
    path = disk_dir / "img"
    path.write_bytes(_pattern(BLK))
    fd = os.open(path, os.O_RDONLY)
    buf = bytearray(BLK)
    try:
        cb = A.iocb()
        A.io_prep_pread(cb, fd, buffer_address(buf), BLK, 0, data=3)
        assert _submit_one(aio_ctx, cb) == 1
        events = A.io_event_array(2)
        deadline = time.monotonic() + DEADLINE
        n = 0
        while n == 0:
            n = A.AioRing(aio_ctx).getevents_nowait(events, 2)
            assert n >= 0 and time.monotonic() < deadline
        assert n == 1 and events[0].data == 3 and events[0].res == BLK
        # Regular file I/O has no cancel method (and this one is done anyway).
        assert A.io_cancel(aio_ctx, ctypes.byref(cb), ctypes.byref(A.io_event())) < 0
    finally:
        os.close(fd)


def test_noop_and_fsync_opcodes(aio_ctx, disk_dir):
    path = disk_dir / "f"
    path.write_bytes(b"x" * 512)
    fd = os.open(path, os.O_RDWR)
    try:
        cb = A.iocb()
        A.io_prep_fsync(cb, fd, data=11)
        r = _submit_one(aio_ctx, cb)
        if r == -errno.EINVAL:
            pytest.skip("filesystem does not support AIO fsync")
        assert r == 1
        (ev,) = _wait_events(aio_ctx, 1)
        assert ev.data == 11 and ev.res == 0
    finally:
        os.close(fd)
