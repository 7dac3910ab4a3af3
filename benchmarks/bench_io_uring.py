# SPDX-License-Identifier: GPL-2.0-or-later
"""io_uring: pyaioctx's luring_* against fio, qemu-img and caio, in one run.

4 KiB reads, side by side:

* O_DIRECT random reads on a pre-filled file of at least 1 GiB, at each
  queue depth (default 1, 32, 128):
  - ``pyaioctx cb``: ``luring_submit`` with the completion callback
    submitting the next request, so QD requests stay in flight; the loop is
    ``aio_poll(ctx, True)``.  The first QD requests go out between
    ``luring_io_plug`` / ``luring_io_unplug`` (one io_uring_enter);
  - ``fio``: ``fio --ioengine=io_uring --direct=1 --rw=randread --bs=4k
    --iodepth=Q --runtime=T --time_based`` (C, liburing-style, the reference);
  - ``qemu-img bench -f raw -t none -i io_uring -d Q -c COUNT`` (QEMU's own
    block/io_uring.c in C).  Its COUNT is chosen from fio's IOPS so that it
    runs about as long.  Note: qemu-img bench has no random mode; it reads
    sequentially (offset += 4 KiB), which helps it on some disks.
* Buffered random reads of a region of the same file held in the page cache
  (64 MiB, read once beforehand), QD 32: ``pyaioctx cb`` against ``caio``'s
  io_uring backend, its raw C ``caio.linux_uring.Context`` driven by
  ``process_events`` from callbacks, and its asyncio adapter
  (``caio.linux_uring_asyncio.AsyncioContext``, QD tasks awaiting ``read``).
  caio allocates a fresh ``bytes`` per read, cannot read into a caller's
  buffer, has no readv and no O_DIRECT-aligned buffers, so it is compared
  on cached reads only.

Reported per case: IOPS, and CPU microseconds per request: user + system
time from ``resource.getrusage`` (``RUSAGE_SELF`` for in-process cases,
``RUSAGE_CHILDREN`` for qemu-img, which includes its start-up), divided by
requests; fio reports its own usr/sys CPU.

The test file ``bench_io_uring.img`` is created under
``$PYAIOCTX_BENCH_DIR`` or the repository's ``.scratch/``, and deleted at
the end (``--keep`` keeps it for the next run).

Usage::

    python benchmarks/bench_io_uring.py [--runtime S] [--qd 1,32,128]
        [--size-mib 1024] [--keep] [--only pyaioctx,fio,qemu-img,caio]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import resource
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pyaioctx import (  # noqa: E402
    QEMU_AIO_READ,
    QEMUIOVector,
    aio_poll,
    aio_setup_linux_io_uring,
    luring_io_plug,
    luring_io_unplug,
    luring_probe,
    luring_submit,
    qemu_init_main_loop,
    qemu_iovec_init_buf,
    qemu_memalign,
)

BS = 4096
CACHED_REGION = 64 << 20
REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

Result = tuple[int, float, float]  # requests, seconds, CPU seconds


def _cpu(who: int = resource.RUSAGE_SELF) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


class Offsets:
    """A precomputed table of random 4 KiB-aligned offsets, cycled through."""

    def __init__(self, size: int, seed: int = 42, n: int = 1 << 16) -> None:
        r = random.Random(seed)
        nblocks = size // BS
        self.table = [r.randrange(nblocks) * BS for _ in range(n)]
        self.mask = n - 1


# --------------------------------------------------------------------------
# Test file

def bench_file() -> str:
    d = os.environ.get("PYAIOCTX_BENCH_DIR") or os.path.join(REPO, ".scratch")
    os.makedirs(d, exist_ok=True)
    return os.path.join(os.path.abspath(d), "bench_io_uring.img")


def ensure_file(path: str, size: int) -> None:
    try:
        if os.stat(path).st_size == size:
            return
    except FileNotFoundError:
        pass
    print(f"# creating {size >> 20} MiB test file {path} ...", flush=True)
    chunk = bytearray(os.urandom(8 << 20))
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        for i in range(size // len(chunk)):
            chunk[:8] = i.to_bytes(8, "little")  # no two chunks alike
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def warm_cache(path: str, nbytes: int) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 << 20)
        left = nbytes
        while left > 0 and f.readinto(buf):
            left -= len(buf)


def fs_type(path: str) -> str:
    try:
        out = subprocess.run(["df", "-T", path], capture_output=True, text=True, check=True).stdout
        return out.splitlines()[1].split()[1]
    except Exception:  # noqa: BLE001
        return "?"


# --------------------------------------------------------------------------
# pyaioctx

def run_pyaioctx_cb(path: str, direct: bool, qd: int, runtime: float, offs: Offsets) -> Result:
    ctx = qemu_init_main_loop()
    s = aio_setup_linux_io_uring(ctx)
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    qiovs = []
    for _ in range(qd):
        q = QEMUIOVector()
        qemu_iovec_init_buf(q, qemu_memalign(4096, BS))
        qiovs.append(q)
    table = offs.table
    mask = offs.mask
    # completed, stop, offset cursor, (requests, time, cpu) at the stop
    st: list = [0, False, 0, None]
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
            luring_submit(None, s, fd, table[k], qiovs[i], QEMU_AIO_READ, cb, i)

    try:
        t0 = clock()
        c0 = _cpu()
        deadline = t0 + runtime
        luring_io_plug(None, s)
        for i in range(qd):
            st[2] = (st[2] + 1) & mask
            luring_submit(None, s, fd, table[st[2]], qiovs[i], QEMU_AIO_READ, cb, i)
        luring_io_unplug(None, s)
        while not st[1]:
            aio_poll(ctx, True)
            if clock() >= deadline and not st[1]:
                stop()
        n, t1, c1 = st[3]
        while s.io_q.in_flight or s.io_q.in_queue:
            aio_poll(ctx, True)
    finally:
        os.close(fd)
    if errors:
        raise RuntimeError(f"pyaioctx cb: {len(errors)} failed requests, first {errors[0]}")
    return n, t1 - t0, c1 - c0


# --------------------------------------------------------------------------
# Peers

def fio_cmd(path: str, qd: int, runtime: float) -> list[str]:
    return ["fio", "--name=randread", "--ioengine=io_uring", "--direct=1", "--rw=randread",
            "--bs=4k", f"--iodepth={qd}", f"--runtime={runtime:g}", "--time_based",
            f"--filename={path}", "--output-format=json"]


def run_fio(path: str, qd: int, runtime: float) -> Result:
    out = subprocess.run(fio_cmd(path, qd, runtime), capture_output=True, text=True,
                         check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    n = job["read"]["total_ios"]
    dt = job["read"]["runtime"] / 1000.0
    cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100.0 * job["job_runtime"] / 1000.0
    return n, dt, cpu


def qemu_img_cmd(path: str, qd: int, count: int) -> list[str]:
    return ["qemu-img", "bench", "-f", "raw", "-t", "none", "-i", "io_uring", "-d", str(qd),
            "-c", str(count), "-s", str(BS), path]


def run_qemu_img(path: str, qd: int, count: int) -> Result:
    c0 = _cpu(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    out = subprocess.run(qemu_img_cmd(path, qd, count), capture_output=True, text=True,
                         check=True).stdout
    wall = time.perf_counter() - t0
    cpu = _cpu(resource.RUSAGE_CHILDREN) - c0
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    dt = float(m.group(1)) if m else wall
    return count, dt, cpu


def run_caio_raw(path: str, qd: int, runtime: float, offs: Offsets) -> Result:
    from caio.linux_uring import Context, Operation

    fd = os.open(path, os.O_RDONLY)
    table = offs.table
    mask = offs.mask
    cctx = Context(max_requests=qd * 2)
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
    flush = cctx.flush
    while True:
        # flush() submits the queued SQEs and runs the callbacks of reads
        # that completed inline, which queue new SQEs; block only when a
        # flush ran no callback (so nothing is left unsubmitted).
        if not flush():
            process(qd, 1, -1)
        if clock() >= deadline:
            done_before_stop = st[0]
            break
    dt = clock() - t0
    cpu = _cpu() - c0
    st[1] = True
    while st[0] < st[3]:  # drain: every request completes once
        if not flush():
            process(qd, 1, 1)
    os.close(fd)
    return done_before_stop, dt, cpu


def run_caio_asyncio(path: str, qd: int, runtime: float, offs: Offsets) -> Result:
    from caio.linux_uring_asyncio import AsyncioContext

    table = offs.table
    mask = offs.mask

    async def main() -> Result:
        fd = os.open(path, os.O_RDONLY)
        actx = AsyncioContext(max_requests=qd * 2)
        st = [0, 0]  # completed, cursor
        clock = time.perf_counter
        deadline = clock() + runtime

        async def worker() -> None:
            while clock() < deadline:
                k = st[1] = (st[1] + 1) & mask
                await actx.read(BS, fd, table[k])
                st[0] += 1

        try:
            t0 = clock()
            c0 = _cpu()
            await asyncio.gather(*(worker() for _ in range(qd)))
            return st[0], clock() - t0, _cpu() - c0
        finally:
            actx.close()
            os.close(fd)

    return asyncio.run(main())


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
            f"python={platform.python_version()} ({platform.python_implementation()}) "
            f"fs={fs_type(path)}")


def row(io: str, qd: int, name: str, r: Result) -> None:
    n, dt, cpu = r
    iops = n / dt if dt > 0 else 0.0
    us = cpu / n * 1e6 if n else float("nan")
    print(f"| {io} | {qd} | {name} | {iops:,.0f} | {us:.1f} |", flush=True)


def ratio(name: str, mine: Result, other: Result) -> None:
    """A line with pyaioctx's IOPS over ``other``'s."""
    print(f"|  |  | pyaioctx / {name} | {mine[0] / mine[1] / (other[0] / other[1]):.2f}x |  |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=3.0, help="seconds per case")
    ap.add_argument("--qd", default="1,32,128", help="O_DIRECT queue depths")
    ap.add_argument("--cached-qd", type=int, default=32, help="queue depth of the page-cache case")
    ap.add_argument("--size-mib", type=int, default=1024, help="test file size (>= 1024 for the record)")
    ap.add_argument("--keep", action="store_true", help="keep the test file")
    ap.add_argument("--only", default="pyaioctx,fio,qemu-img,caio")
    args = ap.parse_args()
    only = set(args.only.split(","))

    ok, why = luring_probe()
    if not ok:
        sys.exit(f"io_uring unavailable: {why}")
    path = bench_file()
    size = args.size_mib << 20
    print(f"# {machine(os.path.dirname(path))}")
    print(f"# io_uring: {why}")
    t_start = time.perf_counter()
    ensure_file(path, size)
    offs = Offsets(size)
    try:
        print("| I/O | QD | implementation | IOPS | CPU us/req |")
        print("|---|---|---|---|---|")
        for qd in [int(x) for x in args.qd.split(",")]:
            mine = run_pyaioctx_cb(path, True, qd, args.runtime, offs) if "pyaioctx" in only else None
            if mine:
                row("O_DIRECT rand", qd, "pyaioctx cb", mine)
            fio = None
            if "fio" in only and shutil.which("fio"):
                fio = run_fio(path, qd, args.runtime)
                row("O_DIRECT rand", qd, "fio io_uring", fio)
                if mine:
                    ratio("fio", mine, fio)
            if "qemu-img" in only and shutil.which("qemu-img"):
                base = fio or mine
                count = max(2000, int(base[0] / base[1] * args.runtime)) if base else 20000
                qi = run_qemu_img(path, qd, count)
                row("O_DIRECT seq", qd, "qemu-img bench io_uring", qi)
                if mine:
                    ratio("qemu-img", mine, qi)
        qd = args.cached_qd
        coffs = Offsets(min(size, CACHED_REGION), seed=7)
        warm_cache(path, CACHED_REGION)
        mine = run_pyaioctx_cb(path, False, qd, args.runtime, coffs) if "pyaioctx" in only else None
        if mine:
            row("cached rand", qd, "pyaioctx cb", mine)
        if "caio" in only:
            try:
                import caio.linux_uring  # noqa: F401
            except Exception as e:  # noqa: BLE001
                print(f"# caio io_uring backend not importable: {e}")
            else:
                raw = run_caio_raw(path, qd, args.runtime, coffs)
                row("cached rand", qd, "caio linux_uring.Context (raw C)", raw)
                if mine:
                    ratio("caio raw", mine, raw)
                aio = run_caio_asyncio(path, qd, args.runtime, coffs)
                row("cached rand", qd, "caio linux_uring_asyncio", aio)
                if mine:
                    ratio("caio asyncio", mine, aio)
        print("# fio:", " ".join(fio_cmd(path, 0, args.runtime)).replace("--iodepth=0", "--iodepth=Q"))
        print("# qemu-img:", " ".join(qemu_img_cmd(path, 0, 0)).replace("-d 0 -c 0", "-d Q -c COUNT"))
        print(f"# total {time.perf_counter() - t_start:.1f} s")
    finally:
        if not args.keep:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


if __name__ == "__main__":
    main()
