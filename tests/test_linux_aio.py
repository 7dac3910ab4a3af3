# SPDX-License-Identifier: GPL-2.0-or-later
"""Tests of the Linux native AIO driver (pyaioctx.block.linux_aio).

Everything runs against the real kernel on a file on disk (O_DIRECT is
refused by tmpfs).  The module is skipped, with the probe's reason, where
Linux AIO is unavailable.
"""

from __future__ import annotations

import errno
import os
import random

import pytest

import pyaioctx as q
import pyaioctx.coroutine as C
from pyaioctx.block import linux_aio as L
from pyaioctx.block.raw_aio import QEMU_AIO_FLUSH, QEMU_AIO_READ, QEMU_AIO_WRITE
from pyaioctx.iov import QEMUIOVector, qemu_memalign

from helpers import timer_runs_during_endless_chain

_ok, _why = L.laio_probe()
pytestmark = pytest.mark.skipif(not _ok, reason=f"Linux AIO unavailable: {_why}")

BS = 4096
NBLOCKS = 256


@pytest.fixture
def image(disk_dir):
    """A 1 MiB file of random data, opened O_DIRECT; yields (fd, data)."""
    path = disk_dir / "laio.img"
    data = os.urandom(BS * NBLOCKS)
    path.write_bytes(data)
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    except OSError as exc:  # pragma: no cover - depends on the filesystem
        pytest.skip(f"O_DIRECT not supported on the test directory: {exc}")
    try:
        yield fd, bytearray(data), path
    finally:
        os.close(fd)


@pytest.fixture
def ctx():
    c = q.aio_context_new()
    yield c
    if not c.closed:
        q.aio_context_unref(c)


def _wait(ctx, pred, limit=100000):
    for _ in range(limit):
        if pred():
            return
        q.aio_poll(ctx, True)
    raise AssertionError("condition not reached")


def _buf(fill=None):
    b = qemu_memalign(BS, BS)
    if fill is not None:
        b[:] = fill
    return b


def test_single_read_write(ctx, image):
    """A write then a read through the callback path; data checked."""
    fd, data, _ = image
    s = L.aio_setup_linux_aio(ctx)
    res = []
    wbuf = _buf(os.urandom(BS))
    L.laio_submit(None, s, fd, 3 * 8, QEMUIOVector(wbuf), 8,
                  lambda o, r: res.append(("w", r)), None, QEMU_AIO_WRITE)
    _wait(ctx, lambda: res)
    rbuf = _buf()
    L.laio_submit(None, s, fd, 3 * 8, QEMUIOVector(rbuf), 8,
                  lambda o, r: res.append(("r", r)), None, QEMU_AIO_READ)
    _wait(ctx, lambda: len(res) == 2)
    assert res == [("w", 0), ("r", 0)]
    assert bytes(rbuf) == bytes(wbuf)
    assert s.io_q.in_flight == 0 and s.io_q.in_queue == 0


def test_more_requests_than_max_events(ctx, image):
    """1,000 reads (far past MAX_EVENTS) all complete exactly once, data right."""
    fd, data, _ = image
    s = L.aio_setup_linux_aio(ctx)
    n = 1000
    counts = [0] * n
    rets = [None] * n
    bufs = [_buf() for _ in range(n)]
    blocks = [random.randrange(NBLOCKS) for _ in range(n)]

    def cb(i, ret):
        counts[i] += 1
        rets[i] = ret

    for i in range(n):
        L.laio_submit(None, s, fd, blocks[i] * 8, QEMUIOVector(bufs[i]), 8, cb, i, QEMU_AIO_READ)
        assert s.io_q.in_flight <= L.MAX_EVENTS
    _wait(ctx, lambda: all(counts))
    assert counts == [1] * n
    assert rets == [0] * n
    for i in range(n):
        assert bytes(bufs[i]) == bytes(data[blocks[i] * BS:(blocks[i] + 1) * BS])
    assert (s.io_q.in_flight, s.io_q.in_queue, s.io_q.blocked) == (0, 0, False)
    assert not q.aio_poll(ctx, False)


def _slots_all_free(s):
    # Every iocb slot is back on the free list exactly once, owned by no one.
    return (sorted(s._free_iocbs) == list(range(len(s._iocbs)))
            and not any(s._owner) and len(s._iocb_addrs) == len(s._iocbs))


