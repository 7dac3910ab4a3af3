# SPDX-License-Identifier: GPL-2.0-or-later
"""QEMUIOVector: scatter/gather lists over Python buffers (QEMU util/iov.c).

A :class:`QEMUIOVector` keeps two things in lock step:

* ``qiov.iov``, a ctypes ``struct iovec`` array the kernel can read directly
  (io_submit with IOCB_CMD_PREADV/PWRITEV, io_uring, preadv), grown like
  QEMU's vector (capacity ``2 * nalloc + 1``), and
* one flat unsigned-byte memoryview per entry.  The view is what makes the
  raw address in the iovec safe: while it exists, a bytearray cannot be
  resized and an mmap (or an aligned buffer) cannot be unmapped.  Entries
  never copy data; they point at the caller's memory.

Every mutation updates ``niov``, ``size`` and the ctypes array together.

Deviations from C, all in the direction of a clear error instead of a crash:
QEMU's assertions (offset past the end, adding to a vector made by
``qemu_iovec_init_buf``, comparing differently shaped vectors) raise
``ValueError``; non-buffers and read-only buffers where memory will be written
raise ``TypeError``.  Read-only buffers (``bytes``) can be added with
``writable=False`` for write requests; such a vector refuses ``from_buf`` and
``memset`` and reports ``qiov.readonly``.

``len(qiov)`` is ``qiov.size`` (bytes), but a QEMUIOVector is always truthy so
``if qiov:`` keeps meaning "is not None".
"""

from __future__ import annotations

from typing import Iterator, Optional

from ._sys.mem import (
    IOVEC_SIZE,
    IOVEC_STRUCT,
    AlignedBuffer,
    HeapAlignedBuffer,
    buffer_view,
    compare as _memcmp,
    copy as _memmove,
    fill as _fill,
    is_zero as _is_zero,
    new_iovec_array,
    qemu_memalign,
    qemu_try_memalign,
    qemu_vfree,
)

_pack_iovec = IOVEC_STRUCT.pack_into

__all__ = [
    "QEMUIOVector",
    "qemu_iovec_init",
    "qemu_iovec_init_buf",
    "qemu_iovec_init_external",
    "qemu_iovec_init_slice",
    "qemu_iovec_init_extended",
    "qemu_iovec_add",
    "qemu_iovec_reset",
    "qemu_iovec_destroy",
    "qemu_iovec_memset",
    "qemu_iovec_to_buf",
    "qemu_iovec_from_buf",
    "qemu_iovec_concat",
    "qemu_iovec_is_zero",
    "qemu_iovec_clone",
    "qemu_iovec_compare",
    "qemu_iovec_discard_back",
    "qemu_memalign",
    "qemu_try_memalign",
    "qemu_vfree",
    "AlignedBuffer",
    "HeapAlignedBuffer",
]


def _check_nonneg(func: str, name: str, value: object) -> int:
    if type(value) is not int:
        if not isinstance(value, int):
            raise TypeError("%s: %s must be an int, got %s" % (func, name, type(value).__name__))
        value = int(value)
    if value < 0:
        raise ValueError("%s: negative %s %d" % (func, name, value))
    return value


def _byte_view(func: str, obj: object, writable: bool) -> memoryview:
    """Flat 'B' view of a caller's buffer for copying (no address needed)."""
    try:
        mv = memoryview(obj)
    except TypeError:
        raise TypeError("%s: expected a bytes-like (buffer protocol) object, got %s" % (func, type(obj).__name__)) from None
    if writable and mv.readonly:
        raise TypeError("%s: %s is a read-only buffer; a writable buffer is required" % (func, type(obj).__name__))
    if mv.ndim != 1 or mv.format != "B":
        if not mv.c_contiguous:
            raise ValueError("%s: %s buffer is not C-contiguous" % (func, type(obj).__name__))
        mv = mv.cast("B")
    return mv


# QEMUIOVector._mem_align of a vector no entry constrains (empty, or only
# zero-length entries at address 0); a one-digit int.
_MEM_ALIGN_MAX = 1 << 29


