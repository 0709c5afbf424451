"""The Gated DeltaNet layer's core on CUDA as one PyTorch custom op: fused projection in, normed output out.

The PyTorch reference it replaces: the layer core of model/gated_delta.py (`causal_conv_silu`,
`gated_delta_rule`, `GatedRMSNorm`).

    proj = [q | k | v | gate] (one matmul's output), ab = [a | b] (decay and beta logits)
    q, k = L2norm(SiLU(conv(q))), L2norm(SiLU(conv(k)));  v = SiLU(conv(v))        (short_conv)
    g = chunk-local cumsum of -exp(A_log) * softplus(a + dt_bias);  beta = sigmoid(b)
    o = the gated delta rule over (q, k, v, g, beta)                                (fla's chunk kernels)
    y = RMSNorm(o) * weight * SiLU(gate)                                            (gdn_kernels)

Why one op: torch.compile sees an opaque node with a known output shape instead of breaking its graph at each
Triton call, so the whole model compiles into one graph; the backward writes the gradients of q, k, v and gate
straight into one buffer shaped like `proj` (no concatenation); and the forward keeps the chunk states, the WY
factor w and the corrected values that fla's own autograd function recomputes in its backward (about 0.5 GB per
layer at the study shape, traded for two kernels per layer).

The fla calls follow `fla.ops.gated_delta_rule.chunk` of fla 0.6 (the op is used only with that release): the same
kernels in the same order, so the op computes what `chunk_gated_delta_rule(..., use_qk_l2norm_in_kernel=True,
use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True)` computes; except that the backward's first two (the
intra-chunk value gradient and the state gradients) are one kernel of the project's, `gdn_kernels.state_grad`. On
Hopper, four of fla's kernels are launched at this op's own configs instead of fla's autotuned ones
(`HOPPER_CONFIGS`). fla and Triton are imported only when the op runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK = 64  # fla's chunk length
L2_EPS = 1e-6  # fla's in-kernel L2 norm epsilon


def shape_supported(head_dim: int, head_v_dim: int, conv_size: int) -> bool:
    """Whether gdn_kernels handle the shape: a program holds one head, so head sizes are powers of two."""
    def pow2(n):
        return n >= 16 and n & (n - 1) == 0
    return pow2(head_dim) and pow2(head_v_dim) and head_dim <= 256 and head_v_dim <= 512 and conv_size <= 4


FLA_VERSION = "0.6"  # the fla release whose internal functions this op calls and was checked against


def fla_internals_available() -> bool:
    """Whether fla is the release this op was written for (its internals change between releases; other releases
    use fla's public ops instead) and Triton imports."""
    try:
        import fla

        if not fla.__version__.startswith(FLA_VERSION + "."):
            return False
        from fla.ops.common.chunk_delta_h import (  # noqa: F401
            chunk_gated_delta_rule_fwd_h, chunk_gated_delta_rule_fwd_kernel_h_blockdim64)
        from fla.ops.common.chunk_o import (  # noqa: F401
            chunk_bwd_dqkwg, chunk_bwd_kernel_dqkwg, chunk_fwd_kernel_o, chunk_fwd_o)
        from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_kkt_solve_kernel  # noqa: F401
        from fla.ops.gated_delta_rule.gate import gdn_gate_chunk_cumsum  # noqa: F401
        from fla.ops.gated_delta_rule.wy_fast import (  # noqa: F401
            prepare_wy_repr_bwd, prepare_wy_repr_bwd_kernel, recompute_w_u_fwd)
        from fla.ops.utils import chunk_local_cumsum  # noqa: F401

        from hybridctl.core.kernels import gdn_kernels, short_conv  # noqa: F401  (need Triton)
    except Exception:  # another fla layout, or no Triton
        return False
    return True


def _gate(proj: Tensor, num_heads: int, head_v_dim: int) -> Tensor:
    """The output gate's columns of [q | k | v | gate], the last num_heads * head_v_dim."""
    return proj[..., proj.shape[-1] - num_heads * head_v_dim :]


# ---------------------------------------------------------------------------------------------------------
# fla's chunk kernels at this op's own launch configs on Hopper

# fla 0.6 autotunes these kernels at their first call, on Hopper over 2 and 4 warps (fwd_o also one 8-warp config;
# kkt_solve over 1, 2 and 4 warps at BK 32 / 64). Its dqkwg uses BV 128 there, where every such config spills
# registers (ptxas -v: 5 KB per thread). `benchmarks/fla_tiles.py` timed each kernel alone on an H200 at the study
# shape (ms per layer, fla's -> below): kkt_solve 0.196 -> 0.121, fwd_h 0.362 -> 0.245, fwd_o 0.286 -> 0.223,
# dqkwg 1.069 -> 0.454 (and the state gradients' dhu, which state_grad has since replaced, 0.636 -> 0.494).
# fwd_h's and fwd_o's are inside fla's own lists, and so is kkt_solve at 1 warp with BK 64 (0.129): its
# autotuner, timing a few runs, picks slower ones here. Some configs compute wrong results (dqkwg at BV 32 with 4
# warps gets dw wrong by 7%; prepare_wy_repr_bwd at BK 32 with 4 warps faults), so the sweep reports each config's
# error against fla's launch, and the configs apply only at the head sizes where tests/test_gpu.py checks them
# against the PyTorch reference. Elsewhere, on other GPUs, and for kernels not listed the op calls fla's wrappers:
# no config of the WY backward (`wy_bwd`: BK, BV of 64, 64 / 64, 128 / 128, 64 at 4 and 8 warps and 2-4 stages) beat
# fla's 0.358 ms (its 4 warps at 4 stages, inside fla's list, took 0.354; every 8-warp config 0.53-0.67).
HOPPER_CONFIGS = {
    "kkt_solve": {"BK": 128, "num_warps": 1, "num_stages": 1},
    "fwd_h": {"BV": 64, "num_warps": 4, "num_stages": 3},
    "fwd_o": {"BK": 64, "BV": 128, "num_warps": 4, "num_stages": 3},
    "dqkwg": {"BV": 64, "num_warps": 8, "num_stages": 3},
}
HOPPER_HEAD_DIMS = {(128, 256)}  # (head_dim, head_v_dim): the study presets'


def launch_config(kernel: str, k: Tensor, v: Tensor, config: dict | str | None = "auto") -> dict | None:
    """The launch config for one of fla's kernels, given the op's k [B, T, H, K] and a value-shaped [.., V]
    tensor: this op's for this device and shape for "auto", else `config` as given; None means fla's wrapper."""
    if config != "auto":
        return config
    measured = torch.cuda.get_device_capability(k.device) == (9, 0) and (k.shape[-1], v.shape[-1]) in HOPPER_HEAD_DIMS
    return HOPPER_CONFIGS.get(kernel) if measured else None


def _jit(kernel):
    """fla's Triton kernel without its heuristics and autotuner wrappers (which fix the launch config)."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    while isinstance(kernel, (Autotuner, Heuristics)):
        kernel = kernel.fn
    return kernel


def fwd_kkt_solve(k: Tensor, v: Tensor, g: Tensor, beta: Tensor, config: dict | str | None = "auto") -> Tensor:
    """The WY factor's triangular inverse per chunk, (I + strict_tril(diag(beta) K K^T * decay))^-1 [B, T, H, 64]
    (as `chunk_gated_delta_rule_fwd_intra` makes it; v gives the value head size for the launch config)."""
    from fla.ops.gated_delta_rule.chunk_fwd import chunk_gated_delta_rule_fwd_kkt_solve_kernel as kernel
    config = launch_config("kkt_solve", k, v, config)
    B, T, H, K = k.shape
    A = k.new_zeros(B, T, H, CHUNK)  # the kernel writes the lower triangle only
    grid = (-(-T // CHUNK), B * H)
    if config is None:
        kernel[grid](k=k, g=g, beta=beta, A=A, cu_seqlens=None, chunk_indices=None, T=T, H=H, HV=H, K=K, BT=CHUNK,
                     BC=16)
    else:
        _jit(kernel)[grid](k, g, beta, A, None, None, T, H=H, HV=H, K=K, BT=CHUNK, BC=16, USE_G=True, IS_VARLEN=False,
                           **config)
    return A


def fwd_h(k: Tensor, w: Tensor, u: Tensor, g: Tensor, config: dict | str | None = "auto") -> tuple[Tensor, Tensor]:
    """The chunk states h [B, NT, H, K, V] and the corrected values v_new."""
    from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_h
    from fla.ops.common.chunk_delta_h import chunk_gated_delta_rule_fwd_kernel_h_blockdim64 as kernel
    config = launch_config("fwd_h", k, u, config)
    if config is None:
        h, v_new, _ = chunk_gated_delta_rule_fwd_h(k=k, w=w, u=u, g=g, initial_state=None, output_final_state=False,
                                                   chunk_size=CHUNK)
        return h, v_new
    B, T, H, K = k.shape
    V, NT, config = u.shape[-1], -(-T // CHUNK), dict(config)
    BV = min(config.pop("BV"), V)
    h, v_new = k.new_empty(B, NT, H, K, V), torch.empty_like(u)
    _jit(kernel)[(-(-V // BV) * B * H,)](
        k, u, w, v_new, g, None, h, None, None, None, None, T, H=H, HV=H, K=K, V=V, BT=CHUNK, BV=BV, USE_G=True,
        USE_GK=False, USE_INITIAL_STATE=False, STORE_FINAL_STATE=False, SAVE_NEW_VALUE=True, STATE_V_FIRST=False,
        IS_VARLEN=False, **config)
    return h, v_new


def fwd_o(q: Tensor, k: Tensor, v_new: Tensor, h: Tensor, g: Tensor, scale: float,
          config: dict | str | None = "auto") -> Tensor:
    """The chunked recurrence's output o: the inter-chunk part from h plus the intra-chunk attention."""
    from fla.ops.common.chunk_o import chunk_fwd_kernel_o, chunk_fwd_o
    config = launch_config("fwd_o", k, v_new, config)
    if config is None:
        return chunk_fwd_o(q=q, k=k, v=v_new, h=h, g=g, scale=scale, chunk_size=CHUNK)
    B, T, H, K = q.shape
    V, NT, config = v_new.shape[-1], -(-T // CHUNK), dict(config)
    BK, BV = min(config.pop("BK"), K), min(config.pop("BV"), V)
    o = torch.empty_like(v_new)
    _jit(chunk_fwd_kernel_o)[(-(-V // BV) * NT, B * H)](
        q, k, v_new, h, g, None, o, None, None, scale, T, H=H, HV=H, K=K, V=V, BT=CHUNK, BK=BK, BV=BV, USE_G=True,
        USE_G_GAMMA=False, STATE_V_FIRST=False, IS_VARLEN=False, **config)
    return o


def bwd_dqkwg(q: Tensor, k: Tensor, v_new: Tensor, w: Tensor, g: Tensor, h: Tensor, dv: Tensor, do: Tensor,
              dh: Tensor, scale: float, config: dict | str | None = "auto") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of q, k, the WY factor w and the cumulative gate g (before its reverse cumsum)."""
    from fla.ops.common.chunk_o import chunk_bwd_dqkwg, chunk_bwd_kernel_dqkwg
    config = launch_config("dqkwg", k, do, config)
    if config is None:
        return chunk_bwd_dqkwg(q=q, k=k, v=v_new, w=w, g=g, h=h, dv=dv, do=do, dh=dh, scale=scale, chunk_size=CHUNK)
    B, T, H, K = q.shape
    V, NT, config = do.shape[-1], -(-T // CHUNK), dict(config)
    BK, BV = min(K, 128), min(config.pop("BV"), V)
    NK = -(-K // BK)
    dq, dk, dw = torch.empty_like(q), torch.empty_like(k), torch.empty_like(w)
    dg = torch.empty(NK, *g.shape, dtype=torch.float32, device=g.device)
    _jit(chunk_bwd_kernel_dqkwg)[(NK * NT, B * H)](
        q, k, v_new, g, None, h, do, dh, dq, dk, dw, dv, dg, None, None, scale, B=B, T=T, H=H, HV=H, K=K, V=V,
        BT=CHUNK, BK=BK, BV=BV, USE_G=True, USE_G_GAMMA=False, USE_DW=True, STATE_V_FIRST=False, IS_VARLEN=False,
        **config)
    return dq, dk, dw, dg.sum(0) if NK > 1 else dg[0]


def bwd_wy(k: Tensor, v: Tensor, beta: Tensor, g: Tensor, A: Tensor, dw: Tensor, du: Tensor,
           config: dict | str | None = "auto") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of the WY factors w = A (beta 2^g k) and u = A (beta v), through A's dependence on k, beta and g:
    the gradients of k, v, beta and g (before its reverse cumsum), given those of w (dw) and u (du)."""
    from fla.ops.gated_delta_rule.wy_fast import prepare_wy_repr_bwd, prepare_wy_repr_bwd_kernel
    config = launch_config("wy_bwd", k, v, config)
    if config is None:
        return prepare_wy_repr_bwd(k=k, v=v, beta=beta, g=g, A=A, dw=dw, du=du)
    B, T, H, K = k.shape
    V, NT, config = v.shape[-1], -(-T // CHUNK), dict(config)
    BK, BV = min(config.pop("BK"), K), min(config.pop("BV"), V)
    dk, dv, db, dg = torch.empty_like(k), torch.empty_like(v), torch.empty_like(beta), torch.empty_like(g)
    _jit(prepare_wy_repr_bwd_kernel)[(NT, B * H)](
        k, v, beta, g, A, dw, du, dk, dv, db, dg, None, None, T, H=H, HV=H, K=K, V=V, BT=CHUNK, BK=BK, BV=BV,
        USE_G=True, IS_VARLEN=False, **config)
    return dk, dv, db, dg


@torch.library.custom_op("hybridctl::gated_deltanet", mutates_args=())
def gated_deltanet(proj: Tensor, ab: Tensor, conv_weight: Tensor, A_log: Tensor, dt_bias: Tensor, norm_weight: Tensor,
                   num_heads: int, head_dim: int, head_v_dim: int, norm_eps: float
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns y and what the backward needs: q, k and v in one flat buffer, g, beta, A, h, v_new, w, o."""
    from fla.ops.gated_delta_rule.gate import gdn_gate_chunk_cumsum
    from fla.ops.gated_delta_rule.wy_fast import recompute_w_u_fwd
    from fla.ops.utils.constant import RCP_LN2

    from hybridctl.core.kernels.gdn_kernels import gated_rms_norm_fwd
    from hybridctl.core.kernels.short_conv import qkv_views, short_conv_fwd

    B, T, _ = proj.shape
    H, K, V = num_heads, head_dim, head_v_dim
    gate = _gate(proj, H, V)
    qkv = short_conv_fwd(proj, conv_weight, H * K, H * V, K, eps=L2_EPS)
    q, k, v = qkv_views(qkv, B, T, H, K, V)
    a, b = ab[..., :H].contiguous(), ab[..., H:]
    beta = torch.sigmoid(b)
    g = gdn_gate_chunk_cumsum(g=a, A_log=A_log, chunk_size=CHUNK, scale=RCP_LN2, dt_bias=dt_bias)
    A = fwd_kkt_solve(k, v, g, beta)
    w, u = recompute_w_u_fwd(k=k, v=v, beta=beta, A=A, g=g)
    h, v_new = fwd_h(k, w, u, g)
    o = fwd_o(q, k, v_new, h, g, K**-0.5)
    y = gated_rms_norm_fwd(o, gate, norm_weight, norm_eps)
    return y, qkv, g, beta, A, h, v_new, w, o


@gated_deltanet.register_fake
def _(proj, ab, conv_weight, A_log, dt_bias, norm_weight, num_heads, head_dim, head_v_dim, norm_eps):
    B, T, _ = proj.shape
    H, K, V = num_heads, head_dim, head_v_dim
    NT = -(-T // CHUNK)
    new = proj.new_empty
    return (new(B, T, H * V), new(B * T * (2 * H * K + H * V)), new(B, T, H, dtype=torch.float32),
            ab.new_empty(B, T, H), new(B, T, H, CHUNK), new(B, NT, H, K, V), new(B, T, H, V), new(B, T, H, K),
            new(B, T, H, V))


@torch.library.custom_op("hybridctl::gated_deltanet_backward", mutates_args=())
def gated_deltanet_backward(dy: Tensor, proj: Tensor, ab: Tensor, conv_weight: Tensor, A_log: Tensor, dt_bias: Tensor,
                            norm_weight: Tensor, qkv: Tensor, g: Tensor, beta: Tensor, A: Tensor, h: Tensor,
                            v_new: Tensor, w: Tensor, o: Tensor, norm_eps: float
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients for proj, ab, conv_weight, A_log, dt_bias and norm_weight."""
    from fla.ops.utils import chunk_local_cumsum

    from hybridctl.core.kernels.gdn_kernels import gate_beta_grad, gated_rms_norm_bwd, state_grad
    from hybridctl.core.kernels.short_conv import qkv_views, short_conv_bwd

    B, T, H, V = o.shape
    K = (proj.shape[-1] - 2 * H * V) // (2 * H)  # proj is [q | k | v | gate]: 2 H K + 2 H V wide
    q, k, v = qkv_views(qkv, B, T, H, K, V)
    scale = K**-0.5
    d_proj = torch.empty_like(proj)
    d_gate, gate = _gate(d_proj, H, V), _gate(proj, H, V)
    do, d_norm_weight = gated_rms_norm_bwd(dy.contiguous(), o, gate, norm_weight, norm_eps, d_gate)
    dh, dv = state_grad(q, k, w, g, do, scale, CHUNK)
    dq, dk, dw, dg = bwd_dqkwg(q, k, v_new, w, g, h, dv, do, dh, scale)
    dk2, dv, dbeta, dg2 = bwd_wy(k, v, beta, g, A, dw, dv)
    dg.add_(dg2)
    dg = chunk_local_cumsum(dg, chunk_size=CHUNK, reverse=True)
    d_ab, dA_log, ddt_bias = gate_beta_grad(ab, A_log, dt_bias, dg, beta, dbeta)
    # k's gradient has two parts, summed in the kernel
    d_conv = short_conv_bwd(proj, conv_weight, dq, dk, dv.contiguous(), d_proj[..., : 2 * H * K + H * V], H * K,
                            H * V, K, eps=L2_EPS, dk2=dk2)
    return (d_proj, d_ab, d_conv.to(conv_weight.dtype), dA_log.to(A_log.dtype), ddt_bias.to(dt_bias.dtype),
            d_norm_weight.to(norm_weight.dtype))


@gated_deltanet_backward.register_fake
def _(dy, proj, ab, conv_weight, A_log, dt_bias, norm_weight, qkv, g, beta, A, h, v_new, w, o, norm_eps):
    return (torch.empty_like(proj), torch.empty_like(ab), torch.empty_like(conv_weight), torch.empty_like(A_log),
            torch.empty_like(dt_bias), torch.empty_like(norm_weight))


def _setup_context(ctx, inputs, output):
    proj, ab, conv_weight, A_log, dt_bias, norm_weight, _, _, _, norm_eps = inputs
    ctx.save_for_backward(proj, ab, conv_weight, A_log, dt_bias, norm_weight, *output[1:])
    ctx.norm_eps = norm_eps
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, dy, *_unused):
    grads = gated_deltanet_backward(dy, *ctx.saved_tensors, ctx.norm_eps)
    return (*grads, None, None, None, None)


gated_deltanet.register_autograd(_backward, setup_context=_setup_context)
