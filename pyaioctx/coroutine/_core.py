# SPDX-License-Identifier: GPL-2.0-or-later
"""Backend-independent coroutine core: port of util/qemu-coroutine.c and the
coroutine part of util/async.c (aio_co_enter, aio_co_wake, aio_co_schedule,
co_schedule_bh_cb, aio_co_reschedule_self).

Model (QEMU's, unchanged):

* A coroutine is entered by a *caller* (another coroutine, or the thread's
  leader -- the thread itself outside any coroutine) and runs until it
  yields or terminates; then control returns to the caller.
  ``co.caller`` is non-None exactly while the coroutine is entered.
* ``aio_co_enter`` from inside a coroutine does not nest: it appends the
  target to the running coroutine's ``co_queue_wakeup`` list, and the
  ``qemu_aio_coroutine_enter`` loop that runs the current coroutine enters
  the queued ones after it yields or terminates (depth first).  This keeps
  the stack flat however long a wake-up chain gets.
* ``aio_co_schedule`` may be called from any thread: it pushes the coroutine
  on its context's ``scheduled_coroutines`` queue and schedules the
  context's ``co_schedule_bh``, which enters it in the context's home thread.

What a backend does is only the stack switch (:class:`CoroutineBackend`);
all bookkeeping above lives here, once.

Per-thread state (QEMU's ``__thread`` current coroutine and AioContext) lives
in :mod:`pyaioctx._tls`: a coroutine always answers for the *logical* thread
that entered it, whatever OS thread runs it.

Deviations from QEMU, all of them "raise instead of abort": entering a
terminated, running or scheduled coroutine, yielding outside a coroutine and
scheduling a coroutine twice raise :class:`CoroutineError` naming the
coroutine.  An exception escaping a coroutine terminates it and is re-raised
by the ``qemu_coroutine_enter`` (or the ``aio_poll``) that was running it,
after the coroutines it had queued for wake-up have run.
"""

from __future__ import annotations

import collections
import enum
import logging
import threading
from typing import Any, Callable, Optional, Protocol

from .. import _tls
from ..aio import AioContext, aio_bh_schedule_oneshot, qemu_bh_schedule

log = logging.getLogger("pyaioctx.coroutine")

_local = _tls._local  # the threading.local behind _tls.current(); read directly on hot paths


class CoroutineError(RuntimeError):
    """Misuse of a coroutine: QEMU aborts in these cases, pyaioctx raises."""


class NotInCoroutineError(CoroutineError):
    """A coroutine-only (``coroutine_fn``) function was called outside a coroutine."""


class CoroutineAction(enum.IntEnum):
    """Port of ``CoroutineAction``: why a switch handed control over."""

    ENTER = 1      # the caller enters the coroutine
    YIELD = 2      # the coroutine yields back to its caller
    TERMINATE = 3  # the coroutine's entry function returned (or raised)


COROUTINE_ENTER = CoroutineAction.ENTER
COROUTINE_YIELD = CoroutineAction.YIELD
COROUTINE_TERMINATE = CoroutineAction.TERMINATE


class CoroutineState(enum.IntEnum):
    """Lifecycle of a :class:`Coroutine` (QEMU keeps it implicit)."""

    CREATED = 0     # created, never entered
    SUSPENDED = 1   # entered at least once, currently yielded
    RUNNING = 2     # entered (caller is set)
    TERMINATED = 3  # entry returned or raised; can never be entered again
    LEADER = 4      # a thread's leader: the thread outside any coroutine


# Plain-int copies of CoroutineState for the hot paths (enum attribute
# access is several times slower than a global lookup).
_CREATED, _SUSPENDED, _RUNNING, _TERMINATED, _LEADER = (
    int(CoroutineState.CREATED), int(CoroutineState.SUSPENDED), int(CoroutineState.RUNNING),
    int(CoroutineState.TERMINATED), int(CoroutineState.LEADER))


