"""Output piped into a reader that exits early (`hybridctl ... | head`): no traceback, no message, exit 141, and
nothing lost: files are written, a training run saves a checkpoint and can be resumed (docs/cli.md)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys

import pytest

from conftest import cli_args_for_micro, run_cli
from hybridctl.core import streams
from hybridctl.core.training import checkpoint_files
from hybridctl.core.training.runs import RunDir

EXIT_PIPE = 141
HYBRIDCTL = [sys.executable, "-m", "hybridctl"]


def with_stdout_closed(*args: str) -> tuple[int, str]:
    """Run hybridctl with a stdout whose reader has gone before the first line (the strictest `| head`)."""
    child = subprocess.Popen([*HYBRIDCTL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child.stdout.close()
    err = child.stderr.read()
    child.stderr.close()
    return child.wait(timeout=300), err


def test_exit_status_is_sigpipes():
    assert streams.EXIT_PIPE == EXIT_PIPE


@pytest.mark.parametrize("args", [["--help"], ["train", "--list-presets"], ["data", "list"]])
def test_read_only_commands_exit_141_quietly(args):
    code, err = with_stdout_closed(*args)
    assert (code, err) == (EXIT_PIPE, "")


def test_report_and_compare_write_their_files(finished_micro_run, tmp_path):
    run = tmp_path / "micro"
    shutil.copytree(finished_micro_run, run)
    code, err = with_stdout_closed("report", str(run))
    assert (code, err) == (EXIT_PIPE, "")
    assert (run / "report.md").read_text().startswith("#")

    code, err = with_stdout_closed("compare", str(run), "--json-out", str(tmp_path / "ranking.json"))
    assert (code, err) == (EXIT_PIPE, "")
    assert json.loads((tmp_path / "ranking.json").read_text())[0]["name"] == "micro"


def test_generate_stops_quietly(finished_micro_run):
    code, err = with_stdout_closed("generate", str(finished_micro_run), "--prompt", "The", "-n", "40", "--seed", "0")
    assert (code, err) == (EXIT_PIPE, "")


def test_train_into_head_saves_a_checkpoint_and_resumes(tmp_path):
    """`train ... 2>&1 | head -1`: the run stops at the step after the pipe closed, saved, exit 141; resume ends it."""
    run = RunDir(tmp_path / "runs" / "piped")
    settings = ["train.steps=12", "train.save_every=1000", "train.eval_every=1000", "train.log_every=1"]
    args = ["train", "--preset", "tiny", "--out", str(run.path.parent), "--name", "piped", *cli_args_for_micro(settings)]
    line = shlex.join([*HYBRIDCTL, *args])
    done = subprocess.run(["bash", "-c", f"set -o pipefail; {line} 2>&1 | head -1"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == EXIT_PIPE, done.stdout + done.stderr
    assert done.stdout.startswith("piped: ") and len(done.stdout.splitlines()) == 1 and done.stderr == ""
    saved = run.step_checkpoints()
    assert len(saved) == 1
    step = checkpoint_files.verify_checkpoint(saved[0])["step"]
    assert 1 <= step < 12
    assert not run.summary_path.exists() and not run.lock_path.exists()

    resumed = run_cli("resume", str(run.path))
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(run.summary_path.read_text())["steps"] == 12
    assert sorted(r["step"] for r in run.read_metrics() if "loss" in r) == list(range(1, 13))


def test_stdout_alone_closed_does_not_stop_a_run(tmp_path):
    """`train ... | head`: the progress still shows on stderr, so the run goes on to its end; only the summary is
    lost, and the exit status says so."""
    run = RunDir(tmp_path / "runs" / "whole")
    code, err = with_stdout_closed("train", "--preset", "tiny", "--out", str(run.path.parent), "--name", "whole",
                                   *cli_args_for_micro())
    assert code == EXIT_PIPE and "Traceback" not in err and "error" not in err
    assert json.loads(run.summary_path.read_text())["steps"] == 6
