"""Checks made before a run starts, so a bad setting ends in one line before anything is trained or written:
the tokens against the config, the disk space a checkpoint needs. `train` runs them (load_run_data,
check_room_for_a_checkpoint) before it makes or replaces a run's folder; the trainer runs them again.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

from hybridctl.core.config import Config
from hybridctl.core.data import synthetic
from hybridctl.core.data.batches import BatchSampler
from hybridctl.core.data.token_cache import load_token_data
from hybridctl.core.data.tokens import TokenData
from hybridctl.core.errors import ConfigError, TrainingError
from hybridctl.core.model.hybrid_lm import build_model
from hybridctl.core.training import checkpoint as ckpt
from hybridctl.core.training import distributed as dist
from hybridctl.core.training.steps import micro_batch_size, resolve_device


def check_vocab_fits(cfg: Config, data: TokenData) -> None:
    if 0 < cfg.model.vocab_size < data.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's vocabulary ({data.vocab_size}); "
            "set it to 0 to follow the tokenizer"
        )


def check_data_fits(cfg: Config, data: TokenData) -> None:
    """What the tokens must give the model and the evaluation, checked before a run starts (a resumed run was
    checked when it started, perhaps by an older version: it is not refused now)."""
    check_vocab_fits(cfg, data)
    t = cfg.train
    if cfg.data.dataset.startswith("synthetic:"):
        synthetic.check_seq_len(cfg.data, t.seq_len)
    BatchSampler(data.train, t.batch_size, t.seq_len, t.seed)  # checks that the training split holds a window
    need = t.seq_len + 1
    if len(data.val) < need:  # else every val_ figure, best/ and the rankings would be of something else
        raise ConfigError(
            f"the validation split has {len(data.val)} tokens, fewer than one window of train.seq_len + 1 = {need}; "
            "raise data.val_fraction, give a longer data.val_split, or lower train.seq_len"
        )


def check_room_for_a_checkpoint(need: int, folder: Path, freed: int = 0) -> None:
    """Fail before training rather than at the first checkpoint. `freed`: what is deleted first (the run that
    train --force replaces, whose folder may not be made yet)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free + freed
    if free < need:
        raise TrainingError(
            f"only {free / 1e6:.1f} MB free on the disk of {folder}, but one checkpoint of this model takes about "
            f"{need / 1e6:.1f} MB; free some space or choose another --out folder"
        )


def checkpoint_bytes(cfg: Config, data: TokenData) -> int:
    """ckpt.estimated_bytes of the run's model, built without memory (on the meta device)."""
    model_cfg = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or data.vocab_size)
    with torch.device("meta"):
        return ckpt.estimated_bytes(build_model(model_cfg))


def load_run_data(cfg: Config) -> TokenData:
    """The run's tokens (built or read from the cache), checked against the config: every check that a dataset or
    tokenizer setting can fail, so `train --force` runs them before it replaces a run."""
    with dist.together():
        resolve_device(cfg.train.device)
        micro_batch_size(cfg, dist.world_size())
    data = dist.local_first(lambda: load_token_data(cfg.data))
    with dist.together():
        check_data_fits(cfg, data)
    return data
