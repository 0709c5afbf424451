"""Charts as plain data (series of x/y points) and their size on a terminal; plots.py draws them.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field


MAX_WIDTH = 120  # wider plots are harder to read, not clearer
DEFAULT_WIDTH = 80  # when the terminal's width is unknown
TABLE_ROWS = 80  # a chart printed as a table (a pipe, a log) keeps about this many points: curves of 24 runs are ~700


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

    def sampled(self, at_most: int) -> list[list[tuple[float, float]]]:
        """Each series' points at no more than `at_most` x values, evenly spaced back from the last x in whole
        logging intervals and the same for every series, so that runs line up (a resumed run's extra point or the
        step-1 point of a curve does not shift them); each series' own last point is always kept."""
        if max((len(s.xs) for s in self.series), default=0) <= at_most:
            return [list(zip(s.xs, s.ys)) for s in self.series]
        intervals = Counter(b - a for s in self.series for a, b in zip(s.xs, s.xs[1:]) if b > a)
        interval = intervals.most_common(1)[0][0]  # the logging (or eval) interval most points share
        first, last = min(min(s.xs) for s in self.series if s.xs), max(max(s.xs) for s in self.series if s.xs)
        stride = interval * max(1, math.ceil((last - first) / interval / at_most))
        grid = [last - k * stride for k in range(at_most) if last - k * stride > first - interval / 2]
        sampled = []
        for s in self.series:
            keep = {len(s.xs) - 1} if s.xs else set()
            for x in grid:
                nearest = min(range(len(s.xs)), key=lambda i: abs(s.xs[i] - x), default=None)
                if nearest is not None and abs(s.xs[nearest] - x) < interval / 2:
                    keep.add(nearest)
            sampled.append([(s.xs[i], s.ys[i]) for i in sorted(keep)])
        return sampled


def chart_size(console_width: int | None, series: int = 1) -> tuple[int, int]:
    """Width follows the console (capped), 80 columns when unknown; height in proportion, and tall enough for the
    legend of `series` series (two rows each; plotext leaves out a legend taller than the plot)."""
    width = min(console_width or DEFAULT_WIDTH, MAX_WIDTH)
    width = max(width, 40)
    legend = 2 * series + 5 if series > 1 else 0
    return width, max(12, min(24, width // 4), legend)
