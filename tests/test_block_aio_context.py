# SPDX-License-Identifier: GPL-2.0-or-later
"""Moving a device between AioContexts (port of QEMU's
``bdrv_try_change_aio_context`` and the file driver's
``raw_aio_attach_aio_context`` / ``raw_aio_detach_aio_context``).

A device goes from the main context into an iothread's context (a thread
that makes the context its own and polls it), does I/O there -- coroutines
entered with ``aio_co_enter``, requests started from BHs scheduled into the
context -- and comes back.  Every backend follows the device: Linux AIO and
io_uring switch to the engine of the new context, the thread pool is the new
context's.  Nothing is left behind once the iothread is gone.
"""

from __future__ import annotations

import errno
import os
import threading
from typing import Any, Callable

import pytest
from helpers import IOThread

import pyaioctx as q
from pyaioctx.block import (
    BDRV_O_RDWR,
    bdrv_aio_preadv,
    bdrv_co_preadv,
    bdrv_co_pwritev,
    bdrv_get_aio_context,
    bdrv_open,
    bdrv_pread,
    bdrv_pwrite,
    bdrv_try_change_aio_context,
    bdrv_unref,
)
from test_block_fixtures import AioBackend, aio_backend, make_image, open_image  # noqa: F401

WAIT_S = 10
SIZE = 1 << 20


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _wait(ev: threading.Event) -> None:
    assert ev.wait(WAIT_S), "timed out"


def test_move_to_iothread_and_back(co_backend, aio_backend: AioBackend, disk_dir) -> None:
    main = q.qemu_init_main_loop()
    img = disk_dir / "disk.img"
    data = make_image(img, SIZE)
    bs = open_image(img, aio_backend)
    try:
        assert bdrv_get_aio_context(bs) is main
        fds = _fds()
        iot = IOThread()
        try:
            assert bdrv_try_change_aio_context(bs, iot.ctx) == 0
            assert bdrv_get_aio_context(bs) is iot.ctx
            s = bs.opaque
            if aio_backend.aio == "native":
                assert s.aio_state is iot.ctx.linux_aio is not None
            elif aio_backend.aio == "io_uring":
                assert s.aio_state is iot.ctx.linux_io_uring is not None
            assert s.aio_state is not main.linux_aio or s.aio_state is None

            # 1. A coroutine created here and entered with aio_co_enter: it
            # runs in the iothread, and so do its completions.
            result: dict = {}
            done = threading.Event()

            def co_io(_: Any) -> None:
                buf = q.qemu_blockalign(bs, 8192)
                buf[:] = b"\xa5" * 8192
                qiov = q.QEMUIOVector(buf)
                result["w"] = bdrv_co_pwritev(bs, 4096, 8192, qiov, 0)
                back = q.qemu_blockalign(bs, 8192)
                result["r"] = bdrv_co_preadv(bs, 4096, 8192, q.QEMUIOVector(back), 0)
                result["data"] = bytes(back)
                result["ctx"] = q.qemu_get_current_aio_context()
                q.qemu_vfree(buf)
                q.qemu_vfree(back)
                done.set()

            q.aio_co_enter(iot.ctx, q.qemu_coroutine_create(co_io, None))
            _wait(done)
            assert (result["w"], result["r"]) == (0, 0)
            assert result["data"] == b"\xa5" * 8192
            assert result["ctx"] is iot.ctx  # the iothread (a logical thread)

            # 2. Callback requests started from a BH in the iothread: the
            # callback runs there too.
            cb_done = threading.Event()
            seen: list = []
            buf = q.qemu_blockalign(bs, 4096)

            def start() -> None:
                bdrv_aio_preadv(bs, 0, q.QEMUIOVector(buf), 0,
                                lambda opaque, ret: (seen.append((ret, q.qemu_get_current_aio_context())),
                                                     cb_done.set()), None)

            iot.run_bh(start)
            _wait(cb_done)
            assert seen == [(0, iot.ctx)] and bytes(buf) == data[:4096]
            q.qemu_vfree(buf)

            # 3. Many requests in flight at once, then a synchronous read
            # from the main thread (its coroutine is scheduled into the
            # iothread, and the caller waits).
            n_done = [0]
            all_done = threading.Event()
            bufs = [q.qemu_blockalign(bs, 4096) for _ in range(32)]

            def burst() -> None:
                def cb(opaque: Any, ret: int) -> None:
                    assert ret == 0
                    n_done[0] += 1
                    if n_done[0] == len(bufs):
                        all_done.set()
                for i, b in enumerate(bufs):
                    bdrv_aio_preadv(bs, 65536 + i * 4096, q.QEMUIOVector(b), 0, cb, None)

            iot.run_bh(burst)
            _wait(all_done)
            for i, b in enumerate(bufs):
                assert bytes(b) == data[65536 + i * 4096:65536 + (i + 1) * 4096]
                q.qemu_vfree(b)
            out = bytearray(100)
            assert bdrv_pread(bs, 4096, 100, out) == 0 and out == b"\xa5" * 100
            if aio_backend.aio == "threads":
                assert iot.ctx.thread_pool is not None  # the iothread's pool did the work

            # Back to the main context: I/O runs here again.
            assert bdrv_try_change_aio_context(bs, main) == 0
            assert bdrv_get_aio_context(bs) is main
            if aio_backend.aio == "native":
                assert s.aio_state is main.linux_aio
            elif aio_backend.aio == "io_uring":
                assert s.aio_state is main.linux_io_uring
            assert bdrv_pwrite(bs, 0, 5, b"hello") == 0
            out = bytearray(5)
            assert bdrv_pread(bs, 0, 5, out) == 0 and out == b"hello"
        finally:
            name = iot.ctx.name
            if bdrv_get_aio_context(bs) is not main:
                bdrv_try_change_aio_context(bs, main)
            iot.stop()
        # The iothread's context took its pool workers, its engine and its
        # fds with it.
        assert not [t for t in threading.enumerate() if t.name.startswith(name)]
        assert _fds() == fds
    finally:
        bdrv_unref(bs)
    with open(img, "rb") as f:
        got = f.read()
    assert got[:5] == b"hello" and got[4096:12288] == b"\xa5" * 8192


