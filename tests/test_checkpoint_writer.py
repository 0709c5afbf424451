"""Checkpoints written in the background: what is written is the snapshot of the moment of the save, saves wait
for the write in flight, a failed write ends the run in one line, and train() returns with every write done."""

from __future__ import annotations

import errno
import json
import os
import re
import threading
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from conftest import StopAfter, micro_config, cli_args_for_micro
from hybridctl.cli import main
from hybridctl.core.model.hybrid_lm import build_model
from hybridctl.core.training import checkpoint as ckpt
from hybridctl.core.training import checkpoint_files
from hybridctl.core.training.checkpoint_writer import CheckpointWriter
from hybridctl.core.training.runs import RunDir
from hybridctl.core.training.steps import build_optimizer
from hybridctl.core.training.trainer import train

TIMEOUT = 60  # seconds; only reached when something that should happen does not


def trained_pair():
    """A micro model and its AdamW after one step (so the optimizer has moments)."""
    cfg = micro_config()
    cfg.model.vocab_size = 64
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    x = torch.randint(0, 64, (2, 16))
    model(x, x).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def host_copies(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    return ({k: v.clone() for k, v in ckpt.model_tensors(model).items()},
            {k: v.clone() for k, v in ckpt.optimizer_tensors(optimizer, names).items()})


class Gate:
    """Holds chosen checkpoint writes (their folders' names containing `name`) at the start until opened, and
    records which thread each write ran in."""

    def __init__(self, monkeypatch, name: str = ""):
        self.name, self.opened, self.entered, self.threads = name, threading.Event(), threading.Event(), []
        real = ckpt.write_snapshot

        def write_snapshot(path, snapshot, state):
            self.threads.append(threading.current_thread().name)
            if self.name in Path(path).name:
                self.entered.set()
                assert self.opened.wait(TIMEOUT), "the gate was never opened"
            return real(path, snapshot, state)

        monkeypatch.setattr(ckpt, "write_snapshot", write_snapshot)


def test_what_is_written_is_the_snapshot_of_the_save(monkeypatch, tmp_path):
    model, optimizer = trained_pair()
    weights, moments = host_copies(model, optimizer)
    gate = Gate(monkeypatch)
    writer = CheckpointWriter()
    rng = ckpt.rng_state()
    writer.save(tmp_path / "a", model, optimizer, {"step": 1}, version=1)
    assert gate.entered.wait(TIMEOUT)
    with torch.no_grad():  # training goes on while the write waits
        for p in model.parameters():
            p.add_(1.0)
        for state in optimizer.state.values():
            state["exp_avg"].mul_(-3.0)
    torch.rand(5)  # and draws random numbers
    gate.opened.set()
    writer.close()
    assert gate.threads == ["checkpoint-writer"]
    state = checkpoint_files.verify_checkpoint(tmp_path / "a")
    assert state["rng"] == rng
    written = load_file(str(tmp_path / "a" / checkpoint_files.MODEL_FILE))
    written_moments = load_file(str(tmp_path / "a" / checkpoint_files.OPTIMIZER_FILE))
    assert written.keys() == weights.keys() and all(torch.equal(written[k], weights[k]) for k in weights)
    assert written_moments.keys() == moments.keys() and all(torch.equal(written_moments[k], moments[k]) for k in moments)
    assert not any(torch.equal(written[n], p) for n, p in model.named_parameters() if n in written)  # not today's


def test_a_save_of_another_step_waits_for_the_write_in_flight(monkeypatch, tmp_path):
    model, optimizer = trained_pair()
    gate = Gate(monkeypatch, name="first")
    writer = CheckpointWriter()
    writer.save(tmp_path / "first", model, optimizer, {"step": 1}, version=1)
    assert gate.entered.wait(TIMEOUT)
    writer.save(tmp_path / "same", model, optimizer, {"step": 1}, version=1)  # same step: queued, no wait
    second = threading.Thread(target=writer.save, args=(tmp_path / "second", model, optimizer, {"step": 2}), kwargs={"version": 2})
    second.start()
    second.join(0.5)
    assert second.is_alive()  # waiting for the writes of step 1
    assert not any(p.name in ("first", "same", "second") for p in tmp_path.iterdir())
    gate.opened.set()
    second.join(TIMEOUT)
    assert not second.is_alive()
    writer.close()
    for name in ("first", "same", "second"):
        checkpoint_files.verify_checkpoint(tmp_path / name)
    order = [tmp_path / name / checkpoint_files.STATE_FILE for name in ("first", "same", "second")]
    assert [p.stat().st_mtime_ns for p in order] == sorted(p.stat().st_mtime_ns for p in order)  # written in order


def test_a_second_folder_of_the_same_step_copies_the_first(monkeypatch, tmp_path):
    model, optimizer = trained_pair()
    serialised = []
    real_save = ckpt.save_file
    monkeypatch.setattr(ckpt, "save_file", lambda tensors, filename, metadata=None: (serialised.append(Path(filename).name),
                                                                                     real_save(tensors, filename, metadata=metadata)))
    writer = CheckpointWriter()
    writer.save(tmp_path / "best", model, optimizer, {"step": 3}, version=3)
    writer.save(tmp_path / "step_000003", model, optimizer, {"step": 3}, version=3)
    writer.close()
    assert serialised == [checkpoint_files.MODEL_FILE, checkpoint_files.OPTIMIZER_FILE]  # once, for best/
    for name in (checkpoint_files.MODEL_FILE, checkpoint_files.OPTIMIZER_FILE):
        assert (tmp_path / "best" / name).read_bytes() == (tmp_path / "step_000003" / name).read_bytes()
        assert not os.path.samefile(tmp_path / "best" / name, tmp_path / "step_000003" / name)  # a copy, not a link
    assert checkpoint_files.verify_checkpoint(tmp_path / "step_000003")["step"] == 3


def test_a_failed_background_write_ends_the_run_in_one_line(monkeypatch, tmp_path, capsys):
    """Step 3's checkpoint fails in the writer's thread; the run stops at the next save, before writing another."""
    real_save, real_copy = ckpt.save_file, ckpt.copyfile

    def save_file(tensors, filename, metadata=None):
        if "step_000003" in filename:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, filename, metadata=metadata)

    def copyfile(source, target):
        if "step_000003" in str(target):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        return real_copy(source, target)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    monkeypatch.setattr(ckpt, "copyfile", copyfile)
    argv = ["train", "--preset", "tiny", "--out", str(tmp_path), "--name", "r", *cli_args_for_micro()]
    assert main(argv) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert "Traceback" not in err and errors == err.strip().splitlines()[-1:]
    folder = tmp_path / "r" / "checkpoints" / "step_000003"
    assert re.fullmatch(rf"error: cannot write checkpoint {re.escape(str(folder))}: No space left on device( \(os error 28\))?; "
                        "earlier checkpoints are intact; free some space, then start the run again with --force", errors[0]), errors[0]
    run = RunDir(tmp_path / "r")
    assert run.step_checkpoints() == [] and checkpoint_files.verify_checkpoint(run.best_dir)["step"] == 3
    leftovers = [p.name for p in [*run.path.iterdir(), *run.checkpoints_dir.iterdir()] if p.name.startswith(".")]
    assert leftovers == [] and not run.summary_path.exists() and not run.lock_path.exists()


