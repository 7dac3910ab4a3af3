# SPDX-License-Identifier: GPL-2.0-or-later
"""Shared fixtures.

``disk_dir``: a scratch directory on a real disk filesystem.  O_DIRECT is
refused by tmpfs, so tests that need it must not use pytest's ``tmp_path`` when
that lives on tmpfs.  ``PYAIOCTX_TEST_DIR`` overrides the location; by default
the directory is created inside the source tree (``.scratch/``), which is on
whatever disk holds the checkout.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parent.parent


def _scratch_root() -> Path:
    env = os.environ.get("PYAIOCTX_TEST_DIR")
    root = Path(env) if env else _ROOT / ".scratch"
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture
def disk_dir():
    d = _scratch_root() / uuid.uuid4().hex[:12]
    d.mkdir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=["thread", "greenlet"])
def co_backend(request):
    """Run a test under each coroutine backend, then restore the previous one.

    When ``PYAIOCTX_COROUTINE`` pins a backend (the tox ``co-*``
    environments do), only that backend runs; the other is skipped with the
    reason.  A backend that cannot load (no greenlet) is skipped too.
    """
    import pyaioctx.coroutine as C

    name = request.param
    pinned = os.environ.get("PYAIOCTX_COROUTINE")
    if pinned in ("thread", "greenlet") and pinned != name:
        pytest.skip(f"coroutine backend pinned to {pinned!r} by PYAIOCTX_COROUTINE")
    if name not in C.available_backends():
        pytest.skip(f"coroutine backend {name!r} unavailable: greenlet is not importable")
    prev = C.get_backend().name
    C.set_backend(name)
    try:
        yield name
    finally:
        C.set_backend(prev)
