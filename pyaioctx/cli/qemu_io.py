# SPDX-License-Identifier: GPL-2.0-or-later
"""``pyaioctx io``: a qemu-io compatible disk exerciser.

A port of QEMU 7.2's qemu-io.c (option parsing, ``openfile``, the command
loop and the interactive prompt) and qemu-io-cmds.c (the command table, each
command's options, checks, messages and output: ``print_report``,
``dump_buffer``, ``cvtstr``, ``create_iovec``, ``qemu_io_alloc``), driving
pyaioctx's block layer.  Output matches qemu-io's byte for byte except the
timing figures of the statistics line.

Mapping onto pyaioctx's block layer:

* The ``raw`` format is QEMU's raw format driver on top of a protocol node;
  pyaioctx has no format layer, so ``raw`` over ``file`` (or over
  ``blkdebug``) opens the protocol node directly and ``info`` still says
  ``format name: raw``.
* Without ``-f`` QEMU probes the format; here every image is raw, so the
  probing warning is printed exactly as QEMU prints it for a raw image, and
  writes to the first sector that would turn the image into another format
  are refused with EPERM, as QEMU's raw driver does after probing.
* ``-t``/``-n`` cache modes become ``BDRV_O_NOCACHE``/``BDRV_O_NO_FLUSH`` and,
  for the writethrough modes (qemu-io's default!), FUA on every write, as
  QEMU's BlockBackend does with the write cache disabled.
* Messages that QEMU prints through ``error_report`` carry the prefix
  ``qemu-io: ``, so that scripts written for qemu-io's output work unchanged.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

from .. import coroutine as _co
from ..aio import aio_bh_schedule_oneshot, aio_poll, aio_set_fd_handler, qemu_init_main_loop
from ..iov import QEMUIOVector, qemu_iovec_add, qemu_iovec_init
from ..aio import aio_timer_new
from ..timer import QEMU_CLOCK_REALTIME, SCALE_MS, qemu_clock_get_ms, timer_free, timer_mod
from ..block import (
    BDRV_O_IO_URING, BDRV_O_NATIVE_AIO, BDRV_O_NOCACHE, BDRV_O_NO_FLUSH, BDRV_O_RDWR,
    BDRV_O_UNMAP, BDRV_REQ_FUA, BDRV_REQ_MAY_UNMAP, BDRV_REQ_NO_FALLBACK, BLOCK_ACCT_READ,
    BLOCK_ACCT_WRITE, PREALLOC_MODE_FALLOC, PREALLOC_MODE_FULL, PREALLOC_MODE_METADATA,
    PREALLOC_MODE_OFF, BlockDriverState, bdrv_aio_preadv, bdrv_aio_pwritev,
    bdrv_co_pwrite_zeroes, bdrv_dec_in_flight, bdrv_drain, bdrv_find_format, bdrv_flush,
    bdrv_getlength, bdrv_inc_in_flight, bdrv_is_allocated, bdrv_open, bdrv_pdiscard,
    bdrv_pread, bdrv_pwrite, bdrv_pwrite_zeroes, bdrv_truncate, bdrv_unref, block_acct_invalid,
    qemu_blockalign,
)
from .cutils import (
    BDRV_REQUEST_MAX_BYTES, cvtnum, cvtnum_err_text, cvtstr, parse_pattern, qemu_strtosz,
    strtol0, timestr,
)

__all__ = ["main", "QemuIO", "parse_keyval", "image_opts_to_options", "parse_cache_mode"]

PROGNAME = "qemu-io"
_INT_MAX = (1 << 31) - 1
_MISALIGN_OFFSET = 16           # qemu-io-cmds.c: MISALIGN_OFFSET
_NSIG = 65                      # Linux's NSIG, as qemu-io's sigraise checks
CMD_FLAG_GLOBAL = 0x1           # runs without a file, never checks one
CMD_NOFILE_OK = 0x2             # runs with or without a file


def _out(s: str) -> None:
    # Looked up at every call so that a replaced sys.stdout (pytest's capsys,
    # redirect_stdout) is honoured.
    sys.stdout.write(s)


def _err(s: str) -> None:
    # qemu-io writes diagnostics unbuffered to stderr; flush stdout first so
    # that an interleaved terminal shows them in program order.
    sys.stdout.flush()
    sys.stderr.write(s)
    sys.stderr.flush()


def error_report(msg: str) -> None:
    """QEMU's ``error_report``: ``qemu-io: msg`` on stderr."""
    _err(f"{PROGNAME}: {msg}\n")


# --------------------------------------------------------------------------
# getopt(3) as glibc implements it (qemu-io's commands use it)

class GetOpt:
    """glibc ``getopt`` with argument permutation: options may follow
    operands (``read 0 512 -v``), ``--`` ends the options.  Iterate to get
    ``(opt, optarg)`` pairs in order -- ``('?', None)`` after printing glibc's
    diagnostic for a bad option -- then read :attr:`operands`."""

    def __init__(self, argv: list[str], optstring: str) -> None:
        self.argv = argv
        self.optstring = optstring
        self.operands: list[str] = []

    def __iter__(self) -> Iterator[tuple[str, Optional[str]]]:
        args = self.argv[1:]
        name = self.argv[0]
        i = 0
        while i < len(args):
            a = args[i]
            i += 1
            if a == "--":
                self.operands.extend(args[i:])
                return
            if len(a) < 2 or a[0] != "-":
                self.operands.append(a)
                continue
            j = 1
            while j < len(a):
                c = a[j]
                j += 1
                k = self.optstring.find(c)
                if k < 0 or c == ":":
                    _err(f"{name}: invalid option -- '{c}'\n")
                    yield "?", None
                    continue
                if k + 1 < len(self.optstring) and self.optstring[k + 1] == ":":
                    if j < len(a):
                        optarg = a[j:]
                    elif i < len(args):
                        optarg = args[i]
                        i += 1
                    else:
                        _err(f"{name}: option requires an argument -- '{c}'\n")
                        yield "?", None
                        break
                    yield c, optarg
                    break
                yield c, None


# --------------------------------------------------------------------------
# Option strings (QEMU's keyval/QemuOpts syntax) and cache modes

# Keys whose dot is part of the name in pyaioctx's flat option dicts.
_FLAT_DOTTED = ("cache.direct", "cache.no-flush")
_BOOL_KEYS = frozenset(("cache.direct", "cache.no-flush", "read-only", "read-zeroes",
                        "once", "immediately", "auto-read-only", "force-share"))
_INT_KEYS = frozenset(("errno", "sector", "latency-ns", "align", "seed"))
_SIZE_KEYS = frozenset(("size",))


def parse_keyval(s: str) -> dict[str, str]:
    """Split ``key=value,key2=value2`` as QemuOpts does (``,,`` is a literal
    comma; a bare ``key`` means ``key=on``).  Raises ValueError for an empty
    key, with QEMU's message."""
    items: list[str] = []
    cur = []
    i = 0
    while i < len(s):
        ch = s[i]
        if ch == ",":
            if i + 1 < len(s) and s[i + 1] == ",":
                cur.append(",")
                i += 2
                continue
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    items.append("".join(cur))
    out: dict[str, str] = {}
    for item in items:
        if item == "":
            continue
        key, eq, value = item.partition("=")
        if not eq:
            value = "on"
        if key == "":
            raise ValueError(f"Invalid parameter '{item}'")
        out[key] = value
    return out


def _convert(key: str, value: str) -> Any:
    # QEMU converts option strings through the driver's option schema; the
    # pyaioctx drivers take Python values, so convert the keys they know.
    leaf = key
    if leaf in _BOOL_KEYS:
        if value in ("on", "true", "yes"):
            return True
        if value in ("off", "false", "no"):
            return False
        return value
    if leaf in _INT_KEYS:
        v = strtol0(value)
        return value if v is None else v
    if leaf in _SIZE_KEYS:
        v = qemu_strtosz(value)
        return value if v < 0 else v
    return value


def _split_key(key: str) -> list[str]:
    for flat in _FLAT_DOTTED:
        if key == flat or key.endswith("." + flat):
            head = key[: -len(flat)].rstrip(".")
            return (head.split(".") if head else []) + [flat]
    return key.split(".")


def _listify(d: Any) -> Any:
    # QEMU's qdict_crumple: a dict whose keys are 0..n-1 becomes a list.
    if not isinstance(d, dict):
        return d
    d = {k: _listify(v) for k, v in d.items()}
    if d and all(k.isdigit() for k in d):
        keys = sorted(d, key=int)
        if [int(k) for k in keys] == list(range(len(keys))):
            return [d[k] for k in keys]
    return d


def _map_raw(opts: dict) -> dict:
    # "raw" over a protocol is the protocol itself here (see the module
    # docstring); children without a driver default to "file".
    for child_key in ("file", "image"):
        child = opts.get(child_key)
        if isinstance(child, dict):
            child.setdefault("driver", "file")
            opts[child_key] = _map_raw(child)
    if opts.get("driver") == "raw":
        child = opts.pop("file", None)
        opts.pop("driver")
        if isinstance(child, str):
            child = {"driver": "file", "filename": child}
        elif child is None:
            child = {"driver": "file"}
        merged = dict(child)
        merged.update(opts)  # raw-level generic options (cache.*, read-only)
        return merged
    return opts


