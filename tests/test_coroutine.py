# SPDX-License-Identifier: GPL-2.0-or-later
"""Coroutine core: the cases of QEMU's tests/unit/test-coroutine.c
(/basic/...), plus exceptions, bad input, leaks and backend selection.

Every behavioural test runs on both backends (``co_backend`` fixture; the
backend name is the test id).
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import traceback

import pytest

import pyaioctx
from pyaioctx import _tls
import pyaioctx.coroutine as C
from pyaioctx.coroutine import (
    CoroutineError,
    NotInCoroutineError,
    aio_co_schedule,
    aio_co_wake,
    qemu_coroutine_create,
    qemu_coroutine_enter,
    qemu_coroutine_enter_if_inactive,
    qemu_coroutine_entered,
    qemu_coroutine_self,
    qemu_coroutine_yield,
    qemu_in_coroutine,
)



# --------------------------------------------------------------------------
# /basic/... (test-coroutine.c)

def test_basic_lifecycle(co_backend):
    """/basic/lifecycle: create, enter and return, twice."""
    done = []
    co = qemu_coroutine_create(lambda d: d.append(True), done)
    qemu_coroutine_enter(co)
    assert done == [True]
    assert co.terminated
    done.clear()
    co = qemu_coroutine_create(lambda d: d.append(True), done)
    qemu_coroutine_enter(co)
    assert done == [True]


def test_basic_yield(co_backend):
    """/basic/yield: a coroutine yielding 5 times needs 6 enters."""
    state = {"done": False}

    def yield_5_times(s):
        for _ in range(5):
            qemu_coroutine_yield()
        s["done"] = True

    co = qemu_coroutine_create(yield_5_times, state)
    i = -1
    while not state["done"]:
        qemu_coroutine_enter(co)
        i += 1
    assert i == 5


def test_basic_nesting(co_backend):
    """/basic/nesting: coroutines nest 128 levels deep and all return."""
    nd = {"enter": 0, "ret": 0, "max": 128}

    def nest(d):
        d["enter"] += 1
        if d["enter"] < d["max"]:
            qemu_coroutine_enter(qemu_coroutine_create(nest, d))
        d["ret"] += 1

    qemu_coroutine_enter(qemu_coroutine_create(nest, nd))
    assert nd["enter"] == nd["max"] == nd["ret"]


def test_basic_self(co_backend):
    """/basic/self: qemu_coroutine_self() is the running coroutine."""
    box = {}

    def verify_self(b):
        b["self"] = qemu_coroutine_self()

    co = qemu_coroutine_create(verify_self, box)
    qemu_coroutine_enter(co)
    assert box["self"] is co


def test_basic_entered(co_backend):
    """/basic/entered: entered while running and while a callee runs."""
    checks = []

    def step_2(caller):
        checks.append(qemu_coroutine_entered(caller))
        checks.append(qemu_coroutine_entered(qemu_coroutine_self()))
        qemu_coroutine_yield()
        checks.append(qemu_coroutine_entered(caller))
        checks.append(qemu_coroutine_entered(qemu_coroutine_self()))

    def step_1(_):
        me = qemu_coroutine_self()
        checks.append(qemu_coroutine_entered(me))
        co = qemu_coroutine_create(step_2, me)
        checks.append(not qemu_coroutine_entered(co))
        qemu_coroutine_enter(co)
        checks.append(not qemu_coroutine_entered(co))
        qemu_coroutine_enter(co)

    co = qemu_coroutine_create(step_1, None)
    assert not qemu_coroutine_entered(co)
    qemu_coroutine_enter(co)
    assert checks == [True] * 7
    assert not co.entered


def test_basic_in_coroutine(co_backend):
    """/basic/in_coroutine."""
    seen = []
    assert not qemu_in_coroutine()
    qemu_coroutine_enter(qemu_coroutine_create(lambda s: s.append(qemu_in_coroutine()), seen))
    assert seen == [True]
    assert not qemu_in_coroutine()


def test_basic_order(co_backend):
    """/basic/order: control moves exactly at enter and yield."""
    records = []

    def co_order_test(_):
        records.append((2, 1))
        assert qemu_in_coroutine()
        qemu_coroutine_yield()
        records.append((2, 2))
        assert qemu_in_coroutine()

    co = qemu_coroutine_create(co_order_test, None)
    records.append((1, 1))
    qemu_coroutine_enter(co)
    records.append((1, 2))
    assert not qemu_in_coroutine()
    qemu_coroutine_enter(co)
    records.append((1, 3))
    assert records == [(1, 1), (2, 1), (1, 2), (2, 2), (1, 3)]


def test_basic_no_dangling_access(co_backend):
    """/basic/no-dangling-access: c2, first entered by c1, is re-entered
    after c1 terminated, without touching c1."""
    c2 = qemu_coroutine_create(lambda _: qemu_coroutine_yield(), None)
    c1 = qemu_coroutine_create(lambda other: qemu_coroutine_enter(other), c2)
    qemu_coroutine_enter(c1)
    assert c1.terminated and not c2.terminated
    qemu_coroutine_enter(c2)
    assert c2.terminated


def test_enter_if_inactive(co_backend):
    """qemu_coroutine_enter_if_inactive skips an entered coroutine."""
    log = []

    def body(_):
        me = qemu_coroutine_self()
        qemu_coroutine_enter_if_inactive(me)  # no-op: we are entered
        log.append("ran")
        qemu_coroutine_yield()
        log.append("resumed")

    co = qemu_coroutine_create(body, None)
    qemu_coroutine_enter_if_inactive(co)
    assert log == ["ran"]
    qemu_coroutine_enter_if_inactive(co)
    assert log == ["ran", "resumed"]


def _level3(log):
    log.append("before")
    qemu_coroutine_yield()
    log.append("after")


def _level2(log):
    _level3(log)


def _level1(log):
    _level2(log)


def test_yield_three_levels_deep(co_backend):
    """qemu_coroutine_yield works from plain functions called by the entry."""
    log = []
    co = qemu_coroutine_create(_level1, log)
    qemu_coroutine_enter(co)
    assert log == ["before"]
    qemu_coroutine_enter(co)
    assert log == ["before", "after"]
    assert co.terminated


def test_self_outside_coroutine_is_leader(co_backend):
    """Outside a coroutine qemu_coroutine_self() is the thread's leader (as QEMU)."""
    leader = qemu_coroutine_self()
    assert leader is qemu_coroutine_self()
    assert not qemu_in_coroutine()
    with pytest.raises(CoroutineError, match="coroutine"):
        qemu_coroutine_enter(leader)