@pytest.fixture
def run_with_slow_writes(monkeypatch, tmp_path):
    """A micro run whose step-3 checkpoints (best/, then step_000003 behind it) are held until the loop reaches
    step 5: train() must not wait for them."""
    gate = Gate(monkeypatch)

    def open_at_step_5(kind, record):
        if kind == "step" and record["step"] == 5:
            gate.opened.set()

    cfg = micro_config()
    run = RunDir(tmp_path / "slow")
    run.create(cfg)
    summary = train(cfg, run, callback=open_at_step_5)
    monkeypatch.undo()
    return cfg, run, summary, gate


def test_train_goes_on_while_writing_and_returns_with_every_write_done(run_with_slow_writes):
    cfg, run, summary, gate = run_with_slow_writes
    assert gate.opened.is_set() and set(gate.threads) == {"checkpoint-writer"}
    assert [p.name for p in run.step_checkpoints()] == ["step_000003", "step_000006"]
    for folder in [*run.step_checkpoints(), run.best_dir]:
        checkpoint_files.verify_checkpoint(folder)
    assert not [p for p in run.path.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert json.loads(run.summary_path.read_text())["steps"] == cfg.train.steps == summary["steps"]


def test_resume_from_a_checkpoint_written_while_training_is_exact(run_with_slow_writes, tmp_path):
    cfg, run, _, _ = run_with_slow_writes
    losses = lambda r: {m["step"]: m["loss"] for m in r.read_metrics() if "loss" in m}  # noqa: E731
    before = losses(run)
    final = {name: load_file(str(run.step_checkpoints()[-1] / name)) for name in (checkpoint_files.MODEL_FILE, checkpoint_files.OPTIMIZER_FILE)}
    train(cfg, run, resume_from=run.checkpoints_dir / "step_000003", rollback=True)  # steps 4-6 again
    assert losses(run) == before
    for name, tensors in final.items():
        again = load_file(str(run.step_checkpoints()[-1] / name))
        assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)