def test_iocb_slots_carry_their_number_and_come_back(ctx, image):
    """Each request's iocb is a numbered slot whose aio_data is the number
    (the kernel hands it back in the event); more requests prepared at once
    than max_in_flight add slots; every slot comes back free, owned by no
    one, and a second round reuses them."""
    fd, data, _ = image
    s = L.aio_setup_linux_aio(ctx)
    assert len(s._iocbs) == s.max_in_flight and _slots_all_free(s)
    n = 300
    res = {}
    L.laio_io_plug(None, s)  # all 300 are prepared before any completes
    acbs = [L.laio_submit(None, s, fd, (i % NBLOCKS) * 8, QEMUIOVector(_buf()), 8,
                          lambda i, r: res.__setitem__(i, res.get(i, 0) - 1 if r else 1), i,
                          QEMU_AIO_READ) for i in range(n)]
    slots = [a.iocb for a in acbs]
    assert sorted(slots) == list(range(n)) and len(s._iocbs) == n
    for a in acbs:
        assert s._owner[a.iocb] is a
        assert s._iocbs[a.iocb].aio_data == a.iocb
        assert a.iocb_addr == s._iocb_addrs[a.iocb] == L.aio_abi.iocb_address(s._iocbs[a.iocb])
    L.laio_io_unplug(None, s)
    _wait(ctx, lambda: len(res) == n and s.io_q.in_flight == 0)
    assert res == {i: 1 for i in range(n)}
    assert _slots_all_free(s) and all(a.iocb is None for a in acbs)
    # A second round at the same depth takes the same slots: no growth.
    res.clear()
    for i in range(n):
        L.laio_submit(None, s, fd, i * 8 % (NBLOCKS * 8), QEMUIOVector(_buf()), 8,
                      lambda i, r: res.__setitem__(i, r), i, QEMU_AIO_READ)
    _wait(ctx, lambda: len(res) == n and s.io_q.in_flight == 0)
    assert set(res.values()) == {0} and len(s._iocbs) == n and _slots_all_free(s)


def _plugged_reads(s, fd, n, res):
    # Plug, then queue n one-block reads whose callbacks log (i, ret) in res.
    L.laio_io_plug(None, s)
    return [L.laio_submit(None, s, fd, i * 8, QEMUIOVector(_buf()), 8,
                          lambda i, r: res.append((i, r)), i, QEMU_AIO_READ) for i in range(n)]


def test_cancelled_and_failed_requests_free_their_slots(ctx, image):
    """A request cancelled while queued and one the kernel refuses (bad fd)
    give their slots back, exactly once."""
    fd, _, _ = image
    s = L.aio_setup_linux_aio(ctx)
    res = []
    acbs = _plugged_reads(s, fd, 3, res)
    acbs.append(L.laio_submit(None, s, 987654, 0, QEMUIOVector(_buf()), 8,
                              lambda i, r: res.append((i, r)), 3, QEMU_AIO_READ))
    q.bdrv_aio_cancel(acbs[1])
    assert res == [(1, -errno.ECANCELED)] and s._owner[acbs[0].iocb] is acbs[0]
    assert acbs[1].iocb is None and acbs[1] not in s._owner
    L.laio_io_unplug(None, s)
    _wait(ctx, lambda: len(res) == 4 and s.io_q.in_flight == 0)
    assert sorted(res) == [(0, 0), (1, -errno.ECANCELED), (2, 0), (3, -errno.EBADF)]
    assert _slots_all_free(s) and len(s._iocbs) == s.max_in_flight


@pytest.mark.parametrize("bad_fd", [-1, -5])
def test_negative_fd_is_the_kernels_ebadf(ctx, image, bad_fd):
    """A negative fd reaches the kernel as its u32, as in C, and fails with
    -EBADF through the callback; nothing else is disturbed."""
    fd, data, _ = image
    s = L.aio_setup_linux_aio(ctx)
    res = []
    L.laio_submit(None, s, bad_fd, 0, QEMUIOVector(_buf()), 8,
                  lambda o, r: res.append((o, r)), "bad", QEMU_AIO_READ)
    good = _buf()
    L.laio_submit(None, s, fd, 8, QEMUIOVector(good), 8,
                  lambda o, r: res.append((o, r)), "good", QEMU_AIO_READ)
    _wait(ctx, lambda: len(res) == 2 and s.io_q.in_flight == 0)
    assert sorted(res) == [("bad", -errno.EBADF), ("good", 0)]
    assert bytes(good) == bytes(data[BS:2 * BS]) and _slots_all_free(s)


def test_plug_unplug_batches_submissions(ctx, image):
    """While plugged nothing is submitted; the last unplug submits in one call."""
    fd, _, _ = image
    s = L.aio_setup_linux_aio(ctx)
    done = []
    L.laio_io_plug(None, s)
    L.laio_io_plug(None, s)  # nests
    before = s.submit_calls
    for i in range(64):
        L.laio_submit(None, s, fd, i * 8, QEMUIOVector(_buf()), 8,
                      lambda o, r: done.append(r), None, QEMU_AIO_READ)
    assert s.submit_calls == before
    assert (s.io_q.plugged, s.io_q.in_queue, s.io_q.in_flight) == (2, 64, 0)
    L.laio_io_unplug(None, s)
    assert s.submit_calls == before and s.io_q.in_queue == 64
    L.laio_io_unplug(None, s)
    assert s.submit_calls == before + 1
    _wait(ctx, lambda: len(done) == 64)
    assert done == [0] * 64
    with pytest.raises(RuntimeError, match="unplug"):
        L.laio_io_unplug(None, s)


