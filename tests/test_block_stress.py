# SPDX-License-Identifier: GPL-2.0-or-later
"""Reliability tests of the block layer (marked slow; CI runs them).

Soak: mixed reads, writes and flushes at queue depth 32 through blkdebug
with random injected faults and random bdrv_aio_cancel_async calls: a
million requests per backend in that backend's own tox environment, a short
run of every backend in the others.
Invariants: every request completes exactly once; every acknowledged write is
on disk; nothing (thread, fd) is left behind after close.

A coroutine soak: the same mix from QD 32 coroutines on bdrv_co_preadv /
bdrv_co_pwritev / bdrv_co_flush (a million requests in a backend's own
environment), checked against the model as each read returns.

Crash consistency: a child process writes and flushes, prints "flushed" and
is SIGKILLed; every flushed byte must be on disk.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from pyaioctx import (
    QEMUIOVector,
    aio_get_thread_pool,
    aio_poll,
    qemu_coroutine_create,
    qemu_coroutine_enter,
    qemu_get_aio_context,
)
from pyaioctx.iov import qemu_memalign
from pyaioctx.block import (
    BDRV_O_RDWR,
    bdrv_aio_flush,
    bdrv_aio_preadv,
    bdrv_aio_pwritev,
    bdrv_co_flush,
    bdrv_co_preadv,
    bdrv_co_pwritev,
    bdrv_open,
)
from test_block_fixtures import aio_backend, make_image  # noqa: F401

pytestmark = pytest.mark.slow

SLOT = 8192          # each slot has at most one request in flight
NSLOTS = 128
ALIGN = 4096         # the direct path's granularity on every file system here
QD = 32
# The full soak, a million requests, runs in each I/O backend's own tox
# environment (PYAIOCTX_TEST_AIO set: one backend's configurations); the
# coroutine-backend environments, which run every backend, run a short one.
FULL = bool(os.environ.get("PYAIOCTX_TEST_AIO"))
MAX_REQUESTS = 1_000_000 if FULL else 30_000
BUDGET_S = 900.0 if FULL else 12.0


def _live_threads() -> set[str]:
    # Coroutine-backend threads are pooled by design; count everything else.
    return {t.name for t in threading.enumerate() if not t.name.startswith("pyaioctx-co-")}


@pytest.mark.timeout(BUDGET_S + 120)
def test_soak_qd32_faults_and_cancel(disk_dir, aio_backend):
    """Mixed reads, writes and flushes at QD 32 through blkdebug faults, with
    random bdrv_aio_cancel_async calls.  Most reads and writes are aligned,
    in aligned buffers, and reach the I/O engine unchanged; a fifth are
    unaligned and go through bounce buffers and serialised read-modify-write,
    so both kinds, and their interplay, are soaked together."""
    path = disk_dir / "img"
    model = bytearray(make_image(path, SLOT * NSLOTS))
    ctx = qemu_get_aio_context()
    pool = aio_get_thread_pool(ctx)
    old_idle = pool.idle_timeout
    pool.idle_timeout = 0.2
    # warm up the per-context engine so the baseline includes it
    bdrv_open(str(path), aio_backend.options(), BDRV_O_RDWR).close()
    deadline = time.monotonic() + 5
    while len(_live_threads()) > 1 and time.monotonic() < deadline:
        aio_poll(ctx, False)
        time.sleep(0.05)
    fds0, threads0 = set(os.listdir("/proc/self/fd")), _live_threads()

    rules = [{"event": "read_aio", "iotype": "read", "errno": "EIO", "probability": 0.02},
             {"event": "write_aio", "iotype": "write", "errno": "ENOSPC", "probability": 0.02},
             {"event": "flush_to_disk", "iotype": "flush", "errno": "EIO", "probability": 0.05,
              "immediately": True}]
    bs = bdrv_open(None, {"driver": "blkdebug", "seed": 99, "inject-error": rules,
                          "image": aio_backend.options(filename=str(path))}, BDRV_O_RDWR)
    rnd = random.Random(5)
    free = list(range(NSLOTS))
    # One aligned buffer per slot: a slot's requests never overlap in time.
    bufs = [memoryview(qemu_memalign(ALIGN, SLOT)) for _ in range(NSLOTS)]
    completions = bytearray(MAX_REQUESTS)
    inflight = [0]
    submitted = 0
    errors = {"EIO": 0, "ENOSPC": 0}
    kinds = {"flush": 0, "aligned": 0, "unaligned": 0}
    start = time.monotonic()

    def take_slot() -> int:
        i = rnd.randrange(len(free))
        free[i], free[-1] = free[-1], free[i]
        return free.pop()

    def submit() -> None:
        nonlocal submitted
        rid = submitted
        submitted += 1
        r = rnd.random()
        if r < 0.05:
            kinds["flush"] += 1

            def fcb(opaque, ret):
                completions[rid] += 1
                if ret < 0:
                    assert ret == -errno.EIO, ret
                inflight[0] -= 1
            acb = bdrv_aio_flush(bs, fcb, None)
        else:
            slot = take_slot()
            base = slot * SLOT
            if rnd.random() < 0.8:
                kinds["aligned"] += 1
                k = rnd.randrange(SLOT // ALIGN)
                lo = base + k * ALIGN
                n = ALIGN * rnd.randrange(1, SLOT // ALIGN - k + 1)
                mv = bufs[slot][:n]
            else:
                kinds["unaligned"] += 1
                lo = base + rnd.randrange(0, SLOT // 2)
                n = rnd.randrange(1, SLOT - (lo - base))
                mv = memoryview(bytearray(n))
            if r < 0.525:
                data = rnd.randbytes(n)
                mv[:] = data

                def wcb(opaque, ret, lo=lo, data=data, slot=slot):
                    completions[rid] += 1
                    if ret == 0:
                        model[lo:lo + len(data)] = data
                    else:
                        assert ret == -errno.ENOSPC, ret
                        errors["ENOSPC"] += 1
                    free.append(slot)
                    inflight[0] -= 1
                acb = bdrv_aio_pwritev(bs, lo, QEMUIOVector(mv), 0, wcb, None)
            else:
                def rcb(opaque, ret, lo=lo, mv=mv, slot=slot):
                    completions[rid] += 1
                    if ret == 0:
                        assert mv == model[lo:lo + len(mv)], (lo, len(mv))
                    else:
                        assert ret == -errno.EIO, ret
                        errors["EIO"] += 1
                    free.append(slot)
                    inflight[0] -= 1
                acb = bdrv_aio_preadv(bs, lo, QEMUIOVector(mv), 0, rcb, None)
        inflight[0] += 1
        if rnd.random() < 0.1:
            acb.cancel_async()  # cannot stop a started request: real result reported

    try:
        while submitted < MAX_REQUESTS and time.monotonic() - start < BUDGET_S:
            while inflight[0] < QD and submitted < MAX_REQUESTS:
                submit()
            aio_poll(ctx, True)
        bs.drain()
        assert inflight[0] == 0
        # Every request completed exactly once.
        assert completions.count(1) == submitted and completions.count(0) == MAX_REQUESTS - submitted
    finally:
        bs.close()
    print(f"\nsoak[{aio_backend.name}]: {submitted} requests in "
          f"{time.monotonic() - start:.1f}s, {kinds}, injected {errors}")
    assert submitted == MAX_REQUESTS or (not FULL and submitted > 1000)
    assert errors["EIO"] and errors["ENOSPC"] and kinds["aligned"] and kinds["unaligned"]
    assert path.read_bytes() == model
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (_live_threads() - threads0):
        aio_poll(ctx, False)
        time.sleep(0.05)
    pool.idle_timeout = old_idle
    del bufs
    assert set(os.listdir("/proc/self/fd")) - fds0 == set()
    assert _live_threads() - threads0 == set()


CO_MAX_REQUESTS = 1_000_000 if FULL else 20_000
CO_BUDGET_S = 600.0 if FULL else 12.0


@pytest.mark.timeout(CO_BUDGET_S + 120)
def test_soak_coroutines_qd32(disk_dir, aio_backend):
    """QD 32 coroutines looping on bdrv_co_preadv/pwritev/flush: aligned
    requests in aligned buffers (the coroutine direct path) mixed with
    unaligned ones (bounce buffers, serialised read-modify-write).  Every
    request returns once, with the model's data; nothing is left in flight
    or behind after close."""
    path = disk_dir / "img"
    model = bytearray(make_image(path, SLOT * NSLOTS))
    ctx = qemu_get_aio_context()
    bdrv_open(str(path), aio_backend.options(), BDRV_O_RDWR).close()  # warm the engine
    fds0 = set(os.listdir("/proc/self/fd"))
    bs = bdrv_open(str(path), aio_backend.options(), BDRV_O_RDWR)
    rnd = random.Random(7)
    per_co = NSLOTS // QD
    issued = [0] * QD
    returned = [0] * QD
    kinds = {"flush": 0, "aligned": 0, "unaligned": 0}
    total = [0]
    ended: list = []
    start = time.monotonic()

    def worker(i: int) -> None:
        buf = memoryview(qemu_memalign(ALIGN, SLOT))
        try:
            while total[0] < CO_MAX_REQUESTS and time.monotonic() - start < CO_BUDGET_S:
                total[0] += 1
                r = rnd.random()
                issued[i] += 1
                if r < 0.02:
                    kinds["flush"] += 1
                    ret = bdrv_co_flush(bs)
                    returned[i] += 1
                    assert ret == 0, ret
                    continue
                base = (i * per_co + rnd.randrange(per_co)) * SLOT
                if r < 0.82:
                    kinds["aligned"] += 1
                    k = rnd.randrange(SLOT // ALIGN)
                    lo = base + k * ALIGN
                    n = ALIGN * rnd.randrange(1, SLOT // ALIGN - k + 1)
                    mv = buf[:n]
                else:
                    kinds["unaligned"] += 1
                    lo = base + rnd.randrange(0, SLOT // 2)
                    n = rnd.randrange(1, SLOT - (lo - base))
                    mv = memoryview(bytearray(n))
                if r < 0.5:
                    data = (total[0].to_bytes(4, "little") * (n // 4 + 1))[:n]
                    mv[:] = data
                    ret = bdrv_co_pwritev(bs, lo, n, QEMUIOVector(mv))
                    returned[i] += 1
                    assert ret == 0, ret
                    model[lo:lo + n] = data
                else:
                    ret = bdrv_co_preadv(bs, lo, n, QEMUIOVector(mv))
                    returned[i] += 1
                    assert ret == 0, ret
                    assert mv == model[lo:lo + n], (lo, n)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            ended.append(e)
        else:
            ended.append(None)

    try:
        for i in range(QD):
            qemu_coroutine_enter(qemu_coroutine_create(worker, i))
        while len(ended) < QD:
            aio_poll(ctx, True)
        assert ended == [None] * QD, [e for e in ended if e is not None][:1]
        assert issued == returned
        assert bs.in_flight == 0 and not bs.tracked_requests
    finally:
        bs.close()
    print(f"\nco soak[{aio_backend.name}]: {total[0]} requests in "
          f"{time.monotonic() - start:.1f}s, {kinds}")
    assert total[0] == CO_MAX_REQUESTS or (not FULL and total[0] > 1000)
    assert all(kinds.values())
    assert path.read_bytes() == model
    assert set(os.listdir("/proc/self/fd")) - fds0 == set()


_CHILD = textwrap.dedent("""
    import os, sys
    from pyaioctx.block import BDRV_O_RDWR, bdrv_open
    path, aio, direct = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    bs = bdrv_open(path, {"aio": aio, "cache.direct": direct}, BDRV_O_RDWR)
    i = 0
    while True:
        data = bytes([(i % 250) + 1]) * 3000
        bs.write((i * 3000) % (1 << 20), data)
        bs.flush()
        print("flushed", i, flush=True)
        i += 1
""")


def test_crash_consistency_sigkill_after_flush(disk_dir, aio_backend):
    path = disk_dir / "img"
    make_image(path, 1 << 20, bytes(1 << 20))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    p = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), aio_backend.aio,
                          "1" if aio_backend.direct else "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    last = -1
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            last = int(line.split()[1])
            if last >= 20:
                os.kill(p.pid, signal.SIGKILL)  # right after a flush was acknowledged
                break
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
    assert last >= 20, p.stderr.read()
    content = path.read_bytes()
    for i in range(last + 1):
        off = (i * 3000) % (1 << 20)
        assert content[off:off + 3000] == bytes([(i % 250) + 1]) * 3000, i
