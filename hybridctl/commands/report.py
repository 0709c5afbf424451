"""`hybridctl report`: findings of a run, sweep or folder of runs, printed and written as Markdown with plots."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from hybridctl.core.lab.report import build_report
from hybridctl.core.lab.results import METRICS, check_metric, collect_results
from hybridctl.core.lab.sweeps import read_sweep
from hybridctl.core.errors import ConfigError, RunError
from hybridctl.core.lab.tables import console
from hybridctl.core.lab.render_findings import print_report, report_plots_dir, write_report
from hybridctl.core.training.runs import ensure_new_file


def report(
    path: Path = typer.Argument(..., metavar="RUN_OR_SWEEP", help="A run folder, a sweep folder (runs/ablations/<sweep>) or a folder of runs."),
    out: Optional[Path] = typer.Option(None, "--out", help="Markdown file (.md) to write; plots go to <name>_plots/ beside it (default: PATH/report.md)."),
    metric: str = typer.Option("best_val_loss", "--metric", help=f"Value that ranks the runs: {', '.join(METRICS)}."),
    force: bool = typer.Option(False, "--force", help="Replace an existing report file and its plots."),
    # "\\[" keeps Rich, which renders the help, from reading "[figures]" as a style tag and dropping it
    figures: Optional[str] = typer.Option(None, "--figures", help="Also draw each chart as an image for papers: png, svg or pdf (needs matplotlib: pip install \"hybridctl\\[figures]\")."),
):
    """Winner and margin, ranking, loss vs attention share, throughput vs quality, LR sensitivity, curves."""
    check_metric(metric)
    if figures is not None:
        from hybridctl.core.lab.figures import check_figures

        check_figures(figures)
    if out is not None and out.suffix != ".md" and not out.is_dir():  # a folder gets its own error below
        raise ConfigError(f"--out {out} is not a Markdown file; give a path ending in .md")
    out = out or (path / "report.md" if path.is_dir() else path.with_suffix(".md"))
    ensure_new_file(out, force)
    plots_dir = report_plots_dir(out)
    if plots_dir.exists() and not plots_dir.is_dir():
        raise RunError(f"{plots_dir} is a file where the report's plots go; move it or choose another --out")
    if plots_dir.exists() and not force:  # the plots of an earlier report, kept (maybe edited) without its .md
        raise RunError(f"{plots_dir} already exists; pass --force to replace the plots in it or choose another --out")
    results = collect_results([path])
    sweep = read_sweep(path) if path.is_dir() else None
    findings = build_report(results, metric, title=f"Findings: {path.resolve().name}", sweep=sweep)
    print_report(findings)
    plots = write_report(findings, out, figures)
    where = f" and {len(plots)} plot files in {plots[0].parent}" if plots else ""
    console.print(f"wrote {out}{where}", markup=False, highlight=False, soft_wrap=True)
