# SPDX-License-Identifier: GPL-2.0-or-later
"""Event-loop core: pyaioctx's AioContext against asyncio, in one run.

Cases (each repeated ``--repeat`` times; the best round is reported):

* ``bh-chain``: one BH that reschedules itself N times, driven by
  ``aio_poll(ctx, True)``, against a ``loop.call_soon`` chain of N callbacks.
* ``xthread-bh`` / ``xthread-notify``: the home thread blocks in
  ``aio_poll(ctx, True)``; another thread stamps the time and calls
  ``qemu_bh_schedule`` (latency to the BH callback) or ``aio_notify``
  (latency to ``aio_poll`` returning).  Peer: ``call_soon_threadsafe`` into
  a loop blocked in ``run_forever``.  p50 / p99 latency.
* ``timers-0``: N timers armed to expire now, then dispatched;
  ``timers-spread``: N timers armed at random delays in 0..1 ms.  pyaioctx
  re-arms N pre-created timers with ``timer_mod_ns`` (QEMU's idiom: timers
  are long-lived objects); asyncio uses ``loop.call_later``.  Arming +
  dispatch, callbacks per second.
* ``poll-thread`` / ``poll-process``: an event notifier registered with
  ``io_read`` plus ``io_poll``/``io_poll_ready`` handlers; ``io_poll`` checks
  a "work available" word.  A sender stamps the time, publishes the word and
  sets the notifier, then waits for the home thread's acknowledgement before
  the next round (ping-pong).  Latency to the handler, adaptive polling off
  versus on (``aio_context_set_poll_params(ctx, 32000, 2, 2)``).  The
  sender is another thread of this process (it needs the GIL to publish)
  or a forked process writing shared memory (it does not), the way a guest
  vCPU or the kernel feeds a QEMU iothread.  The process sender spins on a
  shared acknowledgement counter, then waits 15 us (so the home thread is
  idle when work arrives, for about that long) and runs pinned to another
  CPU than the home thread.

Usage::

    python benchmarks/bench_aio.py [--quick] [--repeat R] [--only CASE,...]

Rounds of a case and its peer are interleaved; best-of-R is reported
(highest rate, lowest p50 and p99 separately) along with the spread.
"""

from __future__ import annotations

import argparse
import asyncio
import mmap
import os
import platform
import random
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pyaioctx import (  # noqa: E402
    QEMU_CLOCK_REALTIME,
    SCALE_NS,
    EventNotifier,
    aio_bh_new,
    aio_context_new,
    aio_context_set_poll_params,
    aio_context_unref,
    aio_notify,
    aio_poll,
    aio_set_event_notifier,
    aio_timer_new,
    event_notifier_cleanup,
    event_notifier_init,
    event_notifier_set,
    event_notifier_test_and_clear,
    qemu_bh_delete,
    qemu_bh_schedule,
    timer_free,
    timer_mod_ns,
)

_now = time.perf_counter_ns  # CLOCK_MONOTONIC: comparable across processes


def _pct(sorted_ns: list[int], p: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(len(sorted_ns) * p))] / 1000.0


# --------------------------------------------------------------------------
# BH chain

def bh_chain_pyaioctx(n: int) -> float:
    ctx = aio_context_new()
    cnt = 0

    def cb(_: object) -> None:
        nonlocal cnt
        cnt += 1
        if cnt < n:
            qemu_bh_schedule(bh)

    bh = aio_bh_new(ctx, cb, None)
    t0 = time.perf_counter()
    qemu_bh_schedule(bh)
    while cnt < n:
        aio_poll(ctx, True)
    dt = time.perf_counter() - t0
    qemu_bh_delete(bh)
    aio_context_unref(ctx)
    return n / dt


def bh_chain_asyncio(n: int) -> float:
    loop = asyncio.new_event_loop()
    cnt = 0
    call_soon = loop.call_soon

    def cb() -> None:
        nonlocal cnt
        cnt += 1
        if cnt < n:
            call_soon(cb)
        else:
            loop.stop()

    t0 = time.perf_counter()
    call_soon(cb)
    loop.run_forever()
    dt = time.perf_counter() - t0
    loop.close()
    return n / dt


