"""A trained model read back from a run folder or checkpoint (for benchmarks, generation, evaluation and export),
and the benchmark results stored under its run (`bench/<task>.json`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hybridctl.core.training import checkpoint as ckpt
from hybridctl.core.training import checkpoint_files
from hybridctl.core.config import Config
from hybridctl.core.data.tokenizer import Tokenizer, get_tokenizer
from hybridctl.core.errors import HybridctlError, RunError
from hybridctl.core.model.hybrid_lm import HybridLM, build_model
from hybridctl.core.files import write_json_atomic
from hybridctl.core.training.runs import RunDir, ensure_new_file


BENCH_DIR = "bench"


@dataclass
class TrainedModel:
    model: HybridLM
    cfg: Config
    tokenizer: Tokenizer
    run: RunDir
    checkpoint: Path
    step: int


def locate_checkpoint(path: Path, which: str | None = None) -> tuple[RunDir, Path]:
    """A run folder (best/ if it has one, else the latest step, or `which`) or a checkpoint folder inside one."""
    path = Path(path)
    run = RunDir(path)
    if run.exists():
        if which is None:
            if not checkpoint_files.is_complete(run.best_dir) and not run.step_checkpoints():
                raise RunError(f"run {run.path} has no checkpoint yet (one is saved at each eval and every "
                               f"train.save_every steps); train it further with `hybridctl resume {run.path}`, or "
                               "pass another run")
            which = "best" if checkpoint_files.is_complete(run.best_dir) else "latest"
        return run, run.resolve_checkpoint(which)
    if checkpoint_files.is_complete(path):
        if which is not None:
            raise RunError(f"{path} is a checkpoint folder; pass --checkpoint only with a run folder")
        run = RunDir(path.parent.parent if path.parent.name == "checkpoints" else path.parent)
        if not run.exists():
            raise RunError(f"checkpoint {path} is not inside a run folder (no config.toml above it); pass the run folder made by `hybridctl train`")
        return run, path
    if not path.exists():
        raise RunError(f"{path} does not exist; pass a run folder made by `hybridctl train`, or a checkpoint folder in one")
    raise RunError(f"{path} is neither a run folder (config.toml) nor a checkpoint (state.json); pass a folder made by `hybridctl train`")


def load_trained_model(path: Path, which: str | None = None, device: torch.device | str = "cpu") -> TrainedModel:
    run, checkpoint = locate_checkpoint(path, which)
    cfg = run.load_config()
    if cfg.model.vocab_size <= 0:
        raise RunError(f"{run.config_path} has no model.vocab_size (the run never started training); train it first")
    tokenizer = get_tokenizer(cfg.data.tokenizer, cfg.data)
    model = build_model(cfg.model)
    state = ckpt.load_checkpoint(checkpoint, model)
    model.to(device).eval()
    check_finite(model, run, checkpoint, cfg.train.seq_len)
    return TrainedModel(model, cfg, tokenizer, run, checkpoint, int(state.get("step", 0)))


PROBE_TOKENS = 16


@torch.no_grad()
def check_finite(model: HybridLM, run: RunDir, checkpoint: Path, seq_len: int) -> None:
    """Refuse a checkpoint whose weights, or whose outputs on a few tokens, are not finite: a run that diverged.
    A step whose loss is not finite updates nothing, but a finite one at too high an LR can leave weights so
    large that every output overflows, so the weights alone do not tell."""
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        problem = f"the weights of checkpoint {checkpoint} are not finite"
    else:
        device = next(model.parameters()).device
        idx = torch.arange(min(PROBE_TOKENS, seq_len), device=device)[None] % model.vocab_size
        training = model.training
        model.eval()
        finite = torch.isfinite(model(idx, return_logits=True).logits).all()
        model.train(training)
        if finite:
            return
        problem = f"checkpoint {checkpoint} gives outputs that are not finite (its weights blew up in training)"
    raise RunError(f"{problem}: {divergence_fix(run, checkpoint)}")


def divergence_fix(run: RunDir, checkpoint: Path) -> str:
    """The cause and the way on for a checkpoint of a run that diverged: an earlier checkpoint, else a lower LR."""
    at = run.read_summary().get("diverged_at")
    when = f"run {run.name} diverged at step {at}" if isinstance(at, int) else f"run {run.name} diverged"
    earlier = []
    if isinstance(at, int):
        for path in [*run.step_checkpoints(), run.best_dir]:
            try:
                step = checkpoint_files.read_state(path)["step"]
            except (HybridctlError, KeyError):
                continue
            if step < at and Path(path).resolve() != Path(checkpoint).resolve():
                earlier.append((step, path))
    if earlier:
        step, path = max(earlier, key=lambda item: item[0])
        return f"{when}; use a checkpoint saved before it, e.g. {path} (step {step})"
    try:
        lr = f" (now {run.load_config().train.lr:g})"
    except HybridctlError:
        lr = ""
    return f"{when}; train it again with a lower train.lr{lr} and --force"


def bench_result_path(run: RunDir, task: str) -> Path:
    return run.path / BENCH_DIR / f"{task}.json"


def write_json(path: Path, data: dict[str, Any], force: bool = False) -> Path:
    ensure_new_file(path, force)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(path), data)
    return Path(path)


def write_bench_result(run: RunDir, task: str, result: dict[str, Any], force: bool = False) -> Path:
    return write_json(bench_result_path(run, task), result, force)


def read_bench_result(run: RunDir, task: str) -> dict[str, Any] | None:
    path = bench_result_path(run, task)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
