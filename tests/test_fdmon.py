# SPDX-License-Identifier: GPL-2.0-or-later
"""fd handlers and fd monitors (QEMU's aio_set_fd_handler in
util/aio-posix.c, util/fdmon-epoll.c and util/fdmon-poll.c).

Every handler case runs on both monitors: ``epoll`` (what aio_context_new()
picks on Linux) and ``poll`` (``AioContext(fdmon="poll")`` or
``PYAIOCTX_FDMON=poll``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import resource
import socket
import subprocess
import sys
import threading
import time

import pytest
from helpers import drain, poll_until, watchdog

from pyaioctx import (
    AioContext,
    aio_context_new,
    aio_context_unref,
    aio_notify,
    aio_poll,
    aio_set_fd_handler,
)

FDMONS = ["epoll", "poll"]


@pytest.fixture(params=FDMONS)
def ctx(request):
    c = AioContext(fdmon=request.param)
    assert c.fdmon_name == request.param
    yield c
    if not c.closed:
        aio_context_unref(c)


@pytest.fixture
def pipe():
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    yield r, w
    for fd in (r, w):
        with contextlib.suppress(OSError):
            os.close(fd)


def remove(ctx: AioContext, fd: int) -> None:
    aio_set_fd_handler(ctx, fd, False, None, None)


# --------------------------------------------------------------------------
# Monitor selection


def test_default_monitor_is_epoll():
    """aio_context_new() picks epoll on Linux (unless PYAIOCTX_FDMON says otherwise)."""
    c = aio_context_new()
    try:
        assert c.fdmon_name == (os.environ.get("PYAIOCTX_FDMON") or "epoll")
    finally:
        aio_context_unref(c)


@pytest.mark.parametrize("name", FDMONS)
def test_explicit_monitor(name):
    """AioContext(fdmon=name) uses that monitor."""
    c = AioContext(fdmon=name)
    try:
        assert c.fdmon_name == name
    finally:
        aio_context_unref(c)


def test_env_selects_poll():
    """PYAIOCTX_FDMON=poll makes aio_context_new() use poll; an explicit
    argument still wins over the environment."""
    code = (
        "import pyaioctx\n"
        "c = pyaioctx.aio_context_new(); d = pyaioctx.AioContext(fdmon='epoll')\n"
        "print(c.fdmon_name, d.fdmon_name)\n"
        "pyaioctx.aio_context_unref(c); pyaioctx.aio_context_unref(d)\n"
    )
    env = dict(os.environ, PYAIOCTX_FDMON="poll")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout.split() == ["poll", "epoll"]


def test_unknown_monitor_raises():
    """An unknown monitor name is refused with an error naming it."""
    with pytest.raises(ValueError, match="bogus"):
        AioContext(fdmon="bogus")


# --------------------------------------------------------------------------
# Read and write readiness


def test_pipe_read_handler(ctx, pipe):
    """io_read(opaque) runs when the fd is readable, once per readiness, and
    opaque may be passed by keyword."""
    r, w = pipe
    got = []
    token = object()

    def io_read(opaque) -> None:
        got.append((opaque, os.read(r, 64)))

    aio_set_fd_handler(ctx, r, False, io_read, None, opaque=token)
    drain(ctx)
    assert got == []
    os.write(w, b"hello")
    assert aio_poll(ctx, False)
    assert got == [(token, b"hello")]
    assert not aio_poll(ctx, False)
    remove(ctx, r)


def test_read_handler_is_level_triggered(ctx, pipe):
    """A handler that leaves data in the fd is called again (QEMU's handlers
    are level-triggered)."""
    r, w = pipe
    got = []
    aio_set_fd_handler(ctx, r, False, lambda _: got.append(os.read(r, 1)), None)
    os.write(w, b"abc")
    drain(ctx)
    assert got == [b"a", b"b", b"c"]
    remove(ctx, r)


def test_socketpair_write_and_read(ctx):
    """io_write runs while a socket is writable; io_read when data arrives;
    both can be registered on one fd."""
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    events = []
    try:
        def io_write(opaque) -> None:
            events.append("w")
            opaque.send(b"ping")
            # Done writing: keep only the read handler.
            aio_set_fd_handler(ctx, opaque.fileno(), False, io_read, None, opaque=opaque)

        def io_read(opaque) -> None:
            events.append(("r", opaque.recv(64)))

        def peer_read(opaque) -> None:
            data = opaque.recv(64)
            events.append(("peer", data))
            opaque.send(data.upper())

        aio_set_fd_handler(ctx, a.fileno(), False, io_read, io_write, opaque=a)
        aio_set_fd_handler(ctx, b.fileno(), False, peer_read, None, opaque=b)
        poll_until(ctx, lambda: ("r", b"PING") in events)
        assert events == ["w", ("peer", b"ping"), ("r", b"PING")]
        drain(ctx)
        assert events.count("w") == 1
    finally:
        remove(ctx, a.fileno())
        remove(ctx, b.fileno())
        a.close()
        b.close()


def test_write_handler_waits_for_room(ctx, pipe):
    """io_write is not called while a pipe is full, and is once it drains."""
    r, w = pipe
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(w, b"x" * 65536)
    calls = []
    aio_set_fd_handler(ctx, w, False, None, lambda _: calls.append("w"))
    drain(ctx)
    assert calls == []
    with contextlib.suppress(BlockingIOError):
        while os.read(r, 1 << 20):
            pass
    poll_until(ctx, lambda: calls)
    remove(ctx, w)
    n = len(calls)
    drain(ctx)
    assert len(calls) == n


def test_hangup_is_readable(ctx, pipe):
    """Closing the write end makes the read end report readable (EOF)."""
    r, w = pipe
    got = []

    def io_read(_) -> None:
        got.append(os.read(r, 64))
        remove(ctx, r)

    aio_set_fd_handler(ctx, r, False, io_read, None)
    os.close(w)
    poll_until(ctx, lambda: got)
    assert got == [b""]


def test_remove_with_all_none(ctx, pipe):
    """All-None handlers remove the fd: nothing runs afterwards; removing an
    fd that has no handler is a no-op."""
    r, w = pipe
    got = []
    aio_set_fd_handler(ctx, r, False, lambda _: got.append(os.read(r, 64)), None)
    remove(ctx, r)
    os.write(w, b"x")
    drain(ctx)
    assert got == []
    remove(ctx, r)
    remove(ctx, w)
    assert not aio_poll(ctx, False)


def test_replace_handler(ctx, pipe):
    """Registering an fd again replaces its handlers and opaque."""
    r, w = pipe
    got = []
    aio_set_fd_handler(ctx, r, False, lambda o: got.append(("old", o)), None, opaque=1)
    aio_set_fd_handler(ctx, r, False, lambda o: got.append(("new", o, os.read(r, 64))), None, opaque=2)
    os.write(w, b"x")
    assert aio_poll(ctx, False)
    assert got == [("new", 2, b"x")]
    remove(ctx, r)


def test_switch_read_to_write_interest(ctx):
    """Changing an fd from read to write interest takes effect at once."""
    a, b = socket.socketpair()
    calls = []
    try:
        aio_set_fd_handler(ctx, a.fileno(), False, lambda _: calls.append("r"), None)
        drain(ctx)
        assert calls == []  # nothing to read
        aio_set_fd_handler(ctx, a.fileno(), False, None, lambda _: calls.append("w"))
        assert aio_poll(ctx, False)
        assert calls == ["w"]
        remove(ctx, a.fileno())
    finally:
        a.close()
        b.close()


def test_remove_other_handler_during_dispatch(ctx):
    """A handler removed by another handler in the same dispatch round is
    not called (QEMU skips deleted nodes)."""
    pipes = [os.pipe() for _ in range(2)]
    called = []
    try:
        def make(i: int):
            def io_read(_) -> None:
                called.append(i)
                os.read(pipes[i][0], 64)
                remove(ctx, pipes[1 - i][0])
            return io_read

        for i in range(2):
            aio_set_fd_handler(ctx, pipes[i][0], False, make(i), None)
        drain(ctx)
        for _, w in pipes:
            os.write(w, b"x")
        assert aio_poll(ctx, False)
        assert len(called) == 1
        drain(ctx)
        assert len(called) == 1
    finally:
        for r, w in pipes:
            remove(ctx, r)
            os.close(r)
            os.close(w)


def test_remove_own_handler_from_callback(ctx, pipe):
    """A handler may remove itself; it is not called again."""
    r, w = pipe
    got = []

    def io_read(_) -> None:
        got.append(os.read(r, 1))
        remove(ctx, r)

    aio_set_fd_handler(ctx, r, False, io_read, None)
    os.write(w, b"xyz")
    assert aio_poll(ctx, False)
    drain(ctx)
    assert got == [b"x"]


def test_fd_reuse_after_remove_and_close(ctx):
    """An fd number freed by remove + close can be registered again (the
    monitor forgot the old file)."""
    got = []
    r, w = os.pipe()
    aio_set_fd_handler(ctx, r, False, lambda _: got.append("old"), None)
    remove(ctx, r)
    os.close(r)
    os.close(w)
    r2, w2 = os.pipe()
    try:
        aio_set_fd_handler(ctx, r2, False, lambda _: got.append(os.read(r2, 64)), None)
        os.write(w2, b"new")
        assert aio_poll(ctx, False)
        assert got == [b"new"]
    finally:
        remove(ctx, r2)
        os.close(r2)
        os.close(w2)


def test_many_fds(ctx):
    """Every ready fd among many is dispatched exactly once."""
    n = 200
    pipes = [os.pipe() for _ in range(n)]
    counts = [0] * n
    try:
        for i, (r, _) in enumerate(pipes):
            def io_read(i=i, r=r) -> None:
                counts[i] += 1
                os.read(r, 64)
            aio_set_fd_handler(ctx, r, False, lambda o: o(), None, opaque=io_read)
        drain(ctx)
        for _, w in pipes:
            os.write(w, b"x")
        poll_until(ctx, lambda: all(counts))
        drain(ctx)
        assert counts == [1] * n
    finally:
        for r, w in pipes:
            remove(ctx, r)
            os.close(r)
            os.close(w)


def test_high_fd_number(ctx):
    """fds above 1024 (beyond select()'s FD_SETSIZE) work."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft <= 1600:
        pytest.skip(f"RLIMIT_NOFILE {soft} too low")
    r, w = os.pipe()
    high = 1500
    while True:
        try:
            fcntl.fcntl(high, fcntl.F_GETFD)
            high += 1
        except OSError:
            break
    os.dup2(r, high)
    os.close(r)
    got = []
    try:
        aio_set_fd_handler(ctx, high, False, lambda _: got.append(os.read(high, 64)), None)
        os.write(w, b"hi")
        assert aio_poll(ctx, False)
        assert got == [b"hi"]
    finally:
        remove(ctx, high)
        os.close(high)
        os.close(w)


def test_fd_readiness_from_other_thread_wakes_blocked_poll(ctx, pipe):
    """A write from another thread wakes aio_poll(ctx, True) blocked on the fd."""
    r, w = pipe
    got = []
    aio_set_fd_handler(ctx, r, False, lambda _: got.append(os.read(r, 64)), None)
    drain(ctx)

    def writer() -> None:
        time.sleep(0.05)
        os.write(w, b"z")

    t = threading.Thread(target=writer)
    t.start()
    with watchdog(ctx, 5.0) as wd:
        assert aio_poll(ctx, True)
    assert not wd["fired"]
    t.join()
    assert got == [b"z"]
    remove(ctx, r)


# --------------------------------------------------------------------------
# Bad input


def test_negative_fd_raises(ctx):
    """A negative fd is refused."""
    with pytest.raises((ValueError, OSError)):
        aio_set_fd_handler(ctx, -1, False, lambda _: None, None)
    assert not aio_poll(ctx, False)


def test_closed_fd_raises(ctx):
    """An fd that is not open is refused with EBADF (or ValueError), and the
    context keeps working."""
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises((OSError, ValueError)) as exc:
        aio_set_fd_handler(ctx, r, False, lambda _: None, None)
    if isinstance(exc.value, OSError) and not isinstance(exc.value, ValueError):
        assert exc.value.errno == errno.EBADF
    drain(ctx)
    assert not aio_poll(ctx, False)


def test_non_callable_handler_raises(ctx, pipe):
    """A non-callable handler is refused with TypeError."""
    r, _ = pipe
    with pytest.raises(TypeError):
        aio_set_fd_handler(ctx, r, False, "read", None)
    with pytest.raises(TypeError):
        aio_set_fd_handler(ctx, r, False, None, 3)
    assert not aio_poll(ctx, False)


def test_register_from_other_thread_while_polling(ctx, pipe):
    """A handler registered from another thread while the home thread is
    blocked in aio_poll is picked up (aio_set_fd_handler kicks the loop, as
    QEMU's dataplane start relies on), and removed the same way."""
    from pyaioctx import aio_bh_schedule_oneshot, qemu_set_current_aio_context

    r, w = pipe
    got = []
    started = threading.Event()
    running = [True]
    errors = []

    def iothread() -> None:
        try:
            qemu_set_current_aio_context(ctx)
            started.set()
            while running[0]:
                aio_poll(ctx, True)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=iothread, daemon=True)
    t.start()
    try:
        assert started.wait(5)
        time.sleep(0.05)  # let it block
        aio_set_fd_handler(ctx, r, False,
                           lambda _: got.append((threading.get_ident(), os.read(r, 64))), None)
        os.write(w, b"x")
        deadline = time.monotonic() + 3
        while not got and time.monotonic() < deadline:
            time.sleep(0.005)
        assert got == [(t.ident, b"x")]
        remove(ctx, r)
        time.sleep(0.05)
        os.write(w, b"y")
        time.sleep(0.1)
        assert len(got) == 1
    finally:
        def _stop(_) -> None:
            running[0] = False

        aio_bh_schedule_oneshot(ctx, _stop, None)
        t.join(5)
        assert not t.is_alive()
    assert not errors
