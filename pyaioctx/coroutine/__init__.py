# SPDX-License-Identifier: GPL-2.0-or-later
"""Coroutines: port of QEMU's util/qemu-coroutine*.c and the coroutine part
of util/async.c.

``qemu_coroutine_yield()`` may be called at any call depth inside a
coroutine -- a plain function called from a coroutine may yield -- which is
why coroutines here are stacks (OS threads or greenlets), not async/await.

Backends (one module each, same semantics, chosen here and only here):

* ``thread``   every coroutine runs on a pooled OS thread and exactly one
               thread of a logical QEMU thread runs at a time (QEMU's
               coroutine-gthread model); always available.
* ``greenlet`` every coroutine is a greenlet; faster; needs the optional
               ``greenlet`` extra.

Selection: :func:`set_backend` overrides the ``PYAIOCTX_COROUTINE``
environment variable, which overrides the default (greenlet if importable,
else thread).  An invalid environment value gives a RuntimeWarning listing
the valid names and falls back to the default.  :func:`get_backend` says
which backend is active and why.  A coroutine keeps the backend that was
active when it was created; backends may be mixed (a thread-backed
coroutine may enter a greenlet one and vice versa).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from typing import Optional

from . import _core
from ._core import (
    COROUTINE_ENTER,
    COROUTINE_TERMINATE,
    COROUTINE_YIELD,
    Coroutine,
    CoroutineAction,
    CoroutineBackend,
    CoroutineError,
    CoroutineState,
    NotInCoroutineError,
    _co_schedule_bh_run,  # noqa: F401 - called by AioContext.co_schedule_bh
    aio_co_enter,
    aio_co_reschedule_self,
    aio_co_schedule,
    aio_co_wake,
    qemu_aio_coroutine_enter,
    qemu_coroutine_create,
    qemu_coroutine_enter,
    qemu_coroutine_enter_if_inactive,
    qemu_coroutine_entered,
    qemu_coroutine_get_aio_context,
    qemu_coroutine_self,
    qemu_coroutine_yield,
    qemu_in_coroutine,
)
from .locks import *  # noqa: F401,F403
from .locks import __all__ as _locks_all
from .sleep import *  # noqa: F401,F403
from .sleep import __all__ as _sleep_all
from .thread import ThreadBackend

__all__ = [
    "Coroutine",
    "CoroutineAction",
    "CoroutineBackend",
    "CoroutineBackendInfo",
    "CoroutineError",
    "CoroutineState",
    "NotInCoroutineError",
    "COROUTINE_ENTER",
    "COROUTINE_YIELD",
    "COROUTINE_TERMINATE",
    "qemu_coroutine_create",
    "qemu_coroutine_enter",
    "qemu_aio_coroutine_enter",
    "qemu_coroutine_enter_if_inactive",
    "qemu_coroutine_yield",
    "qemu_coroutine_self",
    "qemu_in_coroutine",
    "qemu_coroutine_entered",
    "qemu_coroutine_get_aio_context",
    "aio_co_enter",
    "aio_co_wake",
    "aio_co_schedule",
    "aio_co_reschedule_self",
    "qemu_coroutine_inc_pool_size",
    "qemu_coroutine_dec_pool_size",
    "coroutine_pool_cleanup",
    *_locks_all,
    *_sleep_all,
]

log = logging.getLogger("pyaioctx.coroutine")

ENV_VAR = "PYAIOCTX_COROUTINE"
VALID_BACKENDS = ("thread", "greenlet")


@dataclasses.dataclass(frozen=True)
class CoroutineBackendInfo:
    """What :func:`get_backend` returns: the active backend and why."""

    name: str            # "thread" or "greenlet"
    reason: str          # e.g. "PYAIOCTX_COROUTINE=thread", "set_backend('greenlet')"
    available: tuple[str, ...]  # backends usable in this interpreter

    def __str__(self) -> str:
        return self.name


def _probe_greenlet() -> Optional[str]:
    """None if the greenlet backend can be used, else why not."""
    try:
        import greenlet  # noqa: F401
    except ImportError as e:
        return f"greenlet is not importable ({e}); install the 'greenlet' extra"
    return None


_thread_backend: Optional[ThreadBackend] = None
_greenlet_backend: Optional[CoroutineBackend] = None
_info: Optional[CoroutineBackendInfo] = None


def available_backends() -> tuple[str, ...]:
    """Names of the backends usable here (thread is always available)."""
    return ("greenlet", "thread") if _probe_greenlet() is None else ("thread",)


def _backend_object(name: str) -> CoroutineBackend:
    global _thread_backend, _greenlet_backend
    if name == "thread":
        if _thread_backend is None:
            _thread_backend = ThreadBackend()
        return _thread_backend
    if name == "greenlet":
        why = _probe_greenlet()
        if why is not None:
            raise RuntimeError(f"coroutine backend 'greenlet' is unavailable: {why}")
        if _greenlet_backend is None:
            from .greenlet_ import GreenletBackend

            _greenlet_backend = GreenletBackend()
        return _greenlet_backend
    raise ValueError(f"unknown coroutine backend {name!r}; valid: {', '.join(VALID_BACKENDS)}")


def _install(backend: CoroutineBackend, reason: str) -> None:
    global _info
    _core._active = backend
    _info = CoroutineBackendInfo(backend.name, reason, available_backends())
    log.debug("coroutine backend: %s (%s)", backend.name, reason)


def set_backend(name: str) -> None:
    """Make ``name`` ("thread" or "greenlet") the backend of coroutines
    created from now on.  Raises ValueError for an unknown name and
    RuntimeError if the backend is unavailable (with the reason)."""
    if not isinstance(name, str):
        raise TypeError(f"set_backend: name must be a str, got {type(name).__name__}")
    _install(_backend_object(name), f"set_backend({name!r})")


def get_backend() -> CoroutineBackendInfo:
    """The active backend, why it was chosen, and which are available."""
    assert _info is not None
    return _info


def _select_default() -> None:
    """Import-time choice: environment variable, else greenlet, else thread."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        if env in VALID_BACKENDS:
            try:
                _install(_backend_object(env), f"{ENV_VAR}={env}")
                return
            except RuntimeError as e:
                warnings.warn(f"{ENV_VAR}={env}: {e}; falling back to the default",
                              RuntimeWarning, stacklevel=2)
        else:
            warnings.warn(
                f"{ENV_VAR}={env!r} is not a valid coroutine backend; valid names: "
                f"{', '.join(VALID_BACKENDS)}; falling back to the default",
                RuntimeWarning, stacklevel=2)
    why = _probe_greenlet()
    if why is None:
        _install(_backend_object("greenlet"), "default: greenlet is importable")
    else:
        _install(_backend_object("thread"), f"default: {why}")


def qemu_coroutine_inc_pool_size(additional_pool_size: int) -> None:
    """Port of ``qemu_coroutine_inc_pool_size``: let the backends keep more
    idle coroutine threads / greenlets (QEMU: more pooled stacks)."""
    for b in (_thread_backend, _greenlet_backend):
        if b is not None:
            b.pool_max += int(additional_pool_size)  # type: ignore[attr-defined]


def qemu_coroutine_dec_pool_size(removing_pool_size: int) -> None:
    """Port of ``qemu_coroutine_dec_pool_size``."""
    for b in (_thread_backend, _greenlet_backend):
        if b is not None:
            b.pool_max = max(0, b.pool_max - int(removing_pool_size))  # type: ignore[attr-defined]


def coroutine_pool_cleanup() -> int:
    """Port of QEMU's ``coroutine_pool_cleanup``: stop the idle pooled
    coroutine threads now (they also exit by themselves after 10 s idle) and
    finish the calling thread's parked greenlets.  Returns how many."""
    n = _thread_backend.cleanup() if _thread_backend is not None else 0
    if _greenlet_backend is not None:
        n += _greenlet_backend.cleanup()  # type: ignore[attr-defined]
    return n


_select_default()
