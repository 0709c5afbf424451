"""A crash never costs a run: kill -9 mid-checkpoint, Ctrl-C and SIGTERM, non-finite losses, a full disk,
a second process on the same run, and no pickle anywhere."""

from __future__ import annotations

import collections
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from conftest import REPO, StopAfter, cli_args_for_micro, micro_config
from hybridctl.cli import main
from hybridctl.core.training import checkpoint as ckpt
from hybridctl.core.training import checkpoint_files, preflight, trainer
from hybridctl.core.presets import config_diff
from hybridctl.core.config import load_config_file
from hybridctl.core.data.batches import BatchSampler
from hybridctl.core.data.token_cache import load_token_data
from hybridctl.core.errors import CheckpointError, RunError
from hybridctl.core.model.hybrid_lm import build_model
from hybridctl.core.training.runs import RunDir


def losses(run: RunDir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in run.read_metrics() if "loss" in r}


def wait_for(condition, timeout=120.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.002)
    raise AssertionError(f"timed out waiting for {what}")


def logged_step(run: RunDir) -> int:
    return max(losses(run), default=0)


def set_steps(run: RunDir, steps: int) -> None:
    cfg = load_config_file(run.config_path)
    cfg.train.steps = steps
    run.write_config(cfg)


def hybridctl_child(*args: str, stderr=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hybridctl", *args], stdout=subprocess.DEVNULL, stderr=stderr, text=True)


# ---------------------------------------------------------------------------------------------------------
# 1. kill -9 while a checkpoint is being written


@pytest.fixture
def wide_run(tmp_path):
    """A run with ~1.6M parameters (checkpoints of ~19 MB) that saves every step and is stopped after step 2."""
    cfg = micro_config(["model.d_model=256", "model.n_heads=4", "train.steps=40", "train.save_every=1",
                        "train.eval_every=1000", "train.keep_checkpoints=2"])
    run = RunDir(tmp_path / "wide")
    run.create(cfg)
    try:
        with pytest.raises(KeyboardInterrupt):
            trainer.train(cfg, run, callback=StopAfter(2))
    finally:
        run.release_lock()
    return run


def partial_writes(run: RunDir) -> list[Path]:
    return [p for p in run.checkpoints_dir.iterdir() if ".tmp-" in p.name]


def kill_mid_checkpoint(run: RunDir) -> int:
    """Resume the run in a child; SIGKILL it while it writes the weights of its first checkpoint."""
    child = hybridctl_child("resume", str(run.path), stderr=subprocess.DEVNULL)

    def writing() -> int | None:
        for p in partial_writes(run):
            step = int(p.name.split(".")[1].removeprefix("step_"))
            if step > 2 and not (p / checkpoint_files.OPTIMIZER_FILE).exists():  # the larger half is still to come
                return step
        return None

    try:
        step = wait_for(writing, what="a checkpoint write")
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    return step


def test_kill9_during_checkpoint_write_loses_nothing(wide_run):
    run = wide_run
    for _ in range(3):  # the write could finish between seeing it and the kill landing; then kill the next one
        killed_at = kill_mid_checkpoint(run)
        if partial_writes(run):
            break
    assert partial_writes(run), "no kill landed mid-write"
    complete = run.step_checkpoints()
    assert [p.name for p in complete] == [checkpoint_files.step_dir_name(killed_at - 2), checkpoint_files.step_dir_name(killed_at - 1)]
    for p in complete:
        checkpoint_files.verify_checkpoint(p)
    cfg = load_config_file(run.config_path)
    state = ckpt.load_checkpoint(complete[-1], build_model(cfg.model))
    assert state["step"] == killed_at - 1
    assert run.lock_path.is_file()  # left by the killed process; must not block what follows

    set_steps(run, killed_at)  # finish the run one step after the newest complete checkpoint
    assert main(["resume", str(run.path)]) == 0
    assert not partial_writes(run) and not run.lock_path.exists()
    assert json.loads(run.summary_path.read_text())["steps"] == killed_at
    assert sorted(losses(run)) == list(range(1, killed_at + 1))  # no gap, no repeat (a cut-off line is dropped)


def test_interrupted_replacement_is_put_back(finished_micro_run, tmp_path):
    """A crash between the two renames that replace best/ leaves the old copy as `.best.old-PID`: it is restored."""
    run = RunDir(tmp_path / "run")
    shutil.copytree(finished_micro_run, run.path)
    os.replace(run.best_dir, run.path / ".best.old-4242")
    (run.path / ".best.tmp-x1").mkdir()
    (run.path / ".best.tmp-x1" / checkpoint_files.MODEL_FILE).write_bytes(b"partial")
    os.replace(run.checkpoints_dir / "step_000003", run.checkpoints_dir / ".step_000003.del-4242")  # a prune cut short
    (run.path / ".summary.json.tmp-4242").write_text("{")
    run.remove_partial_checkpoints()
    checkpoint_files.verify_checkpoint(run.best_dir)
    assert sorted(p.name for p in run.path.iterdir() if p.name.startswith(".")) == []
    assert [p.name for p in run.checkpoints_dir.iterdir()] == ["step_000006"]


# ---------------------------------------------------------------------------------------------------------
# 2. Ctrl-C and SIGTERM


def stop_child(child: subprocess.Popen, run: RunDir, after_step: int, sig: signal.Signals) -> tuple[int, str]:
    wait_for(lambda: run.metrics_path.is_file() and logged_step(run) >= after_step, what=f"step {after_step}")
    child.send_signal(sig)
    _, err = child.communicate(timeout=120)
    return child.returncode, err


def stopped_at(err: str, sig: str, run: RunDir) -> int:
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors == err.strip().splitlines()[-1:], err
    match = re.fullmatch(rf"error: stopped by {sig} at step (\d+); checkpoint saved, continue with `hybridctl resume {re.escape(str(run.path))}`", errors[0])
    assert match, errors[0]
    return int(match.group(1))


def test_sigint_and_sigterm_save_and_resume_exactly(tmp_path):
    settings = ["train.steps=20", "train.save_every=1000", "train.eval_every=1000"]
    run = RunDir(tmp_path / "runs" / "sig")
    child = hybridctl_child("train", "--preset", "tiny", "--out", str(run.path.parent), "--name", "sig", *cli_args_for_micro(settings))
    code, err = stop_child(child, run, 2, signal.SIGINT)
    first = stopped_at(err, "SIGINT", run)
    assert code == 130 and 2 <= first < 20
    assert [p.name for p in run.step_checkpoints()] == [checkpoint_files.step_dir_name(first)]  # saved at the current step
    assert checkpoint_files.verify_checkpoint(run.step_checkpoints()[0])["step"] == first
    assert not run.lock_path.exists()

    child = hybridctl_child("resume", str(run.path))
    code, err = stop_child(child, run, first + 2, signal.SIGTERM)
    second = stopped_at(err, "SIGTERM", run)
    assert code == 143 and first < second < 20
    assert run.step_checkpoints()[-1].name == checkpoint_files.step_dir_name(second)

    assert main(["resume", str(run.path)]) == 0
    uninterrupted = RunDir(tmp_path / "whole")
    cfg = micro_config(settings)
    uninterrupted.create(cfg)
    trainer.train(cfg, uninterrupted)
    uninterrupted.release_lock()
    assert losses(run) == losses(uninterrupted)  # exact, every one of the 20 steps
    assert json.loads(run.summary_path.read_text())["steps"] == 20


# ---------------------------------------------------------------------------------------------------------
# 3. Non-finite losses


class Poison:
    """Makes the training loss NaN on chosen steps (0-based) and records the weights each step starts from."""

    def __init__(self, monkeypatch, steps):
        self.steps, self.step, self.weights = set(steps), None, {}
        sample = BatchSampler.batch

        def batch(sampler, step, device="cpu"):
            self.step = step
            return sample(sampler, step, device)

        build = trainer.build_model

        def build_poisoned(cfg):
            model = build(cfg)
            forward = model.forward

            def poisoned(idx, targets=None, return_logits=False):
                out = forward(idx, targets, return_logits)
                if model.training:
                    self.weights[self.step] = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
                    if self.step in self.steps:
                        out.loss, out.ce_loss = out.loss * float("nan"), out.ce_loss * float("nan")
                return out

            model.forward = poisoned
            return model

        monkeypatch.setattr(BatchSampler, "batch", batch)
        monkeypatch.setattr(trainer, "build_model", build_poisoned)


def test_nonfinite_step_is_skipped_and_resume_stays_exact(monkeypatch, tmp_path):
    poison = Poison(monkeypatch, steps=[1])  # the second step
    cfg = micro_config()
    full = RunDir(tmp_path / "full")
    full.create(cfg)
    summary = trainer.train(cfg, full)
    w = poison.weights
    assert torch.equal(w[2], w[1])  # step 2 changed no weight
    assert not torch.equal(w[1], w[0]) and not torch.equal(w[3], w[2])  # its neighbours did
    assert summary["skipped_steps"] == 1 and json.loads(full.summary_path.read_text())["skipped_steps"] == 1
    assert sorted(losses(full)) == [1, 3, 4, 5, 6]  # nothing logged for the skipped step (no fake loss of 0)
    last = full.step_checkpoints()[-1]
    assert checkpoint_files.read_state(last)["skipped_steps"] == 1
    adam_steps = {k: v.item() for k, v in load_file(str(last / checkpoint_files.OPTIMIZER_FILE)).items() if k.endswith("/step")}
    assert adam_steps and set(adam_steps.values()) == {5.0}  # 6 steps, 5 updates

    half = RunDir(tmp_path / "half")
    half.create(cfg)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(cfg, half, callback=StopAfter(3))
    trainer.train(load_config_file(half.config_path), half, resume_from=half.resolve_checkpoint("latest"))
    assert losses(half) == losses(full)
    a, b = (load_file(str(r.step_checkpoints()[-1] / checkpoint_files.MODEL_FILE)) for r in (full, half))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_too_many_bad_steps_in_a_row_stop_the_run(monkeypatch, tmp_path, capsys):
    Poison(monkeypatch, steps=range(2, 100))
    run = tmp_path / "runs" / "nan"
    code = main(["train", "--preset", "tiny", "--out", str(run.parent), "--name", "nan",
                 *cli_args_for_micro(["train.steps=20", "train.max_bad_steps=3"])])
    err = capsys.readouterr().err
    assert code == 3  # diverged: a result, told apart from an error (1)
    assert err.count("loss not finite, update skipped") == 3
    assert err.strip().splitlines()[-1].startswith(
        "error: the run diverged: loss was not finite for 3 steps in a row (last at step 5); train it again with a lower train.lr")
    assert sorted(losses(RunDir(run))) == [1, 2]
    summary = json.loads((run / "summary.json").read_text())  # the run ends as a result
    assert (summary["status"], summary["steps"], summary["diverged_at"]) == ("diverged", 5, 3)
    # The count survives a resume: step 3's checkpoint holds one bad step, so two more stop the run again at step 5.
    assert checkpoint_files.read_state(run / "checkpoints" / "step_000003")["bad_in_row"] == 1
    assert main(["resume", str(run), "--from", "step_000003"]) == 3
    assert "error: the run diverged: loss was not finite for 3 steps in a row (last at step 5)" in capsys.readouterr().err


def test_bad_steps_are_counted_alike_when_checked_between_log_lines(monkeypatch, tmp_path, capsys):
    """The trainer reads the steps' finiteness flags at log, eval and save steps only (no host sync per step);
    the skipped steps, their numbers and the step that ends the run must come out as if each were checked."""
    Poison(monkeypatch, steps=range(2, 100))
    run = tmp_path / "runs" / "nan"
    code = main(["train", "--preset", "tiny", "--out", str(run.parent), "--name", "nan",
                 *cli_args_for_micro(["train.steps=20", "train.max_bad_steps=3", "train.log_every=4", "train.eval_every=6",
                                      "train.save_every=6"])])
    err = capsys.readouterr().err
    assert code == 3
    assert [line.split(":")[0].strip() for line in err.splitlines() if "update skipped" in line] == ["step 3", "step 4", "step 5"]
    assert err.strip().splitlines()[-1].startswith("error: the run diverged: loss was not finite for 3 steps in a row (last at step 5)")
    summary = json.loads((run / "summary.json").read_text())  # the flags were read at step 6, which it had run
    assert (summary["status"], summary["steps"], summary["diverged_at"]) == ("diverged", 6, 3)


# ---------------------------------------------------------------------------------------------------------
# 4. Full disk, unwritable folder


def train_argv(out: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--out", str(out), "--name", "r", *cli_args_for_micro(list(extra))]


def test_full_disk_at_creation_leaves_no_folder(monkeypatch, tmp_path, capsys):
    def full(path, data):
        open(path, "wb").close()  # the file appears, its bytes do not fit
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(Path, "write_bytes", full)
    assert main(train_argv(tmp_path)) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err.strip() == f"error: cannot write to {tmp_path / 'r'}: the disk is full; free some space or choose another --out folder"
    assert list(tmp_path.iterdir()) == []
    RunDir(tmp_path / "r").create(micro_config())  # a retry starts clean


def test_too_little_space_for_a_checkpoint_is_caught_before_step_1(monkeypatch, tmp_path, capsys, finished_micro_run):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    assert main(train_argv(tmp_path)) == 1
    err = capsys.readouterr().err.strip()
    match = re.fullmatch(r"error: only 0\.0 MB free on the disk of \S+, but one checkpoint of this model takes about "
                         r"([\d.]+) MB; free some space or choose another --out folder", err)
    assert match, err
    real = sum(p.stat().st_size for p in (finished_micro_run / "checkpoints" / "step_000003").iterdir())
    assert float(match.group(1)) == pytest.approx(real / 1e6, rel=0.1)  # the estimate is close to a real checkpoint
    assert list(tmp_path.iterdir()) == []  # the half-made run folder is gone, nothing blocks a retry


def test_too_little_space_is_caught_before_force_replaces_a_run(monkeypatch, tmp_path, capsys, finished_micro_run):
    shutil.copytree(finished_micro_run, tmp_path / "r")
    before = snapshot(tmp_path / "r")
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    monkeypatch.setattr(RunDir, "disk_bytes", lambda self: 0)  # the old run frees nothing: still too little room
    assert main([*train_argv(tmp_path), "--force"]) == 1
    assert "MB free on the disk of" in capsys.readouterr().err
    assert snapshot(tmp_path / "r") == before  # the old run is all there
    need = preflight.checkpoint_bytes(micro_config(), load_token_data(micro_config().data))
    preflight.check_room_for_a_checkpoint(need, tmp_path / "r", freed=need)  # the space of the run it replaces counts


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no folder can be made")
def test_an_out_folder_that_cannot_be_made_is_named_not_its_free_space(capsys):
    assert main(["train", "--preset", "tiny", "--out", "/proc/nope", *cli_args_for_micro()]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: cannot create folder /proc/nope (No such file or directory); choose another --out folder"
    assert not Path("/proc/nope").exists()


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no folder can be made")
def test_outputs_that_cannot_be_made_are_refused_in_one_line(finished_micro_run, capsys):
    """A report, a compare file or an export into a folder that cannot be made: refused before the work, in one
    line, instead of an unexpected error after it."""
    run = str(finished_micro_run)
    for argv, message in (
        (["report", run, "--out", "/proc/nope/r.md"], "cannot create folder /proc/nope (No such file or directory); "
                                                      "choose another file than /proc/nope/r.md"),
        (["compare", run, "--json-out", "/proc/x.json"], "cannot write to folder /proc"),
        (["export", run, "--out", "/proc/nope/hf"], "--out: cannot create folder /proc/nope (No such file or directory); "
                                                    "choose another folder"),
    ):
        assert main(argv) == 1, argv
        out, err = capsys.readouterr()
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
        assert "# " not in out  # nothing was rendered first
    assert not Path("/proc/nope").exists()


def test_an_out_folder_without_write_permission_is_refused_before_the_data(monkeypatch, tmp_path, capsys):
    """The check makes (and removes) a folder in the nearest existing one, which is where a missing permission or
    a read-only disk shows (as root every permission is granted, so the refusal is simulated)."""
    from hybridctl.core import files

    def refused(parent, prefix):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(parent))

    monkeypatch.setattr(files, "make_temp_dir", refused)
    monkeypatch.setattr(preflight, "load_run_data", lambda cfg: pytest.fail("the data was read first"))
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "a" / "b"), "--name", "r", *cli_args_for_micro()]) == 1
    assert capsys.readouterr().err.strip() == (f"error: cannot create folder {tmp_path / 'a'} (Permission denied); "
                                               "choose another --out folder")
    (tmp_path / "r").mkdir()
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path), "--name", "r", *cli_args_for_micro()]) == 1
    assert capsys.readouterr().err.strip() == (f"error: cannot write to folder {tmp_path / 'r'} (Permission denied); "
                                               "choose another --out folder")
    assert [p.name for p in tmp_path.iterdir()] == ["r"] and not any((tmp_path / "r").iterdir())


