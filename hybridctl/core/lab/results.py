"""Results: a run folder read back (config, summary, metrics, benchmarks), ranked by a metric, with the warnings a
careful colleague would give about rankings of runs that were not trained or scored alike.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hybridctl.core.training import checkpoint_files
from hybridctl.core.data import synthetic
from hybridctl.core.config import DataConfig
from hybridctl.core.errors import ConfigError, HybridctlError, RunError, suggest
from hybridctl.core.training.runs import (SWEEP_FILE, RunDir, find_runs)
from hybridctl.core.training.schedule import lr_reached
from hybridctl.core.lab.render import fmt_n
from hybridctl.core.lab.sweeps import ARC_FILE, divergence_advice


METRICS = {  # name -> True when higher is better
    "best_val_loss": False, "final_val_loss": False, "best_val_acc": True, "final_val_acc": True,
    "best_val_ppl": False, "final_val_ppl": False, "tok_s": True, "train_time_s": False,
    "arc_acc": True, "arc_acc_norm": True, "final_val_mqar_acc": True,
}


SORT_KEYS = ("rank", "name", "attention", "lr", "tok_s", "time", "params")


# Metrics that training alone does not give every run: where they come from.
METRIC_SOURCES = {
    "arc_acc": "measure it with `hybridctl bench arc RUN`",
    "arc_acc_norm": "measure it with `hybridctl bench arc RUN`",
    "final_val_mqar_acc": "only runs on data.dataset = synthetic:mqar measure it",
}


# Settings that change what a validation loss per token means: runs that differ in one do not rank like for like
# (by any metric but ARC's, which scores every run on the same questions). The last four choose the validation
# tokens themselves: val_fraction and val_split pick its documents, max_tokens caps it at val_fraction of the
# total, and the eval windows, batch_size × eval_batches of them, are spread evenly over it, so that product and
# the cap both move them.
COMPARABLE = {"dataset": "data.dataset", "tokenizer": "data.tokenizer", "vocab_size": "model.vocab_size",
              "seq_len": "train.seq_len", "max_tokens": "data.max_tokens", "val_fraction": "data.val_fraction",
              "val_split": "data.val_split", "eval_windows": "train.batch_size × train.eval_batches"}


TOKENIZER_FREE = ("arc_acc", "arc_acc_norm")


@dataclass
class RunResult:
    """One run folder read back: summary values, or what metrics.jsonl has for a run without a summary."""

    run: RunDir
    status: str  # complete | running | diverged | partial (stopped before the end) | empty (no eval or checkpoint yet)
    values: dict[str, Any]
    evals: list[dict[str, Any]]
    logs: list[dict[str, Any]]
    label: str = ""

    def get(self, key: str):
        return self.values.get(key)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def finite_or_none(value):
    """The value, or None for a NaN or infinite float (a diverged run's loss ranks nowhere)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _sweep_of(run: RunDir) -> dict[str, Any]:
    """The state of the sweep the run belongs to (sweep.json beside it); {} for a run of no sweep."""
    return _read_json(run.path.parent / SWEEP_FILE) or {}


def _recorded_diverged(run: RunDir, sweep: dict[str, Any] | None = None) -> bool:
    """Whether the run's sweep (`sweep`, else read from beside the run) recorded it as diverged."""
    status = (_sweep_of(run) if sweep is None else sweep).get("status")
    return isinstance(status, dict) and status.get(run.path.name) == "diverged"


def sweep_divergence_advice(run: RunDir) -> str:
    """divergence_advice for a run its sweep recorded as diverged ('' for any other run)."""
    sweep = _sweep_of(run)
    if not _recorded_diverged(run, sweep):
        return ""
    entry = next((e for e in sweep.get("plan", []) if isinstance(e, dict) and e.get("name") == run.path.name), {})
    return divergence_advice(sweep.get("kind"), run, entry.get("preset"))


def _max_tokens(data: DataConfig) -> int:
    """data.max_tokens as the data sees it: a synthetic task makes its default number of tokens for 0."""
    if data.dataset.startswith("synthetic:") and not data.max_tokens:
        return synthetic.DEFAULT_TOKENS
    return data.max_tokens


def load_result(run: RunDir) -> RunResult:
    summary = run.read_summary()
    rows = run.read_metrics()
    evals = [r for r in rows if "val_loss" in r]
    logs = [r for r in rows if "loss" in r]
    try:
        cfg = run.load_config()
    except HybridctlError:
        cfg = None  # a config this version cannot read: show what summary.json and metrics.jsonl say
    values: dict[str, Any] = {
        "layer_types": "".join(cfg.model.layer_types()) if cfg else summary.get("layer_types"),
        "attention_fraction": cfg.model.attention_fraction() if cfg else summary.get("attention_fraction"),
        "lr": cfg.train.lr if cfg else summary.get("lr"),
        "seed": cfg.train.seed if cfg else None,
        "planned_steps": cfg.train.steps if cfg else None,
        "params": summary.get("params"),
        "dataset": cfg.data.dataset if cfg else None,
        # a synthetic task's ids are its tokens: data.tokenizer is ignored there
        "tokenizer": cfg.data.tokenizer if cfg and not cfg.data.dataset.startswith("synthetic:") else None,
        "vocab_size": (cfg.model.vocab_size or None) if cfg else None,  # 0 until training filled it in
        "seq_len": cfg.train.seq_len if cfg else None,
        "max_tokens": _max_tokens(cfg.data) if cfg else None,
        "val_fraction": cfg.data.val_fraction if cfg else None,
        # synthetic tasks generate their validation examples; builtin corpora refuse a val_split
        "val_split": cfg.data.val_split if cfg and not cfg.data.dataset.startswith("synthetic:") else None,
        "eval_windows": cfg.train.batch_size * cfg.train.eval_batches if cfg else None,
    }
    recorded = summary.get("status")
    finished = recorded in ("complete", "diverged")  # ended: the summary's values are the run's last
    saved = [] if finished else run.step_checkpoints()
    if finished:
        for key in ("steps", "tokens", "best_val_loss", "best_step", "final_val_loss", "final_val_acc", "final_val_ppl",
                    "final_val_mqar_acc", "tok_s", "train_time_s", "wall_time_s", "layer_types", "attention_fraction", "lr", "device"):
            if summary.get(key) is not None:
                values[key] = summary[key]
    else:
        last = rows[-1] if rows else {}
        values.update(steps=last.get("step", 0), tokens=last.get("tokens", 0))
        if saved and checkpoint_files.step_of_dir(saved[-1]) > values["steps"]:
            try:  # a stop (Ctrl-C, SIGTERM) saves a checkpoint at its step without logging a line
                state = checkpoint_files.read_state(saved[-1])
                values.update(steps=state["step"], tokens=state.get("tokens", values["tokens"]))
            except HybridctlError:
                pass  # damaged: resume passes over it too
        if evals:
            values.update(final_val_loss=evals[-1]["val_loss"], final_val_acc=evals[-1].get("val_acc"),
                          final_val_ppl=evals[-1].get("val_ppl"), final_val_mqar_acc=evals[-1].get("val_mqar_acc"))
            finite = [r for r in evals if finite_or_none(r["val_loss"]) is not None]
            if finite:  # min() over a NaN answers by position
                best = min(finite, key=lambda r: r["val_loss"])
                values.update(best_val_loss=best["val_loss"], best_step=best["step"])
    # the highest LR the schedule reached in the steps trained: below train.lr when warmup outlasts them
    values["peak_lr"] = lr_reached(cfg.train, values["steps"]) if cfg and values.get("steps") else None
    best_eval = next((r for r in evals if r["step"] == values.get("best_step")), None)
    if values.get("best_val_loss") is not None:
        values["best_val_ppl"] = math.exp(min(values["best_val_loss"], 50.0))
        values["best_val_acc"] = best_eval.get("val_acc") if best_eval else None
    arc = _read_json(run.path / ARC_FILE)
    if arc is not None:
        values.update(arc_acc=arc.get("acc"), arc_acc_norm=arc.get("acc_norm"), arc_n=arc.get("n"))
    values["text_evals"] = read_text_evals(run)
    broken = bool(evals) and finite_or_none(evals[-1]["val_loss"]) is None  # the last eval's loss is not finite
    if recorded == "diverged" or (recorded == "complete" and broken):  # the latter: a run from before "diverged"
        status = "diverged"
    elif recorded == "complete":
        status = "complete"
    elif run.lock_owner():
        status = "running"
    elif _recorded_diverged(run) or broken:
        status = "diverged"
    else:
        status = "partial" if evals or saved else "empty"
    return RunResult(run, status, values, evals, logs)


def read_text_evals(run: RunDir) -> dict[str, dict[str, Any]]:
    """`hybridctl eval` results (RUN/eval/<name>.json, see text_eval.py) by name; unreadable files are passed over."""
    found = {}
    for path in sorted((run.path / "eval").glob("*.json")):
        data = _read_json(path)
        if data is not None and isinstance(data.get("loss"), (int, float)):
            found[path.stem] = {key: data.get(key) for key in ("loss", "ppl", "acc", "scored_tokens", "data")}
    return found


def label_results(results: list[RunResult]) -> None:
    """Short unique labels: the run name, or sweep/run when two runs share a name."""
    def tail(r: RunResult, n: int) -> str:
        return "/".join(r.run.path.resolve().parts[-n:])

    for n in range(1, 6):
        labels = [tail(r, n) for r in results]
        if len(set(labels)) == len(labels) or n == 5:
            for r, label in zip(results, labels):
                r.label = label
            return


MAKE_RUNS = "`hybridctl train --preset tiny` or `hybridctl ablate lr --preset tiny`"


def collect_results(paths: list[Path]) -> list[RunResult]:
    """Every run at or below each path (run folders, sweep folders, folders of runs), each once."""
    seen, results = set(), []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise RunError(f"{path} does not exist; pass a run or sweep folder, or make runs with {MAKE_RUNS}")
        for run in find_runs(path):
            key = run.path.resolve()
            if key not in seen:
                seen.add(key)
                results.append(load_result(run))
    if not results:
        where = ", ".join(str(p) for p in paths)
        raise RunError(f"no runs found under {where}; make some with {MAKE_RUNS}")
    label_results(results)
    return results


@dataclass
class Ranked:
    result: RunResult
    rank: int | None  # None: not ranked (unfinished, or no value for the metric)
    value: float | None
    delta_pct: float | None  # relative difference from the best ranked value, in percent


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ConfigError(f"unknown metric '{metric}'{suggest(metric, METRICS)}; choose one of {', '.join(METRICS)}")


def rank_results(results: list[RunResult], metric: str = "best_val_loss", sort: str = "rank") -> list[Ranked]:
    """Finished runs ranked by the metric; unfinished runs follow, unranked, so a half-trained run never wins."""
    check_metric(metric)
    if sort not in SORT_KEYS:
        raise ConfigError(f"unknown sort key '{sort}'; choose one of {', '.join(SORT_KEYS)}")
    higher = METRICS[metric]
    value = lambda r: finite_or_none(r.get(metric))  # noqa: E731

    def order(r: RunResult):
        v = value(r)
        return (v is None, 0 if v is None else (-v if higher else v), r.label)

    finished = sorted((r for r in results if r.status == "complete" and value(r) is not None), key=order)
    rest = sorted((r for r in results if r not in finished), key=order)
    reference = value(finished[0]) if finished else next(
        (value(r) for r in rest if value(r) is not None and r.status != "diverged"), None)
    ranked = []
    for i, r in enumerate(finished + rest):
        v = value(r)
        # how far a run that blew up lies behind the winner says nothing
        delta = 100 * (v - reference) / abs(reference) if v is not None and reference and r.status != "diverged" else None
        ranked.append(Ranked(r, i + 1 if i < len(finished) else None, v, delta))
    sort_rows(ranked, sort, label=lambda x: x.result.label, field=lambda x, key: x.result.get(key))
    return ranked


def metric_coverage(results: list[RunResult], metric: str) -> str:
    """A note when some finished runs have no value for the metric ('' when none lacks it). A ConfigError when
    no run has one, unless it is a training metric and some run has not finished (its value may still come)."""
    check_metric(metric)
    lacking = [r for r in results if finite_or_none(r.get(metric)) is None]
    source = METRIC_SOURCES.get(metric)
    if len(lacking) == len(results) and (source or all(r.status == "complete" for r in results)):
        where = f"none of the {len(results)} runs has" if len(results) > 1 else "the run has no"
        raise ConfigError(f"{where} {metric}; {source or 'rank by another --metric'}"
                          + (", or rank by another --metric" if source else ""))
    left_out = [r for r in lacking if r.status == "complete"]
    if not left_out:
        return ""
    verbs = "has no {} and is" if len(left_out) == 1 else "have no {} and are"
    return (f"{len(left_out)} of {len(results)} runs {verbs.format(metric)} not ranked ({_names(left_out)})"
            + (f"; {source}" if source else ""))


def _names(results: list[RunResult], most: int = 3) -> str:
    labels = [r.label for r in results]
    return ", ".join(labels[:most]) + (f" and {len(labels) - most} more" if len(labels) > most else "")


def ranking_warnings(results: list[RunResult], metric: str, strict: bool = True) -> list[str]:
    """What a ranking of these runs must say with it: that they are not comparable (comparability_warning), and
    which finished runs lack the metric (metric_coverage). With strict, a metric that no run has is a ConfigError;
    without, it is one more warning (a sweep that went well still shows its runs)."""
    try:
        coverage = metric_coverage(results, metric)
    except ConfigError as e:
        if strict:
            raise
        coverage = str(e)
    return [text for text in (comparability_warning(results, metric), coverage, unstarted_runs(results)) if text]


def unstarted_runs(results: list[RunResult]) -> str:
    """A note naming the runs that the sweeps of these runs plan but have not started ('' when none): a ranking of
    a sweep stopped part-way must not read as the whole sweep."""
    notes = []
    for folder in sorted({r.run.path.parent for r in results}):
        plan = (_read_json(folder / SWEEP_FILE) or {}).get("plan")
        names = [e.get("name") for e in plan if isinstance(e, dict)] if isinstance(plan, list) else []
        missing = [name for name in names if isinstance(name, str) and name and not (folder / name).exists()]
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            notes.append(f"{fmt_n(len(missing), 'planned run')} of sweep {folder.name} not started yet ({shown})")
    if not notes:
        return ""
    return "; ".join(notes) + "; run the same `hybridctl ablate` command again to train them"


def comparability_warning(results: list[RunResult], metric: str = "best_val_loss") -> str:
    """'' when the runs share data (validation split included), tokenizer, vocabulary and sequence length; else one
    line naming what differs and which runs, the smaller groups first (settings that split the runs alike, as a
    tokenizer and its vocabulary do, are named together)."""
    if metric in TOKENIZER_FREE:
        return ""
    position = {id(r): i for i, r in enumerate(results)}
    splits: dict[tuple, tuple[list[str], list[list[RunResult]], list[list[Any]]]] = {}
    for key, setting in COMPARABLE.items():
        groups: dict[Any, list[RunResult]] = {}
        for r in results:
            if r.get(key) is not None:
                groups.setdefault(r.get(key), []).append(r)
        if len(groups) > 1:
            ordered = sorted(groups.items(), key=lambda item: (len(item[1]), position[id(item[1][0])]))
            split = tuple(tuple(id(r) for r in rs) for _, rs in ordered)
            settings, _, values = splits.setdefault(split, ([], [rs for _, rs in ordered], []))
            settings.append(setting)
            values.append([v for v, _ in ordered])
    parts = []
    for settings, groups, values in splits.values():
        per_group = zip(*values)  # each group's values of the settings named together
        parts.append(f"{', '.join(settings)}: "
                     + " vs ".join(f"{_names(rs)} ({', '.join(str(v) if v != '' else 'none' for v in vs)})"
                                   for rs, vs in zip(groups, per_group)))
    if not parts:
        return ""
    return ("runs differ in " + "; ".join(parts) + "; losses per token on different data, tokenizers or sequence "
            "lengths are not comparable, so the ranking is not like for like")


def result_record(row: Ranked, metric: str) -> dict[str, Any]:
    """One run as plain JSON values (for --json)."""
    r = row.result
    record = {"rank": row.rank, "name": r.label, "path": str(r.run.path), "status": r.status, "metric": metric,
              "value": row.value, "delta_pct": row.delta_pct}
    keys = ("layer_types", "attention_fraction", "lr", "peak_lr", "seed", "params", "steps", "planned_steps", "tokens", "best_val_loss",
            "best_step", "best_val_acc", "best_val_ppl", "final_val_loss", "final_val_acc", "final_val_ppl",
            "final_val_mqar_acc", "tok_s", "train_time_s", "wall_time_s", "arc_acc", "arc_acc_norm", "arc_n",
            "dataset", "tokenizer", "vocab_size", "seq_len", "max_tokens", "val_fraction", "val_split", "eval_windows")
    record.update({k: finite_or_none(r.get(k)) for k in keys})  # NaN is not JSON
    return record


# --sort keys other than rank and name: (the field they read, whether larger comes first)
SORT_FIELDS = {"attention": ("attention_fraction", False), "lr": ("lr", False), "tok_s": ("tok_s", True),
               "time": ("train_time_s", False), "params": ("params", False)}


def sort_rows(rows: list, sort: str, label, field) -> None:
    """Put ranked rows (runs or configurations) in --sort order, in place: by label(row) for "name", else by
    field(row, key) with the rows that lack it last; "rank" keeps the ranking's order."""
    if sort == "name":
        rows.sort(key=label)
    elif sort in SORT_FIELDS:
        key, larger_first = SORT_FIELDS[sort]

        def order(row):
            value = field(row, key)
            return (value is None, -(value or 0) if larger_first else (value or 0))

        rows.sort(key=order)
