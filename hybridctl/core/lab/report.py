"""The report of a set of runs (a sweep, or any runs): ranking, charts and the findings they support.

Configurations trained with several seeds are compared by their mean over seeds (groups.py), and a margin counts
as a finding only when it exceeds the seed-to-seed noise (Welch's t-test, stats.py). Each margin is stated once,
in one convention: the other configuration minus the winner, in the metric's units and in percent of the winner.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hybridctl.core.lab.charts import Chart, Series
from hybridctl.core.lab.groups import SAME, GroupRow, group_results, has_repeats, rank_groups
from hybridctl.core.lab.placements import heat_grid, layer_position_table, placement_values, ranked_placements
from hybridctl.core.lab.render import as_sentence, fmt_count, fmt_lr, fmt_lr_reached
from hybridctl.core.lab.render_findings import fmt_p
from hybridctl.core.lab.results import (METRICS, Ranked, RunResult, comparability_warning, finite_or_none, metric_coverage,
                                        rank_results, sweep_divergence_advice, unstarted_runs)
from hybridctl.core.lab.stats import ALPHA


def curves_chart(results: list[RunResult], key: str = "val_loss", x: str = "steps") -> Chart:
    """Loss against steps or tokens, one series per run (key: val_loss or loss for the training loss)."""
    # a diverged run's losses that are not finite (null in metrics.jsonl) are left out: a curve ends where it blew up
    rows_of = lambda r: [row for row in (r.evals if key == "val_loss" else r.logs)  # noqa: E731
                         if finite_or_none(row.get(key)) is not None]
    most = max((row.get("tokens", 0) for r in results for row in rows_of(r)), default=0)
    scale, unit = (1e6, "M") if most >= 1e6 else ((1e3, "K") if most >= 1e4 else (1, ""))
    if x != "tokens":
        scale = 1
    series = [Series(r.label, [(row["tokens"] if x == "tokens" else row["step"]) / scale for row in rows_of(r)],
                     [row[key] for row in rows_of(r)]) for r in results]
    what = "validation loss" if key == "val_loss" else "training loss"
    xlabel = (f"tokens ({unit})" if unit else "tokens") if x == "tokens" else "step"
    return Chart(f"{key}_vs_{x}", f"{what} vs {x}", xlabel, what, [s for s in series if s.xs], curves=True)


def _spread_series(points: list[tuple[float, GroupRow]], metric: str) -> list[Series]:
    """The mean at each x, and the min and max over seeds where some configuration has several."""
    xs = [x for x, _ in points]
    rows = [row for _, row in points]
    if not any(row.stats.n > 1 for row in rows):
        return [Series(metric, xs, [row.stats.mean for row in rows])]
    return [Series("mean", xs, [row.stats.mean for row in rows]), Series("min", xs, [row.stats.min for row in rows]),
            Series("max", xs, [row.stats.max for row in rows])]


def _over_seeds(rows: list[GroupRow]) -> str:
    return " (mean, min, max over seeds)" if any(r.stats and r.stats.n > 1 for r in rows) else ""


def lr_chart(rows: list[GroupRow], metric: str) -> Chart:
    points = sorted(((row.group.first("lr"), row) for row in rows if row.group.first("lr") and row.stats),
                    key=lambda p: p[0])
    xs = [x for x, _ in points]
    return Chart("loss_vs_lr", f"{metric} vs learning rate{_over_seeds(rows)}", "learning rate", metric,
                 _spread_series(points, metric) if points else [], xlog=True, points=True,
                 xticks=[(x, fmt_lr(x)) for x in xs])


def attention_chart(rows: list[GroupRow], metric: str) -> Chart:
    """The best configuration at each attention fraction (its mean, and its seeds' min and max)."""
    best: dict[float, GroupRow] = {}
    for row in rows:  # ranked rows come best first
        frac = row.group.first("attention_fraction")
        if frac is not None and row.rank is not None:
            best.setdefault(round(100 * frac, 1), row)
    points = sorted(best.items())
    return Chart("loss_vs_attention", f"{metric} vs attention layers (%){_over_seeds(rows)}", "attention layers (%)",
                 metric, _spread_series(points, metric) if points else [], points=True)


def throughput_chart(rows: list[GroupRow], metric: str) -> Chart:
    points = [(row.group.mean_of("tok_s") / 1e3, row.stats.mean) for row in rows
              if row.rank is not None and row.group.mean_of("tok_s")]
    return Chart("throughput_vs_quality", f"{metric} vs throughput", "throughput (K tok/s)", metric,
                 [Series(metric, [p[0] for p in points], [p[1] for p in points])], points=True, lines=False)


def lr_edge_warning(best_lr: float | None, lrs: list[float]) -> str:
    """A line when the best LR is the smallest or largest of the grid ('' when it lies inside or there is no grid)."""
    grid = sorted(set(lrs))
    if best_lr is None or len(grid) < 2 or best_lr not in (grid[0], grid[-1]):
        return ""
    if best_lr == grid[-1]:
        return f"best LR {fmt_lr(best_lr)} is the largest tried; try above {fmt_lr(best_lr)}"
    return f"best LR {fmt_lr(best_lr)} is the smallest tried; try below {fmt_lr(best_lr)}"


@dataclass
class Section:
    heading: str
    paragraphs: list[str] = field(default_factory=list)  # a paragraph starting with "- " is a list item
    ranking: list[Ranked] | None = None
    table: tuple[list[str], list[list[str]]] | None = None
    charts: list[Chart] = field(default_factory=list)
    groups: list[GroupRow] | None = None  # a ranking of configurations over seeds
    heatmap: tuple[list[str], list[list[str]]] | None = None  # a grid of numbers, shaded on a terminal


@dataclass
class Report:
    title: str
    metric: str
    sections: list[Section]


def _pct(fraction: float | None) -> str:
    return "-" if fraction is None else f"{100 * fraction:.0f}%"


def _is_lr_sweep(results: list[RunResult], sweep: dict[str, Any] | None) -> bool:
    if sweep is not None:
        return sweep.get("kind") == "lr"
    lrs = {r.get("lr") for r in results}
    return len(lrs) > 1 and len({r.get("layer_types") for r in results}) == 1


def pareto_front(rows: list[GroupRow], metric: str) -> list[GroupRow]:
    """Configurations no other beats on both throughput and the metric (means over seeds)."""
    higher = METRICS[metric]
    better = (lambda a, b: a >= b) if higher else (lambda a, b: a <= b)
    points = [(r, r.group.mean_of("tok_s"), r.stats.mean) for r in rows if r.rank is not None and r.group.mean_of("tok_s")]
    front = [r for r, speed, value in points
             if not any(o is not r and o_speed >= speed and better(o_value, value) and (o_speed > speed or o_value != value)
                        for o, o_speed, o_value in points)]
    return sorted(front, key=lambda r: -r.group.mean_of("tok_s"))


def value_text(row: GroupRow) -> str:
    s = row.stats
    return f"{s.mean:.4f}" if s.n == 1 else f"mean {s.mean:.4f} ± {s.std:.4f} std over {s.n} seeds"


def margin_text(row: GroupRow) -> str:
    """How far the row lies from the winner: |difference| in the metric's units and in percent of the winner."""
    pct = f" ({abs(row.delta_pct):.2f}% of the winner's value)" if row.delta_pct is not None else ""
    return f"{abs(row.delta):.4f}{pct}"


def noise_text(row: GroupRow, win: GroupRow) -> str:
    """Whether the margin between the row and the winner exceeds the seed-to-seed noise."""
    if win.stats.n < 2 and row.stats.n < 2:
        return ("With one seed per configuration the seed-to-seed noise is not measured, so this margin may be "
                "noise; train with --seeds 3 (or more) to tell.")
    if row.p_value is None:
        single = win.group.label if win.stats.n < 2 else row.group.label
        return f"{single} has a single finished run, so the margin is not tested against the seed-to-seed noise."
    if row.p_value < ALPHA:
        return f"The margin exceeds the seed-to-seed noise (Welch's t-test p = {fmt_p(row.p_value)})."
    return (f"The margin is within the seed-to-seed noise (Welch's t-test p = {fmt_p(row.p_value)}): the two are "
            "not distinguishable.")


def _summary(results: list[RunResult], rows: list[Ranked], groups: list[GroupRow], metric: str,
             sweep: dict[str, Any] | None, coverage: str) -> Section:
    higher = METRICS[metric]
    ranked = [g for g in groups if g.rank is not None]
    tokens = sorted({r.get("tokens") for r in results if r.get("tokens")})
    summary = Section("Summary")
    unstarted = as_sentence(unstarted_runs(results))
    if len(results) == 1:
        r = results[0]
        value = f"{metric} {r.get(metric):.4f}" if isinstance(r.get(metric), (int, float)) else f"no {metric} yet"
        summary.paragraphs.append(f"A single run ({r.label}, {r.status}), so there is no winner and no ranking: "
                                  f"{value}.")
        summary.paragraphs += [unstarted] if unstarted else []
        return summary
    what = f"{len(results)} runs"
    if len(groups) < len(results):
        what += f" ({len(groups)} configuration{'s' if len(groups) > 1 else ''}, each over its seeds)"
    if sweep is not None:
        what += f" of the {sweep.get('kind')} sweep '{sweep.get('name')}'"
    if len(tokens) == 1:
        what += f", {fmt_count(tokens[0])} tokens each"
    summary.paragraphs.append(what + f"; ranked by {metric} ({'higher' if higher else 'lower'} is better).")
    if len(groups) == 1 and ranked:
        only = ranked[0]
        summary.paragraphs.append(f"A single configuration, so there is no winner: {only.group.label} has {metric} "
                                  f"{value_text(only)}.")
    elif ranked:
        win = ranked[0]
        lr = win.group.first("lr")
        # configurations still training, or not started, may yet beat it: no winner before they finish
        waiting = [g.group.label for g in groups
                   if g.rank is None and any(r.status not in ("complete", "diverged") for r in g.group.results)]
        reasons = [f"{', '.join(waiting)} {'has' if len(waiting) == 1 else 'have'} no finished run"] if waiting else []
        reasons += ["planned runs have not started"] if unstarted else []
        summary.paragraphs.append(
            f"{'Leading so far' if reasons else 'Winner'}: {win.group.label} "
            f"({_pct(win.group.first('attention_fraction'))} attention, LR {fmt_lr(lr) if lr else '-'}) with {metric} "
            f"{value_text(win)}." + (f" No winner yet: {' and '.join(reasons)}." if reasons else ""))
        if len(ranked) > 1:
            second = ranked[1]
            summary.paragraphs.append(f"Margin over the runner-up {second.group.label} ({value_text(second)}): "
                                      f"{margin_text(second)}. {noise_text(second, win)}")
            tied = [g.group.label for g in ranked if g.verdict == SAME]
            if len(tied) > 1 or (tied and tied[0] != second.group.label):
                summary.paragraphs.append(f"Not distinguishable from the {'leader' if reasons else 'winner'}: {', '.join(tied)}.")
        stds = [g for g in ranked if g.stats.std is not None]
        if stds:
            noisiest = max(stds, key=lambda g: g.stats.std)
            summary.paragraphs.append(f"Noise floor: the largest seed-to-seed std is {noisiest.stats.std:.4f} "
                                      f"({noisiest.group.label}); a margin well below it is not a finding.")
    else:
        summary.paragraphs.append("No run has finished yet, so none is ranked.")
    ranked_tokens = sorted({r.result.get("tokens") for r in rows if r.rank and r.result.get("tokens")})  # unranked runs stop early
    if len(ranked_tokens) > 1:
        summary.paragraphs.append(f"Runs trained on different numbers of tokens ({fmt_count(ranked_tokens[0])} to "
                                  f"{fmt_count(ranked_tokens[-1])}): the ranking is not like for like.")
    mixed = comparability_warning(results, metric)
    if mixed:
        summary.paragraphs.append(f"Not comparable: {mixed}.")
    if unstarted:
        summary.paragraphs.append(unstarted)
    if coverage:
        summary.paragraphs.append(f"{coverage}.")
    unfinished = [r for r in rows if r.rank is None and r.result.status not in ("complete", "diverged")]
    if unfinished:
        names = ", ".join(f"{r.result.label} ({r.result.status})" for r in unfinished)
        summary.paragraphs.append(f"Not ranked (unfinished): {names}.")
    diverged = [r.result for r in rows if r.result.status == "diverged"]
    if diverged:
        summary.paragraphs.append(f"Diverged (loss not finite): {', '.join(r.label for r in diverged)}; not ranked.")
        for r in diverged:
            advice = sweep_divergence_advice(r.run)
            if advice:
                summary.paragraphs.append(f"- {r.label}: {advice}")
    for text in (sweep or {}).get("warnings", []):
        if not text.startswith("best LR "):  # the learning-rate section says where the best LR lies, with today's runs
            summary.paragraphs.append(f"Sweep warning: {text}.")
    return summary


def _attention_section(groups: list[GroupRow], metric: str) -> Section | None:
    ranked = [g for g in groups if g.rank is not None]
    if len({g.group.first("attention_fraction") for g in ranked} - {None}) < 2:
        return None
    higher = METRICS[metric]
    chart = attention_chart(groups, metric)
    sec = Section("Quality vs attention share", charts=[chart])
    xs, ys = chart.series[0].xs, chart.series[0].ys
    best_i = max(range(len(ys)), key=lambda i: ys[i]) if higher else min(range(len(ys)), key=lambda i: ys[i])
    sec.paragraphs.append(f"The {'highest' if higher else 'lowest'} {metric} ({ys[best_i]:.4f}) comes at "
                          f"{xs[best_i]:.0f}% attention layers.")
    pure = {pct: v for pct, v in zip(xs, ys) if pct in (0.0, 100.0)}
    hybrids = [(pct, v) for pct, v in zip(xs, ys) if 0 < pct < 100]
    if len(pure) == 2 and hybrids:
        beat = [pct for pct, v in hybrids if all((v > p) if higher else (v < p) for p in pure.values())]
        sec.paragraphs.append(f"Pure Gated DeltaNet (0%): {pure[0.0]:.4f}; pure attention (100%): {pure[100.0]:.4f}; "
                              f"{len(beat)} of {len(hybrids)} hybrid shares beat both.")
    return sec


def _throughput_section(groups: list[GroupRow], metric: str) -> Section | None:
    timed = [g for g in groups if g.rank is not None and g.group.mean_of("tok_s")]
    # configurations of one architecture (an LR sweep) differ in speed only by measurement noise
    if len(timed) < 2 or len({(g.group.first("layer_types"), g.group.first("params")) for g in timed}) < 2:
        return None
    sec = Section("Throughput vs quality", charts=[throughput_chart(groups, metric)])
    fastest = max(timed, key=lambda g: g.group.mean_of("tok_s"))
    win = next(g for g in groups if g.rank == 1)
    if fastest is win:
        sec.paragraphs.append(f"The winner is also the fastest ({fmt_count(win.group.mean_of('tok_s'))} tok/s).")
    else:
        sec.paragraphs.append(f"Fastest: {fastest.group.label} at {fmt_count(fastest.group.mean_of('tok_s'))} tok/s "
                              f"({metric} {fastest.stats.mean:.4f}, rank {fastest.rank}).")
        if win.group.mean_of("tok_s"):
            ratio = fastest.group.mean_of("tok_s") / win.group.mean_of("tok_s")
            sec.paragraphs.append(f"The winner {win.group.label} runs at {fmt_count(win.group.mean_of('tok_s'))} "
                                  f"tok/s, {ratio:.2f}x slower than the fastest.")
    front = pareto_front(groups, metric)
    sec.paragraphs.append("Best trade-offs (no other configuration is both faster and better): " + ", ".join(
        f"{g.group.label} ({fmt_count(g.group.mean_of('tok_s'))} tok/s, {g.stats.mean:.4f})" for g in front) + ".")
    return sec


def _lr_section(groups: list[GroupRow], metric: str) -> Section | None:
    with_lr = sorted((g for g in groups if g.rank is not None and g.group.first("lr")), key=lambda g: g.group.first("lr"))
    if len(with_lr) < 2:
        return None
    sec = Section("Learning-rate sensitivity", charts=[lr_chart(groups, metric)])
    best = next(g for g in with_lr if g.rank == min(x.rank for x in with_lr))
    sec.paragraphs.append(f"Best LR: {fmt_lr(best.group.first('lr'))} (mean {metric} {best.stats.mean:.4f})."
                          if best.stats.n > 1 else f"Best LR: {fmt_lr(best.group.first('lr'))} ({metric} {best.stats.mean:.4f}).")
    if any(g.stats.n > 1 for g in with_lr):
        others = [g for g in with_lr if g is not best]
        close = [fmt_lr(g.group.first("lr")) for g in others if g.verdict == SAME]
        untested = [fmt_lr(g.group.first("lr")) for g in others if g.p_value is None]
        if close:
            sec.paragraphs.append(f"Not distinguishable from it over seeds: {', '.join(close)}.")
        elif not untested:
            sec.paragraphs.append("Every other LR is worse beyond the seed-to-seed noise (Welch's t-test p < 0.05).")
        if untested:
            sec.paragraphs.append(f"Not tested against it (a single finished run on one side): {', '.join(untested)}.")
    else:
        close = [fmt_lr(g.group.first("lr")) for g in with_lr if g is not best and abs(g.delta_pct or 0) <= 1.0]
        sec.paragraphs.append(f"Within 1% of it: {', '.join(close)}." if close else "No other LR comes within 1% of it.")
    edge = lr_edge_warning(best.group.first("lr"), [g.group.first("lr") for g in with_lr])
    if edge:
        sec.paragraphs.append(f"The {edge}.")
    grouped = any(g.stats.n > 1 for g in with_lr)
    headers = ["lr", "mean" if grouped else metric] + (["std", "n"] if grouped else []) + ["Δ vs best"]
    sec.table = (headers, [[fmt_lr(g.group.first("lr")), f"{g.stats.mean:.4f}"]
                           + ([f"{g.stats.std:.4f}" if g.stats.std is not None else "-", str(g.stats.n)] if grouped else [])
                           + ["best" if g is best else f"{g.delta_pct:+.2f}%"] for g in with_lr])
    return sec


def _placement_sections(groups: list[GroupRow], metric: str, info: dict[str, Any]) -> list[Section]:
    """Loss by placement (a grid for two attention layers, a ranking otherwise) and by layer position."""
    k, n = info.get("attention"), info.get("n_layers")
    values = placement_values(groups, k) if isinstance(k, int) and isinstance(n, int) else []
    if not values:
        return []
    higher = METRICS[metric]
    best, row = values[0]
    by_placement = Section(f"{metric} by placement of {k} attention layers among {n}")
    by_placement.paragraphs.append(f"{len(values)} placements ranked; best: attention at layers "
                                   f"{', '.join(map(str, best))} ({value_text(row)}).")
    if k == 2:
        by_placement.paragraphs.append(f"Rows: the first attention layer; columns: the second; * marks the best; "
                                       f"· a placement not trained. {'Higher' if higher else 'Lower'} is better.")
        by_placement.heatmap = heat_grid(values, n)
    else:
        by_placement.table = ranked_placements(values, metric, info.get("named") or {})
    headers, rows, verdict = layer_position_table(values, n, higher)
    positions = Section("Which layer positions help most", table=(headers, rows))
    positions.paragraphs.append(f"For each layer: the mean {metric} of the placements with attention there "
                                f"({'higher' if higher else 'lower'} is better), against the mean of all placements.")
    if verdict:
        positions.paragraphs.append(verdict)
    return [by_placement, positions]


def single_run_table(r: RunResult, metric: str) -> tuple[list[str], list[list[str]]]:
    """What one run reached, as key and value (the ranking metric first)."""
    def num(key: str) -> str:
        value = r.get(key)
        return f"{value:.4f}" if isinstance(value, (int, float)) else "-"

    metrics = [metric] + [k for k in ("best_val_loss", "final_val_loss", "final_val_acc") if k != metric]
    rows = [[key, num(key)] for key in metrics]
    rows += [["layers", f"{r.get('layer_types') or '-'} ({_pct(r.get('attention_fraction'))} attention)"],
             ["lr", fmt_lr(r.get("lr")) if r.get("lr") else "-"],
             ["lr reached", fmt_lr_reached(r.get("peak_lr"))],
             ["steps", f"{r.get('steps')} of {r.get('planned_steps') or '?'} ({r.status})"],
             ["tokens", fmt_count(r.get("tokens"))], ["tok/s", fmt_count(r.get("tok_s"))],
             ["seed", "-" if r.get("seed") is None else str(r.get("seed"))]]
    return ["", r.label], rows


def build_report(results: list[RunResult], metric: str = "best_val_loss", title: str = "",
                 sweep: dict[str, Any] | None = None) -> Report:
    coverage = metric_coverage(results, metric)
    rows = rank_results(results, metric)
    grouping = group_results(results)
    groups = rank_groups(grouping, metric)
    sections = [_summary(results, rows, groups, metric, sweep, coverage)]
    if len(results) > 1:
        sections.append(Section("Ranking", groups=groups) if has_repeats(grouping) else Section("Ranking", ranking=rows))
    else:
        sections.append(Section("Result", table=single_run_table(results[0], metric)))
    if len([g for g in groups if g.rank is not None]) > 1:
        sections += [s for s in (_attention_section(groups, metric), _throughput_section(groups, metric),
                                 _lr_section(groups, metric) if _is_lr_sweep(results, sweep) else None) if s]
        if (sweep or {}).get("placements"):
            sections += _placement_sections(groups, metric, sweep["placements"])
    tokens = {r.get("tokens") for r in results if r.get("tokens")}
    x = "tokens" if len(tokens) > 1 or len({r.get("planned_steps") for r in results}) > 1 else "steps"
    curves = curves_chart(results, "val_loss", x)
    if not curves.is_empty():
        sections.append(Section("Training curves", charts=[curves, curves_chart(results, "loss", x)]))
    return Report(title or "Findings", metric, sections)