class Coroutine:
    """Port of QEMU's ``Coroutine``.

    Fields and who may touch them:

    ``entry``, ``entry_arg`` set at creation; dropped at termination.
    ``name``           the entry's ``__qualname__``; read-only.
    ``caller``         the coroutine (or leader) that entered this one, None
                       while not entered; written only by the logical thread
                       that runs the coroutine (enter loop and yield).
    ``ctx``            the AioContext it last ran in (QEMU's ``co->ctx``);
                       written by the enter loop, read from any thread
                       (aio_co_wake, CoMutex hand-off).
    ``scheduled``      name of the function that has queued the coroutine
                       for a later enter (``aio_co_schedule``,
                       ``qemu_co_sleep_ns``), else None; any thread, under
                       ``_sched_lock``.
    ``co_queue_wakeup`` coroutines to enter after this one yields or
                       terminates; only the running coroutine appends, only
                       its enter loop drains.
    ``locks_held``     CoMutex/CoRwlock count; the running coroutine only.
    ``_state``         a :class:`CoroutineState` value (as a plain int, for
                       speed; ``state`` gives the enum); the enter loop only.
    ``_backend``       the backend chosen when the coroutine was created.
    ``_impl``          backend state (a pooled worker thread, a greenlet);
                       created at the first enter, released at termination;
                       backend only.
    ``_exc``           exception that escaped the entry; enter loop only.
    """

    __slots__ = ("entry", "entry_arg", "name", "caller", "ctx", "scheduled",
                 "co_queue_wakeup", "locks_held", "_state", "_backend", "_impl",
                 "_exc", "_lt", "_ret", "__weakref__")

    def __init__(self, entry: Optional[Callable[[Any], None]], opaque: Any,
                 backend: Optional["CoroutineBackend"], name: str) -> None:
        self.entry = entry
        self.entry_arg = opaque
        self.name = name
        self.caller: Optional[Coroutine] = None
        self.ctx: Optional[AioContext] = None
        self.scheduled: Optional[str] = None
        self.co_queue_wakeup: list[Coroutine] = []
        self.locks_held = 0
        self._state = _CREATED if backend is not None else _LEADER
        self._backend = backend
        self._impl: Any = None
        self._exc: Optional[BaseException] = None
        self._lt: Any = None   # thread backend: the logical thread it runs for
        self._ret: Any = None  # whom a yield goes to (thread: its waiter; greenlet: parent)

    # Pythonic face ------------------------------------------------------
    def enter(self) -> None:
        """``qemu_coroutine_enter(self)``."""
        qemu_coroutine_enter(self)

    def enter_if_inactive(self) -> None:
        """``qemu_coroutine_enter_if_inactive(self)``."""
        qemu_coroutine_enter_if_inactive(self)

    @property
    def entered(self) -> bool:
        """``qemu_coroutine_entered(self)``."""
        return self.caller is not None

    @property
    def state(self) -> CoroutineState:
        """Where the coroutine is in its lifecycle."""
        return CoroutineState(self._state)

    @property
    def terminated(self) -> bool:
        return self._state == _TERMINATED

    @property
    def backend(self) -> str:
        """Name of the backend this coroutine runs on ("leader" for a leader)."""
        return self._backend.name if self._backend is not None else "leader"

    def __repr__(self) -> str:
        return f"<Coroutine {self.name!r} {self.state.name.lower()} at 0x{id(self):x}>"


class CoroutineBackend(Protocol):
    """The stack-switch primitive each backend provides (QEMU's
    ``qemu_coroutine_new`` / ``qemu_coroutine_switch`` / ``qemu_coroutine_delete``
    of util/coroutine-*.c).

    Calling conditions: every method is called by the core only, in the
    logical thread ``lt`` that is entering or running the coroutine, with
    the bookkeeping (``caller``, ``ctx``, state checks) already done.
    """

    name: str

    def enter(self, lt: Any, from_: Coroutine, to: Coroutine) -> CoroutineAction:
        """Run ``to`` (entered by ``from_``, the running coroutine or the
        leader) until it yields or terminates; return YIELD or TERMINATE.

        Sets ``lt.co = to`` before ``to`` runs and restores ``lt.co`` to
        ``from_`` (None for a leader) afterwards.  On TERMINATE, an
        exception that escaped the entry is in ``to._exc`` and the backend
        has released ``to._impl``.  Raises CoroutineError, with nothing
        changed, if ``to`` cannot run in this OS thread.
        """
        ...

    def yield_(self, lt: Any, co: Coroutine) -> None:
        """``co`` (running, its caller already cleared) gives control back to
        whoever entered it; returns when ``co`` is entered again."""
        ...

    # A backend whose coroutines are greenlets sets this to
    # ``greenlet.getcurrent`` (others to None).  Its enter of a suspended
    # coroutine by the greenlet that last entered it is then
    # ``co._impl.switch()`` and its yield ``co._ret.switch(COROUTINE_YIELD)``,
    # and the hottest callers (_wake_unless_entered, the I/O engines'
    # coroutine submits) do those switches themselves instead of calling
    # enter / yield_.
    greenlet_current: Optional[Callable[[], Any]]

    def stats(self) -> dict[str, int]:
        """Backend counters (for tests and benchmarks)."""
        ...


