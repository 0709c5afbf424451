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
from hybridctl.core.errors import RunError
from hybridctl.core.model.hybrid_lm import HybridLM, build_model
from hybridctl.core.training.runs import RunDir, ensure_new_file, write_json_atomic


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
    return TrainedModel(model, cfg, tokenizer, run, checkpoint, int(state.get("step", 0)))


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
