"""Gated DeltaNet: the layer, its recurrence in PyTorch, and the call into fla's Triton kernel on CUDA.

The recurrence, per head, with state S of shape [K, V] (fla's convention):

    S_t = exp(g_t) * (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T (scale * q_t)

`chunk_gated_delta_rule_torch` computes it chunk by chunk in the WY form that fla's kernel uses (so CPU runs and
GPU runs compute the same function); `recurrent_gated_delta_rule` is the step-by-step definition and exists as a
test oracle. `gated_delta_rule` takes raw projections and applies the L2 norm, the sigmoid and the decay gate
itself, inside fla's kernel on CUDA or in PyTorch elsewhere.

The layer runs one of three paths (`layer_path` in core/model/gdn_dispatch.py, from model.gdn.backend): "fused" on CUDA, gdn_fused's custom op
(this project's convolution and norm kernels around fla's chunk kernels, one node in a compiled graph); "fla",
fla's public ops one by one; "torch", the PyTorch reference, on CPU and wherever fla cannot run. fla and Triton
are imported only on CUDA; CPU code never imports them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from hybridctl.core.model.cache import DeltaNetState
from hybridctl.core.model.gdn_dispatch import fla_gated_rms_norm, fla_short_conv, layer_path, use_fla


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    # Same epsilon placement as fla's in-kernel L2 norm.
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def gdn_decay(a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """Log-space decay g = -exp(A_log) * softplus(a + dt_bias), computed in fp32 like fla's gate kernel."""
    return -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())


# ---------------------------------------------------------------------------------------------------------
# PyTorch implementations of the recurrence. Shapes: q, k [B, T, H, K]; v [B, T, H, V]; g, beta [B, T, H].


def recurrent_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
    """Token-by-token definition; slow, used as the reference in tests."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.clone()
    outputs = []
    for t in range(T):
        q_t, k_t, v_t = q[:, t] * scale, k[:, t], v[:, t]
        state = state * g[:, t].exp()[..., None, None]
        correction = (k_t[..., None] * state).sum(-2)  # k_t^T S: what the state already says for this key
        v_new = (v_t - correction) * beta[:, t][..., None]
        state = state + k_t[..., None] * v_new[..., None, :]
        outputs.append((q_t[..., None] * state).sum(-2))
    o = torch.stack(outputs, dim=1)
    return o, (state if output_final_state else None)


def chunk_gated_delta_rule_torch(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False, chunk_size=64):
    """Chunked WY-form computation of the same recurrence, parallel within each chunk."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    scale = K**-0.5 if scale is None else scale
    dtype = q.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    pad = (C - T % C) % C
    # [B, T, H, *] -> [B, H, N, C, *]; zero padding leaves the state unchanged (beta = 0, g = 0)
    def chunks(x):
        x = x.transpose(1, 2).to(compute)
        if pad:
            x = F.pad(x, (0, 0, 0, pad) if x.dim() == 4 else (0, pad))
        return x.reshape(B, H, -1, C, *x.shape[3:])

    q, k, v, g, beta = map(chunks, (q, k, v, g, beta))
    N = q.shape[2]
    q = q * scale
    g = g.cumsum(-1)  # log decay from the chunk start to each position
    decay = (g[..., :, None] - g[..., None, :]).tril().exp().tril()  # exp(g_i - g_j) for j <= i
    k_beta = k * beta[..., None]
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    # WY form: T = (I + strict_tril(diag(beta) K K^T * decay))^-1 turns the chunk's delta updates into matmuls.
    m = (k_beta @ k.transpose(-1, -2) * decay).masked_fill(~strict, 0)
    eye = torch.eye(C, dtype=compute, device=q.device)
    t_inv = torch.linalg.solve_triangular(eye + m, eye.expand_as(m), upper=False, unitriangular=True)
    u = t_inv @ (v * beta[..., None])
    w = t_inv @ (k_beta * g.exp()[..., None])
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    state = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(compute)
    out = []
    for n in range(N):
        q_n, k_n, g_n = q[:, :, n], k[:, :, n], g[:, :, n]
        v_new = u[:, :, n] - w[:, :, n] @ state
        intra = (q_n @ k_n.transpose(-1, -2) * decay[:, :, n]).masked_fill(~causal, 0)
        out.append((q_n * g_n.exp()[..., None]) @ state + intra @ v_new)
        g_last = g_n[..., -1:]
        state = state * g_last[..., None].exp() + (k_n * (g_last - g_n).exp()[..., None]).transpose(-1, -2) @ v_new
    o = torch.stack(out, dim=2).reshape(B, H, N * C, V)[:, :, :T].transpose(1, 2).to(dtype)
    return o, (state.to(dtype) if output_final_state else None)