# --------------------------------------------------------------------------
# Cross-thread wake-up

def _sender(n: int, kick, done: threading.Event, stamp: list) -> None:
    sleep = time.sleep
    for _ in range(n):
        sleep(0.0001)  # let the home thread block again
        done.clear()
        stamp[0] = _now()
        kick()
        done.wait()


def xthread_pyaioctx(n: int, mode: str) -> list[int]:
    ctx = aio_context_new()
    lat: list[int] = []
    stamp = [0]
    done = threading.Event()

    def cb(_: object) -> None:
        lat.append(_now() - stamp[0])
        done.set()

    bh = aio_bh_new(ctx, cb, None)
    if mode == "bh":
        def kick() -> None:
            qemu_bh_schedule(bh)
    else:
        def kick() -> None:
            aio_notify(ctx)
    stop = [False]

    def run() -> None:
        _sender(n, kick, done, stamp)
        stop[0] = True
        aio_notify(ctx)

    t = threading.Thread(target=run)
    t.start()
    if mode == "bh":
        while not stop[0]:
            aio_poll(ctx, True)
    else:
        while not stop[0]:
            aio_poll(ctx, True)
            t1 = _now()
            if stamp[0]:
                lat.append(t1 - stamp[0])
                stamp[0] = 0
                done.set()
    t.join()
    qemu_bh_delete(bh)
    aio_context_unref(ctx)
    return lat[:n]


def xthread_asyncio(n: int) -> list[int]:
    loop = asyncio.new_event_loop()
    lat: list[int] = []
    stamp = [0]
    done = threading.Event()

    def cb() -> None:
        lat.append(_now() - stamp[0])
        done.set()

    def kick() -> None:
        loop.call_soon_threadsafe(cb)

    def run() -> None:
        _sender(n, kick, done, stamp)
        loop.call_soon_threadsafe(loop.stop)

    t = threading.Thread(target=run)
    t.start()
    loop.run_forever()
    t.join()
    loop.close()
    return lat


# --------------------------------------------------------------------------
# Timers

def _delays(n: int, spread_ns: int, seed: int = 1) -> list[int]:
    if not spread_ns:
        return [0] * n
    r = random.Random(seed)
    return [r.randrange(spread_ns) for _ in range(n)]


def timers_pyaioctx(n: int, spread_ns: int) -> float:
    ctx = aio_context_new()
    fired = 0

    def cb(_: object) -> None:
        nonlocal fired
        fired += 1

    timers = [aio_timer_new(ctx, QEMU_CLOCK_REALTIME, SCALE_NS, cb, None) for _ in range(n)]
    delays = _delays(n, spread_ns)
    clock = time.monotonic_ns  # QEMU_CLOCK_REALTIME
    t0 = time.perf_counter()
    now = clock()
    for ts, d in zip(timers, delays):
        timer_mod_ns(ts, now + d)
    while fired < n:
        aio_poll(ctx, True)
    dt = time.perf_counter() - t0
    for ts in timers:
        timer_free(ts)
    aio_context_unref(ctx)
    return n / dt


def timers_asyncio(n: int, spread_ns: int) -> float:
    loop = asyncio.new_event_loop()
    fired = 0

    def cb() -> None:
        nonlocal fired
        fired += 1
        if fired == n:
            loop.stop()

    delays = [d / 1e9 for d in _delays(n, spread_ns)]
    call_later = loop.call_later
    t0 = time.perf_counter()
    for d in delays:
        call_later(d, cb)
    loop.run_forever()
    dt = time.perf_counter() - t0
    loop.close()
    return n / dt


# --------------------------------------------------------------------------
# Adaptive polling

