"""Charts as plain data (series of x/y points) and their size on a terminal; plots.py draws them.
"""

from __future__ import annotations

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
        """Each series' points at no more than `at_most` x values, evenly spaced back from the longest series' last
        point and the same for every series, so that runs line up; each series' own last point is always kept.
        (The first point of a long curve, the untrained model's loss, says least.)"""
        longest = max((s.xs for s in self.series), key=len, default=[])
        grid = set(longest)
        if len(longest) > at_most:
            first, last = min(longest), max(longest)
            targets = [last - i * (last - first) / at_most for i in range(at_most)]
            grid = {min(longest, key=lambda x: abs(x - target)) for target in targets}
        return [[(x, y) for i, (x, y) in enumerate(zip(s.xs, s.ys)) if x in grid or i == len(s.xs) - 1]
                for s in self.series]


def chart_size(console_width: int | None, series: int = 1) -> tuple[int, int]:
    """Width follows the console (capped), 80 columns when unknown; height in proportion, and tall enough for the
    legend of `series` series (two rows each; plotext leaves out a legend taller than the plot)."""
    width = min(console_width or DEFAULT_WIDTH, MAX_WIDTH)
    width = max(width, 40)
    legend = 2 * series + 5 if series > 1 else 0
    return width, max(12, min(24, width // 4), legend)
