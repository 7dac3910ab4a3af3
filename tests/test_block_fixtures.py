# SPDX-License-Identifier: GPL-2.0-or-later
"""Shared fixtures and helpers of the block-layer tests.

``aio_backend`` runs a test once per I/O configuration: ``threads`` (buffered
and with ``cache.direct``), ``native`` (Linux AIO always needs
``cache.direct``) and ``io_uring`` (buffered and direct).  With
``PYAIOCTX_TEST_AIO=threads|native|io_uring`` only that backend's
configurations run.  A backend the machine lacks is skipped with the reason
its probe gave.
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from pyaioctx.block import BDRV_O_RDWR, bdrv_open
from pyaioctx.block.file_posix import aio_engine_available

__all__ = ["AioBackend", "BACKENDS", "aio_backend", "make_image", "open_image"]


@dataclasses.dataclass(frozen=True)
class AioBackend:
    aio: str
    direct: bool

    @property
    def name(self) -> str:
        return self.aio + ("-direct" if self.direct and self.aio != "native" else "")

    def options(self, **extra: object) -> dict:
        return {"driver": "file", "aio": self.aio, "cache.direct": self.direct, **extra}


BACKENDS = [
    AioBackend("threads", False),
    AioBackend("threads", True),
    AioBackend("native", True),
    AioBackend("io_uring", False),
    AioBackend("io_uring", True),
]


def _selected() -> list[AioBackend]:
    only = os.environ.get("PYAIOCTX_TEST_AIO")
    if only:
        return [b for b in BACKENDS if b.aio == only]
    return BACKENDS


@pytest.fixture(params=_selected(), ids=lambda b: b.name)
def aio_backend(request: pytest.FixtureRequest) -> AioBackend:
    b: AioBackend = request.param
    ok, reason = aio_engine_available(b.aio)
    if not ok:
        pytest.skip(f"aio={b.aio} unavailable: {reason}")
    return b


def make_image(path: os.PathLike, size: int, data: bytes | None = None) -> bytes:
    """Create a file of ``size`` bytes (random content unless ``data``)."""
    content = data if data is not None else os.urandom(size)
    with open(path, "wb") as f:
        f.write(content)
    return content


def open_image(path: os.PathLike, backend: AioBackend, flags: int = BDRV_O_RDWR, **extra: object):
    return bdrv_open(os.fspath(path), backend.options(**extra), flags)
