# SPDX-License-Identifier: GPL-2.0-or-later
"""The generic block layer (block.c, block/io.c), run on every I/O backend.

Invariants: data written at any offset and length reads back identically;
overlapping unaligned writes never resurrect stale bytes; drain and close
wait for every request; the synchronous API works from inside a completion
callback; refused requests write nothing; a user driver works through
bdrv_open exactly like the built-in ones.
"""

from __future__ import annotations

import errno
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pyaioctx import (
    QEMUIOVector,
    aio_poll,
    bdrv_aio_cancel,
    qemu_get_aio_context,
    qemu_iovec_init_buf,
    qemu_coroutine_create,
    qemu_coroutine_enter,
)
from pyaioctx.block import (
    BDRV_O_RDWR,
    BDRV_REQ_FUA,
    BlockDriver,
    BlockDriverState,
    bdrv_aio_flush,
    bdrv_aio_preadv,
    bdrv_aio_pwritev,
    bdrv_close,
    bdrv_co_preadv,
    bdrv_co_pwritev,
    bdrv_drain,
    bdrv_flush,
    bdrv_get_aio_context,
    bdrv_get_stats,
    bdrv_getlength,
    bdrv_io_plug,
    bdrv_io_unplug,
    bdrv_open,
    bdrv_pdiscard,
    bdrv_pread,
    bdrv_pwrite,
    bdrv_pwrite_zeroes,
    bdrv_register,
    bdrv_truncate,
    bdrv_unref,
    bdrv_unregister,
)
from test_block_fixtures import aio_backend, make_image, open_image  # noqa: F401

SIZE = 256 * 1024


def _wait(cond, limit: int = 100000) -> None:
    ctx = qemu_get_aio_context()
    n = 0
    while not cond():
        aio_poll(ctx, True)
        n += 1
        assert n < limit, "condition never became true"


# --------------------------------------------------------------------------
# Round trips

def test_roundtrip_aligned_and_unaligned(disk_dir, aio_backend):
    """Random data at aligned and unaligned offsets/lengths reads back."""
    path = disk_dir / "img"
    model = bytearray(make_image(path, SIZE))
    rnd = random.Random(42)
    cases = [(0, 4096), (4096, 8192), (512, 512), (1, 1), (511, 2), (4095, 4098),
             (SIZE - 7, 7), (SIZE - 4096, 4096), (100, 0), (SIZE, 0)]
    cases += [(rnd.randrange(SIZE - 20000), rnd.randrange(1, 20000)) for _ in range(40)]
    with open_image(path, aio_backend) as bs:
        for off, n in cases:
            data = os.urandom(n)
            assert bdrv_pwrite(bs, off, n, data) == 0
            model[off:off + n] = data
            o2, n2 = rnd.randrange(SIZE - 20000), rnd.randrange(20000)
            buf = bytearray(n2)
            assert bdrv_pread(bs, o2, n2, buf) == 0
            assert buf == model[o2:o2 + n2]
        full = bytearray(SIZE)
        assert bdrv_pread(bs, 0, SIZE, full) == 0
        assert full == model
        assert bdrv_flush(bs) == 0
        assert bdrv_getlength(bs) == SIZE
    assert path.read_bytes() == model


def test_roundtrip_aio_multi_iov(disk_dir, aio_backend):
    """Vectored callback requests with unaligned pieces and aligned buffers."""
    from pyaioctx.block import qemu_blockalign

    path = disk_dir / "img"
    model = bytearray(make_image(path, SIZE))
    with open_image(path, aio_backend) as bs:
        a = qemu_blockalign(bs, 8192)
        a[:] = os.urandom(8192)
        b = bytearray(os.urandom(333))
        qiov = QEMUIOVector(a, b)
        done = []
        bdrv_aio_pwritev(bs, 1000, qiov, 0, lambda o, r: done.append(r), None)
        assert done == []  # never before the call returns
        _wait(lambda: done)
        assert done == [0]
        model[1000:1000 + 8192] = bytes(a)
        model[9192:9192 + 333] = b
        r1, r2 = bytearray(5000), qemu_blockalign(bs, 4096)
        rq = QEMUIOVector(r1, r2)
        bdrv_aio_preadv(bs, 700, rq, 0, lambda o, r: done.append(r), None)
        _wait(lambda: len(done) == 2)
        assert done[1] == 0
        assert bytes(r1) + bytes(r2) == model[700:700 + 9096]


def test_concurrent_overlapping_unaligned_writes(disk_dir, aio_backend):
    """Overlapping unaligned writes in flight together: every byte ends up
    from one of the writes covering it, bytes no write covers are untouched
    (no stale read-modify-write data written back)."""
    path = disk_dir / "img"
    orig = make_image(path, 64 * 1024)
    rnd = random.Random(7)
    writes = []
    for i in range(48):
        off = rnd.randrange(0, 60000)
        n = rnd.randrange(1, 3000)
        writes.append((off, bytes([i + 1]) * n))
    with open_image(path, aio_backend) as bs:
        results = []
        for off, data in writes:
            q = QEMUIOVector()
            qemu_iovec_init_buf(q, bytearray(data))
            bdrv_aio_pwritev(bs, off, q, 0, lambda o, r: results.append(r), None)
        _wait(lambda: len(results) == len(writes))
        assert results == [0] * len(writes)
        final = bytearray(64 * 1024)
        assert bdrv_pread(bs, 0, len(final), final) == 0
    for pos in range(len(final)):
        cover = {data[0] for off, data in writes if off <= pos < off + len(data)}
        if cover:
            assert final[pos] in cover, pos
        else:
            assert final[pos] == orig[pos], pos


# --------------------------------------------------------------------------
# Drain, nesting, plug

