"""Linear + cross-entropy on a CUDA GPU: forward + backward time and peak memory of each train.loss.

    python benchmarks/loss.py [--tokens 49152] [--d-model 768] [--vocab 49152] [--sweep] [--json FILE]

Times (CUDA events, median of repeats, bf16 autocast, h in fp32 as the final norm gives it under autocast):
- plain (the full logits, then F.cross_entropy), eager and under torch.compile (as the trainer compiles it);
- chunked (the PyTorch chunked loss);
- fused (fused_loss.py) at several chunk sizes;
- with --sweep, fused_loss's kernel alone at several block sizes and warp counts, to choose its defaults.
Peak memory is what one forward + backward allocates above its inputs.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from hybridctl.core.kernels import fused_loss
from hybridctl.core.model.hybrid_lm import linear_cross_entropy


def plain_loss(h, weight, targets):
    logits = h @ weight.t()
    return F.cross_entropy(logits.float(), targets)


def measure(loss_fn, h, weight, targets) -> dict[str, float]:
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(h, weight, targets)
        loss.backward()

    step()  # compile, autotune
    torch.cuda.synchronize()
    h.grad = weight.grad = None
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return {"ms": float(do_bench(step, warmup=5, rep=40)), "peak_gib": peak}


def kernel_sweep(args) -> dict[str, float]:
    rows = fused_loss.CHUNK_TOKENS
    logits = torch.randn(rows, args.vocab, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, args.vocab, (rows,), device="cuda")
    out = {}
    for block in (2048, 4096, 8192, 16384, 32768):
        for warps in (4, 8, 16, 32):
            work = logits.clone()
            t = float(do_bench(lambda: fused_loss.softmax_grad_(work, targets, 1.0, block, warps), warmup=5, rep=40))
            out[f"kernel block={block} warps={warps}"] = t
            print(f"kernel block {block:5d} warps {warps:2d}: {t:.3f} ms  "
                  f"({3 * logits.numel() * 2 / t / 1e6:.0f} GB/s for 2 reads + 1 write)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=49152)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    torch.manual_seed(0)
    h = torch.randn(args.tokens, args.d_model, device="cuda", requires_grad=True)
    weight = (torch.randn(args.vocab, args.d_model, device="cuda") * 0.02).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.tokens,), device="cuda")

    variants = {
        "plain, eager": plain_loss,
        "plain, compiled": torch.compile(plain_loss),
        "chunked (8192)": lambda h, w, t: linear_cross_entropy(h, w, t, 8192),
    }
    for chunk in (8192, 16384, 24576, args.tokens):
        variants[f"fused ({chunk})"] = lambda h, w, t, c=chunk: fused_loss.fused_linear_cross_entropy(h, w, t, c)
    results = {}
    for name, fn in variants.items():
        results[name] = measure(fn, h, weight, targets)
        print(f"{name:18s} {results[name]['ms']:7.2f} ms  peak {results[name]['peak_gib']:5.2f} GiB")
    if args.sweep:
        results.update(kernel_sweep(args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
