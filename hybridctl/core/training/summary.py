"""The run's summary (summary.json): final and best values, throughput, times, params. A resumed run's summary
adds its wall time to the earlier segments' and keeps their throughput when this one timed no step. A number that
is not finite (a diverged run's validation loss) is written as null, so the file is strict JSON.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from hybridctl.core.config import Config
from hybridctl.core.files import finite_or_null
from hybridctl.core.training.runs import RunDir
from hybridctl.core.training.state import TrainState


def build_summary(cfg: Config, run: RunDir, state: TrainState, n_params: int, last_eval: dict[str, Any],
                  timed_tokens: int, wall: float, prior_wall: float | None, device: torch.device,
                  world: int = 1) -> dict[str, Any]:
    """`timed_tokens`: the tokens of this process's steps that train_time_s counts; `wall`: this process's
    seconds in the loop; `prior_wall`: the earlier processes' (from the checkpoint resumed; None when it predates
    keeping them, and the previous summary's then counts)."""
    segment_time = state.train_time_s - state.prior_time_s
    previous = run.read_summary()
    loss = last_eval.get("val_loss")
    if loss is not None and not math.isfinite(loss):  # outputs that overflowed: their argmax "accuracy" means nothing
        last_eval = {key: None if key.endswith("_acc") else value for key, value in last_eval.items()}
    summary = {
        "name": run.name,
        "status": "complete",
        "steps": state.step,
        "tokens": state.tokens,
        "params": n_params,
        "layer_types": "".join(cfg.model.layer_types()),
        "attention_fraction": cfg.model.attention_fraction(),
        "lr": cfg.train.lr,
        "final_val_loss": last_eval.get("val_loss"),
        "final_val_acc": last_eval.get("val_acc"),
        "final_val_ppl": last_eval.get("val_ppl"),
        "best_val_loss": state.best_val_loss if state.best_val_loss < math.inf else None,
        "best_step": state.best_step,
        "tok_s": timed_tokens / segment_time if segment_time > 0 and timed_tokens > 0 else previous.get("tok_s"),
        "train_time_s": state.train_time_s,
        "wall_time_s": wall + (prior_wall if prior_wall is not None else previous.get("wall_time_s") or 0.0),
        "skipped_steps": state.skipped_steps,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "world_size": world,
        # Synthetic recall tasks also score the answer positions alone (e.g. val_mqar_acc).
        **{f"final_{key}": value for key, value in last_eval.items() if key.endswith("_acc") and key != "val_acc"},
    }
    return finite_or_null(summary)
