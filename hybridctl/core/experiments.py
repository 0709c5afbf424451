"""Experiments: LR and architecture sweeps, reading runs back, ranking them, and the findings of a report.

A sweep is a folder `runs/ablations/<sweep>/` holding one ordinary run folder per planned run and
`sweep.json` (kind, plan, steps, status per run). Running the same sweep again skips finished runs, resumes
unfinished ones from their newest checkpoint and restarts runs that never reached one; a different plan under
the same name is refused unless forced, so results of two plans never mix in one folder. While a process runs
the sweep it holds `sweep.lock` (an flock, like a run's run.lock), and a second one is refused before it writes.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hybridctl.core import checkpoint as ckpt
from hybridctl.core import synthetic
from hybridctl.core.config import Config, DataConfig, load_config, parse_override, suggest
from hybridctl.core.data import cache_key, load_token_data
from hybridctl.core.errors import ConfigError, HybridctlError, RunError, TrainingError
from hybridctl.core.plots import Chart, Series
from hybridctl.core.render import fmt_count, fmt_lr
from hybridctl.core.runs import (SWEEP_FILE, SWEEP_LOCK, RunDir, check_run_name, find_runs, is_run_dir,
                                 write_json_atomic)
from hybridctl.core.trainer import train

SWEEPS_DIR = "ablations"
ARC_FILE = Path("bench") / "arc.json"

DEFAULT_LRS = [3e-4, 5e-4, 1e-3, 1.5e-3, 2e-3]
DEFAULT_STEPS = {"lr": 200, "arch": 300}
STUDY_A = [
    "deltanet", "hybrid_8", "hybrid_sparse", "hybrid_25", "hybrid_late", "hybrid_42", "hybrid_alternating",
    "hybrid_58", "hybrid_67", "hybrid_75", "hybrid_83", "hybrid_92", "transformer",
]
STUDY_C = [
    "sandwich", "linear_first", "alternating_fl", "full_first",
    "dsa_sandwich", "dsa_linear_first", "dsa_alternating", "dsa_full_first",
]
ARCH_GROUPS = {"all": STUDY_A, "study_a": STUDY_A, "study_c": STUDY_C}


# ---------------------------------------------------------------------------------------------------------
# Plans


def parse_lr_values(text: str) -> list[float]:
    values = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise ConfigError(f"--values: '{item}' is not a number; give learning rates like 3e-4,1e-3,2e-3") from None
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"--values: learning rates must be positive, got {item}")
        if value not in values:
            values.append(value)
    if not values:
        raise ConfigError("--values is empty; give learning rates like 3e-4,1e-3,2e-3")
    return values


def parse_patterns(text: str) -> list[str]:
    """Comma-separated preset names and group names (all, study_a, study_c), expanded in order, without repeats."""
    names: list[str] = []
    for item in text.split(","):
        item = item.strip()
        for name in ARCH_GROUPS.get(item, [item] if item else []):
            if name not in names:
                names.append(name)
    if not names:
        raise ConfigError(f"--patterns is empty; give preset names or a group ({', '.join(ARCH_GROUPS)})")
    return names


@dataclass
class PlannedRun:
    name: str
    preset: str
    overrides: list[str]
    value: Any  # the swept value: an LR, or the preset name
    cfg: Config = field(repr=False, compare=False)

    @property
    def tokens(self) -> int:
        t = self.cfg.train
        return t.steps * t.batch_size * t.seq_len

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "preset": self.preset, "overrides": self.overrides, "value": self.value}


@dataclass
class SweepPlan:
    kind: str  # "lr" or "arch"
    name: str
    steps: int
    runs: list[PlannedRun]

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.runs)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "steps": self.steps, "runs": [r.to_dict() for r in self.runs]}


def _override_value(overrides: list[str], key: str):
    found = None
    for text in overrides:
        path, value = parse_override(text)
        if ".".join(path) == key:
            found = value
    return found


def resolve_steps(kind: str, steps: int | None, overrides: list[str]) -> int:
    """--steps wins, then a `--set train.steps=N`, then the sweep kind's default (200 for LR, 300 for arch)."""
    if steps is None:
        steps = _override_value(overrides, "train.steps") or DEFAULT_STEPS[kind]
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"--steps must be a positive integer, got {steps!r}")
    return steps


