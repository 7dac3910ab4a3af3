# SPDX-License-Identifier: GPL-2.0-or-later
"""Coroutine switch and lifecycle costs, per backend, against references.

Measured in one run, best of ``--repeat`` rounds each:

* enter+yield round trips per second (QEMU's /perf/yield): the caller
  enters a coroutine that loops on ``qemu_coroutine_yield()``;
  - greenlet backend;
  - thread backend with the per-thread binary-semaphore hand-off (default);
  - thread backend with coroutine-gthread's Condition broadcast;
* references: a bare greenlet switch round trip (``g.switch()`` to a
  greenlet that switches straight back), and an asyncio task switch
  (``await asyncio.sleep(0)`` in one task);
* create+run+terminate per second (QEMU's /perf/lifecycle): create an
  empty coroutine and enter it until it returns.

Usage::

    python benchmarks/bench_coroutine.py [--yields N] [--thread-yields N]
                                         [--lifecycle N] [--repeat R] [--markdown]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import pyaioctx.coroutine as C  # noqa: E402
from pyaioctx.coroutine import (  # noqa: E402
    qemu_coroutine_create,
    qemu_coroutine_enter,
    qemu_coroutine_yield,
)


def best(fn: Callable[[int], float], n: int, repeat: int) -> float:
    """Best (lowest) seconds per operation over ``repeat`` runs of ``fn(n)``."""
    return min(fn(n) for _ in range(repeat)) / n


# References ------------------------------------------------------------------

def bare_greenlet(n: int) -> float:
    from greenlet import getcurrent, greenlet

    main = getcurrent()

    def body() -> None:
        sw = main.switch
        while True:
            sw()

    g = greenlet(body)
    sw = g.switch
    t = time.perf_counter()
    for _ in range(n):
        sw()
    dt = time.perf_counter() - t
    g.throw()  # finish it
    return dt


def asyncio_switch(n: int) -> float:
    async def task() -> float:
        sleep = asyncio.sleep
        t = time.perf_counter()
        for _ in range(n):
            await sleep(0)
        return time.perf_counter() - t

    return asyncio.run(task())


# pyaioctx ----------------------------------------------------------------------

def _yield_loop(counter: list) -> None:
    y = qemu_coroutine_yield
    while counter[0] > 0:
        counter[0] -= 1
        y()


def enter_yield(n: int) -> float:
    counter = [n]
    co = qemu_coroutine_create(_yield_loop, counter)
    enter = qemu_coroutine_enter
    t = time.perf_counter()
    while counter[0] > 0:
        enter(co)
    dt = time.perf_counter() - t
    enter(co)  # let it terminate
    return dt


def _empty(_: object) -> None:
    pass


def lifecycle(n: int) -> float:
    create, enter = qemu_coroutine_create, qemu_coroutine_enter
    t = time.perf_counter()
    for _ in range(n):
        enter(create(_empty, None))
    return time.perf_counter() - t


def use(backend: object, label: str) -> None:
    C._install(backend, f"benchmark: {label}")  # type: ignore[arg-type]


def machine() -> str:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {model}, "
            f"Python {platform.python_version()} ({platform.python_implementation()}), "
            f"{platform.system()} {platform.release()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--yields", type=int, default=200_000, help="round trips (greenlet, references)")
    ap.add_argument("--thread-yields", type=int, default=20_000, help="round trips (thread backend)")
    ap.add_argument("--lifecycle", type=int, default=100_000,
                    help="coroutines created+run (greenlet); thread backend uses a tenth")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = ap.parse_args()

    have_greenlet = "greenlet" in C.available_backends()
    rows: list[tuple[str, str, float]] = []  # (what, variant, seconds per op)

    if have_greenlet:
        rows.append(("switch round trip", "bare greenlet (reference)",
                     best(bare_greenlet, args.yields, args.repeat)))
    rows.append(("switch round trip", "asyncio sleep(0) (reference)",
                 best(asyncio_switch, args.yields, args.repeat)))

    backends: list[tuple[str, object, int, int]] = []
    if have_greenlet:
        backends.append(("greenlet", C._backend_object("greenlet"), args.yields, args.lifecycle))
    lock_b = C.ThreadBackend(handoff="lock")
    cond_b = C.ThreadBackend(handoff="condition")
    backends.append(("thread, per-thread lock hand-off", lock_b, args.thread_yields,
                     args.lifecycle // 10))
    backends.append(("thread, Condition broadcast hand-off", cond_b, args.thread_yields,
                     args.lifecycle // 10))

    prev = C.get_backend()
    try:
        for label, b, ny, nl in backends:
            use(b, label)
            rows.append(("enter+yield round trip", label, best(enter_yield, ny, args.repeat)))
            rows.append(("create+run+terminate", label, best(lifecycle, nl, args.repeat)))
    finally:
        C._install(C._backend_object(prev.name), prev.reason)
        lock_b.cleanup()
        cond_b.cleanup()

    bare = next((s for w, v, s in rows if v.startswith("bare greenlet")), None)
    print(f"# machine: {machine()}")
    print(f"# command: python benchmarks/bench_coroutine.py {' '.join(sys.argv[1:])}".rstrip())
    if args.markdown:
        print("| measurement | variant | ops/s | us/op | vs bare greenlet |")
        print("|---|---|---:|---:|---:|")
    else:
        print(f"{'measurement':24} {'variant':40} {'ops/s':>12} {'us/op':>9} {'vs bare':>8}")
    for what, variant, s in rows:
        ratio = f"{s / bare:.2f}x" if bare and "round trip" in what else "-"
        if args.markdown:
            print(f"| {what} | {variant} | {1 / s:,.0f} | {s * 1e6:.2f} | {ratio} |")
        else:
            print(f"{what:24} {variant:40} {1 / s:12,.0f} {s * 1e6:9.2f} {ratio:>8}")


if __name__ == "__main__":
    main()
