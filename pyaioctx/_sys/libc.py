# SPDX-License-Identifier: GPL-2.0-or-later
"""The one place that loads libc and knows syscall numbers.

Every kernel interface pyaioctx uses (eventfd, Linux AIO, io_uring, aligned
memory) goes through this module or its siblings in ``pyaioctx._sys``; nothing
else in the package imports :mod:`ctypes` for libc.

Some facts this module relies on:

* ``libc.syscall()`` returns -1 and sets ``errno`` on failure, unlike libaio's
  wrappers which return ``-errno``.  Mixing the two conventions garbles error
  reports, so :func:`syscall_checked` always reads ``ctypes.get_errno()`` and
  returns ``-errno``, the convention QEMU's callers expect.
* Syscall numbers differ per architecture; only the ones we know are listed.
  On an unknown architecture the native backends report themselves as
  unavailable instead of failing at import.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys

__all__ = [
    "libc",
    "LIBC_AVAILABLE",
    "NR",
    "syscall",
    "syscall_checked",
    "errno_name",
]

_machine = platform.machine().lower()

# Syscall numbers we need, per architecture (from asm/unistd*.h).
_NR_TABLE: dict[str, dict[str, int]] = {
    "x86_64": {
        "io_setup": 206,
        "io_destroy": 207,
        "io_getevents": 208,
        "io_submit": 209,
        "io_cancel": 210,
        "io_uring_setup": 425,
        "io_uring_enter": 426,
        "io_uring_register": 427,
    },
    # asm-generic numbering (aarch64, riscv64, loongarch64)
    "aarch64": {
        "io_setup": 0,
        "io_destroy": 1,
        "io_submit": 2,
        "io_cancel": 3,
        "io_getevents": 4,
        "io_uring_setup": 425,
        "io_uring_enter": 426,
        "io_uring_register": 427,
    },
}
_NR_TABLE["arm64"] = _NR_TABLE["aarch64"]
_NR_TABLE["riscv64"] = _NR_TABLE["aarch64"]
_NR_TABLE["amd64"] = _NR_TABLE["x86_64"]

#: Syscall numbers for this machine; empty on an unknown architecture.
NR: dict[str, int] = dict(_NR_TABLE.get(_machine, {})) if sys.platform.startswith("linux") else {}

try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    LIBC_AVAILABLE = True
except OSError:  # pragma: no cover - every POSIX system has a libc
    libc = None  # type: ignore[assignment]
    LIBC_AVAILABLE = False

if libc is not None and hasattr(libc, "syscall"):
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
else:  # pragma: no cover
    syscall = None  # type: ignore[assignment]


def syscall_checked(*args: object) -> int:
    """Call ``syscall(*args)`` and return its result, or ``-errno`` on failure.

    The caller passes ctypes-compatible arguments (ints are passed as C
    ``long`` only if wrapped; plain Python ints become C ``int``, which is
    fine for numbers and fds but not for pointers or 64-bit values).
    """
    ret = syscall(*args)
    if ret == -1:
        return -ctypes.get_errno()
    return ret


def errno_name(err: int) -> str:
    """``errno_name(-22) == 'EINVAL'``; tolerant of either sign."""
    import errno as _errno

    return _errno.errorcode.get(abs(err), str(abs(err)))


def strerror(err: int) -> str:
    """``os.strerror`` that accepts QEMU's negative errno values."""
    return os.strerror(abs(err))


# fallocate(2) with a mode (os.posix_fallocate has none): punch holes and
# zero ranges.  The offsets are 64-bit, so argtypes are mandatory.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

try:
    _fallocate = libc["fallocate"] if libc is not None else None
    if _fallocate is not None:
        _fallocate.restype = ctypes.c_int
        _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
except (AttributeError, TypeError):  # pragma: no cover - non-Linux libc
    _fallocate = None


def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """``fallocate(fd, mode, offset, length)``: 0, or ``-errno`` (EINTR retried).

    ``-ENOSYS`` where libc has no fallocate.
    """
    import errno as _errno

    if _fallocate is None:
        return -_errno.ENOSYS
    while True:
        if _fallocate(fd, mode, offset, length) == 0:
            return 0
        err = ctypes.get_errno()
        if err != _errno.EINTR:
            return -err