def plan_lr_sweep(preset: str, values: list[float], steps: int | None = None, overrides: list[str] | None = None,
                  name: str | None = None) -> SweepPlan:
    overrides = list(overrides or [])
    if _override_value(overrides, "train.lr") is not None:
        raise ConfigError("an LR sweep sets train.lr itself; drop --set train.lr and list the rates with --values")
    steps = resolve_steps("lr", steps, overrides)
    stem = Path(preset).stem
    runs = []
    for lr in values:
        run_overrides = overrides + [f"train.steps={steps}", f"train.lr={lr!r}"]
        run_name = f"{stem}_lr{fmt_lr(lr)}"
        cfg = load_config(preset, run_overrides)
        cfg.name = run_name
        runs.append(PlannedRun(run_name, preset, run_overrides, lr, cfg))
    return SweepPlan("lr", name or f"lr_{stem}", steps, runs)


def plan_arch_sweep(presets: list[str], steps: int | None = None, overrides: list[str] | None = None,
                    name: str | None = None, label: str = "") -> SweepPlan:
    """One run per preset, each with its own LR; same data and seed unless the presets differ there."""
    overrides = list(overrides or [])
    steps = resolve_steps("arch", steps, overrides)
    runs = []
    for preset in presets:
        run_overrides = overrides + [f"train.steps={steps}"]
        cfg = load_config(preset, run_overrides)  # an unknown preset raises here, before anything runs
        run_name = Path(preset).stem
        cfg.name = run_name
        runs.append(PlannedRun(run_name, preset, run_overrides, run_name, cfg))
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"--patterns names two presets with the same file name ({', '.join(names)}); rename one")
    return SweepPlan("arch", name or f"arch_{label or '-'.join(names)}", steps, runs)


# ---------------------------------------------------------------------------------------------------------
# Sweep folders: state, resumption


def sweep_path(out: Path, name: str) -> Path:
    check_run_name(name, "sweep name")
    return Path(out) / SWEEPS_DIR / name


def read_sweep(path: Path) -> dict[str, Any] | None:
    f = Path(path) / SWEEP_FILE
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        raise RunError(f"{f} is corrupt (not valid JSON); delete it and re-run with --force") from None


def plan_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """A short description of how two plans differ ('' when they are the same)."""
    if old.get("kind") != new["kind"]:
        return f"kind {old.get('kind')} vs {new['kind']}"
    if old.get("steps") != new["steps"]:
        return f"steps {old.get('steps')} vs {new['steps']}"
    before = {r["name"]: r for r in old.get("plan", [])}
    after = {r["name"]: r for r in new["runs"]}
    added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
    if added or removed:
        return ", ".join([*(f"+{n}" for n in added), *(f"-{n}" for n in removed)])
    changed = [n for n in after if before[n] != after[n]]
    if changed:
        return f"settings of {', '.join(changed)} changed"
    return ""


@dataclass
class RunAction:
    """What a sweep will do with one planned run: 'done', 'diverged', 'resume' (from checkpoint) or 'start'.

    run_sweep also reports a run that has just diverged, as 'diverged' with the step it stopped at; `note` says
    how to get a diverged run trained."""

    kind: str
    checkpoint: Path | None = None
    step: int = 0
    note: str = ""


def next_action(run: RunDir, planned: PlannedRun, recorded_status: str | None) -> RunAction:
    if not run.exists():
        return RunAction("start")
    summary = run.read_summary()
    if summary.get("status") == "complete" and summary.get("steps") == planned.cfg.train.steps:
        return RunAction("done", step=summary["steps"])
    if recorded_status == "diverged":
        return RunAction("diverged")
    try:
        if run.load_config().train.steps != planned.cfg.train.steps:
            return RunAction("start")  # changed by hand (e.g. resume --extend-steps): no longer this plan's run
    except HybridctlError:
        return RunAction("start")
    for checkpoint in reversed(run.step_checkpoints()):
        try:
            step = ckpt.read_state(checkpoint)["step"]
        except (HybridctlError, KeyError):
            continue
        if step < planned.cfg.train.steps:
            return RunAction("resume", checkpoint, step)
    return RunAction("start")  # no usable checkpoint: train it again from the start


def divergence_advice(kind: str | None, run: RunDir, preset: str | None = None) -> str:
    """How to get a diverged sweep run trained. Resuming would replay the same batches at the same LR, so it
    takes a lower LR, and the sweep skips a run recorded as diverged until its settings or its folder change."""
    try:
        lr = run.load_config().train.lr
    except HybridctlError:
        lr = None
    if kind == "lr" and lr is not None:
        return (f"LR {fmt_lr(lr)} is too high: run the ablate command again with --force and --values without it "
                "(or with a lower rate in its place); --force keeps the runs whose settings are unchanged")
    now = f" (now {lr:g})" if lr is not None else ""
    return (f"its LR is too high: lower train.lr in preset {preset or run.name}{now}, delete {run.path} and run "
            "the same ablate command again; finished runs are kept")