def test_a_stop_waits_for_the_write_in_flight(monkeypatch, tmp_path):
    """An exception out of the loop (here the callback's, at step 3's checkpoint) leaves it complete on disk."""
    gate = Gate(monkeypatch, name="step_000003")
    cfg = micro_config()
    run = RunDir(tmp_path / "stopped")
    run.create(cfg)
    stop = StopAfter(3)

    def callback(kind, record):
        if kind == "checkpoint":
            threading.Timer(0.3, gate.opened.set).start()  # the write ends after the exception has left the loop
        stop(kind, record)

    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, callback=callback)
    assert gate.opened.is_set()
    assert checkpoint_files.verify_checkpoint(run.checkpoints_dir / "step_000003")["step"] == 3
    assert not [p for p in run.path.rglob("*") if ".tmp-" in p.name]


@pytest.mark.gpu
def test_snapshot_of_cuda_tensors_goes_through_reused_pinned_buffers(tmp_path):
    model, _ = trained_pair()
    model.cuda()
    optimizer = build_optimizer(model, micro_config(), torch.device("cuda"))
    for param in model.parameters():  # gradients made up: the test is about copies, not the model's kernels
        param.grad = torch.randn_like(param)
    optimizer.step()
    with torch.no_grad():
        busy = torch.randn(4096, 4096, device="cuda")
        for _ in range(50):  # a few hundred ms of GPU work that the weights' last change waits for
            busy = torch.tanh(busy @ busy)
        for param in model.parameters():
            param.add_(busy[0, 0] * 0 + 1.0)
    first = ckpt.take_snapshot(model, optimizer)  # its copies queue behind that work
    seen = {k: v.clone() for k, v in [*first.model.items(), *first.optimizer.items()]}  # read at once, no sync of ours
    weights, moments = host_copies(model, optimizer)
    assert all(t.is_pinned() for t in [*first.model.values(), *first.optimizer.values()])
    assert all(torch.equal(seen[k], weights[k]) for k in weights)
    assert all(torch.equal(seen[k], moments[k]) for k in moments)
    second = ckpt.take_snapshot(model, optimizer, reuse=first)
    assert all(second.model[k].data_ptr() == first.model[k].data_ptr() for k in first.model)  # no new allocation
    writer = CheckpointWriter()
    writer.save(tmp_path / "c", model, optimizer, {"step": 2}, version=2)
    writer.close()
    written = load_file(str(tmp_path / "c" / checkpoint_files.MODEL_FILE))
    assert written.keys() == weights.keys() and all(torch.equal(written[k], weights[k]) for k in weights)