# The backend new coroutines get; set by pyaioctx.coroutine.set_backend.
_active: Optional[CoroutineBackend] = None

# Serialises the test-and-set of Coroutine.scheduled (QEMU's cmpxchg).
_sched_lock = threading.Lock()


def _current_lt() -> Any:
    try:
        return _local.lt
    except AttributeError:
        return _tls.current()


def _leader(lt: Any) -> Coroutine:
    leader = lt.leader
    if leader is None:
        leader = lt.leader = Coroutine(None, None, None, f"leader of {lt.name}")
    return leader


def _name_of(entry: Callable[..., Any]) -> str:
    return getattr(entry, "__qualname__", None) or getattr(entry, "__name__", None) or repr(entry)


# --------------------------------------------------------------------------
# Creation, enter, yield (util/qemu-coroutine.c)

def qemu_coroutine_create(entry: Callable[[Any], None], opaque: Any = None) -> Coroutine:
    """Port of ``qemu_coroutine_create``: ``entry(opaque)`` runs when entered.

    Any thread.  The backend stack (worker thread, greenlet) is attached at
    the first enter, so a coroutine may be created in one thread and first
    entered (e.g. through ``aio_co_schedule``) in another; after that it
    stays in the OS thread it started in (DESIGN rule 7).
    """
    if not callable(entry):
        raise TypeError(f"qemu_coroutine_create: entry must be callable, got {type(entry).__name__}")
    backend = _active
    if backend is None:  # pragma: no cover - set at package import
        raise CoroutineError("no coroutine backend is active")
    return Coroutine(entry, opaque, backend, _name_of(entry))


def _coroutine_new(entry: Callable[[Any], None], opaque: Any, name: str) -> Coroutine:
    """``qemu_coroutine_create`` for callers inside pyaioctx that pass a
    plain function and its name: no checks, no name lookup (the block
    layer creates one coroutine per request)."""
    backend = _active
    if backend is None:  # pragma: no cover - set at package import
        raise CoroutineError("no coroutine backend is active")
    return Coroutine(entry, opaque, backend, name)


def _check_co(co: object, fn: str) -> Coroutine:
    if co.__class__ is not Coroutine:
        raise TypeError(f"{fn}: expected a Coroutine, got {type(co).__name__}")
    return co  # type: ignore[return-value]


def _terminated(to: Coroutine, ret: CoroutineAction) -> Optional[BaseException]:
    """Bookkeeping after ``to`` terminated (QEMU's coroutine_delete)."""
    to._state = _TERMINATED
    to.caller = None
    to.entry = None
    to.entry_arg = None
    to._lt = None
    to._ret = None
    exc = to._exc
    to._exc = None
    if exc is None and to.locks_held:
        exc = CoroutineError(
            f"coroutine {to.name!r} terminated holding {to.locks_held} lock(s)")
    return exc


def qemu_aio_coroutine_enter(ctx: Optional[AioContext], co: Coroutine) -> None:
    """Port of ``qemu_aio_coroutine_enter``: enter ``co`` in ``ctx``.

    Runs ``co`` until it yields or terminates, then every coroutine it (and
    they, depth first) queued with ``aio_co_enter``.  Raises CoroutineError
    naming the coroutine if it is terminated, already entered or scheduled.
    An exception that escaped a coroutine is re-raised once the queue is
    empty (further ones are logged).
    """
    try:
        lt = _local.lt
    except AttributeError:
        lt = _tls.current()
    _enter(lt, ctx, co)


def qemu_coroutine_enter(co: Coroutine) -> None:
    """Port of ``qemu_coroutine_enter``: enter ``co`` in the current context."""
    try:
        lt = _local.lt
    except AttributeError:
        lt = _tls.current()
    _enter(lt, lt.ctx, co)


