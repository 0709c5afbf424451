"""Sweeps (`ablate`), `compare` and `report` on micro runs: files, exit codes, output, resumption."""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from rich.console import Console

from conftest import MICRO, cli_args_for_micro, run_cli
from hybridctl.core.lab.report import build_report
from hybridctl.core.lab.results import collect_results, rank_results
from hybridctl.core.lab.sweeps import STUDY_A, STUDY_C, divergence_advice, next_action, parse_lr_values, parse_presets, plan_arch_sweep, plan_lr_sweep, prepare_sweep, preview_actions, read_sweep, resolve_steps, run_sweep, sweep_conflict, sweep_path
from hybridctl.core.training import runs
from hybridctl.core.config import load_config, load_config_file
from hybridctl.core.errors import ConfigError, RunError, TrainingError
from hybridctl.core.lab.charts import Chart, Series, chart_size
from hybridctl.core.lab.plots import render_chart
from hybridctl.core.lab.render import fmt_count, fmt_lr, print_chart, results_rows
from hybridctl.core.training.runs import RunDir

LRS = ["1e-3", "3e-3"]
STEPS = 4  # checkpoints at steps 3 and 4 (MICRO saves every 3)
SWEEP_ARGS = ["ablate", "lr", "--preset", "tiny", "--values", ",".join(LRS), "--steps", str(STEPS)]


def run_names():
    return [f"tiny_lr{v}" for v in LRS]


def losses(run: RunDir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in run.read_metrics() if "loss" in r}


