# SPDX-License-Identifier: GPL-2.0-or-later
"""Aligned memory for O_DIRECT and raw addresses of Python buffers.

Ports ``qemu_memalign`` / ``qemu_try_memalign`` / ``qemu_vfree`` from QEMU's
util/oslib-posix.c and provides the address plumbing QEMUIOVector needs.

Some facts this module relies on:

* O_DIRECT needs the buffer address, length and file offset aligned (512 or
  4096 bytes, depending on the device).  Python's allocators promise 16 bytes
  at most, so aligned buffers come from their own anonymous ``mmap``
  (page aligned).  :class:`AlignedBuffer` *is* an ``mmap.mmap``, so it is a
  genuine writable buffer of exactly the requested size: ``memoryview``,
  slicing, slice assignment, ``bytes()``, ``os.preadv`` all work as on a
  ``bytearray``.
* Alignments larger than a page (and the zero-size case, which mmap cannot
  express) fall back to ``posix_memalign`` through libc, wrapped in a ctypes
  ``c_char`` array (:class:`HeapAlignedBuffer`).  ctypes arrays advertise the
  format ``'<c'``, which memoryview cannot slice-assign or compare; use
  ``memoryview(buf).cast('B')`` there.  QEMU never asks for more than a page.
* An address taken from a Python buffer stays valid only while the memory
  cannot move or be released.  A held ``memoryview`` (a buffer export)
  guarantees that: a bytearray with exports refuses to resize, an mmap with
  exports refuses to close.  :func:`buffer_view` returns such a view together
  with the address, and QEMUIOVector keeps it for as long as the iovec entry
  exists.
* ``qemu_vfree`` unmaps immediately when nothing else holds a view of the
  buffer.  If views are still alive (e.g. a QEMUIOVector that was never
  destroyed), the memory is marked freed and is unmapped when the last view
  goes away, so a late access through such a view never faults.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from typing import Optional, Union

from .aio_abi import iovec
from .libc import libc

__all__ = [
    "PAGE_SIZE",
    "AlignedBuffer",
    "HeapAlignedBuffer",
    "qemu_memalign",
    "qemu_try_memalign",
    "qemu_vfree",
    "is_aligned_buffer",
    "buffer_address",
    "buffer_view",
    "new_iovec_array",
    "IOVEC_SIZE",
    "IOVEC_STRUCT",
    "fill",
    "copy",
    "compare",
    "is_zero",
]

PAGE_SIZE: int = mmap.PAGESIZE
_PTR_SIZE = ctypes.sizeof(ctypes.c_void_p)

_addressof = ctypes.addressof
_from_buffer = ctypes.c_char.from_buffer
_c_char = ctypes.c_char


class AlignedBuffer(mmap.mmap):
    """Writable, page-aligned anonymous memory of exactly ``size`` bytes.

    Returned by :func:`qemu_memalign`.  Behaves like any ``mmap``
    (``buf[i]``, ``buf[a:b] = data``, ``memoryview(buf)``, ``bytes(buf)``)
    and adds:

    ``address``    address of the first byte (aligned to ``alignment``)
    ``alignment``  the alignment that was asked for
    ``freed``      True after :func:`qemu_vfree`
    ``==``         compares contents with any bytes-like object

    After :func:`qemu_vfree` every operation raises ``ValueError`` (the
    mapping is closed), unless other views kept it alive (see module notes).
    """

    __slots__ = ("address", "alignment", "_freed")

    def __new__(cls, size: int, alignment: int = PAGE_SIZE) -> "AlignedBuffer":
        # MAP_PRIVATE: the default MAP_SHARED anonymous mapping is shmem-backed,
        # twice as slow to set up, and would be shared with forked children.
        self = super().__new__(cls, -1, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        # The temporary ctypes object holds an export only until it is
        # dropped at the end of this statement.
        self.address = _addressof(_from_buffer(self))
        self.alignment = alignment
        self._freed = False
        return self

    @property
    def freed(self) -> bool:
        return self._freed or self.closed

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        try:
            with memoryview(self) as mv:
                return mv == other
        except TypeError:
            return NotImplemented

    def __ne__(self, other: object) -> bool:
        r = self.__eq__(other)
        return r if r is NotImplemented else not r

    __hash__ = None  # type: ignore[assignment]  # mutable contents

    def __repr__(self) -> str:
        if self.freed:
            return "<AlignedBuffer freed, was %d-aligned at 0x%x>" % (self.alignment, self.address)
        return "<AlignedBuffer size=%d alignment=%d address=0x%x>" % (len(self), self.alignment, self.address)


# --- heap fallback (alignment > page size, or size 0) ------------------------

if libc is not None and hasattr(libc, "posix_memalign"):
    _posix_memalign = libc["posix_memalign"]
    _posix_memalign.restype = ctypes.c_int
    _posix_memalign.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t]
    _libc_free = libc["free"]
    _libc_free.restype = None
    _libc_free.argtypes = [ctypes.c_void_p]
else:  # pragma: no cover
    _posix_memalign = None
    _libc_free = None


class _HeapOwner:
    """Frees a posix_memalign block when the last object using it dies."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr

    def __del__(self) -> None:
        if self.ptr and _libc_free is not None:
            _libc_free(self.ptr)
            self.ptr = 0


