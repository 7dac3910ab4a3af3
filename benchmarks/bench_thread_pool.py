# SPDX-License-Identifier: GPL-2.0-or-later
"""Thread pool round trip: pyaioctx's thread_pool_submit_aio vs asyncio.

Both sides run the same null work function (``return 0``) on worker
threads and get the result back to the event-loop thread:

* pyaioctx: ``thread_pool_submit_aio(pool, func, arg, cb, opaque)``; the
  completion callback records the latency and submits the next request, so
  exactly ``depth`` requests are in flight; the loop is ``aio_poll(ctx, True)``.
* asyncio: ``depth`` tasks, each awaiting
  ``loop.run_in_executor(executor, func, arg)`` in a loop, with a
  ``ThreadPoolExecutor(max_workers=64)`` (the pool's default maximum).

Reports throughput (requests/s) and latency (submit to callback: mean, p50,
p99) for each in-flight depth.  Usage::

    python benchmarks/bench_thread_pool.py [--requests N] [--depths 1,8,64]
                                           [--repeat R] [--workers W]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import pyaioctx  # noqa: E402
from pyaioctx import (  # noqa: E402
    aio_context_new,
    aio_context_unref,
    aio_get_thread_pool,
    aio_poll,
    thread_pool_submit_aio,
)


def null_work(arg: object) -> int:
    return 0


def _stats(name: str, depth: int, n: int, elapsed: float, lat: list[float]) -> dict:
    lat.sort()
    return {
        "impl": name,
        "depth": depth,
        "requests": n,
        "ops_per_s": n / elapsed,
        "mean_us": statistics.fmean(lat) * 1e6,
        "p50_us": lat[len(lat) // 2] * 1e6,
        "p99_us": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1e6,
    }


def bench_pyaioctx(n: int, depth: int, workers: int) -> dict:
    ctx = aio_context_new()
    pool = aio_get_thread_pool(ctx)
    pool.set_params(0, workers)
    clock = time.perf_counter
    lat: list[float] = []
    state = [0, 0]  # submitted, completed

    def cb(t0: float, ret: int) -> None:
        lat.append(clock() - t0)
        state[1] += 1
        if state[0] < n:
            state[0] += 1
            thread_pool_submit_aio(pool, null_work, None, cb, clock())

    # Warm up: start the workers.
    warm = [0]

    def warm_cb(_o: object, _r: int) -> None:
        warm[0] += 1

    for _ in range(depth):
        thread_pool_submit_aio(pool, null_work, None, warm_cb, None)
    while warm[0] < depth:
        aio_poll(ctx, True)

    start = clock()
    for _ in range(min(depth, n)):
        state[0] += 1
        thread_pool_submit_aio(pool, null_work, None, cb, clock())
    while state[1] < n:
        aio_poll(ctx, True)
    elapsed = clock() - start
    aio_context_unref(ctx)
    return _stats("pyaioctx thread_pool_submit_aio", depth, n, elapsed, lat)


def bench_asyncio(n: int, depth: int, workers: int) -> dict:
    clock = time.perf_counter
    lat: list[float] = []

    async def main() -> float:
        loop = asyncio.get_running_loop()
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as ex:
            await asyncio.gather(*(loop.run_in_executor(ex, null_work, None)
                                   for _ in range(depth)))
            remaining = [n]

            async def task() -> None:
                while remaining[0] > 0:
                    remaining[0] -= 1
                    t0 = clock()
                    await loop.run_in_executor(ex, null_work, None)
                    lat.append(clock() - t0)

            start = clock()
            await asyncio.gather(*(task() for _ in range(depth)))
            return clock() - start

    elapsed = asyncio.run(main())
    return _stats("asyncio run_in_executor", depth, n, elapsed, lat)


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"nproc={os.cpu_count()}, {model}, Python {platform.python_version()} "
            f"({platform.python_implementation()}), {platform.system()} {platform.release()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=50_000)
    ap.add_argument("--depths", default="1,8,64")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs per configuration; the best throughput is reported")
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--only", choices=("pyaioctx", "asyncio"))
    args = ap.parse_args()
    print(f"# {machine()}; pyaioctx {pyaioctx.__version__}; "
          f"{args.requests} requests per run, best of {args.repeat}")
    print(f"{'impl':34} {'depth':>5} {'ops/s':>10} {'mean us':>9} {'p50 us':>8} {'p99 us':>8}")
    benches = []
    if args.only != "asyncio":
        benches.append(bench_pyaioctx)
    if args.only != "pyaioctx":
        benches.append(bench_asyncio)
    for depth in (int(d) for d in args.depths.split(",")):
        for bench in benches:
            best = max((bench(args.requests, depth, args.workers) for _ in range(args.repeat)),
                       key=lambda r: r["ops_per_s"])
            print(f"{best['impl']:34} {best['depth']:>5} {best['ops_per_s']:>10.0f} "
                  f"{best['mean_us']:>9.1f} {best['p50_us']:>8.1f} {best['p99_us']:>8.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