def assert_stopped_by_full_disk(err: str, run: RunDir) -> None:
    line = err.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: cannot write checkpoint \S+: No space left on device.*; earlier checkpoints are intact; "
                        rf"free some space, then continue with `hybridctl resume {re.escape(str(run.path))}`", line), line
    checkpoint_files.verify_checkpoint(run.checkpoints_dir / "step_000003")
    checkpoint_files.verify_checkpoint(run.best_dir)
    assert not any(".tmp-" in p.name for p in [*run.path.iterdir(), *run.checkpoints_dir.iterdir()])
    assert not run.lock_path.exists()


def test_disk_full_during_a_checkpoint_save(monkeypatch, tmp_path, capsys):
    real_save, real_copy = ckpt.save_file, ckpt.copyfile

    def save_file(tensors, filename, metadata=None):
        if "step_000006" in filename:
            Path(filename).write_bytes(b"\0" * 1000)  # what safetensors raises when the disk fills mid-file
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(tensors, filename, metadata=metadata)

    def copyfile(source, target):  # step 6's checkpoint copies best/'s files (the same snapshot): fill the disk there too
        if "step_000006" in str(target):
            Path(target).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        return real_copy(source, target)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    monkeypatch.setattr(ckpt, "copyfile", copyfile)
    run = RunDir(tmp_path / "r")
    assert main(train_argv(tmp_path)) == 1
    assert_stopped_by_full_disk(capsys.readouterr().err, run)
    assert [p.name for p in run.step_checkpoints()] == ["step_000003"]
    monkeypatch.undo()
    assert main(["resume", str(run.path)]) == 0
    assert json.loads(run.summary_path.read_text())["steps"] == 6


