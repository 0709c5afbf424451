"""The learning-rate schedule: linear warmup, cosine decay, and the extensions `resume --extend-steps` adds.

Its state (`to_dict`) is saved in every checkpoint, as part of the TrainState (state.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any


@dataclass
class Schedule:
    """Linear warmup, cosine decay to lr * min_lr_ratio, reached by the last step (index steps - 1).

    Each extension (resume --extend-steps) continues from the LR the run had reached and decays it by a new
    cosine to the same floor at the new last step: no second warmup and no jump in LR.
    """

    lr: float
    warmup_steps: int
    steps: int
    min_lr_ratio: float
    extensions: list[tuple[int, float, int]] = dataclasses.field(default_factory=list)  # (from_step, lr, to_step)

    def _base(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - 1 - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        floor = self.lr * self.min_lr_ratio
        return floor + 0.5 * (self.lr - floor) * (1 + math.cos(math.pi * progress))

    def __call__(self, step: int) -> float:
        for start, start_lr, end in reversed(self.extensions):
            if step >= start:
                floor = self.lr * self.min_lr_ratio
                progress = min(1.0, (step - start) / max(1, end - 1 - start))
                return floor + 0.5 * (start_lr - floor) * (1 + math.cos(math.pi * progress))
        return self._base(step)

    def extend(self, from_step: int, to_step: int) -> None:
        self.extensions.append((from_step, self(from_step), to_step))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Schedule":
        return cls(**{**d, "extensions": [tuple(e) for e in d.get("extensions", [])]})