def image_opts_to_options(flat: dict[str, str]) -> dict:
    """QEMU's dotted option names (``image.filename``,
    ``inject-error.0.errno``) to the nested dict pyaioctx's ``bdrv_open``
    takes, with values converted for the keys the drivers know."""
    nested: dict = {}
    for key, value in flat.items():
        parts = _split_key(key)
        d = nested
        for p in parts[:-1]:
            nxt = d.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ValueError(f"Parameter '{p}' is both a value and a group")
            d = nxt
        d[parts[-1]] = _convert(parts[-1], value)
    return _listify(nested)


_CACHE_MODES = {
    # name: (BDRV_O_NOCACHE, BDRV_O_NO_FLUSH, writethrough) as in QEMU's
    # bdrv_parse_cache_mode.
    "none": (True, False, False), "off": (True, False, False),
    "writeback": (False, False, False),
    "unsafe": (False, True, False),
    "directsync": (True, False, True),
    "writethrough": (False, False, True),
}


def parse_cache_mode(mode: str, flags: int) -> Optional[tuple[int, bool]]:
    """Port of ``bdrv_parse_cache_mode``: ``(flags, writethrough)`` or None
    for an unknown mode."""
    if mode not in _CACHE_MODES:
        return None
    direct, noflush, wt = _CACHE_MODES[mode]
    flags &= ~(BDRV_O_NOCACHE | BDRV_O_NO_FLUSH)
    if direct:
        flags |= BDRV_O_NOCACHE
    if noflush:
        flags |= BDRV_O_NO_FLUSH
    return flags, wt


def parse_aio(mode: str, flags: int) -> Optional[int]:
    """Port of ``bdrv_parse_aio``."""
    flags &= ~(BDRV_O_NATIVE_AIO | BDRV_O_IO_URING)
    if mode == "native":
        return flags | BDRV_O_NATIVE_AIO
    if mode == "io_uring":
        return flags | BDRV_O_IO_URING
    if mode == "threads":
        return flags
    return None


def parse_discard(mode: str, flags: int) -> Optional[int]:
    """Port of ``bdrv_parse_discard_flags``."""
    if mode in ("off", "ignore"):
        return flags & ~BDRV_O_UNMAP
    if mode in ("on", "unmap"):
        return flags | BDRV_O_UNMAP
    return None


# Image magics QEMU's other format probes recognise: a probed raw image
# refuses a first-sector write that starts with one (raw_co_pwritev).
_FORMAT_MAGICS = (b"QFI\xfb", b"QED\x00", b"KDMV", b"COWD", b"# Disk DescriptorFile",
                  b"vhdxfile", b"conectix", b"LUKS\xba\xbe", b"<<< Oracle VM VirtualBox")


# --------------------------------------------------------------------------
# Buffers and output helpers

def dump_buffer(buf: Any, offset: int, length: int) -> None:
    """Port of qemu-io's ``dump_buffer``: 16 bytes per line, hex then the
    bytes that are ``isalnum`` in the C locale."""
    data = bytes(memoryview(buf)[:length])
    lines = []
    for i in range(0, length, 16):
        chunk = data[i:i + 16]
        hexpart = "".join("%02x " % b for b in chunk)
        text = "".join(chr(b) if (48 <= b <= 57 or 65 <= b <= 90 or 97 <= b <= 122) else "."
                       for b in chunk)
        lines.append("%08x:  %s %s\n" % (offset + i, hexpart, text))
    _out("".join(lines))


def _tdiv(value: float, t: float) -> float:
    if t > 0:
        return value / t
    return float("inf") if value else float("nan")


def print_report(op: str, t: float, offset: int, count: int, total: int, cnt: int,
                 cflag: bool) -> None:
    """Port of qemu-io's ``print_report``."""
    ts = timestr(t, cflag)
    if not cflag:
        _out(f"{op} {total}/{count} bytes at offset {offset}\n")
        _out("%s, %d ops; %s (%s/sec and %.4f ops/sec)\n"
             % (cvtstr(total), cnt, ts, cvtstr(_tdiv(total, t)), _tdiv(cnt, t)))
    else:
        _out("%d,%d,%s,%.3f,%.3f\n" % (total, cnt, ts, _tdiv(total, t), _tdiv(cnt, t)))


def _pattern_ok(buf: Any, start: int, length: int, pattern: int) -> bool:
    if length <= 0:
        return True
    return memoryview(buf)[start:start + length] == bytes((pattern,)) * length


@dataclass
class CmdInfo:
    """qemu-io's ``cmdinfo_t``."""
    name: str
    cfunc: Callable[[list[str]], int]
    argmin: int = 0
    argmax: int = 0
    flags: int = 0
    args: Optional[str] = None
    oneline: str = ""
    help: Optional[str] = None
    altname: Optional[str] = None
    perm_write: bool = False


# --------------------------------------------------------------------------
# Help texts (qemu-io-cmds.c)

_READ_HELP = """
 reads a range of bytes from the given offset

 Example:
 'read -v 512 1k' - dumps 1 kilobyte read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 -b, -- read from the VM state rather than the virtual disk
 -C, -- report statistics in a machine parsable format
 -l, -- length for pattern verification (only with -P)
 -p, -- ignored for backwards compatibility
 -P, -- use a pattern to verify read data
 -q, -- quiet mode, do not show I/O statistics
 -s, -- start offset for pattern verification (only with -P)
 -v, -- dump buffer to standard output

"""

_READV_HELP = """
 reads a range of bytes from the given offset into multiple buffers

 Example:
 'readv -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 Uses multiple iovec buffers if more than one byte range is specified.
 -C, -- report statistics in a machine parsable format
 -P, -- use a pattern to verify read data
 -v, -- dump buffer to standard output
 -q, -- quiet mode, do not show I/O statistics

"""

_WRITE_HELP = """
 writes a range of bytes from the given offset

 Example:
 'write 512 1k' - writes 1 kilobyte at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 -b, -- write to the VM state rather than the virtual disk
 -c, -- write compressed data with blk_write_compressed
 -f, -- use Force Unit Access semantics
 -n, -- with -z, don't allow slow fallback
 -p, -- ignored for backwards compatibility
 -P, -- use different pattern to fill file
 -s, -- use a pattern file to fill the write buffer
 -C, -- report statistics in a machine parsable format
 -q, -- quiet mode, do not show I/O statistics
 -u, -- with -z, allow unmapping
 -z, -- write zeroes using blk_co_pwrite_zeroes

"""

_WRITEV_HELP = """
 writes a range of bytes from the given offset source from multiple buffers

 Example:
 'writev 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 -P, -- use different pattern to fill file
 -C, -- report statistics in a machine parsable format
 -f, -- use Force Unit Access semantics
 -q, -- quiet mode, do not show I/O statistics

"""

_AIO_READ_HELP = """
 asynchronously reads a range of bytes from the given offset

 Example:
 'aio_read -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 The read is performed asynchronously and the aio_flush command must be
 used to ensure all outstanding aio requests have been completed.
 Note that due to its asynchronous nature, this command will be
 considered successful once the request is submitted, independently
 of potential I/O errors or pattern mismatches.
 -C, -- report statistics in a machine parsable format
 -P, -- use a pattern to verify read data
 -i, -- treat request as invalid, for exercising stats
 -v, -- dump buffer to standard output
 -q, -- quiet mode, do not show I/O statistics

"""

_AIO_WRITE_HELP = """
 asynchronously writes a range of bytes from the given offset source
 from multiple buffers

 Example:
 'aio_write 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 The write is performed asynchronously and the aio_flush command must be
 used to ensure all outstanding aio requests have been completed.
 Note that due to its asynchronous nature, this command will be
 considered successful once the request is submitted, independently
 of potential I/O errors or pattern mismatches.
 -P, -- use different pattern to fill file
 -C, -- report statistics in a machine parsable format
 -f, -- use Force Unit Access semantics
 -i, -- treat request as invalid, for exercising stats
 -q, -- quiet mode, do not show I/O statistics
 -u, -- with -z, allow unmapping
 -z, -- write zeroes using blk_aio_pwrite_zeroes

"""

_DISCARD_HELP = """
 discards a range of bytes from the given offset

 Example:
 'discard 512 1k' - discards 1 kilobyte from 512 bytes into the file

 Discards a segment of the currently open file.
 -C, -- report statistics in a machine parsable format
 -q, -- quiet mode, do not show I/O statistics

"""

