"""Tables in one style for every command, printed so that they fit where they go.

- One style: a rule under the header, columns one space apart, no outer edge (ten columns fit in 80), title on
  the left.
- On a terminal the table fits the window: its essential columns (no_wrap: rank, run, layers or attention share,
  metric, Δ; in a ranking, the settings its rows differ in rather than those they share) stay whole; the other
  columns fold their text, and if the table still does not fit they are left out, last first, and a line under the
  table names them.
- Piped or redirected (a file, `less`, a scheduler's log) the table prints at its natural width: no "…", no cell
  wrapped over two lines, whatever COLUMNS says. Titles and captions print as lines of their own, unwrapped.
"""

from __future__ import annotations

import contextlib
from typing import Iterable

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Column, Table

UNBOUNDED = 100_000  # columns: wider than any table

console = Console()
err_console = Console(stderr=True)

# Columns that a results table keeps whole and never leaves out (by header; the first column always).
ESSENTIAL_HEADERS = {"#", "rank", "run", "arch", "layers", "attn", "attention", "preset", "metric", "value", "val loss",
                     "final loss", "mean", "verdict", "name"}


# Columns of a ranking that say what a run or configuration was: essential where the rows differ in them (what a
# sweep varied: the LR of an LR sweep, the layers and attention share of an architecture sweep), not where they share
# them.
SETTING_HEADERS = ("layers", "attn", "lr", "steps")


def varied_settings(headers: list[str], rows: list[list[str]]) -> set[str]:
    """The setting columns (SETTING_HEADERS) whose cells differ between rows."""
    return {h for i, h in enumerate(headers) if h in SETTING_HEADERS and len({row[i] for row in rows}) > 1}


class HouseTable(Table):
    """A Rich table that knows which columns it may leave out on a narrow terminal (`optional`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.optional: list[Column] = []


def new_table(title: str | None = None, caption: str | None = None, show_header: bool = True) -> HouseTable:
    """An empty table in the house style."""
    return HouseTable(title=title, caption=caption, title_justify="left", caption_justify="left", box=box.SIMPLE_HEAD,
                      show_edge=False, show_header=show_header, pad_edge=False, padding=0)


def is_essential(header: str, index: int) -> bool:
    return index == 0 or header in ESSENTIAL_HEADERS or header.startswith("Δ")


def _numeric(cell: str) -> bool:
    return cell[:1].isdigit() or cell[:1] in "+-." and cell[1:2].isdigit()


def text_table(headers: list[str], rows: list[list[str]], title: str | None = None,
               no_wrap_column: int | None = None, essential: Iterable[str] | None = None) -> Table:
    """A table of text cells. Essential columns (`essential` by header, else ESSENTIAL_HEADERS, the first column and
    Δ columns; and `no_wrap_column`) are kept whole; the others fold their text, or are left out on a terminal too
    narrow for them. Numbers are right-aligned and never cut."""
    table = new_table(title)
    keep = set(essential) if essential is not None else None
    for i, h in enumerate(headers):
        cells = [row[i] for row in rows]
        numeric = bool(rows) and all(_numeric(c) or c in ("-", "best") for c in cells)
        whole = i == no_wrap_column or (h in keep if keep is not None else is_essential(h, i))
        table.add_column(h, justify="right" if numeric else "left", no_wrap=whole or numeric, overflow="fold")
        if not whole:
            table.optional.append(table.columns[-1])
    for row in rows:
        table.add_row(*row)
    return table


def key_value_table(rows: Iterable[tuple[str, object]], title: str | None = None) -> Table:
    """Two columns, no header: a summary of one thing."""
    table = new_table(title, show_header=False)
    table.add_column("key", style="bold", no_wrap=True)
    table.add_column("value", overflow="fold")
    for key, value in rows:
        table.add_row(key, str(value))
    return table


@contextlib.contextmanager
def console_width(out: Console, width: int):
    """Lay out at `width` columns for a while (Console.print never renders wider than the console)."""
    before = out._width  # None: the console measures its file each time
    out.width = width
    try:
        yield
    finally:
        out._width = before


def needed_width(table: Table, out: Console) -> int:
    """The narrowest the table can be with no cut cell: no_wrap columns at their widest cell (header included),
    the others at their longest word, plus the one-space divider between columns."""
    options = out.options.update_width(UNBOUNDED)
    total = 0
    for column in table.columns:
        sizes = [Measurement.get(out, options, cell) for cell in (column.header, *column.cells)]
        total += max((m.maximum if column.no_wrap else m.minimum) for m in sizes)
    return total + (len(table.columns) - 1)


def drop_columns_to_fit(table: Table, out: Console, width: int) -> list[str]:
    """Leave out optional columns, last first, until the table fits `width`; returns their headers."""
    dropped = []
    optional = list(getattr(table, "optional", []))
    while optional and needed_width(table, out) > width:
        column = optional.pop()
        table.columns.remove(column)
        dropped.insert(0, str(column.header))
    if needed_width(table, out) > width:  # the essential columns alone are too wide: fold text rather than crop it
        for column in table.columns:
            if column.justify == "left":
                column.no_wrap = False
    return dropped


def print_table(table: Table, out: Console = console) -> None:
    """Print a table whole: fitted to a terminal's width, at full width anywhere else (see the module docstring)."""
    title, caption = table.title, table.caption
    table.title = table.caption = None
    if title:
        out.print(title, style="bold", soft_wrap=not out.is_terminal, highlight=False)
    if out.is_terminal:
        hidden = drop_columns_to_fit(table, out, out.width)
        out.print(table)
        if hidden:
            caption = (f"{caption}; " if caption else "") + f"not shown at {out.width} columns: {', '.join(hidden)}"
    else:
        natural = out.measure(table, options=out.options.update_width(UNBOUNDED)).maximum
        with console_width(out, max(natural, 20)):
            if out.color_system is None:  # plain text: lines end where their text ends, not padded to the widest
                with out.capture() as captured:
                    out.print(table, crop=False)
                out.file.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))
            else:
                out.print(table, crop=False)
    if caption:
        out.print(caption, style="dim", soft_wrap=not out.is_terminal, highlight=False)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    escape = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(escape, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(map(escape, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"