def test_drain_waits_for_requests_in_flight(disk_dir, aio_backend):
    """bdrv_drain returns only after every callback ran."""
    path = disk_dir / "img"
    make_image(path, SIZE)
    bs = open_image(path, aio_backend)
    done = []
    for i in range(32):
        q = QEMUIOVector(bytearray(os.urandom(4096)))
        bdrv_aio_pwritev(bs, i * 4096, q, 0, lambda o, r: done.append(r), None)
    bdrv_aio_flush(bs, lambda o, r: done.append(r), None)
    # Some may have completed already (an engine may reap inside a later
    # submit); whatever is left is in flight until its callback ran.
    assert bs.in_flight > 0 or len(done) == 33
    bdrv_drain(bs)
    assert done == [0] * 33 and bs.in_flight == 0
    bdrv_unref(bs)


def test_close_drains_first(disk_dir, aio_backend):
    path = disk_dir / "img"
    make_image(path, SIZE)
    bs = open_image(path, aio_backend)
    done = []
    for i in range(8):
        bdrv_aio_preadv(bs, i * 512, QEMUIOVector(bytearray(512)), 0,
                        lambda o, r: done.append(r), None)
    bdrv_unref(bs)
    assert done == [0] * 8
    assert bs.closed and bdrv_getlength(bs) == -errno.ENOMEDIUM


def test_sync_api_inside_completion_callback(disk_dir, aio_backend):
    """The nested case: bdrv_pread/bdrv_pwrite/bdrv_flush called from a
    completion callback complete (BDRV_POLL_WHILE nests aio_poll)."""
    path = disk_dir / "img"
    model = make_image(path, SIZE)
    with open_image(path, aio_backend) as bs:
        seen = []

        def cb(opaque, ret):
            buf = bytearray(1000)
            assert bdrv_pread(bs, 123, 1000, buf) == 0
            assert bytes(buf) == model[123:1123]
            assert bdrv_pwrite(bs, 5, 3, b"xyz") == 0
            assert bdrv_flush(bs) == 0
            seen.append((opaque, ret))

        bdrv_aio_preadv(bs, 0, QEMUIOVector(bytearray(4096)), 0, cb, "A")
        _wait(lambda: seen)
        assert seen == [("A", 0)]
        buf = bytearray(3)
        assert bdrv_pread(bs, 5, 3, buf) == 0 and buf == b"xyz"


def test_sync_api_from_coroutine_calls_directly(disk_dir, aio_backend):
    path = disk_dir / "img"
    model = make_image(path, SIZE)
    with open_image(path, aio_backend) as bs:
        out = []

        def entry(_):
            buf = bytearray(10)
            out.append(bdrv_pread(bs, 1, 10, buf))
            out.append(bytes(buf))
            q = QEMUIOVector(bytearray(7))
            out.append(bdrv_co_preadv(bs, 3, 7, q, 0))
            bdrv_drain(bs)
            out.append("drained")

        qemu_coroutine_enter(qemu_coroutine_create(entry, None))
        _wait(lambda: len(out) == 4)
        assert out == [0, model[1:11], 0, "drained"]


def test_plug_unplug_batches(disk_dir, aio_backend):
    path = disk_dir / "img"
    make_image(path, SIZE)
    with open_image(path, aio_backend) as bs:
        done = []
        bdrv_io_plug(bs)
        for i in range(16):
            bdrv_aio_pwritev(bs, i * 4096, QEMUIOVector(bytearray(4096)), 0,
                             lambda o, r: done.append(r), None)
        bdrv_drain(bs)  # drain submits plugged requests (unplugged section)
        assert done == [0] * 16
        bdrv_io_unplug(bs)
        with pytest.raises(RuntimeError, match="not plugged"):
            bdrv_io_unplug(bs)


def test_fua_write_and_stats(disk_dir, aio_backend):
    path = disk_dir / "img"
    make_image(path, SIZE)
    with open_image(path, aio_backend) as bs:
        assert bdrv_pwrite(bs, 0, 4, b"abcd", BDRV_REQ_FUA) == 0
        buf = bytearray(4)
        assert bdrv_pread(bs, 0, 4, buf) == 0
        assert bdrv_pread(bs, SIZE, 1, bytearray(1)) == -errno.EIO
        assert bdrv_flush(bs) == 0
        s = bdrv_get_stats(bs)
        assert s == bs.stats()
        assert (s.rd_operations, s.rd_bytes, s.wr_operations, s.wr_bytes) == (1, 4, 1, 4)
        assert s.invalid_rd_operations == 1 and s.flush_operations == 1
        assert s.rd_total_time_ns > 0 and s.wr_highest_offset == 4
        with pytest.raises(Exception):
            s.rd_bytes = 0  # frozen


def test_aio_cancel_gets_exactly_one_callback(disk_dir, aio_backend):
    path = disk_dir / "img"
    make_image(path, SIZE)
    with open_image(path, aio_backend) as bs:
        done = []
        acbs = [bdrv_aio_preadv(bs, i * 4096, QEMUIOVector(bytearray(4096)), 0,
                                lambda o, r: done.append(o), i) for i in range(8)]
        for a in acbs[::2]:
            a.cancel_async()
        bdrv_aio_cancel(acbs[1])
        bdrv_drain(bs)
        assert sorted(done) == list(range(8))


# --------------------------------------------------------------------------
# Bad input

