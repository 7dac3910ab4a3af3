# SPDX-License-Identifier: GPL-2.0-or-later
"""``pyaioctx bench`` against ``qemu-img bench`` with identical options.

For each aio backend (threads, native, io_uring) and queue depth (1, 32,
128; ``--depths`` picks): 4 KiB reads and writes (``-w``; ``--ops`` picks), ``-t none``, on a 1 GiB pre-filled raw image under
``.scratch/`` (a real disk: O_DIRECT).  Both tools run in the same invocation,
alternating, ``--repeat`` times per point; the table shows the median
requests per second of each and the median of the per-pair ratios
pyaioctx / qemu-img (the disk's speed drifts, so each ratio compares two
neighbouring runs).  ``--write-results`` replaces the generated table of
the "## pyaioctx bench vs qemu-img bench" section of benchmarks/RESULTS.md
(between its markers), keeping the text around it.  ``--coroutine`` runs
pyaioctx bench's coroutine path (``bdrv_co_preadv``/``bdrv_co_pwritev``
from ``depth`` coroutines) against the same qemu-img bench runs.

    python benchmarks/bench_cli.py [--count N] [--repeat R] [--ops read,write]
                                   [--aio threads,native,io_uring] [--depths 1,32,128]
                                   [--write-results]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## pyaioctx bench vs qemu-img bench"


def run(cmd: list[str]) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {p.stderr.strip()}")
    m = re.search(r"Run completed in ([\d.]+) seconds", p.stdout)
    assert m, p.stdout
    return float(m.group(1))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=100000, help="requests per run")
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs per point")
    ap.add_argument("--size", default="1G")
    ap.add_argument("--ops", default="read,write", help="read, write or both")
    ap.add_argument("--aio", default="threads,native,io_uring", help="backends to run")
    ap.add_argument("--depths", default="1,32,128", help="queue depths to run")
    ap.add_argument("--coroutine", action="store_true",
                    help="pyaioctx bench --coroutine: bdrv_co_* from depth coroutines")
    ap.add_argument("--write-results", action="store_true")
    a = ap.parse_args()
    if a.coroutine and a.write_results:
        ap.error("--write-results records the callback path; run --coroutine without it")
    qemu_img = shutil.which("qemu-img")
    if qemu_img is None:
        print("qemu-img is not installed")
        return 1
    scratch = ROOT / ".scratch"
    scratch.mkdir(exist_ok=True)
    img = scratch / "bench_cli.img"
    if not img.exists() or img.stat().st_size != 1 << 30:
        with open(img, "wb") as f:
            chunk = bytes(range(256)) * 4096
            for _ in range(1024):
                f.write(chunk)
    sys.path.insert(0, str(ROOT))
    from pyaioctx.block.file_posix import aio_engine_available
    version = subprocess.run([qemu_img, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    rows = []
    ops = [o for o in a.ops.split(",") if o]
    for op in ops:
        if op not in ("read", "write"):
            ap.error(f"--ops: unknown operation {op!r}")
    for op in ops:
        for aio in a.aio.split(","):
            ok, why = aio_engine_available(aio)
            for depth in [int(d) for d in a.depths.split(",")]:
                if not ok:
                    rows.append((op, aio, depth, None, None, why))  # type: ignore[arg-type]
                    continue
                opts = ["-f", "raw", "-t", "none", "-i", aio, "-c", str(a.count), "-d", str(depth),
                        "-s", "4k", *(["-w"] if op == "write" else []), str(img)]
                qs, ps, ratios = [], [], []
                for _ in range(a.repeat):
                    q = run([qemu_img, "bench", *opts])
                    p = run([sys.executable, "-m", "pyaioctx", "bench",
                             *(["--coroutine"] if a.coroutine else []), *opts])
                    qs.append(a.count / q)
                    ps.append(a.count / p)
                    ratios.append(q / p)
                rows.append((op, aio, depth, statistics.median(qs), statistics.median(ps),
                             statistics.median(ratios)))
                print(f"{op:5} {aio:9} depth {depth:3}: qemu-img {statistics.median(qs):9.0f} req/s, "
                      f"pyaioctx {statistics.median(ps):8.0f} req/s, ratios "
                      + " ".join(f"{r:.2f}" for r in ratios), flush=True)
    lines = [SECTION, "",
             f"4 KiB {' and '.join(o + 's' for o in ops)} (`-w` for writes; qemu-img bench's sequential offsets), "
             f"`-t none`, 1 GiB pre-filled raw image on disk, {a.count} requests per run,",
             f"{a.repeat} alternating runs per point (medians; ratio = median of the per-pair ratios);",
             f"`{version}` vs `python -m pyaioctx bench` with the same options, in the same run;",
             f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs, "
             f"Linux {platform.release()}.  Requests per second; ratio = pyaioctx / qemu-img.",
             "", "| op | aio | depth | qemu-img req/s | pyaioctx req/s | ratio |",
             "|---|---|---:|---:|---:|---:|"]
    for op, aio, depth, q, p, ratio in rows:
        if q is None:
            lines.append(f"| {op} | {aio} | {depth} | unavailable: {ratio} | | |")
        else:
            lines.append(f"| {op} | {aio} | {depth} | {q:,.0f} | {p:,.0f} | {ratio:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.write_results:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _results import write_generated
        write_generated("bench_cli", SECTION, text.split("\n", 2)[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
