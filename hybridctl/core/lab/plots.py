"""Terminal charts drawn with plotext (5.x or 6.x), imported only when a chart is drawn.

`render_chart` turns a Chart (charts.py) into text of a given size, and `save_chart` writes it beside a report as
plain text and as HTML. Tables of the same data for output that is not a terminal live in render.py.
"""

from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
import plotext as plt

from hybridctl.core.lab.charts import Chart, DEFAULT_WIDTH, chart_size


def _finite(xs, ys, xlog: bool) -> tuple[list[float], list[float]]:
    keep = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)
            and (x > 0 or not xlog)]
    return [x for x, _ in keep], [y for _, y in keep]


PLAIN_MARKERS = ["•", "x", "+", "o", "*", "#", "@", "%", "=", "~"]  # tell series apart without colour
SERIES_COLORS = [12, 10, 9, 14, 13, 11]  # terminal colour codes; a series' line and points share one


# plotext 6 moved 5's module functions (clear_figure, plotsize, plot, scatter, xticks, ...) onto a figure object
# (plt.figure.clear, .plot_size, .signal + .draw, .ruler("x").ticks, ...) and made build() return a matrix, not
# text. The helpers below are the only code that tells the two apart, so one drawing path serves both.
_FIGURE = getattr(plt, "figure", None)
_FIGURE_API = hasattr(_FIGURE, "signal") and hasattr(_FIGURE, "draw")  # 5.2 has a plt.figure too, without these


def _new_figure(width: int, height: int) -> None:
    """A blank figure of exactly width x height, with no background colour (readable on dark and light terminals)."""
    # Both versions clip the size to the terminal by default; files and Markdown are written at a fixed width.
    if _FIGURE_API:
        plt.terminal.limit(False, False)
        _FIGURE.clear()
        _FIGURE.plot_size(width, height)
        _FIGURE.theme("simple")  # no colour but the series'
    else:
        plt.clear_figure()
        plt.limit_size(False, False)
        plt.plotsize(width, height)
        plt.theme("pro")  # no colour but the series' ("clear" drops theirs too)


def _add_series(xs: list[float], ys: list[float], marker: str, color: int, label: str | None, lines: bool) -> None:
    if _FIGURE_API:
        signal = _FIGURE.signal(xs, ys, marker=plt.marker(marker, pixel=plt.pixel(foreground=color)))
        if lines:
            signal.lines()
        if label is not None:
            signal.label(label)
        _FIGURE.draw(signal)
    elif lines:
        plt.plot(xs, ys, marker=marker, color=color, label=label)
    else:
        plt.scatter(xs, ys, marker=marker, color=color, label=label)


def _set_xticks(positions: list[float], labels: list[str]) -> None:
    if _FIGURE_API:
        _FIGURE.ruler("x").ticks(positions, labels)
    else:
        plt.xticks(positions, labels)


def _set_labels(title: str, xlabel: str, ylabel: str) -> None:
    if _FIGURE_API:
        _FIGURE.title(title)
        _FIGURE.label(xlabel, "x")
        _FIGURE.label(ylabel, "y")
    else:
        plt.title(title)
        plt.xlabel(xlabel)
        plt.ylabel(ylabel)


def _build_text(color: bool) -> str:
    if _FIGURE_API:
        return _FIGURE.build().string(colorless=not color)
    text = plt.build()
    return text if color else plt.uncolorize(text)


def _save_html(path: Path) -> None:
    """The figure drawn last, as a coloured HTML page."""
    if _FIGURE_API:
        _FIGURE.build().save(str(path))  # the extension picks the format
    else:
        plt.build()
        with contextlib.redirect_stdout(io.StringIO()):  # save_fig announces every file it writes
            plt.save_fig(str(path), keep_colors=True)


def _log_ticks(lo: float, hi: float) -> list[tuple[float, str]]:
    """Ticks for a log axis with none given, in log10 units: the powers of ten in range, else five even steps."""
    decades = list(range(math.ceil(lo), math.floor(hi) + 1))
    if len(decades) >= 2:
        positions = decades[::math.ceil(len(decades) / 7)]
    else:
        positions = [lo] if hi == lo else [lo + (hi - lo) * i / 4 for i in range(5)]
    return [(p, f"{10 ** p:.2g}") for p in positions]


def _draw(chart: Chart, width: int, height: int, color: bool = True) -> None:
    _new_figure(width, height)
    labelled = len(chart.series) > 1
    # A log x axis is drawn as log10(x) on a linear one with labelled ticks: 6.x's own log scale loses the data
    # once tick positions are given, and this way both versions draw the same chart.
    to_x = math.log10 if chart.xlog else (lambda x: x)
    series = [(s, *_finite(s.xs, s.ys, chart.xlog)) for s in chart.series]
    series = [(s, [to_x(x) for x in xs], ys) for s, xs, ys in series if xs]
    for i, (s, xs, ys) in enumerate(series):
        label = s.label if labelled else None
        line_marker = "braille" if color or not labelled else PLAIN_MARKERS[i % len(PLAIN_MARKERS)]
        series_color = SERIES_COLORS[i % len(SERIES_COLORS)]
        if chart.lines and len(xs) > 1:
            _add_series(xs, ys, line_marker, series_color, label, lines=True)
            label = None
        if chart.points or len(xs) == 1 or not chart.lines:
            _add_series(xs, ys, "●" if color or not labelled else line_marker, series_color, label, lines=False)
    ticks = [(to_x(x), t) for x, t in chart.xticks if not chart.xlog or x > 0]
    if chart.xlog and not ticks and series:
        ticks = _log_ticks(min(min(xs) for _, xs, _ in series), max(max(xs) for _, xs, _ in series))
    if ticks:
        _set_xticks([x for x, _ in ticks], [t for _, t in ticks])
    _set_labels(chart.title, chart.xlabel, chart.ylabel)


def render_chart(chart: Chart, width: int = DEFAULT_WIDTH, height: int | None = None, color: bool = True) -> str:
    """The chart as text, `width` columns wide (ANSI colours unless color=False)."""
    height = height or chart_size(width, len(chart.series))[1]
    _draw(chart, width, height, color)
    return _build_text(color)


def save_chart(chart: Chart, folder: Path, width: int = DEFAULT_WIDTH) -> list[Path]:
    """Write NAME.txt (plain text) and NAME.html (coloured) into folder; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    txt, html = folder / f"{chart.name}.txt", folder / f"{chart.name}.html"
    txt.write_text(render_chart(chart, width, color=False) + "\n")
    _draw(chart, width, chart_size(width, len(chart.series))[1])
    _save_html(html)
    return [txt, html]
