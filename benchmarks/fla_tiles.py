"""Launch configs of the fla chunk kernels that the fused Gated DeltaNet op can launch itself on Hopper.

    python benchmarks/fla_tiles.py [--batch 48] [--seq 1024] [--heads 6] [--head-dim 128] [--kernels kkt_solve,...]
                                   [--json FILE]

For each kernel (forward: the WY factor's triangular inverse `kkt_solve`, the chunk states `fwd_h`, the output
`fwd_o`; backward: the q/k/w/g gradients `dqkwg`, the WY factors' backward `wy_bwd`) and each config: its GPU time per call (profiler, kernels only) and the
relative L2 error of each output against fla's own wrapper, which autotunes over its own configs. Inputs are a
real forward of the op at the given shape. Configs that beat the wrapper with no error go into `HOPPER_CONFIGS`
in hybridctl/core/kernels/gdn_fused.py.
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from hybridctl.core.kernels import gdn_fused
from hybridctl.core.model.gdn_dispatch import fla_status
from hybridctl.core.model.gated_delta import GatedDeltaNet
from profile_step import kernel_ms  # benchmarks/ is on the path when this script runs


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def inputs(args) -> dict[str, torch.Tensor]:
    """The saved tensors of one forward of the op, and the incoming gradients of the backward's fla kernels."""
    from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_intra

    from hybridctl.core.kernels.short_conv import qkv_views
    from hybridctl.core.kernels.gdn_kernels import state_grad

    torch.manual_seed(0)
    d_model = args.heads * args.head_dim
    layer = GatedDeltaNet(d_model, args.heads, args.head_dim, 2.0, backend="fused").cuda()
    x = torch.randn(args.batch, args.seq, d_model, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        proj, ab = layer.in_proj(x), layer.ab_proj(x)
        _, qkv, g, beta, A, h, v_new, w, o = torch.ops.hybridctl.gated_deltanet(
            proj, ab, layer.conv_weight, layer.A_log, layer.dt_bias, layer.o_norm.weight, args.heads,
            args.head_dim, layer.head_v_dim, layer.o_norm.eps)
    q, k, v = qkv_views(qkv, args.batch, args.seq, args.heads, args.head_dim, layer.head_v_dim)
    _, u, _ = chunk_gated_delta_rule_fwd_intra(k=k, v=v, g=g, beta=beta, chunk_size=gdn_fused.CHUNK)
    do = torch.randn_like(o)
    scale = args.head_dim**-0.5
    dh, dv = state_grad(q, k, w, g, do, scale, gdn_fused.CHUNK)
    dw = torch.randn_like(w)
    return dict(q=q, k=k, v=v, g=g, beta=beta, A=A, h=h, u=u, v_new=v_new, w=w, do=do, dh=dh, dv=dv, dw=dw,
                scale=scale)


def kernels(t: dict) -> dict:
    """Per kernel: (the call at a config, output names, the configs to try)."""
    return {
        "kkt_solve": (lambda c: [gdn_fused.fwd_kkt_solve(t["k"], t["u"], t["g"], t["beta"], c)], ["A"],
                      [{"BK": bk, "num_warps": nw, "num_stages": ns}
                       for bk, nw, ns in itertools.product([32, 64, 128], [1, 2, 4, 8], [1, 2, 3])]),
        "fwd_h": (lambda c: gdn_fused.fwd_h(t["k"], t["w"], t["u"], t["g"], c), ["h", "v_new"],
                  [{"BV": bv, "num_warps": nw, "num_stages": ns}
                   for bv, nw, ns in itertools.product([32, 64, 128], [4, 8], [1, 2, 3])]),
        "fwd_o": (lambda c: [gdn_fused.fwd_o(t["q"], t["k"], t["v_new"], t["h"], t["g"], t["scale"], c)], ["o"],
                  [{"BK": bk, "BV": bv, "num_warps": nw, "num_stages": ns}
                   for (bk, bv), nw, ns in itertools.product([(128, 128), (128, 64), (64, 128), (64, 64)], [4, 8],
                                                             [2, 3])]),
        "dqkwg": (lambda c: gdn_fused.bwd_dqkwg(t["q"], t["k"], t["v_new"], t["w"], t["g"], t["h"], t["dv"], t["do"],
                                                t["dh"], t["scale"], c),
                  ["dq", "dk", "dw", "dg"],
                  [{"BV": bv, "num_warps": nw, "num_stages": ns}
                   for bv, nw, ns in itertools.product([32, 64, 128], [4, 8], [1, 2, 3])]),
        # BK 32 at 4 warps faults (an illegal address, which ends the process): not tried
        "wy_bwd": (lambda c: gdn_fused.bwd_wy(t["k"], t["v"], t["beta"], t["g"], t["A"], t["dw"], t["dv"], c),
                   ["dk", "dv", "dbeta", "dg"],
                   [{"BK": bk, "BV": bv, "num_warps": nw, "num_stages": ns}
                    for (bk, bv), nw, ns in itertools.product([(64, 64), (64, 128), (128, 64)], [4, 8], [2, 3, 4])]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--kernels", default="kkt_solve,fwd_h,fwd_o,dqkwg,wy_bwd", help="Comma-separated subset.")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    ok, why = fla_status(args.head_dim)  # also lifts fla's Hopper guard where that is verified
    assert ok, why
    t = inputs(args)
    shape = {k: v for k, v in vars(args).items() if k not in ("json", "kernels")}
    results = {"device": torch.cuda.get_device_name(), "shape": shape, "current": gdn_fused.HOPPER_CONFIGS}
    for name, (call, outputs, configs) in kernels(t).items():
        if name not in args.kernels.split(","):
            continue
        reference = call(None)
        rows = [{"config": "fla's wrapper", "ms": kernel_ms(lambda: call(None))}]
        for config in configs:
            try:
                got = call(config)
                errors = {o: rel_err(a, b) for o, a, b in zip(outputs, got, reference)}
                rows.append({"config": config, "ms": kernel_ms(lambda: call(config)), "errors": errors})
                print(f"  {name} {config}: {rows[-1]['ms']:.3f} ms", flush=True)
            except Exception as e:  # e.g. out of shared memory at the largest tiles
                rows.append({"config": config, "error": f"{type(e).__name__}: {str(e)[:160]}"})
        results[name] = rows
        print(f"\n{name}:")
        for row in sorted(rows, key=lambda r: r.get("ms", float("inf"))):
            errs = " ".join(f"{o} {e:.1e}" for o, e in row.get("errors", {}).items())
            print(f"  {row.get('ms', float('nan')):7.3f} ms  {row['config']}  {errs or row.get('error', '')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
