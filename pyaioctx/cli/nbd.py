# SPDX-License-Identifier: GPL-2.0-or-later
"""``pyaioctx nbd``: export a block device over NBD (port of qemu-nbd.c).

Runs in the foreground on the main AioContext.  SIGINT / SIGTERM stop it
cleanly: stop listening, disconnect the clients, wait for their requests,
drain and flush the device, close it.  Without ``-t`` the server exits once
the last client that completed the handshake disconnects, as qemu-nbd does.

Differences from qemu-nbd: the default bind address is 127.0.0.1 (never all
interfaces unless asked with ``-b``); no ``--fork``, ``--connect``
(kernel nbd device), TLS or ``--object``; every image is raw (``-f raw``).
``--print-uri`` prints the NBD URI once the server listens, which makes
``-p 0`` (a free port) usable from scripts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from typing import Any, Optional

__all__ = ["main"]

PROGNAME = "pyaioctx nbd"


def _error(msg: str) -> int:
    sys.stderr.write(f"{PROGNAME}: {msg}\n")
    return 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROGNAME,
        description="Export FILENAME (a raw image, a block device, or an option string "
                    "with --image-opts) over the NBD protocol.",
        epilog="Without -t the server exits when the last client disconnects.  "
               "SIGINT/SIGTERM drain, flush and close the device before exiting.")
    p.add_argument("filename", metavar="FILENAME")
    g = p.add_argument_group("network")
    g.add_argument("-p", "--port", type=int, default=None,
                   help="TCP port to listen on (default 10809; 0 = any free port)")
    g.add_argument("-b", "--bind", default=None,
                   help="interface to bind to (default 127.0.0.1)")
    g.add_argument("-k", "--socket", default=None, metavar="PATH",
                   help="listen on a unix socket at PATH instead of TCP")
    g.add_argument("-e", "--shared", type=int, default=1, metavar="NUM",
                   help="serve up to NUM clients at once (default 1; 0 = unlimited)")
    g.add_argument("-t", "--persistent", action="store_true",
                   help="don't exit when the last client disconnects")
    g.add_argument("--print-uri", action="store_true",
                   help="print the NBD URI on stdout once listening")
    g.add_argument("--pid-file", default=None, metavar="PATH",
                   help="write the process id to PATH")
    g.add_argument("--handshake-limit", type=float, default=10.0, metavar="N",
                   help="drop clients that take more than N seconds for the handshake "
                        "(0 = no limit; default 10)")
    e = p.add_argument_group("export")
    e.add_argument("-x", "--export-name", default="", metavar="NAME",
                   help='export name (default "")')
    e.add_argument("-D", "--description", default=None, metavar="TEXT",
                   help="export description")
    e.add_argument("-r", "--read-only", action="store_true", help="export read-only")
    e.add_argument("-f", "--format", default=None, help="image format (only 'raw')")
    e.add_argument("--image-opts", action="store_true",
                   help="FILENAME is an option string (driver=file,filename=x.img,aio=native)")
    e.add_argument("--aio", default=None, choices=("threads", "native", "io_uring"),
                   help="AIO mode (default threads)")
    e.add_argument("--cache", default=None,
                   help="cache mode: none, writeback (default), writethrough, directsync, unsafe")
    e.add_argument("-n", "--nocache", action="store_true", help="same as --cache=none")
    e.add_argument("--discard", default=None, choices=("ignore", "off", "unmap", "on"),
                   help="discard requests: ignore (default) or unmap")
    p.add_argument("--affinity", default="auto", metavar="auto|all|CPUS",
                   help="CPUs to run on: auto (default) keeps the process on one CPU when "
                        "the device's I/O uses the thread pool (aio=threads), all leaves "
                        "them alone, or a list such as 0 or 0-3")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="log connections (-vv: every refused request)")
    p.add_argument("-V", "--version", action="version", version=_version())
    return p


def _version() -> str:
    from .. import __version__
    return f"{PROGNAME} (pyaioctx {__version__}), a port of qemu-nbd 7.2"


def _raw_to_file(opts: dict) -> dict:
    """"raw" over a protocol is the protocol itself in pyaioctx: fold the
    ``file`` child into the top level."""
    if opts.get("driver") != "raw":
        return opts
    child = opts.pop("file", None)
    opts.pop("driver")
    if isinstance(child, str):
        child = {"driver": "file", "filename": child}
    merged = dict(child or {"driver": "file"})
    merged.setdefault("driver", "file")
    merged.update(opts)
    return merged


def _open(args: argparse.Namespace) -> tuple[Any, bool]:
    """Open the device as qemu-nbd's main() does; returns ``(bs, writethrough)``."""
    from ..block import BDRV_O_RDWR, bdrv_open
    from .qemu_io import image_opts_to_options, parse_aio, parse_cache_mode, parse_discard, \
        parse_keyval

    flags = 0 if args.read_only else BDRV_O_RDWR
    writethrough = False
    cache = "none" if args.nocache else args.cache
    if cache is not None:
        r = parse_cache_mode(cache, flags)
        if r is None:
            raise ValueError(f"Invalid cache mode `{cache}'")
        flags, writethrough = r
    if args.aio is not None:
        r2 = parse_aio(args.aio, flags)
        if r2 is None:
            raise ValueError(f"Invalid aio mode '{args.aio}'")
        flags = r2
    if args.discard is not None:
        r3 = parse_discard(args.discard, flags)
        if r3 is None:
            raise ValueError(f"Invalid discard mode `{args.discard}'")
        flags = r3
    if args.image_opts:
        if args.format:
            raise ValueError("--image-opts and --format are mutually exclusive")
        if args.filename.startswith("json:"):
            opts = json.loads(args.filename[5:])
        else:
            opts = image_opts_to_options(parse_keyval(args.filename))
        opts = _raw_to_file(opts)
        if "driver" not in opts:
            opts["driver"] = "file"
        return bdrv_open(None, opts, flags), writethrough
    if args.format not in (None, "raw"):
        raise ValueError(f"Unknown file format '{args.format}' (only 'raw' is supported)")
    return bdrv_open(args.filename, {"driver": "file"}, flags), writethrough


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``pyaioctx nbd``; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.socket and (args.port is not None or args.bind is not None):
        return _error("-k cannot be combined with -p or -b")
    if args.shared < 0:
        return _error(f"Invalid shared device number '{args.shared}'")
    if args.port is not None and not 0 <= args.port <= 65535:
        return _error(f"Invalid port '{args.port}'")
    from .affinity import (AffinityError, apply_affinity, apply_pool_sched, check_affinity_spec,
                           uses_thread_pool)
    try:
        check_affinity_spec(args.affinity)
    except AffinityError as e:
        return _error(f"Invalid --affinity: {e}")
    level = logging.WARNING if args.verbose == 0 else (
        logging.INFO if args.verbose == 1 else logging.DEBUG)
    logging.basicConfig(level=level, format=f"{PROGNAME}: %(message)s")

    from ..aio import aio_notify, qemu_init_main_loop
    from ..block import bdrv_unref
    from ..nbd import NBD_DEFAULT_PORT, NBDServer

    ctx = qemu_init_main_loop()
    try:
        bs, writethrough = _open(args)
    except (OSError, ValueError, TypeError) as e:
        return _error(f"Failed to blk_new_open '{args.filename}': {e}")
    try:
        # Before any worker thread exists: they inherit it (see affinity.py).
        apply_affinity(args.affinity, uses_thread_pool(bs))
    except AffinityError as e:
        bdrv_unref(bs)
        return _error(str(e))
    apply_pool_sched(args.affinity, bs)  # for the server's life
    server: Optional[NBDServer] = None
    stop = []

    def on_signal(signum: int, frame: Any) -> None:
        # Runs in the main thread between bytecodes; aio_notify only sets a
        # flag and writes the context's eventfd, so it is safe here.
        stop.append(signum)
        aio_notify(ctx)

    # The kernel may deliver the signal to any thread (the thread pool's
    # workers included); then nothing interrupts the main thread's
    # epoll_wait and the Python handler would only run at the next
    # unrelated wake-up.  signal.set_wakeup_fd makes the C-level handler
    # write to a pipe that the context watches, so the main thread wakes up
    # and runs on_signal whichever thread the signal hit.
    from ..aio import aio_set_fd_handler

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)

    def drain_wakeup(_: Any) -> None:
        try:
            while os.read(wake_r, 512):
                pass
        except BlockingIOError:
            pass

    aio_set_fd_handler(ctx, wake_r, False, drain_wakeup, None)
    old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            server = NBDServer(bs, args.export_name, ctx=ctx, readonly=args.read_only,
                               description=args.description, max_connections=args.shared,
                               persistent=args.persistent, writethrough=writethrough,
                               handshake_limit=args.handshake_limit)
            if args.socket:
                path = server.listen_unix(args.socket)
                uri = f"nbd+unix:///{args.export_name}?socket={path}"
            else:
                host = args.bind or "127.0.0.1"
                h, port = server.listen_tcp(host, NBD_DEFAULT_PORT if args.port is None
                                            else args.port)
                hh = f"[{h}]" if ":" in h else h
                uri = f"nbd://{hh}:{port}/{args.export_name}"
        except (OSError, ValueError) as e:
            if server is not None:
                server.close()
            bdrv_unref(bs)
            return _error(f"Failed to listen: {e}")
        if args.pid_file:
            with open(args.pid_file, "w") as f:
                f.write(f"{os.getpid()}\n")
        if args.print_uri:
            sys.stdout.write(uri + "\n")
            sys.stdout.flush()
        logging.getLogger("pyaioctx.nbd").info("serving %s on %s", args.filename, uri)
        server.run(lambda: bool(stop))
        server.close()
        bdrv_unref(bs)
        return 0
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        signal.set_wakeup_fd(old_wakeup)
        aio_set_fd_handler(ctx, wake_r, False, None, None)
        os.close(wake_r)
        os.close(wake_w)
        if args.pid_file:
            try:
                os.unlink(args.pid_file)
            except OSError:
                pass
