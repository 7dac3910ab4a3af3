# SPDX-License-Identifier: GPL-2.0-or-later
"""NBD serving: ``pyaioctx nbd`` against qemu-nbd and nbdkit's file plugin.

The three servers export the same raw file, one after the other, in one run,
over a unix socket and over TCP on 127.0.0.1:

* ``fio --ioengine=nbd`` 4 KiB random reads at queue depth 1 and 32 (IOPS);
* ``nbdcopy URI null:`` of the whole file (default 1 GiB; MiB/s).

Servers run with their defaults for a raw file (threads AIO, page cache),
persistent and without a connection limit: ``pyaioctx nbd -t -e 0``,
``qemu-nbd -t -e 0 -f raw``, ``nbdkit -f file``.  The file is written once
with random data, and read in full before each server starts, so that
page-cache hits are the same for everyone.

Usage::

    python benchmarks/bench_nbd.py [--size 1G] [--runtime 5] [--repeat 3] [--dir DIR] [--json]

With ``--repeat N`` the whole series (every transport, every server) runs N
times, the servers taking turns, and each cell is the median of its N runs:
on a shared machine one server's run can land in a slow phase.

Tools that are missing are reported and their rows skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(transport: str, addr: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if transport == "unix":
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(addr)
            else:
                socket.create_connection(("127.0.0.1", int(addr)), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server on {addr} did not come up")


def start(server: str, img: Path, transport: str, d: Path) -> tuple[subprocess.Popen, str]:
    if transport == "unix":
        addr = str(d / f"{server}.sock")
        # A server killed by the previous run may have left its socket.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(addr)
        uri = f"nbd+unix:///?socket={addr}"
    else:
        addr = str(free_port())
        uri = f"nbd://127.0.0.1:{addr}/"
    if server == "pyaioctx":
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        net = ["-k", addr] if transport == "unix" else ["-b", "127.0.0.1", "-p", addr]
        cmd = [sys.executable, "-m", "pyaioctx", "nbd", "-t", "-e", "0", "-f", "raw", *net, str(img)]
    elif server == "qemu-nbd":
        env = None
        net = ["-k", addr] if transport == "unix" else ["-b", "127.0.0.1", "-p", addr]
        cmd = ["qemu-nbd", "-t", "-e", "0", "-f", "raw", *net, str(img)]
    else:
        env = None
        net = ["-U", addr] if transport == "unix" else ["-i", "127.0.0.1", "-p", addr]
        cmd = ["nbdkit", "-f", "--exit-with-parent", *net, "file", f"file={img}"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(transport, addr)
    return p, uri


def warm(img: Path) -> None:
    """Read the whole image, so that every server starts with it all in the
    page cache (a virtual machine's host may reclaim guest cache between
    runs, and a read that misses costs a server far more than one that hits)."""
    with open(img, "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass


def stop(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(15)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def fio(uri: str, depth: int, runtime: float, size: int) -> Optional[float]:
    r = subprocess.run(["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", "--rw=randread",
                        "--bs=4k", f"--iodepth={depth}", f"--runtime={runtime}", "--time_based",
                        f"--size={size}", "--output-format=json"],
                       capture_output=True, text=True, timeout=runtime + 60)
    if r.returncode != 0:
        sys.stderr.write(r.stderr)
        return None
    j = json.loads(r.stdout[r.stdout.index("{"):])
    return float(j["jobs"][0]["read"]["iops"])


def nbdcopy(uri: str, size: int) -> Optional[float]:
    t0 = time.perf_counter()
    r = subprocess.run(["nbdcopy", uri, "null:"], capture_output=True, text=True, timeout=600)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        sys.stderr.write(r.stderr)
        return None
    return size / dt / (1 << 20)


def parse_size(s: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)", s.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r}")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=parse_size, default=1 << 30)
    ap.add_argument("--runtime", type=float, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to put the image (default: a temp dir)")
    ap.add_argument("--servers", default="pyaioctx,qemu-nbd,nbdkit")
    ap.add_argument("--transports", default="unix,tcp")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    servers = [s for s in args.servers.split(",")
               if s == "pyaioctx" or shutil.which(s)]
    for s in set(args.servers.split(",")) - set(servers):
        print(f"note: {s} is not installed, skipped", file=sys.stderr)
    have_fio, have_copy = shutil.which("fio"), shutil.which("nbdcopy")
    d = Path(tempfile.mkdtemp(prefix="bench-nbd-", dir=args.dir))
    img = d / "disk.img"
    runs: dict = {}
    try:
        with open(img, "wb") as f:
            chunk = os.urandom(1 << 20)
            for _ in range(args.size >> 20):
                f.write(chunk)
        for rep in range(args.repeat):
            for transport in args.transports.split(","):
                for server in servers:
                    warm(img)
                    p, uri = start(server, img, transport, d)
                    try:
                        row = {"server": server, "transport": transport, "run": rep}
                        if have_fio:
                            # Warm the page cache and the server once.
                            fio(uri, 32, 1, args.size)
                            row["qd1_iops"] = fio(uri, 1, args.runtime, args.size)
                            row["qd32_iops"] = fio(uri, 32, args.runtime, args.size)
                        if have_copy:
                            row["nbdcopy_mib_s"] = nbdcopy(uri, args.size)
                    finally:
                        stop(p)
                    runs.setdefault((transport, server), []).append(row)
                    print(json.dumps(row), file=sys.stderr)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    results = []
    for (transport, server), rows in runs.items():
        med = {"server": server, "transport": transport, "runs": len(rows)}
        for key in ("qd1_iops", "qd32_iops", "nbdcopy_mib_s"):
            vals = [r[key] for r in rows if r.get(key) is not None]
            med[key] = statistics.median(vals) if vals else None
        results.append(med)
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print("| transport | server | fio 4k randread QD1 IOPS | QD32 IOPS | nbdcopy to null: MiB/s |")
    print("|---|---|---:|---:|---:|")
    for r in results:
        def f(v: Optional[float]) -> str:
            return "n/a" if v is None else f"{v:,.0f}"
        print(f"| {r['transport']} | {r['server']} | {f(r.get('qd1_iops'))} | "
              f"{f(r.get('qd32_iops'))} | {f(r.get('nbdcopy_mib_s'))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
