"""`hybridctl ablate`: sweep the learning rate or the architecture, one ordinary run per value, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from hybridctl.core.lab.report import attention_chart, lr_chart
from hybridctl.core.lab.results import check_metric, label_results, load_result, rank_results, ranking_warnings
from hybridctl.core.lab.sweeps import ARCH_GROUPS, DEFAULT_LRS, SweepPlan, parse_lr_values, parse_patterns, plan_arch_sweep, plan_lr_sweep, preview_actions, run_sweep, sweep_conflict, sweep_path
from hybridctl.core.lab.render import (TrainProgress, console, err_console, fmt_count, fmt_lr, plan_table, print_chart, print_table,
                                   results_table)
from hybridctl.core.training.runs import RunDir
from hybridctl.core.training.tracking import check_trackers

app = typer.Typer(help="Sweep the learning rate or the architecture: one run per value under runs/ablations/<sweep>/.",
                  no_args_is_help=True)

STEPS_HELP = "Steps per run (default: 200 for lr, 300 for arch, or a --set train.steps=N)."
OUT_HELP = "Folder that holds run folders; the sweep goes to OUT/ablations/<sweep>/."
FORCE_HELP = "Run even if the sweep folder holds a different plan: runs that differ are replaced, identical ones kept."


@app.command("lr")
def lr(
    preset: str = typer.Option("deltanet", "--preset", "-p", help="Preset name or .toml path."),
    values: str = typer.Option(",".join(fmt_lr(v) for v in DEFAULT_LRS), "--values", help="Comma-separated learning rates."),
    steps: Optional[int] = typer.Option(None, "--steps", help=STEPS_HELP),
    overrides: list[str] = typer.Option([], "--set", help="Override a key for every run, e.g. --set train.batch_size=16."),
    out: Path = typer.Option(Path("runs"), "--out", help=OUT_HELP),
    name: Optional[str] = typer.Option(None, "--name", help="Sweep name (default: lr_<preset>)."),
    metric: str = typer.Option("best_val_loss", "--metric", help="Value that ranks the runs."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and write nothing."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
):
    """One run per learning rate on one preset; ranks them and plots val loss against LR."""
    check_metric(metric)
    plan = plan_lr_sweep(preset, parse_lr_values(values), steps, overrides, name)
    execute(plan, out, dry_run, force, metric)


@app.command("arch")
def arch(
    patterns: str = typer.Option("all", "--patterns", help=f"Presets and groups ({', '.join(ARCH_GROUPS)}), comma-separated."),
    steps: Optional[int] = typer.Option(None, "--steps", help=STEPS_HELP),
    overrides: list[str] = typer.Option([], "--set", help="Override a key for every run, e.g. --set train.batch_size=16."),
    out: Path = typer.Option(Path("runs"), "--out", help=OUT_HELP),
    name: Optional[str] = typer.Option(None, "--name", help="Sweep name (default: arch_<patterns>)."),
    metric: str = typer.Option("best_val_loss", "--metric", help="Value that ranks the runs."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and write nothing."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
):
    """One run per architecture preset (same data and seed, each preset's own LR); ranks them by val loss."""
    check_metric(metric)
    label = patterns if patterns in ARCH_GROUPS else ""
    plan = plan_arch_sweep(parse_patterns(patterns), steps, overrides, name, label=label)
    execute(plan, out, dry_run, force, metric)


def execute(plan: SweepPlan, out: Path, dry_run: bool, force: bool, metric: str) -> None:
    for planned in plan.runs:
        check_trackers(planned.cfg)  # a train.log_to tracker that is not installed: refused before anything is written
    path = sweep_path(out, plan.name)
    if dry_run:
        print_table(plan_table(plan, preview_actions(plan, path)))
        console.print(f"estimated tokens: {fmt_count(plan.tokens)} ({plan.tokens:,}) in {len(plan.runs)} runs")
        conflict = sweep_conflict(plan, path)
        if conflict:
            console.print(f"note: {conflict}; running this plan needs --force or another --name", markup=False,
                          highlight=False, soft_wrap=True)
        console.print(f"dry run: nothing written (sweep folder {path})", markup=False, highlight=False, soft_wrap=True)
        return
    total = len(plan.runs)

    def notify(planned, index, action):
        where = f"[{index + 1}/{total}] {planned.name}"
        words = {"done": "finished, skipping", "start": "training", "resume": f"resuming from step {action.step}",
                 # with a step the run has just diverged (the note says why and what to do), without it diverged before
                 "diverged": f"diverged, the sweep goes on: {action.note}" if action.step
                 else f"diverged before, skipping; {action.note}"}
        err_console.print(f"{where}: {words[action.kind]}", markup=False, highlight=False, soft_wrap=True)

    run_sweep(plan, path, force, progress=lambda planned, i: TrainProgress(f"[{i + 1}/{total}] {planned.name}"),
                 notify=notify)
    results = [load_result(RunDir(path / r.name)) for r in plan.runs if RunDir(path / r.name).exists()]
    label_results(results)
    for text in ranking_warnings(results, metric, strict=False):
        err_console.print(f"warning: {text}", markup=False, highlight=False, soft_wrap=True)
    rows = rank_results(results, metric)
    print_table(results_table(rows, metric, title=f"Sweep {plan.name}: ranked by {metric}"))
    print_chart(lr_chart(rows, metric) if plan.kind == "lr" else attention_chart(rows, metric))
    best = next((r for r in rows if r.rank == 1), None)
    if best is None:
        finished = any(r.status == "complete" for r in results)
        console.print(f"no run has {metric}, so there is no best value" if finished
                      else "no run finished, so there is no best value", markup=False)
    elif plan.kind == "lr":
        console.print(f"best lr: {fmt_lr(best.result.get('lr'))} ({metric} {best.value:.4f})", markup=False)
    else:
        console.print(f"best architecture: {best.result.label} ({metric} {best.value:.4f})", markup=False)
    console.print(f"sweep folder: {path} (compare it with `hybridctl compare {path}`, report with `hybridctl report {path}`)",
                  markup=False, highlight=False, soft_wrap=True)
