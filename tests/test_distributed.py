"""Data-parallel training on CPU: real processes under torchrun (gloo), checked against one process.

Two processes do not repeat one process's losses bit for bit (DDP averages the gradients in another order), so
losses are compared with a tight relative tolerance. torchrun's --redirects keeps each rank's console output apart.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import MICRO_SPEED, cli_args_for_micro, micro_config
from hybridctl.cli import main
from hybridctl.commands import train as train_command
from hybridctl.core.training import checkpoint_files, steps
from hybridctl.core.training.runs import RunDir
from hybridctl.core.training.steps import micro_batch_size
from hybridctl.core.training.trainer import train

# Two micro-batches per process (batch 4 over 2 processes), so no_sync is exercised too.
SETTINGS = ["train.grad_accum=2"]
REL = 1e-5


def torchrun_command(*args: str, logs: Path, nproc: int = 2, script: Path | None = None) -> list[str]:
    """torchrun running `hybridctl ARGS`, or a Python script, with each rank's output kept apart under `logs`."""
    target = [str(script)] if script is not None else ["-m", "hybridctl"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "--log-dir", str(logs), "--redirects", "3", *target, *args]


def rank_output(logs: Path, nproc: int = 2) -> dict[int, tuple[str, str]]:
    """(stdout, stderr) of each rank, from torchrun's log folder."""
    out = {}
    for rank in range(nproc):
        (folder,) = logs.glob(f"*/attempt_0/{rank}")
        out[rank] = ((folder / "stdout.log").read_text(), (folder / "stderr.log").read_text())
    return out


def torchrun(*args: str, logs: Path, timeout: int = 120) -> tuple[int, dict[int, tuple[str, str]]]:
    done = subprocess.run(torchrun_command(*args, logs=logs), capture_output=True, text=True, timeout=timeout)
    return done.returncode, rank_output(logs)


def losses(run: RunDir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in run.read_metrics() if "loss" in r}


def val_losses(run: RunDir) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in run.read_metrics() if "val_loss" in r}


