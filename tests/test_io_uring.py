# SPDX-License-Identifier: GPL-2.0-or-later
"""Tests of the io_uring driver (pyaioctx.block.io_uring).

Everything runs against the real kernel, on files on disk (O_DIRECT is
refused by tmpfs).  The module is skipped, with the probe's reason, where
io_uring is unavailable.  Cases the kernel will not produce on demand
(short reads of a regular file, -EAGAIN / -EINTR completions, a refused
submit) are fed in through a ring wrapper that rewrites what the real ring
reports, so the real request still runs.
"""

from __future__ import annotations

import errno
import os
import random

import pytest

import pyaioctx as q
import pyaioctx.coroutine as C
from pyaioctx.block import io_uring as U
from pyaioctx.block.raw_aio import QEMU_AIO_FLUSH, QEMU_AIO_READ, QEMU_AIO_WRITE
from pyaioctx.iov import QEMUIOVector, qemu_memalign

from helpers import timer_runs_during_endless_chain

_ok, _why = U.luring_probe()
pytestmark = pytest.mark.skipif(not _ok, reason=f"io_uring unavailable: {_why}")

BS = 4096
NBLOCKS = 256


def _open_image(path, data, direct):
    path.write_bytes(data)
    flags = os.O_RDWR | (os.O_DIRECT if direct else 0)
    try:
        return os.open(path, flags)
    except OSError as exc:  # pragma: no cover - depends on the filesystem
        pytest.skip(f"O_DIRECT not supported on the test directory: {exc}")


@pytest.fixture
def image(disk_dir):
    """A 1 MiB file of random data, opened O_DIRECT; yields (fd, data, path)."""
    data = os.urandom(BS * NBLOCKS)
    path = disk_dir / "uring.img"
    fd = _open_image(path, data, True)
    try:
        yield fd, bytearray(data), path
    finally:
        os.close(fd)


@pytest.fixture(params=["direct", "buffered"])
def any_image(request, disk_dir):
    """The same image opened O_DIRECT and buffered."""
    data = os.urandom(BS * NBLOCKS)
    path = disk_dir / "uring-any.img"
    fd = _open_image(path, data, request.param == "direct")
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


@pytest.fixture(params=["thread", "greenlet"])
def co_backend(request):
    if request.param not in C.available_backends():
        pytest.skip(f"coroutine backend {request.param!r} unavailable: greenlet not importable")
    prev = C.get_backend().name
    C.set_backend(request.param)
    try:
        yield request.param
    finally:
        C.set_backend(prev)


def _wait(ctx, pred, limit=100000):
    for _ in range(limit):
        if pred():
            return
        q.aio_poll(ctx, True)
    raise AssertionError("condition not reached")


def _buf(fill=None, size=BS):
    b = qemu_memalign(BS, size)
    if fill is not None:
        b[:] = fill
    return b


def _run_co(ctx, entry, n=1):
    """Run ``entry(i)`` for i < n in coroutines of ``ctx``; wait for all."""
    done = []

    def wrap(i):
        entry(i)
        done.append(i)

    q.qemu_set_current_aio_context(ctx)
    try:
        for i in range(n):
            q.qemu_coroutine_enter(q.qemu_coroutine_create(wrap, i))
        _wait(ctx, lambda: len(done) == n)
    finally:
        q.qemu_set_current_aio_context(None)


class RingTap:
    """Wraps a real Ring; ``rewrite(user_data, res) -> res`` edits reaped CQEs.

    ``refuse_submits`` makes that many submit calls fail with -EAGAIN
    without entering the kernel (the SQEs stay in the ring, as they would).
    """

    def __init__(self, ring, rewrite=None, refuse_submits=0):
        self._ring = ring
        self.rewrite = rewrite
        self.refuse_submits = refuse_submits

    def __getattr__(self, name):
        return getattr(self._ring, name)

    def reap(self):
        for ud, res, flags in self._ring.reap():
            if self.rewrite is not None:
                res = self.rewrite(ud, res)
            yield ud, res, flags

    def submit(self, wait_nr=0):
        if self.refuse_submits:
            self.refuse_submits -= 1
            return -errno.EAGAIN
        return self._ring.submit(wait_nr)


# --------------------------------------------------------------------------
# Data correctness


def test_write_then_read(ctx, any_image):
    """Random data written with writev reads back with readv (callback path)."""
    fd, data, _ = any_image
    s = U.aio_setup_linux_io_uring(ctx)
    res = []
    payload = [os.urandom(BS) for _ in range(8)]
    offs = random.sample(range(NBLOCKS), 8)
    for i in range(8):
        U.luring_submit(None, s, fd, offs[i] * BS, QEMUIOVector(_buf(payload[i])),
                        QEMU_AIO_WRITE, lambda o, r: res.append(("w", o, r)), i)
    _wait(ctx, lambda: len(res) == 8)
    bufs = [_buf(b"\xee" * BS) for _ in range(8)]
    for i in range(8):
        U.luring_submit(None, s, fd, offs[i] * BS, QEMUIOVector(bufs[i]), QEMU_AIO_READ,
                        lambda o, r: res.append(("r", o, r)), i)
    _wait(ctx, lambda: len(res) == 16)
    assert sorted(res) == sorted([("w", i, 0) for i in range(8)] + [("r", i, 0) for i in range(8)])
    for i in range(8):
        assert bytes(bufs[i]) == payload[i]
    assert (s.io_q.in_flight, s.io_q.in_queue, s.io_q.blocked) == (0, 0, False)