def sweep_conflict(plan: SweepPlan, path: Path) -> str:
    """Why running the plan in this folder would need --force ('' when it would not)."""
    state = read_sweep(path)
    if state is None:
        return f"{path} exists but is not a sweep" if _holds_files(path) else ""
    diff = plan_difference(state, plan.to_dict())
    return f"the sweep there was planned differently ({diff})" if diff else ""


def preview_actions(plan: SweepPlan, path: Path) -> list[RunAction]:
    """What running the plan would do now, reading only (for --dry-run)."""
    if sweep_conflict(plan, path):
        return [RunAction("start") for _ in plan.runs]
    status = (read_sweep(path) or {}).get("status", {})
    return [next_action(RunDir(path / r.name), r, status.get(r.name)) for r in plan.runs]


def _holds_files(path: Path) -> bool:
    """Whether the folder exists and holds anything but a sweep's lock."""
    path = Path(path)
    return path.is_dir() and any(p.name != SWEEP_LOCK for p in path.iterdir())


class _SweepLock(RunDir):
    """RunDir's lock (an flock the kernel drops when its owner exits, however it exits), kept in a sweep folder's
    sweep.lock."""

    lock_path = property(lambda self: self.path / SWEEP_LOCK)


def lock_sweep(path: Path) -> RunDir:
    """Lock the sweep folder (made if missing) for this process; release_lock() on the result frees it."""
    lock = _SweepLock(path)
    try:
        lock.acquire_lock()
    except OSError as e:
        raise RunError(f"cannot create {path}: {e.strerror}; choose another --out folder") from None
    except RunError:
        owner = lock.lock_owner()
        raise RunError(f"sweep {path} is in use by process {owner if owner and owner > 0 else 'unknown'}; wait for it to finish "
                       "or stop it first") from None
    return lock


def _remove_runs(path: Path, keep: set[str]) -> None:
    """Delete the run folders directly under a sweep folder, except those named in keep."""
    for child in sorted(path.iterdir()):
        if child.name not in keep and is_run_dir(child):
            RunDir(child).acquire_lock()  # refuse to delete a run another process is writing
            shutil.rmtree(child)


def prepare_sweep(plan: SweepPlan, path: Path, force: bool = False) -> dict[str, Any]:
    """Create or reopen the sweep folder; returns its state. A different plan is refused unless force."""
    path = Path(path)
    state = read_sweep(path)
    new = plan.to_dict()
    if state is None and _holds_files(path) and not force:
        raise RunError(f"{path} exists but is not a sweep (no {SWEEP_FILE}); pick another --name or pass --force to replace it")
    if state is not None:
        diff = plan_difference(state, new)
        if diff and not force:
            raise RunError(
                f"sweep {path} was planned differently ({diff}); re-run with its original options, "
                "pick another --name, or pass --force to replace the runs that differ"
            )
        if diff:
            # Forced: keep runs whose plan entry is unchanged, drop the ones that changed or left the plan.
            keep = {r["name"] for r in new["runs"]} if state.get("steps") == new["steps"] else set()
            old_entries = {r["name"]: r for r in state.get("plan", [])}
            for r in new["runs"]:
                if old_entries.get(r["name"]) != r:
                    keep.discard(r["name"])
            _remove_runs(path, keep)
            state = None
    elif force and path.is_dir():
        _remove_runs(path, keep=set())
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create {path}: {e.strerror}; choose another --out folder") from None
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    old = state or {}
    state = {
        "kind": plan.kind, "name": plan.name, "steps": plan.steps, "plan": new["runs"],
        "created": old.get("created", now), "updated": now,
        "status": {r.name: old.get("status", {}).get(r.name, "pending") for r in plan.runs},
        "errors": old.get("errors", {}),
    }
    write_json_atomic(path / SWEEP_FILE, state)
    return state


class _EventWatcher:
    """Passes trainer events on and remembers the last one (a run that stops right after a 'skip' event
    with a full row of non-finite losses diverged; any other TrainingError means it was interrupted)."""

    def __init__(self, callback):
        self.callback, self.last = callback, ("", {})

    def __call__(self, kind, record):
        self.last = (kind, record)
        if self.callback is not None:
            self.callback(kind, record)

    def diverged(self, cfg: Config) -> bool:
        kind, record = self.last
        return kind == "skip" and record.get("in_row", 0) >= cfg.train.max_bad_steps


