# SPDX-License-Identifier: GPL-2.0-or-later
"""QEMUIOVector, after QEMU's tests/unit/test-iov.c plus the cases that file
does not cover (concat, is_zero, compare, clone, slices, bad input)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import random

import pytest

from pyaioctx._sys.mem import buffer_address
from pyaioctx.iov import (
    QEMUIOVector,
    qemu_iovec_add,
    qemu_iovec_clone,
    qemu_iovec_compare,
    qemu_iovec_concat,
    qemu_iovec_destroy,
    qemu_iovec_discard_back,
    qemu_iovec_from_buf,
    qemu_iovec_init,
    qemu_iovec_init_buf,
    qemu_iovec_init_extended,
    qemu_iovec_init_external,
    qemu_iovec_init_slice,
    qemu_iovec_is_zero,
    qemu_iovec_memset,
    qemu_iovec_reset,
    qemu_iovec_to_buf,
    qemu_memalign,
    qemu_vfree,
)


def iov_random(rng: random.Random):
    """test-iov.c's iov_random(): 3..7 vectors of 5..19 bytes each."""
    qiov = QEMUIOVector()
    qemu_iovec_init(qiov, 0)
    bufs = [bytearray(rng.randrange(5, 20)) for _ in range(rng.randrange(3, 8))]
    for b in bufs:
        qemu_iovec_add(qiov, b)
    return qiov, bufs


def check_iov_bytes(bufs, offset, nbytes):
    """test-iov.c's test_iov_bytes(): [offset, offset+bytes) holds the
    position number, everything else 0xff."""
    flat = b"".join(bufs)
    expected = bytes((o & 255) if offset <= o < offset + nbytes else 0xFF for o in range(len(flat)))
    assert flat == expected


@pytest.mark.parametrize("seed", range(4))
def test_to_from_buf(seed):
    """/basic/iov/to-from-buf"""
    rng = random.Random(seed)
    qiov, bufs = iov_random(rng)
    sz = qiov.size
    ibuf = bytearray(b"aaaa" + bytes(i & 255 for i in range(sz)) + b"bbbb")
    obuf = bytearray(b"xxxx" + bytes(sz) + b"yyyy")
    iv = memoryview(ibuf)[4 : 4 + sz]
    ov = memoryview(obuf)[4 : 4 + sz]
    for i in range(sz + 1):
        assert qemu_iovec_memset(qiov, 0, 0xFF, sz) == sz
        assert qemu_iovec_from_buf(qiov, i, iv[i:], sz - i) == sz - i
        ov[i:] = bytes(sz - i)
        assert qemu_iovec_to_buf(qiov, i, ov[i:], sz - i) == sz - i
        assert iv == ov
        # just one char
        n = qemu_iovec_to_buf(qiov, i, ov[i:], 1)
        assert n == (1 if i < sz else 0)
        if n:
            assert ov[i] == i & 255
        for j in range(i, sz + 1):
            assert qemu_iovec_memset(qiov, 0, 0xFF, sz) == sz
            assert qemu_iovec_from_buf(qiov, i, iv[i:], j - i) == j - i
            ov[i:j] = bytes(j - i)
            assert qemu_iovec_to_buf(qiov, i, ov[i:], j - i) == j - i
            assert iv == ov
            check_iov_bytes(bufs, i, j - i)
    assert ibuf[:4] == b"aaaa" and ibuf[-4:] == b"bbbb"
    assert obuf[:4] == b"xxxx" and obuf[-4:] == b"yyyy"


@pytest.mark.parametrize("seed", range(3))
def test_memset_all_offsets(seed):
    rng = random.Random(100 + seed)
    qiov, bufs = iov_random(rng)
    sz = qiov.size
    for off in range(sz + 1):
        for n in range(sz - off + 2):  # one past the end: clamped
            qemu_iovec_memset(qiov, 0, 0, sz)
            done = qemu_iovec_memset(qiov, off, 0x1AB, n)  # fillc is truncated to a byte
            assert done == min(n, sz - off)
            flat = b"".join(bufs)
            assert flat == bytes(off) + b"\xab" * done + bytes(sz - off - done)


