# SPDX-License-Identifier: GPL-2.0-or-later
"""The qemu-io comparison cases shared by tests/test_cli_qemu_io.py and the
recorder (``python tests/qemu_io_cases.py``), which runs QEMU's own qemu-io
on each case and stores its output in tests/data/qemu_io/<name>.txt.

Every case starts from a fresh 1 MiB raw image whose first 64 KiB hold the
bytes 0..255 repeated and the rest zeros.  ``{img}`` in the arguments is
that image.  Timing figures are normalised away (:func:`normalise`); the
rest must be identical byte for byte.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

DATA = Path(__file__).resolve().parent / "data" / "qemu_io"
IMAGE_SIZE = 1 << 20


@dataclass
class Case:
    name: str
    args: list[str]
    stdin: Optional[str] = None            # interactive mode when set
    ours: Optional[list[str]] = None       # different arguments for pyaioctx
    why_ours: str = ""


def _c(*cmds: str) -> list[str]:
    out: list[str] = []
    for c in cmds:
        out += ["-c", c]
    return out


BLKDEBUG = ("driver=blkdebug,image.driver=file,image.filename={img},"
            "inject-error.0.iotype=read,inject-error.0.errno=5,inject-error.0.event=")

CASES = [
    Case("read_write_pattern", ["-f", "raw", *_c("write -P 0xab 4k 8k", "read -P 0xab 4k 8k",
                                                 "read -P 0xab 0 8k"), "{img}"]),
    Case("read_dump", ["-f", "raw", *_c("read -v 0 100", "read -v 65500 64"), "{img}"]),
    Case("read_machine", ["-f", "raw", *_c("read -q 0 512", "write -q -P 1 0 512",
                                           "read -q -P 1 0 512"), "{img}"]),
    Case("read_pattern_ranges", ["-f", "raw", *_c("write -P 0x11 0 4k", "read -P 0x11 -s 512 -l 1k 0 4k",
                                                  "read -P 0x11 -s 3k -l 2k 0 4k",
                                                  "read -P 0x22 -s 1k 0 4k", "read -s 1 0 4k",
                                                  "read -P 0x11 -l 5k 0 4k"), "{img}"]),
    Case("write_zeroes", ["-f", "raw", *_c("write -z 0 64k", "read -P 0 0 64k", "write -z -u 0 4k",
                                           "write -u 0 4k", "write -n 0 4k", "write -z -P 1 0 4k",
                                           "write -b -z 0 512", "write -f -c 0 512"), "{img}"]),
    Case("write_fua_sizes", ["-f", "raw", *_c("write -f 1k 0.5k", "write 0x200 0x400", "read 1k 1",
                                              "write 0 0", "read 0 0"), "{img}"]),
    Case("vectored", ["-f", "raw", *_c("writev -P 0x33 512 1k 512 3k", "readv -P 0x33 512 1k 512 3k",
                                       "readv -v 512 16 16", "readv -P 0x44 0 512",
                                       "writev 0 5G", "readv 0 x"), "{img}"]),
    Case("aio", ["-f", "raw", *_c("aio_write -P 0x55 0 4k", "aio_flush", "aio_read -P 0x55 0 4k",
                                  "aio_flush", "aio_read -P 0x66 0 512", "aio_flush",
                                  "aio_write -z 8k 4k", "aio_flush", "aio_read -v 8k 32",
                                  "aio_flush", "aio_write -z 0 1 2", "aio_write -u 0 1",
                                  "aio_read -i 0 1", "aio_write -i 0 1"), "{img}"]),
    Case("aio_errors", ["-f", "raw", *_c("aio_read 2M 512", "aio_flush", "aio_write 2M 512",
                                         "aio_flush"), "{img}"]),
    Case("discard_flush_length", ["-f", "raw", *_c("discard 0 64k", "discard -q 0 4k", "flush",
                                                   "length", "discard 0 3G", "discard 2M 512"),
                                  "{img}"]),
    Case("truncate", ["-f", "raw", *_c("truncate 2M", "length", "truncate 1536k", "length",
                                       "truncate -m bogus 1M", "truncate x", "truncate -m falloc 1M",
                                       "length"), "{img}"]),
    Case("info_alloc_map", ["-f", "raw", *_c("info", "alloc 0", "alloc 0 64k", "alloc 1M 4k", "map"),
                            "{img}"]),
    # The image is sparse past its first 64 KiB; raw files are allocated
    # everywhere (holes included), which alloc/map show.
    Case("sparse_alloc_map", ["-f", "raw", *_c("truncate 4M", "write -P 1 2M 4k", "alloc 0 1M",
                                               "alloc 64k 64k", "alloc 2M 8k", "alloc 100 1000",
                                               "alloc 4092k 8k", "alloc 5M 1", "map",
                                               "discard 0 64k", "write -z -u 1M 64k", "map",
                                               "alloc 0"), "{img}"]),
    Case("sparse_blkdebug_alloc_map", ["--image-opts", *_c("alloc 0 1M", "alloc 1M 4k", "map"),
                                       "driver=blkdebug,image.driver=file,image.filename={img}"]),
    Case("null_alloc_map", ["--image-opts", *_c("alloc 0 4k", "alloc 1048064 1k", "map"),
                            "driver=null-co,size=1M"]),
    Case("null_zeroes_alloc_map", ["--image-opts", *_c("alloc 0 4k", "map"),
                                   "driver=null-co,size=1M,read-zeroes=on"]),
    Case("bad_input", ["-f", "raw", *_c("read 0 3M", "read 1M 1", "read -- -1 1", "read 0 foo",
                                        "read 0 4kx", "read 0 8E", "read 0 1T", "read -P 256 0 1",
                                        "read -P zz 0 1", "read -P 0x 0 1", "read -x 0 1",
                                        "read -P", "read 0", "bogus", "write 0 5G", "sleep x",
                                        "sleep", "help bogus", "sigraise 99"), "{img}"]),
    Case("debug_cmds", ["-f", "raw", *_c("break read_aio x", "remove_break x", "resume x"), "{img}"]),
    Case("help_all", _c("help")),
    Case("help_cmds", _c("help read", "help readv", "help write", "help writev", "help aio_read",
                         "help aio_write", "help discard", "help open", "help reopen",
                         "help sigraise", "help r", "? length")),
    Case("no_file", _c("read 0 1", "length", "sleep 1", "open -o driver=raw {img}", "length",
                       "open {img}", "close", "close", "info")),
    Case("read_only", ["-f", "raw", "-r", *_c("write 0 512", "writev 0 512", "aio_write 0 512",
                                             "discard 0 512", "truncate 1M", "read 0 512"), "{img}"]),
    Case("missing_file", ["-f", "raw", *_c("read 0 1"), "{img}.missing"]),
    Case("cache_aio_options", ["-f", "raw", "-t", "none", "-i", "threads",
                               *_c("write -P 7 0 4k", "read -P 7 0 4k"), "{img}"]),
    Case("bad_cache", ["-f", "raw", "-t", "bogus", *_c("length"), "{img}"]),
    Case("bad_aio", ["-f", "raw", "-i", "bogus", *_c("length"), "{img}"]),
    Case("native_needs_direct", ["-f", "raw", "-i", "native", *_c("length"), "{img}"]),
    Case("quit", ["-f", "raw", *_c("length", "quit", "length"), "{img}"]),
    Case("image_opts_null", ["--image-opts", *_c("read -P 0 0 4k", "length", "info"),
                             "driver=null-co,size=1M,read-zeroes=on"]),
    Case("image_opts_null_bad", ["--image-opts", *_c("length"), "driver=null-co,bogus=1"]),
    Case("image_opts_unknown", ["--image-opts", *_c("length"), "driver=bogus"]),
    Case("image_opts_raw_file", ["--image-opts", *_c("read -P 0 64k 4k", "info"),
                                 "driver=raw,file.driver=file,file.filename={img}"]),
    Case("blkdebug", ["--image-opts", *_c("read 0 4k", "write -P 9 0 4k", "flush", "length"),
                      BLKDEBUG + "none"],
         ours=["--image-opts", *_c("read 0 4k", "write -P 9 0 4k", "flush", "length"),
               BLKDEBUG + "read_aio"],
         why_ours="QEMU fires 'none' rules on every request and 'read_aio' only from format "
                  "drivers; pyaioctx's blkdebug fires 'read_aio' on reads"),
    Case("interactive", ["-f", "raw", "{img}"], stdin="read -P 0 64k 512\nbogus\n\nlength\nquit\nlength\n"),
    Case("interactive_eof", ["-f", "raw", "{img}"], stdin="length\nread 0 1M"),
]


_STATS = re.compile(r"^(.*), (\d+) ops; .*\(.*/sec and .* ops/sec\)$")
_CSV = re.compile(r"^(-?\d+),(\d+),\d+:\d\d:\d\d\.\d\d,[-\w.]+,[-\w.]+$")


def normalise(text: str) -> str:
    """Replace the timing figures of qemu-io's statistics lines."""
    out = []
    for line in text.split("\n"):
        m = _STATS.match(line)
        if m:
            line = f"{m.group(1)}, {m.group(2)} ops; <timing>"
        else:
            m = _CSV.match(line)
            if m:
                line = f"{m.group(1)},{m.group(2)},<timing>"
        out.append(line)
    return "\n".join(out)