_OPEN_HELP = """
 opens a new file in the requested mode

 Example:
 'open -n -o driver=raw /tmp/data' - opens raw data file read-write, uncached

 Opens a file for subsequent use by all of the other qemu-io commands.
 -r, -- open file read-only
 -s, -- use snapshot file
 -C, -- use copy-on-read
 -n, -- disable host cache, short for -t none
 -U, -- force shared permissions
 -k, -- use kernel AIO implementation (Linux only, prefer use of -i)
 -i, -- use AIO mode (threads, native or io_uring)
 -t, -- use the given cache mode for the image
 -d, -- use the given discard mode for the image
 -o, -- options to be given to the block driver
"""

_REOPEN_HELP = """
 Changes the open options of an already opened image

 Example:
 'reopen -o lazy-refcounts=on' - activates lazy refcount writeback on a qcow2 image

 -r, -- Reopen the image read-only
 -w, -- Reopen the image read-write
 -c, -- Change the cache mode to the given value
 -o, -- Changes block driver options (cf. 'open' command)

"""

_SIGRAISE_HELP = """
 raises the given signal

 Example:
 'sigraise 15' - raises SIGTERM

 Invokes raise(signal), where "signal" is the mandatory integer argument
 given to sigraise.

"""

_USAGE = """Usage: {prog} [OPTIONS]... [-c STRING]... [file]
QEMU Disk exerciser (pyaioctx, qemu-io 7.2 compatible)

  --image-opts         treat file as option string
  -c, --cmd STRING     execute command with its arguments
                       from the given string
  -f, --format FMT     specifies the block driver to use
  -r, --read-only      export read-only
  -n, --nocache        disable host cache, short for -t none
  -C, --copy-on-read   enable copy-on-read (no-op: no backing files)
  -m, --misalign       misalign allocations for O_DIRECT
  -k, --native-aio     use kernel AIO implementation
                       (Linux only, prefer use of -i)
  -i, --aio=MODE       use AIO mode (threads, native or io_uring)
  -t, --cache=MODE     use the given cache mode for the image
  -d, --discard=MODE   use the given discard mode for the image
  -U, --force-share    force shared permissions (accepted, no locking here)
  -h, --help           display this help and exit
  -V, --version        output version information and exit

See '{prog} -c help' for information on available commands.
"""


# --------------------------------------------------------------------------
# The exerciser

class _AioCtx:
    """qemu-io-cmds.c's ``struct aio_ctx``: one outstanding aio_read/aio_write."""

    def __init__(self, bs: BlockDriverState) -> None:
        self.bs = bs
        self.qiov = QEMUIOVector()
        self.offset = 0
        self.buf: Any = None
        self.qflag = self.vflag = self.cflag = self.pflag = self.zflag = False
        self.pattern = 0
        self.t1 = 0.0


