# SPDX-License-Identifier: GPL-2.0-or-later
"""Number parsing and formatting shared by ``pyaioctx io`` and ``pyaioctx bench``.

Ports of QEMU's ``qemu_strtosz`` (util/cutils.c), qemu-io's ``cvtnum``,
``print_cvtnum_err``, ``cvtstr``, ``timestr`` and ``parse_pattern``
(qemu-io-cmds.c), and C's ``strtol(s, &end, 0)`` where qemu-io uses it.
Every function returns what the C one returns (a negative errno for errors)
so that the callers can print QEMU's exact messages.
"""

from __future__ import annotations

import errno
import re
from typing import Optional

__all__ = [
    "qemu_strtosz", "cvtnum", "cvtnum_err_text", "cvtstr", "timestr", "strtol0",
    "parse_pattern", "INT64_MAX", "BDRV_REQUEST_MAX_BYTES",
]

INT64_MAX = (1 << 63) - 1
UINT64_MAX = (1 << 64) - 1
#: include/block/block-common.h: BDRV_REQUEST_MAX_SECTORS << BDRV_SECTOR_BITS
BDRV_REQUEST_MAX_BYTES = ((1 << 31) - 1) >> 9 << 9

# do_strtosz's suffix table: the unit letters, case-insensitive, powers of 1024.
_SUFFIX = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}

# The integer part as qemu_strtou64 reads it (an optional '+', decimal or
# 0x-hex), then an optional fraction made of digits only (QEMU refuses
# exponents), then at most one suffix letter.
_SIZE_RE = re.compile(r"^\s*\+?(?:(0[xX][0-9a-fA-F]+)|([0-9]+))(\.[0-9]*)?([A-Za-z]?)$")


def qemu_strtosz(s: str, default_suffix: str = "b") -> int:
    """Port of ``qemu_strtosz`` (``do_strtosz`` with unit 1024): the value in
    bytes, or ``-EINVAL`` (not a size, unknown suffix, negative, a fraction
    without a unit or on a hex number) or ``-ERANGE`` (above 2**64 - 1)."""
    m = _SIZE_RE.match(s)
    if m is None:
        return -errno.EINVAL
    hexpart, decpart, frac, suffix = m.groups()
    if hexpart is not None:
        if frac is not None:
            return -errno.EINVAL  # QEMU: hex with a fraction is ambiguous
        val = int(hexpart, 16)
    else:
        val = int(decpart)
    unit = suffix.lower() if suffix else default_suffix
    if unit not in _SUFFIX:
        return -errno.EINVAL
    shift = _SUFFIX[unit]
    fraction = 0.0
    if frac is not None:
        # A fraction needs a unit bigger than a byte: "1.5" and "1.5B" are
        # refused, "1.5k" is 1536.
        if shift == 0:
            return -errno.EINVAL
        fraction = float("0" + frac) if len(frac) > 1 else 0.0
    mul = 1 << shift
    frac_bytes = int(fraction * mul)  # truncation, like the C cast
    if val > (UINT64_MAX - frac_bytes) // mul:
        return -errno.ERANGE
    return val * mul + frac_bytes


def cvtnum(s: str) -> int:
    """qemu-io's ``cvtnum``: :func:`qemu_strtosz`, refusing values above
    INT64_MAX with ``-ERANGE``."""
    v = qemu_strtosz(s)
    if v < 0:
        return v
    if v > INT64_MAX:
        return -errno.ERANGE
    return v


def cvtnum_err_text(rc: int, arg: str) -> str:
    """The line qemu-io's ``print_cvtnum_err`` prints (without newline)."""
    if rc == -errno.EINVAL:
        return f"Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {arg}"
    if rc == -errno.ERANGE:
        return f"Parsing error: argument too large -- {arg}"
    return f"Parsing error: {arg}"


def cvtstr(value: float) -> str:
    """Port of qemu-io's ``cvtstr``: "64 KiB", "1.500 MiB", "40 bytes".

    Three decimals in the unit just below the value, then the first ".000"
    (if any) and everything after it is replaced by the unit -- exactly the
    C function's ``strstr``/``strcpy`` trick, including its quirks (bytes
    are printed with ``%f``)."""
    for shift, suffix in ((60, " EiB"), (50, " PiB"), (40, " TiB"), (30, " GiB"),
                          (20, " MiB"), (10, " KiB")):
        if value >= (1 << shift):
            s = "%.3f" % (value / (1 << shift))
            break
    else:
        suffix = " bytes"
        s = "%f" % value
    i = s.find(".000")
    return (s[:i] if i >= 0 else s) + suffix


def timestr(seconds: float, verbose: bool) -> str:
    """Port of qemu-io's ``timestr`` (QEMU 7.2, timespec based):
    ``"00.12 sec"`` below one second, ``"H:MM:SS.ss"`` above it or with
    ``verbose`` (qemu-io's VERBOSE_FIXED_TIME, used by ``-C``)."""
    ns = max(0, int(round(seconds * 1e9)))
    sec, nsec = divmod(ns, 1_000_000_000)
    frac = nsec / 1e9
    if verbose or sec:
        return "%u:%02u:%05.2f" % (sec // 3600, (sec % 3600) // 60, (sec % 60) + frac)
    return "%05.2f sec" % frac


def strtol0(s: str) -> Optional[int]:
    """C's ``strtol(s, &end, 0)`` requiring ``*end == '\\0'``: decimal,
    ``0x`` hex or ``0`` octal, optional sign and leading white space.
    None when the whole string is not one number (qemu-io's test of
    ``endptr``).  An empty string parses as 0, as in C."""
    t = s.lstrip(" \t\n\r\f\v")
    if t == "":
        return 0 if s == "" else None
    m = re.fullmatch(r"([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", t)
    if m is None:
        return None
    sign, digits = m.groups()
    if digits[:2] in ("0x", "0X"):
        v = int(digits, 16)
    elif digits.startswith("0"):
        v = int(digits, 8)
    else:
        v = int(digits)
    v = -v if sign == "-" else v
    # strtol saturates at LONG_MIN/LONG_MAX (and sets ERANGE, which qemu-io
    # does not look at).
    return max(-(1 << 63), min((1 << 63) - 1, v))


def parse_pattern(arg: str) -> int:
    """Port of qemu-io's ``parse_pattern``: a byte value 0..255 or -1."""
    v = strtol0(arg)
    if v is None or v < 0 or v > 255:
        return -1
    return v