def make_image(path: str) -> None:
    with open(path, "wb") as f:
        f.write(bytes(range(256)) * 256)
        f.truncate(IMAGE_SIZE)


def expand(args: list[str], img: str) -> list[str]:
    return [a.replace("{img}", img) for a in args]


def render(stdout: str, stderr: str, rc: int, img: str) -> str:
    """One golden file: normalised stdout, stderr and the exit status, with
    the image path replaced by ``{img}``."""
    def clean(s: str) -> str:
        return normalise(s.replace(img, "{img}"))
    return f"== stdout ==\n{clean(stdout)}\n== stderr ==\n{clean(stderr)}\n== rc ==\n{rc}\n"


def run_qemu_io(case: Case, workdir: str, exe: str = "qemu-io") -> str:
    img = os.path.join(workdir, f"{case.name}.img")
    make_image(img)
    p = subprocess.run([exe, *expand(case.args, img)], input=case.stdin, capture_output=True,
                       text=True, timeout=60, stdin=None if case.stdin is not None else subprocess.DEVNULL)
    return render(p.stdout, p.stderr, p.returncode, img)


def record(workdir: str) -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        (DATA / f"{case.name}.txt").write_text(run_qemu_io(case, workdir))
        print("recorded", case.name)


if __name__ == "__main__":
    import tempfile
    # On a real disk (O_DIRECT cases): next to the tests, not in /tmp.
    root = Path(__file__).resolve().parent.parent / ".scratch"
    root.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as d:
        record(d)
    sys.exit(0)
