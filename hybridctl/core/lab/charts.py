"""Charts as plain data (series of x/y points) and their size on a terminal; plots.py draws them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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


def chart_size(console_width: int | None, series: int = 1) -> tuple[int, int]:
    """Width follows the console (capped), 80 columns when unknown; height in proportion, and tall enough for the
    legend of `series` series (two rows each; plotext leaves out a legend taller than the plot)."""
    width = min(console_width or DEFAULT_WIDTH, MAX_WIDTH)
    width = max(width, 40)
    legend = 2 * series + 5 if series > 1 else 0
    return width, max(12, min(24, width // 4), legend)
