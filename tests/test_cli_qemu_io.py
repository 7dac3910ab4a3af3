# SPDX-License-Identifier: GPL-2.0-or-later
"""``pyaioctx io`` against qemu-io (QEMU 7.2).

Each case of tests/qemu_io_cases.py runs in-process and must reproduce the
output recorded from QEMU's qemu-io in tests/data/qemu_io/ byte for byte,
timing figures aside; when qemu-io is installed the same case also runs
against the live binary on a copy of the same image.  Plus the parsers
(cvtnum, cvtstr, timestr, patterns, option strings, getopt) on their own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pyaioctx.cli import main as cli_main
from pyaioctx.cli import cutils
from pyaioctx.cli.qemu_io import GetOpt, image_opts_to_options, parse_cache_mode, parse_keyval
from pyaioctx.block import BDRV_O_NOCACHE, BDRV_O_NO_FLUSH

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qemu_io_cases import CASES, DATA, Case, expand, make_image, render, run_qemu_io  # noqa: E402

QEMU_IO = shutil.which("qemu-io")
ROOT = Path(__file__).resolve().parent.parent


def run_ours(case: Case, workdir: Path, capsys: pytest.CaptureFixture, monkeypatch) -> str:
    img = str(workdir / f"{case.name}.img")
    make_image(img)
    args = expand(case.ours or case.args, img)
    if case.stdin is not None:
        r, w = os.pipe()
        os.write(w, case.stdin.encode())
        os.close(w)

        class _Stdin:
            def fileno(self) -> int:
                return r
        monkeypatch.setattr(sys, "stdin", _Stdin())
    else:
        r = -1
    try:
        capsys.readouterr()
        rc = cli_main(["io", *args])
        out, err = capsys.readouterr()
    finally:
        if r >= 0:
            os.close(r)
    return render(out, err, rc, img)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_against_recorded_qemu_io(case: Case, disk_dir: Path, capsys, monkeypatch) -> None:
    golden = (DATA / f"{case.name}.txt").read_text()
    assert run_ours(case, disk_dir, capsys, monkeypatch) == golden


@pytest.mark.skipif(QEMU_IO is None, reason="qemu-io is not installed")
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_against_live_qemu_io(case: Case, disk_dir: Path, capsys, monkeypatch) -> None:
    live = run_qemu_io(case, str(disk_dir), QEMU_IO or "qemu-io")
    if "version 7.2" not in subprocess.run([QEMU_IO, "--version"], capture_output=True,
                                           text=True).stdout and live != (DATA / f"{case.name}.txt").read_text():
        pytest.skip("the installed qemu-io is not 7.2 and differs from the recording")
    ours_dir = disk_dir / "ours"
    ours_dir.mkdir()
    assert run_ours(case, ours_dir, capsys, monkeypatch).replace(str(ours_dir), str(disk_dir)) == live


def test_recordings_cover_every_case() -> None:
    assert sorted(p.stem for p in DATA.glob("*.txt")) == sorted(c.name for c in CASES)


def test_data_written_is_data_read(disk_dir: Path, capsys) -> None:
    img = str(disk_dir / "d.img")
    make_image(img)
    assert cli_main(["io", "-f", "raw", "-c", "write -P 0x5c 100 1000", "-c", "writev -P 0x5d 4k 512 512",
                     img]) == 0
    data = Path(img).read_bytes()
    assert data[100:1100] == b"\x5c" * 1000 and data[99] == 99 and data[1100] == 1100 % 256
    assert data[4096:5120] == b"\x5d" * 1024


def test_misalign_and_nocache(disk_dir: Path, capsys) -> None:
    img = str(disk_dir / "m.img")
    make_image(img)
    assert cli_main(["io", "-f", "raw", "-m", "-n", "-c", "write -P 3 512 3584",
                     "-c", "read -P 3 512 3584", img]) == 0
    assert "Pattern" not in capsys.readouterr().out


@pytest.mark.parametrize("aio", ["native", "io_uring"])
def test_aio_backends(aio: str, disk_dir: Path, capsys) -> None:
    from pyaioctx.block.file_posix import aio_engine_available
    ok, why = aio_engine_available(aio)
    if not ok:
        pytest.skip(why)
    img = str(disk_dir / "a.img")
    make_image(img)
    rc = cli_main(["io", "-f", "raw", "-n", "-i", aio, "-c", "aio_write -P 4 0 8k", "-c", "aio_read -P 0 64k 4k",
                   "-c", "aio_flush", "-c", "read -P 4 0 8k", img])
    out = capsys.readouterr().out
    assert rc == 0 and "Pattern" not in out and out.count("bytes at offset") == 3


def test_console_entry_subprocess(disk_dir: Path) -> None:
    img = str(disk_dir / "s.img")
    make_image(img)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "pyaioctx", "io", "-f", "raw", "-c", "read -P 0 64k 4k",
                        "-c", "length", img], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("read 4096/4096 bytes at offset 65536\n") and p.stdout.endswith("1 MiB\n")
    # Interactive mode on a pipe, and abort is a real crash (SIGABRT).
    p = subprocess.run([sys.executable, "-m", "pyaioctx", "io"], input="help quit\nabort\n",
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.stdout == "qemu-io> quit -- exit the program\nqemu-io> "
    assert p.returncode == -6


def test_python_m_without_args_runs_demo() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "pyaioctx"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert p.returncode == 0 and "all steps observed" in p.stdout


def test_cli_usage_and_unknown_command(capsys) -> None:
    assert cli_main([]) == 0
    assert "io" in capsys.readouterr().out
    assert cli_main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert cli_main(["io", "-x"]) == 1
    cap = capsys.readouterr()
    assert cap.err == "qemu-io: invalid option -- 'x'\n" and cap.out.startswith("Usage: qemu-io")
    assert cli_main(["io", "a", "b"]) == 1


# -- the parsers ----------------------------------------------------------

@pytest.mark.parametrize("s,v", [
    ("0", 0), ("512", 512), ("1k", 1024), ("1K", 1024), ("0.5k", 512), ("1.k", 1024),
    ("1.0000000001k", 1024), ("0x200", 512), ("0x1k", 1024), ("1b", 1), ("+1", 1), ("010", 10),
    ("7E", 7 << 60), ("9223372036854775807", (1 << 63) - 1),
    ("1.5", -22), ("1.5B", -22), ("1e3", -22), ("", -22), ("0x", -22), (".5k", -22), ("-0", -22),
    ("1kb", -22), ("0x1.5k", -22), ("1M1", -22), ("8E", -34), ("9223372036854775808", -34),
    ("99999999999999999999", -34),
])
def test_cvtnum(s: str, v: int) -> None:
    assert cutils.cvtnum(s) == v


@pytest.mark.parametrize("v,s", [(0, "0 bytes"), (40, "40 bytes"), (1024, "1 KiB"), (1536, "1.500 KiB"),
                                 (65536, "64 KiB"), (1 << 20, "1 MiB"), (0.5, "0.500000 bytes"),
                                 (3 << 40, "3 TiB"), (1.0005 * 1024, "1 KiB")])
def test_cvtstr(v: float, s: str) -> None:
    assert cutils.cvtstr(v) == s


def test_timestr() -> None:
    assert cutils.timestr(0.0123, False) == "00.01 sec"
    assert cutils.timestr(0.0123, True) == "0:00:00.01"
    assert cutils.timestr(3723.5, False) == "1:02:03.50"


@pytest.mark.parametrize("s,v", [("0xab", 0xab), ("255", 255), ("010", 8), ("0", 0),
                                 ("256", -1), ("-1", -1), ("zz", -1), ("0x", -1), ("1 ", -1)])
def test_parse_pattern(s: str, v: int) -> None:
    assert cutils.parse_pattern(s) == v


def test_keyval_and_nesting() -> None:
    assert parse_keyval("a=1,b=x,,y,c") == {"a": "1", "b": "x,y", "c": "on"}
    o = image_opts_to_options(parse_keyval(
        "driver=blkdebug,image.driver=file,image.filename=x,image.cache.direct=on,"
        "inject-error.0.event=read_aio,inject-error.0.errno=5,inject-error.0.once=on,"
        "inject-error.1.event=none,inject-error.1.sector=8"))
    assert o == {"driver": "blkdebug",
                 "image": {"driver": "file", "filename": "x", "cache.direct": True},
                 "inject-error": [{"event": "read_aio", "errno": 5, "once": True},
                                  {"event": "none", "sector": 8}]}
    assert image_opts_to_options(parse_keyval("driver=null-co,size=1M")) == {"driver": "null-co",
                                                                           "size": 1 << 20}
    with pytest.raises(ValueError):
        parse_keyval("=x")


def test_cache_modes() -> None:
    assert parse_cache_mode("none", 0) == (BDRV_O_NOCACHE, False)
    assert parse_cache_mode("directsync", 0) == (BDRV_O_NOCACHE, True)
    assert parse_cache_mode("unsafe", BDRV_O_NOCACHE) == (BDRV_O_NO_FLUSH, False)
    assert parse_cache_mode("writethrough", 0) == (0, True)
    assert parse_cache_mode("writeback", 0) == (0, False)
    assert parse_cache_mode("bogus", 0) is None


def test_getopt_permutes_like_glibc(capsys) -> None:
    g = GetOpt(["read", "0", "-vP", "0x5", "512", "--", "-q"], "bCl:pP:qs:v")
    assert list(g) == [("v", None), ("P", "0x5")]
    assert g.operands == ["0", "512", "-q"]
    g = GetOpt(["read", "-P"], "P:")
    assert list(g) == [("?", None)]
    assert capsys.readouterr().err == "read: option requires an argument -- 'P'\n"
