"""Warnings a careful colleague would give about a run's plan, before it starts: one line each, printed on stderr
by the commands and kept in the run's summary.json under "warnings". Pure functions of the config and the size of
the training data (torch-free)."""

from __future__ import annotations

from hybridctl.core.config import Config
from hybridctl.core.training.schedule import lr_reached


def train_windows(train_tokens: int, seq_len: int) -> int:
    """Training windows of seq_len + 1 tokens in a split of `train_tokens` (as the batch sampler cuts them)."""
    return max(0, (train_tokens - 1) // seq_len)


def peak_lr(cfg: Config) -> float:
    """The highest LR the schedule reaches over the planned steps: train.lr, unless the warmup outlasts the run."""
    return lr_reached(cfg.train, cfg.train.steps)


def run_warnings(cfg: Config, n_train_windows: int) -> list[str]:
    """What is likely a mistake in the plan: a warmup that takes most of the run or never ends, and training data
    read more than once. Each suggests a value that would avoid it (a warmup of at least 1 step, shorter than the
    one given)."""
    t = cfg.train
    notes = []
    if t.warmup_steps > t.steps:
        notes.append(
            f"train.warmup_steps ({t.warmup_steps}) is more than train.steps ({t.steps}): the LR never reaches its peak "
            f"train.lr = {t.lr:g} (it stops at {peak_lr(cfg):.3g}); lower warmup_steps, e.g. --set train.warmup_steps={max(1, t.steps // 10)}"
        )
    elif t.warmup_steps > 1 and 2 * t.warmup_steps >= t.steps:  # a warmup of 1 step has the full LR at step 0
        notes.append(
            f"train.warmup_steps ({t.warmup_steps}) is at least half of train.steps ({t.steps}): the LR peaks "
            f"{'at the last step' if t.warmup_steps == t.steps else 'late'} and has little time to decay; "
            f"a warmup of about 10% is usual, e.g. --set train.warmup_steps={max(1, t.steps // 10)}"
        )
    if n_train_windows > 0:
        rows = t.steps * t.batch_size
        epochs = rows / n_train_windows
        if epochs > 1:
            more = "raise data.max_tokens or use" if cfg.data.max_tokens else "use"
            shown = f"{epochs:.2f}" if epochs < 1.1 else f"{epochs:.1f}"  # 1.02, not a puzzling "1.0 epochs"
            notes.append(
                f"training repeats its data: {t.steps} steps x {t.batch_size} rows read {shown} epochs of the "
                f"{n_train_windows} training windows (seq_len {t.seq_len}); {more} more data, or lower train.steps "
                "to read it once"
            )
    return notes
