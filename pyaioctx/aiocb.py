# SPDX-License-Identifier: GPL-2.0-or-later
"""Asynchronous I/O control blocks: QEMU's BlockAIOCB / AIOCBInfo.

Ports ``qemu_aio_get``, ``qemu_aio_ref``/``qemu_aio_unref`` (block/block-backend.c
in current QEMU, block.c historically) and ``bdrv_aio_cancel`` /
``bdrv_aio_cancel_async`` (block/io.c).

A request that returns an AIOCB completes by calling ``cb(opaque, ret)``
exactly once, in the home thread of its AioContext, never before the submit
function returned.  Cancellation never skips that callback: a cancelled
request reports ``-ECANCELED`` (or its real result if it was too late to
stop it), and only then is it finished.

The reference count mirrors QEMU's: the request holds one reference until
its completion callback has run; ``bdrv_aio_cancel`` takes a second one and
polls until it is the only holder left.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

__all__ = [
    "AIOCBInfo",
    "BlockAIOCB",
    "BlockCompletionFunc",
    "qemu_aio_get",
    "qemu_aio_ref",
    "qemu_aio_unref",
    "bdrv_aio_cancel",
    "bdrv_aio_cancel_async",
]

BlockCompletionFunc = Callable[[Any, int], None]


class AIOCBInfo:
    """QEMU's ``AIOCBInfo``: the per-driver operations on its AIOCBs.

    ``aiocb_type``      the BlockAIOCB subclass to allocate (C: aiocb_size)
    ``cancel_async``    ``cancel_async(acb)``: ask the driver to cancel; must
                        not call the completion callback from inside
                        ``bdrv_aio_cancel_async`` itself unless the driver
                        can guarantee it is in the home thread.
    ``get_aio_context`` ``get_aio_context(acb) -> AioContext`` to poll while
                        ``bdrv_aio_cancel`` waits.
    """

    __slots__ = ("aiocb_type", "cancel_async", "get_aio_context", "name")

    def __init__(self, aiocb_type: type | None = None,
                 cancel_async: Optional[Callable[["BlockAIOCB"], None]] = None,
                 get_aio_context: Optional[Callable[["BlockAIOCB"], Any]] = None,
                 name: str = "aiocb") -> None:
        if aiocb_type is None:
            aiocb_type = BlockAIOCB
        elif not (isinstance(aiocb_type, type) and issubclass(aiocb_type, BlockAIOCB)):
            raise TypeError(f"aiocb_type must be a BlockAIOCB subclass, got {aiocb_type!r}")
        for what, fn in (("cancel_async", cancel_async), ("get_aio_context", get_aio_context)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{what} must be callable or None, got {type(fn).__name__}")
        self.aiocb_type = aiocb_type
        self.cancel_async = cancel_async
        self.get_aio_context = get_aio_context
        self.name = name


class BlockAIOCB:
    """QEMU's ``BlockAIOCB``.  Drivers subclass it (adding ``__slots__``).

    Fields are touched by the driver and the home thread of the request's
    context only (QEMU: ref/unref are not thread-safe).
    """

    __slots__ = ("aiocb_info", "bs", "cb", "opaque", "refcnt")

    def __init__(self, aiocb_info: AIOCBInfo, bs: Any, cb: BlockCompletionFunc | None,
                 opaque: Any) -> None:
        self.aiocb_info = aiocb_info
        self.bs = bs
        self.cb = cb
        self.opaque = opaque
        self.refcnt = 1

    # Pythonic face -------------------------------------------------------
    def cancel(self) -> None:
        """Cancel and wait until the completion callback has run."""
        bdrv_aio_cancel(self)

    def cancel_async(self) -> None:
        """Request cancellation; returns at once."""
        bdrv_aio_cancel_async(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.aiocb_info.name} refcnt={self.refcnt}>"


def qemu_aio_get(aiocb_info: AIOCBInfo, bs: Any, cb: BlockCompletionFunc | None,
                 opaque: Any) -> BlockAIOCB:
    """Port of ``qemu_aio_get``: allocate an AIOCB with one reference."""
    if not isinstance(aiocb_info, AIOCBInfo):
        raise TypeError(f"expected an AIOCBInfo, got {type(aiocb_info).__name__}")
    if cb is not None and not callable(cb):
        raise TypeError(f"completion callback must be callable, got {type(cb).__name__}")
    return aiocb_info.aiocb_type(aiocb_info, bs, cb, opaque)


def _check_acb(acb: object) -> BlockAIOCB:
    if not isinstance(acb, BlockAIOCB):
        raise TypeError(f"expected a BlockAIOCB, got {type(acb).__name__}")
    return acb


def qemu_aio_ref(acb: BlockAIOCB) -> None:
    """Port of ``qemu_aio_ref``.  Referencing a freed AIOCB raises."""
    if _check_acb(acb).refcnt <= 0:
        raise RuntimeError(f"{acb!r}: qemu_aio_ref on a freed AIOCB")
    acb.refcnt += 1


def qemu_aio_unref(acb: BlockAIOCB) -> None:
    """Port of ``qemu_aio_unref``.  Unref below zero is a bug and raises."""
    if _check_acb(acb).refcnt <= 0:
        raise RuntimeError(f"{acb!r}: qemu_aio_unref on a freed AIOCB")
    acb.refcnt -= 1


def _acb_context(acb: BlockAIOCB) -> Any:
    info = acb.aiocb_info
    if info.get_aio_context is not None:
        return info.get_aio_context(acb)
    bs = acb.bs
    if bs is not None:
        ctx = getattr(bs, "aio_context", None)
        if ctx is not None:
            return ctx
    from .aio import qemu_get_aio_context

    return qemu_get_aio_context()


def bdrv_aio_cancel(acb: BlockAIOCB) -> None:
    """Port of ``bdrv_aio_cancel``: cancel, then poll until the callback ran.

    The completion callback runs exactly once, with ``-ECANCELED`` or with
    the request's real result if it could not be stopped in time.
    """
    from .aio import aio_poll

    if _check_acb(acb).refcnt <= 0:
        return  # already completed and released: nothing to cancel
    qemu_aio_ref(acb)
    try:
        bdrv_aio_cancel_async(acb)
        while acb.refcnt > 1:
            aio_poll(_acb_context(acb), True)
    finally:
        qemu_aio_unref(acb)


def bdrv_aio_cancel_async(acb: BlockAIOCB) -> None:
    """Port of ``bdrv_aio_cancel_async``: request cancellation, return at once.

    The completion callback still runs exactly once, later, with
    ``-ECANCELED`` or the real result.  A request that already completed is
    left alone.
    """
    if _check_acb(acb).refcnt <= 0:
        return
    cancel = acb.aiocb_info.cancel_async
    if cancel is not None:
        cancel(acb)