class HeapAlignedBuffer:
    """Mixin for posix_memalign-backed ``c_char`` arrays (see module notes).

    The concrete classes are ``c_char * size`` subclasses created on demand;
    ``isinstance(buf, HeapAlignedBuffer)`` identifies them.  Their memory is
    released when the array object and every view of it are gone;
    :func:`qemu_vfree` marks them freed so :func:`buffer_address` refuses them.
    """

    address: int
    alignment: int
    _freed: bool
    _owner: _HeapOwner

    @property
    def freed(self) -> bool:
        return self._freed

    def __repr__(self) -> str:
        return "<HeapAlignedBuffer size=%d alignment=%d address=0x%x%s>" % (
            len(self),  # type: ignore[arg-type]
            self.alignment,
            self.address,
            " freed" if self._freed else "",
        )


_heap_types: dict[int, type] = {}
# Every heap class ever made (buffers may outlive a cache flush); lets the
# fast path of buffer_address spot them with one set lookup.
_heap_type_set: set[type] = set()


def _heap_type(size: int) -> type:
    t = _heap_types.get(size)
    if t is None:
        # One small class per distinct size; this path only serves
        # alignments above a page, which QEMU's block layer never asks for.
        t = type("HeapAlignedBuffer_%d" % size, (HeapAlignedBuffer, ctypes.c_char * size), {})
        _heap_types[size] = t
        _heap_type_set.add(t)
    return t


def _heap_memalign(alignment: int, size: int) -> Optional[HeapAlignedBuffer]:
    if _posix_memalign is None:
        return None
    p = ctypes.c_void_p()
    # posix_memalign wants a multiple of sizeof(void *); QEMU bumps size 0 to 1.
    if _posix_memalign(ctypes.byref(p), max(alignment, _PTR_SIZE), max(size, 1)) != 0 or not p.value:
        return None
    ctypes.memset(p.value, 0, max(size, 1))
    buf = _heap_type(size).from_address(p.value)
    buf._owner = _HeapOwner(p.value)
    buf.address = p.value
    buf.alignment = alignment
    buf._freed = False
    return buf


# --- qemu_memalign & co. -------------------------------------------------------


def _check_alignment(alignment: int, size: int) -> int:
    if not isinstance(alignment, int) or not isinstance(size, int):
        raise TypeError(
            "qemu_memalign: alignment and size must be int, got %s and %s"
            % (type(alignment).__name__, type(size).__name__)
        )
    if size < 0:
        raise ValueError("qemu_memalign: negative size %d" % size)
    if alignment < 0:
        raise ValueError("qemu_memalign: negative alignment %d" % alignment)
    # As QEMU: tiny alignments are raised to pointer size, others must be a
    # power of two (QEMU asserts).
    if alignment < _PTR_SIZE:
        return _PTR_SIZE
    if alignment & (alignment - 1):
        raise ValueError("qemu_memalign: alignment %d is not a power of two" % alignment)
    return alignment


def qemu_try_memalign(alignment: int, size: int) -> Optional[Union[AlignedBuffer, HeapAlignedBuffer]]:
    """Port of ``qemu_try_memalign``: an aligned buffer, or None if out of memory.

    Deviation: the buffer is zero-filled (fresh anonymous memory).
    """
    align = _check_alignment(alignment, size)
    if size > 0 and align <= PAGE_SIZE:
        try:
            return AlignedBuffer(size, alignment)
        except (OSError, OverflowError, MemoryError):
            return None
    return _heap_memalign(align, size)


def qemu_memalign(alignment: int, size: int) -> Union[AlignedBuffer, HeapAlignedBuffer]:
    """Port of ``qemu_memalign``: like :func:`qemu_try_memalign` but raises
    ``MemoryError`` where QEMU aborts."""
    buf = qemu_try_memalign(alignment, size)
    if buf is None:
        raise MemoryError("qemu_memalign: cannot allocate %d bytes aligned to %d" % (size, alignment))
    return buf


