import json
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import StopAfter, micro_config
from hybridctl.cli import main
from hybridctl.core.training import checkpoint_files
from hybridctl.core.config import load_config_file
from hybridctl.core.lab.results import load_result
from hybridctl.core.training.runs import RunDir
from hybridctl.core.training.schedule import Schedule
from hybridctl.core.training.trainer import train


def losses(run: RunDir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in run.read_metrics() if "loss" in r}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    cfg = micro_config()
    run = RunDir(tmp_path_factory.mktemp("runs") / "full")
    run.create(cfg)
    summary = train(cfg, run)
    return cfg, run, summary


def test_run_folder_contents(full_run):
    cfg, run, summary = full_run
    assert load_config_file(run.config_path) == cfg
    rows = run.read_metrics()
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]
    for key in ("final_val_loss", "best_val_loss", "final_val_acc", "final_val_ppl", "tok_s", "wall_time_s", "params"):
        assert summary[key] is not None, key
    assert json.loads(run.summary_path.read_text()) == summary
    assert [p.name for p in run.step_checkpoints()] == ["step_000003", "step_000006"]
    state = checkpoint_files.verify_checkpoint(run.step_checkpoints()[-1])
    assert state["step"] == 6 and state["config_hash"] == cfg.hash()
    assert checkpoint_files.is_complete(run.best_dir)
    weights = load_file(str(run.step_checkpoints()[-1] / checkpoint_files.MODEL_FILE))
    assert "lm_head.weight" not in weights and "embed.weight" in weights  # tied weight stored once


def test_resume_is_bit_exact(full_run, tmp_path):
    cfg, full, _ = full_run
    cfg = micro_config()
    run = RunDir(tmp_path / "half")
    run.create(cfg)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, callback=StopAfter(3))
    assert max(losses(run)) == 3
    cfg2 = load_config_file(run.config_path)
    train(cfg2, run, resume_from=run.resolve_checkpoint("latest"))
    assert losses(run) == losses(full)  # exact equality, every step
    a = load_file(str(full.step_checkpoints()[-1] / checkpoint_files.MODEL_FILE))
    b = load_file(str(run.step_checkpoints()[-1] / checkpoint_files.MODEL_FILE))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_wall_time_adds_up_over_a_stopped_and_resumed_run(tmp_path):
    """A process stopped before its summary (a time limit, a crash) leaves its loop time in the checkpoint; the
    process that resumes adds its own to it."""
    cfg = micro_config()
    run = RunDir(tmp_path / "r")
    run.create(cfg)
    stop = StopAfter(3)

    def slow_then_stop(kind, record):
        if kind == "log" and record["step"] == 2:
            time.sleep(1.5)  # the first process takes longer than the whole second one will
        stop(kind, record)

    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, callback=slow_then_stop)
    first = json.loads((run.resolve_checkpoint("latest") / checkpoint_files.STATE_FILE).read_text())["wall_time_s"]
    assert first >= 1.5
    started = time.perf_counter()
    summary = train(load_config_file(run.config_path), run, resume_from=run.resolve_checkpoint("latest"))
    second = time.perf_counter() - started
    assert first < summary["wall_time_s"] <= first + second


def test_resume_drops_metrics_after_checkpoint(full_run, tmp_path):
    cfg = micro_config()
    run = RunDir(tmp_path / "again")
    run.create(cfg)
    train(cfg, run)
    train(cfg, run, resume_from=run.resolve_checkpoint("step_000003"))
    steps = [r["step"] for r in run.read_metrics() if "loss" in r]
    assert steps == list(range(1, 7))