def _narrow_align(align: int, address: int, length: int) -> int:
    # ``align`` lowered to the largest power of two dividing an entry's
    # address and length, if that is smaller.
    x = address | length
    return x & -x if x and x & -x < align else align


class QEMUIOVector:
    """Port of ``QEMUIOVector`` (include/qemu/iov.h).

    A fresh instance is the zeroed C struct: empty, growable.  Passing
    buffers (``QEMUIOVector(a, b)``) is shorthand for ``qemu_iovec_init``
    followed by ``qemu_iovec_add`` of each.

    Attributes, as in C: ``iov`` (ctypes iovec array; entries ``0..niov-1``
    are valid), ``niov``, ``nalloc`` (-1 for a fixed vector from
    ``qemu_iovec_init_buf``/``_external``), ``size`` (total bytes).  Also
    ``iov_address`` (address of ``iov``, for iocbs/SQEs), ``readonly`` and
    ``views`` (the per-entry memoryviews).  Not thread-safe, like the C one.
    """

    __slots__ = ("iov", "niov", "nalloc", "size", "readonly", "_views", "_addrs", "_iov_addr",
                 "_mem_align", "__weakref__")

    def __init__(self, *buffers: object) -> None:
        self._zero()
        if buffers:
            self.init(len(buffers))
            for b in buffers:
                self.add(b)

    def _zero(self) -> None:
        # The zeroed state shares one empty array: nothing can be stored in it.
        self.iov, self._iov_addr = _EMPTY_IOV
        self.niov = 0
        self.nalloc = 0
        self.size = 0
        self.readonly = False
        self._views: list[memoryview] = []
        self._addrs: list[int] = []
        # The largest power of two (at most _MEM_ALIGN_MAX) that divides
        # every entry's address and length: the file driver's O_DIRECT
        # buffer check is one compare with it.  Kept by every method that
        # changes the entries.
        self._mem_align = _MEM_ALIGN_MAX

    # -- internal --------------------------------------------------------------

    def _require_growable(self, func: str) -> None:
        if self.nalloc == -1:
            raise ValueError(
                "%s: this QEMUIOVector was made by qemu_iovec_init_buf/init_external/init_slice "
                "and has a fixed set of entries" % func
            )

    def _set_capacity(self, n: int) -> None:
        arr, addr = new_iovec_array(n)
        if self.niov:
            _memmove(addr, self._iov_addr, self.niov * IOVEC_SIZE)
        self.iov, self._iov_addr = arr, addr

    def _append(self, view: memoryview, address: int, readonly: bool) -> None:
        # Callers have checked growability; this is the one place entries are
        # appended, so the iovec array, views, niov and size move together.
        n = self.niov
        if n >= len(self.iov):
            self.nalloc = 2 * self.nalloc + 1 if self.nalloc >= 0 else n + 1
            self._set_capacity(max(self.nalloc, n + 1))
        length = len(view)
        _pack_iovec(self.iov, n * IOVEC_SIZE, address, length)
        self._views.append(view)
        self._addrs.append(address)
        self._mem_align = _narrow_align(self._mem_align, address, length)
        self.niov = n + 1
        self.size += length
        if readonly:
            self.readonly = True

    def _locate(self, offset: int) -> tuple[int, int]:
        """(entry index, offset inside it) of byte *offset* (QEMU's iov_skip_offset)."""
        views = self._views
        i = 0
        n = self.niov
        while i < n and offset > 0 and offset >= len(views[i]):
            offset -= len(views[i])
            i += 1
        return i, offset

    # -- lifecycle -------------------------------------------------------------

    def init(self, alloc_hint: int = 0) -> None:
        """``qemu_iovec_init``: empty vector with room for *alloc_hint* entries."""
        alloc_hint = _check_nonneg("qemu_iovec_init", "alloc_hint", alloc_hint)
        self._zero()
        self.nalloc = alloc_hint
        if alloc_hint:
            self._set_capacity(alloc_hint)

    def init_buf(self, buf: object, length: Optional[int] = None, *, writable: bool = True) -> None:
        """``qemu_iovec_init_buf``: a fixed one-entry vector over *buf*."""
        view, addr = buffer_view(buf, writable)
        if length is not None:
            length = _check_nonneg("qemu_iovec_init_buf", "len", length)
            if length > len(view):
                raise ValueError("qemu_iovec_init_buf: len %d exceeds the %d-byte buffer" % (length, len(view)))
            view = view[:length]
        # Built directly: this is the per-request path of every bdrv_pread.
        arr, iaddr = new_iovec_array(1)
        n = len(view)
        _pack_iovec(arr, 0, addr, n)
        self.iov = arr
        self._iov_addr = iaddr
        self.niov = 1
        self.nalloc = -1
        self.size = n
        self.readonly = view.readonly
        self._views = [view]
        self._addrs = [addr]
        self._mem_align = _narrow_align(_MEM_ALIGN_MAX, addr, n)

    def reset(self) -> None:
        """``qemu_iovec_reset``: drop all entries, keep the allocation."""
        self._require_growable("qemu_iovec_reset")
        self.niov = 0
        self.size = 0
        self.readonly = False
        self._views.clear()
        self._addrs.clear()
        self._mem_align = _MEM_ALIGN_MAX

    def destroy(self) -> None:
        """``qemu_iovec_destroy``: back to the zeroed state (reusable)."""
        self._zero()

    # -- building ----------------------------------------------------------------

    def add(self, buf: object, length: Optional[int] = None, *, writable: bool = True) -> None:
        """``qemu_iovec_add``: append *buf* (first *length* bytes) without copying.

        QEMU takes ``(base, len)``; here *buf* is any contiguous buffer
        (memoryview slices included) and *length* defaults to all of it.
        ``writable=False`` accepts read-only buffers (for write requests).
        """
        if self.nalloc == -1:
            self._require_growable("qemu_iovec_add")
        view, addr = buffer_view(buf, writable)
        if length is not None and length != len(view):
            length = _check_nonneg("qemu_iovec_add", "len", length)
            if length > len(view):
                raise ValueError("qemu_iovec_add: len %d exceeds the %d-byte buffer" % (length, len(view)))
            view = view[:length]
        self._append(view, addr, view.readonly)

    def _add_range_of(self, src: "QEMUIOVector", soffset: int, sbytes: int) -> int:
        # Shared by concat and init_extended: append slices of src's entries.
        views = list(src._views)
        addrs = list(src._addrs)
        done = 0
        for v, a in zip(views, addrs):
            if done >= sbytes:
                break
            lv = len(v)
            if soffset < lv:
                k = min(lv - soffset, sbytes - done)
                self._append(v[soffset : soffset + k], a + soffset, v.readonly)
                done += k
                soffset = 0
            else:
                soffset -= lv
        return done

    def concat(self, src: "QEMUIOVector", soffset: int = 0, sbytes: Optional[int] = None) -> int:
        """``qemu_iovec_concat``: append entries covering ``src[soffset:soffset+sbytes]``.

        Only pointers are copied, not data.  *sbytes* may exceed what is left
        (``None`` = up to the end).  Returns the bytes added (QEMU's
        ``qemu_iovec_concat_iov`` result).
        """
        _check_qiov(src, "qemu_iovec_concat")
        soffset = _check_nonneg("qemu_iovec_concat", "soffset", soffset)
        sbytes = src.size if sbytes is None else _check_nonneg("qemu_iovec_concat", "sbytes", sbytes)
        if not sbytes:
            return 0
        self._require_growable("qemu_iovec_concat")
        if soffset > src.size:
            raise ValueError("qemu_iovec_concat: soffset %d beyond the end of src (size %d)" % (soffset, src.size))
        return self._add_range_of(src, soffset, sbytes)

    def clone(self, src: "QEMUIOVector", buf: object) -> None:
        """``qemu_iovec_clone``: add entries shaped like *src* but backed by *buf*.

        Overlapping *src* entries overlap the same way in *buf* (QEMU keeps
        their relative layout).  *buf* must be large enough for the
        non-overlapping span; data is not copied.
        """
        _check_qiov(src, "qemu_iovec_clone")
        self._require_growable("qemu_iovec_clone")
        bview, baddr = buffer_view(buf, True)
        n = src.niov
        lens = [len(v) for v in src._views]
        bases = list(src._addrs)
        order = sorted(range(n), key=lambda i: bases[i])
        dest_off = [0] * n
        pos = 0
        last_end: Optional[int] = None
        for i in order:
            rewind = 0
            if last_end is not None and last_end > bases[i]:
                rewind = last_end - bases[i]
            dest_off[i] = pos - rewind
            pos += lens[i] - min(rewind, lens[i])
            end = bases[i] + lens[i]
            last_end = end if last_end is None else max(end, last_end)
        if pos > len(bview):
            raise ValueError("qemu_iovec_clone: buffer of %d bytes is too small, need %d" % (len(bview), pos))
        for i in range(n):
            o = dest_off[i]
            self._append(bview[o : o + lens[i]], baddr + o, False)

    def discard_back(self, nbytes: int) -> None:
        """``qemu_iovec_discard_back``: drop the last *nbytes* bytes."""
        nbytes = _check_nonneg("qemu_iovec_discard_back", "bytes", nbytes)
        if nbytes > self.size:
            raise ValueError("qemu_iovec_discard_back: %d bytes but the vector holds %d" % (nbytes, self.size))
        views = self._views
        left = nbytes
        while left:
            i = self.niov - 1
            lv = len(views[i])
            if lv > left:
                views[i] = views[i][: lv - left]
                _pack_iovec(self.iov, i * IOVEC_SIZE, self._addrs[i], lv - left)
                break
            left -= lv
            views.pop()
            self._addrs.pop()
            self.niov = i
        self.size -= nbytes
        align = _MEM_ALIGN_MAX
        for addr, view in zip(self._addrs, views):
            align = _narrow_align(align, addr, len(view))
        self._mem_align = align

    # -- data access -------------------------------------------------------------

    def to_buf(self, offset: int, buf: object, nbytes: Optional[int] = None) -> int:
        """``qemu_iovec_to_buf``: copy bytes from *offset* into *buf*; returns
        ``min(nbytes, size - offset)``.  ``nbytes=None`` means ``len(buf)``."""
        dst = _byte_view("qemu_iovec_to_buf", buf, True)
        offset = _check_nonneg("qemu_iovec_to_buf", "offset", offset)
        nbytes = len(dst) if nbytes is None else _check_nonneg("qemu_iovec_to_buf", "bytes", nbytes)
        if offset > self.size:
            raise ValueError("qemu_iovec_to_buf: offset %d beyond the end (size %d)" % (offset, self.size))
        n = min(nbytes, self.size - offset)
        if n > len(dst):
            raise ValueError("qemu_iovec_to_buf: buffer of %d bytes is too small for %d" % (len(dst), n))
        done = 0
        i, off = self._locate(offset)
        views = self._views
        while done < n:
            v = views[i]
            k = min(len(v) - off, n - done)
            dst[done : done + k] = v[off : off + k]
            done += k
            off = 0
            i += 1
        return done

    def from_buf(self, offset: int, buf: object, nbytes: Optional[int] = None) -> int:
        """``qemu_iovec_from_buf``: copy *buf* into the vector at *offset*;
        returns ``min(nbytes, size - offset)``.  ``nbytes=None`` means ``len(buf)``."""
        src = _byte_view("qemu_iovec_from_buf", buf, False)
        offset = _check_nonneg("qemu_iovec_from_buf", "offset", offset)
        nbytes = len(src) if nbytes is None else _check_nonneg("qemu_iovec_from_buf", "bytes", nbytes)
        if offset > self.size:
            raise ValueError("qemu_iovec_from_buf: offset %d beyond the end (size %d)" % (offset, self.size))
        n = min(nbytes, self.size - offset)
        if n > len(src):
            raise ValueError("qemu_iovec_from_buf: buffer of %d bytes is too small for %d" % (len(src), n))
        if n and self.readonly:
            raise TypeError("qemu_iovec_from_buf: the vector contains read-only buffers")
        done = 0
        i, off = self._locate(offset)
        views = self._views
        while done < n:
            v = views[i]
            k = min(len(v) - off, n - done)
            v[off : off + k] = src[done : done + k]
            done += k
            off = 0
            i += 1
        return done

    def memset(self, offset: int, fillc: int, nbytes: int) -> int:
        """``qemu_iovec_memset``: set bytes from *offset* to ``fillc & 0xff``;
        returns ``min(nbytes, size - offset)``."""
        offset = _check_nonneg("qemu_iovec_memset", "offset", offset)
        nbytes = _check_nonneg("qemu_iovec_memset", "bytes", nbytes)
        if not isinstance(fillc, int):
            raise TypeError("qemu_iovec_memset: fillc must be an int, got %s" % type(fillc).__name__)
        if offset > self.size:
            raise ValueError("qemu_iovec_memset: offset %d beyond the end (size %d)" % (offset, self.size))
        n = min(nbytes, self.size - offset)
        if n and self.readonly:
            raise TypeError("qemu_iovec_memset: the vector contains read-only buffers")
        c = fillc & 0xFF
        done = 0
        i, off = self._locate(offset)
        views = self._views
        while done < n:
            k = min(len(views[i]) - off, n - done)
            # The entry's view pins this memory, so the raw memset is safe.
            _fill(self._addrs[i] + off, c, k)
            done += k
            off = 0
            i += 1
        return done

    def is_zero(self, offset: int = 0, nbytes: Optional[int] = None) -> bool:
        """``qemu_iovec_is_zero``: are bytes ``[offset, offset+nbytes)`` all zero?"""
        offset = _check_nonneg("qemu_iovec_is_zero", "offset", offset)
        nbytes = self.size - offset if nbytes is None else _check_nonneg("qemu_iovec_is_zero", "bytes", nbytes)
        if offset + nbytes > self.size:
            raise ValueError(
                "qemu_iovec_is_zero: range %d+%d beyond the end (size %d)" % (offset, nbytes, self.size)
            )
        i, off = self._locate(offset)
        views = self._views
        while nbytes:
            k = min(len(views[i]) - off, nbytes)
            if not _is_zero(self._addrs[i] + off, k):
                return False
            nbytes -= k
            off = 0
            i += 1
        return True

    def compare(self, other: "QEMUIOVector") -> int:
        """``qemu_iovec_compare``: offset of the first differing byte, or -1.

        Both vectors must have the same shape (same entry lengths), as for
        a vector and its ``qemu_iovec_clone``.
        """
        _check_qiov(other, "qemu_iovec_compare")
        if self.niov != other.niov:
            raise ValueError("qemu_iovec_compare: niov differs (%d vs %d)" % (self.niov, other.niov))
        offset = 0
        for i in range(self.niov):
            la = len(self._views[i])
            if la != len(other._views[i]):
                raise ValueError(
                    "qemu_iovec_compare: entry %d length differs (%d vs %d)" % (i, la, len(other._views[i]))
                )
            pa = self._addrs[i]
            pb = other._addrs[i]
            if _memcmp(pa, pb, la):
                # Narrow down the first mismatch with memcmp over halves.
                lo, hi = 0, la  # mismatch within [lo, hi)
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    if _memcmp(pa + lo, pb + lo, mid - lo):
                        hi = mid
                    else:
                        lo = mid
                return offset + lo
            offset += la
        return -1

    def to_bytes(self, offset: int = 0, nbytes: Optional[int] = None) -> bytes:
        """Contents from *offset* (``nbytes`` bytes, default: to the end) as bytes."""
        offset = _check_nonneg("QEMUIOVector.to_bytes", "offset", offset)
        if offset > self.size:
            raise ValueError("QEMUIOVector.to_bytes: offset %d beyond the end (size %d)" % (offset, self.size))
        n = self.size - offset if nbytes is None else min(_check_nonneg("to_bytes", "nbytes", nbytes), self.size - offset)
        if offset == 0 and n == self.size:
            return b"".join(self._views)
        out = bytearray(n)
        self.to_buf(offset, out, n)
        return bytes(out)

    # -- introspection -------------------------------------------------------------

    @property
    def iov_address(self) -> int:
        """Address of the ``iov`` array (changes when the vector grows)."""
        return self._iov_addr

    @property
    def views(self) -> tuple[memoryview, ...]:
        """The memoryview behind each entry, in order."""
        return tuple(self._views)

    def entries(self) -> list[tuple[int, int]]:
        """``[(iov_base, iov_len), ...]`` as stored in the ctypes array."""
        return [IOVEC_STRUCT.unpack_from(self.iov, i * IOVEC_SIZE) for i in range(self.niov)]

    def __len__(self) -> int:
        return self.size

    def __bool__(self) -> bool:
        return True

    def __iter__(self) -> Iterator[memoryview]:
        return iter(list(self._views))

    def __repr__(self) -> str:
        return "<QEMUIOVector niov=%d size=%d nalloc=%d%s>" % (
            self.niov,
            self.size,
            self.nalloc,
            " readonly" if self.readonly else "",
        )