def _enter(lt: Any, ctx: Optional[AioContext], co: Coroutine,
           entered: Optional[CoroutineAction] = None) -> None:
    # The hot path of every coroutine switch: plain-int states, no helper
    # calls except the backend's switch.  ``entered``: the caller entered
    # ``co`` already (_wake_unless_entered) and the backend returned this;
    # go on with what follows the switch.
    if co.__class__ is not Coroutine:
        raise TypeError(f"qemu_coroutine_enter: expected a Coroutine, got {type(co).__name__}")
    from_ = lt.co
    if from_ is None:
        from_ = lt.leader or _leader(lt)
    pending: Optional[collections.deque[Coroutine]] = None
    first_exc: Optional[BaseException] = None
    to = co
    ret = entered
    while True:
        if ret is None:
            state = to._state
            if state >= _TERMINATED or to.caller is not None or to.scheduled is not None:
                _refuse(to)
            to.caller = from_
            to.ctx = ctx
            to._state = _RUNNING
            try:
                ret = to._backend.enter(lt, from_, to)  # type: ignore[union-attr]
            except CoroutineError:
                # The backend refused before switching (wrong OS thread): undo.
                to.caller = None
                to._state = state
                raise
        # Queued coroutines run depth first: the ones `to` queued go before
        # the ones queued earlier (QSIMPLEQ_PREPEND in QEMU).
        wake = to.co_queue_wakeup
        if wake:
            if pending is None:
                pending = collections.deque()
            pending.extendleft(reversed(wake))
            wake.clear()
        if ret is COROUTINE_YIELD:
            to._state = _SUSPENDED
        elif to._exc is None and not to.locks_held:
            # _terminated, inlined for the common case (nothing to report).
            to._state = _TERMINATED
            to.caller = None
            to.entry = None
            to.entry_arg = None
            to._lt = None
            to._ret = None
        else:
            exc = _terminated(to, ret)
            if exc is not None:
                if first_exc is None:
                    first_exc = exc
                else:
                    log.error("coroutine %r raised while another exception was pending",
                              to.name, exc_info=exc)
        if not pending:
            break
        to = pending.popleft()
        ret = None
    if first_exc is not None:
        try:
            raise first_exc
        finally:
            first_exc = None  # no frame <-> traceback cycle


def _refuse(to: Coroutine) -> None:
    if to._state == _TERMINATED:
        raise CoroutineError(f"qemu_coroutine_enter: coroutine {to.name!r} has terminated")
    if to._state == _LEADER:
        raise CoroutineError(f"qemu_coroutine_enter: {to.name!r} is a thread's leader "
                             "coroutine; it cannot be entered")
    if to.caller is not None:
        raise CoroutineError(
            f"qemu_coroutine_enter: coroutine {to.name!r} re-entered recursively "
            "(it is currently entered)")
    raise CoroutineError(
        f"qemu_coroutine_enter: coroutine {to.name!r} was already scheduled "
        f"in {to.scheduled!r}")


def qemu_coroutine_enter_if_inactive(co: Coroutine) -> None:
    """Port of ``qemu_coroutine_enter_if_inactive``: enter unless already entered."""
    _check_co(co, "qemu_coroutine_enter_if_inactive")
    if co.caller is None:
        qemu_coroutine_enter(co)


def qemu_coroutine_yield() -> None:
    """Port of ``qemu_coroutine_yield``: return control to the caller.

    Callable at any Python call depth inside a coroutine; returns when the
    coroutine is entered again.  Raises NotInCoroutineError outside one.
    """
    try:
        lt = _local.lt
    except AttributeError:
        lt = _tls.current()
    self = lt.co
    if self is None:
        raise NotInCoroutineError("qemu_coroutine_yield called outside a coroutine "
                                  "(co-routine is yielding to no one)")
    self.caller = None
    self._backend.yield_(lt, self)


def _lt_and_self(fn: str) -> tuple[Any, Coroutine]:
    # This thread's state and the running coroutine, for a coroutine-only
    # function that will yield through _yield_running; NotInCoroutineError
    # (naming ``fn``) outside a coroutine.  linux_aio's coroutine submit
    # has it inline.
    try:
        lt = _local.lt
    except AttributeError:
        lt = None
    co = lt.co if lt is not None else None
    if co is None:
        _require_coroutine(fn)  # raises
    return lt, co  # type: ignore[return-value]