def snapshot(root):
    return {str(p): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One LR sweep of two micro runs, made through the CLI; the compare and report tests read it."""
    out = tmp_path_factory.mktemp("exp") / "runs"
    result = run_cli(*SWEEP_ARGS, "--out", str(out), *cli_args_for_micro())
    assert result.returncode == 0, result.stderr
    return out, out / "ablations" / "lr_tiny", result


def best_by_summary(path):
    summaries = {p.parent.name: json.loads(p.read_text()) for p in path.glob("*/summary.json")}
    return min(summaries, key=lambda n: summaries[n]["best_val_loss"]), summaries


# ---------------------------------------------------------------------------------------------------------
# ablate lr


def test_lr_sweep_writes_run_folders_and_plan(sweep):
    out, path, result = sweep
    state = json.loads((path / "sweep.json").read_text())
    assert state["kind"] == "lr" and state["steps"] == STEPS
    assert [r["name"] for r in state["plan"]] == run_names()
    assert state["status"] == {n: "complete" for n in run_names()}
    for entry, lr in zip(state["plan"], LRS):
        assert entry["overrides"][-2:] == [f"train.steps={STEPS}", f"train.lr={float(lr)!r}"]
        run = RunDir(path / entry["name"])
        cfg = load_config_file(run.config_path)
        assert cfg.train.lr == float(lr) and cfg.train.steps == STEPS and cfg.model.d_model == 32
        summary = run.read_summary()
        assert summary["status"] == "complete" and summary["steps"] == STEPS
        assert sorted(losses(run)) == list(range(1, STEPS + 1))
        assert [p.name for p in run.step_checkpoints()] == ["step_000003", "step_000004"]
        assert not run.lock_path.exists()
    best, summaries = best_by_summary(path)
    assert f"best lr: {best.split('_lr')[1]} " in result.stdout
    # ranked table: the best run's row comes first, and the LR chart falls back to a table without a terminal
    rows = [line for line in result.stdout.splitlines() if re.match(r"^\s*\d+\s+tiny_lr", line)]
    assert [line.split()[1] for line in rows] == sorted(summaries, key=lambda n: summaries[n]["best_val_loss"])
    assert "learning rate" in result.stdout and "┤" not in result.stdout


def test_second_invocation_skips_finished_runs(sweep):
    out, path, _ = sweep
    before = snapshot(path)
    again = run_cli(*SWEEP_ARGS, "--out", str(out), *cli_args_for_micro())
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("finished, skipping") == 2 and "training" not in again.stderr
    after = snapshot(path)
    for name in run_names():
        for f in ("summary.json", "metrics.jsonl", "checkpoints/step_000004/model.safetensors"):
            key = str(path / name / f)
            assert after[key] == before[key], key


def test_dry_run_writes_nothing(sweep, tmp_path):
    out, path, _ = sweep
    fresh = tmp_path / "runs"
    result = run_cli(*SWEEP_ARGS, "--out", str(fresh), "--dry-run", *cli_args_for_micro())
    assert result.returncode == 0, result.stderr
    assert not fresh.exists()
    per_run = STEPS * 4 * 32  # steps * batch * seq of MICRO
    assert f"{2 * per_run:,}" in result.stdout and all(n in result.stdout for n in run_names())
    assert result.stdout.count(" train ") + result.stdout.count(" train\n") == 2
    assert f"estimated tokens to train: {fmt_count(2 * per_run)} ({2 * per_run:,}) in 2 runs\n" in result.stdout
    finished = run_cli(*SWEEP_ARGS, "--out", str(out), "--dry-run", *cli_args_for_micro())  # the same, trained
    assert "estimated tokens to train: 0 (0) in 0 runs; 2 skipped (finished or diverged)" in finished.stdout

    # a different plan under the same sweep name is refused, one line, and nothing changes
    before = snapshot(out)
    changed = ["ablate", "lr", "--preset", "tiny", "--values", "1e-3,2e-3", "--steps", str(STEPS), "--out", str(out)]
    refused = run_cli(*changed, *cli_args_for_micro())
    assert refused.returncode == 1 and "planned differently" in refused.stderr and "+tiny_lr2e-3" in refused.stderr
    assert "--force" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert snapshot(out) == before


def test_forced_replan_keeps_identical_runs_and_drops_the_rest(sweep, tmp_path):
    _, path, _ = sweep
    copy = tmp_path / "lr_tiny"
    shutil.copytree(path, copy)
    keep_marker = copy / "tiny_lr1e-3" / "marker"
    keep_marker.write_text("kept")
    plan = plan_lr_sweep("tiny", [1e-3, 2e-3], STEPS, list(MICRO), name="lr_tiny")
    assert [a.kind for a in preview_actions(plan_lr_sweep("tiny", [1e-3, 3e-3], STEPS, list(MICRO)), copy)] == ["done", "done"]
    assert "+tiny_lr2e-3" in sweep_conflict(plan, copy)
    with pytest.raises(RunError, match="planned differently"):
        prepare_sweep(plan, copy)
    state = prepare_sweep(plan, copy, force=True)
    assert keep_marker.read_text() == "kept"  # same plan entry: finished run kept
    assert not (copy / "tiny_lr3e-3").exists()  # left the plan: removed
    assert [r["name"] for r in state["plan"]] == ["tiny_lr1e-3", "tiny_lr2e-3"]
    actions = preview_actions(plan, copy)
    assert [a.kind for a in actions] == ["done", "start"]


def test_the_same_settings_written_another_way_are_the_same_plan(sweep, tmp_path):
    """--steps N and --set train.steps=N (which the plan records twice), or an override given again, plan the
    same runs: no conflict, nothing retrained, not even with --force."""
    _, path, _ = sweep
    copy = tmp_path / "lr_tiny"
    shutil.copytree(path, copy)
    marker = copy / "tiny_lr1e-3" / "marker"
    marker.write_text("kept")
    again = [*MICRO, f"train.steps={STEPS}", MICRO[0]]  # steps by --set, not --steps; one override twice
    plan = plan_lr_sweep("tiny", [float(v) for v in LRS], None, again, name="lr_tiny")
    assert plan.runs[0].overrides != read_sweep(copy)["plan"][0]["overrides"]  # written otherwise...
    assert sweep_conflict(plan, copy) == ""  # ...planned the same
    assert [a.kind for a in preview_actions(plan, copy)] == ["done", "done"]
    prepare_sweep(plan, copy, force=True)
    assert marker.read_text() == "kept"
    changed = plan_lr_sweep("tiny", [float(v) for v in LRS], None, [*again, "train.warmup_steps=1"], name="lr_tiny")
    assert "settings of tiny_lr1e-3" in sweep_conflict(changed, copy)


def test_a_sweep_that_trained_nothing_takes_a_new_plan(tmp_path):
    """A sweep that failed before its first run (say the data could not be loaded) left only sweep.json: running
    it again with other options is no conflict, since no run would be lost."""
    path = tmp_path / "lr_tiny"
    prepare_sweep(plan_lr_sweep("tiny", [1e-3, 3e-3], STEPS, list(MICRO), name="lr_tiny"), path)
    plan = plan_lr_sweep("tiny", [1e-3, 2e-3], STEPS + 1, list(MICRO), name="lr_tiny")
    assert sweep_conflict(plan, path) == ""
    state = prepare_sweep(plan, path)
    assert state["steps"] == STEPS + 1 and [r["name"] for r in state["plan"]] == ["tiny_lr1e-3", "tiny_lr2e-3"]
    (path / "tiny_lr1e-3").mkdir()
    (path / "tiny_lr1e-3" / "config.toml").write_text("")  # once a run has a folder, a new plan needs --force
    with pytest.raises(RunError, match="planned differently"):
        prepare_sweep(plan_lr_sweep("tiny", [1e-3], STEPS, list(MICRO), name="lr_tiny"), path)


def test_next_action_by_run_state(sweep, tmp_path):
    _, path, _ = sweep
    plan = plan_lr_sweep("tiny", [float(LRS[0])], STEPS, list(MICRO))
    planned = plan.runs[0]
    run = RunDir(tmp_path / planned.name)
    assert next_action(run, planned, None).kind == "start"  # no folder
    shutil.copytree(path / planned.name, run.path)
    assert next_action(run, planned, "complete").kind == "done"
    run.summary_path.unlink()  # stopped after its last checkpoint but before the summary
    action = next_action(run, planned, "interrupted")
    assert (action.kind, action.step, action.checkpoint.name) == ("resume", 3, "step_000003")
    assert next_action(run, planned, "diverged").kind == "diverged"
    shutil.rmtree(run.checkpoints_dir)  # config but no checkpoint: trained again from the start
    assert next_action(run, planned, "interrupted").kind == "start"


def test_interrupted_sweep_resumes_from_checkpoint(sweep, tmp_path):
    """A real SIGINT in the second run (the trainer saves a checkpoint and stops); the rerun skips the finished
    first run and continues the second from step 3, ending where an uninterrupted run ends."""
    _, reference, _ = sweep
    out = tmp_path / "runs"
    plan = plan_lr_sweep("tiny", [float(v) for v in LRS], STEPS, list(MICRO))
    path = sweep_path(out, plan.name)

    def progress(planned, index):
        def callback(kind, record):
            if index == 1 and kind == "log" and record["step"] == 3:
                os.kill(os.getpid(), signal.SIGINT)
        return callback

    prepare_sweep(plan, path)
    shutil.copytree(reference / plan.runs[0].name, path / plan.runs[0].name)  # finished earlier
    with pytest.raises(TrainingError, match="run the same ablate command again") as stopped:
        run_sweep(plan, path, progress=progress)
    assert stopped.value.exit_code == 130
    first, second = (RunDir(path / n) for n in run_names())
    state = read_sweep(path)
    assert state["status"] == {first.name: "complete", second.name: "interrupted"}
    assert first.read_summary()["status"] == "complete" and not second.summary_path.exists()
    assert [p.name for p in second.step_checkpoints()] == ["step_000003"]
    (second.path / "marker").write_text("a restart would delete this")
    finished = first.summary_path.stat().st_mtime_ns

    result = run_cli(*SWEEP_ARGS, "--out", str(out), *cli_args_for_micro())
    assert result.returncode == 0, result.stderr
    assert f"{first.name}: finished, skipping" in result.stderr
    assert f"{second.name}: resuming from step 3" in result.stderr
    assert (second.path / "marker").exists() and first.summary_path.stat().st_mtime_ns == finished
    assert read_sweep(path)["status"][second.name] == "complete"
    assert sorted(losses(second)) == list(range(1, STEPS + 1))  # no step logged twice
    expected = losses(RunDir(reference / second.name))
    assert losses(second) == pytest.approx(expected, rel=1e-6, abs=0)


def wait_for_step(run: RunDir, step: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not (run.metrics_path.is_file() and max(losses(run), default=0) >= step):
        assert time.monotonic() < deadline, f"timed out waiting for step {step} of {run.path}"
        time.sleep(0.01)


def test_ablate_exits_130_on_ctrl_c_and_143_on_sigterm(tmp_path):
    """As train and resume do: the exit status says which signal stopped the sweep, and the last line how to go on."""
    out = tmp_path / "runs"
    args = ["ablate", "lr", "--preset", "tiny", "--values", "1e-3", "--steps", "5000", "--name", "sig", "--out", str(out),
            *cli_args_for_micro(["train.save_every=100000", "train.eval_every=100000"])]
    run = RunDir(out / "ablations" / "sig" / "tiny_lr1e-3")
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        log = tmp_path / f"{sig.name}.log"
        with open(log, "w") as stderr:
            child = subprocess.Popen([sys.executable, "-m", "hybridctl", *args], stdout=subprocess.DEVNULL, stderr=stderr)
            try:
                wait_for_step(run, max(losses(run), default=0) + 2)
                child.send_signal(sig)
                child.wait(timeout=120)
            finally:
                child.kill()
        err = log.read_text()
        assert child.returncode == code, err
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        assert re.fullmatch(rf"error: sweep sig stopped in run tiny_lr1e-3 \(stopped by {sig.name} at step \d+; "
                            r"checkpoint saved, continue with `hybridctl resume .*`\); finished runs are kept, "
                            r"run the same ablate command again to resume the sweep", last), last
        assert read_sweep(run.path.parent)["status"]["tiny_lr1e-3"] == "interrupted"


def test_second_ablate_of_a_running_sweep_is_refused_and_changes_nothing(tmp_path):
    out = tmp_path / "runs"
    args = ["ablate", "lr", "--preset", "tiny", "--values", "1e-3", "--steps", "5000", "--name", "busy", "--out", str(out),
            *cli_args_for_micro(["train.save_every=100000", "train.eval_every=100000"])]
    path = out / "ablations" / "busy"
    child = subprocess.Popen([sys.executable, "-m", "hybridctl", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_step(RunDir(path / "tiny_lr1e-3"), 2)
        before = (path / runs.SWEEP_FILE).read_text()
        second = run_cli(*args)
        assert second.returncode == 1 and second.stderr.strip() == (
            f"error: sweep {path} is in use by process {child.pid}; wait for it to finish or stop it first")
        assert (path / runs.SWEEP_FILE).read_text() == before and json.loads(before)["status"] == {"tiny_lr1e-3": "running"}
    finally:
        child.kill()
        child.wait(timeout=60)


def test_sweep_leaves_a_run_another_process_holds_as_it_was(tmp_path):
    """A sweep run that another process writes (a `resume` of it, say) stops the sweep, but is not marked interrupted."""
    plan = plan_lr_sweep("tiny", [1e-3], STEPS, list(MICRO))
    path = tmp_path / "sweep"
    prepare_sweep(plan, path)
    run = RunDir(path / plan.runs[0].name)
    run.create(plan.runs[0].cfg)
    run.release_lock()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from hybridctl.core.training.runs import RunDir; RunDir(sys.argv[1]).acquire_lock(); "
         "print('locked', flush=True); sys.stdin.read()", str(run.path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunError, match=f"in use by process {holder.pid}"):
            run_sweep(plan, path)
        assert read_sweep(path)["status"] == {run.name: "pending"}
        assert run.lock_owner() == holder.pid and run.is_unstarted()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not (path / runs.SWEEP_LOCK).exists()  # the sweep's own lock went with it


def test_second_ctrl_c_in_a_sweep_still_says_how_to_resume(tmp_path):
    """A KeyboardInterrupt (a second Ctrl-C, or one while data loads) exits 130 with the sweep's resume hint."""
    plan = plan_lr_sweep("tiny", [1e-3], STEPS, list(MICRO))
    path = tmp_path / "sweep"

    def progress(planned, index):
        def callback(kind, record):
            if kind == "log" and record["step"] == 2:
                raise KeyboardInterrupt
        return callback

    with pytest.raises(TrainingError, match="interrupted in run tiny_lr1e-3; .*run the same ablate command again") as stopped:
        run_sweep(plan, path, progress=progress)
    assert stopped.value.exit_code == 130
    assert read_sweep(path)["status"] == {"tiny_lr1e-3": "interrupted"}
    assert not RunDir(path / "tiny_lr1e-3").lock_path.exists()


def test_diverged_sweep_run_gets_advice_that_works(tmp_path):
    """The hint printed for a diverged run names a command that works: here, the same sweep without its LR."""
    out = tmp_path / "runs"
    micro = cli_args_for_micro(["train.max_bad_steps=1", "train.grad_clip=0"])
    sweep = ["ablate", "lr", "--preset", "tiny", "--steps", str(STEPS), "--name", "div", "--out", str(out)]
    result = run_cli(*sweep, "--values", "1e4,1e-3", *micro, env={"COLUMNS": "80"})  # a pipe's width
    assert result.returncode == 0, result.stderr
    path = out / "ablations" / "div"
    statuses = [line.split()[-1] for line in result.stdout.splitlines() if re.match(r"^[\d-]\s+tiny_lr", line)]
    assert statuses == ["complete", "(2/4)"] and "diverged (2/4)" in result.stdout  # the table's last column, whole
    line = next(line for line in result.stderr.splitlines() if "tiny_lr1e4: diverged" in line)
    assert line.startswith("[1/2] tiny_lr1e4: diverged, the sweep goes on: loss was not finite for 1 step (last at step 2); ")
    assert "LR 1e4 is too high: run the ablate command again with --force and --values without it" in line
    assert "--from best" not in result.stderr
    error = read_sweep(path)["errors"]["tiny_lr1e4"]
    assert "--values without it" in error and "--from best" not in error
    assert not (path / "tiny_lr1e4" / "best").exists()  # why `resume --from best` could not be the way

    finished = (path / "tiny_lr1e-3" / "summary.json").stat().st_mtime_ns
    followed = run_cli(*sweep, "--values", "1e-3", "--force", *micro)
    assert followed.returncode == 0, followed.stderr
    assert "tiny_lr1e-3: finished, skipping" in followed.stderr
    assert not (path / "tiny_lr1e4").exists() and (path / "tiny_lr1e-3" / "summary.json").stat().st_mtime_ns == finished
    assert read_sweep(path)["status"] == {"tiny_lr1e-3": "complete"}

    # an arch sweep's run has its LR from its preset
    run = RunDir(path / "tiny_lr1e-3")
    assert divergence_advice("arch", run, "hybrid_sparse") == (
        f"its LR is too high: lower train.lr in preset hybrid_sparse (now 0.001), delete {run.path} and run the same "
        "ablate command again; finished runs are kept")


def test_diverged_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    extra = ["train.max_bad_steps=1", "train.grad_clip=0"]  # an absurd LR blows up within a few steps
    plan = plan_lr_sweep("tiny", [1e4, 1e-3], STEPS, list(MICRO) + extra)
    path = tmp_path / "sweep"
    state = run_sweep(plan, path)
    assert state["status"] == {"tiny_lr1e4": "diverged", "tiny_lr1e-3": "complete"}
    assert "not finite" in state["errors"]["tiny_lr1e4"]
    heard = []
    run_sweep(plan, path, notify=lambda planned, i, action: heard.append((action.kind, action.note)))
    assert [kind for kind, _ in heard] == ["diverged", "done"]  # not retried, not retrained
    assert heard[0][1].startswith("LR 1e4 is too high")  # and told what to do instead
    rows = rank_results(collect_results([path]))
    assert [(r.result.label, r.rank) for r in rows][0] == ("tiny_lr1e-3", 1) and rows[1].rank is None
    report = build_report([r.result for r in rows], sweep=read_sweep(path))
    assert any("Diverged (loss not finite): tiny_lr1e4" in p for p in report.sections[0].paragraphs)


def test_sweep_options_are_checked():
    with pytest.raises(ConfigError, match="--values"):
        plan_lr_sweep("tiny", [1e-3], 2, list(MICRO) + ["train.lr=1e-2"])
    with pytest.raises(ConfigError, match="not a number"):
        parse_lr_values("1e-3,fast")
    assert resolve_steps("lr", None, ["train.steps=7"]) == 7  # --set train.steps counts when --steps is absent
    assert resolve_steps("lr", 5, ["train.steps=7"]) == 5  # --steps wins
    assert resolve_steps("arch", None, []) == 300 and resolve_steps("lr", None, []) == 200
    assert parse_presets("study_c") == STUDY_C and len(parse_presets("all,deltanet")) == 13
    for value in (3e-4, 5e-4, 1e-3, 1.5e-3, 2e-3, 0.25):
        assert float(fmt_lr(value)) == value
    assert fmt_lr(1.5e-3) == "1.5e-3" and fmt_lr(3e-4) == "3e-4"


# ---------------------------------------------------------------------------------------------------------
# ablate arch


def test_arch_sweep_each_preset_with_its_own_lr(tmp_path):
    presets = tmp_path / "presets"
    presets.mkdir()
    for stem, pattern, lr in (("pure_linear", "LL", 1e-3), ("half_attention", "LF", 3e-3)):
        (presets / f"{stem}.toml").write_text(textwrap.dedent(f"""
            extends = "tiny"
            [model]
            n_layers = 2
            pattern = "{pattern}"
            [train]
            lr = {lr}
        """))
    shape = [s for s in MICRO if not s.startswith(("model.pattern", "model.n_layers", "train.steps"))]
    args = [a for s in shape for a in ("--set", s)]
    patterns = f"{presets / 'pure_linear.toml'},{presets / 'half_attention.toml'}"
    out = tmp_path / "runs"
    result = run_cli("ablate", "arch", "--preset", patterns, "--steps", "3", "--out", str(out), "--name", "arch", *args)
    assert result.returncode == 0, result.stderr
    path = out / "ablations" / "arch"
    configs = {n: load_config_file(path / n / "config.toml") for n in ("pure_linear", "half_attention")}
    assert configs["pure_linear"].train.lr == 1e-3 and configs["half_attention"].train.lr == 3e-3
    assert configs["pure_linear"].model.layer_types() == ["L", "L"]
    assert configs["half_attention"].model.layer_types() == ["L", "F"]
    assert configs["pure_linear"].train.seed == configs["half_attention"].train.seed
    assert configs["pure_linear"].data == configs["half_attention"].data
    best, _ = best_by_summary(path)
    assert f"best architecture: {best} " in result.stdout
    assert "attention layers (%)" in result.stdout
    # the ranking shows each architecture's layer pattern beside its attention share
    assert re.search(r"pure_linear\s+LL\s+0\.0%", result.stdout) and re.search(r"half_attention\s+LF\s+50\.0%", result.stdout)


def test_arch_dry_run_of_study_a(tmp_path):
    result = run_cli("ablate", "arch", "--preset", "all", "--dry-run", "--out", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "runs").exists()
    for name in STUDY_A:
        assert re.search(rf"^\s*{name}\s", result.stdout, re.M), name
    t = load_config("hybrid_sparse").train
    per_run = 300 * t.batch_size * t.seq_len
    assert f"({13 * per_run:,})" in result.stdout
    with pytest.raises(ConfigError, match="did you mean 'hybrid_sparse'"):
        plan_arch_sweep(parse_presets("deltanet,hybrid_sparce"))


# ---------------------------------------------------------------------------------------------------------
# compare


def test_compare_table_and_curve_fallback(sweep):
    out, path, _ = sweep
    result = run_cli("compare", cwd=out.parent)  # default: ./runs
    assert result.returncode == 0, result.stderr
    _, summaries = best_by_summary(path)
    ranked = sorted(summaries, key=lambda n: summaries[n]["best_val_loss"])
    rows = [line.split() for line in result.stdout.splitlines() if re.match(r"^\s*\d+\s+tiny_lr", line)]
    assert [r[1] for r in rows] == ranked and [r[0] for r in rows] == ["1", "2"]
    assert rows[0][-1] == "best" and rows[1][-1].startswith("+")
    assert f"{summaries[ranked[0]]['best_val_loss']:.4f}" in rows[0]
    # no terminal: the curves come as tables of points, not plots
    assert "validation loss vs steps" in result.stdout and "training loss vs steps" in result.stdout
    assert "┤" not in result.stdout and not re.search("[\u2800-\u28ff]", result.stdout)


def test_compare_json_and_markdown(sweep, tmp_path):
    _, path, _ = sweep
    md, js = tmp_path / "table.md", tmp_path / "table.json"
    result = run_cli("compare", str(path), "--json", "--json-out", str(js), "--markdown", str(md))
    assert result.returncode == 0, result.stderr
    records = json.loads(result.stdout)
    assert json.loads(js.read_text()) == records
    _, summaries = best_by_summary(path)
    assert [r["rank"] for r in records] == [1, 2]
    for r in records:
        assert r["best_val_loss"] == summaries[r["name"]]["best_val_loss"] and r["status"] == "complete"
        assert r["attention_fraction"] == 0.5 and r["lr"] in (1e-3, 3e-3)
    assert records[0]["delta_pct"] == 0 and records[1]["delta_pct"] > 0
    lines = md.read_text().splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert table[0].startswith("| # | run | attn |") and set(table[1]) <= set("|-")
    assert [row.split("|")[2].strip() for row in table[2:]] == [r["name"] for r in records]


def test_compare_without_runs_says_how_to_make_them(tmp_path):
    (tmp_path / "runs").mkdir()
    result = run_cli("compare", cwd=tmp_path)
    assert result.returncode == 1 and "no runs found under runs" in result.stderr and "hybridctl train" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    with pytest.raises(RunError, match="does not exist.*hybridctl train"):
        collect_results([tmp_path / "nope"])


def test_unfinished_runs_and_arc_columns(sweep, tmp_path):
    _, path, _ = sweep
    copy = tmp_path / "runs"
    shutil.copytree(path, copy)
    best, summaries = best_by_summary(path)
    (copy / best / "summary.json").unlink()  # the best run now looks stopped before its end
    other = next(n for n in summaries if n != best)
    (copy / other / "bench").mkdir()
    arc = {"task": "arc_challenge", "split": "test", "n": 1172, "acc": 0.2312, "acc_stderr": 0.012,
           "acc_norm": 0.2654, "acc_norm_stderr": 0.013}
    (copy / other / "bench" / "arc.json").write_text(json.dumps(arc))
    rows = rank_results(collect_results([copy]))
    assert [(r.result.label, r.rank) for r in rows] == [(other, 1), (best, None)]  # an unfinished run is not ranked
    assert rows[1].result.status == "partial" and rows[1].value == summaries[best]["best_val_loss"]
    headers, cells = results_rows(rows, "best_val_loss")
    assert headers[-4:] == ["ARC acc", "ARC acc_norm", "ARC n", "status"]  # n: how many questions were scored
    assert cells[0][-4:] == ["23.12%", "26.54%", "1172", "complete"] and cells[1][-4:-1] == ["-", "-", "-"]
    assert cells[1][0] == "-" and cells[1][-1].startswith("partial")
    assert rank_results(collect_results([copy]), "arc_acc")[0].value == arc["acc"]
    with pytest.raises(ConfigError, match="did you mean 'final_val_loss'"):
        rank_results(rows and [r.result for r in rows], "final_val_los")


# ---------------------------------------------------------------------------------------------------------
# report


def test_report_names_no_winner_while_configurations_are_unfinished(sweep, tmp_path):
    """A sweep stopped part-way: the best finished run leads, but a run still to finish, or not started, may beat
    it, so the report says so instead of naming a winner."""
    _, path, _ = sweep
    copy = tmp_path / "lr_tiny"
    shutil.copytree(path, copy)
    best, _ = best_by_summary(copy)
    other = next(n for n in run_names() if n != best)
    (copy / other / "summary.json").unlink()  # stopped after its last checkpoint, before its summary
    assert run_cli("report", str(copy), "--force").returncode == 0
    text = (copy / "report.md").read_text()
    assert f"Leading so far: {best} " in text and f"No winner yet: {other} has no finished run." in text
    assert "Winner:" not in text
    stale = copy / "report_plots" / "val_loss_vs_tokens.txt"  # drawn by an earlier report, not by the next
    stale.write_text("old curves")
    shutil.rmtree(copy / other)
    assert run_cli("report", str(copy), "--force").returncode == 0
    text = (copy / "report.md").read_text()
    assert "A single run" in text and "1 planned run of sweep lr_tiny not started yet" in text
    assert not stale.exists() and (copy / "report_plots" / "val_loss_vs_steps.txt").is_file()


def test_report_markdown_and_plots(sweep, tmp_path):
    _, path, _ = sweep
    md = tmp_path / "out" / "findings.md"
    result = run_cli("report", str(path), "--out", str(md))
    assert result.returncode == 0, result.stderr
    text = md.read_text()
    best, summaries = best_by_summary(path)
    second = next(n for n in summaries if n != best)
    a, b = summaries[best]["best_val_loss"], summaries[second]["best_val_loss"]
    # one margin, the runner-up minus the winner, in the metric's units and in percent of the winner
    assert f"Winner: {best} " in text and f"Margin over the runner-up {second} ({b:.4f}): {b - a:.4f} ({100 * (b - a) / a:.2f}% of" in text
    assert "one seed per configuration the seed-to-seed noise is not measured" in text
    for heading in ("## Ranking", "## Learning-rate sensitivity", "## Training curves"):
        assert heading in text
    assert "## Throughput vs quality" not in text  # one architecture: speeds differ only by measurement noise
    best_lr = best.split("_lr")[1]  # two rates: the best is at an edge of the grid either way
    edge = "largest tried; try above" if best_lr == LRS[-1] else "smallest tried; try below"
    assert text.count(f"best LR {best_lr} is the {edge} {best_lr}") == 1
    assert f"Best LR: {best.split('_lr')[1]} " in text
    links = re.findall(r"\]\((findings_plots/[^)]+)\)", text)
    assert {"findings_plots/loss_vs_lr.txt", "findings_plots/val_loss_vs_steps.html"} <= set(links)
    for link in links:
        assert (md.parent / link).stat().st_size > 0
    plot = (md.parent / "findings_plots" / "loss_vs_lr.txt").read_text()
    assert "┤" in plot and "\x1b[" not in plot and "1e-3" in plot and "3e-3" in plot
    assert "Winner:" in result.stdout  # also printed

    again = run_cli("report", str(path), "--out", str(md))
    assert again.returncode == 1 and "--force" in again.stderr


# ---------------------------------------------------------------------------------------------------------
# plots


def test_chart_renders_to_the_requested_size():
    chart = Chart("curve", "val loss vs steps", "step", "loss",
                  [Series("a", [1, 2, 3, 4], [4.0, 3.5, 3.2, 3.1]), Series("b", [1, 2, 3, 4], [4.1, 3.9, 3.8, 3.7])])
    plain = render_chart(chart, width=60, height=15, color=False)
    lines = plain.splitlines()
    assert len(lines) == 15 and max(len(line) for line in lines) <= 60
    assert "val loss vs steps" in lines[0] and "4.10" in plain and "3.10" in plain
    assert "a" in plain and "b" in plain  # legend
    assert "\x1b[" in render_chart(chart, width=60, height=15)  # colours on a terminal
    assert chart_size(None)[0] == 80 and chart_size(200)[0] == 120 and chart_size(70)[0] == 70


def test_a_long_chart_in_a_pipe_keeps_aligned_points_and_each_last_one():
    steps = [1] + list(range(10, 301, 10))
    runs = [Series(f"run{i}", steps, [10.0 - s / 100 - i / 1000 for s in steps]) for i in range(22)]
    runs.append(Series("resumed", steps[:21] + [201] + steps[21:], [5.0] * 21 + [4.9] + [4.0] * 10))  # its own 201
    runs.append(Series("stopped", steps[:18], [9.0] * 17 + [4.321]))  # ended at step 170, between the kept steps
    pipe = Console(file=io.StringIO(), force_terminal=False, width=100)
    print_chart(Chart("curve", "validation loss vs steps", "step", "loss", runs, curves=True), pipe)
    lines = pipe.file.getvalue().splitlines()
    rows = [line.split() for line in lines if line.startswith(("run", "resumed", "stopped")) and not line.startswith("run ")]
    assert len(rows) == 23 * 3 + 2  # 80 rows / 24 runs -> 3 steps each; the stopped run has 100 and its own 170
    for run in ("run0", "run21", "resumed"):  # the same steps for every run, whole logging intervals apart
        assert [r[1] for r in rows if r[0] == run] == ["100", "200", "300"]
    assert [r[1:] for r in rows if r[0] == "stopped"] == [["100", "9.0000"], ["170", "4.3210"]]
    assert "points left out" in lines[-1]
    short = Console(file=io.StringIO(), force_terminal=False, width=100)
    print_chart(Chart("curve", "loss", "step", "loss", runs[:2], curves=True), short)
    assert "left out" not in short.file.getvalue() and short.file.getvalue().count("run1 ") == len(steps)


def test_curve_tables_keep_steps_on_the_logging_interval_whatever_the_last_step():
    def kept(*series, at_most=3):
        chart = Chart("c", "c", "step", "loss", [Series(f"r{i}", xs, [1.0] * len(xs)) for i, xs in enumerate(series)],
                      curves=True)
        return [[x for x, _ in points] for points in chart.sampled(at_most)]

    logs = [1] + list(range(10, 1001, 10)) + [1005]  # train.steps=1005, log_every=10: the last step off the interval
    assert kept(logs) == [[500, 1000, 1005]]  # every 500 steps: 340 rounded up nicely
    evals = list(range(50, 301, 50)) + [325]  # evals every 50 and at the end
    assert kept(evals, evals[:-1] + [305]) == [[100, 200, 300, 325], [100, 200, 300, 305]]
    tokens = [0.49152 * step for step in range(10, 301, 10)]  # tokens (M): float x on a float interval
    assert len(kept(tokens)[0]) == 3 and kept(tokens)[0][-1] == tokens[-1]
    assert kept([5.0] * 9) == [[5.0] * 9]  # no interval to thin by: every point


def test_a_scatter_in_a_pipe_keeps_every_point():
    xs = [400 + (i * 37) % 100 for i in range(120)]  # one point per configuration, x not ordered
    chart = Chart("t", "loss vs throughput", "throughput (K tok/s)", "loss", [Series("loss", xs, [3.0] * 120)],
                  points=True, lines=False)
    pipe = Console(file=io.StringIO(), force_terminal=False, width=80)
    print_chart(chart, pipe)
    assert "left out" not in pipe.file.getvalue() and pipe.file.getvalue().count("3.0000") == 120


def test_print_chart_plots_on_a_terminal_and_tabulates_elsewhere():
    chart = Chart("lr", "loss vs lr", "learning rate", "loss", [Series("loss", [1e-3, 3e-3], [5.6, 5.4])], xlog=True,
                  points=True, xticks=[(1e-3, "1e-3"), (3e-3, "3e-3")])
    tty = Console(file=io.StringIO(), force_terminal=True, width=72)
    print_chart(chart, tty)
    drawn = tty.file.getvalue()
    assert "┤" in drawn and max(len(line) for line in re.sub(r"\x1b\[[0-9;]*m", "", drawn).splitlines()) <= 72
    pipe = Console(file=io.StringIO(), force_terminal=False, width=80)
    print_chart(chart, pipe)
    table = pipe.file.getvalue()
    assert "┤" not in table and re.search(r"1e-3\s+5\.6000", table) and re.search(r"3e-3\s+5\.4000", table)
