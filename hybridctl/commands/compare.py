"""`hybridctl compare`: rank runs by validation loss in a table and plot their loss curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from hybridctl.core.lab.report import curves_chart
from hybridctl.core.lab.results import METRICS, SORT_KEYS, collect_results, rank_results, ranking_warnings, result_record
from hybridctl.core.errors import ConfigError, RunError
from hybridctl.core.lab.groups import group_record, group_results, has_repeats, rank_groups
from hybridctl.core.lab.render import as_sentence, fmt_n, print_chart, results_rows, results_table
from hybridctl.core.lab.tables import console, err_console, markdown_table, print_table
from hybridctl.core.lab.render_findings import VERDICT_LEGEND, group_rows, print_group_table
from hybridctl.core.training.runs import ensure_new_file


def compare(
    paths: Optional[list[Path]] = typer.Argument(None, metavar="RUN_OR_SWEEP", help="Run folders, sweep folders or folders of runs (default: runs)."),
    metric: str = typer.Option("best_val_loss", "--metric", help=f"Value that ranks the runs: {', '.join(METRICS)}."),
    sort: str = typer.Option("rank", "--sort", help=f"Row order: {', '.join(SORT_KEYS)}."),
    x: str = typer.Option("steps", "--x", help="x axis of the curves: steps or tokens."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Draw loss curves (a table of points when not on a terminal)."),
    as_json: bool = typer.Option(False, "--json", help="Print the ranking as JSON to stdout instead of tables."),
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="Also write the ranking as JSON to this file."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Also write the ranking as a Markdown table to this file."),
    per_seed: bool = typer.Option(False, "--per-seed", help="One row per run, even where runs are seeds of one configuration."),
    force: bool = typer.Option(False, "--force", help="Replace existing --json-out / --markdown files."),
):
    """Rank runs by validation loss (or --metric) and plot their loss curves.

    Runs that differ only in train.seed (the seeds of one configuration, e.g. from `ablate --seeds`) make one row:
    mean, std, n, 95% CI of the mean, difference from the best row with Welch's t-test p-value, and a verdict."""
    if x not in ("steps", "tokens"):
        raise ConfigError(f"--x must be steps or tokens, got '{x}'")
    for target in (json_out, markdown):
        if target is not None:
            ensure_new_file(target, force)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)  # as report and bench make theirs
            except OSError as e:
                raise RunError(f"cannot make the folder of {target}: {e.strerror}; choose another path") from None
    results = collect_results(paths or [Path("runs")])
    notes = [f"warning: {text}" for text in ranking_warnings(results, metric)]
    groups = group_results(results)
    grouped = not per_seed and has_repeats(groups)
    rows = rank_groups(groups, metric, sort) if grouped else rank_results(results, metric, sort)
    # On stderr, so --json output stays machine-readable; the Markdown table carries them too.
    for note in notes:
        err_console.print(note, markup=False, highlight=False, soft_wrap=True)
    records = [group_record(row, metric) if grouped else result_record(row, metric) for row in rows]
    if json_out is not None:
        json_out.write_text(json.dumps(records, indent=2) + "\n")
    if markdown is not None:
        lines = "".join(f"{as_sentence(note)}\n\n" for note in notes)
        if grouped:
            table = markdown_table(*group_rows(rows, metric)) + f"\n{VERDICT_LEGEND}\n"
        else:
            table = markdown_table(*results_rows(rows, metric))
        ranked_by = f"mean {metric} over seeds" if grouped else metric
        markdown.write_text(f"Ranked by {ranked_by}.\n\n{lines}" + table)
    if as_json:
        print(json.dumps(records, indent=2))
        return
    ranked = sum(row.rank is not None for row in rows)
    if grouped:
        count = fmt_n(len(rows), "configuration") if ranked == len(rows) else f"{ranked} of {fmt_n(len(rows), 'configuration')}"
        print_group_table(rows, metric, title=f"{count} of {fmt_n(len(results), 'run')} ranked by mean {metric}")
    else:
        count = fmt_n(len(rows), "run") if ranked == len(rows) else f"{ranked} of {fmt_n(len(rows), 'run')}"
        print_table(results_table(rows, metric, title=f"{count} ranked by {metric}"))
    if plots:
        shown = [r for row in rows for r in row.group.results] if grouped else [row.result for row in rows]
        print_chart(curves_chart(shown, "val_loss", x))
        print_chart(curves_chart(shown, "loss", x))
    for target in (json_out, markdown):
        if target is not None:
            console.print(f"wrote {target}", markup=False, highlight=False, soft_wrap=True)
