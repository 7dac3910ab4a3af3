# SPDX-License-Identifier: GPL-2.0-or-later
"""Write a benchmark's generated table into benchmarks/RESULTS.md.

The generated part of a section sits between ``<!-- KEY:begin -->`` and
``<!-- KEY:end -->`` markers, so a re-run replaces the numbers and keeps
the analysis written around them.  A section that has no markers yet is
appended at the end with its heading.
"""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_generated(key: str, heading: str, text: str, path: Path = RESULTS) -> None:
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    cur = path.read_text() if path.exists() else "# Benchmark results\n"
    i = cur.find(begin)
    j = cur.find(end, i + len(begin)) if i >= 0 else -1
    if i >= 0 and j >= 0:
        cur = cur[:i] + block + cur[j + len(end):]
    else:
        cur = cur.rstrip("\n") + f"\n\n{heading}\n\n{block}\n"
    path.write_text(cur)