@torch.compiler.disable  # fla's Triton kernels run as they are; torch.compile fuses the code around them
def gated_delta_rule(q, k, v, a, b, A_log, dt_bias, backend: str = "auto", chunk_size: int = 64):
    """Gated DeltaNet recurrence from raw projections.

    q, k: [B, T, H, K] (L2-normalised here); v: [B, T, H, V]; a, b: [B, T, H] raw decay and beta logits.
    """
    if use_fla(q, q.shape[-1], backend):
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule

        o, _ = chunk_gated_delta_rule(
            q, k, v, a, b,
            use_qk_l2norm_in_kernel=True,
            use_gate_in_kernel=True,
            use_beta_sigmoid_in_kernel=True,
            A_log=A_log,
            dt_bias=dt_bias,
        )
        return o
    g = gdn_decay(a, A_log, dt_bias)
    beta = torch.sigmoid(b.float())
    o, _ = chunk_gated_delta_rule_torch(l2norm(q.float()), l2norm(k.float()), v.float(), g, beta, chunk_size=chunk_size)
    return o.to(v.dtype)


# ---------------------------------------------------------------------------------------------------------
# The layer


def causal_conv_silu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """SiLU of a depthwise causal convolution over time. x: [B, T, C]; weight: [C, W], tap W - 1 on the current
    token: the same function as a depthwise Conv1d with W - 1 zeros of left padding, as W shifted multiply-adds.
    The PyTorch path; on CUDA fla's Triton kernel computes it."""
    T, W = x.shape[1], weight.shape[-1]
    padded = F.pad(x, (0, 0, W - 1, 0))
    y = padded[:, W - 1 :] * weight[:, W - 1]
    for i in range(W - 1):
        y = y + padded[:, i : i + T] * weight[:, i]
    return F.silu(y)


