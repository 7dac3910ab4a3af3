# SPDX-License-Identifier: GPL-2.0-or-later
"""``pyaioctx bench``: qemu-img bench's options, lines and errors, the
JSON schema, and the main job (every backend on a scratch image) end to end
on a small image."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pyaioctx.cli import main as cli_main
from pyaioctx.cli.bench import JSON_SCHEMA, BenchError, parse_args

QEMU_IMG = shutil.which("qemu-img")


def _img(d: Path, size: int = 1 << 20) -> str:
    p = d / "b.img"
    with open(p, "wb") as f:
        f.write(b"\x5a" * size)
    return str(p)


def test_parse_defaults_and_options() -> None:
    o = parse_args(["x.img"])
    assert o is not None and (o.count, o.depth, o.bufsize, o.step, o.offset, o.pattern) == \
        (75000, 64, 4096, 0, 0, 0)
    o = parse_args(["-c", "10", "-d", "2", "-s", "1k", "-S", "2k", "-o", "4k", "-w", "--pattern=0x12",
                    "--flush-interval=4", "-t", "none", "-i", "native", "--rw", "randwrite",
                    "--runtime", "0.5", "--json", "x.img"])
    assert o is not None
    assert (o.count, o.depth, o.bufsize, o.step, o.offset, o.pattern, o.flush_interval,
            o.cache, o.aio, o.rw, o.runtime, o.json, o.write) == \
        (10, 2, 1024, 2048, 4096, 0x12, 4, "none", "native", "randwrite", 0.5, True, True)


@pytest.mark.parametrize("args,msg", [
    (["-c", "x"], "Invalid request count specified"),
    (["-c", "-1"], "Invalid request count specified"),
    (["-d", "x"], "Invalid queue depth specified"),
    (["-d", "0"], "Invalid queue depth specified"),
    (["-t", "bogus"], "Invalid cache mode"),
    (["-i", "bogus"], "Invalid aio option: bogus"),
    (["--pattern=300"], "Invalid pattern byte specified"),
    (["-S", "x"], "Invalid step_size specified. You may use k, M, G, T, P or E suffixes for\n"
                  "qemu-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."),
    (["--flush-interval=2"], "--flush-interval is only available in write tests"),
    (["-w", "--flush-interval=2"], "Flush interval can't be smaller than depth"),
    (["--rw", "sideways"], "Invalid --rw mode"),
    (["--runtime", "0"], "Invalid runtime"),
    (["-w", "--coroutine", "--flush-interval=64"], "--flush-interval is not available with --coroutine"),
    (["a", "b"], "Expecting one image file name"),
])
def test_bad_options(args: list[str], msg: str) -> None:
    with pytest.raises(BenchError, match=re.escape(msg)):
        parse_args(args)


def test_bad_option_messages_match_qemu_img(capsys) -> None:
    assert cli_main(["bench", "-o", "x", "f"]) == 1
    assert capsys.readouterr().err == (
        "qemu-img: Invalid offset specified. You may use k, M, G, T, P or E suffixes for\n"
        "qemu-img: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.\n")
    assert cli_main(["bench", "-c", "3", "/nonexistent/x.img"]) == 1
    assert capsys.readouterr().err == ("qemu-img: Could not open '/nonexistent/x.img': Could not "
                                       "open '/nonexistent/x.img': No such file or directory\n")


def test_lines_as_qemu_img(disk_dir: Path, capsys) -> None:
    img = _img(disk_dir)
    assert cli_main(["bench", "-c", "300", "-d", "4", "-s", "1k", "-S", "2k", "-o", "512", img]) == 0
    out = capsys.readouterr().out.split("\n")
    assert out[0] == ("Sending 300 read requests, 1024 bytes each, 4 in parallel (starting at offset 512,"
                      " step size 2048)")
    assert re.fullmatch(r"Run completed in \d+\.\d{3} seconds\.", out[1])
    assert re.match(r"300 requests: \d+ IOPS", out[2])
    assert cli_main(["bench", "-q", "-w", "-c", "64", "-d", "8", "--flush-interval=16", img]) == 0
    assert capsys.readouterr().out == ""
    assert cli_main(["bench", "-w", "-c", "20", "-d", "8", "--flush-interval=4", "--no-drain", img]) == 0
    assert capsys.readouterr().out.split("\n")[1] == "Sending flush every 4 requests"


@pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img is not installed")
def test_first_lines_equal_live_qemu_img(disk_dir: Path, capsys) -> None:
    img = _img(disk_dir)
    args = ["-f", "raw", "-c", "100", "-d", "2", "-s", "2k", "-o", "1k", "-w", "--flush-interval=10", img]
    live = subprocess.run([QEMU_IMG, "bench", *args], capture_output=True, text=True, timeout=60)
    assert cli_main(["bench", *args]) == live.returncode == 0
    ours = capsys.readouterr().out.split("\n")
    theirs = live.stdout.split("\n")
    assert ours[:2] == theirs[:2]
    assert ours[2].split(" in ")[0] == theirs[2].split(" in ")[0] == "Run completed"
    # A failed request: qemu-img's message and status.
    live = subprocess.run([QEMU_IMG, "bench", "-f", "raw", "-c", "5", "-o", "1M", img],
                          capture_output=True, text=True, timeout=60)
    assert cli_main(["bench", "-f", "raw", "-c", "5", "-o", "1M", img]) == live.returncode == 1
    cap = capsys.readouterr()
    assert cap.err == live.stderr and cap.out == live.stdout


@pytest.mark.parametrize("path", ["callback", "coroutine"])
@pytest.mark.parametrize("depth", [1, 4, 8])
def test_writes_land_where_qemu_img_sends_them(disk_dir: Path, capsys, depth: int,
                                               path: str) -> None:
    """Every request of a write run goes to qemu-img bench's next offset
    (start, then + step, wrapping at the end of the image), exactly count of
    them, whatever the depth, from callbacks or from --coroutine's
    coroutines."""
    size = 64 << 10
    img = disk_dir / "w.img"
    img.write_bytes(bytes(size))
    count, bufsize, step, start = 21, 1024, 4096, 512
    extra = ["--coroutine"] if path == "coroutine" else []
    assert cli_main(["bench", "--json", "-w", "--pattern=0x77", "-c", str(count), "-d", str(depth),
                     "-s", str(bufsize), "-S", str(step), "-o", str(start), *extra, str(img)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["requests"] == count and d["errors"] == 0 and d["path"] == path
    assert len(d["lat_us"]) == 4 and d["lat_us"]["p50"] > 0
    expect = bytearray(size)
    for i in range(count):
        off = (start + i * step) % size
        expect[off:off + bufsize] = b"\x77" * bufsize
    assert img.read_bytes() == expect
    if QEMU_IMG is not None:
        # The same run by qemu-img bench writes the same bytes.
        theirs = disk_dir / "q.img"
        theirs.write_bytes(bytes(size))
        subprocess.run([QEMU_IMG, "bench", "-f", "raw", "-w", "--pattern=0x77", "-c", str(count),
                        "-d", str(depth), "-s", str(bufsize), "-S", str(step), "-o", str(start),
                        str(theirs)], check=True, capture_output=True, timeout=60)
        assert theirs.read_bytes() == expect


def test_json_schema_and_data_written(disk_dir: Path, capsys) -> None:
    img = _img(disk_dir)
    assert cli_main(["bench", "--json", "--rw", "randwrite", "--pattern=0x33", "-c", "200", "-d", "8",
                     "-s", "4k", img]) == 0
    d = json.loads(capsys.readouterr().out)
    for key, typ in JSON_SCHEMA.items():
        assert isinstance(d[key], typ), key
    assert d["requests"] == 200 and d["rw"] == "randwrite" and d["errors"] == 0
    assert set(d["lat_us"]) >= {"p50", "p99", "p99.9"}
    assert d["lat_us"]["p50"] <= d["lat_us"]["p99"] <= d["lat_us"]["p99.9"]
    assert b"\x33" * 4096 in Path(img).read_bytes()


def test_runtime_bounds_the_run(disk_dir: Path, capsys) -> None:
    img = _img(disk_dir)
    assert cli_main(["bench", "--json", "--runtime", "0.3", "-d", "4", img]) == 0
    d = json.loads(capsys.readouterr().out)
    assert 0.25 < d["seconds"] < 3 and d["requests"] > 0


def test_main_job_end_to_end(disk_dir: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("PYAIOCTX_BENCH_DIR", str(disk_dir))
    assert cli_main(["bench", "--size", "4M", "--runtime", "0.2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [r["aio"] for r in d["results"]] == ["threads", "native", "io_uring"]
    assert "iops" in d["results"][0]
    for r in d["results"]:
        if "unavailable" in r:
            assert r["unavailable"]  # says why
        else:
            assert r["requests"] > 0 and r["cache"] in ("none", "writeback")
    assert list(disk_dir.iterdir()) == []  # scratch image deleted
    assert cli_main(["bench", "--size", "4M", "--runtime", "0.1", "--dir", str(disk_dir)]) == 0
    out = capsys.readouterr().out
    assert "backend" in out and "threads" in out and "io_uring" in out
