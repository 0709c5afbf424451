"""The decoding benchmark: prefill time, decoding tok/s and the memory that caches and states hold, per architecture,
context length and batch size, on untrained weights.

Each shape: a random prompt of `context` tokens per row goes through the prefill (parallel passes, chunked
recurrence) twice, untimed then timed (the first compiles and autotunes the kernels for its pass shapes), then
`warmup` untimed and `steps` timed decoding steps run, each feeding back the argmax (no host sync). On CUDA the
steps are replayed from a CUDA graph where the model allows (GraphedStep; its capture is untimed), as `generate`
decodes; `cuda_graph=False` times the eager step.
Contexts may exceed the preset's train.seq_len: RoPE's tables are made for any position, and untrained weights
have nothing to lose there, so the speed and memory are those of a model trained that long.
"""

from __future__ import annotations

import copy
import gc
import time
from pathlib import Path
from typing import Any, Callable

import torch

from hybridctl.core.config import Config, ModelConfig
from hybridctl.core.errors import ConfigError
from hybridctl.core.lab.generate import PREFILL_TOKENS, cast_for_inference, prefill, synchronize
from hybridctl.core.lab.speed import device_name
from hybridctl.core.lab.trained_model import BENCH_DIR, write_json
from hybridctl.core.model.graphed_step import GraphedStep, graph_capacity
from hybridctl.core.model.hybrid_lm import build_model, can_step_at
from hybridctl.core.training.runs import ensure_new_file
from hybridctl.core.training.steps import resolve_device

DEFAULT_CONTEXTS = [1024, 4096, 16384, 32768]
DEFAULT_BATCHES = [1, 32]


def cache_nbytes(cfg: ModelConfig, batch_size: int, capacity: int, dtype: torch.dtype) -> int:
    """Bytes the decoding cache of this model takes at `capacity` positions: what `ModelCache.nbytes` measures
    once every layer has seen its first tokens (Gated DeltaNet's recurrent state is fp32; the rest in dtype)."""
    size = torch.empty((), dtype=dtype).element_size()
    g = cfg.gdn
    key_dim, value_dim = g.num_heads * g.head_dim, g.num_heads * int(g.head_dim * g.expand_v)
    window = cfg.attention.window
    slots = min(window, capacity) if window else capacity
    total = 0
    for kind in cfg.layer_types():
        if kind == "L":
            total += batch_size * (g.conv_size - 1) * (2 * key_dim + value_dim) * size
            total += batch_size * key_dim * int(g.head_dim * g.expand_v) * 4
        else:
            total += 2 * batch_size * slots * cfg.d_model * size
            if kind == "D":
                total += batch_size * slots * cfg.dsa.indexer_dim * size
    return total


def measure_decode(cfg: Config, context: int, batch_size: int, device: torch.device, dtype: torch.dtype,
                   steps: int = 32, warmup: int = 4, max_memory: float | None = None,
                   prefill_tokens: int = PREFILL_TOKENS, cuda_graph: bool = True) -> dict[str, Any]:
    """One row: prefill seconds, decoding tok/s, cache bytes (measured from the tensors) and peak CUDA memory.
    A shape whose cache would pass max_memory bytes, or that does not fit on the GPU, gives a row with an error.
    Steps are replayed from a CUDA graph where the model allows it (GraphedStep), unless cuda_graph is off."""
    graphed = cuda_graph and device.type == "cuda" and can_step_at(cfg.model)
    capacity = graph_capacity(context + warmup + steps) if graphed else context + warmup + steps
    row: dict[str, Any] = {"name": cfg.name, "layer_types": "".join(cfg.model.layer_types()), "context": context,
                           "batch_size": batch_size, "steps": steps, "warmup": warmup, "cuda_graph": graphed,
                           "cache_bytes_expected": cache_nbytes(cfg.model, batch_size, capacity, dtype)}
    if max_memory is not None and row["cache_bytes_expected"] > max_memory:
        return {**row, "error": "over --max-memory"}
    try:
        row.update(_timed_decode(cfg, context, batch_size, device, dtype, steps, warmup, prefill_tokens, capacity,
                                 graphed), error=None)
    except torch.OutOfMemoryError:
        row.update(error="out of memory")
    gc.collect()  # the model and its cache are gone with _timed_decode's frame; give their memory back
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


