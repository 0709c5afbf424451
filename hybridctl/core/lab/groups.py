"""Runs grouped by configuration: the seeds of one configuration become one row with mean, spread, a 95%
confidence interval and a Welch's t-test against the best row.

Two runs are seeds of one configuration when they sit in the same folder, their names differ only in a
`_s<seed>` suffix that matches their train.seed, and their resolved configs are equal apart from train.seed,
the name, the description and the data cache folder. Anything else (data, tokenizer, steps, LR, layout, ...)
keeps them apart, so a row never mixes configurations.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from hybridctl.core.errors import ConfigError, HybridctlError
from hybridctl.core.lab.results import (METRICS, SORT_KEYS, Ranked, RunResult, check_metric, finite_or_none, result_record,
                                        sort_rows)
from hybridctl.core.lab.stats import ALPHA, Spread, spread, welch_p
from hybridctl.core.lab.sweep_plans import SEED_SUFFIX


BEST, SAME, WORSE = "best", "not distinguishable from best", "worse"
SINGLE, BEST_SINGLE, UNTESTED = "single run", "best (single run)", "best is a single run"
IGNORED = ({"name", "description"}, {"train": {"seed"}, "data": {"cache_dir"}})  # what seeds of one config may differ in


@dataclass
class Group:
    label: str  # the configuration: its runs' label without the seed suffix
    results: list[RunResult] = field(default_factory=list)

    @property
    def seeds(self) -> list[int | None]:
        return [r.get("seed") for r in self.results]

    def first(self, key: str):
        return next((r.get(key) for r in self.results if r.get(key) is not None), None)

    def mean_of(self, key: str) -> float | None:
        """The mean over finished runs (e.g. of tok_s), None when none has the value."""
        values = [r.get(key) for r in self.results if r.status == "complete" and finite_or_none(r.get(key)) is not None]
        return sum(values) / len(values) if values else None

    def status(self) -> str:
        """'complete', or how many runs are in each state (e.g. '2 complete, 1 diverged')."""
        counts: dict[str, int] = {}
        for r in self.results:
            counts[r.status] = counts.get(r.status, 0) + 1
        if set(counts) == {"complete"}:
            return "complete"
        return ", ".join(f"{n} {status}" for status, n in counts.items())


def _fingerprint(result: RunResult) -> str | None:
    """The run's resolved config without what seeds of one configuration may differ in (None: unreadable)."""
    try:
        data = dataclasses.asdict(result.run.load_config())
    except HybridctlError:
        return None
    top, nested = IGNORED
    data = {k: v for k, v in data.items() if k not in top}
    for section, keys in nested.items():
        data[section] = {k: v for k, v in data[section].items() if k not in keys}
    return json.dumps(data, sort_keys=True)


def configuration_label(result: RunResult) -> str:
    match = SEED_SUFFIX.search(result.label)
    if match and result.get("seed") is not None and int(match.group(1)) == result.get("seed"):
        return result.label[:match.start()]
    return result.label


def group_results(results: list[RunResult]) -> list[Group]:
    """Groups in the order their first run comes; a run whose config cannot be read stays alone."""
    groups: dict[Any, Group] = {}
    for r in results:
        fingerprint = _fingerprint(r)
        label = configuration_label(r)
        key = (str(r.run.path.resolve().parent), label, fingerprint) if fingerprint else ("alone", id(r))
        groups.setdefault(key, Group(label)).results.append(r)
    out = list(groups.values())
    labels = [g.label for g in out]
    for g in out:  # one name, different settings (a run changed by hand): tell them apart by their seeds
        if labels.count(g.label) > 1:
            g.label = (f"{g.label} (seeds {','.join(str(s) for s in g.seeds)})" if len(g.results) > 1
                       else g.results[0].label)
    return out


def has_repeats(groups: list[Group]) -> bool:
    """Whether some configuration has more than one run (the grouped view says more than a per-run one)."""
    return any(len(g.results) > 1 for g in groups)


@dataclass
class GroupRow:
    group: Group
    rank: int | None  # None: no finished run with a value
    values: list[float]  # the metric over the group's finished runs
    stats: Spread | None
    delta: float | None = None  # mean minus the best row's mean, in the metric's units
    delta_pct: float | None = None
    p_value: float | None = None  # Welch's t-test against the best row (None: a side has a single run)
    verdict: str = ""


def _verdict(row: GroupRow, best: GroupRow) -> str:
    if row is best:
        return BEST if row.stats.n > 1 else BEST_SINGLE
    if row.stats.n < 2:
        return SINGLE
    if row.p_value is None:
        return UNTESTED
    return WORSE if row.p_value < ALPHA else SAME


def rank_groups(groups: list[Group], metric: str = "best_val_loss", sort: str = "rank") -> list[GroupRow]:
    """Configurations ranked by the mean of the metric over their finished runs (higher is better for
    accuracies and tok_s, lower for losses); each compared with the best by Welch's t-test."""
    check_metric(metric)
    if sort not in SORT_KEYS:
        raise ConfigError(f"unknown sort key '{sort}'; choose one of {', '.join(SORT_KEYS)}")
    higher = METRICS[metric]
    rows = []
    for g in groups:
        values = [v for r in g.results if r.status == "complete" and (v := finite_or_none(r.get(metric))) is not None]
        rows.append(GroupRow(g, None, values, spread(values) if values else None))
    ranked = sorted((r for r in rows if r.stats), key=lambda r: (-r.stats.mean if higher else r.stats.mean, r.group.label))
    rest = [r for r in rows if not r.stats]
    best = ranked[0] if ranked else None
    for i, row in enumerate(ranked):
        row.rank = i + 1
        row.delta = row.stats.mean - best.stats.mean
        row.delta_pct = 100 * row.delta / abs(best.stats.mean) if best.stats.mean else None
        row.p_value = None if row is best else welch_p(row.values, best.values)
        row.verdict = _verdict(row, best)
    ordered = ranked + rest
    # configurations: the mean over seeds of a measured field, the shared value of a setting
    sort_rows(ordered, sort, label=lambda x: x.group.label,
              field=lambda x, key: x.group.mean_of(key) if key in ("tok_s", "train_time_s") else x.group.first(key))
    return ordered


IDENTITY = ("layer_types", "attention_fraction", "lr", "params", "planned_steps", "dataset", "tokenizer", "vocab_size",
            "seq_len", "max_tokens", "val_fraction", "val_split", "eval_windows")


def group_record(row: GroupRow, metric: str) -> dict[str, Any]:
    """One configuration as plain JSON values (for --json): its statistics, settings and every run's record."""
    g, s = row.group, row.stats
    record = {
        "rank": row.rank, "name": g.label, "metric": metric, "n": s.n if s else 0, "seeds": g.seeds,
        "status": g.status(), "mean": s.mean if s else None, "std": s.std if s else None,
        "ci95_low": s.ci_low if s else None, "ci95_high": s.ci_high if s else None,
        "min": s.min if s else None, "max": s.max if s else None, "delta": row.delta, "delta_pct": row.delta_pct,
        "p_value": row.p_value, "verdict": row.verdict or None,
    }
    record.update({k: g.first(k) for k in IDENTITY})
    record.update({k: g.mean_of(k) for k in ("steps", "tokens", "peak_lr", "tok_s", "train_time_s")})
    record["runs"] = [result_record(Ranked(r, None, finite_or_none(r.get(metric)), None), metric) for r in g.results]
    return record