Notify = Callable[[PlannedRun, int, RunAction], None]


def run_sweep(plan: SweepPlan, path: Path, force: bool = False, progress: Callable[[PlannedRun, int], Any] | None = None,
              notify: Notify | None = None) -> dict[str, Any]:
    """Train every planned run that is not finished; returns the sweep state (also in sweep.json).

    `progress(planned, index)` makes the trainer callback of one run (closed afterwards if it has close());
    `notify(planned, index, action)` hears what is about to happen to each run. A diverged run is recorded and
    the sweep goes on; an interrupted one (Ctrl-C) stops the sweep with its finished runs intact.
    """
    path = Path(path)
    lock = lock_sweep(path)  # a second process running the same sweep stops here, before it changes anything
    try:
        return _run_sweep(plan, path, force, progress, notify)
    finally:
        lock.release_lock()


def _run_sweep(plan: SweepPlan, path: Path, force: bool, progress: Callable[[PlannedRun, int], Any] | None,
               notify: Notify | None) -> dict[str, Any]:
    state = prepare_sweep(plan, path, force)
    datasets: dict[str, Any] = {}

    def save_state(name: str, status: str) -> None:
        state["status"][name] = status
        state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_json_atomic(path / SWEEP_FILE, state)

    for index, planned in enumerate(plan.runs):
        run = RunDir(path / planned.name)
        action = next_action(run, planned, state["status"].get(planned.name))
        if action.kind == "diverged":
            action.note = divergence_advice(plan.kind, run, planned.preset)
        if notify is not None:
            notify(planned, index, action)
        if action.kind in ("done", "diverged"):
            save_state(planned.name, "complete" if action.kind == "done" else "diverged")
            continue
        callback = progress(planned, index) if progress is not None else None
        watcher = _EventWatcher(callback)
        cfg = copy.deepcopy(planned.cfg)
        locked = False  # a run another process holds (the lock refused) is that process's to record
        try:
            if action.kind == "start":
                run.create(cfg, force=True)
                locked = True
            else:
                run.acquire_lock()
                locked = True
                run.remove_partial_checkpoints()
                cfg = run.load_config()  # the resolved config the run was started with
            save_state(planned.name, "running")
            key = cache_key(cfg.data)
            if key not in datasets:
                datasets[key] = load_token_data(cfg.data)
            train(cfg, run, resume_from=action.checkpoint, callback=watcher, data=datasets[key])
            save_state(planned.name, "complete")
        except TrainingError as e:
            if watcher.diverged(cfg):
                # The trainer's own advice (train again with --set train.lr) does not apply to a sweep's run.
                at = watcher.last[1]
                steps = f"{at['in_row']} steps in a row" if at["in_row"] > 1 else "1 step"
                message = (f"loss was not finite for {steps} (last at step {at['step']}); "
                           + divergence_advice(plan.kind, run, planned.preset))
                state["errors"][planned.name] = message
                save_state(planned.name, "diverged")
                if notify is not None:
                    notify(planned, index, RunAction("diverged", step=at["step"], note=message))
                continue
            save_state(planned.name, "interrupted")
            stopped = TrainingError(
                f"sweep {plan.name} stopped in run {planned.name} ({e}); finished runs are kept, "
                "run the same ablate command again to resume the sweep"
            )
            stopped.exit_code = e.exit_code  # 130 / 143 after Ctrl-C / SIGTERM, as train and resume exit
            raise stopped from None
        except KeyboardInterrupt:
            # A second Ctrl-C, or one outside the training loop (loading data): still say how to go on.
            save_state(planned.name, "interrupted")
            stopped = TrainingError(
                f"sweep {plan.name} interrupted in run {planned.name}; finished runs are kept, "
                "run the same ablate command again to resume the sweep"
            )
            stopped.exit_code = 130
            raise stopped from None
        except BaseException:
            if locked:
                save_state(planned.name, "interrupted")
            raise
        finally:
            if callback is not None and hasattr(callback, "close"):
                callback.close()
            run.release_lock()
    return state


# ---------------------------------------------------------------------------------------------------------
# Reading runs back


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


