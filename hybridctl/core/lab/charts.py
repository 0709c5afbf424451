"""Charts as plain data (series of x/y points) and their size on a terminal; plots.py draws them.
"""

from __future__ import annotations

import bisect
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
    curves: bool = False  # each series' x ascending (steps, tokens): a table of it may keep evenly spaced points

    def is_empty(self) -> bool:
        return not any(s.xs for s in self.series)

    def sampled(self, at_most: int) -> list[list[tuple[float, float]]]:
        """For a chart of curves (each series' x ascending: steps, tokens), each series' points at no more than
        `at_most` x values: whole logging intervals apart, counted back from the last x on the interval most
        points share, and the same for every series, so that runs line up (step 1, a resumed run's extra point or
        a last step off the interval do not shift them); each series' own last point is always kept."""
        everything = [list(zip(s.xs, s.ys)) for s in self.series]
        xs = [x for s in self.series for x in s.xs]
        intervals = Counter(round(b - a, 9) for s in self.series for a, b in zip(s.xs, s.xs[1:]) if b > a)
        if (not self.curves or max(map(len, everything), default=0) <= at_most or not intervals
                or not all(map(math.isfinite, xs))):  # other charts (a point per configuration) keep every point
            return everything
        interval = intervals.most_common(1)[0][0]  # the logging (or eval) interval most points share
        phase = lambda x: round(x / interval - round(x / interval), 6)  # noqa: E731  0 on multiples of interval
        usual = Counter(map(phase, xs)).most_common(1)[0][0]
        first, last = min(x for x in xs if phase(x) == usual), max(x for x in xs if phase(x) == usual)
        stride = interval * round_up_nicely(math.ceil((last - first) / interval / at_most))
        grid = [last - k * stride for k in range(at_most) if last - k * stride > first - interval / 2]
        sampled = []
        for s, points in zip(self.series, everything):
            keep = {len(points) - 1} if points else set()
            for x in grid:
                at = bisect.bisect_left(s.xs, x)
                near = min((i for i in (at - 1, at) if 0 <= i < len(s.xs)), key=lambda i: abs(s.xs[i] - x), default=None)
                if near is not None and abs(s.xs[near] - x) <= interval / 2:
                    keep.add(near)
            sampled.append([points[i] for i in sorted(keep)])
        return sampled


def round_up_nicely(n: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... that is at least n: table rows every 100 steps, not every 340."""
    nice = 1
    while nice < n:
        nice = nice * 5 // 2 if str(nice)[0] == "2" else nice * 2
    return nice


def chart_size(console_width: int | None, series: int = 1) -> tuple[int, int]:
    """Width follows the console (capped), 80 columns when unknown; height in proportion, and tall enough for the
    legend of `series` series (two rows each; plotext leaves out a legend taller than the plot)."""
    width = min(console_width or DEFAULT_WIDTH, MAX_WIDTH)
    width = max(width, 40)
    legend = 2 * series + 5 if series > 1 else 0
    return width, max(12, min(24, width // 4), legend)
