"""Findings on screen and on disk: configurations ranked over seeds (lab/groups.py) as tables, and reports
(lab/report.py) printed, or written as Markdown with their plots."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from hybridctl.core.lab.results import METRICS
from hybridctl.core.lab.render import (fmt_lr, fmt_lr_reached, fmt_num, fmt_pct, lr_short_of_peak, print_chart, results_rows,
                                      results_table)
from hybridctl.core.lab.tables import UNBOUNDED, console, markdown_table, print_table, text_table, varied_settings


VERDICT_WORDS = {"best": "best", "not distinguishable from best": "tied", "worse": "worse", "single run": "1 run",
                 "best (single run)": "best", "best is a single run": "untested"}
VERDICT_LEGEND = ("verdict (Welch's t-test against the best row): tied = not distinguishable (p >= 0.05), "
                  "worse = p < 0.05, 1 run = no spread to test, untested = the best row is a single run; "
                  "95% CI: mean ± this; n: finished seeds.")
# Left out in this order when a table is too wide for the terminal; a setting only where the rows share it (what a
# sweep varied stays), and never the rank, the configuration, mean, std, verdict or status.
DROP_FIRST = ("lr reached", "steps", "lr", "attn", "layers", "95% CI", "p", "n", "Δ best")


def fmt_stat(value: float | None, signed: bool = False) -> str:
    """A metric or its spread: 4 decimals for losses and accuracies, whole numbers for large values (tok/s)."""
    if value is None:
        return "-"
    sign = "+" if signed else ""
    return f"{value:{sign},.0f}" if abs(value) >= 100 else f"{value:{sign}.4f}"


def fmt_p(p: float | None) -> str:
    if p is None:
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def group_rows(rows, metric: str) -> tuple[list[str], list[list[str]]]:
    """Headers and cells of configurations ranked over seeds; columns that would say nothing are left out."""
    groups = [row.group for row in rows]
    show_layers = len({g.first("layer_types") for g in groups}) > 1
    show_steps = len({g.first("planned_steps") for g in groups}) > 1
    show_reached = any(lr_short_of_peak(g.first("lr"), g.mean_of("peak_lr")) for g in groups)
    show_lr = len({g.first("lr") for g in groups}) > 1 or show_reached
    show_status = any(g.status() != "complete" for g in groups)
    headers = ["#", "config"] + (["layers"] if show_layers else []) + ["attn"] + (["lr"] if show_lr else [])
    headers += ["lr reached"] if show_reached else []
    headers += ["steps"] if show_steps else []
    headers += ["n", "mean", "std", "95% CI", "Δ best", "p", "verdict"] + (["status"] if show_status else [])
    table = []
    for row in rows:
        g, s = row.group, row.stats
        cells = [str(row.rank) if row.rank else "-", g.label]
        cells += [g.first("layer_types") or "-"] if show_layers else []
        cells.append(fmt_pct(g.first("attention_fraction")))
        cells += [fmt_lr(g.first("lr")) if g.first("lr") else "-"] if show_lr else []
        cells += [fmt_lr_reached(g.mean_of("peak_lr"))] if show_reached else []
        cells += [fmt_num(g.first("planned_steps"))] if show_steps else []
        cells += [str(s.n) if s else "0", fmt_stat(s.mean if s else None), fmt_stat(s.std if s else None),
                  "-" if s is None or s.ci_half is None else "±" + fmt_stat(s.ci_half),
                  "-" if row.rank in (None, 1) else fmt_stat(row.delta, signed=True), fmt_p(row.p_value),
                  VERDICT_WORDS.get(row.verdict, row.verdict or "-")]
        cells += [g.status()] if show_status else []
        table.append(cells)
    return headers, table


def fit_columns(headers: list[str], rows: list[list[str]], width: int) -> tuple[list[str], list[list[str]], list[str]]:
    """Leave out columns of DROP_FIRST, in order, until the table fits `width` (one space between columns), but
    not the settings the rows differ in; returns the headers and rows kept and the names left out."""
    def table_width(hs, rs):
        return sum(max([len(h)] + [len(r[i]) for r in rs]) for i, h in enumerate(hs)) + len(hs) - 1

    varied = varied_settings(headers, rows)
    dropped = []
    for name in DROP_FIRST:
        if table_width(headers, rows) <= width:
            break
        if name in headers and name not in varied:
            i = headers.index(name)
            headers = headers[:i] + headers[i + 1:]
            rows = [r[:i] + r[i + 1:] for r in rows]
            dropped.append(name)
    return headers, rows, dropped


def print_note(text: str, out: Console = console) -> None:
    """A line of prose: wrapped to a terminal's width, one line anywhere else (a pager or editor wraps it)."""
    out.print(text, markup=False, highlight=False, soft_wrap=not out.is_terminal)


