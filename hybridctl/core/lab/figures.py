"""A report's charts (lab/charts.py) as image files for papers, drawn with matplotlib (the optional `figures`
extra, imported only when figures are asked for): labelled axes, a legend, and min-max error bars where a chart
holds a configuration's mean with its seeds' min and max (report.py's spread series)."""

from __future__ import annotations

from pathlib import Path

from hybridctl.core.errors import ConfigError

FORMATS = ("png", "svg", "pdf")


def check_figures(fmt: str) -> None:
    """Refuse an unknown format, or a missing matplotlib, before anything is written."""
    if fmt not in FORMATS:
        raise ConfigError(f"--figures {fmt} is not an image format; give one of {', '.join(FORMATS)}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError('--figures needs matplotlib, which is not installed; run pip install "hybridctl[figures]"') from None


def _spread(chart):
    """(mean, min, max) series when the chart is a mean with its seeds' min and max, else None."""
    by_label = {s.label: s for s in chart.series}
    if set(by_label) == {"mean", "min", "max"}:
        return by_label["mean"], by_label["min"], by_label["max"]
    return None


def save_figure(chart, folder: Path, fmt: str = "png") -> Path:
    """Draw one chart into folder/<chart.name>.<fmt>; returns the file."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=150)
    marker = "o" if chart.points else None
    style = "-" if chart.lines else "none"
    spread = _spread(chart)
    if spread:
        mean, low, high = spread
        errors = [[m - lo for m, lo in zip(mean.ys, low.ys)], [hi - m for m, hi in zip(mean.ys, high.ys)]]
        ax.errorbar(mean.xs, mean.ys, yerr=errors, marker=marker or "o", linestyle=style, capsize=3,
                    label="mean (bars: min-max over seeds)")
    else:
        for series in chart.series:
            if series.xs:
                # a single point has no line to draw: mark it
                ax.plot(series.xs, series.ys, marker=marker or ("o" if len(series.xs) == 1 else None), linestyle=style,
                        label=series.label, markersize=4)
    if chart.xlog:
        ax.set_xscale("log")
    if chart.xticks:
        ax.set_xticks([x for x, _ in chart.xticks], [label for _, label in chart.xticks])
    ax.set_xlabel(chart.xlabel)
    ax.set_ylabel(chart.ylabel)
    ax.set_title(chart.title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if len(chart.series) > 1 or spread:
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{chart.name}.{fmt}"
    fig.savefig(path)
    plt.close(fig)
    return path
