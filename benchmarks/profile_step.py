"""Where the time of a training step goes on a CUDA GPU: kernel time per step by category (matmul, attention,
Gated DeltaNet kernels, compiled elementwise, optimizer, ...), the top kernels, and GPU idle time: in all, and
between kernels by the gaps' size.

    python benchmarks/profile_step.py --preset hybrid_sparse [--set train.compile=false] [--steps 5] [--top 40]
                                      [--json FILE]

The step is the one `hybridctl bench speed` times (forward, backward, clipping, AdamW) on random tokens at the
preset's shape; the first steps (compilation, autotuning) are run before profiling starts.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from hybridctl.core.lab.speed import benchmark_step, speed_configs

# Kernel name fragments -> category, first match wins. Inductor names its kernels triton_poi/red/per/tem_...;
# flash-linear-attention's Triton kernels and the project's own (gdn_kernels.py, fused_loss.py, swiglu.py, rope.py)
# keep their Python function names.
CATEGORIES = [
    ("optimizer", ("multi_tensor_apply", "fused_adam", "_fused_adamw")),
    ("attention", ("flash", "fmha", "attention")),
    ("matmul", ("gemm", "nvjet", "sm90_xmma", "cutlass", "cublas", "triton_tem_", "splitkreduce")),
    ("compiled", ("triton_",)),
    ("gdn (project)", ("_short_conv", "_gated_norm")),
    ("loss, mlp, rope (project)", ("_softmax_grad", "_swiglu_", "_rotary_")),
    ("gdn (fla)", ("chunk_", "recompute_w_u", "solve_tril", "merge_16x16", "l2norm", "causal_conv1d", "gdn_gate",
                   "prepare_wy", "layer_norm", "rms_norm", "fused_beta", "wy_")),
    ("copy", ("memcpy", "memset", "copy_kernel", "CatArrayBatched")),
    ("reduce", ("reduce_kernel",)),
    ("elementwise", ("elementwise", "vectorized", "unrolled")),
]


def category(name: str) -> str:
    lowered = name.lower()
    for cat, fragments in CATEGORIES:
        if any(f.lower() in lowered for f in fragments):
            return cat
    return "other"


def kernel_times(prof, steps: int) -> dict[str, list[float]]:
    """Kernel name -> [ms per step, calls per step] from a profile of `steps` steps."""
    kernels: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[event.name]
            k[0] += event.device_time / 1000 / steps
            k[1] += 1 / steps
    return dict(kernels)


GAP_SIZES = [(1, "<1 us"), (2, "1-2 us"), (4, "2-4 us"), (10, "4-10 us"), (100, "10-100 us"),
             (float("inf"), ">=100 us")]  # (upper bound in µs, label)


def launch_gaps(kernels: list[tuple[float, float, str]], steps: int, largest: int = 10) -> dict:
    """Where the GPU idles between kernels, from each kernel's (start, end, name), times in µs: per step, the
    launches, the time during which no kernel runs (kernels on other streams overlap) in all and by the gaps'
    size, and the largest gaps with the kernel that ended last before each and the one that starts it."""
    ordered = sorted(kernels)
    gaps = []
    busy_until, last = (ordered[0][1], ordered[0][2]) if ordered else (0.0, "")
    for start, end, name in ordered[1:]:
        gaps.append((start - busy_until, last, name))
        if end > busy_until:
            busy_until, last = end, name
    by_size = {label: {"gaps": 0.0, "ms": 0.0} for _, label in GAP_SIZES}
    for gap, _, _ in gaps:
        if gap > 0:
            bucket = by_size[next(label for bound, label in GAP_SIZES if gap < bound)]
            bucket["gaps"] += 1 / steps
            bucket["ms"] += gap / 1000 / steps
    return {
        "launches_per_step": len(ordered) / steps,
        "idle_ms_per_step": sum(max(gap, 0.0) for gap, _, _ in gaps) / 1000 / steps,
        "by_size": by_size,
        "largest": [{"us": gap, "after": prev[:90], "before": nxt[:90]}
                    for gap, prev, nxt in sorted(gaps, key=lambda item: -item[0])[:largest]],
    }


def profiled_kernel_times(fn, steps: int) -> dict[str, list[float]]:
    """kernel_times of `steps` calls of fn under the profiler."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    return kernel_times(prof, steps)


def kernel_ms(fn, steps: int = 10, warmup: int = 5, name: str = "") -> float:
    """GPU time of fn's kernels per call (those whose names contain `name`): the sum of their durations, so the
    host's time between launches (which a compiled model hides behind the GPU's work, but a lone eager call of a
    small op does not) is left out."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return sum(ms for kernel, (ms, _) in profiled_kernel_times(fn, steps).items() if name in kernel)


def profile_preset(cfg, steps: int, warmup: int, top: int = 40) -> dict:
    t = cfg.train
    _, step = benchmark_step(cfg, torch.device("cuda"))
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) / steps
    kernels = kernel_times(prof, steps)
    gaps = launch_gaps([(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                        if e.device_type == torch.autograd.DeviceType.CUDA], steps)
    by_category: dict[str, float] = collections.defaultdict(float)
    for name, (ms, _) in kernels.items():
        by_category[category(name)] += ms
    busy = sum(by_category.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "name": cfg.name, "compile": t.compile, "loss": t.loss, "warmup_s": warmup_s, "step_ms": 1000 * wall,
        "tok_s": t.batch_size * t.seq_len / wall, "kernel_ms": busy, "idle_ms": 1000 * wall - busy,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "categories": dict(sorted(by_category.items(), key=lambda kv: -kv[1])), "gaps": gaps,
        "top": [{"name": n[:110], "ms": ms, "calls": calls, "category": category(n)} for n, (ms, calls) in top],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", action="append", default=[], help="Preset(s), comma-separated or repeated.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="Override, e.g. train.compile=false.")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=40, help="Kernels listed in the JSON, the longest first.")
    parser.add_argument("--json", help="Write the full results here.")
    args = parser.parse_args()
    names = [p for item in args.preset or ["hybrid_sparse"] for p in item.split(",") if p]
    results = []
    for cfg in speed_configs(names, [], args.overrides):
        torch.cuda.reset_peak_memory_stats()
        r = profile_preset(cfg, args.steps, args.warmup, args.top)
        results.append(r)
        print(f"\n== {r['name']} (compile={r['compile']}, loss={r['loss']}): {r['step_ms']:.1f} ms/step, {r['tok_s'] / 1e3:.0f}K tok/s, "
              f"kernels {r['kernel_ms']:.1f} ms, idle {r['idle_ms']:.1f} ms, peak {r['peak_gib']:.1f} GiB, "
              f"warm-up {r['warmup_s']:.0f} s")
        for cat, ms in r["categories"].items():
            print(f"  {cat:<26} {ms:8.2f} ms  {100 * ms / r['kernel_ms']:5.1f}%")
        gaps = r["gaps"]
        print(f"  {gaps['launches_per_step']:.0f} launches per step; idle between kernels "
              f"{gaps['idle_ms_per_step']:.2f} ms: " + ", ".join(
                  f"{size} {b['gaps']:.0f} x ({b['ms']:.2f} ms)" for size, b in gaps["by_size"].items() if b["gaps"]))
        print("  top kernels (ms/step, calls/step):")
        for k in r["top"][:25]:
            print(f"    {k['ms']:7.2f} {k['calls']:5.0f}  [{k['category']}] {k['name']}")
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