def test_plugged_queue_submits_at_max_events(ctx, image):
    """Plugged requests are held until MAX_EVENTS are queued (the seed's rule)."""
    fd, _, _ = image
    s = L.aio_setup_linux_aio(ctx)
    done = []
    L.laio_io_plug(None, s)
    for i in range(L.MAX_EVENTS - 1):
        L.laio_submit(None, s, fd, (i % NBLOCKS) * 8, QEMUIOVector(_buf()), 8,
                      lambda o, r: done.append(r), None, QEMU_AIO_READ)
    assert s.submit_calls == 0 and s.io_q.in_queue == L.MAX_EVENTS - 1
    L.laio_submit(None, s, fd, 0, QEMUIOVector(_buf()), 8,
                  lambda o, r: done.append(r), None, QEMU_AIO_READ)
    assert s.submit_calls == 1 and s.io_q.in_queue == 0
    L.laio_io_unplug(None, s)
    _wait(ctx, lambda: len(done) == L.MAX_EVENTS)
    assert set(done) == {0}


def test_aio_max_batch_caps_plugged_batches(ctx, image):
    """aio_context_set_aio_params(ctx, n) submits every n queued (later QEMU)."""
    fd, _, _ = image
    q.aio_context_set_aio_params(ctx, 8)
    s = L.aio_setup_linux_aio(ctx)
    done = []
    L.laio_io_plug(None, s)
    for i in range(20):
        L.laio_submit(None, s, fd, i * 8, QEMUIOVector(_buf()), 8,
                      lambda o, r: done.append(r), None, QEMU_AIO_READ)
    assert s.submit_calls == 2 and s.io_q.in_queue == 4
    L.laio_io_unplug(None, s)
    _wait(ctx, lambda: len(done) == 20)


def test_short_read_at_eof_zero_fills(ctx, image):
    """A read crossing EOF returns 0 and the part past EOF is zeros."""
    fd, data, _ = image
    s = L.aio_setup_linux_aio(ctx)
    buf = qemu_memalign(BS, 2 * BS)
    buf[:] = b"\xaa" * (2 * BS)
    res = []
    L.laio_submit(None, s, fd, (NBLOCKS - 1) * 8, QEMUIOVector(buf), 16,
                  lambda o, r: res.append(r), None, QEMU_AIO_READ)
    _wait(ctx, lambda: res)
    assert res == [0]
    assert bytes(buf[:BS]) == bytes(data[-BS:])
    assert bytes(buf[BS:]) == bytes(BS)


def test_short_write_is_enospc(ctx, disk_dir):
    """A write the kernel completes short reports -ENOSPC (seed rule).

    A pipe accepts at most its capacity in one non-blocking write, which
    makes a real short write without a full disk.
    """
    r, w = os.pipe()
    try:
        os.set_blocking(w, False)
        import fcntl

        cap = fcntl.fcntl(w, 1032)  # F_GETPIPE_SZ
        s = L.aio_setup_linux_aio(ctx)
        big = bytearray(cap * 2)
        res = []
        L.laio_submit(None, s, w, 0, QEMUIOVector(big), len(big) // 512,
                      lambda o, ret: res.append(ret), None, QEMU_AIO_WRITE)
        _wait(ctx, lambda: res)
        assert res[0] in (-errno.ENOSPC, -errno.EAGAIN, -errno.EINVAL, -errno.ESPIPE)
    finally:
        os.close(r)
        os.close(w)


def test_nested_completion(ctx, image):
    """/linux-aio/nested: the first callback polls until all others completed.

    N reads in flight; the first completion callback calls aio_poll(ctx,
    True) until every other request has completed.  Every callback runs
    exactly once, the outer aio_poll returns, in_flight ends at 0, and a
    further aio_poll(ctx, False) reports no progress.
    """
    fd, _, _ = image
    s = L.aio_setup_linux_aio(ctx)
    n = 64
    counts = [0] * n
    order = []
    first = []

    def cb(i, ret):
        assert ret == 0
        counts[i] += 1
        order.append(i)
        if not first:
            first.append(i)
            while sum(counts) < n:
                q.aio_poll(ctx, True)
            order.append("nested-done")

    L.laio_io_plug(None, s)
    for i in range(n):
        L.laio_submit(None, s, fd, i * 8, QEMUIOVector(_buf()), 8, cb, i, QEMU_AIO_READ)
    L.laio_io_unplug(None, s)
    _wait(ctx, lambda: sum(counts) == n)
    assert counts == [1] * n
    assert "nested-done" in order
    assert s.io_q.in_flight == 0 and s.event_idx == 0 and s.event_max == 0
    assert q.aio_poll(ctx, False) is False