def test_bad_input_refused_nothing_written(disk_dir, aio_backend):
    path = disk_dir / "img"
    orig = make_image(path, SIZE)
    with open_image(path, aio_backend) as bs:
        assert bdrv_pwrite(bs, SIZE - 1, 2, b"zz") == -errno.EIO
        assert bdrv_pwrite(bs, SIZE + 4096, 1, b"z") == -errno.EIO
        assert bdrv_pwrite(bs, -1, 1, b"z") == -errno.EIO
        assert bdrv_pread(bs, -512, 512, bytearray(512)) == -errno.EIO
        assert bdrv_pwrite(bs, 0, -1, b"z") == -errno.EIO
        assert bdrv_pwrite_zeroes(bs, SIZE - 10, 11) == -errno.EIO
        assert bdrv_pdiscard(bs, SIZE, 1) == -errno.EIO
        assert bdrv_truncate(bs, -1) == -errno.EINVAL
        with pytest.raises(TypeError):
            bdrv_pread(bs, "0", 1, bytearray(1))
        with pytest.raises(TypeError):
            bdrv_pread(bs, 0, 1, b"x")  # read-only buffer to read into
        with pytest.raises(ValueError):
            bdrv_pwrite(bs, 0, 10, b"short")
        with pytest.raises(TypeError):
            bdrv_aio_preadv(bs, 0, b"not a qiov", 0, lambda o, r: None, None)
        with pytest.raises(TypeError):
            bdrv_aio_preadv(bs, 0, QEMUIOVector(bytearray(1)), 0, "not callable", None)
        with pytest.raises(Exception, match="coroutine"):
            bdrv_co_preadv(bs, 0, 1, QEMUIOVector(bytearray(1)), 0)
        # refused callback requests call back once with -errno
        got = []
        bdrv_aio_pwritev(bs, SIZE, QEMUIOVector(bytearray(1)), 0, lambda o, r: got.append(r), None)
        assert got == []
        _wait(lambda: got)
        assert got == [-errno.EIO]
        assert bdrv_getlength(bs) == SIZE
        assert bs.stats().invalid_wr_operations >= 5
    assert path.read_bytes() == orig


def test_read_only_device(disk_dir, aio_backend):
    path = disk_dir / "img"
    orig = make_image(path, SIZE)
    with open_image(path, aio_backend, flags=0) as bs:
        assert bs.read_only
        assert bdrv_pwrite(bs, 0, 1, b"x") == -errno.EPERM
        assert bdrv_pwrite_zeroes(bs, 0, 512) == -errno.EPERM
        assert bdrv_pdiscard(bs, 0, 512) == -errno.EPERM
        assert bdrv_truncate(bs, 0) == -errno.EACCES
        assert bdrv_flush(bs) == 0
        buf = bytearray(10)
        assert bdrv_pread(bs, 0, 10, buf) == 0 and buf == orig[:10]
    with open_image(path, aio_backend, flags=BDRV_O_RDWR, **{"read-only": True}) as bs:
        assert bdrv_pwrite(bs, 0, 1, b"x") == -errno.EPERM
    assert path.read_bytes() == orig


def test_closed_device(disk_dir, aio_backend):
    path = disk_dir / "img"
    make_image(path, 4096)
    bs = open_image(path, aio_backend)
    bdrv_close(bs)
    bdrv_close(bs)  # idempotent
    assert bdrv_pread(bs, 0, 1, bytearray(1)) == -errno.ENOMEDIUM
    assert bdrv_pwrite(bs, 0, 1, b"x") == -errno.ENOMEDIUM
    assert bdrv_flush(bs) == -errno.ENOMEDIUM
    with pytest.raises(ValueError, match="no reference"):
        bdrv_unref(bs)
    with pytest.raises(OSError):
        bs.read(0, 1)


def test_unknown_driver_and_option():
    with pytest.raises(ValueError, match="Unknown driver 'nope'"):
        bdrv_open(None, {"driver": "nope"})
    with pytest.raises(ValueError, match="doesn't support the option 'bogus'"):
        bdrv_open(None, {"driver": "null-co", "bogus": 1})
    with pytest.raises(ValueError, match="cache.direct"):
        bdrv_open(None, {"driver": "null-co", "cache.direct": "maybe"})
    with pytest.raises(ValueError, match="no 'driver'"):
        bdrv_open(None, {})
    with pytest.raises(TypeError):
        bdrv_open(None, ["driver", "null-co"])


# --------------------------------------------------------------------------
# A user driver (README snippet)

def test_user_driver_through_bdrv_open():
    """A ~40-line RAM disk driver registered and opened like a built-in."""
    from pyaioctx import BlockDriver, bdrv_register, bdrv_open, bdrv_pread, bdrv_pwrite

    def ram_open(bs, options, flags):
        size = options.pop("size", 1 << 20)
        bs.opaque = bytearray(size)
        return 0

    def ram_getlength(bs):
        return len(bs.opaque)

    def ram_preadv(bs, offset, bytes, qiov, flags):
        qiov.from_buf(0, bs.opaque[offset:offset + bytes])
        return 0

    def ram_pwritev(bs, offset, bytes, qiov, flags):
        qiov.to_buf(0, memoryview(bs.opaque)[offset:offset + bytes])
        return 0

    def ram_flush(bs):
        return 0

    closed = []
    drv = BlockDriver(format_name="ramdisk-test",
                      bdrv_open=ram_open,
                      bdrv_getlength=ram_getlength,
                      bdrv_co_preadv=ram_preadv,
                      bdrv_co_pwritev=ram_pwritev,
                      bdrv_co_flush_to_disk=ram_flush,
                      bdrv_close=lambda bs: closed.append(bs))
    bdrv_register(drv)
    try:
        bs = bdrv_open(None, {"driver": "ramdisk-test", "size": 8192}, BDRV_O_RDWR)
        assert bdrv_pwrite(bs, 100, 5, b"hello") == 0
        buf = bytearray(5)
        assert bdrv_pread(bs, 100, 5, buf) == 0 and buf == b"hello"
        assert bdrv_pwrite(bs, 8190, 5, b"hello") == -errno.EIO  # checked before the driver
        assert bdrv_flush(bs) == 0
        assert bs.read(98, 9) == b"\0\0hello\0\0"
        assert bdrv_get_aio_context(bs) is qemu_get_aio_context()
        with pytest.raises(ValueError, match="doesn't support the option 'colour'"):
            bdrv_open(None, {"driver": "ramdisk-test", "colour": "red"}, BDRV_O_RDWR)
        bs.close()
        assert closed.count(bs) == 1  # exactly once (the refused open closed its own)
    finally:
        bdrv_unregister(drv)