def _yield_running(lt: Any, co: Coroutine) -> None:
    # qemu_coroutine_yield for a caller that has read this thread's state
    # ``lt`` and knows ``co`` is lt.co (the I/O engines' coroutine submits):
    # no thread-local read, and a greenlet coroutine switches to its parent
    # itself (see CoroutineBackend.greenlet_current).
    co.caller = None
    backend = co._backend
    if backend.greenlet_current is not None:  # type: ignore[union-attr]
        co._ret.switch(COROUTINE_YIELD)
    else:
        backend.yield_(lt, co)  # type: ignore[union-attr]


def qemu_coroutine_self() -> Coroutine:
    """Port of ``qemu_coroutine_self``: the running coroutine.

    Outside a coroutine this is the thread's leader, as in QEMU (use
    ``qemu_in_coroutine`` to tell the two apart).
    """
    lt = _current_lt()
    co = lt.co
    if co is None:
        co = lt.leader or _leader(lt)
    return co


def qemu_in_coroutine() -> bool:
    """Port of ``qemu_in_coroutine``."""
    try:
        return _local.lt.co is not None
    except AttributeError:
        return False


def qemu_coroutine_entered(co: Coroutine) -> bool:
    """Port of ``qemu_coroutine_entered``: True while ``co`` is entered
    (running, or waiting for a coroutine it entered)."""
    _check_co(co, "qemu_coroutine_entered")
    return co.caller is not None


def qemu_coroutine_get_aio_context(co: Coroutine) -> Optional[AioContext]:
    """Port of ``qemu_coroutine_get_aio_context``: ``co.ctx``."""
    return _check_co(co, "qemu_coroutine_get_aio_context").ctx


def _require_coroutine(fn: str) -> Coroutine:
    """The running coroutine, or NotInCoroutineError naming ``fn``."""
    try:
        co = _local.lt.co
    except AttributeError:
        co = None
    if co is None:
        raise NotInCoroutineError(f"{fn} must be called from a coroutine")
    return co


# --------------------------------------------------------------------------
# AioContext integration (util/async.c)

def aio_co_schedule(ctx: AioContext, co: Coroutine) -> None:
    """Port of ``aio_co_schedule``: enter ``co`` from ``ctx``'s home thread.

    Any thread.  Raises CoroutineError if ``co`` is already scheduled.
    """
    _check_co(co, "aio_co_schedule")
    if not isinstance(ctx, AioContext):
        raise TypeError(f"aio_co_schedule: ctx must be an AioContext, got {type(ctx).__name__}"
                        + (f" (coroutine {co.name!r} has not run in a thread with an "
                           "AioContext)" if ctx is None else ""))
    if ctx.closed:
        raise RuntimeError(f"aio_co_schedule: {ctx!r} is closed")
    _schedule_mark(co, "aio_co_schedule")
    ctx.scheduled_coroutines.append(co)
    qemu_bh_schedule(ctx.co_schedule_bh)


def _schedule_mark(co: Coroutine, by: str) -> None:
    with _sched_lock:
        scheduled = co.scheduled
        if scheduled is None:
            co.scheduled = by
    if scheduled is not None:
        raise CoroutineError(f"{by}: coroutine {co.name!r} was already scheduled in {scheduled!r}")


def _co_schedule_bh_run(ctx: AioContext) -> None:
    """Port of ``co_schedule_bh_cb``: enter the coroutines scheduled on ``ctx``.

    Home thread (it is the callback of ``ctx.co_schedule_bh``).  Takes the
    coroutines queued so far in FIFO order; later ones re-schedule the BH.
    If a coroutine raises, the rest of the batch is put back at the front of
    the queue and the BH re-scheduled before the exception propagates out of
    ``aio_poll``, so nothing is lost.
    """
    q = ctx.scheduled_coroutines
    n = len(q)
    if not n:
        return
    batch = [q.popleft() for _ in range(n)]
    for i, co in enumerate(batch):
        co.scheduled = None
        try:
            qemu_aio_coroutine_enter(ctx, co)
        except BaseException:
            rest = batch[i + 1:]
            if rest:
                q.extendleft(reversed(rest))
                qemu_bh_schedule(ctx.co_schedule_bh)
            raise