_EMPTY_IOV = new_iovec_array(0)


def _check_qiov(qiov: object, func: str) -> None:
    if not isinstance(qiov, QEMUIOVector):
        raise TypeError("%s: expected a QEMUIOVector, got %s" % (func, type(qiov).__name__))


# --- the QEMU-named flat API ------------------------------------------------------


def qemu_iovec_init(qiov: QEMUIOVector, alloc_hint: int) -> None:
    """Port of ``qemu_iovec_init``."""
    _check_qiov(qiov, "qemu_iovec_init")
    qiov.init(alloc_hint)


def qemu_iovec_init_buf(qiov: QEMUIOVector, buf: object, len: Optional[int] = None, *, writable: bool = True) -> None:
    """Port of ``qemu_iovec_init_buf``: *buf* is the buffer itself (its length
    by default); the vector is fixed (``nalloc == -1``) as in QEMU."""
    _check_qiov(qiov, "qemu_iovec_init_buf")
    qiov.init_buf(buf, len, writable=writable)


def qemu_iovec_init_external(qiov: QEMUIOVector, buffers: list, *, writable: bool = True) -> None:
    """Port of ``qemu_iovec_init_external``: a fixed vector over *buffers*
    (a list of buffer objects instead of a C iovec array)."""
    _check_qiov(qiov, "qemu_iovec_init_external")
    qiov.init(len(buffers))
    for b in buffers:
        qiov.add(b, writable=writable)
    qiov.nalloc = -1