def test_user_driver_with_alignment_gets_rmw():
    """A driver that sets request_alignment only ever sees aligned requests."""
    seen = []

    def o(bs, options, flags):
        bs.opaque = bytearray(16384)

    def limits(bs):
        bs.bl.request_alignment = 4096

    def rd(bs, off, n, qiov, flags):
        seen.append((off, n))
        qiov.from_buf(0, bs.opaque[off:off + n])
        return 0

    def wr(bs, off, n, qiov, flags):
        seen.append((off, n))
        qiov.to_buf(0, memoryview(bs.opaque)[off:off + n])
        return 0

    drv = BlockDriver("aligned-test", bdrv_open=o, bdrv_refresh_limits=limits,
                      bdrv_getlength=lambda bs: len(bs.opaque), bdrv_co_preadv=rd,
                      bdrv_co_pwritev=wr)
    bdrv_register(drv)
    try:
        with bdrv_open(None, {"driver": "aligned-test"}, BDRV_O_RDWR) as bs:
            assert bdrv_pwrite(bs, 4000, 200, b"q" * 200) == 0
            assert bs.read(3999, 202) == b"\0" + b"q" * 200 + b"\0"
            assert all(off % 4096 == 0 and n % 4096 == 0 for off, n in seen)
    finally:
        bdrv_unregister(drv)


# --------------------------------------------------------------------------
# Model-based test

_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.integers(0, 70000), st.integers(0, 9000), st.integers(0, 255)),
        st.tuples(st.just("read"), st.integers(0, 70000), st.integers(0, 9000)),
        st.tuples(st.just("discard"), st.integers(0, 70000), st.integers(0, 9000)),
        st.tuples(st.just("zero"), st.integers(0, 70000), st.integers(0, 9000)),
        st.tuples(st.just("truncate"), st.integers(0, 80000)),
        st.tuples(st.just("flush"),),
    ),
    max_size=25,
)