class GatedRMSNorm(nn.Module):
    """RMSNorm over each head's value vector, then gated by SiLU(gate) (fla's FusedRMSNormGated, swish)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x, gate):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return (x32 * F.silu(gate.float())).to(gate.dtype)


class GatedDeltaNet(nn.Module):
    """fla's GatedDeltaNet parameterisation: q/k/v projections with a short causal depthwise conv and SiLU,
    L2-normalised q/k, beta = sigmoid(b), decay from (a, A_log, dt_bias) in fp32, gated RMSNorm output.

    The q, k, v and output-gate projections are one matmul (`in_proj`), the decay and beta logits another
    (`ab_proj`, kept apart so the large one's rows stay 128-byte aligned: stacked into one matmul, the step ran
    2.7% slower on an H200); both read the input in one compiled region, so its gradient is summed there.
    Everything between those projections and `o_proj` (short convolutions, recurrence, gated norm) runs as one
    fused op on CUDA, as fla's ops with backend "fla", or as the same functions in PyTorch elsewhere (see
    `layer_path`).
    """

    def __init__(self, d_model: int, num_heads: int, head_dim: int, expand_v: float, conv_size: int = 4,
                 norm_eps: float = 1e-5, backend: str = "auto", chunk_size: int = 64):
        super().__init__()
        self.num_heads, self.head_k_dim = num_heads, head_dim
        self.head_v_dim = int(head_dim * expand_v)
        self.key_dim = num_heads * head_dim
        self.value_dim = num_heads * self.head_v_dim
        self.backend, self.chunk_size = backend, chunk_size
        self.in_proj = nn.Linear(d_model, 2 * self.key_dim + 2 * self.value_dim, bias=False)  # q, k, v, gate
        self.ab_proj = nn.Linear(d_model, 2 * num_heads, bias=False)
        self.conv_size = conv_size
        self.conv_weight = nn.Parameter(torch.empty(2 * self.key_dim + self.value_dim, conv_size))  # over q, k, v
        self.A_log = nn.Parameter(torch.empty(num_heads, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.empty(num_heads, dtype=torch.float32))
        self.o_norm = GatedRMSNorm(self.head_v_dim, norm_eps)
        self.o_proj = nn.Linear(self.value_dim, d_model, bias=False)
        self.reset_gates()
        nn.init.normal_(self.conv_weight, 0.0, 1.0 / math.sqrt(conv_size))

    @torch.no_grad()
    def reset_gates(self):
        # fla's init: A ~ U(0, 16); dt log-uniform in [1e-3, 0.1], stored through softplus's inverse.
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0, 16).clamp_min(1e-4).log())
        dt = torch.exp(torch.rand_like(self.dt_bias) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp_min(1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def decay_beta_logits(self, x: torch.Tensor) -> torch.Tensor:
        """ab_proj(x); on CUDA through a weight padded with zero rows to a multiple of 8, sliced after: with 12
        outputs (the study's 6 heads) each row is 24 bytes, and cuBLAS runs 2-element-aligned kernels for it."""
        width = self.ab_proj.out_features
        pad = -width % 8
        if not x.is_cuda or not pad:
            return self.ab_proj(x)
        return F.linear(x, F.pad(self.ab_proj.weight, (0, 0, 0, pad)))[..., :width]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        proj, ab = self.in_proj(x), self.decay_beta_logits(x)
        path = layer_path(x.is_cuda, K, V, self.conv_size, self.backend)
        if path == "fused":
            o = torch.ops.hybridctl.gated_deltanet(proj, ab, self.conv_weight, self.A_log, self.dt_bias,
                                                   self.o_norm.weight, H, K, V, self.o_norm.eps)[0]
            return self.o_proj(o)
        q, k, v, gate = proj.split([self.key_dim, self.key_dim, self.value_dim, self.value_dim], dim=-1)
        a, b = ab.split(H, dim=-1)
        conv_q, conv_k, conv_v = self.conv_weight.split([self.key_dim, self.key_dim, self.value_dim])
        fla = path == "fla"
        conv = fla_short_conv if fla else causal_conv_silu
        q, k, v = conv(q, conv_q), conv(k, conv_k), conv(v, conv_v)
        o = gated_delta_rule(q.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, H, V), a, b, self.A_log, self.dt_bias,
                             backend="fla" if fla else "torch", chunk_size=self.chunk_size)
        gate = gate.reshape(B, T, H, V)
        o = fla_gated_rms_norm(o, gate, self.o_norm) if fla else self.o_norm(o, gate)
        return self.o_proj(o.reshape(B, T, self.value_dim))

    def forward_cached(self, x: torch.Tensor, cache: DeltaNetState) -> torch.Tensor:
        """forward for the next T positions of the sequences in `cache`, which keeps the convolution's last
        inputs and the recurrent state: a prompt runs the chunked recurrence from the state, a decoding step one
        step of it. Pad positions (left padding) leave both unchanged."""
        out = self.continue_states(x, cache, in_place=False)
        cache.length += x.shape[1]
        return out

    def step_at(self, x: torch.Tensor, cache: DeltaNetState, position: torch.Tensor) -> torch.Tensor:
        """One decoding step whose position the caller counts (ModelCache.advance): no shape depends on the
        position and the states are updated in place, so it can be captured in a CUDA graph."""
        return self.continue_states(x, cache, in_place=True)

    def continue_states(self, x: torch.Tensor, cache: DeltaNetState, in_place: bool) -> torch.Tensor:
        """in_place: write the new states into the tensors that hold the old ones (a captured step reads and writes
        the same memory at every replay), rather than keep the new tensors (a copy fewer for an eager step)."""
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        # a step's one row needs no padded weight (decay_beta_logits), which would cost two more kernels
        proj, ab = self.in_proj(x), self.ab_proj(x) if T == 1 else self.decay_beta_logits(x)
        qkv, gate = proj.split([2 * self.key_dim + self.value_dim, self.value_dim], dim=-1)
        real = cache.real_tokens(T, x.device)
        if real is not None:
            qkv = qkv.masked_fill(~real[..., None], 0.0)
        qkv, conv = conv_silu_with_state(qkv, self.conv_weight, cache.conv)
        cache.conv = update_in_place(cache.conv, conv) if in_place else conv
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        a, b = ab.split(H, dim=-1)
        fla = use_fla(x, K, self.backend)
        o, recurrent = gated_delta_rule_cached(
            q.reshape(B, T, H, K), k.reshape(B, T, H, K), v.reshape(B, T, H, V), a, b, self.A_log, self.dt_bias,
            cache.recurrent, real, fla, self.chunk_size)
        cache.recurrent = update_in_place(cache.recurrent, recurrent) if in_place else recurrent
        gate = gate.reshape(B, T, H, V)
        o = fla_gated_rms_norm(o, gate, self.o_norm) if fla else self.o_norm(o, gate)
        return self.o_proj(o.reshape(B, T, self.value_dim))