def test_multi_iov_read(ctx, any_image):
    """A vector of several aligned buffers is filled in order."""
    fd, data, _ = any_image
    s = U.aio_setup_linux_io_uring(ctx)
    bufs = [_buf() for _ in range(3)]
    qiov = QEMUIOVector(*bufs)
    res = []
    U.luring_submit(None, s, fd, 10 * BS, qiov, QEMU_AIO_READ, lambda o, r: res.append(r), None)
    _wait(ctx, lambda: res)
    assert res == [0]
    assert b"".join(bytes(b) for b in bufs) == bytes(data[10 * BS:13 * BS])


def test_co_write_read_flush(ctx, any_image, co_backend):
    """luring_co_submit from 16 coroutines: write, fdatasync, fsync, read back."""
    fd, _, _ = any_image
    s = U.aio_setup_linux_io_uring(ctx)
    results = {}
    payload = [os.urandom(BS) for _ in range(16)]

    def entry(i):
        w = _buf(payload[i])
        r1 = U.luring_co_submit(None, s, fd, i * BS, QEMUIOVector(w), QEMU_AIO_WRITE)
        r2 = U.luring_co_submit(None, s, fd, 0, None, QEMU_AIO_FLUSH)
        r3 = U.luring_co_submit(None, s, fd, 0, None, QEMU_AIO_FLUSH, datasync=False)
        rb = _buf()
        r4 = U.luring_co_submit(None, s, fd, i * BS, QEMUIOVector(rb), QEMU_AIO_READ)
        results[i] = (r1, r2, r3, r4, bytes(rb))

    _run_co(ctx, entry, 16)
    for i in range(16):
        assert results[i] == (0, 0, 0, 0, payload[i])


def test_co_submit_direct(ctx, any_image, co_backend):
    """luring_co_submit_direct (the file driver's coroutine path): the same
    results as luring_co_submit, from 16 coroutines."""
    fd, data, _ = any_image
    s = U.aio_setup_linux_io_uring(ctx)
    payload = [os.urandom(BS) for _ in range(16)]
    results = {}

    def entry(i):
        w = _buf(payload[i])
        r1 = U.luring_co_submit_direct(None, s, fd, i * BS, QEMUIOVector(w), QEMU_AIO_WRITE)
        rb = _buf()
        r2 = U.luring_co_submit_direct(None, s, fd, i * BS, QEMUIOVector(rb), QEMU_AIO_READ)
        old = _buf()
        r3 = U.luring_co_submit_direct(None, s, fd, (16 + i) * BS, QEMUIOVector(old),
                                       QEMU_AIO_READ)
        results[i] = (r1, r2, r3, bytes(rb), bytes(old))

    _run_co(ctx, entry, 16)
    for i in range(16):
        r1, r2, r3, got, old = results[i]
        assert (r1, r2, r3) == (0, 0, 0)
        assert got == payload[i]
        assert old == bytes(data[(16 + i) * BS:(17 + i) * BS])


def test_co_submit_direct_outside_coroutine_queues_nothing(ctx, image):
    """Outside a coroutine it refuses before anything is queued."""
    fd, _, _ = image
    s = U.aio_setup_linux_io_uring(ctx)
    with pytest.raises(RuntimeError, match="luring_co_submit must be called from a coroutine"):
        U.luring_co_submit_direct(None, s, fd, 0, QEMUIOVector(_buf()), QEMU_AIO_READ)
    assert s.io_q.in_queue == 0 and not s.io_q.pending


def test_fsync_ordering(ctx, disk_dir, co_backend):
    """Write, fsync, then read back through a second (O_DIRECT) descriptor."""
    path = disk_dir / "order.img"
    path.write_bytes(bytes(16 * BS))
    fd = os.open(path, os.O_RDWR)
    try:
        dfd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as exc:  # pragma: no cover
        os.close(fd)
        pytest.skip(f"O_DIRECT not supported: {exc}")
    s = U.aio_setup_linux_io_uring(ctx)
    payload = os.urandom(4 * BS)
    out = []

    def entry(_):
        out.append(U.luring_co_submit(None, s, fd, 4 * BS, QEMUIOVector(bytearray(payload)),
                                      QEMU_AIO_WRITE))
        out.append(U.luring_co_submit(None, s, fd, 0, None, QEMU_AIO_FLUSH))
        rb = _buf(size=4 * BS)
        out.append(U.luring_co_submit(None, s, dfd, 4 * BS, QEMUIOVector(rb), QEMU_AIO_READ))
        out.append(bytes(rb))

    try:
        _run_co(ctx, entry)
    finally:
        os.close(fd)
        os.close(dfd)
    assert out == [0, 0, 0, payload]


def test_more_requests_than_the_ring_holds(ctx, image):
    """1,000 reads through a 4-entry ring complete exactly once, data right."""
    fd, data, _ = image
    s = U.luring_init(4)
    U.luring_attach_aio_context(s, ctx)
    try:
        assert s.sq_entries == 4
        n = 1000
        counts = [0] * n
        rets = [None] * n
        bufs = [_buf() for _ in range(n)]
        blocks = [random.randrange(NBLOCKS) for _ in range(n)]

        def cb(i, ret):
            counts[i] += 1
            rets[i] = ret

        for i in range(n):
            U.luring_submit(None, s, fd, blocks[i] * BS, QEMUIOVector(bufs[i]), QEMU_AIO_READ,
                            cb, i)
            assert s.io_q.in_flight <= s.cq_entries
        _wait(ctx, lambda: all(counts))
        assert counts == [1] * n
        assert rets == [0] * n
        for i in range(n):
            assert bytes(bufs[i]) == bytes(data[blocks[i] * BS:(blocks[i] + 1) * BS])
        assert (s.io_q.in_flight, s.io_q.in_queue) == (0, 0)
    finally:
        U.luring_detach_aio_context(s, ctx)
        U.luring_cleanup(s)