def test_model_random_operations(disk_dir, aio_backend):
    """Random reads/writes/discards/write-zeroes/truncates against an
    in-memory model; out-of-range requests must be refused and change nothing."""
    counter = [0]

    @settings(max_examples=20, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(_OPS)
    def run(ops):
        counter[0] += 1
        path = disk_dir / f"m{counter[0]}"
        model = bytearray(make_image(path, 65536))
        with open_image(path, aio_backend, discard="unmap") as bs:
            for op in ops:
                kind = op[0]
                if kind == "truncate":
                    assert bdrv_truncate(bs, op[1]) == 0
                    if op[1] < len(model):
                        del model[op[1]:]
                    else:
                        model.extend(bytes(op[1] - len(model)))
                    continue
                if kind == "flush":
                    assert bdrv_flush(bs) == 0
                    continue
                off, n = op[1], op[2]
                fits = off + n <= len(model)
                if kind == "write":
                    data = bytes([op[3]]) * n
                    ret = bdrv_pwrite(bs, off, n, data)
                    if fits:
                        model[off:off + n] = data
                elif kind == "read":
                    buf = bytearray(n)
                    ret = bdrv_pread(bs, off, n, buf)
                    if fits:
                        assert buf == model[off:off + n]
                elif kind == "discard":
                    ret = bdrv_pdiscard(bs, off, n)
                    if fits:
                        model[off:off + n] = bytes(n)
                else:
                    ret = bdrv_pwrite_zeroes(bs, off, n)
                    if fits:
                        model[off:off + n] = bytes(n)
                assert ret == (0 if fits else -errno.EIO), (op, len(model))
                assert bdrv_getlength(bs) == len(model)
            whole = bytearray(len(model))
            assert bdrv_pread(bs, 0, len(model), whole) == 0
            assert whole == model
        assert path.read_bytes() == model
        path.unlink()

    run()


# --------------------------------------------------------------------------
# Python face

def test_pythonic_face(disk_dir, aio_backend):
    path = disk_dir / "img"
    make_image(path, 8192)
    with open_image(path, aio_backend) as bs:
        assert isinstance(bs, BlockDriverState)
        bs.write(10, b"abc")
        assert bs.read(10, 3) == b"abc"
        bs.write_zeroes(10, 2)
        assert bs.read(10, 3) == b"\0\0c"
        bs.flush()
        bs.truncate(4096)
        assert bs.length == 4096
        with pytest.raises(OSError) as ei:
            bs.write(4096, b"x")
        assert ei.value.errno == errno.EIO
        bs.drain()
    assert bs.closed


# --------------------------------------------------------------------------
# The direct path (bdrv_aio_* without a coroutine) and deferred completions

def _aligned_buf(n: int = 4096):
    from pyaioctx import qemu_memalign
    buf = qemu_memalign(4096, n)
    return buf, memoryview(buf).cast("B")


def test_aio_direct_path_round_trip_and_accounting(disk_dir, aio_backend):
    """Aligned callback requests skip the coroutine, and everything the
    coroutine path does still happens: data, callback after the submit
    returned, tracked while in flight, accounting, write generation."""
    from pyaioctx.block.block import _DirectAIOCB
    path = disk_dir / "img"
    make_image(path, SIZE)
    with open_image(path, aio_backend) as bs:
        wbuf, wmv = _aligned_buf(8192)
        wmv[:] = os.urandom(8192)
        done = []
        returned = []
        acb = bdrv_aio_pwritev(bs, 8192, QEMUIOVector(wmv), 0,
                               lambda o, r: done.append((o, r, list(returned))), "w")
        returned.append("w")
        assert isinstance(acb, _DirectAIOCB)
        assert acb in bs.tracked_requests and bs.in_flight >= 1
        gen = bs.write_gen
        _wait(lambda: done)
        assert done == [("w", 0, ["w"])]  # after bdrv_aio_pwritev returned
        assert acb not in bs.tracked_requests and bs.in_flight == 0
        assert bs.write_gen == gen + 1  # the next flush has work to do
        rbuf, rmv = _aligned_buf(8192)
        acb = bdrv_aio_preadv(bs, 8192, QEMUIOVector(rmv), 0, lambda o, r: done.append((o, r)), "r")
        assert isinstance(acb, _DirectAIOCB)
        _wait(lambda: len(done) == 2)
        assert done[1] == ("r", 0) and bytes(rmv) == bytes(wmv)
        st = bdrv_get_stats(bs)
        assert (st.rd_operations, st.rd_bytes, st.wr_operations, st.wr_bytes) == (1, 8192, 1, 8192)
        assert st.wr_highest_offset == 16384
        # Out of range: refused through the coroutine path, -EIO, nothing accounted as done.
        acb = bdrv_aio_preadv(bs, SIZE, QEMUIOVector(rmv), 0, lambda o, r: done.append((o, r)), "x")
        assert not isinstance(acb, _DirectAIOCB)
        _wait(lambda: len(done) == 3)
        assert done[2] == ("x", -errno.EIO)
        assert bdrv_get_stats(bs).rd_operations == 1


@pytest.mark.parametrize("api", ["callback", "coroutine"])
def test_unaligned_write_waits_for_direct_request(disk_dir, aio_backend, api):
    """A read-modify-write that overlaps a direct request in flight (the
    callback path's or the coroutine path's) waits for it, so the direct
    write is never undone by a stale read."""
    if not aio_backend.direct:
        pytest.skip("buffered I/O needs no read-modify-write (request_alignment 1)")
    from pyaioctx.block.block import _CoDirectReq, _DirectAIOCB
    path = disk_dir / "img"
    old = make_image(path, SIZE)
    with open_image(path, aio_backend) as bs:
        wbuf, wmv = _aligned_buf(4096)
        wmv[:] = b"A" * 4096
        qa, qb = QEMUIOVector(wmv), QEMUIOVector(bytearray(b"B" * 10))
        if api == "callback":
            done = []
            req_a = bdrv_aio_pwritev(bs, 0, qa, 0, lambda o, r: done.append((o, r)), "A")
            assert isinstance(req_a, _DirectAIOCB)
            b = bdrv_aio_pwritev(bs, 100, qb, 0, lambda o, r: done.append((o, r)), "B")
            assert not isinstance(b, _DirectAIOCB)
            results = lambda: done  # noqa: E731
        else:
            a = _co_start(bdrv_co_pwritev, bs, 0, 4096, qa)
            (req_a,) = bs.tracked_requests
            assert type(req_a) is _CoDirectReq
            b = _co_start(bdrv_co_pwritev, bs, 100, 10, qb)
            results = lambda: [("A", r) for r in a] + [("B", r) for r in b]  # noqa: E731
        waiting = [r.waiting_for for r in bs.tracked_requests if r is not req_a]
        assert waiting == [req_a], "the read-modify-write did not wait for the direct write"
        assert req_a.wait_queue is not None
        _wait(lambda: len(results()) == 2)
        assert results() == [("A", 0), ("B", 0)]
        assert bs.read(0, 4096) == b"A" * 100 + b"B" * 10 + b"A" * 3986
        assert bs.read(4096, 4096) == old[4096:8192]


def test_block_driver_state_fields_are_slots(disk_dir, aio_backend):
    """Every field a device gets at open is a slot (the per-request reads
    stay in CPython's fast layout); attributes added later still work."""
    path = disk_dir / "img"
    make_image(path, SIZE)
    with open_image(path, aio_backend) as bs:
        assert vars(bs) == {}
        bs.my_note = "kept"
        assert bs.my_note == "kept" and vars(bs) == {"my_note": "kept"}


def test_co_direct_tracked_requests_are_recycled(disk_dir, aio_backend):
    """The coroutine path's tracked requests are reused: one that a
    read-modify-write waited for comes back clean (no wait queue, no
    coroutine), is tracked again with the next request's range, and close
    drops the spare ones."""
    if not aio_backend.direct:
        pytest.skip("buffered I/O needs no read-modify-write (request_alignment 1)")
    from pyaioctx.block.block import _CoDirectReq
    path = disk_dir / "img"
    make_image(path, SIZE)
    bs = open_image(path, aio_backend)
    try:
        wbuf, wmv = _aligned_buf(4096)
        wmv[:] = b"A" * 4096
        a = _co_start(bdrv_co_pwritev, bs, 0, 4096, QEMUIOVector(wmv))
        (req_a,) = bs.tracked_requests
        b = _co_start(bdrv_co_pwritev, bs, 100, 10, QEMUIOVector(bytearray(b"B" * 10)))
        assert req_a.wait_queue is not None
        _wait(lambda: a and b)
        assert a == [0] and b == [0]
        assert list(bs._co_direct_free) == [req_a]
        assert req_a.wait_queue is None and req_a.co is None
        c = _co_start(bdrv_co_pwritev, bs, 8192, 4096, QEMUIOVector(wmv))
        (req_c,) = bs.tracked_requests
        assert req_c is req_a and type(req_c) is _CoDirectReq
        assert (req_c.offset, req_c.bytes, req_c.wait_queue) == (8192, 4096, None)
        assert req_c.co is not None and not bs._co_direct_free
        _wait(lambda: c)
        assert c == [0]
        assert bs.read(0, 4096) == b"A" * 100 + b"B" * 10 + b"A" * 3986
        assert bs.read(8192, 4096) == b"A" * 4096
    finally:
        bdrv_close(bs)
    assert not bs._co_direct_free


def test_direct_path_declines_misaligned_buffer(disk_dir, aio_backend):
    """O_DIRECT with a buffer the device cannot use: the file driver
    declines the direct path and the coroutine path bounces it."""
    from pyaioctx.block.block import _DirectAIOCB
    path = disk_dir / "img"
    data = make_image(path, SIZE)
    with open_image(path, aio_backend) as bs:
        raw = bytearray(4096 + 1)
        view = memoryview(raw)[1:]
        done = []
        acb = bdrv_aio_preadv(bs, 4096, QEMUIOVector(view), 0, lambda o, r: done.append(r), None)
        assert isinstance(acb, _DirectAIOCB) == (not aio_backend.direct)
        _wait(lambda: done)
        assert done == [0] and bytes(view) == data[4096:8192]


@pytest.mark.parametrize("api", ["callback", "coroutine"])
def test_misaligned_entry_of_a_vector_is_bounced(disk_dir, aio_backend, api):
    """O_DIRECT with a two-entry vector whose second buffer is misaligned:
    neither API hands it to the engine as it is, and the data still
    arrive and leave right."""
    path = disk_dir / "img"
    data = make_image(path, SIZE)
    with open_image(path, aio_backend) as bs:
        abuf, amv = _aligned_buf(4096)
        raw = bytearray(4096 + 1)
        odd = memoryview(raw)[1:]
        q = QEMUIOVector(amv, odd)
        assert q._mem_align == 1  # the second buffer starts at an odd address

        def run(aio_fn, co_fn, offset):
            if api == "callback":
                done: list = []
                aio_fn(bs, offset, q, 0, lambda o, r: done.append(r), None)
            else:
                done = _co_start(co_fn, bs, offset, q.size, q)
            _wait(lambda: done)
            return done

        assert run(bdrv_aio_preadv, bdrv_co_preadv, 8192) == [0]
        assert bytes(amv) + bytes(odd) == data[8192:16384]
        amv[:] = b"x" * 4096
        odd[:] = b"y" * 4096
        assert run(bdrv_aio_pwritev, bdrv_co_pwritev, 0) == [0]
        assert bs.read(0, 8192) == b"x" * 4096 + b"y" * 4096


# --------------------------------------------------------------------------
# The coroutine direct path (bdrv_co_preadv/pwritev straight to the driver)

def _co_start(fn, *args):
    """Enter a coroutine running ``fn(*args)``; returns a list that gets
    ``[result]`` (or ``[exception]``) when it ends."""
    out: list = []

    def entry(_):
        try:
            out.append(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out.append(e)

    qemu_coroutine_enter(qemu_coroutine_create(entry, None))
    return out


def test_co_direct_path_round_trip_and_accounting(disk_dir, aio_backend):
    """An aligned coroutine request goes straight to the driver, and
    everything the general path does still happens: tracked while in
    flight (as a _CoDirectReq), in-flight count, write generation,
    accounting, the data."""
    from pyaioctx.block.block import _CoDirectReq
    path = disk_dir / "img"
    make_image(path, SIZE)
    with open_image(path, aio_backend) as bs:
        wbuf, wmv = _aligned_buf(8192)
        wmv[:] = os.urandom(8192)
        gen = bs.write_gen
        out = _co_start(bdrv_co_pwritev, bs, 8192, 8192, QEMUIOVector(wmv))
        # Every engine completes an O_DIRECT or pool request from the event
        # loop, so the coroutine is still waiting here.
        assert out == []
        reqs = list(bs.tracked_requests)
        assert len(reqs) == 1 and type(reqs[0]) is _CoDirectReq
        assert (reqs[0].offset, reqs[0].bytes, reqs[0].overlap_offset,
                reqs[0].overlap_bytes) == (8192, 8192, 8192, 8192)
        assert bs.in_flight == 1
        _wait(lambda: out)
        assert out == [0]
        assert not bs.tracked_requests and bs.in_flight == 0
        assert bs.write_gen == gen + 1
        rbuf, rmv = _aligned_buf(8192)
        out = _co_start(bdrv_co_preadv, bs, 8192, 8192, QEMUIOVector(rmv))
        _wait(lambda: out)
        assert out == [0] and bytes(rmv) == bytes(wmv)
        st = bdrv_get_stats(bs)
        assert (st.rd_operations, st.rd_bytes, st.wr_operations, st.wr_bytes) == (1, 8192, 1, 8192)
        assert st.wr_highest_offset == 16384
        assert st.rd_total_time_ns > 0 and st.wr_total_time_ns > 0


def test_co_requests_the_direct_path_leaves_to_the_general_one(disk_dir, aio_backend):
    """Unaligned, flagged, partial-qiov and out-of-range requests take the
    general path and get its results; refusals are accounted as invalid."""
    from pyaioctx.block.block import _CoDirectReq, _TrackedRequest
    path = disk_dir / "img"
    model = bytearray(make_image(path, SIZE))
    with open_image(path, aio_backend) as bs:
        buf, mv = _aligned_buf(8192)
        mv[:] = os.urandom(8192)
        # Unaligned only where the device has an alignment (O_DIRECT).
        unaligned = _TrackedRequest if aio_backend.direct else _CoDirectReq
        cases = [
            (100, 4096, QEMUIOVector(bytearray(mv[:4096])), 0, unaligned),
            (4096, 4096, QEMUIOVector(mv), 0, _TrackedRequest),  # qiov longer than bytes
            (0, 4096, QEMUIOVector(mv[:4096]), BDRV_REQ_FUA, _TrackedRequest),  # a flag
        ]
        for offset, nbytes, qiov, flags, kind in cases:
            out = _co_start(bdrv_co_pwritev, bs, offset, nbytes, qiov, flags)
            assert {type(r) for r in bs.tracked_requests} == {kind}, (offset, nbytes, flags)
            _wait(lambda: out)
            assert out == [0], (offset, nbytes, flags)
            model[offset:offset + nbytes] = qiov.to_bytes()[:nbytes]
        assert bs.read(0, SIZE) == bytes(model)
        before = bdrv_get_stats(bs)
        out = _co_start(bdrv_co_pwritev, bs, SIZE, 4096, QEMUIOVector(mv[:4096]))
        _wait(lambda: out)
        assert out == [-errno.EIO]
        after = bdrv_get_stats(bs)
        assert after.invalid_wr_operations == before.invalid_wr_operations + 1
        assert after.wr_operations == before.wr_operations
        with pytest.raises(Exception, match="coroutine"):
            bdrv_co_preadv(bs, 0, 4096, QEMUIOVector(mv[:4096]))
    assert bs.in_flight == 0


def test_co_direct_path_on_read_only_device_is_eperm(disk_dir, aio_backend):
    path = disk_dir / "img"
    data = make_image(path, SIZE)
    with bdrv_open(str(path), aio_backend.options(**{"read-only": True}), 0) as bs:
        buf, mv = _aligned_buf(4096)
        out = _co_start(bdrv_co_pwritev, bs, 0, 4096, QEMUIOVector(mv))
        _wait(lambda: out)
        assert out == [-errno.EPERM]
        out = _co_start(bdrv_co_preadv, bs, 0, 4096, QEMUIOVector(mv))
        _wait(lambda: out)
        assert out == [0] and bytes(mv) == data[:4096]


def test_co_direct_path_driver_errors():
    """A driver that raises, or returns something that is not an int, on
    the direct path: the exception reaches the caller, the request is
    accounted as failed, nothing stays in flight."""
    mode = ["raise"]

    def op(bs, options, flags):
        bs.opaque = bytearray(65536)
        return 0

    def co_preadv(bs, offset, bytes, qiov, flags):
        assert bs.tracked_requests and bs.in_flight == 1
        if mode[0] == "raise":
            raise OSError(errno.EIO, "boom")
        if mode[0] == "none":
            return None
        return -errno.EIO

    drv = BlockDriver(format_name="co-direct-test", bdrv_open=op,
                      bdrv_getlength=lambda bs: len(bs.opaque), bdrv_co_preadv=co_preadv)
    bdrv_register(drv)
    try:
        with bdrv_open(None, {"driver": "co-direct-test"}, BDRV_O_RDWR) as bs:
            qiov = QEMUIOVector(bytearray(512))
            out = _co_start(bdrv_co_preadv, bs, 0, 512, qiov)
            assert len(out) == 1 and isinstance(out[0], OSError)
            mode[0] = "none"
            out = _co_start(bdrv_co_preadv, bs, 0, 512, qiov)
            assert len(out) == 1 and isinstance(out[0], TypeError)
            assert "co-direct-test" in str(out[0])
            mode[0] = "errno"
            assert _co_start(bdrv_co_preadv, bs, 0, 512, qiov) == [-errno.EIO]
            st = bdrv_get_stats(bs)
            assert (st.failed_rd_operations, st.rd_operations) == (3, 0)
            assert not bs.tracked_requests and bs.in_flight == 0
    finally:
        bdrv_unregister(drv)


def test_co_direct_path_skips_drivers_with_part_callbacks():
    """A driver with bdrv_co_preadv_part is called through the general
    path (with the qiov offset), never with the direct path's arguments."""
    calls = []

    def op(bs, options, flags):
        bs.opaque = bytearray(range(256)) * 256
        return 0

    def co_preadv_part(bs, offset, bytes, qiov, qiov_offset, flags):
        calls.append((offset, bytes, qiov_offset))
        qiov.from_buf(qiov_offset, bs.opaque[offset:offset + bytes])
        return 0

    drv = BlockDriver(format_name="co-part-test", bdrv_open=op,
                      bdrv_getlength=lambda bs: len(bs.opaque),
                      bdrv_co_preadv=lambda *a: pytest.fail("direct path taken"),
                      bdrv_co_preadv_part=co_preadv_part)
    bdrv_register(drv)
    try:
        with bdrv_open(None, {"driver": "co-part-test"}, BDRV_O_RDWR) as bs:
            buf = bytearray(512)
            assert _co_start(bdrv_co_preadv, bs, 1024, 512, QEMUIOVector(buf)) == [0]
            assert calls == [(1024, 512, 0)] and bytes(buf) == bytes(bs.opaque[1024:1536])
    finally:
        bdrv_unregister(drv)


def test_co_direct_path_is_for_open_top_level_fixed_length_devices():
    """Which devices the coroutine direct path serves: an open top-level
    device of fixed length (reads always, writes unless read-only).  A
    child under another driver, a device of variable length and a closed
    one take the general path."""
    from pyaioctx.block.block import _CoDirectReq
    seen = []

    def op(bs, options, flags):
        bs.opaque = bytearray(65536)
        if options.pop("variable", False):
            bs.has_variable_length = True
        return 0

    def co_rw(bs, offset, bytes, qiov, flags):
        (req,) = [r for r in bs.tracked_requests]
        seen.append(type(req) is _CoDirectReq)
        return 0

    drv = BlockDriver(format_name="co-gate-test", bdrv_open=op,
                      bdrv_getlength=lambda bs: len(bs.opaque),
                      bdrv_co_preadv=co_rw, bdrv_co_pwritev=co_rw,
                      runtime_opts=frozenset({"variable"}))
    bdrv_register(drv)

    def both(bs):
        del seen[:]
        q = QEMUIOVector(bytearray(512))
        return (_co_start(bdrv_co_preadv, bs, 0, 512, q)
                + _co_start(bdrv_co_pwritev, bs, 512, 512, q))

    try:
        with bdrv_open(None, {"driver": "co-gate-test"}, BDRV_O_RDWR) as bs:
            assert both(bs) == [0, 0] and seen == [True, True]
        with bdrv_open(None, {"driver": "co-gate-test"}, 0) as bs:
            assert both(bs) == [0, -errno.EPERM] and seen == [True]
        with bdrv_open(None, {"driver": "co-gate-test", "variable": True}, BDRV_O_RDWR) as bs:
            assert both(bs) == [0, 0] and seen == [False, False]
        with bdrv_open(None, {"driver": "blkdebug", "image": {"driver": "co-gate-test"}},
                       BDRV_O_RDWR) as top:
            child = top.file
            assert child.parent is top
            assert both(child) == [0, 0] and seen == [False, False]
        assert both(bs) == [-errno.ENOMEDIUM, -errno.ENOMEDIUM] and seen == []
        assert bs._co_direct_read is None and bs._co_direct_write is None
    finally:
        bdrv_unregister(drv)


def test_user_driver_aio_callbacks_take_the_direct_path():
    """A driver with bdrv_aio_preadv gets simple requests directly; returning
    None declines, and the request takes the coroutine path instead."""
    from pyaioctx.aiocb import AIOCBInfo, BlockAIOCB
    from pyaioctx.aio import aio_bh_schedule_oneshot

    calls = []
    info = AIOCBInfo(BlockAIOCB, None, None, "test-direct")

    def op(bs, options, flags):
        bs.opaque = bytearray(options.pop("size", 65536))
        return 0

    def co_preadv(bs, offset, bytes, qiov, flags):
        calls.append(("co", offset))
        qiov.from_buf(0, bs.opaque[offset:offset + bytes])
        return 0

    def aio_preadv(bs, offset, bytes, qiov, flags, cb, opaque):
        if offset % 8192:
            return None  # decline
        calls.append(("aio", offset))
        qiov.from_buf(0, bs.opaque[offset:offset + bytes])
        acb = BlockAIOCB(info, bs, cb, opaque)
        aio_bh_schedule_oneshot(qemu_get_aio_context(), lambda _: cb(opaque, 0))
        return acb

    drv = BlockDriver(format_name="direct-test", bdrv_open=op,
                      bdrv_getlength=lambda bs: len(bs.opaque),
                      bdrv_co_preadv=co_preadv, bdrv_aio_preadv=aio_preadv)
    bdrv_register(drv)
    try:
        with bdrv_open(None, {"driver": "direct-test"}, BDRV_O_RDWR) as bs:
            bs.opaque[8192:8200] = b"12345678"
            done = []
            for off in (8192, 4096):
                bdrv_aio_preadv(bs, off, QEMUIOVector(bytearray(8)), 0,
                                lambda o, r: done.append((o, r)), off)
            _wait(lambda: len(done) == 2)
            assert sorted(done) == [(4096, 0), (8192, 0)]
            assert calls == [("aio", 8192), ("co", 4096)]
    finally:
        bdrv_unregister(drv)


def test_synchronous_completions_keep_order_and_never_run_early():
    """Requests that finish inside their submit (null-co) call back from a
    BH, in submission order, never before the submit returned; what those
    callbacks submit calls back in a later aio_bh_poll."""
    with bdrv_open(None, {"driver": "null-co", "size": 1 << 20}, BDRV_O_RDWR) as bs:
        ctx = bdrv_get_aio_context(bs)
        order = []
        submitted = []

        def cb(i, ret):
            assert ret == 0 and i in submitted
            order.append(i)
            if i < 5:
                submitted.append(i + 100)
                bdrv_aio_preadv(bs, 0, QEMUIOVector(bytearray(512)), 0, cb, i + 100)

        for i in range(10):
            bdrv_aio_preadv(bs, 0, QEMUIOVector(bytearray(512)), 0, cb, i)
            submitted.append(i)
        assert order == []
        aio_poll(ctx, False)
        assert order == list(range(10))  # the new requests wait for the next poll
        aio_poll(ctx, False)
        assert order == list(range(10)) + [100, 101, 102, 103, 104]


def test_synchronous_completion_callback_can_poll_for_the_next():
    """A callback that runs a nested event loop (bdrv_pread) while other
    completions are queued behind it does not deadlock: the nested loop
    delivers them (the completion BH is re-entrant)."""
    with bdrv_open(None, {"driver": "null-co", "size": 1 << 20}, BDRV_O_RDWR) as bs:
        order = []

        ctx = bdrv_get_aio_context(bs)

        def cb(i, ret):
            order.append(i)
            if i == 0:
                # Waits in a nested aio_poll for the completions queued
                # behind this one.
                n = 0
                while 2 not in order:
                    aio_poll(ctx, True)
                    n += 1
                    assert n < 1000, "queued completions never delivered"
                assert bdrv_pread(bs, 0, 512, bytearray(512)) == 0
                order.append("nested-done")

        for i in range(3):
            bdrv_aio_preadv(bs, 0, QEMUIOVector(bytearray(512)), 0, cb, i)
        _wait(lambda: len(order) == 4)
        assert order == [0, 1, 2, "nested-done"]
        bdrv_drain(bs)
