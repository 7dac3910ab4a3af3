# SPDX-License-Identifier: GPL-2.0-or-later
"""Tests for pyaioctx.aiocb: QEMU's BlockAIOCB, qemu_aio_get/ref/unref and
bdrv_aio_cancel / bdrv_aio_cancel_async, with a minimal driver of our own
and with the thread pool."""

from __future__ import annotations

import errno
import pytest

from pyaioctx import (
    AIOCBInfo,
    BlockAIOCB,
    aio_bh_schedule_oneshot,
    aio_context_new,
    aio_context_unref,
    aio_get_thread_pool,
    aio_poll,
    bdrv_aio_cancel,
    bdrv_aio_cancel_async,
    qemu_aio_get,
    qemu_aio_ref,
    qemu_aio_unref,
    thread_pool_submit_aio,
)


@pytest.fixture
def ctx():
    c = aio_context_new()
    yield c
    if not c.closed:
        aio_context_unref(c)


class ToyAIOCB(BlockAIOCB):
    """A driver's AIOCB: completes from a BH, as a real driver would."""

    __slots__ = ("ctx", "done")


def _toy_complete(acb: ToyAIOCB, ret: int) -> None:
    if acb.done:
        return
    acb.done = True
    acb.cb(acb.opaque, ret)
    qemu_aio_unref(acb)


def _toy_cancel_async(acb: ToyAIOCB) -> None:
    # Never call back from inside bdrv_aio_cancel_async: defer to a BH.
    aio_bh_schedule_oneshot(acb.ctx, lambda a: _toy_complete(a, -errno.ECANCELED), acb)


def _toy_info(cancel: bool = True) -> AIOCBInfo:
    return AIOCBInfo(ToyAIOCB, cancel_async=_toy_cancel_async if cancel else None,
                     get_aio_context=lambda acb: acb.ctx, name="toy")


def _toy_submit(ctx, info: AIOCBInfo, calls: list) -> ToyAIOCB:
    acb = qemu_aio_get(info, None, lambda o, r: calls.append((o, r)), "op")
    acb.ctx = ctx
    acb.done = False
    return acb


def test_qemu_aio_get_ref_unref():
    info = AIOCBInfo(ToyAIOCB, name="toy")
    cb = lambda o, r: None  # noqa: E731
    acb = qemu_aio_get(info, "bs", cb, "opaque")
    assert type(acb) is ToyAIOCB
    assert (acb.aiocb_info, acb.bs, acb.cb, acb.opaque, acb.refcnt) == (info, "bs", cb, "opaque", 1)
    qemu_aio_ref(acb)
    assert acb.refcnt == 2
    qemu_aio_unref(acb)
    qemu_aio_unref(acb)
    assert acb.refcnt == 0
    with pytest.raises(RuntimeError, match="freed"):
        qemu_aio_unref(acb)
    with pytest.raises(RuntimeError, match="freed"):
        qemu_aio_ref(acb)
    assert "toy" in repr(acb)


def test_default_aiocb_type():
    acb = qemu_aio_get(AIOCBInfo(), None, None, None)
    assert type(acb) is BlockAIOCB and acb.refcnt == 1


def test_bad_types():
    with pytest.raises(TypeError, match="AIOCBInfo"):
        qemu_aio_get("info", None, None, None)
    with pytest.raises(TypeError, match="callable"):
        qemu_aio_get(AIOCBInfo(), None, 42, None)
    with pytest.raises(TypeError, match="BlockAIOCB subclass"):
        AIOCBInfo(int)
    with pytest.raises(TypeError, match="BlockAIOCB subclass"):
        AIOCBInfo("ToyAIOCB")
    with pytest.raises(TypeError, match="cancel_async"):
        AIOCBInfo(cancel_async=1)
    with pytest.raises(TypeError, match="get_aio_context"):
        AIOCBInfo(get_aio_context="ctx")
    for fn in (qemu_aio_ref, qemu_aio_unref, bdrv_aio_cancel, bdrv_aio_cancel_async):
        with pytest.raises(TypeError, match="BlockAIOCB"):
            fn(None)
        with pytest.raises(TypeError, match="BlockAIOCB"):
            fn(object())


def test_cancel_sync_polls_until_callback(ctx):
    """bdrv_aio_cancel returns only after the callback ran, exactly once."""
    calls: list = []
    acb = _toy_submit(ctx, _toy_info(), calls)
    bdrv_aio_cancel(acb)
    assert calls == [("op", -errno.ECANCELED)]
    assert acb.refcnt == 0
    while aio_poll(ctx, False):
        pass
    assert calls == [("op", -errno.ECANCELED)]


def test_cancel_async_returns_at_once(ctx):
    calls: list = []
    acb = _toy_submit(ctx, _toy_info(), calls)
    bdrv_aio_cancel_async(acb)
    assert calls == []
    acb.cancel_async()  # Pythonic face; still nothing inside the call
    assert calls == []
    while aio_poll(ctx, False):
        pass
    assert calls == [("op", -errno.ECANCELED)]


def test_cancel_without_cancel_async_waits_for_completion(ctx):
    """A driver without cancel_async: the request completes normally and
    bdrv_aio_cancel waits for it (QEMU: 'let the request normally complete')."""
    calls: list = []
    acb = _toy_submit(ctx, _toy_info(cancel=False), calls)
    aio_bh_schedule_oneshot(ctx, lambda a: _toy_complete(a, 0), acb)
    bdrv_aio_cancel_async(acb)
    assert calls == []
    bdrv_aio_cancel(acb)
    assert calls == [("op", 0)]


def test_cancel_finished_request_is_noop(ctx):
    calls: list = []
    acb = _toy_submit(ctx, _toy_info(), calls)
    aio_bh_schedule_oneshot(ctx, lambda a: _toy_complete(a, 0), acb)
    while not calls:
        aio_poll(ctx, True)
    assert acb.refcnt == 0
    bdrv_aio_cancel(acb)
    bdrv_aio_cancel_async(acb)
    acb.cancel()
    assert not aio_poll(ctx, False)
    assert calls == [("op", 0)]


def test_cancel_finished_thread_pool_request_is_noop(ctx):
    pool = aio_get_thread_pool(ctx)
    calls: list[int] = []
    acb = thread_pool_submit_aio(pool, lambda _: 3, None, lambda o, r: calls.append(r), None)
    while not calls:
        aio_poll(ctx, True)
    bdrv_aio_cancel(acb)
    bdrv_aio_cancel_async(acb)
    assert not aio_poll(ctx, False)
    assert calls == [3]
    assert acb.refcnt == 0


def test_subclass_with_slots():
    class MyAIOCB(BlockAIOCB):
        __slots__ = ("extra",)

    acb = qemu_aio_get(AIOCBInfo(MyAIOCB), None, None, None)
    acb.extra = 1
    with pytest.raises(AttributeError):
        acb.undeclared = 2  # type: ignore[attr-defined]
    assert isinstance(acb, BlockAIOCB)