class QemuIO:
    """One qemu-io instance: the open device, the command table and the
    ``-m``/cache settings.  :meth:`command` runs one command line and returns
    its result (negative errno on failure, as QEMU 7.2's ``qemuio_command``)."""

    def __init__(self) -> None:
        self.ctx = qemu_init_main_loop()
        self.bs: Optional[BlockDriverState] = None
        self.misalign = False
        self.writethrough = True
        self.fmt_label: Optional[str] = None    # what "info" calls the format
        self.probed = False
        self.quit = False
        self.open_args: Optional[tuple] = None  # for reopen
        self.cmdtab: list[CmdInfo] = sorted(self._commands(), key=lambda c: c.name)

    # -- opening ----------------------------------------------------------
    def openfile(self, name: Optional[str], flags: int, writethrough: bool,
                 opts: Optional[dict]) -> int:
        """Port of qemu-io.c's ``openfile``: 0 or 1 (with QEMU's message)."""
        if self.bs is not None:
            error_report("file open already, try 'help close'")
            return 1
        options = dict(opts or {})
        where = f" device {name}" if name else ""
        probed = False
        label: Optional[str] = None
        driver = options.get("driver")
        if name is not None:
            if driver is None and "file" not in options:
                # QEMU would probe; every image is raw here.
                _err(f"WARNING: Image format was not specified for '{name}' and probing "
                     f"guessed raw.\n         Automatically detecting the format is "
                     f"dangerous for raw images, write operations on block 0 will be "
                     f"restricted.\n         Specify the 'raw' format explicitly to remove "
                     f"the restrictions.\n")
                probed = True
                options["driver"] = "raw"
                driver = "raw"
            if driver == "raw":
                file_opts = options.get("file")
                if isinstance(file_opts, dict):
                    file_opts.setdefault("filename", name)
                else:
                    options["file"] = {"driver": "file", "filename": name}
            elif "filename" not in options:
                options["filename"] = name
        if driver == "raw":
            label = "raw"
        try:
            options = _map_raw(options)
            drv_name = options.get("driver")
            if isinstance(drv_name, str) and bdrv_find_format(drv_name) is None:
                raise ValueError(f"Unknown driver '{drv_name}'")
            bs = bdrv_open(None, options, flags)
        except OSError as e:
            msg = e.strerror if e.strerror else str(e)
            error_report(f"can't open{where}: {msg}")
            return 1
        except (ValueError, TypeError, RuntimeError) as e:
            error_report(f"can't open{where}: {e}")
            return 1
        self.bs = bs
        self.writethrough = writethrough
        self.fmt_label = label
        self.probed = probed
        self.open_args = (name, flags, writethrough, opts)
        return 0

    def close(self) -> None:
        """Drain (qemu-io's exit path runs ``bdrv_drain_all``) and close."""
        if self.bs is not None:
            bs, self.bs = self.bs, None
            bdrv_drain(bs)
            bdrv_unref(bs)

    # -- buffers ----------------------------------------------------------
    def alloc(self, length: int, pattern: int) -> Any:
        """Port of ``qemu_io_alloc``: an aligned buffer (deliberately
        misaligned by 16 bytes with ``-m``) filled with ``pattern``."""
        assert self.bs is not None
        extra = _MISALIGN_OFFSET if self.misalign else 0
        raw = qemu_blockalign(self.bs, length + extra)
        mv = memoryview(raw).cast("B")
        if length + extra:
            ctypes.memset(ctypes.addressof(ctypes.c_char.from_buffer(mv)), pattern,
                          length + extra)
        return mv[extra:] if extra else mv

    def alloc_from_file(self, length: int, file_name: str) -> Any:
        """Port of ``qemu_io_alloc_from_file``: the file's bytes, repeated."""
        try:
            with open(file_name, "rb") as f:
                data = f.read(length)
        except OSError as e:
            _err(f"{file_name}: {os.strerror(e.errno or errno.EIO)}\n")
            return None
        if not data and length:
            _err(f"{file_name}: file is empty\n")
            return None
        buf = self.alloc(length, 0)
        if length:
            reps = (data * (length // len(data) + 1))[:length]
            buf[:length] = reps
        return buf

    def create_iovec(self, args: list[str], pattern: int) -> Optional[tuple[QEMUIOVector, Any]]:
        """Port of ``create_iovec``: one buffer cut into the given lengths."""
        sizes = []
        count = 0
        for arg in args:
            n = cvtnum(arg)
            if n < 0:
                _out(cvtnum_err_text(n, arg) + "\n")
                return None
            if n > BDRV_REQUEST_MAX_BYTES:
                _out(f"Argument '{arg}' exceeds maximum size {BDRV_REQUEST_MAX_BYTES}\n")
                return None
            if count > BDRV_REQUEST_MAX_BYTES - n:
                _out(f"The total number of bytes exceed the maximum size "
                     f"{BDRV_REQUEST_MAX_BYTES}\n")
                return None
            sizes.append(n)
            count += n
        qiov = QEMUIOVector()
        qemu_iovec_init(qiov, len(sizes))
        buf = self.alloc(count, pattern)
        p = 0
        for n in sizes:
            qemu_iovec_add(qiov, buf[p:p + n])
            p += n
        return qiov, buf

    # -- request helpers ----------------------------------------------------
    def _wflags(self, flags: int) -> int:
        # QEMU's BlockBackend adds FUA to every write when the write cache is
        # off (writethrough, qemu-io's default).
        return flags | BDRV_REQ_FUA if self.writethrough else flags

    def _probe_refuses(self, offset: int, data: Any) -> bool:
        # raw_co_pwritev after probing: no write may make sector 0 look like
        # another image format.
        if not self.probed or offset != 0 or data is None:
            return False
        head = bytes(memoryview(data)[:512])
        return any(head.startswith(m) for m in _FORMAT_MAGICS)

    def _wait(self, cond: Callable[[], bool]) -> None:
        while cond():
            aio_poll(self.ctx, True)

    def _aio_call(self, call: Callable[[], int], cb: Callable[[Any, int], None],
                  opaque: Any) -> None:
        # A request the block layer has no bdrv_aio_* for (write zeroes), run
        # as QEMU's blk_aio_prwv does: in a coroutine, counted in flight, the
        # callback never before this returns.
        assert self.bs is not None
        bs = self.bs
        state = {"returned": False, "ret": None}

        def complete(_: Any) -> None:
            try:
                cb(opaque, state["ret"])
            finally:
                bdrv_dec_in_flight(bs)

        def entry(_: Any) -> None:
            state["ret"] = call()
            if state["returned"]:
                complete(None)

        bdrv_inc_in_flight(bs)
        co = _co.qemu_coroutine_create(entry, None)
        _co.qemu_coroutine_enter(co)
        state["returned"] = True
        if state["ret"] is not None:
            aio_bh_schedule_oneshot(self.ctx, complete, None)

    # -- dispatch ---------------------------------------------------------
    def find_command(self, name: str) -> Optional[CmdInfo]:
        for ct in self.cmdtab:
            if ct.name == name or (ct.altname is not None and ct.altname == name):
                return ct
        return None

    def command(self, line: str) -> int:
        """Port of ``qemuio_command``: split on single spaces (no quoting,
        like qemu-io's ``breakline``) and run the command."""
        v = [p for p in line.split(" ") if p]
        if not v:
            return 0
        ct = self.find_command(v[0])
        if ct is None:
            _err(f'command "{v[0]}" not found\n')
            return -errno.EINVAL
        if not (ct.flags & CMD_FLAG_GLOBAL) and not (ct.flags & CMD_NOFILE_OK) \
                and self.bs is None:
            _err("no file open, try 'help open'\n")
            return -errno.EINVAL
        argc = len(v) - 1
        if argc < ct.argmin or (ct.argmax != -1 and argc > ct.argmax):
            if ct.argmax == -1:
                _err(f"bad argument count {argc} to {v[0]}, expected at least "
                     f"{ct.argmin} arguments\n")
            elif ct.argmin == ct.argmax:
                _err(f"bad argument count {argc} to {v[0]}, expected {ct.argmin} arguments\n")
            else:
                _err(f"bad argument count {argc} to {v[0]}, expected between "
                     f"{ct.argmin} and {ct.argmax} arguments\n")
            return -errno.EINVAL
        if ct.perm_write and self.bs is not None and self.bs.read_only:
            # QEMU asks for BLK_PERM_WRITE before running the command.
            error_report("Block node is read-only")
            return -errno.EPERM
        try:
            return ct.cfunc(v)
        except (OSError, ValueError, TypeError) as e:
            # Never a traceback for bad input: report and fail the command.
            error_report(f"{v[0]}: {e}")
            return -errno.EINVAL

    def usage(self, ct: CmdInfo) -> int:
        """Port of ``qemuio_command_usage``."""
        _out(f"{ct.name} {ct.args} -- {ct.oneline}\n")
        return -errno.EINVAL

    # -- the commands -----------------------------------------------------
    def _commands(self) -> list[CmdInfo]:
        return [
            CmdInfo("help", self.help_f, 0, 1, CMD_FLAG_GLOBAL, "[command]",
                    "help for one or all commands", altname="?"),
            CmdInfo("read", self.read_f, 2, -1, 0, "[-abCqv] [-P pattern [-s off] [-l len]] off len",
                    "reads a number of bytes at a specified offset", _READ_HELP, "r"),
            CmdInfo("readv", self.readv_f, 2, -1, 0, "[-Cqv] [-P pattern] off len [len..]",
                    "reads a number of bytes at a specified offset", _READV_HELP),
            CmdInfo("write", self.write_f, 2, -1, 0,
                    "[-bcCfnquz] [-P pattern | -s source_file] off len",
                    "writes a number of bytes at a specified offset", _WRITE_HELP, "w", True),
            CmdInfo("writev", self.writev_f, 2, -1, 0, "[-Cfq] [-P pattern] off len [len..]",
                    "writes a number of bytes at a specified offset", _WRITEV_HELP, None, True),
            CmdInfo("aio_read", self.aio_read_f, 2, -1, 0, "[-Ciqv] [-P pattern] off len [len..]",
                    "asynchronously reads a number of bytes", _AIO_READ_HELP),
            CmdInfo("aio_write", self.aio_write_f, 2, -1, 0,
                    "[-Cfiquz] [-P pattern] off len [len..]",
                    "asynchronously writes a number of bytes", _AIO_WRITE_HELP, None, True),
            CmdInfo("aio_flush", self.aio_flush_f, 0, 0, 0, None,
                    "completes all outstanding aio requests"),
            CmdInfo("flush", self.flush_f, 0, 0, 0, None, "flush all in-core file state to disk",
                    altname="f"),
            CmdInfo("truncate", self.truncate_f, 1, 3, 0, "[-m prealloc_mode] off",
                    "truncates the current file at the given offset", altname="t",
                    perm_write=True),
            CmdInfo("length", self.length_f, 0, 0, 0, None, "gets the length of the current file",
                    altname="l"),
            CmdInfo("info", self.info_f, 0, 0, 0, None, "prints information about the current file",
                    altname="i"),
            CmdInfo("discard", self.discard_f, 2, -1, 0, "[-Cq] off len",
                    "discards a number of bytes at a specified offset", _DISCARD_HELP, "d", True),
            CmdInfo("alloc", self.alloc_f, 1, 2, 0, "offset [count]",
                    "checks if offset is allocated in the file", altname="a"),
            CmdInfo("map", self.map_f, 0, 0, 0, "", "prints the allocated areas of a file"),
            CmdInfo("reopen", self.reopen_f, 0, -1, 0, "[(-r|-w)] [-c cache] [-o options]",
                    "reopens an image with new options", _REOPEN_HELP),
            CmdInfo("break", self.break_f, 2, 2, 0, "event tag",
                    "sets a breakpoint on event and tags the stopped request as tag"),
            CmdInfo("remove_break", self.remove_break_f, 1, 1, 0, "tag",
                    "remove a breakpoint by tag"),
            CmdInfo("resume", self.resume_f, 1, 1, 0, "tag", "resumes the request tagged as tag"),
            CmdInfo("wait_break", self.wait_break_f, 1, 1, 0, "tag",
                    "waits for the suspension of a request"),
            CmdInfo("abort", self.abort_f, 0, 0, CMD_NOFILE_OK, None,
                    "simulate a program crash using abort(3)"),
            CmdInfo("sleep", self.sleep_f, 1, 1, CMD_NOFILE_OK, None,
                    "waits for the given value in milliseconds"),
            CmdInfo("sigraise", self.sigraise_f, 1, 1, CMD_NOFILE_OK, "signal", "raises a signal",
                    _SIGRAISE_HELP),
            CmdInfo("quit", self.quit_f, -1, -1, CMD_FLAG_GLOBAL, None, "exit the program",
                    altname="q"),
            CmdInfo("open", self.open_f, 1, -1, CMD_NOFILE_OK,
                    "[-rsCnkU] [-t cache] [-d discard] [-o options] [path]",
                    "open the file specified by path", _OPEN_HELP, "o"),
            CmdInfo("close", self.close_f, 0, 0, 0, None, "close the current open file",
                    altname="c"),
        ]

    def _offset_count(self, ops: list[str], max_check: bool, suffix: str = ""
                      ) -> Optional[tuple[int, int]]:
        offset = cvtnum(ops[0])
        if offset < 0:
            _out(cvtnum_err_text(offset, ops[0]) + "\n")
            return None
        count = cvtnum(ops[1])
        if count < 0:
            _out(cvtnum_err_text(count, ops[1]) + "\n")
            return None
        if max_check and count > BDRV_REQUEST_MAX_BYTES:
            _out(f"length cannot exceed {BDRV_REQUEST_MAX_BYTES}{suffix}, given {ops[1]}\n")
            return None
        return offset, count

    def read_f(self, argv: list[str]) -> int:
        """Port of ``read_f``."""
        cflag = qflag = vflag = pflag = sflag = lflag = bflag = False
        pattern = 0
        pattern_offset = pattern_count = 0
        g = GetOpt(argv, "bCl:pP:qs:v")
        ct = self.find_command("read")
        assert ct is not None
        for c, arg in g:
            if c == "b":
                bflag = True
            elif c == "C":
                cflag = True
            elif c == "l":
                lflag = True
                pattern_count = cvtnum(arg or "")
                if pattern_count < 0:
                    _out(cvtnum_err_text(pattern_count, arg or "") + "\n")
                    return -errno.EINVAL
            elif c == "p":
                pass  # ignored for backwards compatibility
            elif c == "P":
                pflag = True
                pattern = parse_pattern(arg or "")
                if pattern < 0:
                    _out(f"{arg} is not a valid pattern byte\n")
                    return -errno.EINVAL
            elif c == "q":
                qflag = True
            elif c == "s":
                sflag = True
                pattern_offset = cvtnum(arg or "")
                if pattern_offset < 0:
                    _out(cvtnum_err_text(pattern_offset, arg or "") + "\n")
                    return -errno.EINVAL
            elif c == "v":
                vflag = True
            else:
                return self.usage(ct)
        if len(g.operands) != 2:
            return self.usage(ct)
        oc = self._offset_count(g.operands, True)
        if oc is None:
            return -errno.EINVAL
        offset, count = oc
        if not pflag and (lflag or sflag):
            return self.usage(ct)
        if not lflag:
            pattern_count = count - pattern_offset
        if pattern_count < 0 or pattern_count + pattern_offset > count:
            _out("pattern verification range exceeds end of read data\n")
            return -errno.EINVAL
        if bflag:
            if offset % 512:
                _out(f"{offset} is not a sector-aligned value for 'offset'\n")
                return -errno.EINVAL
            if count % 512:
                _out(f"{count} is not a sector-aligned value for 'count'\n")
                return -errno.EINVAL
        assert self.bs is not None
        buf = self.alloc(count, 0xab)
        t1 = time.perf_counter()
        if bflag:
            ret = -errno.ENOTSUP  # no driver here has a VM state area
        elif count > _INT_MAX:
            ret = -errno.ERANGE
        else:
            ret = bdrv_pread(self.bs, offset, count, buf)
        t2 = time.perf_counter()
        if ret < 0:
            _out(f"read failed: {os.strerror(-ret)}\n")
            return ret
        ret = 0
        if pflag and not _pattern_ok(buf, pattern_offset, pattern_count, pattern):
            _out(f"Pattern verification failed at offset {offset + pattern_offset}, "
                 f"{pattern_count} bytes\n")
            ret = -errno.EINVAL
        if qflag:
            return ret
        if vflag:
            dump_buffer(buf, offset, count)
        print_report("read", t2 - t1, offset, count, count, 1, cflag)
        return ret

    def readv_f(self, argv: list[str]) -> int:
        """Port of ``readv_f`` (through the callback API, as QEMU's
        ``do_aio_readv``)."""
        cflag = qflag = vflag = pflag = False
        pattern = 0
        ct = self.find_command("readv")
        assert ct is not None
        g = GetOpt(argv, "CP:qv")
        for c, arg in g:
            if c == "C":
                cflag = True
            elif c == "P":
                pflag = True
                pattern = parse_pattern(arg or "")
                if pattern < 0:
                    _out(f"{arg} is not a valid pattern byte\n")
                    return -errno.EINVAL
            elif c == "q":
                qflag = True
            elif c == "v":
                vflag = True
            else:
                return self.usage(ct)
        if len(g.operands) < 2:
            return self.usage(ct)
        offset = cvtnum(g.operands[0])
        if offset < 0:
            _out(cvtnum_err_text(offset, g.operands[0]) + "\n")
            return -errno.EINVAL
        r = self.create_iovec(g.operands[1:], 0xab)
        if r is None:
            return -errno.EINVAL
        qiov, buf = r
        t1 = time.perf_counter()
        ret = self._do_aio(lambda cb: bdrv_aio_preadv(self.bs, offset, qiov, 0, cb, None))
        t2 = time.perf_counter()
        if ret < 0:
            _out(f"readv failed: {os.strerror(-ret)}\n")
            return ret
        ret = 0
        if pflag and not _pattern_ok(buf, 0, qiov.size, pattern):
            _out(f"Pattern verification failed at offset {offset}, {qiov.size} bytes\n")
            ret = -errno.EINVAL
        if qflag:
            return ret
        if vflag:
            dump_buffer(buf, offset, qiov.size)
        print_report("read", t2 - t1, offset, qiov.size, qiov.size, 1, cflag)
        return ret

    def _do_aio(self, submit: Callable[[Callable[[Any, int], None]], Any]) -> int:
        # QEMU's do_aio_readv/do_aio_writev: submit, then run the main loop
        # until the callback stored the result.
        result: list[Optional[int]] = [None]

        def done(_: Any, ret: int) -> None:
            result[0] = ret

        submit(done)
        self._wait(lambda: result[0] is None)
        return result[0]  # type: ignore[return-value]

    def write_f(self, argv: list[str]) -> int:
        """Port of ``write_f``."""
        cflag = qflag = bflag = pflag = zflag = compressed = sflag = False
        flags = 0
        pattern = 0xcd
        file_name = ""
        ct = self.find_command("write")
        assert ct is not None
        g = GetOpt(argv, "bcCfnpP:qs:uz")
        for c, arg in g:
            if c == "b":
                bflag = True
            elif c == "c":
                compressed = True
            elif c == "C":
                cflag = True
            elif c == "f":
                flags |= BDRV_REQ_FUA
            elif c == "n":
                flags |= BDRV_REQ_NO_FALLBACK
            elif c == "p":
                pass
            elif c == "P":
                pflag = True
                pattern = parse_pattern(arg or "")
                if pattern < 0:
                    _out(f"{arg} is not a valid pattern byte\n")
                    return -errno.EINVAL
            elif c == "q":
                qflag = True
            elif c == "s":
                sflag = True
                file_name = arg or ""
            elif c == "u":
                flags |= BDRV_REQ_MAY_UNMAP
            elif c == "z":
                zflag = True
            else:
                return self.usage(ct)
        if len(g.operands) != 2:
            return self.usage(ct)
        if bflag and zflag:
            _out("-b and -z cannot be specified at the same time\n")
            return -errno.EINVAL
        if (flags & BDRV_REQ_FUA) and (bflag or compressed):
            _out("-f and -b or -c cannot be specified at the same time\n")
            return -errno.EINVAL
        if (flags & BDRV_REQ_NO_FALLBACK) and not zflag:
            _out("-n requires -z to be specified\n")
            return -errno.EINVAL
        if (flags & BDRV_REQ_MAY_UNMAP) and not zflag:
            _out("-u requires -z to be specified\n")
            return -errno.EINVAL
        if int(zflag) + int(pflag) + int(sflag) > 1:
            _out("Only one of -z, -P, and -s can be specified at the same time\n")
            return -errno.EINVAL
        # The length limit does not apply to write-zeroes without fallback.
        oc = self._offset_count(g.operands, False)
        if oc is None:
            return -errno.EINVAL
        offset, count = oc
        if count > BDRV_REQUEST_MAX_BYTES and not (flags & BDRV_REQ_NO_FALLBACK):
            _out(f"length cannot exceed {BDRV_REQUEST_MAX_BYTES} without -n, "
                 f"given {g.operands[1]}\n")
            return -errno.EINVAL
        if bflag or compressed:
            if offset % 512:
                _out(f"{offset} is not a sector-aligned value for 'offset'\n")
                return -errno.EINVAL
            if count % 512:
                _out(f"{count} is not a sector-aligned value for 'count'\n")
                return -errno.EINVAL
        assert self.bs is not None
        buf = None
        if not zflag:
            buf = self.alloc_from_file(count, file_name) if sflag else self.alloc(count, pattern)
            if buf is None:
                return -errno.EINVAL
        t1 = time.perf_counter()
        if bflag or compressed:
            ret = -errno.ENOTSUP  # no VM state area, no compressed writes here
        elif zflag:
            ret = -errno.ERANGE if count > _INT_MAX else \
                bdrv_pwrite_zeroes(self.bs, offset, count, self._wflags(flags))
        elif count > _INT_MAX:
            ret = -errno.ERANGE
        elif self._probe_refuses(offset, buf):
            ret = -errno.EPERM
        else:
            ret = bdrv_pwrite(self.bs, offset, count, buf, self._wflags(flags))
        t2 = time.perf_counter()
        if ret < 0:
            _out(f"write failed: {os.strerror(-ret)}\n")
            return ret
        if qflag:
            return 0
        print_report("wrote", t2 - t1, offset, count, count, 1, cflag)
        return 0

    def writev_f(self, argv: list[str]) -> int:
        """Port of ``writev_f``."""
        cflag = qflag = False
        flags = 0
        pattern = 0xcd
        ct = self.find_command("writev")
        assert ct is not None
        g = GetOpt(argv, "CfqP:")
        for c, arg in g:
            if c == "C":
                cflag = True
            elif c == "f":
                flags |= BDRV_REQ_FUA
            elif c == "q":
                qflag = True
            elif c == "P":
                pattern = parse_pattern(arg or "")
                if pattern < 0:
                    _out(f"{arg} is not a valid pattern byte\n")
                    return -errno.EINVAL
            else:
                return self.usage(ct)
        if len(g.operands) < 2:
            return self.usage(ct)
        offset = cvtnum(g.operands[0])
        if offset < 0:
            _out(cvtnum_err_text(offset, g.operands[0]) + "\n")
            return -errno.EINVAL
        r = self.create_iovec(g.operands[1:], pattern)
        if r is None:
            return -errno.EINVAL
        qiov, buf = r
        t1 = time.perf_counter()
        if self._probe_refuses(offset, buf):
            ret = -errno.EPERM
        else:
            ret = self._do_aio(lambda cb: bdrv_aio_pwritev(self.bs, offset, qiov,
                                                           self._wflags(flags), cb, None))
        t2 = time.perf_counter()
        if ret < 0:
            _out(f"writev failed: {os.strerror(-ret)}\n")
            return ret
        if qflag:
            return 0
        print_report("wrote", t2 - t1, offset, qiov.size, qiov.size, 1, cflag)
        return 0

    def _aio_read_done(self, a: _AioCtx, ret: int) -> None:
        # Port of aio_read_done.
        t2 = time.perf_counter()
        if ret < 0:
            _out(f"readv failed: {os.strerror(-ret)}\n")
            return
        if a.pflag and not _pattern_ok(a.buf, 0, a.qiov.size, a.pattern):
            _out(f"Pattern verification failed at offset {a.offset}, {a.qiov.size} bytes\n")
        if a.qflag:
            return
        if a.vflag:
            dump_buffer(a.buf, a.offset, a.qiov.size)
        print_report("read", t2 - a.t1, a.offset, a.qiov.size, a.qiov.size, 1, a.cflag)

    def _aio_write_done(self, a: _AioCtx, ret: int, size: int) -> None:
        # Port of aio_write_done.
        t2 = time.perf_counter()
        if ret < 0:
            _out(f"aio_write failed: {os.strerror(-ret)}\n")
            return
        if a.qflag:
            return
        print_report("wrote", t2 - a.t1, a.offset, size, size, 1, a.cflag)

    def aio_read_f(self, argv: list[str]) -> int:
        """Port of ``aio_read_f``."""
        assert self.bs is not None
        a = _AioCtx(self.bs)
        ct = self.find_command("aio_read")
        assert ct is not None
        g = GetOpt(argv, "CP:iqv")
        for c, arg in g:
            if c == "C":
                a.cflag = True
            elif c == "P":
                a.pflag = True
                a.pattern = parse_pattern(arg or "")
                if a.pattern < 0:
                    _out(f"{arg} is not a valid pattern byte\n")
                    return -errno.EINVAL
            elif c == "i":
                _out("injecting invalid read request\n")
                block_acct_invalid(self.bs.acct, BLOCK_ACCT_READ)
                return 0
            elif c == "q":
                a.qflag = True
            elif c == "v":
                a.vflag = True
            else:
                return self.usage(ct)
        if len(g.operands) < 2:
            return self.usage(ct)
        a.offset = cvtnum(g.operands[0])
        if a.offset < 0:
            _out(cvtnum_err_text(a.offset, g.operands[0]) + "\n")
            return -errno.EINVAL
        r = self.create_iovec(g.operands[1:], 0xab)
        if r is None:
            block_acct_invalid(self.bs.acct, BLOCK_ACCT_READ)
            return -errno.EINVAL
        a.qiov, a.buf = r
        a.t1 = time.perf_counter()
        bdrv_aio_preadv(self.bs, a.offset, a.qiov, 0, lambda o, ret: self._aio_read_done(o, ret), a)
        return 0

    def aio_write_f(self, argv: list[str]) -> int:
        """Port of ``aio_write_f``."""
        assert self.bs is not None
        a = _AioCtx(self.bs)
        flags = 0
        pattern = 0xcd
        ct = self.find_command("aio_write")
        assert ct is not None
        g = GetOpt(argv, "CfiqP:uz")
        for c, arg in g:
            if c == "C":
                a.cflag = True
            elif c == "f":
                flags |= BDRV_REQ_FUA
            elif c == "q":
                a.qflag = True
            elif c == "u":
                flags |= BDRV_REQ_MAY_UNMAP
            elif c == "P":
                pattern = parse_pattern(arg or "")
                if pattern < 0:
                    _out(f"{arg} is not a valid pattern byte\n")
                    return -errno.EINVAL
            elif c == "i":
                _out("injecting invalid write request\n")
                block_acct_invalid(self.bs.acct, BLOCK_ACCT_WRITE)
                return 0
            elif c == "z":
                a.zflag = True
            else:
                return self.usage(ct)
        ops = g.operands
        if len(ops) < 2:
            return self.usage(ct)
        if a.zflag and len(ops) != 2:
            _out("-z supports only a single length parameter\n")
            return -errno.EINVAL
        if (flags & BDRV_REQ_MAY_UNMAP) and not a.zflag:
            _out("-u requires -z to be specified\n")
            return -errno.EINVAL
        # (QEMU's "-z and -P" check never fires here: aio_write's -P does not
        # set Pflag; the pattern is simply unused with -z.)
        a.offset = cvtnum(ops[0])
        if a.offset < 0:
            _out(cvtnum_err_text(a.offset, ops[0]) + "\n")
            return -errno.EINVAL
        bs = self.bs
        if a.zflag:
            count = cvtnum(ops[1])
            if count < 0:
                _out(cvtnum_err_text(count, ops[1]) + "\n")
                return -errno.EINVAL
            a.t1 = time.perf_counter()
            wflags = self._wflags(flags)
            self._aio_call(lambda: bdrv_co_pwrite_zeroes(bs, a.offset, count, wflags),
                           lambda o, ret: self._aio_write_done(o, ret, count), a)
            return 0
        r = self.create_iovec(ops[1:], pattern)
        if r is None:
            block_acct_invalid(bs.acct, BLOCK_ACCT_WRITE)
            return -errno.EINVAL
        a.qiov, a.buf = r
        a.t1 = time.perf_counter()
        size = a.qiov.size
        if self._probe_refuses(a.offset, a.buf):
            self._aio_call(lambda: -errno.EPERM,
                           lambda o, ret: self._aio_write_done(o, ret, size), a)
            return 0
        bdrv_aio_pwritev(bs, a.offset, a.qiov, self._wflags(flags),
                         lambda o, ret: self._aio_write_done(o, ret, size), a)
        return 0

    def aio_flush_f(self, argv: list[str]) -> int:
        """Port of ``aio_flush_f`` (``blk_drain_all``)."""
        assert self.bs is not None
        bdrv_drain(self.bs)
        return 0

    def flush_f(self, argv: list[str]) -> int:
        """Port of ``flush_f``: the result is the exit status, nothing printed."""
        assert self.bs is not None
        return bdrv_flush(self.bs)

    def truncate_f(self, argv: list[str]) -> int:
        """Port of ``truncate_f``."""
        assert self.bs is not None
        prealloc = PREALLOC_MODE_OFF
        modes = {"off": PREALLOC_MODE_OFF, "metadata": PREALLOC_MODE_METADATA,
                 "falloc": PREALLOC_MODE_FALLOC, "full": PREALLOC_MODE_FULL}
        ct = self.find_command("truncate")
        assert ct is not None
        g = GetOpt(argv, "m:")
        for c, arg in g:
            if c == "m":
                if arg not in modes:
                    error_report(f"Invalid preallocation mode '{arg}'")
                    return -errno.EINVAL
                prealloc = modes[arg]
            else:
                return self.usage(ct)
        if len(g.operands) != 1:
            return self.usage(ct)
        offset = cvtnum(g.operands[0])
        if offset < 0:
            _out(cvtnum_err_text(offset, g.operands[0]) + "\n")
            return -errno.EINVAL
        if prealloc != PREALLOC_MODE_OFF and offset < bdrv_getlength(self.bs):
            # file-posix's raw_co_truncate refuses this before touching the
            # file; pyaioctx's file driver would shrink.
            error_report("Cannot use preallocation for shrinking files")
            return -errno.ENOTSUP
        ret = bdrv_truncate(self.bs, offset, False, prealloc, 0)
        if ret < 0:
            if ret == -errno.ENOTSUP and prealloc != PREALLOC_MODE_OFF:
                name = [k for k, v in modes.items() if v == prealloc][0]
                error_report(f"Unsupported preallocation mode '{name}'")
            elif ret == -errno.ENOTSUP:
                error_report("Image format driver does not support resize")
            else:
                error_report(f"Could not resize file: {os.strerror(-ret)}")
            return ret
        return 0

    def length_f(self, argv: list[str]) -> int:
        """Port of ``length_f``."""
        assert self.bs is not None
        size = bdrv_getlength(self.bs)
        if size < 0:
            _out(f"getlength: {os.strerror(-size)}\n")
            return size
        _out(cvtstr(size) + "\n")
        return 0

    def info_f(self, argv: list[str]) -> int:
        """Port of ``info_f``.  Protocol drivers are QEMU's format *and*
        protocol, so QEMU prints their name twice; ``bdrv_get_info`` works
        for file and blkdebug (no clusters, no VM state) and fails for null."""
        assert self.bs is not None and self.bs.drv is not None
        drv = self.bs.drv
        if self.fmt_label is not None:
            _out(f"format name: {self.fmt_label}\n")
            has_info = True
        else:
            name = drv.format_name
            _out(f"format name: {name}\n")
            if drv.protocol_name:
                _out(f"format name: {drv.protocol_name}\n")
            has_info = name in ("file", "blkdebug", "host_device")
        if not has_info:
            return -errno.ENOTSUP
        _out("cluster size: 0 bytes\nvm state offset: 0 bytes\n")
        return 0

    def discard_f(self, argv: list[str]) -> int:
        """Port of ``discard_f``."""
        cflag = qflag = False
        ct = self.find_command("discard")
        assert ct is not None
        g = GetOpt(argv, "Cq")
        for c, _arg in g:
            if c == "C":
                cflag = True
            elif c == "q":
                qflag = True
            else:
                return self.usage(ct)
        if len(g.operands) != 2:
            return self.usage(ct)
        oc = self._offset_count(g.operands, True)
        if oc is None:
            return -errno.EINVAL
        offset, count = oc
        assert self.bs is not None
        t1 = time.perf_counter()
        ret = bdrv_pdiscard(self.bs, offset, count)
        t2 = time.perf_counter()
        if ret < 0:
            _out(f"discard failed: {os.strerror(-ret)}\n")
            return ret
        if not qflag:
            print_report("discard", t2 - t1, offset, count, count, 1, cflag)
        return 0

    def alloc_f(self, argv: list[str]) -> int:
        """Port of ``alloc_f``."""
        assert self.bs is not None
        start = cvtnum(argv[1])
        if start < 0:
            _out(cvtnum_err_text(start, argv[1]) + "\n")
            return -errno.EINVAL
        if len(argv) == 3:
            count = cvtnum(argv[2])
            if count < 0:
                _out(cvtnum_err_text(count, argv[2]) + "\n")
                return -errno.EINVAL
            if count > _INT_MAX * 512:
                _out(f"length argument cannot exceed {_INT_MAX * 512}, given {argv[2]}\n")
                return -errno.EINVAL
        else:
            count = 512
        remaining = count
        sum_alloc = 0
        offset = start
        while remaining:
            ret, num = bdrv_is_allocated(self.bs, offset, remaining)
            if ret < 0:
                _out(f"is_allocated failed: {os.strerror(-ret)}\n")
                return ret
            offset += num
            remaining -= num
            if ret:
                sum_alloc += num
            if num == 0:
                # At or past the end: the count shrinks to what exists.
                count -= remaining
                remaining = 0
        _out(f"{sum_alloc}/{count} bytes allocated at offset {cvtstr(start)}\n")
        return 0

    def _map_is_allocated(self, offset: int, bytes: int) -> tuple[int, int]:
        """Port of ``map_is_allocated``: the allocation status at ``offset``
        and how many bytes from there share it (``(-errno, 0)`` on error)."""
        assert self.bs is not None
        ret, num = bdrv_is_allocated(self.bs, offset, bytes)
        if ret < 0:
            return ret, 0
        firstret, pnum = ret, num
        while bytes > 0 and ret == firstret:
            offset += num
            bytes -= num
            ret, num = bdrv_is_allocated(self.bs, offset, bytes)
            if ret == firstret and num:
                pnum += num
            else:
                break
        return firstret, pnum

    def map_f(self, argv: list[str]) -> int:
        """Port of ``map_f``: the runs of allocated and unallocated bytes."""
        assert self.bs is not None
        offset = 0
        nbytes = bdrv_getlength(self.bs)
        if nbytes < 0:
            error_report(f"Failed to query image length: {os.strerror(-nbytes)}")
            return nbytes
        while nbytes:
            ret, num = self._map_is_allocated(offset, nbytes)
            if ret < 0:
                error_report(f"Failed to get allocation status: {os.strerror(-ret)}")
                return ret
            if not num:
                error_report("Unexpected end of image")
                return -errno.EIO
            retstr = "    allocated" if ret else "not allocated"
            _out(f"{cvtstr(num)} (0x{num:x}) bytes {retstr} at offset {cvtstr(offset)} "
                 f"(0x{offset:x})\n")
            offset += num
            nbytes -= num
        return 0

    def reopen_f(self, argv: list[str]) -> int:
        """Port of ``reopen_f``, as close + open with the new flags and
        options (pyaioctx has no bdrv_reopen)."""
        assert self.bs is not None and self.open_args is not None
        name, flags, writethrough, opts = self.open_args
        opts = dict(opts or {})
        has_rw = False
        ct = self.find_command("reopen")
        assert ct is not None
        g = GetOpt(argv, "c:o:rw")
        for c, arg in g:
            if c == "c":
                r = parse_cache_mode(arg or "", flags)
                if r is None:
                    error_report(f"Invalid cache option: {arg}")
                    return -errno.EINVAL
                flags, writethrough = r
            elif c == "o":
                try:
                    opts.update(image_opts_to_options(parse_keyval(arg or "")))
                except ValueError as e:
                    error_report(str(e))
                    return -errno.EINVAL
            elif c in ("r", "w"):
                if has_rw:
                    error_report("Only one -r/-w option may be given")
                    return -errno.EINVAL
                flags = flags & ~BDRV_O_RDWR if c == "r" else flags | BDRV_O_RDWR
                has_rw = True
            else:
                return self.usage(ct)
        if g.operands:
            return self.usage(ct)
        old = self.open_args
        self.close()
        probed = self.probed
        if self._quiet_open(name, flags, writethrough, opts, probed) != 0:
            # Back to the old state, as a failed bdrv_reopen leaves it.
            self._quiet_open(old[0], old[1], old[2], old[3], probed)
            return -errno.EINVAL
        return 0

    def _quiet_open(self, name: Optional[str], flags: int, wt: bool, opts: Optional[dict],
                    probed: bool) -> int:
        # Reopening must not repeat the probing warning.
        if probed and opts is not None and "driver" not in opts:
            opts = dict(opts, driver="raw")
        elif probed and opts is None:
            opts = {"driver": "raw"}
        ret = self.openfile(name, flags, wt, opts)
        if ret == 0:
            self.probed = probed
            if probed:
                self.open_args = (name, flags, wt, None)
        return ret

    def _debug_unsupported(self, fmt: str) -> int:
        # bdrv_debug_* return -ENOTSUP unless blkdebug supports breakpoints;
        # pyaioctx's blkdebug has no breakpoints.
        _out(fmt.format(os.strerror(errno.ENOTSUP)))
        return -errno.ENOTSUP

    def break_f(self, argv: list[str]) -> int:
        """Port of ``break_f``."""
        return self._debug_unsupported("Could not set breakpoint: {}\n")

    def remove_break_f(self, argv: list[str]) -> int:
        """Port of ``remove_break_f``."""
        return self._debug_unsupported(f"Could not remove breakpoint {argv[1]}: {{}}\n")

    def resume_f(self, argv: list[str]) -> int:
        """Port of ``resume_f``."""
        return self._debug_unsupported("Could not resume request: {}\n")

    def wait_break_f(self, argv: list[str]) -> int:
        """``wait_break_f``: QEMU would wait forever for a breakpoint that
        cannot exist; fail instead."""
        return self._debug_unsupported("Could not wait for breakpoint: {}\n")

    def abort_f(self, argv: list[str]) -> int:
        """Port of ``abort_f``: a deliberate crash (SIGABRT)."""
        sys.stdout.flush()
        sys.stderr.flush()
        os.abort()

    def sleep_f(self, argv: list[str]) -> int:
        """Port of ``sleep_f``: a timer, and the main loop until it fires."""
        ms = strtol0(argv[1])
        if ms is None or ms < 0:
            _out(f"{argv[1]} is not a valid number\n")
            return -errno.EINVAL
        expired = [False]
        timer = aio_timer_new(self.ctx, QEMU_CLOCK_REALTIME, SCALE_MS,
                              lambda _: expired.__setitem__(0, True), None)
        timer_mod(timer, qemu_clock_get_ms(QEMU_CLOCK_REALTIME) + ms)
        try:
            self._wait(lambda: not expired[0])
        finally:
            timer_free(timer)
        return 0

    def sigraise_f(self, argv: list[str]) -> int:
        """Port of ``sigraise_f``."""
        sig = cvtnum(argv[1])
        if sig < 0:
            _out(cvtnum_err_text(sig, argv[1]) + "\n")
            return -errno.EINVAL
        if sig > _NSIG:
            _out(f"signal argument '{argv[1]}' is too large to be a valid signal\n")
            return -errno.EINVAL
        sys.stdout.flush()
        sys.stderr.flush()
        signal.raise_signal(sig) if sig else None
        return 0

    def quit_f(self, argv: list[str]) -> int:
        """Port of ``quit_f``."""
        self.quit = True
        return 0

    def open_f(self, argv: list[str]) -> int:
        """Port of qemu-io.c's ``open_f``."""
        flags = BDRV_O_UNMAP
        readonly = False
        writethrough = True
        opts: dict = {}
        ct = self.find_command("open")
        assert ct is not None
        g = GetOpt(argv, "snCro:ki:t:d:U")
        for c, arg in g:
            if c == "s":
                error_report("snapshot mode (-s) is not supported")
                return -errno.ENOTSUP
            elif c == "n":
                flags |= BDRV_O_NOCACHE
                writethrough = False
            elif c in ("C", "U"):
                pass  # copy-on-read without backing files, no image locking
            elif c == "r":
                readonly = True
            elif c == "k":
                flags |= BDRV_O_NATIVE_AIO
            elif c == "t":
                r = parse_cache_mode(arg or "", flags)
                if r is None:
                    error_report(f"Invalid cache option: {arg}")
                    return -errno.EINVAL
                flags, writethrough = r
            elif c == "d":
                f2 = parse_discard(arg or "", flags)
                if f2 is None:
                    error_report(f"Invalid discard option: {arg}")
                    return -errno.EINVAL
                flags = f2
            elif c == "i":
                f2 = parse_aio(arg or "", flags)
                if f2 is None:
                    error_report(f"Invalid aio option: {arg}")
                    return -errno.EINVAL
                flags = f2
            elif c == "o":
                try:
                    opts.update(image_opts_to_options(parse_keyval(arg or "")))
                except ValueError as e:
                    error_report(str(e))
                    return -errno.EINVAL
            else:
                return self.usage(ct)
        if not readonly:
            flags |= BDRV_O_RDWR
        if len(g.operands) == 1:
            name: Optional[str] = g.operands[0]
        elif not g.operands:
            name = None
        else:
            return self.usage(ct)
        return -errno.EINVAL if self.openfile(name, flags, writethrough, opts or None) else 0

    def close_f(self, argv: list[str]) -> int:
        """Port of ``close_f``."""
        self.close()
        return 0

    def help_f(self, argv: list[str]) -> int:
        """Port of ``help_f`` (``help_all`` / ``help_onecmd``)."""
        if len(argv) == 1:
            for ct in self.cmdtab:
                _out(self._oneline(ct.name, ct))
            _out("\nUse 'help commandname' for extended help.\n")
            return 0
        ct = self.find_command(argv[1])
        if ct is None:
            _out(f"command {argv[1]} not found\n")
            return -errno.EINVAL
        _out(self._oneline(argv[1], ct))
        if ct.help:
            _out(ct.help)
        return 0

    @staticmethod
    def _oneline(cmd: str, ct: CmdInfo) -> str:
        return f"{cmd} " + (f"{ct.args} " if ct.args is not None else "") + f"-- {ct.oneline}\n"


# --------------------------------------------------------------------------
# The interactive loop (qemu-io.c's command_loop with the stdin fd handler)

class _LineReader:
    """Lines from a file descriptor, read only when the main loop says it
    is readable -- so aio completions print while qemu-io waits at its
    prompt, as QEMU's ``main_loop_wait`` does."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""
        self.eof = False

    def readline(self, ctx: Any) -> Optional[str]:
        while b"\n" not in self.buf and not self.eof:
            ready = [False]
            aio_set_fd_handler(ctx, self.fd, False, lambda _: ready.__setitem__(0, True),
                               None, None, None, None)
            try:
                while not ready[0]:
                    aio_poll(ctx, True)
            finally:
                aio_set_fd_handler(ctx, self.fd, False, None, None, None, None, None)
            chunk = os.read(self.fd, 4096)
            if not chunk:
                self.eof = True
            self.buf += chunk
        if not self.buf:
            return None
        line, sep, rest = self.buf.partition(b"\n")
        self.buf = rest
        # qemu-io's fgets path keeps at most 1023 characters; no need here.
        return line.decode("utf-8", "replace")


def command_loop(qio: QemuIO, cmds: list[str]) -> int:
    """Port of ``command_loop``: the ``-c`` commands, else the prompt.
    Returns the last error (negative) or 0."""
    last_error = 0
    if cmds:
        for c in cmds:
            if qio.quit:
                break
            ret = qio.command(c)
            if ret < 0:
                last_error = ret
        return last_error
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):
        return last_error
    reader = _LineReader(fd)
    while not qio.quit:
        _out(f"{PROGNAME}> ")
        sys.stdout.flush()
        line = reader.readline(qio.ctx)
        if line is None:
            break
        ret = qio.command(line)
        if ret < 0:
            last_error = ret
    return last_error


# --------------------------------------------------------------------------
# main

_LONGOPTS = {
    "help": ("h", False), "version": ("V", False), "cmd": ("c", True),
    "format": ("f", True), "read-only": ("r", False), "snapshot": ("s", False),
    "nocache": ("n", False), "copy-on-read": ("C", False), "misalign": ("m", False),
    "native-aio": ("k", False), "discard": ("d", True), "cache": ("t", True),
    "trace": ("T", True), "force-share": ("U", False), "aio": ("i", True),
    "image-opts": ("image-opts", False), "object": ("object", True),
}
_SHORTOPTS = "hVc:d:f:rsnCmki:t:T:U"


def _parse_main_args(argv: list[str]) -> Optional[tuple[list[tuple[str, Optional[str]]], list[str]]]:
    # getopt_long with permutation, glibc's messages.
    opts: list[tuple[str, Optional[str]]] = []
    operands: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        i += 1
        if a == "--":
            operands.extend(argv[i:])
            break
        if a.startswith("--"):
            name, eq, val = a[2:].partition("=")
            matches = [k for k in _LONGOPTS if k == name] or \
                [k for k in _LONGOPTS if k.startswith(name)]
            if len(matches) != 1:
                what = "ambiguous" if matches else "unrecognized"
                _err(f"{PROGNAME}: {what} option '{a}'\n")
                return None
            short, needs = _LONGOPTS[matches[0]]
            if needs:
                if not eq:
                    if i >= len(argv):
                        _err(f"{PROGNAME}: option '--{matches[0]}' requires an argument\n")
                        return None
                    val = argv[i]
                    i += 1
                opts.append((short, val))
            else:
                if eq:
                    _err(f"{PROGNAME}: option '--{matches[0]}' doesn't allow an argument\n")
                    return None
                opts.append((short, None))
            continue
        if len(a) < 2 or a[0] != "-":
            operands.append(a)
            continue
        j = 1
        while j < len(a):
            c = a[j]
            j += 1
            k = _SHORTOPTS.find(c)
            if k < 0 or c == ":":
                _err(f"{PROGNAME}: invalid option -- '{c}'\n")
                return None
            if k + 1 < len(_SHORTOPTS) and _SHORTOPTS[k + 1] == ":":
                if j < len(a):
                    opts.append((c, a[j:]))
                elif i < len(argv):
                    opts.append((c, argv[i]))
                    i += 1
                else:
                    _err(f"{PROGNAME}: option requires an argument -- '{c}'\n")
                    return None
                break
            opts.append((c, None))
    return opts, operands


def main(argv: Optional[list[str]] = None) -> int:
    """``pyaioctx io``: port of qemu-io.c's ``main``.  Returns the exit
    status: 0, or 1 when opening failed or any command failed."""
    if argv is None:
        argv = sys.argv[1:]
    parsed = _parse_main_args(list(argv))
    if parsed is None:
        _out(_USAGE.format(prog=PROGNAME))
        return 1
    opts, operands = parsed
    flags = BDRV_O_UNMAP
    writethrough = True
    readonly = False
    image_opts = False
    fmt: Optional[str] = None
    cmds: list[str] = []
    misalign = False
    for c, arg in opts:
        if c == "s":
            error_report("snapshot mode (-s) is not supported")
            return 1
        elif c == "n":
            flags |= BDRV_O_NOCACHE
            writethrough = False
        elif c == "C" or c == "U" or c == "T":
            pass  # no backing files, no image locking, no trace points
        elif c == "d":
            f2 = parse_discard(arg or "", flags)
            if f2 is None:
                error_report(f"Invalid discard option: {arg}")
                return 1
            flags = f2
        elif c == "f":
            fmt = arg
        elif c == "c":
            cmds.append(arg or "")
        elif c == "r":
            readonly = True
        elif c == "m":
            misalign = True
        elif c == "k":
            flags |= BDRV_O_NATIVE_AIO
        elif c == "i":
            f2 = parse_aio(arg or "", flags)
            if f2 is None:
                error_report(f"Invalid aio option: {arg}")
                return 1
            flags = f2
        elif c == "t":
            r = parse_cache_mode(arg or "", flags)
            if r is None:
                error_report(f"Invalid cache option: {arg}")
                return 1
            flags, writethrough = r
        elif c == "V":
            from .. import __version__
            _out(f"{PROGNAME} version 7.2 (pyaioctx {__version__})\n")
            return 0
        elif c == "h":
            _out(_USAGE.format(prog=PROGNAME))
            return 0
        elif c == "image-opts":
            image_opts = True
        elif c == "object":
            error_report("--object is not supported")
            return 1
    if len(operands) > 1:
        _out(_USAGE.format(prog=PROGNAME))
        return 1
    if image_opts and fmt:
        error_report("--image-opts and --format are mutually exclusive")
        return 1
    if not readonly:
        flags |= BDRV_O_RDWR

    qio = QemuIO()
    qio.misalign = misalign
    try:
        if operands:
            if image_opts:
                try:
                    o = image_opts_to_options(parse_keyval(operands[0]))
                except ValueError as e:
                    error_report(str(e))
                    return 1
                if qio.openfile(None, flags, writethrough, o):
                    return 1
            else:
                if qio.openfile(operands[0], flags, writethrough,
                                {"driver": fmt} if fmt else None):
                    return 1
        ret = command_loop(qio, cmds)
    finally:
        # qemu-io drains before it exits, so outstanding aio requests still
        # print their results.
        qio.close()
        sys.stdout.flush()
    return 1 if ret < 0 else 0
