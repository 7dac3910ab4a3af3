# SPDX-License-Identifier: GPL-2.0-or-later
"""Per-request cost of the generic block layer, on ``null-co``.

``null-co`` does no I/O, so what is measured is the block layer itself:
argument checks, request checks, tracking, accounting, the coroutine that
runs each request and (callback path) the BH that delivers its completion.

Two paths, each at queue depth 1, 32 and 128, 4 KiB reads:

* callback: ``bdrv_aio_preadv``; each completion callback submits the next
  request (what ``qemu-img bench`` does), the main loop runs ``aio_poll``.
* coroutine: ``depth`` coroutines, each calling ``bdrv_co_preadv`` in a
  loop; the main loop polls until all of them finished.

Reported: requests per second (wall clock) and CPU microseconds per request
(``time.process_time``), best of ``--repeat`` runs, since other processes
on the machine add noise.  ``--write-results`` replaces the generated table of
the "## Block layer (null-co)" section of benchmarks/RESULTS.md (between its
markers), keeping the text around it.  ``--tree DIR`` imports
pyaioctx from another checkout (to compare before and after a change).

    python benchmarks/bench_block.py [--count N] [--repeat R] [--write-results]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Block layer (null-co)"


def bench_callback(q, bs, n: int, depth: int) -> tuple[float, float]:
    ctx = q.qemu_get_aio_context()
    qiov = q.QEMUIOVector(bytearray(4096))
    state = {"left": n, "in_flight": 0}
    aio_preadv = q.bdrv_aio_preadv

    def cb(_opaque, ret):
        if ret < 0:
            raise RuntimeError(f"read failed: {ret}")
        state["in_flight"] -= 1
        if state["left"] > 0:
            state["left"] -= 1
            state["in_flight"] += 1
            aio_preadv(bs, 0, qiov, 0, cb, None)

    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(min(depth, n)):
        state["left"] -= 1
        state["in_flight"] += 1
        aio_preadv(bs, 0, qiov, 0, cb, None)
    while state["in_flight"]:
        q.aio_poll(ctx, True)
    return time.perf_counter() - t0, time.process_time() - c0


def bench_coroutine(q, bs, n: int, depth: int) -> tuple[float, float]:
    ctx = q.qemu_get_aio_context()
    co_preadv = q.bdrv_co_preadv
    running = [0]
    per_co = n // depth

    def entry(_):
        qiov = q.QEMUIOVector(bytearray(4096))
        for _ in range(per_co):
            if co_preadv(bs, 0, 4096, qiov, 0) < 0:
                raise RuntimeError("read failed")
        running[0] -= 1

    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(depth):
        running[0] += 1
        q.qemu_coroutine_enter(q.qemu_coroutine_create(entry, None))
    while running[0]:
        q.aio_poll(ctx, True)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=200000, help="requests per run")
    ap.add_argument("--repeat", type=int, default=5, help="runs per point; best is kept")
    ap.add_argument("--tree", help="import pyaioctx from this checkout")
    ap.add_argument("--write-results", action="store_true")
    a = ap.parse_args()
    sys.path.insert(0, a.tree or str(ROOT))
    import pyaioctx as q

    q.qemu_init_main_loop()
    bs = q.bdrv_open(None, {"driver": "null-co", "size": 1 << 30}, 0)
    from pyaioctx.coroutine import get_backend
    backend = get_backend().name
    rows = []
    for path, fn in (("callback (bdrv_aio_preadv)", bench_callback),
                     ("coroutine (bdrv_co_preadv)", bench_coroutine)):
        for depth in (1, 32, 128):
            n = a.count - a.count % depth
            best_wall, best_cpu = float("inf"), float("inf")
            fn(q, bs, min(n, 20000 - 20000 % depth), depth)  # warm up
            for _ in range(a.repeat):
                wall, cpu = fn(q, bs, n, depth)
                best_wall = min(best_wall, wall)
                best_cpu = min(best_cpu, cpu)
            rows.append((path, depth, n / best_wall, best_cpu / n * 1e6))
            print(f"{path:27} depth {depth:3}: {n / best_wall:9.0f} req/s, "
                  f"{best_cpu / n * 1e6:6.2f} us CPU/request", flush=True)
    bs.close()
    lines = [SECTION, "",
             f"4 KiB reads on `null-co` (no I/O: only the block layer is measured), "
             f"{a.count} requests per run, best of {a.repeat};",
             f"{platform.python_implementation()} {platform.python_version()}, "
             f"{os.cpu_count()} CPUs, Linux {platform.release()}"
             + (f", coroutine backend {backend}" if backend else "") + ".",
             "Command: `python benchmarks/bench_block.py --write-results`.", "",
             "| path | depth | requests/s | CPU µs/request |", "|---|---:|---:|---:|"]
    for path, depth, rps, us in rows:
        lines.append(f"| {path} | {depth} | {rps:,.0f} | {us:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.write_results:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _results import write_generated
        write_generated("bench_block", SECTION, text.split("\n", 2)[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