@pytest.mark.parametrize("seed", range(3))
def test_is_zero_all_ranges(seed):
    rng = random.Random(200 + seed)
    qiov, bufs = iov_random(rng)
    sz = qiov.size
    qemu_iovec_memset(qiov, 0, 0, sz)
    assert qemu_iovec_is_zero(qiov, 0, sz)
    for pos in sorted(set(rng.sample(range(sz), 12)) | {0, sz - 1}):
        qemu_iovec_memset(qiov, pos, 1, 1)
        for off in range(sz + 1):
            for n in range(sz - off + 1):
                assert qemu_iovec_is_zero(qiov, off, n) == (not off <= pos < off + n)
        qemu_iovec_memset(qiov, pos, 0, 1)
    with pytest.raises(ValueError, match="beyond"):
        qemu_iovec_is_zero(qiov, 1, sz)


@pytest.mark.parametrize("seed", range(3))
def test_concat_matches_byte_slicing(seed):
    rng = random.Random(300 + seed)
    src, _ = iov_random(rng)
    src.from_buf(0, bytes(rng.randrange(256) for _ in range(src.size)))
    flat = src.to_bytes()
    for soff in range(src.size + 1):
        for sbytes in (0, 1, 7, src.size - soff, src.size + 100):
            dst = QEMUIOVector(bytearray(b"head"))
            done = qemu_iovec_concat(dst, src, soff, sbytes)
            want = flat[soff : soff + sbytes]
            assert done == len(want)
            assert dst.to_bytes() == b"head" + want
            assert dst.size == 4 + len(want)
            assert dst.niov == 1 + sum(1 for v in _pieces(src, soff, sbytes))
            # pointers, not data: writes through dst land in src
            if want:
                dst.memset(4, 0xEE, 1)
                assert src.to_bytes()[soff] == 0xEE
                src.from_buf(soff, flat[soff : soff + 1])
    with pytest.raises(ValueError, match="beyond"):
        qemu_iovec_concat(QEMUIOVector(), src, src.size + 1, 1)
    assert qemu_iovec_concat(QEMUIOVector(), src, src.size + 1, 0) == 0  # QEMU: sbytes 0 returns first


def _pieces(src, soff, sbytes):
    done = 0
    for v in src.views:
        if done >= sbytes:
            break
        if soff < len(v):
            k = min(len(v) - soff, sbytes - done)
            done += k
            soff = 0
            yield k
        else:
            soff -= len(v)


def test_compare_reports_first_difference():
    rng = random.Random(7)
    a, _ = iov_random(rng)
    a.from_buf(0, bytes(rng.randrange(256) for _ in range(a.size)))
    buf = bytearray(a.size)
    b = QEMUIOVector()
    qemu_iovec_clone(b, a, buf)
    assert b.niov == a.niov and [len(v) for v in b.views] == [len(v) for v in a.views]
    assert buf == bytes(a.size)
    b.from_buf(0, a.to_bytes())
    assert qemu_iovec_compare(a, b) == -1
    for pos in range(a.size):
        b.memset(pos, a.to_bytes()[pos] ^ 0x55, 1)
        assert qemu_iovec_compare(a, b) == pos
        assert qemu_iovec_compare(b, a) == pos
        b.from_buf(pos, a.to_bytes()[pos : pos + 1])
    with pytest.raises(ValueError, match="niov"):
        qemu_iovec_compare(a, QEMUIOVector(bytearray(1)))


def test_clone_preserves_overlap():
    base = bytearray(range(32))
    mv = memoryview(base)
    src = QEMUIOVector(mv[8:16], mv[0:12], mv[20:24])  # [0,12) and [8,16) overlap
    buf = bytearray(40)
    dest = QEMUIOVector()
    dest.clone(src, buf)
    # sorted by base: [0,12) at 0, [8,16) rewinds 4 -> at 8, [20,24) at 16
    daddr = buffer_address(buf)
    assert dest.entries() == [(daddr + 8, 8), (daddr + 0, 12), (daddr + 16, 4)]
    with pytest.raises(ValueError, match="too small"):
        QEMUIOVector().clone(src, bytearray(19))


def test_slice_and_extended():
    src = QEMUIOVector(bytearray(b"abcde"), bytearray(b"fghij"), bytearray(b"klmno"))
    s = QEMUIOVector()
    qemu_iovec_init_slice(s, src, 3, 9)
    assert s.to_bytes() == b"defghijkl" and s.niov == 3 and s.nalloc == 3
    one = QEMUIOVector()
    qemu_iovec_init_slice(one, src, 6, 2)
    assert one.to_bytes() == b"gh" and one.niov == 1 and one.nalloc == -1
    e = QEMUIOVector()
    qemu_iovec_init_extended(e, bytearray(b"HH"), 2, src, 4, 3, bytearray(b"TTT"), 3)
    assert e.to_bytes() == b"HHefgTTT" and e.niov == 4
    with pytest.raises(ValueError, match="beyond"):
        qemu_iovec_init_slice(s, src, 10, 6)