def test_more_requests_than_the_ring_holds_plugged(ctx, image):
    """Plugged: 1,000 queued reads through a 4-entry ring, one unplug."""
    fd, data, _ = image
    s = U.luring_init(4)
    U.luring_attach_aio_context(s, ctx)
    try:
        n = 1000
        counts = [0] * n
        U.luring_io_plug(None, s)
        for i in range(n):
            U.luring_submit(None, s, fd, (i % NBLOCKS) * BS, QEMUIOVector(_buf()), QEMU_AIO_READ,
                            lambda i, r: counts.__setitem__(i, counts[i] + 1), i)
        U.luring_io_unplug(None, s)
        _wait(ctx, lambda: all(counts))
        assert counts == [1] * n
        assert (s.io_q.in_flight, s.io_q.in_queue, s.io_q.plugged) == (0, 0, 0)
    finally:
        U.luring_detach_aio_context(s, ctx)
        U.luring_cleanup(s)


# --------------------------------------------------------------------------
# Batching


def test_plug_unplug_batches_submissions(ctx, image):
    """32 requests under plug are handed to the kernel in one io_uring_enter."""
    fd, _, _ = image
    s = U.aio_setup_linux_io_uring(ctx)
    res = []
    before = s.submit_calls
    U.luring_io_plug(None, s)
    U.luring_io_plug(None, s)  # plugs nest
    for i in range(32):
        U.luring_submit(None, s, fd, i * BS, QEMUIOVector(_buf()), QEMU_AIO_READ,
                        lambda o, r: res.append(r), None)
    U.luring_io_unplug(None, s)
    assert s.submit_calls == before and s.io_q.in_queue == 32 and s.io_q.plugged == 1
    U.luring_io_unplug(None, s)
    assert s.submit_calls == before + 1
    _wait(ctx, lambda: len(res) == 32)
    assert res == [0] * 32
    with pytest.raises(RuntimeError, match="matching"):
        U.luring_io_unplug(None, s)


def test_unplugged_submits_each_request(ctx, image):
    fd, _, _ = image
    s = U.aio_setup_linux_io_uring(ctx)
    res = []
    before = s.submit_calls
    for i in range(8):
        U.luring_submit(None, s, fd, i * BS, QEMUIOVector(_buf()), QEMU_AIO_READ,
                        lambda o, r: res.append(r), None)
    assert s.submit_calls == before + 8
    _wait(ctx, lambda: len(res) == 8)


def test_callbacks_of_one_walk_submit_in_halves(ctx, image):
    """Requests queued by the callbacks of one completion walk go to the
    kernel in batches (an implicit plug): the first half as soon as it is
    queued, so the device works while the walk runs, the rest after it."""
    import time

    fd, data, _ = image
    s = U.aio_setup_linux_io_uring(ctx)
    n = 16
    res = []
    bufs = [_buf() for _ in range(2 * n)]

    queued = []

    def cb(i, ret):
        res.append((i, ret))
        if i < n:
            U.luring_submit(None, s, fd, (i + n) * BS, QEMUIOVector(bufs[i + n]),
                            QEMU_AIO_READ, cb, i + n)
            queued.append(s.io_q.in_queue)

    s._walk_depth += 1  # keep the submit from reaping: all CQEs wait in the ring
    U.luring_io_plug(None, s)
    for i in range(n):
        U.luring_submit(None, s, fd, i * BS, QEMUIOVector(bufs[i]), QEMU_AIO_READ, cb, i)
    U.luring_io_unplug(None, s)
    s._walk_depth -= 1
    deadline = time.monotonic() + 5
    while s.ring.cq_peek() < n and time.monotonic() < deadline:
        s.ring.get_events(0)
        time.sleep(0.001)
    assert s.ring.cq_peek() == n
    before = s.submit_calls
    U._completion_cb(s.e)  # one walk over n completions
    assert sum(1 for i, _ in res if i < n) == n
    assert s.submit_calls - before == 2
    assert queued == [1, 2, 3, 4, 5, 6, 7, 0] * 2
    _wait(ctx, lambda: len(res) == 2 * n)
    assert sorted(res) == [(i, 0) for i in range(2 * n)]
    assert all(bytes(bufs[i]) == bytes(data[i * BS:(i + 1) * BS]) for i in range(2 * n))


def test_plugged_queue_submits_when_sq_full(ctx, image):
    """While plugged, a queue that would fill the SQ ring is submitted."""
    fd, _, _ = image
    s = U.luring_init(8)
    U.luring_attach_aio_context(s, ctx)
    try:
        res = []
        U.luring_io_plug(None, s)
        for i in range(7):
            U.luring_submit(None, s, fd, i * BS, QEMUIOVector(_buf()), QEMU_AIO_READ,
                            lambda o, r: res.append(r), None)
        assert s.submit_calls == 0 and s.io_q.in_queue == 7
        U.luring_submit(None, s, fd, 7 * BS, QEMUIOVector(_buf()), QEMU_AIO_READ,
                        lambda o, r: res.append(r), None)
        assert s.submit_calls == 1 and s.io_q.in_queue == 0
        U.luring_io_unplug(None, s)
        _wait(ctx, lambda: len(res) == 8)
        assert res == [0] * 8
    finally:
        U.luring_detach_aio_context(s, ctx)
        U.luring_cleanup(s)


