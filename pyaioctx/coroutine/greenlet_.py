# SPDX-License-Identifier: GPL-2.0-or-later
"""Greenlet-backed coroutines (the optional ``greenlet`` extra): the model of
QEMU's util/coroutine-ucontext.c, with a greenlet as the stack.

A coroutine gets a greenlet at its first enter, with the entering greenlet
as its parent; yielding switches to the parent.  When a coroutine is later
entered from a different greenlet (another coroutine nests it), the parent
is re-pointed first.

Pool.  Starting a greenlet costs about as much as ten switches, so, like
QEMU's coroutine pool, a greenlet whose coroutine terminated is parked in a
per-OS-thread pool (at most ``pool_max``) and runs the next coroutine that
is entered for the first time in that thread.  ``cleanup()`` finishes the
calling thread's parked greenlets; a thread's pool goes away with the
thread.

A greenlet belongs to the OS thread that created it, so a coroutine stays in
the thread of its first enter: entering it from another OS thread raises
CoroutineError (DESIGN rule 7).
"""

from __future__ import annotations

import threading
from typing import Any, Optional

from greenlet import GreenletExit, getcurrent, greenlet

from ._core import COROUTINE_TERMINATE, COROUTINE_YIELD, Coroutine, CoroutineAction, CoroutineError

__all__ = ["GreenletBackend"]


class GreenletBackend:
    """Coroutine backend on greenlets (see the module docstring).

    ``co._impl`` is the coroutine's greenlet from its first enter until it
    terminates; only the OS thread that created it touches it.
    ``co._ret`` is that greenlet's parent (the greenlet that last entered
    it, where a yield goes), kept next to it so that neither a yield nor a
    re-enter from the same greenlet reads the parent from greenlet.
    ``_local.pool`` parked greenlets of the calling OS thread; that thread only.
    """

    name = "greenlet"

    def __init__(self, pool_max: int = 64) -> None:
        self.pool_max = pool_max
        # The core and the I/O engines switch greenlets themselves on their
        # hot paths (CoroutineBackend.greenlet_current): a resume of a
        # suspended coroutine by its parent is co._impl.switch(), a yield
        # co._ret.switch(COROUTINE_YIELD) -- enter's and yield_'s own cases.
        # An instance attribute: CPython reads those fastest.
        self.greenlet_current = getcurrent
        self._local = threading.local()
        self.started = 0  # greenlets created (all threads; informational)

    def __repr__(self) -> str:
        return f"<GreenletBackend pool_max={self.pool_max}>"

    def _pool(self) -> list:
        try:
            return self._local.pool
        except AttributeError:
            pool = self._local.pool = []
            return pool

    def _loop(self, co: Optional[Coroutine]) -> CoroutineAction:
        """Body of every coroutine greenlet: run coroutines until the pool is full."""
        pool = self._pool()
        me = getcurrent()  # this greenlet, for its whole life
        while True:
            try:
                co.entry(co.entry_arg)  # type: ignore[union-attr,misc]
            except GreenletExit:
                raise  # the greenlet is being collected; let greenlet finish it
            except BaseException as e:  # noqa: BLE001 - re-raised by the enterer
                co._exc = e  # type: ignore[union-attr]
                del e
            co._impl = None  # type: ignore[union-attr]
            co = None  # a parked greenlet must not keep its last coroutine alive
            if len(pool) >= self.pool_max:
                return COROUTINE_TERMINATE  # finish; control goes to the parent
            pool.append(me)
            # Park: the enterer sees TERMINATE; the next first-enter in this
            # thread switches back here with its coroutine.
            co = me.parent.switch(COROUTINE_TERMINATE)

    def enter(self, lt: Any, from_: Coroutine, to: Coroutine) -> CoroutineAction:
        cur = getcurrent()
        g = to._impl
        if g is None:
            try:
                g = self._local.pool.pop()
            except (AttributeError, IndexError):
                g = greenlet(self._loop, cur)
                self.started += 1
            else:
                if g.parent is not cur:
                    g.parent = cur
            to._impl = g
            to._ret = cur
            lt.co = to
            ret = g.switch(to)
        else:
            if to._ret is not cur:
                try:
                    g.parent = cur
                except ValueError as e:  # "parent cannot be on a different thread"
                    raise CoroutineError(
                        f"qemu_coroutine_enter: coroutine {to.name!r} was started in another "
                        "OS thread; a greenlet coroutine never changes thread") from e
                to._ret = cur
            lt.co = to
            ret = g.switch()
        lt.co = from_ if from_._backend is not None else None
        return ret

    def yield_(self, lt: Any, co: Coroutine) -> None:
        co._ret.switch(COROUTINE_YIELD)  # co._impl.parent

    def cleanup(self) -> int:
        """Finish the calling thread's parked greenlets (QEMU's
        ``coroutine_pool_cleanup``).  Returns how many."""
        pool = self._pool()
        n = len(pool)
        cur = getcurrent()
        while pool:
            g = pool.pop()
            g.parent = cur
            g.throw(GreenletExit)
        return n

    def stats(self) -> dict[str, int]:
        return {"greenlets_started": self.started, "greenlets_idle": len(self._pool())}
