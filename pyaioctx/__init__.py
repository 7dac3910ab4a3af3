# SPDX-License-Identifier: GPL-2.0-or-later
"""pyaioctx: QEMU's event loop and block-I/O core, ported to Python.

Every QEMU-named function of the contract is importable from here, with
QEMU's argument order.  The Pythonic classes (``AioContext``, ``QEMUBH``,
``EventNotifier``, ``QEMUTimer``, ...) are the same objects the flat
functions take and return.

Importing this package never fails on a system without Linux AIO or
io_uring: those backends report "unavailable" with a reason when used.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .event_notifier import *  # noqa: F401,F403
from .event_notifier import __all__ as _en_all
from .timer import *  # noqa: F401,F403
from .timer import __all__ as _timer_all
from .aio import *  # noqa: F401,F403
from .aio import __all__ as _aio_all
from .coroutine import *  # noqa: F401,F403
from .coroutine import __all__ as _coroutine_all
from .aiocb import *  # noqa: F401,F403
from .aiocb import __all__ as _aiocb_all
from .thread_pool import *  # noqa: F401,F403
from .thread_pool import __all__ as _thread_pool_all
from .iov import *  # noqa: F401,F403
from .iov import __all__ as _iov_all
from .block.linux_aio import *  # noqa: F401,F403
from .block.linux_aio import __all__ as _linux_aio_all
from .block.io_uring import *  # noqa: F401,F403
from .block.io_uring import __all__ as _io_uring_all
from .block import *  # noqa: F401,F403
from .block import __all__ as _block_all
from .nbd.server import NBDExport, NBDServer

__all__ = ["__version__", *_en_all, *_timer_all, *_aio_all, *_coroutine_all, *_aiocb_all, *_thread_pool_all,
           *_iov_all, *_linux_aio_all, *_io_uring_all, *_block_all,
           "NBDExport", "NBDServer"]
