"""The one plain-text table printer of kpt's command lines (``kpt-autotune``, ``kpt.info``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str] | None = None,
                 indent: str = "") -> str:
    """Left-aligned columns two spaces apart, trailing blanks stripped; ``None`` prints empty.

    With ``headers``, a header line and a dashed rule come first; without, the rows are
    aligned name/value lines (``python -m kpt.info``'s header, ``kpt-autotune doctor``).
    """
    cells = [["" if c is None else str(c) for c in row] for row in rows]
    if headers is not None:
        cells.insert(0, [str(h) for h in headers])
    if not cells:
        return ""
    widths = [max(len(row[i]) for row in cells if i < len(row))
              for i in range(max(len(row) for row in cells))]
    lines = [indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
             for row in cells]
    if headers is not None:
        lines.insert(1, indent + "  ".join("-" * w for w in widths))
    return "\n".join(lines)
