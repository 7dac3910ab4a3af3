# SPDX-License-Identifier: GPL-2.0-or-later
"""Event notifiers: port of QEMU's util/event_notifier-posix.c.

An EventNotifier is a file descriptor that becomes readable when "set" from
any thread and is drained by ``event_notifier_test_and_clear``.  Linux eventfd
is used where available (one fd, a 64-bit counter); elsewhere a non-blocking
pipe pair stands in, as QEMU does.

Facts relied on:

* Writing 1 to an eventfd whose counter would overflow fails with EAGAIN; the
  fd is already readable then, so the set is not lost and EAGAIN is ignored.
  A full pipe likewise means "already signalled".
* ``event_notifier_set`` may race with ``event_notifier_cleanup`` in another
  thread (the same hazard asyncio's ``_write_to_self`` guards against).  A set
  on a cleaned-up notifier returns ``-EBADF`` instead of writing to an fd
  number that may have been reused.
"""

from __future__ import annotations

import errno
import os

__all__ = [
    "EventNotifier",
    "event_notifier_init",
    "event_notifier_init_fd",
    "event_notifier_cleanup",
    "event_notifier_set",
    "event_notifier_test_and_clear",
    "event_notifier_get_fd",
    "event_notifier_get_wfd",
]

_HAVE_EVENTFD = hasattr(os, "eventfd")
_ONE = (1).to_bytes(8, "little")


class EventNotifier:
    """QEMU's ``EventNotifier``: instantiate, then :func:`event_notifier_init`.

    ``rfd``/``wfd`` are -1 until initialised and after cleanup.  They are
    written only by init/cleanup; set and test_and_clear read them.
    """

    __slots__ = ("rfd", "wfd", "initialized", "_is_eventfd", "__weakref__")

    def __init__(self, active: bool | None = None) -> None:
        self.rfd = -1
        self.wfd = -1
        self.initialized = False
        self._is_eventfd = False
        if active is not None:
            ret = event_notifier_init(self, active)
            if ret < 0:
                raise OSError(-ret, f"event_notifier_init: {os.strerror(-ret)}")

    # Pythonic face -------------------------------------------------------
    def set(self) -> int:
        return event_notifier_set(self)

    def test_and_clear(self) -> bool:
        return event_notifier_test_and_clear(self)

    def fileno(self) -> int:
        return self.rfd

    def cleanup(self) -> None:
        event_notifier_cleanup(self)

    def __enter__(self) -> "EventNotifier":
        if not self.initialized:
            ret = event_notifier_init(self, False)
            if ret < 0:
                raise OSError(-ret, os.strerror(-ret))
        return self

    def __exit__(self, *exc: object) -> None:
        event_notifier_cleanup(self)

    def __repr__(self) -> str:
        state = f"fd={self.rfd}" if self.initialized else "uninitialized"
        return f"<EventNotifier {state}>"


def _check(e: object) -> EventNotifier:
    if not isinstance(e, EventNotifier):
        raise TypeError(f"expected an EventNotifier, got {type(e).__name__}")
    return e


def event_notifier_init(e: EventNotifier, active: bool) -> int:
    """Port of ``event_notifier_init``: 0 on success, ``-errno`` on failure.

    Creates a non-blocking, close-on-exec eventfd (or pipe); if ``active`` the
    notifier starts out set.  Initialising an initialised notifier is an error
    (QEMU would leak the old fd); it returns ``-EBUSY``.
    """
    _check(e)
    if e.initialized:
        return -errno.EBUSY
    try:
        if _HAVE_EVENTFD:
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            e.rfd = e.wfd = fd
            e._is_eventfd = True
        else:  # pragma: no cover - non-Linux
            r, w = os.pipe()
            for fd in (r, w):
                os.set_blocking(fd, False)
                os.set_inheritable(fd, False)
            e.rfd, e.wfd = r, w
            e._is_eventfd = False
    except OSError as exc:
        return -(exc.errno or errno.EIO)
    e.initialized = True
    if active:
        event_notifier_set(e)
    return 0


def event_notifier_init_fd(e: EventNotifier, fd: int) -> None:
    """Port of ``event_notifier_init_fd``: wrap an existing eventfd."""
    _check(e)
    e.rfd = e.wfd = fd
    e._is_eventfd = True
    e.initialized = True


def event_notifier_cleanup(e: EventNotifier) -> None:
    """Port of ``event_notifier_cleanup``: close the fd(s); idempotent."""
    _check(e)
    if not e.initialized:
        return
    rfd, wfd = e.rfd, e.wfd
    # Publish "closed" before closing so a concurrent set sees -1 rather
    # than an fd number the OS may already have handed to someone else.
    e.rfd = e.wfd = -1
    e.initialized = False
    os.close(rfd)
    if wfd != rfd:
        os.close(wfd)


def event_notifier_get_fd(e: EventNotifier) -> int:
    """Port of ``event_notifier_get_fd``: the fd to poll for readability."""
    return e.rfd


def event_notifier_get_wfd(e: EventNotifier) -> int:
    """Port of ``event_notifier_get_wfd``: the fd that set writes to."""
    return e.wfd


def event_notifier_set(e: EventNotifier) -> int:
    """Port of ``event_notifier_set``.  Any thread.  0, or ``-errno``."""
    try:
        wfd = e.wfd
    except AttributeError:
        # Checked here rather than up front: set is on every hot path.
        raise TypeError(f"expected an EventNotifier, got {type(e).__name__}") from None
    if wfd < 0:
        return -errno.EBADF
    try:
        os.write(wfd, _ONE if e._is_eventfd else b"\0")
    except BlockingIOError:
        pass  # counter saturated / pipe full: already signalled
    except OSError as exc:
        return -(exc.errno or errno.EIO)
    return 0


def event_notifier_test_and_clear(e: EventNotifier) -> bool:
    """Port of ``event_notifier_test_and_clear``: drain, True if it was set."""
    try:
        rfd = e.rfd
    except AttributeError:
        raise TypeError(f"expected an EventNotifier, got {type(e).__name__}") from None
    if rfd < 0:
        return False
    value = False
    try:
        if e._is_eventfd:
            return bool(os.read(rfd, 8))
        while True:  # drain the pipe completely, as QEMU does
            data = os.read(rfd, 512)
            if not data:
                break
            value = True
    except BlockingIOError:
        pass
    return value
