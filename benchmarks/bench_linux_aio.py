# SPDX-License-Identifier: GPL-2.0-or-later
"""Linux native AIO: pyaioctx's laio_* against fio, libaio and caio, in one run.

4 KiB random reads, side by side:

* O_DIRECT, on a pre-filled file of at least 1 GiB, at each queue depth
  (default 1, 32, 128):
  - ``pyaioctx cb``: ``laio_submit`` with the completion callback submitting
    the next request, so QD requests stay in flight; the loop is
    ``aio_poll(ctx, True)``.  The first QD requests are submitted between
    ``laio_io_plug`` / ``laio_io_unplug`` (one io_submit); after that the
    driver itself submits what one batch of completion callbacks queued in
    one io_submit;
  - ``pyaioctx cb plug/poll`` (QD > 1): the same with ``laio_io_plug`` /
    ``laio_io_unplug`` also around every ``aio_poll`` (as virtio-blk plugs
    around a virtqueue's requests).  Note that at QD = ``MAX_EVENTS`` a
    plugged queue is flushed request by request (the seed's rule: a full
    kernel queue forces the submit);
  - ``pyaioctx co``: QD coroutines, each looping on ``laio_co_submit``;
  - ``pyaioctx cb+poll`` (QD 1 only): the callback path with adaptive
    polling on (``aio_context_set_poll_params(ctx, 32000, 2, 2)``), which
    busy-checks the completion ring before blocking;
  - ``fio``: ``fio --ioengine=libaio --direct=1 --rw=randread --bs=4k
    --iodepth=Q --runtime=T --time_based`` (C, the reference);
  - ``libaio``: the PyPI ``libaio`` ctypes wrapper, a bare submit /
    getEvents loop with no event loop.
* Buffered reads of the same file while it sits in the page cache, QD 32:
  ``pyaioctx cb`` and ``pyaioctx co`` against ``caio``'s Linux AIO backend,
  both as its asyncio adapter (``caio.linux_aio_asyncio.AsyncioContext``,
  QD tasks awaiting ``read``) and as its raw ``caio.linux_aio.Context``
  driven by ``process_events`` from callbacks.  (caio cannot do O_DIRECT.)

Reported per case: IOPS and CPU microseconds per request (user + system
time of the process, from ``resource.getrusage``, divided by requests; for
fio, its own usr/sys CPU figures).  Each case runs ``--runtime`` seconds,
``--repeat`` rounds interleaved; the best round is reported.

The test file is ``bench_linux_aio.img`` under ``$PYAIOCTX_BENCH_DIR`` or
the repository's ``.scratch/``; it is reused when it exists with the right
size.  ``--cleanup`` deletes it and exits.

Usage::

    python benchmarks/bench_linux_aio.py [--quick] [--runtime S] [--repeat R]
        [--qd 1,32,128] [--size-mib 1024] [--only NAME,...] [--cleanup]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import ctypes
import json
import mmap
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pyaioctx import (  # noqa: E402
    QEMU_AIO_READ,
    QEMUIOVector,
    aio_context_set_poll_params,
    aio_poll,
    aio_setup_linux_aio,
    laio_co_submit,
    laio_io_plug,
    laio_io_unplug,
    laio_submit,
    qemu_coroutine_create,
    qemu_coroutine_enter,
    qemu_init_main_loop,
    qemu_iovec_init_buf,
    qemu_memalign,
)

BS = 4096
SECTORS = BS // 512
REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Offsets:
    """A precomputed table of random 4 KiB-aligned offsets, cycled through."""

    def __init__(self, size: int, seed: int = 42, n: int = 1 << 16) -> None:
        r = random.Random(seed)
        nblocks = size // BS
        self.bytes = [r.randrange(nblocks) * BS for _ in range(n)]
        self.sectors = [b // 512 for b in self.bytes]
        self.mask = n - 1


# --------------------------------------------------------------------------
# Test file

def bench_file(size: int) -> str:
    d = os.environ.get("PYAIOCTX_BENCH_DIR") or os.path.join(REPO, ".scratch")
    os.makedirs(d, exist_ok=True)
    return os.path.join(os.path.abspath(d), "bench_linux_aio.img")


def ensure_file(path: str, size: int) -> None:
    try:
        if os.stat(path).st_size == size:
            return
    except FileNotFoundError:
        pass
    print(f"# creating {size >> 20} MiB test file {os.path.relpath(path, REPO)} ...", flush=True)
    chunk = bytearray(os.urandom(1 << 20))
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        for i in range(size >> 20):
            chunk[:8] = i.to_bytes(8, "little")  # no two MiB alike
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def drop_from_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_cache(path: str) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 << 20)
        while f.readinto(buf):
            pass


def fs_type(path: str) -> str:
    try:
        out = subprocess.run(["df", "-T", path], capture_output=True, text=True, check=True).stdout
        return out.splitlines()[1].split()[1]
    except Exception:  # noqa: BLE001
        return "?"


# --------------------------------------------------------------------------
# pyaioctx

_CTX = None


def _ctx():
    global _CTX
    if _CTX is None:
        _CTX = qemu_init_main_loop()
    return _CTX


def _buffers(qd: int) -> tuple[list, list]:
    bufs = [qemu_memalign(4096, BS) for _ in range(qd)]
    qiovs = []
    for b in bufs:
        q = QEMUIOVector()
        qemu_iovec_init_buf(q, b)
        qiovs.append(q)
    return bufs, qiovs


def run_pyaioctx_cb(path: str, direct: bool, qd: int, runtime: float, offs: Offsets,
                    plug: bool = False, poll: bool = False) -> tuple[int, float, float]:
    ctx = _ctx()
    s = aio_setup_linux_aio(ctx)
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    _, qiovs = _buffers(qd)
    table = offs.sectors
    mask = offs.mask
    # completed, stop, offset cursor, (requests, seconds, cpu) at the stop
    st = [0, False, 0, None]
    errors = []
    clock = time.perf_counter

    def stop() -> None:
        st[1] = True
        st[3] = (st[0], clock(), _cpu())

    def cb(i: int, ret: int) -> None:
        if ret < 0:
            errors.append(ret)
        st[0] += 1
        if not st[1]:
            # The deadline is checked here too: with completions arriving
            # all the time, one aio_poll may run for long.
            if clock() >= deadline:
                stop()
                return
            k = st[2] = (st[2] + 1) & mask
            laio_submit(None, s, fd, table[k], qiovs[i], SECTORS, cb, i, QEMU_AIO_READ)

    if poll:
        aio_context_set_poll_params(ctx, 32000, 2, 2)
    try:
        t0 = clock()
        c0 = _cpu()
        deadline = t0 + runtime
        # The first QD requests go out in one io_submit.
        laio_io_plug(None, s)
        for i in range(qd):
            st[2] = (st[2] + 1) & mask
            laio_submit(None, s, fd, table[st[2]], qiovs[i], SECTORS, cb, i, QEMU_AIO_READ)
        laio_io_unplug(None, s)
        if plug:
            while not st[1]:
                laio_io_plug(None, s)
                aio_poll(ctx, True)
                laio_io_unplug(None, s)
                if clock() >= deadline and not st[1]:
                    stop()
        else:
            while not st[1]:
                aio_poll(ctx, True)
                if clock() >= deadline and not st[1]:
                    stop()
        n, t1, c1 = st[3]
        dt = t1 - t0
        cpu = c1 - c0
        while s.io_q.in_flight or s.io_q.in_queue:
            aio_poll(ctx, True)
    finally:
        if poll:
            aio_context_set_poll_params(ctx, 0, 0, 0)
        os.close(fd)
    if errors:
        raise RuntimeError(f"pyaioctx cb: {len(errors)} failed requests, first {errors[0]}")
    return n, dt, cpu


def run_pyaioctx_co(path: str, direct: bool, qd: int, runtime: float,
                    offs: Offsets) -> tuple[int, float, float]:
    ctx = _ctx()
    s = aio_setup_linux_aio(ctx)
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    _, qiovs = _buffers(qd)
    table = offs.bytes
    mask = offs.mask
    # completed, stop, offset cursor, coroutines running, (n, s, cpu) at the stop
    st = [0, False, 0, 0, None]
    errors = []
    clock = time.perf_counter

    def stop() -> None:
        st[1] = True
        st[4] = (st[0], clock(), _cpu())

    def worker(i: int) -> None:
        qiov = qiovs[i]
        st[3] += 1
        while not st[1]:
            k = st[2] = (st[2] + 1) & mask
            ret = laio_co_submit(None, s, fd, table[k], qiov, QEMU_AIO_READ)
            if ret < 0:
                errors.append(ret)
            st[0] += 1
            if clock() >= deadline and not st[1]:
                stop()
        st[3] -= 1

    try:
        t0 = clock()
        c0 = _cpu()
        deadline = t0 + runtime
        # The first QD requests go out in one io_submit.
        laio_io_plug(None, s)
        for i in range(qd):
            qemu_coroutine_enter(qemu_coroutine_create(worker, i))
        laio_io_unplug(None, s)
        while not st[1]:
            aio_poll(ctx, True)
            if clock() >= deadline and not st[1]:
                stop()
        n, t1, c1 = st[4]
        dt = t1 - t0
        cpu = c1 - c0
        while st[3]:
            aio_poll(ctx, True)
    finally:
        os.close(fd)
    if errors:
        raise RuntimeError(f"pyaioctx co: {len(errors)} failed requests, first {errors[0]}")
    return n, dt, cpu


# --------------------------------------------------------------------------
# Peers

def run_fio(path: str, qd: int, runtime: float) -> tuple[int, float, float]:
    cmd = ["fio", "--name=randread", "--ioengine=libaio", "--direct=1", "--rw=randread",
           "--bs=4k", f"--iodepth={qd}", f"--runtime={runtime:g}", "--time_based",
           f"--filename={path}", "--output-format=json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    n = job["read"]["total_ios"]
    dt = job["read"]["runtime"] / 1000.0
    cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100.0 * job["job_runtime"] / 1000.0
    return n, dt, cpu


def run_libaio(path: str, qd: int, runtime: float, offs: Offsets) -> tuple[int, float, float]:
    import libaio

    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    bufs = [mmap.mmap(-1, BS) for _ in range(qd)]  # page-aligned
    table = offs.bytes
    mask = offs.mask
    k = 0
    with libaio.AIOContext(qd) as actx:
        blocks = []
        for i in range(qd):
            k = (k + 1) & mask
            blocks.append(libaio.AIOBlock(libaio.AIOBLOCK_MODE_READ, fd, [bufs[i]], table[k]))
        clock = time.perf_counter
        t0 = clock()
        c0 = _cpu()
        deadline = t0 + runtime
        n = 0
        actx.submit(blocks)
        get = actx.getEvents
        submit = actx.submit
        while True:
            events = get(1, qd)
            again = []
            for block, res, _res2 in events:
                if res != BS:
                    raise RuntimeError(f"libaio: read returned {res}")
                n += 1
                k = (k + 1) & mask
                block.offset = table[k]
                again.append(block)
            if clock() >= deadline:
                break
            submit(again)
        dt = clock() - t0
        cpu = _cpu() - c0
        pending = qd - len(again)
        while pending > 0:
            pending -= len(get(1, qd))
    os.close(fd)
    return n, dt, cpu


def run_caio_asyncio(path: str, qd: int, runtime: float, offs: Offsets) -> tuple[int, float, float]:
    from caio.linux_aio_asyncio import AsyncioContext

    fd = os.open(path, os.O_RDONLY)
    table = offs.bytes
    mask = offs.mask
    st = [0, False, 0]

    async def worker(actx) -> None:
        read = actx.read
        while not st[1]:
            k = st[2] = (st[2] + 1) & mask
            await read(BS, fd, table[k])
            st[0] += 1

    async def main() -> tuple[int, float, float]:
        actx = AsyncioContext(max_requests=qd)
        try:
            clock = time.perf_counter
            t0 = clock()
            c0 = _cpu()
            tasks = [asyncio.ensure_future(worker(actx)) for _ in range(qd)]
            await asyncio.sleep(runtime)
            n = st[0]
            dt = clock() - t0
            cpu = _cpu() - c0
            st[1] = True
            await asyncio.gather(*tasks)
            return n, dt, cpu
        finally:
            actx.close()

    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()
        os.close(fd)


def run_caio_raw(path: str, qd: int, runtime: float, offs: Offsets) -> tuple[int, float, float]:
    from caio.linux_aio import Context, Operation

    fd = os.open(path, os.O_RDONLY)
    table = offs.bytes
    mask = offs.mask
    cctx = Context(max_requests=qd)
    st = [0, False, 0, 0]  # completed, stop, offset cursor, submitted
    read = Operation.read
    submit = cctx.submit

    def cb(_res: int) -> None:
        st[0] += 1
        if not st[1]:
            k = st[2] = (st[2] + 1) & mask
            op = read(BS, fd, table[k])
            op.set_callback(cb)
            st[3] += submit(op)

    clock = time.perf_counter
    t0 = clock()
    c0 = _cpu()
    deadline = t0 + runtime
    for _ in range(qd):
        k = st[2] = (st[2] + 1) & mask
        op = read(BS, fd, table[k])
        op.set_callback(cb)
        st[3] += submit(op)
    process = cctx.process_events
    done_before_stop = 0
    while True:
        process(qd, 1, -1)
        if clock() >= deadline:
            done_before_stop = st[0]
            break
    dt = clock() - t0
    cpu = _cpu() - c0
    st[1] = True
    # Drain what is still in flight: every request completes once.
    while st[0] < st[3]:
        process(qd, 1, 1)
    os.close(fd)
    return done_before_stop, dt, cpu


# --------------------------------------------------------------------------
# Driver

def machine(path: str) -> str:
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
            f"python={platform.python_version()} fs={fs_type(path)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 s per case, 1 round")
    ap.add_argument("--runtime", type=float, default=None, help="seconds per case (default 3)")
    ap.add_argument("--repeat", type=int, default=None, help="interleaved rounds (default 2)")
    ap.add_argument("--qd", default="1,32,128", help="O_DIRECT queue depths")
    ap.add_argument("--cache-qd", type=int, default=32, help="page-cache queue depth")
    ap.add_argument("--size-mib", type=int, default=1024, help="test file size (>= 1024)")
    ap.add_argument("--only", default="", help="comma-separated case-name prefixes "
                    "(direct, cache, pyaioctx, fio, libaio, caio)")
    ap.add_argument("--cleanup", action="store_true", help="delete the test file and exit")
    args = ap.parse_args()
    size = args.size_mib << 20
    path = bench_file(size)
    if args.cleanup:
        for p in (path, path + ".tmp"):
            if os.path.exists(p):
                os.unlink(p)
                print(f"removed {os.path.relpath(p, REPO)}")
        return
    runtime = args.runtime or (1.0 if args.quick else 3.0)
    repeat = args.repeat or (1 if args.quick else 2)
    qds = [int(x) for x in args.qd.split(",") if x]
    only = [s for s in args.only.split(",") if s]
    have_fio = shutil.which("fio") is not None

    ensure_file(path, size)
    print(f"# {machine(path)}; file {os.path.relpath(path, REPO)} {size >> 20} MiB; "
          f"runtime {runtime:g} s x {repeat} rounds", flush=True)
    offs = Offsets(size)

    # Peers from PyPI (benchmarks/requirements.txt): a missing one is
    # reported and its rows left out.
    have_libaio = importlib.util.find_spec("libaio") is not None
    have_caio = importlib.util.find_spec("caio") is not None
    for name, have in (("libaio", have_libaio), ("caio", have_caio)):
        if not have:
            print(f"# {name} is not installed (pip install -r benchmarks/requirements.txt): "
                  "its rows are skipped", flush=True)
    cases = []  # (group, qd, name, fn)
    for qd in qds:
        cases.append(("direct", qd, "pyaioctx cb",
                      lambda qd=qd: run_pyaioctx_cb(path, True, qd, runtime, offs)))
        if qd == 1:
            cases.append(("direct", qd, "pyaioctx cb+poll",
                          lambda qd=qd: run_pyaioctx_cb(path, True, qd, runtime, offs, poll=True)))
        else:
            cases.append(("direct", qd, "pyaioctx cb plug/poll",
                          lambda qd=qd: run_pyaioctx_cb(path, True, qd, runtime, offs, plug=True)))
        cases.append(("direct", qd, "pyaioctx co",
                      lambda qd=qd: run_pyaioctx_co(path, True, qd, runtime, offs)))
        if have_fio:
            cases.append(("direct", qd, "fio", lambda qd=qd: run_fio(path, qd, runtime)))
        if have_libaio:
            cases.append(("direct", qd, "libaio", lambda qd=qd: run_libaio(path, qd, runtime, offs)))
    cq = args.cache_qd
    cases.append(("cache", cq, "pyaioctx cb",
                  lambda: run_pyaioctx_cb(path, False, cq, runtime, offs)))
    cases.append(("cache", cq, "pyaioctx cb plug/poll",
                  lambda: run_pyaioctx_cb(path, False, cq, runtime, offs, plug=True)))
    cases.append(("cache", cq, "pyaioctx co", lambda: run_pyaioctx_co(path, False, cq, runtime, offs)))
    if have_caio:
        cases.append(("cache", cq, "caio asyncio", lambda: run_caio_asyncio(path, cq, runtime, offs)))
        cases.append(("cache", cq, "caio raw", lambda: run_caio_raw(path, cq, runtime, offs)))
    if only:
        cases = [c for c in cases if any(c[0].startswith(o) or c[2].startswith(o) for o in only)]

    best: dict[tuple, tuple[float, float, list]] = {}
    for rnd in range(repeat):
        for group, qd, name, fn in cases:
            if group == "direct":
                drop_from_cache(path)
            elif group == "cache":
                warm_cache(path)
            n, dt, cpu = fn()
            iops = n / dt
            cpu_us = cpu / n * 1e6 if n else float("nan")
            key = (group, qd, name)
            b = best.get(key)
            rounds = (b[2] if b else []) + [iops]
            if b is None or iops > b[0]:
                best[key] = (iops, cpu_us, rounds)
            else:
                best[key] = (b[0], b[1], rounds)
            print(f"round {rnd + 1}: {group:6s} QD{qd:<4d} {name:20s} {iops:10,.0f} IOPS "
                  f"{cpu_us:7.1f} CPU us/req", flush=True)

    def peer_of(group: str, qd: int, name: str) -> list[str]:
        if not name.startswith("pyaioctx"):
            return []
        return ["fio", "libaio"] if group == "direct" else ["caio asyncio", "caio raw"]

    print()
    print("| I/O | QD | implementation | IOPS (best) | CPU us/req | vs peer | rounds (IOPS) |")
    print("|---|---|---|---|---|---|---|")
    for (group, qd, name), (iops, cpu_us, rounds) in best.items():
        ratios = []
        for p in peer_of(group, qd, name):
            pb = best.get((group, qd, p))
            if pb:
                ratios.append(f"{iops / pb[0]:.2f}x {p}")
        label = "O_DIRECT" if group == "direct" else "page cache"
        rr = " / ".join(f"{r:,.0f}" for r in rounds)
        print(f"| {label} | {qd} | {name} | {iops:,.0f} | {cpu_us:.1f} | {', '.join(ratios)} | {rr} |")


if __name__ == "__main__":
    main()
