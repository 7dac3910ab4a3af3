# SPDX-License-Identifier: GPL-2.0-or-later
"""NBD: serve any block device over the Network Block Device protocol.

Port of QEMU's NBD server (nbd/server.c, nbd/common.c, include/block/nbd.h)
on pyaioctx's AioContext; ``pyaioctx nbd`` is the qemu-nbd-like command.
"""

from __future__ import annotations

from .protocol import *  # noqa: F401,F403
from .protocol import __all__ as _protocol_all
from .server import *  # noqa: F401,F403
from .server import __all__ as _server_all

__all__ = [*_protocol_all, *_server_all]