def print_group_table(rows, metric: str, title: str, out: Console = console) -> None:
    """The grouped ranking, narrowed to a terminal's width (no cell wraps) and whole anywhere else, and what its
    words mean."""
    headers, cells = group_rows(rows, metric)
    headers, cells, dropped = fit_columns(headers, cells, out.width if out.is_terminal else UNBOUNDED)
    # the columns kept are all essential: print_table leaves out no more (if they are too wide even so, names fold)
    print_table(text_table(headers, cells, title, no_wrap_column=1, essential=headers), out)
    print_note(VERDICT_LEGEND, out)
    if dropped:
        print_note(f"not shown at {out.width} columns: {', '.join(dropped)} (widen the terminal, or see compare --json)",
                   out)


# ---------------------------------------------------------------------------------------------------------
# Reports


def print_report(report, out: Console = console) -> None:
    out.rule(f"[bold]{report.title}")
    for section in report.sections:
        out.print()
        out.print(section.heading, style="bold underline")
        for paragraph in section.paragraphs:
            print_note(paragraph, out)
        if section.ranking is not None:
            print_table(results_table(section.ranking, report.metric), out)
        if section.groups is not None:
            print_group_table(section.groups, report.metric, f"ranked by mean {report.metric} over seeds", out)
        if section.table is not None:
            print_table(text_table(*section.table), out)
        if section.heatmap is not None:
            print_table(heat_table(*section.heatmap, higher=METRICS.get(report.metric, False)), out)
        for chart in section.charts:
            print_chart(chart, out)


HEAT_STYLES = ["bold green", "green", "yellow", "red", "bold red"]  # best fifth of the values first


def heat_table(headers: list[str], rows: list[list[str]], higher: bool = False):
    """A grid of numbers (lab/placements.heat_grid) as a table, each number shaded by its fifth: green is better."""
    from rich.table import Table

    values = sorted((float(c.rstrip("*")) for r in rows for c in r[1:] if c and c != "·"), reverse=higher)
    table = Table(*headers, box=None, pad_edge=False)
    for row in rows:
        cells = [row[0]]
        for cell in row[1:]:
            if cell and cell != "·":
                fifth = min(4, 5 * values.index(float(cell.rstrip("*"))) // len(values))
                cells.append(f"[{HEAT_STYLES[fifth]}]{cell}[/]")
            else:
                cells.append(cell)
        table.add_row(*cells)
    return table


def report_markdown(report, plot_files: dict[str, list[str]] | None = None, width: int = 80) -> str:
    """The report as Markdown: tables, and each chart as text in a code block with links to its saved files."""
    from hybridctl.core.lab.plots import render_chart

    plot_files = plot_files or {}
    parts = [f"# {report.title}\n"]
    for section in report.sections:
        parts.append(f"## {section.heading}\n")
        if section.paragraphs:
            parts.append("\n".join(p if p.startswith("- ") else p + "\n" for p in section.paragraphs))
        if section.ranking is not None:
            parts.append(markdown_table(*results_rows(section.ranking, report.metric)))
        if section.groups is not None:
            parts.append(markdown_table(*group_rows(section.groups, report.metric)) + f"\n{VERDICT_LEGEND}\n")
        for table in (section.table, section.heatmap):
            if table is not None:
                parts.append(markdown_table(*table))
        for chart in section.charts:
            if chart.is_empty():
                continue
            parts.append(f"```text\n{render_chart(chart, width, color=False)}\n```\n")
            links = ", ".join(f"[{Path(f).suffix[1:]}]({f})" for f in plot_files.get(chart.name, []))
            if links:
                parts.append(f"Plot files: {links}\n")
    return "\n".join(parts)


def report_plots_dir(md_path: Path) -> Path:
    """Where write_report puts the plots of a report: <stem>_plots/ beside it."""
    return Path(md_path).with_name(f"{Path(md_path).stem}_plots")


def write_report(report, md_path: Path, figures: str | None = None) -> list[Path]:
    """Write the Markdown report and its plots (text and HTML, and image files in the `figures` format: png, svg or
    pdf) into <stem>_plots/ beside it; returns the plot files."""
    from hybridctl.core.lab.plots import save_chart

    md_path = Path(md_path)
    plots_dir = report_plots_dir(md_path)
    files: dict[str, list[str]] = {}
    written: list[Path] = []
    for section in report.sections:
        for chart in section.charts:
            if not chart.is_empty():
                paths = save_chart(chart, plots_dir)
                if figures:
                    from hybridctl.core.lab.figures import save_figure

                    paths.append(save_figure(chart, plots_dir, figures))
                written += paths
                files[chart.name] = [p.relative_to(md_path.parent).as_posix() for p in paths]
    if plots_dir.is_dir():  # an earlier report's plots that this one does not redraw (say, against tokens) would mislead
        for stale in plots_dir.iterdir():
            if stale.is_file() and stale.suffix in (".txt", ".html", ".png", ".svg", ".pdf") and stale not in written:
                stale.unlink()
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(report_markdown(report, files))
    return written
