"""The training-step speed benchmark: tok/s, MFU (flops.py) and peak memory for presets and layer patterns
across sequence lengths and batch sizes, on one GPU or several.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from hybridctl.core.training import distributed as dist
from hybridctl.core.config import DEFAULT_VOCAB, Config, load_config
from hybridctl.core.data.tokenizer import get_tokenizer
from hybridctl.core.errors import ConfigError, HybridctlError
from hybridctl.core.presets import layout_label, layout_overrides
from hybridctl.core.model.hybrid_lm import HybridLM, build_model, pick_loss
from hybridctl.core.training.runs import ensure_new_file
from hybridctl.core.training.steps import (autocast_for, build_optimizer, compile_model, forward_backward, micro_batch_size,
                                          optimizer_step, resolve_device, wrap_for_training)
from hybridctl.core.lab.trained_model import BENCH_DIR, write_json
from hybridctl.core.lab.flops import flops_per_token, peak_bf16_tflops


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_rss() -> bool:
    """Start a new peak-RSS measurement: Linux resets this process's high-water mark (VmHWM) to its current
    resident memory when "5" is written to /proc/self/clear_refs. False where that cannot be done. The C allocator
    first gives back the memory it holds free (glibc's malloc_trim), which an earlier shape would leave counted."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes(since_reset: bool = False) -> int | None:
    """Peak resident memory of this process: since reset_peak_rss() (VmHWM) if `since_reset`, else since it
    started (every architecture measured before included)."""
    if since_reset:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"




def speed_configs(presets: list[str], layouts: list[str], overrides: list[str], vocab: int | None = None) -> list[Config]:
    """One config per architecture: each preset, or one preset with each layer layout (a pattern of L / F / D
    letters, or attention layer indices; core/presets.py parse_layouts).

    The vocabulary is `vocab` if given, else the config's model.vocab_size, else the byte tokenizer's size for
    `bytes`, else DEFAULT_VOCAB, so no tokenizer or data is loaded."""
    if vocab is not None and vocab < 2:
        raise ConfigError(f"--vocab must be at least 2, got {vocab}")
    if layouts and len(presets) > 1:
        raise ConfigError(f"--patterns applies to one preset, got {len(presets)} ({', '.join(presets)}); pass a single --preset")
    configs = []
    for preset in presets:
        for layout in layouts or [None]:
            extra = layout_overrides(layout) if layout is not None else []
            cfg = load_config(preset, list(overrides) + extra)
            if layout is not None:
                cfg.name = layout_label(layout)
            if vocab is not None:
                cfg.model.vocab_size = vocab
            elif cfg.model.vocab_size == 0:
                cfg.model.vocab_size = get_tokenizer("bytes").vocab_size if cfg.data.tokenizer == "bytes" else DEFAULT_VOCAB
            configs.append(cfg)
    return configs


def measure_speed(cfg: Config, seq_len: int, batch_size: int, device: torch.device, steps: int = 10,
                  warmup: int = 3, forward_only: bool = False) -> dict[str, Any]:
    """Time `steps` training steps (or forward passes) of the config's model on random tokens after `warmup`
    untimed ones; a shape that does not fit in GPU memory gives a row with error "out of memory"."""
    cfg = copy.deepcopy(cfg)
    cfg.train.seq_len, cfg.train.batch_size = seq_len, batch_size
    row: dict[str, Any] = {"name": cfg.name, "layer_types": "".join(cfg.model.layer_types()), "seq_len": seq_len,
                           "batch_size": batch_size, "tokens_per_step": seq_len * batch_size,
                           "mode": "forward" if forward_only else "train", "steps": steps, "warmup": warmup}
    try:
        row.update(_timed_steps(cfg, device, steps, warmup, forward_only), error=None)
    except torch.OutOfMemoryError:
        if dist.active():  # no row: the other processes may be waiting in a collective, so all of them stop
            raise dist.abandon_group(ConfigError(
                f"out of memory in process {dist.rank()} at seq {seq_len}, batch {batch_size} over {dist.world_size()} "
                "processes; lower --batch or --seq")) from None
        row.update(tok_s=None, mfu=None, error="out of memory")
    gc.collect()  # the model and optimizer are gone with _timed_steps' frame; give their memory back
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def benchmark_step(cfg: Config, device: torch.device, forward_only: bool = False, ddp: bool | None = None
                   ) -> tuple[HybridLM, Callable[[], None]]:
    """The config's model on random tokens and one step of it: the trainer's training step (forward and loss under
    its autocast per micro-batch, backward, gradient clipping, AdamW step skipped on the device if the loss or
    gradients are not finite: no host sync, as in the trainer, which reads those flags at log steps), or an
    inference forward pass. Under several processes each takes its share of the global batch, as in training,
    and trains under DDP (`ddp` forces the wrapper, e.g. for a one-process group). Used by `bench speed` and
    benchmarks/profile_step.py."""
    t = cfg.train
    world = dist.world_size()
    micro = micro_batch_size(cfg, world)
    torch.manual_seed(t.seed)  # the same weights in every process
    model = build_model(cfg.model).to(device)
    model.loss_impl = pick_loss(t.loss, device.type)
    generator = torch.Generator(device).manual_seed(t.seed + dist.rank())  # each process its own tokens
    tokens = torch.randint(0, cfg.model.vocab_size, (t.batch_size // world, t.seq_len + 1), device=device,
                           generator=generator)
    x, y = tokens[:, :-1], tokens[:, 1:]
    autocast = autocast_for(device, t.dtype)
    compiled = t.compile and device.type == "cuda"
    if forward_only:
        model.eval()
        step_model = compile_model(model) if compiled else model

        def step():
            with torch.inference_mode(), autocast:
                step_model(x)
    else:
        step_model, no_sync = wrap_for_training(model, device, compiled, dist.active() if ddp is None else ddp)
        optimizer = build_optimizer(model, cfg, device)
        model.train()

        def step():
            loss = forward_backward(step_model, x, y, micro, t.grad_accum, autocast, no_sync=no_sync)
            optimizer_step(model, optimizer, loss, t.grad_clip)

    return model, step


def _timed_steps(cfg: Config, device: torch.device, steps: int, warmup: int, forward_only: bool) -> dict[str, Any]:
    """Times the steps of every process together: each starts after all have warmed up, and the slowest one's
    time counts. tok/s is for the global batch; MFU is per GPU, and peak memory the largest of any process."""
    t = cfg.train
    world = dist.world_size()
    model, step = benchmark_step(cfg, device, forward_only)
    flops = flops_per_token(model, t.seq_len)
    flops_per_step_token = flops["forward" if forward_only else "train"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_reset = device.type == "cpu" and reset_peak_rss()  # each shape its own peak, as on CUDA
    for _ in range(warmup):
        step()
    synchronize(device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = time.perf_counter() - start
    peak_memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    rss = peak_rss_bytes(rss_reset) if device.type == "cpu" else None
    seconds = dist.max_over_ranks(seconds)
    peak_memory, rss = (None if v is None else int(dist.max_over_ranks(v)) for v in (peak_memory, rss))
    tok_s = steps * t.batch_size * t.seq_len / seconds
    achieved = tok_s * flops_per_step_token
    peak = peak_bf16_tflops(device_name(device)) if device.type == "cuda" else None
    return {
        "params": model.num_params(), "non_embedding_params": model.num_params(non_embedding=True),
        "flops_per_token": flops_per_step_token, "flops_breakdown": flops,
        "seconds": seconds, "step_ms": 1000 * seconds / steps, "tok_s": tok_s, "tflops": achieved / 1e12,
        "mfu": achieved / (peak * 1e12 * world) if peak else None,
        "peak_memory_bytes": peak_memory, "rss_bytes": rss,
        "rss_scope": None if rss is None else ("shape" if rss_reset else "process"),
    }


def speed_shapes(cfg: Config, seqs: list[int], batches: list[int], tokens_per_step: int | None) -> list[tuple[int, int]]:
    """(seq_len, batch_size) pairs to measure: each seq with each batch, or with batch = tokens_per_step // seq."""
    if tokens_per_step is not None and batches:
        raise ConfigError("pass either --batch or --tokens-per-step, not both")
    shapes = []
    for seq in seqs or [cfg.train.seq_len]:
        if tokens_per_step is not None:
            if tokens_per_step < seq:
                raise ConfigError(f"--tokens-per-step {tokens_per_step} is less than one sequence of {seq}; raise it or drop that --seq")
            shapes.append((seq, tokens_per_step // seq))
        else:
            shapes += [(seq, batch) for batch in batches or [cfg.train.batch_size]]
    return shapes


def check_speed_counts(steps: int, warmup: int, seqs: list[int], batches: list[int], tokens_per_step: int | None) -> None:
    if steps < 1 or warmup < 0 or any(v < 1 for v in [*seqs, *batches, tokens_per_step or 1]):
        raise ConfigError("--steps, --seq, --batch and --tokens-per-step must be >= 1 and --warmup >= 0")


def speed_plan(configs: list[Config], seqs: list[int], batches: list[int], tokens_per_step: int | None,
               world: int = 1) -> list[tuple[Config, int, int]]:
    """(config, seq_len, batch_size) for every architecture at every shape, each batch checked to split evenly
    over `world` processes and their train.grad_accum micro-batches."""
    plan = []
    for cfg in configs:
        for seq, batch in speed_shapes(cfg, seqs, batches, tokens_per_step):
            parts = world * cfg.train.grad_accum
            if batch % parts:
                raise ConfigError(
                    f"batch {batch} ({cfg.name}, seq {seq}) does not split over {world} processes x train.grad_accum "
                    f"({cfg.train.grad_accum}); pass --batch with a multiple of {parts}")
            plan.append((cfg, seq, batch))
    return plan


def bench_speed(configs: list[Config], seqs: list[int], batches: list[int], tokens_per_step: int | None = None,
                steps: int = 10, warmup: int = 3, forward_only: bool = False, path: Path | None = None,
                force: bool = False, on_start: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Measure every architecture at every shape on the first config's train.device; write the report to `path`
    (checked before measuring) and return it with its path. Under torchrun every process measures its share of
    each batch together with the others, and process 0 writes the report."""
    try:  # every process finds the same problem here; process 0 alone prints it
        check_speed_counts(steps, warmup, seqs, batches, tokens_per_step)
        plan = speed_plan(configs, seqs, batches, tokens_per_step, dist.world_size())
        if path is not None:
            ensure_new_file(path, force)
        device = resolve_device(configs[0].train.device)
    except HybridctlError as error:
        raise dist.shared(error) from None
    rows = []
    for cfg, seq, batch in plan:
        if on_start is not None:
            on_start(cfg.name, seq, batch)
        rows.append(measure_speed(cfg, seq, batch, device, steps, warmup, forward_only))
        report = speed_report(rows, device, forward_only, complete=len(rows) == len(plan))
        if path is not None and dist.is_main():  # after every shape: a run stopped part-way keeps what it measured
            write_json(path, report, force=True)
    return {**report, "path": str(path) if path else None}


def speed_report(rows: list[dict[str, Any]], device: torch.device, forward_only: bool,
                 complete: bool = True) -> dict[str, Any]:
    """complete: every planned shape is in rows (false in the file of a run stopped part-way)."""
    name = device_name(device)
    return {
        "task": "speed",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "complete": complete,
        "device": name,
        "processes": dist.world_size(),  # one per GPU on CUDA; tok/s is for all of them, MFU per GPU
        "peak_bf16_tflops": peak_bf16_tflops(name) if device.type == "cuda" else None,
        "mode": "forward" if forward_only else "train",
        "torch": torch.__version__,
        "memory": "peak_memory_bytes (CUDA): torch.cuda.max_memory_allocated while the shape ran; rss_bytes (CPU): "
                  "the process's peak resident memory while the shape ran (rss_scope 'shape', Linux) or since it "
                  "started (rss_scope 'process', where the peak cannot be reset)",
        "flops": "train = 3 * forward; forward = 2 * matmul params + 2 * V_pad * d + causal attention "
                 "4 * d * (T + 1) / 2 per F layer + Gated DeltaNet chunk matmuls and solve per L layer "
                 "(hybridctl/core/lab/flops.py)",
        "results": rows,
    }


def default_speed_path(out: Path) -> Path:
    base = Path(out) / BENCH_DIR / f"speed-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base.with_suffix(".json"), 1
    while path.exists():  # two runs in one second never share a file
        n += 1
        path = base.with_name(f"{base.name}-{n}.json")
    return path
