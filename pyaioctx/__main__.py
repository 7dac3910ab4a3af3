# SPDX-License-Identifier: GPL-2.0-or-later
"""``python -m pyaioctx``: the event-loop tour without arguments, otherwise
the ``pyaioctx`` command (``io``, ``bench``, ``demo``)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="python -m pyaioctx", default="demo"))
