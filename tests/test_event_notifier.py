# SPDX-License-Identifier: GPL-2.0-or-later
"""EventNotifier tests (QEMU's util/event_notifier-posix.c).

Every case runs twice: on an eventfd, and on the pipe QEMU falls back to
where eventfd is missing (forced by hiding eventfd from the module).
"""

from __future__ import annotations

import errno
import os
import select
import threading
import time

import pytest

import pyaioctx.event_notifier as en_mod
from pyaioctx import (
    EventNotifier,
    event_notifier_cleanup,
    event_notifier_get_fd,
    event_notifier_init,
    event_notifier_set,
    event_notifier_test_and_clear,
)


@pytest.fixture(params=["eventfd", "pipe"])
def kind(request, monkeypatch):
    if request.param == "pipe":
        if not hasattr(en_mod, "_HAVE_EVENTFD"):
            pytest.skip("the pipe fallback cannot be forced on this build")
        monkeypatch.setattr(en_mod, "_HAVE_EVENTFD", False)
    elif not hasattr(os, "eventfd"):
        pytest.skip("no eventfd on this platform")
    return request.param


@pytest.fixture
def notifier(kind):
    e = EventNotifier()
    assert event_notifier_init(e, False) == 0
    yield e
    event_notifier_cleanup(e)


def readable(fd: int, timeout: float = 0.0) -> bool:
    r, _, _ = select.select([fd], [], [], timeout)
    return bool(r)


def test_init_inactive(notifier):
    """A notifier initialised inactive is not set and its fd is not readable."""
    fd = event_notifier_get_fd(notifier)
    assert isinstance(fd, int) and fd >= 0
    assert not readable(fd)
    assert event_notifier_test_and_clear(notifier) is False


def test_init_active(kind):
    """event_notifier_init(e, True) starts out set; test_and_clear clears it."""
    e = EventNotifier()
    assert event_notifier_init(e, True) == 0
    try:
        assert readable(event_notifier_get_fd(e))
        assert event_notifier_test_and_clear(e) is True
        assert event_notifier_test_and_clear(e) is False
        assert not readable(event_notifier_get_fd(e))
    finally:
        event_notifier_cleanup(e)


def test_set_and_test_and_clear(notifier):
    """set makes the fd readable; test_and_clear reports and clears it once."""
    fd = event_notifier_get_fd(notifier)
    assert event_notifier_set(notifier) == 0
    assert readable(fd)
    assert event_notifier_test_and_clear(notifier) is True
    assert not readable(fd)
    assert event_notifier_test_and_clear(notifier) is False


def test_sets_coalesce(notifier):
    """Several sets before a test_and_clear are one event."""
    for _ in range(5):
        assert event_notifier_set(notifier) == 0
    assert event_notifier_test_and_clear(notifier) is True
    assert event_notifier_test_and_clear(notifier) is False


def test_set_never_blocks(notifier):
    """event_notifier_set never blocks, however often it is called without a
    test_and_clear (a full pipe is already signalled)."""
    t0 = time.monotonic()
    for _ in range(70_000):  # more than a default 64 KiB pipe holds
        assert event_notifier_set(notifier) == 0
    assert time.monotonic() - t0 < 10
    assert event_notifier_test_and_clear(notifier) is True
    assert event_notifier_test_and_clear(notifier) is False
    assert not readable(event_notifier_get_fd(notifier))


def test_set_from_other_thread_wakes_select(notifier):
    """A set from another thread wakes a waiter on the fd."""
    fd = event_notifier_get_fd(notifier)

    def setter() -> None:
        time.sleep(0.05)
        event_notifier_set(notifier)

    t = threading.Thread(target=setter)
    t.start()
    assert readable(fd, timeout=5.0)
    t.join()
    assert event_notifier_test_and_clear(notifier)


def test_no_lost_wakeup_under_concurrency(notifier):
    """Producer/consumer over a notifier: an item published before a set is
    always seen by the consumer that clears the notifier after it."""
    fd = event_notifier_get_fd(notifier)
    items: list = []
    lock = threading.Lock()
    nthreads, per_thread = 4, 300

    def producer(tid: int) -> None:
        for i in range(per_thread):
            with lock:
                items.append((tid, i))
            event_notifier_set(notifier)

    threads = [threading.Thread(target=producer, args=(t,)) for t in range(nthreads)]
    for t in threads:
        t.start()
    consumed = []
    deadline = time.monotonic() + 10
    while len(consumed) < nthreads * per_thread:
        assert time.monotonic() < deadline, "a wake-up was lost"
        if not readable(fd, timeout=1.0):
            continue
        event_notifier_test_and_clear(notifier)
        with lock:
            consumed.extend(items)
            items.clear()
    for t in threads:
        t.join()
    assert sorted(consumed) == sorted((t, i) for t in range(nthreads) for i in range(per_thread))


def test_cleanup_closes_fd(kind):
    """cleanup closes the fd(s) and leaves the notifier uninitialised; a
    second cleanup is harmless; set/test_and_clear on it fail softly."""
    e = EventNotifier()
    assert event_notifier_init(e, False) == 0
    fd = event_notifier_get_fd(e)
    event_notifier_cleanup(e)
    assert event_notifier_get_fd(e) == -1
    with pytest.raises(OSError) as exc:
        os.fstat(fd)
    assert exc.value.errno == errno.EBADF
    event_notifier_cleanup(e)
    assert event_notifier_set(e) < 0
    assert event_notifier_test_and_clear(e) is False


def test_reinit_after_cleanup(kind):
    """A cleaned-up notifier can be initialised again."""
    e = EventNotifier()
    for _ in range(3):
        assert event_notifier_init(e, False) == 0
        assert event_notifier_set(e) == 0
        assert event_notifier_test_and_clear(e)
        event_notifier_cleanup(e)


def test_uses_eventfd_or_pipe(notifier, kind):
    """eventfd where available (one fd), a pipe otherwise."""
    fd = event_notifier_get_fd(notifier)
    if kind == "eventfd":
        assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    else:
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("pipe:")


def test_bad_argument_raises_type_error():
    """Passing something that is not an EventNotifier raises TypeError."""
    with pytest.raises(TypeError):
        event_notifier_set("not a notifier")
    with pytest.raises(TypeError):
        event_notifier_test_and_clear(42)
