"""The training loop: `train(cfg, run)` starts a run; `train(cfg, run, resume_from=checkpoint)` continues one.
Progress is reported through a callback of (event, record) so the library never prints; the CLI renders it.

The other parts of a run are in this package's modules; its __init__ says which does what.

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
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from hybridctl.core.config import Config
from hybridctl.core.data.batches import BatchSampler, windows_to_batch
from hybridctl.core.data.token_cache import load_token_data
from hybridctl.core.data.tokens import TokenData
from hybridctl.core.errors import CheckpointError, Diverged, TrainingError
from hybridctl.core.model.hybrid_lm import HybridLM, build_model, pick_loss
from hybridctl.core.presets import config_diff
from hybridctl.core.training import checkpoint as ckpt
from hybridctl.core.training import checkpoint_files
from hybridctl.core.training.checkpoint_writer import CheckpointWriter, wait_for_pending_writes
from hybridctl.core.training import distributed as dist
from hybridctl.core.training import divergence
from hybridctl.core.training import evaluation
from hybridctl.core.training.metrics import Callback, Metrics
from hybridctl.core.training.preflight import check_data_fits, check_room_for_a_checkpoint, check_vocab_fits
from hybridctl.core.training.processes import stop_on_signals
from hybridctl.core.training.run_warnings import run_warnings
from hybridctl.core.training.runs import RunDir
from hybridctl.core.training.schedule import Schedule
from hybridctl.core.training.state import TrainState
from hybridctl.core.training.steps import (autocast_for, build_optimizer, forward_backward, micro_batch_size,
                                           optimizer_step, out_of_memory_advice, resolve_device, seed_everything,
                                           wrap_for_training)
from hybridctl.core.training.summary import build_summary
from hybridctl.core.training.tracking import make_sinks

MAX_PENDING_STEPS = 100  # read the steps' finiteness flags at least this often, even with a long log interval


def prepare_model(cfg: Config, data: TokenData) -> HybridLM:
    check_vocab_fits(cfg, data)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = data.vocab_size
    return build_model(cfg.model)


@dataclass
class LogInterval:
    """What the loop sums between two log lines, on the device until a line is logged."""

    loss: torch.Tensor  # the sum of the finite steps' losses
    steps: int = 0  # the steps with a finite loss (settle counts them)
    tokens: int = 0
    aux_sums: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # auxiliary losses (MoE, indexer)
    tick: float = dataclasses.field(default_factory=time.perf_counter)  # when its training time began

    def restart(self) -> None:
        self.loss.zero_()
        self.aux_sums.clear()
        self.steps, self.tokens = 0, 0
        self.tick = time.perf_counter()


class Trainer:
    """One run's training. Building it sets up every process alike (device, data, model, optimizer, TrainState,
    restored from `resume_from` when given); fit() trains to train.steps and returns the summary."""

    def __init__(self, cfg: Config, run: RunDir, resume_from: Path | None = None, extend_steps: int = 0,
                 callback: Callback | None = None, data: TokenData | None = None, rollback: bool = False,
                 notes: list[str] | None = None):
        t = cfg.train
        self.cfg, self.run = cfg, run
        self.world, self.main = dist.world_size(), dist.is_main()
        self.metrics = Metrics.for_run(run, callback)
        self.trackers: list = []  # train.log_to's sinks (rank 0), also in self.metrics.sinks
        with dist.together():  # a bad config ends every process, and is printed once
            self.device = resolve_device(t.device)
            self.micro = micro_batch_size(cfg, self.world)
            self.eval_micro = micro_batch_size(cfg)  # evaluation splits as a single process does, so it scores alike
        seed_everything(t.seed)
        self.data = data if data is not None else dist.local_first(lambda: load_token_data(cfg.data))
        with dist.together():  # every rank loads the same model and checkpoint; rank 0 alone writes
            if resume_from is None:
                check_data_fits(cfg, self.data)
            self.model = prepare_model(cfg, self.data).to(self.device)
            if resume_from is None and self.main:
                run.write_config(cfg)  # the resolved config, vocab size filled in
            self.optimizer = build_optimizer(self.model, cfg, self.device)
            self.state = TrainState(Schedule(t.lr, t.warmup_steps, t.steps, t.min_lr_ratio))
            if resume_from is not None:
                self.state = self.resume(resume_from, rollback)
            if extend_steps:
                self.state.schedule.extend(self.state.step, t.steps)
            self.sampler = BatchSampler(self.data.train, t.batch_size, t.seq_len, t.seed)
            # what the command noticed (a --set that replaced the preset's layers) and what the plan looks like
            self.warnings = [*(notes or []), *run_warnings(cfg, self.sampler.n_windows)]
            self.n_params = self.model.num_params()
            if self.main:
                check_room_for_a_checkpoint(ckpt.estimated_bytes(self.model), run.path)
                # train.log_to's trackers mirror every record; a resumed run's drop what came after its checkpoint
                self.trackers = make_sinks(cfg, run, self.state.step if resume_from is not None else None)
                self.metrics.sinks += self.trackers
        self.model.loss_impl = pick_loss(t.loss, self.device.type)
        self.train_model, self.no_sync = wrap_for_training(self.model, self.device, ddp=self.world > 1,
                                                           compiled=t.compile and self.device.type == "cuda")
        self.autocast = autocast_for(self.device, t.dtype)
        self.start_step = self.state.step
        self.prior_wall_s = self.state.wall_time_s  # the earlier processes' loop time (a checkpoint's); 0 if new
        self.wall_start = time.perf_counter()  # fit() sets it again as its loop starts
        self.interval = LogInterval(torch.zeros((), device=self.device))
        self.pending: list[torch.Tensor] = []  # per-step "loss and gradients finite" flags, on the device until read
        self.signal_flag: dict[str, Any] = {}  # stop_on_signals sets "signal"
        self.agreed_signal: str | None = None  # under torchrun: the signal the processes agreed on at the last settle
        self.last_eval: dict[str, Any] = {}
        self.writer = CheckpointWriter()  # rank 0's checkpoints, written in the background

    def resume(self, checkpoint: Path, rollback: bool) -> TrainState:
        """Load the weights, AdamW state and RNG states; trim the run's records to the checkpoint's step."""
        wait_for_pending_writes()  # a checkpoint this process is still writing is read whole
        saved = ckpt.load_checkpoint(checkpoint, self.model, self.optimizer)
        if saved.get("config_hash") not in (None, self.cfg.hash()):
            config, current = saved.get("config", {}), self.cfg.to_dict()
            differences = config_diff({k: config.get(k, {}) for k in ("model", "data")}, {k: current[k] for k in ("model", "data")})
            detail = f" ({', '.join(differences[:4])}, checkpoint vs run config)" if config and differences else ""
            raise TrainingError(f"checkpoint {checkpoint} was made with a different model or data config{detail}; resume the run it came from")
        state = TrainState.from_dict(saved)
        ckpt.set_rng_state(saved["rng"])
        if self.main:
            self.run.truncate_metrics(state.step)
            self.run.reopen_summary()
            if rollback:
                self.run.drop_checkpoints_after(state.step)
        if not checkpoint_files.is_complete(self.run.best_dir):  # best/ gone with the steps after it: the next eval writes one
            state.best_val_loss, state.best_step = math.inf, -1
        return state

    def fit(self) -> dict[str, Any]:
        t, state = self.cfg.train, self.state
        self.metrics.event("start", {"step": state.step, "steps": t.steps, "params": self.n_params, "device": str(self.device),
                                     "train_tokens": len(self.data.train), "val_tokens": len(self.data.val),
                                     "layer_types": "".join(self.cfg.model.layer_types()), "tokens": state.tokens,
                                     "warnings": self.warnings})
        self.model.train()
        self.interval.tick = self.wall_start = time.perf_counter()
        diverged: Diverged | None = None
        try:
            with stop_on_signals(self.signal_flag):
                try:
                    self.loop()
                except Diverged as e:  # the run ends here, as a result: finish() writes its summary, then raises it
                    diverged = e
                except torch.OutOfMemoryError:
                    raise dist.abandon_group(self.out_of_memory()) from None
            self.wait_for_checkpoints()  # the last writes count in the run's wall time, and precede summary.json
            return self.finish(time.perf_counter() - self.wall_start, diverged)
        finally:
            try:
                with self.checkpoint_errors():  # a run that ends by an error still finishes its writes
                    self.writer.close()
            finally:
                self.metrics.close()

    def loop(self) -> None:
        """Train to train.steps, logging, evaluating and saving on the way."""
        t, state = self.cfg.train, self.state
        while state.step < t.steps:
            lr, grad_norm = self.train_step()
            step = state.step
            self.metrics.event("step", {"step": step, "tokens": state.tokens})  # no device sync: a bar's tick
            is_log = step % t.log_every == 0 or step == t.steps or step == self.start_step + 1
            is_eval = step % t.eval_every == 0 or step == t.steps
            is_save = step % t.save_every == 0 or step == t.steps
            if is_log or is_eval or is_save or len(self.pending) >= MAX_PENDING_STEPS:
                self.settle()
                self.agree_on_signal()
            # An interval whose steps were all skipped has no loss to log; its time and tokens go to the next.
            if is_log and self.interval.steps:
                self.log(lr, grad_norm)
            if is_eval:
                self.last_eval = self.evaluate()
            if is_save:
                self.save()
            if is_eval or is_save:
                self.interval.tick = time.perf_counter()  # evaluating and saving are not training time
            self.stop_if_signalled(saved=is_save)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's rows of the step's global batch."""
        if self.world == 1:
            return self.sampler.batch(step, self.device)
        rows = self.cfg.train.batch_size // self.world  # this rank's contiguous slice of the global batch
        windows = self.sampler.window_indices(step)[dist.rank() * rows : (dist.rank() + 1) * rows]
        return windows_to_batch(self.sampler.tokens, windows, self.cfg.train.seq_len, self.device)

    def train_step(self) -> tuple[float, torch.Tensor]:
        """One optimizer step at state.step; its finiteness flag waits in `pending` for settle()."""
        t, state = self.cfg.train, self.state
        lr = state.schedule(state.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = self.batch(state.step)
        loss = forward_backward(self.train_model, x, y, self.micro, t.grad_accum, self.autocast, self.interval.aux_sums, self.no_sync)
        grad_norm, finite = optimizer_step(self.model, self.optimizer, loss, t.grad_clip)
        self.interval.loss += torch.where(finite, loss, 0.0)
        self.pending.append(finite)
        state.step += 1
        state.tokens += t.batch_size * t.seq_len
        self.interval.tokens += t.batch_size * t.seq_len
        return lr, grad_norm

    def settle(self) -> None:
        """Read the pending steps' finiteness flags (here, not every step: a host sync stalls the GPU), count the
        skipped steps and stop after train.max_bad_steps in a row, as if each step had been checked."""
        if not self.pending:
            return
        t, state = self.cfg.train, self.state
        for offset, ok in enumerate(torch.stack(self.pending).tolist()):
            if ok:
                state.bad_in_row = 0
                self.interval.steps += 1
                continue
            state.bad_in_row += 1
            state.skipped_steps += 1
            at = state.step - len(self.pending) + offset + 1
            self.metrics.event("skip", {"step": at, "in_row": state.bad_in_row})
            if state.bad_in_row >= t.max_bad_steps:
                raise dist.shared(divergence.too_many_bad_steps(state, at, t.lr))
        self.pending.clear()

    def log(self, lr: float, grad_norm: torch.Tensor) -> None:
        """Record the interval: mean loss over its finite steps (and the processes), throughput, auxiliary losses."""
        interval, state = self.interval, self.state
        loss_total, aux_totals = interval.loss, interval.aux_sums
        if self.world > 1:  # the mean over ranks: one collective per logged line, not one per step
            reduced = dist.all_reduce_mean(torch.stack([interval.loss, *interval.aux_sums.values()]))
            loss_total, aux_totals = reduced[0], dict(zip(interval.aux_sums, reduced[1:]))
        mean_loss = (loss_total / max(interval.steps, 1)).item()
        elapsed = time.perf_counter() - interval.tick
        if state.step > self.start_step + 1:  # the first step of a process includes compilation and autotuning
            state.train_time_s += elapsed
        record = {"step": state.step, "tokens": state.tokens, "loss": mean_loss, "lr": lr,
                  "grad_norm": float(grad_norm), "tok_s": interval.tokens / max(elapsed, 1e-9)}
        record.update({key: (value / max(interval.steps, 1)).item() for key, value in aux_totals.items()})
        self.metrics.record("log", record)
        interval.restart()

    def evaluate(self) -> dict[str, Any]:
        """Rank 0 alone evaluates (the weights are the same on every rank) and decides about best/, so no rank can
        disagree about a save; the others wait for it (and get an empty record)."""
        state, record = self.state, {}
        with dist.together():
            if self.main:
                metrics = evaluation.evaluate(self.model, self.data, self.cfg, self.device, self.eval_micro)
                record = {"step": state.step, "tokens": state.tokens, **metrics}
                if metrics["val_loss"] < state.best_val_loss:
                    state.best_val_loss, state.best_step = metrics["val_loss"], state.step
                    self.write_checkpoint(self.run.best_dir)
                self.metrics.record("eval", record)
        return record

    def save(self) -> None:
        with dist.together():  # the others wait for the snapshot (and learn if an earlier write failed)
            if self.main:
                path = self.run.checkpoints_dir / checkpoint_files.step_dir_name(self.state.step)
                keep = self.cfg.train.keep_checkpoints
                self.write_checkpoint(path, then=lambda: self.run.prune_checkpoints(keep))  # pruned once it is in place
                self.metrics.event("checkpoint", {"step": self.state.step, "path": str(path)})

    def write_checkpoint(self, path: Path, then: Callable[[], None] | None = None) -> None:
        """Snapshot the model and optimizer now; the writer writes them in the background, then runs `then`."""
        with self.checkpoint_errors():
            self.writer.save(path, self.model, self.optimizer, self.checkpoint_state(), version=self.state.step, then=then)

    def wait_for_checkpoints(self) -> None:
        """Until the checkpoints saved so far are on disk (under together(): a failed write stops every rank)."""
        with dist.together():
            if self.main:
                with self.checkpoint_errors():
                    self.writer.wait()

    def resume_command(self) -> str | None:
        """The command that continues this run from its newest checkpoint; None before one is saved."""
        if not self.run.step_checkpoints():
            return None
        return f"hybridctl resume {self.run.path}" + (f" --gpus {self.world}" if self.world > 1 else "")

    @contextlib.contextmanager
    def checkpoint_errors(self):
        try:
            yield
        except CheckpointError as e:  # e.g. the disk filled up: say how to carry on once there is room
            command = self.resume_command()
            then = f"continue with `{command}`" if command else "start the run again with --force"
            raise TrainingError(f"{e}; free some space, then {then}") from e

    def out_of_memory(self) -> TrainingError:
        """The error for a step that did not fit in GPU memory, saying how to split the batch (steps.py)."""
        if self.main:  # a checkpoint still being written counts: the advice may resume from it
            with self.checkpoint_errors():  # (no collective: the other ranks may be inside one)
                self.writer.wait()
        command = self.resume_command()
        then = f"continue with {command}" if command else "train it again with --force"
        return TrainingError(out_of_memory_advice(self.cfg, self.world, self.device, self.state.step + 1, then))

    def checkpoint_state(self) -> dict[str, Any]:
        """state.json's content: the TrainState and what it was trained with."""
        step = self.state.step
        if self.prior_wall_s is not None:  # a run resumed later, even from a process stopped by a time limit, adds on
            self.state.wall_time_s = self.prior_wall_s + time.perf_counter() - self.wall_start
        return {**self.state.to_dict(), "config_hash": self.cfg.hash(),
                "data": {"sampler": "epoch-permutation", "position": step, "epoch": self.sampler.epoch_of(step)},
                "world_size": self.world, "config": self.cfg.to_dict()}

    def note_closed_output(self) -> None:
        """The callback's output gone (`hybridctl train ... 2>&1 | head`): stop as after SIGTERM, with SIGPIPE's
        exit code. A run that went on would show nothing, and hold the shell, which waits for a whole pipeline."""
        if self.metrics.output_closed() and not self.signal_flag.get("signal"):
            self.signal_flag["signal"] = "SIGPIPE"

    def agree_on_signal(self) -> None:
        """Under torchrun every process stops after the same step when torchrun passes a signal on."""
        if self.world == 1:
            return
        self.note_closed_output()  # process 0's: the one that prints
        caught = self.signal_flag.get("signal")
        signum = float(signal.Signals[caught]) if caught else 0.0
        agreed = int(dist.all_reduce_max(torch.tensor([signum], device=self.device)).item())
        self.agreed_signal = signal.Signals(agreed).name if agreed else None

    def stop_if_signalled(self, saved: bool) -> None:
        """After SIGINT or SIGTERM, or once the output is closed: save this step (unless just saved) and stop, with
        the shell's exit code (130 for Ctrl-C, 141 for a closed pipe). At the last step the run simply finishes."""
        if self.world == 1:
            self.note_closed_output()
        caught = self.signal_flag.get("signal") if self.world == 1 else self.agreed_signal
        if not caught or self.state.step >= self.cfg.train.steps:
            return
        self.settle()
        if not saved:
            self.save()
        self.wait_for_checkpoints()  # "checkpoint saved" is said once it is
        how = "because its output was closed" if caught == "SIGPIPE" else f"by {caught}"
        stopped = TrainingError(
            f"stopped {how} at step {self.state.step}; checkpoint saved, continue with `{self.resume_command()}`",
        )
        stopped.exit_code = 128 + signal.Signals[caught]  # 130, 143, or 141 (streams.EXIT_PIPE) for SIGPIPE
        raise dist.shared(stopped)

    def finish(self, wall: float, diverged: Diverged | None = None) -> dict[str, Any]:
        """Write summary.json (rank 0) and report the end; `wall`: this process's seconds in the loop. A run that
        diverged (`diverged`, or a last validation loss that is not finite) is recorded as such, then raised."""
        t = self.cfg.train
        if diverged is None and self.main:
            diverged = divergence.diverged_at_the_end(self.last_eval, self.state, t.lr)
        timed_tokens = (self.state.step - self.start_step - 1) * t.batch_size * t.seq_len
        summary = build_summary(self.cfg, self.run, self.state, self.n_params, self.last_eval, timed_tokens,
                                wall, self.prior_wall_s, self.device, self.world)
        summary["warnings"] = list(self.warnings)
        if diverged is not None:
            summary.update(status="diverged", diverged_at=diverged.step)
        for tracker in self.trackers:  # summary.json's numbers too (metrics.jsonl holds no summary)
            tracker.log(summary, "summary")
        self.metrics.event("end", summary)
        with dist.together():  # rank 0's verdict alone, or every rank's when they stopped together: all stop
            if self.main:
                self.run.write_summary(summary)
            if diverged is not None:
                raise diverged
        return summary


def train(cfg: Config, run: RunDir, resume_from: Path | None = None, extend_steps: int = 0,
          callback: Callback | None = None, data: TokenData | None = None, rollback: bool = False,
          notes: list[str] | None = None) -> dict[str, Any]:
    """Train (or resume) the run; returns the summary that is also written to summary.json. With `rollback`, the
    checkpoints and best/ saved after `resume_from` are deleted once it has loaded (resume --from ... --force).
    `notes`: warnings of the command's own, reported at the start and kept in the summary with run_warnings'.

    Under torchrun every process calls this (after distributed.init, which the train and resume commands do);
    rank 0 alone writes into the run folder and calls `callback`.
    """
    return Trainer(cfg, run, resume_from, extend_steps, callback, data, rollback, notes).fit()