def test_aio_max_batch_caps_plugged_batches(ctx, image):
    fd, _, _ = image
    q.aio_context_set_aio_params(ctx, 4)
    s = U.aio_setup_linux_io_uring(ctx)
    res = []
    before = s.submit_calls
    U.luring_io_plug(None, s)
    for i in range(16):
        U.luring_submit(None, s, fd, i * BS, QEMUIOVector(_buf()), QEMU_AIO_READ,
                        lambda o, r: res.append(r), None)
    assert s.submit_calls - before == 4
    U.luring_io_unplug(None, s)
    _wait(ctx, lambda: len(res) == 16)


# --------------------------------------------------------------------------
# Re-entrancy


def test_nested_completion(ctx, image):
    """/io_uring/nested: the first callback polls until all others completed.

    N reads in flight; the first completion callback calls aio_poll(ctx,
    True) until every other request has completed.  Every callback runs
    exactly once, the outer aio_poll returns, in_flight ends at 0, and a
    further aio_poll(ctx, False) reports no progress.
    """
    fd, _, _ = image
    s = U.aio_setup_linux_io_uring(ctx)
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

    U.luring_io_plug(None, s)
    for i in range(n):
        U.luring_submit(None, s, fd, i * BS, QEMUIOVector(_buf()), QEMU_AIO_READ, cb, i)
    U.luring_io_unplug(None, s)
    _wait(ctx, lambda: sum(counts) == n)
    assert counts == [1] * n
    assert "nested-done" in order
    assert s.io_q.in_flight == 0 and s.io_q.in_queue == 0
    assert q.aio_poll(ctx, False) is False


def test_nested_completion_first_reaped_by_event_loop(ctx, image):
    """The same, with the first completion delivered by aio_poll, not by unplug."""
    fd, _, _ = image
    s = U.aio_setup_linux_io_uring(ctx)
    n = 32
    counts = [0] * n
    outer_returned = []

    def cb(i, ret):
        counts[i] += 1
        if sum(counts) == 1:
            while sum(counts) < n:
                q.aio_poll(ctx, True)

    # Hide completions from the reap that follows io_uring_enter, so every
    # one of them reaches the event loop.
    s.ring = RingTap(s.ring)
    s._walk_depth += 1
    U.luring_io_plug(None, s)
    for i in range(n):
        U.luring_submit(None, s, fd, i * BS, QEMUIOVector(_buf()), QEMU_AIO_READ, cb, i)
    U.luring_io_unplug(None, s)
    s._walk_depth -= 1
    assert sum(counts) == 0
    while sum(counts) < n:
        outer_returned.append(q.aio_poll(ctx, True))
    assert counts == [1] * n
    assert s.io_q.in_flight == 0
    assert q.aio_poll(ctx, False) is False


def test_callback_submits_new_request(ctx, any_image):
    """A completion callback may submit further requests (a chain of 50)."""
    fd, data, _ = any_image
    s = U.aio_setup_linux_io_uring(ctx)
    results = []
    bufs = []

    def cb(i, ret):
        results.append((i, ret))
        if i < 49:
            b = _buf()
            bufs.append(b)
            U.luring_submit(None, s, fd, (i + 1) * BS, QEMUIOVector(b), QEMU_AIO_READ, cb, i + 1)

    b0 = _buf()
    bufs.append(b0)
    U.luring_submit(None, s, fd, 0, QEMUIOVector(b0), QEMU_AIO_READ, cb, 0)
    _wait(ctx, lambda: len(results) == 50)
    assert results == [(i, 0) for i in range(50)]
    assert all(bytes(bufs[i]) == bytes(data[i * BS:(i + 1) * BS]) for i in range(50))


def test_deep_resubmission_from_callbacks_does_not_recurse(ctx, disk_dir):
    """Cached reads complete inside io_uring_enter; 5,000 chained
    resubmissions from callbacks must not grow the stack."""
    path = disk_dir / "cached.img"
    data = os.urandom(64 * BS)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, len(data), 0)  # warm the page cache
        s = U.aio_setup_linux_io_uring(ctx)
        left = [5000]
        buf = bytearray(BS)

        def cb(_, ret):
            assert ret == 0
            left[0] -= 1
            if left[0] > 0:
                U.luring_submit(None, s, fd, (left[0] % 64) * BS, QEMUIOVector(buf),
                                QEMU_AIO_READ, cb, None)

        U.luring_submit(None, s, fd, 0, QEMUIOVector(buf), QEMU_AIO_READ, cb, None)
        _wait(ctx, lambda: left[0] == 0)
    finally:
        os.close(fd)


def test_walk_yields_to_event_loop_on_endless_completions(ctx, disk_dir):
    """Cached reads complete inside io_uring_enter, as fast as callbacks
    resubmit them: the walk stops after cq_entries completions and its BH
    goes on after timers ran, so the event loop is never starved."""
    path = disk_dir / "cached-endless.img"
    data = os.urandom(16 * BS)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, len(data), 0)  # warm the page cache
        s = U.aio_setup_linux_io_uring(ctx)
        buf = bytearray(BS)
        qiov = QEMUIOVector(buf)
        at_timer, total = timer_runs_during_endless_chain(
            ctx, lambda cb: U.luring_submit(None, s, fd, 0, qiov, QEMU_AIO_READ, cb, None))
        assert at_timer >= 0, "the timer never ran"
        assert at_timer < total, "the completion walk ran the whole chain in one go"
    finally:
        os.close(fd)


