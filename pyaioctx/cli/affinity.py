# SPDX-License-Identifier: GPL-2.0-or-later
"""CPU affinity for the command-line tools (``--affinity``).

Not in QEMU, whose worker threads run in parallel with its event loop.
Here the event-loop thread and the thread pool's workers share the GIL, so
they never run Python at the same time, and every hand-off of the GIL to a
thread on another CPU costs a cross-CPU wake-up (on virtual machines an
inter-processor interrupt, measured at 25-30 µs).  Keeping the threads that
share the GIL on one CPU makes those hand-offs plain context switches:
``pyaioctx bench -i threads -t none`` at queue depth 32 and 128 ran twice as
fast on two CPUs when confined to one of them.  The kernel's side of the
I/O is not confined (interrupts and block-layer work run where the kernel
puts them).

``--affinity`` takes ``auto`` (the default: one CPU when the device's I/O
goes through the thread pool, i.e. the ``file`` driver with
``aio=threads``; otherwise unchanged), ``all`` (unchanged), or a CPU list
in taskset's syntax (``0``, ``0-3``, ``1,3``).  It is applied to the calling
thread before the thread pool starts its workers, which inherit it.

Library users get the same effect by calling ``os.sched_setaffinity(0,
{cpu})`` in the home thread of an AioContext before its first request.

With ``auto``, when the device's I/O goes through the thread pool, the
pool's workers also run under ``SCHED_BATCH``
(:func:`pyaioctx.thread_pool_set_sched_batch`): a worker woken by its
finished I/O then no longer preempts the event loop only to block on the
GIL it holds (on one CPU: 1.5 context switches per request instead of 2.5,
10-25 % more requests per second at depth 32 and 128).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any, Optional

__all__ = ["AffinityError", "parse_cpu_list", "check_affinity_spec", "current_cpu",
           "uses_thread_pool", "apply_affinity", "restore_affinity", "apply_pool_sched",
           "restore_pool_sched"]


class AffinityError(ValueError):
    """A bad ``--affinity`` value; the message says what is wrong."""


def parse_cpu_list(spec: str) -> set[int]:
    """Parse a CPU list in taskset's ``-c`` syntax: ``0``, ``0-3``, ``1,3-4``."""
    cpus: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        lo, dash, hi = part.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise AffinityError(f"invalid CPU list '{spec}' (expected e.g. 0, 0-3 or 1,3)")
        a, b = int(lo), int(hi) if dash else int(lo)
        if b < a:
            raise AffinityError(f"invalid CPU range '{part}' in '{spec}'")
        cpus.update(range(a, b + 1))
    return cpus


def check_affinity_spec(spec: str) -> None:
    """Raise :class:`AffinityError` unless ``spec`` is ``auto``, ``all`` or a
    CPU list (the option's syntax; whether the CPUs exist is checked when it
    is applied)."""
    if spec not in ("auto", "all"):
        parse_cpu_list(spec)


_sched_getcpu: Any = None


def current_cpu() -> Optional[int]:
    """The CPU the calling thread runs on now (``sched_getcpu``), or None."""
    global _sched_getcpu
    if _sched_getcpu is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _sched_getcpu = libc.sched_getcpu
            _sched_getcpu.restype = ctypes.c_int
            _sched_getcpu.argtypes = []
        except (OSError, AttributeError):
            _sched_getcpu = False
    if not _sched_getcpu:
        return None
    cpu = _sched_getcpu()
    return cpu if cpu >= 0 else None


def uses_thread_pool(bs: Any) -> bool:
    """True when ``bs`` or a node below it is the ``file`` driver doing its
    reads and writes on the thread pool (``aio=threads``)."""
    from ..block.file_posix import BDRVRawState
    seen = 0
    while bs is not None and seen < 64:
        s = getattr(bs, "opaque", None)
        if isinstance(s, BDRVRawState):
            return s.engine is None
        bs = getattr(bs, "file", None)
        seen += 1
    return False


def apply_affinity(spec: str, pool_io: bool) -> Optional[set[int]]:
    """Apply ``--affinity spec`` to the calling thread.

    Returns the mask it had before when it changed it (for
    :func:`restore_affinity`), else None.  Raises :class:`AffinityError`
    for a bad list or CPUs this process may not use.
    """
    if not hasattr(os, "sched_setaffinity"):
        if spec in ("auto", "all"):
            return None
        raise AffinityError("--affinity: CPU affinity is not supported on this system")
    allowed = os.sched_getaffinity(0)
    if spec == "all":
        return None
    if spec == "auto":
        if not pool_io or len(allowed) < 2:
            return None
        cpu = current_cpu()
        cpus = {cpu if cpu in allowed else min(allowed)}
    else:
        cpus = parse_cpu_list(spec)
        bad = cpus - allowed
        if bad:
            raise AffinityError(f"--affinity: CPU {min(bad)} is not available to this process "
                                f"(allowed: {_fmt(allowed)})")
    if cpus == allowed:
        return None
    os.sched_setaffinity(0, cpus)
    return allowed


def restore_affinity(saved: Optional[set[int]]) -> None:
    """Undo :func:`apply_affinity` for the calling thread (threads started
    meanwhile keep the mask they inherited)."""
    if saved is not None:
        os.sched_setaffinity(0, saved)


def apply_pool_sched(spec: str, bs: Any) -> Any:
    """With ``--affinity auto`` and ``bs``'s I/O on the thread pool, run the
    pool's workers under ``SCHED_BATCH``.  Returns the pool when it turned
    that on (for :func:`restore_pool_sched`), else None; a platform without
    ``SCHED_BATCH`` is left as it is."""
    if spec != "auto" or not uses_thread_pool(bs) or not hasattr(os, "SCHED_BATCH"):
        return None
    from ..thread_pool import aio_get_thread_pool, thread_pool_set_sched_batch
    pool = aio_get_thread_pool(bs.aio_context)
    if pool.sched_batch:
        return None
    try:
        thread_pool_set_sched_batch(pool, True)
    except OSError:
        return None
    return pool


def restore_pool_sched(pool: Any) -> None:
    """Undo :func:`apply_pool_sched`."""
    if pool is not None and not pool.closed:
        from ..thread_pool import thread_pool_set_sched_batch
        thread_pool_set_sched_batch(pool, False)


def _fmt(cpus: set[int]) -> str:
    out, run = [], []
    for c in sorted(cpus) + [-2]:
        if run and c != run[-1] + 1:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
            run = []
        run.append(c)
    return ",".join(out)