def qemu_iovec_init_extended(
    qiov: QEMUIOVector,
    head_buf: object,
    head_len: int,
    mid_qiov: Optional[QEMUIOVector],
    mid_offset: int,
    mid_len: int,
    tail_buf: object,
    tail_len: int,
    *,
    writable: bool = True,
) -> None:
    """Port of ``qemu_iovec_init_extended``: head buffer + a range of
    *mid_qiov* + tail buffer (each part omitted when its length is 0)."""
    f = "qemu_iovec_init_extended"
    _check_qiov(qiov, f)
    head_len = _check_nonneg(f, "head_len", head_len)
    mid_offset = _check_nonneg(f, "mid_offset", mid_offset)
    mid_len = _check_nonneg(f, "mid_len", mid_len)
    tail_len = _check_nonneg(f, "tail_len", tail_len)
    if mid_len:
        _check_qiov(mid_qiov, f)
        if mid_offset + mid_len > mid_qiov.size:  # type: ignore[union-attr]
            raise ValueError(
                "%s: range %d+%d beyond the end of mid_qiov (size %d)" % (f, mid_offset, mid_len, mid_qiov.size)  # type: ignore[union-attr]
            )
    parts: list[tuple[memoryview, int]] = []
    for name, b, n in (("head_buf", head_buf, head_len), ("tail_buf", tail_buf, tail_len)):
        if n:
            view, addr = buffer_view(b, writable)
            if n > len(view):
                raise ValueError("%s: %s has %d bytes, need %d" % (f, name, len(view), n))
            parts.append((view[:n], addr))
        else:
            parts.append((None, 0))  # type: ignore[arg-type]
    qiov.init(0)
    if head_len:
        qiov._append(parts[0][0], parts[0][1], parts[0][0].readonly)
    if mid_len:
        qiov._add_range_of(mid_qiov, mid_offset, mid_len)  # type: ignore[arg-type]
    if tail_len:
        qiov._append(parts[1][0], parts[1][1], parts[1][0].readonly)
    # QEMU: a single part becomes a local, fixed vector; otherwise the
    # allocation is exactly niov.
    qiov.nalloc = -1 if qiov.niov == 1 else qiov.niov