def assert_close(a: dict[int, float], b: dict[int, float]) -> None:
    assert sorted(a) == sorted(b)
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=REL), step


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The micro run trained by one process (in this one) and by two processes under torchrun."""
    root = tmp_path_factory.mktemp("ddp")
    cfg = micro_config(SETTINGS)
    one = RunDir(root / "runs" / "one")
    one.create(cfg)
    try:
        train(cfg, one)
    finally:
        one.release_lock()
    code, output = torchrun("train", "--preset", "tiny", "--out", str(root / "runs"), "--name", "two",
                            *cli_args_for_micro(SETTINGS), logs=root / "logs-two")
    return root, one, RunDir(root / "runs" / "two"), code, output


def test_two_processes_train_like_one(runs):
    root, one, two, code, output = runs
    assert code == 0, output
    assert sorted(p.name for p in (root / "runs").iterdir()) == ["one", "two"]  # one run folder, no stray files
    assert files(two.path) == files(one.path)
    assert_close(losses(two), losses(one))
    assert_close(val_losses(two), val_losses(one))
    for name in ("checkpoints/step_000003", "checkpoints/step_000006", "best"):
        for tensors in (checkpoint_files.MODEL_FILE, checkpoint_files.OPTIMIZER_FILE):
            a, b = (load_file(str(r.path / name / tensors)) for r in (one, two))
            assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)  # no module. / _orig_mod. prefixes
    assert checkpoint_files.read_state(two.step_checkpoints()[-1])["world_size"] == 2
    assert checkpoint_files.read_state(one.step_checkpoints()[-1])["world_size"] == 1
    assert json.loads(two.summary_path.read_text())["world_size"] == 2
    (out0, err0), (out1, err1) = output[0], output[1]
    assert "step      6/6  loss" in err0 and "Run summary" in out0
    assert out1 == "" and err1 == ""  # rank 1 prints nothing


def test_checkpoint_of_two_processes_resumes_in_one(runs, tmp_path, capsys):
    _, one, two, code, _ = runs
    assert code == 0
    run = RunDir(tmp_path / "two")
    shutil.copytree(two.path, run.path)
    assert main(["resume", str(run.path), "--from", "step_000003", "--force"]) == 0
    assert_close(losses(run), losses(one))
    assert checkpoint_files.read_state(run.step_checkpoints()[-1])["world_size"] == 1


def test_checkpoint_of_one_process_resumes_in_two(runs, tmp_path):
    _, one, _, _, _ = runs
    run = RunDir(tmp_path / "one")
    shutil.copytree(one.path, run.path)
    code, output = torchrun("resume", str(run.path), "--from", "step_000003", "--force", logs=tmp_path / "logs")
    assert code == 0, output
    assert "from step_000003 (step 3) to step 6" in " ".join(output[0][0].split()) and output[1] == ("", "")
    assert_close(losses(run), losses(one))
    assert_close(val_losses(run), val_losses(one))
    assert checkpoint_files.read_state(run.step_checkpoints()[-1])["world_size"] == 2
    assert not run.lock_path.exists()


def test_batch_not_divisible_by_processes_times_grad_accum(tmp_path):
    settings = SETTINGS + ["train.batch_size=6"]
    assert micro_batch_size(micro_config(settings)) == 3  # fine for one process
    code, output = torchrun("train", "--preset", "tiny", "--out", str(tmp_path / "runs"), "--name", "odd",
                            *cli_args_for_micro(settings), logs=tmp_path / "logs")
    assert code != 0
    (out0, err0), (out1, err1) = output[0], output[1]
    assert err0.splitlines() == [
        "error: train.batch_size (6) must be divisible by 2 processes x train.grad_accum (2) = 4; "
        "use a multiple of 4, e.g. --set train.batch_size=8 (the global batch, split over the processes)"
    ]
    assert out0 == out1 == err1 == ""  # one line from rank 0, nothing from rank 1, no traceback
    assert not (tmp_path / "runs" / "odd").exists()  # failed before step 1: nothing left behind


def test_sigint_stops_every_process_at_the_same_step(tmp_path):
    settings = ["train.steps=5000", "train.save_every=10000", "train.eval_every=10000"]
    run = RunDir(tmp_path / "runs" / "sig")
    logs = tmp_path / "logs"
    child = subprocess.Popen(torchrun_command("train", "--preset", "tiny", "--out", str(run.path.parent), "--name", "sig",
                                              *cli_args_for_micro(settings), logs=logs),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while max(losses(run), default=0) < 3 and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.01)
    child.send_signal(signal.SIGINT)  # what Ctrl-C sends torchrun, which passes it on to both processes
    child.wait(timeout=120)
    output = rank_output(logs)
    (_, err0), (out1, err1) = output[0], output[1]
    last = err0.strip().splitlines()[-1]
    assert last.startswith("error: stopped by SIGINT at step ") and "Traceback" not in err0, err0
    step = int(last.split("at step ")[1].split(";")[0])
    assert 3 <= step < 5000 and out1 == err1 == ""
    assert [p.name for p in run.step_checkpoints()] == [checkpoint_files.step_dir_name(step)]  # saved once, at the agreed step
    assert max(losses(run)) == step and not run.lock_path.exists()


def test_speed_bench_over_two_processes(tmp_path):
    out = tmp_path / "speed.json"
    code, output = torchrun("bench", "speed", "--patterns", "LF,LL", "--seq", "16", "--batch", "4", "--steps", "2",
                            "--warmup", "1", "--json", str(out), *MICRO_SPEED, logs=tmp_path / "logs")
    assert code == 0, output
    report = json.loads(out.read_text())
    assert report["processes"] == 2 and [r["name"] for r in report["results"]] == ["LF", "LL"]
    for row in report["results"]:
        assert row["error"] is None and row["batch_size"] == 4  # the global batch, 2 rows per process
        assert row["tok_s"] == pytest.approx(2 * 4 * 16 / row["seconds"])
    (out0, err0), (out1, err1) = output[0], output[1]
    assert "on 2 x cpu" in out0 and "the 2 processes together" in " ".join(out0.split()) and str(out) in out0
    assert "LL: seq 16, batch 4 ..." in err0
    assert out1 == err1 == ""  # rank 1 prints nothing
    assert [p.name for p in tmp_path.iterdir() if p.name != "logs"] == ["speed.json"]


SPLIT_SCRIPT = """
import sys
import torch
sys.path.insert(0, {tests!r})
from conftest import micro_config
from hybridctl.core.training import distributed as dist
from hybridctl.core.lab.speed import benchmark_step

with dist.session(torch.device("cpu")):
    cfg = micro_config(["train.batch_size=4", "train.seq_len=16"])
    cfg.model.vocab_size = 300
    model, step = benchmark_step(cfg, torch.device("cpu"))
    rows = []
    model.register_forward_pre_hook(lambda module, args: rows.append(tuple(args[0].shape)))
    step()
    print(dist.rank(), rows, float(model.embed.weight.sum()))
