"""Terminal charts drawn with plotext (5.x API).

A Chart is plain data (series of x/y points); `render_chart` turns it into text of a given size, and
`save_chart` writes it beside a report as plain text and as HTML. Tables of the same data for output that is
not a terminal live in render.py.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import plotext as plt

MAX_WIDTH = 120  # wider plots are harder to read, not clearer
DEFAULT_WIDTH = 80  # when the terminal's width is unknown


@dataclass
class Series:
    label: str
    xs: list[float]
    ys: list[float]


@dataclass
class Chart:
    name: str  # file stem when saved
    title: str
    xlabel: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    xlog: bool = False
    points: bool = False  # mark every point (sparse data such as one value per run)
    lines: bool = True  # join the points
    xticks: list[tuple[float, str]] = field(default_factory=list)  # custom tick labels, e.g. LRs as 1e-3

    def is_empty(self) -> bool:
        return not any(s.xs for s in self.series)


def chart_size(console_width: int | None) -> tuple[int, int]:
    """Width follows the console (capped), 80 columns when unknown; height in proportion."""
    width = min(console_width or DEFAULT_WIDTH, MAX_WIDTH)
    width = max(width, 40)
    return width, max(12, min(24, width // 4))


def _finite(xs, ys, xlog: bool) -> tuple[list[float], list[float]]:
    keep = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
            and (x > 0 or not xlog)]
    return [x for x, _ in keep], [y for _, y in keep]


PLAIN_MARKERS = ["•", "x", "+", "o", "*", "#", "@", "%", "=", "~"]  # tell series apart without colour


def _draw(chart: Chart, width: int, height: int, color: bool = True) -> None:
    plt.clear_figure()
    plt.plotsize(width, height)
    plt.theme("clear")  # no background colour: readable on dark and light terminals
    if chart.xlog:
        plt.xscale("log")
    labelled = len(chart.series) > 1
    for i, s in enumerate(chart.series):
        xs, ys = _finite(s.xs, s.ys, chart.xlog)
        if not xs:
            continue
        label = s.label if labelled else None
        line_marker = "braille" if color or not labelled else PLAIN_MARKERS[i % len(PLAIN_MARKERS)]
        if chart.lines and len(xs) > 1:
            plt.plot(xs, ys, marker=line_marker, label=label)
            label = None
        if chart.points or len(xs) == 1 or not chart.lines:
            plt.scatter(xs, ys, marker="●" if color or not labelled else line_marker, label=label)
    if chart.xticks:
        ticks = [(x, t) for x, t in chart.xticks if not chart.xlog or x > 0]
        plt.xticks([x for x, _ in ticks], [t for _, t in ticks])
    plt.title(chart.title)
    plt.xlabel(chart.xlabel)
    plt.ylabel(chart.ylabel)


def render_chart(chart: Chart, width: int = DEFAULT_WIDTH, height: int | None = None, color: bool = True) -> str:
    """The chart as text, `width` columns wide (ANSI colours unless color=False)."""
    height = height or chart_size(width)[1]
    _draw(chart, width, height, color)
    text = plt.build()
    return text if color else plt.uncolorize(text)


def save_chart(chart: Chart, folder: Path, width: int = DEFAULT_WIDTH) -> list[Path]:
    """Write NAME.txt (plain text) and NAME.html (coloured) into folder; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    txt, html = folder / f"{chart.name}.txt", folder / f"{chart.name}.html"
    txt.write_text(render_chart(chart, width, color=False) + "\n")
    _draw(chart, width, chart_size(width)[1])
    plt.build()
    with contextlib.redirect_stdout(io.StringIO()):  # save_fig announces every file it writes
        plt.save_fig(str(html), keep_colors=True)
    return [txt, html]