def test_co_completion_before_yield(ctx, disk_dir, co_backend):
    """A cached read completes during luring_co_submit: no yield, no re-entry."""
    path = disk_dir / "cached.img"
    data = os.urandom(8 * BS)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, len(data), 0)
        s = U.aio_setup_linux_io_uring(ctx)
        out = []

        def entry(_):
            for i in range(8):
                b = bytearray(BS)
                out.append((U.luring_co_submit(None, s, fd, i * BS, QEMUIOVector(b),
                                               QEMU_AIO_READ), bytes(b)))

        _run_co(ctx, entry)
        assert out == [(0, data[i * BS:(i + 1) * BS]) for i in range(8)]
    finally:
        os.close(fd)


def test_polling_completes_requests(ctx, image):
    """With adaptive polling on, the io_poll handler reaps the CQ ring."""
    fd, _, _ = image
    # A window far above the device's latency, even on a loaded machine:
    # adaptive polling only grows while requests finish within it.
    q.aio_context_set_poll_params(ctx, 5_000_000, 2, 2)
    s = U.aio_setup_linux_io_uring(ctx)
    done = []
    polled = 0
    for round_ in range(20):
        U.luring_submit(None, s, fd, (round_ % NBLOCKS) * BS, QEMUIOVector(_buf()),
                        QEMU_AIO_READ, lambda o, r: done.append(r), None)
        _wait(ctx, lambda: len(done) == round_ + 1)
        # One slow request (beyond poll_max_ns) shrinks the window again, so
        # look at the whole run, not only its end.
        polled = max(polled, ctx.poll_ns)
    assert done == [0] * 20
    assert polled > 0
    assert U._poll_cb(s.e) is False


# --------------------------------------------------------------------------
# Cancellation


def test_cancel_in_flight_pipe_read(ctx):
    """A read on an empty pipe is in flight until cancelled: -ECANCELED, once."""
    r, w = os.pipe()
    try:
        s = U.aio_setup_linux_io_uring(ctx)
        res = []
        acb = U.luring_submit(None, s, r, 0, QEMUIOVector(bytearray(BS)), QEMU_AIO_READ,
                              lambda o, ret: res.append(ret), None)
        for _ in range(3):
            q.aio_poll(ctx, False)
        assert res == [] and s.io_q.in_flight == 1
        q.bdrv_aio_cancel(acb)
        assert res == [-errno.ECANCELED]
        assert s.io_q.in_flight == 0
        _wait(ctx, lambda: s.cancels_in_flight == 0)
        q.aio_poll(ctx, False)
        assert res == [-errno.ECANCELED]
        # The pipe is untouched: data written now is still there.
        os.write(w, b"x")
        assert os.read(r, 1) == b"x"
    finally:
        os.close(r)
        os.close(w)


def test_cancel_async_in_flight_pipe_read(ctx):
    """bdrv_aio_cancel_async never calls back inside; the event loop does, once."""
    r, w = os.pipe()
    try:
        s = U.aio_setup_linux_io_uring(ctx)
        res = []
        acbs = [U.luring_submit(None, s, r, 0, QEMUIOVector(bytearray(16)), QEMU_AIO_READ,
                                lambda o, ret: res.append((o, ret)), i) for i in range(4)]
        for a in acbs:
            q.bdrv_aio_cancel_async(a)
            q.bdrv_aio_cancel_async(a)  # twice: still one callback
        assert res == []
        _wait(ctx, lambda: len(res) == 4)
        assert sorted(res) == [(i, -errno.ECANCELED) for i in range(4)]
        for _ in range(3):
            q.aio_poll(ctx, False)
        assert len(res) == 4
    finally:
        os.close(r)
        os.close(w)


def test_cancel_queued_request(ctx, image):
    """A request still queued (plugged) cancels with -ECANCELED, exactly once."""
    fd, _, _ = image
    s = U.aio_setup_linux_io_uring(ctx)
    res = []
    U.luring_io_plug(None, s)
    acbs = [U.luring_submit(None, s, fd, i * BS, QEMUIOVector(_buf()), QEMU_AIO_READ,
                            lambda i, r: res.append((i, r)), i) for i in range(4)]
    q.bdrv_aio_cancel_async(acbs[1])
    assert res == []  # never inside cancel_async
    assert s.io_q.in_queue == 3
    q.bdrv_aio_cancel(acbs[2])  # synchronous: callback has run on return
    assert (2, -errno.ECANCELED) in res
    U.luring_io_unplug(None, s)
    _wait(ctx, lambda: len(res) == 4)
    assert sorted(res) == [(0, 0), (1, -errno.ECANCELED), (2, -errno.ECANCELED), (3, 0)]
    q.bdrv_aio_cancel(acbs[0])  # already done: a no-op
    assert len(res) == 4


def test_cancel_in_flight_file_reads_report_once(ctx, image):
    """File reads too late to stop report their real result, exactly once."""
    fd, _, _ = image
    s = U.aio_setup_linux_io_uring(ctx)
    res = []
    U.luring_io_plug(None, s)
    acbs = [U.luring_submit(None, s, fd, i * BS, QEMUIOVector(_buf()), QEMU_AIO_READ,
                            lambda i, r: res.append((i, r)), i) for i in range(16)]
    U.luring_io_unplug(None, s)
    for a in acbs:
        q.bdrv_aio_cancel(a)
    assert sorted(i for i, _ in res) == list(range(16))
    assert all(r in (0, -errno.ECANCELED) for _, r in res)
    _wait(ctx, lambda: s.cancels_in_flight == 0)
    assert len(res) == 16