def update_in_place(state: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """`new` written into the tensor that holds the state, once there is one."""
    if state is None or state.shape != new.shape or state.dtype != new.dtype:
        return new
    return state.copy_(new)


def conv_silu_with_state(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """causal_conv_silu continued from `state` [B, W - 1, C], the inputs of the positions before x (zeros at the
    start, as causal_conv_silu pads); returns the output and the state after x."""
    T, W = x.shape[1], weight.shape[-1]
    if state is None:
        state = x.new_zeros(x.shape[0], W - 1, x.shape[-1])
    padded = torch.cat([state.to(x.dtype), x], dim=1)
    if T == 1:  # a decoding step: one multiply and one sum over the window (fewer kernels than the loop)
        y = (padded * weight.t()).sum(1, keepdim=True)
    else:
        y = padded[:, W - 1 :] * weight[:, W - 1]
        for i in range(W - 1):
            y = y + padded[:, i : i + T] * weight[:, i]
    return F.silu(y).to(x.dtype), padded[:, T:].clone()


def gated_delta_rule_cached(q, k, v, a, b, A_log, dt_bias, state, real, fla: bool, chunk_size: int = 64):
    """gated_delta_rule continued from `state` [B, H, K, V] (None: zeros); returns the output and the state
    after it, in fp32. One position: one step of the recurrence (fla's fused recurrent kernel on CUDA); more: the
    chunked form from the state. `real` [B, T] (None: all) marks the tokens that are not padding: pads get
    beta = 0 and no decay, so the state passes them unchanged."""
    T = q.shape[1]
    gates_outside = not fla or real is not None
    if gates_outside:
        g, beta = gdn_decay(a, A_log, dt_bias), torch.sigmoid(b.float())
        if real is not None:
            g, beta = g.masked_fill(~real[..., None], 0.0), beta.masked_fill(~real[..., None], 0.0)
    if fla:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

        kernel = fused_recurrent_gated_delta_rule if T == 1 else chunk_gated_delta_rule
        gates = dict(g=g, beta=beta) if gates_outside else dict(
            g=a, beta=b, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True, A_log=A_log, dt_bias=dt_bias)
        o, state = kernel(q, k, v, **gates, initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True)
        return o, state.float()
    q, k = l2norm(q.float()), l2norm(k.float())
    if T == 1:
        o, state = recurrent_gated_delta_rule(q, k, v.float(), g, beta, initial_state=state, output_final_state=True)
    else:
        o, state = chunk_gated_delta_rule_torch(q, k, v.float(), g, beta, initial_state=state, output_final_state=True,
                                                chunk_size=chunk_size)
    return o.to(v.dtype), state.float()
