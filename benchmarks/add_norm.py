"""The residual add + RMSNorm on a CUDA GPU: forward + backward time, compiled PyTorch against the project's
kernels (hybridctl/core/kernels/add_norm.py).

    python benchmarks/add_norm.py [--tokens 49152] [--d-model 768] [--sweep] [--json FILE]

As a block runs it under bf16 autocast: x is the fp32 residual stream, delta a sublayer's bf16 output, the norm
goes to a matmul in bf16, and the backward gets the gradients of both outputs. GPU time of the kernels per call
(profiler). GB/s counts the least traffic: the forward reads x and delta and writes the sum and the norm; the
backward reads the two gradients and the sum and writes the sum's gradient in fp32 and in bf16.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from hybridctl.core.kernels import add_norm
from profile_step import kernel_ms  # benchmarks/ is on the path when this script runs

EPS = 1e-5


def torch_add_norm(x, delta, weight):
    s = x + delta
    return s, F.rms_norm(s, (s.shape[-1],), weight, EPS).to(torch.bfloat16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=49152)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    shape = (args.tokens, args.d_model)
    x = torch.randn(shape, device="cuda", requires_grad=True)
    delta = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.ones(args.d_model, device="cuda", requires_grad=True)
    ds = torch.randn(shape, device="cuda")
    dn = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    n = x.numel()
    least_bytes = {"forward": n * (4 + 2 + 4 + 2), "forward + backward": n * (4 + 2 + 4 + 2) + n * (4 + 2 + 4 + 4 + 2)}

    def timed(fn, backward=True) -> float:
        def step():
            x.grad = delta.grad = weight.grad = None
            with torch.autocast("cuda", dtype=torch.bfloat16):
                s, normed = fn(x, delta, weight)
            if backward:
                torch.autograd.backward([s, normed], [ds, dn])
        return kernel_ms(step)

    def kernels(x, delta, weight):
        return add_norm.add_rms_norm(x, delta, weight, EPS)

    results = {}
    for name, fn in {"torch, compiled": torch.compile(torch_add_norm), "kernels": kernels}.items():
        for part, backward in (("forward", False), ("forward + backward", True)):
            key = f"{name}: {part}"
            results[key] = timed(fn, backward)
            print(f"{key:36s} {results[key]:.3f} ms  {least_bytes[part] / results[key] / 1e6:.0f} GB/s")
    if args.sweep:
        default = add_norm.ROWS, add_norm.WARPS, add_norm.BWD_TILES
        for rows, warps in [(1, 1), (2, 2), (4, 4), (8, 4), (8, 8), (16, 8)]:
            add_norm.ROWS, add_norm.WARPS = rows, warps
            key = f"kernels forward rows={rows} warps={warps}"
            results[key] = timed(kernels, backward=False)
            print(f"{key:44s} {results[key]:.3f} ms")
        add_norm.ROWS, add_norm.WARPS = default[:2]
        forward = results["kernels: forward"]
        for tiles in [(2, 32, 4, 2), (4, 32, 4, 2), (4, 32, 8, 2), (4, 32, 8, 3), (2, 64, 4, 3), (1, 64, 2, 3),
                      (4, 16, 8, 2), (2, 32, 2, 2)]:
            add_norm.BWD_TILES = tiles
            key = f"kernels backward tiles={tiles}"
            results[key] = timed(kernels) - forward
            print(f"{key:44s} {results[key]:.3f} ms")
        add_norm.BWD_TILES = default[2]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": torch.cuda.get_device_name(), "ms": results}, f, indent=1)


if __name__ == "__main__":
    main()
