# SPDX-License-Identifier: GPL-2.0-or-later
"""The block layer: drivers, I/O engines and the generic request path.

Importing this package registers the built-in drivers (``file``, ``null-co``,
``null-aio``, ``blkdebug``) through :func:`bdrv_register`, the same call a
user's own driver uses.
"""

from __future__ import annotations

from .raw_aio import *  # noqa: F401,F403
from .raw_aio import __all__ as _raw_aio_all
from .accounting import *  # noqa: F401,F403
from .accounting import __all__ as _accounting_all
from .block import *  # noqa: F401,F403
from .block import __all__ as _block_all
from . import file_posix, null, blkdebug  # noqa: F401  (register the drivers)

__all__ = [*_raw_aio_all, *_accounting_all, *_block_all]
