"""The training loop and its small parts: device and precision, optimizer, LR schedule, evaluation.

`train(cfg, run)` starts a run; `train(cfg, run, resume_from=checkpoint)` continues one. Progress is reported
through a callback of (event, record) so the library never prints; the CLI renders it.

Determinism: every RNG is seeded from train.seed, the batch for step s depends only on (seed, s), and a
checkpoint holds the model, AdamW state, RNG states and schedule; on CPU a resumed run repeats the losses of an
uninterrupted one exactly.

Several processes (torchrun, see distributed.py): the global batch stays train.batch_size, and each rank trains
on its contiguous slice of the rows the sampler gives for the step, so the data order does not depend on the
number of processes and a run can be resumed on another number. Rank 0 alone writes the run folder and reports
progress; checkpoints hold the unwrapped model, so they are the same whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import random
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from hybridctl.core.training import checkpoint as ckpt
from hybridctl.core.training import checkpoint_files
from hybridctl.core.training import distributed as dist
from hybridctl.core.data import synthetic
from hybridctl.core.config import Config
from hybridctl.core.presets import config_diff
from hybridctl.core.data.batches import BatchSampler, eval_batches, windows_to_batch
from hybridctl.core.data.tokens import TokenData
from hybridctl.core.data.token_cache import load_token_data
from hybridctl.core.errors import CheckpointError, ConfigError, TrainingError
from hybridctl.core.model.hybrid_lm import HybridLM, build_model, pick_loss
from hybridctl.core.training.runs import RunDir

Callback = Callable[[str, dict[str, Any]], None]


# ---------------------------------------------------------------------------------------------------------
# Device and precision


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device is '{spec}' but CUDA is not available here; use --device cpu (or --set train.device=cpu)")
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


# ---------------------------------------------------------------------------------------------------------
# Optimizer and schedule


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


MAX_PENDING_STEPS = 100  # read the steps' finiteness flags at least this often, even with a long log interval


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


# ---------------------------------------------------------------------------------------------------------
# Evaluation


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


# ---------------------------------------------------------------------------------------------------------
# The loop


@contextlib.contextmanager
def stop_on_signals(flag: dict):
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint at the end of the current step and stops."""
    previous = {}

    def handler(signum, frame):
        if flag.get("signal"):
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        flag["signal"] = signal.Signals(signum).name

    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


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


def prepare_model(cfg: Config, data: TokenData) -> HybridLM:
    check_vocab_fits(cfg, data)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = data.vocab_size
    return build_model(cfg.model)