def poll_latency(n: int, polling: bool, sender: str, gap_ns: int = 15_000) -> list[int]:
    """Ping-pong through an event notifier with io_poll; returns latencies (ns).

    The sender process waits ``gap_ns`` after each acknowledgement, so the
    home thread is idle (polling, or blocked in epoll) when the work arrives.
    """
    ctx = aio_context_new()
    if polling:
        aio_context_set_poll_params(ctx, 32000, 2, 2)
    e = EventNotifier()
    event_notifier_init(e, False)
    lat: list[int] = []
    ONE = (1).to_bytes(8, sys.byteorder)

    if sender == "thread":
        word = [0]
        ack = threading.Event()

        def handle() -> None:
            t0 = word[0]
            if t0:
                word[0] = 0
                lat.append(_now() - t0)
                ack.set()

        def io_poll(_: object) -> bool:
            return word[0] != 0

        def send() -> None:
            wfd = e.wfd
            write = os.write
            for _ in range(n):
                ack.wait()
                ack.clear()
                word[0] = _now()
                write(wfd, ONE)

        ack.set()
        th = threading.Thread(target=send)
    else:
        # word[0]: the send time stamp; word[1]: acknowledgements so far.
        # The sender spins on word[1] instead of sleeping on a pipe, so the
        # home thread is idle for about gap_ns, not gap_ns plus a wake-up
        # of the sender (tens of µs on some virtual machines, which would
        # put the gap beyond the 32 µs poll window).
        shm = mmap.mmap(-1, 4096)
        word = memoryview(shm).cast("Q")

        def handle() -> None:
            t0 = word[0]
            if t0:
                word[0] = 0
                lat.append(_now() - t0)
                word[1] += 1

        def io_poll(_: object) -> bool:
            return word[0] != 0

        th = None

    def io_read(en: EventNotifier) -> None:
        event_notifier_test_and_clear(en)
        handle()

    def io_poll_ready(_: object) -> None:
        handle()

    aio_set_event_notifier(ctx, e, False, io_read, io_poll, io_poll_ready)
    # Home thread and sender process on different CPUs, when there are two:
    # a spinning sender must not take the poller's CPU.
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pin = (cpus[0], cpus[1]) if sender == "process" and len(cpus) >= 2 else None

    if th is not None:
        th.start()
        while len(lat) < n:
            aio_poll(ctx, True)
        th.join()
    else:
        pid = os.fork()
        if pid == 0:  # the sender process
            try:
                if pin:
                    os.sched_setaffinity(0, {pin[1]})
                wfd = e.wfd
                for i in range(n):
                    while word[1] < i:
                        pass
                    # Let the home thread go idle (poll or block) first.
                    t = _now() + gap_ns
                    while _now() < t:
                        pass
                    word[0] = _now()
                    os.write(wfd, ONE)
            finally:
                os._exit(0)
        if pin:
            saved = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {pin[0]})
        try:
            while len(lat) < n:
                aio_poll(ctx, True)
        finally:
            if pin:
                os.sched_setaffinity(0, saved)
        os.waitpid(pid, 0)
        word.release()
        shm.close()
    aio_set_event_notifier(ctx, e, False, None)
    event_notifier_cleanup(e)
    aio_context_unref(ctx)
    return lat


# --------------------------------------------------------------------------
# Driver

