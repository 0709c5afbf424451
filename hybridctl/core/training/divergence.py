"""When a run has diverged, and what it is told. A step whose loss is not finite updates nothing, so a run
diverges in two ways: train.max_bad_steps such steps in a row stop it (trainer.settle), or a finite step at too
high an LR makes the weights so large that the model's outputs overflow, which the last evaluation shows as a
validation loss that is not finite. Either way the run ends with status "diverged" in summary.json and raises
Diverged (exit code 3); a sweep records the run as diverged and goes on.
"""

from __future__ import annotations

import math
from typing import Any

from hybridctl.core.errors import Diverged
from hybridctl.core.training.state import TrainState


def diverged(problem: str, step: int, lr: float) -> Diverged:
    """The error for a run that diverged at `step`; `problem` says what was seen."""
    # Resuming would replay the same batches at the same LR, so the way on is a lower LR.
    return Diverged(f"the run diverged: {problem}; train it again with a lower train.lr (now {lr:g}), "
                    f"e.g. --set train.lr={lr / 2:g} --force", problem, step)


def too_many_bad_steps(state: TrainState, last: int, lr: float) -> Diverged:
    """train.max_bad_steps steps in a row had a loss that is not finite, the last of them step `last`."""
    n = state.bad_in_row
    steps = f"{n} steps in a row" if n > 1 else "1 step"
    return diverged(f"loss was not finite for {steps} (last at step {last})", last - n + 1, lr)


def diverged_at_the_end(last_eval: dict[str, Any], state: TrainState, lr: float) -> Diverged | None:
    """After the last step: None unless the last validation loss is not finite (the weights gave no usable output)."""
    loss = last_eval.get("val_loss")
    if loss is None or math.isfinite(loss):
        return None
    problem = f"the validation loss at step {last_eval['step']} is {loss}"
    if state.bad_in_row:  # the training steps since this one were skipped: the weights broke before it
        first = state.step - state.bad_in_row + 1
        return diverged(f"{problem}, and the training loss was not finite from step {first} on", first, lr)
    return diverged(problem, last_eval["step"], lr)