def test_resume_from_earlier_checkpoint_starts_the_history_again(full_run, tmp_path):
    """Resuming from step 3 of a finished run abandons steps 4-6: their checkpoint and best/ go with their
    metrics, so a crash at step 4 leaves a run whose next plain resume continues from step 3, not from the old 6."""
    import shutil

    _, full, _ = full_run
    run = RunDir(tmp_path / "again")
    shutil.copytree(full.path, run.path)
    assert [p.name for p in run.checkpoints_after(3)] == ["step_000006", "best"]  # best/ is the step-6 eval's

    def crash_at_step_4(kind, record):
        if kind == "log" and record["step"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(load_config_file(run.config_path), run, resume_from=run.resolve_checkpoint("step_000003"),
              callback=crash_at_step_4, rollback=True)
    assert [p.name for p in run.step_checkpoints()] == ["step_000003"] and not run.best_dir.exists()
    assert run.resolve_checkpoint("latest").name == "step_000003"
    assert max(r["step"] for r in run.read_metrics()) <= 4
    assert load_result(run).status == "partial"  # the old summary's step-6 figures no longer rank it


def test_plain_resume_keeps_a_best_checkpoint_newer_than_latest(full_run, tmp_path, monkeypatch):
    """Evals and saves need not fall on the same steps: after a crash, best/ can be newer than the newest step
    checkpoint. It is a model of the same course, so resuming from latest keeps it."""
    import shutil

    from hybridctl.cli import main
    from hybridctl.commands import resume as resume_command

    _, full, _ = full_run
    run = RunDir(tmp_path / "crashed")
    shutil.copytree(full.path, run.path)
    shutil.rmtree(run.step_checkpoints()[-1])  # step 6 never saved; best/ (step 6) was
    run.truncate_metrics(3)
    assert checkpoint_files.read_state(run.best_dir)["step"] == 6 and run.resolve_checkpoint("latest").name == "step_000003"
    seen = {}

    class StopAtStart:  # stands in for the progress display: looks at best/ once the checkpoint has loaded
        def __init__(self, name):
            pass

        def __call__(self, kind, record):
            if kind == "start":
                seen["best"] = checkpoint_files.is_complete(run.best_dir)
                raise KeyboardInterrupt

        def close(self):
            pass

    monkeypatch.setattr(resume_command, "TrainProgress", StopAtStart)
    assert main(["resume", str(run.path)]) != 0
    assert seen == {"best": True} and checkpoint_files.read_state(run.best_dir)["step"] == 6


@pytest.mark.parametrize("which", ["step_000003", "step_3", "3", "003"])
def test_a_step_checkpoint_is_named_in_any_of_its_forms(finished_micro_run, which):
    assert RunDir(finished_micro_run).resolve_checkpoint(which).name == "step_000003"


def test_a_step_checkpoint_by_its_short_name_on_the_command_line(finished_micro_run, tmp_path, capsys):
    shutil.copytree(finished_micro_run, tmp_path / "run")
    run = tmp_path / "run"
    code = main(["eval", str(run), "--checkpoint", "step_3", "--data", "builtin:stdlib", "--max-tokens", "300", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(out)["checkpoint"] == "step_000003"
    assert main(["resume", str(run), "--from", "step_7"]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: run {run} has no checkpoint 'step_7'; available: step_000003, step_000006, best, latest "
        "(a step may be given as step_000200, step_200 or 200)")


def test_schedule_warmup_cosine_and_extension():
    s = Schedule(lr=1.0, warmup_steps=10, steps=100, min_lr_ratio=0.1)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0) and s(99) == pytest.approx(0.1)  # the last step trains at the floor
    assert all(s(i) > s(i + 1) for i in range(10, 99))
    before = s(60)
    s.extend(60, 64)  # four more steps than 60: 60..63, the last of them at the floor
    assert s(60) == pytest.approx(before)  # no jump at the extension point
    assert s(61) < before and s(63) == pytest.approx(0.1)


def test_schedule_round_trips():
    s = Schedule(lr=1e-3, warmup_steps=3, steps=10, min_lr_ratio=0.0)
    s.extend(10, 20)
    assert Schedule.from_dict(json.loads(json.dumps(s.to_dict()))) == s
