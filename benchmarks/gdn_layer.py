"""Gated DeltaNet layer on a CUDA GPU: forward + backward time of the layer's paths and of its parts.

    python benchmarks/gdn_layer.py [--batch 48] [--seq 1024] [--d-model 768] [--heads 6] [--head-dim 128]
                                   [--sweep] [--profile] [--json FILE]

Times (CUDA events, median of repeats, bf16 autocast):
- the whole layer, forward + backward, for each backend: fused (the project's custom op), fla (fla's public ops
  one by one) and, if --reference, the PyTorch reference;
- the short convolution over q, k and v: fla's causal_conv1d against this project's kernel (with the L2 norm of
  q and k inside), forward and forward + backward;
- the gated RMSNorm: fla's against this project's kernel;
- the recurrence's backward through its chunk states: fla's two kernels against this project's one;
- with --sweep, the GPU time of each of the project's kernels (profiler, kernels only) at the tiles of the
  *_SWEEP lists below, to choose the defaults in gdn_kernels.py and short_conv.py.
"""

from __future__ import annotations

import argparse
import json

import torch
from triton.testing import do_bench

from hybridctl.core.kernels import gdn_kernels, short_conv
from hybridctl.core.model.gdn_dispatch import fla_gated_rms_norm, fla_short_conv, layer_path
from hybridctl.core.model.gated_delta import GatedDeltaNet
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
    dk2 = torch.randn_like(grads[1])  # k's gradient comes in two parts, as in the op

    def ours(backward=True, forward=True, fwd_tiles=short_conv.CONV_FWD_TILES, **bwd_tiles):
        if forward:
            short_conv.short_conv_fwd(proj, weight, H * K, H * V, K, tiles=fwd_tiles)
        if backward:
            short_conv.short_conv_bwd(proj, weight, *grads, d_proj[..., : 2 * H * K + H * V], H * K, H * V, K,
                                       dk2=dk2, **bwd_tiles)

    out["conv fwd: fla (no L2 norm)"] = ms(fla_conv)
    out["conv fwd: ours (+ L2 norm of q, k)"] = ms(lambda: ours(backward=False))
    out["conv fwd+bwd: fla (no L2 norm)"] = ms(fla_conv_fwd_bwd)
    out["conv fwd+bwd: ours (+ L2 norm of q, k)"] = ms(ours)
    if sweep:
        out["conv bwd kernels: ours"] = kernel_ms(lambda: ours(forward=False))
        out["conv fwd kernels: ours"] = kernel_ms(lambda: ours(backward=False))
        sweep_tiles(out, "conv fwd", "_short_conv_fwd", lambda t: ours(backward=False, fwd_tiles=t), CONV_FWD_SWEEP)
        sweep_tiles(out, "conv bwd", "_short_conv_bwd", lambda t: ours(forward=False, tiles=t), CONV_BWD_SWEEP)

    o = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16)
    gate = parts[3]
    norm = torch.nn.Module()
    norm.weight, norm.eps = torch.nn.Parameter(torch.ones(V, device="cuda")), 1e-5
    dy = torch.randn(B, T, H * V, device="cuda", dtype=torch.bfloat16)

    def fla_norm():
        oo, gg = o.detach().requires_grad_(), gate.detach().requires_grad_()
        fla_gated_rms_norm(oo, gg.reshape(B, T, H, V), norm).reshape(B, T, H * V).backward(dy)

    def our_norm(forward=True, backward=True, fwd_tiles=(gdn_kernels.NORM_ROWS, gdn_kernels.NORM_WARPS),
                 bwd_tiles=gdn_kernels.NORM_BWD_TILES):
        if forward:
            gdn_kernels.gated_rms_norm_fwd(o, gate, norm.weight, 1e-5, rows=fwd_tiles[0], warps=fwd_tiles[1])
        if backward:
            gdn_kernels.gated_rms_norm_bwd(dy, o, gate, norm.weight, 1e-5, d_parts[3], tiles=bwd_tiles)

    out["gated norm fwd+bwd: fla"] = ms(fla_norm)
    out["gated norm fwd+bwd: ours"] = ms(our_norm)
    if sweep:
        sweep_tiles(out, "gated norm fwd", "_gated_norm_fwd", lambda t: our_norm(backward=False, fwd_tiles=t),
                    NORM_FWD_SWEEP)
        sweep_tiles(out, "gated norm bwd", "_gated_norm_bwd", lambda t: our_norm(forward=False, bwd_tiles=t),
                    NORM_BWD_SWEEP)
    state_grad_times(out, args, sweep)
    return out