def train(cfg: Config, run: RunDir, resume_from: Path | None = None, extend_steps: int = 0,
          callback: Callback | None = None, data: TokenData | None = None, rollback: bool = False) -> dict[str, Any]:
    """Train (or resume) the run; returns the summary that is also written to summary.json. With `rollback`, the
    checkpoints and best/ saved after `resume_from` are deleted once it has loaded (resume --from ... --force).

    Under torchrun every process calls this (after distributed.init, which the train and resume commands do);
    rank 0 alone writes into the run folder and calls `callback`.
    """
    t = cfg.train
    world, main = dist.world_size(), dist.is_main()
    emit = callback if callback is not None and main else (lambda kind, record: None)
    with dist.together():  # a bad config ends every process, and is printed once
        device = resolve_device(t.device)
        micro = micro_batch_size(cfg, world)
        eval_micro = micro_batch_size(cfg)  # evaluation splits as a single process does, so it scores alike
    seed_everything(t.seed)
    if data is None:
        data = dist.local_first(lambda: load_token_data(cfg.data))
    with dist.together():  # every rank loads the same model and checkpoint; rank 0 alone writes
        if resume_from is None:
            check_data_fits(cfg, data)
        model = prepare_model(cfg, data).to(device)
        if resume_from is None and main:
            run.write_config(cfg)  # the resolved config, vocab size filled in
        optimizer = build_optimizer(model, cfg, device)
        schedule = Schedule(t.lr, t.warmup_steps, t.steps, t.min_lr_ratio)
        start_step, best_val, best_step, tokens_seen, bad_in_row, skipped = 0, math.inf, -1, 0, 0, 0
        prior_time = 0.0
        if resume_from is not None:
            state = ckpt.load_checkpoint(resume_from, model, optimizer)
            if state.get("config_hash") not in (None, cfg.hash()):
                saved, current = state.get("config", {}), cfg.to_dict()
                differences = config_diff({k: saved.get(k, {}) for k in ("model", "data")}, {k: current[k] for k in ("model", "data")})
                detail = f" ({', '.join(differences[:4])}, checkpoint vs run config)" if saved and differences else ""
                raise TrainingError(f"checkpoint {resume_from} was made with a different model or data config{detail}; resume the run it came from")
            start_step = state["step"]
            schedule = Schedule.from_dict(state["schedule"])
            best_val, best_step = state.get("best_val_loss", math.inf), state.get("best_step", -1)
            tokens_seen, skipped = state.get("tokens", 0), state.get("skipped_steps", 0)
            bad_in_row = state.get("bad_in_row", 0)
            prior_time = state.get("train_time_s", 0.0)
            ckpt.set_rng_state(state["rng"])
            if main:
                run.truncate_metrics(start_step)
                run.reopen_summary()
                if rollback:
                    run.drop_checkpoints_after(start_step)
            if not checkpoint_files.is_complete(run.best_dir):  # best/ gone with the steps after it: the next eval writes one
                best_val, best_step = math.inf, -1
        if extend_steps:
            schedule.extend(start_step, t.steps)
        sampler = BatchSampler(data.train, t.batch_size, t.seq_len, t.seed)
        n_params = model.num_params()
        if main:
            check_room_for_a_checkpoint(ckpt.estimated_bytes(model), run.path)
    model.loss_impl = pick_loss(t.loss, device.type)
    train_model, no_sync = wrap_for_training(model, device, compiled=t.compile and device.type == "cuda", ddp=world > 1)
    rows = t.batch_size // world  # this rank's contiguous slice of the global batch
    emit("start", {"step": start_step, "steps": t.steps, "params": n_params, "device": str(device),
                   "train_tokens": len(data.train), "val_tokens": len(data.val), "layer_types": "".join(cfg.model.layer_types())})

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if world == 1:
            return sampler.batch(step, device)
        windows = sampler.window_indices(step)[dist.rank() * rows : (dist.rank() + 1) * rows]
        return windows_to_batch(sampler.tokens, windows, t.seq_len, device)

    def train_state(step: int) -> dict[str, Any]:
        return {"step": step, "tokens": tokens_seen, "schedule": schedule.to_dict(), "best_val_loss": best_val,
                "best_step": best_step, "config_hash": cfg.hash(), "data": {"sampler": "epoch-permutation", "position": step,
                "epoch": sampler.epoch_of(step)}, "skipped_steps": skipped, "bad_in_row": bad_in_row,
                "train_time_s": train_time, "world_size": world, "config": cfg.to_dict()}

    def write_checkpoint(path: Path, step: int) -> Path:
        try:
            return ckpt.save_checkpoint(path, model, optimizer, train_state(step))
        except CheckpointError as e:  # e.g. the disk filled up: say how to carry on once there is room
            then = f"continue with `hybridctl resume {run.path}`" if run.step_checkpoints() else "start the run again with --force"
            raise TrainingError(f"{e}; free some space, then {then}") from e

    def save(step: int) -> None:
        with dist.together():  # the others wait for the checkpoint (and learn if writing it failed)
            if main:
                path = write_checkpoint(run.checkpoints_dir / checkpoint_files.step_dir_name(step), step)
                run.prune_checkpoints(t.keep_checkpoints)
                emit("checkpoint", {"step": step, "path": str(path)})

    def run_eval(step: int) -> dict[str, Any]:
        # Rank 0 alone evaluates (the weights are the same on every rank) and decides about best/, so no rank can
        # disagree about a save; the others wait for it.
        nonlocal best_val, best_step
        record: dict[str, Any] = {}
        with dist.together():
            if main:
                metrics = evaluate(model, data, cfg, device, eval_micro)
                record = {"step": step, "tokens": tokens_seen, **metrics}
                run.append_metrics(record)
                if metrics["val_loss"] < best_val:
                    best_val, best_step = metrics["val_loss"], step
                    write_checkpoint(run.best_dir, step)
                emit("eval", record)
        return record

    model.train()
    autocast = autocast_for(device, t.dtype)
    train_time = prior_time
    interval_loss = torch.zeros((), device=device)
    interval_steps, interval_tokens = 0, 0
    aux_sums: dict[str, torch.Tensor] = {}
    tick = time.perf_counter()
    last_eval: dict[str, Any] = {}
    flag: dict[str, Any] = {}
    stop_signal = None
    pending: list[torch.Tensor] = []  # per-step "loss and gradients finite" flags, on the device until read
    step = start_step

    def settle(step: int) -> None:
        """Read the pending steps' finiteness flags (here, not every step: a host sync stalls the GPU), count the
        skipped steps and stop after train.max_bad_steps in a row, as if each step had been checked."""
        nonlocal bad_in_row, skipped, interval_steps
        if not pending:
            return
        for offset, ok in enumerate(torch.stack(pending).tolist()):
            if ok:
                bad_in_row = 0
                interval_steps += 1
                continue
            bad_in_row += 1
            skipped += 1
            at = step - len(pending) + offset + 1
            emit("skip", {"step": at, "in_row": bad_in_row})
            if bad_in_row >= t.max_bad_steps:
                raise dist.shared(TrainingError(
                    # Resuming would replay the same batches at the same LR, so the way on is a lower LR.
                    f"loss was not finite for {bad_in_row} steps in a row (last at step {at}); "
                    f"train again with a lower train.lr (now {t.lr:g}), e.g. --set train.lr={t.lr / 2:g}"
                ))
        pending.clear()

    wall_start = time.perf_counter()
    with stop_on_signals(flag):
        while step < t.steps:
            lr = schedule(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = batch(step)
            loss = forward_backward(train_model, x, y, micro, t.grad_accum, autocast, aux_sums, no_sync)
            grad_norm, finite = optimizer_step(model, optimizer, loss, t.grad_clip)
            interval_loss += torch.where(finite, loss, 0.0)
            pending.append(finite)
            step += 1
            tokens_seen += t.batch_size * t.seq_len
            interval_tokens += t.batch_size * t.seq_len
            is_log = step % t.log_every == 0 or step == t.steps or step == start_step + 1
            is_eval = step % t.eval_every == 0 or step == t.steps
            is_save = step % t.save_every == 0 or step == t.steps
            if is_log or is_eval or is_save or len(pending) >= MAX_PENDING_STEPS:
                settle(step)
                if world > 1:  # every process stops after the same step when torchrun passes a signal on
                    signum = float(signal.Signals[flag["signal"]]) if flag.get("signal") else 0.0
                    agreed = int(dist.all_reduce_max(torch.tensor([signum], device=device)).item())
                    stop_signal = signal.Signals(agreed).name if agreed else None
            # An interval whose steps were all skipped has no loss to log; its time and tokens go to the next one.
            if is_log and interval_steps:
                loss_total, aux_totals = interval_loss, aux_sums
                if world > 1:  # the mean over ranks: one collective per logged line, not one per step
                    reduced = dist.all_reduce_mean(torch.stack([interval_loss, *aux_sums.values()]))
                    loss_total, aux_totals = reduced[0], dict(zip(aux_sums, reduced[1:]))
                mean_loss = (loss_total / max(interval_steps, 1)).item()
                now = time.perf_counter()
                elapsed = now - tick
                if step > start_step + 1:  # the first step of a process includes compilation and autotuning
                    train_time += elapsed
                record = {"step": step, "tokens": tokens_seen, "loss": mean_loss, "lr": lr,
                          "grad_norm": float(grad_norm), "tok_s": interval_tokens / max(elapsed, 1e-9)}
                record.update({key: (value / max(interval_steps, 1)).item() for key, value in aux_totals.items()})
                aux_sums.clear()
                if main:
                    run.append_metrics(record)
                emit("log", record)
                interval_loss.zero_()
                interval_steps, interval_tokens = 0, 0
                tick = time.perf_counter()
            if is_eval:
                last_eval = run_eval(step)
                tick = time.perf_counter()
            if is_save:
                save(step)
                tick = time.perf_counter()
            if world == 1:
                stop_signal = flag.get("signal")
            if stop_signal and step < t.steps:  # at the last step the run simply finishes
                settle(step)
                if not is_save:
                    save(step)
                stopped = TrainingError(
                    f"stopped by {stop_signal} at step {step}; checkpoint saved, continue with `hybridctl resume {run.path}`",
                )
                stopped.exit_code = 128 + signal.Signals[stop_signal]  # the shell's convention: 130 for Ctrl-C
                raise dist.shared(stopped)
    timed_tokens = (step - start_step - 1) * t.batch_size * t.seq_len
    summary = build_summary(cfg, run, model, n_params, step, tokens_seen, best_val, best_step, last_eval,
                            train_time, prior_time, timed_tokens, time.perf_counter() - wall_start, skipped, device, world)
    with dist.together():
        if main:
            run.write_summary(summary)
    emit("end", summary)
    return summary


def build_summary(cfg, run, model, n_params, step, tokens, best_val, best_step, last_eval, train_time, prior_time,
                  timed_tokens, wall, skipped, device, world: int = 1) -> dict[str, Any]:
    segment_time = train_time - prior_time
    previous = run.read_summary()
    return {
        "name": run.name,
        "status": "complete",
        "steps": step,
        "tokens": tokens,
        "params": n_params,
        "layer_types": "".join(cfg.model.layer_types()),
        "attention_fraction": cfg.model.attention_fraction(),
        "lr": cfg.train.lr,
        "final_val_loss": last_eval.get("val_loss"),
        "final_val_acc": last_eval.get("val_acc"),
        "final_val_ppl": last_eval.get("val_ppl"),
        "best_val_loss": best_val if best_val < math.inf else None,
        "best_step": best_step,
        "tok_s": timed_tokens / segment_time if segment_time > 0 and timed_tokens > 0 else previous.get("tok_s"),
        "train_time_s": train_time,
        "wall_time_s": wall + previous.get("wall_time_s", 0.0) if previous else wall,
        "skipped_steps": skipped,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "world_size": world,
        # Synthetic recall tasks also score the answer positions alone (e.g. val_mqar_acc).
        **{f"final_{key}": value for key, value in last_eval.items() if key.endswith("_acc") and key != "val_acc"},
    }
