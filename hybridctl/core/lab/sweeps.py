"""Sweeps: LR and architecture sweeps planned, written down and run, resumably.

A sweep is a folder `runs/ablations/<sweep>/` holding one ordinary run folder per planned run and
`sweep.json` (kind, plan, steps, seeds, status per run, warnings). Running the same sweep again skips finished
runs, resumes unfinished ones from their newest checkpoint and restarts runs that never reached one; a plan that
only adds runs (more seeds, more values) trains just those, and any other change of plan under the same name is
refused unless forced, so results of two plans never mix in one folder. Plans are made in sweep_plans.py. While a process runs
the sweep it holds `sweep.lock` (an flock, like a run's run.lock), and a second one is refused before it writes.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hybridctl.core.training import checkpoint_files
from hybridctl.core.data.token_cache import cache_key, load_token_data
from hybridctl.core.errors import Diverged, HybridctlError, RunError, TrainingError
from hybridctl.core.files import write_json_atomic
from hybridctl.core.lab.render import fmt_lr
from hybridctl.core.presets import parse_override
from hybridctl.core.lab.sweep_plans import (  # noqa: F401  (planning lives there; these names stay importable here)
    ARCH_GROUPS, DEFAULT_LRS, DEFAULT_STEPS, STUDY_A, STUDY_C, PlannedRun, SweepPlan, parse_lr_values,
    parse_presets, parse_seeds, plan_arch_sweep, plan_lr_sweep, resolve_steps)
from hybridctl.core.training.runs import SWEEP_FILE, SWEEP_LOCK, RunDir, check_run_name, is_run_dir


SWEEPS_DIR = "ablations"
ARC_FILE = Path("bench") / "arc.json"


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


def _settings(entry: dict[str, Any]) -> dict[str, Any]:
    """A plan entry as its settings: overrides as key -> value, the last of a key winning, so `--steps 20` and
    `--set train.steps=20` (or the same override twice) plan the same run."""
    overrides = {}
    for text in entry.get("overrides", []):
        try:
            key, value = parse_override(text)
        except HybridctlError:
            key, value = [text], None
        overrides[".".join(key)] = value
    return {**entry, "overrides": overrides}


def same_run(old: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    return old is not None and _settings(old) == _settings(new)


def unchanged_runs(old: dict[str, Any], new: dict[str, Any]) -> set[str]:
    """The names of the new plan's runs that the sweep's plan (state) holds with the same settings."""
    before = {r["name"]: r for r in old.get("plan", [])}
    return {r["name"] for r in new["runs"] if same_run(before.get(r["name"]), r)}


def plan_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """A short description of how two plans differ ('' when they are the same, or when the new plan only adds
    runs, such as more seeds or values: the sweep grows and its finished runs stay)."""
    if old.get("kind") != new["kind"]:
        return f"kind {old.get('kind')} vs {new['kind']}"
    if old.get("steps") != new["steps"]:
        return f"steps {old.get('steps')} vs {new['steps']}"
    before = {r["name"]: r for r in old.get("plan", [])}
    after = {r["name"]: r for r in new["runs"]}
    added, removed = sorted(set(after) - set(before)), sorted(set(before) - set(after))
    if removed and (old.get("seeds") is None) != (new.get("seeds") is None):
        return ("it ran without --seeds, with runs named without _s<seed>" if old.get("seeds") is None
                else f"it ran with --seeds {','.join(map(str, old['seeds']))}")
    if removed:
        return ", ".join([*(f"+{n}" for n in added), *(f"-{n}" for n in removed)])
    changed = [n for n in before if not same_run(before[n], after[n])]
    if changed:
        return f"settings of {', '.join(changed)} changed"
    return ""


def replan_advice(old: dict[str, Any], new: dict[str, Any]) -> str:
    """What to do about a plan that differs from the sweep's: a sweep grown to more seeds than this command asks
    for (rerunning the first command of a sweep grown seed by seed) names the seeds that go on with it."""
    subset = len(unchanged_runs(old, new)) == len(new["runs"])
    seeds = old.get("seeds")
    if (subset and old.get("kind") == new["kind"] and old.get("steps") == new["steps"] and seeds and new.get("seeds")
            and set(new["seeds"]) < set(seeds)):
        listed = ",".join(map(str, seeds))
        return (f"it holds seeds {listed}: pass --seeds {listed} to go on with it, pick another --name, or pass "
                "--force to delete the runs this command leaves out")
    return ("re-run with its original options, pick another --name, or pass --force to replace the runs that "
            "differ (runs the new plan leaves out are deleted)")


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
    if recorded_status == "diverged" or summary.get("status") == "diverged":
        return RunAction("diverged")
    try:
        if run.load_config().train.steps != planned.cfg.train.steps:
            return RunAction("start")  # changed by hand (e.g. resume --extend-steps): no longer this plan's run
    except HybridctlError:
        return RunAction("start")
    for checkpoint in reversed(run.step_checkpoints()):
        try:
            step = checkpoint_files.read_state(checkpoint)["step"]
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
    return f"the sweep there was planned differently ({diff})" if diff and _has_runs(path) else ""


def preview_actions(plan: SweepPlan, path: Path) -> list[RunAction]:
    """What running the plan would do now, reading only (for --dry-run)."""
    if sweep_conflict(plan, path):
        return [RunAction("start") for _ in plan.runs]
    status = (read_sweep(path) or {}).get("status", {})
    return [next_action(RunDir(path / r.name), r, status.get(r.name)) for r in plan.runs]


def _has_runs(path: Path) -> bool:
    """Whether any run of the sweep has a folder: a sweep that failed before its first run (the data could not
    be loaded, say) holds only its plan, which a new plan may replace."""
    return any(is_run_dir(child) for child in Path(path).iterdir())


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
        if diff and not _has_runs(path):
            state = None  # nothing trained under the old plan: the new one replaces it
        elif diff and not force:
            raise RunError(f"sweep {path} was planned differently ({diff}); {replan_advice(state, new)}")
        elif diff:
            # Forced: keep runs whose plan entry is unchanged, drop the ones that changed or left the plan.
            _remove_runs(path, unchanged_runs(state, new) if state.get("steps") == new["steps"] else set())
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
        "kind": plan.kind, "name": plan.name, "steps": plan.steps, "seeds": plan.seeds, "plan": new["runs"],
        "created": old.get("created", now), "updated": now,
        "status": {r.name: old.get("status", {}).get(r.name, "pending") for r in plan.runs},
        "errors": old.get("errors", {}),
        "warnings": list(plan.warnings),  # this invocation's; add_warnings appends what the results show
    }
    if plan.placements is not None:  # report reads it to analyse placements
        state["placements"] = plan.placements
    write_json_atomic(path / SWEEP_FILE, state)
    return state


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
    from hybridctl.core.training.trainer import train  # torch: loaded only when a sweep trains

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
        cfg = copy.deepcopy(planned.cfg)
        locked = False  # a run another process holds (the lock refused) is that process's to record

        def stopped_status() -> str:
            """'interrupted', or 'pending' after removing a run that stopped before its first step (a dataset that
            cannot be read, say), as `train` does: no half-made folder for compare to list."""
            if action.kind == "start" and locked and run.is_unstarted():
                run.discard_if_unstarted()
                return "pending"
            return "interrupted"

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
            train(cfg, run, resume_from=action.checkpoint, callback=callback, data=datasets[key])
            save_state(planned.name, "complete")
        except Diverged as e:
            # The trainer's own advice (train again with --set train.lr) does not apply to a sweep's run.
            message = f"{e.problem}; {divergence_advice(plan.kind, run, planned.preset)}"
            state["errors"][planned.name] = message
            save_state(planned.name, "diverged")
            if notify is not None:
                notify(planned, index, RunAction("diverged", step=e.step, note=message))
            continue
        except TrainingError as e:
            save_state(planned.name, stopped_status())
            stopped = TrainingError(
                f"sweep {plan.name} stopped in run {planned.name} ({e}); finished runs are kept, "
                "run the same ablate command again to resume the sweep"
            )
            stopped.exit_code = e.exit_code  # 130 / 143 / 141 after Ctrl-C / SIGTERM / a closed output, as train exits
            raise stopped from None
        except KeyboardInterrupt:
            # A second Ctrl-C, or one outside the training loop (loading data): still say how to go on.
            save_state(planned.name, stopped_status())
            stopped = TrainingError(
                f"sweep {plan.name} interrupted in run {planned.name}; finished runs are kept, "
                "run the same ablate command again to resume the sweep"
            )
            stopped.exit_code = 130
            raise stopped from None
        except BaseException:
            if locked:
                save_state(planned.name, stopped_status())
            raise
        finally:
            if callback is not None and hasattr(callback, "close"):
                callback.close()
            run.release_lock()
    return state


def add_warnings(path: Path, warnings: list[str]) -> None:
    """Keep what the finished sweep's results warn about (e.g. a best LR at the edge of the grid) in sweep.json."""
    state = read_sweep(path)
    if state is None or not warnings:
        return
    lock = lock_sweep(path)
    try:
        state = read_sweep(path) or state
        state["warnings"] = list(state.get("warnings", [])) + [w for w in warnings if w not in state.get("warnings", [])]
        write_json_atomic(Path(path) / SWEEP_FILE, state)
    finally:
        lock.release_lock()