def qemu_vfree(buf: Optional[Union[AlignedBuffer, HeapAlignedBuffer]]) -> None:
    """Port of ``qemu_vfree``.  ``None`` is ignored, as QEMU ignores NULL.

    Freeing twice raises ``ValueError``; freeing anything not returned by
    :func:`qemu_memalign` raises ``TypeError``.
    """
    if buf is None:
        return
    if isinstance(buf, AlignedBuffer):
        if buf._freed:
            raise ValueError("qemu_vfree: buffer at 0x%x was already freed" % buf.address)
        buf._freed = True
        try:
            buf.close()
        except BufferError:
            # Views are still alive; the mapping goes with the last of them.
            pass
        return
    if isinstance(buf, HeapAlignedBuffer):
        if buf._freed:
            raise ValueError("qemu_vfree: buffer at 0x%x was already freed" % buf.address)
        buf._freed = True
        return
    raise TypeError("qemu_vfree: expected a buffer from qemu_memalign, got %s" % type(buf).__name__)


def is_aligned_buffer(obj: object) -> bool:
    """True for objects returned by :func:`qemu_memalign`."""
    return isinstance(obj, (AlignedBuffer, HeapAlignedBuffer))


# --- buffer addresses ---------------------------------------------------------


class _Py_buffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


try:
    _GetBuffer = ctypes.pythonapi.PyObject_GetBuffer
    _GetBuffer.restype = ctypes.c_int
    _GetBuffer.argtypes = [ctypes.py_object, ctypes.POINTER(_Py_buffer), ctypes.c_int]
    _ReleaseBuffer = ctypes.pythonapi.PyBuffer_Release
    _ReleaseBuffer.restype = None
    _ReleaseBuffer.argtypes = [ctypes.POINTER(_Py_buffer)]
except (AttributeError, OSError):  # pragma: no cover - not CPython
    _GetBuffer = None
    _ReleaseBuffer = None


def _readonly_address(obj: object) -> int:
    # ctypes refuses from_buffer() on read-only memory; ask the buffer
    # protocol directly.  PyBUF_SIMPLE (0) also rejects non-contiguous views.
    if _GetBuffer is None:  # pragma: no cover
        raise TypeError("cannot take the address of read-only %s on this Python" % type(obj).__name__)
    view = _Py_buffer()
    _GetBuffer(obj, ctypes.byref(view), 0)
    try:
        return view.buf or 0
    finally:
        _ReleaseBuffer(ctypes.byref(view))


def _bytes_data_offset() -> int:
    # CPython stores a bytes object's data inline at a fixed offset from the
    # object's address (id()).  Learn the offset from ctypes once and verify
    # it on a second object; 0 disables the shortcut (other implementations).
    try:
        probes = [b"pyaioctx-probe-one", bytes(range(40))]
        offs = {ctypes.cast(ctypes.c_char_p(p), ctypes.c_void_p).value - id(p) for p in probes}
        if len(offs) == 1:
            return offs.pop()
    except Exception:  # pragma: no cover
        pass
    return 0


_BYTES_OFFSET = _bytes_data_offset()


def _freed_error(obj: object) -> ValueError:
    return ValueError("%s at 0x%x was freed by qemu_vfree" % (type(obj).__name__, obj.address))  # type: ignore[attr-defined]


def _address_slow(obj: object, writable: bool) -> int:
    if isinstance(obj, HeapAlignedBuffer):
        if obj._freed:
            raise _freed_error(obj)
        return obj.address
    if isinstance(obj, AlignedBuffer) and obj.freed:
        raise _freed_error(obj)
    try:
        mv = memoryview(obj)
    except TypeError:
        raise TypeError("expected a bytes-like (buffer protocol) object, got %s" % type(obj).__name__) from None
    with mv:
        if not mv.c_contiguous:
            raise ValueError("%s buffer is not C-contiguous" % type(obj).__name__)
        if mv.readonly:
            if writable:
                raise TypeError("%s is a read-only buffer; a writable buffer is required" % type(obj).__name__)
            return _readonly_address(obj)
        if mv.nbytes == 0:
            return _addressof((_c_char * 0).from_buffer(obj))
    # Writable, contiguous, non-empty, yet from_buffer failed: report why.
    return _addressof(_from_buffer(obj))


def buffer_address(obj: object, writable: bool = True) -> int:
    """Address of the first byte of any contiguous buffer-protocol object.

    Works for bytearray, memoryview (slices with an offset included), mmap,
    array.array, ctypes arrays and aligned buffers; with ``writable=False``
    also for bytes and other read-only buffers.  Raises ``TypeError`` naming
    the type for non-buffers and for read-only buffers when *writable*,
    ``ValueError`` for non-contiguous or freed buffers.

    The address is only meaningful while the memory can neither move nor be
    released; use :func:`buffer_view` to get a view that guarantees it.
    """
    # Fast paths first: aligned buffers carry their address, everything else
    # writable goes through ctypes' buffer import (~0.4 us).
    t = type(obj)
    if t is AlignedBuffer:
        if obj._freed or obj.closed:  # type: ignore[union-attr]
            raise _freed_error(obj)
        return obj.address  # type: ignore[union-attr]
    if t is bytes and not writable and _BYTES_OFFSET:
        return id(obj) + _BYTES_OFFSET
    if t in _heap_type_set:
        return _address_slow(obj, writable)
    try:
        return _addressof(_from_buffer(obj))
    except (TypeError, ValueError):
        return _address_slow(obj, writable)


