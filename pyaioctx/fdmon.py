# SPDX-License-Identifier: GPL-2.0-or-later
"""File-descriptor monitors: QEMU's FDMonOps (util/fdmon-epoll.c, fdmon-poll.c).

An AioContext asks its monitor to watch fds for readability/writability and
to wait for them.  The interface is deliberately tiny (:class:`FDMon`) so a
backend is one small class, selected in one place (:func:`fdmon_new`), in
the style of trio's ``_io_epoll.py``.

Some facts about the OS that this relies on:

* epoll is level-triggered by default: an fd that is still readable after a
  handler ran is reported again on the next wait.  Handlers that do not drain
  their fd get called again, exactly as with QEMU's aio-posix.
* ``select.epoll.poll`` and ``select.poll.poll`` retry on EINTR themselves
  (PEP 475) and round a fractional-millisecond timeout *up*, so a wait never
  returns before a timer deadline it was computed from.
* HUP and ERR are always reported by the kernel, even if not requested; QEMU
  treats them as "readable" (and ERR also as "writable"), so the handler gets
  to see the error when it reads.
"""

from __future__ import annotations

import os
import select
from typing import Protocol

__all__ = ["FDMon", "FDMonEpoll", "FDMonPoll", "fdmon_new", "EV_READ", "EV_WRITE", "FDMON_NAMES"]

#: Abstract readiness bits used between the AioContext and its monitor.
EV_READ = 1
EV_WRITE = 2


class FDMon(Protocol):
    """What an AioContext needs from an fd monitor (QEMU's FDMonOps).

    All methods are called from the context's home thread, with the
    context's handler table consistent.
    """

    name: str

    def update(self, fd: int, old_events: int, new_events: int) -> None:
        """Change the interest set of ``fd``; 0 means "not watched"."""

    def wait(self, timeout_ns: int) -> list[tuple[int, int]]:
        """Block up to ``timeout_ns`` (-1: forever, 0: don't block).

        Returns ``[(fd, EV_* bits), ...]`` for the ready fds.
        """

    def close(self) -> None:
        """Release the monitor's own resources; idempotent."""


def _timeout_s(timeout_ns: int) -> float | None:
    if timeout_ns < 0:
        return None
    return timeout_ns / 1e9


class FDMonEpoll:
    """epoll(7) monitor: O(ready) waits, the default on Linux."""

    name = "epoll"
    _R = (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) if hasattr(select, "EPOLLIN") else 0
    _W = (select.EPOLLOUT | select.EPOLLERR) if hasattr(select, "EPOLLOUT") else 0

    def __init__(self) -> None:
        self._ep = select.epoll()
        self._ep_poll = self._ep.poll
        # Pre-built translation of epoll masks to EV_* bits.
        self._cache: dict[int, int] = {}

    def update(self, fd: int, old_events: int, new_events: int) -> None:
        mask = (select.EPOLLIN if new_events & EV_READ else 0) | (
            select.EPOLLOUT if new_events & EV_WRITE else 0
        )
        if not old_events:
            if new_events:
                self._ep.register(fd, mask)
        elif not new_events:
            try:
                self._ep.unregister(fd)
            except (OSError, ValueError):
                # The fd was closed before its handler was removed: the
                # kernel already dropped it from the interest list.
                pass
        else:
            self._ep.modify(fd, mask)

    def wait(self, timeout_ns: int) -> list[tuple[int, int]]:
        events = self._ep_poll(_timeout_s(timeout_ns))
        if not events:
            return []
        cache = self._cache
        out = []
        for fd, ev in events:
            bits = cache.get(ev)
            if bits is None:
                bits = cache[ev] = (EV_READ if ev & self._R else 0) | (EV_WRITE if ev & self._W else 0)
            out.append((fd, bits))
        return out

    def close(self) -> None:
        self._ep.close()

    def fileno(self) -> int:
        return self._ep.fileno()


class FDMonPoll:
    """poll(2) monitor: the portable fallback (any POSIX system)."""

    name = "poll"

    def __init__(self) -> None:
        self._p = select.poll()
        self._R = select.POLLIN | select.POLLHUP | select.POLLERR | getattr(select, "POLLNVAL", 0)
        self._W = select.POLLOUT | select.POLLERR

    def update(self, fd: int, old_events: int, new_events: int) -> None:
        if not new_events:
            try:
                self._p.unregister(fd)
            except KeyError:
                pass
            return
        if not old_events:
            # poll() accepts any number and reports a closed fd as POLLNVAL
            # on every wait, which would call its handler in a busy loop;
            # refuse it up front with EBADF, as epoll_ctl(ADD) does.
            os.fstat(fd)
        mask = (select.POLLIN if new_events & EV_READ else 0) | (
            select.POLLOUT if new_events & EV_WRITE else 0
        )
        self._p.register(fd, mask)

    def wait(self, timeout_ns: int) -> list[tuple[int, int]]:
        if timeout_ns < 0:
            t = None
        else:
            # poll() takes milliseconds; round up like qemu_timeout_ns_to_ms.
            t = (timeout_ns + 999_999) // 1_000_000
        events = self._p.poll(t)
        R, W = self._R, self._W
        return [(fd, (EV_READ if ev & R else 0) | (EV_WRITE if ev & W else 0)) for fd, ev in events]

    def close(self) -> None:
        pass


#: Monitors this platform offers, best first.
FDMON_NAMES: tuple[str, ...] = tuple(
    n for n, ok in (("epoll", hasattr(select, "epoll")), ("poll", hasattr(select, "poll"))) if ok
)


def fdmon_new(name: str | None = None) -> FDMon:
    """Create a monitor: ``name`` > ``$PYAIOCTX_FDMON`` > best available."""
    if name is None:
        name = os.environ.get("PYAIOCTX_FDMON") or FDMON_NAMES[0]
    if name == "epoll" and "epoll" in FDMON_NAMES:
        return FDMonEpoll()
    if name == "poll" and "poll" in FDMON_NAMES:
        return FDMonPoll()
    raise ValueError(f"unknown or unavailable fd monitor {name!r}; available: {', '.join(FDMON_NAMES)}")
