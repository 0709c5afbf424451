"""One training step and what it runs on: device and precision, the optimizer and its step, the micro-batch
split, torch.compile and DDP wrapping, forward and backward. The loop that calls them is trainer.py; `bench
speed` (lab/speed.py) times the same step.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
import random
from typing import Any, Callable

import numpy as np
import torch

from hybridctl.core.config import Config
from hybridctl.core.errors import ConfigError
from hybridctl.core.model.hybrid_lm import HybridLM
from hybridctl.core.training import distributed as dist


def resolve_device(spec: str, setting: str = "train.device") -> torch.device:
    """The torch device for auto, cpu, cuda or cuda:N; `setting` names where the value came from in errors
    (train.device, or a command's --device)."""
    if not (spec in ("auto", "cpu", "cuda") or (spec.startswith("cuda:") and spec[5:].isdigit())):
        raise ConfigError(f"{setting} must be auto, cpu, cuda or cuda:N, got '{spec}'")
    if spec == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif spec.startswith("cuda") and not torch.cuda.is_available():
        alternative = " (or --set train.device=cpu)" if setting == "train.device" else ""
        raise ConfigError(f"{setting} is '{spec}' but CUDA is not available here; use --device cpu{alternative}")
    else:
        device = torch.device(spec)
    if device.type != "cuda" or not dist.launched():
        return device
    # Under torchrun each process of a machine takes its own GPU.
    if device.index is not None:
        raise ConfigError(f"train.device is '{spec}', but under torchrun each process uses the GPU of its LOCAL_RANK; use --set train.device=cuda")
    index, count = dist.local_rank(), torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"process {index} of this machine needs cuda:{index}, but only {count} GPUs are visible; start at most {count} processes per machine")
    return torch.device("cuda", index)


def autocast_for(device: torch.device, dtype_spec: str):
    use_bf16 = dtype_spec == "bf16" or (dtype_spec == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def micro_batch_size(cfg: Config, world: int = 1) -> int:
    """Rows per forward pass: the global batch split over `world` processes and train.grad_accum micro-batches."""
    t = cfg.train
    if world == 1 and t.batch_size % t.grad_accum:
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be divisible by train.grad_accum ({t.grad_accum})")
    parts = world * t.grad_accum
    if t.batch_size % parts:
        fit = parts * math.ceil(t.batch_size / parts)
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) must be divisible by {world} processes x train.grad_accum ({t.grad_accum}) = {parts}; "
            f"use a multiple of {parts}, e.g. --set train.batch_size={fit} (the global batch, split over the processes)"
        )
    return t.batch_size // parts


def out_of_memory_advice(cfg: Config, world: int, device: torch.device, step: int, then: str) -> str:
    """What to do when a step ran out of GPU memory: more, smaller passes for the same batch (train.grad_accum),
    or, where a pass is one row already, shorter rows or a smaller model. `then` says how to carry on the run
    with a setting changed ("hybridctl resume RUN", or a fresh start)."""
    t = cfg.train
    micro = micro_batch_size(cfg, world)
    where = str(device)
    if device.type == "cuda":
        where += f", {torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB"
    head = f"out of GPU memory at step {step} ({where}): a pass of {micro} row{'s' if micro > 1 else ''} x {t.seq_len} tokens does not fit"
    if micro == 1:
        return f"{head}; lower train.seq_len or use a smaller model, then start the run again with --force"
    accum = next(g for g in range(t.grad_accum + 1, t.batch_size + 1) if t.batch_size % (world * g) == 0)
    return (f"{head}; split each batch into more passes: {then} --set train.grad_accum={accum} (the same batch of "
            f"{t.batch_size} rows, {t.batch_size // (world * accum)} a pass)")


