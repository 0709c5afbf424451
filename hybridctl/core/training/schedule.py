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

    def reached(self, steps: int) -> float:
        """The highest LR of the first `steps` steps (0.0 for none): the last step of warmup, or the last step when
        the run stops before it; an extension starts its decay at the LR it began with, so may only lower it."""
        if steps <= 0:
            return 0.0
        candidates = [max(0, min(self.warmup_steps, steps) - 1)]
        candidates += [start for start, _, _ in self.extensions if start < steps]
        return min(self.lr, max(self(step) for step in candidates))  # never above train.lr (float rounding)

    def extend(self, from_step: int, to_step: int) -> None:
        self.extensions.append((from_step, self(from_step), to_step))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Schedule":
        return cls(**{**d, "extensions": [tuple(e) for e in d.get("extensions", [])]})


def lr_reached(train, steps: int) -> float:
    """The highest LR that the schedule a run's config plans (its TrainConfig: lr, warmup_steps, steps,
    min_lr_ratio) reaches in the run's first `steps` steps: train.lr once warmup is over, less before."""
    return Schedule(train.lr, train.warmup_steps, train.steps, train.min_lr_ratio).reached(steps)
