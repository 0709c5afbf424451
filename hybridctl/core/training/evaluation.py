"""Evaluation on the validation split: loss, accuracy, perplexity and, for synthetic recall tasks, accuracy on
the answer positions. The trainer calls it at every train.eval_every steps (rank 0 alone).
"""

from __future__ import annotations

import math

import torch

from hybridctl.core.config import Config
from hybridctl.core.data.batches import eval_batches, windows_to_batch
from hybridctl.core.data.tokens import TokenData
from hybridctl.core.model.hybrid_lm import HybridLM
from hybridctl.core.training.steps import autocast_for


@torch.no_grad()
def evaluate(model: HybridLM, data: TokenData, cfg: Config, device: torch.device, micro_batch: int) -> dict[str, float]:
    """Mean token loss and next-token accuracy over a fixed set of validation windows (and, for synthetic tasks,
    accuracy on the answer positions alone)."""
    t = cfg.train
    tokens, answers = data.val, data.val_answers
    was_training = model.training
    model.eval()
    total_loss, total_correct, total = 0.0, 0, 0
    answers_correct, answers_total = 0, 0
    for windows in eval_batches(tokens, t.batch_size, t.seq_len, t.eval_batches):
        for i in range(0, len(windows), micro_batch):
            x, y = windows_to_batch(tokens, windows[i : i + micro_batch], t.seq_len, device)
            with autocast_for(device, t.dtype):
                out = model(x, y, return_logits=True)
            n = y.numel()
            total_loss += out.ce_loss.float().item() * n
            correct = out.logits.argmax(-1) == y
            total_correct += correct.sum().item()
            total += n
            if answers is not None:
                _, distance = windows_to_batch(answers, windows[i : i + micro_batch], t.seq_len, device)
                # target j sits j + 1 tokens into the window: score an answer only if its example starts inside it
                scored = (distance > 0) & (distance <= torch.arange(1, t.seq_len + 1, device=device))
                answers_correct += (correct & scored).sum().item()
                answers_total += scored.sum().item()
    model.train(was_training)
    loss = total_loss / max(total, 1)
    metrics = {"val_loss": loss, "val_acc": total_correct / max(total, 1), "val_ppl": math.exp(min(loss, 50.0))}
    if answers is not None:
        metrics[data.info.get("answer_metric", "val_answer_acc")] = answers_correct / max(answers_total, 1)
    return metrics