def qemu_iovec_init_slice(qiov: QEMUIOVector, source: QEMUIOVector, offset: int, len: int) -> None:
    """Port of ``qemu_iovec_init_slice``: a vector over ``source[offset:offset+len]``
    (no data copied)."""
    qemu_iovec_init_extended(qiov, None, 0, source, offset, len, None, 0)


def qemu_iovec_add(qiov: QEMUIOVector, buf: object, len: Optional[int] = None, *, writable: bool = True) -> None:
    """Port of ``qemu_iovec_add``: *buf* is any writable buffer (its first
    *len* bytes, default all); no copy.  ``writable=False`` admits read-only
    buffers for write requests."""
    if type(qiov) is not QEMUIOVector:
        _check_qiov(qiov, "qemu_iovec_add")
    qiov.add(buf, len, writable=writable)


def qemu_iovec_reset(qiov: QEMUIOVector) -> None:
    """Port of ``qemu_iovec_reset``."""
    _check_qiov(qiov, "qemu_iovec_reset")
    qiov.reset()


def qemu_iovec_destroy(qiov: QEMUIOVector) -> None:
    """Port of ``qemu_iovec_destroy`` (releases the pinned views too)."""
    _check_qiov(qiov, "qemu_iovec_destroy")
    qiov.destroy()