def test_co_ctx_and_name(co_backend):
    """co.ctx is the AioContext the coroutine last ran in; repr has the name."""
    ctx = pyaioctx.qemu_init_main_loop()

    def my_entry(_):
        qemu_coroutine_yield()

    co = qemu_coroutine_create(my_entry, None)
    assert "my_entry" in repr(co) and co.ctx is None
    qemu_coroutine_enter(co)
    assert co.ctx is ctx
    assert "test_co_ctx_and_name.<locals>.my_entry" in repr(co)
    qemu_coroutine_enter(co)


# --------------------------------------------------------------------------
# Errors

def _inner_fail(x):
    raise ValueError(f"boom {x}")


def _failing_entry(x):
    qemu_coroutine_yield()
    _inner_fail(x)


def test_exception_propagates_with_traceback(co_backend):
    """An exception escaping a coroutine comes out of the enter that ran it,
    with the coroutine's frames in its traceback; the coroutine is dead."""
    co = qemu_coroutine_create(_failing_entry, 7)
    qemu_coroutine_enter(co)
    with pytest.raises(ValueError, match="boom 7") as ei:
        qemu_coroutine_enter(co)
    names = [f.name for f in traceback.extract_tb(ei.value.__traceback__)]
    assert "_failing_entry" in names and "_inner_fail" in names
    assert co.terminated and not co.entered
    with pytest.raises(CoroutineError, match="coroutine '_failing_entry' has terminated"):
        qemu_coroutine_enter(co)


def test_exception_through_nested_coroutines(co_backend):
    """An exception crosses a nesting level it is not caught in."""
    inner = qemu_coroutine_create(_inner_fail, "inner")
    outer = qemu_coroutine_create(qemu_coroutine_enter, inner)
    with pytest.raises(ValueError, match="boom inner"):
        qemu_coroutine_enter(outer)
    assert inner.terminated and outer.terminated
    assert not qemu_in_coroutine()


def test_exception_after_queued_wakeups_run(co_backend):
    """Coroutines queued by aio_co_enter before a raise still run."""
    ran = []
    waiter = qemu_coroutine_create(lambda r: r.append("waiter"), ran)

    def raiser(_):
        aio_co_wake(waiter)  # same context: queued behind us
        raise KeyError("k")

    waiter.ctx = _tls.current().ctx
    with pytest.raises(KeyError):
        qemu_coroutine_enter(qemu_coroutine_create(raiser, None))
    assert ran == ["waiter"]


