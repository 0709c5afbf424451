"""Deterministic batches: the batch for step s depends only on (seed, s), so resuming at step s continues with
exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import numpy as np
import torch

from hybridctl.core.errors import DataError


class BatchSampler:
    """Non-overlapping windows of seq_len + 1 tokens, shuffled per epoch by (seed, epoch).

    The batch for step s is a pure function of (seed, s), so the data position in a checkpoint is its step.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int):
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise DataError(
                f"the corpus has {len(tokens)} tokens, too few for one sequence of train.seq_len={seq_len}; "
                "lower train.seq_len or use more data"
            )
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        return self._perm

    def window_indices(self, step: int) -> np.ndarray:
        out = np.empty(self.batch_size, dtype=np.int64)
        for b in range(self.batch_size):
            sample = step * self.batch_size + b
            epoch, pos = divmod(sample, self.n_windows)
            out[b] = self._permutation(epoch)[pos]
        return out

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / self.n_windows

    def batch(self, step: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        return windows_to_batch(self.tokens, self.window_indices(step), self.seq_len, device)


def eval_batches(tokens: np.ndarray, batch_size: int, seq_len: int, n_batches: int) -> list[np.ndarray]:
    """A fixed set of validation windows spread evenly over the val tokens (same for every eval and run)."""
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        return []
    total = min(n_windows, batch_size * n_batches)
    picks = np.linspace(0, n_windows - 1, total).round().astype(np.int64)
    return [picks[i : i + batch_size] for i in range(0, total, batch_size)]


def windows_to_batch(tokens: np.ndarray, windows: np.ndarray, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets for the given window indices."""
    starts = windows * seq_len
    data = torch.from_numpy(np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)[None, :]], dtype=np.int64))
    if torch.device(device).type == "cuda":
        data = data.pin_memory().to(device, non_blocking=True)
    return data[:, :-1], data[:, 1:]