def _submit_batch(s, fd, n, cb):
    # n reads in one io_submit, then wait until the kernel finished them
    # all, so the next walk finds every completion in one batch.  Submitted
    # from a coroutine: ioq_submit then does not reap right away, which on
    # a fast disk would run the callbacks inside laio_io_unplug.
    def submit(_):
        L.laio_io_plug(None, s)
        for i in range(n):
            L.laio_submit(None, s, fd, i * 8, QEMUIOVector(_buf()), 8, cb, i, QEMU_AIO_READ)
        L.laio_io_unplug(None, s)

    C.qemu_coroutine_enter(C.qemu_coroutine_create(submit, None))
    assert s.io_q.in_flight == n and not s.io_q.pending
    hdr = s.ring._hdr
    for _ in range(1_000_000):
        if (hdr[3] - hdr[2]) % s.ring.nr == n:
            return
    raise AssertionError("the kernel did not complete the batch")


def test_nested_walk_continues_the_outer_batch(ctx, image):
    """A nested walk takes over the rest of the batch the outer walk took
    from the ring: the requests the outer walk already looked up are
    completed by the nested one, each exactly once, and the outer walk then
    finds the batch finished."""
    fd, _, _ = image
    s = L.aio_setup_linux_aio(ctx)
    if not s.use_ring:
        pytest.skip("this kernel's AIO ring is not readable from user space")
    n = 16
    counts = [0] * n
    seen = []

    def cb(i, ret):
        assert ret == 0
        counts[i] += 1
        if i == 0:
            # Looked up by the outer walk, not yet completed.
            seen.append(len(s._walk_batch) - s.event_idx)
            while sum(counts) < n:
                q.aio_poll(ctx, True)

    _submit_batch(s, fd, n, cb)
    _wait(ctx, lambda: sum(counts) == n)
    assert seen == [n - 1]
    assert counts == [1] * n
    assert s._walk_batch == [] and not any(s._owner)
    assert s.io_q.in_flight == 0 and s.event_idx == 0 and s.event_max == 0
    assert q.aio_poll(ctx, False) is False


def _counting_cb(counts, fail_at):
    # Counts each request's completions; request fail_at's callback raises.
    def cb(i, ret):
        counts[i] += 1
        if i == fail_at:
            raise RuntimeError("callback failed")
    return cb


def test_callback_exception_mid_batch_loses_nothing(ctx, image):
    """A callback that raises ends the walk with the exception; the rest of
    the batch completes on the next aio_poll, each request exactly once."""
    fd, _, _ = image
    s = L.aio_setup_linux_aio(ctx)
    n = 12
    counts = [0] * n
    cb = _counting_cb(counts, 3)
    if not s.use_ring:
        pytest.skip("this kernel's AIO ring is not readable from user space")
    _submit_batch(s, fd, n, cb)
    with pytest.raises(RuntimeError, match="callback failed"):
        _wait(ctx, lambda: sum(counts) == n)
    _wait(ctx, lambda: sum(counts) == n)
    assert counts == [1] * n
    assert s.io_q.in_flight == 0 and not s._walk_batch and _slots_all_free(s)


def test_cleanup_after_a_walk_ended_by_an_exception(image):
    """Requests a failed walk had looked up but not completed are completed
    by laio_cleanup's drain, exactly once; those it completed are not."""
    fd, _, _ = image
    c = q.aio_context_new()
    s = L.aio_setup_linux_aio(c)
    if not s.use_ring:
        q.aio_context_unref(c)
        pytest.skip("this kernel's AIO ring is not readable from user space")
    n = 8
    counts = [0] * n
    cb = _counting_cb(counts, 1)
    _submit_batch(s, fd, n, cb)
    with pytest.raises(RuntimeError):
        q.aio_poll(c, True)
    assert counts[:2] == [1, 1] and sum(counts) == 2
    assert len(s._walk_batch) == n
    q.aio_context_unref(c)  # detaches and cleans up the state: the drain
    assert s.closed
    assert counts == [1] * n
    assert _slots_all_free(s)


def test_nested_completion_syscall_fallback(ctx, image):
    """The same nesting guarantee on the io_getevents fallback path."""
    fd, _, _ = image
    s = L.aio_setup_linux_aio(ctx)
    s.use_ring = False
    n = 48
    counts = [0] * n

    def cb(i, ret):
        counts[i] += 1
        if i == 0:
            while sum(counts) < n:
                q.aio_poll(ctx, True)

    L.laio_io_plug(None, s)
    for i in range(n):
        L.laio_submit(None, s, fd, i * 8, QEMUIOVector(_buf()), 8, cb, i, QEMU_AIO_READ)
    L.laio_io_unplug(None, s)
    _wait(ctx, lambda: sum(counts) == n)
    assert counts == [1] * n
    assert s.getevents_calls > 0
    assert s.io_q.in_flight == 0
    assert q.aio_poll(ctx, False) is False