def test_cleanup_cancels_in_flight_pipe_read():
    """Destroying the context cancels a read that would never finish."""
    r, w = os.pipe()
    try:
        c = q.aio_context_new()
        s = U.aio_setup_linux_io_uring(c)
        res = []
        U.luring_submit(None, s, r, 0, QEMUIOVector(bytearray(8)), QEMU_AIO_READ,
                        lambda o, ret: res.append(ret), None)
        q.aio_context_unref(c)
        assert res == [-errno.ECANCELED]
        assert s.closed
    finally:
        os.close(r)
        os.close(w)


# --------------------------------------------------------------------------
# Contexts and lifetime


def test_attach_detach_between_contexts(image):
    """A state moved to another context completes its requests there."""
    fd, data, _ = image
    a = q.aio_context_new()
    b = q.aio_context_new()
    try:
        s = U.luring_init()
        U.luring_attach_aio_context(s, a)
        res = []
        U.luring_submit(None, s, fd, 0, QEMUIOVector(_buf()), QEMU_AIO_READ,
                        lambda o, r: res.append("a"), None)
        _wait(a, lambda: res)
        U.luring_detach_aio_context(s, a)
        U.luring_attach_aio_context(s, b)
        buf = _buf()
        U.luring_submit(None, s, fd, BS, QEMUIOVector(buf), QEMU_AIO_READ,
                        lambda o, r: res.append("b"), None)
        _wait(b, lambda: len(res) == 2)
        assert res == ["a", "b"]
        assert bytes(buf) == bytes(data[BS:2 * BS])
        assert q.aio_poll(a, False) is False
        with pytest.raises(RuntimeError, match="already attached"):
            U.luring_attach_aio_context(s, a)
        with pytest.raises(RuntimeError, match="detach"):
            U.luring_cleanup(s)
        U.luring_detach_aio_context(s, b)
        U.luring_cleanup(s)
        U.luring_cleanup(s)  # idempotent
        with pytest.raises(RuntimeError, match="cleaned up"):
            U.luring_attach_aio_context(s, a)
    finally:
        q.aio_context_unref(a)
        q.aio_context_unref(b)


def test_completion_while_detached_is_picked_up_after_attach(image):
    fd, data, _ = image
    a = q.aio_context_new()
    b = q.aio_context_new()
    try:
        s = U.luring_init()
        U.luring_attach_aio_context(s, a)
        s.ring = RingTap(s.ring)
        s._walk_depth += 1  # keep the submit from reaping at once
        res = []
        buf = _buf()
        U.luring_submit(None, s, fd, 5 * BS, QEMUIOVector(buf), QEMU_AIO_READ,
                        lambda o, r: res.append(r), None)
        s._walk_depth -= 1
        U.luring_detach_aio_context(s, a)
        assert res == []
        U.luring_attach_aio_context(s, b)
        _wait(b, lambda: res)
        assert res == [0] and bytes(buf) == bytes(data[5 * BS:6 * BS])
        U.luring_detach_aio_context(s, b)
        U.luring_cleanup(s)
    finally:
        q.aio_context_unref(a)
        q.aio_context_unref(b)


def _fd_count():
    return len(os.listdir("/proc/self/fd"))


def test_no_fd_leak_after_cleanup(image):
    """The per-context state goes with its AioContext; no fd remains."""
    fd, _, _ = image
    before = _fd_count()
    for _ in range(3):
        c = q.aio_context_new()
        s = U.aio_setup_linux_io_uring(c)
        assert U.aio_get_linux_io_uring(c) is s
        assert U.aio_setup_linux_io_uring(c) is s
        res = []
        U.luring_submit(None, s, fd, 0, QEMUIOVector(_buf()), QEMU_AIO_READ,
                        lambda o, r: res.append(r), None)
        q.aio_context_unref(c)  # in-flight requests are cancelled or finish
        assert res in ([0], [-errno.ECANCELED])
        assert s.closed
    assert _fd_count() == before
    s = U.luring_init(8)
    U.luring_cleanup(s)
    assert _fd_count() == before


def test_aio_get_linux_io_uring_requires_setup(ctx):
    with pytest.raises(RuntimeError, match="aio_setup_linux_io_uring"):
        U.aio_get_linux_io_uring(ctx)


@pytest.mark.parametrize("err,needle", [
    (errno.ENOSYS, "Linux >= 5.1"),
    (errno.EPERM, "io_uring"),
    (errno.ENOMEM, "RLIMIT_MEMLOCK"),
])
def test_luring_init_error_names_reason(monkeypatch, err, needle):
    """io_uring_setup failures raise OSError with the errno and a remedy."""
    from pyaioctx._sys import io_uring_abi

    def fail(*a, **k):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(io_uring_abi, "Ring", fail)
    before = _fd_count()
    with pytest.raises(OSError) as ei:
        U.luring_init()
    assert ei.value.errno == err
    assert needle in str(ei.value)
    assert "aio=" in str(ei.value)
    assert _fd_count() == before


def test_luring_probe():
    ok, reason = U.luring_probe()
    assert ok is True and "io_uring" in reason


# --------------------------------------------------------------------------
# Short I/O, errors, resubmission


