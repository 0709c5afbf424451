"""Gated DeltaNet layer on a CUDA GPU: forward + backward time of the layer's paths and of its parts.

    python benchmarks/gdn_layer.py [--batch 48] [--seq 1024] [--d-model 768] [--heads 6] [--head-dim 128]
                                   [--sweep] [--profile] [--json FILE]

Times (CUDA events, median of repeats, bf16 autocast):
- the whole layer, forward + backward, for each backend: fused (the project's custom op), fla (fla's public ops
  one by one) and, if --reference, the PyTorch reference;
- the short convolution over q, k and v: fla's causal_conv1d against this project's kernel (with the L2 norm of
  q and k inside), forward and forward + backward;
- the gated RMSNorm: fla's against this project's kernel;
- with --sweep, the GPU time of the project's backward kernels (profiler, kernels only) at other tile sizes, to
  choose the defaults in gdn_kernels.py.
"""

from __future__ import annotations

import argparse
import json

import torch
from triton.testing import do_bench

from hybridctl.core import gdn_kernels
from hybridctl.core.gated_delta import GatedDeltaNet, fla_gated_rms_norm, fla_short_conv, layer_path
from profile_step import kernel_ms, profiled_kernel_times  # benchmarks/ is on the path when this script runs


def ms(fn) -> float:
    return float(do_bench(fn, warmup=10, rep=50))


def top_kernels(step, steps: int = 3, top: int = 14) -> list[tuple[float, str]]:
    """(ms per step, name) of the kernels that take the most time in `step`."""
    kernels = profiled_kernel_times(step, steps)
    return sorted(((ms, name[:90]) for name, (ms, _) in kernels.items()), reverse=True)[:top]


def layer_times(args, backends: list[str]) -> dict[str, float]:
    x = torch.randn(args.batch, args.seq, args.d_model, device="cuda", requires_grad=True)
    out = {}
    for backend in backends:
        torch.manual_seed(0)
        layer = GatedDeltaNet(args.d_model, args.heads, args.head_dim, 2.0, backend=backend).cuda()
        assert layer_path(True, layer.head_k_dim, layer.head_v_dim, layer.conv_size, backend) == backend

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = layer(x)
            y.backward(torch.ones_like(y))

        out[backend] = ms(step)
        if args.profile:
            kernels = top_kernels(step)
            out[f"{backend} kernels"] = {name: t for t, name in kernels}
            print(f"\n{backend}: {out[backend]:.3f} ms; kernels (ms per step):")
            for t, name in kernels:
                print(f"  {t:7.3f}  {name}")
    return out


