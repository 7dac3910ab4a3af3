# SPDX-License-Identifier: GPL-2.0-or-later
"""``pyaioctx bench``: a qemu-img bench compatible benchmark.

With a FILENAME it is a port of QEMU 7.2's ``img_bench`` (qemu-img.c): the
same options, the same request pattern (``bench_cb`` keeps ``depth``
callback requests in flight, stepping the offset and wrapping at the end of
the image, optionally flushing every N requests with or without draining)
and the same first and last lines::

    Sending 75000 read requests, 4096 bytes each, 64 in parallel (starting at offset 0, step size 4096)
    Run completed in 1.234 seconds.

What qemu-img bench lacks is added after those lines: ``--rw
randread|randwrite|read|write``, ``--runtime SECONDS``, latency percentiles,
CPU time per request, ``--json`` (one JSON object instead of text) and a
progress bar on a terminal (through ``rich`` when the ``cli`` extra is
installed, plain text otherwise).

Without a FILENAME it runs the main job: a pre-filled scratch image on a
real disk (``--dir``, ``$PYAIOCTX_BENCH_DIR`` or the current directory;
deleted afterwards), the same workload over every I/O backend of this
machine (``threads``, ``native``, ``io_uring``; the ones that cannot run say
why) and one comparison table.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Optional

from ..aio import aio_poll, qemu_init_main_loop
from ..iov import QEMUIOVector, qemu_iovec_init_buf
from ..thread_pool import aio_get_thread_pool
from ..block import (
    BDRV_O_IO_URING, BDRV_O_NATIVE_AIO, BDRV_O_NOCACHE, BDRV_O_NO_FLUSH, BDRV_O_RDWR,
    BlockDriverState, bdrv_aio_flush, bdrv_aio_preadv, bdrv_aio_pwritev, bdrv_co_preadv,
    bdrv_co_pwritev, bdrv_drain, bdrv_find_format, bdrv_getlength, bdrv_open, bdrv_unref,
    qemu_blockalign,
)
from ..coroutine import qemu_coroutine_create, qemu_coroutine_enter
from .affinity import (AffinityError, apply_affinity, apply_pool_sched, check_affinity_spec,
                       restore_affinity, restore_pool_sched, uses_thread_pool)
from .cutils import qemu_strtosz, strtol0

__all__ = ["main", "BenchOptions", "BenchResult", "run_bench", "parse_args", "JSON_SCHEMA"]

PROGNAME = "qemu-img"
_perf_counter_ns = time.perf_counter_ns
_INT_MAX = (1 << 31) - 1
_TMPFS_MAGIC = 0x01021994

#: Keys of one result object of ``--json`` (also each entry of the main
#: job's ``"results"`` list); tests check the output against it.
JSON_SCHEMA: dict[str, type] = {
    "filename": str, "driver": str, "aio": str, "cache": str, "rw": str,
    "depth": int, "bufsize": int, "requests": int, "errors": int, "seconds": float,
    "iops": float, "mib_per_s": float, "lat_us": dict, "cpu_us_per_req": float,
    "cpus": list, "sched_batch": bool, "path": str,
}


class BenchError(Exception):
    """A bad option or a failed run; the message is qemu-img's text."""


def _error(msg: str) -> None:
    sys.stdout.flush()
    sys.stderr.write(f"{PROGNAME}: {msg}\n")
    sys.stderr.flush()


@dataclass
class BenchOptions:
    """The options of one run (qemu-img bench's plus the extras)."""
    filename: Optional[str] = None
    count: int = 75000
    depth: int = 64
    fmt: Optional[str] = None
    flush_interval: int = 0
    drain_on_flush: bool = True
    aio: str = "threads"
    cache: str = "writeback"
    offset: int = 0
    pattern: int = 0
    quiet: bool = False
    bufsize: int = 4096
    step: int = 0
    write: bool = False
    rw: Optional[str] = None          # randread|randwrite|read|write
    runtime: Optional[float] = None   # seconds; then count is only a cap
    json: bool = False
    progress: Optional[bool] = None   # None: when stderr is a terminal
    size: int = 256 << 20             # main job: scratch image size
    dir: Optional[str] = None         # main job: where the scratch image goes
    image_opts: bool = False
    seed: int = 1
    depth_set: bool = False           # -d given (the main job defaults to 32)
    affinity: str = "auto"            # --affinity: auto, all or a CPU list
    coroutine: bool = False           # --coroutine: bdrv_co_* from depth coroutines