def _finite(value):
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
    complete = summary.get("status") == "complete"
    saved = [] if complete else run.step_checkpoints()
    if complete:
        for key in ("steps", "tokens", "best_val_loss", "best_step", "final_val_loss", "final_val_acc", "final_val_ppl",
                    "final_val_mqar_acc", "tok_s", "train_time_s", "wall_time_s", "layer_types", "attention_fraction", "lr", "device"):
            if summary.get(key) is not None:
                values[key] = summary[key]
    else:
        last = rows[-1] if rows else {}
        values.update(steps=last.get("step", 0), tokens=last.get("tokens", 0))
        if saved and ckpt.step_of_dir(saved[-1]) > values["steps"]:
            try:  # a stop (Ctrl-C, SIGTERM) saves a checkpoint at its step without logging a line
                state = ckpt.read_state(saved[-1])
                values.update(steps=state["step"], tokens=state.get("tokens", values["tokens"]))
            except HybridctlError:
                pass  # damaged: resume passes over it too
        if evals:
            values.update(final_val_loss=evals[-1]["val_loss"], final_val_acc=evals[-1].get("val_acc"),
                          final_val_ppl=evals[-1].get("val_ppl"), final_val_mqar_acc=evals[-1].get("val_mqar_acc"))
            finite = [r for r in evals if _finite(r["val_loss"]) is not None]
            if finite:  # min() over a NaN answers by position
                best = min(finite, key=lambda r: r["val_loss"])
                values.update(best_val_loss=best["val_loss"], best_step=best["step"])
    best_eval = next((r for r in evals if r["step"] == values.get("best_step")), None)
    if values.get("best_val_loss") is not None:
        values["best_val_ppl"] = math.exp(min(values["best_val_loss"], 50.0))
        values["best_val_acc"] = best_eval.get("val_acc") if best_eval else None
    arc = _read_json(run.path / ARC_FILE)
    if arc is not None:
        values.update(arc_acc=arc.get("acc"), arc_acc_norm=arc.get("acc_norm"), arc_n=arc.get("n"))
    if complete:
        status = "complete"
    elif run.lock_owner():
        status = "running"
    elif _recorded_diverged(run) or (evals and _finite(evals[-1]["val_loss"]) is None):
        status = "diverged"
    else:
        status = "partial" if evals or saved else "empty"
    return RunResult(run, status, values, evals, logs)


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
    value = lambda r: _finite(r.get(metric))  # noqa: E731

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
    keys = {
        "name": lambda x: x.result.label,
        "attention": lambda x: (x.result.get("attention_fraction") is None, x.result.get("attention_fraction") or 0),
        "lr": lambda x: (x.result.get("lr") is None, x.result.get("lr") or 0),
        "tok_s": lambda x: (x.result.get("tok_s") is None, -(x.result.get("tok_s") or 0)),
        "time": lambda x: (x.result.get("train_time_s") is None, x.result.get("train_time_s") or 0),
        "params": lambda x: (x.result.get("params") is None, x.result.get("params") or 0),
    }
    if sort in keys:
        ranked.sort(key=keys[sort])
    return ranked


def metric_coverage(results: list[RunResult], metric: str) -> str:
    """A note when some finished runs have no value for the metric ('' when none lacks it). A ConfigError when
    no run has one, unless it is a training metric and some run has not finished (its value may still come)."""
    check_metric(metric)
    lacking = [r for r in results if _finite(r.get(metric)) is None]
    source = METRIC_SOURCES.get(metric)
    if len(lacking) == len(results) and (source or all(r.status == "complete" for r in results)):
        where = f"none of the {len(results)} runs has" if len(results) > 1 else "the run has no"
        raise ConfigError(f"{where} {metric}; {source or 'rank by another --metric'}"
                          + (", or rank by another --metric" if source else ""))
    left_out = [r for r in lacking if r.status == "complete"]
    if not left_out:
        return ""
    return (f"{len(left_out)} of {len(results)} runs have no {metric} and are not ranked ({_names(left_out)})"
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
    return [text for text in (comparability_warning(results, metric), coverage) if text]


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
    keys = ("layer_types", "attention_fraction", "lr", "params", "steps", "planned_steps", "tokens", "best_val_loss",
            "best_step", "best_val_acc", "best_val_ppl", "final_val_loss", "final_val_acc", "final_val_ppl",
            "final_val_mqar_acc", "tok_s", "train_time_s", "wall_time_s", "arc_acc", "arc_acc_norm", "arc_n",
            "dataset", "tokenizer", "vocab_size", "seq_len", "max_tokens", "val_fraction", "val_split", "eval_windows")
    record.update({k: _finite(r.get(k)) for k in keys})  # NaN is not JSON
    return record


# ---------------------------------------------------------------------------------------------------------
# Charts of results


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


# ---------------------------------------------------------------------------------------------------------
# Reports: findings computed from the data, rendered by render.py to the terminal and to Markdown


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
