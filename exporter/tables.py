"""Rich tables for the CLIs that stay readable in an 80-column terminal.

Rich squeezes a table that is too wide by narrowing its widest columns to equal widths and then cutting words
with an ellipsis ("runt…"), which loses the very header that says what a column is. A FittedTable instead picks
its column widths for the console it is printed on: every column keeps at least its longest header word and its
longest short cell word (so headers wrap between words and "onnxruntime" stays whole), the space left goes to
the columns that want more, and cells longer than that (paths) fold onto the next line instead of being cut.
Each command still has to keep its table narrow enough for that to be possible: tests render every CLI table
at width 80.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

WIDTH = 80  # the terminal width every CLI table is checked at
MAX_UNBROKEN = 16  # cell words up to this long keep their column wide enough; longer ones (paths) fold


class FittedTable:
    """Headers and rows of plain text; rendered as a rich Table sized to the console's width."""

    def __init__(self, columns: Sequence[str | tuple[str, str]], rows: Iterable[Sequence[Any]] = (),
                 title: str | None = None, caption: str | None = None) -> None:
        self.columns = [(c, "left") if isinstance(c, str) else (c[0], c[1]) for c in columns]
        self.rows = [[str(c) for c in row] for row in rows]
        self.title, self.caption = title, caption

    def widths(self, max_width: int) -> list[int] | None:
        """Content width per column for `max_width` terminal columns; None when rich's own widths fit."""
        from rich.cells import cell_len

        natural, least = [], []
        for i, (header, _) in enumerate(self.columns):
            lines = [ln for row in self.rows if i < len(row) for ln in row[i].splitlines()]
            words = [w for text in (header, *lines) for w in text.split()]
            natural.append(max([cell_len(header), *(cell_len(ln) for ln in lines)]))
            head_words = [cell_len(w) for w in header.split()]
            least.append(min(natural[-1], max([*head_words, *(min(cell_len(w), MAX_UNBROKEN) for w in words)],
                                              default=1)))
        budget = max_width - (3 * len(self.columns) + 1)  # a border and 2 padding cells per column, one more border
        if sum(natural) <= budget or sum(least) > budget:
            return None  # fits as it is, or cannot fit without cutting words: rich's own best effort
        spare, want = budget - sum(least), [n - m for n, m in zip(natural, least, strict=True)]
        extra = [spare * w // sum(want) for w in want]
        for i in sorted(range(len(want)), key=lambda i: want[i] - extra[i], reverse=True)[:spare - sum(extra)]:
            extra[i] += 1
        return [m + e for m, e in zip(least, extra, strict=True)]

    def table(self, max_width: int = WIDTH) -> Any:
        from rich.table import Table

        widths = self.widths(max_width)
        t = Table(title=self.title, caption=self.caption, title_justify="left", caption_justify="left")
        for i, (header, justify) in enumerate(self.columns):
            t.add_column(header, justify=justify, overflow="fold", width=None if widths is None else widths[i])
        for row in self.rows:
            t.add_row(*row)
        return t

    def __rich_console__(self, console: Any, options: Any):
        yield self.table(options.max_width)


def fitted_table(columns: Sequence[str | tuple[str, str]], rows: Iterable[Sequence[Any]] = (),
                 title: str | None = None, caption: str | None = None) -> FittedTable:
    """`columns`: headers or (header, justify); cells are str()-ed. Print it with a rich Console."""
    return FittedTable(columns, rows, title, caption)
