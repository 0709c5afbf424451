"""`hybridctl ablate`: sweep the learning rate or the architecture, one ordinary run per value and seed, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from hybridctl.core.errors import ConfigError
from hybridctl.core.lab.groups import group_results, rank_groups
from hybridctl.core.lab.placements import parse_placements, plan_placement_sweep
from hybridctl.core.lab.report import attention_chart, lr_chart, lr_edge_warning
from hybridctl.core.presets import check_not_a_layout, parse_layouts
from hybridctl.core.lab.results import check_metric, label_results, load_result, rank_results, ranking_warnings
from hybridctl.core.lab.sweeps import (ARCH_GROUPS, DEFAULT_LRS, SweepPlan, add_warnings, parse_lr_values,
                                       parse_presets, parse_seeds, plan_arch_sweep, plan_lr_sweep, preview_actions,
                                       run_sweep, sweep_conflict, sweep_path)
from hybridctl.core.lab.render import TrainProgress, fmt_count, fmt_lr, fmt_n, plan_table, print_chart, results_table
from hybridctl.core.lab.tables import console, err_console, print_table
from hybridctl.core.lab.render_findings import print_group_table
from hybridctl.core.training.runs import RunDir, check_name_option
from hybridctl.core.training.tracking import check_trackers

app = typer.Typer(help="Sweep the learning rate or the architecture: one run per value (and seed) under runs/ablations/<sweep>/.",
                  no_args_is_help=True)

STEPS_HELP = "Steps per run (default: 200 for lr; for arch, the presets' own train.steps; or a --set train.steps=N)."
OUT_HELP = "Folder that holds run folders; the sweep goes to OUT/ablations/<sweep>/."
FORCE_HELP = "Run even if the sweep folder holds a different plan: runs that differ are replaced, identical ones kept."
SEEDS_HELP = ("Train every configuration once per seed: a count N (seeds 0..N-1) or a list like 0,3,7 (sets train.seed; "
              "runs are named <configuration>_s<seed>). More seeds later train only the new runs.")


def warn(text: str) -> None:
    err_console.print(f"warning: {text}", markup=False, highlight=False, soft_wrap=True)


@app.command("lr")
def lr(
    preset: str = typer.Option("deltanet", "--preset", "-p", metavar="NAME", help="Preset name or .toml path."),
    values: str = typer.Option(",".join(fmt_lr(v) for v in DEFAULT_LRS), "--values", help="Comma-separated learning rates."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help=SEEDS_HELP),
    steps: Optional[int] = typer.Option(None, "--steps", help=STEPS_HELP),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a key for every run, e.g. --set train.batch_size=16."),
    out: Path = typer.Option(Path("runs"), "--out", help=OUT_HELP),
    name: Optional[str] = typer.Option(None, "--name", help="Sweep name (default: lr_<preset>)."),
    metric: str = typer.Option("best_val_loss", "--metric", help="Value that ranks the runs."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and write nothing."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
):
    """One run per learning rate (and seed) on one preset; ranks them and plots val loss against LR."""
    check_name_option(name, "lr_<preset>")
    check_metric(metric)
    warnings: list[str] = []
    plan = plan_lr_sweep(preset, parse_lr_values(values, warnings), steps, overrides, name, seeds=parse_seeds(seeds))
    plan.warnings = warnings
    execute(plan, out, dry_run, force, metric)


@app.command("arch")
def arch(
    presets: Optional[str] = typer.Option(None, "--preset", "-p", metavar="NAMES", help=f"Presets and groups ({', '.join(ARCH_GROUPS)}), comma-separated (default: all); one base preset with --patterns."),
    patterns: Optional[str] = typer.Option(None, "--patterns", help="Layer layouts applied to one --preset: letters (LLFL,FFLL) or attention layers ([3,6];[2,5])."),
    attention: Optional[int] = typer.Option(None, "--attention", help="Place this many attention (F) layers among the base --preset's layers, every way (--placements all) or a sample."),
    placements: Optional[str] = typer.Option(None, "--placements", help="With --attention: 'all' (default) or a sample size N (plus the presets with that many attention layers, and the base's own)."),
    placement_seed: int = typer.Option(0, "--seed", help="With --placements N: the seed of the random sample (the same seed gives the same placements)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help=SEEDS_HELP),
    steps: Optional[int] = typer.Option(None, "--steps", help=STEPS_HELP),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a key for every run, e.g. --set train.batch_size=16."),
    out: Path = typer.Option(Path("runs"), "--out", help=OUT_HELP),
    name: Optional[str] = typer.Option(None, "--name", help="Sweep name (default: arch_<presets>, arch_<preset>_<layouts> or placements_<preset>_<k>of<n>_<sample>)."),
    metric: str = typer.Option("best_val_loss", "--metric", help="Value that ranks the runs."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and write nothing."),
    force: bool = typer.Option(False, "--force", help=FORCE_HELP),
):
    """One run per architecture (and seed): each preset with its own LR, or layer layouts on one base preset."""
    check_name_option(name, "the sweep's default name")
    check_metric(metric)
    warnings: list[str] = []
    if placements is not None and attention is None:
        raise ConfigError("--placements samples placements of attention layers; say how many with --attention, e.g. "
                          "--attention 2 --placements 12")
    if attention is not None:
        if patterns is not None:
            raise ConfigError("--attention places attention layers itself; drop --patterns (or drop --attention and "
                              "list the layouts)")
        base = parse_presets(presets, warnings) if presets else []
        if len(base) != 1:
            raise ConfigError("--attention places attention layers in one base preset; name it with --preset, e.g. "
                              "--preset hybrid_sparse --attention 2")
        count = parse_placements(placements)
        plan = plan_placement_sweep(base[0], attention, count, placement_seed, steps, overrides, name,
                                    seeds=parse_seeds(seeds))
        plan.warnings = warnings
        execute(plan, out, dry_run, force, metric)
        return
    layouts = parse_layouts(patterns, warnings) if patterns is not None else None
    if layouts and presets is None:
        raise ConfigError("--patterns applies layer layouts to one base preset; name it with --preset, e.g. "
                          "--preset hybrid_sparse --patterns LLFL,FFLL")
    presets = presets or "all"
    label = presets if presets in ARCH_GROUPS else ""
    names = parse_presets(presets, warnings)
    for preset in names:
        check_not_a_layout(preset)
    plan = plan_arch_sweep(names, steps, overrides, name, label=label, layouts=layouts, seeds=parse_seeds(seeds))
    plan.warnings = warnings
    execute(plan, out, dry_run, force, metric)


def execute(plan: SweepPlan, out: Path, dry_run: bool, force: bool, metric: str) -> None:
    for planned in plan.runs:
        check_trackers(planned.cfg)  # a train.log_to tracker that is not installed: refused before anything is written
    path = sweep_path(out, plan.name)
    for text in plan.warnings:
        warn(text)
    if dry_run:
        actions = preview_actions(plan, path)
        print_table(plan_table(plan, actions))
        # what is left to train: whole runs to start, the rest of runs to resume; finished and diverged runs nothing
        left = [(r, a) for r, a in zip(plan.runs, actions) if a.kind in ("start", "resume")]
        tokens = sum(r.tokens // r.cfg.train.steps * (r.cfg.train.steps - a.step) for r, a in left)
        skipped = len(plan.runs) - len(left)
        console.print(f"estimated tokens to train: {fmt_count(tokens)} ({tokens:,}) in {fmt_n(len(left), 'run')}"
                      + (f"; {skipped} skipped (finished or diverged)" if skipped else ""), markup=False, highlight=False)
        from hybridctl.core.data.token_cache import hub_names

        offline = {"data.dataset": "local files or builtin:python", "data.tokenizer": "bpe:16384 or bytes"}
        for names in dict.fromkeys(tuple(hub_names(planned.cfg.data).items()) for planned in plan.runs):
            if names:
                fetched = ", ".join(f"{key} {name}" for key, name in names)
                fix = " and ".join(f"{key} to {offline[key]}" for key, _ in names)
                console.print(f"note: not cached here, so the runs fetch from the Hugging Face hub: {fetched}; without "
                              f"the network, set {fix} (docs/data.md)", markup=False, highlight=False, soft_wrap=True)
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
        warn(text)
    if plan.seeds is not None:
        show_seeded(plan, results, metric, path)
    else:
        show_single(plan, results, metric, path)
    again = " --force" if (path / "report.md").exists() else ""  # a report of an earlier part is there to replace
    console.print(f"sweep folder: {path} (compare it with `hybridctl compare {path}`, report with `hybridctl report {path}{again}`)",
                  markup=False, highlight=False, soft_wrap=True)


def _edge(plan: SweepPlan, best_lr: float | None, path: Path) -> None:
    text = lr_edge_warning(best_lr, [r.value for r in plan.runs]) if plan.kind == "lr" else ""
    if text:
        warn(text)
        add_warnings(path, [text])


def show_single(plan: SweepPlan, results, metric: str, path: Path) -> None:
    rows = rank_results(results, metric)
    print_table(results_table(rows, metric, title=f"Sweep {plan.name}: ranked by {metric}"))
    configurations = rank_groups(group_results(results), metric)  # one run each: the charts take these
    print_chart(lr_chart(configurations, metric) if plan.kind == "lr" else attention_chart(configurations, metric))
    best = next((r for r in rows if r.rank == 1), None)
    if best is None:
        finished = any(r.status == "complete" for r in results)
        console.print(f"no run has {metric}, so there is no best value" if finished
                      else "no run finished, so there is no best value", markup=False)
        return
    _edge(plan, best.result.get("lr"), path)
    if plan.kind == "lr":
        console.print(f"best lr: {fmt_lr(best.result.get('lr'))} ({metric} {best.value:.4f})", markup=False)
    else:
        console.print(f"best architecture: {best.result.label} ({metric} {best.value:.4f})", markup=False)


def show_seeded(plan: SweepPlan, results, metric: str, path: Path) -> None:
    rows = rank_groups(group_results(results), metric)
    print_group_table(rows, metric, title=f"Sweep {plan.name}: ranked by mean {metric} over {fmt_n(len(plan.seeds), 'seed')}")
    print_chart(lr_chart(rows, metric) if plan.kind == "lr" else attention_chart(rows, metric))
    best = next((r for r in rows if r.rank == 1), None)
    if best is None:
        console.print("no configuration has a finished run with " + metric + ", so there is no best value", markup=False)
        return
    _edge(plan, best.group.first("lr"), path)
    what = f"lr {fmt_lr(best.group.first('lr'))}" if plan.kind == "lr" else f"architecture {best.group.label}"
    s = best.stats
    spread = f" ± {s.std:.4f} (std over {s.n} seeds)" if s.std is not None else " (a single finished seed)"
    console.print(f"best {what}: mean {metric} {s.mean:.4f}{spread}", markup=False)
