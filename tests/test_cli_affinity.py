# SPDX-License-Identifier: GPL-2.0-or-later
"""``--affinity`` of the command-line tools: CPU lists, the ``auto`` rule
(one CPU when the I/O runs on the thread pool), errors, and that a bench
run puts its caller back where it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import pyaioctx as q
from pyaioctx.block import BDRV_O_NOCACHE, BDRV_O_RDWR, bdrv_open, bdrv_unref
from pyaioctx.block.file_posix import aio_engine_available
from pyaioctx.cli import main as cli_main
from pyaioctx.cli.affinity import (
    AffinityError, apply_affinity, current_cpu, parse_cpu_list, restore_affinity,
    uses_thread_pool,
)

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"),
                                reason="no sched_setaffinity on this system")

ALLOWED = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
need_two = pytest.mark.skipif(len(ALLOWED) < 2, reason="this process may use only one CPU")


def in_thread(fn: Any) -> Any:
    """Run ``fn`` in a fresh thread (affinity is per thread: the test runner's
    own thread is never changed) and return its result or raise its error."""
    box: dict = {}

    def run() -> None:
        try:
            box["r"] = fn()
        except BaseException as e:  # re-raised below
            box["e"] = e
    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert not t.is_alive()
    if "e" in box:
        raise box["e"]
    return box["r"]


@pytest.mark.parametrize("spec,cpus", [("0", {0}), ("0-3", {0, 1, 2, 3}), ("1,3-4", {1, 3, 4}),
                                       (" 2 ", {2})])
def test_parse_cpu_list(spec: str, cpus: set) -> None:
    assert parse_cpu_list(spec) == cpus


@pytest.mark.parametrize("spec", ["", "x", "1-", "-1", "3-1", "0,,1", "1.5"])
def test_parse_cpu_list_refuses(spec: str) -> None:
    with pytest.raises(AffinityError, match="invalid CPU"):
        parse_cpu_list(spec)


def test_current_cpu_is_allowed() -> None:
    cpu = current_cpu()
    assert cpu is None or cpu in ALLOWED


@need_two
def test_auto_pins_only_for_thread_pool_io() -> None:
    def run() -> tuple:
        unchanged = apply_affinity("auto", False)
        after_no_pool = os.sched_getaffinity(0)
        saved = apply_affinity("auto", True)
        pinned = os.sched_getaffinity(0)
        # A thread started now inherits the mask (the pool's workers do).
        child: list = []
        t = threading.Thread(target=lambda: child.append(os.sched_getaffinity(0)))
        t.start()
        t.join()
        restore_affinity(saved)
        return unchanged, after_no_pool, saved, pinned, child[0], os.sched_getaffinity(0)

    unchanged, after_no_pool, saved, pinned, child, restored = in_thread(run)
    assert unchanged is None and after_no_pool == ALLOWED
    assert saved == ALLOWED and len(pinned) == 1 and pinned <= ALLOWED
    assert child == pinned
    assert restored == ALLOWED


@need_two
def test_explicit_list_and_all() -> None:
    cpu = min(ALLOWED)

    def run() -> tuple:
        assert apply_affinity("all", True) is None
        whole = os.sched_getaffinity(0)
        saved = apply_affinity(str(cpu), False)  # an explicit list applies whatever the I/O
        one = os.sched_getaffinity(0)
        restore_affinity(saved)
        return whole, one

    whole, one = in_thread(run)
    assert whole == ALLOWED and one == {cpu}


def test_cpu_not_allowed_is_refused() -> None:
    bad = max(ALLOWED) + 1
    with pytest.raises(AffinityError, match=f"CPU {bad} is not available to this process"):
        in_thread(lambda: apply_affinity(str(bad), False))


def test_uses_thread_pool(disk_dir: Path) -> None:
    img = disk_dir / "a.img"
    img.write_bytes(b"\0" * (1 << 20))
    q.qemu_init_main_loop()
    cases = [({"driver": "file", "aio": "threads"}, 0, True),
             ({"driver": "blkdebug", "image": {"driver": "file", "filename": str(img)}}, 0, True),
             ({"driver": "null-co", "size": 1 << 20}, 0, False)]
    ok, _ = aio_engine_available("native")
    if ok:
        cases.append(({"driver": "file", "aio": "native", "cache.direct": True}, BDRV_O_NOCACHE,
                      False))
    for opts, flags, expect in cases:
        name = None if opts["driver"] in ("null-co", "blkdebug") else str(img)
        bs = bdrv_open(name, opts, BDRV_O_RDWR | flags)
        try:
            assert uses_thread_pool(bs) is expect, opts
        finally:
            bdrv_unref(bs)


@need_two
def test_bench_json_reports_cpus_and_restores_the_caller(disk_dir: Path) -> None:
    img = disk_dir / "b.img"
    img.write_bytes(b"\x5a" * (1 << 20))

    def run(*extra: str) -> tuple:
        import contextlib
        import io
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = cli_main(["bench", "--json", "-c", "200", "-d", "8", "-i", "threads",
                           *extra, str(img)])
        return rc, json.loads(out.getvalue()), os.sched_getaffinity(0)

    rc, d, after = in_thread(lambda: run())
    assert rc == 0 and len(d["cpus"]) == 1 and set(d["cpus"]) <= ALLOWED
    assert after == ALLOWED
    rc, d, after = in_thread(lambda: run("--affinity", "all"))
    assert rc == 0 and set(d["cpus"]) == ALLOWED and after == ALLOWED


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="no SCHED_BATCH on this platform")
def test_bench_runs_pool_workers_under_sched_batch_with_auto(disk_dir: Path) -> None:
    """--affinity auto puts the thread pool's workers under SCHED_BATCH for
    the run (reported as sched_batch) and restores them afterwards; --affinity
    all and engines without the pool leave them alone."""
    img = disk_dir / "s.img"
    img.write_bytes(b"\x5a" * (1 << 20))

    def run(*extra: str) -> dict:
        import contextlib
        import io
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli_main(["bench", "--json", "-c", "200", "-d", "8", *extra, str(img)]) == 0
        pool = q.aio_get_thread_pool(q.qemu_get_aio_context())
        # The policy the workers have after the run (restored).
        policies = {os.sched_getscheduler(t.native_id) for t in threading.enumerate()
                    if "/worker-" in t.name and t.is_alive() and t.native_id}
        return {**json.loads(out.getvalue()), "after": pool.sched_batch, "policies": policies}

    d = in_thread(lambda: run("-i", "threads"))
    assert d["sched_batch"] is True and d["after"] is False
    assert d["policies"] <= {os.SCHED_OTHER}
    d = in_thread(lambda: run("-i", "threads", "--affinity", "all"))
    assert d["sched_batch"] is False
    if aio_engine_available("native")[0]:
        d = in_thread(lambda: run("-i", "native", "-t", "none"))
        assert d["sched_batch"] is False


def test_bad_affinity_is_refused_by_the_tools(disk_dir: Path) -> None:
    img = disk_dir / "c.img"
    img.write_bytes(b"\0" * 65536)
    for tool in (["bench", "-c", "1"], ["nbd", "-k", str(disk_dir / "s.sock")]):
        r = subprocess.run([sys.executable, "-m", "pyaioctx", *tool, "--affinity", "1-x", str(img)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1, (tool, r.stderr)
        assert "invalid CPU list '1-x'" in r.stderr, r.stderr


@need_two
def test_main_job_says_where_threads_ran(disk_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("PYAIOCTX_BENCH_DIR", str(disk_dir))

    def run(*extra: str) -> str:
        import contextlib
        import io
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli_main(["bench", "--size", "4M", "--runtime", "0.2", *extra]) == 0
        return out.getvalue()

    text = in_thread(run)
    assert "note: threads ran on CPU" in text and "--affinity auto" in text, text
    assert "workers under SCHED_BATCH" in text, text
    assert "ran on CPU" not in in_thread(lambda: run("--affinity", "all"))
