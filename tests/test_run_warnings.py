"""Warnings about a run's plan (core/training/run_warnings.py), and checkpoint folders with the run's permissions."""

import os
import stat

import pytest
import torch

from conftest import micro_config
from hybridctl.core.training import checkpoint as ckpt
from hybridctl.core.training.run_warnings import peak_lr, run_warnings, train_windows
from hybridctl.core.training.trainer import Schedule


def plan(steps, warmup, batch=4, seq=32, lr=1e-3, max_tokens=60000):
    return micro_config([f"train.steps={steps}", f"train.warmup_steps={warmup}", f"train.batch_size={batch}",
                         f"train.seq_len={seq}", f"train.lr={lr}", f"data.max_tokens={max_tokens}"])


def schedule_peak(cfg) -> float:
    t = cfg.train
    schedule = Schedule(t.lr, t.warmup_steps, t.steps, t.min_lr_ratio)
    return max(schedule(s) for s in range(t.steps))


def test_a_sound_plan_has_no_warnings():
    assert run_warnings(plan(steps=100, warmup=10), n_train_windows=1000) == []
    assert run_warnings(plan(steps=100, warmup=0), n_train_windows=400) == []  # exactly one epoch


@pytest.mark.parametrize("steps,warmup", [(10, 20), (7, 8), (50, 400)])
def test_warmup_longer_than_the_run_never_reaches_the_peak_lr(steps, warmup):
    cfg = plan(steps, warmup)
    assert peak_lr(cfg) == pytest.approx(schedule_peak(cfg)) and peak_lr(cfg) < cfg.train.lr
    (note,) = run_warnings(cfg, n_train_windows=10**6)
    assert f"train.warmup_steps ({warmup}) is more than train.steps ({steps})" in note
    assert "never reaches its peak train.lr = 0.001" in note and f"stops at {schedule_peak(cfg):.3g}" in note
    assert f"--set train.warmup_steps={max(1, steps // 10)}" in note


@pytest.mark.parametrize("steps,warmup", [(10, 5), (10, 9), (10, 10)])
def test_warmup_of_half_the_run_or_more(steps, warmup):
    cfg = plan(steps, warmup)
    assert peak_lr(cfg) == pytest.approx(schedule_peak(cfg)) == pytest.approx(cfg.train.lr)  # reached, but late
    (note,) = run_warnings(cfg, n_train_windows=10**6)
    assert f"train.warmup_steps ({warmup}) is at least half of train.steps ({steps})" in note


@pytest.mark.parametrize("warmup,steps,trained", [(3, 30, 30), (3, 30, 2), (0, 10, 10), (20, 10, 10), (5, 10, 0)])
def test_lr_reached_is_the_highest_lr_of_the_steps_trained(warmup, steps, trained):
    schedule = Schedule(3e-3, warmup, steps, 0.1)
    assert schedule.reached(trained) == pytest.approx(max((schedule(s) for s in range(trained)), default=0.0))
    assert schedule.reached(trained) <= 3e-3 and Schedule(3e-3, 3, 30, 0.1).reached(30) == 3e-3  # exactly train.lr
    schedule.extend(7, 40)  # an extension that starts before warmup ends decays from where it began
    assert schedule.reached(40) == pytest.approx(max(schedule(s) for s in range(40)))


def test_warmup_under_half_the_run_is_fine():
    assert run_warnings(plan(steps=10, warmup=4), n_train_windows=10**6) == []


@pytest.mark.parametrize("steps", [1, 2])
def test_a_warmup_of_one_step_is_no_warmup(steps):
    """Step 0 already has the full LR: nothing peaks late, and `warmup_steps=1` is not offered as a fix for itself."""
    cfg = plan(steps, 1)
    assert Schedule(cfg.train.lr, 1, steps, cfg.train.min_lr_ratio)(0) == cfg.train.lr
    assert run_warnings(cfg, n_train_windows=10**6) == []


def test_every_warmup_warning_suggests_a_shorter_warmup():
    for steps in range(1, 41):
        for warmup in range(0, 3 * steps + 2):
            for note in run_warnings(plan(steps, warmup), n_train_windows=10**6):
                suggested = int(note.rsplit("train.warmup_steps=", 1)[1])
                assert 1 <= suggested < warmup, note


def test_data_read_more_than_once_is_counted():
    cfg = plan(steps=100, warmup=10, batch=4, seq=32)
    windows = train_windows(8001, 32)  # (tokens - 1) // seq_len, as the batch sampler cuts them
    assert windows == 250
    (note,) = run_warnings(cfg, n_train_windows=windows)
    assert "training repeats its data: 100 steps x 4 rows read 1.6 epochs of the 250 training windows" in note
    assert "raise data.max_tokens" in note


def test_data_repeats_as_the_sampler_counts_epochs():
    """The epoch count in the warning is the sampler's own (its epoch_of at the last step)."""
    from hybridctl.core.data.batches import BatchSampler
    import numpy as np

    cfg = plan(steps=30, warmup=2, batch=4, seq=32)
    tokens = np.zeros(32 * 50 + 1, dtype=np.uint16)
    sampler = BatchSampler(tokens, 4, 32, 0)
    (note,) = run_warnings(cfg, n_train_windows=train_windows(len(tokens), 32))
    assert f"read {sampler.epoch_of(30):.1f} epochs of the {sampler.n_windows} training windows" in note


def test_data_read_a_little_over_once_shows_by_how_much():
    (note,) = run_warnings(plan(steps=1000, warmup=50, batch=32, seq=512), n_train_windows=31249)
    assert "1000 steps x 32 rows read 1.02 epochs of the 31249 training windows" in note


def test_several_warnings_at_once():
    notes = run_warnings(plan(steps=10, warmup=30, max_tokens=0), n_train_windows=5)
    assert len(notes) == 2 and "never reaches" in notes[0] and "use more data" in notes[1]


def test_checkpoint_folders_follow_the_umask(tmp_path):
    model = torch.nn.Linear(2, 2)
    previous = os.umask(0o022)
    try:
        path = ckpt.save_checkpoint(tmp_path / "run" / "checkpoints" / "step_000001", model, None, {"step": 1})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755  # as the folders around it, not mkdtemp's 0700
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755
    assert {p.name for p in path.parent.iterdir()} == {"step_000001"}  # no temporary folder left


def test_the_trainer_reports_warnings_and_every_step(tmp_path):
    from hybridctl.core.training.runs import RunDir
    from hybridctl.core.training.trainer import train

    from hybridctl.core.data.token_cache import load_token_data

    # 6 steps of 4 windows of 32 tokens read the ~15 windows of 480 training tokens more than once
    cfg = micro_config(["train.warmup_steps=8", "data.max_tokens=600", "data.val_fraction=0.2"])
    run = RunDir(tmp_path / "run")
    run.create(cfg)
    events = []
    try:
        summary = train(cfg, run, callback=lambda kind, record: events.append((kind, record)), notes=["a note"])
    finally:
        run.release_lock()
    start = next(record for kind, record in events if kind == "start")
    assert [r["step"] for kind, r in events if kind == "step"] == [1, 2, 3, 4, 5, 6]
    assert [r["tokens"] for kind, r in events if kind == "step"] == [128 * s for s in range(1, 7)]
    assert start["warnings"] == summary["warnings"] == run.read_summary()["warnings"]
    windows = train_windows(len(load_token_data(cfg.data).train), 32)
    assert summary["warnings"] == ["a note", *run_warnings(cfg, windows)]
    assert "never reaches" in summary["warnings"][1] and "repeats its data" in summary["warnings"][2]