def test_move_blkdebug_tree(disk_dir) -> None:
    """A filter's child moves with it; moving the child moves the tree."""
    main = q.qemu_init_main_loop()
    img = disk_dir / "disk.img"
    data = make_image(img, SIZE)
    bs = bdrv_open(None, {"driver": "blkdebug", "image": {"driver": "file", "filename": str(img)},
                          "inject-error": [{"event": "read_aio", "iotype": "read", "errno": 5,
                                            "sector": 0, "once": True}]}, BDRV_O_RDWR)
    iot = IOThread()
    try:
        assert bs.file is not None
        bs.file.set_aio_context(iot.ctx)  # a child: the whole tree moves
        assert bdrv_get_aio_context(bs) is bdrv_get_aio_context(bs.file) is iot.ctx
        rets: list = []

        def read() -> None:
            def co(_: Any) -> None:
                for _ in range(2):
                    b = bytearray(512)
                    rets.append((bdrv_co_preadv(bs, 0, 512, q.QEMUIOVector(b), 0), bytes(b)))
            q.aio_co_enter(iot.ctx, q.qemu_coroutine_create(co, None))

        iot.run_bh(read)
        for _ in range(1000):
            if len(rets) == 2:
                break
            threading.Event().wait(0.005)
        assert rets[0][0] == -errno.EIO and rets[1] == (0, data[:512])
        bs.set_aio_context(main)
        assert bdrv_get_aio_context(bs) is bdrv_get_aio_context(bs.file) is main
        assert bs.read(0, 16) == data[:16]
    finally:
        iot.stop()
        bdrv_unref(bs)


def test_change_aio_context_errors(disk_dir) -> None:
    main = q.qemu_init_main_loop()
    img = disk_dir / "disk.img"
    make_image(img, 4096)
    bs = bdrv_open(str(img), {}, BDRV_O_RDWR)
    assert bdrv_try_change_aio_context(bs, main) == 0  # already there
    with pytest.raises(TypeError, match="AioContext"):
        bdrv_try_change_aio_context(bs, "main")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="BlockDriverState"):
        bdrv_try_change_aio_context(None, main)  # type: ignore[arg-type]
    errs: list = []

    def co(_: Any) -> None:
        try:
            bdrv_try_change_aio_context(bs, main)
        except RuntimeError as e:
            errs.append(e)

    q.qemu_coroutine_enter(q.qemu_coroutine_create(co, None))
    assert errs and "coroutine" in str(errs[0])
    ctx = q.aio_context_new()
    bdrv_unref(bs)
    assert bdrv_try_change_aio_context(bs, ctx) == -errno.ENOMEDIUM
    with pytest.raises(OSError):
        bs.set_aio_context(ctx)
    q.aio_context_unref(ctx)
    with pytest.raises(ValueError, match="closed"):
        bdrv_try_change_aio_context(bs, ctx)


def test_move_to_context_without_home(disk_dir, aio_backend: AioBackend) -> None:
    """A context no thread runs yet: the engine is set up right away, and the
    thread that later adopts the context serves the device."""
    main = q.qemu_init_main_loop()
    img = disk_dir / "disk.img"
    data = make_image(img, 65536)
    bs = open_image(img, aio_backend)
    ctx = q.aio_context_new()
    try:
        assert bdrv_try_change_aio_context(bs, ctx) == 0
        out: list = []

        def thread() -> None:
            q.qemu_set_current_aio_context(ctx)
            buf = bytearray(4096)
            out.append((bdrv_pread(bs, 4096, 4096, buf), bytes(buf)))
            q.qemu_set_current_aio_context(None)

        t = threading.Thread(target=thread)
        t.start()
        t.join(WAIT_S)
        assert out == [(0, data[4096:8192])]
        assert bdrv_try_change_aio_context(bs, main) == 0
        assert bs.read(0, 8) == data[:8]
    finally:
        bdrv_unref(bs)
        q.aio_context_unref(ctx)