def test_enter_running_coroutine_raises(co_backend):
    """Entering a currently entered coroutine raises, naming it."""
    errors = []

    def reenter_self(_):
        try:
            qemu_coroutine_enter(qemu_coroutine_self())
        except CoroutineError as e:
            errors.append(str(e))

    qemu_coroutine_enter(qemu_coroutine_create(reenter_self, None))
    assert errors and "coroutine" in errors[0] and "reenter_self" in errors[0]

    def enter_caller(caller):
        qemu_coroutine_enter(caller)

    def outer(_):
        try:
            qemu_coroutine_enter(qemu_coroutine_create(enter_caller, qemu_coroutine_self()))
        except CoroutineError as e:
            errors.append(str(e))

    qemu_coroutine_enter(qemu_coroutine_create(outer, None))
    assert "re-entered" in errors[1] and "outer" in errors[1]


def test_yield_outside_coroutine_raises(co_backend):
    with pytest.raises(NotInCoroutineError, match="qemu_coroutine_yield"):
        qemu_coroutine_yield()


@pytest.mark.parametrize("bad", [None, 42, "entry"])
def test_create_non_callable_raises(co_backend, bad):
    with pytest.raises(TypeError, match="callable"):
        qemu_coroutine_create(bad, None)


def test_bad_types(co_backend):
    for fn in (qemu_coroutine_enter, qemu_coroutine_enter_if_inactive,
               qemu_coroutine_entered, aio_co_wake):
        with pytest.raises(TypeError, match="Coroutine"):
            fn("not a coroutine")
    co = qemu_coroutine_create(lambda _: None, None)
    with pytest.raises(TypeError, match="AioContext"):
        aio_co_schedule("not a context", co)
    with pytest.raises(TypeError, match="Coroutine"):
        aio_co_schedule(pyaioctx.qemu_get_aio_context(), object())
    qemu_coroutine_enter(co)  # nothing was scheduled: still enterable


# --------------------------------------------------------------------------
# Threads and logical threads

def test_coroutine_answers_for_entering_logical_thread(co_backend):
    """Inside a coroutine, per-thread state is the entering thread's."""
    ctx = pyaioctx.qemu_init_main_loop()
    me = _tls.current()
    seen = []

    def body(_):
        seen.append((_tls.current() is me, pyaioctx.qemu_get_current_aio_context() is ctx))
        qemu_coroutine_yield()
        seen.append((_tls.current() is me, pyaioctx.qemu_get_current_aio_context() is ctx))

    co = qemu_coroutine_create(body, None)
    qemu_coroutine_enter(co)
    qemu_coroutine_enter(co)
    assert seen == [(True, True), (True, True)]


