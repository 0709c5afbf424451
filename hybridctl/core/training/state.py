"""TrainState: everything a run's training changes as it goes, the part of a checkpoint's state.json that
resume reads back. The trainer (trainer.py) adds the run's context (config and hash, data position, number of
processes) when it saves; the loop's per-log-line accumulators are not state (they restart with each process).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from hybridctl.core.training.schedule import Schedule


@dataclass
class TrainState:
    schedule: Schedule
    step: int = 0  # steps taken: the next step's index
    tokens: int = 0  # tokens trained on (the global batch, all processes)
    best_val_loss: float = math.inf
    best_step: int = -1  # the step of best/ (-1: none yet)
    skipped_steps: int = 0  # steps whose loss or gradient norm was not finite (no update)
    bad_in_row: int = 0  # the latest of them in a row; the run stops at train.max_bad_steps
    train_time_s: float = 0.0  # seconds of training, first steps of each process (compilation) left out
    # train_time_s when this process took the run over (0 for a new run); not saved: a checkpoint's train_time_s
    # is the next process's prior time.
    prior_time_s: float = dataclasses.field(default=0.0, compare=False)
    # seconds the run's processes spent in the training loop, compilation and checkpoints included, as of the last
    # save; None from a checkpoint written before it was kept (summary.json's wall time then adds up as before)
    wall_time_s: float | None = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The keys checkpoints' state.json carries for these values (older ones lack the later keys)."""
        return {"step": self.step, "tokens": self.tokens, "schedule": self.schedule.to_dict(),
                "best_val_loss": self.best_val_loss, "best_step": self.best_step, "skipped_steps": self.skipped_steps,
                "bad_in_row": self.bad_in_row, "train_time_s": self.train_time_s, "wall_time_s": self.wall_time_s}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainState":
        """From a checkpoint's state (older checkpoints may lack the later keys: their defaults apply)."""
        train_time = d.get("train_time_s", 0.0)
        return cls(schedule=Schedule.from_dict(d["schedule"]), step=d["step"], tokens=d.get("tokens", 0),
                   best_val_loss=d.get("best_val_loss", math.inf), best_step=d.get("best_step", -1),
                   skipped_steps=d.get("skipped_steps", 0), bad_in_row=d.get("bad_in_row", 0),
                   train_time_s=train_time, prior_time_s=train_time, wall_time_s=d.get("wall_time_s"))