def qemu_iovec_memset(qiov: QEMUIOVector, offset: int, fillc: int, bytes: int) -> int:
    """Port of ``qemu_iovec_memset``; returns the number of bytes set."""
    _check_qiov(qiov, "qemu_iovec_memset")
    return qiov.memset(offset, fillc, bytes)


def qemu_iovec_to_buf(qiov: QEMUIOVector, offset: int, buf: object, bytes: Optional[int] = None) -> int:
    """Port of ``qemu_iovec_to_buf``: copy into the caller's *buf*; returns
    the number of bytes copied.  *bytes* defaults to ``len(buf)``."""
    _check_qiov(qiov, "qemu_iovec_to_buf")
    return qiov.to_buf(offset, buf, bytes)


def qemu_iovec_from_buf(qiov: QEMUIOVector, offset: int, buf: object, bytes: Optional[int] = None) -> int:
    """Port of ``qemu_iovec_from_buf``: copy the caller's *buf* in; returns
    the number of bytes copied.  *bytes* defaults to ``len(buf)``."""
    _check_qiov(qiov, "qemu_iovec_from_buf")
    return qiov.from_buf(offset, buf, bytes)


def qemu_iovec_concat(dst: QEMUIOVector, src: QEMUIOVector, soffset: int, sbytes: int) -> int:
    """Port of ``qemu_iovec_concat``.  Returns the bytes added (void in QEMU)."""
    _check_qiov(dst, "qemu_iovec_concat")
    return dst.concat(src, soffset, sbytes)


def qemu_iovec_is_zero(qiov: QEMUIOVector, offset: int, bytes: int) -> bool:
    """Port of ``qemu_iovec_is_zero`` (the ranged form of current QEMU)."""
    _check_qiov(qiov, "qemu_iovec_is_zero")
    return qiov.is_zero(offset, bytes)


def qemu_iovec_clone(dest: QEMUIOVector, src: QEMUIOVector, buf: object) -> None:
    """Port of ``qemu_iovec_clone``."""
    _check_qiov(dest, "qemu_iovec_clone")
    dest.clone(src, buf)


def qemu_iovec_compare(a: QEMUIOVector, b: QEMUIOVector) -> int:
    """Port of ``qemu_iovec_compare``: first differing offset or -1."""
    _check_qiov(a, "qemu_iovec_compare")
    return a.compare(b)


def qemu_iovec_discard_back(qiov: QEMUIOVector, bytes: int) -> None:
    """Port of ``qemu_iovec_discard_back``."""
    _check_qiov(qiov, "qemu_iovec_discard_back")
    qiov.discard_back(bytes)
