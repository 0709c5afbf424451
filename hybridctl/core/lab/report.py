"""The report of a set of runs (a sweep, or any runs): ranking, charts and the findings they support.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hybridctl.core.lab.charts import Chart, Series
from hybridctl.core.lab.render import fmt_count, fmt_lr
from hybridctl.core.lab.results import METRICS, Ranked, RunResult, comparability_warning, metric_coverage, rank_results, sweep_divergence_advice


def curves_chart(results: list[RunResult], key: str = "val_loss", x: str = "steps") -> Chart:
    """Loss against steps or tokens, one series per run (key: val_loss or loss for the training loss)."""
    rows_of = (lambda r: r.evals) if key == "val_loss" else (lambda r: r.logs)
    most = max((row.get("tokens", 0) for r in results for row in rows_of(r)), default=0)
    scale, unit = (1e6, "M") if most >= 1e6 else ((1e3, "K") if most >= 1e4 else (1, ""))
    if x != "tokens":
        scale = 1
    series = [Series(r.label, [(row["tokens"] if x == "tokens" else row["step"]) / scale for row in rows_of(r)],
                     [row[key] for row in rows_of(r)]) for r in results]
    what = "validation loss" if key == "val_loss" else "training loss"
    xlabel = (f"tokens ({unit})" if unit else "tokens") if x == "tokens" else "step"
    return Chart(f"{key}_vs_{x}", f"{what} vs {x}", xlabel, what, [s for s in series if s.xs])


def lr_chart(rows: list[Ranked], metric: str) -> Chart:
    points = sorted((row.result.get("lr"), row.value) for row in rows if row.result.get("lr") and row.value is not None)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return Chart("loss_vs_lr", f"{metric} vs learning rate", "learning rate", metric, [Series(metric, xs, ys)],
                 xlog=True, points=True, xticks=[(x, fmt_lr(x)) for x in xs])


def attention_chart(rows: list[Ranked], metric: str) -> Chart:
    """The best value at each attention fraction."""
    best: dict[float, float] = {}
    higher = METRICS[metric]
    for row in rows:
        frac = row.result.get("attention_fraction")
        if frac is None or row.value is None or row.rank is None:
            continue
        pct = round(100 * frac, 1)
        if pct not in best or (row.value > best[pct] if higher else row.value < best[pct]):
            best[pct] = row.value
    xs = sorted(best)
    return Chart("loss_vs_attention", f"{metric} vs attention layers (%)", "attention layers (%)", metric,
                 [Series(metric, xs, [best[x] for x in xs])], points=True)


def throughput_chart(rows: list[Ranked], metric: str) -> Chart:
    points = [(row.result.get("tok_s") / 1e3, row.value) for row in rows
              if row.rank is not None and row.result.get("tok_s") and row.value is not None]
    return Chart("throughput_vs_quality", f"{metric} vs throughput", "throughput (K tok/s)", metric,
                 [Series(metric, [p[0] for p in points], [p[1] for p in points])], points=True, lines=False)


@dataclass
class Section:
    heading: str
    paragraphs: list[str] = field(default_factory=list)  # a paragraph starting with "- " is a list item
    ranking: list[Ranked] | None = None
    table: tuple[list[str], list[list[str]]] | None = None
    charts: list[Chart] = field(default_factory=list)


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


def pareto_front(rows: list[Ranked], metric: str) -> list[Ranked]:
    """Runs no other run beats on both throughput and the metric."""
    higher = METRICS[metric]
    better = (lambda a, b: a >= b) if higher else (lambda a, b: a <= b)
    points = [r for r in rows if r.rank is not None and r.result.get("tok_s") and r.value is not None]
    front = []
    for r in points:
        dominated = any(
            o is not r and o.result.get("tok_s") >= r.result.get("tok_s") and better(o.value, r.value)
            and (o.result.get("tok_s") > r.result.get("tok_s") or o.value != r.value)
            for o in points
        )
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: -r.result.get("tok_s"))


def build_report(results: list[RunResult], metric: str = "best_val_loss", title: str = "",
                 sweep: dict[str, Any] | None = None) -> Report:
    coverage = metric_coverage(results, metric)
    rows = rank_results(results, metric)
    ranked = [r for r in rows if r.rank is not None]
    higher = METRICS[metric]
    word = "higher" if higher else "lower"
    sections = []

    # Summary: what was run, winner and margin
    tokens = sorted({r.get("tokens") for r in results if r.get("tokens")})
    summary = Section("Summary")
    what = f"{len(results)} run{'s' if len(results) != 1 else ''}"
    if sweep is not None:
        what += f" of the {sweep.get('kind')} sweep '{sweep.get('name')}'"
    if len(tokens) == 1:
        what += f", {fmt_count(tokens[0])} tokens each"
    summary.paragraphs.append(what + f"; ranked by {metric} ({word} is better).")
    if ranked:
        win = ranked[0]
        line = (f"Winner: {win.result.label} ({_pct(win.result.get('attention_fraction'))} attention, "
                f"LR {fmt_lr(win.result.get('lr')) if win.result.get('lr') else '-'}) with {metric} {win.value:.4f}")
        if len(ranked) > 1:
            second = ranked[1]
            margin = 100 * abs(second.value - win.value) / abs(second.value) if second.value else 0.0
            line += f", {margin:.2f}% {word} than the runner-up {second.result.label} ({second.value:.4f})"
        summary.paragraphs.append(line + ".")
        if len(ranked) > 2:
            last = ranked[-1]
            summary.paragraphs.append(f"Last: {last.result.label} ({last.value:.4f}, {last.delta_pct:+.2f}% vs the winner).")
    else:
        summary.paragraphs.append("No run has finished yet, so none is ranked.")
    ranked_tokens = sorted({r.result.get("tokens") for r in ranked if r.result.get("tokens")})  # unranked runs stop early
    if len(ranked_tokens) > 1:
        summary.paragraphs.append(f"Runs trained on different numbers of tokens ({fmt_count(ranked_tokens[0])} to "
                                  f"{fmt_count(ranked_tokens[-1])}): the ranking is not like for like.")
    mixed = comparability_warning(results, metric)
    if mixed:
        summary.paragraphs.append(f"Not comparable: {mixed}.")
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
    sections.append(summary)
    sections.append(Section("Ranking", ranking=rows))

    # Loss vs attention %
    fractions = {r.result.get("attention_fraction") for r in ranked if r.result.get("attention_fraction") is not None}
    if len(fractions) > 1:
        chart = attention_chart(rows, metric)
        sec = Section("Quality vs attention share", charts=[chart])
        xs, ys = chart.series[0].xs, chart.series[0].ys
        best_i = max(range(len(ys)), key=lambda i: ys[i]) if higher else min(range(len(ys)), key=lambda i: ys[i])
        sec.paragraphs.append(f"The {'highest' if higher else 'lowest'} {metric} ({ys[best_i]:.4f}) comes at "
                              f"{xs[best_i]:.0f}% attention layers.")
        pure = {pct: v for pct, v in zip(xs, ys) if pct in (0.0, 100.0)}
        hybrids = [(pct, v) for pct, v in zip(xs, ys) if 0 < pct < 100]
        if len(pure) == 2 and hybrids:
            beat = [pct for pct, v in hybrids if all((v > p) if higher else (v < p) for p in pure.values())]
            sec.paragraphs.append(
                f"Pure Gated DeltaNet (0%): {pure[0.0]:.4f}; pure attention (100%): {pure[100.0]:.4f}; "
                f"{len(beat)} of {len(hybrids)} hybrid shares beat both."
            )
        sections.append(sec)

    # Throughput vs quality
    timed = [r for r in ranked if r.result.get("tok_s")]
    if len(timed) > 1:
        sec = Section("Throughput vs quality", charts=[throughput_chart(rows, metric)])
        fastest = max(timed, key=lambda r: r.result.get("tok_s"))
        win = ranked[0]
        if fastest is win:
            sec.paragraphs.append(f"The winner is also the fastest run ({fmt_count(win.result.get('tok_s'))} tok/s).")
        else:
            sec.paragraphs.append(
                f"Fastest: {fastest.result.label} at {fmt_count(fastest.result.get('tok_s'))} tok/s "
                f"({metric} {fastest.value:.4f}, {fastest.delta_pct:+.2f}% vs the winner)."
            )
        if fastest is not win and win.result.get("tok_s"):
            ratio = fastest.result.get("tok_s") / win.result.get("tok_s")
            sec.paragraphs.append(f"The winner {win.result.label} runs at {fmt_count(win.result.get('tok_s'))} tok/s, "
                                  f"{ratio:.2f}x slower than the fastest.")
        front = pareto_front(rows, metric)
        sec.paragraphs.append("Best trade-offs (no other run is both faster and better): "
                              + ", ".join(f"{r.result.label} ({fmt_count(r.result.get('tok_s'))} tok/s, {r.value:.4f})" for r in front) + ".")
        sections.append(sec)

    # LR sensitivity
    if _is_lr_sweep(results, sweep):
        with_lr = sorted((r for r in ranked if r.result.get("lr")), key=lambda r: r.result.get("lr"))
        if with_lr:
            sec = Section("Learning-rate sensitivity", charts=[lr_chart(rows, metric)])
            best = min(with_lr, key=lambda r: (-r.value if higher else r.value))
            sec.paragraphs.append(f"Best LR: {fmt_lr(best.result.get('lr'))} ({metric} {best.value:.4f}).")
            close = [fmt_lr(r.result.get("lr")) for r in with_lr if r is not best and abs(r.delta_pct) <= 1.0]
            sec.paragraphs.append(f"Also within 1% of the best: {', '.join(close)}." if close
                                  else "No other LR comes within 1% of the best.")
            worst = max(with_lr, key=lambda r: abs(r.delta_pct))
            if worst is not best:
                sec.paragraphs.append(f"Worst: {fmt_lr(worst.result.get('lr'))} ({worst.value:.4f}, {worst.delta_pct:+.2f}%).")
            if len(with_lr) > 2 and best in (with_lr[0], with_lr[-1]):
                edge = "lowest" if best is with_lr[0] else "highest"
                sec.paragraphs.append(f"The best LR is the {edge} one tried: extend --values past it to find the optimum.")
            sec.table = (["lr", metric, "Δ vs best"], [[fmt_lr(r.result.get("lr")), f"{r.value:.4f}", "best" if r is best else f"{r.delta_pct:+.2f}%"]
                                                        for r in with_lr])
            sections.append(sec)

    # Curves
    x = "tokens" if len(tokens) > 1 or len({r.get("planned_steps") for r in results}) > 1 else "steps"
    curves = curves_chart(results, "val_loss", x)
    if not curves.is_empty():
        sections.append(Section("Training curves", charts=[curves, curves_chart(results, "loss", x)]))
    return Report(title or "Findings", metric, sections)