def part_times(args, sweep: bool) -> dict[str, float]:
    B, T, H, K = args.batch, args.seq, args.heads, args.head_dim
    V = 2 * K
    width = 2 * H * K + 2 * H * V
    proj = torch.randn(B, T, width, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(2 * H * K + H * V, 4, device="cuda") * 0.5
    parts = proj.split([H * K, H * K, H * V, H * V], dim=-1)
    weights = weight.split([H * K, H * K, H * V])
    grads = [torch.randn(B, T, p.shape[-1], device="cuda", dtype=torch.bfloat16) for p in parts[:3]]
    out = {}

    def fla_conv():
        for p, w in zip(parts[:3], weights):
            fla_short_conv(p, w)

    def fla_conv_fwd_bwd():
        for p, w, g in zip(parts[:3], weights, grads):
            p = p.detach().requires_grad_()
            w = w.detach().requires_grad_()
            fla_short_conv(p, w).backward(g)

    d_proj = torch.empty_like(proj)
    d_parts = d_proj.split([H * K, H * K, H * V, H * V], dim=-1)

    def ours(rows=gdn_kernels.CONV_ROWS, warps=gdn_kernels.CONV_WARPS, backward=True, forward=True, **tiles):
        for i, (p, w) in enumerate(zip(parts[:3], weights)):
            if forward:
                gdn_kernels.short_conv_fwd(p, w, K, normalize=i < 2, rows=rows, warps=warps)
            if backward:
                gdn_kernels.short_conv_bwd(p, w, grads[i], d_parts[i], K, normalize=i < 2, **tiles)

    out["conv fwd: fla (no L2 norm)"] = ms(fla_conv)
    out["conv fwd: ours (+ L2 norm of q, k)"] = ms(lambda: ours(backward=False))
    out["conv fwd+bwd: fla (no L2 norm)"] = ms(fla_conv_fwd_bwd)
    out["conv fwd+bwd: ours (+ L2 norm of q, k)"] = ms(ours)
    if sweep:  # GPU time of the backward's kernels alone, at tiles (rows, tiles per program, warps)
        out["conv bwd kernels: ours"] = kernel_ms(lambda: ours(forward=False))
        for tiles in [(8, 8, 4), (8, 16, 4), (8, 64, 4), (8, 128, 4), (4, 32, 2), (4, 64, 2), (4, 128, 2),
                      (16, 32, 8), (16, 64, 8), (8, 32, 2)]:
            out[f"conv bwd kernels: ours tiles={tiles}"] = kernel_ms(lambda: ours(forward=False, tiles=tiles))
        out["conv fwd kernels: ours"] = kernel_ms(lambda: ours(backward=False))
        for rows, warps in [(16, 2), (16, 4), (32, 2), (32, 8), (64, 4), (64, 8), (8, 2)]:
            out[f"conv fwd kernels: ours rows={rows} warps={warps}"] = kernel_ms(lambda: ours(rows, warps, False))

    o = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
    gate = parts[3]
    norm = torch.nn.Module()
    norm.weight, norm.eps = torch.nn.Parameter(torch.ones(V, device="cuda")), 1e-5
    dy = torch.randn(B, T, H * V, device="cuda", dtype=torch.bfloat16)

    def fla_norm():
        oo, gg = o.detach().requires_grad_(), gate.detach().requires_grad_()
        fla_gated_rms_norm(oo, gg.reshape(B, T, H, V), norm).reshape(B, T, H * V).backward(dy)

    def our_norm(backward_tiles=None, forward=True):
        if forward:
            gdn_kernels.gated_rms_norm_fwd(o, gate, norm.weight, 1e-5)
        gdn_kernels.gated_rms_norm_bwd(dy, o, gate, norm.weight, 1e-5, d_parts[3],
                                       **({"tiles": backward_tiles} if backward_tiles else {}))

    out["gated norm fwd+bwd: fla"] = ms(fla_norm)
    out["gated norm fwd+bwd: ours"] = ms(our_norm)
    if sweep:  # GPU time of the backward's kernels alone, at tiles (rows, tiles per program, warps)
        out["gated norm bwd kernels: ours"] = kernel_ms(lambda: our_norm(forward=False))
        for tiles in [(8, 8, 4), (8, 16, 4), (8, 32, 4), (4, 8, 2), (4, 32, 2), (4, 64, 2), (2, 32, 1), (2, 64, 1)]:
            out[f"gated norm bwd kernels: ours tiles={tiles}"] = kernel_ms(lambda: our_norm(tiles, forward=False))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--reference", action="store_true", help="Also time the PyTorch reference layer.")
    parser.add_argument("--sweep", action="store_true", help="Also time the project's kernels at other tile sizes.")
    parser.add_argument("--profile", action="store_true", help="Print each layer path's top kernels.")
    parser.add_argument("--json", help="Write the results here.")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "shape": vars(args)}
    results["layer fwd+bwd ms"] = layer_times(args, ["fused", "fla"] + (["torch"] if args.reference else []))
    results["parts ms"] = part_times(args, args.sweep)
    for section in ("layer fwd+bwd ms", "parts ms"):
        print(f"\n{section}")
        for name, value in results[section].items():
            if isinstance(value, float):
                print(f"  {value:8.3f}  {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
