# SPDX-License-Identifier: GPL-2.0-or-later
"""The API contract of DESIGN.md, checked literally.

One or more small tests per numbered "Contract details" item
(``test_detail_NN_*``), a check that every name of "The flat API (minimum
contract)" is importable from the top-level package with QEMU's argument
order, and checks of "Bad input gets a clear error and loses nothing".
Each test's docstring names the detail it checks.  File-backed tests use
the ``disk_dir`` fixture (a real disk, so O_DIRECT works); Linux AIO and
io_uring tests are skipped with the probe's reason where the kernel lacks
them.
"""

from __future__ import annotations

import ctypes
import errno
import inspect
import io
import os
import threading
import time
from typing import Any, Callable

import pytest

import pyaioctx as q
from helpers import IOThread, watchdog

WAIT_S = 10.0
IMG_SIZE = 64 * 1024


# --------------------------------------------------------------------------
# Helpers

@pytest.fixture
def ctx():
    return q.qemu_init_main_loop()


@pytest.fixture(scope="module", autouse=True)
def _main_pool_workers_do_not_outlive_module():
    """Workers this module makes the main context's pool start would idle
    for QEMU's 10 s and outlive the module; give them a short idle timeout
    and wait for them to exit, so later modules see a quiet process."""
    pool = q.aio_get_thread_pool(q.qemu_init_main_loop())
    old = pool.idle_timeout
    pool.idle_timeout = 0.3
    before = set(threading.enumerate())
    try:
        yield
    finally:
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(
                t.is_alive() and "worker" in t.name for t in set(threading.enumerate()) - before):
            time.sleep(0.02)
        pool.idle_timeout = old


def _wait(cond: Callable[[], bool], ctx=None, timeout: float = WAIT_S) -> None:
    """Blocking aio_poll on ``ctx`` (default: main) until ``cond()``."""
    ctx = ctx or q.qemu_get_aio_context()
    deadline = time.monotonic() + timeout
    with watchdog(ctx, timeout):
        while not cond():
            assert time.monotonic() < deadline, "condition not reached in time"
            q.aio_poll(ctx, True)


def _settle(ctx=None, seconds: float = 0.05) -> None:
    """Poll ``ctx`` for a while, to give late callbacks a chance to show."""
    ctx = ctx or q.qemu_get_aio_context()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        while q.aio_poll(ctx, False):
            pass
        time.sleep(0.005)


