"""Causal attention on a CUDA GPU: forward + backward time of each PyTorch SDPA backend at one shape, and of the
rotary embedding that makes q, k and v out of the fused projection (compiled PyTorch against rope.py's kernel).

    python benchmarks/attention.py [--batch 48] [--seq 1024] [--heads 12] [--head-dim 64] [--json FILE]

q, k and v are laid out as the model makes them (one [B, T, 3, H, D] projection, permuted to [B, H, T, D]). TFLOP/s
counts 7 causal T x T x D matmuls (2 forward, 5 backward) per head. Attention is timed with CUDA events (median
of repeats); the rotary embedding by the GPU time of its kernels (profiler), since a lone eager call of the custom
op spends more time on the host than its kernels take, which a compiled model hides.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from hybridctl.core.model.attention import Rotary
from profile_step import kernel_ms  # benchmarks/ is on the path when this script runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    B, T, H, D = args.batch, args.seq, args.heads, args.head_dim
    qkv = torch.randn(B, T, 3, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    flops = 7 * B * H * T * T * D  # 2 * T * T * D per matmul, halved by the causal mask
    results = {}
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        def step():
            with sdpa_kernel([backend]):
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y.backward(torch.ones_like(y))

        try:
            t = float(do_bench(step, warmup=5, rep=40))
        except RuntimeError as e:  # backend not available for this shape or build
            print(f"{backend.name}: unavailable ({str(e).splitlines()[0][:100]})")
            continue
        results[backend.name] = t
        print(f"{backend.name:20s} {t:7.3f} ms  {flops / t / 1e9:6.0f} TFLOP/s")

    rotary = Rotary(D).cuda()
    flat = qkv.detach().view(B, T, 3 * H * D).requires_grad_()
    grads = [torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)]

    def torch_split(x):
        q, k, v = x.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
        return rotary(q), rotary(k), v

    rope_variants = {"rotary, torch compiled": torch.compile(torch_split),
                     "rotary, kernel": lambda x: rotary.split_qkv(x, H)}
    for name, split in rope_variants.items():
        def step():
            flat.grad = None
            torch.autograd.backward(split(flat), grads)

        results[name] = kernel_ms(step)
        print(f"{name:24s} {results[name]:7.3f} ms of kernels (forward + backward)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": torch.cuda.get_device_name(), "ms": results}, f, indent=1)


if __name__ == "__main__":
    main()