def test_read_spanning_eof_zero_fills(ctx, disk_dir):
    """A buffered read crossing EOF returns 0; the part past EOF is zeros."""
    path = disk_dir / "short.img"
    data = os.urandom(BS + BS // 2)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        s = U.aio_setup_linux_io_uring(ctx)
        buf = bytearray(b"\xaa" * (2 * BS))
        past = bytearray(b"\xbb" * BS)
        res = []
        U.luring_submit(None, s, fd, 0, QEMUIOVector(buf), QEMU_AIO_READ,
                        lambda o, r: res.append(r), None)
        U.luring_submit(None, s, fd, 10 * BS, QEMUIOVector(past), QEMU_AIO_READ,
                        lambda o, r: res.append(r), None)
        _wait(ctx, lambda: len(res) == 2)
        assert res == [0, 0]
        assert bytes(buf[:len(data)]) == data
        assert bytes(buf[len(data):]) == bytes(2 * BS - len(data))
        assert bytes(past) == bytes(BS)
    finally:
        os.close(fd)


def test_direct_read_spanning_eof_zero_fills(ctx, image):
    fd, data, _ = image
    s = U.aio_setup_linux_io_uring(ctx)
    buf = _buf(b"\xaa" * (2 * BS), 2 * BS)
    res = []
    U.luring_submit(None, s, fd, (NBLOCKS - 1) * BS, QEMUIOVector(buf), QEMU_AIO_READ,
                    lambda o, r: res.append(r), None)
    _wait(ctx, lambda: res)
    assert res == [0]
    assert bytes(buf[:BS]) == bytes(data[-BS:])
    assert bytes(buf[BS:]) == bytes(BS)


def test_short_read_is_resubmitted(ctx, disk_dir, co_backend):
    """A synthetic short completion: the remainder is read at the right
    offset into the right part of a multi-buffer vector, until done."""
    path = disk_dir / "resubmit.img"
    data = os.urandom(16 * BS)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        s = U.aio_setup_linux_io_uring(ctx)
        cuts = [1000, 3 * BS + 7, 1]  # successive completions claim fewer bytes

        def rewrite(ud, res):
            return min(res, cuts.pop(0)) if cuts and res > 0 else res

        s.ring = RingTap(s.ring, rewrite)
        bufs = [bytearray(BS), bytearray(2 * BS), bytearray(3 * BS)]
        out = []

        def entry(_):
            out.append(U.luring_co_submit(None, s, fd, 2 * BS, QEMUIOVector(*bufs),
                                          QEMU_AIO_READ))

        _run_co(ctx, entry)
        assert out == [0]
        assert s.resubmits == 3
        assert b"".join(bufs) == data[2 * BS:8 * BS]
        assert (s.io_q.in_flight, s.io_q.in_queue) == (0, 0)
    finally:
        os.close(fd)


def test_short_read_then_eof_zero_fills(ctx, disk_dir):
    """Short read resubmitted, the remainder hits EOF: zero-filled, result 0."""
    path = disk_dir / "tail.img"
    data = os.urandom(BS + 100)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        s = U.aio_setup_linux_io_uring(ctx)
        cuts = [50]
        s.ring = RingTap(s.ring, lambda ud, res: min(res, cuts.pop()) if cuts else res)
        buf = bytearray(b"\xcc" * (2 * BS))
        res = []
        U.luring_submit(None, s, fd, 0, QEMUIOVector(buf), QEMU_AIO_READ,
                        lambda o, r: res.append(r), None)
        _wait(ctx, lambda: res)
        assert res == [0]
        assert s.resubmits >= 1
        assert bytes(buf[:len(data)]) == data
        assert bytes(buf[len(data):]) == bytes(2 * BS - len(data))
    finally:
        os.close(fd)


@pytest.mark.parametrize("err", [errno.EAGAIN, errno.EINTR])
def test_eagain_eintr_completions_are_resubmitted(ctx, image, err):
    fd, data, _ = image
    s = U.aio_setup_linux_io_uring(ctx)
    n_fail = [3]

    def rewrite(ud, res):
        if n_fail[0]:
            n_fail[0] -= 1
            return -err
        return res

    s.ring = RingTap(s.ring, rewrite)
    buf = _buf()
    res = []
    U.luring_submit(None, s, fd, 7 * BS, QEMUIOVector(buf), QEMU_AIO_READ,
                    lambda o, r: res.append(r), None)
    _wait(ctx, lambda: res)
    assert res == [0]
    assert s.resubmits == 3
    assert bytes(buf) == bytes(data[7 * BS:8 * BS])
    for _ in range(3):
        q.aio_poll(ctx, False)
    assert res == [0]


def test_endless_eagain_is_reported(ctx, image):
    """A request that only ever completes with -EAGAIN is not retried forever."""
    fd, _, _ = image
    s = U.aio_setup_linux_io_uring(ctx)
    s.ring = RingTap(s.ring, lambda ud, res: -errno.EAGAIN)
    res = []
    U.luring_submit(None, s, fd, 0, QEMUIOVector(_buf()), QEMU_AIO_READ,
                    lambda o, r: res.append(r), None)
    _wait(ctx, lambda: res)
    assert res == [-errno.EAGAIN]
    assert s.resubmits == U.MAX_EAGAIN_RETRIES


def test_refused_submit_is_retried(ctx, image):
    """io_uring_enter refusing (-EAGAIN) with nothing in flight: retried
    from a timer, nothing lost, no busy loop."""
    fd, data, _ = image
    s = U.aio_setup_linux_io_uring(ctx)
    s.ring = RingTap(s.ring, refuse_submits=3)
    buf = _buf()
    res = []
    acb = U.luring_submit(None, s, fd, 3 * BS, QEMUIOVector(buf), QEMU_AIO_READ,
                          lambda o, r: res.append(r), None)
    assert acb is not None and res == []
    assert s.io_q.blocked and s.io_q.in_queue == 1
    _wait(ctx, lambda: res, limit=1000)
    assert res == [0] and bytes(buf) == bytes(data[3 * BS:4 * BS])
    assert s.submit_calls >= 4
    assert (s.io_q.in_flight, s.io_q.in_queue, s.io_q.blocked) == (0, 0, False)


def test_short_write_is_enospc(ctx, image):
    """A write completed short reports -ENOSPC (synthetic short completion)."""
    fd, _, _ = image
    s = U.aio_setup_linux_io_uring(ctx)
    s.ring = RingTap(s.ring, lambda ud, res: res - 512 if res > 0 else res)
    res = []
    U.luring_submit(None, s, fd, 0, QEMUIOVector(_buf(size=2 * BS)), QEMU_AIO_WRITE,
                    lambda o, r: res.append(r), None)
    _wait(ctx, lambda: res)
    assert res == [-errno.ENOSPC]


def test_short_write_to_pipe(ctx):
    """A real short write: a non-blocking pipe takes at most its capacity."""
    import fcntl

    r, w = os.pipe()
    try:
        os.set_blocking(w, False)
        cap = fcntl.fcntl(w, 1032)  # F_GETPIPE_SZ
        s = U.aio_setup_linux_io_uring(ctx)
        res = []
        U.luring_submit(None, s, w, 0, QEMUIOVector(bytearray(2 * cap)), QEMU_AIO_WRITE,
                        lambda o, ret: res.append(ret), None)
        _wait(ctx, lambda: res)
        assert res[0] in (-errno.ENOSPC, -errno.EAGAIN)
    finally:
        os.close(r)
        os.close(w)


def test_bad_fd_is_ebadf(ctx, image, co_backend):
    fd, _, _ = image
    s = U.aio_setup_linux_io_uring(ctx)
    res = []
    U.luring_submit(None, s, 987654, 0, QEMUIOVector(_buf()), QEMU_AIO_READ,
                    lambda o, r: res.append(r), None)
    _wait(ctx, lambda: res)
    assert res == [-errno.EBADF]
    out = []
    _run_co(ctx, lambda _: out.append(
        U.luring_co_submit(None, s, 987654, 0, None, QEMU_AIO_FLUSH)))
    assert out == [-errno.EBADF]


def test_misaligned_direct_buffer_is_einval(ctx, image, co_backend):
    """A misaligned O_DIRECT buffer returns -EINVAL, never raises."""
    fd, _, _ = image
    s = U.aio_setup_linux_io_uring(ctx)
    raw = qemu_memalign(BS, 2 * BS)
    out = []

    def entry(_):
        out.append(U.luring_co_submit(None, s, fd, 0, QEMUIOVector(memoryview(raw)[1:BS + 1]),
                                      QEMU_AIO_READ))
        out.append(U.luring_co_submit(None, s, fd, 1, QEMUIOVector(memoryview(raw)[:BS]),
                                      QEMU_AIO_READ))
        out.append(U.luring_co_submit(None, s, fd, 0, QEMUIOVector(memoryview(raw)[:BS]),
                                      QEMU_AIO_READ))

    _run_co(ctx, entry)
    assert out == [-errno.EINVAL, -errno.EINVAL, 0]


def test_bad_input_raises(ctx, image):
    fd, _, _ = image
    s = U.aio_setup_linux_io_uring(ctx)
    cb = lambda o, r: None  # noqa: E731
    with pytest.raises(ValueError, match="read-only"):
        ro = QEMUIOVector()
        q.qemu_iovec_add(ro, b"x" * BS, writable=False)
        U.luring_submit(None, s, fd, 0, ro, QEMU_AIO_READ, cb, None)
    with pytest.raises(TypeError, match="QEMUIOVector"):
        U.luring_submit(None, s, fd, 0, bytearray(BS), QEMU_AIO_READ, cb, None)
    with pytest.raises(TypeError, match="QEMUIOVector"):
        U.luring_submit(None, s, fd, 0, None, QEMU_AIO_WRITE, cb, None)
    with pytest.raises(ValueError, match="qiov=None"):
        U.luring_submit(None, s, fd, 0, QEMUIOVector(_buf()), QEMU_AIO_FLUSH, cb, None)
    with pytest.raises(TypeError, match="callable"):
        U.luring_submit(None, s, fd, 0, QEMUIOVector(_buf()), QEMU_AIO_READ, None, None)
    with pytest.raises(ValueError, match="negative"):
        U.luring_submit(None, s, fd, -BS, QEMUIOVector(_buf()), QEMU_AIO_READ, cb, None)
    with pytest.raises(TypeError, match="fd"):
        U.luring_submit(None, s, "3", 0, QEMUIOVector(_buf()), QEMU_AIO_READ, cb, None)
    with pytest.raises(TypeError, match="LuringState"):
        U.luring_submit(None, object(), fd, 0, QEMUIOVector(_buf()), QEMU_AIO_READ, cb, None)
    with pytest.raises(RuntimeError, match="coroutine"):
        U.luring_co_submit(None, s, fd, 0, QEMUIOVector(_buf()), QEMU_AIO_READ)
    with pytest.raises(ValueError, match="entries"):
        U.luring_init(0)
    # An unsupported request type is refused: no AIOCB, nothing queued.
    assert U.luring_submit(None, s, fd, 0, QEMUIOVector(_buf()), 0x0010, cb, None) is None
    assert s.io_q.in_queue == 0 and s.io_q.in_flight == 0
    detached = U.luring_init(4)
    try:
        with pytest.raises(RuntimeError, match="not attached"):
            U.luring_submit(None, detached, fd, 0, QEMUIOVector(_buf()), QEMU_AIO_READ, cb, None)
    finally:
        U.luring_cleanup(detached)


def test_flat_api_exports():
    for name in U.__all__:
        assert getattr(q, name) is getattr(U, name)
    assert q.LuringQueue is q.LaioQueue