def test_real_full_disk_during_training(tmp_path, capsys):
    """On a 2.2 MB tmpfs the two checkpoints of step 3 fit and step 6's writes do not (root only)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2200k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("needs permission to mount a tmpfs")
    try:
        run = RunDir(disk / "r")
        assert main(train_argv(disk)) == 1
        assert_stopped_by_full_disk(capsys.readouterr().err, run)
        shutil.copytree(run.path, tmp_path / "r")
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    assert main(["resume", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["steps"] == 6


# ---------------------------------------------------------------------------------------------------------
# 5. Checkpoint into a config it does not fit


def test_config_diff_names_each_differing_key():
    a, b = micro_config(), micro_config(["model.d_model=64", 'model.pattern="FL"', "train.lr=1e-3"])
    assert config_diff(a, b) == ['model.d_model: 32 vs 64', 'model.pattern: "LF" vs "FL"', "train.lr: 0.003 vs 0.001"]
    assert config_diff(a.model, b.model, "model") == config_diff(a, b)[:2]
    assert config_diff(a, micro_config()) == []


def test_checkpoint_into_another_model_names_tensor_and_keys(finished_micro_run):
    cfg = load_config_file(finished_micro_run / "config.toml")
    cfg.model.d_model, cfg.model.n_heads = 64, 4
    with pytest.raises(CheckpointError) as e:
        ckpt.load_checkpoint(finished_micro_run / "checkpoints" / "step_000006", build_model(cfg.model))
    message = str(e.value)
    assert "tensor 'blocks.0.mixer.ab_proj.weight' has shape (4, 32) but this model expects (4, 64)" in message
    assert "model.d_model: 32 vs 64, model.n_heads: 2 vs 4, checkpoint vs this config" in message


# ---------------------------------------------------------------------------------------------------------
# 7. No pickle


def test_no_pickle_in_the_package():
    banned = [re.compile(r"^\s*(import|from)\s+(pickle|cPickle|dill|joblib)\b", re.M), re.compile(r"\bpickle\.\w+\("),
              re.compile(r"allow_pickle\s*=\s*True"), re.compile(r"torch\.save\(")]
    torch_load = re.compile(r"torch\.load\(([^()]|\([^()]*\))*\)")
    sources = sorted((REPO / "hybridctl").rglob("*.py"))
    assert len(sources) > 10
    for path in sources:
        text = path.read_text()
        for pattern in banned:
            assert not pattern.search(text), f"{path}: {pattern.pattern}"
        for call in torch_load.finditer(text):
            assert "weights_only=True" in call.group(0), f"{path}: {call.group(0)}"


def test_checkpoint_folders_hold_only_safetensors_and_json(finished_micro_run):
    folders = [*(finished_micro_run / "checkpoints").iterdir(), finished_micro_run / "best"]
    assert len(folders) == 3
    for folder in folders:
        assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]


# ---------------------------------------------------------------------------------------------------------
# 8. Two processes, one run


LOCK_HOLDER = "import sys, time; from hybridctl.core.training.runs import RunDir; RunDir(sys.argv[1]).acquire_lock(); print('locked', flush=True); time.sleep(120)"


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != "run.lock"}


def test_second_process_is_refused_and_a_dead_owner_is_taken_over(finished_micro_run, tmp_path, capsys):
    run = RunDir(tmp_path / "runs" / "micro")
    shutil.copytree(finished_micro_run, run.path)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(run.path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert run.lock_owner() == holder.pid  # what compare reads to list the run as running
        before = snapshot(run.path)
        refusal = f"error: run {run.path} is in use by process {holder.pid}; wait for it to finish or stop it first"
        assert main(["resume", str(run.path), "--extend-steps", "2"]) == 1
        assert capsys.readouterr().err.strip() == refusal
        assert main(["train", "--preset", "tiny", "--out", str(run.path.parent), "--name", "micro", "--force", *cli_args_for_micro()]) == 1
        assert capsys.readouterr().err.strip() == refusal  # --force does not wipe a run in use
        assert snapshot(run.path) == before
    finally:
        holder.kill()
        holder.wait()
    assert run.lock_path.read_text() == str(holder.pid)  # a stale lock of a dead process
    assert run.lock_owner() is None
    assert main(["resume", str(run.path), "--extend-steps", "1"]) == 0  # taken over
    assert not run.lock_path.exists()


def test_a_run_that_never_started_is_reused_without_force(tmp_path):
    cfg = micro_config()
    unstarted = RunDir(tmp_path / "a")
    unstarted.path.mkdir()
    (unstarted.path / "config.toml").write_text("left by a run killed while preparing data")
    (unstarted.path / "run.lock").write_text("999999999")
    unstarted.create(cfg)
    assert load_config_file(unstarted.config_path) == cfg
    unstarted.release_lock()

    started = RunDir(tmp_path / "b")
    started.path.mkdir()
    (started.path / "config.toml").write_text("x")
    (started.path / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    with pytest.raises(RunError, match="already exists"):
        started.create(cfg)


def test_sigterm_while_the_data_is_tokenised_cleans_up(monkeypatch, tmp_path, capsys):
    """SIGTERM outside the training loop unwinds like Ctrl-C (exit 143): the half-written token cache is removed
    instead of staying, hidden, in the cache folder."""
    from hybridctl.core.data import token_cache

    real_build = token_cache.build_token_cache

    def build_then_terminated(data_cfg, folder, progress=None):
        real_build(data_cfg, folder, progress)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this returns
        raise AssertionError("SIGTERM did not stop the build")

    monkeypatch.setattr(token_cache, "build_token_cache", build_then_terminated)
    monkeypatch.setenv("HYBRIDCTL_CACHE", str(tmp_path / "cache"))
    code = main(["data", "prepare", "--preset", "tiny", "--set", "data.max_tokens=20000"])
    assert code == 143 and capsys.readouterr().err.strip().splitlines()[-1] == "error: stopped by SIGTERM"
    assert [p.name for p in (tmp_path / "cache" / "tokens").iterdir()] == []
    assert signal.getsignal(signal.SIGTERM) is not None  # main() put the previous handler back


def test_a_step_out_of_gpu_memory_says_how_to_split_the_batch(monkeypatch, tmp_path, capsys):
    """A pass that does not fit in GPU memory (simulated: the CPU has no such error) ends the run with one line
    naming train.grad_accum, and resuming with it set trains the rest of the run on the same batches."""
    real = trainer.forward_backward

    def forward_backward(model, x, y, micro, grad_accum, *args):
        if micro > 2 and x.device.type == "cpu":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, x, y, micro, grad_accum, *args)

    monkeypatch.setattr(trainer, "forward_backward", forward_backward)
    run = RunDir(tmp_path / "r")
    assert main(train_argv(tmp_path)) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("error: out of GPU memory at step 1 (cpu): a pass of 4 rows x 32 tokens does not fit; split each "
                   "batch into more passes: train it again with --force --set train.grad_accum=2 (the same batch of "
                   "4 rows, 2 a pass)")
    assert main([*train_argv(tmp_path), "--force", "--set", "train.grad_accum=2"]) == 0
    assert json.loads(run.summary_path.read_text())["steps"] == 6


def test_out_of_memory_after_a_checkpoint_is_resumed_with_more_passes(monkeypatch, tmp_path, capsys):
    real, calls = trainer.forward_backward, []

    def forward_backward(model, x, y, micro, grad_accum, *args):
        calls.append(micro)
        if len(calls) == 5 and micro > 2:  # step 5, after step 3's checkpoint
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(model, x, y, micro, grad_accum, *args)

    monkeypatch.setattr(trainer, "forward_backward", forward_backward)
    run = RunDir(tmp_path / "r")
    assert main(train_argv(tmp_path)) == 1
    assert capsys.readouterr().err.strip().endswith(
        f"at step 5 (cpu): a pass of 4 rows x 32 tokens does not fit; split each batch into more passes: continue "
        f"with hybridctl resume {run.path} --set train.grad_accum=2 (the same batch of 4 rows, 2 a pass)")
    assert main(["resume", str(run.path), "--set", "train.grad_accum=2"]) == 0
    summary = json.loads(run.summary_path.read_text())
    assert summary["steps"] == 6 and summary["status"] == "complete"
    assert calls[5:] == [2, 2, 2]  # steps 4-6 from step 3's checkpoint, two rows a pass
