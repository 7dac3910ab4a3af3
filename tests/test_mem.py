# SPDX-License-Identifier: GPL-2.0-or-later
"""Aligned buffers (qemu_memalign / qemu_vfree) and buffer addresses."""

from __future__ import annotations

import array
import ctypes
import errno
import mmap
import os

import pytest

from pyaioctx._sys import mem
from pyaioctx._sys.mem import (
    PAGE_SIZE,
    AlignedBuffer,
    HeapAlignedBuffer,
    buffer_address,
    buffer_view,
    qemu_memalign,
    qemu_try_memalign,
    qemu_vfree,
)


@pytest.mark.parametrize("alignment", [0, 1, 8, 512, 4096])
@pytest.mark.parametrize("size", [1, 100, 512, 4096, 12345, 65536])
def test_memalign_exact_size_and_alignment(alignment, size):
    buf = qemu_memalign(alignment, size)
    try:
        assert isinstance(buf, AlignedBuffer)
        assert len(buf) == size
        assert buf.address % max(alignment, ctypes.sizeof(ctypes.c_void_p)) == 0
        assert buffer_address(buf) == buf.address
        mv = memoryview(buf)
        assert len(mv) == size and not mv.readonly and mv.format == "B"
        mv[-1:] = b"\x01"
        mv[0] = 0xAB
        del mv
        assert buf[0] == 0xAB
        if size > 1:
            assert buf[size - 1] == 1
        buf[0:1] = b"z"
        assert bytes(buf)[:1] == b"z"
        assert buf == bytes(buf)
        assert buf != b"x" * size or size == 0
    finally:
        qemu_vfree(buf)


def test_alignment_above_page_size_uses_heap_fallback():
    align = PAGE_SIZE * 4
    buf = qemu_memalign(align, 1000)
    assert isinstance(buf, HeapAlignedBuffer)
    assert len(buf) == 1000 and buf.address % align == 0
    assert buffer_address(buf) == buf.address
    view = memoryview(buf).cast("B")
    view[0:3] = b"abc"
    assert bytes(buf)[:3] == b"abc"
    del view
    qemu_vfree(buf)
    with pytest.raises(ValueError, match="freed"):
        buffer_address(buf)


def test_zero_size():
    buf = qemu_memalign(512, 0)
    assert len(buf) == 0 and bytes(buf) == b""
    assert buf.address % 512 == 0
    qemu_vfree(buf)


def test_bad_arguments():
    with pytest.raises(ValueError, match="power of two"):
        qemu_memalign(3 * 512, 4096)
    with pytest.raises(ValueError, match="negative size"):
        qemu_memalign(512, -1)
    with pytest.raises(TypeError, match="int"):
        qemu_memalign(512, 4096.0)
    assert qemu_try_memalign(4096, 1 << 62) is None
    with pytest.raises(MemoryError):
        qemu_memalign(4096, 1 << 62)


def test_vfree_then_use_raises_clearly():
    buf = qemu_memalign(4096, 4096)
    qemu_vfree(buf)
    assert buf.freed
    with pytest.raises(ValueError):
        buf[0]
    with pytest.raises(ValueError):
        memoryview(buf)
    with pytest.raises(ValueError, match="freed by qemu_vfree"):
        buffer_address(buf)
    with pytest.raises(ValueError, match="already freed"):
        qemu_vfree(buf)
    assert "freed" in repr(buf)


def test_vfree_with_live_view_defers_unmap():
    """A view that outlives qemu_vfree keeps the memory mapped: no fault."""
    buf = qemu_memalign(4096, 4096)
    view = memoryview(buf)
    view[:4] = b"live"
    qemu_vfree(buf)
    assert buf.freed
    assert bytes(view[:4]) == b"live"
    with pytest.raises(ValueError, match="freed"):
        buffer_view(buf)
    view.release()