def aio_co_enter(ctx: Optional[AioContext], co: Coroutine) -> None:
    """Port of ``aio_co_enter``: enter ``co`` in ``ctx`` as soon as possible.

    From another thread than ``ctx``'s: ``aio_co_schedule``.  From a
    coroutine of the same context: queue ``co`` to run after the current
    coroutine yields or terminates (no nesting).  Otherwise enter it now.
    """
    try:
        lt = _local.lt
    except AttributeError:
        lt = _tls.current()
    if ctx is not lt.ctx:
        aio_co_schedule(ctx, co)  # type: ignore[arg-type]
        return
    self = lt.co
    if self is not None:
        _check_co(co, "aio_co_enter")
        if self is co:
            raise CoroutineError(f"aio_co_enter: coroutine {co.name!r} entering itself")
        self.co_queue_wakeup.append(co)
    else:
        _enter(lt, ctx, co)  # qemu_aio_coroutine_enter, with lt known


def aio_co_wake(co: Coroutine) -> None:
    """Port of ``aio_co_wake``: ``aio_co_enter(co.ctx, co)``.  Any thread."""
    _check_co(co, "aio_co_wake")
    aio_co_enter(co.ctx, co)


def _greenlet_here(lt: Any, ctx: Any) -> Any:
    # For a completion loop that inlines _wake_unless_entered's common case
    # (the Linux AIO walk): the greenlet it runs in, which stays the same
    # while it runs.  False when the inlined case cannot apply -- no
    # coroutine state in this thread (lt None), a loop in a thread that is
    # not ctx's home, the thread backend -- so that every wake takes
    # _wake_unless_entered.  False is no coroutine's _ret.
    if lt is None or lt.ctx is not ctx:
        return False
    greenlet_current = _active.greenlet_current  # type: ignore[union-attr]
    return greenlet_current() if greenlet_current is not None else False


def _wake_unless_entered(co: Coroutine, lt: Any = None) -> None:
    # ``if (!qemu_coroutine_entered(co)) aio_co_wake(co)`` for the I/O
    # engines' completion paths, where ``co`` is known to be a Coroutine:
    # one call instead of five on every request of the coroutine path.
    # ``lt`` is the calling thread's state if the caller has it (a
    # completion walk reads it once for all of its requests).
    # The Linux AIO walk (_walk_ring) inlines the greenlet case below, with
    # the same conditions: a change here goes there too.
    if co.caller is not None:
        return
    if lt is None:
        try:
            lt = _local.lt
        except AttributeError:
            lt = _tls.current()
    ctx = co.ctx
    if ctx is not lt.ctx or lt.co is not None:
        aio_co_enter(ctx, co)
        return
    # aio_co_enter's "enter it now" case.  A suspended coroutine that
    # yields again and woke nobody -- a request's coroutine submitting its
    # next request -- is _enter's first round, inlined; anything else goes
    # on in _enter.
    if co._state != _SUSPENDED or co.scheduled is not None:
        _enter(lt, ctx, co)
        return
    from_ = lt.leader or _leader(lt)
    co.caller = from_
    co._state = _RUNNING
    backend = co._backend
    current = backend.greenlet_current  # type: ignore[union-attr]
    if current is not None and co._ret is current():
        # GreenletBackend.enter's case of a suspended coroutine entered by
        # the greenlet it last yielded to, inlined; the leader enters, so
        # lt.co is None again afterwards.
        lt.co = co
        ret = co._impl.switch()
        lt.co = None
    else:
        try:
            ret = backend.enter(lt, from_, co)  # type: ignore[union-attr]
        except CoroutineError:
            co.caller = None
            co._state = _SUSPENDED
            raise
    if ret is COROUTINE_YIELD and not co.co_queue_wakeup:
        co._state = _SUSPENDED
    else:
        _enter(lt, ctx, co, ret)


def _reschedule_bh(data: tuple[AioContext, Coroutine]) -> None:
    aio_co_schedule(data[0], data[1])


def aio_co_reschedule_self(new_ctx: AioContext) -> None:
    """Port of ``aio_co_reschedule_self``: move the running coroutine to
    ``new_ctx``'s thread.

    Only the thread backend can move a started coroutine to another OS
    thread; with greenlet this raises CoroutineError when the coroutine is
    next entered (DESIGN rule 7: coroutines never change OS thread).
    """
    self = _require_coroutine("aio_co_reschedule_self")
    old_ctx = _current_lt().ctx
    if old_ctx is not new_ctx:
        if old_ctx is None:
            raise CoroutineError("aio_co_reschedule_self: the current thread has no AioContext")
        # Scheduling directly would race: the other thread could enter us
        # before we have yielded here.  A BH in our own context runs only
        # after the yield.
        aio_bh_schedule_oneshot(old_ctx, _reschedule_bh, (new_ctx, self))
        qemu_coroutine_yield()