def state_grad_times(out: dict, args, sweep: bool) -> None:
    """The recurrence's backward through its states on the forward's own intermediates: fla's two kernels (the
    intra-chunk value gradient, then the state gradients, at fla's own configs) against the project's one, kernel
    time and each output's largest difference relative to fla's largest value."""
    from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_bwd_dhu
    from fla.ops.common.chunk_o import chunk_bwd_dv_local

    from fla_tiles import inputs  # benchmarks/ is on the path when this script runs
    from hybridctl.core.kernels import gdn_fused

    C = gdn_fused.CHUNK
    saved = inputs(args)
    q, k, w, g, do, scale = (saved[name] for name in ("q", "k", "w", "g", "do", "scale"))

    def fla_state_grad():
        dv = chunk_bwd_dv_local(q=q, k=k, g=g, do=do, scale=scale, chunk_size=C)
        dh, _, dv = chunk_gated_delta_rule_bwd_dhu(q=q, k=k, w=w, g=g, h0=None, dht=None, do=do, dv=dv, scale=scale,
                                                   chunk_size=C)
        return dh, dv

    def ours(tiles=gdn_kernels.STATE_GRAD_TILES):
        return gdn_kernels.state_grad(q, k, w, g, do, scale, C, tiles)

    for name, mine, theirs in zip(("dh", "dv"), ours(), fla_state_grad()):
        out[f"state grad {name}: max difference / max |fla|"] = float(
            (mine.float() - theirs.float()).abs().max() / theirs.float().abs().max())
    out["state grad kernels: fla (dv_local + dhu)"] = kernel_ms(fla_state_grad)
    out["state grad kernel: ours"] = kernel_ms(ours)
    if sweep:
        sweep_tiles(out, "state grad", "_state_grad", ours, STATE_GRAD_SWEEP)


# Tiles tried by --sweep: (rows, warps) for the one-tile kernels; (rows per tile, tiles per program, warps,
# pipeline stages) for those that loop over tiles (stages 1: not pipelined); for the convolution (spans per
# program, time steps per span, warps, stages)
CONV_FWD_SWEEP = [(2, 32, 1, 3), (2, 64, 1, 3), (2, 64, 1, 2), (2, 64, 1, 4), (2, 128, 1, 3), (4, 64, 1, 3),
                  (1, 64, 1, 3), (4, 32, 2, 3), (4, 64, 2, 3), (8, 32, 4, 3)]
CONV_BWD_SWEEP = [(2, 64, 1, 4), (2, 64, 1, 3), (2, 64, 1, 2), (2, 128, 1, 3), (4, 64, 1, 3), (2, 32, 1, 3),
                  (1, 64, 1, 3), (1, 128, 1, 3), (4, 32, 2, 3), (4, 64, 2, 3), (2, 64, 2, 3), (8, 32, 4, 3)]
NORM_FWD_SWEEP = [(16, 4), (8, 4), (32, 4)]
NORM_BWD_SWEEP = [(4, 16, 2, 1), (4, 16, 2, 3), (4, 8, 2, 3), (4, 8, 2, 4), (8, 8, 4, 4), (4, 4, 2, 3)]
STATE_GRAD_SWEEP = [(32, 4, 2), (32, 4, 3), (32, 8, 2), (16, 2, 2), (16, 4, 2), (64, 4, 2), (64, 8, 2), (64, 8, 3)]


def sweep_tiles(out: dict, label: str, fragment: str, call, tile_list) -> None:
    """GPU time per call of the kernels whose names contain `fragment`, in call(tiles) for each tiles."""
    for tiles in tile_list:
        out[f"{label} kernel: tiles={tiles}"] = kernel_ms(lambda: call(tiles), warmup=1, name=fragment)


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