def machine() -> str:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"nproc={os.cpu_count()} cpu={model!r} kernel={platform.release()} "
            f"python={platform.python_version()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller counts, 3 rounds")
    ap.add_argument("--repeat", type=int, default=None, help="rounds per case (default 5)")
    ap.add_argument("--only", default="", help="comma-separated case prefixes")
    args = ap.parse_args()
    q = args.quick
    repeat = args.repeat or (3 if q else 5)
    n_bh = 50_000 if q else 200_000
    n_x = 500 if q else 2000
    n_t = 2_000 if q else 10_000
    n_p = 500 if q else 3000
    only = [s for s in args.only.split(",") if s]

    def want(name: str) -> bool:
        return not only or any(name.startswith(o) for o in only)

    print(f"# {machine()}; repeat={repeat}")
    rows = []

    def rate_row(case: str, n: int, ours, peer, peer_name: str) -> None:
        # Rounds interleaved, so both sides see the same background load.
        r_ours, r_peer = [], []
        for _ in range(repeat):
            r_ours.append(ours())
            r_peer.append(peer())
        b_ours, b_peer = max(r_ours), max(r_peer)
        ratio = b_ours / b_peer
        rows.append((case, n, f"{b_ours:,.0f}/s", f"{b_peer:,.0f}/s", peer_name, f"{ratio:.2f}x",
                     "yes" if ratio >= 1.0 else "no"))
        spread = lambda r: f"{min(r):,.0f}..{max(r):,.0f}"  # noqa: E731
        print(f"{case:16s} n={n:<7d} pyaioctx {b_ours:12,.0f}/s  {peer_name} {b_peer:12,.0f}/s"
              f"  ratio {ratio:.2f}x   (rounds: {spread(r_ours)} vs {spread(r_peer)})", flush=True)

    def lat_row(case: str, n: int, ours, peer, ours_name: str, peer_name: str) -> None:
        o50s, o99s, p50s, p99s = [], [], [], []
        for _ in range(repeat):  # interleaved, as above
            for fn, a50, a99 in ((ours, o50s, o99s), (peer, p50s, p99s)):
                lat = sorted(fn())
                a50.append(_pct(lat, 0.50))
                a99.append(_pct(lat, 0.99))
        o50, o99, op = min(o50s), min(o99s), o50s
        p50, p99, pp = min(p50s), min(p99s), p50s
        ratio = p50 / o50  # >1: ours is faster
        rows.append((case, n, f"p50 {o50:.1f} / p99 {o99:.1f} us", f"p50 {p50:.1f} / p99 {p99:.1f} us",
                     peer_name, f"{ratio:.2f}x", "yes" if ratio >= 1.0 else "no"))
        print(f"{case:16s} n={n:<7d} {ours_name} p50 {o50:7.1f} us p99 {o99:7.1f} us | "
              f"{peer_name} p50 {p50:7.1f} us p99 {p99:7.1f} us | speed-up {ratio:.2f}x  "
              f"(p50 rounds: {min(op):.1f}..{max(op):.1f} vs {min(pp):.1f}..{max(pp):.1f})",
              flush=True)

    if want("bh-chain"):
        rate_row("bh-chain", n_bh, lambda: bh_chain_pyaioctx(n_bh),
                 lambda: bh_chain_asyncio(n_bh), "asyncio call_soon")
    if want("xthread-bh"):
        lat_row("xthread-bh", n_x, lambda: xthread_pyaioctx(n_x, "bh"),
                lambda: xthread_asyncio(n_x), "qemu_bh_schedule", "asyncio call_soon_threadsafe")
    if want("xthread-notify"):
        lat_row("xthread-notify", n_x, lambda: xthread_pyaioctx(n_x, "notify"),
                lambda: xthread_asyncio(n_x), "aio_notify", "asyncio call_soon_threadsafe")
    if want("timers-0"):
        rate_row("timers-0", n_t, lambda: timers_pyaioctx(n_t, 0),
                 lambda: timers_asyncio(n_t, 0), "asyncio call_later")
    if want("timers-spread"):
        rate_row("timers-spread", n_t, lambda: timers_pyaioctx(n_t, 1_000_000),
                 lambda: timers_asyncio(n_t, 1_000_000), "asyncio call_later")
    if want("poll-thread"):
        lat_row("poll-thread", n_p, lambda: poll_latency(n_p, True, "thread"),
                lambda: poll_latency(n_p, False, "thread"), "polling on", "polling off")
    if want("poll-process"):
        lat_row("poll-process", n_p, lambda: poll_latency(n_p, True, "process"),
                lambda: poll_latency(n_p, False, "process"), "polling on", "polling off")

    print()
    print("| case | n | pyaioctx | peer | peer is | ratio (>1: pyaioctx faster) | target met |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")


if __name__ == "__main__":
    main()