def test_callback_submits_new_request(ctx, image):
    """A completion callback may submit further requests (a chain of 50)."""
    fd, data, _ = image
    s = L.aio_setup_linux_aio(ctx)
    results = []
    bufs = []

    def cb(i, ret):
        results.append((i, ret))
        if i < 49:
            b = _buf()
            bufs.append(b)
            L.laio_submit(None, s, fd, (i + 1) * 8, QEMUIOVector(b), 8, cb, i + 1, QEMU_AIO_READ)

    b0 = _buf()
    bufs.append(b0)
    L.laio_submit(None, s, fd, 0, QEMUIOVector(b0), 8, cb, 0, QEMU_AIO_READ)
    _wait(ctx, lambda: len(results) == 50)
    assert results == [(i, 0) for i in range(50)]
    assert all(bytes(bufs[i]) == bytes(data[i * BS:(i + 1) * BS]) for i in range(50))


def test_cancel_queued_request(ctx, image):
    """A request still queued (plugged) cancels with -ECANCELED, exactly once."""
    fd, _, _ = image
    s = L.aio_setup_linux_aio(ctx)
    res = []
    acbs = _plugged_reads(s, fd, 4, res)
    q.bdrv_aio_cancel_async(acbs[1])
    assert res == []  # never inside cancel_async
    q.bdrv_aio_cancel(acbs[2])  # synchronous: callback has run on return
    assert (2, -errno.ECANCELED) in res
    L.laio_io_unplug(None, s)
    _wait(ctx, lambda: len(res) == 4)
    assert sorted(res) == [(0, 0), (1, -errno.ECANCELED), (2, -errno.ECANCELED), (3, 0)]
    q.bdrv_aio_cancel(acbs[0])  # already done: a no-op
    assert len(res) == 4


def test_cancel_in_flight_reports_once(ctx, image):
    """In-flight file I/O cannot be cancelled by the kernel: it reports its real result once."""
    fd, _, _ = image
    s = L.aio_setup_linux_aio(ctx)
    res = []
    acbs = [L.laio_submit(None, s, fd, i * 8, QEMUIOVector(_buf()), 8,
                          lambda i, r: res.append((i, r)), i, QEMU_AIO_READ) for i in range(16)]
    for a in acbs:
        q.bdrv_aio_cancel(a)
    assert len(res) == 16
    assert sorted(i for i, _ in res) == list(range(16))
    assert all(r in (0, -errno.ECANCELED) for _, r in res)
    q.aio_poll(ctx, False)
    assert len(res) == 16


def test_misaligned_buffer_and_bad_fd(ctx, image):
    """Misaligned O_DIRECT buffer -> -EINVAL, bad fd -> -EBADF, via the callback."""
    fd, _, _ = image
    s = L.aio_setup_linux_aio(ctx)
    res = []
    raw = bytearray(BS + 1)
    L.laio_submit(None, s, fd, 0, QEMUIOVector(memoryview(raw)[1:]), 8,
                  lambda o, r: res.append(("mis", r)), None, QEMU_AIO_READ)
    L.laio_submit(None, s, 987654, 0, QEMUIOVector(_buf()), 8,
                  lambda o, r: res.append(("badfd", r)), None, QEMU_AIO_READ)
    good = _buf()
    L.laio_submit(None, s, fd, 0, QEMUIOVector(good), 8,
                  lambda o, r: res.append(("good", r)), None, QEMU_AIO_READ)
    _wait(ctx, lambda: len(res) == 3)
    assert sorted(res) == [("badfd", -errno.EBADF), ("good", 0), ("mis", -errno.EINVAL)]


def test_bad_input_raises(ctx, image):
    fd, _, _ = image
    s = L.aio_setup_linux_aio(ctx)
    with pytest.raises(ValueError, match="read-only"):
        ro = QEMUIOVector()
        q.qemu_iovec_add(ro, b"x" * BS, writable=False)
        L.laio_submit(None, s, fd, 0, ro, 8, lambda o, r: None, None, QEMU_AIO_READ)
    with pytest.raises(TypeError, match="QEMUIOVector"):
        L.laio_submit(None, s, fd, 0, bytearray(BS), 8, lambda o, r: None, None, QEMU_AIO_READ)
    with pytest.raises(TypeError, match="callable"):
        L.laio_submit(None, s, fd, 0, QEMUIOVector(_buf()), 8, None, None, QEMU_AIO_READ)
    with pytest.raises(ValueError, match="negative"):
        L.laio_submit(None, s, fd, -8, QEMUIOVector(_buf()), 8, lambda o, r: None, None,
                      QEMU_AIO_READ)
    with pytest.raises(RuntimeError, match="coroutine"):
        L.laio_co_submit(None, s, fd, 0, QEMUIOVector(_buf()), QEMU_AIO_READ)
    # An unsupported request type is refused as QEMU does: no AIOCB.
    assert L.laio_submit(None, s, fd, 0, QEMUIOVector(_buf()), 8, lambda o, r: None, None,
                         0x0010) is None
    assert s.io_q.in_queue == 0 and s.io_q.in_flight == 0