@dataclass
class BenchResult:
    """One finished run; :meth:`to_json` follows :data:`JSON_SCHEMA`."""
    filename: str
    driver: str
    aio: str
    cache: str
    rw: str
    depth: int
    bufsize: int
    requests: int
    errors: int
    seconds: float
    cpu_seconds: float
    latencies_ns: list[int] = field(default_factory=list, repr=False)
    cpus: list[int] = field(default_factory=list)  # where the run's threads could run
    sched_batch: bool = False  # thread-pool workers ran under SCHED_BATCH
    path: str = "callback"     # "callback" (bdrv_aio_*) or "coroutine" (bdrv_co_*)

    def percentile(self, p: float) -> float:
        """Latency percentile in microseconds (nearest rank)."""
        lat = self.latencies_ns
        if not lat:
            return 0.0
        k = min(len(lat) - 1, max(0, int(round(p / 100.0 * len(lat) + 0.5)) - 1))
        return lat[k] / 1000.0

    def to_json(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies latencies_ns, one entry per
        # request, only for it to be dropped.
        d = {f.name: getattr(self, f.name) for f in fields(self)
             if f.name not in ("latencies_ns", "cpu_seconds")}
        secs = self.seconds if self.seconds > 0 else float("nan")
        d["iops"] = self.requests / secs if self.seconds > 0 else 0.0
        d["mib_per_s"] = d["iops"] * self.bufsize / (1 << 20)
        d["lat_us"] = {"p50": self.percentile(50), "p99": self.percentile(99),
                       "p99.9": self.percentile(99.9),
                       "mean": (sum(self.latencies_ns) / len(self.latencies_ns) / 1000.0
                                if self.latencies_ns else 0.0)}
        d["cpu_us_per_req"] = self.cpu_seconds / self.requests * 1e6 if self.requests else 0.0
        return d


# --------------------------------------------------------------------------
# Option parsing (qemu-img.c: img_bench's getopt_long loop)

_USAGE = """usage: pyaioctx bench [-c count] [-d depth] [-f fmt] [--flush-interval=flush_interval]
                      [-i aio] [-n] [--no-drain] [-o offset] [--pattern=pattern] [-q]
                      [-s buffer_size] [-S step_size] [-t cache] [-w] [-U]
                      [--rw randread|randwrite|read|write] [--runtime SECONDS]
                      [--json] [--progress|--no-progress] [--size SIZE] [--dir DIR]
                      [--image-opts] [--affinity auto|all|CPUS] [--coroutine] [FILENAME]

qemu-img bench compatible: the first and last lines are qemu-img bench's.
Without FILENAME: create a pre-filled scratch image (--size, default 256M) in
--dir, $PYAIOCTX_BENCH_DIR or the current directory, run the same workload
(default: --rw randread -d 32 -t none --runtime 3) over every I/O backend
(threads, native, io_uring) and print one comparison table.

--affinity (default auto) keeps the process on one CPU while the I/O runs
on the thread pool (-i threads), where the event loop and the workers share
the GIL and a hand-off to another CPU costs a cross-CPU wake-up; "all"
leaves the CPUs alone, a list (0-3, 1,3) picks them.

--coroutine sends the requests from depth coroutines looping on
bdrv_co_preadv/bdrv_co_pwritev instead of bdrv_aio_* callbacks (the same
offsets and count; no --flush-interval).
"""

_LONG = {
    "count": ("c", True), "depth": ("d", True), "format": ("f", True),
    "flush-interval": ("flush-interval", True), "no-drain": ("no-drain", False),
    "aio": ("i", True), "nocache": ("n", False), "offset": ("o", True),
    "pattern": ("pattern", True), "quiet": ("q", False), "buffer-size": ("s", True),
    "step-size": ("S", True), "cache": ("t", True), "write": ("w", False),
    "force-share": ("U", False), "help": ("h", False), "rw": ("rw", True),
    "runtime": ("runtime", True), "json": ("json", False), "progress": ("progress", False),
    "no-progress": ("no-progress", False), "size": ("size", True), "dir": ("dir", True),
    "image-opts": ("image-opts", False), "seed": ("seed", True),
    "affinity": ("affinity", True), "coroutine": ("coroutine", False),
}
_SHORT = "hc:d:f:ni:o:qs:S:t:wU"


def _size_arg(name: str, arg: str) -> int:
    # qemu-img.c's cvtnum(name, value): two error lines, as qemu-img prints.
    v = qemu_strtosz(arg)
    if v < 0 or v > (1 << 63) - 1:
        raise BenchError(f"Invalid {name} specified. You may use k, M, G, T, P or E suffixes for\n"
                         f"{PROGNAME}: kilobytes, megabytes, gigabytes, terabytes, petabytes "
                         f"and exabytes.")
    return v


def _uint_arg(arg: str, msg: str, allow_zero: bool = True) -> int:
    v = strtol0(arg)
    if v is None or v < 0 or v > _INT_MAX or (v == 0 and not allow_zero):
        raise BenchError(msg)
    return v


def parse_args(argv: list[str]) -> Optional[BenchOptions]:
    """Parse ``pyaioctx bench`` arguments; None means "help was printed".
    Raises :class:`BenchError` with qemu-img's message for bad input."""
    o = BenchOptions()
    operands: list[str] = []
    pairs: list[tuple[str, Optional[str]]] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        i += 1
        if a == "--":
            operands.extend(argv[i:])
            break
        if a.startswith("--"):
            name, eq, val = a[2:].partition("=")
            if name not in _LONG:
                raise BenchError(f"unrecognized option '{a}'\nTry 'pyaioctx bench --help' "
                                 f"for more information")
            key, needs = _LONG[name]
            if needs and not eq:
                if i >= len(argv):
                    raise BenchError(f"option '--{name}' requires an argument")
                val = argv[i]
                i += 1
            pairs.append((key, val if needs else None))
            continue
        if len(a) < 2 or a[0] != "-":
            operands.append(a)
            continue
        j = 1
        while j < len(a):
            c = a[j]
            j += 1
            k = _SHORT.find(c)
            if k < 0:
                raise BenchError(f"invalid option -- '{c}'\nTry 'pyaioctx bench --help' "
                                 f"for more information")
            if k + 1 < len(_SHORT) and _SHORT[k + 1] == ":":
                if j < len(a):
                    pairs.append((c, a[j:]))
                elif i < len(argv):
                    pairs.append((c, argv[i]))
                    i += 1
                else:
                    raise BenchError(f"option requires an argument -- '{c}'")
                break
            pairs.append((c, None))
    for key, arg in pairs:
        s = arg or ""
        if key == "h":
            sys.stdout.write(_USAGE)
            return None
        elif key == "c":
            o.count = _uint_arg(s, "Invalid request count specified")
        elif key == "d":
            # QEMU accepts 0 and then never completes; refuse it.
            o.depth = _uint_arg(s, "Invalid queue depth specified", allow_zero=False)
            o.depth_set = True
        elif key == "f":
            o.fmt = s
        elif key == "n":
            o.cache = "none"
        elif key == "i":
            if s not in ("threads", "native", "io_uring"):
                raise BenchError(f"Invalid aio option: {s}")
            o.aio = s
        elif key == "o":
            o.offset = _size_arg("offset", s)
        elif key == "pattern":
            v = strtol0(s)
            if v is None or v < 0 or v > 0xff:
                raise BenchError("Invalid pattern byte specified")
            o.pattern = v
        elif key == "q":
            o.quiet = True
        elif key == "s":
            v = _size_arg("buffer size", s)
            if v > _INT_MAX:
                raise BenchError("Invalid buffer size specified. You may use k, M, G, T, P or E "
                                 "suffixes for\n" f"{PROGNAME}: kilobytes, megabytes, gigabytes, "
                                 "terabytes, petabytes and exabytes.")
            o.bufsize = v
        elif key == "S":
            v = _size_arg("step_size", s)
            if v > _INT_MAX:
                raise BenchError("Step size must be less than 2147483648")
            o.step = v
        elif key == "t":
            if s not in ("none", "off", "writeback", "unsafe", "directsync", "writethrough"):
                raise BenchError("Invalid cache mode")
            o.cache = s
        elif key == "w":
            o.write = True
        elif key == "U":
            pass  # no image locking here
        elif key == "flush-interval":
            o.flush_interval = _uint_arg(s, "Invalid flush interval specified")
        elif key == "no-drain":
            o.drain_on_flush = False
        elif key == "rw":
            if s not in ("randread", "randwrite", "read", "write"):
                raise BenchError(f"Invalid --rw mode '{s}' (expected randread, randwrite, "
                                 f"read or write)")
            o.rw = s
        elif key == "runtime":
            try:
                o.runtime = float(s)
            except ValueError:
                o.runtime = -1.0
            if not o.runtime > 0:
                raise BenchError(f"Invalid runtime '{s}' (seconds, > 0)")
        elif key == "json":
            o.json = True
        elif key == "progress":
            o.progress = True
        elif key == "no-progress":
            o.progress = False
        elif key == "size":
            o.size = _size_arg("size", s)
        elif key == "dir":
            o.dir = s
        elif key == "image-opts":
            o.image_opts = True
        elif key == "seed":
            o.seed = _uint_arg(s, "Invalid seed specified")
        elif key == "affinity":
            try:
                check_affinity_spec(s)
            except AffinityError as e:
                raise BenchError(f"Invalid --affinity: {e}") from None
            o.affinity = s
        elif key == "coroutine":
            o.coroutine = True
    if o.rw is not None:
        o.write = o.rw in ("write", "randwrite")
    if len(operands) > 1:
        raise BenchError("Expecting one image file name\nTry 'pyaioctx bench --help' for more "
                         "information")
    o.filename = operands[0] if operands else None
    if o.flush_interval and not o.write:
        raise BenchError("--flush-interval is only available in write tests")
    if o.flush_interval and o.coroutine:
        raise BenchError("--flush-interval is not available with --coroutine")
    if o.flush_interval and o.flush_interval < o.depth and o.drain_on_flush:
        raise BenchError("Flush interval can't be smaller than depth")
    return o


# --------------------------------------------------------------------------
# The run (img_bench / bench_cb)

_CACHE = {  # mode -> (BDRV_O_NOCACHE, BDRV_O_NO_FLUSH), bdrv_parse_cache_mode
    "none": (True, False), "off": (True, False), "writeback": (False, False),
    "unsafe": (False, True), "directsync": (True, False), "writethrough": (False, False),
}


def _open_flags(o: BenchOptions) -> int:
    flags = BDRV_O_RDWR if o.write else 0
    direct, noflush = _CACHE[o.cache]
    if direct:
        flags |= BDRV_O_NOCACHE
    if noflush:
        flags |= BDRV_O_NO_FLUSH
    if o.aio == "native":
        flags |= BDRV_O_NATIVE_AIO
    elif o.aio == "io_uring":
        flags |= BDRV_O_IO_URING
    return flags


def open_image(o: BenchOptions) -> BlockDriverState:
    """Open the image as qemu-img bench does (read-only for reads);
    raises :class:`BenchError` with QEMU's "Could not open" text."""
    from .qemu_io import _map_raw, image_opts_to_options, parse_keyval
    assert o.filename is not None
    try:
        if o.image_opts:
            opts = image_opts_to_options(parse_keyval(o.filename))
        else:
            opts = {"driver": o.fmt or "raw", "file": {"driver": "file", "filename": o.filename}}
            if o.fmt not in (None, "raw"):
                opts = {"driver": o.fmt, "filename": o.filename}
        opts = _map_raw(opts)
        drv = opts.get("driver")
        if isinstance(drv, str) and bdrv_find_format(drv) is None:
            raise ValueError(f"Unknown driver '{drv}'")
        return bdrv_open(None, opts, _open_flags(o))
    except OSError as e:
        msg = e.strerror or str(e)
        raise BenchError(f"Could not open '{o.filename}': {msg}") from None
    except (ValueError, TypeError, RuntimeError) as e:
        raise BenchError(f"Could not open '{o.filename}': {e}") from None


class _Progress:
    """A progress line on a terminal: rich's bar when installed, else a
    plain ``\\r`` line; nothing when not a terminal."""

    def __init__(self, enabled: bool, total: float, label: str) -> None:
        self.enabled = enabled
        self.total = total
        self.label = label
        self.rich: Any = None
        self.last = 0.0
        if not enabled:
            return
        try:
            from rich.progress import Progress  # optional "cli" extra
            self.rich = Progress(transient=True, console=None)
            self.rich.start()
            self.task = self.rich.add_task(label, total=total)
        except Exception:  # no rich, or no usable console: plain text
            self.rich = None

    def update(self, done: float) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self.last < 0.1:
            return
        self.last = now
        if self.rich is not None:
            self.rich.update(self.task, completed=done)
        else:
            pct = 100.0 * done / self.total if self.total else 100.0
            width = 30
            fill = int(width * min(1.0, pct / 100))
            sys.stderr.write(f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] {pct:5.1f}%")
            sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self.rich is not None:
            self.rich.stop()
        else:
            sys.stderr.write("\r" + " " * (len(self.label) + 45) + "\r")
            sys.stderr.flush()


class _Bench:
    """qemu-img.c's ``BenchData`` and ``bench_cb``."""

    def __init__(self, bs: BlockDriverState, o: BenchOptions, image_size: int) -> None:
        self.bs = bs
        self.o = o
        self.ctx = qemu_init_main_loop()
        self.image_size = image_size
        self.bufsize = o.bufsize
        self.step = o.step or o.bufsize
        self.nrreq = o.depth
        self.n = o.count if o.runtime is None else (1 << 62)
        self.flush_interval = o.flush_interval
        self.drain_on_flush = o.drain_on_flush
        self.write = o.write
        self.offset = o.offset
        self.in_flight = 0
        self.submitted = 0  # --coroutine: requests taken by the coroutines
        self.in_flush = False
        self.error = 0
        self.completed = 0
        self.rand = o.rw in ("randread", "randwrite")
        self.rng = random.Random(o.seed)
        self.deadline: Optional[float] = None
        self.latencies: list[int] = []
        # One buffer for every request, as qemu-img bench: the data does not
        # matter, only the request pattern does.
        self.buf = qemu_blockalign(bs, max(1, o.bufsize))
        mv = memoryview(self.buf).cast("B")
        ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(mv)), o.pattern, max(1, o.bufsize))
        self.qiov = QEMUIOVector()
        qemu_iovec_init_buf(self.qiov, mv[:o.bufsize])
        self.slots = max(1, (image_size - o.bufsize) // self.step + 1) \
            if image_size >= o.bufsize and self.step else 1
        # Bound once, not per request: the completion callback and the submit.
        # A run without flushes or a time limit takes the steady-state
        # callback; everything else goes through cb.
        steady = not self.flush_interval and o.runtime is None
        self._submit = bdrv_aio_pwritev if self.write else bdrv_aio_preadv
        self._done = self._make_cb_steady() if steady else self.cb

    def cb(self, submitted: int, ret: int) -> None:
        if submitted:
            self.latencies.append(_perf_counter_ns() - submitted)
        if ret < 0:
            # qemu-img exits at once; stop issuing and report after the drain.
            if not self.error:
                self.error = ret
            self.in_flight -= 1
            self.n = 0
            return
        if self.in_flush:
            self.in_flush = False
        elif self.in_flight > 0:
            remaining = self.n - self.in_flight
            self.n -= 1
            self.in_flight -= 1
            self.completed += 1
            if self.deadline is not None and time.perf_counter() >= self.deadline:
                self.n = self.in_flight  # runtime reached: finish what is in flight
            if self.flush_interval and remaining % self.flush_interval == 0:
                if not self.in_flight or not self.drain_on_flush:
                    if self.drain_on_flush:
                        self.in_flush = True
                        bdrv_aio_flush(self.bs, lambda _o, r: self.cb(0, r), None)
                    else:
                        bdrv_aio_flush(self.bs, self._undrained_flush_cb, None)
                if self.drain_on_flush:
                    return
        submit = self._submit
        while self.n > self.in_flight and self.in_flight < self.nrreq:
            offset = self._next_offset()
            # Counted before the call: the completion may come back at once.
            self.in_flight += 1
            submit(self.bs, offset, self.qiov, 0, self._done, _perf_counter_ns())

    def _make_cb_steady(self) -> Callable[[int, int], None]:
        # cb for a run without flushes or a time limit.  It is the harness's
        # share of every request's cost, as bench_cb is in qemu-img, so it
        # does no more than that: what never changes during the run is bound
        # here, and the clock read that ends a request's latency also stamps
        # the next request, submitted a few hundred nanoseconds later (the
        # offset computation), well inside the clock's noise at any depth.
        bench = self
        cb = self.cb
        record = self.latencies.append
        submit = self._submit
        bs = self.bs
        qiov = self.qiov
        step = self.step
        image_size = self.image_size
        rand = self.rand
        randrange = self.rng.randrange
        slots = self.slots

        def cb_steady(submitted: int, ret: int) -> None:
            if ret < 0 or not submitted:
                cb(submitted, ret)
                return
            now = _perf_counter_ns()
            record(now - submitted)
            n = bench.n - 1
            bench.n = n
            bench.completed += 1
            if n < bench.in_flight:
                bench.in_flight -= 1
                return
            # One request done, so the queue has room for exactly one: send
            # it in this one's slot (in_flight unchanged).  _next_offset,
            # inlined with the constants bound above.
            if rand:
                offset = randrange(slots) * step
            else:
                offset = bench.offset
                bench.offset = (offset + step) % image_size if image_size else 0
            submit(bs, offset, qiov, 0, cb_steady, now)

        return cb_steady

    def _undrained_flush_cb(self, _: Any, ret: int) -> None:
        if ret < 0 and not self.error:
            self.error = ret
            self.n = 0

    def _next_offset(self) -> int:
        # qemu-img's next offset, wrapping at the end of the image (QEMU
        # 7.2: offset %= image_size), or a random slot for --rw rand*.
        if self.rand:
            return self.rng.randrange(self.slots) * self.step
        offset = self.offset
        self.offset = (offset + self.step) % self.image_size if self.image_size else 0
        return offset

    def _co_entry(self, _: Any) -> None:
        # One of --coroutine's depth coroutines: the same requests as the
        # callback path, each awaited with bdrv_co_preadv/pwritev.
        # As in cb_steady: the constants bound once, _next_offset inlined
        # unless --runtime needs its clock, and the clock read that ends a
        # request's latency also starts the next one.
        co_rw = bdrv_co_pwritev if self.write else bdrv_co_preadv
        bs, qiov, size, record = self.bs, self.qiov, self.bufsize, self.latencies.append
        step, image_size, rand = self.step, self.image_size, self.rand
        randrange, slots = self.rng.randrange, self.slots
        timed = self.deadline is not None
        try:
            t0 = _perf_counter_ns()
            while self.submitted < self.n and not self.error:
                if timed and time.perf_counter() >= self.deadline:  # type: ignore[operator]
                    break
                self.submitted += 1
                if rand:
                    offset = randrange(slots) * step
                else:
                    offset = self.offset
                    self.offset = (offset + step) % image_size if image_size else 0
                ret = co_rw(bs, offset, size, qiov, 0)
                now = _perf_counter_ns()
                record(now - t0)
                t0 = now
                if ret < 0:
                    if not self.error:
                        self.error = ret
                    break
                self.completed += 1
        finally:
            self.in_flight -= 1

    def _run_coroutines(self) -> None:
        for _ in range(self.nrreq):
            self.in_flight += 1
            qemu_coroutine_enter(qemu_coroutine_create(self._co_entry, None))

    def run(self, progress: _Progress) -> tuple[float, float]:
        cpu0 = time.process_time()
        t1 = time.perf_counter()
        if self.o.runtime is not None:
            self.deadline = t1 + self.o.runtime
        if self.o.coroutine:
            self._run_coroutines()
            busy = lambda: self.in_flight > 0  # noqa: E731 - until every coroutine ended
        else:
            self.cb(0, 0)
            busy = lambda: self.n > 0  # noqa: E731 - until bench_cb sent and saw them all
        while busy():
            aio_poll(self.ctx, True)
            progress.update((time.perf_counter() - t1) if self.o.runtime is not None
                            else self.completed)
        bdrv_drain(self.bs)
        t2 = time.perf_counter()
        return t2 - t1, time.process_time() - cpu0


def _rw_name(o: BenchOptions) -> str:
    return o.rw or ("write" if o.write else "read")


def run_bench(o: BenchOptions, bs: Optional[BlockDriverState] = None,
              print_lines: bool = True) -> BenchResult:
    """Run one benchmark on ``o.filename`` (or an open ``bs``), printing
    qemu-img bench's lines unless ``print_lines`` is false or ``-q``/``--json``.
    Raises :class:`BenchError` on a failed request, as qemu-img exits."""
    own = bs is None
    if bs is None:
        bs = open_image(o)
    saved: Optional[set[int]] = None
    pool = None
    try:
        try:
            saved = apply_affinity(o.affinity, uses_thread_pool(bs))
        except AffinityError as e:
            raise BenchError(str(e)) from None
        pool = apply_pool_sched(o.affinity, bs)
        image_size = bdrv_getlength(bs)
        if image_size < 0:
            raise BenchError(f"Could not get the image size: {os.strerror(-image_size)}")
        text = print_lines and not o.quiet and not o.json
        if text:
            count = o.count
            sys.stdout.write(f"Sending {count} {'write' if o.write else 'read'} requests, "
                             f"{o.bufsize} bytes each, {o.depth} in parallel (starting at "
                             f"offset {o.offset}, step size {o.step or o.bufsize})\n")
            if o.flush_interval:
                sys.stdout.write(f"Sending flush every {o.flush_interval} requests\n")
            sys.stdout.flush()
        b = _Bench(bs, o, image_size)
        show = o.progress if o.progress is not None else (sys.stderr.isatty() and not o.quiet)
        progress = _Progress(bool(show), o.runtime if o.runtime is not None else o.count,
                             f"{o.aio} {_rw_name(o)}")
        try:
            secs, cpu = b.run(progress)
        finally:
            progress.close()
        if b.error:
            raise BenchError(f"Failed request: {os.strerror(-b.error)}")
        if text:
            sys.stdout.write("Run completed in %3.3f seconds.\n" % secs)
        b.latencies.sort()
        drv = bs.drv.format_name if bs.drv is not None else "?"
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        batch = uses_thread_pool(bs) and aio_get_thread_pool(bs.aio_context).sched_batch
        res = BenchResult(o.filename or "", drv, o.aio, o.cache, _rw_name(o), o.depth,
                          o.bufsize, b.completed, 0, secs, cpu, b.latencies, cpus, batch,
                          "coroutine" if o.coroutine else "callback")
        if text:
            _print_extras(res)
        return res
    finally:
        restore_pool_sched(pool)
        restore_affinity(saved)
        if own:
            bdrv_unref(bs)


def _print_extras(r: BenchResult) -> None:
    j = r.to_json()
    lat = j["lat_us"]
    sys.stdout.write(f"{r.requests} requests: {j['iops']:.0f} IOPS, {j['mib_per_s']:.1f} MiB/s; "
                     f"latency p50 {lat['p50']:.1f} us, p99 {lat['p99']:.1f} us, "
                     f"p99.9 {lat['p99.9']:.1f} us; CPU {j['cpu_us_per_req']:.1f} us/request\n")


# --------------------------------------------------------------------------
# The main job: every backend on a scratch image

def _is_tmpfs(path: str) -> bool:
    # os.statvfs has no f_type; ask statfs(2) through ctypes.
    class _Statfs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 256)]
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        st = _Statfs()
        if libc.statfs(os.fsencode(path), ctypes.byref(st)) != 0:
            return False
        return (st.f_type & 0xffffffff) == _TMPFS_MAGIC
    except (OSError, AttributeError):
        return False