def test_discard_back():
    """/basic/iov/discard-back, on a QEMUIOVector"""
    for case in ("zero", "within_last", "entire_last", "within_second_to_last", "all"):
        rng = random.Random(case)
        qiov, bufs = iov_random(rng)
        size, niov = qiov.size, qiov.niov
        last = len(bufs[-1])
        nbytes = {
            "zero": 0,
            "within_last": rng.randrange(1, last),
            "entire_last": last,
            "within_second_to_last": last + rng.randrange(1, len(bufs[-2])),
            "all": size,
        }[case]
        qemu_iovec_discard_back(qiov, nbytes)
        assert qiov.size == size - nbytes
        assert qiov.niov == {"zero": niov, "within_last": niov, "all": 0}.get(case, niov - 1)
        assert sum(n for _, n in qiov.entries()) == qiov.size
    with pytest.raises(ValueError):
        qemu_iovec_discard_back(QEMUIOVector(bytearray(2)), 3)


# --- the ctypes iovec array -------------------------------------------------------


def test_iov_array_tracks_every_change():
    qiov = QEMUIOVector()
    bufs = [bytearray(i + 1) for i in range(20)]
    nallocs = []
    for b in bufs:
        qiov.add(b)
        nallocs.append(qiov.nalloc)
        assert qiov.iov_address == ctypes.addressof(qiov.iov)
        assert [(qiov.iov[i].iov_base, qiov.iov[i].iov_len) for i in range(qiov.niov)] == [
            (buffer_address(x), len(x)) for x in bufs[: qiov.niov]
        ]
    assert nallocs[:4] == [1, 3, 3, 7]  # QEMU grows to 2 * nalloc + 1
    assert qiov.size == sum(len(b) for b in bufs) == len(qiov)
    qemu_iovec_reset(qiov)
    assert qiov.niov == 0 and qiov.size == 0 and qiov.nalloc == 31
    bufs[0].extend(b"resizable again")  # reset dropped the pins
    qemu_iovec_destroy(qiov)
    assert qiov.nalloc == 0 and qiov.niov == 0
    assert bool(qiov)  # never falsy, even when empty


def test_iov_array_is_usable_by_preadv(tmp_path):
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    preadv = libc.preadv
    preadv.restype = ctypes.c_ssize_t
    preadv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_long]
    path = tmp_path / "f"
    path.write_bytes(bytes(range(100)))
    a, b = bytearray(30), qemu_memalign(512, 50)
    qiov = QEMUIOVector(a, memoryview(b)[10:])
    fd = os.open(path, os.O_RDONLY)
    try:
        assert preadv(fd, qiov.iov, qiov.niov, 5) == 70
    finally:
        os.close(fd)
    assert bytes(a) == bytes(range(5, 35))
    assert bytes(b)[10:50] == bytes(range(35, 75))
    qiov.destroy()
    qemu_vfree(b)


def test_init_buf_is_fixed():
    buf = bytearray(b"0123456789")
    qiov = QEMUIOVector()
    qemu_iovec_init_buf(qiov, buf)
    assert (qiov.niov, qiov.size, qiov.nalloc) == (1, 10, -1)
    assert qiov.iov[0].iov_base == buffer_address(buf)
    with pytest.raises(ValueError, match="init_buf"):
        qemu_iovec_add(qiov, bytearray(1))
    with pytest.raises(ValueError, match="init_buf"):
        qemu_iovec_reset(qiov)
    qemu_iovec_init_buf(qiov, buf, 4)
    assert qiov.to_bytes() == b"0123"
    ext = QEMUIOVector()
    qemu_iovec_init_external(ext, [bytearray(b"ab"), bytearray(b"cd")])
    assert ext.to_bytes() == b"abcd" and ext.nalloc == -1


# --- bad input ----------------------------------------------------------------------