@torch.inference_mode()
def _timed_decode(cfg: Config, context: int, batch_size: int, device: torch.device, dtype: torch.dtype,
                  steps: int, warmup: int, prefill_tokens: int, capacity: int, graphed: bool) -> dict[str, Any]:
    torch.manual_seed(cfg.train.seed)
    model = cast_for_inference(build_model(cfg.model).to(device), dtype).eval()
    prompt = torch.randint(0, cfg.model.vocab_size, (batch_size, context), device=device)
    # Untimed: the same prompt in the same passes, and a step, compile (and autotune) the kernels timed below.
    # Triton autotunes per pass shape, so a shorter warm-up prompt left seconds of tuning inside the timed prefill.
    warm = model.new_cache(context + 1)
    logits = prefill(model, prompt, warm, prefill_tokens)
    model.forward_cached(logits[:, -1].argmax(-1, keepdim=True), warm)
    del warm, logits
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cache = model.new_cache(capacity)
    synchronize(device)
    start = time.perf_counter()
    logits = prefill(model, prompt, cache, prefill_tokens)
    token = logits[:, -1].argmax(-1, keepdim=True)
    synchronize(device)
    prefill_seconds = time.perf_counter() - start
    step = GraphedStep(model, cache, batch_size) if graphed else lambda t: model.forward_cached(t, cache)
    for _ in range(warmup):
        token = step(token)[:, -1].argmax(-1, keepdim=True)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        token = step(token)[:, -1].argmax(-1, keepdim=True)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "params": model.num_params(), "prefill_seconds": prefill_seconds,
        "prefill_tok_s": batch_size * context / prefill_seconds, "decode_seconds": seconds,
        "step_ms": 1000 * seconds / steps, "decode_tok_s": batch_size * steps / seconds,
        "cache_bytes": cache.nbytes(),
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }


def check_decode_counts(contexts: list[int], batches: list[int], steps: int, warmup: int,
                        max_memory: float | None) -> None:
    if steps < 1 or warmup < 0 or any(v < 1 for v in [*contexts, *batches]):
        raise ConfigError("--steps, --context and --batch must be >= 1 and --warmup >= 0")
    if max_memory is not None and max_memory <= 0:
        raise ConfigError(f"--max-memory must be a positive number of GiB, got {max_memory / 2**30:g}")


def bench_decode(configs: list[Config], contexts: list[int], batches: list[int], steps: int = 32, warmup: int = 4,
                 dtype: str = "auto", max_memory: float | None = None, path: Path | None = None, force: bool = False,
                 on_start: Callable[[str, int, int], None] | None = None,
                 prefill_tokens: int = PREFILL_TOKENS, cuda_graph: bool = True) -> dict[str, Any]:
    """Measure every architecture at every context and batch size on the first config's train.device; write the
    report to `path` after each shape (checked before measuring) and return it with its path."""
    from hybridctl.core.lab.generate import inference_dtype

    contexts, batches = contexts or DEFAULT_CONTEXTS, batches or DEFAULT_BATCHES
    check_decode_counts(contexts, batches, steps, warmup, max_memory)
    if path is not None:
        ensure_new_file(path, force)
    device = resolve_device(configs[0].train.device)
    torch_dtype = inference_dtype(dtype, device)
    plan = [(cfg, context, batch) for cfg in configs for context in contexts for batch in batches]
    rows: list[dict[str, Any]] = []
    report: dict[str, Any] = {}
    for cfg, context, batch in plan:
        if on_start is not None:
            on_start(cfg.name, context, batch)
        rows.append(measure_decode(copy.deepcopy(cfg), context, batch, device, torch_dtype, steps, warmup,
                                   max_memory, prefill_tokens, cuda_graph))
        report = decode_report(rows, device, torch_dtype, prefill_tokens, complete=len(rows) == len(plan))
        if path is not None:  # after every shape: a run stopped part-way keeps what it measured
            write_json(path, report, force=True)
    return {**report, "path": str(path) if path else None}


def decode_report(rows: list[dict[str, Any]], device: torch.device, dtype: torch.dtype, prefill_tokens: int,
                  complete: bool = True) -> dict[str, Any]:
    return {
        "task": "decode",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "complete": complete,
        "device": device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "prefill_tokens_per_pass": prefill_tokens,
        "memory": "cache_bytes: every cache and state tensor (KV caches allocated for context + warmup + steps "
                  "positions, rounded up to 64 for a CUDA graph); peak_memory_bytes: torch.cuda.max_memory_allocated (weights, cache, activations)",
        "results": rows,
    }


def default_decode_path(out: Path) -> Path:
    """OUT/bench/decode-<time>.json, or -2, -3 ... after it when taken."""
    base = Path(out) / BENCH_DIR / f"decode-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base.with_suffix(".json"), 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}.json")
    return path

