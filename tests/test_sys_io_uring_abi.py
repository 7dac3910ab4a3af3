# SPDX-License-Identifier: GPL-2.0-or-later
"""io_uring ABI layer: struct layouts, the mapped ring, and real round trips.

Layout tests run everywhere.  Everything that needs a ring is skipped with
the probe's reason when io_uring is unusable (old kernel, seccomp, sysctl).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import select
import threading
import time

import pytest

from pyaioctx._sys import io_uring_abi as u

AVAILABLE, REASON = u.probe()
needs_uring = pytest.mark.skipif(not AVAILABLE, reason=REASON)


class iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def make_iov(*bufs: ctypes.Array) -> ctypes.Array:
    """A C ``struct iovec[]`` over ctypes buffers (which must outlive it)."""
    arr = (iovec * len(bufs))()
    for i, b in enumerate(bufs):
        arr[i].iov_base = ctypes.addressof(b)
        arr[i].iov_len = ctypes.sizeof(b)
    return arr


def wait_cqes(ring: u.Ring, n: int, timeout: float = 5.0) -> list[tuple[int, int, int]]:
    """Collect ``n`` CQEs, sleeping in poll() on the ring fd; raise on timeout."""
    got: list[tuple[int, int, int]] = []
    deadline = time.monotonic() + timeout
    while True:
        got.extend(ring.reap())
        if len(got) >= n:
            return got
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"got {len(got)} of {n} CQEs: {got!r}")
        select.select([ring.fd], [], [], left)


def count_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def ring():
    if not AVAILABLE:
        pytest.skip(REASON)
    r = u.Ring(8)
    try:
        yield r
    finally:
        r.close()


# --------------------------------------------------------------------------
# ABI layout
# --------------------------------------------------------------------------


def test_struct_sizes():
    assert ctypes.sizeof(u.io_uring_sqe) == 64
    assert ctypes.sizeof(u.io_uring_cqe) == 16
    assert ctypes.sizeof(u.io_uring_params) == 120
    assert ctypes.sizeof(u.io_sqring_offsets) == 40
    assert ctypes.sizeof(u.io_cqring_offsets) == 40
    assert ctypes.sizeof(u.io_uring_probe_op) == 8
    assert u.io_uring_probe.ops.offset == 16


@pytest.mark.parametrize(
    "field,offset",
    [
        ("opcode", 0), ("flags", 1), ("ioprio", 2), ("fd", 4), ("off", 8),
        ("addr", 16), ("len", 24), ("rw_flags", 28), ("fsync_flags", 28),
        ("cancel_flags", 28), ("user_data", 32), ("buf_index", 40),
        ("personality", 42), ("splice_fd_in", 44), ("addr3", 48),
    ],
)  # fmt: skip
def test_sqe_field_offsets(field, offset):
    if field in ("rw_flags", "fsync_flags", "cancel_flags"):
        assert u.io_uring_sqe._u_flags.offset + getattr(u._sqe_op_flags, field).offset == offset
    else:
        assert getattr(u.io_uring_sqe, field).offset == offset


def test_cqe_layout_and_signed_res():
    assert (u.io_uring_cqe.user_data.offset, u.io_uring_cqe.res.offset, u.io_uring_cqe.flags.offset) == (0, 8, 12)
    c = u.io_uring_cqe()
    ctypes.memmove(ctypes.addressof(c) + 8, (-errno.EIO).to_bytes(4, "little", signed=True), 4)
    assert c.res == -errno.EIO
    assert u._CQE.unpack(bytes(c))[1] == -errno.EIO


def test_params_offsets():
    P = u.io_uring_params
    assert (P.sq_entries.offset, P.cq_entries.offset, P.flags.offset) == (0, 4, 8)
    assert (P.features.offset, P.wq_fd.offset, P.resv.offset) == (20, 24, 28)
    assert (P.sq_off.offset, P.cq_off.offset) == (40, 80)
    S, C = u.io_sqring_offsets, u.io_cqring_offsets
    assert (S.head.offset, S.tail.offset, S.array.offset, S.user_addr.offset) == (0, 4, 24, 32)
    assert (C.overflow.offset, C.cqes.offset, C.flags.offset, C.user_addr.offset) == (16, 20, 24, 32)


def test_struct_pack_matches_ctypes_sqe():
    """The fast pack_into path writes the same bytes as the ctypes fields."""
    buf = bytearray(64)
    u._SQE.pack_into(buf, 0, 2, 0x10, 3, -1, 2**40, 0xDEAD, 7, 1, 2**63 + 5, 9, 4, -2, 11, 0)
    s = u.io_uring_sqe.from_buffer(buf)
    assert (s.opcode, s.flags, s.ioprio, s.fd, s.off, s.addr) == (2, 0x10, 3, -1, 2**40, 0xDEAD)
    assert (s.len, s.rw_flags, s.user_data) == (7, 1, 2**63 + 5)
    assert (s.buf_index, s.personality, s.splice_fd_in, s.addr3) == (9, 4, -2, 11)
    del s


def test_constants():
    assert (u.IORING_OP_NOP, u.IORING_OP_READV, u.IORING_OP_WRITEV, u.IORING_OP_FSYNC) == (0, 1, 2, 3)
    assert (u.IORING_OP_ASYNC_CANCEL, u.IORING_OP_READ, u.IORING_OP_WRITE) == (14, 22, 23)
    assert (u.IORING_OFF_SQ_RING, u.IORING_OFF_CQ_RING, u.IORING_OFF_SQES) == (0, 0x8000000, 0x10000000)
    assert (u.IORING_REGISTER_EVENTFD, u.IORING_UNREGISTER_EVENTFD) == (4, 5)
    assert u.IORING_ENTER_GETEVENTS == 1 and u.IORING_FSYNC_DATASYNC == 1
    assert u.IORING_FEAT_SINGLE_MMAP == 1 and u.IORING_SQ_NEED_WAKEUP == 1


# --------------------------------------------------------------------------
# probe()
# --------------------------------------------------------------------------


def test_probe_shape():
    ok, reason = u.probe()
    assert isinstance(ok, bool) and isinstance(reason, str) and reason


def test_probe_unknown_arch(monkeypatch):
    monkeypatch.setattr(u, "NR", {})
    ok, reason = u.probe()
    assert not ok and "architecture" in reason


def test_probe_sysctl_disabled(monkeypatch):
    monkeypatch.setattr(u, "_read_disabled_sysctl", lambda: 2)
    ok, reason = u.probe()
    assert not ok and "io_uring_disabled=2" in reason


@pytest.mark.parametrize(
    "err,disabled,words",
    [
        (errno.ENOSYS, 0, "5.1"),
        (errno.EPERM, 0, "seccomp"),
        (errno.EPERM, 1, "io_uring_group"),
        (errno.ENOMEM, 0, "RLIMIT_MEMLOCK"),
        (errno.EINVAL, 0, "EINVAL"),
    ],
)
def test_probe_setup_errors(monkeypatch, err, disabled, words):
    if not u._IS_LINUX or "io_uring_setup" not in u.NR:
        pytest.skip("io_uring syscall numbers unknown here")

    def failing_ring(*a, **k):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(u, "Ring", failing_ring)
    monkeypatch.setattr(u, "_read_disabled_sysctl", lambda: disabled)
    ok, reason = u.probe()
    assert not ok and words in reason


def test_probe_never_raises(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("unexpected")

    monkeypatch.setattr(u, "_probe", boom)
    ok, reason = u.probe()
    assert not ok and "unexpected" in reason


# --------------------------------------------------------------------------
# Ring round trips
# --------------------------------------------------------------------------


@needs_uring
def test_ring_geometry(ring):
    assert ring.sq_entries == 8 and ring.cq_entries == 16
    assert ring.fd >= 0 and not ring.closed
    assert ring.sq_pending() == 0 and ring.cq_peek() == 0
    assert "fd=" in repr(ring)


@needs_uring
def test_nop(ring):
    i = ring.get_sqe()
    assert i is not None
    ring.prep_nop(i, 0xFEEDFACECAFEBEEF)
    assert ring.sq_pending() == 1
    s = ring.sqe(i)
    assert s.opcode == u.IORING_OP_NOP and s.user_data == 0xFEEDFACECAFEBEEF
    assert ring.submit(1) == 1
    assert ring.sq_pending() == 0
    assert ring.cq_peek() == 1
    assert ring.cqe_at(ring.cq_head()) == (0xFEEDFACECAFEBEEF, 0, 0)
    ring.cq_advance(1)
    assert ring.cq_peek() == 0 and ring.peek_cqe() is None


@needs_uring
def test_submit_nothing_is_free(ring):
    assert ring.submit() == 0


@needs_uring
def test_writev_readv_buffered(ring, disk_dir):
    path = disk_dir / "buffered.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        a = ctypes.create_string_buffer(b"A" * 1000, 1000)
        b = ctypes.create_string_buffer(b"bcdefgh" * 300, 2100)
        wiov = make_iov(a, b)
        i = ring.get_sqe()
        ring.prep_writev(i, fd, ctypes.addressof(wiov), 2, 4096, 1)
        assert ring.submit(1) == 1
        assert wait_cqes(ring, 1) == [(1, 3100, 0)]
        assert os.pread(fd, 3100, 4096) == bytes(a) + bytes(b)

        r1 = ctypes.create_string_buffer(100)
        r2 = ctypes.create_string_buffer(3000)
        riov = make_iov(r1, r2)
        i = ring.get_sqe()
        ring.prep_readv(i, fd, ctypes.addressof(riov), 2, 4096, 2)
        ring.submit(1)
        assert wait_cqes(ring, 1) == [(2, 3100, 0)]
        assert bytes(r1) + bytes(r2) == bytes(a) + bytes(b)
    finally:
        os.close(fd)


def _aligned(m: mmap.mmap) -> ctypes.Array:
    return (ctypes.c_char * len(m)).from_buffer(m)


@needs_uring
def test_writev_readv_o_direct(ring, disk_dir):
    path = disk_dir / "direct.img"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        pytest.skip(f"O_DIRECT not supported in {disk_dir}: {e}")
    wmap = mmap.mmap(-1, 8192)  # anonymous mappings are page aligned
    rmap = mmap.mmap(-1, 8192)
    wbuf = rbuf = bad = None
    try:
        wmap.write(os.urandom(8192))
        wbuf, rbuf = _aligned(wmap), _aligned(rmap)
        assert ctypes.addressof(wbuf) % mmap.PAGESIZE == 0
        wiov, riov = make_iov(wbuf), make_iov(rbuf)
        i = ring.get_sqe()
        ring.prep_writev(i, fd, ctypes.addressof(wiov), 1, 8192, 10)
        ring.submit(1)
        ((ud, res, _),) = wait_cqes(ring, 1)
        if res == -errno.EINVAL:
            pytest.skip("filesystem refuses O_DIRECT writes")
        assert (ud, res) == (10, 8192)
        i = ring.get_sqe()
        ring.prep_readv(i, fd, ctypes.addressof(riov), 1, 8192, 11)
        ring.submit(1)
        assert wait_cqes(ring, 1) == [(11, 8192, 0)]
        assert rmap[:] == wmap[:]

        # A misaligned O_DIRECT buffer completes with a result, never a
        # crash: -EINVAL, or success where the device's DMA alignment (or a
        # filesystem that falls back to buffered I/O) allows it.
        bad = (ctypes.c_char * 512).from_address(ctypes.addressof(rbuf) + 1)
        biov = make_iov(bad)
        i = ring.get_sqe()
        ring.prep_readv(i, fd, ctypes.addressof(biov), 1, 8192, 12)
        ring.submit(1)
        ((ud, res, _),) = wait_cqes(ring, 1)
        assert ud == 12 and res in (-errno.EINVAL, 512)
    finally:
        # ctypes views exported from the mmaps must die before close().
        wbuf = rbuf = bad = None
        os.close(fd)
        wmap.close()
        rmap.close()


@needs_uring
@pytest.mark.parametrize("datasync", [True, False])
def test_fsync(ring, disk_dir, datasync):
    fd = os.open(disk_dir / "f.img", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.pwrite(fd, b"x" * 4096, 0)
        i = ring.get_sqe()
        ring.prep_fsync(i, fd, datasync, 77)
        s = ring.sqe(i)
        assert s.opcode == u.IORING_OP_FSYNC
        assert s.fsync_flags == (u.IORING_FSYNC_DATASYNC if datasync else 0)
        ring.submit(1)
        assert wait_cqes(ring, 1) == [(77, 0, 0)]
    finally:
        os.close(fd)


@needs_uring
def test_bad_fd_gives_negative_res(ring):
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    buf = ctypes.create_string_buffer(16)
    iov = make_iov(buf)
    i = ring.get_sqe()
    ring.prep_readv(i, r, ctypes.addressof(iov), 1, 0, 5)
    ring.submit(1)
    assert wait_cqes(ring, 1) == [(5, -errno.EBADF, 0)]


@needs_uring
def test_eventfd_signalled_on_completion(ring):
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        assert ring.register_eventfd(efd) == 0
        # Registering twice is refused with EBUSY, as a negative errno.
        assert ring.register_eventfd(efd) == -errno.EBUSY
        i = ring.get_sqe()
        ring.prep_nop(i, 3)
        ring.submit(0)
        r, _, _ = select.select([efd], [], [], 5)
        assert r == [efd]
        assert os.eventfd_read(efd) >= 1
        assert list(ring.reap()) == [(3, 0, 0)]

        assert ring.unregister_eventfd() == 0
        assert ring.unregister_eventfd() == -errno.ENXIO
        i = ring.get_sqe()
        ring.prep_nop(i, 4)
        ring.submit(1)
        assert list(ring.reap()) == [(4, 0, 0)]
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efd)
    finally:
        os.close(efd)


@needs_uring
def test_more_sqes_than_ring_holds(disk_dir):
    """300 writes through a 4-entry ring: each completes once, at its offset."""
    r = u.Ring(4)
    fd = os.open(disk_dir / "many.img", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        total = 300
        bufs = [ctypes.create_string_buffer(f"{k:08d}".encode(), 8) for k in range(total)]
        iovs = [make_iov(b) for b in bufs]
        nxt = 0
        seen: dict[int, int] = {}
        rounds = 0
        while len(seen) < total:
            while nxt < total:
                i = r.get_sqe()
                if i is None:
                    break
                r.prep_writev(i, fd, ctypes.addressof(iovs[nxt]), 1, nxt * 8, nxt)
                nxt += 1
            # The ring is full (or everything is queued).
            assert nxt == total or r.sq_space_left() == 0
            ret = r.submit(1)
            assert ret >= 0 or ret in (-errno.EAGAIN, -errno.EBUSY, -errno.EINTR)
            rounds += 1
            for ud, res, _ in r.reap():
                assert ud not in seen
                seen[ud] = res
        assert rounds >= total // 4
        assert all(res == 8 for res in seen.values())
        data = os.pread(fd, total * 8, 0)
        assert data == b"".join(f"{k:08d}".encode() for k in range(total))
    finally:
        os.close(fd)
        r.close()


@needs_uring
def test_cq_overflow_loses_nothing():
    """Completions past the CQ ring size are parked and flushed back, none lost."""
    r = u.Ring(4, cq_entries=4)
    try:
        if not r.features & u.IORING_FEAT_NODROP:
            pytest.skip("kernel without IORING_FEAT_NODROP drops overflowed CQEs")
        total = 20
        for k in range(total):
            r.prep_nop(r.get_sqe(), k)
            # Older kernels refuse new submissions with EBUSY while the
            # overflow list is not empty; this test does not exercise that.
            assert r.submit(0) == 1
        assert r.cq_peek() == 4
        assert r.sq_flags() & u.IORING_SQ_CQ_OVERFLOW
        got: list[int] = []
        for _ in range(2 * total):
            got.extend(ud for ud, _, _ in r.reap())
            if len(got) == total:
                break
            assert r.get_events(0) >= 0  # flushes the overflow list
        assert got == list(range(total))
        assert not r.sq_flags() & u.IORING_SQ_CQ_OVERFLOW
        assert r.cq_overflow() == 0  # nothing was dropped
    finally:
        r.close()


@needs_uring
def test_cq_read_without_syscall(ring, monkeypatch):
    """A completion posted after submit is seen by reading ring memory only."""
    calls = []
    real_enter = u._sys_enter

    def counting_enter(*args):
        calls.append(args)
        return real_enter(*args)

    monkeypatch.setattr(u, "_sys_enter", counting_enter)
    rfd, wfd = os.pipe()
    try:
        buf = ctypes.create_string_buffer(5)
        iov = make_iov(buf)
        i = ring.get_sqe()
        ring.prep_readv(i, rfd, ctypes.addressof(iov), 1, -1, 42)
        assert ring.submit(0) == 1
        assert len(calls) == 1
        assert ring.cq_peek() == 0  # nothing to read yet: the read is pending

        # Data arrives from another thread; the kernel posts the CQE.
        threading.Thread(target=os.write, args=(wfd, b"hello")).start()
        deadline = time.monotonic() + 5
        while ring.cq_peek() == 0:
            assert time.monotonic() < deadline, "CQE never appeared in the ring"
            time.sleep(0.001)
        head = ring.cq_head()
        assert ring.cqe_at(head) == (42, 5, 0)
        ring.cq_advance(1)
        assert ring.cq_head() == (head + 1) & 0xFFFFFFFF
        assert buf.raw == b"hello"
        assert len(calls) == 1, "reading the CQ ring must not enter the kernel"
    finally:
        os.close(rfd)
        os.close(wfd)


@needs_uring
def test_async_cancel_pending_pipe_read(ring):
    rfd, wfd = os.pipe()
    try:
        buf = ctypes.create_string_buffer(8)
        iov = make_iov(buf)
        i = ring.get_sqe()
        ring.prep_readv(i, rfd, ctypes.addressof(iov), 1, -1, 100)
        assert ring.submit(0) == 1
        time.sleep(0.01)
        assert ring.cq_peek() == 0

        i = ring.get_sqe()
        ring.prep_cancel(i, 100, 101)
        assert ring.sqe(i).opcode == u.IORING_OP_ASYNC_CANCEL
        ring.submit(0)
        cqes = dict((ud, res) for ud, res, _ in wait_cqes(ring, 2))
        assert cqes[101] in (0, -errno.EALREADY)
        assert cqes[100] in (-errno.ECANCELED, -errno.EINTR)

        # Cancelling something that is not in flight: -ENOENT.
        i = ring.get_sqe()
        ring.prep_cancel(i, 100, 102)
        ring.submit(1)
        assert wait_cqes(ring, 1) == [(102, -errno.ENOENT, 0)]
    finally:
        os.close(rfd)
        os.close(wfd)


@needs_uring
def test_reap_releases_before_yield(ring):
    """A nested reaper inside the iteration sees only the remaining CQEs."""
    for k in range(3):
        ring.prep_nop(ring.get_sqe(), k)
    ring.submit(3)
    outer = ring.reap()
    assert next(outer) == (0, 0, 0)
    assert [c[0] for c in ring.reap()] == [1, 2]  # nested loop
    assert list(outer) == []


@needs_uring
def test_sqpoll_ring():
    try:
        r = u.Ring(4, u.IORING_SETUP_SQPOLL, sq_thread_idle=10)
    except OSError as e:
        pytest.skip(f"SQPOLL not permitted here: {e}")
    try:
        for k in range(3):
            r.prep_nop(r.get_sqe(), k)
        assert r.submit(0) >= 0
        time.sleep(0.05)  # let the poll thread idle out, so it needs a wakeup
        r.prep_nop(r.get_sqe(), 3)
        assert r.submit(0) >= 0
        assert sorted(ud for ud, _, _ in wait_cqes(r, 4)) == [0, 1, 2, 3]
    finally:
        r.close()


# --------------------------------------------------------------------------
# Lifecycle
# --------------------------------------------------------------------------


@needs_uring
def test_close_leaves_no_fd():
    before = count_fds()
    for _ in range(20):
        r = u.Ring(32)
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        assert r.register_eventfd(efd) == 0
        r.prep_nop(r.get_sqe(), 1)
        r.submit(1)
        r.close()
        r.close()  # idempotent
        os.close(efd)
    assert count_fds() == before
    with u.Ring(2) as r:
        assert count_fds() == before + 1
    assert r.closed and count_fds() == before


@needs_uring
def test_failed_setup_leaves_no_fd():
    before = count_fds()
    with pytest.raises(OSError) as ei:
        u.Ring(1 << 20)  # above IORING_MAX_ENTRIES without IORING_SETUP_CLAMP
    assert ei.value.errno == errno.EINVAL
    with pytest.raises(ValueError):
        u.Ring(0)
    with pytest.raises(ValueError):
        u.Ring(4, u.IORING_SETUP_SQE128)
    assert count_fds() == before


@needs_uring
def test_use_after_close_raises_instead_of_crashing():
    r = u.Ring(2)
    r.close()
    assert r.fd == -1 and "closed" in repr(r)
    with pytest.raises(ValueError):
        r.sqe(0)
    with pytest.raises(AttributeError):
        r.cq_peek()
    with pytest.raises(AttributeError):
        r.prep_nop(0, 1)


@needs_uring
def test_probe_ops(ring):
    ops = ring.probe_ops()
    if isinstance(ops, int):
        assert ops == -errno.EINVAL
        pytest.skip("kernel before 5.6: no IORING_REGISTER_PROBE")
    assert {u.IORING_OP_NOP, u.IORING_OP_READV, u.IORING_OP_WRITEV, u.IORING_OP_FSYNC} <= ops


@needs_uring
def test_separate_cq_mapping(monkeypatch):
    """The pre-5.4 layout (SQ and CQ rings mapped separately) works too."""
    monkeypatch.setattr(u, "IORING_FEAT_SINGLE_MMAP", 0)
    before = count_fds()
    r = u.Ring(4)
    try:
        assert len(r._maps) == 3
        for k in range(4):
            r.prep_nop(r.get_sqe(), k)
        assert r.get_sqe() is None
        r.submit(4)
        assert [ud for ud, _, _ in r.reap()] == [0, 1, 2, 3]
    finally:
        r.close()
    assert count_fds() == before