def buffer_view(obj: object, writable: bool = True) -> tuple[memoryview, int]:
    """``(view, address)``: a flat unsigned-byte memoryview of *obj* and the
    address of its first byte.

    Holding *view* pins the memory (a bytearray cannot resize, an mmap cannot
    close), so *address* stays valid exactly as long as the view lives.
    Errors as :func:`buffer_address`.
    """
    if type(obj) is AlignedBuffer:
        if obj._freed or obj.closed:  # type: ignore[union-attr]
            raise _freed_error(obj)
        return memoryview(obj), obj.address  # type: ignore[union-attr]
    try:
        mv = memoryview(obj)
    except TypeError:
        raise TypeError("expected a bytes-like (buffer protocol) object, got %s" % type(obj).__name__) from None
    if mv.readonly and writable:
        raise TypeError("%s is a read-only buffer; a writable buffer is required" % type(obj).__name__)
    if mv.ndim != 1 or mv.format != "B":
        if not mv.c_contiguous:
            raise ValueError("%s buffer is not C-contiguous" % type(obj).__name__)
        mv = mv.cast("B")
    elif not mv.c_contiguous:
        raise ValueError("%s buffer is not C-contiguous" % type(obj).__name__)
    if isinstance(obj, HeapAlignedBuffer):
        if obj._freed:
            raise _freed_error(obj)
        return mv, obj.address
    if not mv.nbytes:
        return mv, (_readonly_address(mv) if mv.readonly else _addressof((_c_char * 0).from_buffer(mv)))
    if mv.readonly:
        if type(obj) is bytes and _BYTES_OFFSET:
            return mv, id(obj) + _BYTES_OFFSET
        return mv, _readonly_address(mv)
    return mv, _addressof(_from_buffer(mv))


# --- helpers for iovec arrays and raw fills (used by pyaioctx.iov) -------------

IOVEC_SIZE: int = ctypes.sizeof(iovec)
#: ``struct iovec`` as struct-module format: one ``pack_into(array, i *
#: IOVEC_SIZE, base, len)`` stores an entry for half the cost of two ctypes
#: attribute stores.
IOVEC_STRUCT = struct.Struct("@PN")
assert IOVEC_STRUCT.size == IOVEC_SIZE

_iovec_array_types: dict[int, type] = {}


def new_iovec_array(n: int) -> tuple[ctypes.Array, int]:
    """``(array, address)`` for *n* zeroed ``struct iovec``."""
    t = _iovec_array_types.get(n)
    if t is None:
        t = iovec * n
        if n <= 4096:  # growth sizes (2n+1) repeat; keep the cache small
            _iovec_array_types[n] = t
    arr = t()
    return arr, _addressof(arr)


_memset = ctypes.memset
_memmove = ctypes.memmove


def fill(address: int, byte: int, n: int) -> None:
    """``memset``.  Only for memory pinned by a live view (see module notes)."""
    if n > 0:
        _memset(address, byte, n)


def copy(dst: int, src: int, n: int) -> None:
    """``memmove``.  Only for memory pinned by live views."""
    if n > 0:
        _memmove(dst, src, n)


if libc is not None and hasattr(libc, "memcmp"):
    _memcmp = libc["memcmp"]
    _memcmp.restype = ctypes.c_int
    _memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
else:  # pragma: no cover
    _memcmp = None

# Pure-Python zero tests run at ~1 GB/s at best; memcmp against a static zero
# block is an order of magnitude faster for the sizes block I/O deals with.
_ZERO_CHUNK = 1 << 16
_zero_block = (ctypes.c_char * _ZERO_CHUNK)()
_zero_addr = _addressof(_zero_block)


def compare(a: int, b: int, n: int) -> int:
    """``memcmp``: 0 when equal.  Only for memory pinned by live views."""
    if n <= 0:
        return 0
    if _memcmp is None:  # pragma: no cover
        return 0 if ctypes.string_at(a, n) == ctypes.string_at(b, n) else 1
    return _memcmp(a, b, n)


def is_zero(address: int, n: int) -> bool:
    """True if the *n* bytes at *address* are all zero (QEMU's buffer_is_zero)."""
    while n > 0:
        k = n if n < _ZERO_CHUNK else _ZERO_CHUNK
        if compare(address, _zero_addr, k):
            return False
        address += k
        n -= k
    return True