def no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Norm weights, biases and the Gated DeltaNet gate parameters are not weight-decayed."""
    return param.dim() < 2 or name.endswith(("A_log", "dt_bias"))


def build_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    t = cfg.train
    decay, plain = [], []
    for name, p in model.named_parameters():
        (plain if no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    # Fused on every device: one kernel per step, and `found_inf` lets optimizer_step skip a bad step on the device.
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, fused=True)


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.AdamW, loss: torch.Tensor, grad_clip: float):
    """Clip the gradients and take the AdamW step unless the loss or the gradient norm is not finite, deciding on
    the device: the fused AdamW kernel reads `found_inf` and leaves weights, moments and step count alone, so the
    step needs no host sync. Returns (grad_norm, finite) as device tensors. Under DDP the processes share the
    gradients but not their losses, so the decision is reduced over them (enqueued, not waited for)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
    if dist.active():
        finite = dist.all_reduce_min(finite.float()) > 0
    optimizer.found_inf = (~finite).float()
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf  # a stale flag would silently skip any later plain step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


def compile_model(module: torch.nn.Module) -> torch.nn.Module:
    """torch.compile, with inductor's kernels launched as programmatic dependent launches (on Hopper and newer
    GPUs; inductor leaves them out elsewhere): each kernel's start overlaps the end of the one before, and waits
    for the earlier kernels before reading what they wrote; about 0.7% of the hybrid's step on an H200.
    TORCHINDUCTOR_ENABLE_PDL in the environment decides instead when it is set. On CUDA the project's custom ops
    are registered with inductor first (inductor_fallbacks.py: without it the study models take minutes to
    compile)."""
    import torch._inductor.config as inductor_config

    if torch.cuda.is_available():
        from hybridctl.core.kernels import inductor_fallbacks

        inductor_fallbacks.register()

    if "TORCHINDUCTOR_ENABLE_PDL" in os.environ or not hasattr(inductor_config.triton, "enable_pdl"):
        return torch.compile(module)
    return torch.compile(module, options={"triton.enable_pdl": True})


def wrap_for_training(model: HybridLM, device: torch.device, compiled: bool, ddp: bool
                      ) -> tuple[torch.nn.Module, Callable[[], Any] | None]:
    """The module the training step calls (compiled, under DDP, both or neither) and DDP's no_sync, if any.

    torch.compile wraps DDP rather than the other way round: compiling the DDP module lets Dynamo split the
    graph at DDP's gradient buckets, so each bucket's all-reduce overlaps the rest of the backward (a compiled
    inner module would run its whole backward first and leave all communication to the end). Buffers (the
    rotary frequencies) are constants, so they are not broadcast before every forward (newer torch names that
    switch forward_sync_buffers and warns about the old name)."""
    if not ddp:
        return (compile_model(model) if compiled else model), None
    ddp_class = torch.nn.parallel.DistributedDataParallel
    buffers = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp_class).parameters else "broadcast_buffers"
    wrapped = ddp_class(model, device_ids=[device.index] if device.type == "cuda" else None, **{buffers: False})
    return (compile_model(wrapped) if compiled else wrapped), wrapped.no_sync


def forward_backward(model, x, y, micro: int, grad_accum: int, autocast, aux_sums: dict | None = None,
                     no_sync: Callable[[], Any] | None = None) -> torch.Tensor:
    """Forward and backward over the batch in micro-batches; returns the mean cross-entropy (not synced).

    Auxiliary losses (MoE balance, indexer KL) are added into aux_sums for logging when it is given. With DDP,
    `no_sync` (the wrapper's) keeps the gradients of all but the last micro-batch local, so the accumulated sum is
    all-reduced once per step instead of once per micro-batch.
    """
    loss_sum = torch.zeros((), device=x.device)
    for i in range(0, x.shape[0], micro):
        local = no_sync is not None and i + micro < x.shape[0]
        with no_sync() if local else contextlib.nullcontext():
            with autocast:
                out = model(x[i : i + micro], y[i : i + micro])
            (out.loss / grad_accum).backward()
        loss_sum += out.ce_loss.detach().float()
        if aux_sums is not None:
            for key, value in out.aux.items():
                aux_sums[key] = aux_sums.get(key, 0) + value.detach().float() / grad_accum
    return loss_sum / grad_accum
