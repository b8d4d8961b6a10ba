"""How freezelab prints tables: one printer for every command.

>>> rows = [{"policy": "full", "val_acc": 0.8125}, {"policy": "head_only", "val_acc": None}]
>>> print(format_table(rows, [Column("policy"), Column("val_acc", fmt="{:.3f}")]))
policy     val_acc
---------  -------
full         0.812
head_only        -
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

FORMATS = ("table", "md", "csv", "json")


@dataclass(frozen=True)
class Column:
    """One column: the row key, its header, how a value is shown, and its width cap.

    Numbers are right-aligned, text left-aligned; a missing value shows as ``-``.
    """

    key: str
    header: str | None = None
    fmt: str | Callable[[Any], str] = "{}"
    max_width: int | None = None
    align: Literal["<", ">"] | None = None

    @property
    def title(self) -> str:
        return self.header or self.key

    def cell(self, value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        text = self.fmt(value) if callable(self.fmt) else self.fmt.format(value)
        if self.max_width and len(text) > self.max_width:
            text = text[: self.max_width - 1] + "~"
        return text


def format_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[Column], fmt: str = "table"
) -> str:
    """``rows`` as an aligned text table, a Markdown table, CSV, or JSON (raw values)."""
    if fmt == "json":
        return json.dumps([{c.key: r.get(c.key) for c in columns} for r in rows], indent=2)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([c.title for c in columns])
        writer.writerows(
            [["" if r.get(c.key) is None else r.get(c.key) for c in columns] for r in rows]
        )
        return out.getvalue().rstrip("\n")
    cells = [[c.cell(r.get(c.key)) for c in columns] for r in rows]
    if fmt == "md":
        lines = ["| " + " | ".join(c.title for c in columns) + " |"]
        lines.append("|" + "|".join("---:" if _right(c, rows) else "---" for c in columns) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)
    if fmt != "table":
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    widths = [max([len(c.title), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    aligns = [">" if _right(c, rows) else "<" for c in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            f"{v:{a}{w}}" for v, a, w in zip(values, aligns, widths, strict=True)
        ).rstrip()

    return "\n".join(
        [line([c.title for c in columns]), line(["-" * w for w in widths]), *map(line, cells)]
    )


def _right(column: Column, rows: Sequence[dict[str, Any]]) -> bool:
    if column.align is not None:
        return column.align == ">"
    values = [r.get(column.key) for r in rows if r.get(column.key) is not None]
    return bool(values) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
    )