def _make_scratch(directory: str, size: int) -> str:
    """A pre-filled image: every block holds data, so reads reach the disk
    instead of being answered from a hole."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f".pyaioctx-bench-{os.getpid()}.img")
    chunk = bytes(range(256)) * 4096  # 1 MiB, not zeros
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    try:
        left = size
        while left > 0:
            n = min(left, len(chunk))
            os.write(fd, chunk[:n])
            left -= n
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return path


def _backend_status(aio: str) -> tuple[bool, str]:
    try:
        from ..block.file_posix import aio_engine_available
    except ImportError as e:
        return (aio == "threads"), str(e)
    try:
        return aio_engine_available(aio)
    except Exception as e:  # a probe must never take the whole job down
        return False, str(e)


def main_job(o: BenchOptions) -> int:
    """Compare every backend on a scratch image; prints one table."""
    directory = o.dir or os.environ.get("PYAIOCTX_BENCH_DIR") or os.getcwd()
    if o.rw is None:
        o.rw = "randwrite" if o.write else "randread"
        o.write = o.rw == "randwrite"
    if o.runtime is None and o.count == 75000:
        o.runtime = 3.0
    if not o.depth_set:
        o.depth = 32  # the main job's default; qemu-img bench's 64 with -d
    tmpfs = _is_tmpfs(directory)
    if o.cache == "writeback" and not tmpfs:
        o.cache = "none"  # measure the backends, not the page cache
    notes: list[str] = []
    if tmpfs:
        notes.append(f"{directory} is tmpfs: O_DIRECT is refused there, so the run uses "
                     f"-t writeback and Linux AIO cannot run asynchronously; use --dir on a disk")
    if not o.json:
        sys.stdout.write(f"pyaioctx bench: {o.rw} {o.bufsize} bytes, depth {o.depth}, "
                         f"cache={o.cache}, {o.runtime or o.count}"
                         f"{' s' if o.runtime else ' requests'} per backend, "
                         f"{o.size >> 20} MiB scratch image in {directory}\n")
        for n in notes:
            sys.stdout.write(f"note: {n}\n")
        sys.stdout.flush()
    try:
        path = _make_scratch(directory, o.size)
    except OSError as e:
        _error(f"Could not create the scratch image in '{directory}': {os.strerror(e.errno or errno.EIO)}")
        return 1
    results: list[tuple[str, Optional[BenchResult], str]] = []
    try:
        for aio in ("threads", "native", "io_uring"):
            ok, why = _backend_status(aio)
            if ok and aio == "native" and o.cache not in ("none", "off", "directsync"):
                ok, why = False, "needs cache.direct (-t none); not possible on tmpfs"
            if not ok:
                results.append((aio, None, why))
                continue
            ro = BenchOptions(**{**asdict(o), "filename": path, "aio": aio, "fmt": "raw"})
            try:
                r = run_bench(ro, print_lines=False)
                results.append((aio, r, ""))
            except BenchError as e:
                results.append((aio, None, str(e)))
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
    if o.json:
        out = {"job": {"rw": o.rw, "bufsize": o.bufsize, "depth": o.depth, "cache": o.cache,
                       "runtime": o.runtime, "image_size": o.size, "dir": directory,
                       "notes": notes},
               "results": [dict(r.to_json(), aio=aio) if r else {"aio": aio, "unavailable": why}
                           for aio, r, why in results]}
        sys.stdout.write(json.dumps(out, indent=2) + "\n")
    else:
        _print_table(results)
        allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        for aio, r, _ in results:
            if r is not None and r.cpus and len(r.cpus) < len(allowed):
                batch = ", workers under SCHED_BATCH" if r.sched_batch else ""
                sys.stdout.write(f"note: {aio} ran on CPU {','.join(map(str, r.cpus))} only{batch} "
                                 f"(--affinity {o.affinity}: its event loop and workers share "
                                 f"the GIL; --affinity all to use every CPU)\n")
    return 0 if any(r is not None for _, r, _ in results) else 1


def _print_table(results: list[tuple[str, Optional[BenchResult], str]]) -> None:
    head = ("backend", "IOPS", "MiB/s", "p50 us", "p99 us", "p99.9 us", "CPU us/req")
    rows: list[tuple[str, ...]] = []
    for aio, r, why in results:
        if r is None:
            rows.append((aio, "unavailable: " + why))
            continue
        j = r.to_json()
        lat = j["lat_us"]
        rows.append((aio, f"{j['iops']:.0f}", f"{j['mib_per_s']:.1f}", f"{lat['p50']:.1f}",
                     f"{lat['p99']:.1f}", f"{lat['p99.9']:.1f}", f"{j['cpu_us_per_req']:.1f}"))
    if sys.stdout.isatty():
        try:
            from rich.console import Console
            from rich.table import Table
            t = Table(*head)
            for row in rows:
                t.add_row(*row) if len(row) == len(head) else t.add_row(row[0], row[1])
            Console().print(t)
            return
        except Exception:
            pass  # plain text below
    widths = [len(h) for h in head]
    for row in rows:
        if len(row) == len(head):
            widths = [max(w, len(c)) for w, c in zip(widths, row)]
    fmt = "  ".join("%-" + str(widths[0]) + "s" if i == 0 else "%" + str(w) + "s"
                    for i, w in enumerate(widths))
    sys.stdout.write(fmt % head + "\n")
    for row in rows:
        if len(row) == len(head):
            sys.stdout.write(fmt % row + "\n")
        else:
            sys.stdout.write(f"{row[0]:<{widths[0]}}  {row[1]}\n")
    sys.stdout.flush()


def main(argv: Optional[list[str]] = None) -> int:
    """``pyaioctx bench``; returns the exit status (1 on error, as qemu-img)."""
    if argv is None:
        argv = sys.argv[1:]
    try:
        o = parse_args(list(argv))
        if o is None:
            return 0
        if o.filename is None:
            return main_job(o)
        r = run_bench(o)
        if o.json:
            sys.stdout.write(json.dumps(r.to_json(), indent=2) + "\n")
        return 0
    except BenchError as e:
        for line in str(e).split("\n"):
            if line.startswith(f"{PROGNAME}: "):
                sys.stderr.write(line + "\n")
            elif line.startswith("Try "):
                sys.stderr.write(line + "\n")
            else:
                _error(line)
        return 1
