# SPDX-License-Identifier: GPL-2.0-or-later
"""The ``pyaioctx`` command.

Subcommands:

``pyaioctx io [options] [-c CMD]... FILENAME``
    qemu-io compatible disk exerciser (port of QEMU's qemu-io.c and
    qemu-io-cmds.c), see :mod:`pyaioctx.cli.qemu_io`.
``pyaioctx bench [options] [FILENAME]``
    qemu-img bench compatible benchmark (port of qemu-img.c's ``img_bench``)
    plus latency percentiles, CPU time and JSON; without FILENAME it compares
    every I/O backend of this machine on a scratch image, see
    :mod:`pyaioctx.cli.bench`.
``pyaioctx demo``
    a short live tour of the event loop (what ``python -m pyaioctx`` runs).

The subcommand modules are imported only when used, so ``pyaioctx io``
does not pay for ``bench``'s optional ``rich`` import and vice versa.
"""

from __future__ import annotations

import sys
from typing import Optional

__all__ = ["main"]

_USAGE = """usage: {prog} <command> [options]

commands:
  io      qemu-io compatible disk exerciser     ({prog} io -c help)
  bench   qemu-img bench compatible benchmark;  without FILENAME: compare
          every I/O backend of this machine     ({prog} bench --help)
  nbd     export a block device over NBD, qemu-nbd style ({prog} nbd --help)
  demo    a short live tour of the event loop
"""


def main(argv: Optional[list[str]] = None, prog: str = "pyaioctx",
         default: Optional[str] = None) -> int:
    """Entry point of the ``pyaioctx`` console script; returns the exit
    status.  ``default`` is the subcommand run when ``argv`` is empty
    (``python -m pyaioctx`` runs the demo)."""
    if argv is None:
        argv = sys.argv[1:]
    argv = list(argv)
    if not argv:
        if default is None:
            sys.stdout.write(_USAGE.format(prog=prog))
            return 0
        argv = [default]
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "io":
            from .qemu_io import main as io_main
            return io_main(rest)
        if cmd == "bench":
            from .bench import main as bench_main
            return bench_main(rest)
        if cmd == "nbd":
            from .nbd import main as nbd_main
            return nbd_main(rest)
        if cmd == "demo":
            from .demo import main as demo_main
            return demo_main(rest)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except BrokenPipeError:
        return 1
    if cmd in ("-h", "--help", "help"):
        sys.stdout.write(_USAGE.format(prog=prog))
        return 0
    sys.stderr.write(f"{prog}: unknown command '{cmd}'\n" + _USAGE.format(prog=prog))
    return 2