def _run_co(fn: Callable[[], Any], ctx=None) -> Any:
    """Run ``fn()`` in a coroutine entered from this thread; poll until done."""
    box: dict = {}

    def entry(_: Any) -> None:
        try:
            box["ret"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            box["exc"] = e

    co = q.qemu_coroutine_create(entry, None)
    q.qemu_coroutine_enter(co)
    _wait(lambda: box, ctx)
    if "exc" in box:
        raise box["exc"]
    return box["ret"]


def _addr(buf: Any) -> int:
    """Address of the first byte of a writable buffer."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _make_image(path, size: int = IMG_SIZE) -> bytes:
    data = bytes((i * 7 + 3) & 0xFF for i in range(size))
    path.write_bytes(data)
    return data


def _refused(fn: Callable[[], Any], allowed=(errno.EIO, errno.EPERM, errno.EINVAL)) -> None:
    """Contract detail 12: a refused request raises a specific exception or
    returns one of the listed negative errnos."""
    try:
        ret = fn()
    except Exception as e:  # noqa: BLE001 - the type is checked below
        assert type(e) is not Exception, f"unspecific exception {e!r}"
        return
    assert isinstance(ret, int) and -ret in allowed, f"request not refused: {ret!r}"


def _need_laio() -> None:
    ok, why = q.laio_probe()
    if not ok:
        pytest.skip(f"Linux AIO unavailable: {why}")


def _need_luring() -> None:
    ok, why = q.luring_probe()
    if not ok:
        pytest.skip(f"io_uring unavailable: {why}")


# --------------------------------------------------------------------------
# The flat API (minimum contract)

# name -> parameter list as DESIGN.md (QEMU) gives it.  "?" stands for a
# parameter whose position is fixed but whose name DESIGN does not pin to
# QEMU's; "x=None" means an optional parameter defaulting to None; None means
# "a constant or a class: importable is enough".
FLAT_API: dict[str, Any] = {
    # Event loop
    "aio_context_new": [],
    "aio_context_ref": ["ctx"],
    "aio_context_unref": ["ctx"],
    "qemu_init_main_loop": [],
    "qemu_get_aio_context": [],
    "qemu_get_current_aio_context": [],
    "aio_poll": ["ctx", "blocking"],
    "aio_notify": ["ctx"],
    "aio_context_acquire": ["ctx"],
    "aio_context_release": ["ctx"],
    "aio_bh_new": ["ctx", "cb", "opaque"],
    "aio_bh_schedule_oneshot": ["ctx", "cb", "opaque"],
    "qemu_bh_schedule": ["bh"],
    "qemu_bh_schedule_idle": ["bh"],
    "qemu_bh_cancel": ["bh"],
    "qemu_bh_delete": ["bh"],
    "aio_bh_poll": ["ctx"],
    "aio_set_fd_handler": ["ctx", "fd", "is_external", "io_read", "io_write",
                           "io_poll=None", "io_poll_ready=None", "opaque=None"],
    "aio_set_event_notifier": ["ctx", "notifier", "is_external", "io_read",
                               "io_poll=None", "io_poll_ready=None"],
    "aio_disable_external": ["ctx"],
    "aio_enable_external": ["ctx"],
    "aio_wait_bh_oneshot": ["ctx", "cb", "opaque"],
    "aio_wait_while": ["ctx", "?"],
    # Event notifiers
    "EventNotifier": None,
    "event_notifier_init": ["e", "active"],
    "event_notifier_cleanup": ["e"],
    "event_notifier_set": ["e"],
    "event_notifier_test_and_clear": ["e"],
    "event_notifier_get_fd": ["e"],
    # Timers
    "QEMU_CLOCK_REALTIME": None, "QEMU_CLOCK_VIRTUAL": None, "QEMU_CLOCK_HOST": None,
    "SCALE_NS": None, "SCALE_US": None, "SCALE_MS": None,
    "qemu_clock_get_ns": ["type"],
    "QEMUTimer": None,
    "aio_timer_init": ["ctx", "ts", "type", "scale", "cb", "opaque"],
    "aio_timer_new": ["ctx", "type", "scale", "cb", "opaque"],
    "timer_mod": ["ts", "?"],
    "timer_mod_ns": ["ts", "?"],
    "timer_del": ["ts"],
    "timer_free": ["ts"],
    "timer_pending": ["ts"],
    "timer_expire_time_ns": ["ts"],
    # Coroutines
    "qemu_coroutine_create": ["entry", "opaque"],
    "qemu_coroutine_enter": ["co"],
    "qemu_coroutine_enter_if_inactive": ["co"],
    "qemu_coroutine_yield": [],
    "qemu_coroutine_self": [],
    "qemu_in_coroutine": [],
    "qemu_coroutine_entered": ["co"],
    "aio_co_enter": ["ctx", "co"],
    "aio_co_wake": ["co"],
    "aio_co_schedule": ["ctx", "co"],
    "qemu_co_sleep_ns": ["type", "ns"],
    "CoMutex": None,
    "qemu_co_mutex_init": ["?"],
    "qemu_co_mutex_lock": ["?"],
    "qemu_co_mutex_unlock": ["?"],
    "CoQueue": None,
    "qemu_co_queue_init": ["queue"],
    "qemu_co_queue_wait": ["queue", "?"],
    "qemu_co_queue_next": ["queue"],
    "qemu_co_queue_restart_all": ["queue"],
    "qemu_co_queue_empty": ["queue"],
    "CoRwlock": None,
    "qemu_co_rwlock_init": ["?"],
    "qemu_co_rwlock_rdlock": ["?"],
    "qemu_co_rwlock_wrlock": ["?"],
    "qemu_co_rwlock_upgrade": ["?"],
    "qemu_co_rwlock_downgrade": ["?"],
    "qemu_co_rwlock_unlock": ["?"],
    "qemu_set_current_aio_context": ["ctx"],
    "bdrv_get_aio_context": ["bs"],
    # Thread pool
    "aio_get_thread_pool": ["ctx"],
    "thread_pool_submit_aio": ["pool", "func", "arg", "cb", "opaque"],
    "thread_pool_submit_co": ["pool", "func", "arg"],
    "thread_pool_submit": ["pool", "func", "arg"],
    "thread_pool_update_params": ["pool", "ctx"],
    # AIOCBs
    "BlockAIOCB": None,
    "AIOCBInfo": None,
    "qemu_aio_get": ["?", "bs", "cb", "opaque"],
    "qemu_aio_ref": ["?"],
    "qemu_aio_unref": ["?"],
    "bdrv_aio_cancel": ["acb"],
    "bdrv_aio_cancel_async": ["acb"],
    # I/O vectors and buffers
    "QEMUIOVector": None,
    "qemu_iovec_init": ["qiov", "alloc_hint"],
    "qemu_iovec_init_buf": ["qiov", "buf"],
    "qemu_iovec_add": ["qiov", "buf"],
    "qemu_iovec_reset": ["qiov"],
    "qemu_iovec_destroy": ["qiov"],
    "qemu_iovec_memset": ["qiov", "offset", "fillc", "bytes"],
    "qemu_iovec_to_buf": ["qiov", "offset", "buf", "bytes"],
    "qemu_iovec_from_buf": ["qiov", "offset", "buf", "bytes"],
    "qemu_iovec_concat": ["?", "?", "?", "?"],
    "qemu_iovec_is_zero": ["qiov", "offset", "bytes"],
    "qemu_memalign": ["alignment", "size"],
    "qemu_blockalign": ["bs", "size"],
    "qemu_vfree": ["buf"],
    # Linux AIO
    "laio_init": [],
    "laio_cleanup": ["s"],
    "laio_attach_aio_context": ["s", "?"],
    "laio_detach_aio_context": ["s", "?"],
    "laio_co_submit": ["bs", "s", "fd", "offset", "qiov", "type"],
    "laio_submit": ["bs", "s", "fd", "sector_num", "qiov", "nb_sectors", "cb", "opaque", "type"],
    "laio_io_plug": ["bs", "s"],
    "laio_io_unplug": ["bs", "s"],
    "QEMU_AIO_READ": None, "QEMU_AIO_WRITE": None, "QEMU_AIO_FLUSH": None, "MAX_EVENTS": None,
    # io_uring
    "luring_init": [],
    "luring_cleanup": ["s"],
    "luring_attach_aio_context": ["s", "?"],
    "luring_detach_aio_context": ["s", "?"],
    "luring_co_submit": ["bs", "s", "fd", "offset", "qiov", "type"],
    "luring_io_plug": ["bs", "s"],
    "luring_io_unplug": ["bs", "s"],
    # Block layer
    "bdrv_open": ["filename", "options=None", "flags=0"],
    "BDRV_O_RDWR": None, "BDRV_O_NOCACHE": None, "BDRV_O_NATIVE_AIO": None,
    "bdrv_unref": ["bs"],
    "bdrv_close": ["bs"],
    "bdrv_co_preadv": ["bs", "offset", "bytes", "qiov", "flags"],
    "bdrv_co_pwritev": ["bs", "offset", "bytes", "qiov", "flags"],
    "bdrv_co_flush": ["bs"],
    "bdrv_co_pdiscard": ["bs", "offset", "bytes"],
    "bdrv_co_pwrite_zeroes": ["bs", "offset", "bytes", "flags"],
    "bdrv_co_truncate": ["bs", "offset"],
    "bdrv_getlength": ["bs"],
    "bdrv_pread": ["bs", "offset", "bytes", "buf"],
    "bdrv_pwrite": ["bs", "offset", "bytes", "buf"],
    "bdrv_flush": ["bs"],
    "bdrv_aio_preadv": ["bs", "offset", "qiov", "flags", "cb", "opaque"],
    "bdrv_aio_pwritev": ["bs", "offset", "qiov", "flags", "cb", "opaque"],
    "bdrv_aio_flush": ["bs", "cb", "opaque"],
    "bdrv_drain": ["bs"],
    "bdrv_io_plug": ["bs"],
    "bdrv_io_unplug": ["bs"],
    "bdrv_register": ["?"],
    "BlockDriver": None,
}


@pytest.mark.parametrize("name", sorted(FLAT_API))
def test_flat_api_importable_with_qemu_signature(name: str) -> None:
    """Flat API: every listed name is importable from ``pyaioctx`` and
    takes QEMU's parameters in QEMU's order (names where DESIGN gives them;
    ``=None`` ones optional with a None default)."""
    assert hasattr(q, name), f"pyaioctx.{name} is missing"
    obj = getattr(q, name)
    spec = FLAT_API[name]
    if spec is None:
        return
    assert callable(obj), f"pyaioctx.{name} is not callable"
    params = list(inspect.signature(obj).parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert len(positional) >= len(spec), f"{name}{inspect.signature(obj)}: too few parameters"
    for p, want in zip(positional, spec):
        pname, _, default = want.partition("=")
        if pname != "?":
            assert p.name == pname, f"{name}{inspect.signature(obj)}: expected {pname!r}, got {p.name!r}"
        if default:
            assert p.default is not p.empty and repr(p.default) == default, \
                f"{name}: {pname} should default to {default}"
    # Nothing beyond QEMU's parameters is required.
    for p in positional[len(spec):]:
        assert p.default is not p.empty, f"{name}: extra required parameter {p.name!r}"
    for p in params:
        if p.kind is p.KEYWORD_ONLY:
            assert p.default is not p.empty, f"{name}: required keyword-only {p.name!r}"
    # Every parameter DESIGN lists can be passed positionally.
    inspect.signature(obj).bind(*range(len(spec)))


def test_flat_api_constants() -> None:
    """Flat API: constants exist with QEMU's values where QEMU fixes them."""
    assert (q.SCALE_NS, q.SCALE_US, q.SCALE_MS) == (1, 1000, 1000000)
    assert q.MAX_EVENTS == 128
    assert len({q.QEMU_CLOCK_REALTIME, q.QEMU_CLOCK_VIRTUAL, q.QEMU_CLOCK_HOST}) == 3
    assert len({q.QEMU_AIO_READ, q.QEMU_AIO_WRITE, q.QEMU_AIO_FLUSH}) == 3
    assert q.BDRV_O_RDWR and q.BDRV_O_NOCACHE and q.BDRV_O_NATIVE_AIO


def test_flat_api_return_types_and_behaviour(ctx, disk_dir) -> None:
    """Flat API: the documented return types (QEMUBH, QEMUTimer, Coroutine,
    ThreadPool, BlockAIOCB, BlockDriverState), init_buf/size/niov as in C,
    event_notifier_init(e, active=True), aio_disable_external pausing
    is_external handlers, qemu_coroutine_enter_if_inactive, and a blocking
    aio_poll bounded by the next timer deadline."""
    bh = q.aio_bh_new(ctx, lambda _: None, None)
    assert isinstance(bh, q.QEMUBH)
    q.qemu_bh_delete(bh)
    ts = q.aio_timer_new(ctx, q.QEMU_CLOCK_REALTIME, q.SCALE_MS, lambda _: None, None)
    assert isinstance(ts, q.QEMUTimer)
    q.timer_free(ts)
    co = q.qemu_coroutine_create(lambda _: None, None)
    assert isinstance(co, q.Coroutine)
    q.qemu_coroutine_enter_if_inactive(co)
    assert q.qemu_coroutine_entered(co) is False
    pool = q.aio_get_thread_pool(ctx)
    assert isinstance(pool, q.ThreadPool)
    ran: list = []
    q.thread_pool_submit(pool, lambda a: ran.append(a) or 0, "fire-and-forget")
    acb = q.thread_pool_submit_aio(pool, lambda a: 0, None, lambda o, r: ran.append(r), None)
    assert isinstance(acb, q.BlockAIOCB)
    _wait(lambda: len(ran) == 2)
    assert sorted(map(str, ran)) == ["0", "fire-and-forget"]

    e = q.EventNotifier()
    assert q.event_notifier_init(e, True) == 0
    assert q.event_notifier_test_and_clear(e) is True
    got: list = []
    q.aio_set_event_notifier(ctx, e, True, lambda n: (got.append(n), q.event_notifier_test_and_clear(n)))
    q.aio_disable_external(ctx)
    q.event_notifier_set(e)
    assert q.aio_poll(ctx, False) is False and got == []
    q.aio_enable_external(ctx)
    _wait(lambda: got)
    q.aio_set_event_notifier(ctx, e, True, None)
    q.event_notifier_cleanup(e)

    fired: list = []
    ts = q.aio_timer_new(ctx, q.QEMU_CLOCK_REALTIME, q.SCALE_MS, fired.append, 1)
    q.timer_mod(ts, q.qemu_clock_get_ns(q.QEMU_CLOCK_REALTIME) // q.SCALE_MS + 20)
    start = time.monotonic()
    with watchdog(ctx, 5.0) as wd:
        while not fired:
            q.aio_poll(ctx, True)
    assert not wd["fired"], "a blocking aio_poll slept past the timer deadline"
    assert time.monotonic() - start < 5.0
    q.timer_free(ts)

    path = disk_dir / "img"
    _make_image(path)
    bs = q.bdrv_open(str(path), None, 0)
    assert isinstance(bs, q.BlockDriverState)
    q.bdrv_close(bs)  # bdrv_unref(bs) / bdrv_close(bs): either closes it
    assert bs.closed


def test_pythonic_face_is_the_same_objects(ctx) -> None:
    """Two faces: the Pythonic methods work on the very objects the flat
    functions take (ctx.bh_new, bh.schedule, ctx.poll, ``with ctx``,
    ``with bdrv_open(...)``)."""
    ran: list = []
    bh = ctx.bh_new(ran.append, "py")
    assert isinstance(bh, q.QEMUBH)
    bh.schedule()
    assert ctx.poll(blocking=False) is True
    assert ran == ["py"]
    q.qemu_bh_schedule(bh)
    assert q.aio_poll(ctx, False) is True and ran == ["py", "py"]
    q.qemu_bh_delete(bh)
    with ctx:
        q.aio_context_acquire(ctx)  # recursive with the context manager
        q.aio_context_release(ctx)
    with q.bdrv_open(None, {"driver": "null-co", "size": 4096}) as bs:
        assert q.bdrv_getlength(bs) == 4096


# --------------------------------------------------------------------------
# Detail 1: current context

def test_detail_01_main_thread_current_context(ctx) -> None:
    """Detail 1: after qemu_init_main_loop() the main thread's current
    context is the main context."""
    assert q.qemu_get_current_aio_context() is ctx
    assert q.qemu_get_aio_context() is ctx


def test_detail_01_plain_thread_until_set(ctx) -> None:
    """Detail 1: a plain thread's current context is not the main context
    until it sets one with qemu_set_current_aio_context."""
    seen: list = []
    other = q.aio_context_new()

    def run() -> None:
        seen.append(q.qemu_get_current_aio_context())
        q.qemu_set_current_aio_context(other)
        seen.append(q.qemu_get_current_aio_context())
        q.qemu_set_current_aio_context(None)

    t = threading.Thread(target=run)
    t.start()
    t.join(WAIT_S)
    q.aio_context_unref(other)
    assert seen[0] is not ctx
    assert seen[1] is other


def test_detail_01_coroutine_answers_for_entering_thread(ctx, co_backend) -> None:
    """Detail 1: inside a coroutine, qemu_get_current_aio_context() answers
    for the logical thread that entered it (main thread, then an iothread)."""
    seen: list = []

    def entry(_: Any) -> None:
        seen.append(q.qemu_get_current_aio_context())
        q.qemu_coroutine_yield()
        seen.append(q.qemu_get_current_aio_context())

    co = q.qemu_coroutine_create(entry, None)
    q.qemu_coroutine_enter(co)
    q.qemu_coroutine_enter(co)
    assert seen == [ctx, ctx]

    it = IOThread()
    try:
        box: list = []
        done = threading.Event()

        def bh(_: Any) -> None:
            def e2(_: Any) -> None:
                box.append(q.qemu_get_current_aio_context())
            q.qemu_coroutine_enter(q.qemu_coroutine_create(e2, None))
            done.set()

        q.aio_bh_schedule_oneshot(it.ctx, bh, None)
        assert done.wait(WAIT_S)
        assert box == [it.ctx]
    finally:
        it.stop()


# --------------------------------------------------------------------------
# Detail 2: acquire/release

def test_detail_02_acquire_is_recursive_and_poll_keeps_lock(ctx) -> None:
    """Detail 2: aio_context_acquire is a recursive lock, and aio_poll does
    not drop a lock its caller holds."""
    got = threading.Event()

    def other() -> None:
        q.aio_context_acquire(ctx)
        got.set()
        q.aio_context_release(ctx)

    q.aio_context_acquire(ctx)
    q.aio_context_acquire(ctx)  # recursive: no deadlock
    t = threading.Thread(target=other)
    t.start()
    try:
        ran = []
        for _ in range(5):
            q.aio_bh_schedule_oneshot(ctx, ran.append, 1)
            assert q.aio_poll(ctx, True) is True
        ts = q.aio_timer_new(ctx, q.QEMU_CLOCK_REALTIME, q.SCALE_MS, ran.append, 2)
        q.timer_mod(ts, q.qemu_clock_get_ns(q.QEMU_CLOCK_REALTIME) // q.SCALE_MS + 30)
        _wait(lambda: 2 in ran, ctx)
        q.timer_free(ts)
        assert not got.is_set(), "another thread got the lock while aio_poll ran"
        q.aio_context_release(ctx)
        assert not got.wait(0.05), "a single release freed a twice-acquired lock"
    finally:
        q.aio_context_release(ctx)
    assert got.wait(WAIT_S)
    t.join(WAIT_S)


# --------------------------------------------------------------------------
# Detail 3: return values, fd handler opaque, all-None removes

def test_detail_03_fd_handler_opaque_keyword_and_removal(ctx) -> None:
    """Detail 3: aio_set_fd_handler takes opaque by keyword; handlers get
    io_read(opaque); all-None handlers remove the fd; aio_poll returns bool."""
    r, w = os.pipe()
    got: list = []
    try:
        def on_read(opaque: Any) -> None:
            got.append(opaque)
            os.read(r, 100)

        q.aio_set_fd_handler(ctx, r, False, on_read, None, opaque="token")
        os.write(w, b"x")
        ret = q.aio_poll(ctx, True)
        assert ret is True
        assert got == ["token"]
        ret = q.aio_poll(ctx, False)
        assert ret is False
        q.aio_set_fd_handler(ctx, r, False, None, None, None, None, None)
        os.write(w, b"y")
        assert q.aio_poll(ctx, False) is False
        assert got == ["token"]
    finally:
        q.aio_set_fd_handler(ctx, r, False, None, None)
        os.close(r)
        os.close(w)


def test_detail_03_aio_bh_poll_return(ctx) -> None:
    """Detail 3: aio_bh_poll returns non-zero when a non-idle BH ran (and 0
    when none ran, or only an idle one)."""
    while q.aio_poll(ctx, False):
        pass
    assert q.aio_bh_poll(ctx) == 0
    ran: list = []
    bh = q.aio_bh_new(ctx, ran.append, "bh")
    try:
        q.qemu_bh_schedule(bh)
        assert q.aio_bh_poll(ctx) != 0
        assert ran == ["bh"]
        q.qemu_bh_schedule_idle(bh)
        assert q.aio_bh_poll(ctx) == 0
        assert ran == ["bh", "bh"]
    finally:
        q.qemu_bh_delete(bh)


def test_detail_03_event_notifier_returns_zero(ctx) -> None:
    """Detail 3: event_notifier_init / event_notifier_set return 0."""
    e = q.EventNotifier()
    assert q.event_notifier_init(e, False) == 0
    try:
        assert q.event_notifier_get_fd(e) >= 0
        assert q.event_notifier_test_and_clear(e) is False
        assert q.event_notifier_set(e) == 0
        assert q.event_notifier_test_and_clear(e) is True
        got: list = []
        q.aio_set_event_notifier(ctx, e, False, lambda n: (got.append(n), q.event_notifier_test_and_clear(n)))
        assert q.event_notifier_set(e) == 0
        assert q.aio_poll(ctx, True) is True
        assert got == [e]
        q.aio_set_event_notifier(ctx, e, False, None)  # io_read=None removes
        assert q.event_notifier_set(e) == 0
        assert q.aio_poll(ctx, False) is False
        assert got == [e]
    finally:
        q.event_notifier_cleanup(e)


# --------------------------------------------------------------------------
# Detail 4: BH slices

def test_detail_04_bh_scheduled_during_bh_poll_waits(ctx) -> None:
    """Detail 4: a BH scheduled while aio_bh_poll runs waits for the next
    aio_bh_poll."""
    ran: list = []
    b = q.aio_bh_new(ctx, lambda _: ran.append("b"), None)
    a = q.aio_bh_new(ctx, lambda _: (ran.append("a"), q.qemu_bh_schedule(b)), None)
    try:
        q.qemu_bh_schedule(a)
        assert q.aio_bh_poll(ctx) != 0
        assert ran == ["a"]
        assert q.aio_bh_poll(ctx) != 0
        assert ran == ["a", "b"]
        assert q.aio_bh_poll(ctx) == 0
    finally:
        q.qemu_bh_delete(a)
        q.qemu_bh_delete(b)


def test_detail_04_nested_poll_runs_pending_bhs(ctx) -> None:
    """Detail 4: a nested aio_poll runs the BHs still pending in the outer
    one (whatever the order), and each BH runs once."""
    ran: list = []

    def first_or_second(name: str) -> None:
        ran.append(name)
        if len(ran) == 1:
            while q.aio_poll(ctx, False):
                pass
            assert len(ran) == 2, "nested aio_poll did not run the pending BH"

    q.aio_bh_schedule_oneshot(ctx, first_or_second, "x")
    q.aio_bh_schedule_oneshot(ctx, first_or_second, "y")
    q.aio_poll(ctx, False)
    _settle(ctx, 0.01)
    assert sorted(ran) == ["x", "y"]


# --------------------------------------------------------------------------
# Detail 5: timers

def test_detail_05_timer_mod_from_other_thread_wakes_poll(ctx) -> None:
    """Detail 5: timer_mod may be called from any thread and notifies the
    timer's context (a blocked aio_poll wakes up)."""
    fired: list = []
    ts = q.aio_timer_new(ctx, q.QEMU_CLOCK_REALTIME, q.SCALE_NS, fired.append, "t")

    def arm() -> None:
        time.sleep(0.05)
        q.timer_mod(ts, q.qemu_clock_get_ns(q.QEMU_CLOCK_REALTIME) + 1_000_000)

    t = threading.Thread(target=arm)
    start = time.monotonic()
    t.start()
    try:
        with watchdog(ctx, 5.0) as wd:
            while not fired:
                q.aio_poll(ctx, True)
        assert not wd["fired"], "aio_poll was not woken by timer_mod from another thread"
    finally:
        t.join()
        q.timer_free(ts)
    assert fired == ["t"]
    assert time.monotonic() - start < 5.0


def test_detail_05_expire_time_is_expire_times_scale(ctx) -> None:
    """Detail 5: timer_expire_time_ns returns expire * scale."""
    for scale in (q.SCALE_NS, q.SCALE_US, q.SCALE_MS):
        ts = q.QEMUTimer()
        q.aio_timer_init(ctx, ts, q.QEMU_CLOCK_VIRTUAL, scale, lambda _: None, None)
        q.timer_mod(ts, 123456)
        assert q.timer_pending(ts) is True
        assert q.timer_expire_time_ns(ts) == 123456 * scale
        q.timer_del(ts)
        assert q.timer_pending(ts) is False
        q.timer_free(ts)


# --------------------------------------------------------------------------
# Detail 6: coroutine errors

class _Boom(Exception):
    pass


def test_detail_06_exception_propagates_and_terminates(ctx, co_backend) -> None:
    """Detail 6: an exception escaping a coroutine propagates out of the
    qemu_coroutine_enter that ran it and terminates it; entering it again
    raises an error that says "coroutine"."""
    def entry(_: Any) -> None:
        q.qemu_coroutine_yield()
        raise _Boom("from the coroutine")

    co = q.qemu_coroutine_create(entry, None)
    q.qemu_coroutine_enter(co)
    with pytest.raises(_Boom):
        q.qemu_coroutine_enter(co)
    assert q.qemu_coroutine_entered(co) is False
    with pytest.raises(Exception, match="(?i)coroutine"):
        q.qemu_coroutine_enter(co)

    done = q.qemu_coroutine_create(lambda _: None, None)
    q.qemu_coroutine_enter(done)
    with pytest.raises(Exception, match="(?i)coroutine"):
        q.qemu_coroutine_enter(done)


def test_detail_06_enter_running_coroutine_raises(ctx, co_backend) -> None:
    """Detail 6: entering a currently entered coroutine raises, naming
    "coroutine"."""
    seen: list = []

    def entry(_: Any) -> None:
        me = q.qemu_coroutine_self()
        assert q.qemu_coroutine_entered(me) is True
        try:
            q.qemu_coroutine_enter(me)
        except Exception as e:  # noqa: BLE001 - inspected below
            seen.append(e)

    q.qemu_coroutine_enter(q.qemu_coroutine_create(entry, None))
    assert len(seen) == 1 and "coroutine" in str(seen[0]).lower()


def test_detail_06_yield_outside_and_foreign_unlock_raise(ctx, co_backend) -> None:
    """Detail 6: yielding outside a coroutine raises; unlocking a CoMutex
    one does not hold raises."""
    assert q.qemu_in_coroutine() is False
    with pytest.raises(Exception):
        q.qemu_coroutine_yield()

    m = q.CoMutex()
    q.qemu_co_mutex_init(m)
    errs: list = []

    def holder(_: Any) -> None:
        q.qemu_co_mutex_lock(m)
        q.qemu_coroutine_yield()
        q.qemu_co_mutex_unlock(m)

    def thief(_: Any) -> None:
        try:
            q.qemu_co_mutex_unlock(m)
        except Exception as e:  # noqa: BLE001 - inspected below
            errs.append(e)

    h = q.qemu_coroutine_create(holder, None)
    q.qemu_coroutine_enter(h)
    q.qemu_coroutine_enter(q.qemu_coroutine_create(thief, None))
    assert len(errs) == 1
    q.qemu_coroutine_enter(h)  # the holder unlocks normally

    def unlock_free(_: Any) -> None:
        try:
            q.qemu_co_mutex_unlock(m)
        except Exception as e:  # noqa: BLE001 - inspected below
            errs.append(e)

    q.qemu_coroutine_enter(q.qemu_coroutine_create(unlock_free, None))
    assert len(errs) == 2


# --------------------------------------------------------------------------
# Detail 7: CoQueue, coroutines stay on their OS thread

def test_detail_07_co_queue_wait_with_mutex_or_none(ctx, co_backend) -> None:
    """Detail 7: qemu_co_queue_wait takes a CoMutex or None (the mutex is
    released while waiting and held again after); qemu_co_queue_next
    returns a bool."""
    queue = q.CoQueue()
    q.qemu_co_queue_init(queue)
    m = q.CoMutex()
    q.qemu_co_mutex_init(m)
    log: list = []

    def waiter_locked(_: Any) -> None:
        q.qemu_co_mutex_lock(m)
        log.append("A waits")
        q.qemu_co_queue_wait(queue, m)
        log.append("A woke")
        q.qemu_co_mutex_unlock(m)  # held again after the wait

    def waiter_plain(_: Any) -> None:
        q.qemu_co_queue_wait(queue, None)
        log.append("B woke")

    def waker(_: Any) -> None:
        q.qemu_co_mutex_lock(m)  # free: A released it while waiting
        log.append("C locked")
        r1 = q.qemu_co_queue_next(queue)
        r2 = q.qemu_co_queue_next(queue)
        r3 = q.qemu_co_queue_next(queue)
        log.append((r1, r2, r3))
        q.qemu_co_mutex_unlock(m)

    q.qemu_coroutine_enter(q.qemu_coroutine_create(waiter_locked, None))
    q.qemu_coroutine_enter(q.qemu_coroutine_create(waiter_plain, None))
    assert q.qemu_co_queue_empty(queue) is False
    q.qemu_coroutine_enter(q.qemu_coroutine_create(waker, None))
    _wait(lambda: "A woke" in log and "B woke" in log, ctx)
    assert log[:3] == ["A waits", "C locked", (True, True, False)]
    assert q.qemu_co_queue_empty(queue) is True

    def empty_next(_: Any) -> None:
        log.append(q.qemu_co_queue_next(queue))

    q.qemu_coroutine_enter(q.qemu_coroutine_create(empty_next, None))
    assert log[-1] is False


def test_detail_07_coroutine_keeps_its_os_thread(ctx, co_backend) -> None:
    """Detail 7: a coroutine never changes OS thread once created, even
    when re-entered from a BH or aio_co_wake."""
    idents: list = []

    def entry(_: Any) -> None:
        idents.append(threading.get_ident())
        for _i in range(3):
            q.aio_co_schedule(ctx, q.qemu_coroutine_self())
            q.qemu_coroutine_yield()
            idents.append(threading.get_ident())
        q.qemu_co_sleep_ns(q.QEMU_CLOCK_REALTIME, 1_000_000)
        idents.append(threading.get_ident())

    co = q.qemu_coroutine_create(entry, None)
    q.qemu_coroutine_enter(co)
    _wait(lambda: len(idents) == 5, ctx)
    assert len(set(idents)) == 1


# --------------------------------------------------------------------------
# Detail 8: thread pool

def test_detail_08_submit_co_returns_worker_value(ctx, co_backend) -> None:
    """Detail 8: thread_pool_submit_co returns the worker's return value."""
    pool = q.aio_get_thread_pool(ctx)
    assert _run_co(lambda: q.thread_pool_submit_co(pool, lambda a: a * 2, 21)) == 42
    assert _run_co(lambda: q.thread_pool_submit_co(pool, lambda a: -a, errno.ENOSPC)) == -errno.ENOSPC


def test_detail_08_callbacks_in_polling_thread_never_in_cancel_async(ctx) -> None:
    """Detail 8: pool completion callbacks run in the thread that polls the
    pool's context, never inside bdrv_aio_cancel_async; the default maximum
    is 64 workers."""
    c = q.aio_context_new()
    try:
        pool = q.aio_get_thread_pool(c)
        assert pool.max_threads == 64
        pool.set_params(0, 1)  # one worker: the second request stays queued
        gate = threading.Event()
        started = threading.Event()
        calls: list = []
        in_cancel = [False]

        def blocker(_: Any) -> int:
            started.set()
            gate.wait(WAIT_S)
            return 7

        def cb(opaque: Any, ret: int) -> None:
            calls.append((opaque, ret, threading.get_ident(), in_cancel[0]))

        q.thread_pool_submit_aio(pool, blocker, None, cb, "running")
        _wait(started.is_set, c)
        acb = q.thread_pool_submit_aio(pool, lambda _: 0, None, cb, "queued")
        in_cancel[0] = True
        q.bdrv_aio_cancel_async(acb)
        in_cancel[0] = False
        assert calls == []
        gate.set()
        _wait(lambda: len(calls) == 2, c)
        _settle(c, 0.02)
        assert len(calls) == 2
        me = threading.get_ident()
        assert all(ident == me and not inside for _, _, ident, inside in calls)
        by = {o: r for o, r, _, _ in calls}
        assert by["running"] == 7
        assert by["queued"] in (-errno.ECANCELED, 0)
    finally:
        q.aio_context_unref(c)


# --------------------------------------------------------------------------
# Detail 9: buffers and I/O vectors

@pytest.mark.parametrize("alignment", [512, 4096, 65536])
@pytest.mark.parametrize("size", [1, 511, 4096, 12345])
def test_detail_09_memalign_exact_size_aligned_writable(alignment: int, size: int) -> None:
    """Detail 9: qemu_memalign returns a writable buffer-protocol object of
    exactly the requested size whose first byte is aligned; qemu_vfree
    takes the buffer."""
    buf = q.qemu_memalign(alignment, size)
    mv = memoryview(buf)
    assert not mv.readonly
    assert mv.nbytes == size
    assert len(buf) == size
    assert _addr(buf) % alignment == 0
    mv.release()
    # Written through the buffer protocol, as any consumer (readinto, the
    # kernel through an iovec) would.
    data = bytes((i * 13) & 0xFF for i in range(size))
    assert io.BytesIO(data).readinto(buf) == size
    assert bytes(buf) == data
    q.qemu_vfree(buf)


def test_detail_09_blockalign(disk_dir) -> None:
    """Detail 9: qemu_blockalign(bs or None, size) returns a writable
    buffer of exactly ``size`` bytes, aligned for the device."""
    for bs_factory in (lambda: None,
                       lambda: q.bdrv_open(None, {"driver": "null-co", "size": 1 << 20})):
        bs = bs_factory()
        try:
            buf = q.qemu_blockalign(bs, 3000)
            mv = memoryview(buf)
            assert not mv.readonly and mv.nbytes == 3000
            assert _addr(buf) % 512 == 0
            mv.release()
            q.qemu_vfree(buf)
        finally:
            if bs is not None:
                q.bdrv_unref(bs)


def test_detail_09_iovec_uses_caller_memory_no_copy() -> None:
    """Detail 9: qemu_iovec_init_buf / qemu_iovec_add accept memoryview
    slices and use the address of the first byte: no copy."""
    backing = bytearray(64)
    qiov = q.QEMUIOVector()
    q.qemu_iovec_init_buf(qiov, memoryview(backing)[3:20])
    assert (qiov.size, qiov.niov) == (17, 1)
    assert qiov.entries() == [(_addr(backing) + 3, 17)]
    q.qemu_iovec_memset(qiov, 0, 0xEE, 17)
    assert backing[3:20] == b"\xee" * 17 and backing[:3] == b"\0" * 3 and backing[20] == 0

    qiov2 = q.QEMUIOVector()
    q.qemu_iovec_init(qiov2, 2)
    aligned = q.qemu_memalign(4096, 8192)
    q.qemu_iovec_add(qiov2, memoryview(backing)[40:50])
    q.qemu_iovec_add(qiov2, memoryview(aligned)[4096:])
    assert (qiov2.size, qiov2.niov) == (10 + 4096, 2)
    assert qiov2.entries() == [(_addr(backing) + 40, 10), (_addr(aligned) + 4096, 4096)]
    q.qemu_iovec_memset(qiov2, 5, 0x11, 10)
    assert backing[45:50] == b"\x11" * 5
    assert bytes(memoryview(aligned)[4096:4101]) == b"\x11" * 5
    q.qemu_iovec_destroy(qiov2)
    q.qemu_iovec_destroy(qiov)
    q.qemu_vfree(aligned)


def _buffer_kinds() -> dict:
    import array
    import mmap

    heap = q.qemu_memalign(65536, 8192)
    page = q.qemu_memalign(4096, 8192)
    return {
        "bytearray": bytearray(100),
        "bytearray-slice": memoryview(bytearray(200))[7:107],
        "array-i": array.array("i", [0] * 25),
        "mmap": mmap.mmap(-1, 100),
        "ctypes": (ctypes.c_ubyte * 100)(),
        "memalign-64k-slice": memoryview(heap)[3:103],
        "memalign-4k-slice": memoryview(page)[4095:4195],
        "cast-view": memoryview(bytearray(100)).cast("I"),
    }


@pytest.mark.parametrize("kind", sorted(_buffer_kinds()))
def test_detail_09_iovec_accepts_any_writable_buffer(kind: str) -> None:
    """Detail 9: qemu_iovec_init_buf / qemu_iovec_add accept any writable
    buffer-protocol object and point at its first byte (no copy)."""
    buf = _buffer_kinds()[kind]
    n = memoryview(buf).nbytes
    for how in ("init_buf", "add"):
        qiov = q.QEMUIOVector()
        if how == "init_buf":
            q.qemu_iovec_init_buf(qiov, buf)
        else:
            q.qemu_iovec_init(qiov, 1)
            q.qemu_iovec_add(qiov, buf)
        assert (qiov.size, qiov.niov) == (n, 1)
        assert qiov.entries() == [(_addr(buf), n)]
        q.qemu_iovec_memset(qiov, 0, 0x3C if how == "add" else 0xC3, n)
        assert bytes(memoryview(buf).cast("B")) == (b"\x3c" if how == "add" else b"\xc3") * n
        q.qemu_iovec_destroy(qiov)


def test_detail_09_to_buf_from_buf_caller_buffer() -> None:
    """Detail 9: qemu_iovec_to_buf / qemu_iovec_from_buf(qiov, offset, buf,
    bytes) copy into / out of a caller-provided buffer, as in C."""
    a, b = bytearray(b"0123456789"), bytearray(b"abcdefghij")
    qiov = q.QEMUIOVector()
    q.qemu_iovec_init(qiov, 2)
    q.qemu_iovec_add(qiov, a)
    q.qemu_iovec_add(qiov, b)
    out = bytearray(8)
    assert q.qemu_iovec_to_buf(qiov, 6, out, 8) == 8
    assert out == b"6789abcd"
    out2 = bytearray(b"........")
    assert q.qemu_iovec_to_buf(qiov, 6, memoryview(out2)[2:], 4) == 4
    assert out2 == b"..6789.."
    assert q.qemu_iovec_from_buf(qiov, 8, b"XYZ", 3) == 3
    assert a == b"01234567XY" and b == b"Zbcdefghij"
    assert q.qemu_iovec_is_zero(qiov, 0, 20) is False
    q.qemu_iovec_memset(qiov, 0, 0, 20)
    assert q.qemu_iovec_is_zero(qiov, 0, 20) is True


# --------------------------------------------------------------------------
# Detail 10: Linux AIO / io_uring

@pytest.fixture
def direct_file(disk_dir):
    path = disk_dir / "direct.img"
    data = _make_image(path, IMG_SIZE)
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        yield fd, data
    finally:
        os.close(fd)


def _bad_fd() -> int:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    return r


def test_detail_10_laio_submit_bs_none_errors_via_callback(ctx, direct_file) -> None:
    """Detail 10: laio_submit accepts bs=None; a misaligned O_DIRECT buffer
    and a bad fd complete with -errno through the callback, never an
    exception; s.io_q counters exist; plugged requests are held."""
    _need_laio()
    fd, data = direct_file
    s = q.laio_init()
    q.laio_attach_aio_context(s, ctx)
    try:
        for attr in ("in_queue", "in_flight", "plugged", "blocked"):
            assert hasattr(s.io_q, attr), attr
        done: list = []
        cb = lambda opaque, ret: done.append((opaque, ret))  # noqa: E731

        good = q.qemu_memalign(4096, 4096)
        q.laio_submit(None, s, fd, 8, q.QEMUIOVector(good), 8, cb, "good", q.QEMU_AIO_READ)
        misaligned = memoryview(q.qemu_memalign(4096, 8192))[1:4097]
        q.laio_submit(None, s, fd, 0, q.QEMUIOVector(misaligned), 8, cb, "misaligned", q.QEMU_AIO_READ)
        q.laio_submit(None, s, _bad_fd(), 0, q.QEMUIOVector(bytearray(4096)), 8, cb, "badfd",
                      q.QEMU_AIO_READ)
        _wait(lambda: len(done) == 3, ctx)
        res = dict(done)
        assert res["good"] == 0 and bytes(good) == data[4096:8192]
        assert res["misaligned"] < 0 and res["misaligned"] == -errno.EINVAL
        assert res["badfd"] == -errno.EBADF

        done.clear()
        q.laio_io_plug(None, s)
        bufs = [q.qemu_memalign(4096, 4096) for _ in range(3)]
        for i, b in enumerate(bufs):
            q.laio_submit(None, s, fd, 8 * i, q.QEMUIOVector(b), 8, cb, i, q.QEMU_AIO_READ)
        assert s.io_q.plugged and s.io_q.in_queue == 3 and s.io_q.in_flight == 0
        assert done == []
        q.laio_io_unplug(None, s)
        _wait(lambda: len(done) == 3, ctx)
        assert sorted(done) == [(0, 0), (1, 0), (2, 0)]
        assert all(bytes(b) == data[4096 * i:4096 * (i + 1)] for i, b in enumerate(bufs))
        assert s.io_q.in_queue == 0 and s.io_q.in_flight == 0 and not s.io_q.plugged

        # While plugged, MAX_EVENTS queued requests are submitted without unplug.
        done.clear()
        q.laio_io_plug(None, s)
        small = q.qemu_memalign(4096, 512 * q.MAX_EVENTS)
        for i in range(q.MAX_EVENTS):
            q.laio_submit(None, s, fd, i % (IMG_SIZE // 512), q.QEMUIOVector(memoryview(small)[512 * i:512 * (i + 1)]),
                          1, cb, i, q.QEMU_AIO_READ)
        assert s.io_q.in_queue < q.MAX_EVENTS and (s.io_q.in_flight or done)
        _wait(lambda: len(done) == q.MAX_EVENTS, ctx)
        q.laio_io_unplug(None, s)
        assert all(ret == 0 for _, ret in done)
    finally:
        q.laio_detach_aio_context(s, ctx)
        q.laio_cleanup(s)


def test_detail_10_laio_co_submit_returns_errno(ctx, direct_file, co_backend) -> None:
    """Detail 10: laio_co_submit(bs=None, ...) returns 0 or -errno (a
    misaligned buffer, a bad fd), never raises or re-enters the coroutine."""
    _need_laio()
    fd, data = direct_file
    s = q.laio_init()
    q.laio_attach_aio_context(s, ctx)
    try:
        good = q.qemu_memalign(4096, 4096)
        mis = memoryview(q.qemu_memalign(4096, 8192))[512 + 1:512 + 1 + 4096]

        def body() -> tuple:
            return (q.laio_co_submit(None, s, fd, 4096, q.QEMUIOVector(good), q.QEMU_AIO_READ),
                    q.laio_co_submit(None, s, fd, 0, q.QEMUIOVector(mis), q.QEMU_AIO_READ),
                    q.laio_co_submit(None, s, _bad_fd(), 0, q.QEMUIOVector(good), q.QEMU_AIO_READ),
                    q.laio_co_submit(None, s, fd, 0, None, q.QEMU_AIO_FLUSH))

        r_good, r_mis, r_bad, r_flush = _run_co(body, ctx)
        assert r_good == 0 and bytes(good) == data[4096:8192]
        assert r_mis == -errno.EINVAL
        assert r_bad == -errno.EBADF
        assert r_flush == 0
    finally:
        q.laio_detach_aio_context(s, ctx)
        q.laio_cleanup(s)


def test_detail_10_luring_co_submit(ctx, direct_file, co_backend) -> None:
    """Detail 10: luring_co_submit accepts bs=None; misaligned buffer / bad
    fd -> -errno, never an exception; a flush passes qiov=None; s.io_q
    counters exist."""
    _need_luring()
    fd, data = direct_file
    s = q.luring_init()
    q.luring_attach_aio_context(s, ctx)
    try:
        for attr in ("in_queue", "in_flight", "plugged", "blocked"):
            assert hasattr(s.io_q, attr), attr
        good = q.qemu_memalign(4096, 4096)
        mis = memoryview(q.qemu_memalign(4096, 8192))[7:7 + 4096]

        def body() -> tuple:
            return (q.luring_co_submit(None, s, fd, 8192, q.QEMUIOVector(good), q.QEMU_AIO_READ),
                    q.luring_co_submit(None, s, fd, 0, q.QEMUIOVector(mis), q.QEMU_AIO_READ),
                    q.luring_co_submit(None, s, _bad_fd(), 0, q.QEMUIOVector(good), q.QEMU_AIO_READ),
                    q.luring_co_submit(None, s, fd, 0, None, q.QEMU_AIO_FLUSH))

        r_good, r_mis, r_bad, r_flush = _run_co(body, ctx)
        assert r_good == 0 and bytes(good) == data[8192:12288]
        assert r_mis == -errno.EINVAL
        assert r_bad == -errno.EBADF
        assert r_flush == 0
    finally:
        q.luring_detach_aio_context(s, ctx)
        q.luring_cleanup(s)


# --------------------------------------------------------------------------
# Detail 11: options, contexts, sync/async return conventions

def test_detail_11_flat_options_and_main_context(ctx, disk_dir) -> None:
    """Detail 11: one flat options dict with Python values; a driver without
    a file is opened with filename=None; a device lives in the main
    context."""
    path = disk_dir / "img"
    data = _make_image(path)
    opts = {"driver": "file", "aio": "threads", "cache.direct": True, "read-only": True,
            "cache.no-flush": False, "discard": "ignore"}
    bs = q.bdrv_open(str(path), opts, 0)
    try:
        assert q.bdrv_get_aio_context(bs) is q.qemu_get_aio_context()
        assert q.bdrv_getlength(bs) == IMG_SIZE
        buf = bytearray(100)
        assert q.bdrv_pread(bs, 10, 100, buf) == 0 and buf == data[10:110]
    finally:
        q.bdrv_unref(bs)
    nb = q.bdrv_open(None, {"driver": "null-co", "size": 4096}, q.BDRV_O_RDWR)
    try:
        assert q.bdrv_get_aio_context(nb) is q.qemu_get_aio_context()
    finally:
        q.bdrv_unref(nb)


@pytest.mark.parametrize("aio", ["threads", "native", "io_uring"])
def test_detail_11_pread_pwrite_any_buffer_any_address(ctx, disk_dir, aio) -> None:
    """Detail 11: bdrv_pread / bdrv_pwrite take any buffer at any address
    (bytes, bytearray, unaligned memoryview slices) on an O_DIRECT device
    and return 0; bdrv_flush returns 0."""
    if aio == "native":
        _need_laio()
    if aio == "io_uring":
        _need_luring()
    path = disk_dir / "img"
    model = bytearray(_make_image(path))
    bs = q.bdrv_open(str(path), {"aio": aio, "cache.direct": True}, q.BDRV_O_RDWR)
    try:
        backing = bytearray(5000)
        src = memoryview(backing)[3:3 + 777]
        src[:] = os.urandom(777)
        assert q.bdrv_pwrite(bs, 1001, 777, src) == 0
        model[1001:1778] = src
        assert q.bdrv_pwrite(bs, 4095, 3, b"abc") == 0
        model[4095:4098] = b"abc"
        dst_backing = bytearray(9000)
        dst = memoryview(dst_backing)[1:1 + 8000]
        assert q.bdrv_pread(bs, 33, 8000, dst) == 0
        assert bytes(dst) == model[33:8033]
        assert q.bdrv_flush(bs) == 0
    finally:
        q.bdrv_unref(bs)
    assert path.read_bytes() == model


@pytest.mark.parametrize("kind", sorted(_buffer_kinds()))
def test_detail_11_pread_pwrite_buffer_kinds(ctx, disk_dir, kind) -> None:
    """Detail 11: bdrv_pread / bdrv_pwrite take any buffer (arrays, mmaps,
    ctypes arrays, slices of aligned buffers) at any address on an
    O_DIRECT device."""
    path = disk_dir / "img"
    model = bytearray(_make_image(path))
    buf = _buffer_kinds()[kind]
    n = memoryview(buf).nbytes
    bs = q.bdrv_open(str(path), {"cache.direct": True}, q.BDRV_O_RDWR)
    try:
        assert q.bdrv_pread(bs, 4001, n, buf) == 0
        assert bytes(memoryview(buf).cast("B")) == model[4001:4001 + n]
        memoryview(buf).cast("B")[:] = b"\x99" * n
        assert q.bdrv_pwrite(bs, 123, n, buf) == 0
        model[123:123 + n] = b"\x99" * n
    finally:
        q.bdrv_unref(bs)
    assert path.read_bytes() == model


def test_detail_11_errno_returns_and_co_api(ctx, disk_dir, co_backend) -> None:
    """Detail 11: bdrv_pread/bdrv_pwrite/bdrv_flush return -errno on I/O
    error; bdrv_co_* return 0 / -errno."""
    path = disk_dir / "img"
    _make_image(path)
    bs = q.bdrv_open(None, {"driver": "blkdebug", "image": {"driver": "file", "filename": str(path)},
                            "inject-error": [
                                {"event": "read_aio", "iotype": "read", "errno": errno.EIO},
                                {"event": "write_aio", "iotype": "write", "errno": errno.ENOSPC},
                                {"event": "flush_to_disk", "iotype": "flush", "errno": errno.EROFS},
                            ]}, q.BDRV_O_RDWR)
    try:
        assert q.bdrv_pread(bs, 0, 512, bytearray(512)) == -errno.EIO
        assert q.bdrv_pwrite(bs, 0, 512, bytes(512)) == -errno.ENOSPC
        assert q.bdrv_flush(bs) == -errno.EROFS
    finally:
        q.bdrv_unref(bs)
    bs = q.bdrv_open(str(path), {}, q.BDRV_O_RDWR)
    try:
        def body() -> tuple:
            buf = bytearray(4096)
            return (q.bdrv_co_pwritev(bs, 0, 4096, q.QEMUIOVector(bytearray(b"z" * 4096)), 0),
                    q.bdrv_co_preadv(bs, 0, 4096, q.QEMUIOVector(buf), 0),
                    bytes(buf[:3]),
                    q.bdrv_co_flush(bs),
                    q.bdrv_co_pwrite_zeroes(bs, 0, 512, 0),
                    q.bdrv_co_pdiscard(bs, 0, 512))
        assert _run_co(body, ctx) == (0, 0, b"zzz", 0, 0, 0)
    finally:
        q.bdrv_unref(bs)


def test_detail_11_aio_callbacks_never_before_return(ctx, disk_dir) -> None:
    """Detail 11: bdrv_aio_* callbacks never run before the call returns
    (also for null devices and refused requests)."""
    path = disk_dir / "img"
    _make_image(path)
    devs = [q.bdrv_open(str(path), {}, q.BDRV_O_RDWR),
            q.bdrv_open(None, {"driver": "null-co", "size": 1 << 20}, q.BDRV_O_RDWR),
            q.bdrv_open(None, {"driver": "null-aio", "size": 1 << 20}, q.BDRV_O_RDWR)]
    try:
        for bs in devs:
            calls: list = []
            returned = [False]

            def cb(opaque: Any, ret: int) -> None:
                calls.append((opaque, ret, returned[0]))

            for name, submit in (
                ("read", lambda: q.bdrv_aio_preadv(bs, 0, q.QEMUIOVector(bytearray(512)), 0, cb, "read")),
                ("write", lambda: q.bdrv_aio_pwritev(bs, 0, q.QEMUIOVector(bytearray(512)), 0, cb, "write")),
                ("flush", lambda: q.bdrv_aio_flush(bs, cb, "flush")),
            ):
                returned[0] = False
                submit()
                returned[0] = True
            _wait(lambda: len(calls) == 3)
            assert all(after for _, _, after in calls), calls
            assert all(ret == 0 for _, ret, _ in calls), calls
    finally:
        for bs in devs:
            q.bdrv_unref(bs)


# --------------------------------------------------------------------------
# Detail 12: refused requests, error messages

def test_detail_12_refused_requests_write_nothing(ctx, disk_dir) -> None:
    """Detail 12: reads and writes past the end, negative offsets and writes
    to a read-only device are refused; nothing is written and the image does
    not grow."""
    path = disk_dir / "img"
    data = _make_image(path)
    bs = q.bdrv_open(str(path), {}, q.BDRV_O_RDWR)
    try:
        _refused(lambda: q.bdrv_pread(bs, IMG_SIZE - 10, 20, bytearray(20)))
        _refused(lambda: q.bdrv_pread(bs, IMG_SIZE, 1, bytearray(1)))
        _refused(lambda: q.bdrv_pwrite(bs, IMG_SIZE - 10, 20, b"x" * 20))
        _refused(lambda: q.bdrv_pwrite(bs, IMG_SIZE, 512, b"x" * 512))
        _refused(lambda: q.bdrv_pread(bs, -1, 10, bytearray(10)))
        _refused(lambda: q.bdrv_pwrite(bs, -512, 512, b"x" * 512))
        _refused(lambda: _run_co(lambda: q.bdrv_co_pwritev(bs, IMG_SIZE - 1, 2,
                                                           q.QEMUIOVector(bytearray(2)), 0)))
        _refused(lambda: _run_co(lambda: q.bdrv_co_preadv(bs, -4096, 4096,
                                                          q.QEMUIOVector(bytearray(4096)), 0)))
        assert q.bdrv_getlength(bs) == IMG_SIZE
    finally:
        q.bdrv_unref(bs)
    assert path.read_bytes() == data

    ro = q.bdrv_open(str(path), {"read-only": True}, q.BDRV_O_RDWR)
    ro2 = q.bdrv_open(str(path), {}, 0)
    try:
        for dev in (ro, ro2):
            _refused(lambda: q.bdrv_pwrite(dev, 0, 512, b"y" * 512))
            _refused(lambda: _run_co(lambda: q.bdrv_co_pwrite_zeroes(dev, 0, 512, 0)))
            _refused(lambda: _run_co(lambda: q.bdrv_co_pwritev(dev, 0, 4, q.QEMUIOVector(bytearray(4)), 0)))
    finally:
        q.bdrv_unref(ro)
        q.bdrv_unref(ro2)
    assert path.read_bytes() == data
    assert path.stat().st_size == IMG_SIZE


def test_detail_12_error_messages_name_the_problem(ctx, disk_dir) -> None:
    """Detail 12: errors name the unknown driver, the unknown option and the
    unknown aio value; aio=native without cache.direct says "direct"."""
    path = disk_dir / "img"
    _make_image(path)
    with pytest.raises(Exception, match="no-such-driver"):
        q.bdrv_open(None, {"driver": "no-such-driver"})
    with pytest.raises(Exception, match="bogus-option"):
        q.bdrv_open(str(path), {"bogus-option": 1})
    with pytest.raises(Exception, match="weird-aio"):
        q.bdrv_open(str(path), {"aio": "weird-aio", "cache.direct": True})
    with pytest.raises(Exception, match="direct"):
        q.bdrv_open(str(path), {"aio": "native"})
    with pytest.raises(Exception, match="bogus-null-option"):
        q.bdrv_open(None, {"driver": "null-co", "bogus-null-option": True})


# --------------------------------------------------------------------------
# Detail 13: null drivers

@pytest.mark.parametrize("driver", ["null-co", "null-aio"])
def test_detail_13_null_size_and_read_zeroes(ctx, driver) -> None:
    """Detail 13: null-co / null-aio take QEMU's size and read-zeroes."""
    bs = q.bdrv_open(None, {"driver": driver, "size": 3 * 1024 * 1024, "read-zeroes": True},
                     q.BDRV_O_RDWR)
    try:
        assert q.bdrv_getlength(bs) == 3 * 1024 * 1024
        buf = bytearray(b"\xff" * 4096)
        assert q.bdrv_pread(bs, 1 << 20, 4096, buf) == 0
        assert buf == bytes(4096)
        assert q.bdrv_pwrite(bs, 0, 4096, b"\x01" * 4096) == 0
        _refused(lambda: q.bdrv_pread(bs, 3 * 1024 * 1024, 1, bytearray(1)))
    finally:
        q.bdrv_unref(bs)


# --------------------------------------------------------------------------
# Detail 14 and 18: blkdebug

def _blkdebug(path, rules: list, **image_opts: Any):
    image = {"driver": "file", "filename": str(path), **image_opts}
    return q.bdrv_open(None, {"driver": "blkdebug", "image": image, "inject-error": rules},
                       q.BDRV_O_RDWR)


def test_detail_14_blkdebug_sector_rule_and_once(ctx, disk_dir) -> None:
    """Detail 14: blockdev shape; a rule with ``sector`` applies to every
    request of its type covering that sector; ``once`` fires once."""
    path = disk_dir / "img"
    data = _make_image(path)
    bs = _blkdebug(path, [{"event": "read_aio", "iotype": "read", "errno": errno.EIO,
                           "sector": 8, "once": False, "immediately": False},
                          {"event": "read_aio", "iotype": "read", "errno": errno.ENOSPC,
                           "sector": 40, "once": True, "immediately": True}])
    try:
        buf = bytearray(512)
        assert q.bdrv_pread(bs, 0, 512, buf) == 0 and buf == data[:512]
        assert q.bdrv_pread(bs, 4096, 512, buf) == -errno.EIO
        assert q.bdrv_pread(bs, 3000, 2000, bytearray(2000)) == -errno.EIO  # covers sector 8
        assert q.bdrv_pread(bs, 4096, 512, buf) == -errno.EIO  # not once
        assert q.bdrv_pread(bs, 40 * 512, 512, buf) == -errno.ENOSPC
        assert q.bdrv_pread(bs, 40 * 512, 512, buf) == 0  # once
        assert q.bdrv_pwrite(bs, 4096, 512, b"w" * 512) == 0  # other iotype
    finally:
        q.bdrv_unref(bs)


def test_detail_14_blkdebug_rule_without_sector(ctx, disk_dir) -> None:
    """Detail 14: a rule without ``sector`` applies to every request of its
    type (write and flush rules; reads unaffected)."""
    path = disk_dir / "img"
    data = _make_image(path)
    bs = _blkdebug(path, [{"event": "write_aio", "iotype": "write", "errno": errno.ENOSPC},
                          {"event": "flush_to_disk", "iotype": "flush", "errno": errno.EIO}])
    try:
        for off in (0, 512, 12345, IMG_SIZE - 512):
            assert q.bdrv_pwrite(bs, off, 512, b"w" * 512) == -errno.ENOSPC
        assert q.bdrv_flush(bs) == -errno.EIO
        buf = bytearray(1024)
        assert q.bdrv_pread(bs, 100, 1024, buf) == 0 and buf == data[100:1124]
    finally:
        q.bdrv_unref(bs)
    assert path.read_bytes() == data


def test_detail_18_blkdebug_several_rules_per_type(ctx, disk_dir) -> None:
    """Detail 18: several rules per I/O type are all active."""
    path = disk_dir / "img"
    _make_image(path)
    bs = _blkdebug(path, [{"event": "write_aio", "iotype": "write", "errno": errno.EIO, "sector": 0},
                          {"event": "write_aio", "iotype": "write", "errno": errno.ENOSPC, "sector": 16},
                          {"event": "write_aio", "iotype": "write", "errno": errno.EROFS, "sector": 32}])
    try:
        assert q.bdrv_pwrite(bs, 0, 512, b"a" * 512) == -errno.EIO
        assert q.bdrv_pwrite(bs, 16 * 512, 512, b"a" * 512) == -errno.ENOSPC
        assert q.bdrv_pwrite(bs, 32 * 512, 512, b"a" * 512) == -errno.EROFS
        assert q.bdrv_pwrite(bs, 48 * 512, 512, b"a" * 512) == 0
    finally:
        q.bdrv_unref(bs)


@pytest.mark.parametrize("aio", ["threads", "native", "io_uring"])
def test_detail_18_blkdebug_image_is_full_file_options(ctx, disk_dir, aio) -> None:
    """Detail 18: the blkdebug ``image`` is a full file-driver option dict:
    aio and cache.direct apply (and are checked as for a plain file)."""
    if aio == "native":
        _need_laio()
    if aio == "io_uring":
        _need_luring()
    path = disk_dir / "img"
    data = _make_image(path)
    bs = _blkdebug(path, [{"event": "read_aio", "iotype": "read", "errno": errno.EIO, "sector": 100}],
                   aio=aio, **{"cache.direct": True})
    try:
        assert bs.file is not None
        assert bs.file.bl.request_alignment >= 512  # O_DIRECT probed
        buf = bytearray(700)
        assert q.bdrv_pread(bs, 3, 700, buf) == 0 and buf == data[3:703]
        assert q.bdrv_pread(bs, 100 * 512, 512, bytearray(512)) == -errno.EIO
    finally:
        q.bdrv_unref(bs)
    if aio == "native":
        with pytest.raises(Exception, match="direct"):
            _blkdebug(path, [], aio="native")
    with pytest.raises(Exception, match="bogus-image-option"):
        _blkdebug(path, [], **{"bogus-image-option": 1})


# --------------------------------------------------------------------------
# Detail 15: user drivers

def _ram_driver(name: str, log: list, size: int = 8192, via_setattr: bool = False,
                read_delay_ns: int = 0):
    def d_open(bs, options, flags):
        log.append(("open", bs))
        bs.opaque = bytearray(options.pop("size", size))
        return 0

    def d_close(bs):
        log.append(("close", bs))

    def d_getlength(bs):
        return len(bs.opaque)

    def d_preadv(bs, offset, bytes, qiov, flags):
        log.append(("preadv", bs, offset, bytes, q.qemu_in_coroutine()))
        if read_delay_ns:
            q.qemu_co_sleep_ns(q.QEMU_CLOCK_REALTIME, read_delay_ns)
        q.qemu_iovec_from_buf(qiov, 0, bs.opaque[offset:offset + bytes], bytes)
        return 0

    def d_pwritev(bs, offset, bytes, qiov, flags):
        log.append(("pwritev", bs, offset, bytes, q.qemu_in_coroutine()))
        q.qemu_iovec_to_buf(qiov, 0, memoryview(bs.opaque)[offset:offset + bytes], bytes)
        return 0

    def d_flush(bs):
        log.append(("flush", bs, q.qemu_in_coroutine()))
        return 0

    cbs = dict(bdrv_open=d_open, bdrv_close=d_close, bdrv_getlength=d_getlength,
               bdrv_co_preadv=d_preadv, bdrv_co_pwritev=d_pwritev, bdrv_co_flush_to_disk=d_flush)
    if via_setattr:
        drv = q.BlockDriver()
        drv.format_name = name
        for k, v in cbs.items():
            setattr(drv, k, v)
    else:
        drv = q.BlockDriver(format_name=name, **cbs)
    q.bdrv_register(drv)
    return drv


@pytest.mark.parametrize("via_setattr", [False, True])
def test_detail_15_user_driver(ctx, via_setattr, co_backend) -> None:
    """Detail 15: a user driver made with BlockDriver(format_name=...) or by
    setting format_name after BlockDriver(); callbacks take the device
    first and bdrv_co_* ones run in coroutines; bounds and read-only checks
    happen before the driver; bdrv_unref calls bdrv_close exactly once."""
    from pyaioctx.block import bdrv_unregister

    name = f"contract-ram-{int(via_setattr)}-{co_backend}"
    log: list = []
    drv = _ram_driver(name, log, via_setattr=via_setattr)
    try:
        bs = q.bdrv_open(None, {"driver": name}, q.BDRV_O_RDWR)
        assert log == [("open", bs)]
        assert q.bdrv_pwrite(bs, 100, 5, b"hello") == 0
        buf = bytearray(5)
        assert q.bdrv_pread(bs, 100, 5, buf) == 0 and buf == b"hello"
        assert q.bdrv_flush(bs) == 0
        io = [e for e in log if e[0] in ("preadv", "pwritev", "flush")]
        assert io and all(e[1] is bs and e[-1] is True for e in io), io
        n = len(log)
        _refused(lambda: q.bdrv_pread(bs, 8190, 10, bytearray(10)))
        _refused(lambda: q.bdrv_pwrite(bs, 8192, 1, b"x"))
        _refused(lambda: q.bdrv_pwrite(bs, -1, 1, b"x"))
        assert len(log) == n, "the driver was called for a refused request"
        q.bdrv_unref(bs)
        assert [e for e in log if e[0] == "close"] == [("close", bs)]

        ro = q.bdrv_open(None, {"driver": name, "size": 4096}, 0)
        n = len(log)
        _refused(lambda: q.bdrv_pwrite(ro, 0, 4, b"abcd"))
        assert len(log) == n, "the driver was called for a write to a read-only device"
        q.bdrv_unref(ro)
        assert [e for e in log if e[0] == "close"] == [("close", bs), ("close", ro)]
    finally:
        bdrv_unregister(drv)


def test_detail_15_unref_drains_before_close(ctx) -> None:
    """Detail 15: bdrv_unref drains (in-flight requests complete and call
    back), then calls bdrv_close exactly once."""
    from pyaioctx.block import bdrv_unregister

    log: list = []
    drv = _ram_driver("contract-slow-ram", log, read_delay_ns=20_000_000)
    try:
        bs = q.bdrv_open(None, {"driver": "contract-slow-ram"}, q.BDRV_O_RDWR)
        for i in range(3):
            q.bdrv_aio_preadv(bs, 512 * i, q.QEMUIOVector(bytearray(512)), 0,
                              lambda opaque, ret: log.append(("cb", opaque, ret)), i)
        q.bdrv_unref(bs)
        kinds = [e[0] for e in log]
        assert kinds.count("close") == 1
        assert kinds.count("cb") == 3
        assert kinds.index("close") > max(i for i, k in enumerate(kinds) if k == "cb")
        _settle(ctx, 0.03)
        assert [e[0] for e in log].count("close") == 1
    finally:
        bdrv_unregister(drv)


# --------------------------------------------------------------------------
# Detail 16: drain, aio_wait_while, aio_wait_bh_oneshot

def test_detail_16_drain_from_coroutine_and_in_flight_until_callback(ctx, disk_dir, co_backend) -> None:
    """Detail 16: bdrv_drain may be called from a coroutine; a request is in
    flight until its completion callback has run (drain returns after it)."""
    path = disk_dir / "img"
    _make_image(path)
    bs = q.bdrv_open(str(path), {}, q.BDRV_O_RDWR)
    try:
        done: list = []
        for i in range(4):
            q.bdrv_aio_preadv(bs, 4096 * i, q.QEMUIOVector(bytearray(4096)), 0,
                              lambda opaque, ret: done.append(ret), i)
        q.bdrv_drain(bs)
        assert done == [0, 0, 0, 0]

        done.clear()

        def body() -> int:
            for i in range(4):
                q.bdrv_aio_pwritev(bs, 4096 * i, q.QEMUIOVector(bytearray(4096)), 0,
                                   lambda opaque, ret: done.append(ret), i)
            q.bdrv_drain(bs)
            return len(done)

        assert _run_co(body, ctx) == 4
    finally:
        q.bdrv_unref(bs)

    # null-aio completes through a BH: still in flight until the callback ran.
    nb = q.bdrv_open(None, {"driver": "null-aio", "size": 1 << 20, "latency-ns": 2_000_000},
                     q.BDRV_O_RDWR)
    try:
        done.clear()
        for i in range(4):
            q.bdrv_aio_preadv(nb, 512 * i, q.QEMUIOVector(bytearray(512)), 0,
                              lambda opaque, ret: done.append(ret), i)
        q.bdrv_drain(nb)
        assert done == [0, 0, 0, 0]
    finally:
        q.bdrv_unref(nb)


def test_detail_16_aio_wait_while_checks_cond_first(ctx) -> None:
    """Detail 16: aio_wait_while checks cond before polling: a false
    condition returns without running anything."""
    while q.aio_poll(ctx, False):
        pass
    ran: list = []
    q.aio_bh_schedule_oneshot(ctx, ran.append, 1)
    calls = [0]

    def cond() -> bool:
        calls[0] += 1
        return False

    q.aio_wait_while(ctx, cond)
    assert calls[0] == 1
    assert ran == [], "aio_wait_while polled although cond was false"
    # A true condition polls until it turns false.
    q.aio_wait_while(ctx, lambda: not ran)
    assert ran == [1]


def test_detail_16_aio_wait_bh_oneshot_main_and_iothread(ctx) -> None:
    """Detail 16: aio_wait_bh_oneshot works for the main context and for an
    iothread's context (cb runs in that context's thread; the call returns
    after it ran)."""
    seen: list = []
    q.aio_wait_bh_oneshot(ctx, lambda o: seen.append((o, threading.get_ident())), "main")
    assert seen == [("main", threading.get_ident())]
    it = IOThread()
    try:
        q.aio_wait_bh_oneshot(it.ctx, lambda o: (time.sleep(0.01), seen.append((o, threading.get_ident()))),
                              "io")
        assert seen[-1] == ("io", it.ident)
    finally:
        it.stop()


# --------------------------------------------------------------------------
# Detail 17: refused/cancelled aio requests, failed opens

def test_detail_17_refused_aio_request_raises_or_calls_back_once(ctx, disk_dir) -> None:
    """Detail 17: a refused bdrv_aio_* request either raises at once or
    calls back exactly once with a negative errno, never both."""
    path = disk_dir / "img"
    data = _make_image(path)
    rw = q.bdrv_open(str(path), {}, q.BDRV_O_RDWR)
    ro = q.bdrv_open(str(path), {}, 0)
    try:
        cases = [
            lambda cb: q.bdrv_aio_preadv(rw, IMG_SIZE - 1, q.QEMUIOVector(bytearray(2)), 0, cb, None),
            lambda cb: q.bdrv_aio_pwritev(rw, IMG_SIZE, q.QEMUIOVector(bytearray(512)), 0, cb, None),
            lambda cb: q.bdrv_aio_preadv(rw, -512, q.QEMUIOVector(bytearray(512)), 0, cb, None),
            lambda cb: q.bdrv_aio_pwritev(rw, -1, q.QEMUIOVector(bytearray(1)), 0, cb, None),
            lambda cb: q.bdrv_aio_pwritev(ro, 0, q.QEMUIOVector(bytearray(512)), 0, cb, None),
        ]
        for submit in cases:
            calls: list = []
            raised = False
            try:
                submit(lambda opaque, ret: calls.append(ret))
                assert calls == [], "callback ran before bdrv_aio_* returned"
            except AssertionError:
                raise
            except Exception as e:  # noqa: BLE001 - the type is checked
                assert type(e) is not Exception
                raised = True
            if raised:
                _settle(ctx, 0.02)
                assert calls == []
            else:
                _wait(lambda: calls)
                _settle(ctx, 0.02)
                assert len(calls) == 1 and calls[0] < 0
    finally:
        q.bdrv_unref(rw)
        q.bdrv_unref(ro)
    assert path.read_bytes() == data


@pytest.mark.parametrize("aio", ["threads", "native", "io_uring"])
@pytest.mark.parametrize("sync", [False, True])
def test_detail_17_cancelled_request_one_callback_then_hands_off(ctx, disk_dir, aio, sync) -> None:
    """Detail 17: a cancelled request gets exactly one callback (-ECANCELED
    or its real result) and after it never touches its buffer or the disk."""
    if aio == "native":
        _need_laio()
    if aio == "io_uring":
        _need_luring()
    path = disk_dir / "img"
    data = _make_image(path, 1 << 20)
    bs = q.bdrv_open(str(path), {"aio": aio, "cache.direct": True}, q.BDRV_O_RDWR)
    try:
        calls: dict = {}
        bufs = []
        acbs = []

        def cb(i: int, ret: int) -> None:
            calls.setdefault(i, []).append(ret)
            if ret == -errno.ECANCELED:
                bufs[i][:] = bytes(len(bufs[i]))  # the caller reuses its buffer
            else:
                bufs[i][:] = b"\x77" * len(bufs[i])

        q.bdrv_io_plug(bs)
        for i in range(16):
            b = q.qemu_blockalign(bs, 4096)
            bufs.append(memoryview(b))
            if i % 2:
                acbs.append(q.bdrv_aio_preadv(bs, 4096 * i, q.QEMUIOVector(b), 0, cb, i))
            else:
                memoryview(b)[:] = b"\xaa" * 4096
                acbs.append(q.bdrv_aio_pwritev(bs, 4096 * i, q.QEMUIOVector(b), 0, cb, i))
        q.bdrv_io_unplug(bs)
        for acb in acbs:
            if sync:
                q.bdrv_aio_cancel(acb)
            else:
                q.bdrv_aio_cancel_async(acb)
        if sync:
            assert sorted(calls) == list(range(16))
        _wait(lambda: len(calls) == 16)
        snapshot = [bytes(b) for b in bufs]
        q.bdrv_drain(bs)
        _settle(ctx, 0.05)
        assert all(len(v) == 1 for v in calls.values()), calls
        assert all(v[0] in (0, -errno.ECANCELED) for v in calls.values()), calls
        assert [bytes(b) for b in bufs] == snapshot, "a buffer was touched after its callback"
        cancelled_writes = {i for i, v in calls.items() if i % 2 == 0 and v[0] == -errno.ECANCELED}
    finally:
        q.bdrv_unref(bs)
    disk = path.read_bytes()
    for i in range(0, 16, 2):
        chunk = disk[4096 * i:4096 * (i + 1)]
        if i in cancelled_writes:
            assert chunk == data[4096 * i:4096 * (i + 1)], f"cancelled write {i} reached the disk"
        else:
            assert chunk == b"\xaa" * 4096


@pytest.mark.parametrize("engine", ["native", "io_uring"])
@pytest.mark.parametrize("sync", [False, True])
def test_detail_17_cancelled_queued_request_never_touches_buffer(ctx, disk_dir, engine, sync) -> None:
    """Detail 17: a request cancelled while still queued (plugged) gets
    exactly one callback, -ECANCELED, and afterwards neither its buffer nor
    the disk is touched (Linux AIO and io_uring engines)."""
    if engine == "native":
        _need_laio()
    else:
        _need_luring()
    path = disk_dir / "img"
    data = _make_image(path)
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    if engine == "native":
        s = q.laio_init()
        attach, detach, cleanup = q.laio_attach_aio_context, q.laio_detach_aio_context, q.laio_cleanup
        plug, unplug = q.laio_io_plug, q.laio_io_unplug

        def submit(off, qiov, cb, opaque, type):
            return q.laio_submit(None, s, fd, off // 512, qiov, qiov.size // 512, cb, opaque, type)
    else:
        s = q.luring_init()
        attach, detach, cleanup = q.luring_attach_aio_context, q.luring_detach_aio_context, q.luring_cleanup
        plug, unplug = q.luring_io_plug, q.luring_io_unplug

        def submit(off, qiov, cb, opaque, type):
            return q.luring_submit(None, s, fd, off, qiov, type, cb, opaque)
    attach(s, ctx)
    try:
        calls: dict = {}
        bufs = [q.qemu_memalign(4096, 4096) for _ in range(8)]

        def cb(i: int, ret: int) -> None:
            calls.setdefault(i, []).append(ret)
            bufs[i][:] = b"\x55" * 4096  # the caller reuses its buffer

        plug(None, s)
        acbs = []
        for i, b in enumerate(bufs):
            if i % 2:
                b[:] = b"\xaa" * 4096
                acbs.append(submit(4096 * i, q.QEMUIOVector(b), cb, i, q.QEMU_AIO_WRITE))
            else:
                acbs.append(submit(4096 * i, q.QEMUIOVector(b), cb, i, q.QEMU_AIO_READ))
        assert s.io_q.in_queue == 8
        for acb in acbs:
            (q.bdrv_aio_cancel if sync else q.bdrv_aio_cancel_async)(acb)
        if not sync:
            assert calls == {}, "a callback ran inside bdrv_aio_cancel_async"
        unplug(None, s)
        _wait(lambda: len(calls) == 8, ctx)
        _settle(ctx, 0.05)
        assert calls == {i: [-errno.ECANCELED] for i in range(8)}
        assert all(bytes(b) == b"\x55" * 4096 for b in bufs), "a buffer was touched after its callback"
    finally:
        detach(s, ctx)
        cleanup(s)
        os.close(fd)
    assert path.read_bytes() == data, "a cancelled write reached the disk"


def test_detail_17_missing_file_named_nothing_created(ctx, disk_dir) -> None:
    """Detail 17: bdrv_open of a missing file names the path and creates
    nothing (read-only and read-write, plain and through blkdebug)."""
    missing = disk_dir / "sub" / "does-not-exist.img"
    missing2 = disk_dir / "also-missing.img"
    for fn, p in ((lambda: q.bdrv_open(str(missing), {}, 0), missing),
                  (lambda: q.bdrv_open(str(missing2), {}, q.BDRV_O_RDWR), missing2),
                  (lambda: q.bdrv_open(str(missing2), {"aio": "threads", "cache.direct": True},
                                       q.BDRV_O_RDWR), missing2),
                  (lambda: _blkdebug(missing2, []), missing2)):
        with pytest.raises(Exception) as ei:
            fn()
        e = ei.value
        assert str(p) in str(e) or getattr(e, "filename", None) in (str(p), p), repr(e)
        assert not p.exists()
    assert not (disk_dir / "sub").exists()


def test_detail_17_failed_open_leaves_no_fd(ctx, disk_dir) -> None:
    """Detail 17: a failed open leaves no fd open (counted in /proc/self/fd)."""
    path = disk_dir / "img"
    _make_image(path)
    before = _fds()
    failures = [
        lambda: q.bdrv_open(str(disk_dir / "missing"), {}, q.BDRV_O_RDWR),
        lambda: q.bdrv_open(str(path), {"bogus-option": 1}, q.BDRV_O_RDWR),
        lambda: q.bdrv_open(str(path), {"aio": "native"}, q.BDRV_O_RDWR),
        lambda: q.bdrv_open(str(path), {"aio": "no-such-aio", "cache.direct": True}, q.BDRV_O_RDWR),
        lambda: q.bdrv_open(str(path), {"discard": "sometimes"}, q.BDRV_O_RDWR),
        lambda: q.bdrv_open(None, {"driver": "no-such-driver"}),
        lambda: _blkdebug(disk_dir / "missing", []),
        lambda: _blkdebug(path, [{"event": "read_aio", "iotype": "read", "errno": "ENOTANERRNO"}]),
        lambda: _blkdebug(path, [{"event": "read_aio", "bogus-rule-key": 1}]),
        lambda: _blkdebug(path, [], **{"bogus-image-option": 1}),
    ]
    for fn in failures:
        with pytest.raises(Exception):
            fn()
    assert _fds() - before == set(), "a failed bdrv_open left an fd open"


# --------------------------------------------------------------------------
# Detail 19: nothing left behind

def _threads() -> set:
    return set(threading.enumerate())


def _wait_no_new_threads(baseline: set, timeout: float = 5.0) -> set:
    deadline = time.monotonic() + timeout
    while True:
        extra = {t for t in _threads() - baseline if t.is_alive()}
        if not extra or time.monotonic() > deadline:
            return extra
        time.sleep(0.02)


def test_detail_19_context_unref_leaves_nothing(ctx, disk_dir) -> None:
    """Detail 19: after aio_context_unref no thread or fd the context
    created remains (its pool workers, notifiers, Linux AIO / io_uring
    engines)."""
    from pyaioctx.block.io_uring import aio_setup_linux_io_uring
    from pyaioctx.block.linux_aio import aio_setup_linux_aio

    fds0, threads0 = _fds(), _threads()
    c = q.aio_context_new()
    pool = q.aio_get_thread_pool(c)
    results: list = []
    for i in range(8):
        q.thread_pool_submit_aio(pool, lambda a: (time.sleep(0.005), a)[1], i,
                                 lambda o, r: results.append(r), None)
    _wait(lambda: len(results) == 8, c)
    if q.laio_probe()[0]:
        aio_setup_linux_aio(c)
    if q.luring_probe()[0]:
        aio_setup_linux_io_uring(c)
    e = q.EventNotifier()
    q.event_notifier_init(e, False)
    q.aio_set_event_notifier(c, e, False, lambda n: None)
    q.aio_set_event_notifier(c, e, False, None)
    q.event_notifier_cleanup(e)
    q.aio_context_unref(c)
    assert _fds() - fds0 == set()
    assert _wait_no_new_threads(threads0) == set()


@pytest.mark.parametrize("aio", ["threads", "native", "io_uring"])
def test_detail_19_bdrv_unref_leaves_nothing(ctx, disk_dir, aio) -> None:
    """Detail 19: after bdrv_unref (and the pool's idle timeout, shortened
    through ``pool.idle_timeout``) no thread or fd the device created
    remains.  The Linux AIO / io_uring engine belongs to the AioContext (one
    per context, as in QEMU) and is released by aio_context_unref; it is set
    up before the baseline here."""
    if aio == "native":
        _need_laio()
    if aio == "io_uring":
        _need_luring()
    from pyaioctx.block.io_uring import aio_setup_linux_io_uring
    from pyaioctx.block.linux_aio import aio_setup_linux_aio

    if aio == "native":
        aio_setup_linux_aio(ctx)
    elif aio == "io_uring":
        aio_setup_linux_io_uring(ctx)
    pool = q.aio_get_thread_pool(ctx)
    old_timeout = pool.idle_timeout
    pool.idle_timeout = 0.2
    try:
        path = disk_dir / "img"
        _make_image(path)
        fds0, threads0 = _fds(), _threads()
        bs = q.bdrv_open(str(path), {"aio": aio, "cache.direct": True}, q.BDRV_O_RDWR)
        done: list = []
        for i in range(8):
            q.bdrv_aio_preadv(bs, 4096 * i, q.QEMUIOVector(q.qemu_blockalign(bs, 4096)), 0,
                              lambda o, r: done.append(r), None)
        assert q.bdrv_pwrite(bs, 0, 100, b"x" * 100) == 0
        assert q.bdrv_flush(bs) == 0
        q.bdrv_unref(bs)
        assert done == [0] * 8
        assert _fds() - fds0 == set()
        assert _wait_no_new_threads(threads0) == set()
    finally:
        pool.idle_timeout = old_timeout


# --------------------------------------------------------------------------
# Bad input gets a clear error and loses nothing

def test_bad_input_clear_errors(ctx, disk_dir) -> None:
    """Bad input: wrong types, a closed device, a closed context and a
    coroutine-only function outside a coroutine get a specific exception
    (or -errno) whose message names what was wrong."""
    path = disk_dir / "img"
    data = _make_image(path)
    bs = q.bdrv_open(str(path), {}, q.BDRV_O_RDWR)
    try:
        with pytest.raises(TypeError):
            q.bdrv_pread(bs, "0", 10, bytearray(10))
        with pytest.raises(TypeError):
            q.bdrv_pwrite(bs, 0, 10, 12345)
        with pytest.raises(TypeError):
            q.bdrv_aio_preadv(bs, 0, b"not a qiov", 0, lambda o, r: None, None)
        with pytest.raises(Exception, match="(?i)coroutine"):
            q.bdrv_co_preadv(bs, 0, 512, q.QEMUIOVector(bytearray(512)), 0)
        with pytest.raises(Exception, match="(?i)coroutine"):
            q.thread_pool_submit_co(q.aio_get_thread_pool(ctx), lambda a: 0, None)
    finally:
        q.bdrv_unref(bs)
    try:
        ret = q.bdrv_pwrite(bs, 0, 4, b"dead")
    except Exception as e:  # noqa: BLE001 - the type is checked
        assert type(e) is not Exception
    else:
        assert ret < 0
    assert path.read_bytes() == data

    c = q.aio_context_new()
    q.aio_context_unref(c)
    with pytest.raises(Exception, match="(?i)closed"):
        q.aio_poll(c, False)
    with pytest.raises(TypeError):
        q.aio_bh_new(ctx, "not callable", None)
    with pytest.raises(TypeError):
        q.qemu_memalign(4096, "big")
    with pytest.raises((ValueError, TypeError)):
        q.qemu_iovec_init_buf(q.QEMUIOVector(), b"read-only bytes")