def test_vfree_none_and_foreign_objects():
    qemu_vfree(None)
    with pytest.raises(TypeError, match="bytearray"):
        qemu_vfree(bytearray(10))  # type: ignore[arg-type]


def test_aligned_buffer_works_with_os_io(disk_dir):
    path = disk_dir / "f"
    path.write_bytes(bytes(range(256)) * 32)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:
            pytest.skip("no O_DIRECT here")
        raise
    buf = qemu_memalign(4096, 8192)
    try:
        assert os.preadv(fd, [buf], 0) == 8192
        assert bytes(buf) == bytes(range(256)) * 32
    finally:
        os.close(fd)
        qemu_vfree(buf)


# --- buffer_address ---------------------------------------------------------------


def _ctypes_addr(obj):
    return ctypes.addressof(ctypes.c_char.from_buffer(obj))


@pytest.mark.parametrize(
    "make",
    [
        lambda: bytearray(64),
        lambda: mmap.mmap(-1, 64),
        lambda: array.array("i", range(16)),
        lambda: (ctypes.c_uint8 * 64)(),
        lambda: (ctypes.c_char * 64)(),
        lambda: qemu_memalign(512, 64),
    ],
    ids=["bytearray", "mmap", "array", "c_uint8_array", "c_char_array", "aligned"],
)
def test_buffer_address_of_writable_types(make):
    obj = make()
    assert buffer_address(obj) == _ctypes_addr(obj)
    view, addr = buffer_view(obj)
    assert addr == _ctypes_addr(obj) and view.format == "B" and len(view) == memoryview(obj).nbytes


@pytest.mark.parametrize("start", [0, 1, 7, 63])
def test_buffer_address_of_memoryview_slices(start):
    ba = bytearray(64)
    base = buffer_address(ba)
    assert buffer_address(memoryview(ba)[start:]) == base + start
    assert buffer_view(memoryview(ba)[start:40])[1] == base + start


def test_buffer_address_readonly():
    b = b"some immutable bytes"
    with pytest.raises(TypeError, match="bytes is a read-only buffer"):
        buffer_address(b)
    expected = ctypes.cast(ctypes.c_char_p(b), ctypes.c_void_p).value
    assert buffer_address(b, writable=False) == expected
    assert buffer_address(memoryview(b)[3:], writable=False) == expected + 3
    view, addr = buffer_view(b, writable=False)
    assert addr == expected and view.readonly


def test_buffer_address_errors_name_the_problem():
    with pytest.raises(TypeError, match="int"):
        buffer_address(5)
    with pytest.raises(TypeError, match="str"):
        buffer_address("text")
    with pytest.raises(ValueError, match="contiguous"):
        buffer_address(memoryview(bytearray(16))[::2])
    mv = memoryview(bytearray(4))
    mv.release()
    with pytest.raises(ValueError):
        buffer_address(mv)


def test_buffer_address_of_empty_buffers():
    assert isinstance(buffer_address(bytearray()), int)
    assert isinstance(buffer_address(b"", writable=False), int)


def test_buffer_view_pins_memory():
    ba = bytearray(16)
    view, _ = buffer_view(ba)
    with pytest.raises(BufferError):
        ba.extend(b"x")
    view.release()
    ba.extend(b"x")


def test_raw_helpers():
    ba = bytearray(b"\0" * 100)
    view, addr = buffer_view(ba)
    assert mem.is_zero(addr, 100)
    mem.fill(addr + 10, 0x41, 5)
    assert ba[10:15] == b"AAAAA" and not mem.is_zero(addr, 100) and mem.is_zero(addr, 10)
    other = bytearray(ba)
    _, oaddr = buffer_view(other)
    assert mem.compare(addr, oaddr, 100) == 0
    big = bytearray(200_000)
    bview, baddr = buffer_view(big)
    assert mem.is_zero(baddr, len(big))
    big[-1] = 1
    assert not mem.is_zero(baddr, len(big))