def _run_in_thread(fn):
    box = {}

    def target():
        try:
            box["ret"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["exc"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join(5)
    assert not t.is_alive(), "thread hung"
    if "exc" in box:
        raise box["exc"]
    return box.get("ret")


def test_cross_thread_enter(co_backend):
    """A started coroutine never changes OS thread: greenlet refuses a
    foreign enter with a clear error; the thread backend allows it and the
    coroutine then answers for the new logical thread."""
    seen = []

    def body(_):
        seen.append(_tls.current())
        qemu_coroutine_yield()
        seen.append(_tls.current())

    co = qemu_coroutine_create(body, None)
    qemu_coroutine_enter(co)
    if co_backend == "greenlet":
        with pytest.raises(CoroutineError, match="coroutine 'test_cross_thread_enter.*thread"):
            _run_in_thread(lambda: qemu_coroutine_enter(co))
        assert not co.entered
        qemu_coroutine_enter(co)  # still usable from its own thread
        assert seen[1] is seen[0]
    else:
        other = _run_in_thread(lambda: (qemu_coroutine_enter(co), _tls.current())[1])
        assert seen[1] is other and seen[0] is not other
    assert co.terminated


def test_first_enter_in_another_thread(co_backend):
    """A coroutine may be created in one thread and started in another."""
    co = qemu_coroutine_create(lambda _: qemu_coroutine_yield(), None)
    _run_in_thread(lambda: qemu_coroutine_enter(co))
    if co_backend == "thread":
        qemu_coroutine_enter(co)
        assert co.terminated
    else:
        _run_in_thread(lambda: None)


# --------------------------------------------------------------------------
# Leaks and pooling

def _live_greenlets():
    try:
        from greenlet import greenlet
    except ImportError:
        return []
    return [g for g in gc.get_objects()
            if isinstance(g, greenlet) and g and g.parent is not None]


def test_no_thread_or_greenlet_leak_10000(co_backend):
    """10,000 coroutines (20 alive at a time, each yielding once) leave no
    thread (after the pool is drained) and no live greenlet behind, and both
    backends reuse their stacks (pool) instead of creating 10,000."""
    C.coroutine_pool_cleanup()
    gc.collect()
    # Threads of earlier tests (idle pool workers) may exit meanwhile, so
    # compare identities, not counts: nothing new may still be alive.
    baseline = set(threading.enumerate())
    greenlets_before = len(_live_greenlets())
    stats0 = dict(C._core._active.stats())
    count = [0]

    def body(c):
        qemu_coroutine_yield()
        c[0] += 1

    for _ in range(10_000 // 20):
        batch = [qemu_coroutine_create(body, count) for _ in range(20)]
        for co in batch:
            qemu_coroutine_enter(co)
        for co in batch:
            qemu_coroutine_enter(co)
    assert count[0] == 10_000
    key = "threads_started" if co_backend == "thread" else "greenlets_started"
    started = C._core._active.stats()[key] - stats0[key]
    assert started <= 20 + 2, f"{started} stacks for 10,000 coroutines"
    C.coroutine_pool_cleanup()
    gc.collect()
    assert set(threading.enumerate()) - baseline == set()
    assert len(_live_greenlets()) == greenlets_before


def test_pool_reuses_one_thread_for_sequential_coroutines():
    """Sequential create/run/terminate uses one pooled OS thread (thread backend)."""
    b = C.ThreadBackend()
    prev = C.get_backend()
    C._install(b, "test")
    try:
        for _ in range(2000):
            qemu_coroutine_enter(qemu_coroutine_create(lambda _: None, None))
        assert b.stats()["threads_started"] == 1
        assert b.cleanup() == 1
        assert b.stats()["threads_live"] == 0
    finally:
        C._install(C._backend_object(prev.name), prev.reason)


def test_pool_idle_timeout():
    """An idle pooled coroutine thread exits by itself."""
    b = C.ThreadBackend(idle_timeout=0.05)
    prev = C.get_backend()
    C._install(b, "test")
    try:
        qemu_coroutine_enter(qemu_coroutine_create(lambda _: None, None))
        for _ in range(200):
            if b.stats()["threads_live"] == 0:
                break
            threading.Event().wait(0.01)
        assert b.stats() == {"threads_started": 1, "threads_exited": 1,
                             "threads_live": 0, "threads_idle": 0}
    finally:
        C._install(C._backend_object(prev.name), prev.reason)


def test_condition_handoff_variant_works():
    """The coroutine-gthread style broadcast hand-off (kept for benchmarks)
    has the same semantics."""
    b = C.ThreadBackend(handoff="condition")
    prev = C.get_backend()
    C._install(b, "test")
    try:
        log = []
        co = qemu_coroutine_create(_level1, log)
        qemu_coroutine_enter(co)
        qemu_coroutine_enter(co)
        assert log == ["before", "after"]
        b.cleanup()
    finally:
        C._install(C._backend_object(prev.name), prev.reason)
    with pytest.raises(ValueError, match="lock, condition"):
        C.ThreadBackend(handoff="spin")


# --------------------------------------------------------------------------
# Backend selection

def test_set_backend_and_get_backend():
    prev = C.get_backend()
    try:
        C.set_backend("thread")
        info = C.get_backend()
        assert info.name == "thread" and "set_backend" in info.reason
        assert str(info) == "thread"
        co = qemu_coroutine_create(lambda _: None, None)
        assert co.backend == "thread"
        with pytest.raises(ValueError, match="thread, greenlet"):
            C.set_backend("fibers")
        with pytest.raises(TypeError):
            C.set_backend(None)
    finally:
        C._install(C._backend_object(prev.name), prev.reason)


def _probe(env_value):
    env = dict(os.environ)
    env["PYAIOCTX_COROUTINE"] = env_value
    code = ("import warnings; warnings.simplefilter('always');\n"
            "import pyaioctx.coroutine as C; i = C.get_backend(); print(i.name, '|', i.reason)")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip(), r.stderr


def test_env_selects_thread():
    out, _ = _probe("thread")
    assert out == "thread | PYAIOCTX_COROUTINE=thread"


def test_env_invalid_warns_with_valid_names():
    out, err = _probe("bogus")
    assert "RuntimeWarning" in err and "thread, greenlet" in err and "bogus" in err
    assert out.split(" | ")[0] in ("thread", "greenlet")
    assert "default" in out


def test_mixed_backends_nest():
    """A greenlet coroutine may enter a thread coroutine and vice versa."""
    if "greenlet" not in C.available_backends():
        pytest.skip("greenlet is not importable")
    prev = C.get_backend()
    try:
        log = []
        C.set_backend("thread")
        t_co = qemu_coroutine_create(_level1, log)
        C.set_backend("greenlet")
        g_co = qemu_coroutine_create(lambda c: (qemu_coroutine_enter(c), qemu_coroutine_yield(),
                                                qemu_coroutine_enter(c)), t_co)
        qemu_coroutine_enter(g_co)
        assert log == ["before"]
        qemu_coroutine_enter(g_co)
        assert log == ["before", "after"] and t_co.terminated and g_co.terminated
    finally:
        C._install(C._backend_object(prev.name), prev.reason)
