# SPDX-License-Identifier: GPL-2.0-or-later
"""Per-*logical*-thread state: what QEMU keeps in ``__thread`` variables.

QEMU keeps the current coroutine and the current AioContext in thread-local
variables.  With the thread-backed coroutine backend a coroutine runs on an OS
thread of its own, yet for QEMU's semantics it belongs to the thread that
entered it (exactly one OS thread of a logical thread runs at a time).  So the
state lives in a :class:`LogicalThread` object, and every OS thread that works
on behalf of a logical thread points its ``threading.local`` slot at the same
object.  Greenlets share their OS thread's slot naturally.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["LogicalThread", "current", "bind"]


class LogicalThread:
    """State of one logical QEMU thread.

    ``ctx``  the thread's home AioContext (``qemu_get_current_aio_context``);
             written only by the logical thread itself.
    ``co``   the coroutine currently running in this logical thread, or None;
             written only by the coroutine backend while switching.
    ``leader`` backend-private object representing the thread outside any
             coroutine (QEMU's leader coroutine).
    """

    __slots__ = ("ctx", "co", "leader", "name", "__weakref__")

    def __init__(self, name: str) -> None:
        self.ctx: Any = None
        self.co: Any = None
        self.leader: Any = None
        self.name = name

    def __repr__(self) -> str:
        return f"<LogicalThread {self.name!r}>"


_local = threading.local()


def current() -> LogicalThread:
    """The calling OS thread's logical thread (created on first use)."""
    try:
        return _local.lt
    except AttributeError:
        lt = _local.lt = LogicalThread(threading.current_thread().name)
        return lt


def bind(lt: LogicalThread) -> None:
    """Make the calling OS thread act for ``lt`` (coroutine backends only)."""
    _local.lt = lt