@pytest.mark.parametrize("submit", ["laio_co_submit", "laio_co_submit_direct"])
def test_co_submit(ctx, image, co_backend, submit):
    """laio_co_submit, and laio_co_submit_direct (the file driver's
    coroutine path; a flush falls back to laio_co_submit), from 16
    coroutines: write, read back, read an untouched block, flush; data
    checked, nothing left queued."""
    co_submit = getattr(L, submit)
    fd, data, _ = image
    s = L.aio_setup_linux_aio(ctx)
    q.qemu_set_current_aio_context(ctx)
    results = {}
    payload = [os.urandom(BS) for _ in range(16)]

    def entry(i):
        w = _buf(payload[i])
        r1 = co_submit(None, s, fd, i * BS, QEMUIOVector(w), QEMU_AIO_WRITE)
        rb = _buf()
        r2 = co_submit(None, s, fd, i * BS, QEMUIOVector(rb), QEMU_AIO_READ)
        old = _buf()
        r3 = co_submit(None, s, fd, (16 + i) * BS, QEMUIOVector(old), QEMU_AIO_READ)
        r4 = co_submit(None, s, fd, 0, None, QEMU_AIO_FLUSH)
        results[i] = (r1, r2, r3, r4, bytes(rb), bytes(old))

    try:
        for i in range(16):
            q.qemu_coroutine_enter(q.qemu_coroutine_create(entry, i))
        _wait(ctx, lambda: len(results) == 16)
    finally:
        q.qemu_set_current_aio_context(None)
    for i in range(16):
        r1, r2, r3, r4, got, old = results[i]
        assert (r1, r2, r3) == (0, 0, 0)
        assert r4 in (0, -errno.EINVAL)  # FDSYNC needs Linux >= 4.18
        if L.laio_has_fdsync(fd):
            assert r4 == 0
        assert got == payload[i]
        assert old == bytes(data[(16 + i) * BS:(17 + i) * BS])
    assert s.io_q.in_queue == 0 and s.io_q.in_flight == 0 and not any(s._owner)


def test_co_submit_direct_outside_coroutine_queues_nothing(ctx, image):
    """Outside a coroutine it refuses before anything is queued."""
    fd, _, _ = image
    s = L.aio_setup_linux_aio(ctx)
    with pytest.raises(RuntimeError, match="laio_co_submit must be called from a coroutine"):
        L.laio_co_submit_direct(None, s, fd, 0, QEMUIOVector(_buf()), QEMU_AIO_READ)
    assert s.io_q.in_queue == 0 and s.io_q.in_flight == 0 and not s.io_q.pending


def test_co_submit_direct_short_read_zero_fills(ctx, disk_dir, co_backend):
    """The direct form shares the completion rules: a read across EOF is
    zero-filled and returns 0."""
    path = disk_dir / "short.img"
    path.write_bytes(b"x" * BS)
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    except OSError as exc:  # pragma: no cover - depends on the filesystem
        pytest.skip(f"O_DIRECT not supported on the test directory: {exc}")
    s = L.aio_setup_linux_aio(ctx)
    q.qemu_set_current_aio_context(ctx)
    out = []
    buf = qemu_memalign(BS, 2 * BS)
    buf[:] = b"\xff" * (2 * BS)

    def entry(_):
        out.append(L.laio_co_submit_direct(None, s, fd, 0, QEMUIOVector(buf), QEMU_AIO_READ))

    try:
        q.qemu_coroutine_enter(q.qemu_coroutine_create(entry, None))
        _wait(ctx, lambda: out)
    finally:
        q.qemu_set_current_aio_context(None)
        os.close(fd)
    assert out == [0]
    assert bytes(buf) == b"x" * BS + bytes(BS)


def test_co_submit_error_returns_without_yield(ctx, image, co_backend):
    """A request that fails at submit returns its -errno to the coroutine at once."""
    fd, _, _ = image
    s = L.aio_setup_linux_aio(ctx)
    q.qemu_set_current_aio_context(ctx)
    out = []

    def entry(_):
        out.append(L.laio_co_submit(None, s, 987654, 0, QEMUIOVector(_buf()), QEMU_AIO_READ))

    try:
        q.qemu_coroutine_enter(q.qemu_coroutine_create(entry, None))
    finally:
        q.qemu_set_current_aio_context(None)
    assert out == [-errno.EBADF]  # finished within the enter: no yield needed


class _CountingWake:
    # Counts the completion walk's calls of the general wake.
    def __init__(self, real):
        self.real, self.calls = real, 0

    def __call__(self, co, lt=None):
        self.calls += 1
        return self.real(co, lt)


