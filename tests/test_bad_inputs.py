"""Bad inputs across every command: each exits non-zero with one readable line on stderr and leaves the files
already on disk as they were.

Each row is (id, argv, expected text or None, setup). In argv, {ws} is the row's own empty folder and {run} a
copy of a finished micro run inside it; `setup(ws)` damages or adds files before the snapshot is taken. Rows for
commands still being built only require the one-line error; give them expected text once the command exists.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file

from conftest import cli_args_for_micro
from hybridctl.cli import main

MICRO = cli_args_for_micro()


def step_dir(ws: Path, step: int = 3) -> Path:
    return ws / "run" / "checkpoints" / f"step_{step:06d}"


def write(relative: str, text: str) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        (ws / relative).parent.mkdir(parents=True, exist_ok=True)
        (ws / relative).write_text(text)
    return setup


def flip_bytes(name: str, step: int = 3) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        f = step_dir(ws, step) / name
        data = bytearray(f.read_bytes())
        for i in range(len(data) // 2, len(data) // 2 + 16):  # inside the tensor data, past the header
            data[i] ^= 0xFF
        f.write_bytes(bytes(data))
    return setup


def truncate(name: str) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        f = step_dir(ws) / name
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    return setup


def clobber_header(ws: Path) -> None:
    f = step_dir(ws) / "model.safetensors"
    f.write_bytes(b"\xff" * 8 + f.read_bytes()[8:])


def foreign_weights(ws: Path) -> None:
    save_file({"transformer.wte.weight": torch.zeros(8, 4), "lm_head.weight": torch.ones(8, 4)}, str(step_dir(ws) / "model.safetensors"))


def remove_optimizer(ws: Path) -> None:
    (step_dir(ws) / "optimizer.safetensors").unlink()


def damage_every_checkpoint(ws: Path) -> None:
    for step in (3, 6):
        flip_bytes("model.safetensors", step)(ws)


def edit_run_config(old: str, new: str) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        config = ws / "run" / "config.toml"
        assert old in config.read_text()
        config.write_text(config.read_text().replace(old, new))
    return setup


def existing_run_named(name: str) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        shutil.copytree(ws / "run", ws / "runs" / name)
    return setup


def train(*extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--out", "{ws}/runs", "--name", "bad", *MICRO, *extra]


@dataclass
class Row:
    id: str
    argv: list[str]
    expect: str | None  # text the error line must contain; None: only the one-line rule (commands being built)
    setup: Callable[[Path], None] | None = None


ROWS = [
    # presets and --set
    Row("toml-syntax", ["train", "--preset", "{ws}/bad.toml"], "line 3", write("bad.toml", "[train]\nsteps = 3\nlr = \n")),
    Row("unknown-key-set", ["train", "--preset", "tiny", "--set", "train.stpes=3"], "did you mean 'train.steps'"),
    Row("unknown-key-file", ["train", "--preset", "{ws}/k.toml"], "did you mean 'train.batch_size'", write("k.toml", 'extends = "tiny"\n[train]\nbatch_sise = 4\n')),
    Row("unknown-section", ["train", "--preset", "tiny", "--set", "trian.steps=3"], "did you mean 'train'"),
    Row("wrong-type-int", ["train", "--preset", "tiny", "--set", 'train.steps="many"'], "train.steps must be an integer"),
    Row("wrong-type-bool", ["train", "--preset", "tiny", "--set", "train.compile=3"], "must be true or false"),
    Row("wrong-type-table", ["train", "--preset", "tiny", "--set", "model=3"], "[model] must be a table"),
    Row("negative-steps", ["train", "--preset", "tiny", "--set", "train.steps=-5"], "train.steps must be >= 1"),
    Row("zero-lr", ["train", "--preset", "tiny", "--set", "train.lr=0"], "train.lr must be > 0"),
    Row("attention-index", ["train", "--preset", "tiny", "--set", "model.attention_layers=[0,9]"], "index 9, out of range for 4 layers"),
    Row("attention-repeat", ["train", "--preset", "tiny", "--set", "model.attention_layers=[1,1]"], "repeats a layer"),
    Row("pattern-length", ["train", "--preset", "tiny", "--set", 'model.pattern="LLF"'], "has 3 letters but model.n_layers is 4"),
    Row("pattern-letter", ["train", "--preset", "tiny", "--set", 'model.pattern="LLXL"'], "unknown letter 'X'"),
    Row("heads-divide", ["train", "--preset", "tiny", "--set", "model.n_heads=3"], "divisible by model.n_heads"),
    Row("bad-dtype", ["train", "--preset", "tiny", "--set", 'train.dtype="fp16"'], "train.dtype must be auto, fp32 or bf16"),
    Row("unknown-preset", ["train", "--preset", "tinny"], "did you mean 'tiny'"),
    Row("missing-preset-file", ["train", "--preset", "{ws}/nope.toml"], "does not exist"),
    Row("preset-cycle", ["train", "--preset", "{ws}/a.toml"], "preset cycle",
        lambda ws: (write("a.toml", 'extends = "b.toml"\n')(ws), write("b.toml", 'extends = "a.toml"\n')(ws))),
    Row("no-preset", ["train"], "no preset given"),
    Row("override-no-equals", ["train", "--preset", "tiny", "--set", "train.steps"], "has no '='"),
    Row("override-into-value", ["train", "--preset", "tiny", "--set", "train.steps.x=1"], "is a value, not a section"),
    # data and device: these fail after the run folder is made, which must then be removed again
    Row("unknown-builtin-corpus", train("--set", 'data.dataset="builtin:nope"'), "unknown built-in corpus"),
    Row("missing-data-file", train("--set", 'data.dataset="{ws}/no_such_corpus.txt"'), None),
    Row("hub-dataset-offline", train("--set", 'data.dataset="no-such-org/no-such-dataset"'), None),
    Row("vocab-too-small", train("--set", "model.vocab_size=100"), "smaller than the tokenizer's vocabulary"),
    Row("grad-accum", train("--set", "train.grad_accum=3"), "divisible by train.grad_accum"),
    Row("corpus-too-small", train("--set", "data.max_tokens=20"), "too few for one sequence"),
    Row("no-validation-split", train("--set", "data.val_fraction=0"), "the validation split has 0 tokens"),
    Row("mqar-longer-than-seq", train("--set", 'data.dataset="synthetic:mqar:pairs=40"'), "makes examples of 160 tokens (4 x pairs), longer than train.seq_len=32"),
    # output folder
    Row("out-under-a-file", ["train", "--preset", "tiny", "--out", "{ws}/afile/runs", *MICRO], "is a file, not a folder", write("afile", "x")),
    Row("name-is-a-file", ["train", "--preset", "tiny", "--out", "{ws}", "--name", "afile", *MICRO], "is a file, not a folder", write("afile", "x")),
    Row("existing-run-no-force", train(), "pass --force", existing_run_named("bad")),
    Row("existing-run-without-checkpoint", train(), "already exists but has no checkpoint to resume from; pass --force",
        lambda ws: (existing_run_named("bad")(ws), shutil.rmtree(ws / "runs" / "bad" / "checkpoints"))),
    Row("force-over-non-run", train("--force"), "is not a run folder (no config.toml)", write("runs/bad/notes.txt", "mine")),
    Row("force-over-sweep", train("--force"), "is not a run folder", existing_run_named("bad/sweep_run_1")),
    Row("name-with-slash", ["train", "--preset", "tiny", "--out", "{ws}", "--name", "a/b", *MICRO], "must be a plain folder name"),
    Row("name-parent", ["train", "--preset", "tiny", "--out", "{ws}/runs", "--name", "..", "--force", *MICRO], "must be a plain folder name"),
    Row("sweep-name-parent", ["ablate", "lr", "--preset", "tiny", "--out", "{ws}/runs", "--name", "..", "--force", "--values", "1e-3"], "sweep name '..' must be a plain folder name", existing_run_named("keep")),
    Row("compare-json-out-under-a-file", ["compare", "{run}", "--json-out", "{ws}/afile/rank.json"], "/afile is a file; choose another file than", write("afile", "x")),
    Row("compare-metric-no-run-has", ["compare", "{run}", "--metric", "arc_acc"], "has no arc_acc; measure it with `hybridctl bench arc RUN`"),
    Row("name-absolute", ["train", "--preset", "tiny", "--out", "{ws}", "--name", "{ws}/run", "--force", *MICRO], "must be a plain folder name"),
    Row("name-empty", ["train", "--preset", "tiny", "--out", "{ws}", "--name", "", *MICRO], "--name is empty; give a name, or leave --name out to use the preset's name"),
    Row("sweep-name-empty", ["ablate", "lr", "--preset", "tiny", "--out", "{ws}/runs", "--name", "", "--values", "1e-3", "--dry-run"], "--name is empty; give a name, or leave --name out to use lr_<preset>"),
    Row("arch-sweep-name-blank", ["ablate", "arch", "--preset", "tiny", "--patterns", "LL", "--out", "{ws}/runs", "--name", " ", "--dry-run"], "--name is empty"),
    Row("eval-name-empty", ["eval", "{run}", "--data", "builtin:stdlib", "--name", ""], "--name is empty"),
    # --force over a run, with a mistake that fails only when the data is read: the old run is still all there
    Row("force-bad-data", train("--force", "--set", 'data.dataset="{ws}/no_such_corpus.txt"'), "no_such_corpus.txt", existing_run_named("bad")),
    Row("force-hub-tokenizer-offline", train("--force", "--set", 'data.tokenizer="no-such-org/no-such-tokenizer"'), None, existing_run_named("bad")),
    Row("force-small-vocab", train("--force", "--set", "model.vocab_size=100"), "smaller than the tokenizer's vocabulary", existing_run_named("bad")),
    # checkpoints
    Row("corrupt-checkpoint", ["resume", "{run}", "--from", "step_000003"], "is corrupt (checksum mismatch)", flip_bytes("model.safetensors")),
    Row("truncated-checkpoint", ["resume", "{run}", "--from", "step_000003"], "is truncated", truncate("optimizer.safetensors")),
    Row("unreadable-safetensors", ["resume", "{run}", "--from", "3"], "not readable as safetensors", clobber_header),
    Row("foreign-safetensors", ["resume", "{run}", "--from", "step_000003"], "was not written by hybridctl", foreign_weights),
    Row("missing-tensor-file", ["resume", "{run}", "--from", "step_000003"], "is missing optimizer.safetensors", remove_optimizer),
    Row("corrupt-state-json", ["resume", "{run}", "--from", "step_000003"], "not valid JSON", write("run/checkpoints/step_000003/state.json", '{"step": 3,')),
    Row("foreign-state-json", ["resume", "{run}", "--from", "step_000003"], "was not written by hybridctl", write("run/checkpoints/step_000003/state.json", '{"hello": 1}')),
    Row("every-checkpoint-damaged", ["resume", "{run}", "--extend-steps", "2"], "no intact checkpoint", damage_every_checkpoint),
    # with --force too: a checkpoint that does not fit the run is refused before anything after it is deleted
    Row("config-other-width", ["resume", "{run}", "--from", "step_000003", "--force"], "model.d_model: 32 vs 64", edit_run_config("d_model = 32", "d_model = 64")),
    Row("config-other-pattern", ["resume", "{run}", "--from", "step_000003", "--force"], 'model.pattern: "LF" vs "FL"', edit_run_config('pattern = "LF"', 'pattern = "FL"')),
    Row("resume-earlier-no-force", ["resume", "{run}", "--from", "step_000003", "--extend-steps", "2"], "has checkpoints after step_000003 (step_000006, best); resuming from it deletes them"),
    Row("resume-non-run-folder", ["resume", "{ws}/plain"], "not a run folder", write("plain/notes.txt", "mine")),
    Row("resume-missing-folder", ["resume", "{ws}/nowhere"], "not a run folder"),
    Row("resume-missing-step", ["resume", "{run}", "--from", "step_000999"], "has no checkpoint 'step_000999'; available: step_000003, step_000006"),
    Row("resume-finished", ["resume", "{run}"], "already finished its 6 steps"),
    Row("extend-steps-negative", ["resume", "{run}", "--extend-steps", "-3"], "--extend-steps must be >= 0"),
    # the command line itself
    Row("unknown-command", ["frobnicate"], "No such command"),
    Row("unknown-option", ["train", "--preset", "tiny", "--bogus"], "No such option"),
    Row("missing-argument", ["resume"], "Missing argument 'RUN'"),
    Row("bad-option-value", ["train", "--preset", "tiny", "--seed", "abc"], "Invalid value for '--seed'"),
    # commands being built
    Row("compare-empty-folder", ["compare", "{ws}/empty"], None, lambda ws: (ws / "empty").mkdir()),
    Row("compare-missing-folder", ["compare", "{ws}/nowhere"], None),
    Row("report-empty-folder", ["report", "{ws}/empty"], None, lambda ws: (ws / "empty").mkdir()),
    Row("ablate-unknown-preset", ["ablate", "--preset", "tinny"], None),
    Row("arch-layout-as-preset", ["ablate", "arch", "--preset", "LLFL", "--out", "{ws}/runs"], "--preset LLFL: that is a layer layout, not a preset; pass it as --patterns LLFL (applied to one --preset)"),
    Row("arch-indices-as-preset", ["ablate", "arch", "--preset", "tiny,[3]", "--out", "{ws}/runs"], "pass it as --patterns [3]"),
    Row("bench-unknown-preset", ["bench", "--preset", "tinny"], None),
    Row("data-unknown-option", ["data", "--bogus"], None),
]
if not torch.cuda.is_available():
    ROWS.append(Row("cuda-missing", train("--device", "cuda"), "CUDA is not available"))
    ROWS.append(Row("one-gpu-missing", train("--gpus", "1"), "leave out --gpus to train on the CPU"))


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def prepare(row: Row, tmp_path: Path, finished_run: Path) -> list[str]:
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copytree(finished_run, ws / "run")
    if row.setup:
        row.setup(ws)
    return [a.replace("{ws}", str(ws)).replace("{run}", str(ws / "run")) for a in row.argv]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row, tmp_path, capsys, finished_micro_run):
    argv = prepare(row, tmp_path, finished_micro_run)
    before = snapshot(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    if row.expect is not None:
        assert lines[0].startswith("error: ") and row.expect in lines[0], lines[0]
        assert "unexpected" not in lines[0]  # a known mistake, not an internal error
    assert snapshot(tmp_path) == before  # nothing on disk changed, no half-made run folder left


def test_table_is_large_and_ids_unique():
    assert len(ROWS) >= 30 and len({r.id for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("argv", [["frobnicate"], ["train", "--bogus"], ["resume"], ["train", "--seed", "abc"]])
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "(see `hybridctl" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path, capsys, finished_micro_run):
    row = next(r for r in ROWS if r.id == "corrupt-checkpoint")
    code = main(["--debug", *prepare(row, tmp_path, finished_micro_run)])
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback (most recent call last)" in err and "CheckpointError" in err
    assert err.strip().splitlines()[-1].startswith("error: checkpoint file")


def test_damaged_newest_checkpoint_is_passed_over(tmp_path, capsys, finished_micro_run):
    """`resume` (latest) warns about the damaged newest checkpoint and continues from the one before it."""
    run = tmp_path / "run"
    shutil.copytree(finished_micro_run, run)
    flip_bytes("optimizer.safetensors", 6)(tmp_path)
    assert main(["resume", str(run), "--extend-steps", "1"]) == 0
    out = capsys.readouterr()
    assert "warning: passing over step_000006: checkpoint file" in out.err and "checksum mismatch" in out.err
    assert "from step_000003 (step 3) to step 7" in " ".join(out.out.split())
    assert json.loads((run / "summary.json").read_text())["steps"] == 7