def test_bad_input_is_named():
    qiov = QEMUIOVector(bytearray(8))
    with pytest.raises(TypeError, match="int"):
        qemu_iovec_add(qiov, 42)
    with pytest.raises(TypeError, match="bytes is a read-only buffer"):
        qemu_iovec_add(qiov, b"readonly")
    with pytest.raises(TypeError, match="QEMUIOVector"):
        qemu_iovec_add(None, bytearray(1))
    with pytest.raises(ValueError, match="offset 9 beyond"):
        qemu_iovec_to_buf(qiov, 9, bytearray(1), 1)
    with pytest.raises(ValueError, match="negative offset"):
        qemu_iovec_memset(qiov, -1, 0, 1)
    with pytest.raises(ValueError, match="too small"):
        qemu_iovec_to_buf(qiov, 0, bytearray(3), 8)
    with pytest.raises(TypeError, match="read-only"):
        qemu_iovec_to_buf(qiov, 0, b"12345678", 8)
    with pytest.raises(ValueError, match="exceeds"):
        qemu_iovec_add(qiov, bytearray(2), 3)
    with pytest.raises(ValueError, match="contiguous"):
        qemu_iovec_add(qiov, memoryview(bytearray(8))[::2])
    assert qiov.niov == 1 and qiov.size == 8  # failed adds changed nothing


def test_readonly_buffers_for_writes():
    data = b"payload!"
    qiov = QEMUIOVector()
    qemu_iovec_add(qiov, data, writable=False)
    assert qiov.readonly and qiov.to_bytes() == data
    assert qiov.iov[0].iov_base == buffer_address(data, writable=False)
    with pytest.raises(TypeError, match="read-only"):
        qemu_iovec_from_buf(qiov, 0, b"x", 1)
    with pytest.raises(TypeError, match="read-only"):
        qemu_iovec_memset(qiov, 0, 0, 1)
    assert data == b"payload!"


def test_pythonic_face():
    a, b = bytearray(b"abc"), bytearray(b"defg")
    qiov = QEMUIOVector(a, b)
    assert len(qiov) == 7 and qiov.niov == 2
    assert qiov.to_bytes() == b"abcdefg" and qiov.to_bytes(2, 3) == b"cde"
    assert [bytes(v) for v in qiov] == [b"abc", b"defg"]
    qiov.memset(1, ord("-"), 4)
    assert a == b"a--" and b == b"--fg"
    assert not qiov.is_zero()
    assert "niov=2" in repr(qiov)


def _mem_align_of(qiov: QEMUIOVector) -> int:
    # What QEMUIOVector._mem_align must be: the largest power of two (capped)
    # dividing every entry's address and length.
    from pyaioctx.iov import _MEM_ALIGN_MAX
    align = _MEM_ALIGN_MAX
    for addr, n in qiov.entries():
        x = addr | n
        if x:
            align = min(align, x & -x)
    return align


def test_mem_align_follows_every_change_of_the_entries():
    """The vector's record of its memory alignment (the file driver's
    O_DIRECT buffer check) stays equal to what its entries give, through
    every operation that adds, drops or shortens entries."""
    rng = random.Random(7)
    page = qemu_memalign(4096, 1 << 16)
    try:
        base = buffer_address(page)
        mv = memoryview(page)
        q = QEMUIOVector()
        checks = 0
        for _ in range(300):
            op = rng.choice(["add_aligned", "add_odd", "discard", "reset", "init_buf", "slice"])
            if op == "add_aligned" and q.nalloc != -1:
                k = rng.randrange(4)
                q.add(mv[k * 4096:(k + 1) * 4096])
            elif op == "add_odd" and q.nalloc != -1:
                o = rng.randrange(1, 4096)
                q.add(mv[o:o + rng.randrange(1, 512)])
            elif op == "discard" and q.size:
                qemu_iovec_discard_back(q, rng.randrange(q.size + 1))
            elif op == "reset":
                if q.nalloc == -1:
                    q = QEMUIOVector()
                else:
                    qemu_iovec_reset(q)
            elif op == "init_buf":
                q = QEMUIOVector()
                o = rng.choice([0, 512, 3])
                qemu_iovec_init_buf(q, mv[o:o + 8192])
            elif op == "slice" and q.size:
                src, q = q, QEMUIOVector()
                off = rng.randrange(src.size)
                qemu_iovec_init_slice(q, src, off, rng.randrange(src.size - off + 1))
            assert q._mem_align == _mem_align_of(q), (op, q.entries())
            checks += 1
        assert checks == 300
        assert base % 4096 == 0
        q = QEMUIOVector(mv[:4096], mv[8192:12288])
        assert q._mem_align == 4096
        q.add(mv[100:200])
        assert q._mem_align == 4
    finally:
        qemu_vfree(page)