def test_walk_wakes_in_place_or_through_the_general_wake(ctx, image, co_backend, monkeypatch):
    """The walk wakes a greenlet coroutine it finds parked by its own
    greenlet itself; a coroutine parked by another coroutine's greenlet (it
    was entered from inside that one), and every thread-backend coroutine,
    go through _wake_unless_entered.  Either way each request returns its
    result to its coroutine once, and the coroutine runs on to its end."""
    fd, data, _ = image
    s = L.aio_setup_linux_aio(ctx)
    wake = _CountingWake(L._wake_unless_entered)
    monkeypatch.setattr(L, "_wake_unless_entered", wake)
    q.qemu_set_current_aio_context(ctx)
    out = []

    def reader(i):
        b = _buf()
        ret = L.laio_co_submit_direct(None, s, fd, i * BS, QEMUIOVector(b), QEMU_AIO_READ)
        out.append((i, ret, bytes(b) == bytes(data[i * BS:(i + 1) * BS])))

    def outer(_):
        # reader(99) is entered from this coroutine, so it yields back to
        # this coroutine's greenlet, which then ends.
        q.qemu_coroutine_enter(q.qemu_coroutine_create(reader, 99))
        out.append("outer done")

    try:
        for i in range(8):
            q.qemu_coroutine_enter(q.qemu_coroutine_create(reader, i))
        _wait(ctx, lambda: len(out) == 8)
        in_place = 8 - wake.calls
        q.qemu_coroutine_enter(q.qemu_coroutine_create(outer, None))
        assert out[-1] == "outer done"
        calls = wake.calls
        _wait(ctx, lambda: len(out) == 10)
    finally:
        q.qemu_set_current_aio_context(None)
    assert sorted(out[:8]) == [(i, 0, True) for i in range(8)]
    assert out[9] == (99, 0, True)
    if co_backend == "greenlet":
        assert in_place == 8
        assert wake.calls == calls + 1  # the one parked by another greenlet
    else:
        assert in_place == 0 and wake.calls == calls + 1
    assert _slots_all_free(s)


def test_attach_detach_between_contexts(image):
    """A state moved to another context completes its requests there."""
    fd, data, _ = image
    a = q.aio_context_new()
    b = q.aio_context_new()
    try:
        s = L.laio_init()
        L.laio_attach_aio_context(s, a)
        res = []
        L.laio_submit(None, s, fd, 0, QEMUIOVector(_buf()), 8, lambda o, r: res.append("a"),
                      None, QEMU_AIO_READ)
        _wait(a, lambda: res)
        L.laio_detach_aio_context(s, a)
        L.laio_attach_aio_context(s, b)
        buf = _buf()
        L.laio_submit(None, s, fd, 8, QEMUIOVector(buf), 8, lambda o, r: res.append("b"),
                      None, QEMU_AIO_READ)
        _wait(b, lambda: len(res) == 2)
        assert res == ["a", "b"]
        assert bytes(buf) == bytes(data[BS:2 * BS])
        assert q.aio_poll(a, False) is False
        with pytest.raises(RuntimeError, match="already attached"):
            L.laio_attach_aio_context(s, a)
        L.laio_detach_aio_context(s, b)
        L.laio_cleanup(s)
        with pytest.raises(RuntimeError, match="cleaned up"):
            L.laio_attach_aio_context(s, a)
    finally:
        q.aio_context_unref(a)
        q.aio_context_unref(b)


def test_eagain_and_partial_submit(ctx, image):
    """A kernel queue smaller than our queue: -EAGAIN / partial submits lose nothing.

    The kernel context is created for 1 event (it rounds up internally, to
    a few per CPU) while the driver is allowed 256 in flight, so io_submit
    really accepts a prefix and then returns -EAGAIN.
    """
    fd, data, _ = image
    s = L.LinuxAioState(1, max_in_flight=256)
    L.laio_attach_aio_context(s, ctx)
    try:
        n = 256
        counts = [0] * n
        rets = []
        bufs = [_buf() for _ in range(n)]

        def cb(i, ret):
            counts[i] += 1
            rets.append(ret)

        L.laio_io_plug(None, s)
        for i in range(n):
            L.laio_submit(None, s, fd, (i % NBLOCKS) * 8, QEMUIOVector(bufs[i]), 8, cb, i,
                          QEMU_AIO_READ)
        L.laio_io_unplug(None, s)
        assert s.io_q.blocked, "the kernel accepted everything: no -EAGAIN happened"
        _wait(ctx, lambda: sum(counts) == n)
        assert counts == [1] * n
        assert set(rets) == {0}
        assert all(bytes(bufs[i]) == bytes(data[(i % NBLOCKS) * BS:(i % NBLOCKS + 1) * BS])
                   for i in range(n))
        assert (s.io_q.in_flight, s.io_q.in_queue, s.io_q.blocked) == (0, 0, False)
    finally:
        L.laio_detach_aio_context(s, ctx)
        L.laio_cleanup(s)


def test_polling_completes_requests(ctx, image):
    """With adaptive polling on, the io_poll handler reaps the ring."""
    fd, _, _ = image
    # A window far above the device's latency, even on a loaded machine:
    # adaptive polling only grows while requests finish within it.
    q.aio_context_set_poll_params(ctx, 5_000_000, 2, 2)
    s = L.aio_setup_linux_aio(ctx)
    done = []
    polled = 0
    for round_ in range(20):
        L.laio_submit(None, s, fd, (round_ % NBLOCKS) * 8, QEMUIOVector(_buf()), 8,
                      lambda o, r: done.append(r), None, QEMU_AIO_READ)
        _wait(ctx, lambda: len(done) == round_ + 1)
        # One slow request (beyond poll_max_ns) shrinks the window again, so
        # look at the whole run, not only its end.
        polled = max(polled, ctx.poll_ns)
    assert done == [0] * 20
    assert polled > 0