"""


def test_speed_bench_splits_the_batch_over_the_processes(tmp_path):
    """What each process of `bench speed` runs under torchrun: its half of the batch, and after a step the same
    weights as the other (DDP averaged their gradients)."""
    script = tmp_path / "split.py"
    script.write_text(SPLIT_SCRIPT.format(tests=str(Path(__file__).parent)))
    logs = tmp_path / "logs"
    done = subprocess.run(torchrun_command(logs=logs, script=script), capture_output=True, text=True, timeout=120)
    output = rank_output(logs)
    assert done.returncode == 0, output
    lines = [output[rank][0].split(maxsplit=1) for rank in (0, 1)]
    assert [int(rank) for rank, _ in lines] == [0, 1]
    (_, first), (_, second) = lines
    assert "[(2, 16)]" in first and "[(2, 16)]" in second  # 4 rows, 2 per process, one micro-batch each
    assert first.split()[-1] == second.split()[-1]  # the same weights after the step


def test_out_of_memory_under_several_processes_stops_them_all(monkeypatch):
    """A shape that does not fit in one process ends the benchmark (no row: the others may be waiting for it in a
    collective), with an error that leaves the process group alone instead of tearing it down."""
    from hybridctl.core.training import distributed as dist
    from hybridctl.core.lab import speed
    from hybridctl.core.errors import ConfigError

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(speed, "_timed_steps", out_of_memory)
    cfg = micro_config()
    assert speed.measure_speed(cfg, 16, 4, torch.device("cpu"))["error"] == "out of memory"  # one process: a row
    monkeypatch.setattr(dist, "active", lambda: True)
    monkeypatch.setattr(dist, "rank", lambda: 1)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    with pytest.raises(ConfigError, match="out of memory in process 1 at seq 16, batch 4 over 2 processes") as caught:
        speed.measure_speed(cfg, 16, 4, torch.device("cpu"))
    closed = []
    monkeypatch.setattr(dist, "close", lambda: closed.append(True))
    with pytest.raises(ConfigError):
        with dist.session(torch.device("cpu")):
            raise caught.value
    assert closed == []
    with pytest.raises(ConfigError):
        with dist.session(torch.device("cpu")):
            raise ConfigError("the same error in every process")
    assert closed == [True]


def test_speed_bench_batch_that_does_not_split(tmp_path):
    code, output = torchrun("bench", "speed", "--patterns", "LL", "--seq", "16", "--batch", "3",
                            "--json", str(tmp_path / "speed.json"), *MICRO_SPEED, logs=tmp_path / "logs")
    assert code != 0
    (out0, err0), (out1, err1) = output[0], output[1]
    assert err0.splitlines() == ["error: batch 3 (LL, seq 16) does not split over 2 processes x train.grad_accum (1); "
                                 "pass --batch with a multiple of 2"]
    assert out0 == out1 == err1 == ""
    assert not (tmp_path / "speed.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("command", ["train", "resume", "bench speed"])
def test_gpus_without_cuda_says_how_to_use_torchrun(command, tmp_path, capsys):
    argv = {"train": ["train", "--preset", "tiny", "--out", str(tmp_path), "--gpus", "2"],
            "resume": ["resume", str(tmp_path / "run"), "--gpus", "2"],
            "bench speed": ["bench", "speed", "--preset", "tiny", "--out", str(tmp_path), "--gpus", "2"]}[command]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"error: --gpus 2: no CUDA GPUs are available here; to run 2 processes on CPU, run "
        f"`torchrun --nproc-per-node 2 -m hybridctl {command} ...` with the same options, without --gpus"
    ]
    assert list(tmp_path.iterdir()) == []


def test_gpus_starts_the_same_command_under_torchrun(monkeypatch, tmp_path):
    """Without GPUs to run on, the launch itself is checked: torchrun's command line and its exit code."""
    started = []

    class Child:
        def __init__(self, args, env):
            started.append(args)
            assert int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) >= 300  # time to reach a log step and save


        def wait(self):
            return 7

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(steps, "resolve_device", lambda spec: torch.device(spec.replace("auto", "cuda")))
    monkeypatch.setattr(train_command.subprocess, "Popen", Child)
    rest = ["--preset", "tiny", "--out", str(tmp_path), "--set", "train.steps=3"]
    assert main(["train", "--gpus", "2", *rest]) == 7
    assert main(["train", *rest, "--gpus=2"]) == 7
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "hybridctl"]
    assert started == [launcher + ["train", *rest]] * 2
    assert list(tmp_path.iterdir()) == []  # the processes make the run folder, not the launcher
    assert main(["train", "--gpus", "2", *rest, "--set", "train.batch_size=15"]) == 1  # checked before launching
    assert main(["train", "--gpus", "2", *rest, "--device", "cuda:1"]) == 1  # each process takes its own GPU
    assert len(started) == 2

    bench = ["bench", "speed", "--preset", "tiny", "--json", str(tmp_path / "speed.json")]
    assert main([*bench, "--gpus", "2"]) == 7
    assert started[-1] == launcher + bench
    assert main([*bench, "--gpus", "2", "--batch", "3"]) == 1  # checked before launching
    assert main([*bench, "--gpus", "2", "--device", "cuda:1"]) == 1
    (tmp_path / "speed.json").write_text("{}")
    assert main([*bench, "--gpus", "2"]) == 1  # an existing report is not replaced without --force
    assert main([*bench, "--gpus", "2", "--force"]) == 7 and started[-1] == launcher + bench + ["--force"]
    assert len(started) == 4 and (tmp_path / "speed.json").read_text() == "{}"
    assert main([*bench, "--gpus", "2", "--force", "--steps", "0"]) == 1  # checked before launching
    assert main([*bench, "--gpus", "1", "--device", "cpu"]) == 1  # --gpus means GPUs, one or several
    assert len(started) == 4
