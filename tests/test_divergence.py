"""A run whose loss stops being finite ends as a result: summary.json says "diverged" (strict JSON), train exits 3
with one line saying so and what to try, compare shows it as diverged, and generate, eval and export refuse its
broken checkpoints in one line, naming an earlier one when there is one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import MICRO, cli_args_for_micro
from hybridctl.cli import main
from hybridctl.core.data.batches import BatchSampler
from hybridctl.core.lab.sweeps import plan_lr_sweep, read_sweep, run_sweep
from hybridctl.core.training import trainer
from hybridctl.core.training.runs import RunDir

pytestmark = pytest.mark.usefixtures("one_thread")

# An absurd LR: step 1's loss is finite, its update leaves weights of ~1e9 (finite), and every output after
# overflows. Three steps stay below train.max_bad_steps (5), so the run reaches its last step.
BLOW_UP = ["train.steps=3", "train.warmup_steps=1", "train.lr=1e9"]


def strict_json(path: Path):
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def run_main(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def diverged_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("diverged") / "runs"
    code = main(["train", "--preset", "tiny", "--out", str(out), "--name", "big", *cli_args_for_micro(BLOW_UP)])
    assert code == 3
    return out / "big"


def test_train_says_the_run_diverged_and_records_it(tmp_path, capsys):
    out = tmp_path / "runs"
    code, stdout, err = run_main(capsys, "train", "--preset", "tiny", "--out", out, "--name", "big", *cli_args_for_micro(BLOW_UP))
    assert code == 3  # a result, told apart from an error (1)
    assert err.strip().splitlines()[-1] == (
        "error: the run diverged: the validation loss at step 3 is nan, and the training loss was not finite from "
        "step 2 on; train it again with a lower train.lr (now 1e+09), e.g. --set train.lr=5e+08 --force")
    assert "Run summary" not in stdout
    summary = strict_json(out / "big" / "summary.json")  # no bare NaN
    assert (summary["status"], summary["diverged_at"], summary["steps"]) == ("diverged", 2, 3)
    assert summary["final_val_loss"] is None and summary["final_val_ppl"] is None and summary["best_val_loss"] is None
    assert summary["final_val_acc"] is None  # an argmax of overflowed outputs is no accuracy
    # metrics.jsonl too: a loss that is not finite is null, each line strict JSON (jq reads it)
    lines = (out / "big" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl")) for line in lines]
    last_eval = [r for r in records if "val_loss" in r][-1]
    assert last_eval["step"] == 3 and last_eval["val_loss"] is None and last_eval["val_ppl"] is None


def test_resuming_a_diverged_run_is_refused_unless_an_earlier_checkpoint_is_named(diverged_run, tmp_path, capsys):
    """Resume keeps the LR and the batches, so the newest checkpoint of a diverged run would diverge again."""
    run = tmp_path / "big"
    shutil.copytree(diverged_run, run)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    code, _, err = run_main(capsys, "resume", run, "--extend-steps", "5")
    assert code == 1
    assert err.strip() == (f"error: run {run} diverged at step 2, and resuming keeps its LR (1e+09) and batches; "
                           "train it again with a lower train.lr and --force, or pick an earlier checkpoint with --from")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_compare_shows_a_diverged_run(diverged_run, capsys):
    for target in (diverged_run, diverged_run.parent):
        code, stdout, err = run_main(capsys, "compare", target, "--no-plots")
        assert code == 0, err
        row = next(line for line in stdout.splitlines() if " big " in line)
        assert row.split()[0] == "-" and row.rstrip().endswith("diverged (3/3)") and "nan" not in row
        assert "error" not in err
    code, stdout, _ = run_main(capsys, "compare", diverged_run, "--json")
    record = json.loads(stdout, parse_constant=lambda c: pytest.fail(f"bare {c}"))[0]
    assert (record["status"], record["rank"], record["value"]) == ("diverged", None, None)


def test_compare_shows_a_diverged_run_recorded_as_complete(diverged_run, tmp_path, capsys):
    """A run trained before summaries said "diverged": status complete, a NaN loss."""
    old = tmp_path / "old"
    old.mkdir()
    run = old / "big"
    run.mkdir()
    for name in ("config.toml", "metrics.jsonl"):
        (run / name).write_bytes((diverged_run / name).read_bytes())
    summary = strict_json(diverged_run / "summary.json")
    summary.update(status="complete", final_val_loss=float("nan"))
    del summary["diverged_at"]
    (run / "summary.json").write_text(json.dumps(summary))
    code, stdout, err = run_main(capsys, "compare", old, "--no-plots")
    assert code == 0, err
    assert next(line for line in stdout.splitlines() if " big " in line).rstrip().endswith("diverged (3/3)")


def test_its_checkpoint_is_refused_in_one_line(diverged_run, tmp_path, capsys):
    checkpoint = diverged_run / "checkpoints" / "step_000003"
    expected = (f"error: checkpoint {checkpoint} gives outputs that are not finite (its weights blew up in training): "
                "run big diverged at step 2; train it again with a lower train.lr (now 1e+09) and --force")
    commands = {
        "generate": ["generate", diverged_run, "--prompt", "hi"],
        "generate a checkpoint": ["generate", checkpoint, "--prompt", "hi"],
        "eval": ["eval", diverged_run, "--data", "builtin:stdlib", "--max-tokens", "2000"],
        "export": ["export", diverged_run, "--out", tmp_path / "export"],
    }
    for what, args in commands.items():
        code, stdout, err = run_main(capsys, *args)
        assert (code, err.strip()) == (1, expected), what
    assert not (tmp_path / "export").exists() and not (diverged_run / "eval").exists()


class InfiniteWeightsAt:
    """From the training step `step` (0-based) on, the model's embedding holds inf: that step's loss and every
    later one are not finite, so no update repairs it, and the checkpoints saved after it hold inf."""

    def __init__(self, monkeypatch, step: int):
        sample, build = BatchSampler.batch, trainer.build_model
        current = {}

        def batch(sampler, index, device="cpu"):
            current["step"] = index
            return sample(sampler, index, device)

        def build_broken(cfg):
            model = build(cfg)
            forward = model.forward

            def broken(idx, targets=None, return_logits=False):
                if model.training and current.get("step") == step:
                    with torch.no_grad():
                        model.embed.weight[0] = float("inf")
                return forward(idx, targets, return_logits)

            model.forward = broken
            return model

        monkeypatch.setattr(BatchSampler, "batch", batch)
        monkeypatch.setattr(trainer, "build_model", build_broken)


def test_a_checkpoint_from_before_the_divergence_is_named(monkeypatch, tmp_path, capsys):
    InfiniteWeightsAt(monkeypatch, step=3)  # the fourth step: checkpoints and best/ at step 3 are sound
    out = tmp_path / "runs"
    code, _, err = run_main(capsys, "train", "--preset", "tiny", "--out", out, "--name", "late", *cli_args_for_micro())
    assert code == 3, err
    assert "the validation loss at step 6 is nan, and the training loss was not finite from step 4 on" in err
    monkeypatch.undo()
    run = out / "late"
    assert strict_json(run / "summary.json")["diverged_at"] == 4

    code, _, err = run_main(capsys, "generate", run, "--checkpoint", "latest", "--prompt", "hi", "-n", "2")
    assert (code, err.strip()) == (1, (
        f"error: the weights of checkpoint {run / 'checkpoints' / 'step_000006'} are not finite: run late diverged at "
        f"step 4; use a checkpoint saved before it, e.g. {run / 'checkpoints' / 'step_000003'} (step 3)"))
    code, stdout, err = run_main(capsys, "generate", run, "--prompt", "hi", "-n", "2", "--greedy")  # best/: step 3
    assert code == 0, err


def test_a_sweep_records_a_run_that_diverged_by_its_last_step(tmp_path):
    """Fewer non-finite steps than train.max_bad_steps: the sweep used to record the run as complete."""
    plan = plan_lr_sweep("tiny", [1e9], 3, list(MICRO) + ["train.warmup_steps=1"], name="big")
    path = tmp_path / "big"
    state = run_sweep(plan, path)
    assert state["status"] == {"tiny_lr1e9": "diverged"}
    assert state["errors"]["tiny_lr1e9"].startswith(
        "the validation loss at step 3 is nan, and the training loss was not finite from step 2 on; LR 1e9 is too high")
    assert read_sweep(path)["status"] == {"tiny_lr1e9": "diverged"}
    heard = []
    run_sweep(plan, path, notify=lambda planned, i, action: heard.append(action.kind))
    assert heard == ["diverged"]  # not trained again
    assert RunDir(path / "tiny_lr1e9").read_summary()["status"] == "diverged"