def test_cleanup_with_context_leaves_no_fd(image):
    """The per-context state is destroyed with its AioContext; no fd remains."""
    fd, _, _ = image
    before = len(os.listdir("/proc/self/fd"))
    c = q.aio_context_new()
    s = L.aio_setup_linux_aio(c)
    assert L.aio_get_linux_aio(c) is s
    res = []
    L.laio_submit(None, s, fd, 0, QEMUIOVector(_buf()), 8, lambda o, r: res.append(r), None,
                  QEMU_AIO_READ)
    q.aio_context_unref(c)  # waits for the in-flight request; its callback runs
    assert res == [0]
    assert s.closed
    assert len(os.listdir("/proc/self/fd")) == before


def test_laio_init_error_message_names_remedy(monkeypatch):
    """io_setup failing with EAGAIN explains fs.aio-max-nr."""
    from pyaioctx._sys import aio_abi

    monkeypatch.setattr(aio_abi, "io_setup", lambda n: (-errno.EAGAIN, 0))
    with pytest.raises(OSError) as ei:
        L.laio_init()
    assert ei.value.errno == errno.EAGAIN
    assert "aio-max-nr" in str(ei.value)


def _wait_ring(s, n, timeout=10.0):
    """Sleep (without running the event loop) until ``n`` completions wait
    in the user-space ring."""
    import time
    hdr = s.ring._hdr
    deadline = time.monotonic() + timeout
    while (hdr[3] - hdr[2]) % s.ring.nr < n:
        if time.monotonic() > deadline:
            raise AssertionError("completions did not reach the ring")
        time.sleep(0.001)


def test_walk_submits_first_half_before_it_ends(ctx, image):
    """Requests queued by the callbacks of a walk go to the kernel once half
    of what the walk started with is queued (walk_split), not only at its
    end: the device keeps working while the walk runs."""
    fd, data, _ = image
    s = L.aio_setup_linux_aio(ctx)
    if not s.use_ring:
        pytest.skip("no user-space completion ring on this CPU")
    seen = []
    bufs = []

    def resubmit(i, ret):
        assert ret == 0
        b = _buf()
        bufs.append(b)
        L.laio_submit(None, s, fd, (8 + i) * 8, QEMUIOVector(b), 8,
                      lambda o, r: seen.append(("second", o, r)), i, QEMU_AIO_READ)
        seen.append(("first", i, s.io_q.in_queue, s.io_q.in_flight))

    first = [_buf() for _ in range(8)]
    L.laio_io_plug(None, s)
    for i in range(8):
        L.laio_submit(None, s, fd, i * 8, QEMUIOVector(first[i]), 8, resubmit, i, QEMU_AIO_READ)
    # Submit without the reap that laio_io_unplug does right after io_submit,
    # so that all eight completions wait in the ring for one walk.
    s.io_q.plugged -= 1
    L._ioq_submit(s)
    _wait_ring(s, 8)
    _wait(ctx, lambda: len([e for e in seen if e[0] == "first"]) == 8)
    queued = [e[2] for e in seen if e[0] == "first"]
    # The fourth callback's request completes the first half: queued 4 -> 0.
    assert queued[:4] == [1, 2, 3, 0]
    _wait(ctx, lambda: len(seen) == 16)
    assert sorted(e[1] for e in seen if e[0] == "second") == list(range(8))
    assert all(e[2] == 0 for e in seen if e[0] == "second")
    assert [bytes(b) for b in first] == [bytes(data[i * BS:(i + 1) * BS]) for i in range(8)]


def test_walk_yields_to_event_loop_on_endless_completions(ctx, disk_dir):
    """A device that completes requests as fast as the callbacks submit them
    (page-cache reads finish inside io_submit) must not starve the event
    loop: the walk stops after max_in_flight completions and its BH goes on
    after timers and other handlers ran."""
    path = disk_dir / "laio-cache.img"
    path.write_bytes(os.urandom(BS * 16))
    fd = os.open(path, os.O_RDONLY)  # buffered: each read completes at once
    try:
        s = L.aio_setup_linux_aio(ctx)
        if not s.use_ring:
            pytest.skip("no user-space completion ring on this CPU")
        buf = _buf()
        qiov = QEMUIOVector(buf)
        at_timer, total = timer_runs_during_endless_chain(
            ctx, lambda cb: L.laio_submit(None, s, fd, 0, qiov, 8, cb, None, QEMU_AIO_READ))
        assert at_timer >= 0, "the timer never ran"
        assert at_timer < total, "the completion walk ran the whole chain in one go"
    finally:
        os.close(fd)
