"""SwiGLU's activation on a CUDA GPU: forward + backward time of silu(gate) * up, compiled PyTorch against the
project's kernels (hybridctl/core/kernels/swiglu.py).

    python benchmarks/swiglu.py [--tokens 49152] [--d-ff 2048] [--sweep] [--json FILE]

GPU time of the kernels per call (profiler), bf16: a lone eager call of a custom op spends more time on the host
than its kernels take, which a compiled model hides. GB/s counts the least traffic of forward + backward: the
forward reads gate_up and writes h, the backward reads the gradient and gate_up and writes the gradient of gate_up.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from hybridctl.core.kernels import swiglu
from profile_step import kernel_ms  # benchmarks/ is on the path when this script runs


def torch_swiglu(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=49152)
    parser.add_argument("--d-ff", type=int, default=2048)
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    gate_up = torch.randn(args.tokens, 2 * args.d_ff, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dh = torch.randn(args.tokens, args.d_ff, device="cuda", dtype=torch.bfloat16)
    least_bytes = 2 * (3 * gate_up.numel() + 2 * dh.numel())

    def timed(fn) -> float:
        def step():
            gate_up.grad = None
            fn(gate_up).backward(dh)
        return kernel_ms(step)

    variants = {"torch, compiled": torch.compile(torch_swiglu), "kernels": swiglu.swiglu}
    configs = [(swiglu.BLOCK, swiglu.WARPS)]
    if args.sweep:
        configs += [(b, w) for b in (512, 1024, 2048, 4096) for w in (2, 4, 8) if (b, w) != configs[0]]
    results = {}
    for name, fn in variants.items():
        results[name] = timed(fn)
        print(f"{name:20s} {results[name]:.3f} ms  {least_bytes / results[name] / 1e6:.0f} GB/s")
    default = configs[0]
    for block, warps in configs[1:]:
        swiglu.BLOCK, swiglu.WARPS = block, warps
        key = f"kernels block={block} warps={warps}"
        results[key] = timed(swiglu.swiglu)
        print(f"{key:28s} {results[key]:.3f} ms")
    swiglu.BLOCK, swiglu.WARPS = default
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": torch.cuda.get_device_name(), "ms": results}, f, indent=1)


if __name__ == "__main__":
    main()
